"""Allocation: exact counts, deterministic ties, ERK densities, per-layer floors.

References are written independently of ong_kernels.pruning.allocation: selection by a
stable descending sort, ERK checked by its defining properties and a hand-solved example.
"""

from __future__ import annotations

import math

import pytest
import torch

from ong_kernels.pruning import allocate, erk_densities, masks_from_scores
from ong_kernels.pruning.allocation import kept_counts, pruned_total, select_top

SPARSITIES = [0.0, 0.5, 0.9, 0.98, 0.999]
SHAPES = [(9, 3, 3, 3), (17, 9, 3, 3), (17, 9, 1, 1), (33, 17, 3, 3), (21, 33), (7, 21)]


def ref_select(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Top k by a stable descending sort: equal scores keep their index order."""
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    order = torch.sort(flat, descending=True, stable=True).indices
    keep[order[:k]] = True
    return keep


def tied_scores(shapes, seed: int, levels: int = 5) -> list[torch.Tensor]:
    """Scores from a handful of values, so that almost every threshold falls inside a tie."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, levels, s, generator=g).float() for s in shapes]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("n", [1, 2, 7, 8, 1001])
@pytest.mark.parametrize("levels", [1, 3, 1000])
def test_select_top_matches_stable_sort(n, levels):
    g = torch.Generator().manual_seed(n * 31 + levels)
    scores = torch.randint(0, levels, (n,), generator=g).float()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        got = select_top(scores, k)
        assert int(got.sum()) == k
        assert torch.equal(got, ref_select(scores, k)), f"n={n} levels={levels} k={k}"


def test_select_top_float64_and_inf():
    scores = torch.tensor([-math.inf, 3.0, 1e300, -math.inf, 2.0, math.inf], dtype=torch.float64)
    assert select_top(scores, 2).tolist() == [False, False, True, False, False, True]
    assert select_top(scores, 5).tolist() == [True, True, True, False, True, True]


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_global_exact_count_and_ties(sparsity):
    scores = tied_scores(SHAPES, seed=1)
    n = sum(s.numel() for s in scores)
    k = n - round(sparsity * n)
    # Without per-layer floors: exactly the stable-sort selection over the concatenation.
    masks = allocate(scores, sparsity, "global", min_density=0.0)
    assert [tuple(m.shape) for m in masks] == SHAPES
    assert all(m.dtype == torch.bool for m in masks)
    assert torch.equal(flat(masks), ref_select(flat(scores), k))
    # With the default floor (one weight per layer) the total is still exact.
    masks = allocate(scores, sparsity, "global")
    assert int(flat(masks).sum()) == k
    assert all(int(m.sum()) >= 1 for m in masks)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_layer_exact_counts(sparsity):
    scores = tied_scores(SHAPES, seed=2)
    masks = allocate(scores, sparsity, "layer")
    for s, m in zip(scores, masks, strict=True):
        n = s.numel()
        k = max(1, n - round(sparsity * n))  # default floor: one weight per layer
        assert int(m.sum()) == k
        assert torch.equal(m.reshape(-1), ref_select(s.reshape(-1), k))


def test_erk_hand_solved():
    # raw densities 20/100 = 0.2 and 200/10000 = 0.02; at sparsity 0.5 the first layer's
    # density eps * 0.2 = 5050 / 220 * 0.2 > 1, so it becomes dense and the second takes the
    # rest: (5050 - 100) / 10000 = 0.495.
    d = erk_densities([(10, 10), (100, 100)], 0.5)
    assert d[0] == 1.0
    assert d[1] == pytest.approx(0.495, abs=1e-12)
    masks = allocate([torch.rand(10, 10), torch.rand(100, 100)], 0.5, "erk")
    assert [int(m.sum()) for m in masks] == [100, 4950]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, 0.98, 0.999])
def test_erk_properties(sparsity):
    # The RigL solution: total density 1 - sparsity, density proportional to
    # sum(shape)/prod(shape) on the non-dense layers, and only the layers with the largest
    # raw densities dense.
    d = erk_densities(SHAPES, sparsity)
    numels = [math.prod(s) for s in SHAPES]
    raw = [sum(s) / n for s, n in zip(SHAPES, numels, strict=True)]
    total = sum(di * n for di, n in zip(d, numels, strict=True))
    assert total == pytest.approx((1 - sparsity) * sum(numels), rel=1e-9)
    assert all(0 < di <= 1 for di in d)
    sparse = [i for i in range(len(d)) if d[i] < 1]
    ratios = [d[i] / raw[i] for i in sparse]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    dense = [i for i in range(len(d)) if d[i] == 1]
    if dense and sparse:
        assert min(raw[i] for i in dense) >= max(raw[i] for i in sparse)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_erk_counts_exact_total(sparsity):
    scores = tied_scores(SHAPES, seed=3)
    masks = allocate(scores, sparsity, "erk", min_density=0.0)
    numels = [s.numel() for s in scores]
    n = sum(numels)
    kept = [int(m.sum()) for m in masks]
    assert sum(kept) == n - round(sparsity * n)
    for k, di, ni in zip(kept, erk_densities(SHAPES, sparsity), numels, strict=True):
        assert abs(k - di * ni) < 1.0
    for s, m, k in zip(scores, masks, kept, strict=True):
        assert torch.equal(m.reshape(-1), ref_select(s.reshape(-1), k))


def test_global_floor_keeps_every_layer_alive():
    # Layer 1 scores far below everything else: a plain global selection would empty it.
    scores = [torch.rand(50) + 10, torch.rand(40) - 10, torch.rand(30) + 10]
    scores[1][7] = scores[1][3] = scores[1].max() + 1  # a tie for its best score
    masks = allocate(scores, 0.9, "global")
    assert sum(int(m.sum()) for m in masks) == 120 - round(0.9 * 120)
    assert int(masks[1].sum()) == 1 and bool(masks[1][3])  # the first of the tied best
    rest = torch.cat([scores[0], scores[2]])
    assert torch.equal(torch.cat([masks[0], masks[2]]), ref_select(rest, 12 - 1))

    emptied = allocate(scores, 0.9, "global", min_density=0.0)
    assert int(emptied[1].sum()) == 0

    floored = allocate(scores, 0.9, "global", min_density=0.1)  # ceil(0.1 * 40) = 4
    assert int(floored[1].sum()) == 4
    assert int(floored[0].sum()) >= 5 and int(floored[2].sum()) >= 3
    assert sum(int(m.sum()) for m in floored) == 12


def ref_global_with_floors(scores, sparsity, floors) -> torch.Tensor:
    """The definition: each layer's top `floor` first, then the best of all the others."""
    sizes = [s.numel() for s in scores]
    n = sum(sizes)
    k = n - round(sparsity * n)
    forced = torch.cat([ref_select(s.reshape(-1), f) for s, f in zip(scores, floors, strict=True)])
    keep = forced.clone()
    rest = (~forced).nonzero().squeeze(1)
    keep[rest[ref_select(flat(scores)[rest], k - int(forced.sum()))]] = True
    return keep


@pytest.mark.parametrize("seed", range(12))
def test_global_floor_path_matches_definition(seed):
    # Layers on very different score scales (some collapse under one global threshold),
    # many ties, random floors.
    g = torch.Generator().manual_seed(seed)
    n_layers = int(torch.randint(2, 7, (1,), generator=g))
    scores = []
    for _ in range(n_layers):
        size = int(torch.randint(1, 60, (1,), generator=g))
        scale = float(10 ** torch.randint(-3, 3, (1,), generator=g))
        scores.append(torch.randint(0, 4, (size,), generator=g).float() * scale)
    n = sum(s.numel() for s in scores)
    min_density = [None, 0.05, 0.2][seed % 3]
    floors = [1 if min_density is None else math.ceil(min_density * s.numel()) for s in scores]
    floors = [min(f, s.numel()) for f, s in zip(floors, scores, strict=True)]
    for sparsity in (0.5, 0.8, 0.9, 0.97):
        if sum(floors) > n - round(sparsity * n):
            with pytest.raises(ValueError, match="per-layer minimum"):
                allocate(scores, sparsity, min_density=min_density)
            continue
        got = flat(allocate(scores, sparsity, min_density=min_density))
        assert torch.equal(got, ref_global_with_floors(scores, sparsity, floors)), sparsity


def test_layer_floor_raises_count():
    masks = allocate([torch.rand(10), torch.rand(1000)], 0.99, "layer")
    assert [int(m.sum()) for m in masks] == [1, 10]  # round(0.99 * 10) = 10 -> floor 1
    masks = allocate([torch.rand(10), torch.rand(1000)], 0.99, "layer", min_density=0.3)
    assert [int(m.sum()) for m in masks] == [3, 300]


def test_floor_infeasible_is_an_error():
    with pytest.raises(ValueError, match="per-layer minimum"):
        allocate([torch.rand(10), torch.rand(10)], 0.95, "global")  # keeps 1, floors need 2


def test_min_density_ceil_is_not_fooled_by_rounding():
    # 0.1 * 30 is 3.0000000000000004 in floating point: the floor is 3 weights.
    masks = allocate([torch.rand(30), torch.rand(1000)], 0.99, "layer", min_density=0.1)
    assert int(masks[0].sum()) == 3


def test_sparsity_zero_keeps_everything():
    scores = [torch.randn(3, 5), torch.full((4,), -math.inf), torch.zeros(2, 2)]
    for scope in ("global", "layer", "erk"):
        assert all(bool(m.all()) for m in allocate(scores, 0.0, scope))


def test_minus_inf_never_beats_a_finite_score():
    scores = [torch.tensor([-math.inf, 1.0, -math.inf, -5.0]), torch.tensor([-math.inf, 0.0])]
    masks = allocate(scores, 0.5, "global", min_density=0.0)
    assert masks[0].tolist() == [False, True, False, True]
    assert masks[1].tolist() == [False, True]


def test_nan_scores_are_an_error_naming_the_layer():
    scores = [torch.rand(5), torch.tensor([1.0, float("nan")])]
    with pytest.raises(ValueError, match=r"fc\.weight.*NaN"):
        allocate(scores, 0.5, names=["conv.weight", "fc.weight"])


def test_mixed_dtypes_and_masks_are_independent():
    scores = [torch.rand(6, dtype=torch.bfloat16), torch.rand(5, dtype=torch.float64) * 1e300]
    masks = allocate(scores, 0.5, "global", min_density=0.0)
    assert sum(int(m.sum()) for m in masks) == 11 - round(0.5 * 11)
    assert bool(masks[1].all())  # 1e300-scale scores survive (no float32 overflow to inf ties)
    masks[0].fill_(True)
    assert int(masks[1].sum()) == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": float("nan")}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, TypeError, "sparsity"),
        ({"sparsity": True}, TypeError, "sparsity"),
        ({"sparsity": 0.5, "scope": "row"}, ValueError, "scope"),
        ({"sparsity": 0.5, "min_density": 1.5}, ValueError, "min_density"),
        ({"sparsity": 0.5, "min_density": "1"}, TypeError, "min_density"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        allocate([torch.rand(4)], **kwargs)


def test_masks_from_scores_keeps_names_and_order():
    scores = {"b.weight": torch.rand(3, 4), "a.weight": torch.rand(5)}
    masks = masks_from_scores(scores, 0.5)
    assert list(masks) == ["b.weight", "a.weight"]
    assert sum(int(m.sum()) for m in masks.values()) == 17 - round(0.5 * 17)
    with pytest.raises(TypeError, match=r"a\.weight"):
        masks_from_scores({"a.weight": torch.ones(3, dtype=torch.int64)}, 0.5)


def test_kept_counts_layer_and_erk():
    shapes = [(3, 5), (101,), (7, 7, 3)]
    assert kept_counts(shapes, 0.5, "layer", None) == [15 - 8, 101 - 50, 147 - 74]
    erk = kept_counts(shapes, 0.5, "erk", 0.0)
    assert sum(erk) == 263 - round(0.5 * 263)


@pytest.mark.parametrize("scope", ["global", "layer", "erk"])
@pytest.mark.parametrize("min_density", [None, 0.0, 0.3])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_pruned_total_is_what_allocate_prunes(scope, min_density, sparsity):
    shapes = [(5, 3, 3, 3), *SHAPES]  # a 135-weight layer, so floors bind at 0.98
    scores = tied_scores(shapes, seed=3)
    try:
        masks = allocate(scores, sparsity, scope, min_density=min_density)
    except ValueError:  # the floors alone exceed the global budget: no total to give
        assert scope == "global" and min_density == 0.3
        return
    pruned = sum(int((~m).sum()) for m in masks)
    assert pruned_total(shapes, sparsity, scope, min_density) == pruned
