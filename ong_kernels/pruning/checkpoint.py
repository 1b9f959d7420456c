"""Masks of a safetensors checkpoint without loading the model: the work behind ong-mask.

A checkpoint is one ``.safetensors`` file, or a sharded one (``model-0000k-of-0000N.safetensors``
plus ``model.safetensors.index.json``: the index file or its folder). Either way its tensors
are listed from the headers alone, in name order (the order safetensors lists one file's
tensors in), so the same tensors give the same masks whether they lie in one file or in
shards: one global threshold over all of them.

:func:`checkpoint_masks` takes the checkpoint, the tensors to prune, a method with its
settings, the allocation and this process's part of the launch (distributed.Launch), and
writes the masks file. Tensors are read lazily, one at a time (a fresh ``safe_open`` per
tensor: its memory map is released after each read, so resident memory stays O(largest tensor
+ one NMF group), not O(checkpoint)). ONG factorises |W| of every pruned tensor with
nmf_batched's streaming over descriptors made from the header (stream.ong_factors: every
size checked against the memory budget before any read), keeps only the factors, and
allocates with stream.stream_masks: exactly the masks prune() would give for the same weights
(round(sparsity * N) pruned, ties by position). Masks are written bit-packed by
io.write_mask_file (load_masks reads them).

Under torchrun each rank reads and factorises a share of the tensors (distributed.balance
over the MU cost k m n r, the split prune() uses), the exact global threshold comes from
all-reduced radix-select histograms (stream_masks' ``owned=``), and rank 0 gathers the
bit-packed masks and writes the file: the same masks as one process. Before any work the ranks
compare their settings, the header and the checkpoint's content (a digest of its bytes,
skipped when every rank reads the same file on one host): ranks reading different files
with the same header are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import resource
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from ong_kernels._bitmask import pack_mask
from ong_kernels.nmf_groups import BudgetError, Streaming, WeightRef, check_budget
from ong_kernels.pruning import api, stream
from ong_kernels.pruning.allocation import check_floors, check_scope, check_sparsity
from ong_kernels.pruning.distributed import Launch
from ong_kernels.pruning.io import write_mask_file
from ong_kernels.pruning.ong import Agreement, OngSettings

__all__ = [
    "DEFAULT_EXCLUDE",
    "STREAMED",
    "Allocation",
    "BudgetError",
    "Checkpoint",
    "Entry",
    "Report",
    "check_output",
    "checkpoint_masks",
    "method_settings",
    "select",
]

DEFAULT_EXCLUDE = r"(?i)(embed|wte|wpe|lm_head|norm|ln_)"
FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
INDEX_SUFFIX = ".safetensors.index.json"
# Bytes read per hash update: large enough that the digest runs at the hash's speed.
_HASH_CHUNK = 16 << 20


# ----------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, from its header: name, shape, safetensors dtype, file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str


class Checkpoint:
    """The tensors of one safetensors file or of a sharded checkpoint, read from the headers.

    ``Checkpoint.open(path)``: a ``.safetensors`` file, an index file (``*.safetensors
    .index.json``: its ``weight_map`` names each tensor's shard, and every shard's header
    must list exactly the tensors the index gives it), or a folder holding one index file or
    one ``.safetensors`` file. A ValueError (OSError for a missing path) says what is wrong.
    """

    def __init__(self, path: str, entries: Sequence[Entry]) -> None:
        self.path = path
        self.entries = sorted(entries, key=lambda e: e.name)
        self.files = sorted({e.file for e in entries})

    @classmethod
    def open(cls, path: str) -> Checkpoint:
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls.open(_in_folder(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist or is not a file")
        if path.endswith(".json"):
            return cls(path, _sharded(path))
        return cls(path, _header(path))

    def read(self, entry: Entry) -> torch.Tensor:
        # A fresh safe_open per tensor: its memory map (resident pages count in RSS) goes with it.
        with safe_open(entry.file, framework="pt") as f:
            return f.get_tensor(entry.name)

    def ref(self, entry: Entry) -> WeightRef:
        """The descriptor nmf_groups sizes from the header and reads when it gets there."""
        return WeightRef(entry.shape, FLOAT[entry.dtype], 1,
                         load=functools.partial(self.read, entry), name=entry.name)  # fmt: skip

    def identity(self) -> tuple:
        """Where this process reads from: host, boot and every file's (device, inode, size,
        mtime). Equal on two ranks: they read the same files, so the same bytes."""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = ""
        stats = [os.stat(f) for f in self.files]
        return socket.gethostname(), boot, [(s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)
                                            for s in stats]  # fmt: skip

    def digest(self) -> str:
        """SHA-256 of every file's bytes, in name order (headers and tensors: what is read)."""
        h = hashlib.sha256()
        for name in self.files:
            with open(name, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        return h.hexdigest()


def _in_folder(folder: str) -> str:
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0])
    if not indexes and len(files) == 1:
        return os.path.join(folder, files[0])
    found = indexes or files
    raise ValueError(
        f"{folder!r} holds {len(found)} {'index' if indexes else '.safetensors'} files "
        f"({', '.join(found[:4]) or 'none'}): give the file to read"
    )


def _header(path: str) -> list[Entry]:
    """[Entry] of one file, without reading any tensor."""
    try:
        with safe_open(path, framework="pt") as f:
            entries = []
            for name in f.keys():
                sl = f.get_slice(name)
                entries.append(Entry(name, tuple(sl.get_shape()), sl.get_dtype(), path))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path!r} is not a readable safetensors file ({exc})") from None
    return entries


def _sharded(index: str) -> list[Entry]:
    """The entries of every shard an index file names, checked against its weight_map."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{index!r} is not a safetensors index (a JSON object with a weight_map): {exc}"
        ) from None
    folder = os.path.dirname(index)
    entries = []
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise ValueError(f"{index!r} names the shard {shard!r}, which does not exist")
        in_shard = _header(path)
        listed = {n for n, s in weight_map.items() if s == shard}
        have = {e.name for e in in_shard}
        if have != listed:
            odd = sorted(have ^ listed)[:3]
            raise ValueError(
                f"{index!r} and the header of {shard!r} list other tensors (e.g. {odd}): the "
                "index does not describe these shards"
            )
        entries.extend(in_shard)
    if not entries:
        raise ValueError(f"{index!r} names no tensors")
    return entries


def select(entries: Sequence[Entry], include: str | None, exclude: str | None):
    """(pruned [Entry], skipped [(name, reason)]): every 2-D+ floating tensor whose name
    matches `include` (when given) and not `exclude`. re.error for a bad pattern."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    pruned, skipped = [], []
    for e in entries:
        if len(e.shape) < 2:
            skipped.append((e.name, f"{len(e.shape)}-D: never pruned"))
        elif inc is not None and not inc.search(e.name):
            skipped.append((e.name, "not matched by --include"))
        elif exc is not None and exc.search(e.name):
            skipped.append((e.name, "matched by --exclude"))
        elif e.dtype not in FLOAT:
            skipped.append((e.name, f"dtype {e.dtype} is not floating: skipped"))
        elif math.prod(e.shape) == 0:
            skipped.append((e.name, "empty"))
        else:
            pruned.append(e)
    return pruned, skipped


def check_output(output: str, checkpoint: Checkpoint) -> str | None:
    """Why the masks cannot be written to `output`, or None; checked before any work.

    Refused: a file of the checkpoint (a shard, the index) by any path (relative, absolute,
    symlink, hard link: same resolved path or same st_dev/st_ino), a folder, something that
    is not a regular file, a read-only file, a missing folder, a folder this process cannot
    create files in. A symlink is written through (its target's folder must be writable).
    """
    if os.path.lexists(output):
        for source in {checkpoint.path, *checkpoint.files}:
            same = os.path.realpath(output) == os.path.realpath(source)
            if os.path.exists(output):
                a, b = os.stat(output), os.stat(source)
                same = same or (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            if same:
                return f"-o {output!r} is the checkpoint {source!r}; write the masks elsewhere"
        if os.path.isdir(output):
            example = os.path.join(output, "masks.safetensors")
            return f"-o {output!r} is a folder; give a file name, e.g. -o {example}"
        if os.path.exists(output) and not os.path.isfile(output):
            return f"-o {output!r} exists and is not a regular file"
        if os.path.isfile(output) and not os.access(output, os.W_OK):
            return f"-o {output!r} is read-only; not replacing it"
    folder = os.path.dirname(os.path.realpath(output))  # a symlink's target gets the masks
    if not os.path.isdir(folder):
        return f"-o {output!r}: folder {folder!r} does not exist"
    try:  # the masks go to a temporary file there first (renamed when complete)
        fd, probe = tempfile.mkstemp(prefix=".ong-mask.", suffix=".tmp", dir=folder)
    except OSError as err:
        return f"-o {output!r}: cannot create files in {folder!r} ({err.strerror})"
    os.close(fd)
    os.unlink(probe)
    return None


# ----------------------------------------------------------------------------- the method

# The scorer table's methods whose score of a weight depends on that weight alone, so that
# they stream: ONG (its settings' defaults from the table: "ong-consensus" is ONG with
# CONSENSUS's), and magnitude.
STREAMED = ("ong", "ong-consensus", "magnitude")


def method_settings(method: str, **given) -> OngSettings | None:
    """The resolved settings of `method` (one of STREAMED): for the ONG methods the scorer
    table's defaults (api.method_defaults) overridden by the `given` ones that are not None;
    None for magnitude, which has none."""
    _check_method(method)
    if method == "magnitude":
        return None
    defaults = api.method_defaults(method)
    names = {f.name for f in dataclasses.fields(OngSettings) if f.init}
    chosen = {k: v for k, v in defaults.items() if k in names}
    chosen.update({k: v for k, v in given.items() if v is not None})
    return OngSettings(**chosen).resolved()


def _check_method(method: str) -> str:
    if method not in STREAMED:
        raise ValueError(f"method must be one of {STREAMED}, got {method!r}")
    return method


@dataclass(frozen=True)
class Allocation:
    """How the scores become masks: the exact `sparsity` over the `scope` (allocation.py)."""

    sparsity: float
    scope: str = "global"

    def checked(self) -> Allocation:
        return Allocation(check_sparsity(self.sparsity), check_scope(self.scope))


# ----------------------------------------------------------------------------- the work


@dataclass
class Report:
    """What checkpoint_masks did, on rank 0 (other ranks: rows empty).

    rows: per pruned tensor (name, shape, weights, kept, seconds of its mask pass, peak MiB).
    agreement: for restarts > 1, how the restarts agree with the consensus masks.
    ranks: under torchrun, per rank (tensors, share of the cost, scoring s, total s, peak MiB).
    """

    rows: list = field(default_factory=list)
    scored_s: float = 0.0
    total_s: float = 0.0
    agreement: Agreement | None = None
    ranks: list = field(default_factory=list)
    cost: str = "MU cost"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def checkpoint_masks(
    checkpoint: Checkpoint,
    pruned: Sequence[Entry],
    method: str,
    settings: OngSettings | None,
    allocation: Allocation,
    launch: Launch,
    output: str,
    *,
    device: str = "cpu",
    memory_budget: int | None = None,
    progress: bool = False,
) -> Report:
    """Masks of the `pruned` tensors of `checkpoint`, written to `output` by rank 0.

    `method`: one of STREAMED, with its `settings` (method_settings: ONG's, None for
    magnitude). `launch`: this
    process's part of a torchrun launch (Launch() alone). `device`, `memory_budget`,
    `progress`: the NMF's streaming (nmf_batched's). Errors: ValueError / TypeError for what
    the settings or the data make impossible (a NaN, a budget too small), the same on every
    rank; OSError when the masks file cannot be written (the old one is kept).
    """
    start = time.perf_counter()
    ong = _check_method(method) != "magnitude"
    if ong != isinstance(settings, OngSettings):
        raise TypeError(f"method {method!r} takes {'OngSettings' if ong else 'no settings'}")
    allocation = allocation.checked()
    names = [e.name for e in pruned]
    shapes = [e.shape for e in pruned]
    share = _share(checkpoint, pruned, settings, allocation, launch)
    mine = [pruned[i] for i in share]
    if ong:
        streaming = Streaming(launch.device(device), _budget(launch, device, memory_budget),
                              progress and launch.rank == 0)  # fmt: skip

        def factorise() -> list:
            if not mine:  # more ranks than tensors
                return []
            refs = [checkpoint.ref(e) for e in mine]
            return stream.ong_factors(refs, settings, streaming)

        factors = launch.local(factorise)
        passes = stream.ong_score_passes(factors, [e.shape for e in mine], settings.restarts)
    else:

        def passes() -> Iterator[torch.Tensor]:
            return (checkpoint.read(e).abs() for e in mine)

    # A float64 tensor outside float32's range has float64 factors and scores
    # (nmf_rules.factor_dtype); float32 scores and magnitudes rank the same in float64.
    dtype = torch.float64 if any(e.dtype == "F64" for e in pruned) else torch.float32
    scored = time.perf_counter() - start
    k = settings.restarts if ong else 1

    def pack():
        owned = {"owned": share} if launch.world > 1 else {}
        masks = stream.stream_masks(
            passes, shapes, allocation.sparsity, allocation.scope, names=names, dtype=dtype,
            **owned,
        )  # fmt: skip
        packed, rows = {}, []
        t0 = time.perf_counter()
        for pos, (i, mask) in enumerate(zip(share, masks, strict=True)):
            mask = mask.cpu().contiguous()
            packed[i] = pack_mask(mask)  # pruning.io's codec (format version 2)
            overlaps = None
            if k > 1:  # each restart alone against the consensus mask
                overlaps = stream.restart_overlaps(factors[pos * k : (pos + 1) * k], mask)
            t1 = time.perf_counter()
            rows.append((names[i], shapes[i], mask.numel(), int(mask.sum()), t1 - t0,
                         peak_mib(), overlaps))  # fmt: skip
            t0 = t1
        return packed, rows

    packed, rows = launch.local(pack)
    report = Report(scored_s=scored, cost="MU cost" if ong else "weights")
    stats = (len(share), _cost_share(launch, share), scored, time.perf_counter() - start,
             peak_mib())  # fmt: skip
    sizes = [(math.prod(s) + 7) // 8 for s in shapes]
    gathered = launch.gather(rows, packed, sizes, stats)
    masks, layout = {}, {}
    if gathered is not None:
        all_rows, all_packed, report.ranks = gathered
        report.rows = [all_rows[i] for i in range(len(names))]
        layout = dict(zip(names, shapes, strict=True))
        masks = {names[i]: all_packed[i] for i in range(len(names))}
        if k > 1:
            report.agreement = Agreement.from_overlaps([r[6] for r in report.rows])
    # Rank 0 writes: a temporary file in the target folder, renamed when complete.
    launch.on_rank_0(lambda: write_mask_file(output, masks, layout))
    report.total_s = time.perf_counter() - start
    return report


def _budget(launch: Launch, device: str, memory_budget: int | None) -> int | None:
    """memory_budget; without one, torchrun ranks sharing a host's memory split its default."""
    if memory_budget is not None or launch.world == 1:
        return memory_budget
    compute = torch.device(launch.device(device))
    if compute.type != "cpu":
        return None  # each rank has its own GPU
    return max(1, check_budget(None, compute) // launch.local_world)


def _cost_share(launch: Launch, share: Sequence[int]) -> float:
    return sum(launch.costs[i] for i in share) / max(1, sum(launch.costs))


def _share(checkpoint, pruned, settings, allocation, launch: Launch) -> list[int]:
    """The indices of the tensors this rank reads and scores: all of them in one process.

    Under torchrun: first the checks every rank makes alike (before any communication), then
    the process group, then the comparisons of every rank's settings and header, then of the
    checkpoint's content (a rank given other arguments or another file makes all fail alike);
    the tensors are shared by distributed.balance over their cost per MU iteration, k m n r
    (for magnitude, m n).
    """
    shapes = [e.shape for e in pruned]
    numels = [math.prod(s) for s in shapes]
    share = launch.split(numels if settings is None else settings.costs(shapes))
    if launch.world == 1:
        return share
    check_floors(numels, allocation.sparsity, allocation.scope, None)
    launch.start()
    same = (settings, allocation, [(e.name, e.shape, e.dtype) for e in pruned])
    launch.compare(repr(same), "was given other arguments or another checkpoint than")
    if not launch.same(checkpoint.identity()):  # not one file on one host: compare the bytes
        launch.compare(checkpoint.digest(), "reads a checkpoint with the same header but other "
                       "content than")  # fmt: skip
    return share
