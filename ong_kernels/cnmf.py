"""Consensus NMF (cNMF, Kotliar et al. 2019, eLife 8:e43803) on nmf_batched: many ranks x many
replicates of one matrix in one call, and cNMF's consensus step.

Followed: github.com/dylkot/cNMF `src/cnmf/cnmf.py` (`cNMF.consensus`, v1.6): replicates'
components (rows of H, cNMF's "spectra") are L2-normalised, outliers dropped by their mean
distance to their nearest neighbours (local_neighborhood_size = 0.30 of the replicates,
density_threshold 0.5, cNMF's defaults), clustered by scikit-learn's KMeans(k, n_init=10,
random_state=1) as cNMF's, the median of each cluster taken and normalised to sum 1; the
usages (W) are then solved with those components fixed. Deviation: cNMF refits the usages with
scikit-learn's non_negative_factorization(update_H=False); here nmf_batched's fixed-H mode
(update_h=False) runs the same MU rule on our kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from ong_kernels.nmf import nmf_batched
from ong_kernels.nmf_rules import Factors

LOCAL_NEIGHBORHOOD_SIZE = 0.30
DENSITY_THRESHOLD = 0.5


def replicates(v: torch.Tensor, ranks: Iterable[int], n_replicates: int, *, seed: int = 0,
               **settings) -> dict[int, list[Factors]]:  # fmt: skip
    """Every rank in `ranks` x `n_replicates` seeded starts of V, in ONE nmf_batched call
    (each replicate stops on its own), grouped by rank: {k: [(W, H)] * n_replicates}.
    Replicate j of rank k uses seed `seed + index`, index its place in the call. `settings`
    are nmf_batched's (beta_loss, tol, max_iter, backend, ...)."""
    ranks = list(ranks)
    per_matrix = [k for k in ranks for _ in range(n_replicates)]
    seeds = [seed + i for i in range(len(per_matrix))]
    factors = nmf_batched([v] * len(per_matrix), per_matrix, seed=seeds, **settings)
    return {k: factors[i * n_replicates : (i + 1) * n_replicates] for i, k in enumerate(ranks)}


def consensus(v: torch.Tensor, runs: list[Factors], *,
              density_threshold: float = DENSITY_THRESHOLD, **settings) -> Factors:  # fmt: skip
    """cNMF's consensus of one rank's replicates `runs` (module docstring): (W, H) with H the
    k consensus components (each summing to 1) and W the usages solved for them with H fixed.
    `settings` are nmf_batched's for that solve (beta_loss, max_iter, tol, ...)."""
    from sklearn.cluster import KMeans

    k = runs[0][1].shape[0]
    spectra = torch.cat([h for _, h in runs]).double().cpu().numpy()
    norms = np.sqrt((spectra**2).sum(axis=1, keepdims=True))
    l2 = spectra / np.where(norms > 0, norms, 1.0)
    if density_threshold < 2:  # cNMF skips the filter at thresholds >= 2 (the largest distance)
        neighbours = max(1, int(LOCAL_NEIGHBORHOOD_SIZE * l2.shape[0] / k))
        # unit rows: |a - b|^2 = 2 - 2 a.b (an (R k)^2 Gram, not an (R k)^2 x n difference)
        distances = np.sqrt(np.clip(2.0 - 2.0 * (l2 @ l2.T), 0.0, None))
        nearest = np.sort(distances, axis=1)[:, 1 : neighbours + 1]
        kept = nearest.mean(axis=1) < density_threshold
        if kept.sum() < k:
            raise ValueError(
                f"density_threshold={density_threshold} keeps {int(kept.sum())} of "
                f"{l2.shape[0]} components, fewer than k={k}: raise it"
            )
        l2 = l2[kept]
    labels = KMeans(n_clusters=k, n_init=10, random_state=1).fit_predict(l2)
    median = np.stack([np.median(l2[labels == c], axis=0) for c in range(k)])
    median /= np.where(median.sum(axis=1, keepdims=True) > 0, median.sum(axis=1, keepdims=True),
                       1.0)  # fmt: skip
    h = torch.from_numpy(median).to(dtype=torch.float32, device=v.device)
    w0 = torch.full((v.shape[0], k), math.sqrt(float(v.double().mean()) / k), device=v.device)
    ((w, h),) = nmf_batched([v], k, init=[(w0, h)], update_h=False, **settings)
    return w, h
