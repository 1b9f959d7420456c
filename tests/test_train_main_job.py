"""The main job end to end, on a small Fashion-MNIST-format folder the test writes."""

import gzip
import struct

import numpy as np
import pytest

from ong_kernels.train import main_job

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: why


def write_idx_gz(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 100)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_main_job_prints_the_comparison(fashion_dir, tmp_path, capsys):
    out = tmp_path / "job"
    args = ["--data-dir", str(fashion_dir), "--train-subset", "0", "--test-subset", "60"]
    args += ["--epochs", "2", "--sparsities", "0.9", "--workers", "1", "--device", "cpu"]
    args += ["--no-progress", "--out-dir", str(out)]
    assert main_job.main(args) == 0
    printed = capsys.readouterr().out
    # The counts are those of the folder given, not Fashion-MNIST's 60,000 / 10,000.
    assert "all 256 training images" in printed and "the first 60 of 100 test images" in printed
    assert "60,000" not in printed and "10,000" not in printed
    rows = {
        line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")
    }
    assert set(rows) == {"method", "dense", "ong", "magnitude", "gmp", "bimp"}
    assert "train images/s" in rows["method"] and "train time / run" in rows["method"]
    assert "sparsity before final cut" in rows["method"] and "after cut" in rows["method"]
    for method in ("ong", "magnitude", "gmp", "bimp"):
        assert "| 0.9000 " in rows[method]
    assert "| 0.0000 " in rows["dense"]
    assert "wall time:" in printed
    table = (out / "main_job.md").read_text()
    assert all(rows[m] in table for m in rows)
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "resnet20-fashion-mnist-ong-0.9-seed0" / "results.json").is_file()


def test_main_job_errors(tmp_path, capsys):
    args = ["--data-dir", str(tmp_path), "--workers", "1", "--no-progress"]
    assert main_job.main([*args, "--out-dir", str(tmp_path / "job")]) == 1
    assert str(tmp_path) in capsys.readouterr().err
    assert main_job.main(["--epochs", "0"]) == 2
    assert "epochs:" in capsys.readouterr().err
