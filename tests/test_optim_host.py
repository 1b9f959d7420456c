"""The fused step's host side (issue 17): the plan cache's keys and the optimizer state's
snapshot in C++ (_C_host) and in Python agree, new gradient tensors every step reuse the cached
plan, the CPU kernel's plan cache follows the tensors it was built for, and torch's step hooks
and profiler range still run although the idle step skips torch's wrapper."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, compiled_cpu, run_python
from torch.optim import optimizer as torch_optimizer

import ong_kernels
from ong_kernels.backends import _host, _multi_tensor, registry

needs_cpu = pytest.mark.skipif(not compiled_cpu(), reason="compiled CPU kernels not built")
needs_host = pytest.mark.skipif(not _host.has_host_module(), reason="_C_host not built")


BASE = [torch.randn(4, 6), torch.randn(3), None, torch.randn(2, 3, 5)]


def _lists():
    base = BASE
    out = {"same": list(base), "clone": [None if t is None else t.clone() for t in base]}
    out["dtype"] = [base[0].double(), *base[1:]]
    out["strides"] = [base[0].t().contiguous().t(), *base[1:]]
    out["size"] = [base[0], torch.randn(4), *base[2:]]
    out["none"] = [*base[:2], torch.randn(1), base[3]]
    out["view"] = [*base[:3], base[3].view(2, 15)]
    out["meta"] = [None if t is None else t.to("meta") for t in base]
    out["shorter"] = base[:3]
    out["tuple"] = tuple(base)
    return out


@pytest.mark.parametrize("with_address", [False, True])
def test_layout_keys_agree_between_cpp_and_python(with_address):
    """Equal keys exactly for equal dtype, device, sizes, strides (and address): the C++ and
    the Python key make the same decisions on every pair."""
    makers = [_host.py_layout_key] + ([_host._C_host.layout_key] if _host.has_host_module() else [])
    lists = _lists()
    expected_equal = {"same", "tuple"} | (set() if with_address else {"clone"})
    for make in makers:
        base = make(BASE, with_address)
        assert base is not None
        for name, tensors in lists.items():
            if name == "meta" and with_address:
                continue  # meta tensors have no address to key (their key is their layout)
            key = make(tensors, with_address)
            assert (key == base) == (name in expected_equal), (make, name)


def test_layout_key_is_none_for_sparse_and_refuses_non_tensors():
    sparse = [torch.randn(3, 3).to_sparse()]
    assert _host.py_layout_key(sparse, False) is None
    if _host.has_host_module():
        assert _host._C_host.layout_key(sparse, False) is None
        with pytest.raises(TypeError, match=r"tensors\[1\] is a int"):
            _host._C_host.layout_key([torch.zeros(1), 3], True)
        with pytest.raises(TypeError, match="list or tuple"):
            _host._C_host.layout_key(torch.zeros(2), True)


def _writers():
    out = [_host.py_write_addresses]
    if _host.has_host_module():
        out.append(_host._C_host.write_addresses)
    return out


@pytest.mark.parametrize("write", _writers())
def test_write_addresses_writes_the_rows_asked_and_nothing_else(write):
    tensors = [torch.randn(5), torch.randn(2, 2), torch.randn(3)]
    table = torch.full((2, 5), 7, dtype=torch.int64)
    write(tensors, table, torch.tensor([1, -1, 0]), 1)
    expected = torch.full((2, 5), 7, dtype=torch.int64)
    expected[1, 1] = tensors[0].data_ptr()
    expected[0, 1] = tensors[2].data_ptr()
    assert torch.equal(table, expected)


@pytest.mark.parametrize("write", _writers())
@pytest.mark.parametrize(
    "rows, column",
    [([2, -1, 0], 1), ([0, 0], 1), ([0, 1, 0], 5), ([0, 1, 0], -1)],
    ids=["row-past-end", "rows-length", "column-past-end", "negative-column"],
)
def test_write_addresses_refuses_out_of_bounds_before_writing(write, rows, column):
    tensors = [torch.randn(5), torch.randn(2, 2), torch.randn(3)]
    table = torch.full((2, 5), 7, dtype=torch.int64)
    with pytest.raises(ValueError, match="write_addresses"):
        write(tensors, table, torch.tensor(rows, dtype=torch.int64), column)
    assert bool((table == 7).all())


@needs_host
@pytest.mark.parametrize(
    "table, rows, what",
    [
        (torch.zeros(2, 5, dtype=torch.int32), torch.zeros(3, dtype=torch.int64), "table"),
        (torch.zeros(5, 2, dtype=torch.int64).t(), torch.zeros(3, dtype=torch.int64), "table"),
        (torch.zeros(2, 5, dtype=torch.int64), torch.zeros(3, dtype=torch.int32), "rows"),
        (torch.zeros(10, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), "table"),
    ],
    ids=["int32-table", "strided-table", "int32-rows", "1-d-table"],
)
def test_cpp_write_addresses_checks_its_tensors(table, rows, what):
    with pytest.raises(ValueError, match=f"{what} must be a contiguous"):
        _host._C_host.write_addresses([torch.zeros(1)] * 3, table, rows, 1)


@pytest.fixture(params=["cpp", "python"])
def host_keys(request, monkeypatch):
    """Run a test with _C_host's keys and again with the Python keys."""
    if request.param == "cpp":
        if not _host.has_host_module():
            pytest.skip("_C_host not built")
        yield "cpp"
        return
    monkeypatch.setattr(_multi_tensor, "layout_key", _host.py_layout_key)
    monkeypatch.setattr(_multi_tensor, "write_addresses", _host.py_write_addresses)
    monkeypatch.setattr(ong_kernels.optim, "layout_key", _host.py_layout_key)
    monkeypatch.setattr(ong_kernels.optim, "grads_of", _host.py_grads_of)
    monkeypatch.setattr(ong_kernels.optim, "state_snapshot", _host.py_state_snapshot)
    monkeypatch.setattr(ong_kernels.optim, "state_unchanged", _host.py_state_unchanged)
    yield "python"


@needs_cpu
@pytest.mark.parametrize("compact_state", [False, True])
def test_new_gradient_tensors_reuse_the_plan_and_match_torch_sgd(host_keys, compact_state):
    """zero_grad(set_to_none=True) gives new gradient tensors every step: the cached plan is
    reused (before issue 17's fix every such step rebuilt it, ~300 us over ResNet-18), its
    table reads the new gradients, and the trajectory is torch.optim.SGD's on masked grads.
    The old gradients are kept alive so the new ones cannot reuse their addresses."""
    shapes = [(6, 5, 3, 3), (7, 11), (5,), (3, 4)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    params[3].data = params[3].data.t().contiguous().t()  # strides (1, 3)
    masks = {params[0]: torch.rand(shapes[0]) < 0.4, params[1]: torch.rand(shapes[1]) < 0.6}
    ref = [torch.nn.Parameter((p.detach() * masks.get(p, 1)).clone()) for p in params]
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    opt = ong_kernels.FusedMaskedSGD(params, **hyper, masks=masks, compact_state=compact_state)
    peer = torch.optim.SGD(ref, **hyper, foreach=False)
    kernel = registry.get("masked_sgd_step", "cpu").fn
    cache = kernel.compact.plans if compact_state else kernel.plans
    old, plans = [], {}
    before = {id(plan): plan for plan in cache.plans()}  # other tests' (held: ids unique)
    for step in range(6):
        for p, q in zip(params, ref, strict=True):
            g = torch.randn_like(p)
            if step == 3 and p is params[1]:
                g = g.t().contiguous().t()  # other strides: a new plan, scratch copy
            old.append(p.grad)
            p.grad = g
            q.grad = g.contiguous() * masks[p] if p in masks else g.clone()
        opt.step()
        peer.step()
        plans.update((id(plan), plan) for plan in cache.plans() if id(plan) not in before)
    # steps 0-2, the strided-gradient step 3, steps 4-5 (a slot keeps its last plan only)
    assert len(plans) == 3, "the plan was rebuilt for new gradient addresses"
    for p, q in zip(params, ref, strict=True):
        assert_close(p.detach(), q.detach(), atol=1e-12, rtol=1e-12, what="new gradients")
    assert old  # held until here


def _hook_opt():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = ong_kernels.FusedMaskedSGD([p], lr=0.1, momentum=0.9, masks={p: torch.rand(4, 3) > 0.5})
    p.grad = torch.randn(4, 3)
    return opt


def test_step_hooks_run_around_the_step():
    """Optimizer and global pre/post hooks run, in torch's order, and a pre hook's new
    arguments reach the step (the closure it returns is called)."""
    opt = _hook_opt()
    seen = []
    handles = [
        torch_optimizer.register_optimizer_step_pre_hook(lambda o, a, k: seen.append("g-pre")),
        opt.register_step_pre_hook(lambda o, a, k: seen.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: seen.append("post")),
        torch_optimizer.register_optimizer_step_post_hook(lambda o, a, k: seen.append("g-post")),
    ]
    opt.step()
    assert seen == ["g-pre", "pre", "post", "g-post"]
    handles[1].remove()
    replaced = opt.register_step_pre_hook(lambda o, a, k: ((o, lambda: seen.append("closure")), k))
    opt.step()
    assert seen[4:] == ["g-pre", "closure", "post", "g-post"]
    for h in [*handles, replaced]:
        h.remove()
    seen.clear()
    opt.step()
    assert seen == []


def test_profiler_sees_the_step():
    opt = _hook_opt()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#FusedMaskedSGD.step" in names


def test_a_subclass_step_is_wrapped_by_torch():
    class Logged(ong_kernels.FusedMaskedSGD):
        def step(self, closure=None):
            return super().step(closure)

    p = torch.nn.Parameter(torch.randn(3))
    opt = Logged([p], lr=0.1)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    p.grad = torch.randn(3)
    opt.step()
    assert seen == ["post"]


def test_steps_without_the_host_module():
    """A build without _C_host (no torch headers at build time) keys its steps in Python."""
    code = (
        "import sys; sys.modules['ong_kernels._C_host'] = None\n"
        "import torch, ong_kernels\n"
        "from ong_kernels.backends import _host\n"
        "assert not _host.has_host_module()\n"
        "p = torch.nn.Parameter(torch.randn(5, 4)); m = torch.rand(5, 4) > 0.5\n"
        "q = torch.nn.Parameter(p.detach() * m)\n"
        "opt = ong_kernels.FusedMaskedSGD([p], lr=0.1, momentum=0.9, masks={p: m})\n"
        "ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)\n"
        "for _ in range(3):\n"
        "    g = torch.randn(5, 4); p.grad = g; q.grad = g * m\n"
        "    opt.step(); ref.step()\n"
        "assert torch.allclose(p.detach(), q.detach(), atol=1e-6), (p, q)\n"
    )
    run_python(code)


# ---------------------------------------------------------------- the op's CPU kernel


def _masked_problem(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5, 3, 3), (7, 11), (5,), (3, 4)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    masks = {params[0]: torch.rand(shapes[0], generator=gen) < 0.4,
             params[1]: torch.rand(shapes[1], generator=gen) < 0.6}  # fmt: skip
    return params, masks


def _count_python_runs(monkeypatch):
    runs = []
    real = _multi_tensor.TablePlan.run

    def run(self, *args, **kwargs):
        runs.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_multi_tensor.TablePlan, "run", run)
    return runs


@needs_cpu
def test_cached_call_site_still_validates_changed_tensors():
    """The validator's ValueError reaches the caller for a first call and for a call at a
    cached call site whose tensors changed."""
    from ong_kernels import _ops

    params, _ = _masked_problem()
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    hyper = (0.1, 0.9, 0.0, 0.0, False, False, False)
    bad = [*grads[:3], torch.randn(4, 3)]
    with pytest.raises(ValueError, match=r"grads\[3\] is \(4, 3\)"):
        _ops.masked_sgd_step_(params, bad, bufs, [None] * 4, *hyper)
    for _ in range(2):  # the plan is cached now
        _ops.masked_sgd_step_(params, grads, bufs, [None] * 4, *hyper)
    with pytest.raises(ValueError, match=r"grads\[3\] is \(4, 3\)"):
        _ops.masked_sgd_step_(params, bad, bufs, [None] * 4, *hyper)
    with pytest.raises(ValueError, match="grad_scale must be one float32"):
        _ops.masked_sgd_step_(
            params, grads, bufs, [None] * 4, *hyper, grad_scale=torch.tensor([1.0, 2.0])
        )
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        _ops.masked_sgd_step_(params, grads, bufs, [None] * 4, *hyper, backend="bogus")


@needs_cpu
def test_other_backends_and_mixed_dtypes_step_correctly(monkeypatch):
    """backend="reference" on CPU tensors is the registry's choice at every call, and a list
    with a float16 tensor (the reference takes it) steps correctly."""
    from ong_kernels import _ops

    runs = _count_python_runs(monkeypatch)
    params = [torch.randn(5), torch.randn(3, dtype=torch.float16)]
    expected = [p.clone() for p in params]
    grads = [torch.randn(5), torch.randn(3, dtype=torch.float16)]
    hyper = (0.1, 0.0, 0.0, 0.0, False, False, False)
    for _ in range(3):
        _ops.masked_sgd_step_(params, grads, [], [None, None], *hyper)
        _ops.masked_sgd_step_(expected, grads, [], [None, None], *hyper, backend="reference")
    assert len(runs) == 3  # every auto step ran its (mixed) plan in Python
    for p, e in zip(params, expected, strict=True):
        assert_close(p, e, atol=1e-6, rtol=1e-6, what=str(p.dtype))
    spied = []
    real = registry.select

    def select(op, device, backend):
        spied.append(backend)
        return real(op, device, backend)

    monkeypatch.setattr(registry, "select", select)
    x = [torch.randn(4)]
    for _ in range(2):
        _ops.masked_sgd_step_(x, [torch.ones(4)], [], [None], 0.1, 0.0, 0.0, 0.0, False, False,
                              False, backend="reference")  # fmt: skip
    assert spied == ["reference", "reference"]


@needs_cpu
def test_plans_go_with_their_model():
    """The CPU kernel's cached plan goes when the optimizer and its model are deleted."""
    import gc

    kernel = registry.get("masked_sgd_step", "cpu").fn
    gc.collect()  # other tests' garbage goes first
    before = len(kernel.plans)
    params, masks = _masked_problem()
    opt = ong_kernels.FusedMaskedSGD(params, lr=0.1, momentum=0.9, masks=masks)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    assert len(kernel.plans) == before + 1
    del opt, params, masks, p
    gc.collect()
    assert len(kernel.plans) == before


def test_state_snapshots_agree_between_cpp_and_python():
    """state_unchanged is True exactly while the state holds the snapshot's objects: every
    edit a user can make (clear, a new entry, an entry deleted or replaced, a buffer deleted,
    added or replaced, even with an equal one) makes it False, in C++ and in Python."""
    from collections import defaultdict

    pairs = [(_host.py_state_snapshot, _host.py_state_unchanged)]
    if _host.has_host_module():
        pairs.append((_host._C_host.state_snapshot, _host._C_host.state_unchanged))
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))

    def fresh():
        state = defaultdict(dict)
        state[a]["momentum_buffer"] = torch.zeros(3)
        state[b].update(momentum_buffer=torch.ones(2), step=3)
        return state

    edits = {
        "clear": lambda s: s.clear(),
        "new entry": lambda s: s[torch.randn(1)],
        "del entry": lambda s: s.pop(a),
        "replace entry": lambda s: s.__setitem__(a, dict(s[a])),
        "del buffer": lambda s: s[a].pop("momentum_buffer"),
        "add buffer": lambda s: s[a].__setitem__("momentum_compact", torch.zeros(1)),
        "replace buffer": lambda s: s[b].__setitem__(
            "momentum_buffer", s[b]["momentum_buffer"] * 1
        ),
        "replace int": lambda s: s[b].__setitem__("step", 4),
        "reorder": lambda s: s.__setitem__(a, s.pop(a)),
    }
    for snapshot, unchanged in pairs:
        state = fresh()
        seen = snapshot(state)
        assert unchanged(state, seen)
        state[a]["momentum_buffer"].add_(1)  # in place: the same objects
        assert unchanged(state, seen)
        assert not unchanged(fresh(), seen)
        assert not unchanged(state, snapshot({}))
        assert snapshot([]) is None and not unchanged(state, None)
        for name, edit in edits.items():
            state = fresh()
            seen = snapshot(state)
            edit(state)
            assert not unchanged(state, seen), f"{snapshot.__module__}: {name}"


def test_grads_of_matches_python():
    """grads_of is [p.grad ...] or None when one is missing, in C++ and in Python; a tensor
    subclass with its own __torch_function__, or a torch function mode, leaves it to Python."""
    makers = [_host.py_grads_of] + ([_host._C_host.grads_of] if _host.has_host_module() else [])
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(3)

    class Sub(torch.Tensor):
        pass

    for grads_of in makers:
        got = grads_of(params)
        assert all(g is p.grad for g, p in zip(got, params, strict=True))
        assert grads_of([*params, torch.nn.Parameter(torch.randn(2))]) is None
        assert grads_of([]) == []
    if _host.has_host_module():
        sub = torch.randn(3).as_subclass(Sub)
        assert _host._C_host.grads_of([sub]) is None

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Mode():
            assert _host._C_host.grads_of(params) is None


@needs_cpu
def test_backend_environment_variable_is_seen_after_a_plan_is_cached(monkeypatch):
    """backend="auto" while ONG_KERNELS_BACKEND is set is the registry's choice, even at a
    call site whose CPU plan is cached."""
    from ong_kernels import _ops

    params = [torch.randn(6), torch.randn(5)]
    grads = [torch.randn(6), torch.randn(5)]
    hyper = (0.1, 0.0, 0.0, 0.0, False, False, False)
    for _ in range(2):  # cached now
        _ops.masked_sgd_step_(params, grads, [], [None, None], *hyper)
    chosen = []
    real = registry.select
    monkeypatch.setattr(registry, "select", lambda *a: chosen.append(a) or real(*a))
    monkeypatch.setenv("ONG_KERNELS_BACKEND", "reference")
    before = [p.clone() for p in params]
    _ops.masked_sgd_step_(params, grads, [], [None, None], *hyper)
    assert [real(*a).backend for a in chosen] == ["reference"]
    for p, b, g in zip(params, before, grads, strict=True):
        assert_close(p, b - 0.1 * g, atol=1e-6, rtol=1e-6, what="reference step")
    monkeypatch.setenv("ONG_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError):
        _ops.masked_sgd_step_(params, grads, [], [None, None], *hyper)
