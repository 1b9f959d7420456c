"""Per-matrix seeds: k restarts of one matrix in one call equal k single calls, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ong_kernels import backends_available, nmf_batched
from ong_kernels.nmf_init import use_exact_svd

BACKENDS = [b for b in ("reference", "cpu", "triton") if backends_available("nmf_mu")[b]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["random", "nndsvda"])
def test_restarts_in_one_call_equal_single_calls(backend, init):
    v = torch.rand(130, 150)  # the NNDSVD start takes the randomized SVD here
    assert not use_exact_svd(130, 150, 3)  # 130 > 4 x its 32 sketch columns
    seeds = [0, 5, 11, 2**40]
    iters = 25
    if backend == "triton":  # the interpreter took 47 s for 4 seeds x 25 iterations here
        seeds, iters = seeds[:2], 2
    together = nmf_batched([v] * len(seeds), 3, max_iter=iters, init=init, seed=seeds,
                           backend=backend)  # fmt: skip
    for seed, (w, h) in zip(seeds, together, strict=True):
        ((w1, h1),) = nmf_batched([v], 3, max_iter=iters, init=init, seed=seed, backend=backend)
        assert torch.equal(w, w1) and torch.equal(h, h1), seed
    assert not torch.equal(together[0][0], together[1][0])  # the seeds do differ


def _batch_rounds_its_own_way(product):
    """A batched product (a leading batch dimension above 1) that rounds unlike the
    unbatched one, as torch.bmm does on an AMD EPYC Zen 4 (issue 24): each slice is summed
    in float64 and rounded once, where the 2-D product rounds its float32 partial sums."""

    def patched(a, b, *args, **kwargs):
        if a.dim() == 3 and a.shape[0] > 1 and a.dtype == torch.float32:
            return product(a.double(), b.double(), *args, **kwargs).float()
        return product(a, b, *args, **kwargs)

    return patched


@pytest.mark.parametrize("init", ["random", "nndsvda"])
def test_reference_restarts_do_not_depend_on_how_the_batch_rounds(monkeypatch, init):
    """The reference backend's bit-equality of restarts holds by construction, not because
    this CPU's batched and unbatched products happen to round alike: with a batched product
    that rounds differently (as on AMD), one call of 3 restarts still equals 3 single calls."""
    monkeypatch.setattr(torch, "bmm", _batch_rounds_its_own_way(torch.bmm))
    monkeypatch.setattr(torch, "matmul", _batch_rounds_its_own_way(torch.matmul))
    v = torch.rand(40, 57, generator=torch.Generator().manual_seed(3))
    seeds = [0, 5, 11]
    together = nmf_batched([v] * 3, 3, max_iter=12, init=init, seed=seeds, backend="reference")
    for seed, (w, h) in zip(seeds, together, strict=True):
        ((w1, h1),) = nmf_batched([v], 3, max_iter=12, init=init, seed=seed, backend="reference")
        assert torch.equal(w, w1) and torch.equal(h, h1), seed


@pytest.mark.parametrize("as_generator", [False, True])
def test_per_matrix_seeds_survive_streamed_groups(as_generator):
    g = torch.Generator().manual_seed(1)
    ws = [torch.rand(30, 41, generator=g), torch.rand(8, 3, 3, generator=g).half(),
          torch.rand(30, 41, generator=g)]  # fmt: skip
    seeds = [3, 1, 4]
    ref = nmf_batched(ws, 4, max_iter=20, seed=seeds)
    source = iter(ws) if as_generator else ws
    got = nmf_batched(source, 4, max_iter=20, seed=seeds, memory_budget=400_000)
    for (w0, h0), (w1, h1) in zip(ref, got, strict=True):
        assert torch.equal(w0, w1) and torch.equal(h0, h1)


@pytest.mark.parametrize(
    ("seed", "error", "message"),
    [
        ([1, 2], ValueError, "seed has 2 entries but there are 3 matrices"),
        ([1, 2, 3, 4], ValueError, "seed has 4 entries but there are 3 matrices"),
        ([1, -2, 3], ValueError, r"seed\[1\] must be >= 0"),
        ([1, 2.0, 3], TypeError, r"seed\[1\] must be an int"),
        ([], ValueError, "seed is an empty list"),
    ],
)
def test_bad_seed_lists_are_one_line_errors(seed, error, message):
    ws = [torch.rand(5, 6) for _ in range(3)]
    with pytest.raises(error, match=message):
        nmf_batched(ws, 2, seed=seed)


def test_short_seed_list_for_an_iterator_fails_when_it_runs_out():
    ws = (torch.rand(5, 6) for _ in range(3))
    with pytest.raises(ValueError, match="seed has 2 entries but weights has at least 3"):
        nmf_batched(ws, 2, seed=[1, 2])
