"""Memory layouts the elementwise kernels can walk, and the flat views they walk.

A leaf module (it imports torch only): the masks' bit order (_bitmask), the optimizer and
every backend's host side read layouts through it, so none of them imports another for a
layout predicate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Layout(NamedTuple):
    """What a mask packed in memory order depends on: device, dtype, shape, strides."""

    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def empty(self, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of this layout with element type `dtype`."""
        return torch.empty_strided(self.shape, self.strides, dtype=dtype, device=self.device)


def layout_of(t: torch.Tensor) -> Layout:
    return Layout(t.device, t.dtype, tuple(t.shape), t.stride())


def dense_layout(t: torch.Tensor) -> bool:
    """True when elementwise kernels may walk `t` in storage order (contiguous or channels_last)."""
    return t.is_contiguous() or (
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    )


def memory_order_view(t: torch.Tensor) -> torch.Tensor:
    """A flat view of `t` in memory order when it is dense (contiguous or channels_last);
    otherwise a flat copy in logical (row-major) order."""
    if dense_layout(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.reshape(-1)


def kept_view(t: torch.Tensor) -> torch.Tensor:
    """The flat view in memory order of a dense tensor (compact momentum is indexed by it);
    a ValueError for other layouts."""
    if not dense_layout(t):
        raise ValueError(
            "compact_state needs contiguous or channels_last parameters, got strides "
            f"{t.stride()} for shape {tuple(t.shape)}"
        )
    return t.as_strided((t.numel(),), (1,), t.storage_offset())
