"""Compiled CPU kernels (csrc/cpu/): one OpenMP call per fused step, dense or compact."""

from __future__ import annotations

import functools

import torch

from ong_kernels._bitmask import COMPACT_BLOCK
from ong_kernels.backends import _native
from ong_kernels.backends._multi_tensor import TablePlan, planned_kernel
from ong_kernels.backends.registry import register

# float16/bfloat16 parameters on the CPU are rare; they take the reference path.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _scalar_ptr(t: torch.Tensor | None, name: str) -> int:
    """Address of a one-element float32 CPU tensor (GradScaler's), 0 for None."""
    if t is None:
        return 0
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{name} must be one float32 value on the CPU, got {t.dtype} {t.device}")
    return t.data_ptr()


def _launcher(entry: str):
    """launch(dtype, table, n, hyper, grad_scale, found_inf) for TablePlan: one native call
    for every row of `table` (a host int64 tensor), GIL released; `hyper` (SgdHyper) is read
    by name by the binding."""

    def launch(dtype, table, n, hyper, grad_scale, found_inf) -> None:
        getattr(_native.lib(), entry)(
            table.data_ptr(),
            n,
            _native.NATIVE_DTYPES[dtype],
            hyper,
            torch.get_num_threads(),
            _scalar_ptr(grad_scale, "grad_scale"),
            _scalar_ptr(found_inf, "found_inf"),
        )

    return launch


def _prepare_compact(params, grads, bufs, bits, offsets) -> TablePlan:
    chunk = _native.lib().masked_sgd_chunk_size_cpu()
    if chunk != COMPACT_BLOCK:
        raise RuntimeError(
            f"ong_kernels._C cuts tensors into chunks of {chunk} elements, the compact format "
            f"into blocks of {COMPACT_BLOCK}: rebuild the extension ({_native.BUILD_HINT})"
        )
    return TablePlan(
        params,
        grads,
        bufs,
        bits,
        offsets,
        supported_dtypes=SUPPORTED_DTYPES,
        launch=_launcher("masked_sgd_step_compact_cpu"),
    )


prepare = functools.partial(
    TablePlan, supported_dtypes=SUPPORTED_DTYPES, launch=_launcher("masked_sgd_step_cpu")
)

masked_sgd_step_ = register(
    "masked_sgd_step", "cpu", devices=("cpu",), available=_native.has_cpu, hint=_native.BUILD_HINT
)(
    planned_kernel(
        prepare,
        "The step for every float32/float64 tensor in ONE native call (GIL released); "
        "tensors the kernel cannot take go to the reference kernel.",
        host_table=True,
    )
)
masked_sgd_step_.compact = planned_kernel(
    _prepare_compact,
    "compact_state: ONE native call per dtype touching kept elements only; other dtypes "
    "and layouts go to the reference's gather/scatter.",
    host_table=True,
    compact=True,
)
