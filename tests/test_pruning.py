"""prune() end to end on small odd models: exact counts, determinism, side effects, errors,
masks_for / mask_overlap / save_masks / load_masks, and ONG against magnitude."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import ong_kernels
from ong_kernels import nmf
from ong_kernels.pruning import (
    METHODS,
    SCOPES,
    erk_densities,
    load_masks,
    mask_overlap,
    masks_for,
    masks_from_scores,
    ong_masks,
    ong_scores,
    prunable_parameters,
    prune,
    save_masks,
)

SPARSITIES = [0.0, 0.5, 0.9, 0.98, 0.999]
# Short runs keep the 90-case grid fast; the defaults are exercised in other tests.
FAST = {
    "ong": {"max_iter": 30},
    "ong-consensus": {"max_iter": 30, "restarts": 3},
    "synflow": {"iterations": 10},
}


class OddNet(nn.Module):
    """Conv + 1x1 shortcut + BatchNorm + dropout + two linears, odd channel counts: 7662
    prunable weights in 6 layers, enough for 0.999 to keep 8 (one per layer and 2 more)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 9, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(9)
        self.conv2 = nn.Conv2d(9, 17, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(9, 17, 1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(17)
        self.conv3 = nn.Conv2d(17, 33, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(33, 21)
        self.fc2 = nn.Linear(21, 7)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x) + self.shortcut(x)))
        y = F.relu(self.conv3(y)).mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(self.drop(y))))


PRUNABLE = [
    "conv1.weight",
    "conv2.weight",
    "shortcut.weight",
    "conv3.weight",
    "fc1.weight",
    "fc2.weight",
]


def odd_net(seed: int = 0) -> OddNet:
    torch.manual_seed(seed)
    return OddNet()


def batches(seed: int = 0, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 3, 11, 11, generator=g), torch.randint(0, 7, (5,), generator=g))
        for _ in range(n)
    ]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        # Exact equality, NaN included (a test plants one).
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=f"{k} changed")


def run(model, method, sparsity=0.9, scope="global", **kw):
    kw = {**FAST.get(method, {}), **kw}
    if method in ("snip", "grasp", "synflow"):
        kw.setdefault("data", batches())
    return prune(model, method, sparsity, scope, **kw)


# ----------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method", METHODS)
def test_exact_counts(method, scope, sparsity):
    model = odd_net()
    before = state(model)
    result = run(model, method, sparsity, scope)
    assert list(result.masks) == PRUNABLE
    numels = [before[n].numel() for n in PRUNABLE]
    kept = [int(m.sum()) for m in result.masks.values()]
    n = sum(numels)
    assert all(k >= 1 for k in kept)  # the default floor
    if scope == "global":
        assert sum(kept) == n - round(sparsity * n)
    elif scope == "layer":
        assert kept == [max(1, ni - round(sparsity * ni)) for ni in numels]
    else:
        shapes = [tuple(before[name].shape) for name in PRUNABLE]
        for k, d, ni in zip(kept, erk_densities(shapes, sparsity), numels, strict=True):
            assert k == 1 or abs(k - d * ni) < 1.0
        if min(kept) > 1:
            assert sum(kept) == n - round(sparsity * n)
    # The report agrees with the masks, and the model holds exactly the masked weights.
    assert [r.name for r in result.report] == PRUNABLE
    assert [r.kept for r in result.report] == kept
    assert [r.numel for r in result.report] == numels
    assert result.report[0].sparsity == pytest.approx(1 - kept[0] / numels[0])
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.equal(params[name][~mask], torch.zeros_like(params[name][~mask]))
        assert torch.equal(params[name][mask], before[name][mask])  # bit-identical


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_and_leaves_everything_else_alone(method):
    model_a, model_b = odd_net(), odd_net()
    model_a.train()
    before = state(model_a)
    grad_state = [p.grad for p in model_a.parameters()]
    rng_before = torch.get_rng_state()
    a = run(model_a, method, 0.9, seed=3)
    b = run(model_b, method, 0.9, seed=3)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in PRUNABLE)
    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout ran on a forked RNG
    assert model_a.training and all(m.training for m in model_a.modules())
    assert [p.grad for p in model_a.parameters()] == grad_state
    assert all(p.requires_grad for p in model_a.parameters())
    # Only the pruned weights changed: biases, BatchNorm weights and running stats did not.
    after = model_a.state_dict()
    for k, v in before.items():
        if k in a.masks:
            assert torch.equal(after[k], v * a.masks[k])
        else:
            assert torch.equal(after[k], v), f"{k} changed"


def test_seed_changes_random_and_snip_under_dropout():
    r0, r1 = run(odd_net(), "random", seed=0), run(odd_net(), "random", seed=1)
    assert mask_overlap(r0, r1) < 0.2  # independent 10% subsets overlap ~5%
    s0, s1 = run(odd_net(), "snip", seed=0), run(odd_net(), "snip", seed=1)
    assert mask_overlap(s0, s1) < 1.0  # different dropout draws


def test_frozen_parameters_are_still_scored():
    model = odd_net()
    for p in model.parameters():
        p.requires_grad_(False)
    result = run(model, "snip")
    assert sum(r.kept for r in result.report) == 7662 - round(0.9 * 7662)
    assert not any(p.requires_grad for p in model.parameters())


def test_tied_weights_are_pruned_once():
    lin = nn.Linear(6, 6, bias=False)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    result = prune(model, "magnitude", 0.5)
    assert list(result.masks) == ["0.weight"]
    assert int(result.masks["0.weight"].sum()) == 18


# ----------------------------------------------------------------------------- ONG


def test_ong_scores_are_one_nmf_batched_call(monkeypatch):
    calls = []
    real = nmf.nmf_batched

    def spy(weights, rank, **kw):
        calls.append((list(weights), rank, kw))
        return real(weights, rank, **kw)

    monkeypatch.setattr(nmf, "nmf_batched", spy)
    model = odd_net()
    weights = [p.detach().clone() for n, p in model.named_parameters() if n in PRUNABLE]
    scores = ong_scores(model, rank=0.3, max_iter=40, tol=0.0)
    assert len(calls) == 1
    got_weights, ranks, kw = calls[0]
    assert len(got_weights) == len(PRUNABLE)
    assert all(torch.equal(g, w.abs()) for g, w in zip(got_weights, weights, strict=True))
    mins = [min(w.shape[0], w[0].numel()) for w in weights]
    assert ranks == [max(1, round(0.3 * m)) for m in mins]
    assert kw == {
        "max_iter": 40, "tol": 0.0, "init": "nndsvda", "seed": 0, "backend": "auto",
        "precision": "ieee", "beta_loss": "frobenius", "alpha_W": 0.0, "alpha_H": "same",
        "l1_ratio": 0.0, "update_h": True,
        "names": [n for n, _ in model.named_parameters() if n in PRUNABLE],
    }  # fmt: skip
    # score = W_f @ H_f of a reference factorisation with the same arguments.
    factors = real([w.abs() for w in weights], ranks, max_iter=40, tol=0.0, init="nndsvda")
    for (_name, score), w, (wf, hf) in zip(scores.items(), weights, factors, strict=True):
        assert score.shape == w.shape and not torch.isnan(score).any()
        torch.testing.assert_close(score, (wf @ hf).reshape(w.shape), rtol=1e-5, atol=1e-7)


def test_ong_full_rank_reproduces_magnitude_low_rank_does_not():
    g = torch.Generator().manual_seed(1)
    named = [
        ("a", torch.randn(7, 5, generator=g)),
        ("b", torch.randn(9, 13, generator=g)),
        ("c", torch.randn(5, 3, 3, 3, generator=g)),
        ("d", torch.randn(11, 6, generator=g)),
    ]
    full = ong_scores(named, rank=1.0, max_iter=500, tol=0.0)
    low = ong_scores(named, rank=1)
    for sparsity in (0.5, 0.9):
        mag = masks_from_scores({n: t.abs() for n, t in named}, sparsity)
        assert mask_overlap(masks_from_scores(full, sparsity), mag) > 0.97
        assert mask_overlap(masks_from_scores(low, sparsity), mag) < 0.7


def test_ong_masks_does_not_modify_and_matches_prune():
    model = odd_net()
    before = state(model)
    masks = ong_masks(model, 0.8, max_iter=30)
    assert_state_equal(model, before)
    result = prune(model, "ong", 0.8, max_iter=30)
    assert all(torch.equal(masks[n], result.masks[n]) for n in PRUNABLE)


# ----------------------------------------------------------------------------- selection


def test_include_exclude():
    model = odd_net()
    names = lambda **kw: [n for n, _ in prunable_parameters(model, **kw)]  # noqa: E731
    assert names() == PRUNABLE
    assert names(exclude=nn.Linear) == PRUNABLE[:4]
    assert names(exclude=["fc2", "shortcut.*"]) == PRUNABLE[:2] + PRUNABLE[3:5]
    assert names(include=nn.Conv2d, exclude="conv1") == PRUNABLE[1:4]
    assert names(include=["fc*.bias", nn.Linear]) == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    result = prune(model, "magnitude", 0.5, include="conv3")
    assert list(result.masks) == ["conv3.weight"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("ong", 1.0), {}, ValueError, "sparsity"),
        (("ong", -0.01), {}, ValueError, "sparsity"),
        (("magnitude", float("nan")), {}, ValueError, "sparsity"),
        (("magnitude", "0.9"), {}, TypeError, "sparsity"),
        (("obd", 0.9), {}, ValueError, "method"),
        (("magnitude", 0.9, "channel"), {}, ValueError, "scope"),
        (("snip", 0.9), {}, ValueError, "needs data"),
        (("grasp", 0.9), {}, ValueError, "needs data"),
        (("grasp", 0.9), {"data": torch.ones(3)}, TypeError, "data"),
        (("synflow", 0.9), {}, ValueError, "input_shape"),
        (("ong", 0.9), {"ranks": 4}, TypeError, "ranks"),
        (("magnitude", 0.9), {"rank": 4}, TypeError, "rank"),
        (("ong", 0.9), {"rank": 0}, ValueError, "rank"),
        (("ong", 0.9), {"rank": 1.5}, ValueError, "rank"),
        (("ong", 0.9), {"init": "svd"}, ValueError, "init"),
        (("ong", 0.9), {"max_iter": 0}, ValueError, "max_iter"),
        (("grasp", 0.9), {"data": batches(), "temperature": 0}, ValueError, "temperature"),
        (("synflow", 0.9), {"input_shape": (3, 11, 11), "iterations": 0}, ValueError, "iterations"),
        (("magnitude", 0.999), {"min_density": 0.5}, ValueError, "min_density"),
        (("magnitude", 0.9), {"min_density": -1}, ValueError, "min_density"),
        (("magnitude", 0.9), {"include": 3}, TypeError, "include"),
        (("magnitude", 0.9), {"include": "nothing.here"}, ValueError, "nothing to prune"),
        (("magnitude", 0.9), {"seed": -1}, ValueError, "seed"),
        (("snip", 0.9), {"data": batches(), "loss_fn": "ce"}, TypeError, "loss_fn"),
        (("snip", 0.9), {"data": []}, ValueError, "no batches"),
        (("snip", 0.9), {"data": [(torch.ones(1),)]}, ValueError, "pair"),
        (("random", 0.9), {"seed": 2**64}, ValueError, r"seed must be <= 2\*\*64 - 1"),
        (("random", 0.9), {"seed": 1.0}, TypeError, "seed must be an int"),
        (("ong", 0.9), {"tol": float("nan")}, ValueError, "tol must be finite"),
        (("ong", 0.9), {"max_iter": True}, TypeError, "max_iter must be an int"),
        (("ong", 0.9), {"backend": "tpu"}, ValueError, "backend"),
        (("grasp", 0.9), {"data": batches(), "temperature": True}, TypeError, "temperature"),
        # An (inputs, targets, extra) batch: named as such, not "batch 0 is a Tensor".
        (("snip", 0.9), {"data": (*batches()[0], torch.ones(5))}, ValueError, "3 items"),
        (("grasp", 0.9), {"data": [(*batches()[0], torch.ones(5))]}, ValueError, "3 items"),
    ],
)
def test_bad_input_leaves_model_untouched(args, kwargs, error, match):
    model = odd_net()
    before = state(model)
    with pytest.raises(error, match=match):
        prune(model, *args, **kwargs)
    assert_state_equal(model, before)


def test_meta_and_sparse_weights_are_named_not_dumped():
    with pytest.raises(ValueError, match=r"conv1\.weight is a meta tensor"):
        prune(odd_net().to("meta"), "magnitude", 0.5)
    model = odd_net()
    model.fc1.weight = nn.Parameter(model.fc1.weight.detach().to_sparse())
    with pytest.raises(ValueError, match=r"fc1\.weight has layout torch\.sparse_coo"):
        prune(model, "ong", 0.5)


def test_infeasible_floor_fails_before_any_scoring(monkeypatch):
    monkeypatch.setattr(nmf, "nmf_batched", lambda *a, **k: pytest.fail("NMF ran"))
    with pytest.raises(ValueError, match="per-layer minimum"):
        prune(odd_net(), "ong", 0.999, min_density=0.5)


def test_nothing_prunable_and_not_a_model():
    with pytest.raises(ValueError, match="nothing to prune"):
        prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "magnitude", 0.5)
    with pytest.raises(TypeError, match="model"):
        prune({"w": torch.ones(3)}, "magnitude", 0.5)


def test_nan_scores_leave_model_untouched():
    model = odd_net()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match=r"fc1\.weight.*NaN"):
        prune(model, "magnitude", 0.5)
    assert_state_equal(model, before)


# ----------------------------------------------------------------------------- masks_for


def test_masks_for_feeds_fused_masked_sgd():
    model = odd_net()
    result = prune(model, "magnitude", 0.9)
    masks = masks_for(model, result)
    params = dict(model.named_parameters())
    assert {id(p) for p in masks} == {id(params[n]) for n in PRUNABLE}
    assert all(torch.equal(masks[params[n]], result.masks[n]) for n in PRUNABLE)

    opt = ong_kernels.FusedMaskedSGD(model.parameters(), lr=0.1, momentum=0.9, masks=masks)
    x, y = batches(n=1)[0]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n in PRUNABLE:
        pruned = params[n][~result.masks[n]]
        assert torch.equal(pruned, torch.zeros_like(pruned))

    with pytest.raises(ValueError, match="does not have"):
        masks_for(model, {"fc3.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        masks_for(model, {"fc2.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        masks_for(model, {"fc2.weight": torch.ones(7, 21)})


# ----------------------------------------------------------------------------- mask_overlap


def test_mask_overlap_hand_examples():
    t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    a = {"x": t(1, 1, 0, 0), "y": t(0, 1), "only_a": t(1)}
    b = {"x": t(1, 0, 1, 0), "y": t(0, 1), "only_b": t(0)}
    assert mask_overlap(a, b) == pytest.approx(2 / 4)  # over x and y: |{x0, y1}| / |{x0,x1,x2,y1}|
    assert mask_overlap(a, a) == 1.0
    assert mask_overlap({"x": t(0, 0)}, {"x": t(0, 0)}) == 1.0
    assert mask_overlap({"x": t(1, 0)}, {"x": t(0, 1)}) == 0.0
    with pytest.raises(ValueError, match="in common"):
        mask_overlap({"x": t(1)}, {"z": t(1)})
    with pytest.raises(ValueError, match="shape"):
        mask_overlap({"x": t(1)}, {"x": t(1, 0)})


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    masks = {
        "odd.weight": torch.rand(7, 3, 3, 3, generator=g) > 0.5,  # 189 bits: not whole bytes
        "vec": torch.rand(13, generator=g) > 0.3,
        "eight": torch.ones(8, dtype=torch.bool),
        "one": torch.zeros(1, dtype=torch.bool),
    }
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks)
    loaded = load_masks(path)
    assert list(loaded) == list(masks)
    for n in masks:
        assert loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n])
    # Bit-packed little-endian in row-major order: readable without ong_kernels.
    from safetensors.numpy import load_file

    raw = load_file(str(path))
    bits = np.unpackbits(raw["odd.weight"], bitorder="little")[:189].astype(bool)
    assert np.array_equal(bits, masks["odd.weight"].numpy().reshape(-1))
    assert raw["odd.weight"].nbytes == math.ceil(189 / 8)


def test_save_load_prune_result_and_errors(tmp_path):
    model = odd_net()
    result = prune(model, "magnitude", 0.9)
    path = tmp_path / "r.safetensors"
    save_masks(path, result)
    assert path.stat().st_size < 7662 / 8 + 1024  # packed, plus header
    loaded = load_masks(path)
    assert mask_overlap(loaded, result.masks) == 1.0
    with pytest.raises(TypeError, match="bool"):
        save_masks(tmp_path / "x.safetensors", {"w": torch.ones(3)})
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, str(foreign))
    with pytest.raises(ValueError, match="not an ong_kernels masks file"):
        load_masks(foreign)


def test_mask_files_written_by_format_1_still_load():
    # tests/data/masks_v1.safetensors was written by save_masks before the format moved to
    # the optimizer's bit order (version 1: numpy.packbits order, most significant bit first).
    g = torch.Generator().manual_seed(7)
    expected = {
        "conv.weight": torch.rand(5, 3, 3, 3, generator=g) > 0.5,
        "fc.weight": torch.rand(7, 11, generator=g) > 0.7,
        "one": torch.tensor([True]),
    }
    path = Path(__file__).parent / "data" / "masks_v1.safetensors"
    loaded = load_masks(path)
    assert list(loaded) == list(expected)
    for name, mask in expected.items():
        assert torch.equal(loaded[name], mask), name


def test_mask_files_use_the_optimizer_bit_order(tmp_path):
    from safetensors import safe_open

    from ong_kernels._bitmask import pack_mask

    g = torch.Generator().manual_seed(3)
    masks = {"a": torch.rand(3, 5, 7, generator=g) > 0.5, "b": torch.rand(13, generator=g) > 0.2}
    # A channels_last mask is stored in logical order: the file does not depend on strides.
    masks["c"] = (torch.rand(2, 3, 4, 5, generator=g) > 0.5).to(memory_format=torch.channels_last)
    save_masks(tmp_path / "m.safetensors", masks)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata()["version"] == "2" and f.metadata()["bit_order"] == "little"
        for name, mask in masks.items():
            assert torch.equal(f.get_tensor(name), pack_mask(mask.contiguous()))
    loaded = load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded[n], m) for n, m in masks.items())


def test_prune_result_repr_is_short():
    result = prune(odd_net(), "magnitude", 0.9)
    text = repr(result)
    assert "tensor" not in text and len(text) < 200 and "\n" not in text
    assert "method='magnitude'" in text and "sparsity=0.9" in text and "layers=6" in text
