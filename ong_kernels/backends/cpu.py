"""Compiled CPU kernels (csrc/cpu/): one OpenMP call per fused step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels.backends import _native, reference
from ong_kernels.backends._multi_tensor import TablePlan, reference_scaled
from ong_kernels.backends.registry import register

# float16/bfloat16 parameters on the CPU are rare; they take the reference path.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _launch(dtype, table, n, hyper, grad_scale, found_inf) -> None:
    """One native call for every row of `table` (a host int64 tensor), GIL released.
    grad_scale / found_inf: float32 CPU tensors of GradScaler, read by the kernel."""
    _native.lib().masked_sgd_step_cpu(
        table.data_ptr(),
        n,
        _native.NATIVE_DTYPES[dtype],
        *hyper,
        torch.get_num_threads(),
        _scalar_ptr(grad_scale, "grad_scale"),
        _scalar_ptr(found_inf, "found_inf"),
    )


def _scalar_ptr(t: torch.Tensor | None, name: str) -> int:
    """Address of a one-element float32 CPU tensor (GradScaler's), 0 for None."""
    if t is None:
        return 0
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{name} must be one float32 value on the CPU, got {t.dtype} {t.device}")
    return t.data_ptr()


def prepare(params, grads, momentum_buffers, mask_bits) -> TablePlan:
    """The cached form of the step (FusedMaskedSGD keeps it while the layouts hold)."""
    return TablePlan(
        params,
        grads,
        momentum_buffers,
        mask_bits,
        supported_dtypes=SUPPORTED_DTYPES,
        launch=_launch,
        fallback=reference_scaled(reference.masked_sgd_step_),
    )


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
    hyper = (lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    prepare(params, grads, momentum_buffers, mask_bits).run(grads, hyper)


masked_sgd_step_.prepare = prepare
