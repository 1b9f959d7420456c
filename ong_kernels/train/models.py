"""CIFAR ResNets: the networks the ONG paper and its baselines are compared on.

Two families, both with a 3x3 stem and no max-pool so that 28x28 and 32x32 inputs keep
enough spatial resolution:

* ``resnet20/32/44/56/110`` (He et al. 2016, section 4.2): three stages of 16/32/64
  channels with ``n = (depth - 2) / 6`` basic blocks each, and parameter-free "option A"
  shortcuts (stride-2 subsampling plus zero-padded channels) where the shape changes.
* ``resnet18/34``: the ImageNet ResNet's four stages of 64/128/256/512 channels with
  1x1-conv + BatchNorm projection shortcuts, adapted to CIFAR (kuangliu/pytorch-cifar).

Parameter counts for 10 classes, checked in tests/test_train_models.py against the
published figures: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-18 11.2M, ResNet-34 21.3M.

``width`` scales every channel count; 1.0 is the published architecture, smaller values
only exist to keep tests fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "CifarResNet", "ResNet", "build_model"]

# depth -> blocks per stage.
_CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
_IMAGENET_STYLE_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

MODELS = tuple(
    [f"resnet{d}" for d in sorted(_CIFAR_DEPTHS)]
    + [f"resnet{d}" for d in sorted(_IMAGENET_STYLE_DEPTHS)]
)


def _channels(base: int, width: float) -> int:
    return max(1, round(base * width))


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        # Split the padding evenly between both sides, as the original Torch code does.
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad[0], self.pad[1]))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _init_weights(model: nn.Module) -> None:
    # Kaiming-normal convolutions / linear layers, BatchNorm at (1, 0): the standard
    # initialisation for these networks, and what pruning at initialisation scores.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ResNetBase(nn.Module):
    def _make_stage(self, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(_BasicBlock(self._in_planes, planes, s, shortcut))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class CifarResNet(_ResNetBase):
    """ResNet-(6n+2) for CIFAR: 16/32/64 channels, option-A shortcuts."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, width=1.0):
        super().__init__()
        if depth not in _CIFAR_DEPTHS:
            raise ValueError(f"depth: CIFAR ResNet depth must be one of {sorted(_CIFAR_DEPTHS)}")
        n = _CIFAR_DEPTHS[depth]
        c = [_channels(b, width) for b in (16, 32, 64)]
        self._in_planes = c[0]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.stages = nn.Sequential(
            self._make_stage(c[0], n, 1, "A"),
            self._make_stage(c[1], n, 2, "A"),
            self._make_stage(c[2], n, 2, "A"),
        )
        self.fc = nn.Linear(c[2], num_classes)
        _init_weights(self)


class ResNet(_ResNetBase):
    """ResNet-18/34 adapted to CIFAR: 3x3 stem, no max-pool, 1x1-conv shortcuts."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, width=1.0):
        super().__init__()
        if depth not in _IMAGENET_STYLE_DEPTHS:
            raise ValueError(f"depth: ResNet depth must be one of {sorted(_IMAGENET_STYLE_DEPTHS)}")
        c = [_channels(b, width) for b in (64, 128, 256, 512)]
        self._in_planes = c[0]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.stages = nn.Sequential(
            *[
                self._make_stage(planes, blocks, 1 if i == 0 else 2, "B")
                for i, (planes, blocks) in enumerate(
                    zip(c, _IMAGENET_STYLE_DEPTHS[depth], strict=True)
                )
            ]
        )
        self.fc = nn.Linear(c[3], num_classes)
        _init_weights(self)


def build_model(
    name: str, *, in_channels: int = 3, num_classes: int = 10, width: float = 1.0
) -> nn.Module:
    """Build one of :data:`MODELS` by name (e.g. ``"resnet56"``)."""
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width: expected a positive number, got {width!r}")
    depth = int(name.lower()[len("resnet") :])
    cls = CifarResNet if depth in _CIFAR_DEPTHS else ResNet
    return cls(depth, in_channels=in_channels, num_classes=num_classes, width=float(width))
