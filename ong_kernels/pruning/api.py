"""The one-call API: prune a model, hand its masks to the optimizer, compare masks."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import torch
from torch import nn

from ong_kernels._validate import check_choice, check_seed, check_tensor
from ong_kernels.pruning import _data
from ong_kernels.pruning.allocation import (
    allocate,
    check_floors,
    check_min_density,
    check_scope,
    check_sparsity,
)
from ong_kernels.pruning.ong import CONSENSUS, DEFAULT_RANK, Scored, _ong
from ong_kernels.pruning.result import LayerReport, PruneResult, layer_reports
from ong_kernels.pruning.scores import _grasp, _magnitude, _random, _snip, _synflow
from ong_kernels.pruning.targets import prunable_parameters, resolve_targets

__all__ = [
    "DATA_METHODS",
    "METHODS",
    "READS_DATA",
    "LayerReport",
    "PruneResult",
    "mask_overlap",
    "masks_for",
    "masks_from_scores",
    "ong_masks",
    "prune",
]

_SCORERS = {
    "ong": _ong,
    # ONG with CONSENSUS's defaults (8 random restarts), a method name of its own so that a
    # sweep (ong-sweep --methods ong ong-consensus ...) trains both in one table.
    "ong-consensus": functools.partial(_ong, **CONSENSUS),
    "magnitude": _magnitude,
    "random": _random,
    "snip": _snip,
    "grasp": _grasp,
    "synflow": _synflow,
}
METHODS = tuple(_SCORERS)
# Methods that need data= (gradients of a loss); READS_DATA adds synflow, which reads only
# the input shape from it. The trainer hands batches to READS_DATA methods.
DATA_METHODS = ("snip", "grasp")
READS_DATA = (*DATA_METHODS, "synflow")
# Keyword arguments prune() supplies itself; a scorer receives those it declares.
_CONTEXT = ("seed", "data", "loss_fn", "sparsity", "allocate")


def _method_kwargs(method: str, context: dict, method_kwargs: dict) -> dict:
    """The scorer's keyword arguments; TypeError naming any it does not take."""
    params = inspect.signature(_SCORERS[method]).parameters
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    own = [n for n in accepted if n not in _CONTEXT]
    unknown = sorted(set(method_kwargs) - set(own))
    if unknown:
        raise TypeError(
            f"method {method!r} got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(own) or 'none'}"
        )
    kwargs = {k: v for k, v in context.items() if k in accepted}
    kwargs.update(method_kwargs)
    return kwargs


def method_defaults(method: str) -> dict:
    """The keyword arguments `method`'s scorer declares, with their defaults (for
    "ong-consensus": ONG's with CONSENSUS's), the context prune() supplies left out."""
    check_choice(method, "method", METHODS)
    params = inspect.signature(_SCORERS[method]).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CONTEXT}  # fmt: skip


def _compute_masks(
    model, targets, method, sparsity, scope, min_density, context, kwargs, agreement=True
):
    check_floors([t.numel() for _, t in targets], sparsity, scope, min_density)
    names = [n for n, _ in targets]

    def alloc(scores, s):
        return allocate(scores, s, scope, min_density=min_density, names=names)

    call = _method_kwargs(method, {**context, "sparsity": sparsity, "allocate": alloc}, kwargs)
    scores = _SCORERS[method](model, targets, **call)
    if not isinstance(scores, Scored):
        return alloc(scores, sparsity), None
    masks = alloc(scores.scores, sparsity)
    # ONG with restarts > 1: how far each restart alone is from the consensus mask.
    if not agreement or scores.agreement is None:
        return masks, None
    return masks, scores.agreement(masks)


def prune(
    model: nn.Module,
    method: str = "ong",
    sparsity: float = 0.9,
    scope: str = "global",
    *,
    data=None,
    loss_fn=None,
    seed: int = 0,
    include=None,
    exclude=None,
    min_density: float | None = None,
    **method_kwargs,
) -> PruneResult:
    """Prune `model` in place to exactly `sparsity` and return the masks and a report.

    Args:
        model: any ``nn.Module``; its prunable weights (targets.py: Conv*/Linear weights by
            default) are scored, and the pruned entries set to 0. Nothing else about the
            model changes: scores that need forward passes run on a copy.
        method: "ong" (NMF reconstruction, ong.py), "ong-consensus" (ONG scored by the mean
            reconstruction of ``restarts`` random starts, 8 by default: the same as "ong"
            with restarts=8, init="random"), "magnitude", "random", "snip", "grasp" or
            "synflow" (scores.py).
        sparsity: fraction of the prunable weights to prune, in [0, 1).
        scope: "global", "layer" or "erk" (allocation.py).
        data: (inputs, targets) or an iterable of such batches, all of which are used;
            required by "snip" and "grasp", gives "synflow" its input shape, ignored by
            the others.
        loss_fn: ``loss_fn(outputs, targets)`` for "snip" / "grasp"; cross-entropy if None.
        seed: seeds "random", ONG's init="random" (restart j of ONG's restarts: seed + j),
            and dropout during "snip" / "grasp".
        include / exclude: module types and/or name patterns (targets.py).
        min_density: per-layer floor; None keeps at least one weight per layer.
        **method_kwargs: the method's own options, e.g. for "ong" rank, max_iter, tol,
            init, restarts (k > 1: consensus ONG, ong.py), backend; "grasp" temperature;
            "synflow" iterations, input_shape, dtype;
            for "ong", "snip", "grasp" group and distributed (below). An option the method
            does not take is a TypeError.

    Returns:
        PruneResult: ``masks`` (name -> bool tensor on the weight's device, True = kept)
        and ``report`` (one LayerReport per weight, in ``named_parameters()`` order). For
        ONG with restarts > 1, ``agreement`` (ong.Agreement) says how far each restart
        alone is from the consensus mask, per layer and overall.

    With torch.distributed initialised, "ong" spreads its factorisations over the ranks
    and "snip" / "grasp" sum their gradients over the ranks, so every rank gets the same
    masks: every rank must then call prune (pass ``distributed=False`` to prune on one rank
    alone). The other methods need no communication.

    All arguments are checked before any weight changes; an error leaves the model as it
    was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice(method, "method", METHODS)
    sparsity = check_sparsity(sparsity)
    scope = check_scope(scope)
    min_density = check_min_density(min_density)
    seed = check_seed(seed)
    loss_fn = _data.check_loss_fn(loss_fn)
    if method in DATA_METHODS:
        _data.check_data(data, method)
    context = {"seed": seed, "data": data, "loss_fn": loss_fn}
    _method_kwargs(method, context, method_kwargs)  # unknown options fail before any work
    targets = prunable_parameters(model, include, exclude)
    for name, param in targets:
        check_tensor(param, name)  # meta / sparse weights: one line naming the weight

    masks, agreement = _compute_masks(
        model, targets, method, sparsity, scope, min_density, context, method_kwargs
    )

    with torch.no_grad():
        for (_, param), mask in zip(targets, masks, strict=True):
            param.masked_fill_(~mask, 0)  # kept entries are not touched: bit-identical
    names = [n for n, _ in targets]
    return PruneResult(
        masks=dict(zip(names, masks, strict=True)),
        report=layer_reports(names, masks, agreement),
        method=method,
        scope=scope,
        target_sparsity=sparsity,
        options=dict(method_kwargs),
        agreement=agreement,
    )


def ong_masks(
    model_or_named,
    sparsity: float,
    *,
    rank=DEFAULT_RANK,
    scope: str = "global",
    min_density: float | None = None,
    include=None,
    exclude=None,
    seed: int = 0,
    **nmf_kwargs,
) -> dict[str, torch.Tensor]:
    """ONG masks without touching the weights: name -> bool tensor (True = kept).

    `model_or_named` is an ``nn.Module`` or an iterable of (name, tensor) pairs (all
    scored). `nmf_kwargs` are ONG's other options (max_iter, tol, init, backend, group;
    ong.py; ``restarts=k`` is consensus ONG); the allocation is :func:`prune`'s.
    """
    sparsity = check_sparsity(sparsity)
    scope = check_scope(scope)
    min_density = check_min_density(min_density)
    seed = check_seed(seed)
    kwargs = {"rank": rank, **nmf_kwargs}
    _method_kwargs("ong", {"seed": seed}, kwargs)
    model, targets = resolve_targets(model_or_named, include, exclude)
    for name, t in targets:
        check_tensor(t, name)
    masks, _ = _compute_masks(
        model, targets, "ong", sparsity, scope, min_density, {"seed": seed}, kwargs, False
    )
    return {n: m for (n, _), m in zip(targets, masks, strict=True)}


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    *,
    min_density: float | None = None,
) -> dict[str, torch.Tensor]:
    """Masks from any scores (name -> tensor, higher = kept) with prune's allocation."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict of name -> score tensor")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"scores[{name!r}] must be a floating-point tensor")
    names = list(scores)
    masks = allocate(list(scores.values()), sparsity, scope, min_density=min_density, names=names)
    return dict(zip(names, masks, strict=True))


def _mask_dict(masks, arg: str) -> Mapping[str, torch.Tensor]:
    if isinstance(masks, PruneResult):
        return masks.masks
    if not isinstance(masks, Mapping):
        raise TypeError(f"{arg} must be a dict of name -> bool tensor, got {type(masks).__name__}")
    for name, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"{arg}[{name!r}] must be a bool tensor")
    return masks


def masks_for(model_or_named, masks) -> dict[nn.Parameter, torch.Tensor]:
    """{parameter: mask} for ``FusedMaskedSGD(masks=...)`` from name-keyed masks.

    `model_or_named` is the model the masks were computed on (or its named_parameters());
    `masks` is a name -> bool tensor dict or a PruneResult. Each mask is moved to its
    parameter's device. Unknown names or wrong shapes are a ValueError.
    """
    masks = _mask_dict(masks, "masks")
    if isinstance(model_or_named, nn.Module):
        params = dict(model_or_named.named_parameters())
    else:
        params = dict(model_or_named)
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown[:5]}")
    out = {}
    for name, mask in masks.items():
        param = params[name]
        if mask.shape != param.shape:
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}"
            )
        out[param] = mask.to(param.device)
    return out


def mask_overlap(a, b) -> float:
    """Intersection over union of the kept sets of two mask dicts, over their common names.

    1.0 means the same weights are kept; two masks that keep nothing count as identical.
    Either argument may be a PruneResult. No common name, or a common name with two
    shapes, is a ValueError.
    """
    a, b = _mask_dict(a, "a"), _mask_dict(b, "b")
    common = [n for n in a if n in b]
    if not common:
        raise ValueError("the two mask sets have no parameter name in common")
    for n in common:
        if a[n].shape != b[n].shape:
            raise ValueError(
                f"mask {n!r} has shape {tuple(a[n].shape)} in a, {tuple(b[n].shape)} in b"
            )
    device = a[common[0]].device
    fa = torch.cat([a[n].reshape(-1).to(device) for n in common])
    fb = torch.cat([b[n].reshape(-1).to(device) for n in common])
    inter, union = int(torch.count_nonzero(fa & fb)), int(torch.count_nonzero(fa | fb))
    return 1.0 if union == 0 else inter / union
