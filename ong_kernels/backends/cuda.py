"""Compiled CUDA kernels (csrc/cuda/): one launch per fused step, driven by a device table."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels.backends import _native, reference
from ong_kernels.backends._multi_tensor import partition, run_fallback, sgd_rows
from ong_kernels.backends.registry import register

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _table(rows: list[list[int]], chunk: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """int64 table [n x (param, grad, buf, mask, numel)] + prefix sums of chunks, on `device`.

    Built on the host and sent with one non-blocking copy from pinned memory (the caching host
    allocator keeps that memory alive until the copy is done); the kernel reads the table from
    global memory, so the number of tensors per launch is unbounded (no kernel-argument limit).
    """
    flat: list[int] = []
    prefix = [0]
    for row in rows:
        flat += row
        prefix.append(prefix[-1] + (row[4] + chunk - 1) // chunk)
    host = torch.tensor(flat + prefix, dtype=torch.int64).pin_memory()
    return host.to(device, non_blocking=True), prefix[-1]


@register(
    "masked_sgd_step",
    "cuda",
    devices=("cuda",),
    available=_native.has_cuda,
    hint=_native.CUDA_HINT,
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
    """One kernel launch per dtype for all dense tensors; the rest go to the reference kernel."""
    lib = _native.cuda_lib()
    hyper = (lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    parts = partition(params, grads, momentum_buffers, mask_bits, SUPPORTED_DTYPES)
    chunk = lib.masked_sgd_chunk_size_cuda()
    for dtype, idx in parts.by_dtype.items():
        device = params[idx[0]].device
        rows = sgd_rows(idx, params, parts, momentum_buffers, mask_bits)
        table, n_chunks = _table(rows, chunk, device)
        lib.masked_sgd_step_cuda(
            table.data_ptr(),
            len(idx),
            n_chunks,
            _native.NATIVE_DTYPES[dtype],
            *hyper,
            device.index,
            torch.cuda.current_stream(device).cuda_stream,
        )
    run_fallback(
        reference.masked_sgd_step_, parts, params, grads, momentum_buffers, mask_bits, hyper
    )
