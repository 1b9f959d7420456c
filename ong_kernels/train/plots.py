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

__all__ = ["plot_history", "plot_sweep"]


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def plot_history(
    history: Sequence[Mapping[str, Any]], loss_path: str | os.PathLike, acc_path: str | os.PathLike
) -> None:
    """Per-epoch train/test loss and accuracy of one run, two PNG files."""
    epochs = [row["epoch"] for row in history]
    for path, key, label in ((loss_path, "loss", "loss"), (acc_path, "acc", "accuracy (%)")):
        fig = _figure()
        ax = fig.add_subplot()
        for split in ("train", "test"):
            ax.plot(epochs, [row[f"{split}_{key}"] for row in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, path)


def plot_sweep(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Mean +- std final test accuracy vs sparsity, one line per method; dense as a band."""
    fig = _figure()
    ax = fig.add_subplot()
    methods = sorted({row["method"] for row in summary if row["method"] != "dense"})
    for method in methods:
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["sparsity"])
        ax.errorbar(
            [100 * r["sparsity"] for r in rows],
            [r["test_acc_mean"] for r in rows],
            yerr=[r["test_acc_std"] for r in rows],
            marker="o",
            capsize=3,
            label=method,
        )
    for r in summary:
        if r["method"] == "dense":
            mean, std = r["test_acc_mean"], r["test_acc_std"]
            ax.axhline(mean, color="black", linestyle="--", label="dense")
            if std > 0:
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
