"""Pure-PyTorch kernels: the oracle every compiled kernel is tested against, and the fallback.

Written for clarity first, but not naively slow: NMF runs each bucket of same-shape matrices
as batched matmuls, so a ResNet's ~60 matrices take a handful of bmm calls per iteration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels import nmf_plan
from ong_kernels._batching import group_indices
from ong_kernels._bitmask import unpack_mask
from ong_kernels.backends.registry import ANY_DEVICE, Shape, register
from ong_kernels.nmf_plan import Matrices

# ----------------------------------------------------------------------------- masked SGD


@register("masked_sgd_step", "reference", devices=(ANY_DEVICE,))
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
    """||V - W H||_F per matrix of a batch, computed in float64 (the exact error of the
    float32 factors: the oracle for the kernels' cheaper float64 accumulations)."""
    return torch.linalg.matrix_norm(v.double() - torch.bmm(w.double(), h.double()))


def mu_iteration_(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> None:
    """One Lee-Seung iteration on a batch, in scikit-learn's order and epsilon rule.

    W <- W * (V H^T) / (W (H H^T)),  then  H <- H * (W^T V) / ((W^T W) H).
    """
    eps = nmf_plan.EPS
    ht = h.transpose(1, 2)
    numerator = torch.bmm(v, ht)
    denominator = torch.bmm(w, torch.bmm(h, ht))
    w.mul_(numerator.div_(denominator.masked_fill_(denominator == 0, eps)))
    wt = w.transpose(1, 2)
    numerator = torch.bmm(wt, v)
    denominator = torch.bmm(torch.bmm(wt, w), h)
    h.mul_(numerator.div_(denominator.masked_fill_(denominator == 0, eps)))


class _BucketStepper:
    """nmf_plan.Stepper over same-shape buckets: each bucket is one stacked batch, so a
    ResNet's ~60 matrices take a handful of bmm calls per iteration. Stopped matrices leave
    the batch (the host reads the flags: this is the reference, not the fast path)."""

    syncs = True

    def __init__(self, v_list, w_list, h_list) -> None:
        self.w_list, self.h_list = w_list, h_list
        self.n = len(v_list)
        shapes = [(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(v_list, w_list, strict=True)]
        self.buckets = []
        for indices in group_indices(shapes).values():
            v = torch.stack([v_list[i].to(torch.float32) for i in indices])
            w = torch.stack([w_list[i] for i in indices])
            h = torch.stack([h_list[i] for i in indices])
            self.buckets.append((torch.tensor(indices), v, w, h))

    def iterate(self, n: int, active: torch.Tensor | None) -> None:
        for indices, v, w, h in self.buckets:
            keep = None if active is None else active.cpu()[indices]
            if keep is None or bool(keep.all()):
                for _ in range(n):
                    mu_iteration_(v, w, h)
            elif bool(keep.any()):
                sub = keep.nonzero().squeeze(1).to(v.device)
                vs, ws, hs = v[sub], w[sub], h[sub]
                for _ in range(n):
                    mu_iteration_(vs, ws, hs)
                w[sub], h[sub] = ws, hs

    def errors(self) -> torch.Tensor:
        out = torch.empty(self.n, dtype=torch.float64, device=self.buckets[0][1].device)
        for indices, v, w, h in self.buckets:
            out[indices.to(out.device)] = frobenius_error(v, w, h)
        return out

    def finish(self) -> None:
        for indices, _, w, h in self.buckets:
            for j, i in enumerate(indices.tolist()):
                self.w_list[i].copy_(w[j])
                self.h_list[i].copy_(h[j])


def nmf_workspace(shapes: Sequence[Shape]) -> int:
    """Peak extra bytes of _BucketStepper: per matrix its stacked float32 V (plus the float32
    conversion of a non-float32 V, alive until the stack is built), stacked W and H and an
    iteration's products (numerator, Gram, denominator: ~3 more factor-sized tensors); and,
    for the largest bucket during an error check, V.double(), (W H).double(), their
    difference and matrix_norm's temporary (32 bytes per entry; measured 80 MB of peak RSS
    growth for one float32 1024 x 2048 matrix, tests/test_nmf_workspace.py)."""
    held, buckets = 0, {}
    for m, n, r, dtype in shapes:
        held += 4 * m * n * (1 if dtype == torch.float32 else 2) + 4 * 4 * r * (m + n)
        buckets[(m, n, r)] = buckets.get((m, n, r), 0) + m * n
    return held + 32 * max(buckets.values())


@register("nmf_mu", "reference", devices=(ANY_DEVICE,), workspace=nmf_workspace)
def nmf_mu_(
    v_list: Matrices, w_list: Matrices, h_list: Matrices, max_iter: int, tol: float
) -> torch.Tensor:
    """Multiplicative-update NMF of a ragged batch, W and H updated in place; returns n_iter
    per matrix (int64, on the matrices' device). Batched PyTorch matmuls per shape bucket."""
    stepper = _BucketStepper(v_list, w_list, h_list)
    return nmf_plan.run_stepwise(stepper, len(v_list), v_list[0].device, max_iter, tol)
