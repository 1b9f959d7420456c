"""nmf_batched's solve, in groups that fit a compute device's memory.

`run` takes the weights as descriptors (`WeightRef`: name, shape, dtype, rank and how to load
the values; |W| and repeats are properties of the item), from a list, a model or a checkpoint's
header, so the count, ranks, kernel, precision and budget are checked once, from shapes,
before any value is read; the values are checked as they are loaded (at once for tensors
already in memory). Then the matrices are solved by ONE op call per group (nmf_mu_ for the
plain Frobenius loss, nmf_beta_mu_ for any other, Solver.op): the whole
call is one group unless the caller streams (a `device`, a `memory_budget`, a progress bar) or
the values are not all in memory yet (an iterator, a checkpoint reader, |W| made as it is
loaded). Then each group of consecutive matrices is moved to the compute device, solved, and
its factors moved back to the inputs' device before the next group is read. Every matrix's
result depends only on itself (its start is computed from itself and its own seed, nmf_init;
every kernel works per matrix), so any grouping gives the same factors as one unbudgeted call
on the same compute device.

The budget counts what a group holds on the compute device while it is solved (`group_bytes`):
its V (moved or read there), a float32 copy where the op needs one (float64 or scaled V), the
float32 factors, the start's temporaries, and the workspace the selected kernel declares in
its registration (`Kernel.workspace`). A group is the longest run of consecutive matrices that
fits. A matrix that alone needs more than the budget is a `BudgetError` (a ValueError) saying
how much it needs: before any work when the weights are a sequence, when it is reached for an
iterator.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ong_kernels import _ops
from ong_kernels._validate import check_bool, check_device, check_int
from ong_kernels.backends import registry
from ong_kernels.backends.cpu_nmf import sketch_bytes
from ong_kernels.nmf_beta import BetaLoss, check_zeros_allowed
from ong_kernels.nmf_init import initial_factors, sketch_width, use_exact_svd
from ong_kernels.nmf_rules import (
    FLOAT32_MAX,
    FLOAT32_TINY,
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


CPU = torch.device("cpu")


@dataclass(frozen=True)
class WeightRef:
    """One weight as the solve sees it before reading it.

    shape, dtype, device: what ``load()`` returns (checked when it does).
    rank: its matrix's NMF rank, an int >= 1 (clipped to min(m, n)).
    load: reads the values (a checkpoint reader); or `tensor`, a weight already in memory,
        whose values are checked before any work.
    name: what errors call it (default: weights[i]).
    abs: the matrix is |W|, made as it is loaded (pruning's weights are signed).
    repeats: the matrix is solved this many times in a row (consensus ONG's restarts: the
        same tensor, consecutive matrices, each with its own seed).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    rank: int
    load: Callable[[], torch.Tensor] | None = None
    tensor: torch.Tensor | None = None
    name: str | None = None
    device: torch.device = CPU
    abs: bool = False
    repeats: int = 1

    @classmethod
    def of(cls, tensor: torch.Tensor, rank: int, name: str | None = None, **kw) -> WeightRef:
        """A weight already in memory."""
        return cls(tuple(tensor.shape), tensor.dtype, rank, tensor=tensor, name=name,
                   device=tensor.device, **kw)  # fmt: skip

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def describe(weights, rank, names=None) -> Sequence[WeightRef] | Iterator[WeightRef]:
    """nmf_batched's `weights`, `rank` and `names` as descriptors: for a sequence, a list
    (every tensor's type, dtype, shape and device checked, no data read); for an iterator
    (a generator, a checkpoint reader), an iterator checking each tensor as it arrives."""
    check_names(names)
    if is_iterator(weights):
        return _describe_lazily(iter(weights), rank, names)
    weights = check_sequence(weights)
    for what, value in (("rank", rank), ("names", names)):
        check_count(value, what, len(weights))
    home = None
    refs = []
    for i, t in enumerate(weights):
        refs.append(_describe(t, i, rank, names, home))
        home = refs[0].device
    return refs


def _describe(t, index: int, rank, names, home) -> WeightRef:
    tensor = check_tensor_arg(t, label(index, names), home)
    m, n = matrix_shape(tensor.shape)
    name = names[index] if names is not None else None
    return WeightRef.of(tensor, rank_for(rank, index, m, n), name)


def _describe_lazily(source: Iterator, rank, names) -> Iterator[WeightRef]:
    home = None
    count = 0
    for i, t in enumerate(source):
        ref = _describe(t, i, rank, names, home)
        home = ref.device
        count += 1
        yield ref
    for what, value in (("rank", rank), ("names", names)):
        check_count(value, what, count)


# ----------------------------------------------------------------------------- the cost model

# BLAS/LAPACK buffers of an SVD start (GEMM packing, QR and SVD workspace), at most this or
# V's float32 size: measured 8.2 MiB of peak RSS growth for the randomized SVD of a float32
# 1536 x 4096 matrix at r = 16 beyond its factors and sketch.
LAPACK_ALLOWANCE = 8 << 20


def _label(name: str | None, index: int, restart: int | None = None) -> str:
    """What errors call a matrix: 'name', 'name (restart j)', or weights[index]."""
    if name is None:
        return f"weights[{index}]"
    return repr(name if restart is None else f"{name} (restart {restart})")


@dataclass(frozen=True)
class Item:
    """One checked matrix of a call: its position, the tensor (on the inputs' device; a meta
    tensor while only its shape is known), its clipped rank, its largest entry (from the
    value check; None until checked), its weight's name and restart (what errors call it)."""

    index: int
    tensor: torch.Tensor
    rank: int
    largest: float | None = None
    name: str | None = None
    restart: int | None = None

    @property
    def what(self) -> str:
        return _label(self.name, self.index, self.restart)

    @property
    def shape(self) -> tuple[int, int, int, torch.dtype]:
        m, n = matrix_shape(self.tensor.shape)
        return m, n, self.rank, self.tensor.dtype


def _start_bytes(m: int, n: int, r: int, dtype: torch.dtype, init) -> int:
    """Temporaries of a matrix's start beyond the factors: NNDSVD's float32 copy of a
    non-float32 V and its singular vectors (the exact SVD's, or the sketch's columns,
    a few times over for the power steps' bases, plus the CPU sketch products' padded operands and
    partial sums, cpu_nmf.sketch_bytes)."""
    if init != "nndsvd" and init != "nndsvda":
        return 0
    exact = use_exact_svd(m, n, r)
    k = min(m, n) if exact else sketch_width(m, n, r)
    copy = 0 if dtype == torch.float32 else 4 * m * n
    sketch = 0 if exact else sketch_bytes(m, n, k)
    return copy + 3 * 4 * k * (m + n) + 4 * k * k + sketch + min(LAPACK_ALLOWANCE, 4 * m * n)


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


class BudgetError(ValueError):
    """A matrix that alone needs more than the memory budget; its fields let a front end
    word the advice in its own flags (ong-mask: --memory-budget, --rank)."""

    def __init__(self, item: Item, need: int, budget: int, kernel: str, device: torch.device):
        self.name, self.shape, self.rank = item.name, tuple(item.tensor.shape), item.rank
        self.need, self.budget, self.kernel, self.device = need, budget, kernel, device
        super().__init__(
            f"{item.what} (shape {self.shape}) needs {format_bytes(need)} ({need} bytes) on the "
            f"compute device with the {kernel} kernel, more than memory_budget="
            f"{format_bytes(budget)} ({budget} bytes): raise memory_budget to at least that, "
            "or lower the rank"
        )

    def advice(self, budget_flag: str, rank_flag: str) -> str:
        """The same, worded in a command line's flags."""
        return (
            f"{self.name} (shape {list(self.shape)}, rank {self.rank}) needs "
            f"{format_bytes(self.need)} on {self.device} for its NMF with the {self.kernel} "
            f"kernel, more than the memory budget {format_bytes(self.budget)}: raise "
            f"{budget_flag} or lower {rank_flag}"
        )


def check_fits(item: Item, budget: int, kernel: registry.Kernel, init, device) -> int:
    """The bytes `item` alone needs, or the BudgetError saying how much that is."""
    need = group_bytes([item], kernel, init)
    if need > budget:
        raise BudgetError(item, need, budget, kernel.backend, device)
    return need


# ----------------------------------------------------------------------------- solving


def solve_group(items: Sequence[Item], solver: Solver, compute: torch.device, home: torch.device):
    """One op call over checked items: ([(W_i, H_i)] on `home`, [n_iter_i])."""
    loss = solver.loss()
    # Only the plain Frobenius solve is scaled into float32's safe range (it is exact there);
    # a beta / regularised solve runs on V as given, as scikit-learn's (nmf_beta.py).
    scaled = loss.is_frobenius()
    inputs = [kernel_input(it.tensor.to(compute), it.largest if scaled else 0.0) for it in items]
    mats = [mat for mat, _ in inputs]
    exponents = [j for _, j in inputs]
    factors = initial_factors(
        mats, [it.rank for it in items], solver.init, solver.seed,
        [it.index for it in items], exponents,
    )  # fmt: skip
    w_list = [w for w, _ in factors]
    h_list = [h for _, h in factors]
    if scaled:
        n_iter = _ops.nmf_mu_(
            mats, w_list, h_list, solver.max_iter, solver.tol, solver.backend, solver.precision
        )
    else:
        n_iter = _ops.nmf_beta_mu_(
            mats, w_list, h_list, solver.max_iter, solver.tol, loss.beta, loss.alpha_w,
            loss.alpha_h, loss.l1_ratio, loss.update_h, solver.backend,
        )  # fmt: skip
    del mats, inputs
    out = []
    for it, w, h, j in zip(items, w_list, h_list, exponents, strict=True):
        # The op solved V / 4^j: (2^j W, 2^j H) factorise V, exactly.
        w, h = unscaled_factors(w, h, j, factor_dtype(it.tensor.dtype, it.largest))
        out.append((w.to(home), h.to(home)))
    return out, n_iter.tolist()


def run(refs, solver: Solver, streaming: Streaming):
    """Yield ([(W_i, H_i)], [n_iter_i]) per group, in input order (nmf_batched).

    `refs`: WeightRefs (describe() makes them from nmf_batched's arguments). A sequence's
    count, ranks, kernel, precision and budget are checked from the shapes before any value
    is read (its progress bar knows its length); an iterator's as each descriptor arrives.
    """
    solver = solver.checked()
    device = streaming.check()
    known = isinstance(refs, Sequence)
    source = iter(refs)
    first = next(source, None)
    if first is None:
        raise ValueError("weights is empty: pass at least one tensor")
    home = first.device
    compute = home if device is None else device
    kernel = registry.select(solver.op, compute.type, solver.backend, solver.precision)
    loss = solver.loss()
    largest: dict[int, float] = {}  # values of weights already in memory, checked up front
    total = None
    if known:
        solver.check_counts(sum(ref.repeats for ref in refs))
        for pos, ref in enumerate(refs):
            if ref.tensor is not None and not ref.abs:
                largest[pos] = _checked_values(ref.tensor, _label(ref.name, pos), loss)
        total = sum(ref.numel * ref.repeats for ref in refs)
    items = _items(_chain(first, source), home, largest, loss)
    in_memory = known and all(ref.tensor is not None and not ref.abs for ref in refs)
    if in_memory and not streaming.requested():
        yield solve_group(list(items), solver, compute, home)
        return
    budget = check_budget(streaming.memory_budget, compute)
    if known:  # every matrix's size, before any is read
        for item in _shape_items(refs, largest):
            check_fits(item, budget, kernel, solver.init, compute)
    bar = _progress_bar(streaming.progress, total)
    group: list[Item] = []
    count = 0
    try:
        for it in items:
            check_fits(it, budget, kernel, solver.init, compute)
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
    solver.check_counts(count)


def _load(ref: WeightRef, pos: int, home: torch.device) -> torch.Tensor:
    """The values of `ref`, checked against its description (|W| for an abs ref)."""
    what = _label(ref.name, pos)
    tensor = ref.tensor if ref.tensor is not None else ref.load()
    tensor = check_tensor_arg(tensor, what, home)
    if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != ref.dtype:
        raise ValueError(
            f"{what} was described as {ref.dtype} of shape {tuple(ref.shape)} but reads as "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor.abs() if ref.abs else tensor


def _checked_values(tensor: torch.Tensor, what: str, loss: BetaLoss) -> float:
    """check_values (returns the largest entry); for a loss solved on V as given (not the
    plain Frobenius one, which is scaled by 4^-j), a largest entry inside float32's normal
    range, since the solve is float32 (outside it V would read as inf, NaN factors, or as
    zeros); and for beta <= 0 scikit-learn's refusal of a V with zeros (one more pass)."""
    largest = check_values(tensor, what)
    if not loss.is_frobenius() and largest and not FLOAT32_TINY <= largest <= FLOAT32_MAX:
        raise ValueError(
            f"{what} has its largest entry {largest:.3g} outside float32's normal range "
            f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}]; beta_loss other than the plain Frobenius "
            "loss solves V as given in float32: rescale it first"
        )
    if loss.beta <= 0:
        check_zeros_allowed(float(tensor.min()), loss.beta, what)
    return largest


def _items(
    refs: Iterable[WeightRef], home: torch.device, largest: dict, loss: BetaLoss
) -> Iterator[Item]:
    """Each descriptor's matrices (one per repeat), loaded and value-checked as they come."""
    index = 0
    for pos, ref in enumerate(refs):
        tensor = _load(ref, pos, home)
        if pos in largest:
            top = largest[pos]
        else:
            top = _checked_values(tensor, _label(ref.name, pos), loss)
        rank = _clipped_rank(ref, pos)
        for j in range(ref.repeats):
            yield Item(index, tensor, rank, top, ref.name, j if ref.repeats > 1 else None)
            index += 1


def _shape_items(refs: Sequence[WeightRef], largest: dict) -> Iterator[Item]:
    """refs' matrices as meta tensors: what the budget needs, nothing read."""
    index = 0
    for pos, ref in enumerate(refs):
        meta = torch.empty(ref.shape, dtype=ref.dtype, device="meta")
        for j in range(ref.repeats):
            restart = j if ref.repeats > 1 else None
            yield Item(index, meta, _clipped_rank(ref, pos), largest.get(pos), ref.name, restart)
            index += 1


def _clipped_rank(ref: WeightRef, pos: int) -> int:
    m, n = matrix_shape(ref.shape)
    return min(check_int(ref.rank, f"rank of {_label(ref.name, pos)}", 1), m, n)


def is_iterator(weights) -> bool:
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
    for group_factors, group_iter in run(describe(weights, rank, names), solver, streaming):
        factors.extend(group_factors)
        n_iter.extend(group_iter)
    return factors, n_iter
