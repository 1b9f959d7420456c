"""One sweep per out-dir at a time, and sweep workers that do not outlive their sweep.

Two sweeps training into one ``--out-dir`` (a second terminal, two scheduler jobs) would train
the same run folders at once. ``OutDirLock`` takes an exclusive ``flock`` on
``OUT_DIR/.ong-sweep.lock`` before the sweep plans anything and records the holder in it (pid,
host, start time); a second sweep stops at once with one line naming that holder. The kernel
drops a flock when its process dies, however it dies, so a killed sweep's lock is free: the
next sweep takes it over and says whose it was (the file still names the dead holder; a sweep
that ends normally empties it).

A sweep's worker processes (``--workers N``) hold a shared flock on
``OUT_DIR/.ong-sweep.workers.lock`` while they live. When the sweep is killed (OOM killer, a
job's time limit), each worker notices within ``PARENT_POLL_S`` that its parent is gone and
stops at its next safe point: a worker waiting for a run exits at once; a training worker
finishes its current epoch, writes that epoch's complete checkpoint (atomically, as every
epoch) and exits. Until the last one has exited, a new sweep is refused with one line saying
so: no run is ever trained by two processes. Polling ``os.getppid()`` is used rather than
``PR_SET_PDEATHSIG``, whose signal would arrive at any moment, mid-write included.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import RunFolderError
from .trainer import StopTraining

__all__ = ["LOCK_NAME", "WORKERS_LOCK_NAME", "OutDirBusyError", "OutDirLock"]

LOCK_NAME = ".ong-sweep.lock"
WORKERS_LOCK_NAME = ".ong-sweep.workers.lock"
# How often a worker checks that its sweep is alive: a read of its parent pid, ~1 us.
PARENT_POLL_S = 0.5


class OutDirBusyError(RuntimeError):
    """Another sweep (or the workers of a killed one) is training into the out-dir."""


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise RunFolderError(f"{path}: cannot create the sweep's lock ({err.strerror})") from None


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class OutDirLock:
    """The exclusive lock of one sweep on its out-dir (see the module docstring).

    ``acquire()`` creates the folder if needed; ``release()`` empties the record and unlocks.
    ``say`` gets the one line when a dead sweep's lock is taken over."""

    def __init__(self, out_dir: str | os.PathLike, say: Callable[[str], None] = print):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.workers_path = self.out_dir / WORKERS_LOCK_NAME
        self._say = say
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"{self.out_dir}: cannot create ({err.strerror})") from None
        fd = _open(self.path)
        if not _try_flock(fd, fcntl.LOCK_EX):
            holder = _read(fd) or "a process that has not yet recorded itself"
            os.close(fd)
            raise OutDirBusyError(
                f"{self.out_dir}: another ong-sweep is training into this folder ({holder}); "
                "wait for it to end, or choose another --out-dir"
            )
        previous = _read(fd)
        workers = _open(self.workers_path)
        try:
            if not _try_flock(workers, fcntl.LOCK_EX):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise OutDirBusyError(
                    f"{self.out_dir}: worker processes of a killed ong-sweep "
                    f"({previous or 'holder unknown'}) are still training here; each stops "
                    "after writing its current epoch's checkpoint: re-run when they are gone"
                )
            fcntl.flock(workers, fcntl.LOCK_UN)
        finally:
            os.close(workers)
        if previous:
            self._say(
                f"{self.out_dir}: taking over the lock of a sweep that is gone ({previous}); "
                "its unfinished runs resume from their last checkpoints"
            )
        record = f"pid {os.getpid()} on host {socket.gethostname()}, since " + time.strftime(
            "%Y-%m-%d %H:%M:%S %Z"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record: the next sweep takes over nothing
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> OutDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- workers

# Per worker process: whether a run is being trained, and whether the sweep is gone.
_state = threading.Lock()
_training = False
_parent_gone = threading.Event()
_workers_fd: int | None = None


def init_worker(out_dir: str, parent_pid: int) -> None:
    """ProcessPoolExecutor initializer: hold the workers' shared lock for this process's
    life, and watch the parent."""
    global _workers_fd
    _workers_fd = _open(Path(out_dir) / WORKERS_LOCK_NAME)
    fcntl.flock(_workers_fd, fcntl.LOCK_SH)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    with _state:
        _parent_gone.set()
        if not _training:  # waiting for a run that will never come: nothing to finish
            os._exit(0)


def stop_if_orphaned(trainer, epoch: int, metrics) -> None:
    """Trainer callback, called after each epoch's checkpoint is written: stop training
    there when the sweep is gone."""
    if _parent_gone.is_set():
        raise StopTraining


def start_run() -> None:
    """Before a run: exit at once when the sweep is already gone (no run is started)."""
    global _training
    with _state:
        if _parent_gone.is_set():
            os._exit(0)
        _training = True


def end_run() -> None:
    """After a run (finished or stopped): exit at once when the sweep is gone (its result
    has no reader; the run's folder holds its complete checkpoint)."""
    global _training
    with _state:
        _training = False
        if _parent_gone.is_set():
            os._exit(0)
