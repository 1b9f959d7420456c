"""Baseline scores: magnitude, random, SNIP, GraSP, SynFlow (ONG lives in ong.py).

Every score has the shape of its weight, and higher means kept (allocation.py). Each method
has a private ``_<method>(model, targets, ...) -> list[Tensor]`` that ``prune`` calls and a
public ``<method>_scores(model, ...) -> dict[name, Tensor]`` with the same keyword arguments.
Data-dependent scores run on a deep copy of the model (its weights, BatchNorm statistics
and random state are left as they were) in the model's current train/eval mode, under
``torch.enable_grad()``, with the CPU/CUDA generators seeded by ``seed`` (dropout); with
torch.distributed initialised their gradients are summed over the ranks, so that every rank
gets the same masks from its own batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ong_kernels._validate import check_int, check_positive_ints, check_real
from ong_kernels.pruning import _data
from ong_kernels.pruning.allocation import check_sparsity
from ong_kernels.pruning.distributed import all_reduce_sum_
from ong_kernels.pruning.targets import Target, prunable_parameters

__all__ = [
    "grasp_scores",
    "magnitude_scores",
    "random_scores",
    "snip_scores",
    "synflow_scores",
]

Allocator = Callable[[list[torch.Tensor], float], list[torch.Tensor]]


def _named(targets: Sequence[Target], scores: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: s for (name, _), s in zip(targets, scores, strict=True)}


def _grads(loss: torch.Tensor, params: list[nn.Parameter], **kw) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


# ----------------------------------------------------------------------------- magnitude, random


def _magnitude(model, targets: Sequence[Target]) -> list[torch.Tensor]:
    return [t.detach().abs() for _, t in targets]


def magnitude_scores(model: nn.Module, *, include=None, exclude=None) -> dict[str, torch.Tensor]:
    """|W|: magnitude pruning (Han et al. 2015), the data-free baseline."""
    targets = prunable_parameters(model, include, exclude)
    return _named(targets, _magnitude(model, targets))


def _random(model, targets: Sequence[Target], *, seed: int) -> list[torch.Tensor]:
    # One float64 draw over all N weights from a CPU generator: the same scores on every
    # device, and (unlike float32's 2^24 levels) practically no ties on ResNet-sized N.
    gen = torch.Generator().manual_seed(seed)
    numels = [t.numel() for _, t in targets]
    flat = torch.rand(sum(numels), generator=gen, dtype=torch.float64)
    return [
        part.reshape(t.shape).to(t.device)
        for part, (_, t) in zip(flat.split(numels), targets, strict=True)
    ]


def random_scores(model: nn.Module, *, seed: int = 0, include=None, exclude=None):
    """Uniform random scores from a CPU generator seeded with `seed` (random pruning)."""
    targets = prunable_parameters(model, include, exclude)
    return _named(targets, _random(model, targets, seed=seed))


# ----------------------------------------------------------------------------- SNIP


def _snip(
    model,
    targets: Sequence[Target],
    *,
    data,
    loss_fn=None,
    seed: int = 0,
    group=None,
    distributed: bool = True,
):
    _data.check_data(data, "snip")
    loss_fn = _data.check_loss_fn(loss_fn)
    clone, params = _data.scoring_copy(model, [n for n, _ in targets])
    device = params[0].device
    grads = [torch.zeros_like(p) for p in params]
    with _data.seeded(seed, device), torch.enable_grad():
        for inputs, labels in _data.iter_batches(data):
            out = _data.forward(clone, _data.to_device(inputs, device))
            loss = loss_fn(out, _data.to_device(labels, device))
            for acc, g in zip(grads, _grads(loss, params), strict=True):
                acc.add_(g)
    all_reduce_sum_(grads, group, distributed)
    return [(g * p.detach()).abs() for g, p in zip(grads, params, strict=True)]


def snip_scores(
    model: nn.Module,
    data,
    *,
    loss_fn=None,
    seed=0,
    group=None,
    distributed=True,
    include=None,
    exclude=None,
):
    """SNIP connection sensitivity |dL/dw * w| (Lee et al., ICLR 2019).

    The paper scores one mini-batch; with several batches the gradients are accumulated
    (summed) over all of them before taking |g * w|, as loss.backward() accumulation does
    in the reference implementations - the sensitivity of the loss summed over the data.
    The paper's normalisation by the sum of scores does not change the ranking and is
    omitted. `loss_fn(outputs, targets)` defaults to cross-entropy. With torch.distributed
    initialised the gradients are also summed over the ranks of `group` (default: the
    world), so each rank scores all ranks' data and every rank gets the same scores (every
    rank must make the call; ``distributed=False`` keeps to this process's data).
    """
    targets = prunable_parameters(model, include, exclude)
    options = dict(loss_fn=loss_fn, seed=seed, group=group, distributed=distributed)
    return _named(targets, _snip(model, targets, data=data, **options))


# ----------------------------------------------------------------------------- GraSP


def _check_temperature(temperature) -> float:
    return check_real(temperature, "temperature", minimum=0.0, min_open=True)


def _grasp(
    model,
    targets,
    *,
    data,
    loss_fn=None,
    seed: int = 0,
    temperature: float = 200.0,
    group=None,
    distributed: bool = True,
):
    _data.check_data(data, "grasp")
    loss_fn = _data.check_loss_fn(loss_fn)
    temperature = _check_temperature(temperature)
    batches = list(_data.iter_batches(data))  # two passes over the same batches
    clone, params = _data.scoring_copy(model, [n for n, _ in targets])
    device = params[0].device

    def loss_of(inputs, labels):
        out = _data.forward(clone, _data.to_device(inputs, device))
        return loss_fn(out / temperature, _data.to_device(labels, device))

    with _data.seeded(seed, device), torch.enable_grad():
        g = [torch.zeros_like(p) for p in params]  # g = sum over batches of dL/dw
        for inputs, labels in batches:
            for acc, gb in zip(g, _grads(loss_of(inputs, labels), params), strict=True):
                acc.add_(gb)
        all_reduce_sum_(
            g, group, distributed
        )  # g over the data of every rank (no-op without ranks)
        hg = [torch.zeros_like(p) for p in params]  # Hg, by differentiating g . grad L
        for inputs, labels in batches:
            grad_f = _grads(loss_of(inputs, labels), params, create_graph=True)
            z = sum((gi * fi).sum() for gi, fi in zip(g, grad_f, strict=True))
            for acc, h in zip(hg, _grads(z, params), strict=True):
                acc.add_(h)
        all_reduce_sum_(hg, group, distributed)
    return [p.detach() * h for p, h in zip(params, hg, strict=True)]


def grasp_scores(
    model: nn.Module,
    data,
    *,
    loss_fn=None,
    seed=0,
    temperature=200.0,
    group=None,
    distributed=True,
    include=None,
    exclude=None,
):
    """GraSP (Wang et al., ICLR 2020): gradient-signal preservation via a Hessian-gradient product.

    The paper scores S(w) = -w * (H g) and removes the weights with the LARGEST S (their
    removal reduces the gradient norm least). Here higher = kept for every method, so this
    returns w * (H g) = -S: the same masks as the paper. g is the gradient of the loss
    summed over the batches, Hg comes from a double backward of g . grad L (with g
    detached), over the prunable weights only, as in the authors' code. The logits are
    divided by `temperature` (200, the authors' setting) before the loss; 1 disables it.
    The paper's normalisation by |sum S| does not change the ranking and is omitted. With
    torch.distributed initialised, g and Hg are summed over the ranks of `group` (default:
    the world): every rank scores all ranks' data and gets the same scores (every rank
    must make the call; ``distributed=False`` keeps to this process's data).
    """
    targets = prunable_parameters(model, include, exclude)
    options = dict(loss_fn=loss_fn, seed=seed, group=group, distributed=distributed)
    return _named(targets, _grasp(model, targets, data=data, temperature=temperature, **options))


# ----------------------------------------------------------------------------- SynFlow


def _synflow_setup(data, input_shape, dtype, iterations) -> tuple[int, ...]:
    check_int(iterations, "iterations", 1)
    if input_shape is None:
        if data is None:
            raise ValueError(
                "synflow is data-free but needs the input shape: pass input_shape=(C, H, W) "
                "(without the batch dimension) or data=... to read it from the first batch"
            )
        inputs, _ = next(_data.iter_batches(data))
        if not isinstance(inputs, torch.Tensor):
            raise TypeError("synflow reads input_shape from tensor inputs; pass input_shape=")
        if not inputs.is_floating_point():
            raise ValueError(
                f"synflow feeds the model an all-ones float input, but data's inputs are "
                f"{inputs.dtype} (token ids?): it cannot score a model whose first layer "
                "takes integer inputs (e.g. nn.Embedding); use another method"
            )
        input_shape = tuple(inputs.shape[1:])
    input_shape = check_positive_ints(input_shape, "input_shape")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    return tuple(input_shape)


def _synflow_forward(model: nn.Module, ones: torch.Tensor) -> torch.Tensor:
    """sum(model(ones)); a model that cannot take the all-ones float input says why."""
    try:
        return _data.forward(model, ones).sum()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"synflow feeds the model an all-ones {ones.dtype} input of shape "
            f"{tuple(ones.shape)}, and the model failed on it ({first}); a model whose first "
            "layer takes token ids (e.g. nn.Embedding) cannot be scored by synflow"
        ) from err


def _synflow(
    model,
    targets,
    *,
    sparsity: float,
    allocate: Allocator,
    data=None,
    iterations: int = 100,
    input_shape=None,
    dtype: torch.dtype | None = None,
):
    input_shape = _synflow_setup(data, input_shape, dtype, iterations)
    device = targets[0][1].device
    if dtype is None:
        # float64 keeps the product of |W| over ~20 layers from overflowing; MPS has none.
        dtype = torch.float32 if device.type == "mps" else torch.float64
    clone, params = _data.scoring_copy(model, [n for n, _ in targets], dtype)
    clone.eval()  # BatchNorm uses its running statistics, as in the paper
    with torch.no_grad():  # linearise: |x| of every floating parameter and buffer
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.abs_()
    magnitudes = [p.detach().clone() for p in params]
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    ones = torch.ones((1, *input_shape), dtype=dtype, device=device)
    density = 1.0 - sparsity
    scores: list[torch.Tensor] = []
    for k in range(1, iterations + 1):
        with torch.no_grad():
            for p, w, m in zip(params, magnitudes, masks, strict=True):
                p.copy_(torch.where(m, w, 0))
        with torch.enable_grad():
            r = _synflow_forward(clone, ones)
            grads = _grads(r, params)
        # Weights pruned in earlier rounds get -inf so that the masks stay nested even where
        # a surviving weight also scores 0 (ties would otherwise be broken by position).
        scores = [
            torch.where(m, (g * p.detach()).abs(), -math.inf)
            for g, p, m in zip(grads, params, masks, strict=True)
        ]
        if k < iterations:
            masks = allocate(scores, 1.0 - density ** (k / iterations))
    return scores


def synflow_scores(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    min_density: float | None = None,
    iterations: int = 100,
    input_shape=None,
    data=None,
    dtype: torch.dtype | None = None,
    include=None,
    exclude=None,
) -> dict[str, torch.Tensor]:
    """Iterative Synaptic Flow (Tanaka et al., NeurIPS 2020), data-free.

    On a copy of the model in float64 (float32 on MPS, or `dtype`), in eval mode, with every
    parameter and buffer replaced by its absolute value (the authors' ``linearize``), R =
    sum(f(1)) for an all-ones input of `input_shape` (read from the first batch of `data`
    when not given); the score is |dR/dw * w|. Over `iterations` rounds the kept fraction
    follows the exponential schedule (1 - sparsity) ** (k / iterations), pruning with the
    same allocation (`scope`, `min_density`) as the final mask; the scores of the last round
    are returned, with -inf at weights pruned in earlier rounds (so masks stay nested).
    """
    from ong_kernels.pruning.allocation import allocate, check_min_density, check_scope

    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    check_min_density(min_density)
    targets = prunable_parameters(model, include, exclude)
    names = [n for n, _ in targets]

    def alloc(scores, s):
        return allocate(scores, s, scope, min_density=min_density, names=names)

    scores = _synflow(
        model,
        targets,
        sparsity=sparsity,
        allocate=alloc,
        data=data,
        iterations=iterations,
        input_shape=input_shape,
        dtype=dtype,
    )
    return _named(targets, scores)
