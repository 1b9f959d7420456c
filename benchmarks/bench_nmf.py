"""nmf_batched against what a user would run instead, on the |W| matrices of CIFAR ResNets.

Workloads: every prunable weight of ResNet-56 (56 matrices, 0.85M entries) and of ResNet-18
(21 matrices, 11.2M entries), as |W| of a Kaiming-normal initialisation; rank 16 clipped to
min(m, n); 200 multiplicative-update iterations with tol 0, so every provider does exactly
the same arithmetic from the same (W0, H0).

Providers, all measured in the same run on the same inputs:
* ``sklearn``: ``sklearn.decomposition.NMF(solver="mu", init="custom")`` one matrix at a time
  (NumPy on the CPU; skipped where scikit-learn is not installed);
* ``torch_loop``: the plain PyTorch MU loop below, one matrix at a time, on each device;
* ``ours-<backend>``: ``ong_kernels.nmf_batched(..., backend=<backend>)`` for every backend
  that implements NMF and runs on this machine.

Every provider's result is checked (not timed) against the plain loop's: finite factors and
a per-matrix reconstruction error within 1e-3 relative (DESIGN.md's cross-backend contract).
``test_matmul_rate`` measures the fp32 matmul rate the report turns into each row's floor.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import numpy as np
import pytest
import torch

import ong_kernels
from benchmarks.shapes import WORKLOADS, prunable
from ong_kernels.backends.registry import kernels

RANK = 16
MAX_ITER = 200
EPS = torch.finfo(torch.float32).eps  # scikit-learn's EPSILON for an exactly-zero denominator
ERROR_RTOL = 1e-3  # DESIGN.md: reconstruction error after max_iter agrees to 1e-3 relative
WORKLOAD_NAMES = ["resnet56", "resnet18"]


# The NMF backends are the registry's nmf_mu kernels, so a backend that gains NMF is
# benchmarked without an edit here; each on the devices it serves ("*": cpu and cuda).
# Triton runs on the CPU only under its interpreter, which proves correctness, not speed.
def _backend_devices(kernel) -> tuple[str, ...]:
    if kernel.backend == "triton":
        return ("cuda",)
    return ("cpu", "cuda") if "*" in kernel.devices else kernel.devices


# ----------------------------------------------------------------------------- workloads


@cache
def problem(workload: str) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(V list, (W0, H0) list) on the CPU, float32, seeded: the same for every provider.

    V = |W| for W drawn as the trainer initialises it (Kaiming normal, fan_out, ReLU gain);
    (W0, H0) as scikit-learn's init="random" draws them: sqrt(mean(V) / r) * |N(0, 1)|.
    """
    gen = torch.Generator().manual_seed(0)
    vs, inits = [], []
    for spec in prunable(WORKLOADS[workload]):
        m, n = spec.matrix_shape
        fan_out = spec.shape[0] * math.prod(spec.shape[2:])
        v = (torch.randn(m, n, generator=gen) * (2.0 / fan_out) ** 0.5).abs_()
        r = min(RANK, m, n)
        scale = (v.mean() / r).sqrt()
        w0 = torch.randn(m, r, generator=gen).abs_().mul_(scale)
        h0 = torch.randn(r, n, generator=gen).abs_().mul_(scale)
        vs.append(v)
        inits.append((w0, h0))
    return vs, inits


def mu_flops(m: int, n: int, r: int) -> int:
    """Floating-point operations of one MU iteration on an m x n matrix at rank r.

    In the update order: V H^T (2mnr), H H^T (2nr^2), W (H H^T) (2mr^2), W *= num / den
    (2mr); then W^T V (2mnr), W^T W (2mr^2), (W^T W) H (2nr^2), H *= num / den (2nr).
    """
    return 4 * m * n * r + 4 * (m + n) * r * r + 2 * (m + n) * r


def workload_flops(workload: str) -> int:
    """Flops of MAX_ITER iterations over the whole workload.

    There is no bytes floor: V is read twice per iteration, but every single matrix
    (at most 512 x 4608 fp32 = 9.4 MB) stays in a 32 MiB L3 or a GPU's L2 across iterations,
    so DRAM bandwidth bounds nothing here.
    """
    vs, inits = problem(workload)
    return MAX_ITER * sum(
        mu_flops(*v.shape, w.shape[1]) for v, (w, _) in zip(vs, inits, strict=True)
    )


# ----------------------------------------------------------------------------- peers


def torch_mu_loop(
    v: torch.Tensor, w0: torch.Tensor, h0: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius MU NMF of one matrix, written as a PyTorch user would (scikit-learn's order)."""
    w, h = w0.clone(), h0.clone()
    for _ in range(max_iter):
        numerator = v @ h.T
        denominator = w @ (h @ h.T)
        w *= numerator / denominator.masked_fill_(denominator == 0, EPS)
        numerator = w.T @ v
        denominator = (w.T @ w) @ h
        h *= numerator / denominator.masked_fill_(denominator == 0, EPS)
    return w, h


def sklearn_nmf(v: np.ndarray, w0: np.ndarray, h0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import NMF

    model = NMF(
        n_components=w0.shape[1],
        solver="mu",
        init="custom",
        max_iter=MAX_ITER,
        tol=0,
        beta_loss="frobenius",
    )
    # scikit-learn updates a custom init in place; the copies keep the shared inputs intact.
    with warnings.catch_warnings():
        # tol=0 means "run max_iter"; some versions still report that as non-convergence.
        warnings.simplefilter("ignore", category=UserWarning)
        w = model.fit_transform(v, W=w0.copy(), H=h0.copy())
    return w, model.components_


# ----------------------------------------------------------------------------- checking


def relative_errors(vs, factors) -> torch.Tensor:
    """||V - W H||_F / ||V||_F per matrix, in float64 on the CPU."""
    out = []
    for v, (w, h) in zip(vs, factors, strict=True):
        v64 = v.double()
        w64, h64 = torch.as_tensor(w).double().cpu(), torch.as_tensor(h).double().cpu()
        out.append(torch.linalg.matrix_norm(v64 - w64 @ h64) / torch.linalg.matrix_norm(v64))
    return torch.stack(out)


@cache
def oracle_errors(workload: str) -> torch.Tensor:
    """The plain loop's per-matrix errors on the CPU: what every provider must reproduce."""
    vs, inits = problem(workload)
    return relative_errors(
        vs, [torch_mu_loop(v, w, h, MAX_ITER) for v, (w, h) in zip(vs, inits, strict=True)]
    )


def check(workload: str, factors) -> None:
    vs, inits = problem(workload)
    assert len(factors) == len(vs)
    for i, ((w, h), (w0, h0)) in enumerate(zip(factors, inits, strict=True)):
        assert tuple(w.shape) == tuple(w0.shape) and tuple(h.shape) == tuple(h0.shape), i
        assert bool(torch.isfinite(torch.as_tensor(w)).all()), f"W[{i}] is not finite"
        assert bool(torch.isfinite(torch.as_tensor(h)).all()), f"H[{i}] is not finite"
    torch.testing.assert_close(
        relative_errors(vs, factors), oracle_errors(workload), rtol=ERROR_RTOL, atol=0
    )


# ----------------------------------------------------------------------------- benchmarks


def _rounds(workload: str) -> int:
    # A ResNet-18 call takes seconds on a 2-core CPU; three rounds keep the suite in minutes.
    return 3 if workload == "resnet18" else 5


def _ours_params() -> list:
    """(backend, device) pairs for every backend with an NMF kernel; unrunnable ones skip."""
    available = ong_kernels.backends_available()
    params = []
    for kernel in kernels("nmf_mu"):
        backend = kernel.backend
        for dev in _backend_devices(kernel):
            reason = None
            if not available.get(backend, False):
                reason = f"backend {backend!r} is not available in this build"
            elif dev == "cuda" and not torch.cuda.is_available():
                reason = "needs a CUDA device"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(backend, dev, id=f"{backend}-{dev}", marks=marks))
    return params


def _label(workload: str) -> dict:
    vs, _ = problem(workload)
    return {"flops": workload_flops(workload), "matrices": len(vs), "rank": RANK, "iters": MAX_ITER}


@pytest.mark.benchmark
@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
@pytest.mark.parametrize(("backend", "device"), _ours_params())
def test_nmf_ours(measure, workload, backend, device):
    vs, inits = problem(workload)
    vs = [v.to(device) for v in vs]
    inits = [(w.to(device), h.to(device)) for w, h in inits]
    factors = measure(
        lambda: ong_kernels.nmf_batched(
            vs, RANK, max_iter=MAX_ITER, tol=0, init=inits, backend=backend
        ),
        kernel="nmf",
        provider=f"ours-{backend}",
        workload=workload,
        device=device,
        rounds=_rounds(workload),
        warmup_rounds=1 if device == "cuda" else 0,  # CUDA context, Triton compilation
        **_label(workload),
    )
    check(workload, factors)


@pytest.mark.benchmark
@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_nmf_torch_loop(measure, workload, device):
    vs, inits = problem(workload)
    vs = [v.to(device) for v in vs]
    inits = [(w.to(device), h.to(device)) for w, h in inits]
    factors = measure(
        lambda: [torch_mu_loop(v, w, h, MAX_ITER) for v, (w, h) in zip(vs, inits, strict=True)],
        kernel="nmf",
        provider="torch_loop",
        workload=workload,
        device=device,
        rounds=_rounds(workload),
        warmup_rounds=1 if device.type == "cuda" else 0,
        **_label(workload),
    )
    check(workload, factors)


@pytest.mark.benchmark
@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_nmf_sklearn(measure, workload):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed: no sklearn peer")
    vs, inits = problem(workload)
    vs_np = [v.numpy() for v in vs]
    inits_np = [(w.numpy(), h.numpy()) for w, h in inits]
    factors = measure(
        lambda: [sklearn_nmf(v, w, h) for v, (w, h) in zip(vs_np, inits_np, strict=True)],
        kernel="nmf",
        provider="sklearn",
        workload=workload,
        device="cpu",
        # One matrix at a time in NumPy: ResNet-18 takes seconds per call on 2 cores, so
        # it gets a single round (no spread); ResNet-56 gets three.
        rounds=1 if workload == "resnet18" else 3,
        **_label(workload),
    )
    check(workload, factors)


@pytest.mark.benchmark
def test_matmul_rate(measure, device):
    """fp32 torch.mm on a large square: the flop rate behind the NMF floors."""
    # 2048^3 is ~0.1 s on a 2-core CPU; a GPU needs 8192^3 (1.1 TFLOP) to reach its peak.
    size = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    out = torch.empty(size, size, device=device)
    measure(
        lambda: torch.mm(a, b, out=out),
        kernel="matmul",
        provider="torch.mm",
        workload=f"fp32 {size}^3",
        device=device,
        warmup_rounds=1,
        flops=2 * size**3,
    )
    torch.testing.assert_close(out[:3, :5], a[:3] @ b[:, :5], rtol=1e-3, atol=1e-3)
