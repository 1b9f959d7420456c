"""One sweep per out-dir, and no worker outlives its sweep (issue 29 rows 3-4).

A second ong-sweep on a busy --out-dir stops at once with one line naming the holder (pid and
host) and trains nothing; a killed sweep's lock is taken over, and says so. When `ong-sweep
--workers 2` is SIGKILLed (OOM killer, a job's time limit), its workers stop after their next
complete checkpoint and exit; the same command then takes over and finishes the runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_TRAIN

from ong_kernels.train import cli
from ong_kernels.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, read_json_object

TINY = TINY_TRAIN
SWEEP = [sys.executable, "-c", "import sys; from ong_kernels.train.cli import sweep_main; "
         "sys.exit(sweep_main())"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _hold(code: str, out_dir: Path) -> subprocess.Popen:
    """A process that runs `code` (which takes a lock in `out_dir`), then waits to be killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time\n{code}\nprint('held', flush=True)\n"
         "time.sleep(300)", str(out_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def _kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    process.stdout.close()


def test_a_second_sweep_names_the_holder_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    holder = _hold(
        "from ong_kernels.train.sweep_lock import OutDirLock\n"
        "OutDirLock(sys.argv[1]).acquire()", out,
    )  # fmt: skip
    try:
        argv = ["--methods", "dense", "--epochs", "1", "--out-dir", str(out), *TINY]
        assert cli.sweep_main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err
        assert "another ong-sweep is training into this folder" in err
        assert not [p for p in out.iterdir() if p.is_dir()]  # nothing planned or trained
    finally:
        _kill(holder)
    # The holder is gone (killed: its record is still in the file): taken over, and said.
    assert cli.sweep_main(argv) == 0
    said = capsys.readouterr().out
    assert f"taking over the lock of a sweep that is gone (pid {holder.pid} on host" in said
    assert read_json_object(out / "resnet20-synthetic-dense-seed0" / "results.json")["complete"]
    # A sweep that ends normally leaves an empty record: the next one takes over nothing.
    assert cli.sweep_main(argv) == 0
    assert "taking over" not in capsys.readouterr().out


def test_workers_of_a_killed_sweep_still_training_stop_a_new_sweep(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    worker = _hold(
        "import fcntl, os\n"
        "fd = os.open(sys.argv[1] + '/.ong-sweep.workers.lock', os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH)", out,
    )  # fmt: skip
    try:
        argv = ["--methods", "dense", "--epochs", "1", "--out-dir", str(out), *TINY]
        assert cli.sweep_main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "worker processes of a killed ong-sweep" in err
        assert not [p for p in out.iterdir() if p.is_dir()]
    finally:
        _kill(worker)
    assert cli.sweep_main(argv) == 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited (init reaps it)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigkilled_sweep_leaves_no_worker_running_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    epochs = 40  # ~0.1 s each: a worker that ignored the kill would run on for seconds
    argv = ["--methods", "dense", "--seeds", "0", "1", "--workers", "2", "--epochs", str(epochs),
            "--out-dir", str(out), *TINY]  # fmt: skip
    log = tmp_path / "sweep.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        sweep = subprocess.Popen([*SWEEP, *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    workers: list[int] = []
    try:
        _wait_for(lambda: "epoch 1/" in log.read_text() or sweep.poll() is not None, 120,
                  "a worker's first epoch")  # fmt: skip
        assert sweep.poll() is None, log.read_text()
        workers = _children(sweep.pid)  # the pool's workers (and multiprocessing's helper)
        assert len(workers) >= 2
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
        _wait_for(lambda: not any(_running(p) for p in workers), 60, "the workers to exit")
    finally:
        for pid in workers:  # only if the test failed: never leave them behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2
    stopped = 0
    for run in runs:
        assert not list(run.glob(".*.tmp"))  # nothing was killed mid-write
        if (run / "results.json").exists():  # finished before the kill was noticed
            continue
        state = load_checkpoint(run / CHECKPOINT_NAME)  # complete, checksum verified
        assert 1 <= state["epoch"] < epochs
        stopped += 1
    assert stopped >= 1, log.read_text()
    # The same command takes over the dead sweep's lock and finishes both runs.
    done = subprocess.run([*SWEEP, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"taking over the lock of a sweep that is gone (pid {sweep.pid}" in done.stdout
    for run in runs:
        results = read_json_object(run / "results.json")
        assert results["complete"] and results["epochs_completed"] == epochs
