"""ong-train / ong-sweep lose nothing and fail early: the table of an out-dir covers its
finished runs, damaged run files are named, a folder that cannot be written is refused before
any work, and a missing matplotlib costs only the plots."""

from __future__ import annotations

import json
import sys

import pytest

from ong_kernels.train import cli

TINY = [
    "--dataset", "synthetic", "--synthetic-shape", "64", "32", "1", "8", "--width", "0.25",
    "--batch-size", "32", "--eval-batch-size", "32", "--device", "cpu", "--no-progress",
    "--epochs", "1",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: why


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _table_rows(path):
    lines = path.read_text().splitlines()
    return [line.split("|")[1].strip() for line in lines if line.startswith("| ")][1:]


def test_a_smaller_sweep_extends_the_table_and_other_settings_are_kept_beside(
    tmp_path,
    capsys,
    no_matplotlib,  # no plots: they took 3 of this test's 4 s
):
    out = tmp_path / "sweep"
    sweep = [*TINY, "--out-dir", str(out), "--sparsities", "0.5"]
    assert cli.sweep_main([*sweep, "--methods", "dense", "random"]) == 0
    capsys.readouterr()
    # The subset: its table still covers the earlier sweep's finished runs, and says so.
    assert cli.sweep_main([*sweep, "--methods", "dense"]) == 0
    printed = capsys.readouterr().out
    assert "1 of this sweep, 1 of earlier sweeps" in printed
    assert _table_rows(out / "results.md") == ["dense", "random"]
    summary = json.loads((out / "summary.json").read_text())
    assert {r["method"] for r in summary["runs"]} == {"dense", "random"}
    assert "of earlier sweeps" in (out / "results.md").read_text()
    # Other settings are never averaged in: they are named, and the earlier table that
    # covered them is kept beside the new one, not replaced.
    assert cli.sweep_main([*sweep, "--methods", "dense", "--lr", "0.05", "--rerun-changed"]) == 0
    printed = capsys.readouterr().out
    assert _table_rows(out / "results.md") == ["dense"]
    assert "Not in it, made with other settings" in printed and "lr: saved 0.1" in printed
    assert "kept as results.1.md, summary.1.json" in printed
    assert _table_rows(out / "results.1.md") == ["dense", "random"]
    assert len(json.loads((out / "summary.1.json").read_text())["runs"]) == 2
    assert len(json.loads((out / "summary.json").read_text())["other_settings"]) == 2


def test_without_matplotlib_the_sweep_writes_its_tables_and_says_how_to_get_plots(
    tmp_path, capsys, no_matplotlib
):
    out = tmp_path / "sweep"
    assert cli.sweep_main([*TINY, "--methods", "dense", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    hint = "plots need matplotlib: pip install 'ong_kernels[train]'"
    assert hint in printed.split("[1/1]")[0]  # said before training
    assert (out / "results.md").is_file() and (out / "summary.json").is_file()
    assert not list(out.rglob("*.png"))
    assert "accuracy_vs_sparsity.png not drawn" in printed
    assert "loss.png, accuracy.png and lr.png not drawn" in printed


def test_without_matplotlib_a_run_finishes_without_its_plots(tmp_path, capsys, no_matplotlib):
    run = tmp_path / "run"
    assert cli.train_main([*TINY, "--run-dir", str(run)]) == 0
    assert "pip install 'ong_kernels[train]'" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["complete"]
    assert not list(run.glob("*.png"))


@pytest.mark.parametrize("text", ["{x", "[]", "null", '{"epochs": 0}', '{"colour": 1}'])
def test_resume_with_a_damaged_config_json_names_it_and_exits_1(tmp_path, capsys, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    assert cli.train_main(["--resume", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'config.json'}:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["config.json", "results.json"])
def test_sweep_with_a_damaged_run_file_names_it_and_exits_1(tmp_path, capsys, name):
    out = tmp_path / "sweep"
    run = out / "resnet20-synthetic-dense-seed0"
    run.mkdir(parents=True)
    (run / name).write_text("{x")
    assert cli.sweep_main([*TINY, "--methods", "dense", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{run / name}: cannot be read as JSON" in err and "Traceback" not in err


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if a dataset is loaded (i.e. work started before the refusal)."""
    from ong_kernels.train import sweep, trainer

    def load(*args, **kwargs):
        raise AssertionError("loaded data before refusing")

    monkeypatch.setattr(trainer, "load_dataset", load)
    monkeypatch.setattr(sweep, "load_dataset", load)


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, no_data):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert cli.train_main([*TINY, "--run-dir", str(blocker / "run")]) == 1
    err = capsys.readouterr().err
    assert f"{blocker} is not a folder" in err and len(err.strip().splitlines()) == 1
    assert cli.sweep_main([*TINY, "--methods", "dense", "--out-dir", str(blocker / "d")]) == 1
    err = capsys.readouterr().err
    assert f"{blocker} is not a folder" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "x"


def test_main_job_refuses_an_out_dir_it_cannot_write_before_loading_data(
    tmp_path, capsys, monkeypatch
):
    from ong_kernels.train import main_job

    def load(*args, **kwargs):
        raise AssertionError("loaded data before refusing")

    monkeypatch.setattr(main_job, "load_dataset", load)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    args = ["--workers", "1", "--no-progress", "--out-dir", str(blocker / "job")]
    assert main_job.main(args) == 1
    err = capsys.readouterr().err
    assert f"{blocker} is not a folder" in err and len(err.strip().splitlines()) == 1


def test_on_a_terminal_without_tqdm_a_run_trains_without_bars(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    args = [a for a in TINY if a != "--no-progress"]
    assert cli.train_main([*args, "--run-dir", str(tmp_path / "run")]) == 0
    assert "progress bars need tqdm: pip install 'ong_kernels[train]'" in capsys.readouterr().out


def test_a_finished_run_whose_checkpoint_was_deleted_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TINY, "--method", "random", "--sparsity", "0.5", "--run-dir", str(run)]
    assert cli.train_main(args) == 0
    (run / "checkpoint.pt").unlink()  # e.g. to save space once the run is done
    results = (run / "results.json").read_bytes()
    capsys.readouterr()
    assert cli.train_main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run (results.json)" in err and "cannot be continued" in err
    assert (run / "results.json").read_bytes() == results
