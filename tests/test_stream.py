"""Streaming: nmf_batched in budgeted groups; the exact streamed allocation (pruning.stream)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ong_kernels import nmf_batched, prune
from ong_kernels.nmf_groups import Streaming, solve_bytes
from ong_kernels.nmf_rules import matrix_shape
from ong_kernels.pruning import stream
from ong_kernels.pruning.allocation import allocate


def _weights():
    g = torch.Generator().manual_seed(3)
    return [
        torch.rand(37, 53, generator=g),
        torch.rand(8, 3, 3, 3, generator=g),
        torch.rand(37, 53, generator=g).half(),
        torch.rand(100, generator=g),
        torch.rand(64, 20, generator=g).double(),
    ]


def _largest(ws, r, init="random"):
    return max(solve_bytes([(*matrix_shape(t.shape), r, t.dtype)], init=init) for t in ws)


@pytest.mark.parametrize("init", ["random", "nndsvda"])
@pytest.mark.parametrize("as_generator", [False, True])
def test_budgeted_groups_equal_one_call(init, as_generator):
    ws = _weights()
    ref = nmf_batched(ws, 5, max_iter=30, init=init)
    budget = _largest(ws, 5, init)  # every group holds one or two matrices
    source = (t for t in ws) if as_generator else ws
    got = nmf_batched(source, 5, max_iter=30, init=init, memory_budget=budget)
    assert len(got) == len(ref)
    for (w0, h0), (w1, h1) in zip(ref, got, strict=True):
        assert torch.equal(w0, w1) and torch.equal(h0, h1)


def test_too_small_budget_errors_before_any_work():
    calls = []

    def gen():
        for t in _weights():
            calls.append(1)
            yield t

    ws = _weights()
    with pytest.raises(ValueError, match=r"weights\[0\].*needs .* bytes.*memory_budget"):
        nmf_batched(ws, 5, memory_budget=1000)
    # A sequence whose LAST matrix is too big fails before the first is solved.
    big = [*ws[:2], torch.rand(300, 300)]
    need = _largest(ws[:2], 5)
    with pytest.raises(ValueError, match=r"weights\[2\]"):
        nmf_batched(big, 5, memory_budget=need, init=[(None, None)] * 3)
    with pytest.raises(ValueError, match="needs"):
        nmf_batched(gen(), 5, memory_budget=1000)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="memory_budget"):
        nmf_batched(ws, 5, memory_budget=0)


def _tied_scores(trial: int):
    g = torch.Generator().manual_seed(trial)
    shapes = [(7, 5), (3,), (40, 9), (1, 1), (16, 3, 3)]
    scores = []
    for s in shapes:
        x = torch.randint(0, 4, s, generator=g).float() * 0.5  # many ties
        if trial % 3 == 0:
            x = x.half()
        if trial % 2 == 0:
            x = torch.where(torch.rand(s, generator=g) < 0.1, torch.tensor(-0.0), x)
            x = torch.where(torch.rand(s, generator=g) < 0.1, torch.tensor(float("-inf")), x)
        scores.append(x)
    if trial % 4 == 0:
        scores[3] = torch.full((1, 1), -5.0)  # falls below its floor under global scope
    return scores


@pytest.mark.parametrize("trial", range(5))
@pytest.mark.parametrize("scope", ["global", "layer", "erk"])
@pytest.mark.parametrize("min_density", [None, 0.0, 0.2])
def test_stream_masks_equal_allocate(trial, scope, min_density):
    scores = _tied_scores(trial)
    shapes = [s.shape for s in scores]
    for sparsity in (0.0, 0.1, 0.5, 0.77, 0.99):
        try:
            ref = allocate(scores, sparsity, scope, min_density=min_density)
        except ValueError:
            with pytest.raises(ValueError):
                list(
                    stream.stream_masks(
                        lambda: iter(scores), shapes, sparsity, scope, min_density=min_density
                    )
                )
            continue
        got = list(
            stream.stream_masks(
                lambda: iter(scores), shapes, sparsity, scope, min_density=min_density
            )
        )
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b), (sparsity, scope)
        n = sum(s.numel() for s in scores)
        if scope == "global" and min_density is None:
            assert sum(int(m.sum()) for m in got) == n - round(sparsity * n)


def test_stream_masks_float64_and_errors():
    scores = [s.double() for s in _tied_scores(1)]
    shapes = [s.shape for s in scores]
    ref = allocate(scores, 0.5)
    got = list(stream.stream_masks(lambda: iter(scores), shapes, 0.5, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    with pytest.raises(ValueError, match="dtype"):
        list(stream.stream_masks(lambda: iter(scores), shapes, 0.5))
    bad = [s.float() for s in scores]
    bad[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        list(stream.stream_masks(lambda: iter(bad), shapes, 0.5))
    with pytest.raises(ValueError, match="shape"):
        list(stream.stream_masks(lambda: iter(bad[::-1]), shapes, 0.5))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 47), nn.ReLU(), nn.Conv1d(3, 5, 3), nn.Linear(47, 11))


@pytest.mark.parametrize("as_generator", [False, True])
def test_streamed_ong_masks_equal_prune(as_generator):
    model = _model()
    result = prune(copy.deepcopy(model), "ong", 0.6, rank=4, max_iter=20)
    names = list(result.masks)
    params = dict(model.named_parameters())
    ws = [params[n] for n in names]
    source = (w for w in ws) if as_generator else ws
    settings = stream.OngSettings(rank=4, max_iter=20)
    budget = Streaming(memory_budget=int(1.5 * _largest(ws, 4, "nndsvda")))  # groups of 1-3
    factors = stream.ong_factors(source, settings, budget)
    shapes = [w.shape for w in ws]
    masks = list(stream.stream_masks(stream.ong_score_passes(factors, shapes), shapes, 0.6))
    for name, mask in zip(names, masks, strict=True):
        assert torch.equal(result.masks[name], mask), name
