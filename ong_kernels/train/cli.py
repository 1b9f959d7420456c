"""Command lines: ``ong-train`` (one run) and ``ong-sweep`` (methods x sparsities x seeds).

Option values combine in this order, later winning: TrainConfig's defaults, then a
``--preset``, then the options given on the command line. With ``--resume`` the saved
config of the run is the starting point instead, and options given must not change it
(except --data-dir, --no-progress and --compile, which do not change the result).

Both entry points take ``argv`` (None: ``sys.argv[1:]``) and return an exit code:
0 success, 1 a runtime failure (missing data, bad checkpoint, broken sparsity,
divergence), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_NAME, CheckpointError, RunFolderError
from .config import METHODS, PRESET_SPARSITIES, PRESETS, SCHEDULES, SCOPES, TrainConfig, preset
from .data import DATASETS, DatasetError
from .models import MODELS
from .report import format_table
from .sweep import ChangedRunsError, check_workers, plan_runs, run_sweep
from .trainer import SparsityError, Trainer

__all__ = ["build_sweep_parser", "build_train_parser", "sweep_main", "train_main"]

_DEFAULTS = TrainConfig().to_dict()
# Options that pick *which* runs happen: ong-sweep takes lists of them instead.
_SWEPT = ("method", "sparsity", "seed")


def _d(name: str) -> str:
    return f" (default: {_DEFAULTS[name]})"


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"rank\": 8}'")
    return value


def _add_config_options(parser: argparse.ArgumentParser, *, sweep: bool) -> None:
    """Every TrainConfig field as an option whose default is 'not given' (SUPPRESS)."""
    S = argparse.SUPPRESS
    add = parser.add_argument
    add(
        "--preset",
        choices=sorted(PRESETS),
        default=S,
        help="the paper's settings for a model/dataset pair (200 epochs, batch 128, nesterov "
        "SGD lr 0.1 cosine, weight decay 1e-4 on CIFAR-10 / 5e-4 on CIFAR-100); other "
        "options override it",
    )

    g = parser.add_argument_group("model and data")
    g.add_argument("--model", choices=MODELS, default=S, help="network" + _d("model"))
    g.add_argument("--dataset", choices=DATASETS, default=S, help="dataset" + _d("dataset"))
    g.add_argument(
        "--data-dir",
        default=S,
        metavar="DIR",
        help="folder with the dataset files (Fashion-MNIST: the four IDX .gz files, "
        "default /usr/share/datasets/fashion-mnist; CIFAR: the extracted "
        "python-version folder or its parent)",
    )
    g.add_argument(
        "--train-subset",
        type=int,
        default=S,
        metavar="N",
        help="train on the first N training examples, 0 for all (default: all)",
    )
    g.add_argument(
        "--test-subset",
        type=int,
        default=S,
        metavar="N",
        help="evaluate on the first N test examples, 0 for all (default: all)",
    )
    g.add_argument(
        "--synthetic-shape",
        type=int,
        nargs=4,
        default=S,
        metavar=("TRAIN", "TEST", "CHANNELS", "SIZE"),
        help="size of --dataset synthetic" + _d("synthetic_shape"),
    )
    g.add_argument(
        "--width",
        type=float,
        default=S,
        help="channel-width multiplier of the network" + _d("width"),
    )

    g = parser.add_argument_group("pruning")
    if not sweep:
        g.add_argument(
            "--method",
            choices=METHODS,
            default=S,
            help="pruning method at initialisation, or dense" + _d("method"),
        )
        g.add_argument(
            "--sparsity",
            type=float,
            default=S,
            help="fraction of prunable weights removed" + _d("sparsity"),
        )
    g.add_argument(
        "--scope",
        choices=SCOPES,
        default=S,
        help="how sparsity is spread over layers" + _d("scope"),
    )
    g.add_argument(
        "--prune-batches",
        type=int,
        default=S,
        metavar="N",
        help="training batches scored by data-driven methods (snip, grasp, synflow)"
        + _d("prune_batches"),
    )
    g.add_argument(
        "--method-kwargs",
        type=_json_dict,
        default=S,
        metavar="JSON",
        help="extra keyword arguments for ong_kernels.pruning.prune, as a JSON object "
        "(e.g. '{\"rank\": 8}')",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help="training epochs" + _d("epochs"))
    g.add_argument(
        "--batch-size",
        type=int,
        default=S,
        help="global batch size, split evenly over processes" + _d("batch_size"),
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=S,
        help="batch size for evaluation" + _d("eval_batch_size"),
    )
    g.add_argument("--lr", type=float, default=S, help="peak learning rate" + _d("lr"))
    g.add_argument("--momentum", type=float, default=S, help="SGD momentum" + _d("momentum"))
    g.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="Nesterov momentum" + _d("nesterov"),
    )
    g.add_argument(
        "--weight-decay", type=float, default=S, help="L2 weight decay" + _d("weight_decay")
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=S,
        help="learning-rate schedule, stepped per batch" + _d("schedule"),
    )
    g.add_argument(
        "--milestones",
        type=int,
        nargs="+",
        default=S,
        metavar="EPOCH",
        help="multistep: epochs where the lr is multiplied by --gamma "
        "(default: 50%% and 75%% of --epochs)",
    )
    g.add_argument("--gamma", type=float, default=S, help="multistep factor" + _d("gamma"))
    g.add_argument(
        "--warmup-epochs",
        type=int,
        default=S,
        help="linear lr warm-up epochs" + _d("warmup_epochs"),
    )

    g = parser.add_argument_group("execution")
    if not sweep:
        g.add_argument("--seed", type=int, default=S, help="seed of everything" + _d("seed"))
    g.add_argument(
        "--device", default=S, help="cpu, cuda, cuda:N or auto (cuda when available)" + _d("device")
    )
    g.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default=S,
        help="bf16 autocast; auto = on for CUDA, off on CPU" + _d("amp"),
    )
    g.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default=S,
        help="channels_last memory format; auto = on for CUDA" + _d("channels_last"),
    )
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=S, help="no progress bars"
    )


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ong-train",
        description="Prune a CIFAR ResNet at initialisation (ONG or a baseline) and train it "
        "with FusedMaskedSGD. Writes config.json, metrics.csv, a checkpoint per epoch, "
        "results.json and loss/accuracy plots into the run folder. Under torchrun it trains "
        "with DistributedDataParallel.",
        epilog="example: ong-train --model resnet56 --dataset cifar10 --data-dir D "
        "--method ong --sparsity 0.9",
    )
    _add_config_options(parser, sweep=False)
    g = parser.add_argument_group("run folder")
    g.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="folder of this run (default: "
        "RUNS_ROOT/<model>-<dataset>-<method>-<sparsity>-seed<N>, dense without -<sparsity>)",
    )
    g.add_argument(
        "--runs-root",
        default="runs",
        metavar="RUNS_ROOT",
        help="parent of the default run folder (default: runs)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --run-dir from its last checkpoint",
    )
    return parser


def build_sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ong-sweep",
        description="Train every combination of methods x sparsities x seeds (dense once per "
        "seed), then write results.md (mean +- std of the final test accuracy) and "
        "accuracy_vs_sparsity.png. Finished runs are reused and interrupted runs resumed, so "
        "re-running the same command continues a sweep.",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["dense", "ong"],
        help="methods to compare (default: dense ong)",
    )
    parser.add_argument(
        "--sparsities",
        nargs="+",
        type=float,
        default=None,
        help=f"sparsities (default: the preset's, else 0.9; presets use "
        f"{' '.join(map(str, PRESET_SPARSITIES))})",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="CPU only: train this many runs at once, in separate processes sharing the "
        "cores (default: 1)",
    )
    parser.add_argument(
        "--rerun-changed",
        action="store_true",
        help="when a run folder holds a run made with other settings, train the new "
        "settings into OUT_DIR/<run name>-<config digest> instead of stopping with the "
        "differences (default: stop)",
    )
    parser.add_argument(
        "--out-dir",
        required=True,
        metavar="DIR",
        help="sweep folder: one run folder per combination plus the summary",
    )
    _add_config_options(parser, sweep=True)
    return parser


def _base_config(args: dict[str, Any]) -> dict[str, Any]:
    values = dict(_DEFAULTS)
    if "preset" in args:
        values.update(preset(args.pop("preset")))
    values.update(args)
    return values


class _UsageError(Exception):
    """A bad option value or combination: exit code 2, no traceback."""


# Failures the user can act on from the message alone: no traceback, exit code 1.
_RUNTIME_ERRORS = (DatasetError, CheckpointError, FloatingPointError, RunFolderError)


def _run_safely(prog: str, fn: Callable[[], int], hint: Callable[[], str]) -> int:
    """Run ``fn``; report the failures a user can act on as one line plus an exit code."""

    try:
        return fn()
    except _UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except (*_RUNTIME_ERRORS, SparsityError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted{hint()}", file=sys.stderr)
        return 130


def _usage(fn: Callable[[], Any]) -> Any:
    """Run a configuration step, turning its ValueError/TypeError into a usage error."""
    try:
        return fn()
    except (ValueError, TypeError) as err:
        raise _UsageError(str(err)) from err


RESULT_COLUMNS = [
    ("method", "method"),
    ("sparsity", "sparsity"),
    ("measured", "measured sparsity"),
    ("remaining", "params left (all, incl. BN and bias)"),
    ("epochs", "epochs"),
    ("test_acc", "test acc (%)"),
    ("best_test_acc", "best test acc (%)"),
    ("train_time", "train time"),
]


def result_row(results: dict[str, Any]) -> dict[str, Any]:
    """One run's results as a row for :data:`RESULT_COLUMNS`."""
    cfg = results["config"]
    return {
        "method": cfg["method"],
        "sparsity": f"{cfg['sparsity']:g}",
        "measured": f"{results['measured_sparsity']:.4f}",
        "remaining": f"{results['remaining_parameters']:,}",
        "epochs": results["epochs_completed"],
        "test_acc": results["test_acc"],
        "best_test_acc": results["best_test_acc"],
        "train_time": f"{results['train_time_s']:.0f}s",
    }


def train_main(argv: Sequence[str] | None = None) -> int:
    """``ong-train``: one training run; prints the final table. Returns an exit code."""
    parser = build_train_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        # The defaults alone would train 200 epochs: almost never what a bare call wants.
        parser.print_help()
        print(
            "\nong-train: nothing to do without options; e.g. a 2-minute CPU run:\n"
            "  ong-train --method ong --sparsity 0.9 --epochs 1 --train-subset 2000 "
            "--test-subset 1000"
        )
        return 2
    ns = parser.parse_args(argv)
    run_dir, runs_root, resume = ns.run_dir, ns.runs_root, ns.resume
    given = {k: v for k, v in vars(ns).items() if k not in ("run_dir", "runs_root", "resume")}
    run_folder: list[Path] = []  # filled in once the run folder is known

    def hint() -> str:
        if not run_folder:
            return ""
        if (run_folder[0] / CHECKPOINT_NAME).is_file():
            return f"; continue with: ong-train --resume --run-dir {run_folder[0]}"
        return "; no epoch had finished, nothing to resume: run the same command again"

    def configure() -> TrainConfig:
        if resume:
            if run_dir is None:
                raise ValueError("--resume needs --run-dir (the folder of the run to continue)")
            saved = Path(run_dir) / "config.json"
            if not saved.is_file():
                raise CheckpointError(f"{run_dir}: no run to resume (no config.json)")
            if "preset" in given:
                raise ValueError("--preset cannot be combined with --resume")
            values = {**json.loads(saved.read_text()), **given}
        else:
            values = _base_config(given)
        name = TrainConfig.from_dict({**values, "run_dir": None}).run_name()
        values["run_dir"] = run_dir or str(Path(runs_root) / name)
        return TrainConfig.from_dict(values)

    def run() -> int:

        config = _usage(configure)
        run_folder.append(Path(config.run_dir))
        trainer = _usage(lambda: Trainer(config, resume=resume))
        _usage(trainer.setup)
        results = trainer.fit()
        print(f"\nrun folder: {config.run_dir}")
        print(format_table([result_row(results)], RESULT_COLUMNS))
        return 0

    return _run_safely("ong-train", run, hint)


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``ong-sweep``: methods x sparsities x seeds; writes and prints the summary table."""
    parser = build_sweep_parser()
    ns = parser.parse_args(argv)
    swept = {"methods": ns.methods, "sparsities": ns.sparsities, "seeds": ns.seeds}
    out_dir, workers, rerun = ns.out_dir, ns.workers, ns.rerun_changed
    own = (*swept, "out_dir", "workers", "rerun_changed")
    given = {k: v for k, v in vars(ns).items() if k not in own}
    if swept["sparsities"] is None:
        swept["sparsities"] = list(PRESET_SPARSITIES) if "preset" in given else [0.9]

    def run() -> int:

        base = _usage(lambda: TrainConfig.from_dict({**_base_config(given), "method": "dense"}))
        _usage(lambda: plan_runs(base, **swept))
        command = ["ong-sweep", *(sys.argv[1:] if argv is None else argv)]
        _usage(lambda: check_workers(workers, base.device))
        try:
            summary = run_sweep(
                base, out_dir=out_dir, command=command, workers=workers, rerun_changed=rerun,
                **swept,
            )  # fmt: skip
        except ChangedRunsError as err:
            raise _UsageError(str(err)) from err
        print(summary.markdown)
        print(f"\nwritten: {summary.markdown_path}, {summary.plot_path}")
        return 0

    return _run_safely("ong-sweep", run, lambda: f"; re-run the same command to continue {out_dir}")
