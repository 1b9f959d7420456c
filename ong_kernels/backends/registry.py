"""Who implements which op on which device, and the choice between them.

Every kernel module registers its implementations here when it is imported
(`ong_kernels.backends.load_all()` imports them all); nothing else lists kernels by hand. The
conformance suite (tests/kernels/) walks this registry, so a new kernel is tested as soon as it
registers.

Choice (`select`), for one op and the device its tensors are on:
  1. an explicit request (`backend="cpu"` on the public API),
  2. else the environment: ONG_KERNELS_BACKEND="triton" (every op) or
     "nmf_mu=cpu,masked_sgd_step=reference" (per op),
  3. else the first available entry of DEFAULT_ORDER for that device.
An explicit request (1 or 2) that cannot run here raises with how to build or install it;
"auto" falls back silently to the next candidate, the pure-PyTorch reference last.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ENV_VAR = "ONG_KERNELS_BACKEND"

OPS = ("nmf_mu", "nmf_beta_mu", "masked_sgd_step")
BACKENDS = ("reference", "cpu", "cuda", "triton")

# The default order per op and device type, best first. Why each order (benchmarks/RESULTS.md):
# - nmf_mu on cpu: the C++ solve, then the reference (PyTorch matmuls, one matrix at a time).
# - nmf_mu on cuda: Triton first, a handful of launches per iteration instead of the
#   reference's ~10 per matrix; not yet measured on a GPU (no GPU lent so far), so this is the
#   predicted order.
# - masked_sgd_step on cuda: the CUDA C++ kernel until gpu_check.sh measures Triton against it.
# Device types absent here (mps, xpu, ...) get the reference.
DEFAULT_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "nmf_mu": {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")},
    # nmf_beta_mu (beta-divergence / regularised / fixed-H MU, ong_kernels/nmf_beta.py): the
    # same order; only the kernels that register it take part. On cuda: the Triton beta kernel
    # (triton/nmf_beta.py: W H tile by tile, no m x n temporary) before the reference, which
    # holds several m x n temporaries; predicted, not yet measured on a GPU.
    "nmf_beta_mu": {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")},
    "masked_sgd_step": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
}

ANY_DEVICE = "*"
IEEE = "ieee"  # float32 products: the precision every kernel computes in
# One matrix of an NMF group, as a kernel's workspace model sees it: (m, n, r, V dtype).
Shape = tuple[int, int, int, torch.dtype]


@dataclass(frozen=True)
class Kernel:
    """One implementation of one op.

    devices: device types it computes on ("cpu", "cuda"), or ANY_DEVICE (the reference).
    available: whether it can run in this process (built, installed, a GPU present).
    hint: what to do when it cannot (shown in the error of an explicit request).
    workspace: for nmf_mu and nmf_beta_mu, the peak bytes the kernel allocates while it
        solves a group of matrices of shapes (m, n, r, V dtype) together, beyond V and the
        factors it is handed (nmf_groups sizes memory_budget groups with it).
    precisions: the products it can compute in: "ieee" (float32) for every kernel; the
        Triton NMF kernel adds its TF32 opt-ins. `select` refuses a precision the chosen
        kernel does not declare; the kernel takes precision= only when it declares more
        than "ieee".
    """

    op: str
    backend: str
    devices: tuple[str, ...]
    fn: Callable
    available: Callable[[], bool]
    hint: str
    workspace: Callable[[Sequence[Shape]], int] | None = None
    precisions: tuple[str, ...] = (IEEE,)

    def serves(self, device_type: str) -> bool:
        return ANY_DEVICE in self.devices or device_type in self.devices


_KERNELS: dict[tuple[str, str], Kernel] = {}


def register(
    op: str,
    backend: str,
    *,
    devices: tuple[str, ...],
    available: Callable[[], bool] = lambda: True,
    hint: str = "",
    workspace: Callable[[Sequence[Shape]], int] | None = None,
    precisions: tuple[str, ...] = (IEEE,),
) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as `backend`'s implementation of `op` (one per pair). An
    NMF kernel declares its `workspace` model (Kernel says what it returns)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends: {BACKENDS}")
    if op.startswith("nmf") and workspace is None:
        raise ValueError(f"the {backend} nmf_mu kernel must declare its workspace model")
    if IEEE not in precisions:
        raise ValueError(f"the {backend} {op} kernel must compute in {IEEE!r} (float32) too")

    def decorate(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = Kernel(
            op, backend, tuple(devices), fn, available, hint, workspace, tuple(precisions)
        )
        return fn

    return decorate


def kernels(op: str | None = None) -> list[Kernel]:
    """Every registered kernel (of one op), in registration order."""
    return [k for k in _KERNELS.values() if op is None or k.op == op]


def get(op: str, backend: str) -> Kernel:
    """The registered kernel of (op, backend), or a KeyError naming what exists."""
    try:
        return _KERNELS[(op, backend)]
    except KeyError:
        have = sorted(b for (o, b) in _KERNELS if o == op)
        raise KeyError(
            f"no {backend!r} kernel is registered for {op}; registered: {have}"
        ) from None


def requested_from_env(op: str) -> str | None:
    """The backend ONG_KERNELS_BACKEND asks for `op`, or None."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value or value == "auto":
        return None
    if "=" not in value:
        return value
    for item in value.split(","):
        name, _, backend = item.partition("=")
        if name.strip() == op and backend.strip() not in ("", "auto"):
            return backend.strip()
    return None


def check_backend_name(backend: object, what: str = "backend") -> str:
    """`backend` if it is "auto" or a known backend name, else a ValueError naming the choices."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"{what} must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def precisions(op: str) -> tuple[str, ...]:
    """Every precision some registered kernel of `op` computes in, "ieee" first."""
    out = [IEEE]
    for kernel in kernels(op):
        out.extend(p for p in kernel.precisions if p not in out)
    return tuple(out)


def select(op: str, device_type: str, requested: str = "auto", precision: str = IEEE) -> Kernel:
    """The kernel that runs `op` on tensors of `device_type` (see the module docstring), in
    `precision`: the one place a precision is checked against what the kernel declares."""
    check_backend_name(requested)
    kernel = _select(op, device_type, requested)
    if precision == IEEE:
        return kernel
    known = precisions(op)
    if not isinstance(precision, str) or precision not in known:
        raise ValueError(f"precision must be one of {known}, got {precision!r}")
    if precision not in kernel.precisions:
        able = sorted(k.backend for k in kernels(op) if precision in k.precisions)
        raise ValueError(
            f"precision={precision!r} needs backend={' or '.join(map(repr, able))}: only the "
            f"{' and '.join(able)} backend supports it; the {kernel.backend} kernel computes in "
            f"float32 (precision={IEEE!r})"
        )
    return kernel


def _select(op: str, device_type: str, requested: str) -> Kernel:
    source = "backend="
    if requested == "auto":
        env = requested_from_env(op)
        if env is not None:
            check_backend_name(env, f"{ENV_VAR} (for {op})")
            requested, source = env, f"{ENV_VAR}="
    if requested != "auto":
        kernel = _KERNELS.get((op, requested))
        if kernel is None:
            raise RuntimeError(
                f"{source}{requested!r}: ong_kernels has no {requested} kernel for {op}; "
                f"registered: {sorted(b for (o, b) in _KERNELS if o == op)}"
            )
        if not kernel.serves(device_type):
            raise ValueError(
                f"{source}{requested!r}: the {requested} kernel of {op} does not run on "
                f"{device_type} tensors (it serves {', '.join(kernel.devices)})"
            )
        if not kernel.available():
            raise RuntimeError(
                f"{source}{requested!r}: the {requested} kernel of {op} is not available here; "
                f"{kernel.hint}"
            )
        return kernel
    order = DEFAULT_ORDER[op].get(device_type, ("reference",))
    for backend in order:
        kernel = _KERNELS.get((op, backend))
        if kernel is not None and kernel.serves(device_type) and kernel.available():
            return kernel
    return get(op, "reference")


def backends_available(op: str | None = None) -> dict[str, bool]:
    """{backend: whether any of its kernels (of `op`) can run in this process}."""
    out = dict.fromkeys(BACKENDS, False)
    for kernel in kernels(op):
        out[kernel.backend] = out.get(kernel.backend, False) or bool(kernel.available())
    return out
