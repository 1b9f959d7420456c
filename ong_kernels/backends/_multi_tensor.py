"""Shared host side of the fused multi-tensor steps: which tensors a native kernel can take,
and the int64 table (one csrc/include/ong_sgd.h SgdTensor row per tensor) that the CPU and
CUDA kernels both read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def dense_layout(t: torch.Tensor) -> bool:
    """True when elementwise kernels may walk `t` in storage order (contiguous or channels_last)."""
    return t.is_contiguous() or (
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    )


@dataclass
class Partition:
    """Indices the native kernel takes, grouped by dtype, and the ones left to the reference.

    `grads[i]` is the gradient to hand the kernel for tensor i: the user's gradient, or a copy
    in its parameter's layout when the strides differ (so channels_last weights stay fused).
    """

    by_dtype: dict[torch.dtype, list[int]] = field(default_factory=dict)
    fallback: list[int] = field(default_factory=list)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)


def partition(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor | None],
    supported_dtypes: Sequence[torch.dtype],
) -> Partition:
    out = Partition()
    has_buf = len(momentum_buffers) > 0
    for i, p in enumerate(params):
        bits = mask_bits[i]
        ok = p.dtype in supported_dtypes and dense_layout(p)
        ok = ok and (not has_buf or momentum_buffers[i].stride() == p.stride())
        ok = ok and (bits is None or (bits.dtype == torch.uint8 and bits.is_contiguous()))
        if not ok:
            out.fallback.append(i)
            continue
        g = grads[i]
        out.grads[i] = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        out.by_dtype.setdefault(p.dtype, []).append(i)
    return out


def sgd_rows(
    indices: Sequence[int],
    params: Sequence[torch.Tensor],
    parts: Partition,
    momentum_buffers: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor | None],
) -> list[list[int]]:
    """One (param, grad, buf, mask, numel) row per tensor: buf/mask 0 when absent."""
    return [
        [
            params[i].data_ptr(),
            parts.grads[i].data_ptr(),
            momentum_buffers[i].data_ptr() if momentum_buffers else 0,
            mask_bits[i].data_ptr() if mask_bits[i] is not None else 0,
            params[i].numel(),
        ]
        for i in indices
    ]


def run_fallback(kernel, parts: Partition, params, grads, momentum_buffers, mask_bits, hyper):
    """The tensors no native kernel took, through `kernel` (the reference)."""
    if not parts.fallback:
        return
    kernel(
        [params[i] for i in parts.fallback],
        [grads[i] for i in parts.fallback],
        [momentum_buffers[i] for i in parts.fallback] if momentum_buffers else [],
        [mask_bits[i] for i in parts.fallback],
        *hyper,
    )
