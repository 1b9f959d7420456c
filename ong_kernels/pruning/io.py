"""Saving and loading masks as bit-packed safetensors files.

Each mask is stored as a flat uint8 tensor of ceil(numel / 8) bytes under its parameter
name, packed by the optimizer's codec (``ong_kernels._bitmask.pack_mask``: little-endian,
bit j of byte k is element 8k + j of the mask in row-major order, trailing pad bits 0), so
``np.unpackbits(bytes, bitorder="little")`` reads it too. The shapes, the format name and
the version travel in the safetensors metadata. A ResNet-18 mask set (11.2M weights) takes
1.4 MB instead of 11.2 MB as bool.

Versions: "2" (this layout, ``bit_order: little``); "1" (written before 0.1.0's codec
merge: numpy.packbits' default big-endian order) still loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ong_kernels._bitmask import pack_mask, unpack_mask

__all__ = ["load_masks", "save_masks"]

FORMAT = "ong_kernels.masks"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
_V1_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _unpack_v1(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Version 1 files: numpy.packbits order (first element = most significant bit)."""
    bits = (packed.reshape(-1, 1) & _V1_WEIGHTS) != 0
    return bits.reshape(-1)[: _numel(shape)].reshape(shape).clone()


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


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
        # Row-major (contiguous) order: the file does not depend on the mask's strides.
        tensors[name] = pack_mask(mask.detach().to("cpu").contiguous())
        shapes[name] = list(mask.shape)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "bit_order": "little",
        "shapes": json.dumps(shapes),
    }
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
        version = metadata.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{os.fspath(path)!r} has masks format version {version!r}; this version of "
                f"ong_kernels reads {', '.join(READABLE_VERSIONS)}"
            )
        shapes = json.loads(metadata["shapes"])  # in the order the masks were given
        if set(shapes) != set(f.keys()):
            raise ValueError(f"{os.fspath(path)!r}: the mask names and the stored shapes differ")
        out = {}
        for name in shapes:
            shape = tuple(shapes[name])
            packed = f.get_tensor(name)
            numel = _numel(shape)
            if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
                raise ValueError(
                    f"{os.fspath(path)!r}: mask {name!r} has {packed.numel()} bytes, "
                    f"expected {(numel + 7) // 8} for shape {shape}"
                )
            if version == "1":
                mask = _unpack_v1(packed, shape)
            else:
                mask = unpack_mask(packed, torch.empty(shape, dtype=torch.bool))
            out[name] = mask.to(device)
    return out
