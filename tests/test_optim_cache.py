"""What the optimizer keeps between steps (its hyper-parameters and its per-group call lists)
follows every change a user of torch.optim.SGD can make between steps: a tensor lr changed in
place (schedulers, `group["lr"].mul_`), and the optimizer state reset or edited. Each test
steps FusedMaskedSGD (dense and compact state) and torch.optim.SGD on the same masked
gradients and compares them after every step."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from conftest import assert_close

import ong_kernels

SHAPES = [(6, 3, 3, 3), (13, 7), (9,), (5,)]  # the last two stay dense
ATOL, RTOL = 1e-5, 1e-4  # float32, a few steps: FMA contraction differs from torch's loop


def make_pair(lr, compact_state, momentum=0.9, nesterov=False):
    """Our optimizer and torch's over twin parameters; masks on the first two, pruned weights
    zeroed on both sides."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    masks = {p: torch.rand(p.shape) < 0.4 for p in params[:2]}
    peers = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with torch.no_grad():
        for p, q in zip(params, peers, strict=True):
            if p in masks:
                q.mul_(masks[p])
    twin = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    ours = ong_kernels.FusedMaskedSGD(
        params, lr=twin(lr), momentum=momentum, nesterov=nesterov, masks=masks,
        compact_state=compact_state,
    )  # fmt: skip
    peer = torch.optim.SGD(peers, lr=twin(lr), momentum=momentum, nesterov=nesterov)
    return ours, peer, params, peers, masks


def step_both(ours, peer, params, peers, masks, step):
    for p, q in zip(params, peers, strict=True):
        g = torch.randn_like(p)
        p.grad = g
        q.grad = torch.where(masks[p], g, 0.0) if p in masks else g.clone()
    ours.step()
    peer.step()
    for i, (p, q) in enumerate(zip(params, peers, strict=True)):
        assert_close(p.detach(), q.detach(), atol=ATOL, rtol=RTOL, what=f"step {step} param {i}")


def buffer_name(opt, p):
    return "momentum_compact" if opt.compact_state and p in opt._masks else "momentum_buffer"


@pytest.mark.parametrize("compact_state", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("change", ["scheduler", "mul_", "fill_"])
def test_tensor_lr_changed_in_place_is_used(compact_state, change):
    ours, peer, params, peers, masks = make_pair(torch.tensor(0.1), compact_state)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (ours, peer)]
    lr_tensor = ours.param_groups[0]["lr"]
    for step in range(5):
        step_both(ours, peer, params, peers, masks, step)
        if change == "scheduler":
            for s in scheds:
                s.step()
        else:
            for opt in (ours, peer):
                lr = opt.param_groups[0]["lr"]
                lr.mul_(0.5) if change == "mul_" else lr.fill_(0.3 / (step + 2))
    assert ours.param_groups[0]["lr"] is lr_tensor  # the same tensor object throughout


@pytest.mark.parametrize("compact_state", [False, True], ids=["dense", "compact"])
def test_plain_lr_changes_are_used(compact_state):
    ours, peer, params, peers, masks = make_pair(0.1, compact_state)
    for step in range(4):
        step_both(ours, peer, params, peers, masks, step)
        for opt in (ours, peer):
            opt.param_groups[0]["lr"] *= 0.5
            opt.param_groups[0]["momentum"] = 0.9 - 0.1 * step
    step_both(ours, peer, params, peers, masks, 4)  # the last change is stepped and compared
    assert ours.param_groups[0]["lr"] == peer.param_groups[0]["lr"] == 0.1 * 0.5**4


def _clear(opt, p, mask):
    opt.state.clear()


def _new_dict(opt, p, mask):
    opt.state = defaultdict(dict)


def _drop_param_state(opt, p, mask):
    del opt.state[p]


def _del_buffer(opt, p, mask):
    name = buffer_name(opt, p) if isinstance(opt, ong_kernels.FusedMaskedSGD) else "momentum_buffer"
    del opt.state[p][name]


def _replace_buffer(opt, p, mask):
    if isinstance(opt, ong_kernels.FusedMaskedSGD) and buffer_name(opt, p) == "momentum_compact":
        opt.state[p]["momentum_compact"] = torch.full_like(opt.state[p]["momentum_compact"], 0.25)
    else:  # pruned entries of a momentum buffer are 0 (torch's is, with masked gradients)
        opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.25) * (1 if mask is None else mask)


def _replace_param_state(opt, p, mask):
    old = opt.state[p]
    opt.state[p] = {name: value.clone() * 0.5 for name, value in old.items()}


RESETS = {
    "state.clear()": _clear,
    "state = defaultdict(dict)": _new_dict,
    "del state[p]": _drop_param_state,
    "del momentum": _del_buffer,
    "replace momentum": _replace_buffer,
    "state[p] = new dict": _replace_param_state,
}


@pytest.mark.parametrize("compact_state", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("which", [0, 2], ids=["masked", "dense param"])
@pytest.mark.parametrize("reset", list(RESETS), ids=list(RESETS))
def test_state_reset_between_steps_is_seen(compact_state, which, reset):
    ours, peer, params, peers, masks = make_pair(0.1, compact_state, nesterov=True)
    step = 0
    for step in range(3):
        step_both(ours, peer, params, peers, masks, step)
    mask = masks.get(params[which])
    RESETS[reset](ours, params[which], mask)
    RESETS[reset](peer, peers[which], mask)
    # what state_dict() shows is the state the next step runs on (its mask entries aside)
    saved = ours.state_dict()["state"]
    expected = peer.state_dict()["state"]
    for i in range(len(params)):
        has = "momentum_buffer" in saved.get(i, {})
        assert has == ("momentum_buffer" in expected.get(i, {})), f"param {i}"
    for step in range(3, 6):
        step_both(ours, peer, params, peers, masks, step)
    saved = ours.state_dict()["state"]
    for i, q in enumerate(peers):
        assert_close(
            saved[i]["momentum_buffer"], peer.state[q]["momentum_buffer"], atol=ATOL, rtol=RTOL,
            what=f"momentum {i}",
        )  # fmt: skip


@pytest.mark.parametrize("compact_state", [False, True], ids=["dense", "compact"])
def test_checkpoint_saved_after_a_reset_resumes_the_same(compact_state):
    """state_dict() after `state.clear()` and a step holds the momentum the kernel uses: a
    fresh optimizer loaded from it continues exactly as the original."""
    ours, peer, params, peers, masks = make_pair(0.1, compact_state)
    for step in range(3):
        step_both(ours, peer, params, peers, masks, step)
    ours.state.clear()
    peer.state.clear()
    step_both(ours, peer, params, peers, masks, 3)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ong_kernels.FusedMaskedSGD(clones, lr=0.1, momentum=0.9, compact_state=compact_state)
    resumed.load_state_dict(copy.deepcopy(ours.state_dict()))  # (a saved checkpoint)
    for step in range(4, 6):
        for p, c in zip(params, clones, strict=True):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        ours.step()
        resumed.step()
        for p, c in zip(params, clones, strict=True):
            assert torch.equal(p.detach(), c.detach()), f"step {step}"


def test_lr_defaults_to_torch_sgds():
    """Code written for torch.optim.SGD's signature (lr=1e-3 by default) runs unchanged."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = ong_kernels.FusedMaskedSGD([p], momentum=0.9)
    assert opt.param_groups[0]["lr"] == torch.optim.SGD([p]).param_groups[0]["lr"] == 1e-3
    p.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 1e-3))
