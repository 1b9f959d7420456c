"""Command lines: ``ong-train`` (one run) and ``ong-sweep`` (methods x sparsities x seeds).

Option values combine in this order, later winning: TrainConfig's defaults, then a
``--preset``, then the options given on the command line. With ``--resume`` the saved
config of the run is the starting point instead, and options given must not change it
(except --data-dir, --progress and --compile, which do not change the result, and --epochs:
a run, finished or not, can be extended; the trainer re-plans the lr schedule for the new
length from the next step on and says so, and results.json records the change).

Both entry points take ``argv`` (None: ``sys.argv[1:]``) and return an exit code:
0 success, 1 a runtime failure (missing data, bad checkpoint, broken sparsity,
divergence), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ong_kernels.pruning import methods as M

from .._version import cli_parser
from .checkpoint import CHECKPOINT_NAME, CheckpointError, RunFolderError, read_json_object
from .config import (
    METHODS,
    PRESET_SPARSITIES,
    PRESETS,
    Option,
    TrainConfig,
    option_of,
    preset,
    unused_options,
)
from .data import DatasetError
from .report import format_table
from .sweep import ChangedRunsError, check_workers, plan_runs, run_sweep
from .sweep_lock import OutDirBusyError
from .trainer import SparsityError, Trainer

__all__ = ["build_sweep_parser", "build_train_parser", "sweep_main", "train_main"]

_DEFAULTS = TrainConfig().to_dict()


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"rank\": 8}'")
    return value


def _argparse_kwargs(annotation: Any, option: Option) -> dict[str, Any]:
    """argparse's type/action/nargs for a field annotated ``annotation``."""
    kind = annotation
    if isinstance(annotation, types.UnionType):  # X | None -> X
        (kind,) = (a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is dict:
        return {"type": _json_dict}
    if origin is list:
        return {"type": typing.get_args(kind)[0], "nargs": option.nargs}
    return {} if origin is str else {"type": origin}


def _default_text(name: str, option: Option) -> str:
    if option.default_text is not None:
        return option.default_text
    value = _DEFAULTS[name]
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _add_config_options(parser: argparse.ArgumentParser, *, sweep: bool) -> None:
    """Every TrainConfig field that has an :class:`~.config.Option` as a command-line option
    (generated from the fields, so the two cannot drift apart). Defaults are 'not given'
    (SUPPRESS): what was given is told apart from TrainConfig's defaults and a preset's."""
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=argparse.SUPPRESS,
        help="the paper's settings for a model/dataset pair (200 epochs, batch 128, nesterov "
        "SGD lr 0.1 cosine, weight decay 1e-4 on CIFAR-10 / 5e-4 on CIFAR-100); other "
        "options override it",
    )
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        option = option_of(f)
        if option is None or (sweep and option.swept):
            continue
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        kwargs = {k: v for k, v in _argparse_kwargs(hints[f.name], option).items() if v}
        if option.choices is not None:
            kwargs["choices"] = option.choices
        if option.metavar is not None:
            kwargs["metavar"] = option.metavar
        groups[option.group].add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"{option.help} (default: {_default_text(f.name, option)})",
            **kwargs,
        )
    _add_setting_options(parser)


_SETTING = "setting__"  # dest prefix of the generated method-setting options


def _add_setting_options(parser: argparse.ArgumentParser) -> None:
    """One option per method setting of the registry (ong_kernels.pruning.methods),
    generated from the settings dataclasses: the same values as --method-kwargs."""
    group = parser.add_argument_group(
        "method settings",
        "generated from ong_kernels.pruning.methods; --method-kwargs "
        "takes the same names as JSON:\n" + M.describe(),
    )
    for name, (setting, default, annotation, owners) in M.setting_options().items():
        kwargs = _argparse_kwargs(annotation, Option("", ""))
        shown = setting.shown or ("half the epochs" if default is None else default)
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=_SETTING + name,
            default=argparse.SUPPRESS,
            metavar=setting.metavar,
            help=f"[{', '.join(owners)}] {setting.help} (default: {shown}; source: "
            f"{setting.source})".replace("%", "%%"),
            **{k: v for k, v in kwargs.items() if v},
        )


def _pop_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The generated method-setting options given, removed from ``given``."""
    names = [k for k in given if k.startswith(_SETTING)]
    return {k[len(_SETTING) :]: given.pop(k) for k in names}


def _merge_settings(method: str, kwargs: dict[str, Any], settings: dict[str, Any]) -> dict:
    """``kwargs`` (--method-kwargs) with the setting options given; ValueError naming an
    option ``method`` does not take."""
    taken = M.accepted(method) or ()
    for name in settings:
        if name not in taken:
            owners = ", ".join(M.setting_options()[name][3])
            raise ValueError(
                f"--{name.replace('_', '-')}: method {method!r} has no such setting "
                f"({owners} take it)"
            )
    return {**kwargs, **settings}


def build_train_parser() -> argparse.ArgumentParser:
    parser = cli_parser(
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
        help="continue the run saved in --run-dir from its last checkpoint; with --epochs, "
        "extend it (the lr schedule is re-planned for the new length from the next step)",
    )
    return parser


def build_sweep_parser() -> argparse.ArgumentParser:
    parser = cli_parser(
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


def _unused_message(methods: Sequence[str], given: dict[str, Any], sweep: bool = False) -> str:
    """The line naming the options given that none of ``methods`` reads
    (config.unused_options; ong-sweep's --sparsities stands for --sparsity); "" if none."""
    unused = [flag for flag in unused_options(methods[0], given)
              if all(flag in unused_options(m, given) for m in methods[1:])]  # fmt: skip
    if sweep:
        unused = ["--sparsities" if f == "--sparsity" else f for f in unused]
    if not unused:
        return ""
    it = "it" if len(unused) == 1 else "they"
    return (
        f"{', '.join(unused)}: not used by {'--methods' if sweep else '--method'} "
        f"{' '.join(methods)}, so {it} would be silently ignored"
    )


def _check_used(methods: Sequence[str], given: dict[str, Any]) -> None:
    """ong-train: a ValueError (usage error) for options the method does not read."""
    message = _unused_message(methods, given)
    if message:
        raise ValueError(f"{message}; drop {'them' if ' they ' in message else 'it'}")


# Failures the user can act on from the message alone: no traceback, exit code 1.
_RUNTIME_ERRORS = (DatasetError, CheckpointError, FloatingPointError, RunFolderError,
                   OutDirBusyError)  # fmt: skip


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
    ("before_cut", "sparsity before final cut"),
    ("after_cut", "test acc after cut (%)"),
    ("test_acc", "test acc (%)"),
    ("best_test_acc", "best test acc (%)"),
    ("train_time", "train time"),
]


def _maybe(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def result_row(results: dict[str, Any]) -> dict[str, Any]:
    """One run's results as a row for :data:`RESULT_COLUMNS`."""
    cfg = results["config"]
    return {
        "method": cfg["method"],
        "sparsity": f"{cfg['sparsity']:g}",
        "measured": f"{results['measured_sparsity']:.4f}",
        "remaining": f"{results['remaining_parameters']:,}",
        "epochs": results["epochs_completed"],
        "before_cut": _maybe(results.get("sparsity_before_cut"), ".4f"),
        "after_cut": _maybe(results.get("test_acc_after_cut"), ".2f"),
        "test_acc": results["test_acc"],
        "best_test_acc": results["best_test_acc"],
        "train_time": f"{results['train_time_s']:.0f}s",
    }


def _saved_run_config(path: Path) -> dict[str, Any]:
    """The config.json of a run to resume, checked on its own (before the options given
    are applied): a damaged file is a bad run file (exit 1), named, not a usage error."""
    values = read_json_object(path)
    try:
        TrainConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a valid run config ({err})") from None
    return values


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
    settings = _pop_settings(given)
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
            values = {**_saved_run_config(saved), **given}
        else:
            values = _base_config(given)
        _check_used([values["method"]], given)
        if settings:
            values["method_kwargs"] = _merge_settings(
                values["method"], dict(values.get("method_kwargs") or {}), settings
            )
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
    # Settings given once apply to every swept method that has them.
    shared = {**given.pop("method_kwargs", {}), **_pop_settings(given)}
    if swept["sparsities"] is None:
        swept["sparsities"] = list(PRESET_SPARSITIES) if "preset" in given else [0.9]

    def run() -> int:

        # Warned, not refused: re-running a sweep's command with fewer --methods (to extend
        # its table) keeps options that only the dropped methods read.
        used = {**given, **({"sparsity": 1} if ns.sparsities is not None else {})}
        unused = _unused_message(ns.methods, used, sweep=True)
        if unused:
            print(f"ong-sweep: warning: {unused}", file=sys.stderr)
        base = _usage(lambda: TrainConfig.from_dict({**_base_config(given), "method": "dense"}))
        _usage(lambda: plan_runs(base, **swept, method_kwargs=shared))
        command = ["ong-sweep", *(sys.argv[1:] if argv is None else argv)]
        _usage(lambda: check_workers(workers, base.device))
        try:
            summary = run_sweep(
                base, out_dir=out_dir, command=command, workers=workers, rerun_changed=rerun,
                method_kwargs=shared, **swept,
            )  # fmt: skip
        except ChangedRunsError as err:
            raise _UsageError(str(err)) from err
        print(summary.markdown)
        written = [p for p in (summary.markdown_path, summary.plot_path) if p is not None]
        print(f"\nwritten: {', '.join(map(str, written))}")
        return 0

    return _run_safely("ong-sweep", run, lambda: f"; re-run the same command to continue {out_dir}")
