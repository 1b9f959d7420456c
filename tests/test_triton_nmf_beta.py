"""The Triton beta-divergence kernel (op nmf_beta_mu, ong_kernels/backends/triton/nmf_beta.py)
beyond the conformance suite: every beta class against the reference on fresh odd-sized ragged
batches with regularisation, the fixed-H mode, several rank blocks, 64-row tiles with several
row blocks, per-matrix stopping, poisoned scratch and outputs; and the dispatcher's choices
(checked without a GPU).

Kernel cases run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU), or compiled on a CUDA device; sizes are small.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import assert_close, needs_triton, record_float32_allocations

import ong_kernels
from ong_kernels import _ops
from ong_kernels.backends import registry
from ong_kernels.backends.triton import nmf as tnmf
from ong_kernels.backends.triton import nmf_beta as tbeta
from ong_kernels.nmf_beta import BetaLoss, divergence_error

# (atol, rtol) of the factors after a few iterations, per V dtype: float32 rounding of the
# same arithmetic in another order (tile sums, FMA contraction), grown over the iterations.
TOLERANCES = {torch.float32: (1e-6, 5e-4), torch.bfloat16: (1e-6, 5e-4)}
REGULARISED = (0.01, 0.02, 0.3, True)  # alpha_W, alpha_H, l1_ratio, update_h


def batch(shapes, beta, seed, dtype=torch.float32):
    """Fresh V (zeros in a quarter of the entries for beta > 0; beta <= 0 refuses zeros),
    W, H per (m, n, r)."""
    gen = torch.Generator().manual_seed(seed)
    vs, ws, hs = [], [], []
    for m, n, r in shapes:
        v = torch.rand(m, n, generator=gen)
        if beta > 0:
            v[torch.rand(m, n, generator=gen) < 0.25] = 0
        else:
            v += 0.05
        vs.append(v.to(DEVICE, dtype))
        ws.append((torch.rand(m, r, generator=gen) + 0.05).to(DEVICE))
        hs.append((torch.rand(r, n, generator=gen) + 0.05).to(DEVICE))
    return vs, ws, hs


def run(backend, vs, ws, hs, max_iter, tol, beta, setting=REGULARISED):
    w = [t.clone() for t in ws]
    h = [t.clone() for t in hs]
    n_iter = _ops.nmf_beta_mu_(vs, w, h, max_iter, tol, beta, *setting, backend)
    assert n_iter.dtype == torch.int64
    return w, h, n_iter.cpu()


def compare(got, expected, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    assert got[2].tolist() == expected[2].tolist(), "n_iter"
    for i in range(len(got[0])):
        assert_close(got[0][i], expected[0][i], atol=atol, rtol=rtol, what=f"W[{i}]")
        assert_close(got[1][i], expected[1][i], atol=atol, rtol=rtol, what=f"H[{i}]")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Scratch and outputs the kernel allocates start as NaN (floats) or -7 (n_iter)."""

    def empty(size, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full((size,), fill, dtype=dtype, device=device)

    monkeypatch.setattr(tbeta, "_empty", empty)


def _seed() -> int:
    """A fresh seed per test, reproducible (conftest seeds torch from the test's id)."""
    return int(torch.randint(0, 1 << 30, ()))


# ----------------------------------------------------------------------------- kernels


@needs_triton
@pytest.mark.parametrize("beta", [2.0, 1.0, 0.0, 0.5, 1.5])
def test_each_beta_matches_the_reference(beta):
    # Odd sizes, 1 x n, a rank above 16 (rank block 32), a ragged batch of shapes and ranks,
    # with regularisation (l1 and l2 on both factors).
    shapes = [(37, 23, 5), (1, 9, 1), (21, 23, 20), (9, 30, 3)]
    vs, ws, hs = batch(shapes, beta, _seed())
    compare(run("triton", vs, ws, hs, 3, 0.0, beta), run("reference", vs, ws, hs, 3, 0.0, beta))


@needs_triton
@pytest.mark.parametrize("beta", [1.0, 0.5, 3.0])
def test_fixed_h_updates_w_only(beta):
    shapes = [(13, 17, 4), (20, 6, 6)]
    vs, ws, hs = batch(shapes, beta, _seed())
    setting = (0.01, 0.0, 0.5, False)
    got = run("triton", vs, ws, hs, 3, 0.0, beta, setting)
    compare(got, run("reference", vs, ws, hs, 3, 0.0, beta, setting))
    for h, h0 in zip(got[1], hs, strict=True):
        assert torch.equal(h, h0), "update_h=False must keep H bit for bit"


@needs_triton
@pytest.mark.parametrize("beta", [2.0, 1.0, 0.0, 1.5])
def test_ranks_spanning_several_rank_blocks(beta, monkeypatch):
    # Rank blocks of 16 (instead of 64) so that ranks 17-20 take the multi-block update with
    # its sums in scratch (NaN-poisoned), at interpreter-friendly sizes.
    monkeypatch.setattr(tbeta, "MAX_RANK_BLOCK", 16)
    shapes = [(21, 23, 20), (19, 18, 17), (9, 33, 5)]
    (group,) = tbeta.plan(shapes, [torch.float32] * 3, beta)
    assert (group.config.rb, group.config.one_chunk) == (16, False)
    vs, ws, hs = batch(shapes, beta, _seed())
    compare(run("triton", vs, ws, hs, 2, 0.0, beta), run("reference", vs, ws, hs, 2, 0.0, beta))


@needs_triton
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_wide_tiles_several_row_blocks_and_stopping(beta, monkeypatch):
    """The 64-row tiles large batches get, a matrix spanning two of them and several error
    row blocks (partials summed per matrix), and the stopping rule: an exactly low-rank
    matrix stops at an early check, the others later, each at the reference's iteration."""
    monkeypatch.setattr(tbeta, "MIN_TILES", 0)
    shapes = [(70, 9, 3), (12, 15, 2), (11, 40, 4)]
    (group,) = tbeta.plan(shapes, [torch.float32] * 3, beta)
    assert group.config.update_w.br == group.config.update_h.br == 64
    assert shapes[0][0] > group.config.error.br
    vs, ws, hs = batch(shapes, beta, _seed())
    gen = torch.Generator().manual_seed(5)
    vs[1] = (torch.rand(12, 2, generator=gen) @ torch.rand(2, 15, generator=gen)).to(DEVICE)
    setting = (0.0, 0.0, 0.0, True)
    expected = run("reference", vs, ws, hs, 40, 2e-2, beta, setting)
    assert min(expected[2].tolist()) < 40, "some matrix should stop at a check"
    got = run("triton", vs, ws, hs, 40, 2e-2, beta, setting)
    assert got[2].tolist() == expected[2].tolist(), "n_iter per matrix"
    for i, v in enumerate(vs):
        e = float(divergence_error(v, got[0][i], got[1][i], beta))
        e_ref = float(divergence_error(v, expected[0][i], expected[1][i], beta))
        assert e == pytest.approx(e_ref, rel=1e-4, abs=1e-6), i


@needs_triton
def test_error_kernel_is_sklearn_divergence():
    """The stopping error sqrt(2 D_beta) of each class, from the kernel's float64 partials,
    against nmf_beta.divergence_error (scikit-learn's _beta_divergence), V with zeros."""
    shapes = [(40, 37, 3), (5, 70, 2)]
    for beta in (2.0, 1.0, 0.0, 0.5, 1.5):
        vs, ws, hs = batch(shapes, beta, _seed())
        (group,) = tbeta.plan(shapes, [torch.float32] * 2, beta)
        stepper = tbeta._BetaStepper(vs, ws, hs, group.config, BetaLoss(beta))
        got = stepper.errors().cpu()
        for i, v in enumerate(vs):
            expected = float(divergence_error(v, ws[i], hs[i], beta))
            assert float(got[i]) == pytest.approx(expected, rel=1e-6), (beta, i)


@needs_triton
def test_bfloat16_v_is_read_as_it_is():
    shapes = [(15, 22, 3), (8, 9, 2)]
    vs, ws, hs = batch(shapes, 1.0, _seed(), dtype=torch.bfloat16)
    got = run("triton", vs, ws, hs, 3, 0.0, 1.0)
    compare(got, run("reference", vs, ws, hs, 3, 0.0, 1.0), torch.bfloat16)


@needs_triton
def test_zeros_are_refused_for_beta_at_most_zero_before_any_work():
    v = torch.rand(6, 7, device=DEVICE)
    v[2, 3] = 0
    with pytest.raises(ValueError, match="contains zeros"):
        ong_kernels.nmf_batched([v], 2, beta_loss="itakura-saito", backend="triton")
    # beta > 0 takes them
    ((w, h),) = ong_kernels.nmf_batched([v], 2, beta_loss=0.5, max_iter=3, backend="triton")
    assert torch.isfinite(w).all() and torch.isfinite(h).all()


# ----------------------------------------------------------------------------- dispatcher


def test_kinds_and_rank_classes():
    assert [tbeta.kind_of(b) for b in (2, 1, 0, 0.5, 1.5, 3)] == [
        "fro", "kl", "is", "other", "other", "other",
    ]  # fmt: skip
    assert [tbeta.config_for("kl", r).rb for r in (1, 16, 17, 32, 33, 64, 65, 500)] == [
        16, 16, 32, 32, 64, 64, 64, 64,
    ]  # fmt: skip
    # no rank limit, as the Frobenius kernel: larger ranks loop over blocks of 64
    assert not tbeta.config_for("kl", 500).one_chunk
    assert (tbeta.MIN_BLOCK, tbeta.MAX_RANK_BLOCK) == (tnmf.MIN_BLOCK, tnmf.MAX_RANK_BLOCK)


def test_fashion_mnist_kl_plan():
    """60000 x 784 at rank 20: rank block 32, 64-row tiles in the W step (938 of them),
    32-row tiles in the H step (13 tiles of 64 are too few for 132 SMs: 25 of 32)."""
    (group,) = tbeta.plan([(60000, 784, 20)], [torch.float32], 1.0)
    c = group.config
    assert (c.kind, c.rb, c.one_chunk) == ("kl", 32, True)
    assert c.update_w == tbeta.Launch(64, 32, 8, 1)
    assert c.update_h == tbeta.Launch(32, 32, 4, 1)
    # no m x n scratch: the workspace is O((m + n) r) at most, here far below V's 188 MB
    assert tbeta.workspace([(60000, 784, 20, torch.float32)]) < 60000 * 784 * 4 / 100


def test_every_dispatched_config_is_in_the_aot_list():
    tl = pytest.importorskip("triton.language")
    listed = {
        (c["fn"].__name__, repr(sorted(c["constexprs"].items())), c["num_warps"],
         c["num_stages"])
        for c in tbeta.aot_configs()
    }  # fmt: skip
    gram = {
        (c["fn"].__name__, repr(sorted(c["constexprs"].items())), c["num_warps"])
        for c in tnmf.aot_configs()
    }
    sets = [[(60000, 784)], [(500, 300)] * 3, [(4096, 4096)] * 8]
    for beta, rank, mats in itertools.product((2.0, 1.0, 0.0, 0.5), (1, 20, 40, 64, 100), sets):
        shapes = [(m, n, min(rank, m, n)) for m, n in mats]
        for group in tbeta.plan(shapes, [torch.float16] * len(shapes), beta):
            for name, constexprs, launch in tbeta.launch_constexprs(group.config, tl.float16):
                key = (name, repr(sorted(constexprs.items())), launch.num_warps,
                       launch.num_stages)  # fmt: skip
                assert key in listed, key
            for side in (0, 1):  # beta = 2's Gram launches: the Frobenius kernel's
                constexprs = tbeta.gram_constexprs(group.config, side)
                key = ("_gram_kernel", repr(sorted(constexprs.items())), tnmf._GRAM.num_warps)
                assert key in gram, key


def test_registered_for_cuda_first():
    kernel = registry.get("nmf_beta_mu", "triton")
    assert "cuda" in kernel.devices and kernel.precisions == (registry.IEEE,)
    assert registry.DEFAULT_ORDER["nmf_beta_mu"]["cuda"][0] == "triton"
    assert tbeta.COEF_COLUMNS[-1] == "beta" and len(tbeta.COEF_COLUMNS) == 12


@needs_triton
def test_workspace_counts_what_the_kernel_allocates(monkeypatch):
    """The declared workspace (memory_budget grouping relies on it) against the float32
    scratch a call allocates: the max(m, n) x 2r sums only when the ranks span several rank
    blocks, never an m x n temporary."""
    allocated = record_float32_allocations(monkeypatch, tbeta)
    for shapes, one_chunk in (([(40, 30, 6), (9, 50, 3)], True), ([(70, 66, 66)], False)):
        (group,) = tbeta.plan(shapes, [torch.float32] * len(shapes), 1.0)
        assert group.config.one_chunk == one_chunk
        allocated.clear()
        vs, ws, hs = batch(shapes, 1.0, _seed())
        run("triton", vs, ws, hs, 1, 0.0, 1.0)
        scratch = sum(allocated)
        model = tbeta.workspace([(*s, torch.float32) for s in shapes])
        assert scratch <= model <= scratch + 64 * 512 + 8 * sum(m + n for m, n, _ in shapes)
        sums = 4 * sum(max(m, n) * 2 * r for m, n, r in shapes)
        assert (scratch >= sums) == (not one_chunk), (scratch, sums)
        if one_chunk:  # KL in one rank block: no Gram, no sums, a 1-entry placeholder
            assert scratch == 4, scratch
