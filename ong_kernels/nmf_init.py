"""Starting factors of nmf_batched: scikit-learn's "random", "nndsvd" and "nndsvda", or custom.

Every start is computed one matrix at a time from that matrix, its rank and its own seed, so a
matrix's start does not depend on its neighbours in the batch or on how matrices are grouped
(one call, or nmf_batched's streamed groups), and k restarts of one matrix are k seeds.
Batched (same-shape) kernels were tried for NNDSVD and rejected: they rounded differently with
the batch's make-up (a float16 37 x 53 matrix got other factors beside a float32 one of its
shape than alone).

NNDSVD needs the leading r singular triplets, which are taken from a randomized truncated SVD
(Halko, Martinsson & Tropp 2011; scikit-learn's randomized_svd, as its _initialize_nmf does):
GEMMs and thin QRs only, O(m n (r + p)) per power step, instead of the exact SVD's
O(m n min(m, n)). The exact SVD is used where it is not dearer (`use_exact_svd`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ong_kernels.nmf_rules import Factors, check_init_pair, seed_for

# scikit-learn's _initialize_nmf(eps=1e-6): NNDSVD entries below this are set to zero.
NNDSVD_EPS = 1e-6
# randomized_svd's defaults: 10 extra sketch columns; 7 power iterations when the rank is
# below 10% of min(m, n), else 4. Measured on ResNet-20/56, ResNet-18 and BERT-base sets at
# 90% sparsity (benchmarks/RESULTS.md, issue 16): see POWER_ITERATIONS.
OVERSAMPLES = 10


def power_iterations(r: int, m: int, n: int) -> int:
    """scikit-learn's n_iter="auto": 7 when r < 0.1 min(m, n), else 4."""
    return 7 if r < 0.1 * min(m, n) else 4


def use_exact_svd(m: int, n: int, r: int) -> bool:
    """The exact SVD where the randomized one would not be cheaper: a sketch of r + OVERSAMPLES
    columns that covers at least a quarter of min(m, n), or a small matrix (min(m, n) <= 64).

    Measured (2 threads, benchmarks/bench_e2e.py --svd-crossover, RESULTS.md issue 16): the
    randomized SVD with its power iterations costs about as much as torch.linalg.svd when the
    sketch is a quarter of the short side, and far less below it (4096 x 4096, r = 16: 0.1 s
    against 30 s)."""
    short = min(m, n)
    return short <= 64 or 4 * (r + OVERSAMPLES) >= short


# Entries per chunk of mean64's float64 sum: a float64 reduction of a whole tensor
# (v.mean(dtype=torch.float64)) first makes a float64 copy of it (measured: 198 MiB of peak
# RSS for a 48 MiB float16 V). Chunks of 2^18 entries (2 MiB of float64): with 2^20, glibc
# kept the freed 8 MiB chunk resident (its mmap threshold rises to a freed chunk's size) and
# the solve's peak RSS grew by those 8 MiB.
_MEAN_CHUNK = 1 << 18


def mean64(v: torch.Tensor) -> float:
    """mean(V) accumulated in float64, without a float64 copy of V."""
    flat = v.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), _MEAN_CHUNK):
        total += float(flat[start : start + _MEAN_CHUNK].sum(dtype=torch.float64))
    return total / flat.numel()


def random_start(v: torch.Tensor, r: int, seed: int) -> Factors:
    """scikit-learn's init="random": |N(0, 1)| * sqrt(mean(V) / r), H drawn before W.

    A fresh CPU generator seeded with `seed` per matrix (as scikit-learn's random_state per
    call), so the start is the same on every device.
    """
    m, n = v.shape
    gen = torch.Generator().manual_seed(seed)
    scale = math.sqrt(mean64(v) / r)
    h = torch.randn(r, n, generator=gen).abs_().mul_(scale)
    w = torch.randn(m, r, generator=gen).abs_().mul_(scale)
    return w.to(v.device), h.to(v.device)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def randomized_svd(
    v: torch.Tensor, r: int, seed: int, power_iters: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, r), S (r,), Vh (r, n)): the leading r singular triplets of the float32 matrix v,
    approximately (Halko et al. 2011, Algorithm 4.4: a Gaussian sketch of r + OVERSAMPLES
    columns, `power_iters` subspace iterations re-orthonormalised by QR after every product).

    The sketch is drawn from a CPU generator seeded with `seed`, so the result is the same for
    a seed on every device and whatever else is in the batch.
    """
    m, n = v.shape
    a = v.T if m < n else v  # the sketch spans the short side: rows >= cols
    cols = a.shape[1]
    width = min(r + OVERSAMPLES, cols)
    if power_iters is None:
        power_iters = power_iterations(r, m, n)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(cols, width, generator=gen).to(device=v.device, dtype=v.dtype)
    q = _orthonormal(a @ omega)
    for _ in range(power_iters):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u, s, vh = q @ ub[:, :r], s[:r], vh[:r]
    if m < n:
        return vh.T, s, u.T
    return u, s, vh


def _truncated_svd(v: torch.Tensor, r: int, seed: int):
    m, n = v.shape
    if use_exact_svd(m, n, r):
        u, s, vh = torch.linalg.svd(v, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    return randomized_svd(v, r, seed)


def _safe_unit(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), 0.0)


def nndsvd_start(v: torch.Tensor, r: int, seed: int, fill_average: bool) -> Factors:
    """NNDSVD (Boutsidis & Gallopoulos 2008) of one float32 matrix, as scikit-learn's.

    The singular triplets come from `_truncated_svd` (randomized, seeded by `seed`, or exact).
    Zero norms give zero vectors instead of NaN, so an all-zero matrix starts at zeros.
    `fill_average` is "nndsvda" (zeros replaced by mean(V)). The sign of a singular pair does
    not matter: flipping both vectors swaps their positive and negative parts, and NNDSVD
    keeps the larger product of the two.
    """
    u, s, vh = _truncated_svd(v, r, seed)
    m, n = v.shape
    w = torch.zeros(m, r, dtype=v.dtype, device=v.device)
    h = torch.zeros(r, n, dtype=v.dtype, device=v.device)
    root = s.clamp_min(0).sqrt()
    w[:, 0] = root[0] * u[:, 0].abs()
    h[0, :] = root[0] * vh[0, :].abs()
    if r > 1:
        x, y = u[:, 1:], vh[1:, :]
        xp, yp = x.clamp_min(0), y.clamp_min(0)
        xn, yn = (-x).clamp_min(0), (-y).clamp_min(0)
        xpn, ypn = xp.norm(dim=0), yp.norm(dim=1)
        xnn, ynn = xn.norm(dim=0), yn.norm(dim=1)
        mp, mn = xpn * ypn, xnn * ynn
        positive = mp > mn
        uu = torch.where(positive[None, :], _safe_unit(xp, xpn[None, :]), _safe_unit(xn, xnn))
        vv = torch.where(positive[:, None], _safe_unit(yp, ypn[:, None]),
                         _safe_unit(yn, ynn[:, None]))  # fmt: skip
        sigma = torch.where(positive, mp, mn)
        lbd = (s[1:] * sigma).clamp_min(0).sqrt()
        w[:, 1:] = lbd[None, :] * uu
        h[1:, :] = lbd[:, None] * vv
    w = torch.where(w < NNDSVD_EPS, 0.0, w)
    h = torch.where(h < NNDSVD_EPS, 0.0, h)
    if fill_average:
        avg = v.mean()
        w = torch.where(w == 0, avg, w)
        h = torch.where(h == 0, avg, h)
    return w.contiguous(), h.contiguous()


def initial_factors(
    mats: Sequence[torch.Tensor],
    ranks: Sequence[int],
    init,
    seed,
    indices: Sequence[int] | None = None,
    exponents: Sequence[int] | None = None,
) -> list[Factors]:
    """Starting float32 (W0, H0) per kernel-input matrix.

    `init` is one of "random", "nndsvd", "nndsvda" or one (W0, H0) pair per matrix of the
    whole call; `seed` one int or one per matrix of the whole call; `indices` are the
    matrices' positions in the whole call (a streamed group's); `exponents` their scale
    exponents j (nmf_rules.kernel_input: the op solves V / 4^j, so a custom start is divided
    by 2^j).
    """
    indices = range(len(mats)) if indices is None else indices
    exponents = [0] * len(mats) if exponents is None else exponents
    out = []
    for v, r, i, j in zip(mats, ranks, indices, exponents, strict=True):
        if not isinstance(init, str):
            w0, h0 = check_init_pair(init[i], i, v.shape[0], v.shape[1], r)
            # Detached copies: the solve is not differentiable, and the user's pair is
            # never written.
            pair = tuple(
                t.detach().to(v.device, torch.float32).mul(2.0**-j).contiguous()
                if j
                else t.detach()
                .to(v.device, torch.float32)
                .clone(memory_format=torch.contiguous_format)
                for t in (w0, h0)
            )
        elif init == "random":
            pair = random_start(v, r, seed_for(seed, i))
        else:
            pair = nndsvd_start(v.float(), r, seed_for(seed, i), fill_average=init == "nndsvda")
        out.append(pair)
    return out
