"""Saving and loading masks as bit-packed safetensors files.

Each mask is stored as a flat uint8 tensor of ceil(numel / 8) bytes under its parameter
name, bits packed in numpy.packbits order (bitorder="big": the first entry is the most
significant bit of the first byte, trailing pad bits 0), so ``np.unpackbits`` reads it too.
The shapes travel in the safetensors metadata. A ResNet-18 mask set (11.2M weights) takes
1.4 MB instead of 11.2 MB as bool.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["load_masks", "save_masks"]

FORMAT = "ong_kernels.masks"
VERSION = "1"
_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat uint8 tensor of ceil(numel / 8) bytes, numpy.packbits order."""
    flat = mask.detach().reshape(-1).to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of `shape`."""
    bits = (packed.reshape(-1, 1) & _WEIGHTS) != 0
    numel = 1
    for d in shape:
        numel *= d
    return bits.reshape(-1)[:numel].reshape(shape).clone()


def _as_masks(masks) -> Mapping[str, torch.Tensor]:
    from ong_kernels.pruning.result import PruneResult

    if isinstance(masks, PruneResult):
        return masks.masks
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of name -> bool tensor, got {type(masks).__name__}")
    return masks


def save_masks(path: str | os.PathLike, masks) -> None:
    """Write `masks` (name -> bool tensor, or a PruneResult) to a bit-packed safetensors file."""
    masks = _as_masks(masks)
    tensors, shapes = {}, {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"mask names must be strings, got {name!r}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask {name!r} must be a bool tensor, got {kind}")
        tensors[name] = pack_bits(mask)
        shapes[name] = list(mask.shape)
    metadata = {"format": FORMAT, "version": VERSION, "shapes": json.dumps(shapes)}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_masks(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks`: name -> bool tensor on `device`."""
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{os.fspath(path)!r} is not an ong_kernels masks file (no format tag)"
            )
        if metadata.get("version") != VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} has masks format version {metadata.get('version')!r}; "
                f"this version reads {VERSION!r}"
            )
        shapes = json.loads(metadata["shapes"])  # in the order the masks were given
        if set(shapes) != set(f.keys()):
            raise ValueError(f"{os.fspath(path)!r}: the mask names and the stored shapes differ")
        out = {}
        for name in shapes:
            shape = tuple(shapes[name])
            packed = f.get_tensor(name)
            numel = 1
            for d in shape:
                numel *= d
            if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
                raise ValueError(
                    f"{os.fspath(path)!r}: mask {name!r} has {packed.numel()} bytes, "
                    f"expected {(numel + 7) // 8} for shape {shape}"
                )
            out[name] = unpack_bits(packed, shape).to(device)
    return out
