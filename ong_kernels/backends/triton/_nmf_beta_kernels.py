"""The Triton beta-divergence MU kernels (imported on first use by nmf_beta.py: this module
imports triton).

They follow scikit-learn's `_multiplicative_update_w` / `_multiplicative_update_h`
(sklearn/decomposition/_nmf.py; the rules are ong_kernels/nmf_beta.py, the step-by-step
oracle ong_kernels/backends/reference_beta.py) without ever holding W H: a program owns BR rows
of a factor X and walks the other side of V in tiles of BN, forming each tile of W H in
registers, the weighted tile V * (W H)^(beta - 2) and the powered tile (W H)^(beta - 1) from
it, and accumulating them into the numerator and the denominator at once.

The ragged batch is read through the Frobenius kernels' descriptor table (_nmf_kernels.py:
V, W, H addresses, m, n, r, G offset, D offset; the Gram product G = H H^T or W^T W of
beta = 2 is formed by _nmf_kernels._gram_kernel into the same scratch), and a float32
coefficient table `coef`, one row of NCOEF per matrix (nmf_beta.COEF_COLUMNS):

    l1_W, l2_W, l1_H, l2_H, beta - 2, beta - 1, gamma, floor_num, floor_den, zero_W, zero_H,
    beta

(the rules as thresholds decided on the host in float64: W H is raised to floor_num (EPS or
0) in the numerator's factor and to floor_den in the denominator's; W and H entries below
zero_W, zero_H (float64's eps or 0) are zeroed after their update; W H >= 0 and W, H >= 0,
so a threshold of 0 changes nothing).

As in _nmf_kernels, both half-steps are one kernel on a factor X with `rows` x r entries: the
W step is X = W (rows = m) with A = V, B = H^T; the H step X = H^T (rows = n) with A = V^T,
B = W. Per tile of k (BN columns of A):

    T = X[rows] B[k]^T      (the tile of W H, or of (W H)^T; rank chunks of RK)
    num += f(A, T) B[k],  den += g(T) B[k]

with KIND (a constexpr) choosing f and g as reference_beta.weighted_v / powered_wh do:
FRO (beta 2): num += A B[k], no T, den = X G after the walk; KL (beta 1): f = A / max(T,
EPS), den = the column sums of B (H's row sums; W's column sums with 0 -> 1); IS (beta 0):
f = A (1 / max(T, EPS))^2, g = 1 / max(T, EPS); OTHER: f = A max(T, EPS)^(beta - 2) and
g = T^(beta - 1) with the clipping flags. The epilogue is reference_beta._apply_: den += l1,
den += l2 X, den == 0 -> EPS, X *= (num / den) ** gamma, then the zero threshold.

Powers: x ** e is exp2(e * log2(x)) in float64 (converted back to float32: the correctly
rounded float32 power but in rare ties), because Triton's interpreter has no libdevice.pow
and float32 exp2/log2 lose ~10 ulp; only KIND OTHER and gamma != 1, 1/2 pay for it. Division
and the square root are tl.div_rn / tl.sqrt_rn (IEEE, as torch): a plain `/` lowers to
div.full.f32 (2 ulp) on the GPU.

Products are tl.dot with input_precision "ieee" (fp32 FMA) only: the op takes no precision.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ong_kernels.backends.triton._nmf_kernels import _matrix

IEEE: tl.constexpr = tl.constexpr("ieee")
EPS: tl.constexpr = tl.constexpr(1.1920928955078125e-07)  # float32 eps (nmf_beta.EPS)
NCOEF: tl.constexpr = tl.constexpr(12)  # nmf_beta.COEF_COLUMNS
# The rank chunk of every product that sums over the rank (T, X G): tl.dot's minimum, and
# what keeps a thread's slice of the operands small (the Frobenius kernels' BK).
RK: tl.constexpr = tl.constexpr(16)
# KIND
FRO: tl.constexpr = tl.constexpr(0)
KL: tl.constexpr = tl.constexpr(1)
IS: tl.constexpr = tl.constexpr(2)
OTHER: tl.constexpr = tl.constexpr(3)


@triton.jit
def _pow64(x, e):
    """x ** e for float64 x >= 0 and e != 0: exp2(e log2 x), x = 0 handled apart (0 or inf,
    as pow) so that no log of 0 is taken."""
    pos = x > 0
    p = tl.exp2(e * tl.log2(tl.where(pos, x, 1.0)))
    return tl.where(pos, p, tl.where(e > 0, 0.0, float("inf")))


@triton.jit
def _pow(x, e):
    """x ** e for float32 x >= 0 and e != 0, computed in float64, rounded to float32."""
    return _pow64(x.to(tl.float64), e.to(tl.float64)).to(tl.float32)


@triton.jit
def _side(v, w, h, m, n, r, SIDE: tl.constexpr):
    """The operands of one half-step (as _nmf_kernels._side): SIDE 0 updates W (A = V,
    B = H^T), 1 updates H (A = V^T, B = W)."""
    if SIDE == 0:
        # X = W (m x r), A = V (m x n), B[k, c] = H[c, k]
        return w, m, n, r, 1, v, n, 1, h, 1, n
    else:
        # X = H^T (n x r), A = V^T (n x m), B[k, c] = W[k, c]
        return h, n, m, 1, n, v, 1, n, w, r, 1


@triton.jit
def _wh_tile(x, x_sr, x_sc, b, b_sk, b_sc, r, rows, rmask, ok, kmask, BR: tl.constexpr,
             BN: tl.constexpr):  # fmt: skip
    """T[rows, ok] = sum_c X[rows, c] B[ok, c] (a tile of W H or (W H)^T), rank chunks of RK,
    fp32 FMA."""
    t = tl.zeros([BR, BN], dtype=tl.float32)
    for q0 in range(0, r, RK):
        oq = q0 + tl.arange(0, RK)
        qmask = oq < r
        xq = tl.load(x + rows[:, None].to(tl.int64) * x_sr + oq[None, :] * x_sc,
                     mask=rmask[:, None] & qmask[None, :], other=0.0)  # fmt: skip
        bq = tl.load(b + ok[None, :].to(tl.int64) * b_sk + oq[:, None] * b_sc,
                     mask=kmask[None, :] & qmask[:, None], other=0.0)  # fmt: skip
        t = tl.dot(xq, bq, t, input_precision=IEEE)
    return t


@triton.jit
def _sums(v, w, h, m, n, r, g, cf, row0, c0, KIND: tl.constexpr, SIDE: tl.constexpr,
          BR: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr):  # fmt: skip
    """(numerator, denominator) of rows row0:row0+BR and rank columns c0:c0+RB of X, from the
    current X and B (before the regularisation and the update)."""
    x, size_r, size_k, x_sr, x_sc, a, a_sr, a_sk, b, b_sk, b_sc = _side(v, w, h, m, n, r, SIDE)
    rows = row0 + tl.arange(0, BR)
    rmask = rows < size_r
    cols = c0 + tl.arange(0, RB)
    cmask = cols < r
    num = tl.zeros([BR, RB], dtype=tl.float32)
    den = tl.zeros([BR, RB], dtype=tl.float32)
    bsum = tl.zeros([RB], dtype=tl.float32)
    e_num = tl.load(cf + 4)
    e_den = tl.load(cf + 5)
    floor_num = tl.load(cf + 7)
    floor_den = tl.load(cf + 8)
    for k0 in range(0, size_k, BN):
        ok = k0 + tl.arange(0, BN)
        kmask = ok < size_k
        at = tl.load(a + rows[:, None].to(tl.int64) * a_sr + ok[None, :].to(tl.int64) * a_sk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        bt = tl.load(b + ok[:, None].to(tl.int64) * b_sk + cols[None, :] * b_sc,
                     mask=kmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        if KIND == FRO:
            num = tl.dot(at, bt, num, input_precision=IEEE)
        else:
            t = _wh_tile(x, x_sr, x_sc, b, b_sk, b_sc, r, rows, rmask, ok, kmask, BR, BN)
            if KIND == KL:
                num = tl.dot(tl.div_rn(at, tl.where(t < EPS, EPS, t)), bt, num,
                             input_precision=IEEE)  # fmt: skip
                bsum += tl.sum(bt, axis=0)
            elif KIND == IS:
                inv = tl.div_rn(1.0, tl.where(t < EPS, EPS, t))
                num = tl.dot(inv * inv * at, bt, num, input_precision=IEEE)
                den = tl.dot(inv, bt, den, input_precision=IEEE)
            else:
                tn = tl.where(t < floor_num, floor_num, t)
                num = tl.dot(_pow(tn, e_num) * at, bt, num, input_precision=IEEE)
                td = tl.where(t < floor_den, floor_den, t)
                # Padding (k past the matrix) is T = 0: its power, maybe inf, never meets B's 0.
                powered = tl.where(kmask[None, :], _pow(td, e_den), 0.0)
                den = tl.dot(powered, bt, den, input_precision=IEEE)
    if KIND == FRO:
        # den = X G (G = B^T B, r x r row-major, symmetric), rank chunks of RK
        for q0 in range(0, r, RK):
            oq = q0 + tl.arange(0, RK)
            qmask = oq < r
            xq = tl.load(x + rows[:, None].to(tl.int64) * x_sr + oq[None, :] * x_sc,
                         mask=rmask[:, None] & qmask[None, :], other=0.0)  # fmt: skip
            gq = tl.load(g + oq[:, None] * r + cols[None, :],
                         mask=qmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            den = tl.dot(xq, gq, den, input_precision=IEEE)
    elif KIND == KL:
        if SIDE == 1:
            bsum = tl.where(bsum == 0.0, 1.0, bsum)  # scikit-learn's W_sum[W_sum == 0] = 1
        den = tl.zeros([BR, RB], dtype=tl.float32) + bsum[None, :]
    return num, den


@triton.jit
def _apply(x, x_sr, x_sc, r, rows, rmask, c0, num, den, cf, KIND: tl.constexpr,
           SIDE: tl.constexpr, RB: tl.constexpr):  # fmt: skip
    """X[rows, c0:c0+RB] *= ((num / (den + l1 + l2 X)) ** gamma), a zero denominator made EPS,
    then entries below float64's eps zeroed where the rules say (reference_beta._apply_)."""
    cols = c0 + tl.arange(0, RB)
    mask = rmask[:, None] & (cols < r)[None, :]
    ptr = x + rows[:, None].to(tl.int64) * x_sr + cols[None, :] * x_sc
    l1 = tl.load(cf + 2 * SIDE)
    l2 = tl.load(cf + 2 * SIDE + 1)
    gamma = tl.load(cf + 6)
    zero_below = tl.load(cf + 9 + SIDE)
    old = tl.load(ptr, mask=mask, other=0.0)
    den = den + l1
    den = den + l2 * old
    den = tl.where(den == 0.0, EPS, den)
    delta = tl.div_rn(num, den)
    if KIND == IS:
        delta = tl.sqrt_rn(delta)  # gamma = 1 / 2
    elif KIND == OTHER:
        delta = tl.where(gamma != 1.0, _pow(delta, gamma), delta)
    new = old * delta
    new = tl.where(new < zero_below, 0.0, new)
    tl.store(ptr, new, mask=mask)


# ----------------------------------------------------------------------------- grouped kernels
# Grid: one program per tile of the call; `tiles` (int32, 2 per tile) says which matrix and
# which block. `active` (int32 per matrix): 0 = stopped, the program does nothing.


@triton.jit
def _beta_update_kernel(table, scratch, coef, tiles, active, KIND: tl.constexpr,
                        SIDE: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                        RB: tl.constexpr, ONE_CHUNK: tl.constexpr,
                        V_DTYPE: tl.constexpr):  # fmt: skip
    """The W step (SIDE 0) or the H step (SIDE 1) of every matrix, BR rows of X per program
    (all r columns: the program reads only old values of the rows it writes)."""
    pid = tl.program_id(0)
    i = tl.load(tiles + 2 * pid)
    block = tl.load(tiles + 2 * pid + 1)
    if tl.load(active + i) != 0:
        v, w, h, m, n, r, g, d = _matrix(table, scratch, i, V_DTYPE)
        cf = coef + i * NCOEF
        x, size_r, _k, x_sr, x_sc, _a, _asr, _ask, _b, _bsk, _bsc = _side(v, w, h, m, n, r, SIDE)
        row0 = block * BR
        rows = row0 + tl.arange(0, BR)
        rmask = rows < size_r
        if ONE_CHUNK:
            # r <= RB: the sums stay in registers.
            num, den = _sums(v, w, h, m, n, r, g, cf, row0, 0, KIND, SIDE, BR, BN, RB)
            # Every thread's reads of X (in T, X G and nothing after) before any thread
            # overwrites X (as _nmf_kernels._update_tile).
            tl.debug_barrier()
            _apply(x, x_sr, x_sc, r, rows, rmask, 0, num, den, cf, KIND, SIDE, RB)
        else:
            # Several rank blocks: each block's sums from the old X (T over the whole rank,
            # recomputed per block) into the scratch D, rows x 2r (num, then den) ...
            for c0 in range(0, r, RB):
                num, den = _sums(v, w, h, m, n, r, g, cf, row0, c0, KIND, SIDE, BR, BN, RB)
                cols = c0 + tl.arange(0, RB)
                smask = rmask[:, None] & (cols < r)[None, :]
                ptr = d + rows[:, None].to(tl.int64) * (2 * r) + cols[None, :]
                tl.store(ptr, num, mask=smask)
                tl.store(ptr + r, den, mask=smask)
            # ... made visible to every thread of the program before any X is overwritten.
            tl.debug_barrier()
            for c0 in range(0, r, RB):
                cols = c0 + tl.arange(0, RB)
                smask = rmask[:, None] & (cols < r)[None, :]
                ptr = d + rows[:, None].to(tl.int64) * (2 * r) + cols[None, :]
                num = tl.load(ptr, mask=smask, other=0.0)
                den = tl.load(ptr + r, mask=smask, other=1.0)
                _apply(x, x_sr, x_sc, r, rows, rmask, c0, num, den, cf, KIND, SIDE, RB)


# Runtime ints not specialised (as _nmf_kernels._error_kernel).
@triton.jit(do_not_specialize=["max_blocks"])
def _beta_error_kernel(table, scratch, coef, tiles, active, err2, max_blocks, KIND: tl.constexpr,
                       BR: tl.constexpr, BN: tl.constexpr, V_DTYPE: tl.constexpr):  # fmt: skip
    """err2[i, block] = D_beta(V | W H) over row block `block` of matrix i (float64,
    [matrices x max_blocks], zeroed), nmf_beta.divergence's terms entry by entry as the CPU
    kernel sums them: T = W H in float32 (fp32 FMA), every term in float64. One slot per
    tile, summed by the host in a fixed order (no atomics: the same bits every run)."""
    pid = tl.program_id(0)
    i = tl.load(tiles + 2 * pid)
    block = tl.load(tiles + 2 * pid + 1)
    if tl.load(active + i) != 0:
        v, w, h, m, n, r, _g, _d = _matrix(table, scratch, i, V_DTYPE)
        beta = tl.load(coef + i * NCOEF + 11).to(tl.float64)
        rows = block * BR + tl.arange(0, BR)
        rmask = rows < m
        total = tl.zeros([BR], dtype=tl.float64)
        for k0 in range(0, n, BN):
            ok = k0 + tl.arange(0, BN)
            kmask = ok < n
            mask = rmask[:, None] & kmask[None, :]
            # (W H)[rows, ok]: X = W (stride r, 1), B[k, c] = H[c, k] (stride 1, n)
            y = _wh_tile(w, r, 1, h, 1, n, r, rows, rmask, ok, kmask, BR, BN).to(tl.float64)
            xv = tl.load(v + rows[:, None].to(tl.int64) * n + ok[None, :], mask=mask,
                         other=0.0).to(tl.float32).to(tl.float64)  # fmt: skip
            if KIND == FRO:
                term = 0.5 * (xv - y) * (xv - y)
            else:
                keep = xv > EPS
                c = tl.where(y < EPS, EPS, y)
                xs = tl.where(keep, xv, 1.0)
                if KIND == KL:
                    term = y + tl.where(keep, xs * tl.log(xs / c) - xs, 0.0)
                elif KIND == IS:
                    term = tl.where(keep, xs / c - tl.log(xs / c), 0.0) - 1.0
                else:
                    yb = _pow64(y, beta)
                    xb = _pow64(xs, beta)
                    cb = _pow64(c, beta - 1.0)
                    term = yb * (beta - 1.0) + tl.where(keep, xb - beta * xs * cb, 0.0)
                    term = term / (beta * (beta - 1.0))
            total += tl.sum(tl.where(mask, term, 0.0), axis=1)
        tl.store(err2 + i.to(tl.int64) * max_blocks + block, tl.sum(total, axis=0))
