"""Shared test helpers: the devices and CPU ISAs to run on, a tensor comparison that says where it
fails, runs killed mid-training, two-rank launches (torchrun or spawned), one-line CLI errors, and
a fresh interpreter for code that must not share this process's imports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

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


# Where the Triton kernels' own tests run: compiled on a GPU, else under the interpreter on
# CPU tensors (TRITON_INTERPRET, set above).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_runs_here() -> bool:
    from ong_kernels.backends.triton import _common

    return _common.available() and TRITON_DEVICE in _common.devices()


def _triton_hint() -> str:
    from ong_kernels.backends.triton import _common

    return _common.HINT


needs_triton = pytest.mark.skipif(
    not _triton_runs_here(), reason=f"triton unavailable: {_triton_hint()}"
)


def compiled_cpu() -> bool:
    return ong_kernels.backends_available()["cpu"]


def cpu_isas() -> list:
    """Every ISA this CPU and build can run (portable always), as pytest params; one skipped
    param when the C++ extension is not built."""
    from ong_kernels.backends import _native

    if not _native.has_cpu():
        return [pytest.param(None, marks=pytest.mark.skip(reason=_native.BUILD_HINT))]
    lib = _native.lib()
    best = int(lib.best_isa())
    return [
        pytest.param(isa.name, id=isa.name)
        for isa in lib.Isa.__members__.values() if int(isa) <= best
    ]  # fmt: skip


@pytest.fixture(params=cpu_isas())
def isa(request) -> str:
    """The test runs with the CPU kernels lowered to one ISA (ONG_KERNELS_ISA's effect); the
    ISA active before is restored after."""
    from ong_kernels.backends import _native

    lib = _native.lib()
    saved = lib.active_isa()
    lib.set_isa(lib.Isa.__members__[request.param])
    yield request.param
    lib.set_isa(saved)


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


# A training run killed by SIGKILL at the end of epoch argv[2] (after its checkpoint), on the
# seam tests' synthetic data: what a resume must continue bit for bit.
_KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys, torch
    torch.set_num_threads(1)
    from ong_kernels.train.config import TrainConfig
    from ong_kernels.train.data import make_synthetic
    from ong_kernels.train.trainer import Trainer
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    data = make_synthetic(160, 64, channels=3, size=8, seed=0)
    kill_at = int(sys.argv[2])
    def die(trainer, epoch, metrics):
        if epoch == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    Trainer(cfg, dataset=data, callbacks=[die], log=None).fit()
    """
)


@pytest.fixture
def fill_disk(monkeypatch):
    """A call that makes every later mask-file write fail as a full disk does: part of the
    file written, then ENOSPC (ong_kernels.pruning.io's safetensors writer replaced)."""
    from ong_kernels.pruning import io

    def torn(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    return lambda: monkeypatch.setattr(io, "save_file", torn)


def record_float32_allocations(monkeypatch, module) -> list[int]:
    """The bytes of every float32 tensor ``module._empty`` allocates from now on (a Triton
    backend's scratch), the allocations themselves unchanged (poisoned where the module
    poisons them)."""
    allocated = []
    empty = module._empty

    def recording(size, dtype, device):
        if dtype == torch.float32:
            allocated.append(4 * size)
        return empty(size, dtype, device)

    monkeypatch.setattr(module, "_empty", recording)
    return allocated


def train_until_killed(config, kill_at: int) -> None:
    """Trains ``config`` (a TrainConfig with a run_dir) in a fresh interpreter on
    ``make_synthetic(160, 64, channels=3, size=8, seed=0)`` and SIGKILLs it after epoch
    ``kill_at``; asserts it died by the signal."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, json.dumps(config.to_dict()), str(kill_at)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr


def torchrun_two(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 *args`` as users would run it: CPU only, one
    thread per rank, this checkout first on the path; the finished process."""
    repo = Path(ong_kernels.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port free on the loopback now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, *args, timeout: float) -> None:
    """``worker(rank, *args)`` on two spawned processes; fails the test after ``timeout``
    seconds (and terminates what still runs)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def assert_one_line_cli_error(run, run_dir: Path, capsys, message: str) -> None:
    """``run()`` (a CLI main) refuses with exit 2 and one error line containing ``message``
    (after argparse's usage line, for its own checks), before creating ``run_dir``."""
    try:
        code = run()
    except SystemExit as exit:  # argparse's own checks: usage, then one error line
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1]
    assert len(err) == 1 or err[0].startswith("usage:")
    assert not run_dir.exists()


def run_two_gloo_ranks(tmp_path: Path, worker: str, *args: str, timeout: float = 300) -> None:
    """Runs the script ``worker`` under torchrun as users would: 2 gloo ranks on the CPU, one
    thread each, this checkout first on the path; asserts both exit 0."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    proc = torchrun_two(str(script), *args, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
