"""Spreading per-matrix work over the ranks of torch.distributed and gathering the results;
summing data-dependent gradients over the ranks.

ONG factorises one matrix per prunable weight; with a process group, each rank factorises
a share of the matrices (balanced by the cost of a multiplicative update, m * n * r), and
one all-reduce of a flat buffer gives every rank all the scores. Each score entry is written
by exactly one rank and is 0 elsewhere, so the sum is exact: every rank ends up with
bit-identical scores and therefore identical masks.

These are collectives: every rank of the group must make the same pruning call. To prune
on one rank only (and broadcast the masks yourself), pass ``distributed=False``.

Where one rank can fail alone (its share of the work, its reads), :func:`agree` and
:func:`sum_counts` make every rank raise instead of leaving the others waiting in the next
collective: the failed rank its own error, the others :class:`RankFailed` quoting it.

:class:`Launch` is a process's part of a torchrun launch of a pruning job (ong-mask): it
starts the process group, splits the work, compares what every rank was given and gathers
the results on rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["Launch", "RankFailed", "agree", "balance", "run_sharded", "sum_counts", "world"]

T = TypeVar("T")


def world(group=None, distributed: bool = True) -> tuple[int, int]:
    """(rank, world size) of `group`; (0, 1) when torch.distributed is not initialised or
    `distributed` is False (the caller computes everything itself, talking to no rank)."""
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def balance(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: longest-processing-time-first greedy over `world_size` ranks.

    Items are taken by decreasing cost (ties by index), each to the least loaded rank (ties
    by rank), so the result is deterministic and the same on every rank. LPT's makespan is
    within 4/3 of the optimum.
    """
    loads = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def _comm_device(group, fallback: torch.device) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones via the host).
    backend = str(dist.get_backend(group))
    if fallback.type == "cuda" and "nccl" in backend:
        return fallback
    return torch.device("cpu")


class RankFailed(RuntimeError):
    """Raised on the ranks that did not fail when another rank of the group did."""


def _collect(fn: Callable[[], T], size: int, group, device: torch.device):
    """(fn(), its int64 result summed over the ranks, or None when size is 0): one all-reduce of
    size + 1 entries, the last counting the ranks whose fn() raised; then every rank raises."""
    comm = _comm_device(group, device)
    flat = torch.zeros(size + 1, dtype=torch.int64, device=comm)
    error: Exception | None = None
    result = None
    try:
        result = fn()
        if size:  # inside the try: a wrong size or dtype is this rank's error
            flat[:size] = result.reshape(-1)
    except Exception as exc:  # re-raised below, after the other ranks have been told
        error = exc
        flat.zero_()
    flat[size] = int(error is not None)
    dist.all_reduce(flat, group=group)
    if int(flat[size]):
        # Rare path: one more collective, so that every rank can name what went wrong.
        messages: list = [None] * dist.get_world_size(group)
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine, group=group)
        if error is not None:
            raise error
        failed = next(r for r, m in enumerate(messages) if m is not None)
        raise RankFailed(f"failed on another rank (rank {failed}): {messages[failed]}")
    return result, (flat[:size].cpu() if size else None)


def agree(fn: Callable[[], T], group=None, device: torch.device | str = "cpu") -> T:
    """fn() on this rank; when it raised on any rank of `group`, every rank raises (the failed
    rank its own exception, the others RankFailed with its message) instead of the others
    waiting for it in their next collective. A collective: every rank must call it. Without
    a process group it is fn(). `device`: where the flag lives (CUDA under NCCL)."""
    if world(group)[1] == 1:
        return fn()
    return _collect(fn, 0, group, torch.device(device))[0]


def sum_counts(fn: Callable[[], torch.Tensor], size: int, group=None) -> torch.Tensor:
    """The int64 tensor fn() (`size` entries, any device) summed over the ranks of `group` into
    a flat CPU tensor: exact, the same bits on every rank. Failures as :func:`agree`, in the
    same single all-reduce (the flag rides in one extra entry)."""
    if world(group)[1] == 1:
        return fn().reshape(-1).to("cpu", torch.int64)
    return _collect(fn, size, group, torch.device("cpu"))[1]


def run_sharded(
    compute: Callable[[list[int]], list[torch.Tensor]],
    costs: Sequence[float],
    shapes: Sequence[torch.Size],
    device: torch.device,
    group=None,
    distributed: bool = True,
) -> list[torch.Tensor]:
    """Results for every item, each rank computing `compute(its item indices)`.

    `compute(indices)` returns one float32 tensor per index, of `shapes[index]`. Without a
    process group (or with one rank) it is simply called on every index. An exception on
    any rank is raised on every rank (instead of leaving the others waiting in the
    all-reduce).
    """
    rank, world_size = world(group, distributed)
    if world_size == 1:
        return compute(list(range(len(shapes))))
    owner = balance(costs, world_size)
    mine = [i for i, r in enumerate(owner) if r == rank]
    numels = [torch.Size(s).numel() for s in shapes]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    comm = _comm_device(group, device)
    buffer = torch.zeros(offsets[-1], dtype=torch.float32, device=comm)

    def fill() -> None:
        if mine:
            for i, result in zip(mine, compute(mine), strict=True):
                buffer[offsets[i] : offsets[i + 1]] = result.reshape(-1).to(comm, torch.float32)

    agree(fill, group, comm)
    dist.all_reduce(buffer, group=group)
    return [
        buffer[offsets[i] : offsets[i + 1]].reshape(shapes[i]).to(device)
        for i in range(len(shapes))
    ]


def all_reduce_sum_(tensors: Sequence[torch.Tensor], group=None, distributed: bool = True) -> None:
    """Sum `tensors` in place over the ranks of `group` (no-op without a process group).

    SNIP and GraSP use it so that every rank scores the data of all ranks and gets the same
    masks. One all-reduce of one flat buffer; every rank receives the same bits.
    """
    _, world_size = world(group, distributed)
    if world_size == 1 or not tensors:
        return
    device = tensors[0].device
    comm = _comm_device(group, device)
    flat = torch.cat([t.detach().reshape(-1).to(comm) for t in tensors])
    dist.all_reduce(flat, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view(t.shape))


# ----------------------------------------------------------------------------- torchrun

_ENV = (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1))


class Launch:
    """This process's part of a torchrun launch; rank 0 of 1, talking to no one, without one.

    Under torchrun (RANK and WORLD_SIZE > 1 in the environment) every rank checks its
    arguments identically before any communication (so a bad command fails on every rank
    alike), then `start` begins a gloo process group (env://, `timeout_s`): only histograms,
    per-layer counts, digests and at the end the bit-packed results travel, so gloo serves
    CUDA ranks too. Where one rank can fail alone, `local` makes every rank raise that error
    instead of leaving the others waiting. An already started process group (a caller's
    distributed script) is used as it is and left open.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1,
                 timeout_s: float = 3600.0) -> None:  # fmt: skip
        self.rank, self.world = rank, world
        self.local_rank, self.local_world = local_rank, local_world
        self.timeout_s = timeout_s
        self.costs: list[float] = []  # what each item costs (split's input)
        self.owner: list[int] = []  # rank of each item
        self.close = False  # whether this process started the process group

    @classmethod
    def from_env(cls, timeout_s: float = 3600.0) -> Launch:
        """From torchrun's environment (or a started process group); ValueError for
        variables that are not integers."""
        started = dist.is_available() and dist.is_initialized()
        env = os.environ
        if not started and ("RANK" not in env or "WORLD_SIZE" not in env):
            return cls(timeout_s=timeout_s)
        try:
            values = [int(env.get(k, d)) for k, d in _ENV]
        except ValueError:
            raise ValueError(
                "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (torchrun "
                "sets them)"
            ) from None
        if started:
            values[:2] = dist.get_rank(), dist.get_world_size()
        return cls(*values, timeout_s=timeout_s) if values[1] > 1 else cls(timeout_s=timeout_s)

    @contextlib.contextmanager
    def session(self) -> Iterator[Launch]:
        """Ranks other than 0 print no stdout (their errors still go to stderr); the process
        group this process started is closed at the end."""
        with contextlib.ExitStack() as stack:
            if self.rank:
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            try:
                yield self
            finally:
                if self.close:
                    dist.destroy_process_group()

    def start(self) -> None:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
            self.close = True
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world):
            raise ValueError("RANK / WORLD_SIZE disagree with the started process group")

    def device(self, device: str) -> str:
        """Where this rank computes: ``cuda`` is cuda:LOCAL_RANK under torchrun."""
        return f"cuda:{self.local_rank}" if self.world > 1 and device == "cuda" else device

    def split(self, costs: Sequence[float]) -> list[int]:
        """The items this rank works on (balance over `costs`): all of them alone."""
        self.costs = list(costs)
        self.owner = balance(self.costs, self.world)
        return [i for i, r in enumerate(self.owner) if r == self.rank]

    # Agreement points (collectives: every rank calls them).
    def local(self, fn: Callable[[], T]) -> T:
        """fn() on this rank; a failure on any rank raises on every rank."""
        return fn() if self.world == 1 else agree(fn)

    def on_rank_0(self, fn: Callable[[], object]) -> None:
        self.local(fn if self.rank == 0 else lambda: None)

    def same(self, value) -> bool:
        """Whether every rank holds the same (picklable) `value`."""
        if self.world == 1:
            return True
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return all(v == values[0] for v in values)

    def compare(self, value, differs: str) -> None:
        """ValueError on every rank when a rank's `value` differs from rank 0's: 'rank R
        {differs} rank 0'."""
        if self.world == 1:
            return
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        other = next((r for r, v in enumerate(values) if v != values[0]), None)
        if other is not None:
            raise ValueError(
                f"rank {other} {differs} rank 0: run the same command on the same files on "
                "every rank"
            )

    def gather(self, rows: list, payload: dict[int, torch.Tensor], sizes: Sequence[int], stats):
        """On rank 0: ({item: row}, {item: uint8 payload}, [stats per rank]) of every rank's
        items (rows[j] and payload belong to this rank's j-th item); None on the others.
        Each other rank sends its payloads as one uint8 message, so rank 0 ends up holding
        what it would hold alone."""
        if self.world == 1:
            return dict(enumerate(rows)), payload, [stats]
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object((rows, stats), gathered, dst=0)
        share = [i for i, r in enumerate(self.owner) if r == self.rank]
        if self.rank:
            if share:
                dist.send(torch.cat([payload[i] for i in share]), dst=0)
            return None
        by_index, got, per_rank = {}, dict(payload), []
        for r, (rank_rows, rank_stats) in enumerate(gathered):
            per_rank.append(rank_stats)
            idx = [i for i, o in enumerate(self.owner) if o == r]
            by_index.update(zip(idx, rank_rows, strict=True))
            if r and idx:
                buffer = torch.empty(sum(sizes[i] for i in idx), dtype=torch.uint8)
                dist.recv(buffer, src=r)
                got.update(zip(idx, buffer.split([sizes[i] for i in idx]), strict=True))
        return by_index, got, per_rank
