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


def test_float64_above_float32_range_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"weights\[0\] has entries above the float32 range"):
        nmf_batched([torch.full((3, 3), 1e39, dtype=torch.float64)], 2)


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
