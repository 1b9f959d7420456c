"""FusedMaskedSGD when tensors change under it (issue 10's defects), GradScaler, and the
mask API of issue 12: every case against torch.optim.SGD on the masked gradient, or an error."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES, STEP_TOLERANCES, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import ong_kernels
from ong_kernels import _ops
from ong_kernels._bitmask import pack_mask
from ong_kernels.backends import cpu as cpu_backend
from ong_kernels.backends._sgd_args import SgdHyper

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)


class Pair:
    """One parameter under FusedMaskedSGD and its twin under torch.optim.SGD, which gets
    grad * mask; `check` compares them and that pruned weights are exactly 0."""

    def __init__(self, shape, mask_density=0.5, seed=0, device="cpu", backend="auto"):
        gen = torch.Generator().manual_seed(seed)
        self.mask = (torch.rand(shape, generator=gen) < mask_density).to(device)
        self.p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        self.q = torch.nn.Parameter((self.p.detach() * self.mask).clone())
        self.ours = ong_kernels.FusedMaskedSGD(
            [self.p], masks={self.p: self.mask}, backend=backend, **HYPER
        )
        self.ref = torch.optim.SGD([self.q], foreach=False, **HYPER)
        self.gen = gen

    def step(self, grad=None):
        g = torch.randn(self.p.shape, generator=self.gen) if grad is None else grad
        g = g.to(self.p.device, self.p.dtype)
        nan = torch.full_like(g, float("nan"))
        self.p.grad = torch.where(self.mask.to(g.device), g, nan)  # NaN at pruned positions
        self.q.grad = torch.where(self.mask.to(self.q.device), g.to(self.q), 0.0)
        self.ours.step()
        self.ref.step()

    def check(self, what):
        # every pair starts in float32 (torch keeps a float32 momentum buffer after
        # model.double(), ours converts it), so float32's tolerance applies throughout
        atol, rtol = STEP_TOLERANCES[torch.float32]
        p, q = self.p.detach(), self.q.detach().to(self.p)
        assert_close(p, q, atol=atol * 10, rtol=rtol, what=what)
        mask = self.mask.to(self.p.device)
        assert bool((self.p.detach()[~mask] == 0).all()), f"{what}: a pruned weight moved"
        # the kept weights all moved (a mask packed in another layout zeroes some of them)
        assert bool((self.p.detach()[mask] != 0).all()), f"{what}: a kept weight was zeroed"


def test_mask_follows_channels_last_after_set_masks():
    # Defect 1: bits packed in the contiguous order selected other weights once the weight
    # became channels_last (13 of 20 pruned entries moved in this 4x3x2x2 case).
    pair = Pair((4, 3, 2, 2))
    pair.step()  # a plan is cached for the contiguous layout
    pair.p.data = pair.p.data.contiguous(memory_format=torch.channels_last)
    for k in range(3):
        pair.step()
        pair.check(f"channels_last step {k}")
    assert pair.p.is_contiguous(memory_format=torch.channels_last)
    state = pair.ours.state[pair.p]
    assert state["momentum_buffer"].stride() == pair.p.stride()


def test_dtype_change_converts_the_momentum_buffer():
    # Defect 2: model.double() after the buffers exist; the kernel read a float32 buffer as
    # float64 (weights of 3e232 and a write out of bounds).
    pair = Pair((7, 5))
    pair.step()
    pair.step()
    pair.p.data = pair.p.data.double()
    pair.q.data = pair.q.data.double()
    for k in range(3):
        pair.step()
        pair.check(f"float64 step {k}")
    assert pair.ours.state[pair.p]["momentum_buffer"].dtype == torch.float64


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_device_change_moves_the_mask_bits():
    # Defect 3: the bits stayed on the CPU and the CUDA kernel read a host pointer.
    pair = Pair((33, 9))
    pair.step()
    pair.p.data = pair.p.data.cuda()
    pair.mask = pair.mask.cuda()
    for k in range(3):
        pair.step()
        pair.check(f"cuda step {k}")
    assert pair.ours.masks[pair.p].device.type == "cuda"


def test_op_refuses_mixed_devices_naming_the_tensor():
    # Defect 4: the op took params[0]'s device for every tensor.
    params = [torch.randn(3), torch.randn(3, device="meta")]
    grads = [torch.randn(3), torch.randn(3, device="meta")]
    with pytest.raises(ValueError, match=r"params\[1\] is on meta"):
        _ops.masked_sgd_step_(params, grads, [], [None, None], 0.1, 0, 0, 0, False, False, False)


@pytest.mark.parametrize(
    ("what", "mutate"),
    [
        ("grads[1]", lambda p, g, b, m: g.__setitem__(1, g[1].double())),
        ("momentum_buffers[0]", lambda p, g, b, m: b.__setitem__(0, b[0][:5])),
        ("mask_bits[0]", lambda p, g, b, m: m.__setitem__(0, m[0][:1])),
        ("params[1]", lambda p, g, b, m: p.__setitem__(1, p[1].to("meta"))),
    ],
)
def test_native_backend_validates_without_the_op(what, mutate):
    """The backends check what their kernels would read out of bounds, whoever calls them."""
    params = [torch.randn(40), torch.randn(3, 3)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    bits = [pack_mask(torch.rand(40) > 0.5), None]
    mutate(params, grads, bufs, bits)
    before = [p.clone() for p in params if p.device.type == "cpu"]
    with pytest.raises(ValueError, match=what.replace("[", r"\[").replace("]", r"\]")):
        hyper = SgdHyper(0.1, 0.9, 0.0, 0.0, False, False, False)
        cpu_backend.masked_sgd_step_(params, grads, bufs, bits, hyper, None, None)
    after = [p for p in params if p.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_storage_offset_views_match_torch_sgd():
    base = torch.randn(3, 50)
    p = torch.nn.Parameter(base[1, 7:37].view(5, 6))  # a view: storage offset 57
    assert p.storage_offset() == 57
    mask = torch.rand(5, 6) > 0.4
    q = torch.nn.Parameter((p.detach() * mask).clone())
    ours = ong_kernels.FusedMaskedSGD([p], masks={p: mask}, **HYPER)
    ref = torch.optim.SGD([q], **HYPER)
    for _ in range(4):
        g = torch.randn(5, 6)
        p.grad, q.grad = g.clone(), g * mask
        ours.step()
        ref.step()
    assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5, what="offset view")


LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "float64": lambda t: t.double(),
    "float32": lambda t: t.float(),
    "transposed": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
    # a view 7 elements into a larger storage (storage offset, same strides)
    "offset_view": lambda t: (
        torch.empty(t.numel() + 7, dtype=t.dtype, device=t.device)[7:].view(t.shape).copy_(t)
    ),
}


@settings(max_examples=25, deadline=None)
@given(
    changes=st.lists(st.sampled_from([*sorted(LAYOUTS), "step"]), min_size=1, max_size=8),
    shape=st.sampled_from([(3, 2, 2, 5), (1, 1, 1, 1), (4, 3, 3, 3)]),
    seed=st.integers(0, 1000),
    device=st.sampled_from(DEVICES),
)
def test_fuzz_layout_changes_between_steps(changes, shape, seed, device):
    """Parameters change dtype/layout (and device when there is a GPU) between steps: each
    step matches torch.optim.SGD on the masked gradient, or raises (a shape change would)."""
    pair = Pair(shape, seed=seed)
    pair.step()
    for change in changes:
        if change == "step":
            pair.step()
            pair.check(f"after {changes}")
            continue
        new = LAYOUTS[change](pair.p.data)
        if device != "cpu" and seed % 2:
            new = new.to(device)
            pair.mask = pair.mask.to(device)
        pair.p.data = new
        pair.q.data = pair.q.data.to(new.dtype)
    pair.step()
    pair.check(f"after {changes}")


def test_shape_change_raises_naming_the_parameter():
    pair = Pair((4, 6))
    pair.step()
    pair.p.data = pair.p.data[:, :3]
    pair.p.grad = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape changed from"):
        pair.ours.step()


# ---------------------------------------------------------------------- issue 12: the mask API


def test_loading_a_torch_sgd_state_dict_keeps_the_masks():
    pair = Pair((9, 4))
    pair.step()
    sgd_state = copy.deepcopy(pair.ref.state_dict())  # no masks in it
    pair.ours.load_state_dict(sgd_state)
    assert torch.equal(pair.ours.masks[pair.p], pair.mask)
    buf = pair.ours.state[pair.p]["momentum_buffer"]
    assert bool((buf[~pair.mask] == 0).all())
    pair.p.grad = torch.randn(9, 4)
    pair.ours.step()
    assert bool((pair.p.detach()[~pair.mask] == 0).all()), "the step trained pruned weights"


def test_update_masks_changes_only_the_named_parameters():
    a, b = torch.nn.Parameter(torch.randn(5, 5)), torch.nn.Parameter(torch.randn(6))
    ma, mb = torch.rand(5, 5) > 0.5, torch.rand(6) > 0.5
    opt = ong_kernels.FusedMaskedSGD([a, b], lr=0.1, masks={a: ma, b: mb})
    new_b = torch.rand(6) > 0.5
    opt.update_masks({b: new_b})
    assert torch.equal(opt.masks[a], ma) and torch.equal(opt.masks[b], new_b)
    opt.update_masks({a: None})
    assert set(opt.masks) == {b}
    opt.set_masks({a: ma})  # replace: b becomes dense
    assert set(opt.masks) == {a}


def test_mask_keyed_by_name_says_how_to_key_it():
    model = torch.nn.Linear(3, 2)
    opt = ong_kernels.FusedMaskedSGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"keyed by the name 'weight'.*masks_for"):
        opt.set_masks({"weight": torch.ones(2, 3, dtype=torch.bool)})


def test_add_param_group_rejects_bad_hyper_parameters_at_once():
    opt = ong_kernels.FusedMaskedSGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": -1})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------- GradScaler


def scaled_pair(device):
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 3).to(device)
    mask = torch.rand(3, 7, device=device) > 0.5
    opt = ong_kernels.FusedMaskedSGD(model.parameters(), masks={model.weight: mask}, **HYPER)
    return model, mask, opt


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_takes_the_fused_path_and_skips_inf_steps(device):
    model, mask, opt = scaled_pair(device)
    ref_model, _, ref_opt = scaled_pair(device)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    x = torch.randn(16, 7, device=device)
    seen = []
    real_step = opt.step

    def spy(*args, **kwargs):
        seen.append((getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)))
        return real_step(*args, **kwargs)

    opt.step = spy
    for step in range(5):
        opt.zero_grad()
        ref_opt.zero_grad()
        bad = step == 2
        loss = model(x).square().mean() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        ref_model(x).square().mean().backward()
        before = [t.detach().clone() for t in model.parameters()]
        buf_before = opt.state[model.weight].get("momentum_buffer")
        buf_before = None if buf_before is None else buf_before.clone()
        scaler.step(opt)
        scaler.update()
        if bad:
            assert all(
                torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)
            )
            assert torch.equal(opt.state[model.weight]["momentum_buffer"], buf_before)
        else:
            ref_opt.step()  # unscaled twin: the same trajectory
        assert_close(model.weight, ref_model.weight, atol=1e-6, rtol=1e-5, what=f"step {step}")
    assert all(s is not None and f is not None for s, f in seen), "not the fused path"
    assert bool((model.weight.detach()[~mask] == 0).all())


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_cuda_graph_capture_is_refused():
    p = torch.nn.Parameter(torch.randn(64, device="cuda"))
    opt = ong_kernels.FusedMaskedSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(graph, stream=stream):
            opt.step()


def test_op_is_tagged_cudagraph_unsafe():
    """torch.compile's CUDA-graph trees skip an op with this tag instead of capturing it."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert tag in _ops.masked_sgd_step_.default.tags


SGD_MODULES = [
    "ong_kernels._layout",
    "ong_kernels._bitmask",
    "ong_kernels.backends._sgd_args",
    "ong_kernels.backends.reference",
    "ong_kernels.backends._multi_tensor",
    "ong_kernels.backends.cpu",
    "ong_kernels.backends.cuda",
    "ong_kernels.backends.triton.sgd",
    "ong_kernels._ops",
    "ong_kernels.optim",
]


def _module_imports(name: str) -> set[str]:
    """The SGD_MODULES that `name` imports at module level."""
    import ast
    import importlib.util
    import pathlib

    tree = ast.parse(pathlib.Path(importlib.util.find_spec(name).origin).read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in SGD_MODULES else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out & set(SGD_MODULES)


def test_sgd_modules_import_in_layers_without_a_circle():
    """Issue 17: _bitmask -> backends/_multi_tensor -> backends/reference -> _bitmask was a
    circle. Each module imports only modules listed before it (a leaf first)."""
    for k, name in enumerate(SGD_MODULES):
        later = _module_imports(name) - set(SGD_MODULES[:k])
        assert not later, f"{name} imports {sorted(later)}, which come after it"


def test_hyper_type_mirrors_the_native_struct():
    """SgdHyper's fields are csrc/include/ong_sgd.h's struct SgdHyper fields, in order (the
    native bindings read them by name; the op schemas are generated from SgdHyper)."""
    import pathlib
    import re

    header = pathlib.Path(__file__).parents[1] / "csrc" / "include" / "ong_sgd.h"
    body = re.search(r"struct SgdHyper \{(.*?)\};", header.read_text(), re.S).group(1)
    fields = re.findall(r"^\s*(?:double|bool|std::uintptr_t)\s+(\w+);", body, re.M)
    assert fields == [*SgdHyper._fields, "grad_scale", "found_inf"]
    schema = str(_ops.masked_sgd_step_.default._schema)
    assert ", ".join(f"{t} {n}" for t, n in re.findall(r"(float|bool) (\w+)", schema)) == (
        ", ".join(f"{'bool' if n in ('nesterov', 'maximize', 'first_step') else 'float'} {n}"
                  for n in SgdHyper._fields)
    )  # fmt: skip
