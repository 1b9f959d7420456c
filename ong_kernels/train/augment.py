"""Batched, seeded data augmentation on the data's device.

The standard CIFAR recipe (random crop after zero padding, random horizontal flip, then
per-channel normalisation) done for a whole batch with a handful of tensor ops instead of
per image in DataLoader workers.

Random draws and their application are split (:func:`draw_params` / :func:`apply`) so that
under DistributedDataParallel every rank draws the parameters of the *global* batch from
one shared generator and applies its own slice: the generator then advances identically on
every rank, a checkpoint of rank 0's generator is valid for all ranks, and an N-rank run
sees the same augmented global batch as a single-process run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentParams", "apply", "draw_params", "normalize"]


@dataclass(frozen=True)
class AugmentParams:
    """Per-example crop offsets into the padded image and flip flags."""

    top: torch.Tensor  # (B,) int64 in [0, 2 * padding]
    left: torch.Tensor  # (B,) int64 in [0, 2 * padding]
    flip: torch.Tensor  # (B,) bool

    def __getitem__(self, index: slice) -> AugmentParams:
        return AugmentParams(self.top[index], self.left[index], self.flip[index])


def draw_params(
    n: int, padding: int, flip: bool, generator: torch.Generator, device: torch.device
) -> AugmentParams:
    """Draw crop offsets and flips for ``n`` examples from ``generator`` (on ``device``)."""
    if padding < 0:
        raise ValueError(f"padding: expected >= 0, got {padding}")
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    if flip:
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=device)
    return AugmentParams(top, left, flips)


def apply(images: torch.Tensor, params: AugmentParams, padding: int) -> torch.Tensor:
    """Random-crop (zero padding) and flip a uint8 (B, C, H, W) batch; returns uint8.

    The result has channels-last strides (the crop is a gather over (B, H, W)); call
    ``.contiguous()`` if a contiguous NCHW tensor is needed.
    """
    b, _, h, w = images.shape
    if params.top.shape != (b,):
        raise ValueError(f"params: drawn for {params.top.shape[0]} examples, batch has {b}")
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    # A horizontal flip is a reversed column index, so crop and flip are one gather.
    cols = torch.where(params.flip[:, None], w - 1 - cols, cols)
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
        rows = params.top[:, None] + rows
        cols = params.left[:, None] + cols
    else:
        rows = rows.expand(b, h)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around the channel slice -> result is (B, H, W, C).
    out = images[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ((x / 255 - mean) / std), keeping the memory format.

    ``mean``/``std`` are per-channel; pass them as float32 tensors already on the images'
    device in a loop (the trainer does) to save a host-to-device copy per batch.
    """
    shape = (1, images.shape[1], 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return (images.float().div_(255) - m).div_(s)
