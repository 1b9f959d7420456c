"""The main job (``make run``): the ONG paper's question, is ONG comparable to the stable
sparsification methods at the same training budget?

ResNet-20 on Fashion-MNIST trained dense, pruned at initialisation by ONG and by magnitude,
and sparsified during training by GMP (gradual magnitude pruning) and budgeted IMP (BIMP),
at 90% and 98% sparsity, the same epochs for every run; one table (final accuracy, BIMP's
protocol columns, measured sparsity, time per run, images/s) printed and written to
``main_job.md``, and the accuracy-vs-sparsity plot of the sweep.

    python -m ong_kernels.train.main_job [--epochs E] [--train-subset N] [--out-dir DIR]

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (or ``--data-dir``),
so nothing is downloaded. The defaults are sized to finish within 10 minutes on a 2-core
CPU (see DEFAULT_* below for the measurement); the output says how much was cut, counted
from the data actually loaded. The runs share everything but the pruning: seed, data
order, augmentation, schedule. The full-data
and paper-scale runs use ``ong-train`` / ``ong-sweep`` (ong_kernels/train/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from .._version import cli_parser
from .checkpoint import CheckpointError, RunFolderError, atomic_write, check_writable_folder
from .config import METHODS as REGISTERED
from .config import TrainConfig
from .data import DatasetError, load_dataset
from .distributed import resolve_device
from .report import format_table
from .sweep import check_workers, run_sweep

# Budget: 10 minutes for `make run` on a 2-core CPU, install included (~2-3 minutes when
# the venv is new). 9 runs (dense, then ONG, magnitude, GMP and BIMP at 90% and 98%) train
# two at a time, one process and one thread each (sweep.run_sweep's workers). GMP and BIMP
# add one radix-select cut per epoch (~10 ms on ResNet-20), nothing per step. Measured
# before GMP/BIMP were added (7 runs, random instead of GMP/BIMP): Throughput measured
# on this shared box: 175-300 training images/s per single-thread run (ResNet-20, 28x28)
# with one core free, evaluation ~3x faster per image; with 4,000 images and both cores
# taken by other work (a niced sweep, a test run, other users) 60-80 images/s: the 7 runs
# took 1143 s. Hence 3,000 training images x 3 epochs and 3 evaluations of 2,000 test
# images: ~45 s per run on a free core, 4 rounds of 2 runs; ~145 s per run (~10 min in
# all) at the heavily loaded rate.
DEFAULT_TRAIN_SUBSET = 3_000
DEFAULT_TEST_SUBSET = 2_000
DEFAULT_EPOCHS = 3
DEFAULT_SPARSITIES = (0.9, 0.98)
# GMP and BIMP at their registry defaults for 3 epochs: GMP cuts after epochs 1 and 2 (the
# goal reached at epoch 2); BIMP trains dense for 1 epoch (half the run, lr 0.1 -> 0), then
# cuts after epochs 1 and 2, each followed by a triangular lr cycle.
METHODS = ("dense", "ong", "magnitude", "gmp", "bimp")
BUDGET_S = 600

COLUMNS = [
    ("method", "method"),
    ("sparsity", "sparsity"),
    ("epochs", "epochs"),
    ("measured", "measured sparsity"),
    ("before_cut", "sparsity before final cut"),
    ("after_cut", "test acc after cut (%)"),
    ("test_acc", "final test acc (%)"),
    ("train_time", "train time / run"),
    ("images_per_s", "train images/s"),
]


def table_row(results: dict) -> dict:
    """One run as a row of :data:`COLUMNS`."""
    cfg = results["config"]
    before, after = results.get("sparsity_before_cut"), results.get("test_acc_after_cut")
    return {
        "method": cfg["method"],
        "sparsity": f"{cfg['sparsity']:g}",
        "epochs": results.get("budget_epochs", results["epochs_completed"]),
        "measured": f"{results['measured_sparsity']:.4f}",
        "before_cut": "" if before is None else f"{before:.4f}",
        "after_cut": "" if after is None else f"{after:.2f}",
        "test_acc": results["test_acc"],
        "train_time": f"{results['train_time_s']:.0f}s",
        "images_per_s": f"{results['images_per_s']:.0f}",
    }


def build_parser() -> argparse.ArgumentParser:
    p = cli_parser(
        prog="python -m ong_kernels.train.main_job",
        description="Train ResNet-20 on Fashion-MNIST dense, pruned at initialisation by ONG "
        "and magnitude, and sparsified during training by GMP and budgeted IMP, at the same "
        "sparsities and epochs, and print one comparison table (also written to main_job.md) "
        "and an accuracy-vs-sparsity plot.",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder with the four Fashion-MNIST IDX .gz files "
        "(default: /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--train-subset",
        type=int,
        default=DEFAULT_TRAIN_SUBSET,
        metavar="N",
        help=f"train on the first N training images, 0 for all (default: {DEFAULT_TRAIN_SUBSET})",
    )
    p.add_argument(
        "--test-subset",
        type=int,
        default=DEFAULT_TEST_SUBSET,
        metavar="N",
        help=f"evaluate on the first N test images, 0 for all (default: {DEFAULT_TEST_SUBSET})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"epochs per run (default: {DEFAULT_EPOCHS})",
    )
    p.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=list(DEFAULT_SPARSITIES),
        help=f"sparsities of the pruned runs (default: {' '.join(map(str, DEFAULT_SPARSITIES))})",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=REGISTERED,
        default=list(METHODS),
        help=f"methods to compare (default: {' '.join(METHODS)})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs trained at once in separate processes, one thread each (default: 2 on "
        "CPU, one run per core of the 2-core machine; 1 on a GPU)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        metavar="DIR",
        help="where the run folders, main_job.md and the plot go (default: "
        "runs/main-job-<time>); an existing folder is continued",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _fraction(used: int, total: int, what: str) -> str:
    return f"all {total:,} {what}" if used == total else f"the first {used:,} of {total:,} {what}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    start = time.perf_counter()
    try:
        base = TrainConfig(
            model="resnet20",
            dataset="fashion-mnist",
            data_dir=args.data_dir,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            epochs=args.epochs,
            batch_size=128,
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-4,
            schedule="cosine",
            method="dense",
            seed=args.seed,
            device=args.device,
            progress=args.progress,
        )
        on_cpu = resolve_device(base.device, 0).type == "cpu"
        workers = args.workers if args.workers is not None else (2 if on_cpu else 1)
        check_workers(workers, base.device)
    except (ValueError, TypeError) as err:
        print(f"main_job: error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir or f"runs/main-job-{datetime.now():%Y%m%d-%H%M%S}")
    try:
        check_writable_folder(out_dir)  # before the data is loaded: nothing is lost later
    except RunFolderError as err:
        print(f"main_job: error: {err}", file=sys.stderr)
        return 1
    try:
        # Loaded here for the counts it prints; in-process runs (workers=1) reuse it.
        dataset = load_dataset(base.dataset, base.data_dir)
    except DatasetError as err:
        print(f"main_job: error: {err}", file=sys.stderr)
        return 1
    n_train, n_test = len(dataset.train_y), len(dataset.test_y)
    train = _fraction(min(base.train_subset or n_train, n_train), n_train, "training images")
    test = _fraction(min(base.test_subset or n_test, n_test), n_test, "test images")
    sparsities = ", ".join(f"{s:.0%}" for s in args.sparsities)
    print(
        f"Main job: ResNet-20 on Fashion-MNIST; {', '.join(args.methods)} at {sparsities} "
        f"sparsity, {args.epochs} epochs each.\nShortened to fit {BUDGET_S // 60} minutes on "
        f"a 2-core CPU: {train}, {args.epochs} epochs, evaluated on {test}.\n"
        "Full-data and multi-seed runs: ong-sweep (README.md, benchmarks/RESULTS.md).\n"
        f"Runs go to {out_dir}.\n",
        flush=True,
    )
    try:
        summary = run_sweep(
            base,
            methods=args.methods,
            sparsities=args.sparsities,
            seeds=[args.seed],
            out_dir=out_dir,
            workers=workers,
            threads_per_worker=1 if workers > 1 else None,
            dataset=dataset,
            command=[
                "python",
                "-m",
                "ong_kernels.train.main_job",
                *(sys.argv[1:] if argv is None else argv),
            ],
        )
    except (ValueError, TypeError) as err:  # bad sparsities/methods, changed run folders
        print(f"main_job: error: {err}", file=sys.stderr)
        return 2
    except (DatasetError, CheckpointError, RunFolderError) as err:
        print(f"main_job: error: {err}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    table = format_table([table_row(r) for r in summary.runs], COLUMNS)
    heading = f"ResNet-20 on Fashion-MNIST ({train}, {args.epochs} epochs; {test}):"
    print(f"\n{heading}\n\n{table}\n\n{summary.coverage}")
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"{heading}\n\n{table}\n\n{summary.coverage}\n\nwall time: {wall:.0f} s\n"
    atomic_write(out_dir / "main_job.md", lambda f: f.write(text.encode()))
    plot = f", plot in {summary.plot_path}" if summary.plot_path else " (no plot: see above)"
    print(
        f"\nwall time: {wall:.0f} s (budget {BUDGET_S} s); table in {out_dir / 'main_job.md'}{plot}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
