"""Shared host side of the fused multi-tensor steps: the int64 table (one
csrc/include/ong_sgd.h SgdTensor or SgdCompactTensor row per tensor) that the CPU, CUDA and
Triton kernels read, the plan that keeps that table between steps, and the cache of plans
that every compiled kernel keeps behind the op.

Memory safety does not rest on the caller: a plan is built only after
`_sgd_args.check_step_args` (or check_compact_args) accepted its tensors, and it keeps an alias
of every parameter, buffer and mask whose address is in its table, so the addresses stay
valid even when a parameter's storage is swapped (`p.data = ...`) while the plan is cached.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ong_kernels._layout import dense_layout
from ong_kernels.backends import reference
from ong_kernels.backends._host import layout_key, write_addresses
from ong_kernels.backends._sgd_args import SgdHyper, check_compact_args, check_step_args

TABLE_COLUMNS = 5  # param, grad, buf, mask, numel (csrc/include/ong_sgd.h SgdTensor)
COMPACT_COLUMNS = 7  # + offsets, buf_numel (SgdCompactTensor)

GRAD_COLUMN = 1  # the gradient's address in a table row


def refuse_capture(device: torch.device) -> None:
    """CUDA graphs are refused, not supported: the table and the hyper-parameters are host
    values (a captured step would replay with the lr, first-step flag and addresses of the
    capture forever, and building the table copies host memory during capture)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "FusedMaskedSGD / masked_sgd_step_ cannot be captured in a CUDA graph: its "
            "hyper-parameters and pointer table live on the host. Step outside the graph "
            "(torch.compile: mode='max-autotune-no-cudagraphs')."
        )


def step_key(params, grads, bufs, bits, offsets=(), *, grad_addresses: bool = True):
    """What a cached TablePlan depends on, per step (`_host.layout_key` of each list: dtype,
    device, sizes, strides, and the data address where the plan's table holds it), or None
    when a list cannot be keyed (a sparse gradient: the validator says why).

    * parameters, buffers, mask bits, offsets: layout and address. A plan keeps aliases of
      their storages, so an address it holds stays valid memory, and a tensor swapped under
      it (`p.data = ...`, `buf.set_(...)`, a layout change) changes the key.
    * gradients: layout, and the address only when `grad_addresses` (a plan whose table the
      device reads: CUDA, Triton). A host-table plan (the CPU kernel) writes the gradients'
      addresses into its table at every step instead (TablePlan.run), so the new gradient
      tensors of every `zero_grad(set_to_none=True)` step reuse the plan: rebuilding it cost
      ~300 us a step over ResNet-18's 62 tensors (2-core CPU).
    """
    key = (
        layout_key(params, True),
        layout_key(grads, grad_addresses),
        layout_key(bufs, True),
        layout_key(bits, True),
        layout_key(offsets, True),
    )
    return None if None in key else key


class PlanCache:
    """A backend's prepared steps. A slot is one call site (kind, first parameter's address,
    number of tensors); it holds the plan of the last key seen there, so a new buffer or mask
    (a new optimizer over the same model) replaces, and frees, the old plan at once. A slot
    goes when its first parameter is garbage (the model deleted), and beyond `size` slots the
    oldest."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._slots: OrderedDict[tuple, tuple[tuple, object]] = OrderedDict()
        self._watch: dict[tuple, list[weakref.finalize]] = {}

    def get(self, slot: tuple, key: tuple):
        entry = self._slots.get(slot)
        return entry[1] if entry is not None and entry[0] == key else None

    def put(self, slot: tuple, key: tuple, plan, owners: Sequence[torch.Tensor]) -> None:
        self._slots[slot] = (key, plan)
        self._slots.move_to_end(slot)
        while len(self._slots) > self.size:
            old, _ = self._slots.popitem(last=False)
            self._unwatch(old)
        watched = self._watch.get(slot, [])
        same = len(watched) == len(owners) and all(
            f.alive and f.peek()[0] is o for f, o in zip(watched, owners, strict=True)
        )
        if not same:  # one finalizer per owner and slot, not one per rebuild
            self._unwatch(slot)
            self._watch[slot] = [weakref.finalize(o, self._drop, slot) for o in owners]

    def _unwatch(self, slot: tuple) -> None:
        for f in self._watch.pop(slot, []):
            f.detach()

    def _drop(self, slot: tuple) -> None:
        self._slots.pop(slot, None)
        self._watch.pop(slot, None)

    def plans(self) -> list:
        """The cached plans, oldest first."""
        return [plan for _, plan in self._slots.values()]

    def clear(self) -> None:
        for slot in list(self._watch):
            self._unwatch(slot)
        self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)


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


def partition(params, grads, bufs, bits, supported_dtypes, compact: bool) -> Partition:
    """Split validated tensors between the kernel and the reference."""
    out = Partition()
    for i, p in enumerate(params):
        ok = p.dtype in supported_dtypes and dense_layout(p)
        if bufs:
            ok = ok and (bufs[i].is_contiguous() if compact else bufs[i].stride() == p.stride())
        ok = ok and (bits[i] is None or bits[i].is_contiguous())
        if not ok:
            out.fallback.append(i)
            continue
        if grads[i].stride() != p.stride():
            out.scratch[i] = torch.empty_like(p)
        out.by_dtype.setdefault(p.dtype, []).append(i)
    return out


class TablePlan:
    """A partition and one int64 table per dtype for fixed tensors (already validated).

    Valid while `step_key` is unchanged; `run` then costs the launch only.
    `launch(dtype, table, n_rows, hyper, grad_scale, found_inf)` is the backend's kernel call;
    `finish_table(table, rows)` moves the table where the kernel reads it. Without one (the
    CPU kernel reads the host table) the plan is `host_table`: `run` writes the gradients'
    addresses into the tables at every step, so its key leaves them out (step_key).
    `offsets` given: the compact format (SgdCompactTensor rows, `bufs` the compact momentum),
    whose tensors the kernel cannot take go to the reference's compact step.
    """

    def __init__(
        self,
        params,
        grads,
        bufs,
        bits,
        offsets=None,
        *,
        supported_dtypes: Sequence[torch.dtype],
        launch: Callable,
        finish_table: Callable[[torch.Tensor, list[list[int]]], object] | None = None,
    ) -> None:
        compact = offsets is not None
        self.parts = partition(params, grads, bufs, bits, supported_dtypes, compact)
        # Aliases (not the Parameters): they keep the storages the table points into alive,
        # whatever the tensors the caller holds are made to point to later.
        self.params = [p.detach() for p in params]
        self.bufs = [b.detach() for b in bufs]
        self.bits = [None if b is None else b.detach() for b in bits]
        self.offsets = [o.detach() for o in offsets] if compact else None
        self.launch = launch
        self.host_table = finish_table is None
        # per table: (dtype, table, rows, grad_rows); grad_rows[i] is gradient i's row in
        # this table, -1 for a gradient it does not read (another dtype, the reference's, or
        # copied into scratch, whose fixed address the row holds)
        self.tables: list[tuple[torch.dtype, object, int, torch.Tensor | None]] = []
        for dtype, idx in self.parts.by_dtype.items():
            rows = [self._row(i, grads) for i in idx]
            table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)
            grad_rows = None
            if finish_table is not None:
                table = finish_table(table, rows)
            else:
                grad_rows = torch.full((len(params),), -1, dtype=torch.int64)
                for row, i in enumerate(idx):
                    if i not in self.parts.scratch:
                        grad_rows[i] = row
            self.tables.append((dtype, table, len(idx), grad_rows))

    def _row(self, i: int, grads) -> list[int]:
        grad = self.parts.scratch.get(i, grads[i])
        buf = self.bufs[i] if self.bufs else None
        row = [
            self.params[i].data_ptr(),
            grad.data_ptr(),
            0 if buf is None else buf.data_ptr(),
            0 if self.bits[i] is None else self.bits[i].data_ptr(),
            self.params[i].numel(),
        ]
        if self.offsets is not None:
            row += [self.offsets[i].data_ptr(), 0 if buf is None else buf.numel()]
        return row

    def run(self, grads, hyper: SgdHyper, grad_scale=None, found_inf=None) -> None:
        """One step. `grads` must have the step_key the plan was built with (a host-table
        plan: the same layouts, any addresses). grad_scale / found_inf: GradScaler's tensors
        (or None)."""
        for i, buf in self.parts.scratch.items():
            buf.copy_(grads[i])
        for dtype, table, n, grad_rows in self.tables:
            if grad_rows is not None:
                write_addresses(grads, table, grad_rows, GRAD_COLUMN)
            self.launch(dtype, table, n, hyper, grad_scale, found_inf)
        if self.parts.fallback:
            idx = self.parts.fallback
            lists = [
                [self.params[i] for i in idx],
                [grads[i] for i in idx],
                [self.bufs[i] for i in idx] if self.bufs else [],
                [self.bits[i] for i in idx],
            ]
            if self.offsets is None:
                reference.masked_sgd_step_(*lists, hyper, grad_scale, found_inf)
            else:
                lists.append([self.offsets[i] for i in idx])
                reference.masked_sgd_compact_step_(*lists, hyper, grad_scale, found_inf)


def planned_kernel(
    prepare: Callable,
    doc: str,
    *,
    host_table: bool,
    compact: bool = False,
) -> Callable:
    """A registry kernel whose step is `prepare(params, grads, bufs, bits[, offsets]).run(...)`,
    with its plans cached (PlanCache) while `step_key` holds: a step then costs the key and
    the launch. A plan is built only after the shared validator accepted the tensors.
    `host_table`: prepare's plans are TablePlan.host_table (they take new gradient addresses
    at every step). `compact`: the kernel of the compact format (takes the block offsets)."""
    check = check_compact_args if compact else check_step_args
    kind = "compact" if compact else "dense"
    cache = PlanCache()

    def step(params, grads, bufs, bits, lists, hyper, grad_scale, found_inf) -> None:
        if not params:
            return
        key = step_key(params, grads, bufs, bits, *lists, grad_addresses=not host_table)
        plan = None
        if key is not None:  # None: not keyable (a sparse gradient): the validator says why
            slot = (kind, params[0].data_ptr(), len(params))
            plan = cache.get(slot, key)
        if plan is None:
            check(params, grads, bufs, bits, *lists)
            plan = prepare(params, grads, bufs, bits, *lists)
            if plan.host_table != host_table:
                raise RuntimeError(
                    f"{prepare}: host_table={plan.host_table}, declared {host_table}"
                )
            if key is not None:
                cache.put(slot, key, plan, [params[0]])
        plan.run(grads, hyper, grad_scale, found_inf)

    if compact:

        def kernel(params, grads, bufs, bits, offsets, hyper, grad_scale=None, found_inf=None):
            step(params, grads, bufs, bits, (offsets,), hyper, grad_scale, found_inf)

    else:

        def kernel(params, grads, bufs, bits, hyper, grad_scale=None, found_inf=None):
            step(params, grads, bufs, bits, (), hyper, grad_scale, found_inf)

    kernel.__doc__ = doc
    kernel.prepare = prepare
    kernel.plans = cache
    return kernel
