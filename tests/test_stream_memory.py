"""Peak memory of ong-mask on a checkpoint far larger than its memory budget."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

# 90 float32 matrices of 2048 x 2048: 1.5 GB on disk, each alone ~151 MB in the NMF cost model.
MATRICES, SIDE = 90, 2048
SCRIPT = """
import resource, sys
from ong_kernels.mask_cli import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(sys.argv[1:])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("GROWTH_KIB", after - before)
sys.exit(code)
"""


@pytest.mark.slow
def test_peak_rss_growth_under_600mb(tmp_path):
    path = tmp_path / "big.safetensors"
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"layers.{i}.mlp.weight": torch.randn(SIDE, SIDE, generator=gen) for i in range(MATRICES)
    }
    save_file(tensors, str(path))
    del tensors
    out = tmp_path / "masks.safetensors"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                SCRIPT,
                str(path),
                "--method",
                "ong",
                "--rank",
                "2",
                "--max-iter",
                "2",
                "--init",
                "random",
                "--sparsity",
                "0.5",
                "--memory-budget",
                "256MiB",
                "--no-progress",
                "-o",
                str(out),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        path.unlink()
    assert proc.returncode == 0, proc.stderr
    growth_mib = int(proc.stdout.split("GROWTH_KIB")[1].split()[0]) / 1024
    print(f"peak RSS growth {growth_mib:.0f} MiB")
    assert growth_mib < 600, f"peak RSS grew by {growth_mib:.0f} MiB"
    n = MATRICES * SIDE * SIDE
    from ong_kernels import load_masks

    kept = sum(int(m.sum()) for m in load_masks(out).values())
    assert kept == n - round(0.5 * n)
