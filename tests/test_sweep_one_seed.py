"""One seed has no spread (issue 29 row 6): a sweep's row of one seed shows no ± in
results.md ("n/a"), stores null for the std in summary.json and draws no error bar; rows of two
or more seeds keep the sample std."""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY_TRAIN

from ong_kernels.train import cli, plots
from ong_kernels.train.report import mean_std
from ong_kernels.train.sweep import summarize

TINY = [*TINY_TRAIN, "--epochs", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mean_std_of_one_value_has_no_std():
    assert mean_std([5.0]) == (5.0, None)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def _run(seed, acc):
    config = {"method": "ong", "sparsity": 0.9, "seed": seed}
    return {"config": config, "test_acc": acc, "best_test_acc": acc, "measured_sparsity": 0.9,
            "train_time_s": 1.0, "epochs_completed": 2, "budget_epochs": 2}  # fmt: skip


def test_the_plot_draws_no_error_bar_for_one_seed():
    def bars(rows):
        ax = plots.sweep_figure(rows).axes[0]
        (container,) = ax.containers
        return [seg for coll in container.lines[2] for seg in coll.get_segments()
                if len(seg) and not any(math.isnan(y) for _, y in seg)]  # fmt: skip

    one = summarize([_run(0, 80.0), {**_run(0, 70.0), "config": {**_run(0, 0)["config"],
                                                                 "sparsity": 0.5}}])  # fmt: skip
    assert all(r["test_acc_std"] is None for r in one)
    assert bars(one) == []
    two = summarize([_run(0, 80.0), _run(1, 82.0)])
    assert len(bars(two)) == 1
    mixed = summarize([_run(0, 80.0), _run(1, 82.0), {**_run(0, 70.0), "config": {
        **_run(0, 0)["config"], "sparsity": 0.5}}])  # fmt: skip
    assert len(bars(mixed)) == 1  # only the two-seed point


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| dense")]


def test_a_one_seed_sweep_has_no_spread_and_two_seeds_do(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.sweep_main(["--methods", "dense", "--out-dir", str(out), *TINY]) == 0
    (row,) = _rows((out / "results.md").read_text())
    assert "±" not in row and "n/a" in row
    assert "no std" in (out / "results.md").read_text()
    (summary,) = json.loads((out / "summary.json").read_text())["rows"]
    assert summary["test_acc_std"] is None and summary["best_test_acc_std"] is None

    assert cli.sweep_main(["--methods", "dense", "--seeds", "1", "--out-dir", str(out), *TINY]) == 0
    (row,) = _rows((out / "results.md").read_text())
    assert "±" in row and "n/a" not in row
    (summary,) = json.loads((out / "summary.json").read_text())["rows"]
    assert summary["seeds"] == 2 and summary["test_acc_std"] >= 0
