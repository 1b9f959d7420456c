"""Masks for models larger than memory: streamed scores and an exact allocation over them.

`stream_masks` gives exactly the masks :func:`allocation.allocate` would give for the same
scores (the same counts, the same ties kept: by position in the concatenation of all layers),
while holding only one layer's score at a time. It takes `passes`, a function returning a
fresh iterable over the scores (the same values every call), and reads it several times:

* ``layer`` / ``erk``: one pass; each layer keeps its exact count (allocation.kept_counts) with
  ``select_top`` as it streams by.
* ``global``: the k-th largest score of all N is found by a radix select on the scores' bits
  (an order-preserving integer key per float, 16 bits per pass: two histogram passes for
  float32 scores, four for float64), then a pass counts per layer the scores above and equal
  to the threshold (the per-layer floors of ``min_density`` are checked from those counts,
  exactly as allocation._select_global resolves them), then a last pass writes the masks.
  Memory: 65536 int64 bins plus one layer's score, whatever N is.

Under torch.distributed (``owned=``), each rank's `passes` yields only the layers it scored;
the histograms and the per-layer counts are summed over the ranks (exact int64 all-reduces,
65537 entries per histogram pass), so every rank finds the same threshold and ties and makes
the masks of its own layers exactly as one process would. ``layer`` / ``erk`` need no
communication at all.

Scores are ranked as allocate ranks them: promoted to at least float32 (every widening is
exact, so promotion never reorders), -0.0 equal to 0.0, -inf a valid score, NaN an error.

ONG scores for this come from :func:`ong_factors` (nmf_batched's streaming over descriptors
of the weights, :func:`ong_matrices`: the weights pass through the compute device in groups
that fit a memory budget) and :func:`ong_score_passes` (W H per layer, recomputed on each pass
from the factors: r (m + n) floats per layer kept instead of m n; one (m, r) x (r, n) product
per layer and pass, ~1/(2 max_iter) of the NMF's own work).

Consensus ONG (``restarts=k``, ong.py): every |W| enters the stream k times in a row (a
descriptor with ``repeats=k``: the same tensor; restart j seeded with ``seed + j``, which
needs ``init="random"``: OngSettings.consensus()), so its restarts are solved in the same
groups' op calls as everything else; the score is their mean W H (ong.mean_product), the
factors kept are k r (m + n) per layer, and :func:`restart_overlaps` measures each restart
against the consensus mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ong_kernels._validate import check_int
from ong_kernels.nmf_groups import Streaming, WeightRef, is_iterator, run
from ong_kernels.nmf_rules import check_sequence
from ong_kernels.pruning.allocation import (
    check_floors,
    check_min_density,
    check_scope,
    check_sparsity,
    floor_counts,
    kept_counts,
    select_top,
)
from ong_kernels.pruning.distributed import sum_counts, world
from ong_kernels.pruning.ong import (
    OngSettings,
    check_restarts,
    mean_product,
    restart_overlaps,
)

# OngSettings and Streaming are re-exported: they are the settings ong_factors takes;
# restart_overlaps measures its restarts against a mask.
__all__ = [
    "OngSettings",
    "Streaming",
    "WeightRef",
    "ong_factors",
    "ong_matrices",
    "ong_score_passes",
    "restart_overlaps",
    "stream_masks",
]

Passes = Callable[[], Iterable[torch.Tensor]]

_DIGIT = 16
_BINS = 1 << _DIGIT
# Entries per chunk when keys are built: an int64 key and a few temporaries per entry, so
# ~100 MB of transient memory per chunk whatever the layer's size.
_CHUNK = 1 << 22


# ----------------------------------------------------------------------------- keys


def _key_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    if dtype == torch.float32:
        return torch.int32, 32
    if dtype == torch.float64:
        return torch.int64, 64
    raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _keys(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 keys ordered as the float values of `x` (no NaN): non-negative floats keep their
    bits, a negative float with magnitude bits m becomes -1 - m; -0.0 is made +0.0 first."""
    int_dtype, bits = _key_dtypes(dtype)
    x = x.to(dtype) + 0.0  # IEEE: -0.0 + 0.0 == +0.0
    raw = x.view(int_dtype).to(torch.int64)
    magnitude = raw & ((1 << (bits - 1)) - 1)
    return torch.where(raw >= 0, raw, -1 - magnitude)


def _key_to_float(key: int, dtype: torch.dtype) -> float:
    _, bits = _key_dtypes(dtype)
    raw = key if key >= 0 else (-1 - key) | (1 << (bits - 1))
    if bits == 32:
        return struct.unpack("<f", struct.pack("<I", raw))[0]
    return struct.unpack("<d", struct.pack("<Q", raw))[0]


def _chunks(flat: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK]


# ----------------------------------------------------------------------------- checks


def _rank_dtype(score: torch.Tensor, dtype: torch.dtype, index: int, label: str) -> torch.dtype:
    if not isinstance(score, torch.Tensor) or not score.is_floating_point():
        raise TypeError(f"score of layer {label} must be a floating-point tensor")
    if torch.promote_types(score.dtype, dtype) != dtype:
        raise ValueError(
            f"score of layer {label} has dtype {score.dtype}, wider than dtype={dtype}: pass "
            f"dtype={score.dtype} to rank every score in it"
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class _Shard:
    """The layers this rank scores (increasing indices); the other ranks of `group` score the
    rest, and what a pass counts is summed over them."""

    owned: tuple[int, ...]
    group: object = None


def _owned(shard: _Shard | None, shapes) -> Sequence[int]:
    return range(len(shapes)) if shard is None else shard.owned


def _summed(shard: _Shard | None, local: Callable[[], torch.Tensor], size: int) -> torch.Tensor:
    """A pass's int64 counts: this process's, or summed over the shard's group (where a rank
    whose pass raised makes every rank raise)."""
    if shard is None:
        return local().reshape(-1)
    return sum_counts(local, size, shard.group)


def _scores(passes: Passes, shapes, names, dtype, check_nan: bool, owned: Sequence[int]):
    """One pass: (index, flat score in `dtype`) per owned layer, shapes and count checked."""
    what = "of shapes" if len(owned) == len(shapes) else "of the owned layers"
    count = 0
    for j, score in enumerate(passes()):
        if j >= len(owned):
            raise ValueError(f"passes() produced more than the {len(owned)} scores {what}")
        i = owned[j]
        label = names[i] if names is not None and i < len(names) else f"#{i}"
        _rank_dtype(score, dtype, i, label)
        if tuple(score.shape) != tuple(shapes[i]):
            raise ValueError(
                f"score of layer {label} has shape {tuple(score.shape)}, expected "
                f"{tuple(shapes[i])}"
            )
        flat = score.detach().reshape(-1).to(dtype)
        if check_nan and bool(torch.isnan(flat).any()):
            raise ValueError(f"scores of layer {label} contain NaN; cannot rank them")
        yield i, flat
        count += 1
    if count != len(owned):
        raise ValueError(f"passes() produced {count} scores, expected {len(owned)}")


# ----------------------------------------------------------------------------- global selection


def _histogram(passes, shapes, names, dtype, free, owned, level: int, prefix: int, check_nan):
    """One pass: the 16-bit digit at `level` of the owned free layers' keys whose higher
    digits are `prefix`, counted in _BINS bins."""
    _, bits = _key_dtypes(dtype)
    shift = bits - _DIGIT * (level + 1)
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for i, flat in _scores(passes, shapes, names, dtype, check_nan, owned):
        if i not in free:
            continue
        for chunk in _chunks(flat):
            key = _keys(chunk, dtype)
            if level > 0:
                key = key[(key >> (shift + _DIGIT)) == prefix]
            digit = (key >> shift) & (_BINS - 1)
            if level == 0:
                digit = digit ^ (_BINS >> 1)  # signed top digit -> offset binary
            hist += torch.bincount(digit, minlength=_BINS).cpu()
    return hist


def _threshold(passes, shapes, names, dtype, free: set[int], k: int, check_nan: bool, shard):
    """(T, ties): the k-th largest score over the `free` layers (1 <= k < their size), and how
    many scores equal to T are kept (the first ones in position order), by radix select."""
    _, bits = _key_dtypes(dtype)
    prefix = 0
    remaining = k
    levels = bits // _DIGIT
    owned = _owned(shard, shapes)
    for level in range(levels):
        local = functools.partial(
            _histogram, passes, shapes, names, dtype, free, owned, level, prefix,
            check_nan and level == 0,
        )  # fmt: skip
        hist = _summed(shard, local, _BINS)
        above = torch.flip(hist, (0,)).cumsum(0)  # above[j]: count in bins >= BINS - 1 - j
        j = int(torch.searchsorted(above, remaining))  # first j with above[j] >= remaining
        d = _BINS - 1 - j
        remaining -= int(above[j]) - int(hist[d])
        prefix = (d - (_BINS >> 1)) if level == 0 else (prefix << _DIGIT) | d
    return _key_to_float(prefix, dtype), remaining


def _layer_counts(passes, shapes, names, dtype, free: set[int], threshold: float, shard):
    """Per free layer, how many scores are above `threshold` and how many equal it."""

    def local() -> torch.Tensor:
        counts = torch.zeros(2, len(shapes), dtype=torch.int64)
        for i, flat in _scores(passes, shapes, names, dtype, False, _owned(shard, shapes)):
            if i in free:
                counts[0, i] = int(torch.count_nonzero(flat > threshold))
                counts[1, i] = int(torch.count_nonzero(flat == threshold))
        return counts

    counts = _summed(shard, local, 2 * len(shapes)).view(2, len(shapes))
    return {i: int(counts[0, i]) for i in free}, {i: int(counts[1, i]) for i in free}


def _global_plan(passes, shapes, names, dtype, sparsity, floors, shard):
    """Per layer, how its mask is made: ("top", count) for a layer forced to its floor, or
    ("cut", threshold, ties) for the others: keep > threshold, plus its first `ties` scores
    equal to it. Resolves the floors as allocation._select_global does."""
    numels = [math.prod(s) for s in shapes]
    n = sum(numels)
    k = n - round(sparsity * n)
    forced: set[int] = set()
    first = True
    while True:
        free = {i for i in range(len(shapes)) if i not in forced}
        budget = k - sum(floors[i] for i in forced)
        size = sum(numels[i] for i in free)
        plan: dict[int, tuple] = {i: ("top", floors[i]) for i in forced}
        if budget <= 0 or budget >= size:
            keep_all = budget >= size
            for i in free:
                plan[i] = ("top", numels[i] if keep_all else 0)
            kept = {i: plan[i][1] for i in free}
        else:
            threshold, ties = _threshold(passes, shapes, names, dtype, free, budget, first, shard)
            gt, eq = _layer_counts(passes, shapes, names, dtype, free, threshold, shard)
            kept = {}
            for i in sorted(free):
                t = min(eq[i], ties)
                ties -= t
                plan[i] = ("cut", threshold, t)
                kept[i] = gt[i] + t
        first = False
        short = [i for i in sorted(free) if kept[i] < floors[i]]
        if not short:
            return plan
        # A layer below its floor keeps exactly its top `floor` scores; the others share the
        # rest of the exact total (allocation._select_global: at most once per layer).
        forced.update(short)


def _apply(plan_entry, flat: torch.Tensor) -> torch.Tensor:
    if plan_entry[0] == "top":
        return select_top(flat, plan_entry[1])
    _, threshold, ties = plan_entry
    keep = flat > threshold
    if ties:
        keep[(flat == threshold).nonzero().squeeze(1)[:ties]] = True
    return keep


# ----------------------------------------------------------------------------- public


def stream_masks(
    passes: Passes,
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    scope: str = "global",
    *,
    min_density: float | None = None,
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    owned: Sequence[int] | None = None,
    group=None,
) -> Iterator[torch.Tensor]:
    """Yield one bool mask (True = kept) per layer, in order: exactly allocate()'s masks.

    Args:
        passes: called once per pass; returns a fresh iterable of the scores, one tensor per
            layer in `shapes` order, the same values on every call (higher = kept). One
            pass for "layer"/"erk"; 4 (float32) or 6 (float64) for "global", more only when
            a layer falls below its floor.
        shapes: the layers' shapes (known before any score: sizes and floors are checked
            before the first pass).
        sparsity, scope, min_density: as allocation.allocate.
        names: layer names for error messages.
        dtype: what the scores are ranked in: float32 (scores of float32 or narrower), or
            float64 when any score is float64 (allocate promotes the same way).
        owned: under torch.distributed, the increasing indices of the layers this rank
            scores: `passes()` yields only their scores and only their masks are yielded.
            Every rank of `group` (default: the default group) calls stream_masks with the
            same other arguments, and each layer is owned by exactly one rank (checked by a
            collective when the call is made). The masks equal one process's bit for bit;
            an error on one rank (a NaN score, a bad pass) is raised on every rank. Default
            None: this process scores every layer and talks to no other.

    The masks are yielded during the last pass, each on its score's device, so a caller can
    write one and drop it before the next is made.
    """
    sparsity = check_sparsity(sparsity)
    scope = check_scope(scope)
    min_density = check_min_density(min_density)
    _key_dtypes(dtype)
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if not shapes:
        raise ValueError("shapes is empty: nothing to allocate")
    numels = [math.prod(s) for s in shapes]
    check_floors(numels, sparsity, scope, min_density)
    shard = _shard(owned, group, len(shapes))
    return _yield_masks(passes, shapes, names, dtype, sparsity, scope, min_density, numels, shard)


def _shard(owned, group, count: int) -> _Shard | None:
    """`owned` checked (on every rank at once: a bad list on one rank fails them all)."""
    if owned is None:
        return None
    _, world_size = world(group)

    def local() -> torch.Tensor:
        if isinstance(owned, (str, bytes, torch.Tensor)) or not isinstance(owned, Sequence):
            raise TypeError(
                f"owned must be a sequence of layer indices, got {type(owned).__name__}"
            )
        for j, i in enumerate(owned):
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
                raise ValueError(f"owned[{j}] must be a layer index in [0, {count}), got {i!r}")
            if j and i <= owned[j - 1]:
                raise ValueError("owned must be strictly increasing layer indices")
        times = torch.zeros(count, dtype=torch.int64)
        times[list(owned)] = 1
        return times

    if world_size == 1:
        times = local()
    else:
        times = sum_counts(local, count, group)  # every layer scored by exactly one rank
    wrong = (times != 1).nonzero().reshape(-1).tolist()
    if wrong:
        raise ValueError(
            f"owned: layer {wrong[0]} is scored by {int(times[wrong[0]])} ranks of the "
            f"{world_size}; each layer must be owned by exactly one"
        )
    return None if world_size == 1 else _Shard(tuple(owned), group)


def _yield_masks(passes, shapes, names, dtype, sparsity, scope, min_density, numels, shard):
    if scope == "global":
        floors = floor_counts(numels, min_density)
        plan = _global_plan(passes, shapes, names, dtype, sparsity, floors, shard)
        check_nan = False
    else:
        counts = kept_counts(shapes, sparsity, scope, min_density)
        plan = {i: ("top", c) for i, c in enumerate(counts)}
        check_nan = True
    for i, flat in _scores(passes, shapes, names, dtype, check_nan, _owned(shard, shapes)):
        yield _apply(plan[i], flat).view(shapes[i])


def _as_ref(weight, index: int, names) -> WeightRef:
    if isinstance(weight, WeightRef):
        return weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weights[{index}] must be a torch.Tensor, got {type(weight).__name__}")
    return WeightRef.of(weight.detach(), 1, None if names is None else names[index])


def ong_matrices(weights, settings: OngSettings, names=None):
    """What ONG factorises, as nmf_groups descriptors: |W| of every weight at its rank, its
    restarts in a row. `weights`: a sequence of tensors or WeightRefs (a model's, a
    checkpoint header's: every size known before any read), or an iterator of tensors
    (each described as it arrives)."""
    settings = settings.resolved()
    if not is_iterator(weights):
        refs = [_as_ref(w, i, names) for i, w in enumerate(check_sequence(weights))]
        ranks = settings.ranks([ref.shape for ref in refs])
        return [_ong_ref(ref, r, settings) for ref, r in zip(refs, ranks, strict=True)]
    return (_ong_ref(ref, settings.ranks([ref.shape])[0], settings)
            for ref in (_as_ref(w, i, names) for i, w in enumerate(weights)))  # fmt: skip


def _ong_ref(ref: WeightRef, rank: int, settings: OngSettings) -> WeightRef:
    return dataclasses.replace(ref, rank=rank, abs=True, repeats=settings.restarts)


def ong_factors(
    weights, settings: OngSettings = OngSettings(), streaming: Streaming = Streaming(), *,
    names=None, count: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """NMF factors (W_i, H_i) of |weight_i|, streamed: the ONG part of prune("ong").

    `weights`: as :func:`ong_matrices` (an iterator: only one group's |W| exists at a time,
    and the progress bar has no length). `settings`: ONG's (rank, solver, restarts);
    `streaming` (device, memory_budget, progress) nmf_batched's (ong_kernels/nmf_groups.py):
    the weights always pass through the compute device in groups that fit the budget. The
    factors equal prune()'s: the same ONG matrices factorised by the same op, grouping aside.
    With restarts=k, k pairs per weight in a row (restart j from seed + j), equal to
    prune(restarts=k)'s; an iterator of weights then needs `count`, how many it yields
    (every restart's seed is fixed before the first group). `names` label them in errors.
    """
    settings = settings.resolved()
    matrices = ong_matrices(weights, settings, names)
    if isinstance(matrices, list):
        count = len(matrices)
    elif settings.restarts > 1 and count is None:
        raise ValueError(
            f"restarts={settings.restarts} of an iterator of weights needs count= (how many "
            "weights it yields): every restart's seed is fixed before the first group is solved"
        )
    solver = settings.solver(1 if count is None else check_int(count, "count", 1))
    groups = run(matrices, solver, streaming)
    return [pair for factors, _ in groups for pair in factors]


def ong_score_passes(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    shapes: Sequence[Sequence[int]],
    restarts: int = 1,
) -> Passes:
    """`passes` for stream_masks: each call yields the mean of W_j @ H_j over the `restarts`
    consecutive pairs of layer i, in shape i, one layer at a time (the score prune("ong")
    ranks: W @ H itself for one restart)."""
    k = check_restarts(restarts)
    if len(factors) != k * len(shapes):
        raise ValueError(f"{len(factors)} factor pairs but {len(shapes)} shapes x {k} restart(s)")

    def passes() -> Iterator[torch.Tensor]:
        for i, shape in enumerate(shapes):
            yield mean_product(factors[i * k : (i + 1) * k]).reshape(tuple(shape))

    return passes
