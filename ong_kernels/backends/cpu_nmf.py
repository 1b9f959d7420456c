"""The compiled CPU NMF kernel (csrc/cpu/nmf_mu*.cpp): one native call solves the whole
ragged batch, every matrix, every iteration and every stopping check, with the GIL released.

It implements nmf_plan's rule natively (whole-solve backend, see ong_kernels/nmf_plan.py):
checks every nmf_plan.CHECK_EVERY iterations below max_iter, none when tol = 0, and
nmf_plan.stop_rule per matrix, with the error from the trace identity in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels import nmf_plan
from ong_kernels.backends import _native
from ong_kernels.backends.registry import Shape, register
from ong_kernels.nmf_plan import Matrices


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _matrix_workspace(m: int, n: int, r: int, dtype: torch.dtype) -> int:
    """Bytes of one matrix's Matrix layout (csrc/cpu/nmf_mu_kernel.h, Matrix::layout with
    checks and the one-thread fused numerator, the larger case) plus its float32 copy of a
    non-float32 V, at the widest padding (16 float lanes, AVX-512)."""
    rp = _round_up(r, 16)
    block = max(96, _round_up(rp, 24))
    blocks = -(-max(m, n) // block)
    floats = rp * (m + n) + 2 * rp * rp + n * rp
    doubles = rp * (m + n) + 2 * rp * rp + n * rp + blocks * (rp * rp + 1)
    copy = 0 if dtype == torch.float32 else 4 * m * n
    scratch = block * rp * (8 + 4 + 4) + 4 * block * block  # Scratch::reserve, per thread
    return 4 * floats + 8 * doubles + copy + scratch


def workspace(shapes: Sequence[Shape]) -> int:
    """Peak extra bytes of one solve: each thread holds one matrix's layout at a time (a
    large matrix shared by the whole team holds one), so at most the `threads` largest."""
    per_matrix = sorted((_matrix_workspace(*s) for s in shapes), reverse=True)
    return sum(per_matrix[: torch.get_num_threads()])


# sketch_product pads the sketch to a multiple of this many columns: every ISA's float lanes
# (4, 8, 16) divide it, as the register tiles need.
SKETCH_LANES = 16
# The slabs of V^T X's row blocks, each summed into its own n x wp partial (nmf_mu_kernel.h).
SKETCH_SLABS = 4


def sketch_bytes(m: int, n: int, width: int) -> int:
    """Peak bytes of one sketch_product of an m x n V at ``width`` columns beyond V and x: the
    padded copy of x and the padded output (at most wp (m + n) floats together), and V^T X's
    partial sums of slabs 1.. (3 n wp floats)."""
    wp = _round_up(width, SKETCH_LANES)
    return 4 * wp * (m + n) + 4 * (SKETCH_SLABS - 1) * n * wp


def sketch_product(v: torch.Tensor, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``v @ x`` (or ``v.T @ x`` with ``transpose``) for a float32 CPU matrix ``v`` (m x n) and
    a skinny float32 ``x`` (n x w, or m x w), on the MU kernel's register tiles
    (csrc/cpu/nmf_mu_kernel.h, sketch_product): ``v @ x`` as the W sweep's V H^T, ``v.T @ x``
    as the H sweep's W^T V, without forming v^T. Each entry is summed in one order whatever
    the thread count. nmf_init's randomized SVD takes its products here: MKL's sgemm at
    26 columns ran at 45-71 GFLOP/s on AMD Zen 4 (benchmarks/RESULTS.md, issue 28), a third
    of the MU kernel's rate on the same products."""
    if v.dim() != 2 or x.dim() != 2:
        raise ValueError(f"sketch_product: v and x must be 2-D, got {v.dim()}-D and {x.dim()}-D")
    if v.dtype != torch.float32 or x.dtype != torch.float32:
        raise ValueError(f"sketch_product: v and x must be float32, got {v.dtype}, {x.dtype}")
    if v.device.type != "cpu" or x.device.type != "cpu":
        raise ValueError("sketch_product: v and x must be CPU tensors")
    m, n = v.shape
    inner = m if transpose else n
    if x.shape[0] != inner or x.shape[1] == 0 or m == 0 or n == 0:
        raise ValueError(
            f"sketch_product: x must be {inner} x w with w >= 1 for a {m} x {n} v "
            f"(transpose={transpose}), got {tuple(x.shape)}"
        )
    width = x.shape[1]
    wp = _round_up(width, SKETCH_LANES)
    v = v.contiguous()
    xp = torch.zeros(inner, wp)
    xp[:, :width] = x
    out = torch.empty(n if transpose else m, wp)
    _native.lib().sketch_product_cpu(
        v.data_ptr(), m, n, xp.data_ptr(), wp, out.data_ptr(), transpose, torch.get_num_threads()
    )
    return out[:, :width]


@register("nmf_mu", "cpu", devices=("cpu",), available=_native.has_cpu, hint=_native.BUILD_HINT,
          workspace=workspace)  # fmt: skip
def nmf_mu_(
    v_list: Matrices, w_list: Matrices, h_list: Matrices, max_iter: int, tol: float
) -> torch.Tensor:
    """W_i, H_i updated in place; returns n_iter per matrix (int64). V_i is read in its own
    dtype (float16/bfloat16/float64 converted one matrix at a time inside the call)."""
    lib = _native.lib()
    table = nmf_plan.matrix_table(v_list, w_list, h_list)
    dtypes = torch.tensor([int(_native.NATIVE_DTYPES[v.dtype]) for v in v_list], dtype=torch.int64)
    n_iter = torch.empty(len(v_list), dtype=torch.int64)
    lib.nmf_mu_cpu(
        table.data_ptr(),
        dtypes.data_ptr(),
        len(v_list),
        max_iter,
        tol,
        n_iter.data_ptr(),
        torch.get_num_threads(),
    )
    return n_iter
