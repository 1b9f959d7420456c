"""The Triton NMF kernels (imported on first use by nmf.py: this module imports triton).

Every kernel reads the ragged batch through one int64 descriptor table, a row per matrix:

    V address, W address, H address, m, n, r, G offset, D offset     (TABLE_COLUMNS in nmf.py)

(the first six columns are nmf_plan.matrix_table; the last two index a float32 scratch buffer
holding the matrix's r x r Gram product G and, when r spans several rank blocks, its m x r or
n x r denominator D). V is read in its own dtype (V_DTYPE: float32, float16 or bfloat16) and
converted in the loads; W and H are float32 and updated in place.

Both half-steps of Lee-Seung's update are one kernel, `_update_tile`, on a "factor" X with
rows x r entries: the W step is X = W (rows = m) with A = V, B = H^T; the H step is X = H^T
(rows = n) with A = V^T, B = W. Then

    X <- X * (A B) / (X G),   G = B^T B (the r x r Gram product), 0 -> eps in the denominator

The division is tl.div_rn (IEEE round-to-nearest, as torch and the interpreter divide): a plain
`/` lowers to div.full.f32 on the GPU (up to 2 ulp), which could move a borderline stopping
check away from the reference's iteration.

A program owns a block of BR rows of X and all r of its columns, so it reads only old values
of the rows it writes: the update is fused into the epilogue of the numerator product A B
without a race. When r > RB (several rank blocks) the denominators of all rank blocks are
formed first (from the old X) into the scratch D, then the numerators and the updates.

Products are tl.dot with input_precision=PRECISION: "ieee" (fp32 FMA, the default, faithful
to float32), "tf32x3" or "tf32" (tensor cores; opt-in) for the updates; the stopping error is
always "ieee".

V is read in float32, float16, bfloat16 or float64 (V_DTYPE; float64 is converted to float32 in
the load, as the reference computes in float32).
"""

from __future__ import annotations

import triton
import triton.language as tl

NCOLS: tl.constexpr = tl.constexpr(8)
# The stopping error's products are always fp32 FMA ("ieee"): a TF32 product carries ~1e-3
# relative noise into ||V - W H|| against tol ~1e-4, which would make n_iter depend on rounding.
IEEE: tl.constexpr = tl.constexpr("ieee")
EPS: tl.constexpr = tl.constexpr(1.1920928955078125e-07)  # float32 eps (nmf_plan.EPS)
CHECK_EVERY: tl.constexpr = tl.constexpr(10)  # nmf_plan.CHECK_EVERY


@triton.jit
def _matrix(table, scratch, i, V_DTYPE: tl.constexpr):
    """Pointers and sizes of matrix i of the table."""
    row = table + i * NCOLS
    v = tl.load(row).to(tl.pointer_type(V_DTYPE))
    w = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    h = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    m = tl.load(row + 3).to(tl.int32)
    n = tl.load(row + 4).to(tl.int32)
    r = tl.load(row + 5).to(tl.int32)
    g = scratch + tl.load(row + 6)
    d = scratch + tl.load(row + 7)
    return v, w, h, m, n, r, g, d


# ----------------------------------------------------------------------------- tiles


@triton.jit
def _gram_tile(x, s_i, s_k, size_k, r, gi, gj, g, RB: tl.constexpr, BK: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """G[gi-block, gj-block] = sum_k X[i, k] X[j, k], X[i, k] at x + i*s_i + k*s_k (r rows)."""
    oi = gi * RB + tl.arange(0, RB)
    oj = gj * RB + tl.arange(0, RB)
    acc = tl.zeros([RB, RB], dtype=tl.float32)
    for k0 in range(0, size_k, BK):
        ok = k0 + tl.arange(0, BK)
        kmask = ok < size_k
        a = tl.load(
            x + oi[:, None] * s_i + ok[None, :].to(tl.int64) * s_k,
            mask=(oi < r)[:, None] & kmask[None, :],
            other=0.0,
        )
        b = tl.load(
            x + oj[None, :] * s_i + ok[:, None].to(tl.int64) * s_k,
            mask=(oj < r)[None, :] & kmask[:, None],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(g + oi[:, None] * r + oj[None, :], acc, mask=(oi < r)[:, None] & (oj < r)[None, :])


@triton.jit
def _mm_chunk(a, a_sr, a_sk, b, b_sk, b_sc, size_k, r, rows, rmask, c0, BR: tl.constexpr,
              BK: tl.constexpr, RB: tl.constexpr, PRECISION: tl.constexpr,
              WIDE_K: tl.constexpr):  # fmt: skip
    """(A B)[rows, c0:c0+RB], accumulated in float32; A is converted to float32 in the load.
    WIDE_K: int64 offsets along k (the numerators: k runs over V's m or n); the denominators
    (A = X, B = the r x r Gram, k < r) keep int32 ones, which cost _update_kernel SIDE=0 BR=16
    RB=64 w8 8 B of stack on sm_80 when made int64 (the AOT check)."""
    cols = c0 + tl.arange(0, RB)
    cmask = cols < r
    acc = tl.zeros([BR, RB], dtype=tl.float32)
    for k0 in range(0, size_k, BK):
        ok = k0 + tl.arange(0, BK)
        kmask = ok < size_k
        if WIDE_K:
            ko = ok.to(tl.int64)
        else:
            ko = ok
        at = tl.load(
            a + rows[:, None].to(tl.int64) * a_sr + ko[None, :] * a_sk,
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(tl.float32)
        bt = tl.load(
            b + ko[:, None] * b_sk + cols[None, :] * b_sc,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        )
        acc = tl.dot(at, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _den_chunk(x, x_sr, x_sc, g, r, rows, rmask, c0, BR: tl.constexpr, BK: tl.constexpr,
               RB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """(X G)[rows, c0:c0+RB] from the current X (G symmetric, row-major r x r)."""
    return _mm_chunk(x, x_sr, x_sc, g, r, 1, r, r, rows, rmask, c0, BR, BK, RB, PRECISION, False)


@triton.jit
def _num_chunk(a, a_sr, a_sk, b, b_sk, b_sc, size_k, r, rows, rmask, c0, BR: tl.constexpr,
               BK: tl.constexpr, RB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """(A B)[rows, c0:c0+RB], A = V or V^T in V's dtype (converted here), B float32."""
    return _mm_chunk(a, a_sr, a_sk, b, b_sk, b_sc, size_k, r, rows, rmask, c0, BR, BK, RB,
                     PRECISION, True)  # fmt: skip


@triton.jit
def _apply(x, x_sr, x_sc, r, rows, rmask, c0, num, den, RB: tl.constexpr):
    """X[rows, c0:c0+RB] *= num / den, an exactly-zero denominator replaced by eps."""
    cols = c0 + tl.arange(0, RB)
    mask = rmask[:, None] & (cols < r)[None, :]
    ptr = x + rows[:, None].to(tl.int64) * x_sr + cols[None, :] * x_sc
    old = tl.load(ptr, mask=mask, other=0.0)
    den = tl.where(den == 0.0, EPS, den)
    tl.store(ptr, old * tl.div_rn(num, den), mask=mask)


@triton.jit
def _side(v, w, h, m, n, r, SIDE: tl.constexpr):
    """The operands of one half-step: SIDE 0 updates W (A = V, B = H^T), 1 updates H."""
    if SIDE == 0:
        # X = W (m x r), A = V (m x n), B[k, c] = H[c, k]
        return w, m, n, r, 1, v, n, 1, h, 1, n
    else:
        # X = H^T (n x r), A = V^T (n x m), B[k, c] = W[k, c]
        return h, n, m, 1, n, v, 1, n, w, r, 1


@triton.jit
def _update_tile(v, w, h, m, n, r, g, d, row0, SIDE: tl.constexpr, BR: tl.constexpr,
                 BK: tl.constexpr, RB: tl.constexpr, ONE_CHUNK: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """One half-step on rows row0:row0+BR of X (all r columns); G = B^T B already in g."""
    x, size_r, size_k, x_sr, x_sc, a, a_sr, a_sk, b, b_sk, b_sc = _side(v, w, h, m, n, r, SIDE)
    rows = row0 + tl.arange(0, BR)
    rmask = rows < size_r
    if ONE_CHUNK:
        # r <= RB: one rank block, the denominator stays in registers.
        den = _den_chunk(x, x_sr, x_sc, g, r, rows, rmask, 0, BR, BK, RB, PRECISION)
        num = _num_chunk(a, a_sr, a_sk, b, b_sk, b_sc, size_k, r, rows, rmask, 0, BR, BK, RB,
                         PRECISION)  # fmt: skip
        # Every thread's reads of X (the denominator) before any thread overwrites X: today the
        # compiler stages the dot operands through shared memory with its own barriers (triton
        # 3.6 TTGIR), but nothing promises that a later one will.
        tl.debug_barrier()
        _apply(x, x_sr, x_sc, r, rows, rmask, 0, num, den, RB)
    else:
        # Every rank block's denominator from the old X first (D is rows x r, row-major) ...
        for c0 in range(0, r, RB):
            den = _den_chunk(x, x_sr, x_sc, g, r, rows, rmask, c0, BR, BK, RB, PRECISION)
            cols = c0 + tl.arange(0, RB)
            tl.store(d + rows[:, None].to(tl.int64) * r + cols[None, :], den,
                     mask=rmask[:, None] & (cols < r)[None, :])  # fmt: skip
        # ... made visible to every thread of the program before any X is overwritten.
        tl.debug_barrier()
        for c0 in range(0, r, RB):
            cols = c0 + tl.arange(0, RB)
            den = tl.load(d + rows[:, None].to(tl.int64) * r + cols[None, :],
                          mask=rmask[:, None] & (cols < r)[None, :], other=1.0)  # fmt: skip
            num = _num_chunk(a, a_sr, a_sk, b, b_sk, b_sc, size_k, r, rows, rmask, c0, BR, BK,
                             RB, PRECISION)  # fmt: skip
            _apply(x, x_sr, x_sc, r, rows, rmask, c0, num, den, RB)


@triton.jit
def _error_tile(v, w, h, m, n, r, row0, BR: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    """sum over rows row0:row0+BR of (V - W H)^2, in column blocks of RB and rank chunks of BK.
    Residuals and their squares in float32 (a square of a float32 residual is exact to 1 ulp,
    and a sum of squares has no cancellation), summed in float64."""
    rows = row0 + tl.arange(0, BR)
    rmask = rows < m
    total = tl.zeros([BR], dtype=tl.float64)
    for k0 in range(0, n, RB):
        ok = k0 + tl.arange(0, RB)
        kmask = ok < n
        # (W H)[rows, k0:k0+RB]: k runs over the rank, H's offsets q * n in int64 (WIDE_K)
        wh = _mm_chunk(w, r, 1, h, n, 1, r, n, rows, rmask, k0, BR, BK, RB, PRECISION, True)
        mask = rmask[:, None] & kmask[None, :]
        vt = tl.load(v + rows[:, None].to(tl.int64) * n + ok[None, :], mask=mask,
                     other=0.0).to(tl.float32)  # fmt: skip
        res = tl.where(mask, vt - wh, 0.0)
        total += tl.sum((res * res).to(tl.float64), axis=1)
    return tl.sum(total, axis=0)


# ----------------------------------------------------------------------------- grouped kernels
# Grid: one program per tile of the call; `tiles` (int32, 2 per tile) says which matrix and
# which block. `active` (int32 per matrix): 0 = stopped, the program does nothing.


@triton.jit
def _gram_kernel(table, scratch, tiles, active, SIDE: tl.constexpr, RB: tl.constexpr,
                 BK: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """G = H H^T (SIDE 0, before the W step) or W^T W (SIDE 1) of every matrix, r x r."""
    pid = tl.program_id(0)
    i = tl.load(tiles + 2 * pid)
    block = tl.load(tiles + 2 * pid + 1)
    if tl.load(active + i) != 0:
        _v, w, h, m, n, r, g, _d = _matrix(table, scratch, i, tl.float32)
        nb = tl.cdiv(r, RB)
        if SIDE == 0:
            _gram_tile(h, n, 1, n, r, block // nb, block % nb, g, RB, BK, PRECISION)
        else:
            _gram_tile(w, 1, r, m, r, block // nb, block % nb, g, RB, BK, PRECISION)


@triton.jit
def _update_kernel(table, scratch, tiles, active, SIDE: tl.constexpr, BR: tl.constexpr,
                   BK: tl.constexpr, RB: tl.constexpr, ONE_CHUNK: tl.constexpr,
                   PRECISION: tl.constexpr, V_DTYPE: tl.constexpr):  # fmt: skip
    """The W step (SIDE 0) or the H step (SIDE 1) of every matrix, a row block per program."""
    pid = tl.program_id(0)
    i = tl.load(tiles + 2 * pid)
    block = tl.load(tiles + 2 * pid + 1)
    if tl.load(active + i) != 0:
        v, w, h, m, n, r, g, d = _matrix(table, scratch, i, V_DTYPE)
        _update_tile(v, w, h, m, n, r, g, d, block * BR, SIDE, BR, BK, RB, ONE_CHUNK, PRECISION)


# Runtime ints not specialised (Triton would compile a variant for 1 and for multiples of 16:
# max_blocks 1 vs 2 in one solve, max_iter 200 vs 400), so the first GPU run compiles each
# configuration once.
@triton.jit(do_not_specialize=["max_blocks"])
def _error_kernel(table, scratch, tiles, active, err2, max_blocks, BR: tl.constexpr,
                  BK: tl.constexpr, RB: tl.constexpr, V_DTYPE: tl.constexpr):  # fmt: skip
    """err2[i, block] = sum of (V - W H)^2 over row block `block` of matrix i (float64,
    [matrices x max_blocks], zeroed): one slot per tile, summed by the host in a fixed order
    (an atomic_add would make the last bits, and so a borderline n_iter, run-dependent)."""
    pid = tl.program_id(0)
    i = tl.load(tiles + 2 * pid)
    block = tl.load(tiles + 2 * pid + 1)
    if tl.load(active + i) != 0:
        v, w, h, m, n, r, _g, _d = _matrix(table, scratch, i, V_DTYPE)
        part = _error_tile(v, w, h, m, n, r, block * BR, BR, BK, RB, IEEE)
        tl.store(err2 + i.to(tl.int64) * max_blocks + block, part)


# ----------------------------------------------------------------------------- persistent


@triton.jit
def _error(v, w, h, m, n, r, BR: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr,
           PRECISION: tl.constexpr):  # fmt: skip
    """||V - W H||_F of one matrix by one program (float64)."""
    total = tl.zeros([], dtype=tl.float64)
    for row0 in range(0, m, BR):
        total += _error_tile(v, w, h, m, n, r, row0, BR, BK, RB, PRECISION)
    return tl.sqrt(total)


@triton.jit(do_not_specialize=["max_iter"])
def _solve_kernel(table, scratch, n_iter, params, max_iter, CHECKS: tl.constexpr,
                  BR: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr,
                  ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                  V_DTYPE: tl.constexpr):  # fmt: skip
    """The whole solve of one matrix per program: every iteration and every stopping check
    (nmf_plan.stop_rule at iterations 10, 20, ... below max_iter, in float64), n_iter out.
    `params` holds tol as float64 (a float argument would be rounded to float32)."""
    i = tl.program_id(0)
    v, w, h, m, n, r, g, d = _matrix(table, scratch, i, V_DTYPE)
    nb = tl.cdiv(r, RB)
    tol = tl.load(params)
    initial = tl.zeros([], dtype=tl.float64)
    if CHECKS:
        initial = _error(v, w, h, m, n, r, BR, BK, RB, IEEE)
    previous = initial
    safe_initial = tl.where(initial > 0, initial, 1.0)
    it = 0
    running = 1
    while (it < max_iter) & (running != 0):
        # W step: G = H H^T, then every row block of W. Barriers order each phase's global
        # writes before the next phase's reads by other threads of this program.
        for block in range(0, nb * nb):
            _gram_tile(h, n, 1, n, r, block // nb, block % nb, g, RB, BK, PRECISION)
        tl.debug_barrier()
        for row0 in range(0, m, BR):
            _update_tile(v, w, h, m, n, r, g, d, row0, 0, BR, BK, RB, ONE_CHUNK, PRECISION)
        tl.debug_barrier()
        # H step: G = W^T W, then every column block of H.
        for block in range(0, nb * nb):
            _gram_tile(w, 1, r, m, r, block // nb, block % nb, g, RB, BK, PRECISION)
        tl.debug_barrier()
        for row0 in range(0, n, BR):
            _update_tile(v, w, h, m, n, r, g, d, row0, 1, BR, BK, RB, ONE_CHUNK, PRECISION)
        tl.debug_barrier()
        it += 1
        if CHECKS:
            if (it % CHECK_EVERY == 0) & (it < max_iter):
                current = _error(v, w, h, m, n, r, BR, BK, RB, IEEE)
                stop = (initial <= 0) | ((previous - current) / safe_initial < tol)
                running = tl.where(stop, 0, 1)
                previous = current
    tl.store(n_iter + i, it.to(tl.int64))
