"""Per-matrix seeds: k restarts of one matrix in one call equal k single calls, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ong_kernels import backends_available, nmf_batched

BACKENDS = [b for b in ("reference", "cpu", "triton") if backends_available("nmf_mu")[b]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["random", "nndsvda"])
def test_restarts_in_one_call_equal_single_calls(backend, init):
    v = torch.rand(70, 90)  # 70 > 4 * (3 + 10): the NNDSVD start takes the randomized SVD
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
