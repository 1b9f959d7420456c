"""Pure-PyTorch kernels: the oracle every compiled kernel is tested against, and the fallback.

Written for clarity first, but not naively slow: NMF runs each bucket of same-shape matrices
as batched matmuls, so a ResNet's ~60 matrices take a handful of bmm calls per iteration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels._batching import group_indices
from ong_kernels._bitmask import unpack_mask

# scikit-learn's EPSILON (np.finfo(np.float32).eps): an exactly-zero MU denominator becomes this.
EPS = float(torch.finfo(torch.float32).eps)
# scikit-learn checks convergence every 10 iterations.
CHECK_EVERY = 10


# ----------------------------------------------------------------------------- masked SGD


def masked_sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor | None],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """torch.optim.SGD on grad*mask, in place; pruned entries of params and buffers become 0.

    `mask_bits[i]` is None for a dense tensor, else its mask packed by
    ong_kernels._bitmask.pack_mask. The gradient is *selected* by the mask (torch.where), never
    multiplied, so NaN/Inf at a pruned position cannot reach the weights. `first_step` means
    the buffers are new: buf = g without dampening, as torch.optim.SGD does on its first step.
    """
    for i, param in enumerate(params):
        mask = None if mask_bits[i] is None else unpack_mask(mask_bits[i], param)
        grad = grads[i].neg() if maximize else grads[i]
        if mask is not None:
            grad = torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            if mask is not None:
                buf.masked_fill_(~mask, 0)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)
        if mask is not None:
            param.masked_fill_(~mask, 0)


# ----------------------------------------------------------------------------- NMF


def frobenius_error(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """||V - W H||_F per matrix of a batch (scikit-learn's _beta_divergence, square_root=True)."""
    return torch.linalg.matrix_norm(v - torch.bmm(w, h))


def mu_iteration_(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> None:
    """One Lee-Seung iteration on a batch, in scikit-learn's order and epsilon rule.

    W <- W * (V H^T) / (W (H H^T)),  then  H <- H * (W^T V) / ((W^T W) H).
    """
    ht = h.transpose(1, 2)
    numerator = torch.bmm(v, ht)
    denominator = torch.bmm(w, torch.bmm(h, ht))
    w.mul_(numerator.div_(denominator.masked_fill_(denominator == 0, EPS)))
    wt = w.transpose(1, 2)
    numerator = torch.bmm(wt, v)
    denominator = torch.bmm(torch.bmm(wt, w), h)
    h.mul_(numerator.div_(denominator.masked_fill_(denominator == 0, EPS)))


def _run_bucket(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor, max_iter: int, tol: float):
    """MU on one same-shape batch; returns (W, H, n_iter) with per-matrix stopping.

    A matrix stops when (previous_error - error) / initial_error < tol at a check (every 10
    iterations; scikit-learn's rule). Stopped matrices leave the batch, so they stop changing
    and stop costing time. A matrix whose initial error is 0 is exact and stops at the first
    check (scikit-learn would divide by zero there).
    """
    batch = v.shape[0]
    n_iter = torch.full((batch,), max_iter, dtype=torch.int64)
    if tol <= 0:
        for _ in range(max_iter):
            mu_iteration_(v, w, h)
        return w, h, n_iter

    w_out, h_out = w.clone(), h.clone()
    alive = torch.arange(batch, device=v.device)
    initial_error = frobenius_error(v, w, h)
    previous_error = initial_error
    for iteration in range(1, max_iter + 1):
        mu_iteration_(v, w, h)
        if iteration % CHECK_EVERY != 0 or iteration == max_iter:
            continue
        error = frobenius_error(v, w, h)
        safe_initial = torch.where(initial_error > 0, initial_error, torch.ones_like(error))
        progress = torch.where(initial_error > 0, (previous_error - error) / safe_initial, 0.0)
        stopped = progress < tol
        if bool(stopped.any()):
            done = alive[stopped]
            w_out[done], h_out[done] = w[stopped], h[stopped]
            n_iter[done.cpu()] = iteration
            keep = ~stopped
            alive, v, w, h = alive[keep], v[keep], w[keep], h[keep]
            initial_error, error = initial_error[keep], error[keep]
            if alive.numel() == 0:
                return w_out, h_out, n_iter
        previous_error = error
    w_out[alive], h_out[alive] = w, h
    return w_out, h_out, n_iter


def nmf_mu_(
    v_list: Sequence[torch.Tensor],
    w_list: Sequence[torch.Tensor],
    h_list: Sequence[torch.Tensor],
    max_iter: int,
    tol: float,
) -> torch.Tensor:
    """Multiplicative-update NMF of a ragged list of float32 matrices, W and H updated in place.

    Matrices of one (m, n, r) shape advance together as one batch. Returns n_iter per matrix
    (int64, on the matrices' device).
    """
    shapes = [(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(v_list, w_list, strict=True)]
    n_iter = torch.empty(len(v_list), dtype=torch.int64)
    for indices in group_indices(shapes).values():
        v = torch.stack([v_list[i] for i in indices])
        w = torch.stack([w_list[i] for i in indices])
        h = torch.stack([h_list[i] for i in indices])
        w, h, iters = _run_bucket(v, w, h, max_iter, tol)
        for j, i in enumerate(indices):
            w_list[i].copy_(w[j])
            h_list[i].copy_(h[j])
            n_iter[i] = iters[j]
    return n_iter.to(v_list[0].device)
