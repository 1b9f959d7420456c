"""The Triton NMF kernels beyond the conformance suite: each path (persistent, grouped, several
rank blocks) forced and compared with the reference, poisoned scratch and outputs, the
precision opt-in, and the dispatcher's choices for real workloads (checked without a GPU).

Kernel cases run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU), or compiled on a CUDA device; sizes are small.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import assert_close, needs_triton, record_float32_allocations
from kernels.cases import ragged_batch

import ong_kernels
from benchmarks.shapes import WORKLOADS, weight_matrix_shapes
from ong_kernels import _ops, nmf_plan
from ong_kernels.backends import registry
from ong_kernels.backends.triton import _common
from ong_kernels.backends.triton import nmf as tnmf
from ong_kernels.nmf_init import initial_factors


def batch(shapes, dtype=torch.float32, zero_at=None, seed=0):
    return ragged_batch(shapes, DEVICE, dtype, zero_at, seed)


def run(backend, vs, ws, hs, max_iter, tol, **kwargs):
    w = [t.clone() for t in ws]
    h = [t.clone() for t in hs]
    n_iter = _ops.nmf_mu_(vs, w, h, max_iter, tol, backend, **kwargs)
    return w, h, n_iter.cpu()


def compare(got, expected, atol=1e-6, rtol=2e-4):
    assert got[2].tolist() == expected[2].tolist(), "n_iter"
    for i in range(len(got[0])):
        assert_close(got[0][i], expected[0][i], atol=atol, rtol=rtol, what=f"W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=atol, rtol=rtol, what=f"H[{i}]")


@pytest.fixture(params=["solve", "grouped", "grouped-wide"])
def path(request, monkeypatch):
    """Force every matrix onto one path (the dispatcher would split these small batches);
    "grouped-wide" also takes the 64-row update tiles that large batches get."""
    small = request.param == "solve"
    monkeypatch.setattr(tnmf, "is_small", lambda m, n, r: small)
    if request.param == "grouped-wide":
        monkeypatch.setattr(tnmf, "MIN_TILES", 0)
    return request.param


@pytest.fixture
def poisoned(monkeypatch):
    """Scratch and outputs the kernels allocate start as NaN (floats) or -7 (n_iter)."""

    def empty(size, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full((size,), fill, dtype=dtype, device=device)

    monkeypatch.setattr(tnmf, "_empty", empty)


# ----------------------------------------------------------------------------- kernels


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_each_path_matches_reference(path):
    # Odd sizes, 1 x n and m x 1, a rank clipped to min(m, n), an all-zero matrix.
    shapes = [(7, 13, 4), (1, 9, 3), (11, 1, 2), (3, 40, 5), (20, 17, 6)]
    vs, ws, hs = batch(shapes, zero_at=4)
    compare(run("triton", vs, ws, hs, 4, 0.0), run("reference", vs, ws, hs, 4, 0.0))


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_ranks_spanning_several_rank_blocks(path, monkeypatch):
    # Rank blocks of 16 (instead of 64) so that ranks 17-20 take the multi-block update with
    # its denominators in scratch, at interpreter-friendly sizes.
    monkeypatch.setattr(tnmf, "MAX_RANK_BLOCK", 16)
    monkeypatch.setattr(tnmf, "_ERROR", {16: tnmf._ERROR[16]})
    monkeypatch.setattr(tnmf, "_SOLVE", {16: tnmf._SOLVE[16]})
    shapes = [(30, 23, 20), (19, 21, 17), (9, 33, 5)]
    vs, ws, hs = batch(shapes, seed=1)
    groups = tnmf.plan([(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(vs, ws, strict=True)],
                       [v.dtype for v in vs])  # fmt: skip
    assert [g.config.one_chunk for g in groups] == [False]
    compare(run("triton", vs, ws, hs, 3, 0.0), run("reference", vs, ws, hs, 3, 0.0), rtol=5e-4)


@needs_triton
@pytest.mark.parametrize("init", ["random", "nndsvda"])
def test_stopping_per_matrix_on_each_path(path, init):
    # An exactly low-rank matrix stops early, an all-zero one at the first check, random ones
    # later: each at the reference's iteration, keeping that iteration's factors. The grouped
    # path decides on the device (Stepper.syncs False) and skips stopped matrices.
    gen = torch.Generator().manual_seed(7)
    easy = torch.rand(10, 2, generator=gen) @ torch.rand(2, 13, generator=gen)
    vs = [t.to(DEVICE) for t in (easy, torch.rand(10, 13, generator=gen), torch.zeros(10, 13))]
    vs.append(torch.rand(13, 10, generator=gen).to(DEVICE))
    factors = initial_factors(vs, [3, 3, 3, 4], init, seed=3)
    ws, hs = [w for w, _ in factors], [h for _, h in factors]
    expected = run("reference", vs, ws, hs, 50, 2e-3)
    assert len(set(expected[2].tolist())) > 1, "matrices should stop at different checks"
    compare(run("triton", vs, ws, hs, 50, 2e-3), expected, atol=1e-5, rtol=1e-3)


@needs_triton
def test_mixed_input_dtypes_and_paths_in_one_call():
    # float32 and bfloat16 V in one call, small and large: four launch groups, one n_iter.
    shapes = [(6, 11, 3), (5, 9, 2), (70, 9, 3), (9, 70, 2)]
    vs, ws, hs = batch(shapes, seed=2)
    vs[1], vs[3] = vs[1].to(torch.bfloat16), vs[3].to(torch.bfloat16)
    old = tnmf.PERSISTENT_MAX_ENTRIES
    try:
        tnmf.PERSISTENT_MAX_ENTRIES = 100
        groups = tnmf.plan([(m, n, min(r, m, n)) for m, n, r in shapes], [v.dtype for v in vs])
        assert sorted(g.indices for g in groups) == [(0,), (1,), (2,), (3,)]
        got = run("triton", vs, ws, hs, 3, 0.0)
    finally:
        tnmf.PERSISTENT_MAX_ENTRIES = old
    compare(got, run("reference", vs, ws, hs, 3, 0.0))


@needs_triton
def test_tf32_opt_in_runs_and_is_refused_elsewhere():
    vs, ws, hs = batch([(6, 9, 3)])
    got = run("triton", vs, ws, hs, 3, 0.0, precision="tf32")
    if DEVICE == "cpu":  # the interpreter ignores input_precision: same as "ieee"
        compare(got, run("triton", vs, ws, hs, 3, 0.0))
    else:  # 10-bit mantissa products: close, not equal
        compare(got, run("reference", vs, ws, hs, 3, 0.0), atol=1e-3, rtol=2e-2)
    w0 = ws[0].clone()
    with pytest.raises(ValueError, match="only the triton backend"):
        _ops.nmf_mu_(vs, ws, hs, 3, 0.0, "reference", "tf32")
    with pytest.raises(ValueError, match="precision must be one of"):
        _ops.nmf_mu_(vs, ws, hs, 3, 0.0, "triton", "fp8")
    assert torch.equal(ws[0], w0), "a refused call changed W"


def test_nmf_batched_checks_precision_before_any_work():
    v = torch.rand(5, 6)
    with pytest.raises(ValueError, match="precision must be one of"):
        ong_kernels.nmf_batched([v], 2, precision="half")
    with pytest.raises(ValueError, match="needs backend='triton'"):
        ong_kernels.nmf_batched([v], 2, precision="tf32", backend="reference")


# ----------------------------------------------------------------------------- dispatcher


def _shapes(mats, rank):
    return [(m, n, min(rank, m, n)) for m, n in mats]


def test_resnet56_set_is_one_persistent_launch():
    shapes = _shapes(weight_matrix_shapes(WORKLOADS["resnet56"]), 16)
    groups = tnmf.plan(shapes, [torch.float32] * len(shapes))
    assert len(groups) == 1 and len(groups[0].indices) == 56
    config = groups[0].config
    assert (config.kernel, config.rb, config.one_chunk) == ("solve", 16, True)
    # One launch for the whole solve, whatever tol: the stopping checks run inside it.
    assert [name for name, *_ in tnmf.launch_constexprs(config, None, "ieee")] == [
        "_solve_kernel", "_solve_kernel",  # without / with checks: one of them is launched
    ]  # fmt: skip
    assert config.launch("solve") == tnmf.Launch(br=32, num_warps=8, num_stages=2, maxnreg=255)


def test_resnet18_set_splits_small_and_large_matrices():
    shapes = _shapes(weight_matrix_shapes(WORKLOADS["resnet18"]), 16)
    groups = {g.config.kernel: g for g in tnmf.plan(shapes, [torch.float16] * len(shapes))}
    small = sorted({shapes[i][:2] for i in groups["solve"].indices})
    large = sorted({shapes[i][:2] for i in groups["grouped"].indices})
    # conv1 (64 x 27), stage-1 convs (64 x 576), 1x1 shortcuts up to 256 x 128, fc (10 x 512)
    assert small == [(10, 512), (64, 27), (64, 576), (128, 64), (256, 128)]
    assert min(m * n for m, n in large) == 128 * 576 and (512, 4608) in large
    grouped = groups["grouped"].config
    assert (grouped.rb, grouped.one_chunk) == (16, True)
    # The W step has 64 row tiles of 64 (too few for 132 SMs): 32-row tiles; the H step 445.
    assert grouped.launch("update_w") == tnmf.Launch(32, 4, 2)
    assert grouped.launch("update_h") == tnmf.Launch(64, 4, 2)
    assert groups["grouped"].v_dtype == torch.float16


def test_llm_block_at_rank_64_and_at_a_quarter_rank():
    # One Llama-7B block: q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down (4096 x 11008).
    mats = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    (group,) = tnmf.plan(_shapes(mats, 64), [torch.bfloat16] * 7)
    c = group.config
    assert (c.kernel, c.rb, c.one_chunk) == ("grouped", 64, True)
    assert c.launch("update_w") == c.launch("update_h") == tnmf.Launch(64, 8, 2)
    assert c.launch("error") == tnmf.Launch(32, 4, 1)
    # ong_masks' default rank (a quarter of min(m, n) = 1024): rank blocks of 64, 16-row tiles.
    (group,) = tnmf.plan(_shapes(mats, 1024), [torch.bfloat16] * 7)
    c = group.config
    assert (c.rb, c.one_chunk) == (64, False)
    assert (c.launch("update_w").br, c.launch("update_h").br) == (16, 32)
    # 4 launches per iteration + 1 per check, over all 7 matrices.
    assert len(tnmf.launch_constexprs(c, None, "ieee")) == 5


def test_rank_classes_and_the_persistent_limits():
    assert [tnmf.config_for("grouped", r).rb for r in (1, 16, 17, 32, 33, 64, 65, 500)] == [
        16, 16, 32, 32, 64, 64, 64, 64,
    ]  # fmt: skip
    assert tnmf.is_small(256, 256, 32) and not tnmf.is_small(256, 257, 32)
    assert not tnmf.is_small(64, 64, 33)
    with pytest.raises(ValueError, match="ranks <= 32"):
        tnmf.config_for("solve", 33)


def test_every_dispatched_config_is_in_the_aot_list():
    tl = pytest.importorskip("triton.language")
    listed = {
        (
            c["fn"].__name__,
            repr(sorted(c["constexprs"].items())),
            c["num_warps"],
            c["num_stages"],
            c.get("maxnreg"),
        )
        for c in tnmf.aot_configs()
    }
    resnet18 = weight_matrix_shapes(WORKLOADS["resnet18"])
    sets = [resnet18, [*resnet18, (4096, 4096), (11008, 4096)]]  # 32- and 64-row W tiles
    for rank, mats in itertools.product((1, 16, 24, 32, 48, 64, 100, 1024), sets):
        for group in tnmf.plan(_shapes(mats, rank), [torch.float16] * len(mats)):
            for name, constexprs, launch in tnmf.launch_constexprs(
                group.config, tl.float16, "tf32"
            ):
                key = (name, repr(sorted(constexprs.items())), launch.num_warps,
                       launch.num_stages, launch.maxnreg)  # fmt: skip
                assert key in listed, key


def test_registered_for_cuda_first():
    kernel = registry.get("nmf_mu", "triton")
    assert "cuda" in kernel.devices
    assert registry.DEFAULT_ORDER["nmf_mu"]["cuda"][0] == "triton"
    assert tnmf.TABLE_COLUMNS[:6] == nmf_plan.TABLE_COLUMNS


# ----------------------------------------------------------------------------- GPU semantics
# What the interpreter cannot show by running (issue 27): each defect checked where it lives.


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("rank", [24, 40, 64], ids=["rb32", "rb64", "rb64-full"])
def test_grouped_rank_blocks_with_wide_tiles_and_several_row_blocks(rank, monkeypatch):
    """The grouped configurations the conformance sizes never reach, against the reference:
    rank blocks of 32 and 64 with the 64-row update tiles large batches get (RB 64 w8: the
    Llama / 4096^2 configuration), and matrices spanning several row blocks in the update
    and in the error kernel (whose partials are summed per matrix), with stopping checks."""
    monkeypatch.setattr(tnmf, "is_small", lambda m, n, r: False)
    monkeypatch.setattr(tnmf, "MIN_TILES", 0)
    shapes = [(130, 66, rank), (66, 97, rank)]
    (group,) = tnmf.plan(shapes, [torch.float32] * 2)
    assert group.config.rb == (32 if rank <= 32 else 64) and group.config.one_chunk
    assert group.config.launch("update_w").br == 64
    assert all(m > group.config.launch("error").br for m, _, _ in shapes)
    vs, ws, hs = batch(shapes, seed=11)
    compare(run("triton", vs, ws, hs, 12, 1e-6), run("reference", vs, ws, hs, 12, 1e-6),
            rtol=5e-4)  # fmt: skip


@needs_triton
def test_error_sum_does_not_depend_on_the_order_of_row_blocks(monkeypatch):
    """The grouped path's ||V - W H|| of a matrix of many row blocks is the same bits whatever
    order its blocks' programs run in (an atomic_add per block is not: the last bits, and so a
    borderline n_iter, would vary run to run). Reversing the error grid reorders the blocks."""
    monkeypatch.setattr(tnmf, "is_small", lambda m, n, r: False)
    gen = torch.Generator().manual_seed(13)
    m, n, r = 512, 17, 3
    # Seven row blocks whose squared residuals sum to ~100 each, and one to ~2^60 (ulp 256):
    # added small blocks first, the smalls survive; the large block first, each small one is
    # below half an ulp and lost. A fixed-order sum gives one answer either way.
    scale = torch.full((m,), 0.5)
    scale[-64:] = 2.0**25
    v = (torch.rand(m, n, generator=gen) * scale[:, None]).to(DEVICE)
    w = (torch.rand(m, r, generator=gen) * 1e-3).to(DEVICE)
    h = torch.rand(r, n, generator=gen).to(DEVICE)
    (group,) = tnmf.plan([(m, n, r)], [torch.float32])
    stepper = tnmf._GroupedStepper([v], [w], [h], group.config, "ieee")
    spec, (tiles, count) = stepper.error
    assert count >= 8, "the case needs many row blocks"
    forward = stepper.errors()
    stepper.error = (spec, (tiles.view(-1, 2).flip(0).reshape(-1).contiguous(), count))
    backward = stepper.errors()
    assert forward.item() == backward.item(), (forward.item(), backward.item())
    exact = torch.linalg.matrix_norm(v.double() - w.double() @ h.double())
    assert forward.item() == pytest.approx(exact.item(), rel=1e-6)


def test_stopping_error_is_ieee_whatever_the_precision():
    """A TF32 product in ||V - W H|| carries ~1e-3 relative noise against tol ~1e-4: the
    stopping rule would depend on rounding. The error kernel gets no precision."""
    for precision in tnmf.PRECISIONS:
        launches = tnmf.launch_constexprs(tnmf.config_for("grouped", 40), None, precision)
        (error,) = [c for name, c, _ in launches if name == "_error_kernel"]
        assert error.get("PRECISION", "ieee") == "ieee", (precision, error)


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_workspace_counts_what_the_kernels_allocate(monkeypatch):
    """The declared workspace (the `memory_budget` grouping and the GPU check of issue 16 rely
    on it) against the scratch the call allocates: the denominators D only for ranks that span
    several rank blocks (one_chunk keeps them in registers), plus small per-call tensors."""
    allocated = record_float32_allocations(monkeypatch, tnmf)
    monkeypatch.setattr(tnmf, "MIN_TILES", 0)
    # A Llama-7B block scaled down 32x per side (every matrix on the grouped path) at rank 16,
    # and ranks past one rank block (80: D in scratch).
    block = [(128, 128)] * 4 + [(344, 128)] * 2 + [(128, 344)]
    for rank, one_chunk in ((16, True), (80, False)):
        shapes = [(m, n, rank) for m, n in block] if one_chunk else [(90, 100, rank)]
        (group,) = tnmf.plan(shapes, [torch.float32] * len(shapes))
        assert group.config.one_chunk == one_chunk
        allocated.clear()
        vs, ws, hs = batch(shapes, seed=rank)
        run("triton", vs, ws, hs, 1, 0.0)
        scratch = sum(allocated)
        model = tnmf.workspace([(*s, torch.float32) for s in shapes])
        # one 512-B allocator block per small tensor at most on top of the scratch
        assert scratch <= model <= scratch + 64 * 512 + 8 * sum(m + n for m, n, _ in shapes), (
            rank, scratch, model,
        )  # fmt: skip
        denominators = 4 * sum(max(m, n) * r for m, n, r in shapes)
        assert (scratch >= denominators) == (not one_chunk), (rank, scratch, denominators)


@needs_triton
@pytest.mark.parametrize("op", ["nmf", "sgd"])
def test_every_launch_runs_under_the_tensors_device_guard(op, monkeypatch):
    """Triton launches on torch.cuda.current_device(), not on the tensors' device: without a
    guard, `nmf_batched(..., device="cuda:1")` or a torchrun rank on cuda:k launches on GPU 0
    with GPU-k addresses. Every launch must happen inside _common.on_device(tensors' device)."""
    from ong_kernels._bitmask import pack_mask
    from ong_kernels.backends.triton import sgd as tsgd

    state = {"guards": [], "inside": 0, "launches": 0}

    @contextlib.contextmanager
    def guard(device):
        state["guards"].append(torch.device(device))
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    class Checked:
        """A kernel whose launches assert that a guard is entered."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert state["inside"] > 0, "a Triton launch outside the device guard"
                state["launches"] += 1
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(_common, "on_device", guard)
    if op == "nmf":
        module = tnmf._kernels()
        proxy = type("Kernels", (), {})()
        for name in tnmf.SIGNATURES:
            setattr(proxy, name, Checked(getattr(module, name)))
        monkeypatch.setattr(tnmf, "_kernels", lambda: proxy)
        # both paths: one small matrix (persistent), one "large" (grouped), with checks
        monkeypatch.setattr(tnmf, "is_small", lambda m, n, r: m * n < 100)
        vs, ws, hs = batch([(6, 9, 3), (30, 20, 2)])
        run("triton", vs, ws, hs, 11, 1e-9)
    else:
        kernel = tsgd._kernel()
        monkeypatch.setattr(tsgd, "_kernel", lambda: Checked(kernel))
        params = [torch.randn(50, device=DEVICE), torch.randn(7, 3, device=DEVICE)]
        grads = [torch.randn_like(p) for p in params]
        bufs = [torch.zeros_like(p) for p in params]
        bits = [pack_mask(torch.rand(50, device=DEVICE) > 0.5), None]
        _ops.masked_sgd_step_(params, grads, bufs, bits, 0.1, 0.9, 0.0, 0.0, False, False,
                              True, "triton")  # fmt: skip
    assert state["launches"] > 0 and state["inside"] == 0
    assert set(state["guards"]) == {torch.device(DEVICE)}


def test_the_device_guard_is_the_tensors_cuda_device(monkeypatch):
    """on_device(cuda:k) enters torch.cuda.device(cuda:k) (checked without a GPU: the guard
    class is replaced by a recorder); CPU tensors (the interpreter) need none."""
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with _common.on_device(torch.device("cuda", 1)):
        pass
    with _common.on_device("cuda:3"):
        pass
    with _common.on_device("cpu"):
        pass
    assert entered == [torch.device("cuda", 1), torch.device("cuda", 3)]


@needs_triton
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_triton_sgd_keys_momentum_on_the_buffers(momentum):
    """Called directly (below the op's check), the Triton kernel decides momentum from the
    buffers, as the reference and the CUDA kernel do: momentum without buffers is a plain
    step (never a store through address 0), buffers with momentum 0 are written."""
    from ong_kernels.backends._sgd_args import SgdHyper

    gen = torch.Generator().manual_seed(29)
    params = [torch.randn(n, generator=gen).to(DEVICE) for n in (1100, 9)]
    grads = [torch.randn(p.numel(), generator=gen).to(DEVICE) for p in params]
    bufs = [] if momentum else [torch.randn(p.numel(), generator=gen).to(DEVICE) for p in params]
    hyper = SgdHyper(0.05, momentum, 0.25, 1e-3, False, False, False)
    expected = [p.clone() for p in params], [b.clone() for b in bufs]
    registry.get("masked_sgd_step", "reference").fn(
        expected[0], grads, expected[1], [None, None], hyper, None, None
    )
    registry.get("masked_sgd_step", "triton").fn(params, grads, bufs, [None, None], hyper, None,
                                                 None)  # fmt: skip
    for got, want in zip(params + bufs, expected[0] + expected[1], strict=True):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"momentum={momentum}")
