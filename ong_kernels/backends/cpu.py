"""Compiled CPU kernels (csrc/cpu/): one OpenMP call per fused step."""

from __future__ import annotations

import functools

import torch

from ong_kernels.backends import _native
from ong_kernels.backends._multi_tensor import TablePlan, planned_kernel
from ong_kernels.backends.registry import register

# float16/bfloat16 parameters on the CPU are rare; they take the reference path.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _launch(dtype, table, n, hyper, grad_scale, found_inf) -> None:
    """One native call for every row of `table` (a host int64 tensor), GIL released.
    grad_scale / found_inf: float32 CPU tensors of GradScaler, read by the kernel."""
    _native.lib().masked_sgd_step_cpu(
        table.data_ptr(),
        n,
        _native.NATIVE_DTYPES[dtype],
        *hyper,
        torch.get_num_threads(),
        _scalar_ptr(grad_scale, "grad_scale"),
        _scalar_ptr(found_inf, "found_inf"),
    )


def _scalar_ptr(t: torch.Tensor | None, name: str) -> int:
    """Address of a one-element float32 CPU tensor (GradScaler's), 0 for None."""
    if t is None:
        return 0
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{name} must be one float32 value on the CPU, got {t.dtype} {t.device}")
    return t.data_ptr()


# The cached form of the step (FusedMaskedSGD keeps it while the layouts hold).
prepare = functools.partial(TablePlan, supported_dtypes=SUPPORTED_DTYPES, launch=_launch)


masked_sgd_step_ = register(
    "masked_sgd_step", "cpu", devices=("cpu",), available=_native.has_cpu, hint=_native.BUILD_HINT
)(
    planned_kernel(
        prepare,
        "The step for every float32/float64 tensor in ONE native call (GIL released); "
        "tensors the kernel cannot take go to the reference kernel.",
    )
)


COMPACT_COLUMNS = 7  # csrc/include/ong_sgd.h SgdCompactTensor


class CompactPlan:
    """compact_state on the CPU: one native call per dtype touching kept elements only.

    `cbufs[i]`: momentum of the kept elements of params[i] in memory order (or no buffers),
    `offsets[i]`: _multi_tensor.chunk_offsets of its mask for masked_sgd_chunk_size_cpu().
    What the kernel could read out of bounds through is checked here; the kernel also never
    writes a compact buffer past its length, whatever the bits and offsets say.
    """

    def __init__(self, params, grads, cbufs, mask_bits, offsets) -> None:
        from ong_kernels.backends._multi_tensor import check_native_args, dense_layout

        check_native_args(params, grads, [], mask_bits)
        chunk = _native.lib().masked_sgd_chunk_size_cpu()
        self.params = [p.detach() for p in params]
        self.cbufs, self.bits, self.offsets = list(cbufs), list(mask_bits), list(offsets)
        self.scratch: dict[int, torch.Tensor] = {}
        rows: dict[torch.dtype, list[list[int]]] = {}
        for i, p in enumerate(self.params):
            if p.dtype not in SUPPORTED_DTYPES or not dense_layout(p) or self.bits[i] is None:
                raise ValueError(f"params[{i}]: the compact CPU kernel takes dense masked f32/f64")
            off = self.offsets[i]
            n_chunks = (p.numel() + chunk - 1) // chunk
            if off.dtype != torch.int64 or off.device.type != "cpu" or off.numel() < n_chunks:
                raise ValueError(f"offsets[{i}] must be {n_chunks} int64 on the CPU")
            if not off.is_contiguous() or not self.bits[i].is_contiguous():
                raise ValueError(f"offsets[{i}] and mask_bits[{i}] must be contiguous")
            buf = self.cbufs[i] if self.cbufs else None
            if buf is not None and (
                buf.dtype != p.dtype or buf.device != p.device or not buf.is_contiguous()
            ):
                raise ValueError(f"compact momentum {i} must be contiguous {p.dtype} on the CPU")
            g = grads[i]
            if g.stride() != p.stride():
                self.scratch[i] = torch.empty_like(p)
            rows.setdefault(p.dtype, []).append(
                [
                    p.data_ptr(),
                    (self.scratch[i] if i in self.scratch else g).data_ptr(),
                    0 if buf is None else buf.data_ptr(),
                    self.bits[i].data_ptr(),
                    p.numel(),
                    off.data_ptr(),
                    0 if buf is None else buf.numel(),
                ]
            )
        self.tables = [
            (dtype, torch.tensor(r, dtype=torch.int64).reshape(-1, COMPACT_COLUMNS), len(r))
            for dtype, r in rows.items()
        ]

    def run(self, grads, hyper, grad_scale=None, found_inf=None) -> None:
        for i, buf in self.scratch.items():
            buf.copy_(grads[i])
        for dtype, table, n in self.tables:
            _native.lib().masked_sgd_step_compact_cpu(
                table.data_ptr(),
                n,
                _native.NATIVE_DTYPES[dtype],
                *hyper,
                torch.get_num_threads(),
                _scalar_ptr(grad_scale, "grad_scale"),
                _scalar_ptr(found_inf, "found_inf"),
            )
