"""Every registered masked_sgd_step kernel against the reference kernel, through the op."""

from __future__ import annotations

import pytest
import torch
from conftest import STEP_TOLERANCES, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.cases import interpreted, kernel_cases
from ong_kernels import _ops
from ong_kernels._bitmask import pack_mask

CASES = kernel_cases("masked_sgd_step")


def poisoned_inputs(sizes, device, dtype, momentum, density, gen):
    params = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    bufs = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes] if momentum else []
    masks = [
        (torch.rand(n, generator=gen) < density).to(device) if i % 3 != 2 else None
        for i, n in enumerate(sizes)
    ]
    # garbage in grads at pruned positions, and in pruned weights/buffers, which the step must
    # overwrite with exact zeros
    for i, m in enumerate(masks):
        if m is not None:
            grads[i][~m] = float("nan")
            params[i][~m] = 1e30 if dtype != torch.float16 else 6e4
            if bufs:
                bufs[i][~m] = float("inf")
    return params, grads, bufs, masks


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.25]),
    weight_decay=st.sampled_from([0.0, 5e-4, 0.1]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    first_step=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**20),
)
def test_matches_reference(
    backend, device, dtype, sizes, momentum, dampening, weight_decay, nesterov, maximize,
    first_step, density, seed,
):  # fmt: skip
    if interpreted(backend, device):
        sizes = [min(s, 3000) for s in sizes]
    if nesterov and (momentum == 0 or dampening != 0):
        nesterov = False
    gen = torch.Generator().manual_seed(seed)
    params, grads, bufs, masks = poisoned_inputs(sizes, device, dtype, momentum, density, gen)
    expected = [t.clone() for t in params], [t.clone() for t in bufs]
    hyper = (0.05, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    bits = [None if m is None else pack_mask(m) for m in masks]
    _ops.masked_sgd_step_(expected[0], grads, expected[1], bits, *hyper, "reference")
    _ops.masked_sgd_step_(params, grads, bufs, bits, *hyper, backend)
    atol, rtol = STEP_TOLERANCES[dtype]
    for i in range(len(sizes)):
        assert_close(params[i], expected[0][i], atol=atol, rtol=rtol, what=f"{backend} param {i}")
        if bufs:
            assert_close(bufs[i], expected[1][i], atol=atol, rtol=rtol, what=f"{backend} buf {i}")
        if masks[i] is not None:
            assert bool((params[i][~masks[i]] == 0).all())
            if bufs:
                assert bool((bufs[i][~masks[i]] == 0).all())


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_op_passes_opcheck(backend, device):
    params = [torch.randn(5, 3, device=device), torch.randn(4, device=device)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    masks = [pack_mask(torch.rand(5, 3, device=device) > 0.5), None]
    torch.library.opcheck(
        _ops.masked_sgd_step_,
        (params, grads, bufs, masks, 0.1, 0.9, 0.0, 1e-4, True, False, False, backend),
    )
