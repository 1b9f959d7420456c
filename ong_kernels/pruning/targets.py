"""What is prunable: the weight tensors a pruning method scores and masks.

By default every weight of a convolution (any dimensionality, transposed included) and of a
linear layer is prunable - the first convolution, 1x1 shortcut projections and the classifier
included - and nothing else: biases, normalisation layers and embeddings stay dense. This is
the BIMP framework's choice (Zimmer et al., "How I Learned to Stop Worrying and Love
Retraining", 2023), and the one the pruning-at-initialisation papers compare under.

``include`` / ``exclude`` change the selection. Each is a module type, a name pattern, or a
sequence of them:

* a module type (e.g. ``nn.Linear``) matches the ``weight`` of every module of that type;
* a string is an ``fnmatch`` pattern (``*``, ``?``, ``[...]``, case-sensitive) matched against
  parameter names (``"layer1.*"``, ``"fc.bias"``) and against module names, where it selects
  that module's ``weight`` (``"fc"`` is the same as ``"fc.weight"``).

``include`` replaces the default selection; ``exclude`` then removes from it. Parameters are
returned in ``model.named_parameters()`` order, which is the order ties are broken in.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn

__all__ = ["DEFAULT_PRUNABLE_TYPES", "Target", "prunable_parameters", "resolve_targets"]

DEFAULT_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

# A prunable tensor: its name and the tensor itself (an nn.Parameter of the model, or any
# tensor when the caller hands named tensors instead of a model).
Target = tuple[str, torch.Tensor]
Selector = type | str


def _selectors(value, arg: str) -> list[Selector]:
    if value is None:
        return []
    items = [value] if isinstance(value, (str, type)) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{arg} must be a module type, a name pattern, or a sequence of them; "
            f"got {type(value).__name__}"
        ) from None
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        if isinstance(item, str) and item:
            continue
        raise TypeError(
            f"{arg} entries must be nn.Module subclasses or non-empty name patterns; got {item!r}"
        )
    return items


def _matches(selectors: list[Selector], pname: str, owner: tuple[str, nn.Module] | None) -> bool:
    """Whether parameter `pname` (owned as `weight` by `owner`, if any) matches a selector."""
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatchcase(pname, sel) or (owner is not None and fnmatchcase(owner[0], sel)):
                return True
        elif owner is not None and isinstance(owner[1], sel):
            return True
    return False


def prunable_parameters(
    model: nn.Module, include=None, exclude=None
) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of `model` that pruning scores and masks.

    Args:
        model: any ``nn.Module``.
        include: module types and/or name patterns that replace the default selection
            (``DEFAULT_PRUNABLE_TYPES``: conv and linear weights); see the module docstring.
        exclude: module types and/or name patterns removed from the selection.

    Raises:
        TypeError: `model` is not an ``nn.Module`` or a selector has the wrong type.
        ValueError: nothing is left to prune.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inc = _selectors(include, "include") if include is not None else list(DEFAULT_PRUNABLE_TYPES)
    exc = _selectors(exclude, "exclude")

    # named_parameters() lists a shared parameter once, under its first name; a module that
    # shares it is its owner only if it comes first too.
    owners: dict[int, tuple[str, nn.Module]] = {}
    for mname, module in model.named_modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, nn.Parameter) and id(weight) not in owners:
            owners[id(weight)] = (mname, module)

    selected = []
    for pname, param in model.named_parameters():
        owner = owners.get(id(param))
        if not param.is_floating_point() or param.numel() == 0:
            continue
        if _matches(inc, pname, owner) and not _matches(exc, pname, owner):
            selected.append((pname, param))
    if not selected:
        raise ValueError(
            f"model {type(model).__name__} has nothing to prune with include={include!r}, "
            f"exclude={exclude!r} (by default: the weights of Conv*/Linear modules)"
        )
    return selected


def resolve_targets(model_or_named, include=None, exclude=None) -> tuple[nn.Module | None, list]:
    """(model or None, targets) from a model or from an iterable of (name, tensor) pairs.

    Named tensors are all prunable (include / exclude must then be None); a model goes
    through :func:`prunable_parameters`.
    """
    if isinstance(model_or_named, nn.Module):
        return model_or_named, prunable_parameters(model_or_named, include, exclude)
    if isinstance(model_or_named, (str, torch.Tensor)) or not isinstance(model_or_named, Iterable):
        raise TypeError(
            "expected an nn.Module or an iterable of (name, tensor) pairs, "
            f"got {type(model_or_named).__name__}"
        )
    if include is not None or exclude is not None:
        raise ValueError("include / exclude select from a model; named tensors are all pruned")
    targets, seen = [], set()
    for i, item in enumerate(model_or_named):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"named tensors[{i}] must be a (name, tensor) pair, got {item!r:.60}")
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"named tensors[{i}] must be (str, Tensor), got ({name!r:.40}, ...)")
        if not tensor.is_floating_point() or tensor.numel() == 0:
            raise ValueError(f"tensor {name!r} must be a non-empty floating-point tensor")
        if name in seen:
            raise ValueError(f"name {name!r} appears twice")
        seen.add(name)
        targets.append((name, tensor))
    if not targets:
        raise ValueError("no named tensors given: nothing to prune")
    return None, targets
