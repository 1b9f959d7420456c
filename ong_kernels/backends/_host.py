"""Keys of tensor lists for the fused step's plan cache, the per-step gradient addresses, and
the CPU step's dispatcher kernel (the C++ side of ong_kernels._C_host).

`layout_key(tensors, with_address)` is equal for two lists exactly when every entry agrees in
dtype, device, sizes and strides (and data address when `with_address`); None marks an entry
of None; the key is None when some entry's metadata cannot be read (no strides or storage:
the validator then says why). `grads_of(params)` is `[p.grad for p in params]`, or None when some
gradient is None. `write_addresses(tensors, table, rows, column)` writes
`tensors[i].data_ptr()` into `table[rows[i], column]` for every `rows[i] >= 0`, bounds
checked.

Both run in ong_kernels._C_host (csrc/host/tensor_keys.cpp, C++ against libtorch: ~2 us per
list of 62 tensors) when it was built, else in Python here (~3.5 us per `map` pass over such a
list, five passes a list). tests/test_optim_host.py checks that the two agree.

With _C_host, the ops masked_sgd_step_ and masked_sgd_compact_step_ also get a C++ kernel for
CPU tensors (csrc/host/cpu_step.cpp, `enable_cpu_step`): a step whose plan the CPU kernel's
PlanCache holds runs from C++ without entering Python; everything else calls the op's Python
implementation. `NativePlans` mirrors the CPU kernel's cached plans into that kernel.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import operator
import warnings

import torch

from ong_kernels.backends import _native

_REBUILD = "rebuild with `pip install --no-build-isolation -e .` (or `make build`)"
try:
    _C_host = importlib.import_module("ong_kernels._C_host")
except ModuleNotFoundError:  # built without torch's headers (or ONG_WITH_HOST=0): Python keys
    _C_host = None
except ImportError as exc:  # built, but it does not load (symbols of another torch...)
    warnings.warn(
        f"ong_kernels._C_host does not load ({exc}): optimizer steps run in Python; {_REBUILD}",
        stacklevel=2,
    )
    _C_host = None
if _C_host is not None and _C_host.torch_version != torch.__version__:
    # TensorImpl's layout is no stable ABI: a module built for another torch is not used
    warnings.warn(
        f"ong_kernels._C_host was built for torch {_C_host.torch_version}, this is torch "
        f"{torch.__version__}: optimizer steps run in Python (~20 us more per step); {_REBUILD}",
        stacklevel=2,
    )
    _C_host = None

_dtype = operator.attrgetter("dtype")
_layout = operator.attrgetter("layout")
_device = operator.attrgetter("device")  # not get_device(): -1 for CPU and meta alike
_Tensor = torch.Tensor


def _entry(t: torch.Tensor | None, with_address: bool):
    if t is None:
        return None
    meta = (t.dtype, t.device, t.size(), t.stride())
    return (*meta, t.data_ptr()) if with_address else meta


def py_layout_key(tensors, with_address: bool):
    """The Python form of layout_key (same equalities as the C++ one, other values)."""
    try:
        if any(t is None for t in tensors):
            return tuple(_entry(t, with_address) for t in tensors)
        if any(layout is not torch.strided for layout in map(_layout, tensors)):
            return None
        key = (
            tuple(map(_dtype, tensors)),
            tuple(map(_device, tensors)),
            tuple(map(_Tensor.size, tensors)),
            tuple(map(_Tensor.stride, tensors)),
        )
        return (*key, tuple(map(_Tensor.data_ptr, tensors))) if with_address else key
    except RuntimeError:  # no strides (sparse) or no storage: not keyable
        return None


def py_write_addresses(tensors, table: torch.Tensor, rows: torch.Tensor, column: int) -> None:
    """The Python form of write_addresses."""
    n_rows, n_cols = table.shape
    if len(rows) != len(tensors) or not 0 <= column < n_cols:
        raise ValueError(
            f"write_addresses: {len(tensors)} tensors, {len(rows)} rows, column {column}"
        )
    picked = [(int(r), t) for r, t in zip(rows.tolist(), tensors, strict=True) if r >= 0]
    if any(r >= n_rows for r, _ in picked):
        raise ValueError(f"write_addresses: a row outside the table's {n_rows}")
    if picked:
        index = torch.tensor([r for r, _ in picked], dtype=torch.int64)
        table[index, column] = torch.tensor([t.data_ptr() for _, t in picked], dtype=torch.int64)


def py_grads_of(params):
    """The Python form of grads_of: [p.grad for p in params], or None when one is None."""
    grads = [p.grad for p in params]
    return None if id(None) in set(map(id, grads)) else grads


if _C_host is not None:
    layout_key = _C_host.layout_key
    write_addresses = _C_host.write_addresses
    grads_of = _C_host.grads_of
else:
    layout_key = py_layout_key
    write_addresses = py_write_addresses
    grads_of = py_grads_of


def has_host_module() -> bool:
    """True when the per-step host work runs in ong_kernels._C_host (C++)."""
    return _C_host is not None


KINDS = {"dense": 0, "compact": 1}  # csrc/host/cpu_step.cpp kDense, kCompact

_cpu_step_impls: tuple | None = None  # the ops' Python implementations, once registered


def enable_cpu_step(dense_impl, compact_impl) -> bool:
    """Register the C++ CPU kernel of both masked SGD ops (ong_kernels/_ops.py calls this once
    the ops exist); the Python implementations serve its misses. False (nothing registered)
    without _C_host or without the compiled CPU kernels (an older ong_kernels._C)."""
    global _cpu_step_impls
    if _C_host is None or not _native.has_cpu():
        return False
    entries = getattr(_native.lib(), "masked_sgd_entry_points", None)
    if entries is None:
        return False
    try:
        _C_host.enable_cpu_step(entries(), dense_impl, compact_impl)
    except (RuntimeError, ValueError) as exc:  # _C and _C_host of different builds
        warnings.warn(f"{exc}; CPU optimizer steps run in Python", stacklevel=2)
        return False
    _cpu_step_impls = (dense_impl, compact_impl)
    return True


def _drop_native_plans() -> None:
    for kind in KINDS.values():
        _C_host.plan_drop(kind, None, None)


if _C_host is not None:  # the C++ plans go before the interpreter does, not in static teardown
    atexit.register(_drop_native_plans)


def cpu_step_enabled() -> bool:
    """True while the C++ CPU kernel of the masked SGD ops is registered."""
    return _cpu_step_impls is not None


@contextlib.contextmanager
def python_cpu_step():
    """Within: CPU steps run the ops' Python implementation (tests that look inside it)."""
    global _cpu_step_impls
    impls = _cpu_step_impls
    if impls is None:
        yield
        return
    _C_host.disable_cpu_step()
    _cpu_step_impls = None
    try:
        yield
    finally:
        enable_cpu_step(*impls)


class NativePlans:
    """The C++ CPU kernel's copy of one PlanCache's host-table plans (kind "dense" or
    "compact"): `put` mirrors a plan that the native kernel runs whole (TablePlan
    .native_tables), `drop` and `clear` forget what the PlanCache forgets."""

    def __init__(self, kind: str) -> None:
        self.kind = KINDS[kind]

    def put(self, slot: tuple, plan, lists: tuple) -> None:
        if _C_host is None:
            return
        tables = plan.native_tables()
        if tables is None:  # tensors the reference or a scratch copy serves: Python runs it
            _C_host.plan_drop(self.kind, slot[1], slot[2])
        else:
            _C_host.plan_put(self.kind, list(lists), tables)

    def drop(self, slot: tuple) -> None:
        if _C_host is not None:
            _C_host.plan_drop(self.kind, slot[1], slot[2])

    def clear(self) -> None:
        if _C_host is not None:
            _C_host.plan_drop(self.kind, None, None)

    def __len__(self) -> int:
        return 0 if _C_host is None else _C_host.plan_count(self.kind)
