"""Keys of tensor lists for the fused step's plan cache, and the per-step gradient addresses.

`layout_key(tensors, with_address)` is equal for two lists exactly when every entry agrees in
dtype, device, sizes and strides (and data address when `with_address`); None marks an entry
of None; the key is None when some entry's metadata cannot be read (no strides or storage:
the validator then says why). `write_addresses(tensors, table, rows, column)` writes
`tensors[i].data_ptr()` into `table[rows[i], column]` for every `rows[i] >= 0`, bounds
checked.

Both run in ong_kernels._C_host (csrc/host/tensor_keys.cpp, C++ against libtorch: 0.8 us per
list of 62 tensors) when it was built, else in Python here (~3.5 us per `map` pass over such a
list, five passes a list). tests/test_optim_host.py checks that the two agree.
"""

from __future__ import annotations

import operator
import warnings

import torch

try:
    from ong_kernels import _C_host
except ImportError:  # built without torch's headers (or ONG_WITH_HOST=0): keys in Python
    _C_host = None
if _C_host is not None and _C_host.torch_version != torch.__version__:
    # TensorImpl's layout is no stable ABI: a module built for another torch is not used
    warnings.warn(
        f"ong_kernels._C_host was built for torch {_C_host.torch_version}, this is torch "
        f"{torch.__version__}: optimizer steps are keyed in Python (~50 us more per step); "
        "rebuild with `pip install --no-build-isolation -e .` (or `make build`)",
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


if _C_host is not None:
    layout_key = _C_host.layout_key
    write_addresses = _C_host.write_addresses
else:
    layout_key = py_layout_key
    write_addresses = py_write_addresses


def has_host_module() -> bool:
    """True when the per-step host work runs in ong_kernels._C_host (C++)."""
    return _C_host is not None
