"""What a demanding user handed nmf_batched (issue 18): extreme scales, inputs that require
grad, mappings, devices that are not there, errors that name the tensor."""

from __future__ import annotations

import pytest
import torch

import ong_kernels
from ong_kernels import backends_available, nmf_batched, prune

BACKENDS = [b for b in ("reference", "cpu") if backends_available("nmf_mu")[b]]


def _error(v, w, h) -> float:
    v = v.double()
    return float((v - w.double() @ h.double()).norm() / v.norm())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["random", "nndsvda"])
@pytest.mark.parametrize(
    ("scale", "dtype"),
    [(1e19, torch.float32), (1e30, torch.float32), (1e-30, torch.float32),
     (1e-36, torch.float32), (1e30, torch.float64), (1e-40, torch.float64),
     (1e30, torch.bfloat16)],
)  # fmt: skip
def test_any_finite_scale_is_solved_like_scale_one(backend, init, scale, dtype):
    v = torch.rand(6, 8, dtype=torch.float64)
    ((w1, h1),) = nmf_batched([v.float()], 3, max_iter=50, init=init, backend=backend)
    big = (v * scale).to(dtype)
    ((w, h),) = nmf_batched([big], 3, max_iter=50, init=init, backend=backend)
    assert torch.isfinite(w).all() and torch.isfinite(h).all()
    assert float(w.abs().max()) > 0  # not flushed to zeros
    # About the fit of the unscaled problem: the trajectories differ a little because V is
    # rounded after scaling and NNDSVD zeroes entries below an absolute 1e-6 (scikit-learn's
    # rule, not scale-free); test_scaling_by_a_power_of_four_changes_no_bit is the exact check.
    assert abs(_error(big, w, h) - _error(v, w1, h1)) < 0.05


def test_scaling_by_a_power_of_four_changes_no_bit():
    v = torch.rand(9, 13)
    ((w1, h1),) = nmf_batched([v], 4, max_iter=30)
    ((w, h),) = nmf_batched([v * 2.0**100], 4, max_iter=30)  # solved as V / 4^j exactly
    assert torch.equal(w, w1 * 2.0**50) and torch.equal(h, h1 * 2.0**50)


# Every backend that runs here: Triton under its interpreter on this CPU (tests/conftest.py).
ALL_BACKENDS = [b for b in ("reference", "cpu", "triton") if backends_available("nmf_mu")[b]]


def _levels(bits: int, gen: torch.Generator) -> torch.Tensor:
    """A 7 x 9 matrix with entries in [1, 3) of `bits` fractional bits: V * 2^-2k is exact in
    every dtype whose ulp at that scale is at most 2^(-bits - 2k), subnormal or not."""
    return 1 + torch.randint(0, 2 ** (bits + 1), (7, 9), generator=gen).double() / 2**bits


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("init", ["random", "nndsvd", "nndsvda"])
@pytest.mark.parametrize(
    ("dtype", "bits", "k"),
    [(torch.float32, 9, 70),  # V in [2^-140, 3 * 2^-140): deep in float32's subnormals
     (torch.bfloat16, 1, 66),  # bfloat16 subnormals
     (torch.float64, 20, 200),  # ~1e-120: below float32's range
     (torch.float64, 20, 511),  # down to float64's smallest normal, 2^-1022
     (torch.float64, 20, -100)],  # ~1e60: above float32's range
)  # fmt: skip
def test_extreme_scales_solve_exactly_as_scale_one(backend, init, dtype, bits, k):
    # Issue 29 rows 1-2: a float32/bfloat16 subnormal V gave NaN (random) or a raw LinAlgError
    # (nndsvd: 4^-j was inf in float32); a float64 V of 1e-100 gave all-zero factors.
    v = _levels(bits, torch.Generator().manual_seed(k))
    ((w1, h1),) = nmf_batched([v.float()], 3, max_iter=20, init=init, backend=backend)
    tiny = (v * 2.0 ** (-2 * k)).to(dtype)
    assert torch.equal(tiny.double() * 2.0 ** (2 * k), v)  # the input is exactly v * 4^-k
    ((w, h),) = nmf_batched([tiny], 3, max_iter=20, init=init, backend=backend)
    wide = dtype == torch.float64 and not (2.0**-126 <= float(tiny.max()) <= 3.4e38)
    assert w.dtype == h.dtype == (torch.float64 if wide else torch.float32)
    # V / 4^j is exactly v, so the factors are (2^-k W1, 2^-k H1) to the bit.
    assert torch.equal(w, w1.to(w.dtype) * 2.0**-k) and torch.equal(h, h1.to(h.dtype) * 2.0**-k)
    assert float(w.max()) > 0 and float(h.max()) > 0
    # The fit, measured at scale one (the norm of a 1e-300 matrix underflows in float64).
    assert _error(v, w.double() * 2.0**k, h.double() * 2.0**k) < 0.3


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_smallest_subnormal_solves(backend, dtype):
    v = torch.full((4, 5), float(torch.finfo(dtype).smallest_normal) * 2.0**-7, dtype=dtype)
    ((w, h),) = nmf_batched([v], 2, max_iter=10, init="nndsvda", backend=backend)
    assert torch.isfinite(w).all() and float(w.max()) > 0 and float(h.max()) > 0
    assert _error(v, w, h) < 1e-3


def test_prune_ong_on_subnormal_and_tiny_float64_weights():
    for dtype, scale in ((torch.float32, 1e-39), (torch.float64, 1e-200)):
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        masks = prune(model, "ong", 0.5, max_iter=5, init="nndsvd").masks
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * (48 + 24))


def test_factors_are_detached_whatever_requires_grad():
    v = torch.rand(7, 9, requires_grad=True)
    w0 = torch.rand(7, 2, requires_grad=True)
    h0 = torch.rand(2, 9, requires_grad=True)
    ((w, h),) = nmf_batched([v], 2, init=[(w0, h0)], max_iter=5)
    assert w.grad_fn is None and h.grad_fn is None
    assert not w.requires_grad and not h.requires_grad
    ((w, h),) = nmf_batched([v], 2, max_iter=5)
    assert w.grad_fn is None and not w.requires_grad


def test_a_mapping_says_what_to_pass():
    with pytest.raises(TypeError, match=r"got a dict \(a mapping\): pass its values"):
        nmf_batched({"layer.weight": torch.rand(3, 4)}, 2)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", "device 'bogus' is not a device"),
        (3.5, "device must be a str or torch.device"),
        ("meta", "device 'meta' holds no data"),
    ]
    + ([] if torch.cuda.is_available() else [("cuda", "'cuda' requested but CUDA is not")]),
)
def test_a_device_that_is_not_there_is_a_one_line_error(device, message):
    with pytest.raises((ValueError, TypeError), match=message):
        nmf_batched([torch.rand(3, 4)], 2, device=device)


def test_names_label_the_matrix_in_errors():
    ws = [torch.rand(3, 4), torch.tensor([[1.0, float("nan")]])]
    with pytest.raises(ValueError, match=r"'fc\.weight' contains NaN"):
        nmf_batched(ws, 2, names=["conv.weight", "fc.weight"])
    with pytest.raises(ValueError, match="names has 1 entries but there are 2 matrices"):
        nmf_batched(ws, 2, names=["conv.weight"])


def test_prune_ong_names_the_parameter_with_a_nan():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight' contains NaN"):
        prune(model, "ong", 0.5, max_iter=5)


def test_budget_error_names_the_matrix():
    with pytest.raises(ValueError, match=r"'big' \(shape \(300, 300\)\) needs"):
        ong_kernels.nmf_batched([torch.rand(300, 300)], 4, memory_budget=1000, names=["big"])


def test_a_bad_matrix_late_in_a_generator_raises_the_named_error():
    def gen():
        yield torch.rand(5, 6)
        yield torch.rand(4, 4)
        yield torch.tensor([[1.0, -2.0]])

    with pytest.raises(ValueError, match=r"'c' contains negative entries"):
        nmf_batched(gen(), 2, memory_budget=10**9, names=["a", "b", "c"])


def test_a_bad_matrix_late_in_a_sequence_fails_before_any_solve(monkeypatch):
    from ong_kernels import _ops

    calls = []
    monkeypatch.setattr(_ops, "nmf_mu_", lambda *a, **k: calls.append(1))
    ws = [torch.rand(5, 6), torch.rand(4, 4), torch.tensor([[1.0, float("inf")]])]
    with pytest.raises(ValueError, match=r"weights\[2\] contains NaN or Inf"):
        nmf_batched(ws, 2, memory_budget=10**9)
    assert calls == []


def test_ong_mask_names_the_tensor_with_a_nan(tmp_path, capsys):
    from safetensors.torch import save_file

    from ong_kernels.mask_cli import main

    bad = torch.rand(6, 8)
    bad[1, 2] = float("nan")
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.rand(5, 7), "b.weight": bad}, str(path))
    out = tmp_path / "masks.safetensors"
    args = [str(path), "--rank", "2", "--max-iter", "3", "--no-progress", "-o", str(out)]
    assert main(args) == 2
    assert "'b.weight' contains NaN" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e-39), (torch.float64, 1e-200)])
def test_ong_mask_on_a_checkpoint_of_tiny_weights_equals_prune(tmp_path, capsys, dtype, scale):
    # Issue 29 row 1: ong-mask printed the raw LinAlgError of a subnormal weight, unnamed.
    from safetensors.torch import save_file

    from ong_kernels import load_masks
    from ong_kernels.mask_cli import main

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    path, out = tmp_path / "model.safetensors", tmp_path / "masks.safetensors"
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(path))
    args = [str(path), "--sparsity", "0.5", "--rank", "2", "--max-iter", "10", "--no-progress",
            "-o", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    masks = load_masks(out)
    expected = prune(model, "ong", 0.5, rank=2, max_iter=10).masks
    assert sorted(masks) == sorted(expected)
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask), name
