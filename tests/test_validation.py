"""Bad input: a clear error that names the argument, raised before any state changes."""

from __future__ import annotations

import copy

import pytest
import torch

import ong_kernels

# ----------------------------------------------------------------------------- nmf_batched


@pytest.mark.parametrize(
    ("weights", "kwargs", "error", "message"),
    [
        ([], {}, ValueError, "weights is empty"),
        (torch.rand(3, 4), {}, TypeError, "sequence of tensors"),
        ([torch.rand(3, 4), "x"], {}, TypeError, r"weights\[1\] must be a torch.Tensor"),
        ([torch.rand(3, 4), -torch.rand(2, 2)], {}, ValueError, r"weights\[1\] contains negative"),
        (
            [torch.tensor([[1.0, float("nan")]])],
            {},
            ValueError,
            r"weights\[0\] contains NaN or Inf",
        ),
        (
            [torch.tensor([[1.0, float("inf")]])],
            {},
            ValueError,
            r"weights\[0\] contains NaN or Inf",
        ),
        (
            [torch.ones(3, 4, dtype=torch.int64)],
            {},
            TypeError,
            r"weights\[0\] has dtype torch.int64",
        ),
        ([torch.rand(0, 4)], {}, ValueError, r"weights\[0\] has shape \(0, 4\)"),
        ([torch.tensor(1.0)], {}, ValueError, r"weights\[0\] has shape \(\)"),
        (
            [torch.rand(3, 4), torch.rand(3, 4, device="meta")],
            {},
            ValueError,
            r"weights\[1\] is a meta tensor",
        ),
        ([torch.rand(3, 4)], {"rank": 0}, ValueError, "rank must be >= 1"),
        ([torch.rand(3, 4)], {"rank": True}, TypeError, "rank must be an int"),
        ([torch.rand(3, 4)], {"rank": 2.5}, TypeError, "rank must be an int"),
        ([torch.rand(3, 4)], {"rank": [1, 2]}, ValueError, "rank has 2 entries"),
        ([torch.rand(3, 4)] * 2, {"rank": [1, 0]}, ValueError, r"rank\[1\] must be >= 1"),
        ([torch.rand(3, 4)], {"max_iter": 0}, ValueError, "max_iter must be >= 1"),
        ([torch.rand(3, 4)], {"tol": -1.0}, ValueError, "tol must be >= 0"),
        ([torch.rand(3, 4)], {"tol": float("nan")}, ValueError, "tol must be finite"),
        ([torch.rand(3, 4)], {"seed": -1}, ValueError, "seed must be >= 0"),
        ([torch.rand(3, 4)], {"init": "svd"}, ValueError, "init must be one of"),
        ([torch.rand(3, 4)], {"init": 3}, TypeError, "init must be a string or a sequence"),
        (
            [torch.rand(3, 4)],
            {"init": [(torch.rand(3, 2),)]},
            TypeError,
            r"init\[0\] must be a \(W0, H0\) pair",
        ),
        (
            [torch.rand(3, 4)],
            {"init": [(torch.rand(3, 3), torch.rand(2, 4))]},
            ValueError,
            r"init\[0\]\[0\] \(W0\) has shape \(3, 3\), expected \(3, 2\)",
        ),
        (
            [torch.rand(3, 4)],
            {"init": [(torch.rand(3, 2), -torch.rand(2, 4))]},
            ValueError,
            r"init\[0\]\[1\] \(H0\) contains negative",
        ),
        ([torch.rand(3, 4)], {"init": []}, ValueError, "init has 0"),
        (
            [torch.rand(3, 4)],
            {"backend": "fast"},
            ValueError,
            "backend must be 'auto' or one of .* got 'fast'",
        ),
    ],
)
def test_nmf_rejects_bad_input(weights, kwargs, error, message):
    kwargs = {"rank": 2, **kwargs}
    rank = kwargs.pop("rank")
    with pytest.raises(error, match=message):
        ong_kernels.nmf_batched(weights, rank, **kwargs)


# ----------------------------------------------------------------------------- FusedMaskedSGD


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lr": 0.1, "momentum": -0.5}, "momentum must be >= 0"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"lr": 0.1, "dampening": -0.1}, "dampening must be >= 0"),
        ({"lr": 0.1, "nesterov": True}, "nesterov=True requires momentum > 0 and dampening = 0"),
        (
            {"lr": 0.1, "nesterov": True, "momentum": 0.9, "dampening": 0.1},
            "nesterov=True requires",
        ),
    ],
)
def test_optimizer_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ong_kernels.FusedMaskedSGD([torch.nn.Parameter(torch.randn(3))], **kwargs)


def trained_optimizer():
    """An optimizer with masks and momentum state, for checking that errors change nothing."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    masks = {params[0]: torch.rand(4, 3) > 0.5}
    opt = ong_kernels.FusedMaskedSGD(params, lr=0.1, momentum=0.9, masks=masks)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(params, opt, before):
    old_params, old_state = before
    for p, old in zip(params, old_params, strict=True):
        assert torch.equal(p.detach(), old)
    new_state = opt.state_dict()
    assert new_state["param_groups"] == old_state["param_groups"]
    assert new_state["state"].keys() == old_state["state"].keys()
    for k, entry in old_state["state"].items():
        for name, value in entry.items():
            assert torch.equal(new_state["state"][k][name], value), (k, name)


def bad_masks(params):
    other = torch.nn.Parameter(torch.randn(4, 3))
    good = torch.rand(4, 3) > 0.5
    return [
        ({params[0]: good, other: good}, ValueError, "not a parameter of this optimizer"),
        ({params[0]: good.float()}, TypeError, "mask must have dtype torch.bool"),
        (
            {params[0]: torch.rand(3, 4) > 0.5},
            ValueError,
            r"mask has shape \(3, 4\), expected \(4, 3\)",
        ),
        (
            {params[0]: torch.ones(4, 3, dtype=torch.bool, device="meta")},
            ValueError,
            "mask is on meta",
        ),
        ({params[0]: [[True] * 3] * 4}, TypeError, "mask must be a torch.Tensor"),
        ([(params[0], good)], TypeError, "masks must map parameters"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_masks_raise_and_change_nothing(case):
    params, opt = trained_optimizer()
    before = snapshot(params, opt)
    masks, error, message = bad_masks(params)[case]
    with pytest.raises(error, match=message):
        opt.set_masks(masks)
    assert_unchanged(params, opt, before)


@pytest.mark.parametrize("case", range(4))
def test_bad_masks_in_constructor_raise(case):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    before = [p.detach().clone() for p in params]
    masks, error, message = bad_masks(params)[case]
    with pytest.raises(error, match=message):
        ong_kernels.FusedMaskedSGD(params, lr=0.1, masks=masks)
    for p, old in zip(params, before, strict=True):
        assert torch.equal(p.detach(), old)


def test_invalid_group_change_is_caught_before_any_update():
    params, opt = trained_optimizer()
    opt.param_groups[0]["lr"] = -1.0  # e.g. a buggy scheduler
    for p in params:
        p.grad = torch.randn_like(p)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be >= 0"):
        opt.step()
    assert_unchanged(params, opt, before)


def test_sparse_gradients_are_rejected_before_any_update():
    params, opt = trained_optimizer()
    params[0].grad = torch.randn(4, 3)
    params[1].grad = torch.randn(5).to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(params, opt, before)


def test_state_dict_with_wrong_mask_shape_is_rejected_before_loading():
    params, opt = trained_optimizer()
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["mask"] = torch.ones(2, 2, dtype=torch.bool)
    state["state"][0]["momentum_buffer"].fill_(123.0)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="state_dict: mask of shape"):
        opt.load_state_dict(state)
    assert_unchanged(params, opt, before)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("first_step", [False, True])
def test_a_bad_gradient_in_a_later_group_changes_no_group(compact, first_step):
    a, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))
    opt = ong_kernels.FusedMaskedSGD(
        [{"params": [a]}, {"params": [b], "lr": 0.05}], lr=0.1, momentum=0.9, dampening=0.5,
        masks={a: torch.rand(6, 5) > 0.5}, compact_state=compact,
    )  # fmt: skip
    if not first_step:
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    before = snapshot([a, b], opt)
    a.grad = torch.randn_like(a)
    b.grad = torch.randn(7).to_sparse()  # the second group's gradient is refused
    with pytest.raises(NotImplementedError, match=r"param_groups\[1\]: grads\[0\].*sparse"):
        opt.step()
    assert_unchanged([a, b], opt, before)
    # A first step that was refused is still a first step: buf = grad (no dampening).
    b.grad = torch.randn_like(b)
    ref = torch.optim.SGD([torch.nn.Parameter(b.detach().clone())], lr=0.05, momentum=0.9,
                          dampening=0.5)  # fmt: skip
    ref_param = ref.param_groups[0]["params"][0]
    if not first_step:
        ref.state[ref_param]["momentum_buffer"] = opt.state_dict()["state"][1][
            "momentum_buffer"].clone()  # fmt: skip
    ref_param.grad = b.grad.clone()
    opt.step()
    ref.step()
    assert torch.allclose(b.detach(), ref_param.detach(), atol=1e-6)
