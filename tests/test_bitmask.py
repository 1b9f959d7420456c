"""Bit-packed masks (the kernels' mask format) round-trip in every layout."""

from __future__ import annotations

import pytest
import torch

import ong_kernels
from ong_kernels._bitmask import pack_mask, unpack_mask


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (13, 5), (7, 3, 3, 3), (64, 64, 3, 3)])
def test_roundtrip_contiguous(shape):
    mask = torch.rand(shape) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(bits, mask), mask)


def test_little_endian_bit_order_matches_avx512_lanes():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[0] = mask[9] = mask[15] = True
    assert pack_mask(mask).tolist() == [0b00000001, 0b10000010]


def test_pad_bits_are_zero():
    assert pack_mask(torch.ones(11, dtype=torch.bool)).tolist() == [255, 0b00000111]


def test_channels_last_packs_in_memory_order():
    mask = (torch.rand(6, 5, 3, 3) > 0.5).to(memory_format=torch.channels_last)
    bits = pack_mask(mask)
    in_memory = mask.permute(0, 2, 3, 1).reshape(-1)  # NHWC order
    assert torch.equal(pack_mask(in_memory), bits)
    out = unpack_mask(bits, mask)
    assert torch.equal(out, mask) and out.stride() == mask.stride()


def test_non_dense_parameter_is_masked_exactly():
    # a transposed view is neither contiguous nor channels_last: logical order, reference path
    p = torch.nn.Parameter(torch.randn(5, 4).t())
    assert not p.is_contiguous()
    mask = torch.rand(4, 5) > 0.5
    opt = ong_kernels.FusedMaskedSGD([p], lr=0.1, momentum=0.9, masks={p: mask})
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for _ in range(4):
        g = torch.randn(4, 5)
        p.grad = torch.where(mask, g, float("nan"))
        q.grad = torch.where(mask, g, 0.0)
        opt.step()
        ref.step()
    assert torch.allclose(p.detach(), q.detach(), atol=1e-6)
    assert bool((p.detach()[~mask] == 0).all())
