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
