"""CIFAR ResNets: published parameter counts, forward shapes, argument checking."""

import pytest
import torch

from ong_kernels.train.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: why


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# Published sizes for 10 classes: He et al. 2016 (Table 6) for the CIFAR ResNets; the
# kuangliu/pytorch-cifar ResNet-18/34 for the 3x3-stem ImageNet-style networks.
@pytest.mark.parametrize(
    "name, published_millions, exact",
    [
        ("resnet20", 0.27, 269_722),
        ("resnet56", 0.85, 853_018),
        ("resnet18", 11.2, 11_173_962),
        ("resnet34", 21.3, 21_282_122),
    ],
)
def test_parameter_counts_match_published(name, published_millions, exact):
    count = n_params(build_model(name, num_classes=10))
    assert round(count / 1e6, 2 if published_millions < 1 else 1) == published_millions
    assert count == exact


def test_option_a_shortcuts_have_no_parameters():
    model = build_model("resnet20")
    names = [n for n, _ in model.named_parameters()]
    assert not any("shortcut" in n for n in names)
    # ResNet-18's projections are 1x1 convolutions with BatchNorm.
    r18 = dict(build_model("resnet18").named_parameters())
    assert r18["stages.1.0.shortcut.0.weight"].shape == (128, 64, 1, 1)


@pytest.mark.parametrize(
    "name, in_channels, size",
    [(name, 1, 28) for name in MODELS]  # Fashion-MNIST
    + [(name, 3, 32) for name in MODELS]  # CIFAR
    + [("resnet20", 3, 13), ("resnet18", 2, 9)],  # odd sizes
)
def test_forward_shapes(name, in_channels, size):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=7, width=0.125).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_class_count_and_width_scale_the_head():
    model = build_model("resnet56", num_classes=100, width=0.5)
    assert model.fc.weight.shape == (100, 32)
    assert model.conv1.weight.shape == (8, 3, 3, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="resnet21"), "model"),
        (dict(name="resnet20", in_channels=0), "in_channels"),
        (dict(name="resnet20", num_classes=2.5), "num_classes"),
        (dict(name="resnet20", width=0), "width"),
        (dict(name="resnet20", width=float("nan")), "width"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)
