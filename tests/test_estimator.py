"""ong_kernels.NMF, the scikit-learn drop-in: check_estimator, same answers as
sklearn.decomposition.NMF(solver="mu") from the same start, transform, torch in / torch out,
dtypes, sparse input and errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close

sklearn = pytest.importorskip("sklearn")  # the estimator is an optional extra

from sklearn.decomposition import NMF as SkNMF  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.utils._param_validation import InvalidParameterError  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

import ong_kernels  # noqa: E402
from ong_kernels import nmf_groups  # noqa: E402

# fit_transform and transform of the same X agree only as far as MU has converged: on these
# checks' 30 x 3 blobs at full rank it has not after 200 (or 5000) iterations, and
# scikit-learn's own NMF(solver="mu") fails them the same way
# (test_sklearn_mu_fails_the_same_checks).
MU_SLOW_CHECKS = {
    "check_transformer_general": "MU has not converged at max_iter (sklearn's mu too)",
    "check_transformer_data_not_an_array": "MU has not converged at max_iter (sklearn's mu too)",
}


def test_check_estimator():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check_estimator(ong_kernels.NMF(), expected_failed_checks=MU_SLOW_CHECKS, on_skip=None)


def test_sklearn_mu_fails_the_same_checks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        results = check_estimator(SkNMF(solver="mu"), on_fail=None, on_skip=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert failed == set(MU_SLOW_CHECKS)


def data(m=40, n=25, zeros=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((m, n)).astype(np.float32)
    if zeros:
        x[rng.random((m, n)) < 0.2] = 0
    return x


def fit_both(x, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = ong_kernels.NMF(**params)
        theirs = SkNMF(solver="mu", **params)
        return ours, ours.fit_transform(x), theirs, theirs.fit_transform(x)


@pytest.mark.parametrize(
    "params",
    [
        dict(n_components=5, init="random", random_state=0),
        dict(n_components=4, init="nndsvda", beta_loss="kullback-leibler", random_state=1),
        dict(
            n_components=4,
            init="nndsvdar",
            beta_loss=1.5,
            alpha_W=0.01,
            l1_ratio=0.5,
            random_state=2,
        ),
        dict(
            n_components=3,
            init="random",
            beta_loss=0.5,
            alpha_W=0.01,
            alpha_H=0.0,
            random_state=3,
            max_iter=50,
        ),
    ],
)
def test_fit_matches_sklearn_from_the_same_start(params):
    x = data()
    ours, w, theirs, w_ref = fit_both(x, **params)
    assert ours.n_iter_ == theirs.n_iter_
    assert w.dtype == w_ref.dtype == np.float32
    assert_close(torch.from_numpy(w), torch.from_numpy(w_ref), atol=1e-4, rtol=5e-3, what="W")
    assert_close(torch.from_numpy(ours.components_), torch.from_numpy(theirs.components_),
                 atol=1e-4, rtol=5e-3, what="H")  # fmt: skip
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=1e-4)
    assert ours.n_components_ == theirs.n_components_
    x_new = data(seed=5)[:17]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t, t_ref = ours.transform(x_new), theirs.transform(x_new)
    assert_close(torch.from_numpy(t), torch.from_numpy(t_ref), atol=1e-4, rtol=5e-3, what="T")
    assert np.allclose(ours.inverse_transform(w), w @ ours.components_)


def test_itakura_saito_refuses_zeros_with_sklearns_message():
    x = data(zeros=True)
    with pytest.raises(ValueError, match="When beta_loss <= 0 and X contains zeros"):
        ong_kernels.NMF(2, beta_loss="itakura-saito").fit(x)
    with pytest.raises(ValueError, match="When beta_loss <= 0 and X contains zeros"):
        ong_kernels.NMF(2, beta_loss=0).fit(torch.from_numpy(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_are_preserved_like_sklearn(dtype):
    x = data().astype(dtype)
    model = ong_kernels.NMF(3, random_state=0, max_iter=20, tol=0)
    w = model.fit_transform(x)
    assert w.dtype == dtype and model.components_.dtype == dtype
    assert model.transform(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(dtype):
    x = torch.from_numpy(data()).to(dtype)
    model = ong_kernels.NMF(4, init="random", random_state=0, beta_loss=1, max_iter=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = model.fit_transform(x)
        t = model.transform(x[:7])
    for out, shape in ((w, (40, 4)), (model.components_, (4, 25)), (t, (7, 4))):
        assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == shape
        assert out.device == x.device and bool(torch.isfinite(out).all())
    assert isinstance(model.inverse_transform(w), torch.Tensor)
    # the same model from the same tensor start as nmf_batched's (one call, same seed)
    assert model.reconstruction_err_ < float(torch.linalg.norm(x.double()))


def test_torch_custom_start_matches_numpy_fit():
    x = data()
    rng = np.random.default_rng(1)
    w0 = rng.random((40, 3)).astype(np.float32) + 0.1
    h0 = rng.random((3, 25)).astype(np.float32) + 0.1
    a = ong_kernels.NMF(3, init="custom", beta_loss=1, max_iter=30, tol=0)
    b = ong_kernels.NMF(3, init="custom", beta_loss=1, max_iter=30, tol=0)
    wa = a.fit_transform(x, W=w0, H=h0)
    wb = b.fit_transform(torch.from_numpy(x), W=torch.from_numpy(w0), H=torch.from_numpy(h0))
    assert np.array_equal(wa, wb.numpy()) and np.array_equal(a.components_, b.components_.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_computes_on_the_gpu_and_returns_to_the_input():
    x = data()
    model = ong_kernels.NMF(3, random_state=0, device="cuda", max_iter=20, tol=0)
    w = model.fit_transform(x)
    assert isinstance(w, np.ndarray)
    w_gpu = ong_kernels.NMF(3, random_state=0, max_iter=20, tol=0).fit_transform(
        torch.from_numpy(x).cuda()
    )
    assert w_gpu.device.type == "cuda"


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (dict(solver="cd"), InvalidParameterError),
        (dict(beta_loss="kl"), InvalidParameterError),
        (dict(alpha_W=-1.0), InvalidParameterError),
        (dict(l1_ratio=2.0), InvalidParameterError),
        (dict(backend="gpu"), InvalidParameterError),
        (dict(n_components=0), InvalidParameterError),
    ],
)
def test_bad_parameters_raise_sklearns_errors(params, error):
    with pytest.raises(error):
        ong_kernels.NMF(**params).fit(data())


def test_tensor_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="Negative values"):
        ong_kernels.NMF(2).fit(-torch.rand(5, 4))
    with pytest.raises(ValueError, match="NaN or infinity"):
        ong_kernels.NMF(2).fit(torch.full((5, 4), float("nan")))
    with pytest.raises(ValueError, match="Expected 2D input"):
        ong_kernels.NMF(2).fit(torch.rand(5))
    model = ong_kernels.NMF(2, max_iter=5, tol=0).fit(torch.rand(5, 4))
    with pytest.raises(ValueError, match="X has 3 features, but NMF is expecting 4"):
        model.transform(torch.rand(5, 3))


def test_sparse_input_is_densified_within_the_budget(monkeypatch):
    sp = pytest.importorskip("scipy.sparse")
    x = data()
    dense = ong_kernels.NMF(3, random_state=0, max_iter=20, tol=0).fit_transform(x)
    sparse = ong_kernels.NMF(3, random_state=0, max_iter=20, tol=0).fit_transform(sp.csr_matrix(x))
    assert np.allclose(dense, sparse, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(nmf_groups, "free_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"dense copy needs .* more than the memory budget"):
        ong_kernels.NMF(3).fit(sp.csr_matrix(x))


def test_import_needs_no_sklearn_until_nmf_is_used():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import ong_kernels\n"
        "try:\n    ong_kernels.NMF\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ImportError ong_kernels.NMF needs scikit-learn" in out.stdout
