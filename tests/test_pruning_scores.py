"""SNIP, GraSP and SynFlow against hand-computed gradients on a tiny two-layer MLP.

The references never call autograd: gradients are the closed-form backward pass of
x -> relu(x W1^T) -> (. W2^T) / T -> cross-entropy, the Hessian-gradient product a central
finite difference of that gradient, and SynFlow's path-sum derivatives are written out.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ong_kernels.pruning import (
    grasp_scores,
    magnitude_scores,
    prune,
    random_scores,
    snip_scores,
    synflow_scores,
)


def mlp(d_in=4, hidden=5, d_out=3, dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden, bias=False, dtype=dtype),
        nn.ReLU(),
        nn.Linear(hidden, d_out, bias=False, dtype=dtype),
    )


def batches(n_batches=2, size=6, d_in=4, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, d_in, generator=g, dtype=torch.float64),
            torch.randint(0, d_out, (size,), generator=g),
        )
        for _ in range(n_batches)
    ]


def manual_grads(w1, w2, data, temperature=1.0):
    """d/dW of sum over batches of mean cross-entropy(relu(x W1^T) W2^T / T, y), by hand."""
    g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
    for x, y in data:
        z1 = x @ w1.T
        h = z1.clamp_min(0)
        logits = h @ w2.T / temperature
        p = torch.softmax(logits, dim=1)
        dlogits = (p - nn.functional.one_hot(y, w2.shape[0]).to(p.dtype)) / x.shape[0]
        dz2 = dlogits / temperature
        g2 += dz2.T @ h
        dz1 = (dz2 @ w2) * (z1 > 0).to(z1.dtype)
        g1 += dz1.T @ x
    return g1, g2


def weights(model):
    return model[0].weight.detach().clone(), model[2].weight.detach().clone()


def assert_scores(got: torch.Tensor, expected: torch.Tensor, what: str):
    assert not torch.isnan(got).any(), what
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9 * scale, msg=what)


def test_snip_is_abs_gradient_times_weight_summed_over_batches():
    model, data = mlp(), batches()
    w1, w2 = weights(model)
    g1, g2 = manual_grads(w1, w2, data)
    scores = snip_scores(model, data)
    assert list(scores) == ["0.weight", "2.weight"]
    assert_scores(scores["0.weight"], (g1 * w1).abs(), "layer 0")
    assert_scores(scores["2.weight"], (g2 * w2).abs(), "layer 2")
    # A single (x, y) pair is one batch.
    one = snip_scores(model, data[0])
    g1, _ = manual_grads(w1, w2, data[:1])
    assert_scores(one["0.weight"], (g1 * w1).abs(), "single batch")


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_is_weight_times_hessian_gradient(temperature):
    model, data = mlp(seed=1), batches(seed=1)
    w1, w2 = weights(model)
    for x, _ in data:  # no pre-activation near the ReLU kink: finite differences are exact
        assert float((x @ w1.T).abs().min()) > 1e-3
    g1, g2 = manual_grads(w1, w2, data, temperature)
    eps = (
        1e-6
        * max(float(w1.abs().max()), float(w2.abs().max()))
        / max(float(g1.abs().max()), float(g2.abs().max()))
    )
    plus = manual_grads(w1 + eps * g1, w2 + eps * g2, data, temperature)
    minus = manual_grads(w1 - eps * g1, w2 - eps * g2, data, temperature)
    hg1, hg2 = ((p - m) / (2 * eps) for p, m in zip(plus, minus, strict=True))
    scores = grasp_scores(model, data, temperature=temperature)
    # Higher = kept, so the paper's S = -w * Hg (largest removed) comes back negated.
    tol = dict(rtol=1e-5, atol=1e-7 * float(hg1.abs().max() * w1.abs().max()))
    torch.testing.assert_close(scores["0.weight"], w1 * hg1, **tol)
    torch.testing.assert_close(scores["2.weight"], w2 * hg2, **tol)
    assert not torch.isnan(scores["0.weight"]).any()


def test_grasp_prune_removes_the_largest_paper_scores():
    model, data = mlp(d_in=9, hidden=11, seed=2), batches(d_in=9, seed=2)
    paper = {n: -s for n, s in grasp_scores(model, data).items()}  # S = -w * Hg
    result = prune(model, "grasp", 0.5, data=data, min_density=0.0)
    flat_s = torch.cat([s.reshape(-1) for s in paper.values()])
    flat_keep = torch.cat([m.reshape(-1) for m in result.masks.values()])
    assert float(flat_s[flat_keep].max()) <= float(flat_s[~flat_keep].min())


def synflow_reference(a1, a2):
    """SynFlow scores of relu(|W2| relu(|W1| 1)) summed: R = 1^T |W2| |W1| 1 (all positive),
    dR/dW1[i, j] = sum_k |W2|[k, i], dR/dW2[k, i] = (|W1| 1)_i; score = |dR/dW * W|."""
    return a1 * a2.sum(dim=0)[:, None], a2 * a1.sum(dim=1)[None, :]


def test_synflow_single_round_is_the_path_sum_derivative():
    model = mlp(d_in=6, hidden=7, d_out=5, dtype=torch.float32, seed=3)
    w1, w2 = weights(model)
    scores = synflow_scores(model, 0.5, iterations=1, input_shape=(6,))
    e1, e2 = synflow_reference(w1.double().abs(), w2.double().abs())
    assert scores["0.weight"].dtype == torch.float64  # computed in float64
    assert_scores(scores["0.weight"], e1, "layer 0")
    assert_scores(scores["2.weight"], e2, "layer 2")


def test_synflow_iterative_schedule_matches_hand_loop():
    model = mlp(d_in=9, hidden=11, d_out=5, dtype=torch.float32, seed=4)
    w1, w2 = (w.double().abs() for w in weights(model))
    sparsity, rounds = 0.8, 5
    m1, m2 = torch.ones_like(w1, dtype=torch.bool), torch.ones_like(w2, dtype=torch.bool)
    n = w1.numel() + w2.numel()
    for k in range(1, rounds + 1):
        s1, s2 = synflow_reference(w1 * m1, w2 * m2)
        s1, s2 = s1.masked_fill(~m1, -math.inf), s2.masked_fill(~m2, -math.inf)
        kept = n - round((1 - (1 - sparsity) ** (k / rounds)) * n)
        flat = torch.cat([s1.reshape(-1), s2.reshape(-1)])
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:kept]] = True
        m1, m2 = keep[: w1.numel()].reshape(w1.shape), keep[w1.numel() :].reshape(w2.shape)
    data = [(torch.randn(2, 9), torch.zeros(2, dtype=torch.int64))]  # only its shape is used
    result = prune(model, "synflow", sparsity, data=data, iterations=rounds, min_density=0.0)
    assert torch.equal(result.masks["0.weight"], m1)
    assert torch.equal(result.masks["2.weight"], m2)
    one_shot = prune(
        mlp(9, 11, 5, torch.float32, seed=4), "synflow", sparsity, iterations=1, input_shape=(9,)
    )
    assert not all(torch.equal(one_shot.masks[k], result.masks[k]) for k in result.masks)


def test_magnitude_and_random_scores():
    model = mlp(dtype=torch.float32)
    mag = magnitude_scores(model)
    assert torch.equal(mag["0.weight"], model[0].weight.detach().abs())
    r0, r1 = random_scores(model, seed=7), random_scores(model, seed=7)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert r0["0.weight"].shape == (5, 4) and float(r0["0.weight"].min()) >= 0


class _TokenModel(nn.Module):
    """A language-model-shaped net: its first layer takes token ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("how", ["data", "input_shape"])
def test_synflow_on_token_ids_says_it_feeds_an_all_ones_float_input(how):
    model = _TokenModel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 20, (4, 6))
    kwargs = {"data": (ids, torch.zeros(4, dtype=torch.int64))} if how == "data" else {}
    with pytest.raises(ValueError, match="synflow feeds the model an all-ones") as err:
        prune(model, "synflow", 0.5, iterations=2, input_shape=(6,) if how != "data" else None,
              **kwargs)  # fmt: skip
    assert "token ids" in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # untouched
