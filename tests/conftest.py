"""Shared test helpers: the devices to run on, a tensor comparison that says where it fails, and
a fresh interpreter for code that must not share this process's imports."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. The variable is
# read when a kernel is decorated, so it is set before ong_kernels imports any Triton code.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ong_kernels


def available_devices() -> list[str]:
    """CPU always; CUDA when this machine has a GPU and the CUDA kernels were built."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


DEVICES = available_devices()

# Per-dtype (atol, rtol) for one fused step against the reference: the kernels may contract
# a*b+c into an FMA and accumulate half types in float32, so they differ by a few ulps.
STEP_TOLERANCES = {
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-12, 1e-10),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = ""
):
    """torch.testing.assert_close with NaN never equal and a report of the worst entries."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert not torch.isnan(actual).any(), (
        f"{what}: result has NaN at {torch.isnan(actual).nonzero()[:5].tolist()}"
    )
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()):
        worst = torch.topk(err.flatten(), min(5, err.numel())).indices
        rows = [
            f"  at {[int(x) for x in np.unravel_index(i, tuple(a.shape))]}: "
            f"got {a.flatten()[i]:.9g}, expected {e.flatten()[i]:.9g}"
            for i in worst.tolist()
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} entries differ (atol={atol}, rtol={rtol}), "
            f"max abs err {float(err.max()):.3g}\n" + "\n".join(rows)
        )


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (stable across runs: derived from the test id) so tests don't
    # all see the same "random" tensors, while a failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`).
    Its tiny models gain nothing from a second thread, and when other work shares the 2 cores
    OpenMP's waiting threads made the trainer tests 15x slower (measured: 120 s with 2 threads
    vs 8 s with 1 on the busy shared box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compiled_cpu() -> bool:
    return ong_kernels.backends_available()["cpu"]


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (this venv's), asserted to exit 0 (its stderr shown if
    not); the finished process, for its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc


# A tiny synthetic training setup (a run of one epoch takes about a second on one thread).
TINY_TRAIN = [
    "--dataset", "synthetic", "--synthetic-shape", "64", "32", "1", "8", "--width", "0.25",
    "--batch-size", "32", "--eval-batch-size", "32", "--device", "cpu", "--no-progress",
]  # fmt: skip

# The sparsifier-seam tests' run (test_train_methods, test_train_reparam): 160 synthetic
# images, batch 32, so 5 steps per epoch of a narrow ResNet-20 on 8x8 images. Copy before
# changing it (dict(SEAM_RUN, ...)).
SEAM_RUN = dict(
    model="resnet20",
    dataset="synthetic",
    width=0.5,
    epochs=4,
    batch_size=32,
    eval_batch_size=64,
    lr=0.05,
    sparsity=0.9,
    progress=False,
    device="cpu",
)
