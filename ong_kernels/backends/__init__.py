"""Kernel backends: `registry` (who implements which op where, and the choice), `reference`
(pure PyTorch: the oracle and the fallback), and one module or package per compiled backend
(`cpu`, `cuda`, `triton`), each registering its kernels when imported.

`load_all()` imports every backend module of this package (any module not starting with `_`),
so a new kernel file is found without being listed anywhere. A backend module must import
without its toolchain: it registers with an `available()` check and imports its compiled
library or triton only when a kernel runs.
"""

from __future__ import annotations

import importlib
import pkgutil

_LOADED = False


def load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True
