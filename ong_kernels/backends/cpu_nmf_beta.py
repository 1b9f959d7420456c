"""The compiled CPU kernel of op nmf_beta_mu (csrc/cpu/nmf_beta*.cpp): beta-divergence MU
with scikit-learn's regularisation and fixed-H mode, one native call for the whole ragged
batch, the GIL released. W H and V / (W H)^(2 - beta) exist one tile per thread at a time
(csrc/cpu/nmf_beta_kernel.h), so the extra memory is O((m + n) r), where scikit-learn and
the reference kernel hold several m x n temporaries.

A whole-solve backend (nmf_plan): it implements nmf_plan's schedule and stop_rule natively,
on the error sqrt(2 D_beta) with W H recomputed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels import nmf_plan
from ong_kernels.backends import _native
from ong_kernels.backends.registry import Shape, register
from ong_kernels.nmf_beta import BetaLoss
from ong_kernels.nmf_plan import Matrices

# csrc/cpu/nmf_beta_kernel.h: kRows x kCols float32 tiles (three per thread) and a block's
# numerator and denominator (two more of max(kRows, kCols) x r).
_ROWS, _COLS = 16, 256


def workspace(shapes: Sequence[Shape]) -> int:
    """Peak extra bytes: the float32 copy of a non-float32 V (all of the group's, made before
    the call), per thread three tiles and two max(kRows, kCols) x r blocks, the r x r Gram
    and the error's float64 row of W H per thread and its per-block partial sums."""
    threads = torch.get_num_threads()
    copies = sum(4 * m * n for m, n, _, dtype in shapes if dtype != torch.float32)
    per_thread = max(
        4 * (3 * _ROWS * _COLS + 2 * max(_ROWS, _COLS) * r) + 8 * n for _, n, r, _ in shapes
    )
    per_matrix = max(4 * r * r + 4 * r + 8 * (m // _ROWS + 1) for m, _, r, _ in shapes)
    return copies + threads * per_thread + per_matrix


@register("nmf_beta_mu", "cpu", devices=("cpu",), available=_native.has_cpu,
          hint=_native.BUILD_HINT, workspace=workspace)  # fmt: skip
def nmf_beta_mu_(
    v_list: Matrices, w_list: Matrices, h_list: Matrices, max_iter: int, tol: float,
    loss: BetaLoss,
) -> torch.Tensor:  # fmt: skip
    """W_i (and H_i unless loss.update_h is False) updated in place; returns n_iter per matrix
    (int64). A V that is not float32 is read through a float32 copy."""
    lib = _native.lib()
    v32 = [v if v.dtype == torch.float32 else v.to(torch.float32) for v in v_list]
    table = nmf_plan.matrix_table(v32, w_list, h_list)
    n_iter = torch.empty(len(v_list), dtype=torch.int64)
    lib.nmf_beta_cpu(
        table.data_ptr(), len(v_list), max_iter, tol, loss.beta, loss.alpha_w, loss.alpha_h,
        loss.l1_ratio, loss.update_h, n_iter.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return n_iter
