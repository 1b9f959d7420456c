"""CPU time of `torchrun --nproc-per-node 2 ong-mask` against one process (issue 16, item 5).

    nice -n 5 .venv/bin/python -m benchmarks.mask_torchrun --layers 2 --repeats 3

The checkpoint is bench_stream's TinyLlama-shaped fp16 layer set (per layer 4 x 2048^2,
3 x 5632 x 2048: 51.4M weights, 103 MB). Every run is `--init random --tol 0 --max-iter 50`
(the same iterations everywhere) at the CLI's default rank 64. The runs are interleaved
(one process with its default threads, one process with 1 thread, torchrun with 2 ranks of
1 thread each, as torchrun sets OMP_NUM_THREADS), `repeats` times; CPU time is the user +
system time of the command's process tree (getrusage(RUSAGE_CHILDREN) around it: torchrun
waits for its ranks, so theirs is included). The torchrun masks are checked equal to the
1-thread process's.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.bench_stream import write_checkpoint
from ong_kernels.pruning import load_masks

SOLVE = ["--init", "random", "--tol", "0", "--max-iter", "50", "--no-progress"]


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK")}
    with tempfile.TemporaryDirectory() as folder:
        ckpt = os.path.join(folder, "model.safetensors")
        n = write_checkpoint(ckpt, args.layers)
        size = os.path.getsize(ckpt) / 1e6
        one = [sys.executable, "-m", "ong_kernels.mask_cli", ckpt, *SOLVE]
        two = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", "-m", "ong_kernels.mask_cli", ckpt, *SOLVE,
        ]  # fmt: skip
        runs = {
            f"one process, {torch.get_num_threads()} threads": (one, {}),
            "one process, 1 thread": (one, {"OMP_NUM_THREADS": "1"}),
            "torchrun, 2 ranks x 1 thread": (two, {"OMP_NUM_THREADS": "1"}),
        }
        best = {name: (float("inf"), float("inf")) for name in runs}
        for _ in range(args.repeats):
            for i, (name, (cmd, extra)) in enumerate(runs.items()):
                out = os.path.join(folder, f"masks{i}.safetensors")
                wall, cpu = timed([*cmd, "-o", out], {**env, **extra})
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        a, b = (load_masks(os.path.join(folder, f"masks{i}.safetensors")) for i in (1, 2))
        same = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{n:,} weights ({size:.0f} MB fp16), {' '.join(SOLVE)}, min of {args.repeats}")
    print(f"load average now: {os.getloadavg()[0]:.1f}; masks torchrun == 1 thread: {same}")
    bases = [cpu for _, cpu in list(best.values())[:2]]
    print(f"{'run':32s} {'wall s':>8s} {'CPU s':>8s} {'CPU / each one-process run':>28s}")
    for name, (wall, cpu) in best.items():
        ratios = " / ".join(f"{cpu / base:.2f}" for base in bases)
        print(f"{name:32s} {wall:8.1f} {cpu:8.1f} {ratios:>28s}")


if __name__ == "__main__":
    main()
