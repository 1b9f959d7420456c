"""The pure-PyTorch kernel of op nmf_beta_mu: beta-divergence MU with scikit-learn's
regularisation (the rules are ong_kernels/nmf_beta.py), the oracle of the compiled beta kernels.

It follows scikit-learn's arithmetic step by step (float32, the same clipping and order), over
same-shape buckets as batched matmuls, so it materialises W H and V / (W H)^(2 - beta) for a
whole bucket: m x n temporaries the compiled kernels never hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels import nmf_plan
from ong_kernels._batching import group_indices
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
    """scikit-learn's _multiplicative_update_w on a batch, in place."""
    ht = h.transpose(1, 2)
    if beta == 2:
        numerator = torch.bmm(v, ht)
        denominator = torch.bmm(w, torch.bmm(h, ht))
    else:
        wh = torch.bmm(w, h)
        numerator = torch.bmm(weighted_v(v, wh, beta), ht)
        if beta == 1:
            denominator = h.sum(2).unsqueeze(1).expand_as(w)
        else:
            denominator = torch.bmm(powered_wh(wh, beta), ht)
    _apply_(w, numerator, denominator, l1, l2, gamma)
    if beta < 1:
        w.masked_fill_(w < TINY, 0)


def update_h_(v, w, h, beta: float, l1: float, l2: float, gamma: float) -> None:
    """scikit-learn's _multiplicative_update_h on a batch, in place."""
    wt = w.transpose(1, 2)
    if beta == 2:
        numerator = torch.bmm(wt, v)
        denominator = torch.bmm(torch.bmm(wt, w), h)
    else:
        wh = torch.bmm(w, h)
        numerator = torch.bmm(wt, weighted_v(v, wh, beta))
        if beta == 1:
            w_sum = w.sum(1)
            denominator = w_sum.masked_fill(w_sum == 0, 1.0).unsqueeze(2).expand_as(h)
        else:
            denominator = torch.bmm(wt, powered_wh(wh, beta))
    _apply_(h, numerator, denominator, l1, l2, gamma)
    if beta <= 1:
        h.masked_fill_(h < TINY, 0)


def beta_iteration_(v, w, h, loss: BetaLoss, reg: tuple[float, float, float, float]) -> None:
    """One MU iteration of a same-shape batch: W, then H unless loss.update_h is False."""
    l1_w, l1_h, l2_w, l2_h = reg
    update_w_(v, w, h, loss.beta, l1_w, l2_w, loss.gamma)
    if loss.update_h:
        update_h_(v, w, h, loss.beta, l1_h, l2_h, loss.gamma)


class BetaStepper:
    """nmf_plan.Stepper over same-shape buckets (as the Frobenius reference's): each bucket is
    one stacked batch; stopped matrices leave it (the host reads the flags)."""

    syncs = True

    def __init__(self, v_list, w_list, h_list, loss: BetaLoss) -> None:
        self.w_list, self.h_list, self.loss = w_list, h_list, loss
        self.n = len(v_list)
        shapes = [(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(v_list, w_list, strict=True)]
        self.buckets = []
        for (m, n, _), indices in group_indices(shapes).items():
            v = torch.stack([v_list[i].to(torch.float32) for i in indices])
            w = torch.stack([w_list[i] for i in indices])
            h = torch.stack([h_list[i] for i in indices])
            self.buckets.append((torch.tensor(indices), v, w, h, loss.regularization(m, n)))

    def iterate(self, n: int, active: torch.Tensor | None) -> None:
        for indices, v, w, h, reg in self.buckets:
            keep = None if active is None else active.cpu()[indices]
            if keep is None or bool(keep.all()):
                for _ in range(n):
                    beta_iteration_(v, w, h, self.loss, reg)
            elif bool(keep.any()):
                sub = keep.nonzero().squeeze(1).to(v.device)
                vs, ws, hs = v[sub], w[sub], h[sub]
                for _ in range(n):
                    beta_iteration_(vs, ws, hs, self.loss, reg)
                w[sub], h[sub] = ws, hs

    def errors(self) -> torch.Tensor:
        out = torch.empty(self.n, dtype=torch.float64, device=self.buckets[0][1].device)
        for indices, v, w, h, _ in self.buckets:
            out[indices.to(out.device)] = divergence_error(v, w, h, self.loss.beta)
        return out

    def finish(self) -> None:
        for indices, _, w, h, _ in self.buckets:
            for j, i in enumerate(indices.tolist()):
                self.w_list[i].copy_(w[j])
                self.h_list[i].copy_(h[j])


def workspace(shapes: Sequence[Shape]) -> int:
    """Peak extra bytes of BetaStepper: per matrix its stacked float32 V (and the float32
    conversion of another dtype), stacked W and H and an iteration's factor-sized products
    (~3 more); for the largest bucket, an update's m x n float32 temporaries (W H, the
    weighted V, the powered W H, the pow's result: 4) or the error's float64 ones (V, W H,
    clipped W H, the masked terms: 5), the larger: 40 bytes per entry."""
    held, buckets = 0, {}
    for m, n, r, dtype in shapes:
        held += 4 * m * n * (1 if dtype == torch.float32 else 2) + 4 * 4 * r * (m + n)
        buckets[(m, n, r)] = buckets.get((m, n, r), 0) + m * n
    return held + 40 * max(buckets.values())


@register("nmf_beta_mu", "reference", devices=(ANY_DEVICE,), workspace=workspace)
def nmf_beta_mu_(
    v_list: Matrices, w_list: Matrices, h_list: Matrices, max_iter: int, tol: float,
    loss: BetaLoss,
) -> torch.Tensor:  # fmt: skip
    """Beta-divergence MU of a ragged batch, W (and H unless loss.update_h is False) updated in
    place; returns n_iter per matrix (int64, on the matrices' device)."""
    stepper = BetaStepper(v_list, w_list, h_list, loss)
    return nmf_plan.run_stepwise(stepper, len(v_list), v_list[0].device, max_iter, tol)
