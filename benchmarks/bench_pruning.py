"""prune() against its own NMF, allocation against a sort, and ONG mask stability.

* ``prune-ong``: ``prune(model, "ong", 0.9)`` end to end (scores + allocation + zeroing)
  against the one ``nmf_batched`` call inside it, with the same arguments (prune's ONG
  defaults: rank 0.25 of min(m, n), nndsvda, 200 iterations, tol 1e-4), and
  ``ours-prune-without-nmf``: prune with the NMF answered from a cache, i.e. the overhead.
  Target: ours-prune / nmf_batched within 1.2 on ResNet-18, i.e. overhead / nmf_batched
  within 0.2 - allocation and bookkeeping are not the bottleneck.
* ``allocate``: global / layer / ERK allocation of ResNet-18's 11.2M scores against the
  obvious alternative, a stable sort of all scores.
* ``ong-stability``: the overlap table of ``benchmarks/pruning_stability.py`` (ResNet-20 at
  init and after a short training on Fashion-MNIST), stored in the JSON's extra_info and
  printed; the time is that of computing the whole table.
"""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from benchmarks.pruning_stability import markdown, stability_table
from ong_kernels import nmf
from ong_kernels.pruning import allocate, prunable_parameters, prune
from ong_kernels.pruning.ong import DEFAULT_RANK, resolve_ranks
from ong_kernels.train.models import build_model

SPARSITY = 0.9
STABILITY_STEPS = 50


@cache
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name)  # CIFAR ResNet, Kaiming-normal init as the trainer builds it


def _expected_kept(model: torch.nn.Module) -> int:
    n = sum(p.numel() for _, p in prunable_parameters(model))
    return n - round(SPARSITY * n)


@pytest.mark.benchmark
@pytest.mark.parametrize("workload", ["resnet20", "resnet18"])
@pytest.mark.parametrize("provider", ["nmf_batched", "ours-prune", "ours-prune-without-nmf"])
def test_prune_vs_nmf(measure, monkeypatch, workload, provider, device):
    model = copy.deepcopy(_model(workload)).to(device)
    initial = copy.deepcopy(model.state_dict())
    targets = prunable_parameters(model)
    ranks = resolve_ranks(DEFAULT_RANK, [p.shape for _, p in targets])

    def nmf_alone():
        weights = [p.detach().abs() for _, p in targets]
        return nmf.nmf_batched(weights, ranks, max_iter=200, tol=1e-4, init="nndsvda", seed=0)

    if provider == "ours-prune-without-nmf":
        # Everything prune does besides the NMF (|W|, W_f @ H_f, allocation, zeroing, the
        # report), with nmf_batched answering from a cache: the overhead the target bounds,
        # measured on its own because this machine's load drifts over a 30 s NMF.
        factors = nmf_alone()
        monkeypatch.setattr(nmf, "nmf_batched", lambda weights, rank, **kw: factors)

    def prune_end_to_end():
        # Every round must prune the same dense weights; the restore is ~20 ms of ~30 s.
        model.load_state_dict(initial)
        return prune(model, "ong", SPARSITY)

    out = measure(
        nmf_alone if provider == "nmf_batched" else prune_end_to_end,
        kernel="prune-ong",
        provider=provider,
        workload=f"{workload} s={SPARSITY} global",
        device=device,
        rounds=2 if workload == "resnet18" and provider != "ours-prune-without-nmf" else 5,
        matrices=len(targets),
    )
    if provider == "nmf_batched":
        assert len(out) == len(targets)
        assert all(bool(torch.isfinite(w).all() and torch.isfinite(h).all()) for w, h in out)
    else:
        assert out.kept == _expected_kept(model)


def _sort_select(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """What a user would write: sort everything, keep the first k (stable: index ties)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = flat.numel() - round(sparsity * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return [
        m.reshape(s.shape)
        for m, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)
    ]


@pytest.mark.benchmark
@pytest.mark.parametrize("provider", ["ours-global", "ours-layer", "ours-erk", "stable-sort"])
def test_allocate(measure, provider, device):
    scores = [p.detach().abs().to(device) for _, p in prunable_parameters(_model("resnet18"))]
    if provider == "stable-sort":
        fn = lambda: _sort_select(scores, SPARSITY)  # noqa: E731
    else:
        scope = provider.split("-", 1)[1]
        fn = lambda: allocate(scores, SPARSITY, scope)  # noqa: E731
    masks = measure(
        fn,
        kernel="allocate",
        provider=provider,
        workload=f"resnet18 11.2M scores s={SPARSITY}",
        device=device,
        rounds=5,
    )
    n = sum(s.numel() for s in scores)
    kept = sum(int(m.sum()) for m in masks)
    if provider in ("ours-global", "stable-sort"):
        assert kept == n - round(SPARSITY * n)
    else:
        assert abs(kept - (n - round(SPARSITY * n))) <= len(scores)


@pytest.mark.benchmark
@pytest.mark.parametrize("device", [torch.device("cpu")], ids=["cpu"])
def test_ong_mask_stability(measure, benchmark, device):
    result = measure(
        lambda: stability_table(steps=STABILITY_STEPS, sparsity=SPARSITY),
        kernel="ong-stability",
        provider="ours",
        workload=f"resnet20 s={SPARSITY} init + {STABILITY_STEPS} steps",
        device=device,
        rounds=1,
    )
    benchmark.extra_info["stability"] = result["rows"]
    print("\n" + markdown(result))
    rows = {name: (a, b) for name, a, b in result["rows"]}
    chance = rows["random vs random (seeds 0, 1): the chance level"]
    assert all(0.0 <= v <= 1.0 for pair in rows.values() for v in pair)
    assert all(c < 0.1 for c in chance)  # d / (2 - d) = 0.053 at sparsity 0.9
