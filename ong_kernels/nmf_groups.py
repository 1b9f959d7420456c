"""nmf_batched's solve, in groups that fit a compute device's memory.

A call's matrices are checked (nmf_rules), then solved by ONE nmf_mu_ op call per group: the
whole call is one group unless the caller streams (a `device`, a `memory_budget`, a progress
bar, or an iterator of weights, e.g. a safetensors reader). Then each group of consecutive
matrices is moved to the compute device, solved, and its factors moved back to the inputs'
device before the next group is read. Every matrix's result depends only on itself (its start
is computed from itself and its own seed, nmf_init; every kernel works per matrix), so any
grouping gives the same factors as one unbudgeted call on the same compute device.

The budget counts what a group holds on the compute device while it is solved (`group_bytes`):
its V (moved or read there), a float32 copy where the op needs one (float64 or scaled V), the
float32 factors, the start's temporaries, and the workspace the selected kernel declares in
its registration (`Kernel.workspace`). A group is the longest run of consecutive matrices that
fits. A matrix that alone needs more than the budget is a ValueError saying how much it needs:
before any work when the weights are a sequence, when it is reached for an iterator.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ong_kernels import _ops
from ong_kernels._validate import check_bool, check_device, check_int
from ong_kernels.backends import registry
from ong_kernels.nmf_init import initial_factors, use_exact_svd
from ong_kernels.nmf_rules import (
    Factors,
    Solver,
    check_count,
    check_names,
    check_sequence,
    check_tensor_arg,
    check_values,
    factor_dtype,
    kernel_input,
    label,
    matrix_shape,
    rank_for,
    scale_exponent,
    unscaled_factors,
)

# Share of the compute device's free memory the default budget takes: the rest is headroom for
# the allocator's fragmentation, the caller's own tensors and (on the CPU) the page cache.
DEFAULT_BUDGET_FRACTION = 0.8


@dataclass(frozen=True)
class Streaming:
    """nmf_batched's streaming settings (documented there): where to compute, the bytes a
    group may use there, and a progress bar. The default is one in-place call."""

    device: str | torch.device | None = None
    memory_budget: int | None = None
    progress: bool = False

    def requested(self) -> bool:
        return self.device is not None or self.memory_budget is not None or self.progress

    def check(self) -> torch.device | None:
        """The settings checked; returns the compute device (None: the inputs')."""
        check_bool(self.progress, "progress")
        if self.memory_budget is not None:
            check_int(self.memory_budget, "memory_budget", 1)
        return None if self.device is None else check_device(self.device, "device")


# ----------------------------------------------------------------------------- the cost model

# BLAS/LAPACK buffers of an SVD start (GEMM packing, QR and SVD workspace), at most this or
# V's float32 size: measured 8.2 MiB of peak RSS growth for the randomized SVD of a float32
# 1536 x 4096 matrix at r = 16 beyond its factors and sketch.
LAPACK_ALLOWANCE = 8 << 20


@dataclass(frozen=True)
class Item:
    """One checked matrix of a call: its position, the tensor (on the inputs' device), its
    clipped rank, its largest entry (from the value check; None until checked)."""

    index: int
    tensor: torch.Tensor
    rank: int
    largest: float | None = None

    @property
    def shape(self) -> tuple[int, int, int, torch.dtype]:
        m, n = matrix_shape(self.tensor.shape)
        return m, n, self.rank, self.tensor.dtype


def _start_bytes(m: int, n: int, r: int, dtype: torch.dtype, init) -> int:
    """Temporaries of a matrix's start beyond the factors: NNDSVD's float32 copy of a
    non-float32 V and its singular vectors (the exact SVD's, or the sketch's r + 10 columns,
    a few times over for the QRs)."""
    if init != "nndsvd" and init != "nndsvda":
        return 0
    k = min(m, n) if use_exact_svd(m, n, r) else r + 10
    copy = 0 if dtype == torch.float32 else 4 * m * n
    return copy + 3 * 4 * k * (m + n) + 4 * k * k + min(LAPACK_ALLOWANCE, 4 * m * n)


def matrix_bytes(
    m: int, n: int, r: int, dtype: torch.dtype, needs_copy: bool = False, wide: bool = False
) -> int:
    """What a matrix itself holds during its group's solve: V in its dtype, a float32 copy when
    the op needs one (float64 V, or a V out of float32's safe range), W and H in float32, and
    their float64 copies when the factors are float64 (`wide`, nmf_rules.factor_dtype)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    copy = 4 * m * n if (needs_copy or dtype == torch.float64) else 0
    return itemsize * m * n + copy + (12 if wide else 4) * r * (m + n)


def group_bytes(items: Sequence[Item], kernel: registry.Kernel, init) -> int:
    """Peak bytes the group holds on the compute device while it is solved."""
    shapes = [it.shape for it in items]
    held = sum(
        matrix_bytes(
            *s,
            needs_copy=it.largest is not None and scale_exponent(it.largest) != 0,
            wide=factor_dtype(it.tensor.dtype, it.largest) == torch.float64,
        )
        for it, s in zip(items, shapes, strict=True)
    )
    start = max(_start_bytes(*s, init) for s in shapes)
    return held + max(start, kernel.workspace(shapes))


def solve_bytes(
    shapes: Sequence[tuple[int, int, int, torch.dtype]], backend: str = "auto",
    device: str = "cpu", init: str = "random",
) -> int:  # fmt: skip
    """group_bytes of matrices of shapes (m, n, r, V dtype) solved together by `backend`'s
    kernel on `device`: what memory_budget must be for them to share one group."""
    kernel = registry.select("nmf_mu", torch.device(device).type, backend)
    items = [Item(i, torch.empty((m, n), dtype=d, device="meta"), r) for i, (m, n, r, d)
             in enumerate(shapes)]  # fmt: skip
    return group_bytes(items, kernel, init)


def free_bytes(device: torch.device) -> int:
    """Free memory of `device`: MemAvailable of /proc/meminfo on the CPU, the CUDA driver's
    free count on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    raise ValueError(
        f"memory_budget has no default on device type {device.type!r}: pass memory_budget"
    )


def check_budget(memory_budget, device: torch.device) -> int:
    """memory_budget checked, or the default: DEFAULT_BUDGET_FRACTION of `device`'s free memory."""
    if memory_budget is None:
        return int(DEFAULT_BUDGET_FRACTION * free_bytes(device))
    return check_int(memory_budget, "memory_budget", 1)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def check_fits(item: Item, budget: int, kernel: registry.Kernel, init, names=None) -> int:
    """The bytes `item` alone needs, or the ValueError saying how much that is."""
    need = group_bytes([item], kernel, init)
    if need > budget:
        raise ValueError(
            f"{label(item.index, names)} (shape {tuple(item.tensor.shape)}) needs "
            f"{format_bytes(need)} ({need} bytes) on the compute device with the "
            f"{kernel.backend} kernel, more than memory_budget={format_bytes(budget)} "
            f"({budget} bytes): raise memory_budget to at least that, or lower the rank"
        )
    return need


# ----------------------------------------------------------------------------- solving


def solve_group(items: Sequence[Item], solver: Solver, compute: torch.device, home: torch.device):
    """One op call over checked items: ([(W_i, H_i)] on `home`, [n_iter_i])."""
    inputs = [kernel_input(it.tensor.to(compute), it.largest) for it in items]
    mats = [mat for mat, _ in inputs]
    exponents = [j for _, j in inputs]
    factors = initial_factors(
        mats, [it.rank for it in items], solver.init, solver.seed,
        [it.index for it in items], exponents,
    )  # fmt: skip
    w_list = [w for w, _ in factors]
    h_list = [h for _, h in factors]
    n_iter = _ops.nmf_mu_(
        mats, w_list, h_list, solver.max_iter, solver.tol, solver.backend, solver.precision
    )
    del mats, inputs
    out = []
    for it, w, h, j in zip(items, w_list, h_list, exponents, strict=True):
        # The op solved V / 4^j: (2^j W, 2^j H) factorise V, exactly.
        w, h = unscaled_factors(w, h, j, factor_dtype(it.tensor.dtype, it.largest))
        out.append((w.to(home), h.to(home)))
    return out, n_iter.tolist()


def _check_item(t, index: int, rank, home, names) -> Item:
    tensor = check_tensor_arg(t, label(index, names), home)
    m, n = matrix_shape(tensor.shape)
    return Item(index, tensor, rank_for(rank, index, m, n))


def _checked_values(item: Item, names) -> Item:
    largest = check_values(item.tensor, label(item.index, names))
    return Item(item.index, item.tensor, item.rank, largest)


def _select(compute: torch.device, solver: Solver) -> registry.Kernel:
    """The kernel of the compute device (an unavailable explicit backend refused here)."""
    kernel = registry.select("nmf_mu", compute.type, solver.backend)
    if solver.precision != "ieee" and kernel.backend != "triton":
        raise ValueError(
            f"precision={solver.precision!r} needs backend='triton', not {kernel.backend!r}"
        )
    return kernel


def run(weights, rank, solver: Solver, streaming: Streaming, names=None, total=None):
    """Yield ([(W_i, H_i)], [n_iter_i]) per group, in input order (nmf_batched).

    A sequence is checked whole (values included) and sized before the first group is solved;
    an iterator's matrices are checked as they arrive. `total` (weights in all matrices) gives
    an iterator's progress bar its length; `names` label the matrices in errors.
    """
    solver = solver.checked()
    device = streaming.check()
    check_names(names)
    is_sequence = not _is_iterator(weights)
    if is_sequence:
        weights = check_sequence(weights)
        for what, value in (("rank", rank), ("names", names)):
            check_count(value, what, len(weights))
        solver.check_counts(len(weights))
        source: Iterator = iter(weights)
    else:
        source = iter(weights)
    first_raw = next(source, None)
    if first_raw is None:
        raise ValueError("weights is empty: pass at least one tensor")
    first = _check_item(first_raw, 0, rank, None, names)
    home = first.tensor.device
    compute = home if device is None else device
    kernel = _select(compute, solver)
    items = _chain(first, (_check_item(t, i, rank, home, names) for i, t in
                           enumerate(source, start=1)))  # fmt: skip
    if is_sequence:  # every check and size before any work
        items = [_checked_values(it, names) for it in items]
        total = sum(it.tensor.numel() for it in items)
    if not streaming.requested() and is_sequence:
        yield solve_group(items, solver, compute, home)
        return
    budget = check_budget(streaming.memory_budget, compute)
    if is_sequence:
        for it in items:
            check_fits(it, budget, kernel, solver.init, names)
    bar = _progress_bar(streaming.progress, total)
    group: list[Item] = []
    count = 0
    try:
        for it in items:
            if not is_sequence:
                it = _checked_values(it, names)
                check_fits(it, budget, kernel, solver.init, names)
            if group and group_bytes([*group, it], kernel, solver.init) > budget:
                yield solve_group(group, solver, compute, home)
                _advance(bar, group)
                group = []
            group.append(it)
            count += 1
        if group:
            yield solve_group(group, solver, compute, home)
            _advance(bar, group)
    finally:
        if bar is not None:
            bar.close()
    for what, value in (("rank", rank), ("names", names)):
        check_count(value, what, count)
    solver.check_counts(count)


def _is_iterator(weights) -> bool:
    """An iterable that is not a sequence (a generator, a checkpoint reader)."""
    return isinstance(weights, Iterable) and not isinstance(
        weights, (Sequence, torch.Tensor, str, bytes, dict)
    ) and not hasattr(weights, "keys")  # fmt: skip


def _chain(first, rest: Iterable) -> Iterator:
    yield first
    yield from rest


def _progress_bar(progress: bool, total: int | None):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="weight", unit_scale=True, desc="nmf", dynamic_ncols=True)


def _advance(bar, group: Sequence[Item]) -> None:
    if bar is not None:
        bar.set_postfix(matrices=group[-1].index + 1, refresh=False)
        bar.update(sum(it.tensor.numel() for it in group))


def solve_all(weights, rank, solver: Solver, streaming: Streaming, names=None):
    """([(W_i, H_i)], [n_iter_i]) of every matrix: run()'s groups concatenated."""
    factors: list[Factors] = []
    n_iter: list[int] = []
    for group_factors, group_iter in run(weights, rank, solver, streaming, names):
        factors.extend(group_factors)
        n_iter.extend(group_iter)
    return factors, n_iter
