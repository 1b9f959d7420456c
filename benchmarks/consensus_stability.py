"""Consensus ONG (issue 19): how stable is the mask, and what do k restarts cost?

    python -m benchmarks.consensus_stability [--models resnet20 resnet56] [--ks 1 2 4 8 16]
                                             [--sparsities 0.9 0.98] [--json FILE]
    python -m benchmarks.consensus_stability --timing-only --models resnet56 resnet18 --ks 1 8

Stability: for every k, two consensus masks from DISJOINT seed sets (seeds 0..k-1 and
1000..1000+k-1), each the mean of k restarts' W H (``ong_scores(restarts=k)``); their IoU is
how far the consensus still depends on its starts (k = 1: two single random starts). Also
per k: the restarts' mean agreement with their own consensus mask (what ``PruneResult``
reports), and the consensus mask's IoU with the nndsvda mask (today's ONG) and with the
magnitude mask; and, per model, the IoU of two nndsvda masks whose randomized SVDs have
seeds 0 and 1 (why restarts of NNDSVD are refused). Models at initialisation, built as
``ong_kernels.train.models`` builds them (torch.manual_seed(0), one input channel, 10
classes: the Fashion-MNIST networks), global scope, ONG's defaults otherwise (rank 0.25,
max_iter 200, tol 1e-4). Two random masks at density d overlap about d / (2 - d): 0.053 at
90%, 0.010 at 98%.

Time: the whole ``ong_scores`` call (checks, starts, solve, W H), k restarts in one call
against the same k restarts as k single calls (seeds 0..k-1, ``init="random"``), min of
``--reps`` interleaved repeats each, after one warm-up call, as CPU time of the process (run
with one torch thread: the work itself, not the shared machine's load) and as wall time: a
ratio <= 1 means the batching costs no more than running the restarts one by one; "one call /
one restart" divides by the mean single call (k times it is the loop).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ong_kernels.pruning import mask_overlap, masks_from_scores, ong_scores
from ong_kernels.pruning.allocation import allocate
from ong_kernels.pruning.ong import _ong
from ong_kernels.pruning.targets import prunable_parameters
from ong_kernels.train.models import build_model

SECOND_SET = 1000  # the second seed set starts here: disjoint from the first for k <= 1000


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, num_classes=10)


def _consensus(model, k: int, seed: int, sparsities):
    """{sparsity: (masks dict, agreement or None)} of one consensus (one solve)."""
    targets = prunable_parameters(model)
    names = [n for n, _ in targets]
    scored = _ong(model, targets, init="random", restarts=k, seed=seed)
    out = {}
    for s in sparsities:
        masks = allocate(scored.scores, s, "global")
        agreement = None if scored.agreement is None else scored.agreement(masks).mean
        out[s] = (dict(zip(names, masks, strict=True)), agreement)
    return out


def stability(name: str, ks, sparsities, log) -> list[dict]:
    model = model_of(name)
    today = ong_scores(model)  # nndsvda: today's ONG
    base = {s: masks_from_scores(today, s) for s in sparsities}
    # What restarts of NNDSVD would give: its only seed is the randomized SVD's.
    other = ong_scores(model, seed=1)
    nndsvd_seeds = {s: mask_overlap(base[s], masks_from_scores(other, s)) for s in sparsities}
    magnitude = {
        s: masks_from_scores({n: p.detach().abs() for n, p in prunable_parameters(model)}, s)
        for s in sparsities
    }
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        a = _consensus(model, k, 0, sparsities)
        b = _consensus(model, k, SECOND_SET, sparsities)
        log(f"{name} k={k}: two consensus sets in {time.perf_counter() - t0:.1f} s")
        for s in sparsities:
            (ma, agree_a), (mb, agree_b) = a[s], b[s]
            rows.append(
                {
                    "model": name, "k": k, "sparsity": s,
                    "iou_disjoint_seeds": mask_overlap(ma, mb),
                    "agreement": None if agree_a is None else (agree_a + agree_b) / 2,
                    "iou_vs_nndsvda": (mask_overlap(ma, base[s]) + mask_overlap(mb, base[s])) / 2,
                    "iou_nndsvda_seed0_vs_seed1": nndsvd_seeds[s],
                    "iou_vs_magnitude": (
                        mask_overlap(ma, magnitude[s]) + mask_overlap(mb, magnitude[s])
                    ) / 2,
                }
            )  # fmt: skip
    return rows


def _timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of fn(). With one torch thread the CPU
    time is the work itself, whatever else the shared machine runs; the wall time is not."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def timing(name: str, ks, reps: int, log) -> list[dict]:
    model = model_of(name)
    ong_scores(model, init="random")  # warm-up (first-call costs: thread pools, caches)
    rows = []
    for k in ks:
        if k == 1:
            continue
        batched, loop = [], []
        for _ in range(reps):  # interleaved: the machine's load hits both alike
            batched.append(_timed(lambda k=k: ong_scores(model, init="random", restarts=k)))
            calls = [_timed(lambda j=j: ong_scores(model, init="random", seed=j)) for j in range(k)]
            loop.append(tuple(map(sum, zip(*calls, strict=True))))
        cpu, wall = min(b[0] for b in batched), min(b[1] for b in batched)
        cpu_loop, wall_loop = min(x[0] for x in loop), min(x[1] for x in loop)
        log(f"{name} k={k}: one call {cpu:.2f} s CPU, {k} calls {cpu_loop:.2f} s CPU")
        rows.append(
            {"model": name, "k": k, "cpu_one_call_s": cpu, "cpu_k_calls_s": cpu_loop,
             "cpu_ratio": cpu / cpu_loop, "cpu_per_restart_s": cpu_loop / k,
             "wall_one_call_s": wall, "wall_k_calls_s": wall_loop, "wall_ratio": wall / wall_loop,
             "reps": reps, "threads": torch.get_num_threads()}
        )  # fmt: skip
    return rows


def markdown(stab: list[dict], times: list[dict]) -> str:
    lines = []
    if stab:
        lines += [
            "| model | sparsity | k | IoU, disjoint seed sets | restarts' agreement | "
            "IoU vs nndsvda | IoU vs magnitude |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        seen = {}
        for r in stab:
            seen[(r["model"], r["sparsity"])] = r["iou_nndsvda_seed0_vs_seed1"]
        for r in stab:
            agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
            lines.append(
                f"| {r['model']} | {r['sparsity']:g} | {r['k']} | {r['iou_disjoint_seeds']:.3f} "
                f"| {agree} | {r['iou_vs_nndsvda']:.3f} | {r['iou_vs_magnitude']:.3f} |"
            )
        lines += [
            "",
            "nndsvda (restarts=1), seed 0 vs seed 1 (the randomized SVD's seed): "
            + ", ".join(f"{m} {sp:g}: IoU {v:.4f}" for (m, sp), v in seen.items()),
        ]
    if times:
        lines += [
            "",
            "| model | k | one call of k restarts, CPU s | k single calls, CPU s | "
            "one call / k calls (CPU) | one call / one restart (CPU) | one call / k calls (wall) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in times:
            lines.append(
                f"| {r['model']} | {r['k']} | {r['cpu_one_call_s']:.2f} | "
                f"{r['cpu_k_calls_s']:.2f} | {r['cpu_ratio']:.2f} | "
                f"{r['cpu_one_call_s'] / r['cpu_per_restart_s']:.2f}x | {r['wall_ratio']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.98])
    parser.add_argument("--reps", type=int, default=3, help="paired timing repeats (min)")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    stab, times = [], []
    for name in args.models:
        if not args.timing_only:
            stab += stability(name, args.ks, args.sparsities, log)
        if not args.no_timing:
            times += timing(name, args.ks, args.reps, log)
    print(markdown(stab, times))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"stability": stab, "timing": times}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
