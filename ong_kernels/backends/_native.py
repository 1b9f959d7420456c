"""Loads the compiled extension lazily; importing ong_kernels never fails without it.

A missing or broken `_C` only raises when a compiled kernel is actually called, with an error
that says how to build it (the bitsandbytes pattern).
"""

from __future__ import annotations

import torch

try:
    from ong_kernels import _C
except ImportError as exc:  # not built, or built for another Python
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

BUILD_HINT = (
    "build it with `pip install -e .` in the ong_kernels checkout (or `make build`); "
    "set ONG_WITH_CUDA=0 to build the CPU kernels only"
)

# torch dtype -> the native DType enum (csrc/include/ong_dtype.h, exported by the extension).
NATIVE_DTYPES = (
    {}
    if _C is None
    else {getattr(torch, name): code for name, code in _C.DType.__members__.items()}
)


def has_cpu() -> bool:
    """True when the compiled CPU kernels are importable."""
    return _C is not None


def has_cuda_build() -> bool:
    """True when the extension was compiled with the CUDA kernels (a GPU may still be absent)."""
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def has_cuda() -> bool:
    """True when the CUDA kernels are built and torch sees a GPU."""
    return has_cuda_build() and torch.cuda.is_available()


CUDA_HINT = (
    "it needs a CUDA GPU and an extension built with nvcc (`pip install -e .` on a machine "
    "with the CUDA toolkit, ONG_WITH_CUDA unset or 1)"
)


def lib():
    """The compiled module, or a RuntimeError that says why it is missing and how to build it."""
    if _C is None:
        raise RuntimeError(f"ong_kernels._C is not available ({_IMPORT_ERROR}); {BUILD_HINT}")
    return _C


def cuda_lib():
    """The compiled module if it has CUDA kernels, else a RuntimeError saying how to get them."""
    mod = lib()
    if not getattr(mod, "with_cuda", False):
        raise RuntimeError(
            "ong_kernels._C was built without CUDA kernels; rebuild on a machine with nvcc "
            "(`pip install -e .`, with ONG_WITH_CUDA unset or 1)"
        )
    return mod
