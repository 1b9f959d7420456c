"""The beta-divergence loss of nmf_batched and its regularisation, as scikit-learn's MU has them.

Followed: scikit-learn 1.9 `sklearn/decomposition/_nmf.py` (`_beta_divergence`,
`_multiplicative_update_w`, `_multiplicative_update_h`, `_fit_multiplicative_update`,
`_BaseNMF._compute_regularization`); the updates are Fevotte & Idier (2011), "Algorithms for
nonnegative matrix factorization with the beta-divergence", Neural Computation 23(9).

What every beta kernel (op ``nmf_beta_mu_``) implements, per matrix V (m x n) at rank r:

* W update: W <- W * (num / den) ** gamma with
  - beta = 2: num = V H^T, den = W (H H^T);
  - beta = 1: num = (V / WH_c) H^T, den = row sums of H (broadcast over W's rows);
  - beta = 0: num = (V * WH_c^-2) H^T, den = WH_d^-1 H^T;
  - else:     num = (V * WH_c^(beta-2)) H^T, den = WH_d^(beta-1) H^T;
  where WH_c is W H with entries below EPS raised to EPS when beta < 2 and WH_d the same
  clipping only when beta < 1 (scikit-learn's EPSILON: float32's eps). Then
  den += l1_W (if > 0), den += l2_W * W (if > 0), den == 0 -> EPS. gamma (Fevotte's MM
  exponent) is 1 / (2 - beta) for beta < 1, 1 / (beta - 1) for beta > 2, else 1.
  For beta < 1, W entries below float64's eps become 0 after the update.
* H update: the same with W^T on the left; for beta = 1 den is W's column sums with a zero
  sum replaced by 1 (scikit-learn's W_sum[W_sum == 0] = 1). For beta <= 1, H entries below
  float64's eps become 0 after the update (scikit-learn's asymmetric thresholds, kept).
* Regularisation (scikit-learn >= 1.2): l1_W = n * alpha_W * l1_ratio,
  l2_W = n * alpha_W * (1 - l1_ratio), l1_H = m * alpha_H * l1_ratio,
  l2_H = m * alpha_H * (1 - l1_ratio) (n = features = columns, m = samples = rows).
* The stopping error is scikit-learn's `_beta_divergence(..., square_root=True)`,
  sqrt(2 * max(D_beta(V | W H), 0)), in float64; the rule and schedule are nmf_plan's. For beta
  = 2 it is ||V - W H||_F, the Frobenius path's error.
* update_h=False keeps H fixed and solves W only (scikit-learn's transform).

Deviation: in scikit-learn's transform with beta = 1 and l1_W > 0, `denominator += l1_reg_W`
adds into the cached row sums of H in place, so l1_W accumulates over the iterations (the
cache is rebuilt every iteration in fit, where it has no effect). That is a bug, not a rule:
here l1_W is added once per iteration in both modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ong_kernels._validate import check_bool, check_real

# scikit-learn's EPSILON: np.finfo(np.float32).eps.
EPS = float(torch.finfo(torch.float32).eps)
# scikit-learn's threshold below which factors are zeroed for beta < 1 (W, H) and beta = 1 (H).
TINY = float(torch.finfo(torch.float64).eps)
BETA_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}


def beta_from(beta_loss, name: str = "beta_loss") -> float:
    """A beta_loss name ("frobenius", "kullback-leibler", "itakura-saito") or a real as beta."""
    if isinstance(beta_loss, str):
        if beta_loss not in BETA_LOSSES:
            raise ValueError(
                f"{name} must be one of {tuple(BETA_LOSSES)} or a real number, got {beta_loss!r}"
            )
        return BETA_LOSSES[beta_loss]
    return check_real(beta_loss, name)


def gamma_for(beta: float) -> float:
    """Fevotte & Idier's MM exponent: the update's ratio is raised to it."""
    if beta < 1:
        return 1.0 / (2.0 - beta)
    if beta > 2:
        return 1.0 / (beta - 1.0)
    return 1.0


@dataclass(frozen=True)
class BetaLoss:
    """The loss a beta kernel minimises: beta, scikit-learn's alpha_W, alpha_H (a number;
    "same" is resolved by `checked`), l1_ratio, and whether H is updated."""

    beta: float = 2.0
    alpha_w: float = 0.0
    alpha_h: float = 0.0
    l1_ratio: float = 0.0
    update_h: bool = True

    @property
    def gamma(self) -> float:
        return gamma_for(self.beta)

    def is_frobenius(self) -> bool:
        """Plain Frobenius MU (the nmf_mu_ op's problem): beta 2, no penalty, both factors."""
        return self.beta == 2 and self.alpha_w == 0 and self.alpha_h == 0 and self.update_h

    def regularization(self, m: int, n: int) -> tuple[float, float, float, float]:
        """(l1_W, l1_H, l2_W, l2_H) of an m x n matrix, scaled as scikit-learn >= 1.2."""
        return (
            n * self.alpha_w * self.l1_ratio,
            m * self.alpha_h * self.l1_ratio,
            n * self.alpha_w * (1.0 - self.l1_ratio),
            m * self.alpha_h * (1.0 - self.l1_ratio),
        )


def checked_loss(beta_loss, alpha_W, alpha_H, l1_ratio, update_h) -> BetaLoss:
    """nmf_batched's loss arguments checked (one-line errors naming the argument)."""
    beta = beta_from(beta_loss)
    alpha_w = check_real(alpha_W, "alpha_W", minimum=0.0)
    if isinstance(alpha_H, str):
        if alpha_H != "same":
            raise ValueError(f"alpha_H must be a real >= 0 or 'same', got {alpha_H!r}")
        alpha_h = alpha_w
    else:
        alpha_h = check_real(alpha_H, "alpha_H", minimum=0.0)
    ratio = check_real(l1_ratio, "l1_ratio", minimum=0.0, maximum=1.0)
    check_bool(update_h, "update_h")
    return BetaLoss(beta, alpha_w, alpha_h, ratio, update_h)


def divergence_error(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor, beta: float):
    """sqrt(2 * max(D_beta(V | W H), 0)) of one matrix (or per matrix of a batch), in
    float64, as scikit-learn's _beta_divergence(square_root=True)."""
    return torch.sqrt(2 * divergence(v, w, h, beta).clamp(min=0))


# Rows per chunk of reconstruction_error: ~2^16 entries, so its float64 temporaries (about six
# at once, 0.5 MiB each) stay ~3 MiB whatever the matrix (scikit-learn's materialises W H
# whole, several times). 2^18 entries held ~12 MiB, more than the solve itself (Fashion-MNIST
# KL rank 20: 22 MiB of peak RSS growth in all, 12% of V).
_CHUNK_ENTRIES = 1 << 16


def reconstruction_error(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor, beta: float) -> float:
    """scikit-learn's reconstruction_err_ of one matrix (divergence_error), summed over row
    chunks so no m x n temporary exists."""
    rows = max(1, _CHUNK_ENTRIES // max(1, v.shape[1]))
    h64 = h.double()  # once, not per chunk (divergence's .double() of it is then a no-op)
    total = 0.0
    for start in range(0, v.shape[0], rows):
        part = slice(start, start + rows)
        total += float(divergence(v[part], w[part], h64, beta))
    return math.sqrt(2 * max(total, 0.0))


def divergence(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor, beta: float):
    """D_beta(V | W H) of one matrix (or per matrix of a batch), in float64, as scikit-learn's
    _beta_divergence:
    entries with V <= EPS leave out the V terms and W H is raised to EPS where V's terms read
    it. Additive over row blocks (reconstruction_error sums them)."""
    x = v.double()
    w64, h64 = w.double(), h.double()
    wh = torch.matmul(w64, h64)
    dims = (-2, -1)
    if beta == 2:
        res = (x - wh).square().sum(dims) / 2
    else:
        keep = x > EPS
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        wh_c = wh.clamp(min=EPS)
        if beta == 1:
            sum_wh = (w64.sum(-2) * h64.sum(-1)).sum(-1)
            x_log = torch.where(keep, x * torch.log(torch.where(keep, x, 1) / wh_c), zero)
            res = x_log.sum(dims) + sum_wh - torch.where(keep, x, zero).sum(dims)
        elif beta == 0:
            div = torch.where(keep, x, 1) / wh_c
            res = (
                torch.where(keep, div - torch.log(div), zero).sum(dims) - x.shape[-2] * x.shape[-1]
            )
        else:
            sum_wh_beta = wh.pow(beta).sum(dims)
            sum_x_wh = torch.where(keep, x * wh_c.pow(beta - 1), zero).sum(dims)
            x_beta = torch.where(keep, x, 1).pow(beta)
            res = torch.where(keep, x_beta, zero).sum(dims) - beta * sum_x_wh
            res = (res + sum_wh_beta * (beta - 1)) / (beta * (beta - 1))
    return res


def check_zeros_allowed(smallest: float, beta: float, what: str) -> None:
    """scikit-learn's refusal of a V with zeros when beta <= 0 (its solver may diverge there)."""
    if beta <= 0 and smallest == 0:
        raise ValueError(
            f"{what} contains zeros, and beta_loss <= 0 (Itakura-Saito or below) may diverge "
            "there: add a small value to it, or use a positive beta_loss"
        )
