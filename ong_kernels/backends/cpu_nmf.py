"""The compiled CPU NMF kernel (csrc/cpu/nmf_mu*.cpp): one native call solves the whole
ragged batch, every matrix, every iteration and every stopping check, with the GIL released.

It implements nmf_plan's rule natively (whole-solve backend, see ong_kernels/nmf_plan.py):
checks every nmf_plan.CHECK_EVERY iterations below max_iter, none when tol = 0, and
nmf_plan.stop_rule per matrix, with the error from the trace identity in float64.
"""

from __future__ import annotations

import torch

from ong_kernels import nmf_plan
from ong_kernels.backends import _native
from ong_kernels.backends.registry import register
from ong_kernels.nmf_plan import Matrices


@register("nmf_mu", "cpu", devices=("cpu",), available=_native.has_cpu, hint=_native.BUILD_HINT)
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
