"""The cNMF helpers (ong_kernels/cnmf.py): ranks x replicates in one call, and the consensus."""

from __future__ import annotations

import pytest
import torch

from ong_kernels import nmf_batched
from ong_kernels.cnmf import consensus, replicates

pytest.importorskip("sklearn")


def parts_matrix(m=60, n=40, k=3, seed=0):
    """V = W H with k parts on disjoint column blocks: the consensus has one right answer."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.zeros(k, n)
    for c in range(k):
        h[c, c * (n // k) : (c + 1) * (n // k)] = torch.rand(n // k, generator=gen) + 0.5
    w = torch.rand(m, k, generator=gen)
    return w @ h, h


def test_replicates_are_grouped_by_rank_and_equal_single_calls():
    v, _ = parts_matrix()
    runs = replicates(v, range(2, 5), 3, seed=10, beta_loss=1, max_iter=50, tol=1e-4)
    assert sorted(runs) == [2, 3, 4]
    index = 0
    for k in (2, 3, 4):
        assert len(runs[k]) == 3
        for w, h in runs[k]:
            ((w1, h1),) = nmf_batched([v], k, seed=10 + index, beta_loss=1, max_iter=50,
                                      tol=1e-4)  # fmt: skip
            assert w.shape == (60, k) and torch.equal(w, w1) and torch.equal(h, h1)
            index += 1


def test_consensus_recovers_the_parts():
    v, h_true = parts_matrix()
    runs = replicates(v, [3], 12, beta_loss=1, max_iter=300, tol=1e-6)[3]
    w, h = consensus(v, runs, beta_loss=1, max_iter=300)
    assert w.shape == (60, 3) and h.shape == (3, 40)
    assert torch.allclose(h.sum(1), torch.ones(3), atol=1e-5)
    truth = h_true / h_true.sum(1, keepdim=True)
    cosine = torch.nn.functional.normalize(h, dim=1) @ torch.nn.functional.normalize(truth, dim=1).T
    assert (cosine.max(dim=1).values > 0.98).all(), cosine
    assert float(torch.linalg.norm(v - w @ h) / torch.linalg.norm(v)) < 0.05


def test_a_threshold_that_drops_everything_is_an_error():
    v, _ = parts_matrix()
    runs = replicates(v, [3], 4, max_iter=20)[3]
    with pytest.raises(ValueError, match=r"density_threshold=0\.0 keeps 0 of 12 components"):
        consensus(v, runs, density_threshold=0.0)
