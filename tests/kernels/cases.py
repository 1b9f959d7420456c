"""Parametrisation of the conformance suite: every registered kernel of an op on every device
it serves here, found in the backend registry (nothing is listed by hand)."""

from __future__ import annotations

import pytest
from conftest import DEVICES

from ong_kernels.backends import registry


def kernel_cases(op: str) -> list:
    """pytest params (backend, device) for every non-reference kernel of `op` x device it
    serves. A kernel that cannot run here is skipped with the reason, never dropped."""
    cases = []
    for kernel in registry.kernels(op):
        if kernel.backend == "reference":
            continue
        for device in DEVICES + (["cuda"] if "cuda" not in DEVICES else []):
            if not kernel.serves(device):
                continue
            marks = []
            if device not in DEVICES:
                marks.append(pytest.mark.skip(reason=f"no {device} device here"))
            elif not kernel.available():
                marks.append(
                    pytest.mark.skip(reason=f"{kernel.backend} unavailable: {kernel.hint}")
                )
            cases.append(
                pytest.param(kernel.backend, device, marks=marks, id=f"{kernel.backend}-{device}")
            )
    return cases


def interpreted(backend: str, device: str) -> bool:
    """Triton on CPU tensors runs in the interpreter: ~1000x slower, so smaller cases."""
    return backend == "triton" and device == "cpu"
