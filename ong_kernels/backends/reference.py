"""Pure-PyTorch kernels: the oracle every compiled kernel is tested against, and the fallback.

Written for clarity first. NMF updates each matrix with its own 2-D products, so a matrix's
result never depends on the other matrices of the call (see _MatrixStepper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ong_kernels import nmf_plan
from ong_kernels._bitmask import unpack_mask
from ong_kernels._layout import kept_view
from ong_kernels.backends._sgd_args import SgdHyper, check_compact_args, check_step_args
from ong_kernels.backends.registry import ANY_DEVICE, Shape, register
from ong_kernels.nmf_plan import Matrices

# ----------------------------------------------------------------------------- masked SGD


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32 and rounded once, when stored (as the CPU,
    CUDA and Triton kernels do). PyTorch's own half ops would round after every op, and not
    even the same way everywhere: on the CPU `a.add(b, alpha=x)` fuses in its vector body and
    rounds alpha * b first in its scalar tail, so the same element got another result in a
    gathered (compact_state) tensor than in the whole one (issue 17)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _unscaled(grads, grad_scale, found_inf):
    """GradScaler's fused path on the host: None when found_inf says skip (one sync), else
    the gradients times float32(1 / double(scale)) rounded to their dtype, as unscale_ does."""
    if found_inf is not None and bool(found_inf.item()):
        return None
    if grad_scale is None:
        return grads
    inv = grad_scale.double().reciprocal().float()
    return [(g * inv.to(g.device)).to(g.dtype) for g in grads]


def _update_(param, grad, buf, mask, hyper: SgdHyper) -> None:
    """One tensor's step in place (`buf` None without momentum, `mask` None for dense)."""
    acc = _opmath(param.dtype)
    p = param.to(acc)
    grad = grad.to(acc)
    grad = grad.neg() if hyper.maximize else grad
    if mask is not None:  # select, never multiply: NaN/Inf at a pruned position stays out
        grad = torch.where(mask, grad, torch.zeros((), dtype=acc, device=grad.device))
    if hyper.weight_decay != 0:
        grad = grad.add(p, alpha=hyper.weight_decay)
    if buf is not None:
        if hyper.first_step:
            b = grad.clone()
        else:
            b = buf.to(acc).mul_(hyper.momentum).add_(grad, alpha=1 - hyper.dampening)
        if mask is not None:
            b.masked_fill_(~mask, 0)
        buf.copy_(b)
        grad = grad.add(b, alpha=hyper.momentum) if hyper.nesterov else b
    p = p.add_(grad, alpha=-hyper.lr)
    if mask is not None:
        p.masked_fill_(~mask, 0)
    param.copy_(p)


@register("masked_sgd_step", "reference", devices=(ANY_DEVICE,))
def masked_sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor | None],
    hyper: SgdHyper,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """torch.optim.SGD on grad*mask, in place; pruned entries of params and buffers become 0.

    `mask_bits[i]` is None for a dense tensor, else its mask packed by
    ong_kernels._bitmask.pack_mask. The gradient is *selected* by the mask (torch.where), never
    multiplied, so NaN/Inf at a pruned position cannot reach the weights. `hyper.first_step`
    means the buffers are new: buf = g without dampening, as torch.optim.SGD does first.
    """
    check_step_args(params, grads, momentum_buffers, mask_bits)
    grads = _unscaled(grads, grad_scale, found_inf)
    if grads is None:
        return
    for i, param in enumerate(params):
        mask = None if mask_bits[i] is None else unpack_mask(mask_bits[i], param)
        buf = momentum_buffers[i] if momentum_buffers else None
        _update_(param, grads[i], buf, mask, hyper)


def masked_sgd_compact_step_(
    params,
    grads,
    momentum_compact,
    mask_bits,
    offsets,
    hyper: SgdHyper,
    grad_scale=None,
    found_inf=None,
) -> None:
    """compact_state: `momentum_compact[i]` holds the kept elements of params[i] in memory order
    (ong_kernels/_bitmask.py). Gathers the kept entries, steps them as masked_sgd_step_ does
    (element for element the same arithmetic: bit for bit dense mode), scatters them back."""
    check_compact_args(params, grads, momentum_compact, mask_bits, offsets)
    for i, p in enumerate(params):
        kept = int(unpack_mask(mask_bits[i], p).sum())
        if momentum_compact and momentum_compact[i].numel() != kept:
            raise ValueError(
                f"momentum_compact[{i}] has {momentum_compact[i].numel()} entries, the mask "
                f"keeps {kept}"
            )
    grads = _unscaled(grads, grad_scale, found_inf)
    if grads is None:
        return
    for i, p in enumerate(params):
        km = kept_view(unpack_mask(mask_bits[i], p))
        g = grads[i] if grads[i].stride() == p.stride() else torch.empty_like(p).copy_(grads[i])
        values = kept_view(p)[km]
        buf = momentum_compact[i] if momentum_compact else None
        _update_(values, kept_view(g)[km], buf, None, hyper)
        kept_view(p)[km] = values


# the compact format is a declared capability of a masked_sgd_step kernel (ong_kernels/_ops.py)
masked_sgd_step_.compact = masked_sgd_compact_step_


# ----------------------------------------------------------------------------- NMF


def frobenius_error(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """||V - W H||_F of one matrix (or per matrix of a batch), computed in float64 (the exact
    error of the float32 factors: the oracle for the kernels' cheaper float64 accumulations)."""
    return torch.linalg.matrix_norm(v.double() - torch.matmul(w.double(), h.double()))


def mu_iteration_(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> None:
    """One Lee-Seung iteration of one matrix (or a batch), in scikit-learn's order and
    epsilon rule.

    W <- W * (V H^T) / (W (H H^T)),  then  H <- H * (W^T V) / ((W^T W) H).
    """
    eps = nmf_plan.EPS
    ht = h.transpose(-2, -1)
    numerator = torch.matmul(v, ht)
    denominator = torch.matmul(w, torch.matmul(h, ht))
    w.mul_(numerator.div_(denominator.masked_fill_(denominator == 0, eps)))
    wt = w.transpose(-2, -1)
    numerator = torch.matmul(wt, v)
    denominator = torch.matmul(torch.matmul(wt, w), h)
    h.mul_(numerator.div_(denominator.masked_fill_(denominator == 0, eps)))


class _MatrixStepper:
    """nmf_plan.Stepper that updates each matrix with its own 2-D products.

    Why not one bmm per same-shape bucket: a batched product need not round like the
    unbatched one. On an AMD EPYC (Zen 4) a bucket of 4 restarts gave W and H that differ in
    the last bits from 4 single calls, where the Intel Xeons happened to agree (issue 24). So
    each matrix works on its own freshly allocated float32 copies of V, W and H (same sizes,
    same allocator alignment, whatever the batch it came in) and runs the same sequence of
    2-D products: a matrix's result depends only on itself, its start and the thread count,
    never on which other matrices share the call or the streamed group. The cost against
    the bucketed version is in benchmarks/RESULTS.md (issue 24). This backend is the oracle
    and the fallback; the C++ and Triton kernels are the fast paths."""

    syncs = True

    def __init__(self, v_list, w_list, h_list) -> None:
        self.w_out, self.h_out = w_list, h_list
        self.v = [v.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
                  for v in v_list]  # fmt: skip
        self.w = [w.clone(memory_format=torch.contiguous_format) for w in w_list]
        self.h = [h.clone(memory_format=torch.contiguous_format) for h in h_list]

    def iterate(self, n: int, active: torch.Tensor | None) -> None:
        flags = [True] * len(self.v) if active is None else active.tolist()
        for v, w, h, on in zip(self.v, self.w, self.h, flags, strict=True):
            if on:
                for _ in range(n):
                    mu_iteration_(v, w, h)

    def errors(self) -> torch.Tensor:
        triples = zip(self.v, self.w, self.h, strict=True)
        return torch.stack([frobenius_error(v, w, h) for v, w, h in triples])

    def finish(self) -> None:
        for w_out, h_out, w, h in zip(self.w_out, self.h_out, self.w, self.h, strict=True):
            w_out.copy_(w)
            h_out.copy_(h)


def nmf_workspace(shapes: Sequence[Shape]) -> int:
    """Peak extra bytes of _MatrixStepper: per matrix its float32 copy of V (plus the float32
    conversion's source read of a non-float32 V), its W and H copies and an iteration's
    products (numerator, Gram, denominator: ~3 more factor-sized tensors); and, for the
    largest matrix during an error check, V.double(), (W H).double(), their difference and
    matrix_norm's temporary (32 bytes per entry; measured 80 MB of peak RSS growth for one
    float32 1024 x 2048 matrix, tests/test_nmf_workspace.py)."""
    return stepper_bytes(shapes, per_entry_of_largest=32)


def stepper_bytes(shapes: Sequence[Shape], per_entry_of_largest: int) -> int:
    """A per-matrix stepper's peak extra bytes (this module's and reference_beta's): every
    matrix's float32 V copy (and a non-float32 V's conversion), W, H and ~3 factor-sized
    products, plus `per_entry_of_largest` bytes per entry of the largest matrix (its m x n
    temporaries)."""
    held, largest = 0, 0
    for m, n, r, dtype in shapes:
        held += 4 * m * n * (1 if dtype == torch.float32 else 2) + 4 * 4 * r * (m + n)
        largest = max(largest, m * n)
    return held + per_entry_of_largest * largest


@register("nmf_mu", "reference", devices=(ANY_DEVICE,), workspace=nmf_workspace)
def nmf_mu_(
    v_list: Matrices, w_list: Matrices, h_list: Matrices, max_iter: int, tol: float
) -> torch.Tensor:
    """Multiplicative-update NMF of a ragged batch, W and H updated in place; returns n_iter
    per matrix (int64, on the matrices' device). One matrix's 2-D products at a time."""
    stepper = _MatrixStepper(v_list, w_list, h_list)
    return nmf_plan.run_stepwise(stepper, len(v_list), v_list[0].device, max_iter, tol)
