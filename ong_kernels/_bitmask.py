"""Bit-packed masks for the fused optimizer kernels.

A bool mask costs 1 byte per weight; the masked SGD step otherwise moves 20 bytes per float32
weight (param r/w, grad r, momentum r/w), so the mask alone adds 5% to a memory-bound step.
Packed 8 per byte it adds 0.6%. Bit order is little-endian (bit j of byte k is element
8k + j), which is the lane order of AVX-512 mask registers, so the CPU kernel loads 16 mask
bits straight into a __mmask16. Elements are taken in the parameter's memory order (see
`memory_order_view`), which is what the elementwise kernels walk.
"""

from __future__ import annotations

import torch

from ong_kernels.backends._multi_tensor import dense_layout

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def memory_order_view(t: torch.Tensor) -> torch.Tensor:
    """A flat view of `t` in memory order when it is dense (contiguous or channels_last);
    otherwise a flat copy in logical (row-major) order."""
    if dense_layout(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.reshape(-1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of ceil(numel / 8) bytes: the mask's bits in memory order, pad bits 0."""
    flat = memory_order_view(mask)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def pack_mask_like(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`pack_mask` of the bool `mask` taken in `like`'s memory order, on `like`'s device.

    The bits a kernel reads must follow the parameter's layout *now*: a mask packed for a
    contiguous weight selects other weights once the weight is channels_last.
    """
    if mask.device == like.device and mask.stride() == like.stride() and dense_layout(like):
        return pack_mask(mask)
    return pack_mask(torch.empty_like(like, dtype=torch.bool).copy_(mask))


def unpack_mask(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask of `like`'s shape and layout that `pack_mask` packed into `bits`."""
    flat = (bits.unsqueeze(1) & _BIT_WEIGHTS.to(bits.device)).ne(0).reshape(-1)[: like.numel()]
    out = torch.empty_like(like, dtype=torch.bool)
    if dense_layout(out):
        memory_order_view(out).copy_(flat)
    else:
        out.copy_(flat.view(like.shape))
    return out
