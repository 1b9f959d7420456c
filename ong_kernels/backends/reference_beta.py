"""The pure-PyTorch kernel of op nmf_beta_mu: beta-divergence MU with scikit-learn's
regularisation (the rules are ong_kernels/nmf_beta.py), the oracle of the compiled beta kernels.

It follows scikit-learn's arithmetic step by step (float32, the same clipping and order), one
matrix's 2-D products at a time on its own copies (as the Frobenius reference, issue 24: a
matrix's result never depends on the others in the call), and materialises W H and
V / (W H)^(2 - beta): m x n temporaries the compiled kernels never hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels import nmf_plan
from ong_kernels.backends.reference import _MatrixStepper, stepper_bytes
from ong_kernels.backends.registry import ANY_DEVICE, Shape, register
from ong_kernels.nmf_beta import EPS, TINY, BetaLoss, divergence_error
from ong_kernels.nmf_plan import Matrices


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x ** exponent with numpy's exact fast paths (reciprocal, square, sqrt) where it has them."""
    if exponent == -1:
        return x.reciprocal()
    if exponent == 2:
        return x.square()
    if exponent == 0.5:
        return x.sqrt()
    if exponent == 1:
        return x.clone()  # callers write into the result: never hand back x itself
    return x.pow(exponent)


def weighted_v(v: torch.Tensor, wh: torch.Tensor, beta: float) -> torch.Tensor:
    """V * (W H)^(beta - 2), with W H raised to EPS first when beta < 2 (the numerators'
    left factor); beta = 1 is V / WH, beta = 0 is V * (1 / WH)^2 (scikit-learn's order)."""
    wh_c = wh.clamp(min=EPS) if beta < 2 else wh
    if beta == 1:
        return v / wh_c
    if beta == 0:
        return wh_c.reciprocal().square().mul_(v)
    return _power(wh_c, beta - 2).mul_(v)


def powered_wh(wh: torch.Tensor, beta: float) -> torch.Tensor:
    """(W H)^(beta - 1), W H raised to EPS first when beta < 1 (the denominators' left factor)."""
    return _power(wh.clamp(min=EPS) if beta < 1 else wh, beta - 1)


def _apply_(factor, numerator, denominator, l1: float, l2: float, gamma: float) -> None:
    """factor *= (numerator / (denominator + l1 + l2 * factor)) ** gamma, a zero denominator
    made EPS, as scikit-learn's update tails."""
    if l1 > 0:
        denominator = denominator + l1
    if l2 > 0:
        denominator = denominator + l2 * factor
    denominator = denominator.masked_fill(denominator == 0, EPS)
    delta = numerator / denominator
    if gamma != 1:
        delta = delta.pow(gamma)
    factor.mul_(delta)


def update_w_(v, w, h, beta: float, l1: float, l2: float, gamma: float) -> None:
    """scikit-learn's _multiplicative_update_w on one matrix (or a batch), in place."""
    ht = h.transpose(-2, -1)
    if beta == 2:
        numerator = torch.matmul(v, ht)
        denominator = torch.matmul(w, torch.matmul(h, ht))
    else:
        wh = torch.matmul(w, h)
        numerator = torch.matmul(weighted_v(v, wh, beta), ht)
        if beta == 1:
            denominator = h.sum(-1).unsqueeze(-2).expand_as(w)
        else:
            denominator = torch.matmul(powered_wh(wh, beta), ht)
    _apply_(w, numerator, denominator, l1, l2, gamma)
    if beta < 1:
        w.masked_fill_(w < TINY, 0)


def update_h_(v, w, h, beta: float, l1: float, l2: float, gamma: float) -> None:
    """scikit-learn's _multiplicative_update_h on one matrix (or a batch), in place."""
    wt = w.transpose(-2, -1)
    if beta == 2:
        numerator = torch.matmul(wt, v)
        denominator = torch.matmul(torch.matmul(wt, w), h)
    else:
        wh = torch.matmul(w, h)
        numerator = torch.matmul(wt, weighted_v(v, wh, beta))
        if beta == 1:
            w_sum = w.sum(-2)
            denominator = w_sum.masked_fill(w_sum == 0, 1.0).unsqueeze(-1).expand_as(h)
        else:
            denominator = torch.matmul(wt, powered_wh(wh, beta))
    _apply_(h, numerator, denominator, l1, l2, gamma)
    if beta <= 1:
        h.masked_fill_(h < TINY, 0)


def beta_iteration_(v, w, h, loss: BetaLoss, reg: tuple[float, float, float, float]) -> None:
    """One MU iteration: W, then H unless loss.update_h is False."""
    l1_w, l1_h, l2_w, l2_h = reg
    update_w_(v, w, h, loss.beta, l1_w, l2_w, loss.gamma)
    if loss.update_h:
        update_h_(v, w, h, loss.beta, l1_h, l2_h, loss.gamma)


class BetaStepper(_MatrixStepper):
    """The Frobenius reference's stepper (each matrix on its own copies, its own 2-D products)
    running beta_iteration_ with each matrix's regularisation, and the beta error."""

    def __init__(self, v_list, w_list, h_list, loss: BetaLoss) -> None:
        super().__init__(v_list, w_list, h_list)
        self.loss = loss
        self.regs = [loss.regularization(*v.shape) for v in v_list]

    def iterate(self, n: int, active: torch.Tensor | None) -> None:
        flags = [True] * len(self.v) if active is None else active.tolist()
        for v, w, h, reg, on in zip(self.v, self.w, self.h, self.regs, flags, strict=True):
            if on:
                for _ in range(n):
                    beta_iteration_(v, w, h, self.loss, reg)

    def errors(self) -> torch.Tensor:
        triples = zip(self.v, self.w, self.h, strict=True)
        return torch.stack([divergence_error(v, w, h, self.loss.beta) for v, w, h in triples])


def workspace(shapes: Sequence[Shape]) -> int:
    """Peak extra bytes of BetaStepper: per matrix its float32 copy of V (and the float32
    conversion of another dtype), its W and H copies and an iteration's factor-sized products
    (~3 more); for the largest matrix, an update's m x n float32 temporaries (W H, the
    weighted V, the powered W H, the pow's result: 4) or the error's float64 ones (V, W H,
    clipped W H, the masked terms: 5), the larger: 40 bytes per entry."""
    return stepper_bytes(shapes, per_entry_of_largest=40)


@register("nmf_beta_mu", "reference", devices=(ANY_DEVICE,), workspace=workspace)
def nmf_beta_mu_(
    v_list: Matrices, w_list: Matrices, h_list: Matrices, max_iter: int, tol: float,
    loss: BetaLoss,
) -> torch.Tensor:  # fmt: skip
    """Beta-divergence MU of a ragged batch, W (and H unless loss.update_h is False) updated in
    place; returns n_iter per matrix (int64, on the matrices' device)."""
    stepper = BetaStepper(v_list, w_list, h_list, loss)
    return nmf_plan.run_stepwise(stepper, len(v_list), v_list[0].device, max_iter, tol)
