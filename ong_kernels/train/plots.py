"""Matplotlib figures for a run (loss and accuracy curves) and a sweep (accuracy vs sparsity).

Uses the non-interactive Agg backend through an explicit Figure, so it works headless and
never touches pyplot's global state. Files are written atomically like every run artefact.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .checkpoint import atomic_write

__all__ = ["history_figures", "missing_matplotlib", "plot_history", "plot_sweep", "sweep_figure"]

_NEEDS = "plots need matplotlib: pip install 'ong_kernels[train]'"


def missing_matplotlib() -> str | None:
    """None when the plots can be drawn, else a line saying how to get them."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        return _NEEDS
    return None


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_NEEDS) from err

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def history_figures(history: Sequence[Mapping[str, Any]], title: str = "") -> dict[str, Any]:
    """Figures of one run, by name: per-epoch train/test "loss" and "accuracy", and the
    learning rate at the end of each epoch ("lr"), each titled with ``title``."""
    epochs = [row["epoch"] for row in history]
    figs = {}
    for key, label in (("loss", "loss"), ("acc", "accuracy (%)")):
        fig = _figure()
        ax = fig.add_subplot()
        for split in ("train", "test"):
            ax.plot(epochs, [row[f"{split}_{key}"] for row in history], marker="o", label=split)
        ax.set_ylabel(label)
        ax.legend()
        figs["loss" if key == "loss" else "accuracy"] = fig
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(epochs, [row["lr"] for row in history], marker="o")
    ax.set_ylabel("learning rate (end of epoch)")
    figs["lr"] = fig
    for fig in figs.values():
        ax = fig.axes[0]
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
    return figs


def plot_history(
    history: Sequence[Mapping[str, Any]],
    loss_path: str | os.PathLike,
    acc_path: str | os.PathLike,
    *,
    title: str = "",
    lr_path: str | os.PathLike | None = None,
) -> None:
    """Write :func:`history_figures` as PNG files (the lr curve only with ``lr_path``)."""
    figs = history_figures(history, title)
    _save(figs["loss"], loss_path)
    _save(figs["accuracy"], acc_path)
    if lr_path is not None:
        _save(figs["lr"], lr_path)


def sweep_figure(summary: Sequence[Mapping[str, Any]], title: str = ""):
    """Mean +- std final test accuracy vs sparsity, one line per method; dense as a band.
    A row without a std (one seed: None) gets no error bar."""
    fig = _figure()
    ax = fig.add_subplot()
    methods = sorted({row["method"] for row in summary if row["method"] != "dense"})
    for method in methods:
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["sparsity"])
        # A point of one seed has no std (None): no error bar (NaN draws none), not a 0 one.
        stds = [r["test_acc_std"] for r in rows]
        ax.errorbar(
            [100 * r["sparsity"] for r in rows],
            [r["test_acc_mean"] for r in rows],
            yerr=None if all(s is None for s in stds) else
            [float("nan") if s is None else s for s in stds],
            marker="o",
            capsize=3,
            label=method,
        )  # fmt: skip
    for r in summary:
        if r["method"] == "dense":
            mean, std = r["test_acc_mean"], r["test_acc_std"]
            ax.axhline(mean, color="black", linestyle="--", label="dense")
            if std:  # None (one seed) or 0: no band
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_sweep(
    summary: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = ""
) -> None:
    """Write :func:`sweep_figure` as a PNG file."""
    _save(sweep_figure(summary, title), path)
