"""ong-mask: ONG or magnitude masks for a safetensors checkpoint, without loading the model.

    ong-mask model.safetensors --method ong --sparsity 0.5 --rank 64 -o masks.safetensors
    ong-mask model.safetensors.index.json ...   (a sharded checkpoint: the index or its folder)

The command line only: it parses, calls pruning.checkpoint.checkpoint_masks (which reads the
tensors lazily, scores, allocates with one global threshold and writes the masks file; see
there) and prints. Under torchrun (``torchrun --nproc-per-node N ong-mask ...``) every rank
runs it; rank 0 prints and writes (pruning.distributed.Launch).

What is pruned by default: every tensor of 2 or more dimensions with a floating dtype whose
name does not match DEFAULT_EXCLUDE (embeddings and norms). 1-D tensors (biases, norm scales)
are never pruned; a 2-D+ tensor of another dtype is skipped with a note. ``--include`` keeps
only names matching it; ``--exclude`` replaces DEFAULT_EXCLUDE.

Exit codes: 0 done, 1 the masks file could not be written (the old one is kept), 2 a usage
error or what the data make impossible (one line, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from ong_kernels._validate import check_device
from ong_kernels._version import cli_parser
from ong_kernels.pruning.checkpoint import (
    DEFAULT_EXCLUDE,
    STREAMED,
    Allocation,
    BudgetError,
    Checkpoint,
    check_output,
    checkpoint_masks,
    method_settings,
    peak_mib,
    select,
)
from ong_kernels.pruning.distributed import Launch

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = cli_parser(
        prog="ong-mask",
        description="ONG or magnitude masks of a safetensors checkpoint at an exact sparsity.",
        epilog=f"Default: every 2-D+ floating tensor whose name does not match {DEFAULT_EXCLUDE!r} "
        "(embeddings, norms); 1-D tensors are never pruned.",
    )
    p.add_argument("checkpoint", help="a .safetensors file, or a sharded checkpoint's "
                   "model.safetensors.index.json or its folder")  # fmt: skip
    p.add_argument("--method", choices=STREAMED, default="ong",
                   help="ong-consensus: ong with 8 random restarts by default")  # fmt: skip
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
        default=None,
        help="consensus ONG: score by the mean W H of this many random starts (seeds SEED, "
        "SEED+1, ...), all solved in the same streamed groups (default: 1; 8 for "
        "ong-consensus)",
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


class _Usage(Exception):
    """A one-line error, exit code 2."""


def _settings(args):
    """The method's resolved settings (before --dry-run: a bad --rank is refused there too)."""
    if args.method == "magnitude":
        if args.restarts not in (None, 1):
            raise _Usage(f"--restarts {args.restarts} needs --method ong")
        return None
    return method_settings(args.method, rank=args.rank, max_iter=args.max_iter, tol=args.tol,
                           init=args.init, seed=args.seed, restarts=args.restarts,
                           backend=args.backend)  # fmt: skip


def _plan(args):
    """(checkpoint, pruned entries, settings, allocation): every check before any work."""
    if not args.output and not args.dry_run:
        raise _Usage("-o/--output is required (or --dry-run)")
    checkpoint = Checkpoint.open(args.checkpoint)
    try:
        allocation = Allocation(args.sparsity, args.scope).checked()
    except (TypeError, ValueError) as err:
        raise _Usage(f"--sparsity: {err}") from None
    check_device(args.device, "--device")
    problem = args.output and check_output(args.output, checkpoint)
    if problem:
        raise _Usage(problem)
    try:
        pruned, skipped = select(checkpoint.entries, args.include, args.exclude)
    except re.error as exc:
        raise _Usage(f"bad --include/--exclude regex: {exc}") from None
    for name, reason in skipped:
        if "not floating" in reason:
            print(f"note: {name}: {reason}", file=sys.stderr)
    if not pruned:
        raise _Usage("no tensor to prune (see --include/--exclude)")
    settings = _settings(args)
    total = sum(math.prod(e.shape) for e in pruned)
    print(
        f"{len(pruned)} tensors, {total:,} weights to prune at sparsity {args.sparsity} "
        f"({args.scope}); {len(skipped)} skipped"
    )
    if args.dry_run:
        for e in pruned:
            shape, n = list(e.shape), math.prod(e.shape)
            print(f"  prune {e.name:50s} {e.dtype:5s} {shape!s:20s} {n:>14,}")
        for name, reason in skipped:
            print(f"  skip  {name:50s} {reason}")
    return checkpoint, pruned, settings, allocation


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


def run(args, launch: Launch) -> int:
    checkpoint, pruned, settings, allocation = _plan(args)
    if args.dry_run:
        return 0
    try:
        report = checkpoint_masks(
            checkpoint, pruned, args.method, settings, allocation, launch, args.output,
            device=args.device,
            memory_budget=args.memory_budget, progress=_show_progress(args.no_progress),
        )  # fmt: skip
    except OSError as exc:  # the write failed: the old file, if any, is untouched
        print(f"ong-mask: error: {exc}; {args.output!r} is unchanged", file=sys.stderr)
        return 1
    if launch.rank == 0:
        _summary(report, args)
    return 0


def _summary(report, args) -> None:
    print(f"\n{'layer':50s} {'shape':>20s} {'sparsity':>9s} {'time s':>8s} {'peak MiB':>9s}")
    for name, shape, n, kept, secs, peak, _ in report.rows:
        print(f"{name:50s} {list(shape)!s:>20s} {1 - kept / n:9.4f} {secs:8.2f} {peak:9.0f}")
    n = sum(r[2] for r in report.rows)
    kept = sum(r[3] for r in report.rows)
    print(f"{'total':50s} {n:>20,} {1 - kept / n:9.4f} {report.total_s:8.2f} {peak_mib():9.0f}")
    print(
        f"scoring ({args.method}) {report.scored_s:.2f} s; per-layer time is its mask pass (the "
        f"first row includes the global threshold passes); masks in {args.output}"
    )
    if str(args.device).startswith("cuda"):
        import torch

        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if len(report.ranks) > 1:
        print(f"\n{'rank':>4s} {'tensors':>8s} {report.cost:>8s} {'scoring s':>10s} "
              f"{'total s':>8s} {'peak MiB':>9s}")  # fmt: skip
        for r, (count, cost, scored, total, peak) in enumerate(report.ranks):
            print(f"{r:4d} {count:8d} {cost:8.1%} {scored:10.2f} {total:8.2f} {peak:9.0f}")
    if report.agreement is not None:
        a, k = report.agreement, report.agreement.restarts
        print(
            f"restarts: {k} (init random, seeds {args.seed}..{args.seed + k - 1}); agreement "
            f"(IoU of each restart's own mask, at the consensus per-layer counts, with the "
            f"consensus mask): mean {a.mean:.4f}, lowest restart {min(a.per_restart):.4f}"
        )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        launch = Launch.from_env(args.dist_timeout)
    except ValueError as exc:
        print(f"ong-mask: error: {exc}", file=sys.stderr)
        return 2
    with launch.session():
        try:
            return run(args, launch)
        except BudgetError as err:
            print(f"ong-mask: error: {err.advice('--memory-budget', '--rank')}", file=sys.stderr)
        except OSError as err:  # a checkpoint that is missing or cannot be read
            print(f"ong-mask: error: {err}", file=sys.stderr)
        except (_Usage, ValueError, TypeError, RuntimeError) as err:
            print(f"ong-mask: error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\nong-mask: interrupted", file=sys.stderr)
            return 130
        return 2


if __name__ == "__main__":
    sys.exit(main())
