"""NNDSVD starts from a seeded randomized SVD (issue 16): accuracy against the exact SVD on a
known spectrum, determinism, independence of the batch, and scikit-learn's structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ong_kernels import nmf_batched
from ong_kernels.nmf_init import (
    NNDSVD_EPS,
    gram_svd,
    initial_factors,
    nndsvd_start,
    randomized_svd,
    sketch_width,
    use_exact_svd,
)


def _known_spectrum(m: int, n: int, decay: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return (u * s) @ v.T, s


@pytest.mark.parametrize(("m", "n"), [(300, 120), (120, 300)])
def test_randomized_svd_recovers_leading_triplets(m, n):
    a, s_true = _known_spectrum(m, n, decay=0.8)
    r = 8
    u, s, vh = randomized_svd(a.float(), r, seed=3)
    assert u.shape == (m, r) and s.shape == (r,) and vh.shape == (r, n)
    torch.testing.assert_close(s.double(), s_true[:r], rtol=1e-4, atol=1e-6)
    # Subspaces: the projection of the exact singular vectors onto ours is the identity.
    ue, _, vhe = torch.linalg.svd(a, full_matrices=False)
    overlap_u = (ue[:, :r].T @ u.double()).abs()
    overlap_v = (vhe[:r] @ vh.double().T).abs()
    assert float((overlap_u.diagonal() - 1).abs().max()) < 1e-3
    assert float((overlap_v.diagonal() - 1).abs().max()) < 1e-3


def test_randomized_svd_is_deterministic_for_a_seed():
    a = torch.rand(200, 150)
    first = randomized_svd(a, 6, seed=11)
    again = randomized_svd(a, 6, seed=11)
    other = randomized_svd(a, 6, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_exact_svd_rule():
    assert use_exact_svd(64, 4096, 2)  # small side
    assert use_exact_svd(512, 4608, 128)  # ResNet-18 at rank 0.25: the sketch is a quarter
    assert not use_exact_svd(4096, 11008, 16)
    assert not use_exact_svd(768, 3072, 16)


def test_sketch_width_fills_the_cpu_products_lanes():
    from ong_kernels.backends.cpu_nmf import SKETCH_LANES

    assert sketch_width(4096, 11008, 16) == 32  # 16 + 16 columns: no padding left
    assert sketch_width(4096, 4096, 64) == 96  # 64 + 32
    assert sketch_width(4096, 4096, 17) == 48  # never fewer than 16 beyond r
    assert sketch_width(40, 30, 20) == 30  # never more than the short side
    for r in range(1, 300, 7):
        width, extra = sketch_width(5000, 6000, r), max(16, r // 2)
        assert width % SKETCH_LANES == 0 and r + extra <= width < r + extra + SKETCH_LANES


def test_power_step_basis_spans_its_input_and_falls_back_to_householder(monkeypatch):
    from ong_kernels import nmf_init

    g = torch.Generator().manual_seed(4)
    x = torch.rand(1100, 32, generator=g) + 0.1 * torch.randn(1100, 32, generator=g)
    householder = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda t: householder.append(1) or real_qr(t))
    q = nmf_init._basis(x, orthonormal=False)  # well conditioned: CholeskyQR
    assert not householder and q.shape == x.shape
    gap = (q.T @ q - torch.eye(32)).abs().max()
    assert torch.isfinite(gap) and gap < 1e-3
    # q spans x: x's projection onto q's span leaves float32 rounding.
    projected = q @ torch.linalg.lstsq(q, x).solution
    assert (projected - x).norm() < 1e-4 * x.norm()
    # Rank 31 (two equal columns): the Gram matrix is singular up to rounding (its Cholesky
    # factor's diagonal ratio, ~3e-4 here, is under the guard): Householder's Q instead.
    x[:, 5] = x[:, 7]
    q = nmf_init._basis(x, orthonormal=False)
    assert householder == [1]
    assert (q.T @ q - torch.eye(32)).abs().max() < 1e-5
    nmf_init._basis(torch.rand(50, 8, generator=g), orthonormal=True)  # the final basis
    assert householder == [1, 1]


def test_start_of_a_matrix_is_the_same_alone_and_in_any_batch():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(160, 130, generator=g)
    others = [torch.rand(160, 130, generator=g).half(), torch.rand(30, 20, generator=g)]
    ((w, h),) = initial_factors([a], [6], "nndsvda", seed=9)
    batch = initial_factors([others[0], a, others[1]], [6, 6, 6], "nndsvda", seed=[1, 9, 2])
    assert torch.equal(w, batch[1][0]) and torch.equal(h, batch[1][1])


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda"])
@pytest.mark.parametrize("shape", [(33, 21), (150, 140)])  # exact SVD / randomized SVD
def test_nndsvd_has_scikit_learns_structure(init, shape):
    from sklearn.decomposition._nmf import _initialize_nmf

    # Five well-separated singular values: their vectors are determined (a flat spectrum's are
    # not, and two sketches then pick different bases of the same subspace).
    g = torch.Generator().manual_seed(0)
    m, n = shape
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    v = (torch.rand(m, 5, generator=g, dtype=torch.float64) * scales) @ torch.rand(
        5, n, generator=g, dtype=torch.float64
    ) + 0.01 * torch.rand(m, n, generator=g, dtype=torch.float64)
    r = 5
    ((w, h),) = initial_factors([v.float()], [r], init, seed=0)
    w_ref, h_ref = _initialize_nmf(v.numpy(), r, init=init, random_state=0)
    w_ref, h_ref = torch.from_numpy(w_ref).float(), torch.from_numpy(h_ref).float()
    # The first pair is the leading singular pair in both (exactly determined).
    torch.testing.assert_close(w[:, 0], w_ref[:, 0], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(h[0], h_ref[0], rtol=2e-3, atol=2e-4)
    # The reconstruction of the start agrees; the fill rule: nndsvda has no zeros (the mean
    # fills them), nndsvd has zeros (where the entry fell below 1e-6), never a negative.
    torch.testing.assert_close(w @ h, w_ref @ h_ref, rtol=5e-2, atol=5e-3)
    assert bool((w >= 0).all() and (h >= 0).all())
    if init == "nndsvda":
        assert int((w == 0).sum() + (h == 0).sum()) == 0
        mean = float(v.float().mean())
        assert bool(torch.isclose(w[w_ref == float(np.float32(v.numpy().mean()))],
                                  torch.tensor(mean)).all())  # fmt: skip
    else:
        assert bool(((w == 0) == (w_ref < NNDSVD_EPS)).float().mean() > 0.9)


@pytest.mark.parametrize(("m", "n"), [(40, 60), (300, 90)])
def test_gram_svd_equals_lapack(m, n):
    a, _ = _known_spectrum(m, n, decay=0.97)
    v = (a + 0.1).abs().float()
    r = 12
    u, s, vh = gram_svd(v, r)
    ue, se, vhe = torch.linalg.svd(v.double(), full_matrices=False)
    torch.testing.assert_close(s.double(), se[:r], rtol=1e-5, atol=1e-6)
    # Vectors up to sign.
    signs = torch.sign((u.double() * ue[:, :r]).sum(0))
    torch.testing.assert_close(u.double() * signs, ue[:, :r], rtol=0, atol=1e-4)
    torch.testing.assert_close(vh.double() * signs[:, None], vhe[:r], rtol=0, atol=1e-4)


def test_exact_rule_gives_the_exact_svd_start():
    v = torch.rand(40, 60)
    assert use_exact_svd(40, 60, 5)
    w, h = nndsvd_start(v, 5, seed=0, fill_average=True)
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    root = s[0].sqrt()
    torch.testing.assert_close(w[:, 0], root * u[:, 0].abs(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h[0], root * vh[0].abs(), rtol=1e-5, atol=1e-6)


def test_solve_from_randomized_start_fits_like_the_exact_start(monkeypatch):
    from ong_kernels import nmf_init

    v = torch.rand(400, 300) ** 3
    assert not use_exact_svd(400, 300, 16)
    ((w, h),) = nmf_batched([v], 16, max_iter=200, tol=0, init="nndsvda")
    monkeypatch.setattr(nmf_init, "use_exact_svd", lambda m, n, r: True)
    ((we, he),) = nmf_batched([v], 16, max_iter=200, tol=0, init="nndsvda")
    err = float((v - w @ h).norm())
    exact = float((v - we @ he).norm())
    assert abs(err - exact) / exact < 1e-3, (err, exact)
