"""ong_kernels.NMF: scikit-learn's NMF(solver="mu") on our kernels, a drop-in estimator.

It *is* a scikit-learn estimator (a subclass of sklearn.decomposition.NMF): the parameters,
their validation and errors, the start (`init`, `random_state`: scikit-learn's own
_initialize_nmf for array input), `inverse_transform`, feature names and tags are
scikit-learn's own. What changes is the solve: `fit`/`fit_transform` run nmf_batched with the
same loss and penalty (ong_kernels/nmf_beta.py follows scikit-learn's MU rules and stopping rule),
`transform` the kernels' fixed-H mode (update_h=False), one op call, not a Python loop.

Beyond scikit-learn:
* torch tensors in, torch tensors out (`components_` and W on the input's device); `device`
  computes elsewhere (e.g. "cuda" for a CPU array), `backend` picks the kernel.
* A scipy sparse X is densified when its float32 copy fits the memory budget (80% of the
  compute device's free memory, nmf_groups.check_budget), else a ValueError says so. Sparse
  kernels would need W H only at V's nonzeros (scikit-learn's _special_sparse_dot) fused with
  the products, a CSR gather per tile: not built yet.

Deviations (and why):
* The solve is float32 (the kernels' precision); float64 X gives float64 W and components_
  (scikit-learn's dtype rule) holding the float32 solution.
* A torch X is started by ong_kernels.nmf_init on its own device ("random", "nndsvd",
  "nndsvda"; "nndsvdar" is refused), seeded from random_state: the same distributions as
  scikit-learn's but other numbers (torch's generator, not numpy's).
* n_components above min(n_samples, n_features) is clipped there (nmf_batched's rank rule):
  n_components_ says what was fitted.
* solver="mu" only: scikit-learn's coordinate descent is not ours to run.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.decomposition import NMF as _SkNMF
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from ong_kernels._validate import check_device
from ong_kernels.backends import registry
from ong_kernels.nmf import nmf_batched_with_info
from ong_kernels.nmf_beta import beta_from, reconstruction_error
from ong_kernels.nmf_groups import check_budget, format_bytes

_ZEROS_WITH_BETA_LE_0 = (
    "When beta_loss <= 0 and X contains zeros, the solver may diverge. Please add small "
    "values to X, or use a positive beta_loss."
)  # scikit-learn's message, word for word


class NMF(_SkNMF):
    """scikit-learn's NMF(solver="mu") running ong_kernels' batched MU kernels.

    Parameters are scikit-learn's (`n_components`, `init`, `solver` ("mu" only),
    `beta_loss`, `tol`, `max_iter`, `random_state`, `alpha_W`, `alpha_H`, `l1_ratio`,
    `verbose`, `shuffle` (ignored by MU, as in scikit-learn)), plus `device` (where to compute;
    default the input's device) and `backend` (nmf_batched's: "auto", "reference", "cpu",
    "cuda", "triton"). Attributes: `components_`, `n_components_`, `reconstruction_err_`,
    `n_iter_`, `n_features_in_` (and `feature_names_in_` for dataframes). The module
    docstring lists where it differs from scikit-learn and why.
    """

    _parameter_constraints: ClassVar[dict] = {
        **_SkNMF._parameter_constraints,
        "solver": [StrOptions({"mu"})],
        "device": [None, str, torch.device],
        "backend": [StrOptions({"auto", *registry.BACKENDS})],
    }

    def __init__(
        self,
        n_components="auto",
        *,
        init=None,
        solver="mu",
        beta_loss="frobenius",
        tol=1e-4,
        max_iter=200,
        random_state=None,
        alpha_W=0.0,
        alpha_H="same",
        l1_ratio=0.0,
        verbose=0,
        shuffle=False,
        device=None,
        backend="auto",
    ):
        super().__init__(
            n_components=n_components, init=init, solver=solver, beta_loss=beta_loss, tol=tol,
            max_iter=max_iter, random_state=random_state, alpha_W=alpha_W, alpha_H=alpha_H,
            l1_ratio=l1_ratio, verbose=verbose, shuffle=shuffle,
        )  # fmt: skip
        self.device = device
        self.backend = backend

    # ------------------------------------------------------------------ public API

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, W=None, H=None):
        """Learn the model of X and return W (n_samples, n_components); numpy in, numpy out,
        torch in, torch out."""
        if isinstance(X, torch.Tensor):
            V = self._check_tensor(X, reset=True)
            w, h, n_iter = self._solve_tensor(V, W, H)
            self.components_ = h
        else:
            X = self._dense(validate_data(self, X, accept_sparse=("csr", "csc"),
                                          dtype=[np.float64, np.float32]))  # fmt: skip
            w, h, n_iter = self._solve_array(X, W, H)
            self.components_ = h
        self.n_components_ = h.shape[0]
        self.n_iter_ = n_iter
        return w

    def transform(self, X):
        """W for the fitted components_ (H fixed), solved by the kernels' fixed-H mode."""
        check_is_fitted(self)
        if isinstance(X, torch.Tensor):
            V = self._check_tensor(X, reset=False)
            H = torch.as_tensor(self.components_, device=V.device)
            w0 = torch.full((V.shape[0], H.shape[0]), self._start_value(V), device=V.device)
            w, _, _ = self._run(V, w0, H.to(torch.float32), update_h=False)
            return w.to(V.dtype)
        X = self._dense(validate_data(self, X, accept_sparse=("csr", "csc"),
                                      dtype=[np.float64, np.float32], reset=False,
                                      ensure_non_negative=True))  # fmt: skip
        V = _read_only_tensor(X)
        H = torch.as_tensor(np.asarray(self.components_), dtype=torch.float32)
        w0 = torch.full((V.shape[0], H.shape[0]), self._start_value(V))
        w, _, _ = self._run(V, w0, H, update_h=False)
        return w.numpy().astype(X.dtype, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------------ the solve

    def _solve_array(self, X: np.ndarray, W, H):
        """scikit-learn's checks and start on the array, then the kernels."""
        self._check_params(X)
        if X.min() == 0 and self._beta_loss <= 0:
            raise ValueError(_ZEROS_WITH_BETA_LE_0)
        W0, H0 = self._check_w_h(X, W, H, update_H=True)
        V = _read_only_tensor(X)
        k = min(W0.shape[1], *X.shape)  # nmf_batched's rank rule (module docstring)
        w, h, n_iter = self._run(V, torch.as_tensor(W0[:, :k], dtype=torch.float32),
                                 torch.as_tensor(H0[:k], dtype=torch.float32))  # fmt: skip
        self.reconstruction_err_ = reconstruction_error(V, w, h, self._beta_loss)
        return w.numpy().astype(X.dtype, copy=False), h.numpy().astype(X.dtype, copy=False), n_iter

    def _solve_tensor(self, V: torch.Tensor, W, H):
        """The same on a tensor: started by nmf_init on its device (module docstring)."""
        self._beta_loss = beta_from(self.beta_loss)
        n_samples, n_features = V.shape
        k = self.n_components
        k = n_features if k in (None, "auto") else k
        if float(V.min()) == 0 and self._beta_loss <= 0:
            raise ValueError(_ZEROS_WITH_BETA_LE_0)
        init = self.init
        if init == "custom":
            if W is None or H is None:
                raise ValueError("init='custom' needs W and H (torch tensors)")
            start = [(torch.as_tensor(W, device=V.device, dtype=torch.float32),
                      torch.as_tensor(H, device=V.device, dtype=torch.float32))]  # fmt: skip
        else:
            if init is None:  # scikit-learn's default rule (_initialize_nmf)
                init = "nndsvda" if k <= min(n_samples, n_features) else "random"
            if init == "nndsvdar":
                raise ValueError(
                    "init='nndsvdar' is not available for torch tensors: use 'nndsvda', "
                    "'nndsvd', 'random' or 'custom' (or pass a numpy array)"
                )
            start = init
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        w, h, n_iter = self._run(V, None, None, start=start, rank=k, seed=seed)
        self.reconstruction_err_ = reconstruction_error(V, w, h, self._beta_loss)
        return w.to(V.dtype), h.to(V.dtype), n_iter

    def _run(self, V, w0, h0, *, update_h=True, start=None, rank=None, seed=0):
        """One nmf_batched call; returns float32 (W, H, n_iter) on V's device."""
        if start is None:
            start, rank = [(w0, h0)], w0.shape[1]
        device = None if self.device is None else check_device(self.device, "device")
        ((w, h),), (n_iter,) = nmf_batched_with_info(
            [V], rank, max_iter=self.max_iter, tol=float(self.tol), init=start, seed=seed,
            backend=self.backend, device=device, beta_loss=self.beta_loss,
            alpha_W=self.alpha_W, alpha_H=self.alpha_H, l1_ratio=self.l1_ratio,
            update_h=update_h,
        )  # fmt: skip
        if n_iter == self.max_iter and self.tol > 0:
            warnings.warn(
                f"Maximum number of iterations {self.max_iter} reached. Increase it to "
                "improve convergence.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return w, h, n_iter

    # ------------------------------------------------------------------ inputs

    def _start_value(self, V: torch.Tensor) -> float:
        """scikit-learn's transform start: every entry sqrt(mean(X) / n_components)."""
        return math.sqrt(float(V.double().mean()) / self.components_.shape[0])

    def _check_tensor(self, X: torch.Tensor, *, reset: bool) -> torch.Tensor:
        """A 2-D float tensor, finite and non-negative (the checks validate_data does for
        arrays, with scikit-learn's wording)."""
        if X.dim() != 2:
            raise ValueError(f"Expected 2D input, got a tensor of shape {tuple(X.shape)}.")
        if not X.is_floating_point():
            X = X.to(torch.float64)
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32)
        if not bool(torch.isfinite(X).all()):
            raise ValueError("Input X contains NaN or infinity.")
        if X.numel() and float(X.min()) < 0:
            raise ValueError(f"Negative values in data passed to {type(self).__name__}")
        if reset:
            self.n_features_in_ = X.shape[1]
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X.detach()

    def _dense(self, X):
        """X itself, or a scipy sparse X densified where its float32 copy fits the budget."""
        if not hasattr(X, "toarray"):
            return X
        device = torch.device("cpu") if self.device is None else check_device(self.device)
        need = X.shape[0] * X.shape[1] * X.dtype.itemsize
        budget = check_budget(None, device if device.type != "cpu" else torch.device("cpu"))
        if need > budget:
            raise ValueError(
                f"X is a sparse matrix of shape {X.shape} whose dense copy needs "
                f"{format_bytes(need)}, more than the memory budget {format_bytes(budget)}: "
                "ong_kernels.NMF has no sparse kernels yet; use a smaller X or "
                "sklearn.decomposition.NMF"
            )
        return np.ascontiguousarray(X.toarray())


def _read_only_tensor(X: np.ndarray) -> torch.Tensor:
    """X as a tensor without a copy; X is never written (the kernels read V), so a read-only
    array (check_estimator passes some) is fine and torch's warning about it is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X)


__all__ = ["NMF"]
