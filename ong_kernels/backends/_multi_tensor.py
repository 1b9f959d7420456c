"""Shared host side of the fused multi-tensor steps: which tensors a native kernel can take,
the int64 table (one csrc/include/ong_sgd.h SgdTensor row per tensor) that the CPU, CUDA and
Triton kernels all read, and the plan that keeps that table between steps.

Memory safety does not rest on the caller: `check_native_args` refuses (with the argument's
name) any tensor a kernel could read or write out of bounds through, whoever calls, and a
`TablePlan` keeps an alias of every parameter, buffer and mask whose address is in its table,
so the addresses stay valid even when a parameter's storage is swapped (`p.data = ...`) while
a plan is cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

TABLE_COLUMNS = 5  # param, grad, buf, mask, numel (csrc/include/ong_sgd.h SgdTensor)


def dense_layout(t: torch.Tensor) -> bool:
    """True when elementwise kernels may walk `t` in storage order (contiguous or channels_last)."""
    return t.is_contiguous() or (
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    )


def step_key(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> tuple:
    """What a cached TablePlan depends on, per step (each `map` pass over ResNet-18's 62
    tensors costs ~4 us on the 2-core CPU, so only what safety and the mask layout need):

    * parameters: address and strides. A plan keeps aliases of the parameters' storages,
      so a parameter swapped under it (`p.data = ...`) changes its address (the old storage
      is still alive) or, for a view of the same storage, its strides; its dtype, device
      and shape are checked when the plan is rebuilt.
    * gradients: address, strides, shape and dtype: they are new tensors every step and
      not held by the plan, so what the kernel reads through their address is checked.
    The device is implied by the address (CUDA's unified address space keeps host and device
    addresses apart)."""
    t = torch.Tensor
    return (
        tuple(map(t.data_ptr, params)),
        tuple(map(t.stride, params)),
        tuple(map(t.data_ptr, grads)),
        tuple(map(t.stride, grads)),
        tuple(map(t.size, grads)),
        tuple(g.dtype for g in grads),
    )


def check_native_args(params, grads, momentum_buffers, mask_bits) -> torch.device:
    """The device of the step, or a ValueError naming the first tensor a native kernel could
    read or write out of bounds through: another device, dtype or shape than its parameter,
    mask bits that are not uint8 with ceil(numel / 8) contiguous bytes."""
    n = len(params)
    if len(grads) != n or len(mask_bits) != n or len(momentum_buffers) not in (0, n):
        raise ValueError(
            f"masked_sgd_step: {n} params, {len(grads)} grads, {len(momentum_buffers)} "
            f"momentum_buffers, {len(mask_bits)} mask_bits: expected one each (buffers may be [])"
        )
    device = params[0].device
    for i, p in enumerate(params):
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device}, params[0] on {device}")
        pairs = [("grads", grads[i])]
        if momentum_buffers:
            pairs.append(("momentum_buffers", momentum_buffers[i]))
        for name, t in pairs:
            if t.device != device or t.dtype != p.dtype or t.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}; its parameter "
                    f"is {tuple(p.shape)} {p.dtype} on {device}"
                )
        bits = mask_bits[i]
        if bits is not None and (
            bits.device != device
            or bits.dtype != torch.uint8
            or bits.dim() != 1
            or bits.numel() != (p.numel() + 7) // 8
        ):
            raise ValueError(
                f"mask_bits[{i}] must be uint8 of ceil({p.numel()} / 8) bytes on {device}, got "
                f"{bits.dtype} {tuple(bits.shape)} on {bits.device}"
            )
    return device


@dataclass
class Partition:
    """Indices the native kernel takes, grouped by dtype, and the ones left to the reference.

    `scratch[i]`: for a gradient whose strides differ from its parameter's, a tensor in the
    parameter's layout that the gradient is copied into before each launch (so channels_last
    weights with contiguous gradients stay fused).
    """

    by_dtype: dict[torch.dtype, list[int]] = field(default_factory=dict)
    fallback: list[int] = field(default_factory=list)
    scratch: dict[int, torch.Tensor] = field(default_factory=dict)


def partition(params, grads, momentum_buffers, mask_bits, supported_dtypes) -> Partition:
    """Validate (check_native_args) and split the tensors between kernel and reference."""
    check_native_args(params, grads, momentum_buffers, mask_bits)
    out = Partition()
    has_buf = len(momentum_buffers) > 0
    for i, p in enumerate(params):
        bits = mask_bits[i]
        ok = p.dtype in supported_dtypes and dense_layout(p)
        ok = ok and (not has_buf or momentum_buffers[i].stride() == p.stride())
        ok = ok and (bits is None or bits.is_contiguous())
        if not ok:
            out.fallback.append(i)
            continue
        if grads[i].stride() != p.stride():
            out.scratch[i] = torch.empty_like(p)
        out.by_dtype.setdefault(p.dtype, []).append(i)
    return out


class TablePlan:
    """A validated partition and one int64 table per dtype for fixed tensors.

    Valid while `step_key(params, grads)` is unchanged and the buffers and masks are the
    same tensors; `run` then costs the launch only. `launch(dtype, table, n_rows, hyper,
    grad_scale, found_inf)` is the backend's kernel call; `table_device` where it reads the
    table (the CPU kernel reads host memory).
    """

    def __init__(
        self,
        params,
        grads,
        momentum_buffers,
        mask_bits,
        *,
        supported_dtypes: Sequence[torch.dtype],
        launch: Callable,
        finish_table: Callable[[torch.Tensor, list[list[int]]], torch.Tensor] | None = None,
    ) -> None:
        self.parts = partition(params, grads, momentum_buffers, mask_bits, supported_dtypes)
        # Aliases (not the Parameters): they keep the storages the table points into alive.
        self.params = [p.detach() for p in params]
        self.bufs = [b.detach() for b in momentum_buffers]
        self.bits = list(mask_bits)
        self.launch = launch
        # Tensors no fused kernel takes (partition's fallback) go through the reference
        # (imported here: reference -> _bitmask -> this module).
        from ong_kernels.backends import reference

        self.fallback = reference_scaled(reference.masked_sgd_step_)
        self.tables: list[tuple[torch.dtype, torch.Tensor, int]] = []
        for dtype, idx in self.parts.by_dtype.items():
            rows = [
                [
                    self.params[i].data_ptr(),
                    (self.parts.scratch[i] if i in self.parts.scratch else grads[i]).data_ptr(),
                    self.bufs[i].data_ptr() if self.bufs else 0,
                    self.bits[i].data_ptr() if self.bits[i] is not None else 0,
                    self.params[i].numel(),
                ]
                for i in idx
            ]
            table = torch.tensor(rows, dtype=torch.int64).reshape(-1, TABLE_COLUMNS)
            if finish_table is not None:
                table = finish_table(table, rows)
            self.tables.append((dtype, table, len(idx)))

    def run(self, grads, hyper: tuple, grad_scale=None, found_inf=None) -> None:
        """One step. `grads` must be the tensors the plan was built with (or ones with the
        same step_key). grad_scale / found_inf: GradScaler's tensors (or None)."""
        for i, buf in self.parts.scratch.items():
            buf.copy_(grads[i])
        for dtype, table, n in self.tables:
            self.launch(dtype, table, n, hyper, grad_scale, found_inf)
        if self.parts.fallback:
            idx = self.parts.fallback
            self.fallback(
                [self.params[i] for i in idx],
                [grads[i] for i in idx],
                [self.bufs[i] for i in idx] if self.bufs else [],
                [self.bits[i] for i in idx],
                hyper,
                grad_scale,
                found_inf,
            )


def planned_kernel(prepare: Callable, doc: str) -> Callable:
    """The op-signature kernel (params, grads, momentum_buffers, mask_bits, lr, momentum,
    dampening, weight_decay, nesterov, maximize, first_step) of a backend whose step is
    `prepare(params, grads, momentum_buffers, mask_bits).run(grads, hyper)`. `prepare` stays
    reachable as `.prepare`, so FusedMaskedSGD can cache the plan while layouts hold."""

    def masked_sgd_step_(params, grads, momentum_buffers, mask_bits, *hyper) -> None:
        prepare(params, grads, momentum_buffers, mask_bits).run(grads, tuple(hyper))

    masked_sgd_step_.__doc__ = doc
    masked_sgd_step_.prepare = prepare
    return masked_sgd_step_


def reference_scaled(kernel: Callable) -> Callable:
    """`kernel` (the list-taking reference) with GradScaler's unscale and inf-skip in front:
    the path for tensors no fused kernel takes (reads found_inf on the host: one sync)."""

    def run(params, grads, bufs, bits, hyper, grad_scale=None, found_inf=None) -> None:
        if found_inf is not None and bool(found_inf.item()):
            return
        if grad_scale is not None:
            # as GradScaler.unscale_: times the float32 reciprocal, rounded to the grad's dtype
            inv = grad_scale.double().reciprocal().float()
            grads = [(g * inv.to(g.device)).to(g.dtype) for g in grads]
        kernel(params, grads, bufs, bits, *hyper)

    return run


# ----------------------------------------------------------------------------- compact_state


def kept_view(t: torch.Tensor) -> torch.Tensor:
    """The flat view in memory order that compact momentum is indexed by (dense layouts only:
    compact_state refuses others)."""
    if not dense_layout(t):
        raise ValueError(
            "compact_state needs contiguous or channels_last parameters, got strides "
            f"{t.stride()} for shape {tuple(t.shape)}"
        )
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def compact(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept entries of `dense` in memory order (`mask` in the same layout)."""
    return kept_view(dense)[kept_view(mask)].clone()


def expand(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A dense tensor in `mask`'s layout: `values` at the kept entries, 0 elsewhere."""
    out = torch.zeros_like(mask, dtype=values.dtype)
    kept_view(out)[kept_view(mask)] = values
    return out


def chunk_offsets(mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """int64 [ceil(numel / chunk)]: kept elements before each chunk, in memory order."""
    flat = kept_view(mask)
    pad = (-flat.numel()) % chunk
    counts = torch.cat([flat, flat.new_zeros(pad)]).view(-1, chunk).sum(1)
    return (counts.cumsum(0) - counts).to(torch.int64).cpu().contiguous()


class CompactTorchPlan:
    """compact_state in PyTorch ops (any device and dtype): gathers the kept entries, applies
    the reference step to them, scatters them back. The CPU kernel's fallback and the path
    on GPUs (no compact CUDA/Triton kernel yet)."""

    def __init__(self, params, grads, cbufs, masks, reference_fn) -> None:
        check_native_args(params, grads, [], [None] * len(params))
        self.params = [p.detach() for p in params]
        self.cbufs, self.masks = list(cbufs), list(masks)
        self.reference = reference_scaled(reference_fn)
        for i, (p, m) in enumerate(zip(self.params, self.masks, strict=True)):
            kept_view(p)
            if self.cbufs and self.cbufs[i].numel() != int(m.sum()):
                raise ValueError(f"compact momentum {i}: {self.cbufs[i].numel()} entries")

    def run(self, grads, hyper, grad_scale=None, found_inf=None) -> None:
        ps, gs = [], []
        for p, g, m in zip(self.params, grads, self.masks, strict=True):
            km = kept_view(m)
            ps.append(kept_view(p)[km])
            g = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
            gs.append(kept_view(g)[km])
        self.reference(ps, gs, self.cbufs, [None] * len(ps), hyper, grad_scale, found_inf)
        for p, m, new in zip(self.params, self.masks, ps, strict=True):
            kept_view(p)[kept_view(m)] = new
