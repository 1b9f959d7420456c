"""The whole user-visible NMF call at its defaults, broken down (issue 16).

Long single runs, not micro-benchmarks, so this is a script with one sub-command per table
of benchmarks/RESULTS.md (issue 16 section):

    .venv/bin/python -m benchmarks.bench_e2e llama      # validation + init vs MU iterations
    .venv/bin/python -m benchmarks.bench_e2e sketch     # the start's products, GFLOP/s
    .venv/bin/python -m benchmarks.bench_e2e prune      # prune(model, "ong") vs its solve
    .venv/bin/python -m benchmarks.bench_e2e mask       # ong-mask defaults vs --init random
    .venv/bin/python -m benchmarks.bench_e2e crossover  # exact vs randomized SVD (the rule)
    .venv/bin/python -m benchmarks.bench_e2e quality    # masks: randomized vs exact start
    .venv/bin/python -m benchmarks.bench_e2e defaults   # masks: default start vs LAPACK's

Every time is the minimum of --repeats runs (the machine is shared: the minimum is the least
disturbed). Weights are random (the kernels' time does not depend on the values).
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable

import torch

from benchmarks.shapes import bert_base_encoder, llama_block, resnet18, resnet20, resnet56
from benchmarks.shapes import prunable as prunable_specs
from ong_kernels import nmf_init
from ong_kernels.nmf import nmf_batched
from ong_kernels.nmf_init import gram_svd, initial_factors, randomized_svd, use_exact_svd
from ong_kernels.nmf_rules import Solver, as_matrix, check_values, kernel_input

SETS = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "bert_base": bert_base_encoder,
    "bert_2layers": lambda: bert_base_encoder(layers=2),
    "llama_layer": llama_block,
}


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def weights_of(name: str, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """|W| of the set at a Kaiming-uniform-like scale (what a model at init holds)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in prunable_specs(SETS[name]()):
        fan_in = max(1, spec.numel // spec.shape[0])
        w = (torch.rand(spec.shape, generator=g) * 2 - 1) / fan_in**0.5
        out.append(w.abs().to(dtype))
    return out


def ranks_of(ws, rank) -> list[int]:
    if isinstance(rank, float):
        return [max(1, round(rank * min(w.shape[0], w[0].numel()))) for w in ws]
    return [rank] * len(ws)


def breakdown(ws, rank, init: str, repeats: int) -> dict[str, float]:
    """Seconds of: the value checks, the start, one MU iteration (the op alone, 10 iterations
    at tol=0, divided by 10)."""
    ranks = ranks_of(ws, rank)
    largest = []
    t_check = best(lambda: largest.__setitem__(slice(None), [check_values(w, "w") for w in ws]),
                   repeats)  # fmt: skip
    mats = [kernel_input(w, hi)[0] for w, hi in zip(ws, largest, strict=True)]
    t_init = best(lambda: initial_factors(mats, ranks, init, 0), repeats)
    factors = initial_factors(mats, ranks, "random", 0)
    ten = Solver(max_iter=10, tol=0.0)
    t_iter = best(functools.partial(_solve_only, mats, factors, ten), repeats) / 10
    return {"check": t_check, "init": t_init, "iteration": t_iter}


def cmd_llama(args) -> None:
    ws = weights_of("llama_layer", torch.float16 if args.fp16 else torch.float32)
    print(f"one Llama-7B layer ({sum(w.numel() for w in ws) / 1e6:.0f}M weights, "
          f"{ws[0].dtype}), init {args.init}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| rank | checks s | init s | one MU iteration s | (checks + init) / iteration |")
    print("| --- | --- | --- | --- | --- |")
    for rank in args.ranks:
        b = breakdown(ws, rank, args.init, args.repeats)
        ratio = (b["check"] + b["init"]) / b["iteration"]
        print(f"| {rank} | {b['check']:.3f} | {b['init']:.3f} | {b['iteration']:.3f} | "
              f"{ratio:.1f} |", flush=True)  # fmt: skip


def cmd_sketch(args) -> None:
    """The randomized SVD's two products (cpu_nmf.sketch_product) on the Llama layer's three
    shapes at the sketch width of --rank: V X and V^T X, GFLOP/s of the best of --repeats."""
    from ong_kernels.backends import _native, cpu_nmf

    print(f"{torch.get_num_threads()} threads, ISA {_native.lib().active_isa().name}")
    print("| m x n | columns | V X GFLOP/s | V^T X GFLOP/s |")
    print("| --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    for m, n in ((4096, 4096), (11008, 4096), (4096, 11008)):
        width = nmf_init.sketch_width(m, n, args.rank)
        v = torch.rand(m, n, generator=g)
        x, y = torch.randn(n, width, generator=g), torch.randn(m, width, generator=g)
        rate = 2 * m * n * width / 1e9
        t_vx = best(lambda v=v, x=x: cpu_nmf.sketch_product(v, x), args.repeats)
        t_vtx = best(lambda v=v, y=y: cpu_nmf.sketch_product(v, y, transpose=True), args.repeats)
        print(f"| {m} x {n} | {width} | {rate / t_vx:.0f} | {rate / t_vtx:.0f} |", flush=True)


def _solve_only(mats, factors, solver) -> None:
    """The op alone on copies of a start: the NMF solve without checks, init or scoring."""
    from ong_kernels import _ops

    w_list = [w.clone() for w, _ in factors]
    h_list = [h.clone() for _, h in factors]
    _ops.nmf_mu_(mats, w_list, h_list, solver.max_iter, solver.tol, "auto", "ieee")


def cmd_prune(args) -> None:
    from ong_kernels import prune
    from ong_kernels.pruning.ong import DEFAULT_RANK, ONG_SOLVER
    from ong_kernels.train.models import build_model

    print("| model | prune(model, 'ong', 0.9) s | its NMF solve alone s | ratio |")
    print("| --- | --- | --- | --- |")
    for name in args.models:
        model = build_model(name, in_channels=3, num_classes=10)
        ws = [p.detach().abs() for n, p in model.named_parameters() if p.dim() > 1]
        ranks = ranks_of(ws, DEFAULT_RANK)
        mats = [kernel_input(w, float(w.max()))[0] for w in ws]
        factors = initial_factors(mats, ranks, ONG_SOLVER.init, 0)
        solve_only = functools.partial(_solve_only, mats, factors, ONG_SOLVER)
        copies = iter([copy.deepcopy(model) for _ in range(args.repeats)])  # pruned in place
        t_prune = best(lambda it=copies: prune(next(it), "ong", 0.9), args.repeats)
        t_solve = best(solve_only, args.repeats)
        print(f"| {name} | {t_prune:.3f} | {t_solve:.3f} | {t_prune / t_solve:.3f} |",
              flush=True)  # fmt: skip


def cmd_crossover(args) -> None:
    print("| m x n | r | LAPACK SVD s | Gram SVD s | randomized SVD s | rule picks |")
    print("| --- | --- | --- | --- | --- | --- |")
    cases = [(256, 2304, 64), (512, 4608, 128), (512, 4608, 32), (768, 768, 192),
             (768, 3072, 192), (768, 3072, 16), (4096, 4096, 64), (4096, 4096, 16)]  # fmt: skip
    for m, n, r in cases:
        v = torch.rand(m, n)
        t_rand = best(lambda v=v, r=r: randomized_svd(v, r, 0), args.repeats)
        t_gram = best(lambda v=v, r=r: gram_svd(v, r), args.repeats)
        t_exact = best(lambda v=v: torch.linalg.svd(v, full_matrices=False), 1)
        pick = "exact (Gram)" if use_exact_svd(m, n, r) else "randomized"
        print(f"| {m} x {n} | {r} | {t_exact:.3f} | {t_gram:.3f} | {t_rand:.3f} | {pick} |",
              flush=True)  # fmt: skip


def _masks(scores, sparsity: float) -> torch.Tensor:
    flat = torch.cat([s.flatten() for s in scores])
    keep = flat.numel() - round(sparsity * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def _solve_with(ws, ranks, exact: bool, power: int | None):
    """nmf_batched at ONG's settings with the exact SVD forced on or off for every matrix, and
    `power` power iterations in the randomized one (None: the default rule)."""
    real_rule, real_svd = nmf_init.use_exact_svd, nmf_init.randomized_svd
    nmf_init.use_exact_svd = lambda m, n, r: exact
    if power is not None:
        nmf_init.randomized_svd = lambda v, r, s: real_svd(v, r, s, power_iters=power)
    try:
        return nmf_batched(ws, ranks, init="nndsvda", max_iter=200, tol=1e-4)
    finally:
        nmf_init.use_exact_svd, nmf_init.randomized_svd = real_rule, real_svd


def _lapack_svd(v: torch.Tensor, r: int):
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def _solve_default(ws, ranks, lapack: bool):
    """nmf_batched at ONG's settings and the default start rule; `lapack`: the exact starts
    from torch.linalg.svd (the code before issue 16) instead of gram_svd."""
    real = nmf_init.gram_svd
    if lapack:
        nmf_init.gram_svd = _lapack_svd
    try:
        return nmf_batched(ws, ranks, init="nndsvda", max_iter=200, tol=1e-4)
    finally:
        nmf_init.gram_svd = real


def cmd_defaults(args) -> None:
    """ONG masks (global, 90%) at the default start rule against the pre-issue-16 start (the
    exact LAPACK SVD of every matrix); and the time of the two starts."""
    print(
        "| set | rank | mask IoU vs LAPACK start | error rel. diff | start s (LAPACK) | start s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rank in args.sets:
        ws = weights_of(name)
        ranks = ranks_of(ws, rank)
        old = _solve_default(ws, ranks, lapack=True)
        new = _solve_default(ws, ranks, lapack=False)
        iou = _iou(_masks([w @ h for w, h in new], 0.9), _masks([w @ h for w, h in old], 0.9))
        diff = abs(_error(ws, new) - _error(ws, old)) / _error(ws, old)
        start = functools.partial(initial_factors, [as_matrix(w) for w in ws], ranks, "nndsvda", 0)
        real = nmf_init.gram_svd
        nmf_init.gram_svd = _lapack_svd
        try:
            t_old = best(start, 1)
        finally:
            nmf_init.gram_svd = real
        t_new = best(start, 1)
        print(f"| {name} | {rank} | {iou:.4f} | {diff:.1e} | {t_old:.2f} | {t_new:.2f} |",
              flush=True)  # fmt: skip


def _error(ws, factors) -> float:
    pairs = zip(ws, factors, strict=True)
    return sum(float((as_matrix(v) - w @ h).norm() ** 2) for v, (w, h) in pairs) ** 0.5


def cmd_quality(args) -> None:
    """ONG masks (global, 90%) from the randomized-SVD start against the exact-SVD start, for
    each number of power iterations; the final reconstruction error of both."""
    print("| set | rank | power iterations | mask IoU vs exact start | error rel. diff |")
    print("| --- | --- | --- | --- | --- |")
    for name, rank in args.sets:
        ws = weights_of(name)
        ranks = ranks_of(ws, rank)

        exact = _solve_with(ws, ranks, True, None)
        mask_exact = _masks([w @ h for w, h in exact], 0.9)
        for power in args.powers:
            got = _solve_with(ws, ranks, False, power)
            iou = _iou(_masks([w @ h for w, h in got], 0.9), mask_exact)
            diff = abs(_error(ws, got) - _error(ws, exact)) / _error(ws, exact)
            print(f"| {name} | {rank} | {power} | {iou:.3f} | {diff:.1e} |", flush=True)


def cmd_mask(args) -> None:
    """ong-mask on a one-layer Llama-7B-shaped fp16 checkpoint at its defaults against the same
    run with --init random (both --tol 0: the same iterations), wall clock of the command."""
    import os
    import subprocess
    import sys
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "layer.safetensors")
        g = torch.Generator().manual_seed(0)
        save_file({f"model.layers.0.{s.name}": torch.randn(s.shape, generator=g).mul_(0.02)
                   .half() for s in llama_block()}, ckpt)  # fmt: skip
        print("| run | wall s |")
        print("| --- | --- |")
        times = {}
        for label, extra in (("defaults (nndsvda)", []), ("--init random", ["--init", "random"])):
            cmd = [sys.executable, "-m", "ong_kernels.mask_cli", ckpt, "--sparsity", "0.5",
                   "--tol", "0", "--no-progress", "-o", os.path.join(tmp, "m.safetensors"),
                   *extra]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[label] = time.perf_counter() - start
            print(f"| {label} | {times[label]:.1f} |", flush=True)
        print(f"ratio {times['defaults (nndsvda)'] / times['--init random']:.3f}")


def _set_rank(text: str) -> tuple[str, int | float]:
    name, _, rank = text.partition(":")
    return name, float(rank) if "." in rank else int(rank)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("llama")
    q.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    q.add_argument("--init", default="nndsvda")
    q.add_argument("--fp16", action="store_true")
    q.add_argument("--repeats", type=int, default=2)
    q = sub.add_parser("sketch")
    q.add_argument("--rank", type=int, default=16)
    q.add_argument("--repeats", type=int, default=9)
    q = sub.add_parser("prune")
    q.add_argument("--models", nargs="+", default=["resnet56", "resnet18"])
    q.add_argument("--repeats", type=int, default=2)
    sub.add_parser("mask")
    q = sub.add_parser("crossover")
    q.add_argument("--repeats", type=int, default=2)
    q = sub.add_parser("defaults")
    q.add_argument(
        "--sets", nargs="+", type=_set_rank,
        default=[("resnet20", 0.25), ("resnet56", 0.25), ("bert_2layers", 0.25),
                 ("resnet18", 0.25)],
    )  # fmt: skip
    q = sub.add_parser("quality")
    q.add_argument("--powers", type=int, nargs="+", default=[1, 2, 4, 7])
    q.add_argument(
        "--sets", nargs="+", type=_set_rank,
        default=[("resnet20", 0.25), ("resnet56", 0.25), ("bert_base", 0.25), ("bert_base", 16)],
        help="set:rank pairs, e.g. resnet20:0.25 bert_base:16",
    )  # fmt: skip
    args = p.parse_args(argv)
    commands = {"llama": cmd_llama, "sketch": cmd_sketch, "prune": cmd_prune,
                "crossover": cmd_crossover, "quality": cmd_quality, "defaults": cmd_defaults,
                "mask": cmd_mask}  # fmt: skip
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
