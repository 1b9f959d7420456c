"""Compiled CUDA kernels (csrc/cuda/): one launch per fused step, driven by a device table."""

from __future__ import annotations

import torch

from ong_kernels.backends import _native
from ong_kernels.backends._multi_tensor import TablePlan, planned_kernel, refuse_capture
from ong_kernels.backends.registry import register

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def device_table(chunk: int):
    """finish_table for TablePlan: rows + prefix sums of chunk counts, on the tensors' device
    (one copy per plan, not per step: the plan is cached while the layouts hold)."""

    def finish(table: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        prefix = [0]
        for row in rows:
            prefix.append(prefix[-1] + (row[4] + chunk - 1) // chunk)
        host = torch.cat([table.reshape(-1), torch.tensor(prefix, dtype=torch.int64)])
        return host

    return finish


def prepare(params, *lists) -> TablePlan:
    """This backend's TablePlan; `lists`: grads, momentum_buffers, mask_bits (the op's order)."""
    lib = _native.cuda_lib()
    device = params[0].device
    refuse_capture(device)
    chunk = lib.masked_sgd_chunk_size_cuda()
    finish = device_table(chunk)

    def on_device(table, rows):
        host = finish(table, rows)
        n_chunks = int(host[-1])
        return host.to(device), n_chunks

    def launch(dtype, table_and_chunks, n, hyper, grad_scale, found_inf) -> None:
        refuse_capture(device)
        table, n_chunks = table_and_chunks
        lib.masked_sgd_step_cuda(
            table.data_ptr(),
            n,
            n_chunks,
            _native.NATIVE_DTYPES[dtype],
            hyper,
            device.index,
            torch.cuda.current_stream(device).cuda_stream,
            _scalar_ptr(grad_scale, device, "grad_scale"),
            _scalar_ptr(found_inf, device, "found_inf"),
        )

    return TablePlan(
        params, *lists, supported_dtypes=SUPPORTED_DTYPES, launch=launch, finish_table=on_device
    )


def _scalar_ptr(t: torch.Tensor | None, device: torch.device, name: str) -> int:
    """Device address of a one-element float32 tensor on the step's device, 0 for None."""
    if t is None:
        return 0
    if t.device != device or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{name} must be one float32 value on {device}, got {t.dtype} {t.device}")
    return t.data_ptr()


masked_sgd_step_ = register(
    "masked_sgd_step",
    "cuda",
    devices=("cuda",),
    available=_native.has_cuda,
    hint=_native.CUDA_HINT,
)(
    planned_kernel(
        prepare,
        "One launch per dtype for all dense tensors; the rest go to the reference kernel.",
        host_table=False,
    )
)
