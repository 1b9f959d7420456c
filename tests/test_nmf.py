"""nmf_batched (reference backend) against scikit-learn and against itself one matrix at a time.

scikit-learn is the oracle here and a required test dependency (pyproject's [test] extra,
installed by `make test`): without it this module fails to import, loudly, instead of
skipping every test in it (including those that do not use scikit-learn).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import sklearn.decomposition as sklearn_nmf
import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

import ong_kernels
from ong_kernels.nmf import as_matrix, nmf_batched_with_info


def sklearn_mu(v: torch.Tensor, w0: torch.Tensor, h0: torch.Tensor, max_iter: int, tol: float):
    """scikit-learn's NMF(solver="mu") from the given start; returns (W, H, n_iter)."""
    model = sklearn_nmf.NMF(
        n_components=w0.shape[1],
        init="custom",
        solver="mu",
        beta_loss="frobenius",
        max_iter=max_iter,
        tol=tol,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = model.fit_transform(
            v.numpy().astype(np.float32),
            W=w0.numpy().astype(np.float32).copy(),
            H=h0.numpy().astype(np.float32).copy(),
        )
    return torch.from_numpy(w), torch.from_numpy(model.components_), model.n_iter_


def random_start(m: int, n: int, r: int):
    v = torch.rand(m, n)
    return v, torch.rand(m, r) + 0.1, torch.rand(r, n) + 0.1


@pytest.mark.parametrize(
    ("iters", "rtol"),
    # float32 rounding compounds over iterations: the tolerance grows with them.
    [(1, 1e-5), (10, 1e-4), (200, 2e-2)],
)
@pytest.mark.parametrize(("m", "n", "r"), [(37, 53, 5), (64, 27, 16), (9, 200, 3)])
def test_matches_sklearn_factors(iters, rtol, m, n, r):
    v, w0, h0 = random_start(m, n, r)
    ((w, h),), _ = nmf_batched_with_info([v], r, max_iter=iters, tol=0, init=[(w0, h0)])
    w_ref, h_ref, n_iter = sklearn_mu(v, w0, h0, iters, 0.0)
    assert n_iter == iters
    assert_close(w, w_ref, atol=1e-5, rtol=rtol, what="W")
    assert_close(h, h_ref, atol=1e-5, rtol=rtol, what="H")
    # The reconstruction is better conditioned than the factors: the contract is 1e-3 relative.
    err = torch.linalg.norm(v - w @ h)
    err_ref = torch.linalg.norm(v - w_ref @ h_ref)
    assert abs(float(err - err_ref)) <= 1e-3 * float(err_ref)


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_stopping_rule_matches_sklearn(tol):
    v, w0, h0 = random_start(41, 29, 4)
    _, n_iter = nmf_batched_with_info([v], 4, max_iter=500, tol=tol, init=[(w0, h0)])
    _, _, n_iter_ref = sklearn_mu(v, w0, h0, 500, tol)
    assert n_iter == [n_iter_ref]


def test_converged_matrices_stop_while_others_continue():
    # Same shape, so one bucket: the two matrices stop at different checks (measured: 210 and
    # 70 iterations at rank 4, tol 1e-3); each must end as if it had been factorised alone.
    easy = torch.rand(30, 1) @ torch.rand(1, 40)
    hard = torch.rand(30, 40)
    factors, n_iter = nmf_batched_with_info(
        [easy, hard], 4, max_iter=1000, tol=1e-3, init="nndsvda"
    )
    assert n_iter[0] != n_iter[1]
    for i, v in enumerate([easy, hard]):
        (alone,), alone_iter = nmf_batched_with_info(
            [v], 4, max_iter=1000, tol=1e-3, init="nndsvda"
        )
        assert n_iter[i] == alone_iter[0]
        assert_close(factors[i][0], alone[0], atol=1e-6, rtol=1e-5, what=f"W[{i}]")
        assert_close(factors[i][1], alone[1], atol=1e-6, rtol=1e-5, what=f"H[{i}]")


def test_ragged_batch_equals_each_matrix_alone():
    # odd shapes, a 1-row and a 1-column matrix, repeated shapes (one bucket), a conv weight,
    # a 1-D tensor, and ranks larger than min(m, n) (clipped).
    tensors = [
        torch.rand(7, 3, 3, 3),
        torch.rand(1, 17),
        torch.rand(23, 1),
        torch.rand(13, 11),
        torch.rand(13, 11),
        torch.rand(5),
        torch.rand(31, 2, 1, 1),
    ]
    ranks = [4, 3, 6, 9, 2, 8, 3]
    batched = ong_kernels.nmf_batched(tensors, ranks, max_iter=30, tol=0, seed=3)
    for i, t in enumerate(tensors):
        ((w1, h1),) = ong_kernels.nmf_batched([t], ranks[i], max_iter=30, tol=0, seed=3)
        m, n = as_matrix(t).shape
        r = min(ranks[i], m, n)
        w, h = batched[i]
        assert w.shape == (m, r) and h.shape == (r, n)
        assert w.dtype == h.dtype == torch.float32
        assert_close(w, w1, atol=1e-6, rtol=1e-5, what=f"W[{i}]")
        assert_close(h, h1, atol=1e-6, rtol=1e-5, what=f"H[{i}]")


def plain_mu(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor, iters: int):
    """An independent per-matrix oracle: the textbook update, written out."""
    eps = torch.finfo(torch.float32).eps
    w, h = w.clone(), h.clone()
    for _ in range(iters):
        den = w @ (h @ h.T)
        w = w * (v @ h.T) / torch.where(den == 0, eps, den)
        den = (w.T @ w) @ h
        h = h * (w.T @ v) / torch.where(den == 0, eps, den)
    return w, h


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6)), min_size=1, max_size=5
    ),
    iters=st.integers(1, 15),
    seed=st.integers(0, 2**16),
)
def test_property_batched_equals_textbook_mu(shapes, iters, seed):
    gen = torch.Generator().manual_seed(seed)
    vs, inits = [], []
    for m, n, r in shapes:
        r = min(r, m, n)
        vs.append(torch.rand(m, n, generator=gen))
        inits.append(
            (torch.rand(m, r, generator=gen) + 0.05, torch.rand(r, n, generator=gen) + 0.05)
        )
    factors = ong_kernels.nmf_batched(vs, [s[2] for s in shapes], max_iter=iters, tol=0, init=inits)
    for i, (v, (w0, h0)) in enumerate(zip(vs, inits, strict=True)):
        w_ref, h_ref = plain_mu(v, w0, h0, iters)
        assert_close(
            factors[i][0] @ factors[i][1], w_ref @ h_ref, atol=1e-5, rtol=1e-4, what=f"WH[{i}]"
        )


def test_error_never_increases():
    v = torch.rand(30, 40)
    errors = []
    for iters in (1, 5, 20, 80):
        ((w, h),) = ong_kernels.nmf_batched([v], 6, max_iter=iters, tol=0, seed=1)
        errors.append(float(torch.linalg.norm(v - w @ h)))
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(errors))


def test_random_init_is_seeded_and_scaled_like_sklearn():
    v = torch.rand(50, 40) * 3
    a = ong_kernels.nmf_batched([v], 5, max_iter=1, tol=0, seed=7)
    b = ong_kernels.nmf_batched([v], 5, max_iter=1, tol=0, seed=7)
    c = ong_kernels.nmf_batched([v], 5, max_iter=1, tol=0, seed=8)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    assert not torch.equal(a[0][0], c[0][0])
    from ong_kernels.nmf_init import random_start

    w0, h0 = random_start(v, 5, 0)
    # |N(0,1)| has mean sqrt(2/pi); scikit-learn scales it by sqrt(mean(V)/r).
    expected = (2 / np.pi) ** 0.5 * (float(v.mean()) / 5) ** 0.5
    assert abs(float(torch.cat([w0.flatten(), h0.flatten()]).mean()) / expected - 1) < 0.1
    assert bool((w0 >= 0).all() and (h0 >= 0).all())


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda"])
def test_nndsvd_matches_sklearn_init(init):
    from sklearn.decomposition._nmf import _initialize_nmf

    from ong_kernels.nmf_init import initial_factors

    v = torch.rand(33, 21)
    ((w, h),) = initial_factors([v], [5], init, seed=0)
    w_ref, h_ref = _initialize_nmf(v.numpy(), 5, init=init, random_state=0)
    # scikit-learn takes a randomized SVD, we take the exact one: close, not identical.
    assert_close(w @ h, torch.from_numpy(w_ref @ h_ref).float(), atol=1e-3, rtol=1e-2, what="W0 H0")


@pytest.mark.parametrize("init", ["random", "nndsvd", "nndsvda"])
def test_all_zero_matrix_factorises_without_nan(init):
    zeros = torch.zeros(6, 9)
    factors, n_iter = nmf_batched_with_info(
        [zeros, torch.rand(6, 9)], 3, max_iter=50, tol=1e-4, init=init
    )
    w, h = factors[0]
    assert torch.isfinite(w).all() and torch.isfinite(h).all()
    assert float((w @ h).abs().max()) == 0.0
    assert n_iter[0] == 10  # exact from the start: stops at the first check


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_give_float32_factors(dtype):
    v = torch.rand(12, 10, dtype=dtype)
    ((w, h),) = ong_kernels.nmf_batched([v], 3, max_iter=5, tol=0)
    ((w32, h32),) = ong_kernels.nmf_batched([v.float()], 3, max_iter=5, tol=0)
    assert w.dtype == h.dtype == torch.float32
    assert torch.equal(w, w32) and torch.equal(h, h32)


def test_inputs_are_not_modified():
    v = torch.rand(8, 6)
    w0, h0 = torch.rand(8, 2), torch.rand(2, 6)
    copies = [t.clone() for t in (v, w0, h0)]
    ong_kernels.nmf_batched([v], 2, max_iter=5, tol=0, init=[(w0, h0)])
    for t, c in zip((v, w0, h0), copies, strict=True):
        assert torch.equal(t, c)


def test_nmf_op_passes_opcheck():
    from ong_kernels import _ops

    vs = [torch.rand(5, 7), torch.rand(3, 4)]
    ws = [torch.rand(5, 2), torch.rand(3, 2)]
    hs = [torch.rand(2, 7), torch.rand(2, 4)]
    torch.library.opcheck(_ops.nmf_mu_, (vs, ws, hs, 3, 0.0))
