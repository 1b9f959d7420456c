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
import tempfile
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ong_kernels._bitmask import pack_mask, unpack_mask

__all__ = ["load_masks", "save_masks", "write_mask_file"]

FORMAT = "ong_kernels.masks"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; a mask file gets the usual 0666 & ~umask (read once, at import:
# os.umask can only be read by setting it).
_FILE_MODE = 0o666 & ~_read_umask()
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
    write_mask_file(path, tensors, shapes)


def write_mask_file(path, packed: Mapping[str, torch.Tensor], shapes: Mapping[str, list]) -> None:
    """Write packed masks (name -> uint8 bytes of ``pack_mask``) and their shapes as a masks
    file: into a temporary file in the target folder, renamed over ``path`` once complete, so
    a failure never leaves a half-written file nor touches an existing one. A symlink is
    written through: its target gets the masks (the temporary file lives in the target's
    folder), the link stays. OSError names ``path`` when the folder is missing or not
    writable, ``path`` is a folder, or the file cannot be written (disk full, file-size
    limit)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; give the masks file's name")
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "bit_order": "little",
        "shapes": json.dumps({name: list(shape) for name, shape in shapes.items()}),
    }
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                   dir=folder)  # fmt: skip
    except OSError as err:
        raise OSError(
            err.errno, f"{path!r}: cannot write into {folder!r} ({err.strerror})"
        ) from err
    try:
        os.close(fd)
        try:
            save_file(dict(packed), tmp, metadata=metadata)
        except SafetensorError as err:  # its I/O errors (EFBIG, ENOSPC) come as this type
            raise OSError(f"{path!r}: writing the masks failed ({err})") from err
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _damaged(path: str, what: str) -> ValueError:
    return ValueError(f"{path!r}: damaged masks file: {what}")


def _read_shapes(path: str, metadata: Mapping[str, str], names) -> dict[str, tuple[int, ...]]:
    """The metadata's shapes, every one checked: a dict of name -> list of ints >= 0 that
    names exactly the stored tensors."""
    if "shapes" not in metadata:
        raise _damaged(path, "no 'shapes' in its metadata")
    try:
        shapes = json.loads(metadata["shapes"])
    except json.JSONDecodeError as err:
        raise _damaged(path, f"its 'shapes' metadata is not valid JSON ({err})") from None
    if not isinstance(shapes, dict):
        raise _damaged(path, f"its 'shapes' metadata is a {type(shapes).__name__}, not a dict")
    for name, shape in shapes.items():
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _damaged(path, f"mask {name!r} has shape {shape!r}, not a list of ints >= 0")
    if set(shapes) != set(names):
        missing, extra = sorted(set(names) - set(shapes)), sorted(set(shapes) - set(names))
        raise _damaged(
            path,
            "the mask names and the stored shapes differ "
            f"(no shape for {missing or 'none'}; no mask for {extra or 'none'})",
        )
    return {name: tuple(shape) for name, shape in shapes.items()}


def load_masks(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks`: name -> bool tensor on `device`.

    A path that is missing or a folder raises OSError, a file that is not a masks file or is
    damaged a ValueError; each names the file and what is wrong.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder, not a masks file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r}: no such masks file")
    try:
        f = safe_open(path, framework="pt")
    except Exception as err:  # safetensors' own error type for a bad header
        raise ValueError(f"{path!r} is not a safetensors file ({err})") from None
    with f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not an ong_kernels masks file (no format tag)")
        version = metadata.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{path!r} has masks format version {version!r}; this version of "
                f"ong_kernels reads {', '.join(READABLE_VERSIONS)}"
            )
        shapes = _read_shapes(path, metadata, f.keys())  # in the order the masks were given
        out = {}
        for name, shape in shapes.items():
            packed = f.get_tensor(name)
            numel = _numel(shape)
            if packed.dtype != torch.uint8 or packed.dim() != 1:
                raise _damaged(
                    path,
                    f"mask {name!r} is stored as {packed.dtype} of shape {list(packed.shape)}, "
                    "expected flat uint8 bytes",
                )
            if packed.numel() != (numel + 7) // 8:
                raise _damaged(
                    path,
                    f"mask {name!r} has {packed.numel()} bytes, expected {(numel + 7) // 8} "
                    f"for shape {shape}",
                )
            if version == "1":
                mask = _unpack_v1(packed, shape)
            else:
                mask = unpack_mask(packed, torch.empty(shape, dtype=torch.bool))
            out[name] = mask.to(device)
    return out
