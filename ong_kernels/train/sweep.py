"""Sweeps: train methods x sparsities x seeds and summarise them.

Each combination trains into ``OUT_DIR/<run name>``. A run whose results.json says it is
complete is reused, a run with only a checkpoint is resumed, so re-running an interrupted
sweep continues it. The summary (``results.md``, ``summary.json``,
``accuracy_vs_sparsity.png``) reports the mean +- sample standard deviation over seeds of
the final test accuracy (the last epoch's, not the best: picking the best epoch on the
test set would be selecting on it); a row of one seed has no std: "n/a" in the tables, null
in the JSON, no error bar.

The summary of an out-dir covers every finished run in it made with the sweep's settings
(method, sparsity and seed aside), so a smaller sweep into the same folder extends the
table instead of replacing it; finished runs made with other settings are listed, not
averaged in, and an earlier summary that covered runs the new one does not is kept beside
it (``results.<k>.md``, ``summary.<k>.json``, ``accuracy_vs_sparsity.<k>.png``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ong_kernels.pruning import methods as M

from . import distributed as D
from . import sweep_lock
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write,
    check_writable_folder,
    read_json_object,
    write_json,
)
from .config import METHODS, TrainConfig, config_differences, describe_differences
from .data import ImageDataset, load_dataset
from .plots import missing_matplotlib
from .report import format_mean_std, format_table, mean_std
from .trainer import Trainer

__all__ = [
    "ChangedRunsError",
    "SweepSummary",
    "check_workers",
    "locate_run",
    "plan_runs",
    "run_sweep",
    "summarize",
]


class ChangedRunsError(ValueError):
    """Run folders of the sweep hold runs made with other settings."""


SUMMARY_COLUMNS = [
    ("method", "method"),
    ("sparsity", "sparsity"),
    ("budget", "epochs"),
    ("seeds", "seeds"),
    ("before_cut", "sparsity before final cut"),
    ("after_cut", "test acc after cut (%)"),
    ("test_acc", "final test acc (%)"),
    ("best_test_acc", "best test acc (%)"),
    ("measured", "measured sparsity"),
    ("train_time", "train time / run"),
]


@dataclass
class SweepSummary:
    rows: list[dict[str, Any]]  # one per (method, sparsity), numbers
    runs: list[dict[str, Any]]  # results.json of every run in the table (this sweep's first)
    markdown: str
    markdown_path: Path | None
    plot_path: Path | None  # None when not drawn (no matplotlib)
    wall_time_s: float
    coverage: str = ""  # which finished runs of the out-dir the table covers, in words


def plan_runs(
    base: TrainConfig,
    methods: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
    method_kwargs: dict[str, Any] | None = None,
) -> list[TrainConfig]:
    """The configs of a sweep: dense once per seed, every other method at every sparsity.

    ``method_kwargs``: settings given once for the sweep; each method gets those it takes
    (methods.settings_for), and one no swept method takes is a ValueError."""
    if not methods:
        raise ValueError("methods: empty")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(
            f"methods: unknown {', '.join(map(repr, bad))}; expected {', '.join(METHODS)}"
        )
    if any(m != "dense" for m in methods) and not sparsities:
        raise ValueError("sparsities: empty")
    if not seeds:
        raise ValueError("seeds: empty")
    if (
        len(set(methods)) != len(methods)
        or len(set(sparsities)) != len(sparsities)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError("methods, sparsities and seeds must not repeat values")
    shared = dict(method_kwargs or {})
    M.check_shared(methods, shared)
    configs = []
    for seed in seeds:
        for method in methods:
            for sparsity in [0.0] if method == "dense" else sparsities:
                # Validation of each value happens here, before anything is trained.
                configs.append(
                    base.replace(
                        method=method,
                        sparsity=sparsity,
                        seed=seed,
                        method_kwargs=M.settings_for(method, shared),
                    )
                )
    return configs


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group run results by (method, sparsity): mean/std over seeds."""
    # Runs of different budgets (total epochs) are never averaged into one row.
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for r in runs:
        cfg = r["config"]
        budget = r.get("budget_epochs", r["epochs_completed"])
        groups.setdefault((cfg["method"], cfg["sparsity"], budget), []).append(r)
    rows = []
    for (method, sparsity, budget), rs in groups.items():
        acc_mean, acc_std = mean_std([r["test_acc"] for r in rs])
        best_mean, best_std = mean_std([r["best_test_acc"] for r in rs])
        before = [r.get("sparsity_before_cut") for r in rs]
        after = [r.get("test_acc_after_cut") for r in rs]
        rows.append(
            {
                "method": method,
                "sparsity": sparsity,
                "budget_epochs": budget,
                "seeds": len(rs),
                "sparsity_before_cut": (sum(before) / len(before) if None not in before else None),
                "test_acc_after_cut_mean": mean_std(after)[0] if None not in after else None,
                "test_acc_after_cut_std": mean_std(after)[1] if None not in after else None,
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "best_test_acc_mean": best_mean,
                "best_test_acc_std": best_std,
                "measured_sparsity": sum(r["measured_sparsity"] for r in rs) / len(rs),
                "train_time_s": sum(r["train_time_s"] for r in rs) / len(rs),
            }
        )
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["sparsity"], r["budget_epochs"], order.get(r["method"], len(order))))
    return rows


def _display(row: dict[str, Any]) -> dict[str, Any]:
    after = row.get("test_acc_after_cut_mean")
    before = row.get("sparsity_before_cut")
    return {
        "method": row["method"],
        "sparsity": f"{row['sparsity']:g}",
        "budget": row["budget_epochs"],
        "seeds": row["seeds"],
        "before_cut": "" if before is None else f"{before:.4f}",
        "after_cut": "" if after is None else format_mean_std(after, row["test_acc_after_cut_std"]),
        "test_acc": format_mean_std(row["test_acc_mean"], row["test_acc_std"]),
        "best_test_acc": format_mean_std(row["best_test_acc_mean"], row["best_test_acc_std"]),
        "measured": f"{row['measured_sparsity']:.4f}",
        "train_time": f"{row['train_time_s']:.0f}s",
    }


def _run_entry(results: dict[str, Any]) -> dict[str, Any]:
    """The summary's line for one run: where it is and what it was."""
    cfg = results["config"]
    keys = ("run_dir", "method", "sparsity", "seed", "epochs", "lr", "train_subset")
    return {**{k: cfg[k] for k in keys}, "test_acc": results["test_acc"]}


def _describe(base: TrainConfig) -> str:
    subset = []
    if base.train_subset:
        subset.append(f"first {base.train_subset} training examples")
    if base.test_subset:
        subset.append(f"first {base.test_subset} test examples")
    data = base.dataset + (f" ({', '.join(subset)})" if subset else " (full data)")
    return (
        f"{base.model} on {data}, {base.epochs} epochs, batch {base.batch_size}, lr {base.lr} "
        f"{base.schedule}, momentum {base.momentum}{' nesterov' if base.nesterov else ''}, "
        f"weight decay {base.weight_decay}, pruning scope {base.scope}"
    )


# Per-process cache of loaded datasets for pool workers: (name, data_dir, shape) -> dataset.
_WORKER_DATA: dict[tuple, ImageDataset] = {}


def _load(base: TrainConfig) -> ImageDataset:
    return load_dataset(base.dataset, base.data_dir, synthetic_shape=base.synthetic_shape)


def _train_in_worker(config: dict[str, Any], resume: bool, threads: int) -> dict[str, Any]:
    """Process-pool task: one run with ``threads`` intra-op threads, log lines prefixed.
    When the sweep is gone the run stops after its next checkpoint and the worker exits
    (sweep_lock)."""

    torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(config)
    name = cfg.run_name()

    def log(message: str) -> None:
        try:
            print(f"[{name}] {message}", flush=True)
        except OSError:  # the sweep's terminal or pipe is gone with it
            pass

    sweep_lock.start_run()
    try:
        key = (cfg.dataset, cfg.data_dir, tuple(cfg.synthetic_shape))
        if key not in _WORKER_DATA:
            _WORKER_DATA[key] = _load(cfg)
        trainer = Trainer(
            cfg,
            dataset=_WORKER_DATA[key],
            resume=resume,
            callbacks=[sweep_lock.stop_if_orphaned],
            log=log,
        )
        return trainer.fit()
    finally:
        sweep_lock.end_run()


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.json"
    return read_json_object(path) if path.is_file() else None


def _finished(run_dir: Path) -> dict[str, Any] | None:
    """The run's results.json when it says the run is complete, else None."""
    done = run_dir / "results.json"
    if not done.is_file():
        return None
    results = read_json_object(done)
    return results if results.get("complete") else None


def _same_settings(
    base: TrainConfig, saved: Any, shared: dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """How a finished run's config differs from ``base`` with its method, sparsity and seed
    (empty: it belongs in the sweep's table)."""
    try:
        method = saved["method"]
        own = base.replace(
            method=method,
            sparsity=saved["sparsity"],
            seed=saved["seed"],
            method_kwargs=M.settings_for(method, shared),
        )
        return config_differences(saved, own.to_dict())
    except (KeyError, TypeError, ValueError) as err:
        return {"config": (f"unreadable ({err})", "")}


def _earlier_runs(out_dir: Path, base: TrainConfig, planned: set[Path], shared: dict[str, Any]):
    """Finished runs in ``out_dir`` outside this sweep's plan: (those made with the sweep's
    settings, [(folder, differences or why unreadable)] of the others)."""
    same, other = [], []
    for run_dir in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        if run_dir.resolve() in planned:
            continue
        try:
            results = _finished(run_dir)
        except CheckpointError as err:
            other.append((run_dir, str(err)))
            continue
        if results is None:
            continue
        diff = _same_settings(base, results.get("config"), shared)
        if diff:
            other.append((run_dir, describe_differences(diff)))
        else:
            same.append(results)
    return same, other


def _set_aside_summary(out_dir: Path, covered: set[Path], say) -> None:
    """Keep an earlier summary that covered runs the new one does not, as results.<k>.md,
    summary.<k>.json and accuracy_vs_sparsity.<k>.png (k: the first free number)."""
    names = ("results.md", "summary.json", "accuracy_vs_sparsity.png")
    old = out_dir / "summary.json"
    if not old.is_file():
        return
    try:
        dropped = [
            r["run_dir"]
            for r in read_json_object(old)["runs"]
            if Path(r["run_dir"]).resolve() not in covered
        ]
    except (CheckpointError, KeyError, TypeError) as err:
        dropped = [f"(unreadable: {err})"]
    if not dropped:
        return
    k = 1
    while any((out_dir / f"{Path(n).stem}.{k}{Path(n).suffix}").exists() for n in names):
        k += 1
    kept = []
    for n in names:
        if (out_dir / n).is_file():
            (out_dir / n).replace(out_dir / f"{Path(n).stem}.{k}{Path(n).suffix}")
            kept.append(f"{Path(n).stem}.{k}{Path(n).suffix}")
    say(
        f"the earlier summary in {out_dir} covered {len(dropped)} run(s) this one does not "
        f"(e.g. {dropped[0]}); kept as {', '.join(kept)}"
    )


def _digest(cfg: TrainConfig) -> str:
    """8 hex digits naming a config (what it computes), for the folder of a changed run."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("run_dir", "data_dir")}
    values.pop("progress"), values.pop("compile")
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def locate_run(
    out_dir: Path, cfg: TrainConfig, rerun_changed: bool
) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """The run folder for ``cfg``: ``OUT_DIR/<run name>``, unless that folder holds a run made
    with other settings; then ``OUT_DIR/<run name>-<config digest>`` when ``rerun_changed``.

    Returns (cfg with its run_dir, differences of the occupied folder; empty when none).
    A folder whose config matches is always the answer, so an earlier ``rerun_changed``
    run is found again.
    """
    name = cfg.run_name()
    first, alt = out_dir / name, out_dir / f"{name}-{_digest(cfg)}"
    differences: dict[str, tuple[Any, Any]] = {}
    for run_dir in (first, alt):
        placed = cfg.replace(run_dir=str(run_dir))
        saved = _saved_config(run_dir)
        if saved is None:
            if run_dir == first or rerun_changed:
                return placed, {}
            continue
        diff = config_differences(saved, placed.to_dict())
        if not diff:
            return placed, {}
        if run_dir == first:
            differences = diff
    if not rerun_changed:
        return cfg.replace(run_dir=str(first)), differences
    raise ChangedRunsError(
        f"{alt}: holds yet another config ({describe_differences(diff)}); choose another --out-dir"
    )


def check_workers(workers: int, device: str) -> None:
    """ValueError unless ``workers`` parallel runs make sense here (CPU, no torchrun)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    if workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("workers: parallel runs cannot be combined with torchrun; use 1")
    if workers > 1 and D.resolve_device(device, 0).type != "cpu":
        raise ValueError("workers: parallel runs are for CPU training; use 1 on a GPU")


def run_sweep(
    base: TrainConfig,
    *,
    methods: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
    out_dir: str | Path,
    workers: int = 1,
    threads_per_worker: int | None = None,
    dataset: ImageDataset | None = None,
    command: Sequence[str] | None = None,
    log: Callable[[str], None] | None = print,
    rerun_changed: bool = False,
    method_kwargs: dict[str, Any] | None = None,
) -> SweepSummary:
    """Train every planned run (reusing finished ones), then write and return the summary.

    A finished run is reused, and an unfinished one resumed, only when its saved config
    computes the same thing as the planned one (:func:`config.config_differences`).
    Otherwise :class:`ChangedRunsError` names the differing fields, before anything is
    trained; with ``rerun_changed`` such runs train into ``<run name>-<config digest>``
    folders instead (see :func:`locate_run`).

    ``workers > 1`` trains that many runs at once in separate processes (CPU only), each
    with ``threads_per_worker`` intra-op threads (default: this process's threads divided
    by ``workers``, at least 1). On a small CPU this beats one run at a time with all
    threads: ResNet-20's convolutions scale poorly over threads, and a multi-threaded run
    collapses when anything else uses a core (measured on the 2-core box with one other
    busy process: 3.2 s per step with 2 threads, 0.47 s with 1).

    One sweep at a time trains into ``out_dir``: :class:`sweep_lock.OutDirBusyError` names
    the holder otherwise, before anything is planned; a worker whose sweep was killed stops
    after its next checkpoint (:mod:`sweep_lock`).
    """
    shared = dict(method_kwargs or {})
    configs = plan_runs(base, methods, sparsities, seeds, shared)
    check_workers(workers, base.device)
    out_dir = Path(out_dir)
    # One sweep per out-dir (rank 0 holds it for a torchrun sweep): taken before the runs are
    # planned, held until the summary is written (sweep_lock).
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:
        check_writable_folder(out_dir)
        lock = sweep_lock.OutDirLock(out_dir, say=log or (lambda msg: None))
        lock.acquire()
    try:
        return _run_locked(
            base, configs, out_dir, workers, threads_per_worker, dataset, command, log,
            rerun_changed, shared,
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    base,
    configs,
    out_dir,
    workers,
    threads_per_worker,
    dataset,
    command,
    log,
    rerun_changed,
    shared,
) -> SweepSummary:
    placed = [locate_run(out_dir, cfg, rerun_changed) for cfg in configs]
    changed = [(cfg, diff) for cfg, diff in placed if diff]
    if changed:
        lines = [f"  {cfg.run_dir}: {describe_differences(diff)}" for cfg, diff in changed[:5]]
        more = f"\n  ... and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ChangedRunsError(
            f"{len(changed)} run folder(s) in {out_dir} hold runs made with other settings:\n"
            + "\n".join(lines)
            + more
            + "\nre-run with --rerun-changed to train these settings into new folders "
            "(<run name>-<config digest>), or choose another --out-dir"
        )
    start = time.perf_counter()
    ctx = D.setup(base.device)
    say = log if (log is not None and ctx.is_main) else (lambda msg: None)
    no_plot = missing_matplotlib()
    if no_plot:  # said before training, so a long sweep holds no surprise at its end
        say(f"{no_plot}; the tables are written, accuracy_vs_sparsity.png is not")
    runs: list[dict[str, Any] | None] = [None] * len(configs)
    todo = []
    try:
        for i, (cfg, _) in enumerate(placed):
            run_dir = Path(cfg.run_dir)
            finished = _finished(run_dir)
            if finished is not None:
                done = run_dir / "results.json"
                say(f"[{i + 1}/{len(configs)}] {cfg.run_name()}: finished earlier, reusing {done}")
                runs[i] = finished
                continue
            resume = (run_dir / CHECKPOINT_NAME).is_file()
            say(f"[{i + 1}/{len(configs)}] {cfg.run_name()}{' (resuming)' if resume else ''}")
            todo.append((i, cfg, resume))
        if workers == 1:
            if todo and dataset is None:
                dataset = _load(base)
            for i, cfg, resume in todo:
                trainer = Trainer(cfg, dataset=dataset, resume=resume, dist_ctx=ctx, log=log)
                runs[i] = trainer.fit()
        elif todo:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            threads = threads_per_worker or max(1, torch.get_num_threads() // workers)
            say(f"training {len(todo)} runs, {workers} at a time, {threads} thread(s) each")
            spawn = multiprocessing.get_context("spawn")  # fork + OpenMP threads can deadlock
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=spawn, initializer=sweep_lock.init_worker,
                initargs=(str(out_dir), os.getpid()),
            ) as pool:  # fmt: skip
                futures = {
                    i: pool.submit(
                        _train_in_worker, cfg.replace(progress=False).to_dict(), resume, threads
                    )
                    for i, cfg, resume in todo
                }
                try:
                    for i, future in futures.items():
                        runs[i] = future.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        D.teardown(ctx)

    planned = {Path(cfg.run_dir).resolve() for cfg, _ in placed}
    earlier, other = _earlier_runs(out_dir, base, planned, shared) if out_dir.is_dir() else ([], [])
    table_runs = [*runs, *earlier]
    rows = summarize(table_runs)
    table = format_table([_display(r) for r in rows], SUMMARY_COLUMNS)
    all_seeds = sorted({r["config"]["seed"] for r in table_runs})
    coverage = _coverage(out_dir, len(runs), earlier, other)
    spread = (
        "mean ± sample std over seeds" if any(r["seeds"] > 1 for r in rows)
        else "one seed per row, so no std"
    )  # fmt: skip
    header = (
        f"Setup: {_describe(base)}; {spread} (seeds {', '.join(map(str, all_seeds))}).\n\n"
        f"{coverage}"
    )
    if command:
        header = f"Command: `{shlex.join(command)}`\n\n{header}"
    markdown = f"{header}\n\n{table}\n"
    wall = time.perf_counter() - start
    md_path = plot_path = None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _set_aside_summary(
            out_dir, {Path(r["config"]["run_dir"]).resolve() for r in table_runs}, say
        )
        md_path = out_dir / "results.md"
        atomic_write(md_path, lambda f: f.write(markdown.encode()))
        write_json(
            out_dir / "summary.json",
            {
                "setup": _describe(base),
                "command": list(command or []),
                "rows": rows,
                "runs": [_run_entry(r) for r in table_runs],
                "other_settings": [str(folder) for folder, _ in other],
            },
        )
        if no_plot:
            say(f"{no_plot}; accuracy_vs_sparsity.png not drawn")
        else:
            from .plots import plot_sweep

            plot_path = out_dir / "accuracy_vs_sparsity.png"
            title = f"{base.model} on {base.dataset}, {len(all_seeds)} seed(s)"
            plot_sweep(rows, plot_path, title=title)
    return SweepSummary(rows, table_runs, markdown, md_path, plot_path, wall, coverage)


def _coverage(out_dir: Path, mine: int, earlier: list, other: list) -> str:
    """Which finished runs of ``out_dir`` the table covers, in one or two sentences."""
    text = f"The table covers every finished run in {out_dir} made with these settings: "
    text += f"{mine} of this sweep" + (f", {len(earlier)} of earlier sweeps." if earlier else ".")
    if other:
        shown = "; ".join(f"{folder.name} ({why})" for folder, why in other[:3])
        more = f"; and {len(other) - 3} more" if len(other) > 3 else ""
        text += f" Not in it, made with other settings: {shown}{more}."
    return text
