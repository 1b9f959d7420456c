"""Consensus ONG (issue 19): restarts=k scores by the mean of k random restarts' W H, all
solved in one nmf_batched call; restarts=1 is today's ONG; exact counts; the restarts'
agreement with the consensus mask; bad values named in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ong_kernels import nmf
from ong_kernels.pruning import SCOPES, mask_overlap, ong_masks, ong_scores, prune
from ong_kernels.pruning.allocation import select_top
from ong_kernels.pruning.ong import mean_product, restart_seeds
from ong_kernels.train.config import TrainConfig
from ong_kernels.train.sweep import plan_runs

FAST = {"rank": 0.3, "max_iter": 25, "tol": 0.0}


def net(seed: int = 0) -> nn.Module:
    """Odd shapes (a 1x1 conv, a 3x3 conv, two linears): 1,437 prunable weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 7, 3),
        nn.Conv2d(7, 11, 1),
        nn.Flatten(),
        nn.Linear(11, 13),
        nn.Linear(13, 5),
        nn.Linear(5, 9 * 9),
    )


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_one_restart_is_todays_ong_exactly():
    model = net()
    today = ong_scores(model, **FAST)
    one = ong_scores(model, restarts=1, **FAST)
    assert list(one) == list(today)
    assert all(torch.equal(one[n], today[n]) for n in today)
    a = prune(net(), "ong", 0.9, **FAST)
    b = prune(net(), "ong", 0.9, restarts=1, **FAST)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert b.agreement is None and all(r.agreement is None for r in b.report)
    assert "agreement" not in b.table() and "restarts" not in repr(b)


def test_consensus_is_the_mean_of_single_restarts_in_one_call(monkeypatch):
    calls = []
    real = nmf.nmf_batched

    def spy(mats, rank, **kw):
        calls.append((list(mats), list(rank), kw))
        return real(mats, rank, **kw)

    monkeypatch.setattr(nmf, "nmf_batched", spy)
    k, seed = 3, 11
    model = net()
    scores = ong_scores(model, restarts=k, seed=seed, **FAST)
    assert len(calls) == 1  # every restart of every matrix in one call
    mats, ranks, kw = calls[0]
    ws = weights(model)
    assert len(mats) == k * len(ws)
    for i, w in enumerate(ws):
        assert all(mats[i * k + j] is mats[i * k] for j in range(k))  # the same |W|, no copy
        assert torch.equal(mats[i * k], w.abs())
    assert kw["init"] == "random" and list(kw["seed"]) == [seed, seed + 1, seed + 2] * len(ws)
    monkeypatch.undo()
    for (name, score), w, r in zip(scores.items(), ws, ranks[::k], strict=True):
        single = [
            real([w.abs()], r, init="random", seed=seed + j, max_iter=25, tol=0.0)[0]
            for j in range(k)
        ]
        # Each restart equals its own single call (per-matrix seeds), so bit for bit:
        assert torch.equal(score, mean_product(single).reshape(w.shape)), name
        by_hand = sum((wf @ hf) for wf, hf in single) / k
        torch.testing.assert_close(score, by_hand.reshape(w.shape), rtol=1e-5, atol=1e-7)


def test_seeds_far_apart_use_disjoint_starts_and_masks_differ():
    assert restart_seeds(4, 3) == [4, 5, 6]
    a = ong_masks(net(), 0.9, restarts=2, seed=0, **FAST)
    b = ong_masks(net(), 0.9, restarts=2, seed=2, **FAST)
    again = ong_masks(net(), 0.9, restarts=2, seed=0, **FAST)
    assert all(torch.equal(a[n], again[n]) for n in a)  # deterministic
    assert mask_overlap(a, b) < 1.0  # other starts, another (nearby) mask


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_exact_counts_with_restarts(scope, sparsity):
    model = net()
    before = [w.clone() for w in weights(model)]
    result = prune(model, "ong", sparsity, scope, restarts=4, **FAST)
    numels = [w.numel() for w in before]
    kept = [int(m.sum()) for m in result.masks.values()]
    n = sum(numels)
    if scope == "global":
        assert sum(kept) == n - round(sparsity * n)
    elif scope == "layer":
        assert kept == [max(1, ni - round(sparsity * ni)) for ni in numels]
    else:
        assert sum(kept) == n - round(sparsity * n) or min(kept) == 1
    for w0, w, m in zip(before, weights(model), result.masks.values(), strict=True):
        assert torch.equal(w[~m], torch.zeros_like(w[~m])) and torch.equal(w[m], w0[m])
    # The consensus mask is the allocation of the consensus scores.
    scores = ong_scores(net(), restarts=4, **FAST)
    assert result.report[0].kept == kept[0]
    masks = ong_masks(net(), sparsity, scope=scope, restarts=4, **FAST)
    assert all(torch.equal(masks[k_], result.masks[k_]) for k_ in masks)
    assert list(scores) == list(masks)


def test_agreement_is_each_restarts_iou_at_the_consensus_counts():
    k, seed = 3, 5
    model = net()
    ws = [w.clone() for w in weights(model)]
    result = prune(model, "ong", 0.8, "global", restarts=k, seed=seed, **FAST)
    agreement = result.agreement
    assert agreement is not None and agreement.restarts == k
    masks = list(result.masks.values())
    counts = [int(m.sum()) for m in masks]
    per_layer, inter, union = [], [0] * k, [0] * k
    for w, mask, c in zip(ws, masks, counts, strict=True):
        ious = []
        for j in range(k):
            alone = ong_scores([("w", w)], init="random", seed=seed + j, **FAST)["w"]
            top = select_top(alone.reshape(-1), c)
            i_ = int((top & mask.reshape(-1)).sum())
            ious.append(i_ / (2 * c - i_))
            inter[j] += i_
            union[j] += 2 * c - i_
        per_layer.append(sum(ious) / k)
    assert [r.agreement for r in result.report] == pytest.approx(per_layer, abs=1e-6)
    assert agreement.per_layer == pytest.approx(per_layer, abs=1e-6)
    overall = [i_ / u for i_, u in zip(inter, union, strict=True)]
    assert agreement.per_restart == pytest.approx(overall, abs=1e-5)
    assert agreement.mean == pytest.approx(sum(overall) / k, abs=1e-5)
    assert 0.0 < agreement.mean < 1.0
    # Shown to the user: a column in the table, the mean in the one-line repr.
    table = result.table()
    assert "agreement" in table.splitlines()[0] and f"{agreement.mean:.4f}" in table
    text = repr(result)
    assert f"restarts={k}" in text and f"agreement={agreement.mean:.3f}" in text
    assert "\n" not in text and len(text) < 240


def test_ong_consensus_method_and_train_config():
    a = prune(net(), "ong-consensus", 0.9, restarts=3, **FAST)
    b = prune(net(), "ong", 0.9, restarts=3, init="random", **FAST)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert a.agreement == b.agreement and a.method == "ong-consensus"
    cfg = TrainConfig(method="ong-consensus", sparsity=0.9, epochs=1)
    assert cfg.run_name().endswith("ong-consensus-0.9-seed0")
    runs = plan_runs(cfg, ["ong", "ong-consensus", "magnitude"], [0.9], [0, 1])
    assert sorted({r.method for r in runs}) == ["magnitude", "ong", "ong-consensus"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"restarts": 0}, ValueError, "restarts"),
        ({"restarts": -2}, ValueError, "restarts"),
        ({"restarts": 2.0}, TypeError, "restarts"),
        ({"restarts": "4"}, TypeError, "restarts"),
        ({"restarts": True}, TypeError, "restarts"),
        ({"restarts": 2, "init": "nndsvda"}, ValueError, "init"),
        ({"restarts": 2, "init": "nndsvd"}, ValueError, "init"),
        ({"restarts": 3, "seed": 2**64 - 2}, ValueError, "seed"),
    ],
)
def test_bad_restarts_is_a_one_line_error_before_any_change(monkeypatch, kwargs, error, match):
    monkeypatch.setattr(nmf, "nmf_batched", lambda *a, **k: pytest.fail("NMF ran"))
    model = net()
    before = [w.clone() for w in weights(model)]
    with pytest.raises(error, match=match) as info:
        prune(model, "ong", 0.9, **kwargs)
    assert "\n" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    with pytest.raises(error, match=match):
        ong_scores(net(), **kwargs)


# ----------------------------------------------------------------------------- ong-mask


class _Checkpoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 24, bias=False)
        self.b = nn.Linear(24, 40)
        self.c = nn.Linear(40, 24)
        self.norm = nn.LayerNorm(24)


@pytest.fixture
def checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _Checkpoint()
    path = tmp_path / "model.safetensors"
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(path))
    return model, path


def _mask_cli(path, out, *extra):
    from ong_kernels.mask_cli import main

    args = [str(path), "--sparsity", "0.6", "--rank", "3", "--max-iter", "15", "--no-progress"]
    return main([*args, "-o", str(out), *extra])


def test_ong_mask_restarts_equals_prune_restarts(checkpoint, tmp_path, capsys):
    import copy
    import re

    from ong_kernels.pruning import load_masks

    model, path = checkpoint
    out = tmp_path / "masks.safetensors"
    # 178KB: groups [a a a], [b], [b], ... (cpu kernel model): b's restarts straddle groups.
    assert _mask_cli(path, out, "--restarts", "3", "--seed", "4", "--memory-budget", "178KB") == 0
    text = capsys.readouterr().out
    masks = load_masks(out)
    names = ["a.weight", "b.weight", "c.weight"]
    ref = prune(copy.deepcopy(model), "ong", 0.6, rank=3, max_iter=15, restarts=3, seed=4,
                include=names)  # fmt: skip
    assert sorted(masks) == names
    assert all(torch.equal(ref.masks[n], masks[n]) for n in names)
    line = next(s for s in text.splitlines() if s.startswith("restarts: 3"))
    assert "seeds 4..6" in line
    mean, lowest = map(float, re.findall(r"(?:mean|restart) ([0-9.]+)", line))
    assert mean == pytest.approx(ref.agreement.mean, abs=1e-4)
    assert lowest == pytest.approx(min(ref.agreement.per_restart), abs=1e-4)
    # One restart: no stability line, today's masks.
    assert _mask_cli(path, out, "--restarts", "1") == 0
    assert "restarts:" not in capsys.readouterr().out
    today = prune(copy.deepcopy(model), "ong", 0.6, rank=3, max_iter=15, include=names)
    assert all(torch.equal(today.masks[n], m) for n, m in load_masks(out).items())


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--restarts", "0"], "--restarts"),
        (["--restarts", "two"], "--restarts"),
        (["--restarts", "2", "--init", "nndsvda"], "init"),
        (["--restarts", "2", "--method", "magnitude"], "--restarts"),
    ],
)
def test_ong_mask_bad_restarts_is_one_line(checkpoint, tmp_path, capsys, extra, match):
    _, path = checkpoint
    out = tmp_path / "masks.safetensors"
    try:
        code = _mask_cli(path, out, *extra)
    except SystemExit as exc:  # argparse's usage error
        code = exc.code
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[-1] and err[-1].startswith("ong-mask: error")


def test_streamed_consensus_scores_equal_in_memory_ones():
    from ong_kernels.pruning import stream

    ws = weights(net())
    expected = list(ong_scores(net(), restarts=3, seed=2, **FAST).values())
    settings = stream.OngSettings.consensus(rank=0.3, max_iter=25, tol=0.0, seed=2, restarts=3)
    budget = stream.Streaming(memory_budget=200_000)  # several groups
    shapes = [w.shape for w in ws]
    lazily = stream.ong_factors(iter(ws), settings, budget, count=len(ws))
    got = stream.ong_score_passes(lazily, shapes, restarts=3)()
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    factors = stream.ong_factors(ws, settings, budget)
    passes = stream.ong_score_passes(factors, shapes, restarts=3)
    assert all(torch.equal(g, e) for g, e in zip(passes(), expected, strict=True))
    with pytest.raises(ValueError, match="count"):
        stream.ong_factors(iter(ws), settings, budget)
    with pytest.raises(ValueError, match="init"):
        stream.ong_factors(ws, dataclasses.replace(settings, init="nndsvda"), budget)


def test_ong_mask_restarts_under_torchrun_equal_one_process(tmp_path):
    # Each rank factorises its share's restarts (count = its tensors); rank 0 prints the
    # stability line of all layers. The helpers are the torchrun tests' own.
    from test_mask_cli_distributed import assert_same_masks, one_process, torchrun, write

    ckpt = write(tmp_path / "model.safetensors")
    args = [str(ckpt), "--sparsity", "0.5", "--rank", "3", "--max-iter", "20", "--no-progress",
            "--restarts", "3"]  # fmt: skip
    assert one_process([*args, "-o", str(tmp_path / "one.safetensors")]) == 0
    proc = torchrun([*args, "-o", str(tmp_path / "two.safetensors")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_masks(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    assert proc.stdout.count("restarts: 3 (init random, seeds 0..2)") == 1
