"""Parametrisation of the conformance suite: every registered kernel of an op on every device
it serves here, found in the backend registry (nothing is listed by hand)."""

from __future__ import annotations

import pytest
import torch
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


def ragged_batch(shapes, device, dtype=torch.float32, zero_at=None, seed=0):
    """V_i (non-negative, in `dtype`) with random starts (W0, H0) in float32, rank clipped."""
    gen = torch.Generator().manual_seed(seed)
    vs, ws, hs = [], [], []
    for i, (m, n, r) in enumerate(shapes):
        r = min(r, m, n)
        v = torch.rand(m, n, generator=gen)
        if i == zero_at:
            v.zero_()
        vs.append(v.to(device=device, dtype=dtype))
        ws.append((torch.rand(m, r, generator=gen) + 0.05).to(device))
        hs.append((torch.rand(r, n, generator=gen) + 0.05).to(device))
    return vs, ws, hs
