"""Argument checks shared by every public entry point.

Each check returns the normalised value or raises a TypeError (wrong kind of thing) or a
ValueError (right kind, wrong value) whose message names the argument and what was wrong.
Public functions run their checks before touching any state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.Generator.manual_seed takes seeds in [0, 2**64 - 1].
MAX_SEED = 2**64 - 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_int(value) -> int | None:
    """`value` as a Python int when it is integer-like: an int, a numpy integer (what
    np.arange gives), or a 0-d integer tensor; None otherwise (a bool, a float, 3.0, a
    string, a tensor with more than one entry)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        integer = not (value.is_floating_point() or value.is_complex())
        if value.dim() == 0 and integer and value.dtype != torch.bool:
            return int(value.item())
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return None


def is_int(value) -> bool:
    """An integer-like value (:func:`as_int`; not a bool): the test behind :func:`check_int`,
    for callers that word their own messages, e.g. TrainConfig's ``field: ...``."""
    return as_int(value) is not None


def is_finite_real(value) -> bool:
    """A finite int or float that is not a bool (the test behind :func:`check_real`)."""
    return _is_number(value) and math.isfinite(value)


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int in [minimum, maximum]: integer-like values (numpy integers,
    0-d integer tensors) are accepted and converted (:func:`as_int`); bool is not an int."""
    number = as_int(value)
    if number is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def check_real(
    value,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """`value` as a finite float within the bounds (open bounds exclude the end point).

    A one-element tensor is accepted (optimizers take tensor learning rates).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not _is_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (min_open and value == minimum)):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (max_open and value == maximum)):
        raise ValueError(f"{name} must be {'<' if max_open else '<='} {maximum}, got {value}")
    return value


def check_choice(value, name: str, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_seed(value, name: str = "seed") -> int:
    """An int seed in [0, 2**64 - 1] (what torch.Generator.manual_seed accepts), as an int."""
    value = check_int(value, name, 0)
    if value > MAX_SEED:
        raise ValueError(f"{name} must be <= 2**64 - 1 (torch.Generator's range), got {value}")
    return value


def check_optional_real(value, name: str, **bounds) -> float | None:
    """None, or `value` checked by :func:`check_real` with the same bounds."""
    return None if value is None else check_real(value, name, **bounds)


def check_bool(value, name: str) -> bool:
    """`value` if it is a bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_positive_ints(value, name: str) -> tuple[int, ...]:
    """A tuple/list of ints >= 1 (a shape), as a tuple."""
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"{name} must be a non-empty tuple of ints, got {value!r}")
    return tuple(check_int(v, f"{name}[{i}]", 1) for i, v in enumerate(value))


def check_tensor(value, name: str, *, dtypes=None) -> torch.Tensor:
    """A strided tensor with data (not meta, not sparse), optionally of one of `dtypes`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor (shape only, no data): pass a real tensor")
    if value.layout != torch.strided:
        raise ValueError(f"{name} has layout {value.layout}: pass a dense tensor (.to_dense())")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; supported: {names}")
    return value


def check_nonnegative_finite(t: torch.Tensor, name: str) -> None:
    """No NaN, Inf or negative entry (the NMF input contract)."""
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or Inf (first at index {bad})")
    if bool((t < 0).any()):
        raise ValueError(
            f"{name} contains negative entries (min {float(t.min()):.3g}); NMF factorises a "
            "non-negative matrix, e.g. pass weight.abs()"
        )


def check_device(value, name: str = "device") -> torch.device:
    """`value` (a torch.device or a string such as "cpu", "cuda:1") as a torch.device that can
    hold data in this process: a ValueError naming `name` for an unknown device, the meta
    device, CUDA without CUDA, a CUDA index past the device count, or another device type
    this torch cannot use."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a str or torch.device, got {type(value).__name__}")
    text = str(value)
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(
            f"{name} {text!r} is not a device; expected e.g. cpu, cuda, cuda:1"
        ) from None
    if device.type == "meta":
        raise ValueError(f"{name} {text!r} holds no data; expected e.g. cpu, cuda, cuda:1")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {text!r} requested but CUDA is not available (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{name} {text!r} is not available here ({first})") from None
    return device
