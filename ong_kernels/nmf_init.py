"""Starting factors of nmf_batched: scikit-learn's "random", "nndsvd" and "nndsvda", or custom.

Every start is computed one matrix at a time from that matrix, its rank and its own seed, so a
matrix's start does not depend on its neighbours in the batch or on how matrices are grouped
(one call, or nmf_batched's streamed groups), and k restarts of one matrix are k seeds.
Batched (same-shape) kernels were tried for NNDSVD and rejected: they rounded differently with
the batch's make-up (a float16 37 x 53 matrix got other factors beside a float32 one of its
shape than alone).

NNDSVD needs the leading r singular triplets. At low rank they come from a randomized
truncated SVD (Halko, Martinsson & Tropp 2011; scikit-learn's randomized_svd, as its
_initialize_nmf does): GEMMs and thin QRs only, O(m n (r + p)) per power step. Elsewhere
(`use_exact_svd`) they are exact, from the float64 Gram matrix of the short side (`gram_svd`,
10-17x faster than LAPACK's SVD on wide weight matrices). Why not randomized everywhere: the
weights ONG prunes are at initialisation, whose |W| has one dominant singular pair and a flat
bulk; the bulk's vectors are not determined by a sketch, and at ONG's default rank (a quarter
of the short side) masks from a randomized start kept only 0.35-0.64 of the exact start's
weights (IoU, BERT-shaped and ResNet-18 sets, 7-20 power iterations; RESULTS.md, issue 16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ong_kernels.backends.cpu_nmf import SKETCH_LANES
from ong_kernels.nmf_rules import Factors, check_init_pair, scale_by_power_of_two, seed_for

# scikit-learn's _initialize_nmf(eps=1e-6): NNDSVD entries below this are set to zero.
NNDSVD_EPS = 1e-6
# The sketch: r + max(OVERSAMPLES, r // 2) columns, rounded up to a multiple of the CPU
# sketch product's lane count (cpu_nmf.SKETCH_LANES), which pads its operands to that
# multiple and computes the padding columns anyway (scikit-learn takes r + 10).
# POWER_ITERATIONS: measured on a BERT-shaped set (2 layers, |W| at init, ONG masks at
# 90%) as the relative difference of the final fit from the exact start's (benchmarks/
# RESULTS.md, issue 28). At rank 16, with scikit-learn's r + 10 = 26 columns, 2 / 4 / 7
# iterations gave 1.6e-3 / 8.3e-4 / 4.2e-4; with 32 columns, 2 / 3 / 4 gave 1.3e-3 / 9.1e-4 /
# 6.5e-4, so 3 is the fewest within 1e-3. At rank 64, 80 columns with 4 iterations and 96
# with 3 both gave 1.3e-3, and 80 with 3 gave 1.8e-3, hence the r // 2. Three iterations are
# 8 products of V: at rank 16, 8 at 32 columns where 4 iterations were 10 at the same padded
# width; at rank 64, 8 x 96 columns against 10 x 80. The start of a Llama-7B layer at rank 16
# is budgeted at 10 MU iterations.
OVERSAMPLES = 16
POWER_ITERATIONS = 3


def sketch_width(m: int, n: int, r: int) -> int:
    """Columns of the randomized SVD's sketch of an m x n matrix at rank r."""
    columns = r + max(OVERSAMPLES, r // 2)
    return min(-(-columns // SKETCH_LANES) * SKETCH_LANES, min(m, n))


def use_exact_svd(m: int, n: int, r: int) -> bool:
    """The exact (Gram) SVD for a small matrix (min(m, n) <= 64) or a sketch that covers at
    least a quarter of min(m, n): there the randomized start changes the masks (see the
    module docstring) and the exact one costs a few of its power steps. Below it, at the low
    ranks of large matrices (r = 16 of 4096), the exact SVD's O(m n min(m, n)) would cost
    hundreds of MU iterations (benchmarks/bench_e2e.py)."""
    short = min(m, n)
    return short <= 64 or 4 * sketch_width(m, n, r) >= short


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


# CholeskyQR's guard: a basis whose Cholesky factor has a diagonal ratio below this (cond(x)
# of ~1e3 or more) goes to Householder QR instead. CholeskyQR loses orthogonality as float32
# eps x cond(x)^2, ~0.1 at that ratio; a power step needs the span, not exact
# orthonormality, and the next step re-normalises.
_CHOLESKY_MIN_RATIO = 1e-3


def _basis(x: torch.Tensor, orthonormal: bool) -> torch.Tensor:
    """A basis of x's column span: Householder QR's Q where it must be `orthonormal` (the
    randomized SVD's final basis, which the projection needs), on devices other than the CPU
    (the check below would be a sync per power step there, not measured), and where x^T x is
    singular or ill-conditioned; otherwise CholeskyQR, x R^-1 with R^T R = x^T x. Measured
    (AMD Zen 4, 2 threads, 32 columns): 0.19 / 0.32 ms against QR's 0.60 / 1.65 ms for 4096 /
    11008 rows."""
    if not orthonormal and x.device.type == "cpu":
        chol, info = torch.linalg.cholesky_ex(x.T @ x)
        diagonal = chol.diagonal()
        if int(info) == 0 and float(diagonal.min()) > _CHOLESKY_MIN_RATIO * float(diagonal.max()):
            eye = torch.eye(x.shape[1], dtype=x.dtype)
            return x @ torch.linalg.solve_triangular(chol.T, eye, upper=True)
    return torch.linalg.qr(x).Q


def _sketch_products(v: torch.Tensor):
    """(x -> v @ x, x -> v^T @ x) for the randomized SVD. A float32 CPU v takes the MU kernel's
    register tiles when the extension is built (cpu_nmf.sketch_product: MKL's skinny sgemm
    ran at a third of their rate on AMD Zen 4, and the start of a Llama-7B layer at rank 16
    cost 20 MU iterations); elsewhere torch's matmul, with v as it is stored (v @ x and
    x^T @ v: v^T @ x measured 2.2x slower for a row-major 11008 x 4096 v at 26 columns)."""
    from ong_kernels.backends import _native, cpu_nmf

    if v.device.type == "cpu" and v.dtype == torch.float32 and _native.has_cpu():
        v = v.contiguous()  # once, not in each of the products
        return (
            lambda x: cpu_nmf.sketch_product(v, x),
            lambda x: cpu_nmf.sketch_product(v, x, transpose=True),
        )
    return (lambda x: v @ x), (lambda x: (x.T @ v).T)


def randomized_svd(
    v: torch.Tensor, r: int, seed: int, power_iters: int = POWER_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, r), S (r,), Vh (r, n)): the leading r singular triplets of the float32 matrix v,
    approximately (Halko et al. 2011, Algorithm 4.4: a Gaussian sketch of `sketch_width`
    vectors of the short side, `power_iters` subspace iterations re-normalised after every
    product, by `_basis`; the products by `_sketch_products`). The sketch is drawn from a CPU
    generator seeded with `seed`, so the result is the same for a seed on every device and
    whatever else is in the batch.
    """
    m, n = v.shape
    tall = m >= n
    width = sketch_width(m, n, r)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(min(m, n), width, generator=gen).to(device=v.device, dtype=v.dtype)
    step, last = _sketch_products(v) if tall else _sketch_products(v)[::-1]
    # q: a basis (long side, width) of v's column space (tall) or row space (wide); the last
    # one orthonormal (Householder), the power steps' CholeskyQR bases before it.
    q = _basis(step(omega), orthonormal=power_iters == 0)
    for i in range(power_iters):
        q = _basis(step(_basis(last(q), orthonormal=False)), orthonormal=i == power_iters - 1)
    # LAPACK's SVD of the tall (long side, width) projection, transposed for the tall v:
    # 0.95 ms against 3.2 ms for the wide 32 x 4096 (Zen 4, 2 threads).
    b, s, ch = torch.linalg.svd(last(q), full_matrices=False)  # (short side, width)
    if tall:  # v ~ q ch^T s b^T
        return q @ ch[:r].T, s[:r], b[:, :r].T
    return b[:, :r], s[:r], ch[:r] @ q.T


def gram_svd(v: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, r), S (r,), Vh (r, n)): the leading r singular triplets of v, exactly (to float64
    rounding), from the eigendecomposition of the float64 Gram matrix of its short side.

    One O(m n min(m, n)) GEMM and an O(min(m, n)^3) eigh instead of LAPACK's bidiagonalising
    SVD: measured (2 threads, idle; benchmarks/bench_e2e.py crossover) 0.048 s against
    torch.linalg.svd's 0.365 s for a 512 x 4608 matrix at r = 128, 0.082 s against 0.440 s for
    768 x 3072, little gain for a square one (768 x 768: 0.053 s against 0.073 s); singular
    values within 3e-6 relative of LAPACK's and
    vectors within 3e-5 (|<u, u'>| >= 0.99997). Squaring in float64 keeps the error of the
    r-th value at ~1e-16 (s_1 / s_r)^2, far below float32's rounding for the ratios NNDSVD uses.
    """
    m, n = v.shape
    a = (v if m <= n else v.T).double()  # short x long
    values, vectors = torch.linalg.eigh(a @ a.T)  # ascending
    top = torch.arange(values.numel() - 1, values.numel() - 1 - r, -1, device=v.device)
    s = values[top].clamp_min(0).sqrt()
    u = vectors[:, top]
    vh = (u.T @ a) / torch.where(s > 0, s, 1.0)[:, None]
    if m <= n:
        return u.float(), s.float(), vh.float()
    return vh.T.float(), s.float(), u.T.float()


def _truncated_svd(v: torch.Tensor, r: int, seed: int):
    m, n = v.shape
    if use_exact_svd(m, n, r):
        return gram_svd(v, r)
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


def _custom_start(t: torch.Tensor, device: torch.device, j: int) -> torch.Tensor:
    """A user's W0 or H0 as a float32 start of the solve of V / 4^j: divided by 2^j, exactly
    (in float64 for a float64 start, then rounded once). A detached copy: the solve is not
    differentiable, and the user's pair is never written."""
    wide = torch.float64 if t.dtype == torch.float64 and j else torch.float32
    x = t.detach().to(device, wide, copy=True, memory_format=torch.contiguous_format)
    return scale_by_power_of_two(x, -j).to(torch.float32).contiguous()


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
            pair = tuple(_custom_start(t, v.device, j) for t in (w0, h0))
        elif init == "random":
            pair = random_start(v, r, seed_for(seed, i))
        else:
            pair = nndsvd_start(v.float(), r, seed_for(seed, i), fill_average=init == "nndsvda")
        out.append(pair)
    return out
