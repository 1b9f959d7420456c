"""Triton masked SGD step: one launch per dtype for every tensor of a group.

Reads the same int64 table as the CPU and CUDA kernels (one SgdTensor row per tensor,
ong_kernels/backends/_multi_tensor.py) plus a chunk table built once per plan: row k =
(tensor index, first element) of program k, so a program finds its tensor with two loads
instead of a search. Hyper-parameters are read from a small float64 tensor (exact for
float64 parameters; Triton passes Python floats as float32), GradScaler's scale and inf flag
from device memory (an inf step is skipped without a host sync). Flags that only choose a
branch (momentum buffer, first step, Nesterov, mask present) are runtime values, so one
compiled kernel per dtype serves every configuration: `aot_configs()` lists all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from ong_kernels.backends import reference
from ong_kernels.backends._multi_tensor import TablePlan, reference_scaled
from ong_kernels.backends.registry import register
from ong_kernels.backends.triton import _common

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# 1024 elements per program, 4 warps: 8 float32 per thread, vectorisable 16-byte accesses.
BLOCK = 1024
NUM_WARPS = 4


@cache
def _kernel():
    """The @triton.jit kernel, defined on first use (importing this module needs no triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def masked_sgd_kernel(
        table,  # int64 [n x 5]: param, grad, buf, mask, numel
        chunks,  # int64 [programs x 2]: tensor index, first element
        hyper,  # float64 [5]: lr, momentum, 1 - dampening, weight_decay, sign
        grad_scale,  # float32 [1] (read when has_scale)
        found_inf,  # float32 [1] (read when has_scale)
        flags,  # int32: 1 momentum buffer, 2 first step, 4 nesterov, 8 GradScaler
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(chunks + 2 * pid)
        start = tl.load(chunks + 2 * pid + 1)
        row = table + t * 5
        p_ptr = tl.load(row).to(tl.pointer_type(DTYPE), bitcast=True)
        g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE), bitcast=True)
        b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE), bitcast=True)
        m_addr = tl.load(row + 3)
        m_ptr = m_addr.to(tl.pointer_type(tl.uint8), bitcast=True)
        numel = tl.load(row + 4)
        sign = tl.load(hyper + 4).to(ACC)
        if (flags & 8) != 0:
            # GradScaler: an inf anywhere empties every tensor (nothing is loaded or stored);
            # the gradient is unscaled by float32(1 / double(scale)), as GradScaler does.
            numel = tl.where(tl.load(found_inf) != 0, 0, numel)
            sign = sign * (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32).to(ACC)
        offs = start + tl.arange(0, BLOCK)
        inb = offs < numel
        lr = tl.load(hyper).to(ACC)
        mom = tl.load(hyper + 1).to(ACC)
        damp = tl.load(hyper + 2).to(ACC)
        wd = tl.load(hyper + 3).to(ACC)
        if m_addr != 0:
            byte = tl.load(m_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
            keep = ((byte >> (offs & 7).to(tl.int32)) & 1) != 0
        else:
            keep = inb
        keep = keep & inb
        # The gradient load does not wait for the mask; p and buf are read only where kept.
        g = tl.load(g_ptr + offs, mask=inb, other=0).to(ACC)
        w = tl.load(p_ptr + offs, mask=keep, other=0).to(ACC)
        g = tl.where(keep, sign * g, 0.0)  # select, never multiply: NaN at pruned stays out
        g = g + wd * w
        if (flags & 1) != 0:
            if (flags & 2) != 0:
                b = g
            else:
                b = mom * tl.load(b_ptr + offs, mask=keep, other=0).to(ACC) + damp * g
            b = tl.where(keep, b, 0.0)
            tl.store(b_ptr + offs, b.to(DTYPE), mask=inb)
            if (flags & 4) != 0:
                g = g + mom * b
            else:
                g = b
        w = tl.where(keep, w - lr * g, 0.0)
        tl.store(p_ptr + offs, w.to(DTYPE), mask=inb)

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


def prepare(params, grads, momentum_buffers, mask_bits) -> TablePlan:
    device = params[0].device
    if device.type == "cuda":
        from ong_kernels.backends.cuda import refuse_capture

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
        lr, momentum, dampening, weight_decay, nesterov, maximize, first = hyper
        values = [lr, momentum, 1.0 - dampening, weight_decay, -1.0 if maximize else 1.0]
        hyper_t = torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
        flags = (momentum != 0) | (first << 1) | (nesterov << 2)
        if grad_scale is not None or found_inf is not None:
            flags |= 8
        element, acc = _tl_dtypes(dtype)
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
        params,
        grads,
        momentum_buffers,
        mask_bits,
        supported_dtypes=SUPPORTED_DTYPES,
        launch=launch,
        fallback=reference_scaled(reference.masked_sgd_step_),
        finish_table=chunk_table,
    )


@register(
    "masked_sgd_step",
    "triton",
    devices=_common.devices(),
    available=_common.available,
    hint=_common.HINT,
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
    """One Triton launch per dtype; tensors it cannot take go to the reference kernel."""
    hyper = (lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    prepare(params, grads, momentum_buffers, mask_bits).run(grads, hyper)


masked_sgd_step_.prepare = prepare
