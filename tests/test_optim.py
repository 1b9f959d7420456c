"""FusedMaskedSGD against torch.optim.SGD on masked gradients; kernels against the reference."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from conftest import STEP_TOLERANCES, assert_close, compiled_cpu, run_python

import ong_kernels
from ong_kernels._bitmask import pack_mask

# Odd shapes: a conv weight, a 1x1 conv, a linear, a bias-like vector, a single element.
SHAPES = [(7, 3, 3, 3), (5, 7, 1, 1), (11, 13), (9,), (1,)]

HYPER_GRID = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product(
        [0.0, 0.9], [0.0, 0.3], [0.0, 1e-2], [False, True], [False, True]
    )
    if not (n and (m == 0 or d != 0))
]


def assert_masked_end_state(opt):
    """Masks survived the mid-run state_dict round trip; pruned weights are exactly 0."""
    assert len(opt.masks) == len(SHAPES) - 1
    for p, mask in opt.masks.items():
        assert bool((p.detach()[~mask] == 0).all())
        assert bool(torch.isfinite(p.detach()).all())


def make_params(device, dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]


def make_masks(params, density=0.3):
    masks = {}
    for i, p in enumerate(params):
        if i == len(params) - 1:
            continue  # the last parameter stays dense
        masks[p] = torch.rand(p.shape, device=p.device) < density
    return masks


def set_grads(params, masks, step, nan_at_pruned=True):
    """Fresh gradients; NaN/Inf planted at pruned positions. Some params skip some steps."""
    grads = []
    for i, p in enumerate(params):
        if (i + step) % 4 == 3:
            p.grad = None  # a parameter with no gradient this step
            grads.append(None)
            continue
        g = torch.randn_like(p)
        if nan_at_pruned and p in masks:
            poison = torch.where(torch.rand_like(g) < 0.5, float("nan"), float("inf")).to(g.dtype)
            g = torch.where(masks[p], g, poison)
        p.grad = g
        grads.append(g)
    return grads


def run_against_sgd(device, dtype, hyper, steps=22, groups=True, scheduler=True, roundtrip_at=11):
    params = make_params(device, dtype)
    masks = make_masks(params)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_masks = {rp: masks[p] for p, rp in zip(params, ref_params, strict=True) if p in masks}
    with torch.no_grad():
        for p, m in ref_masks.items():
            p.mul_(m)

    def param_groups(ps):
        if not groups:
            return ps
        # the second group has its own lr and weight decay
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.05, "weight_decay": 0.0}]

    ours = ong_kernels.FusedMaskedSGD(param_groups(params), lr=0.1, masks=masks, **hyper)
    ref = torch.optim.SGD(param_groups(ref_params), lr=0.1, foreach=False, **hyper)
    sched = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5) if scheduler else None
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=5, gamma=0.5) if scheduler else None
    atol, rtol = STEP_TOLERANCES[dtype]
    for step in range(steps):
        grads = set_grads(params, masks, step)
        for rp, g, p in zip(ref_params, grads, params, strict=True):
            rp.grad = (
                None if g is None else (torch.where(masks[p], g, 0.0) if p in masks else g.clone())
            )
        ours.step()
        ref.step()
        if sched:
            sched.step()
            ref_sched.step()
        if step == roundtrip_at:
            # state_dict round trip through bytes into a fresh optimizer, mid-run
            buffer = io.BytesIO()
            torch.save(ours.state_dict(), buffer)
            buffer.seek(0)
            fresh = ong_kernels.FusedMaskedSGD(param_groups(params), lr=0.1, **hyper)
            fresh.load_state_dict(torch.load(buffer, weights_only=True))
            ours = fresh
            if sched:
                sched_state = sched.state_dict()
                sched = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5)
                sched.load_state_dict(sched_state)
        for i, (p, rp) in enumerate(zip(params, ref_params, strict=True)):
            assert_close(
                p.detach(),
                rp.detach(),
                atol=atol * (step + 1),
                rtol=rtol,
                what=f"step {step} param {i}",
            )
            if p in masks:
                pruned = ~masks[p]
                assert bool((p.detach()[pruned] == 0).all()), f"step {step}: pruned weight moved"
                buf = ours.state[p].get("momentum_buffer")
                if buf is not None:
                    assert bool((buf[pruned] == 0).all()), f"step {step}: pruned momentum moved"
    return ours


@pytest.mark.parametrize(
    "hyper", HYPER_GRID, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items())
)
def test_matches_torch_sgd_on_masked_grads(device, hyper):
    # run_against_sgd compares every step with torch.optim.SGD; here the end state is checked.
    opt = run_against_sgd(device, torch.float32, hyper)
    assert_masked_end_state(opt)


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float16, torch.bfloat16],
)
def test_other_dtypes(device, dtype):
    hyper = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    # half types on the CPU take the reference path: still exact masking, fewer steps
    steps = 6 if dtype in (torch.float16, torch.bfloat16) and device == "cpu" else 22
    opt = run_against_sgd(device, dtype, hyper, steps=steps, roundtrip_at=min(11, steps - 2))
    assert_masked_end_state(opt)
    assert all(p.dtype == dtype for p in opt.masks)


def test_masked_sgd_op_passes_opcheck(device):
    from ong_kernels import _ops

    params = [torch.randn(5, 3, device=device), torch.randn(4, device=device)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    masks = [pack_mask(torch.rand(5, 3, device=device) > 0.5), None]
    torch.library.opcheck(
        _ops.masked_sgd_step_, (params, grads, bufs, masks, 0.1, 0.9, 0.0, 1e-4, True, False, False)
    )


def test_one_native_call_per_step(monkeypatch):
    """The CPU kernel launches once per dtype and step."""
    if not compiled_cpu():
        pytest.skip("compiled CPU kernels not built")
    from ong_kernels.backends import _native

    calls = []
    real = _native._C.masked_sgd_step_cpu

    class Spy:
        def __getattr__(self, name):
            return getattr(_native._C, name)

        def masked_sgd_step_cpu(self, *args):
            calls.append(args[1])  # n_tensors
            return real(*args)

    monkeypatch.setattr(_native, "lib", lambda: Spy())
    params = make_params("cpu", shapes=[(64, 3, 3, 3), (64, 64, 3, 3), (10, 64), (10,)] * 5)
    opt = ong_kernels.FusedMaskedSGD(params, lr=0.1, momentum=0.9, masks=make_masks(params))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert calls == [20, 20, 20]


def test_channels_last_and_noncontiguous_grads_stay_exact():
    """A channels_last weight with contiguous gradients, against torch.optim.SGD (the oracle)
    on the masked gradient."""
    p = torch.nn.Parameter(torch.randn(6, 5, 3, 3).to(memory_format=torch.channels_last))
    mask = torch.rand(6, 5, 3, 3) > 0.5
    q = torch.nn.Parameter((p.detach() * mask).contiguous())
    opt = ong_kernels.FusedMaskedSGD([p], lr=0.1, momentum=0.9, masks={p: mask})
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(5):
        g = torch.randn(6, 5, 3, 3)
        p.grad = g.contiguous()  # strides differ from the channels_last parameter
        q.grad = g * mask
        opt.step()
        ref.step()
    assert p.is_contiguous(memory_format=torch.channels_last)
    assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5, what="channels_last")
    assert bool((p.detach()[~mask] == 0).all())


def test_set_masks_replaces_and_zeroes_momentum():
    params = make_params("cpu")
    opt = ong_kernels.FusedMaskedSGD(params, lr=0.1, momentum=0.9)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    masks = make_masks(params)
    opt.set_masks(masks)
    for p, m in masks.items():
        assert bool((p.detach()[~m] == 0).all())
        assert bool((opt.state[p]["momentum_buffer"][~m] == 0).all())
        assert torch.equal(opt.masks[p], m)
    assert set(opt.masks) == set(masks)
    # replacing with a smaller dict makes the others dense again
    first = params[0]
    opt.set_masks({first: masks[first]})
    assert set(opt.masks) == {first}
    # the optimizer keeps its own copy: later edits of the user's tensor change nothing
    masks[first].fill_(True)
    assert not bool(opt.masks[first].all())


def test_masks_survive_state_dict_into_fresh_optimizer_without_masks():
    params = make_params("cpu")
    masks = make_masks(params)
    opt = ong_kernels.FusedMaskedSGD(params, lr=0.1, momentum=0.9, masks=masks)
    state = copy.deepcopy(opt.state_dict())
    fresh = ong_kernels.FusedMaskedSGD(params, lr=0.1, momentum=0.9)
    fresh.load_state_dict(state)
    for p, m in masks.items():
        assert fresh.masks[p].dtype == torch.bool and torch.equal(fresh.masks[p], m)


def test_grad_scaler_skips_inf_steps_and_unscales(device):
    model = torch.nn.Linear(7, 3).to(device)
    mask = torch.rand(3, 7, device=device) > 0.5
    opt = ong_kernels.FusedMaskedSGD(
        model.parameters(), lr=0.1, momentum=0.9, masks={model.weight: mask}
    )
    ref_model = copy.deepcopy(model)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    ref_scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x = torch.randn(16, 7, device=device)
    for step in range(6):
        for m, o, s in ((model, opt, scaler), (ref_model, ref, ref_scaler)):
            o.zero_grad()
            loss = m(x).square().mean() * (float("inf") if step == 2 else 1.0)
            s.scale(loss).backward()
            if m is ref_model:
                m.weight.grad.mul_(mask)
            s.step(o)
            s.update()
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert_close(
        model.weight.detach(), ref_model.weight.detach(), atol=1e-6, rtol=1e-5, what="weight"
    )
    assert_close(model.bias.detach(), ref_model.bias.detach(), atol=1e-6, rtol=1e-5, what="bias")
    assert bool((model.weight.detach()[~mask] == 0).all())


def test_closure_and_zero_grad():
    model = torch.nn.Linear(4, 2)
    opt = ong_kernels.FusedMaskedSGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(5)]
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_works_without_compiled_extension():
    """Importing and training never need _C: a subprocess hides it and uses the reference path."""
    code = (
        "import sys; sys.modules['ong_kernels._C'] = None\n"
        "import torch, ong_kernels\n"
        "from ong_kernels.backends import _native\n"
        "avail = ong_kernels.backends_available()\n"
        "assert avail['reference'] and not avail['cpu'] and not avail['cuda']\n"
        "p = torch.nn.Parameter(torch.randn(5, 4)); m = torch.rand(5, 4) > 0.5\n"
        "opt = ong_kernels.FusedMaskedSGD([p], lr=0.1, momentum=0.9, masks={p: m})\n"
        "p.grad = torch.randn(5, 4); opt.step()\n"
        "assert bool((p.detach()[~m] == 0).all())\n"
        "try:\n    _native.lib()\nexcept RuntimeError as e:\n    print(e)\n"
    )
    assert "pip install -e ." in run_python(code).stdout


@pytest.mark.parametrize("compact_state", [False, True])
def test_compiled_step_matches_eager(compact_state):
    """Issue 17: one path, both state formats. The step traced by dynamo (backend="eager":
    tracing without inductor, fast) gives eager mode's weights bit for bit."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(33, 7, generator=gen)), torch.nn.Parameter(torch.randn(5))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    mask = torch.rand(33, 7, generator=gen) < 0.3
    hyper = dict(lr=0.1, momentum=0.9, compact_state=compact_state)
    compiled = ong_kernels.FusedMaskedSGD(ps, masks={ps[0]: mask}, **hyper)
    eager = ong_kernels.FusedMaskedSGD(qs, masks={qs[0]: mask}, **hyper)
    step = torch.compile(compiled.step, backend="eager")
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        step()
        eager.step()
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p.detach(), q.detach())
    assert not bool(ps[0].detach()[~mask].any())
    torch._dynamo.reset()
