"""Every piece of advice the trainer, the sweep and the checkpoint code give leads to a working
command (issue 29 row 5): each test below hits a message, does what it says, and checks that
the command it names then works. The issue's dead end was a finished run with a damaged
checkpoint: "delete it to restart the run", after which --resume found no checkpoint and the
plain command refused the folder for its results.json."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import TINY_TRAIN

from ong_kernels.train import cli
from ong_kernels.train.checkpoint import read_json_object

TINY = [*TINY_TRAIN, "--epochs", "1", "--method", "random", "--sparsity", "0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _error(main, argv, capsys, code) -> str:
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _follow_rm(err: str) -> None:
    """Do the message's 'rm FILES, then ...'."""
    (files,) = re.findall(r": rm (.+?), then ", err)
    for name in shlex.split(files):
        Path(name).unlink()


def _finished(run: Path, epochs: int = 1) -> bool:
    results = read_json_object(run / "results.json")
    return results["complete"] and results["epochs_completed"] == epochs


@pytest.fixture
def finished(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--run-dir", str(run)]
    assert cli.train_main(args) == 0
    return run, args


def test_a_damaged_checkpoint_of_a_finished_run_says_what_to_delete(finished, capsys):
    run, args = finished
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    resume = ["--resume", "--run-dir", str(run), "--epochs", "2"]
    err = _error(cli.train_main, resume, capsys, 1)
    assert "cannot be loaded" in err
    assert f"rm {run / 'checkpoint.pt'} {run / 'results.json'}, then run the same" in err
    # Its other way out first: another --run-dir.
    assert cli.train_main([*args, "--run-dir", str(run.parent / "other")]) == 0
    _follow_rm(err)
    assert cli.train_main(args) == 0  # "run the same command without --resume"
    assert _finished(run)


def test_a_finished_run_without_its_checkpoint_can_be_trained_again(finished, capsys):
    run, args = finished
    (run / "checkpoint.pt").unlink()  # e.g. deleted to save space
    err = _error(cli.train_main, ["--resume", "--run-dir", str(run)], capsys, 1)
    assert "no checkpoint to resume from: the run finished" in err
    err_plain = _error(cli.train_main, args, capsys, 2)
    assert "already holds a run (results.json)" in err_plain
    assert f"rm {run / 'results.json'}, then run the same command" in err_plain
    _follow_rm(err)
    assert cli.train_main(args) == 0
    assert _finished(run)


def test_resume_without_any_checkpoint_says_to_start_the_run(finished, capsys):
    run, args = finished
    for name in ("checkpoint.pt", "results.json"):  # as a run killed in its first epoch
        (run / name).unlink()
    err = _error(cli.train_main, ["--resume", "--run-dir", str(run)], capsys, 1)
    assert "run the same command without --resume" in err
    assert cli.train_main(args) == 0
    assert _finished(run)


def test_a_run_folder_in_use_names_the_resume_command(finished, capsys):
    run, args = finished
    err = _error(cli.train_main, [*args, "--epochs", "2"], capsys, 2)
    (command,) = re.findall(r"continue it with (--resume --run-dir \S+),", err)
    assert cli.train_main([*args, "--epochs", "2", *shlex.split(command)]) == 0
    assert _finished(run, epochs=2)


def test_resume_with_changed_settings_says_how_to_resume(finished, capsys):
    run, _ = finished
    err = _error(cli.train_main, ["--resume", "--run-dir", str(run), "--lr", "0.05"], capsys, 1)
    assert "resume it without those options" in err and "lr: saved 0.1, now 0.05" in err
    assert cli.train_main(["--resume", "--run-dir", str(run), "--epochs", "2"]) == 0
    assert _finished(run, epochs=2)


def test_a_damaged_checkpoint_in_a_sweep_says_what_to_delete(tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep = [*[a for a in TINY if a not in ("--method", "random", "--sparsity", "0.5")],
             "--methods", "random", "--sparsities", "0.5", "--out-dir", str(out)]  # fmt: skip
    assert cli.sweep_main(sweep) == 0
    run = out / "resnet20-synthetic-random-0.5-seed0"
    (run / "results.json").unlink()  # unfinished: the sweep resumes it
    (run / "checkpoint.pt").write_bytes(b"damaged")
    err = _error(cli.sweep_main, sweep, capsys, 1)
    assert "(ong-sweep: the same command)" in err
    _follow_rm(err)
    assert cli.sweep_main(sweep) == 0
    assert _finished(run)


def test_divergence_says_how_to_train_again(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--run-dir", str(run)]
    err = _error(cli.train_main, [*args, "--lr", "1e30"], capsys, 1)
    assert "diverged" in err and "lower --lr" in err
    (other,) = re.findall(r"train into (another --run-dir)", err)
    assert other
    assert cli.train_main([*args, "--run-dir", str(tmp_path / "other")]) == 0
