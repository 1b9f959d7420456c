"""Triton kernels: one module per op, each registering itself (imported by `load_all` below).

Triton serves CUDA tensors, and CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter:
how the kernels are tested on machines without a GPU). Nothing here imports triton: the
kernel modules import it on first use, so ong_kernels imports without it.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
