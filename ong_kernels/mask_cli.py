"""ong-mask: ONG or magnitude masks for a safetensors checkpoint, without loading the model.

    ong-mask model.safetensors --method ong --sparsity 0.5 --rank 64 -o masks.safetensors

Tensors are read lazily, one at a time (a fresh ``safe_open`` per tensor: its memory map is
released after each read, so resident memory stays O(largest tensor + one NMF group), not
O(checkpoint)). ONG factorises |W| of every pruned tensor with nmf_batched's streaming
(groups that fit ``--memory-budget`` on ``--device``), keeps only the factors, and allocates
with pruning.stream.stream_masks: exactly the masks prune() would give for the same weights
(round(sparsity * N) pruned, ties by position). Masks are written bit-packed in the format of
pruning.io.save_masks (format version 2: _bitmask's bit order, shapes in the metadata):
load_masks reads them.

What is pruned by default: every tensor of 2 or more dimensions with a floating dtype whose
name does not match DEFAULT_EXCLUDE (embeddings and norms). 1-D tensors (biases, norm scales)
are never pruned; a 2-D+ tensor of another dtype is skipped with a note. ``--include`` keeps
only names matching it; ``--exclude`` replaces DEFAULT_EXCLUDE.

Under torchrun (``torchrun --nproc-per-node N ong-mask ...``, one or several hosts), each rank
reads and factorises a share of the tensors (distributed.balance over the MU cost m n r, the
split prune() uses) on its own device (``--device cuda`` is cuda:LOCAL_RANK), the exact global
threshold comes from all-reduced radix-select histograms (stream_masks' ``owned=``), and rank 0
gathers the bit-packed masks and writes the file: the same masks as one process. See _Dist.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import math
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open

DEFAULT_EXCLUDE = r"(?i)(embed|wte|wpe|lm_head|norm|ln_)"
_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str) -> int:
    """'8GB' (10^9), '256MiB' (2^20), '1.5GB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"memory budget must be a size like 8GB, 256MiB or 1000000, got {text!r}"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"memory budget must be positive, got {text!r}")
    return value


def _restarts(text: str) -> int:
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ong-mask",
        description="ONG or magnitude masks of a safetensors checkpoint at an exact sparsity.",
        epilog=f"Default: every 2-D+ floating tensor whose name does not match {DEFAULT_EXCLUDE!r} "
        "(embeddings, norms); 1-D tensors are never pruned.",
    )
    p.add_argument("checkpoint", help="a .safetensors file")
    p.add_argument("--method", choices=("ong", "magnitude"), default="ong")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned, in [0, 1)")
    p.add_argument("--rank", type=int, default=64, help="NMF rank (clipped to min(m, n))")
    p.add_argument("--scope", choices=("global", "layer"), default="global")
    p.add_argument("--include", default=None, help="prune only names matching this regex")
    p.add_argument("--exclude", default=DEFAULT_EXCLUDE, help="never prune names matching it")
    p.add_argument("--device", default="cpu", help="where the NMF runs (cpu, cuda, cuda:1)")
    p.add_argument(
        "--memory-budget",
        type=parse_bytes,
        default=None,
        help="bytes per NMF group on --device, e.g. 8GB (default: 80%% of free)",
    )
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument(
        "--init",
        choices=("nndsvda", "nndsvd", "random"),
        default=None,
        help="NMF start (default: nndsvda; random with --restarts > 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--restarts",
        type=_restarts,
        default=1,
        help="consensus ONG: score by the mean W H of this many random starts (seeds SEED, "
        "SEED+1, ...), all solved in the same streamed groups (default: 1)",
    )
    p.add_argument("--backend", default="auto")
    p.add_argument("-o", "--output", help="masks file to write (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print what would be pruned; no work")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--dist-timeout",
        type=_positive_seconds,
        default=3600.0,
        help="under torchrun: seconds a rank waits for the others at a collective (the slowest "
        "share's NMF included) before it gives up (default 3600)",
    )
    return p


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _header(path: str):
    """[(name, shape, dtype string)] in file order, without reading any tensor."""
    with safe_open(path, framework="pt") as f:
        entries = []
        for name in f.keys():
            sl = f.get_slice(name)
            entries.append((name, tuple(sl.get_shape()), sl.get_dtype()))
    return entries


def select(entries, include: str | None, exclude: str | None):
    """(pruned [(name, shape, dtype)], skipped [(name, reason)])."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    pruned, skipped = [], []
    for name, shape, dtype in entries:
        if len(shape) < 2:
            skipped.append((name, f"{len(shape)}-D: never pruned"))
        elif inc is not None and not inc.search(name):
            skipped.append((name, "not matched by --include"))
        elif exc is not None and exc.search(name):
            skipped.append((name, "matched by --exclude"))
        elif dtype not in _FLOAT:
            skipped.append((name, f"dtype {dtype} is not floating: skipped"))
        elif math.prod(shape) == 0:
            skipped.append((name, "empty"))
        else:
            pruned.append((name, shape, dtype))
    return pruned, skipped


def _read(path: str, name: str) -> torch.Tensor:
    # A fresh safe_open per tensor: its memory map (resident pages count in RSS) goes with it.
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _check_output(output: str, checkpoint: str) -> str | None:
    """Why the masks cannot be written to ``output``, or None; checked before any work.

    Refused: the checkpoint itself by any path (relative, absolute, symlink, hard link: same
    resolved path or same st_dev/st_ino), a folder, something that is not a regular file, a
    read-only file, a missing folder, a folder this process cannot create files in.
    """
    if os.path.lexists(output):
        same = os.path.realpath(output) == os.path.realpath(checkpoint)
        if os.path.exists(output):
            a, b = os.stat(output), os.stat(checkpoint)
            same = same or (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        if same:
            return f"-o {output!r} is the checkpoint {checkpoint!r}; write the masks elsewhere"
        if os.path.isdir(output):
            example = os.path.join(output, "masks.safetensors")
            return f"-o {output!r} is a folder; give a file name, e.g. -o {example}"
        if os.path.exists(output) and not os.path.isfile(output):
            return f"-o {output!r} exists and is not a regular file"
        if os.path.isfile(output) and not os.access(output, os.W_OK):
            return f"-o {output!r} is read-only; not replacing it"
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        return f"-o {output!r}: folder {folder!r} does not exist"
    try:  # the masks go to a temporary file there first (renamed when complete)
        fd, probe = tempfile.mkstemp(prefix=".ong-mask.", suffix=".tmp", dir=folder)
    except OSError as err:
        return f"-o {output!r}: cannot create files in {folder!r} ({err.strerror})"
    os.close(fd)
    os.unlink(probe)
    return None


def _check_device(text: str) -> str | None:
    """Why ``--device`` cannot run the NMF here, or None (one line)."""
    from ong_kernels._validate import check_device

    try:
        check_device(text, "--device")
    except ValueError as err:
        return str(err)
    return None


def _check_sparsity(value: float) -> str | None:
    """The allocation's own check, here before the scoring instead of after it."""
    from ong_kernels.pruning.allocation import check_sparsity

    try:
        check_sparsity(value)
    except (TypeError, ValueError) as err:
        return f"--sparsity: {err}"
    return None


def _check_budget(pruned, args, memory_budget: int | None) -> str | None:
    """The first tensor whose NMF cannot fit --memory-budget, named, before any tensor is
    read (the streaming finds it only when it gets there, after scoring all before it), by the
    streaming's own cost model (nmf_groups.group_bytes with the selected kernel's workspace)."""
    from ong_kernels.backends import registry
    from ong_kernels.nmf_groups import Item, check_budget, format_bytes, group_bytes
    from ong_kernels.pruning.ong import resolve_ranks, restart_init

    if args.method != "ong":
        return None
    try:  # --init's default depends on --restarts
        init = restart_init(args.init, args.restarts)
    except ValueError as err:
        return str(err)
    device = torch.device(args.device)
    try:
        budget = check_budget(memory_budget, device)
    except ValueError:
        return None  # no default budget on this device type: the streaming says so
    try:
        kernel = registry.select("nmf_mu", device.type, args.backend)
    except (ValueError, RuntimeError) as err:
        return str(err)
    ranks = resolve_ranks(args.rank, [shape for _, shape, _ in pruned])
    for i, ((name, shape, dtype), r) in enumerate(zip(pruned, ranks, strict=True)):
        item = Item(i, torch.empty(shape, dtype=_FLOAT[dtype], device="meta"), r)
        need = group_bytes([item], kernel, init)
        if need > budget:
            return (
                f"{name} (shape {list(shape)}, rank {r}) needs {format_bytes(need)} on {device} "
                f"for its NMF with the {kernel.backend} kernel, more than the memory budget "
                f"{format_bytes(budget)}: raise --memory-budget or lower --rank"
            )
    return None


def _show_progress(off: bool) -> bool:
    """A bar only on a terminal, as in the trainer (in a log file tqdm's redraws pile up),
    and only with tqdm (the [train] extra) installed; without it, a note."""
    if off or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        print(
            "note: no progress bar: it needs tqdm (pip install 'ong_kernels[train]')",
            file=sys.stderr,
        )
        return False
    return True


def run(args, ctx: _Dist | None = None) -> int:
    ctx = _Dist.from_env() if ctx is None else ctx
    path = args.checkpoint
    if not os.path.isfile(path):
        print(f"ong-mask: error: {path!r} does not exist or is not a file", file=sys.stderr)
        return 2
    if not args.output and not args.dry_run:
        print("ong-mask: error: -o/--output is required (or --dry-run)", file=sys.stderr)
        return 2
    problem = (
        _check_sparsity(args.sparsity)
        or _check_device(args.device)
        or (args.output and _check_output(args.output, path))
    )
    if problem:
        print(f"ong-mask: error: {problem}", file=sys.stderr)
        return 2
    try:
        entries = _header(path)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        print(
            f"ong-mask: error: {path!r} is not a readable safetensors file ({exc})", file=sys.stderr
        )
        return 2
    try:
        pruned, skipped = select(entries, args.include, args.exclude)
    except re.error as exc:
        print(f"ong-mask: error: bad --include/--exclude regex: {exc}", file=sys.stderr)
        return 2
    for name, reason in skipped:
        if "not floating" in reason:
            print(f"note: {name}: {reason}", file=sys.stderr)
    if not pruned:
        print("ong-mask: error: no tensor to prune (see --include/--exclude)", file=sys.stderr)
        return 2
    names = [n for n, _, _ in pruned]
    shapes = [s for _, s, _ in pruned]
    total = sum(math.prod(s) for s in shapes)
    print(
        f"{len(pruned)} tensors, {total:,} weights to prune at sparsity {args.sparsity} "
        f"({args.scope}); {len(skipped)} skipped"
    )
    if args.dry_run:
        for name, shape, dtype in pruned:
            print(f"  prune {name:50s} {dtype:5s} {list(shape)!s:20s} {math.prod(shape):>14,}")
        for name, reason in skipped:
            print(f"  skip  {name:50s} {reason}")
        return 0
    problem = _check_budget(pruned, args, ctx.budget(args))
    if problem:
        print(f"ong-mask: error: {problem}", file=sys.stderr)
        return 2
    from ong_kernels._bitmask import pack_mask
    from ong_kernels.nmf import Solver
    from ong_kernels.nmf_groups import Streaming
    from ong_kernels.pruning import stream
    from ong_kernels.pruning.io import write_mask_file
    from ong_kernels.pruning.ong import restart_init

    progress = _show_progress(args.no_progress)
    start = time.perf_counter()

    def weights() -> Iterator[torch.Tensor]:
        for i in ctx.share:
            yield _read(path, names[i])

    try:
        restarts = args.restarts
        share = _rank_share(ctx, args, entries, names, shapes)
        if args.method == "ong":
            init = restart_init(args.init, restarts)
            solver = Solver(args.max_iter, args.tol, init, args.seed, args.backend)
            streaming = Streaming(ctx.device(args.device), ctx.budget(args), ctx.progress(progress))
            mine = [shapes[i] for i in share]
            total = sum(math.prod(s) for s in mine)  # this rank's (all of them in one process)

            def factorise():
                if not mine:  # more ranks than tensors
                    return []
                return stream.ong_factors(
                    weights(), args.rank, solver, streaming, total, restarts, len(mine),
                    names=[names[i] for i in share],
                )  # fmt: skip

            factors = ctx.local(factorise)
            passes = stream.ong_score_passes(factors, mine, restarts)
            # A float64 tensor outside float32's range has float64 factors and scores
            # (nmf_rules.factor_dtype); float32 scores rank the same in float64.
            dtype = torch.float64 if any(d == "F64" for _, _, d in pruned) else torch.float32
        else:
            if restarts > 1:
                raise ValueError(f"--restarts {restarts} needs --method ong")

            def passes():
                return (w.abs() for w in weights())

            wide = any(d == "F64" for _, _, d in pruned)
            dtype = torch.float64 if wide else torch.float32
        scored = time.perf_counter() - start

        def pack():
            masks = stream.stream_masks(
                passes, shapes, args.sparsity, args.scope, names=names, dtype=dtype, **ctx.owned()
            )
            packed, rows = {}, []
            t0 = time.perf_counter()
            for pos, (i, mask) in enumerate(zip(share, masks, strict=True)):
                name, shape = names[i], shapes[i]
                mask = mask.cpu().contiguous()
                packed[name] = pack_mask(mask)  # pruning.io's codec (format version 2)
                overlaps = None
                if restarts > 1:  # each restart alone against the consensus mask
                    pairs = factors[pos * restarts : (pos + 1) * restarts]
                    overlaps = stream.restart_overlaps(pairs, mask)
                kept = int(mask.sum())
                flat = mask.reshape(-1)
                t1 = time.perf_counter()
                rows.append((name, shape, flat.numel(), kept, t1 - t0, _peak_mib(), overlaps))
                t0 = t1
            return packed, rows

        packed, rows = ctx.local(pack)
        packed, rows = ctx.gather(packed, rows, names, shapes, scored, start)
        layout = dict(zip(names, shapes, strict=True))
        # Rank 0 writes: a temporary file in the target folder, renamed when complete.
        ctx.on_rank_0(lambda: write_mask_file(args.output, packed, layout))
    except OSError as exc:  # the write failed: the old file, if any, is untouched
        print(f"ong-mask: error: {exc}; {args.output!r} is unchanged", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"ong-mask: error: {exc}", file=sys.stderr)
        return 2
    if ctx.rank == 0:
        _summary(rows, scored, time.perf_counter() - start, args)
        ctx.summary()
        if restarts > 1:
            _stability(rows, restarts, args.seed)
    return 0
    return 0


def _stability(rows, restarts: int, seed: int) -> None:
    """One line: how well the --restarts agree with their consensus mask (rows[i][6]: each
    restart's (intersection, union) with layer i's mask, from pruning.ong.restart_overlaps)."""
    from ong_kernels.pruning.ong import Agreement

    agreement = Agreement.from_overlaps([r[6] for r in rows])
    print(
        f"restarts: {restarts} (init random, seeds {seed}..{seed + restarts - 1}); agreement "
        f"(IoU of each restart's own mask, at the consensus per-layer counts, with the "
        f"consensus mask): mean {agreement.mean:.4f}, lowest restart "
        f"{min(agreement.per_restart):.4f}"
    )


def _summary(rows, scored: float, elapsed: float, args) -> None:
    print(f"\n{'layer':50s} {'shape':>20s} {'sparsity':>9s} {'time s':>8s} {'peak MiB':>9s}")
    for name, shape, n, kept, secs, peak, _ in rows:
        print(f"{name:50s} {list(shape)!s:>20s} {1 - kept / n:9.4f} {secs:8.2f} {peak:9.0f}")
    n = sum(r[2] for r in rows)
    kept = sum(r[3] for r in rows)
    print(f"{'total':50s} {n:>20,} {1 - kept / n:9.4f} {elapsed:8.2f} {_peak_mib():9.0f}")
    print(
        f"scoring ({args.method}) {scored:.2f} s; per-layer time is its mask pass (the first "
        f"row includes the global threshold passes); masks in {args.output}"
    )
    if torch.cuda.is_available() and str(args.device).startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


# ----------------------------------------------------------------------------- torchrun


class _Dist:
    """This process's part of a torchrun launch; rank 0 of 1, talking to no one, without one.

    Under torchrun (RANK and WORLD_SIZE > 1 in the environment) every rank checks the arguments
    and the checkpoint header identically before any communication (so a bad command fails on
    every rank alike), then starts a gloo process group (env://, `--dist-timeout`): only the
    histograms (65537 int64 per pass), per-layer counts and at the end the bit-packed masks
    travel, so gloo serves CUDA ranks too. Where one rank can fail alone (reading and
    factorising its share, its mask pass, rank 0's write) distributed.agree makes every rank
    raise that error instead of leaving the others waiting. An already started process group
    (ong-mask called from a distributed script) is used as it is and left open.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1):
        self.rank, self.world = rank, world
        self.local_rank, self.local_world = local_rank, local_world
        self.costs: list[int] = []  # what each costs: MU flops / iteration, or weights
        self.cost = "MU cost"  # the summary's name for it
        self.owner: list[int] = []  # rank of each
        self.share: list[int] = []  # the tensors this rank reads and scores
        self.close = False  # whether this process started the process group
        self.stats: list = []  # per rank (after gather): tensors, MU cost, times, peak

    @classmethod
    def from_env(cls) -> _Dist:
        started = dist.is_available() and dist.is_initialized()
        env = os.environ
        if not started and ("RANK" not in env or "WORLD_SIZE" not in env):
            return cls()
        try:
            values = [int(env.get(k, d)) for k, d in _ENV]
        except ValueError:
            raise ValueError(
                "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (torchrun "
                "sets them)"
            ) from None
        if started:
            values[:2] = dist.get_rank(), dist.get_world_size()
        return cls(*values) if values[1] > 1 else cls()

    @contextlib.contextmanager
    def session(self):
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

    def start(self, timeout_s: float) -> None:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
            self.close = True
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world):
            raise ValueError("RANK / WORLD_SIZE disagree with the started process group")

    # What this rank computes with.
    def device(self, device: str) -> str:
        return f"cuda:{self.local_rank}" if self.world > 1 and device == "cuda" else device

    def budget(self, args) -> int | None:
        """--memory-budget; without one, ranks sharing a host's memory split its default."""
        if args.memory_budget is not None or self.world == 1:
            return args.memory_budget
        device = torch.device(self.device(args.device))
        if device.type != "cpu":
            return None  # each rank has its own GPU
        from ong_kernels.nmf_groups import check_budget

        return max(1, check_budget(None, device) // self.local_world)

    def progress(self, progress: bool) -> bool:
        return progress and self.rank == 0  # one bar (rank 0's share), not N interleaved

    def owned(self) -> dict:
        return {"owned": self.share} if self.world > 1 else {}

    # Agreement points.
    def local(self, fn: Callable):
        """fn() on this rank; a failure on any rank raises on every rank."""
        if self.world == 1:
            return fn()
        from ong_kernels.pruning.distributed import agree

        return agree(fn)

    def on_rank_0(self, fn: Callable) -> None:
        self.local(fn if self.rank == 0 else lambda: None)

    def gather(self, packed: dict, rows: list, names, shapes, scored: float, start: float):
        """Rank 0: every tensor's packed mask and summary row, in file order (None elsewhere).
        Other ranks send their masks as one uint8 message each: rank 0 ends up holding what
        it would hold alone (one bit per weight)."""
        if self.world == 1:
            return packed, rows
        cost = sum(self.costs[i] for i in self.share) / max(1, sum(self.costs))
        mine = (len(self.share), cost, scored, time.perf_counter() - start, _peak_mib())
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object((rows, mine), gathered, dst=0)
        if self.rank:
            if self.share:
                dist.send(torch.cat([packed[names[i]] for i in self.share]), dst=0)
            return None, None
        by_index = {}
        for r, (rank_rows, stats) in enumerate(gathered):
            self.stats.append(stats)
            idx = [i for i, o in enumerate(self.owner) if o == r]
            by_index.update(zip(idx, rank_rows, strict=True))
            if r and idx:
                sizes = [(math.prod(shapes[i]) + 7) // 8 for i in idx]
                buffer = torch.empty(sum(sizes), dtype=torch.uint8)
                dist.recv(buffer, src=r)
                packed.update(zip((names[i] for i in idx), buffer.split(sizes), strict=True))
        return {n: packed[n] for n in names}, [by_index[i] for i in range(len(names))]

    def summary(self) -> None:
        if self.world == 1:
            return
        print(f"\n{'rank':>4s} {'tensors':>8s} {self.cost:>8s} {'scoring s':>10s} {'total s':>8s} "
              f"{'peak MiB':>9s}")  # fmt: skip
        for r, (count, cost, scored, total, peak) in enumerate(self.stats):
            print(f"{r:4d} {count:8d} {cost:8.1%} {scored:10.2f} {total:8.2f} {peak:9.0f}")


_ENV = (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1))


def _rank_share(ctx: _Dist, args, entries, names, shapes) -> list[int]:
    """The indices of the tensors this rank reads and scores: all of them in one process.

    Under torchrun: first the checks every rank makes alike (before any communication), then
    the process group, then one comparison of every rank's command and checkpoint header (a
    rank given other arguments or another file makes all fail alike); the tensors are shared
    by distributed.balance over their cost per MU iteration, m n r (for magnitude, m n).
    """
    if ctx.world == 1:
        ctx.share = list(range(len(shapes)))
        return ctx.share
    from ong_kernels.nmf import Solver
    from ong_kernels.pruning.allocation import check_floors, check_scope, check_sparsity
    from ong_kernels.pruning.distributed import balance
    from ong_kernels.pruning.ong import resolve_ranks, restart_init

    numels = [math.prod(s) for s in shapes]
    check_floors(numels, check_sparsity(args.sparsity), check_scope(args.scope), None)
    if args.method == "ong":
        init = restart_init(args.init, args.restarts)  # --init's default depends on --restarts
        Solver(args.max_iter, args.tol, init, args.seed, args.backend).checked()
        ranks = resolve_ranks(args.rank, shapes)
    else:
        ranks = [1] * len(shapes)
        ctx.cost = "weights"
    ctx.costs = [n * r for n, r in zip(numels, ranks, strict=True)]
    ctx.owner = balance(ctx.costs, ctx.world)
    ctx.share = [i for i, r in enumerate(ctx.owner) if r == ctx.rank]
    ctx.start(args.dist_timeout)
    local = {k: v for k, v in vars(args).items() if k not in _PER_RANK}
    digest = hashlib.sha256(repr((sorted(local.items()), entries)).encode()).hexdigest()
    digests = [None] * ctx.world
    dist.all_gather_object(digests, digest)
    other = next((r for r, d in enumerate(digests) if d != digests[0]), None)
    if other is not None:
        raise ValueError(
            f"rank {other} was given other arguments or another checkpoint than rank 0: run the "
            "same ong-mask command on the same file on every rank"
        )
    return ctx.share


# Arguments that may differ between ranks: where each finds the file and computes, what it
# shows; the output is written by rank 0 alone.
_PER_RANK = ("checkpoint", "output", "device", "no_progress", "dist_timeout")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ctx = _Dist.from_env()
    except ValueError as exc:
        print(f"ong-mask: error: {exc}", file=sys.stderr)
        return 2
    with ctx.session():
        return run(args, ctx)


if __name__ == "__main__":
    sys.exit(main())
