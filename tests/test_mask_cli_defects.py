"""ong-mask's defects of issue 28 (c-g), each failing on 497e058: ranks reading different
files with one header, a symlinked -o, a bad --rank, an unwritable masks file, Ctrl-C."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_two
from safetensors.torch import save_file
from test_mask_cli_distributed import (
    REPO,
    SOLVE,
    TIMEOUT_S,
    assert_same_masks,
    one_process,
    tensors,
    write,
)

from ong_kernels import load_masks, save_masks
from ong_kernels.mask_cli import main


def _env() -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _one_line(err: str, message: str) -> None:
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- (c)


def _worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 3),
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        # "other": rank 1 reads an older save (same names, shapes, dtypes; other values);
        # "copy": rank 1 reads a byte-for-byte copy (another inode): the same checkpoint.
        for case, theirs in (("other", "older"), ("copy", "copy")):
            ckpt = f"{folder}/{'model' if rank == 0 else theirs}.safetensors"
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main([ckpt, "--sparsity", "0.5", *SOLVE, "-o", f"{folder}/{case}.out"])
            Path(f"{folder}/{case}.{rank}.txt").write_text(f"{code}\n{err.getvalue()}")
    finally:
        dist.destroy_process_group()


def test_ranks_reading_files_with_one_header_but_other_content_are_refused(tmp_path):
    write(tmp_path / "model.safetensors")
    older = {n: (t * 2 if t.dim() >= 2 else t) for n, t in tensors().items()}
    save_file(older, str(tmp_path / "older.safetensors"))
    shutil.copyfile(tmp_path / "model.safetensors", tmp_path / "copy.safetensors")
    spawn_two(_worker, free_port(), str(tmp_path), timeout=TIMEOUT_S)
    for rank in range(2):
        text = (tmp_path / f"other.{rank}.txt").read_text()
        assert text.startswith("2\n") and "same header but other content" in text, text
        assert (tmp_path / f"copy.{rank}.txt").read_text().startswith("0\n")
    assert not (tmp_path / "other.out").exists()
    one = tmp_path / "one.safetensors"
    assert one_process([str(tmp_path / "model.safetensors"), "--sparsity", "0.5", *SOLVE,
                        "-o", str(one)]) == 0  # fmt: skip
    assert_same_masks(one, tmp_path / "copy.out")


# ----------------------------------------------------------------------------- (d)


def test_a_symlinked_output_is_written_through_to_its_target(tmp_path, capsys):
    ckpt = write(tmp_path / "model.safetensors")
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "masks.safetensors"
    args = [str(ckpt), "--method", "magnitude", "--no-progress"]
    assert main([*args, "--sparsity", "0.2", "-o", str(target)]) == 0
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    assert main([*args, "--sparsity", "0.7", "-o", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    masks = load_masks(target)
    kept = sum(int(m.sum()) for m in masks.values())
    n = sum(m.numel() for m in masks.values())
    assert kept == n - round(0.7 * n)
    # save_masks alike; the temporary file lived beside the target, and is gone.
    save_masks(link, {"a": torch.ones(3, dtype=torch.bool)})
    assert link.is_symlink() and list(load_masks(target)) == ["a"]
    assert not list(tmp_path.rglob(".*tmp"))


# ----------------------------------------------------------------------------- (e)


@pytest.mark.parametrize("rank", ["0", "-3"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bad_rank_is_one_line_and_exit_2(tmp_path, capsys, rank, dry_run):
    ckpt = write(tmp_path / "model.safetensors")
    out = tmp_path / "masks.safetensors"
    extra = ["--dry-run"] if dry_run else []
    assert main([str(ckpt), "--rank", rank, *extra, "-o", str(out)]) == 2
    _one_line(capsys.readouterr().err, f"rank must be >= 1, got {rank}")
    assert not out.exists()


# ----------------------------------------------------------------------------- (f)


def test_a_masks_file_over_the_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path):
    ckpt = write(tmp_path / "model.safetensors")
    out = tmp_path / "masks.safetensors"
    args = [str(ckpt), "--method", "magnitude", "--no-progress", "-o", str(out)]
    assert main([*args, "--sparsity", "0.2"]) == 0
    before = out.read_bytes()
    # The masks file is ~1 KB; a 256-byte limit makes its write fail with EFBIG (Python
    # ignores SIGXFSZ, so the write returns the error instead of killing the process).
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))\n"
        "from ong_kernels.mask_cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args, "--sparsity", "0.7"], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    _one_line(proc.stderr, "is unchanged")
    assert proc.stderr.startswith("ong-mask: error:") and "File too large" in proc.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors", "model.safetensors"]


# ----------------------------------------------------------------------------- (g)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    ckpt = write(tmp_path / "model.safetensors")
    out = tmp_path / "masks.safetensors"
    # A real SIGINT, delivered while the factors are being computed. Python's own handler is
    # installed first: a shell that starts the suite in the background makes its children
    # ignore SIGINT, and Python then leaves it ignored.
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from ong_kernels.pruning import stream\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "stream.ong_factors = interrupted\n"
        "from ong_kernels.mask_cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [str(ckpt), "--sparsity", "0.5", *SOLVE, "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    _one_line(proc.stderr, "ong-mask: interrupted")
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
