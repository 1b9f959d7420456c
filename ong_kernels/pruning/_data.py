"""Helpers for the data-dependent scores: batches, devices, a private model copy, seeding."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "check_data",
    "check_loss_fn",
    "forward",
    "iter_batches",
    "scoring_copy",
    "seeded",
    "to_device",
]


def _is_single_batch(data) -> bool:
    # A single (inputs, targets) pair: a 2-sequence whose first element is a tensor. A list of
    # batches has batches (pairs) as elements, never a bare tensor.
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def _check_pair(batch, where: str) -> None:
    if isinstance(batch, (tuple, list)) and len(batch) != 2:
        raise ValueError(
            f"{where} has {len(batch)} items; expected an (inputs, targets) pair "
            "(drop the extra items, e.g. data=[(x, y) for x, y, *_ in loader])"
        )


def check_data(data, method: str) -> None:
    """ValueError / TypeError before any work when a data-dependent method lacks usable data."""
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        _check_pair(data, "data")  # a bare batch of tensors, e.g. (x, y, z)
    if data is None:
        raise ValueError(
            f"method {method!r} needs data: pass data=(inputs, targets) or an iterable of "
            "such batches (e.g. a few batches of the training loader)"
        )
    if isinstance(data, (torch.Tensor, str, bytes)) or not (
        _is_single_batch(data) or hasattr(data, "__iter__")
    ):
        raise TypeError(
            "data must be an (inputs, targets) pair or an iterable of them, "
            f"got {type(data).__name__}"
        )


def check_loss_fn(loss_fn):
    """The loss to use: `loss_fn` if callable, cross-entropy when None."""
    if loss_fn is None:
        return F.cross_entropy
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(outputs, targets), got {type(loss_fn).__name__}")
    return loss_fn


def iter_batches(data) -> Iterator[tuple[Any, Any]]:
    """Yield (inputs, targets) from a single pair or from an iterable of pairs."""
    if _is_single_batch(data):
        yield data[0], data[1]
        return
    count = 0
    for i, batch in enumerate(data):
        _check_pair(batch, f"data batch {i}")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                f"data batch {i} must be an (inputs, targets) pair, got {type(batch).__name__}"
            )
        count += 1
        yield batch[0], batch[1]
    if count == 0:
        raise ValueError("data has no batches")


def to_device(obj, device: torch.device):
    """Move tensors, possibly nested in tuples, lists or dicts, to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def forward(model: nn.Module, inputs):
    """model(inputs), unpacking a tuple/list as positional and a dict as keyword arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def scoring_copy(
    model: nn.Module, names: list[str], dtype: torch.dtype | None = None
) -> tuple[nn.Module, list[nn.Parameter]]:
    """A deep copy of `model` (cast to `dtype` if given) and its parameters named `names`,
    all requiring grad.

    Scores are computed on the copy so that the user's model (weights, BatchNorm running
    statistics, requires_grad flags, .grad) is exactly as it was.
    """
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone.to(dtype)
    by_name = dict(clone.named_parameters())
    params = [by_name[n] for n in names]
    for p in params:
        p.requires_grad_(True)
    return clone, params


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run with the CPU (and `device`'s CUDA) generator seeded, restoring them afterwards.

    Makes stochastic layers (dropout in train mode) give the same scores for the same seed
    without changing the caller's random state.
    """
    cuda = device.type == "cuda"
    index = (
        device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
