"""nmf_batched: multiplicative-update NMF of many matrices of different shapes in one call.

Everything here is host-side bookkeeping (validation, initialisation, views); the iterations
run in one op (ong_kernels::nmf_mu_) over the whole ragged batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ong_kernels import _ops, _stream
from ong_kernels._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_nonnegative_finite,
    check_real,
    check_seed,
    check_tensor,
)
from ong_kernels.backends import registry
from ong_kernels.backends.triton.nmf import PRECISIONS as NMF_PRECISIONS

Factors = tuple[torch.Tensor, torch.Tensor]

INITS = ("random", "nndsvd", "nndsvda")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# scikit-learn's _initialize_nmf(eps=1e-6): NNDSVD entries below this are set to zero.
NNDSVD_EPS = 1e-6


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The (shape[0], prod(shape[1:])) view NMF factorises; a 1-D tensor is (1, n)."""
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


# ----------------------------------------------------------------------------- validation


def _check_weights(weights) -> list[torch.Tensor]:
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights must be a sequence of tensors (wrap a single tensor in a list), "
            f"got {type(weights).__name__}"
        )
    if len(weights) == 0:
        raise ValueError("weights is empty: pass at least one tensor")
    device = None
    for i, t in enumerate(weights):
        check_tensor(t, f"weights[{i}]", dtypes=FLOAT_DTYPES)
        if t.dim() == 0 or t.numel() == 0:
            raise ValueError(f"weights[{i}] has shape {tuple(t.shape)}: need at least one entry")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"weights[{i}] is on {t.device} but weights[0] is on {device}: "
                "put all matrices on one device"
            )
    for i, t in enumerate(weights):
        check_nonnegative_finite(t, f"weights[{i}]")
        if t.dtype == torch.float64 and bool((t > FLOAT32_MAX).any()):
            raise ValueError(
                f"weights[{i}] has entries above the float32 range (max {float(t.max()):.3g} > "
                f"{FLOAT32_MAX:.3g}); NMF computes in float32: rescale the matrix first"
            )
    return [t.detach() for t in weights]


def _ranks(rank, shapes: list[tuple[int, int]]) -> list[int]:
    if isinstance(rank, Sequence) and not isinstance(rank, str):
        if len(rank) != len(shapes):
            raise ValueError(f"rank has {len(rank)} entries but there are {len(shapes)} matrices")
        ranks = [check_int(r, f"rank[{i}]", 1) for i, r in enumerate(rank)]
    else:
        ranks = [check_int(rank, "rank", 1)] * len(shapes)
    return [min(r, m, n) for r, (m, n) in zip(ranks, shapes, strict=True)]


def check_init(init) -> None:
    """init is one of INITS or a sequence of (W0, H0) pairs (checked against shapes later)."""
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(
                f"init must be one of {INITS} or a sequence of (W0, H0) pairs, got {init!r}"
            )
    elif not isinstance(init, Sequence):
        raise TypeError(
            f"init must be a string or a sequence of (W0, H0) pairs, got {type(init).__name__}"
        )


@dataclass(frozen=True)
class Solver:
    """nmf_batched's solver settings (documented there), passed along whole from the public
    entry points (nmf_batched, ong_scores, ong-mask) to the streaming and the op."""

    max_iter: int = 200
    tol: float = 1e-4
    init: str | Sequence[Factors] = "random"
    seed: int = 0
    backend: str = "auto"
    precision: str = "ieee"

    def checked(self) -> Solver:
        """Self with tol as a float; a ValueError/TypeError naming the first bad setting."""
        check_int(self.max_iter, "max_iter", 1)
        tol = check_real(self.tol, "tol", minimum=0.0)
        check_seed(self.seed)
        check_init(self.init)
        registry.check_backend_name(self.backend)
        check_choice(self.precision, "precision", NMF_PRECISIONS)
        return dataclasses.replace(self, tol=tol)

    def kwargs(self) -> dict:
        """The settings as nmf_batched's keyword arguments (init pairs not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_custom_init(init, mats: list[torch.Tensor], ranks: list[int]) -> list[Factors]:
    if len(init) != len(mats):
        raise ValueError(f"init has {len(init)} (W, H) pairs but there are {len(mats)} matrices")
    out = []
    for i, pair in enumerate(init):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise TypeError(f"init[{i}] must be a (W0, H0) pair")
        w0, h0 = pair
        (m, n), r = mats[i].shape, ranks[i]
        for name, t, shape in (
            (f"init[{i}][0] (W0)", w0, (m, r)),
            (f"init[{i}][1] (H0)", h0, (r, n)),
        ):
            check_tensor(t, name)
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected {shape} (rank clipped to "
                    f"min(m, n) = {r})"
                )
            check_tensor(t, name, dtypes=FLOAT_DTYPES)
            check_nonnegative_finite(t, name)
        out.append((w0, h0))
    return out


# ----------------------------------------------------------------------------- initialisation


def _random_init(v: torch.Tensor, r: int, seed: int) -> Factors:
    """scikit-learn's init="random": |N(0, 1)| * sqrt(mean(V) / r), H drawn before W.

    Each matrix gets a fresh CPU generator seeded with `seed` (as scikit-learn's random_state
    does per call), so a matrix's start does not depend on its neighbours in the batch and is
    the same on every device.
    """
    m, n = v.shape
    gen = torch.Generator().manual_seed(seed)
    scale = math.sqrt(float(v.mean(dtype=torch.float64)) / r)
    h = torch.randn(r, n, generator=gen).abs_().mul_(scale)
    w = torch.randn(m, r, generator=gen).abs_().mul_(scale)
    return w.to(v.device), h.to(v.device)


def _safe_unit(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), 0.0)


def _nndsvd_batch(v: torch.Tensor, r: int, fill_average: bool) -> Factors:
    """NNDSVD (Boutsidis & Gallopoulos 2008) of a same-shape batch, as scikit-learn's.

    Deviation: scikit-learn takes a randomized SVD; we take the exact one (batched
    torch.linalg.svd), which randomized SVD approximates. Zero norms give zero vectors instead
    of NaN, so an all-zero matrix initialises to zeros. `fill_average` is "nndsvda".
    """
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    u, s, vh = u[:, :, :r], s[:, :r], vh[:, :r, :]
    w = torch.zeros(v.shape[0], v.shape[1], r, dtype=v.dtype, device=v.device)
    h = torch.zeros(v.shape[0], r, v.shape[2], dtype=v.dtype, device=v.device)
    root = s.clamp_min(0).sqrt()
    w[:, :, 0] = root[:, :1] * u[:, :, 0].abs()
    h[:, 0, :] = root[:, :1] * vh[:, 0, :].abs()
    if r > 1:
        x, y = u[:, :, 1:], vh[:, 1:, :]
        xp, yp = x.clamp_min(0), y.clamp_min(0)
        xn, yn = (-x).clamp_min(0), (-y).clamp_min(0)
        xpn, ypn = xp.norm(dim=1), yp.norm(dim=2)
        xnn, ynn = xn.norm(dim=1), yn.norm(dim=2)
        mp, mn = xpn * ypn, xnn * ynn
        positive = mp > mn
        uu = torch.where(
            positive[:, None, :], _safe_unit(xp, xpn[:, None, :]), _safe_unit(xn, xnn[:, None, :])
        )
        vv = torch.where(
            positive[:, :, None], _safe_unit(yp, ypn[:, :, None]), _safe_unit(yn, ynn[:, :, None])
        )
        sigma = torch.where(positive, mp, mn)
        lbd = (s[:, 1:] * sigma).clamp_min(0).sqrt()
        w[:, :, 1:] = lbd[:, None, :] * uu
        h[:, 1:, :] = lbd[:, :, None] * vv
    w = torch.where(w < NNDSVD_EPS, 0.0, w)
    h = torch.where(h < NNDSVD_EPS, 0.0, h)
    if fill_average:
        avg = v.mean(dim=(1, 2))
        w = torch.where(w == 0, avg[:, None, None], w)
        h = torch.where(h == 0, avg[:, None, None], h)
    return w, h


def initial_factors(mats: list[torch.Tensor], ranks: list[int], init, seed: int) -> list[Factors]:
    """Starting float32 (W0, H0) per matrix for init in INITS or a custom list of pairs."""
    if not isinstance(init, str):
        pairs = _check_custom_init(init, mats, ranks)
        return [
            (
                w.to(m.device, torch.float32).clone(memory_format=torch.contiguous_format),
                h.to(m.device, torch.float32).clone(memory_format=torch.contiguous_format),
            )
            for m, (w, h) in zip(mats, pairs, strict=True)
        ]
    if init == "random":
        return [_random_init(m, r, seed) for m, r in zip(mats, ranks, strict=True)]
    # One matrix at a time, never a batch of same-shape matrices: batched elementwise and
    # norm kernels rounded differently with the batch's make-up (a float16 37 x 53 matrix got
    # other factors beside a float32 one of its shape than alone), so the factors would depend
    # on how the matrices were grouped (one call vs nmf_batched's streamed groups).
    # Measured (min of 3, 2 threads, the other core busy): ResNet-56 56 -> 77 ms, ResNet-18
    # 1773 -> 1611 ms (its 512 x 4608 SVDs dominate either way).
    factors = []
    for m, r in zip(mats, ranks, strict=True):
        w, h = _nndsvd_batch(m.to(torch.float32)[None], r, fill_average=init == "nndsvda")
        factors.append((w[0].contiguous(), h[0].contiguous()))
    return factors


# ----------------------------------------------------------------------------- public API


def as_kernel_input(t: torch.Tensor) -> torch.Tensor:
    """The contiguous matrix view the NMF op takes: float32, float16 and bfloat16 as they are
    (the kernels convert in their loads: no float32 copy of a half-precision model); float64
    cast to float32 (range checked by _check_weights)."""
    mat = as_matrix(t)
    if mat.dtype == torch.float64:
        mat = mat.to(torch.float32)
    return mat.contiguous()


def solve(mats: list[torch.Tensor], ranks: list[int], init, solver: Solver):
    """One op call over kernel-input matrices: ([(W_i, H_i)], n_iter tensor)."""
    factors = initial_factors(mats, ranks, init, solver.seed)
    w_list = [w for w, _ in factors]
    h_list = [h for _, h in factors]
    n_iter = _ops.nmf_mu_(
        mats, w_list, h_list, solver.max_iter, solver.tol, solver.backend, solver.precision
    )
    return list(zip(w_list, h_list, strict=True)), n_iter


def _run(
    weights, rank, solver: Solver, streaming: _stream.Streaming
) -> tuple[list[Factors], list[int]]:
    solver = solver.checked()
    streaming.check()
    if streaming.requested() or (
        isinstance(weights, Iterable) and not isinstance(weights, (Sequence, torch.Tensor))
    ):
        factors: list[Factors] = []
        n_iter: list[int] = []
        for group_factors, group_iter in _stream.stream_factors(weights, rank, solver, streaming):
            factors.extend(group_factors)
            n_iter.extend(group_iter)
        return factors, n_iter
    tensors = _check_weights(weights)
    mats = [as_kernel_input(t) for t in tensors]
    ranks = _ranks(rank, [tuple(m.shape) for m in mats])
    # The kernel choice is made (and an unavailable explicit backend refused) before any work.
    kernel = registry.select("nmf_mu", mats[0].device.type, solver.backend)
    if solver.precision != "ieee" and kernel.backend != "triton":
        raise ValueError(
            f"precision={solver.precision!r} needs backend='triton', not {kernel.backend!r}"
        )
    factors, n_iter = solve(mats, ranks, solver.init, solver)
    return factors, n_iter.tolist()


def nmf_batched(
    weights: Sequence[torch.Tensor] | Iterable[torch.Tensor],
    rank: int | Sequence[int],
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    init: str | Sequence[Factors] = "random",
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
    precision: str = "ieee",
) -> list[Factors]:
    """Factorise every matrix V_i ~= W_i H_i with Lee-Seung multiplicative updates, together.

    Args:
        weights: non-negative tensors of any shapes, all on one device (a sequence, or any
            iterable such as a generator reading a checkpoint); each is viewed as
            (shape[0], prod(shape[1:])) (a conv weight is out x in*kh*kw, a 1-D tensor 1 x n).
        rank: one int for all, or one per matrix; clipped to min(m, n) per matrix.
        max_iter: iterations per matrix (>= 1).
        tol: a matrix stops when (previous_error - error) / initial_error < tol, checked every
            10 iterations (scikit-learn's rule); 0 runs exactly max_iter iterations.
        init: "random" (|N(0,1)| * sqrt(mean(V)/r), seeded), "nndsvd", "nndsvda", or one
            (W0, H0) pair per matrix (scikit-learn's init="custom").
        seed: seed of the "random" init (a fresh generator per matrix, as scikit-learn's
            random_state per call).
        backend: "auto" (the best kernel for the inputs' device), or one of "reference"
            (batched PyTorch matmuls), "cpu" (the C++ solve), "cuda", "triton";
            ong_kernels.backends_available() says which can run here. An explicit backend
            that cannot run raises; ONG_KERNELS_BACKEND sets one when this is "auto".
        device: where to compute (default: the inputs' device). With `device`,
            `memory_budget`, `progress` or an iterator as `weights`, the matrices stream:
            consecutive matrices are moved to `device` in groups whose cost (_stream.solve_bytes)
            fits `memory_budget`, each group solved by one op call, its factors moved back to
            the inputs' device before the next group is read. The factors are identical to
            one unbudgeted call on `device`.
        memory_budget: bytes a group may use on `device` (default: 80% of its free memory).
            A matrix that alone needs more is a ValueError saying how much it needs: before
            any work for a sequence, when the iterator reaches it otherwise.
        progress: show a tqdm bar (weights done, matrices, ETA) while streaming.
        precision: "ieee" (float32 products, every backend), or with the triton backend on a
            GPU the opt-in "tf32x3" / "tf32" (TF32 tensor-core products; benchmarks/RESULTS.md
            has their effect on ONG masks).

    Returns:
        [(W_i, H_i)]: float32 factors on the inputs' device, W_i (m_i, r_i), H_i (r_i, n_i).

    The update order and epsilon rule are scikit-learn's NMF(solver="mu", beta_loss=2):
    W <- W * (V H^T) / (W H H^T), then H <- H * (W^T V) / (W^T W H), and a denominator that is
    exactly 0 becomes float32 eps. All matrices advance together in one op call.
    """
    solver = Solver(max_iter, tol, init, seed, backend, precision)
    factors, _ = _run(weights, rank, solver, _stream.Streaming(device, memory_budget, progress))
    return factors


def nmf_batched_with_info(weights, rank, **settings) -> tuple[list[Factors], list[int]]:
    """nmf_batched (the same keyword arguments) that also returns the number of iterations
    each matrix ran."""
    streamed = {f.name for f in dataclasses.fields(_stream.Streaming)}
    streaming = _stream.Streaming(**{k: v for k, v in settings.items() if k in streamed})
    return _run(weights, rank, Solver(**{k: v for k, v in settings.items() if k not in streamed}),
                streaming)  # fmt: skip
