"""The per-step host work of the fused step: keys of tensor lists for the plan caches, the
gradients and their addresses, and the identity snapshot of an optimizer's state.

`layout_key(tensors, with_address)` is equal for two lists exactly when every entry agrees in
dtype, device, sizes and strides (and data address when `with_address`); None marks an entry
of None; the key is None when some entry's metadata cannot be read (no strides or storage:
the validator then says why). `grads_of(params)` is `[p.grad for p in params]`, or None when some
gradient is None. `write_addresses(tensors, table, rows, column)` writes
`tensors[i].data_ptr()` into `table[rows[i], column]` for every `rows[i] >= 0`, bounds
checked. `state_snapshot(state)` holds the objects of an optimizer's state (parameter ->
{name: value}) and `state_unchanged(state, snapshot)` says whether the state still holds
exactly those objects, by identity (no tensor hashing, no __eq__): a reset or edited state
(`state.clear()`, a new dict, a buffer deleted or replaced) is seen in ~1 us per step over 62
parameters.

All run in ong_kernels._C_host (csrc/host/tensor_keys.cpp, C++ against libtorch: ~2 us per
list of 62 tensors) when it was built, else in Python here (~3.5 us per `map` pass over such a
list, five passes a list). tests/test_optim_host.py checks that the two agree.
"""

from __future__ import annotations

import importlib
import itertools
import operator
import warnings

import torch

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


def py_state_snapshot(state):
    """The Python form of state_snapshot: (objects, sizes) of a dict of dicts, or None."""
    if not isinstance(state, dict):
        return None
    objects, sizes = [], []
    for key, value in state.items():
        objects += (key, value)
        if isinstance(value, dict):
            sizes.append(len(value))
            objects.extend(itertools.chain.from_iterable(value.items()))
        else:
            sizes.append(-1)
    return objects, sizes


def py_state_unchanged(state, snapshot) -> bool:
    """The Python form of state_unchanged (objects compared by identity, sizes by value)."""
    now = py_state_snapshot(state)
    if now is None or snapshot is None:
        return False
    return (
        now[1] == snapshot[1]
        and len(now[0]) == len(snapshot[0])
        and all(map(operator.is_, now[0], snapshot[0]))
    )


if _C_host is not None:
    layout_key = _C_host.layout_key
    write_addresses = _C_host.write_addresses
    grads_of = _C_host.grads_of
    state_snapshot = _C_host.state_snapshot
    state_unchanged = _C_host.state_unchanged
else:
    layout_key = py_layout_key
    write_addresses = py_write_addresses
    grads_of = py_grads_of
    state_snapshot = py_state_snapshot
    state_unchanged = py_state_unchanged


def has_host_module() -> bool:
    """True when the per-step host work runs in ong_kernels._C_host (C++)."""
    return _C_host is not None
