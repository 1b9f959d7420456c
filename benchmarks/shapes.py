"""Parameter shapes of the CIFAR ResNets the benchmarks run on, from the architecture alone.

No model is built and nothing is downloaded: the shapes follow from the published
architectures, which is all a benchmark workload needs.

* ResNet-56 (He et al. 2016, section 4.2): a 3x3 stem of 16 channels, three stages of nine
  basic blocks with 16/32/64 channels, parameter-free "option A" shortcuts, a 64 -> 10 linear
  layer. 0.85M parameters.
* ResNet-18 for CIFAR (kuangliu/pytorch-cifar): a 3x3 stem of 64 channels (no max-pool), four
  stages of two basic blocks with 64/128/256/512 channels, 1x1-conv + BatchNorm projection
  shortcuts where the shape changes, a 512 -> 10 linear layer. 11,173,962 parameters.

The names follow ``ong_kernels.train.models`` (``stages.<stage>.<block>.conv1.weight``), the
trainer's implementation of the same networks, so a row here can be matched to a real layer.

Run ``python -m benchmarks.shapes`` to print the matrices and the totals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "SCALING_WORKLOADS",
    "WORKLOADS",
    "ParamSpec",
    "bert_base_encoder",
    "cifar_resnet",
    "llama_block",
    "prunable",
    "resnet18",
    "resnet20",
    "resnet34",
    "resnet56",
    "resnet110",
    "weight_matrix_shapes",
]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its dotted name, its shape, and what kind of layer owns it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "conv", "linear" (weights), "bias", "bn_weight", "bn_bias"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The (rows, cols) view nmf_batched uses: shape[0] x prod(shape[1:])."""
        if len(self.shape) == 1:
            return (1, self.shape[0])
        return (self.shape[0], math.prod(self.shape[1:]))


def _conv_bn(prefix: str, bn: str, c_in: int, c_out: int, k: int) -> list[ParamSpec]:
    # Every convolution in these networks is bias-free and followed by a BatchNorm.
    return [
        ParamSpec(f"{prefix}.weight", (c_out, c_in, k, k), "conv"),
        ParamSpec(f"{bn}.weight", (c_out,), "bn_weight"),
        ParamSpec(f"{bn}.bias", (c_out,), "bn_bias"),
    ]


def cifar_resnet(
    stem: int,
    stages: tuple[tuple[int, int], ...],
    shortcut: str,
    num_classes: int = 10,
    in_channels: int = 3,
) -> list[ParamSpec]:
    """All parameters of a CIFAR ResNet of basic blocks, in ``model.parameters()`` order.

    ``stages`` is ((channels, blocks), ...); the first block of every stage after the first
    has stride 2. ``shortcut`` is "A" (zero-padded identity, no parameters) or "B" (1x1 conv
    + BatchNorm wherever the channel count or the stride changes).
    """
    if shortcut not in ("A", "B"):
        raise ValueError(f'shortcut: expected "A" or "B", got {shortcut!r}')
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes, in_channels: must be >= 1, got {num_classes}, {in_channels}"
        )
    params = _conv_bn("conv1", "bn1", in_channels, stem, 3)
    c_in = stem
    for s, (c_out, blocks) in enumerate(stages):
        for b in range(blocks):
            stride = 2 if (s > 0 and b == 0) else 1
            p = f"stages.{s}.{b}"
            params += _conv_bn(f"{p}.conv1", f"{p}.bn1", c_in, c_out, 3)
            params += _conv_bn(f"{p}.conv2", f"{p}.bn2", c_out, c_out, 3)
            if shortcut == "B" and (stride != 1 or c_in != c_out):
                params += _conv_bn(f"{p}.shortcut.0", f"{p}.shortcut.1", c_in, c_out, 1)
            c_in = c_out
    params.append(ParamSpec("fc.weight", (num_classes, c_in), "linear"))
    params.append(ParamSpec("fc.bias", (num_classes,), "bias"))
    return params


def resnet56(num_classes: int = 10) -> list[ParamSpec]:
    """CIFAR ResNet-56: 6n+2 layers with n = 9, option-A shortcuts."""
    return cifar_resnet(16, ((16, 9), (32, 9), (64, 9)), "A", num_classes)


def resnet18(num_classes: int = 10) -> list[ParamSpec]:
    """ResNet-18 adapted to CIFAR: two blocks per stage, projection shortcuts."""
    return cifar_resnet(64, ((64, 2), (128, 2), (256, 2), (512, 2)), "B", num_classes)


def prunable(params: list[ParamSpec]) -> list[ParamSpec]:
    """The weights pruning acts on: convolution and linear weights (not BatchNorm, not biases)."""
    return [p for p in params if p.kind in ("conv", "linear")]


def weight_matrix_shapes(params: list[ParamSpec]) -> list[tuple[int, int]]:
    """The (m, n) matrices |W| that ONG factorises: one per prunable weight."""
    return [p.matrix_shape for p in prunable(params)]


def resnet20(num_classes: int = 10) -> list[ParamSpec]:
    """CIFAR ResNet-20: n = 3, option-A shortcuts (0.27M parameters)."""
    return cifar_resnet(16, ((16, 3), (32, 3), (64, 3)), "A", num_classes)


def resnet110(num_classes: int = 10) -> list[ParamSpec]:
    """CIFAR ResNet-110: n = 18, option-A shortcuts (1.7M parameters)."""
    return cifar_resnet(16, ((16, 18), (32, 18), (64, 18)), "A", num_classes)


def resnet34(num_classes: int = 10) -> list[ParamSpec]:
    """ResNet-34 for CIFAR (kuangliu/pytorch-cifar): 3/4/6/3 basic blocks, projections."""
    return cifar_resnet(64, ((64, 3), (128, 4), (256, 6), (512, 3)), "B", num_classes)


def bert_base_encoder(layers: int = 12, hidden: int = 768, ffn: int = 3072) -> list[ParamSpec]:
    """The weight matrices of a BERT-base encoder (nn.Linear: out x in): per layer the four
    attention projections (Q, K, V, output) and the two feed-forward layers. Biases and
    LayerNorms are listed for completeness; embeddings are not pruned here."""
    params = []
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value", "output"):
            params.append(ParamSpec(f"{p}.attention.{name}.weight", (hidden, hidden), "linear"))
            params.append(ParamSpec(f"{p}.attention.{name}.bias", (hidden,), "bias"))
        params.append(ParamSpec(f"{p}.intermediate.weight", (ffn, hidden), "linear"))
        params.append(ParamSpec(f"{p}.output.weight", (hidden, ffn), "linear"))
    return params


def llama_block(hidden: int = 4096, ffn: int = 11008) -> list[ParamSpec]:
    """One Llama-7B decoder block: q, k, v, o (4096 x 4096), gate and up (11008 x 4096),
    down (4096 x 11008)."""
    params = [ParamSpec(f"self_attn.{n}_proj.weight", (hidden, hidden), "linear") for n in "qkvo"]
    params += [ParamSpec(f"mlp.{n}_proj.weight", (ffn, hidden), "linear") for n in ("gate", "up")]
    params.append(ParamSpec("mlp.down_proj.weight", (hidden, ffn), "linear"))
    return params


# name -> parameter list; the workloads every benchmark file shares.
WORKLOADS = {"resnet56": resnet56(), "resnet18": resnet18()}
# The scaling benchmark's sets, from 0.27M to 202M weights (bench_nmf_scaling.py).
SCALING_WORKLOADS = {
    "resnet20": resnet20(),
    "resnet56": resnet56(),
    "resnet110": resnet110(),
    "resnet18": resnet18(),
    "resnet34": resnet34(),
    "bert_base": bert_base_encoder(),
    "llama_block": llama_block(),
}


def _summary() -> str:
    lines = []
    for name, params in SCALING_WORKLOADS.items():
        mats = weight_matrix_shapes(params)
        n_prunable = sum(m * n for m, n in mats)
        lines.append(
            f"{name}: {len(params)} tensors, {sum(p.numel for p in params):,} parameters, "
            f"{len(mats)} weight matrices with {n_prunable:,} entries"
        )
        for (m, n), count in sorted(
            {s: mats.count(s) for s in mats}.items(), key=lambda kv: kv[0][0] * kv[0][1]
        ):
            lines.append(f"  {count:3d} x ({m} x {n})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_summary())
