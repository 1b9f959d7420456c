"""Streaming for nmf_batched: matrices pass through a compute device in groups that fit a budget.

A model larger than the compute device's memory (or an iterable that produces its weights one
at a time, e.g. from a safetensors file) is factorised group by group: each group of
consecutive matrices is moved to the compute device, solved by ONE nmf_mu_ op call (the best
kernel there, or the user's backend), and its factors moved back to the inputs' device before
the next group is read. Every matrix's result depends only on itself (the "random" init seeds a
fresh generator per matrix; NNDSVD and every kernel work per matrix), so any grouping gives the
same factors as one unbudgeted call on the same compute device.

The budget counts what one matrix costs on the compute device during a solve (`solve_bytes`);
a group is the longest run of consecutive matrices whose costs sum to at most the budget. A
matrix whose cost alone exceeds the budget is a ValueError saying how much it needs: before any
work when the weights are a sequence (shapes known up front), when it is reached for an
iterator.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ong_kernels._validate import FLOAT_DTYPES, check_int, check_nonnegative_finite, check_tensor
from ong_kernels.backends import registry

if TYPE_CHECKING:
    from ong_kernels import nmf

# Share of the compute device's free memory the default budget takes: the rest is headroom for
# the allocator's fragmentation, the caller's own tensors and (on the CPU) the page cache.
DEFAULT_BUDGET_FRACTION = 0.8


def solve_bytes(m: int, n: int, r: int, itemsize: int) -> int:
    """Peak bytes one (m, n) matrix of `itemsize`-byte entries at rank r costs while solved.

    The reference backend, the heaviest registered kernel, holds per entry of V: the moved V
    (itemsize), a float32 copy plus its stacked bucket (8 bytes), and during an error check
    V.double(), (W H).double() and their difference (24 bytes); per entry of W and H about
    eight float32/float64 temporaries. float64 inputs add their float32 cast (4 bytes).
    Measured peak RSS growth for one 2048 x 5632 float16 matrix at rank 16, tol > 0: see
    benchmarks/RESULTS.md (issue 11 section).
    """
    per_entry = itemsize + 8 + 24 + (4 if itemsize == 8 else 0)
    return m * n * per_entry + 8 * 4 * r * (m + n)


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


def default_budget(device: torch.device) -> int:
    return int(DEFAULT_BUDGET_FRACTION * free_bytes(device))


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, shape[0]
    m = shape[0]
    return m, (shape.numel() // m if m else 0)


def _rank_of(rank, index: int, m: int, n: int) -> int:
    if isinstance(rank, Sequence) and not isinstance(rank, str):
        if index >= len(rank):
            raise ValueError(f"rank has {len(rank)} entries but weights has more matrices")
        r = check_int(rank[index], f"rank[{index}]", 1)
    else:
        r = check_int(rank, "rank", 1)
    return min(r, m, n)


def _check_one(t, index: int, device: torch.device | None) -> torch.Tensor:
    """The cheap per-tensor checks of nmf._check_weights (no pass over the data)."""
    name = f"weights[{index}]"
    check_tensor(t, name, dtypes=FLOAT_DTYPES)
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: need at least one entry")
    if device is not None and t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but weights[0] is on {device}: put all matrices on one device"
        )
    return t.detach()


def _too_big(index: int, need: int, budget: int, shape) -> ValueError:
    return ValueError(
        f"weights[{index}] (shape {tuple(shape)}) needs {format_bytes(need)} ({need} bytes) on the "
        f"compute device, more than memory_budget={format_bytes(budget)} ({budget} bytes): raise "
        "memory_budget to at least that, or lower the rank"
    )


def check_fits(index: int, shape, rank, itemsize: int, budget: int) -> tuple[int, int]:
    """(clipped rank, bytes) of weights[index], or the ValueError saying how much it needs."""
    m, n = _matrix_shape(torch.Size(shape))
    r = _rank_of(rank, index, m, n)
    need = solve_bytes(m, n, r, itemsize)
    if need > budget:
        raise _too_big(index, need, budget, shape)
    return r, need


def check_budget(memory_budget, device: torch.device) -> int:
    if memory_budget is None:
        return default_budget(device)
    return check_int(memory_budget, "memory_budget", 1)


@dataclass(frozen=True)
class Streaming:
    """nmf_batched's streaming settings (documented there): where to compute, the bytes a
    group may use there, and a progress bar. The default is one in-place call."""

    device: str | torch.device | None = None
    memory_budget: int | None = None
    progress: bool = False

    def requested(self) -> bool:
        return self.device is not None or self.memory_budget is not None or self.progress

    def check(self) -> None:
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be a bool, got {type(self.progress).__name__}")


def stream_factors(
    weights, rank, solver: nmf.Solver, streaming: Streaming, total: int | None = None
) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]]:
    """Yield ([(W_i, H_i)], [n_iter_i]) per group, in input order (nmf_batched's streaming).

    `solver` must already be checked (Solver.checked). A sequence of weights is checked whole
    (values included) and sized before the first group is solved. `total` (weights in all
    matrices) gives an iterator's progress bar its length.
    """
    from ong_kernels import nmf  # nmf imports this module

    is_sequence = isinstance(weights, Sequence) and not isinstance(weights, torch.Tensor)
    if is_sequence:
        tensors = nmf._check_weights(weights)
        if isinstance(rank, Sequence) and not isinstance(rank, str) and len(rank) != len(tensors):
            raise ValueError(f"rank has {len(rank)} entries but there are {len(tensors)} matrices")
        source: Iterator[torch.Tensor] = iter(tensors)
        first = tensors[0]
        total = sum(t.numel() for t in tensors)
    else:
        if isinstance(weights, (torch.Tensor, str, bytes)) or not isinstance(weights, Iterable):
            raise TypeError(
                "weights must be a sequence or an iterable of tensors (wrap a single tensor in "
                f"a list), got {type(weights).__name__}"
            )
        source = iter(weights)
        first = next(source, None)
        if first is None:
            raise ValueError("weights is empty: pass at least one tensor")
        first = _check_one(first, 0, None)
        source = _chain(first, source)
    init = solver.init
    if not isinstance(init, str) and is_sequence and len(init) != len(tensors):
        raise ValueError(f"init has {len(init)} (W, H) pairs but there are {len(tensors)} matrices")
    home = first.device
    compute = home if streaming.device is None else torch.device(streaming.device)
    # The kernel choice (and an unavailable explicit backend's error) before any work.
    registry.select("nmf_mu", compute.type, solver.backend)
    budget = check_budget(streaming.memory_budget, compute)

    def sized(items: Iterable[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor, int, int]]:
        for i, t in enumerate(items):
            if not is_sequence:
                t = _check_one(t, i, home)
            r, need = check_fits(i, t.shape, rank, t.element_size(), budget)
            yield i, t, r, need

    if is_sequence:  # every size known: a matrix that can never fit fails before any work
        items: Iterable = list(sized(tensors))
    else:
        items = sized(source)

    solve_args = (solver, compute, home, is_sequence)
    bar = _progress_bar(streaming.progress, total)
    group: list[tuple[int, torch.Tensor, int, int]] = []
    used = 0
    count = 0
    try:
        for item in items:
            if group and used + item[3] > budget:
                yield _solve_group(group, *solve_args)
                _advance(bar, group)
                group, used = [], 0
            group.append(item)
            used += item[3]
            count += 1
        if group:
            yield _solve_group(group, *solve_args)
            _advance(bar, group)
    finally:
        if bar is not None:
            bar.close()
    if isinstance(rank, Sequence) and not isinstance(rank, str) and len(rank) != count:
        raise ValueError(f"rank has {len(rank)} entries but there were {count} matrices")
    if not isinstance(init, str) and len(init) != count:
        raise ValueError(f"init has {len(init)} (W, H) pairs but there were {count} matrices")


def _chain(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


def _solve_group(group, solver: nmf.Solver, compute, home, checked: bool):
    from ong_kernels import nmf

    init = solver.init
    indices = [i for i, _, _, _ in group]
    ranks = [r for _, _, r, _ in group]
    tensors = [t for _, t, _, _ in group]
    if not checked:  # a sequence was checked whole by nmf._check_weights
        for i, t in zip(indices, tensors, strict=True):
            check_nonnegative_finite(t, f"weights[{i}]")
            if t.dtype == torch.float64 and bool((t > nmf.FLOAT32_MAX).any()):
                raise ValueError(
                    f"weights[{i}] has entries above the float32 range; NMF computes in "
                    "float32: rescale the matrix first"
                )
    if not isinstance(init, str) and indices[-1] >= len(init):
        raise ValueError(f"init has {len(init)} (W, H) pairs but weights has more matrices")
    mats = [nmf.as_kernel_input(t.to(compute)) for t in tensors]
    group_init = init if isinstance(init, str) else [init[i] for i in indices]
    factors, n_iter = nmf.solve(mats, ranks, group_init, solver)
    del mats
    return [(w.to(home), h.to(home)) for w, h in factors], n_iter.tolist()


def _progress_bar(progress: bool, total: int | None):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="weight", unit_scale=True, desc="nmf", dynamic_ncols=True)


def _advance(bar, group) -> None:
    if bar is not None:
        bar.set_postfix(matrices=group[-1][0] + 1, refresh=False)
        bar.update(sum(t.numel() for _, t, _, _ in group))
