"""ong-mask refuses, before any work, what would lose data or fail at the end."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from ong_kernels import load_masks, mask_cli
from ong_kernels.pruning.checkpoint import Checkpoint


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(6, 10), "b.weight": torch.randn(5, 6)}, str(path))
    monkeypatch.chdir(tmp_path)
    return path


def _args(checkpoint, output, *extra):
    return [str(checkpoint), "--rank", "2", "--max-iter", "5", *extra, "-o", str(output)]


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if ong-mask reads a tensor."""

    def read(self, entry):
        raise AssertionError(f"read {entry.name} before refusing")

    monkeypatch.setattr(Checkpoint, "read", read)


def _one_line_error(capsys, message):
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""  # refused before the plan is even printed


@pytest.mark.parametrize("how", ["same", "relative", "absolute", "symlink", "hardlink", "dotdot"])
def test_output_that_is_the_checkpoint_is_refused_before_any_work(
    checkpoint, tmp_path, capsys, no_work, how
):
    before = checkpoint.read_bytes()
    if how == "symlink":
        output = tmp_path / "link.safetensors"
        output.symlink_to(checkpoint)
    elif how == "hardlink":
        output = tmp_path / "hard.safetensors"
        os.link(checkpoint, output)
    else:
        output = {
            "same": checkpoint,
            "relative": "model.safetensors",
            "absolute": checkpoint.resolve(),
            "dotdot": f"../{tmp_path.name}/./model.safetensors",
        }[how]
    assert mask_cli.main(_args(checkpoint, output)) == 2
    _one_line_error(capsys, "is the checkpoint")
    assert checkpoint.read_bytes() == before


def _unwritable(folder: str) -> bool:
    try:
        fd, path = tempfile.mkstemp(dir=folder)
    except OSError:
        return os.path.isdir(folder)
    os.close(fd)
    os.unlink(path)
    return False


def test_unwritable_output_is_refused_before_any_work(checkpoint, tmp_path, capsys, no_work):
    (tmp_path / "dir").mkdir()
    cases = [
        (tmp_path / "missing" / "m.safetensors", "does not exist"),
        (tmp_path / "dir", "is a folder"),
        ("/dev/null", "not a regular file"),
    ]
    if _unwritable("/sys"):  # sysfs refuses new files even to root
        cases.append(("/sys/m.safetensors", "cannot create files in '/sys'"))
    for output, message in cases:
        assert mask_cli.main(_args(checkpoint, output)) == 2, output
        _one_line_error(capsys, message)


def test_a_failed_write_leaves_the_old_masks_file_and_no_temporary_file(
    checkpoint, tmp_path, capsys, fill_disk
):
    output = tmp_path / "masks.safetensors"
    magnitude = ["--method", "magnitude"]  # the same write as ONG's, without the NMF
    assert mask_cli.main(_args(checkpoint, output, *magnitude)) == 0
    before = output.read_bytes()

    fill_disk()
    capsys.readouterr()
    assert mask_cli.main(_args(checkpoint, output, *magnitude, "--sparsity", "0.9")) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "unchanged" in err and "Traceback" not in err
    assert output.read_bytes() == before and load_masks(output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors", "model.safetensors"]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "'cuda' requested but CUDA is not available"),
        ("cuda:3", "'cuda:3' requested but CUDA is not available"),
        ("bogus", "'bogus' is not a device"),
        ("meta", "holds no data"),
    ],
)
def test_bad_device_is_one_line(checkpoint, capsys, monkeypatch, no_work, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mask_cli.main(_args(checkpoint, "m.safetensors", "--device", device)) == 2
    _one_line_error(capsys, message)


@pytest.mark.parametrize("sparsity", ["1.5", "nan", "-0.1"])
def test_bad_sparsity_is_refused_before_the_scoring(checkpoint, capsys, no_work, sparsity):
    assert mask_cli.main(_args(checkpoint, "m.safetensors", "--sparsity", sparsity)) == 2
    _one_line_error(capsys, "--sparsity: sparsity must be")


def test_progress_bar_only_on_a_terminal(checkpoint, capfd, monkeypatch):
    # pytest's captured stderr is not a terminal: no bar, even without --no-progress.
    assert mask_cli.main(_args(checkpoint, "m.safetensors")) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "nmf" not in err
    # On a terminal the bar is drawn (through nmf_batched's streaming).
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = []
    from ong_kernels.pruning import stream

    original = stream.ong_factors

    def spy(weights, settings, streaming, **kw):
        shown.append(streaming.progress)
        return original(weights, settings, streaming, **kw)

    monkeypatch.setattr(stream, "ong_factors", spy)
    assert mask_cli.main(_args(checkpoint, "m.safetensors")) == 0
    assert shown == [True]


def test_on_a_terminal_without_tqdm_there_is_a_note_not_a_traceback(
    checkpoint, capsys, monkeypatch
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert mask_cli.main(_args(checkpoint, "m.safetensors")) == 0
    assert "no progress bar: it needs tqdm" in capsys.readouterr().err


def test_a_budget_too_small_for_a_later_tensor_is_refused_before_any_read(
    tmp_path, capsys, monkeypatch, no_work
):
    path = tmp_path / "two.safetensors"  # the second tensor, in file order, is the big one
    # ~70 KiB for a (the C++ kernel's per-thread scratch), ~1 MiB for b
    save_file({"a.weight": torch.rand(4, 4), "b.weight": torch.rand(400, 600)}, str(path))
    args = [str(path), "--rank", "2", "--memory-budget", "300KB", "-o", "m.safetensors"]
    assert mask_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "b.weight (shape [400, 600], rank 2) needs" in err and "--memory-budget" in err
    assert len(err.strip().splitlines()) == 1
