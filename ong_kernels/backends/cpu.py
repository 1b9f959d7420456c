"""Compiled CPU kernels (csrc/cpu/): one OpenMP call per fused step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels.backends import _native, reference
from ong_kernels.backends._multi_tensor import partition

# float16/bfloat16 parameters on the CPU are rare; they take the reference path.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


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
        lib.masked_sgd_step_cpu(
            [params[i].data_ptr() for i in idx],
            [parts.grads[i].data_ptr() for i in idx],
            [momentum_buffers[i].data_ptr() if momentum_buffers else 0 for i in idx],
            [mask_bits[i].data_ptr() if mask_bits[i] is not None else 0 for i in idx],
            [params[i].numel() for i in idx],
            _native.DTYPE_CODES[dtype],
            *hyper,
            torch.get_num_threads(),
        )
    if parts.fallback:
        reference.masked_sgd_step_(
            [params[i] for i in parts.fallback],
            [grads[i] for i in parts.fallback],
            [momentum_buffers[i] for i in parts.fallback] if momentum_buffers else [],
            [mask_bits[i] for i in parts.fallback],
            *hyper,
        )
