"""Compiled CPU kernels (csrc/cpu/): one OpenMP call per fused step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels.backends import _native, reference
from ong_kernels.backends._multi_tensor import partition, run_fallback, sgd_rows
from ong_kernels.backends.registry import register

# float16/bfloat16 parameters on the CPU are rare; they take the reference path.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


@register(
    "masked_sgd_step", "cpu", devices=("cpu",), available=_native.has_cpu, hint=_native.BUILD_HINT
)
def masked_sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor | None],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """The whole step for every float32/float64 tensor in ONE native call (GIL released).

    Semantics are reference.masked_sgd_step_'s; tensors the kernel cannot take go there.
    """
    lib = _native.lib()
    hyper = (lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    parts = partition(params, grads, momentum_buffers, mask_bits, SUPPORTED_DTYPES)
    for dtype, idx in parts.by_dtype.items():
        table = torch.tensor(
            sgd_rows(idx, params, parts, momentum_buffers, mask_bits), dtype=torch.int64
        )
        lib.masked_sgd_step_cpu(
            table.data_ptr(),
            len(idx),
            _native.NATIVE_DTYPES[dtype],
            *hyper,
            torch.get_num_threads(),
        )
    run_fallback(
        reference.masked_sgd_step_, parts, params, grads, momentum_buffers, mask_bits, hyper
    )
