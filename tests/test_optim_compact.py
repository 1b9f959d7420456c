"""FusedMaskedSGD(compact_state=True): bit for bit dense mode, torch.optim.SGD's state_dict
format both ways, and the memory it keeps."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import DEVICES, assert_close

import ong_kernels

SHAPES = [(16, 3, 3, 3), (33, 70), (1000,), (5,), (1,)]
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)


def make(device, dtype=torch.float32, channels_last=False, density=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, masks = [], {}
    for i, shape in enumerate(SHAPES):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype))
        if channels_last and p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        params.append(p)
        if i < len(SHAPES) - 1:  # the last one stays dense
            masks[p] = (torch.rand(shape, generator=gen) < density).to(device)
    return params, masks


def twins(device, dtype=torch.float32, **kw):
    a, ma = make(device, dtype, **kw)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    mb = {q: ma[p] for p, q in zip(a, b, strict=True) if p in ma}
    return a, ma, b, mb


def feed(params_a, params_b, gen, masks_a):
    for p, q in zip(params_a, params_b, strict=True):
        g = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        if p in masks_a:
            g = torch.where(masks_a[p], g, float("nan"))  # NaN at pruned positions
        p.grad, q.grad = g, g.clone()


def step_equal(opt_a, opt_b, params_a, params_b, gen, masks_a, steps):
    """`steps` steps of both optimizers on the same gradients, bit-equal after each."""
    for step in range(steps):
        feed(params_a, params_b, gen, masks_a)
        opt_a.step()
        opt_b.step()
        for i, (p, q) in enumerate(zip(params_a, params_b, strict=True)):
            assert torch.equal(p.detach(), q.detach()), f"step {step} param {i}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hyper", [HYPER, dict(lr=0.05), dict(lr=0.1, momentum=0.5, dampening=0.1)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compact_trajectory_is_dense_mode_bit_for_bit(device, dtype, channels_last, hyper, backend):
    """auto: the compiled CPU kernel (its compact TablePlan); reference: gather/scatter."""
    a, ma, b, mb = twins(device, dtype, channels_last=channels_last)
    dense = ong_kernels.FusedMaskedSGD(a, masks=ma, backend=backend, **hyper)
    comp = ong_kernels.FusedMaskedSGD(b, masks=mb, compact_state=True, backend=backend, **hyper)
    step_equal(dense, comp, a, b, torch.Generator().manual_seed(1), ma, 6)
    compiled = backend == "auto" and device == "cpu" and ong_kernels.backends_available()["cpu"]
    if compiled:
        from ong_kernels.backends import cpu as cpu_backend

        ptr = b[0].data_ptr()  # the compact call's first parameter: its plan ran natively
        plan = next(
            q for q in cpu_backend.masked_sgd_step_.compact.plans.plans()
            if q.params[0].data_ptr() == ptr
        )  # fmt: skip
        assert plan.tables and not plan.parts.fallback
    for p, q in zip(a, b, strict=True):
        assert not bool(torch.isnan(q).any())
        if p in ma:
            assert "momentum_buffer" not in comp.state[q] and "mask" not in comp.state[q]


def test_state_dict_round_trips_with_torch_sgd():
    a, ma, b, mb = twins("cpu")
    comp = ong_kernels.FusedMaskedSGD(b, masks=mb, compact_state=True, **HYPER)
    dense = ong_kernels.FusedMaskedSGD(a, masks=ma, **HYPER)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        feed(a, b, gen, ma)
        dense.step()
        comp.step()
    ours = comp.state_dict()
    ref = dense.state_dict()
    for i in ref["state"]:
        for key in ("momentum_buffer", "mask"):
            if key in ref["state"][i]:
                assert torch.equal(ours["state"][i][key], ref["state"][i][key]), (i, key)
    # ours -> torch.optim.SGD (through bytes, weights_only)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    sgd = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in b], **HYPER)
    sgd.load_state_dict(torch.load(buffer, weights_only=True))
    # torch.optim.SGD -> a fresh compact optimizer: dense momentum compacted, masks kept
    fresh = ong_kernels.FusedMaskedSGD(b, masks=mb, compact_state=True, **HYPER)
    plain = copy.deepcopy(sgd.state_dict())
    for entry in plain["state"].values():
        entry.pop("mask", None)
    fresh.load_state_dict(plain)
    for p in b:
        if p in mb:
            assert torch.equal(fresh.masks[p], mb[p])
            assert torch.equal(fresh._dense_momentum(p), comp._dense_momentum(p))
    feed(b, a, gen, mb)
    fresh.step()
    comp_again = [p.detach().clone() for p in b]
    assert all(bool(torch.isfinite(p).all()) for p in comp_again)


def test_compact_state_memory_at_90_percent():
    params, masks = make("cpu", density=0.1)
    opt = ong_kernels.FusedMaskedSGD(params, masks=masks, compact_state=True, **HYPER)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    masked = [p for p in params if p in masks]
    kept = sum(
        t.numel() * t.element_size()
        for p in masked
        for t in opt.state[p].values()
        if isinstance(t, torch.Tensor)
    )
    kept += sum(opt._masks[p].offsets.numel() * 8 + opt._masks[p].bits.numel() for p in masked)
    dense = sum(p.numel() * (4 + 1) for p in masked)  # float32 momentum + bool mask
    assert kept <= 0.15 * dense, (kept, dense)


def test_compact_follows_a_layout_change():
    a, ma, b, mb = twins("cpu")
    dense = ong_kernels.FusedMaskedSGD(a, masks=ma, **HYPER)
    comp = ong_kernels.FusedMaskedSGD(b, masks=mb, compact_state=True, **HYPER)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        if step == 2:
            for p in (a[0], b[0]):
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        feed(a, b, gen, ma)
        dense.step()
        comp.step()
        for p, q in zip(a, b, strict=True):
            assert_close(q.detach(), p.detach(), atol=1e-6, rtol=1e-5, what=f"step {step}")


@pytest.mark.parametrize("compact_state", [False, True])
def test_deepcopy_and_pickle_keep_the_mode_masks_and_momentum(compact_state):
    a, ma = make("cpu")
    opt = ong_kernels.FusedMaskedSGD(
        a, masks=ma, compact_state=compact_state, backend="cpu", **HYPER
    )
    gen = torch.Generator().manual_seed(4)
    feed(a, [torch.nn.Parameter(p.detach().clone()) for p in a], gen, ma)
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.compact_state is compact_state and twin.backend == "cpu"
    twin_params = twin._params()
    for p, q in zip(a, twin_params, strict=True):
        if p in ma:
            assert torch.equal(twin.masks[q], ma[p])
            assert torch.equal(twin._dense_momentum(q), opt._dense_momentum(p))
    for p, q in zip(a, twin_params, strict=True):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(a, twin_params, strict=True):
        assert torch.equal(p.detach(), q.detach())


# ----------------------------------------------------------------------------- issue 17


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hyper", [dict(lr=0.1), HYPER, dict(lr=0.1, momentum=0.9)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compact_half_dtypes_are_dense_mode_bit_for_bit(dtype, hyper, backend):
    """Issue 17: the compact path gave 1-3 of 2,000 entries another rounding (torch's half
    add rounds alpha * b first in its scalar tail, so a gathered tensor rounded otherwise)."""
    gen = torch.Generator().manual_seed(17)
    for trial in range(3):
        a = torch.nn.Parameter(torch.randn(2000, generator=gen).to(dtype))
        b = torch.nn.Parameter(a.detach().clone())
        mask = torch.rand(2000, generator=gen) < 0.5
        dense = ong_kernels.FusedMaskedSGD([a], masks={a: mask}, backend=backend, **hyper)
        comp = ong_kernels.FusedMaskedSGD(
            [b], masks={b: mask}, compact_state=True, backend=backend, **hyper
        )
        for step in range(5):
            g = torch.randn(2000, generator=gen).to(dtype)
            a.grad, b.grad = g, g.clone()
            dense.step()
            comp.step()
            diff = int((a != b).sum())
            assert diff == 0, f"trial {trial} step {step}: {diff} entries differ"


def _trained(compact_state, seed=5):
    a, ma = make("cpu", seed=seed)
    opt = ong_kernels.FusedMaskedSGD(a, masks=ma, compact_state=compact_state, **HYPER)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        feed(a, [torch.nn.Parameter(p.detach().clone()) for p in a], gen, ma)
        opt.step()
    return a, ma, opt


@pytest.mark.parametrize("source", ["compact", "dense", "torch"])
def test_compact_resumes_from_a_state_dict(source):
    """Issue 17: load_state_dict then step raised a raw KeyError (a whole tensor as its
    message) for a compact optimizer's own state_dict and a dense one's. The resumed
    optimizer continues exactly as the one that saved."""
    a, ma, saver = _trained(compact_state=source == "compact")
    if source == "torch":
        sgd = torch.optim.SGD(a, **HYPER)
        sgd.load_state_dict(saver.state_dict())  # our state_dict is torch SGD's format
        state = sgd.state_dict()
        for entry in state["state"].values():
            entry.pop("mask", None)
    else:
        state = saver.state_dict()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    mb = {q: ma[p] for p, q in zip(a, b, strict=True) if p in ma}
    resumed = ong_kernels.FusedMaskedSGD(b, masks=mb, compact_state=True, **HYPER)
    resumed.load_state_dict(copy.deepcopy(state))
    step_equal(saver, resumed, a, b, torch.Generator().manual_seed(6), ma, 3)
    for p in b:
        if p in mb:
            assert torch.equal(resumed.masks[p], mb[p])
            assert "momentum_compact" in resumed.state[p]
