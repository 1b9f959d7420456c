"""The masked SGD step's arguments: its hyper-parameters as one named type, and the one
validator every caller goes through (the op's fake, and every kernel before it builds a plan).

`SgdHyper` mirrors `struct SgdHyper` of csrc/include/ong_sgd.h field for field (the native
bindings read it by name; tests/test_optim_safety.py compares the two), and the op schemas in
ong_kernels/_ops.py are generated from it, so adding a hyper-parameter is one field here and
one in the header.
"""

from __future__ import annotations

from typing import NamedTuple, get_type_hints

import torch

from ong_kernels._bitmask import COMPACT_BLOCK
from ong_kernels._layout import dense_layout

SGD_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class SgdHyper(NamedTuple):
    """One step's hyper-parameters (csrc/include/ong_sgd.h SgdHyper, same names and order)."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    first_step: bool  # the momentum buffers are new: buf = g (no dampening), as torch.optim.SGD


_SCHEMA_TYPES = {float: "float", bool: "bool"}
# "float lr, float momentum, ..., bool first_step": the op schemas' hyper-parameter part
HYPER_SCHEMA = ", ".join(
    f"{_SCHEMA_TYPES[t]} {name}" for name, t in get_type_hints(SgdHyper).items()
)


def _check_lengths(n: int, **lists) -> None:
    for name, values in lists.items():
        allowed = (0, n) if name.startswith("momentum") else (n,)
        if len(values) not in allowed:
            raise ValueError(
                f"masked_sgd_step: {n} params but {len(values)} {name} (expected "
                f"{' or '.join(map(str, allowed))})"
            )


def _check_like(name: str, t: torch.Tensor, p: torch.Tensor, device: torch.device) -> None:
    if t.layout != torch.strided:
        raise NotImplementedError(
            f"{name} is {t.layout}: FusedMaskedSGD / masked_sgd_step_ does not support sparse "
            "gradients"
        )
    if t.device != device or t.dtype != p.dtype or t.shape != p.shape:
        raise ValueError(
            f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}; its parameter is "
            f"{tuple(p.shape)} {p.dtype} on {device}"
        )


def _check_bits(i: int, bits: torch.Tensor, p: torch.Tensor, device: torch.device) -> None:
    if (
        bits.device != device
        or bits.dtype != torch.uint8
        or bits.dim() != 1
        or bits.numel() != (p.numel() + 7) // 8
    ):
        raise ValueError(
            f"mask_bits[{i}] must be uint8 of ceil({p.numel()} / 8) bytes on {device}, got "
            f"{bits.dtype} {tuple(bits.shape)} on {bits.device}"
        )


def _check_param(i: int, p: torch.Tensor, device: torch.device) -> None:
    if p.device != device:
        raise ValueError(f"params[{i}] is on {p.device}, params[0] on {device}")
    if p.dtype not in SGD_DTYPES:
        raise ValueError(f"params[{i}] has dtype {p.dtype}; supported: {SGD_DTYPES}")


def check_momentum(momentum: float, n_params: int, buffers, name: str = "momentum_buffers"):
    """Momentum and its buffers come together: every kernel decides from one of the two
    (the reference and CUDA from the buffers, the CPU kernel from momentum != 0), so a
    mismatch would mean a write through a null buffer or a step the kernels disagree on.
    Checked at every call (not only when a plan is built: momentum may change between
    steps of one plan)."""
    if not n_params:
        return
    if momentum != 0 and not buffers:
        raise ValueError(
            f"masked_sgd_step: momentum={momentum} needs {name} (one per parameter), got none"
        )
    if momentum == 0 and buffers:
        raise ValueError(
            f"masked_sgd_step: {name} given with momentum=0 (pass [] without momentum, as "
            "FusedMaskedSGD does)"
        )


def check_step_args(params, grads, momentum_buffers, mask_bits) -> None:
    """A ValueError naming the first tensor a kernel could read or write out of bounds
    through (or that is not a step's input): another device, dtype or shape than its
    parameter, mask bits that are not uint8 with ceil(numel / 8) bytes."""
    n = len(params)
    _check_lengths(n, grads=grads, momentum_buffers=momentum_buffers, mask_bits=mask_bits)
    if not n:
        return
    device = params[0].device
    for i, p in enumerate(params):
        _check_param(i, p, device)
        _check_like(f"grads[{i}]", grads[i], p, device)
        if momentum_buffers:
            _check_like(f"momentum_buffers[{i}]", momentum_buffers[i], p, device)
        if mask_bits[i] is not None:
            _check_bits(i, mask_bits[i], p, device)


def check_compact_args(params, grads, momentum_compact, mask_bits, offsets) -> None:
    """check_step_args for the compact format (ong_kernels/_bitmask.py): every parameter
    masked and contiguous or channels_last, `momentum_compact[i]` 1-D of its kept elements at most,
    `offsets[i]` int64 of one entry per COMPACT_BLOCK elements, all on one device."""
    n = len(params)
    _check_lengths(
        n, grads=grads, momentum_compact=momentum_compact, mask_bits=mask_bits, offsets=offsets
    )
    if not n:
        return
    device = params[0].device
    for i, p in enumerate(params):
        _check_param(i, p, device)
        if not dense_layout(p):
            raise ValueError(
                f"params[{i}]: compact_state needs contiguous or channels_last parameters, got "
                f"strides {p.stride()} for shape {tuple(p.shape)}"
            )
        _check_like(f"grads[{i}]", grads[i], p, device)
        if mask_bits[i] is None:
            raise ValueError(f"mask_bits[{i}] is None: every compact parameter has a mask")
        _check_bits(i, mask_bits[i], p, device)
        blocks = -(-p.numel() // COMPACT_BLOCK)
        off = offsets[i]
        if off.device != device or off.dtype != torch.int64 or off.shape != (blocks,):
            raise ValueError(
                f"offsets[{i}] must be {blocks} int64 on {device}, got {off.dtype} "
                f"{tuple(off.shape)} on {off.device}"
            )
        if momentum_compact:
            buf = momentum_compact[i]
            if buf.device != device or buf.dtype != p.dtype or buf.dim() != 1:
                raise ValueError(
                    f"momentum_compact[{i}] must be 1-D {p.dtype} on {device}, got {buf.dtype} "
                    f"{tuple(buf.shape)} on {buf.device}"
                )
            if buf.numel() > p.numel():
                raise ValueError(
                    f"momentum_compact[{i}] has {buf.numel()} entries for {p.numel()} weights"
                )
