"""What every Triton kernel module shares: whether Triton can run here, and on which devices."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

HINT = (
    "it needs the triton package (`pip install ong_kernels[triton]`) and a CUDA GPU, or "
    "TRITON_INTERPRET=1 set before importing ong_kernels to run the kernels on CPU tensors "
    "in Triton's interpreter (slow: for tests)"
)


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def devices() -> tuple[str, ...]:
    """Device types the Triton kernels take tensors of, in this process."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreting() or torch.cuda.is_available()


def on_device(device) -> contextlib.AbstractContextManager:
    """The tensors' CUDA device made current around Triton launches (Triton launches on
    torch.cuda.current_device() and its current stream, whatever device the pointers are
    on); nothing for CPU tensors (the interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
