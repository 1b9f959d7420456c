"""Triton masked SGD step: one launch per dtype for every tensor of a group.

Reads the same int64 table as the CPU and CUDA kernels (one SgdTensor row per tensor,
ong_kernels/backends/_multi_tensor.py) plus a chunk table built once per plan: row k =
(tensor index, first element) of program k, so a program finds its tensor with two loads
instead of a search. Hyper-parameters are read from a small float64 tensor (exact for
float64 parameters; Triton passes Python floats as float32), GradScaler's scale and inf flag
from device memory (an inf step is skipped without a host sync). Flags that only choose a
branch (first step, Nesterov, GradScaler) and the table's buffer and mask addresses (0: none)
are runtime values, so one compiled kernel per dtype serves every configuration:
`aot_configs()` lists all of them. Whether a tensor has a momentum buffer is its table row's
buffer address, as in the CUDA kernel and the reference (the op refuses momentum != 0
without buffers and buffers with momentum == 0, _sgd_args.check_momentum); each launch runs
under the parameters' device guard (Triton launches on the current device).
"""

from __future__ import annotations

from functools import cache

import torch

from ong_kernels.backends._multi_tensor import TablePlan, planned_kernel, refuse_capture
from ong_kernels.backends.registry import register
from ong_kernels.backends.triton import _common

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# 1024 elements per program, 4 warps: 8 float32 per thread. The accesses are 4-byte scalar
# ones (the addresses come from the table, so Triton knows no alignment: PTX of the fp32
# kernel, review of 2026-12-06), coalesced across the warp.
BLOCK = 1024
NUM_WARPS = 4


@cache
def _kernel():
    """The @triton.jit kernel, imported on first use (importing this module needs no triton)."""
    from ong_kernels.backends.triton._sgd_kernels import masked_sgd_kernel

    return masked_sgd_kernel


def _tl_dtypes(dtype: torch.dtype):
    import triton.language as tl

    element = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }[dtype]
    return element, (tl.float64 if dtype == torch.float64 else tl.float32)


def aot_configs() -> list[dict]:
    """Every configuration the dispatcher launches (one per dtype), for _aot.compile_report."""
    signature = {
        "table": "*i64",
        "chunks": "*i64",
        "hyper": "*fp64",
        "grad_scale": "*fp32",
        "found_inf": "*fp32",
        "flags": "i32",
        "DTYPE": "constexpr",
        "ACC": "constexpr",
        "BLOCK": "constexpr",
    }
    out = []
    for dtype in SUPPORTED_DTYPES:
        element, acc = _tl_dtypes(dtype)
        out.append(
            dict(
                fn=_kernel(),
                signature=signature,
                constexprs={"DTYPE": element, "ACC": acc, "BLOCK": BLOCK},
                num_warps=NUM_WARPS,
                num_stages=1,
            )
        )
    return out


def prepare(params, *lists) -> TablePlan:
    """This backend's TablePlan; `lists`: grads, momentum_buffers, mask_bits (the op's order)."""
    device = params[0].device
    refuse_capture(device)

    def chunk_table(table, rows):
        chunks = [(t, s) for t, row in enumerate(rows) for s in range(0, row[4], BLOCK)]
        host = torch.tensor(chunks, dtype=torch.int64).reshape(-1, 2)
        return table.to(device), host.to(device), len(chunks)

    zero = torch.zeros(1, dtype=torch.float32, device=device)
    one = torch.ones(1, dtype=torch.float32, device=device)

    def launch(dtype, tables, n, hyper, grad_scale, found_inf) -> None:
        table, chunks, programs = tables
        if programs == 0:
            return
        refuse_capture(device)
        values = [
            hyper.lr,
            hyper.momentum,
            1.0 - hyper.dampening,
            hyper.weight_decay,
            -1.0 if hyper.maximize else 1.0,
        ]
        hyper_t = torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
        flags = (hyper.first_step << 1) | (hyper.nesterov << 2)
        if grad_scale is not None or found_inf is not None:
            flags |= 8
        element, acc = _tl_dtypes(dtype)
        with _common.on_device(device):
            _kernel()[(programs,)](
                table,
                chunks,
                hyper_t,
                one if grad_scale is None else grad_scale,
                zero if found_inf is None else found_inf,
                int(flags),
                DTYPE=element,
                ACC=acc,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )

    return TablePlan(
        params, *lists, supported_dtypes=SUPPORTED_DTYPES, launch=launch, finish_table=chunk_table
    )


masked_sgd_step_ = register(
    "masked_sgd_step",
    "triton",
    devices=_common.devices(),
    available=_common.available,
    hint=_common.HINT,
)(
    planned_kernel(
        prepare,
        """One Triton launch per dtype; tensors it cannot take go to the reference kernel.""",
        host_table=False,
    )
)
