"""Atomic, code-free checkpoints and the other run-folder files.

A checkpoint is a ``torch.save`` of plain tensors, dicts, lists, strings and numbers only
(RNG states as uint8 tensors, masks as bool tensors keyed by parameter name), so it is
read with ``torch.load(weights_only=True)``: loading a checkpoint cannot run code.

Every file is written to a temporary file in the destination folder, flushed to disk, and
then moved over the old one with ``os.replace`` (atomic on POSIX), so a run killed at any
moment leaves either the previous complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import shlex
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "RunFolderError",
    "atomic_write",
    "check_writable_folder",
    "load_checkpoint",
    "read_json_object",
    "save_checkpoint",
    "write_csv",
    "write_json",
]

CHECKPOINT_NAME = "checkpoint.pt"
# 2: adds "checksum" (SHA-256 of every tensor's bytes); 1 (no checksum) still loads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_REQUIRED_KEYS = ("format_version", "epoch", "config", "model", "optimizer", "scheduler", "rng")


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; run artefacts get the usual 0666 & ~umask instead.
_FILE_MODE = 0o666 & ~_read_umask()


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or from an incompatible run."""


class RunFolderError(OSError):
    """A run-folder file could not be written (read-only or full file system, ...)."""


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, fsync it, then rename it over."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise RunFolderError(f"{path}: cannot write ({err.strerror or err})") from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        # Also on KeyboardInterrupt: never leave temp files behind.
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            # A full disk surfaces from torch.save as "unexpected pos N vs M".
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RunFolderError(
                f"{path}: cannot write ({first}); the file system is full or read-only? "
                "the run stays resumable from its last complete checkpoint"
            ) from err
        raise


def check_writable_folder(folder: str | os.PathLike) -> None:
    """RunFolderError unless ``folder`` exists as a folder, or can be created, and this
    process can create files in it (probed with a temporary file in the nearest existing
    folder, removed at once): checked before any work, so a run does not fail at its end."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"{folder}: cannot be created, {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=existing)
    except OSError as err:
        where = "" if existing == folder else f" (in {existing})"
        raise RunFolderError(f"{folder}: cannot write{where} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A run-folder JSON file that must hold an object (config.json, results.json);
    CheckpointError naming the file when it is unreadable, not JSON, or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(value, dict):
        found = "null" if value is None else type(value).__name__
        raise CheckpointError(f"{path}: expected a JSON object, found {found}")
    return value


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts with the same keys -> CSV with a header (rewritten whole, atomically)."""
    if not rows:
        raise ValueError("rows: nothing to write")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode()
    atomic_write(path, lambda f: f.write(data))


def _tensors(obj: Any, prefix: str = ""):
    """(path, tensor) for every tensor in nested dicts/lists, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def tensor_checksum(state: dict[str, Any]) -> str:
    """SHA-256 over every tensor's path, dtype, shape and bytes (the "checksum" key itself
    excluded). ~2 ms for ResNet-20's checkpoint: the zip container has no check of its own
    that torch.load applies, so a flipped byte in a weight would otherwise load silently."""
    digest = hashlib.sha256()
    body = {k: v for k, v in state.items() if k != "checksum"}
    for where, t in _tensors(body):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{where}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (see :func:`load_checkpoint` for the keys) with
    the checksum of its tensors."""
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"state: missing checkpoint key(s) {', '.join(missing)}")
    state = {**state, "format_version": FORMAT_VERSION, "checksum": tensor_checksum(state)}
    atomic_write(path, lambda f: torch.save(state, f))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.<random>.tmp`` files that :func:`atomic_write` leaves when the
    process is killed (SIGKILL) mid-write; returns what was removed."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def restart_advice(run_dir: str | os.PathLike, also: Sequence[Path] = ()) -> str:
    """How to train the run in `run_dir` again from its start, whatever the folder holds:
    delete `also` and its results.json (a finished run's, which would otherwise make the
    folder refuse a fresh run), then run without --resume; or use another folder."""
    doomed = [*also, *[p for p in [Path(run_dir) / "results.json"] if p.is_file()]]
    delete = f"rm {' '.join(shlex.quote(str(p)) for p in doomed)}, then " if doomed else ""
    return (
        f"to train the run again from its start: {delete}run the same command without "
        "--resume (ong-sweep: the same command); or train into another --run-dir "
        "(ong-sweep: --out-dir)"
    )


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a bad file raises CheckpointError.

    The error says which file, what is wrong, and what to do about it.
    """
    path = Path(path)
    advice = (
        "writes are atomic, so this file was damaged or replaced after it was written; "
        f"{restart_advice(path.parent, [path])}"
    )
    if not path.is_file():
        done = path.parent / "results.json"
        if done.is_file():
            raise CheckpointError(
                f"{path}: no checkpoint to resume from: the run finished ({done}) but its "
                f"checkpoint is gone, so it cannot be continued; {restart_advice(path.parent)}"
            )
        raise CheckpointError(
            f"{path}: no checkpoint to resume from (no epoch finished, or it was deleted): "
            "run the same command without --resume to train the run from its start"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:  # fmt: skip
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({first_line}); {advice}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}; {advice}")
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {', '.join(missing)}; {advice}")
    if state["format_version"] not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format version {state['format_version']!r}, this version of ong_kernels "
            f"reads {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if state["format_version"] >= 2 and state.get("checksum") != tensor_checksum(state):
        raise CheckpointError(f"{path}: tensor data does not match its checksum; {advice}")
    return state
