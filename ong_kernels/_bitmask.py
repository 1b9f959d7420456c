"""Bit-packed masks and the compact momentum format of the fused optimizer kernels.

A bool mask costs 1 byte per weight; the masked SGD step otherwise moves 20 bytes per float32
weight (param r/w, grad r, momentum r/w), so the mask alone adds 5% to a memory-bound step.
Packed 8 per byte it adds 0.6%. Bit order is little-endian (bit j of byte k is element
8k + j), which is the lane order of AVX-512 mask registers, so the CPU kernel loads 16 mask
bits straight into a __mmask16. Elements are taken in the parameter's memory order (see
`_layout.memory_order_view`), which is what the elementwise kernels walk.

compact_state keeps a masked parameter's momentum for its kept elements only: `compact`
gives them in memory order, and `block_offsets` says how many kept elements precede each
block of COMPACT_BLOCK elements, so a kernel that cuts a tensor into blocks finds where each
block's momentum starts without a scan.
"""

from __future__ import annotations

import torch

from ong_kernels._layout import Layout, dense_layout, kept_view, memory_order_view

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)

# Elements per block of the compact format: the CPU kernel's chunk (masked_sgd_chunk_size_cpu,
# checked when it loads). 16K float32 = 64 KiB per array, a multiple of 64 (a mask word).
COMPACT_BLOCK = 1 << 14


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of ceil(numel / 8) bytes: the mask's bits in memory order, pad bits 0."""
    flat = memory_order_view(mask)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, like: torch.Tensor | Layout) -> torch.Tensor:
    """The bool mask of `like`'s shape and layout (a tensor, or the Layout the bits were
    packed for) that `pack_mask` packed into `bits`."""
    out = (
        like.empty(torch.bool)
        if isinstance(like, Layout)
        else torch.empty_like(like, dtype=torch.bool)
    )
    flat = (bits.unsqueeze(1) & _BIT_WEIGHTS.to(bits.device)).ne(0).reshape(-1)[: out.numel()]
    if dense_layout(out):
        memory_order_view(out).copy_(flat)
    else:
        out.copy_(flat.view(out.shape))
    return out


def compact(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept entries of `dense` in memory order (`mask` in the same layout)."""
    return kept_view(dense)[kept_view(mask)].clone()


def expand(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A dense tensor in `mask`'s layout: `values` at the kept entries, 0 elsewhere."""
    out = torch.zeros_like(mask, dtype=values.dtype)
    kept_view(out)[kept_view(mask)] = values
    return out


def block_offsets(mask: torch.Tensor) -> torch.Tensor:
    """int64 [ceil(numel / COMPACT_BLOCK)] on the mask's device: kept elements before each
    block, in memory order."""
    flat = kept_view(mask)
    pad = (-flat.numel()) % COMPACT_BLOCK
    counts = torch.cat([flat, flat.new_zeros(pad)]).view(-1, COMPACT_BLOCK).sum(1)
    return (counts.cumsum(0) - counts).to(torch.int64).contiguous()
