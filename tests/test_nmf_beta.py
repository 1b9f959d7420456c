"""Beta-divergence MU and scikit-learn's regularisation (ong_kernels/nmf_beta.py) against
scikit-learn's own functions: the divergence, one update of W and of H, whole fits (factors and
n_iter from the same start), the fixed-H solve (transform), and the argument errors.

scikit-learn is the oracle (a required test dependency, as in test_nmf.py). Its functions run
on the same float32 arrays, so one update agrees to float32 rounding; fits compound it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close
from sklearn.decomposition import NMF as SkNMF
from sklearn.decomposition import _nmf as sk
from sklearn.exceptions import ConvergenceWarning

import ong_kernels
from ong_kernels.backends import reference_beta
from ong_kernels.nmf import nmf_batched, nmf_batched_with_info
from ong_kernels.nmf_beta import BetaLoss, divergence_error

BETAS = [2.0, 1.0, 0.0, 0.5, 1.5, 2.5, 3.0, -0.5]
# (alpha_W, alpha_H, l1_ratio): none, L2 only, mixed with alpha_H="same", L1 only on W
REGS = [(0.0, "same", 0.0), (0.01, 0.02, 0.0), (0.005, "same", 0.3), (0.01, 0.0, 1.0)]


def problem(m=23, n=31, r=4, beta=1.0, seed=0):
    """V with exact zeros (unless beta <= 0, which scikit-learn refuses then) and a start."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(m, n, generator=gen)
    if beta > 0:
        v[torch.rand(m, n, generator=gen) < 0.2] = 0
        v[0, :] = 0  # an all-zero row: KL's W row update divides 0 by its sum
    else:
        v += 0.05
    w0 = torch.rand(m, r, generator=gen) + 0.1
    h0 = torch.rand(r, n, generator=gen) + 0.1
    return v, w0, h0


def np32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float32).copy()


def reg_of(alpha_w, alpha_h, l1_ratio, m, n):
    model = SkNMF(alpha_W=alpha_w, alpha_H=alpha_h, l1_ratio=l1_ratio)
    return model._compute_regularization(np.zeros((m, n)))


@pytest.mark.parametrize("beta", BETAS)
def test_divergence_matches_sklearn(beta):
    v, w0, h0 = problem(beta=beta)
    got = float(divergence_error(v, w0, h0, beta))
    # scikit-learn in float64 on the same float32 values: the oracle of our float64 error
    ref = sk._beta_divergence(v.double().numpy(), w0.double().numpy(), h0.double().numpy(),
                              beta, square_root=True)  # fmt: skip
    assert got == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(("alpha_w", "alpha_h", "l1_ratio"), REGS)
def test_one_update_matches_sklearn(beta, alpha_w, alpha_h, l1_ratio):
    m, n = 23, 31
    v, w0, h0 = problem(m, n, beta=beta)
    l1_w, l1_h, l2_w, l2_h = reg_of(alpha_w, alpha_h, l1_ratio, m, n)
    loss = BetaLoss(beta, alpha_w, alpha_w if alpha_h == "same" else alpha_h, l1_ratio)
    assert loss.regularization(m, n) == pytest.approx((l1_w, l1_h, l2_w, l2_h))
    gamma = loss.gamma
    w_ref, *_ = sk._multiplicative_update_w(np32(v), np32(w0), np32(h0), beta, l1_w, l2_w, gamma)
    if beta < 1:
        w_ref[w_ref < np.finfo(np.float64).eps] = 0.0
    h_ref = sk._multiplicative_update_h(np32(v), w_ref, np32(h0), beta, l1_h, l2_h, gamma)
    w, h = w0.clone(), h0.clone()
    reference_beta.beta_iteration_(v, w, h, loss, loss.regularization(m, n))
    assert_close(w, torch.from_numpy(w_ref), atol=1e-6, rtol=2e-5, what="W")
    assert_close(h, torch.from_numpy(h_ref), atol=1e-6, rtol=2e-5, what="H")


def sklearn_fit(v, w0, h0, beta, max_iter, tol, alpha_w=0.0, alpha_h="same", l1_ratio=0.0):
    model = SkNMF(n_components=w0.shape[1], init="custom", solver="mu", beta_loss=beta,
                  max_iter=max_iter, tol=tol, alpha_W=alpha_w, alpha_H=alpha_h,
                  l1_ratio=l1_ratio)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = model.fit_transform(np32(v), W=np32(w0), H=np32(h0))
    return torch.from_numpy(w), torch.from_numpy(model.components_), model.n_iter_


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.0, 0.5, 1.5])
@pytest.mark.parametrize(("alpha_w", "alpha_h", "l1_ratio"), REGS[:3])
def test_fit_matches_sklearn_from_the_same_start(beta, alpha_w, alpha_h, l1_ratio):
    v, w0, h0 = problem(beta=beta, seed=1)
    settings = dict(alpha_W=alpha_w, alpha_H=alpha_h, l1_ratio=l1_ratio)
    ((w, h),), n_iter = nmf_batched_with_info(
        [v], 4, max_iter=30, tol=0, init=[(w0, h0)], beta_loss=beta, backend="reference",
        **settings,
    )  # fmt: skip
    w_ref, h_ref, n_ref = sklearn_fit(v, w0, h0, beta, 30, 0, alpha_w, alpha_h, l1_ratio)
    assert n_iter == [n_ref] == [30]
    # float32 rounding compounded over 30 updates (both sides float32)
    assert_close(w, w_ref, atol=1e-5, rtol=2e-3, what="W")
    assert_close(h, h_ref, atol=1e-5, rtol=2e-3, what="H")


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.0, 0.5, 1.5])
@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_stopping_iteration_matches_sklearn(beta, tol):
    v, w0, h0 = problem(beta=beta, seed=2)
    _, n_iter = nmf_batched_with_info([v], 4, max_iter=400, tol=tol, init=[(w0, h0)],
                                      beta_loss=beta, alpha_W=0.001)  # fmt: skip
    _, _, n_ref = sklearn_fit(v, w0, h0, beta, 400, tol, alpha_w=0.001)
    assert n_iter == [n_ref]
    assert n_ref < 400, "the case should stop before max_iter"


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.5])
def test_fixed_h_solve_matches_sklearn_transform(beta):
    v, _, h0 = problem(beta=beta, seed=3)
    m, r = v.shape[0], h0.shape[0]
    w_start = torch.full((m, r), float(np.sqrt(np32(v).mean() / r)))
    ((w, h),), n_iter = nmf_batched_with_info(
        [v], r, max_iter=50, tol=1e-4, init=[(w_start, h0)], beta_loss=beta, update_h=False,
        alpha_W=0.01,
    )  # fmt: skip
    l1_w, l1_h, l2_w, l2_h = reg_of(0.01, "same", 0.0, *v.shape)
    w_ref, _, n_ref = sk._fit_multiplicative_update(
        np32(v), np32(w_start), np32(h0), beta, 50, 1e-4, l1_w, l1_h, l2_w, l2_h, update_H=False
    )
    assert torch.equal(h, h0), "update_h=False must keep H"
    assert n_iter == [n_ref]
    assert_close(w, torch.from_numpy(w_ref), atol=1e-5, rtol=1e-3, what="W")


def test_frobenius_without_penalty_stays_on_the_frobenius_op(monkeypatch):
    from ong_kernels import _ops

    def refuse(*args, **kwargs):
        raise AssertionError("the plain Frobenius solve went to nmf_beta_mu_")

    monkeypatch.setattr(_ops, "nmf_beta_mu_", refuse)
    v = torch.rand(8, 9)
    ((w, h),) = nmf_batched([v], 3, max_iter=5, beta_loss="frobenius", alpha_W=0.0)
    ((w2, h2),) = nmf_batched([v], 3, max_iter=5)
    assert torch.equal(w, w2) and torch.equal(h, h2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_loss": "kl"}, "beta_loss must be one of"),
        ({"beta_loss": float("nan")}, "beta_loss must be finite"),
        ({"alpha_W": -1.0}, "alpha_W must be >= 0"),
        ({"alpha_H": "other"}, "alpha_H must be"),
        ({"l1_ratio": 1.5}, "l1_ratio must be <= 1"),
        ({"update_h": False}, "update_h=False needs init"),
        ({"beta_loss": 1, "precision": "tf32"}, "serves the plain Frobenius solve only"),
    ],
)
def test_bad_loss_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nmf_batched([torch.rand(4, 5)], 2, **kwargs)


def test_itakura_saito_refuses_zeros_like_sklearn():
    v = torch.rand(6, 7)
    v[2, 3] = 0
    with pytest.raises(ValueError, match=r"weights\[0\] contains zeros, and beta_loss <= 0"):
        nmf_batched([v], 2, beta_loss="itakura-saito")
    nmf_batched([v + 0.1], 2, beta_loss="itakura-saito", max_iter=3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_beta_batch_equals_each_matrix_alone(backend):
    if not ong_kernels.backends_available("nmf_beta_mu")[backend]:
        pytest.skip(f"the {backend} kernel is not built")
    shapes = [(9, 14, 3), (9, 14, 3), (5, 20, 2), (17, 6, 4)]
    gen = torch.Generator().manual_seed(4)
    vs = [torch.rand(m, n, generator=gen) for m, n, _ in shapes]
    ranks = [r for *_, r in shapes]
    together, n_together = nmf_batched_with_info(vs, ranks, max_iter=200, tol=1e-3,
                                                 beta_loss=1, seed=[1, 2, 3, 4],
                                                 backend=backend)  # fmt: skip
    for i, v in enumerate(vs):
        ((w, h),), n_alone = nmf_batched_with_info([v], ranks[i], max_iter=200, tol=1e-3,
                                                   beta_loss=1, seed=i + 1,
                                                   backend=backend)  # fmt: skip
        # bit for bit: a matrix's result never depends on the others in the call
        assert n_alone == [n_together[i]]
        assert torch.equal(together[i][0], w) and torch.equal(together[i][1], h)


@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_beta_loss_refuses_values_float32_cannot_hold(scale):
    # The beta solve runs V as given in float32 (no 4^-j scaling): a float64 V outside float32's
    # normal range would read as inf (NaN factors) or zeros, so it is refused; Frobenius scales.
    v = torch.rand(6, 7, dtype=torch.float64) * scale
    with pytest.raises(ValueError, match=r"weights\[0\] has its largest entry .* outside float32"):
        nmf_batched([v], 2, beta_loss=1, max_iter=3)
    with pytest.raises(ValueError, match="outside float32"):
        nmf_batched(iter([v]), 2, beta_loss=1, max_iter=3)
    ((w, _),) = nmf_batched([v], 2, max_iter=3)
    assert torch.isfinite(w).all() and w.abs().max() > 0
