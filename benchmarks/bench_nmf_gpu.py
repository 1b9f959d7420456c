"""GPU checks of the Triton NMF kernels (issue 9), one case after another, each result written
as soon as it is known. Run by benchmarks/gpu_check.sh; by hand:

    python -m benchmarks.bench_nmf_gpu [--out DIR] [--budget SECONDS] [--cases NAME ...]
    python -m benchmarks.bench_nmf_gpu --dry-run        # tiny sizes on the CPU (interpreter)
    python -m benchmarks.bench_nmf_gpu --tf32-estimate  # CPU: ONG mask IoU, emulated TF32

Cases, in this order (the issue's targets in brackets):
  correctness  the Triton kernels against the reference backend on this GPU: ragged batches
               on both paths, several rank blocks, float16/bfloat16 V, per-matrix stopping
  beta         the Triton beta kernel (issue 30) against the reference on this GPU (KL, IS
               regularised, beta 1.5 with H fixed; per-matrix stopping), then KL at
               Fashion-MNIST's shape, rank 20, 200 iterations: Triton vs the reference
               backend, with the written prediction
  resnet56     rank 16, 200 iterations: Triton vs the per-matrix PyTorch loop and the
               reference backend  [>= 100x the loop, < 10 ms]
  resnet18     the same  [>= 30x the loop]
  square4096   32 matrices 4096 x 4096, rank 64: flop rate against torch.mm fp32 (TF32 off)
               in the same run  [>= 50% in "ieee"]; "tf32x3" and "tf32" rates and errors too
  llama7b      224 float16 matrices made on the GPU (32 blocks of 4x 4096x4096, 2x
               11008x4096, 1x 4096x11008), rank 64, 200 iterations  [finishes; time]; the
               peers run 3 iterations and are extrapolated (said so in the row)
  tf32_masks   ONG-style masks (top 10% of W H per matrix) of ResNet-18 from "tf32" and
               "tf32x3" factors: IoU against "ieee"
  resnet56_restarts  consensus ONG (issue 19): the ResNet-56 set with every matrix 8 times
               (448 matrices, all on the persistent path: 8x the programs of one launch),
               rank 16, 200 iterations, against the set once; the op alone and the whole
               nmf_batched call (per-matrix seeds, random starts made on the host)
               [k = 8 at most 8x k = 1]

The per-matrix loop is reference.mu_iteration_ on one matrix at a time (a batch of one): the
same PyTorch calls a user's loop makes. Every result line goes to OUT/nmf_gpu.jsonl; the
summary (pass / fail / figures) to stdout and OUT/nmf_gpu_summary.txt. A failing case is
recorded and the next one runs; the exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.shapes import WORKLOADS, weight_matrix_shapes
from ong_kernels import _ops, nmf_plan
from ong_kernels.backends.reference import mu_iteration_
from ong_kernels.backends.triton import nmf as tnmf
from ong_kernels.nmf import nmf_batched
from ong_kernels.nmf_init import initial_factors

SPARSITY = 0.9
LLAMA_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


# ----------------------------------------------------------------------------- helpers


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int = 1) -> tuple[float, object]:
    """(median seconds over reps, last result) of fn(), synchronised; one untimed warm-up call
    first (it compiles the Triton kernels)."""
    out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def problem(shapes, rank, device, dtype=torch.float32, seed=0):
    """V_i = |N(0, 2/fan)| (a Kaiming-like |W|) and scikit-learn's random (W0, H0)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    vs, ws, hs = [], [], []
    for m, n in shapes:
        v = (torch.randn(m, n, generator=gen, device=device) * math.sqrt(2.0 / m)).abs_()
        r = min(rank, m, n)
        scale = math.sqrt(float(v.mean()) / r)
        ws.append(torch.randn(m, r, generator=gen, device=device).abs_().mul_(scale))
        hs.append(torch.randn(r, n, generator=gen, device=device).abs_().mul_(scale))
        vs.append(v.to(dtype))
    return vs, ws, hs


def op(backend, vs, ws, hs, max_iter, tol=0.0, precision="ieee"):
    w, h = [t.clone() for t in ws], [t.clone() for t in hs]
    n_iter = _ops.nmf_mu_(vs, w, h, max_iter, tol, backend, precision)
    return w, h, n_iter


def torch_loop(vs, ws, hs, max_iter):
    """The per-matrix PyTorch MU loop (float32 V), one matrix after another."""
    out = []
    for v, w0, h0 in zip(vs, ws, hs, strict=True):
        v, w, h = v.float()[None], w0.clone()[None], h0.clone()[None]
        for _ in range(max_iter):
            mu_iteration_(v, w, h)
        out.append((w[0], h[0]))
    return out


def rel_errors(vs, factors) -> torch.Tensor:
    """||V - W H||_F / ||V||_F per matrix (float64, on the device)."""
    out = []
    for v, (w, h) in zip(vs, factors, strict=True):
        v64 = v.double()
        out.append(torch.linalg.matrix_norm(v64 - w.double() @ h.double()) / v64.norm())
    return torch.stack(out).cpu()


def error_gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest |got - expected| / (1e-3 expected + 1e-6) over matrices: <= 1 is the
    contract (1e-3 relative; the 1e-6 absolute floor covers exactly-fitted matrices, 1 x n or
    m x 1, whose errors are float32 noise of ~1e-8)."""
    return float(((got - expected).abs() / (1e-3 * expected + 1e-6)).max())


def flops(vs, ws, iters) -> int:
    return iters * sum(nmf_plan.mu_flops(*v.shape, w.shape[1]) for v, w in zip(vs, ws, strict=True))


def matmul_rate(device, size) -> float:
    """fp32 torch.mm flop rate, TF32 off (PyTorch's default for matmul)."""
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        seconds, _ = timed(lambda: a @ b, device, reps=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return 2 * size**3 / seconds


def masks(factors, sparsity=SPARSITY):
    """Keep the top (1 - sparsity) of each W H (ONG's score), ties by index."""
    out = []
    for w, h in factors:
        score = (w @ h).flatten()
        keep = max(1, round((1 - sparsity) * score.numel()))
        mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        mask[torch.topk(score, keep, sorted=False).indices] = True
        out.append(mask)
    return out


def iou(a, b) -> float:
    inter = sum(int((x & y).sum()) for x, y in zip(a, b, strict=True))
    union = sum(int((x | y).sum()) for x, y in zip(a, b, strict=True))
    return inter / union


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """x (float32, finite) rounded to TF32's 10-bit mantissa, ties to even (what a TF32 tensor
    core product reads; the hardware conversion may round ties away: a 1-ulp difference)."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def mu_tf32_emulated(v, w, h, max_iter) -> None:
    """The reference iteration with every product's inputs rounded to TF32 (batched)."""
    eps = nmf_plan.EPS
    for _ in range(max_iter):
        vt, ht = tf32_round(v), tf32_round(h)
        gram = torch.bmm(ht, ht.transpose(1, 2))
        den = torch.bmm(tf32_round(w), tf32_round(gram))
        w.mul_(torch.bmm(vt, ht.transpose(1, 2)).div_(den.masked_fill_(den == 0, eps)))
        wt = tf32_round(w)
        gram = torch.bmm(wt.transpose(1, 2), wt)
        den = torch.bmm(tf32_round(gram), tf32_round(h))
        h.mul_(torch.bmm(wt.transpose(1, 2), vt).div_(den.masked_fill_(den == 0, eps)))


# ----------------------------------------------------------------------------- cases


class Failed(AssertionError):
    pass


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def case_correctness(device, small):
    """Triton vs the reference on the device (what the conformance suite does, here on the GPU,
    plus the grouped path with several rank blocks and half inputs)."""
    rows = {}
    big = 1 if small else 4  # the dry run keeps every matrix small for the interpreter
    batches = {
        "ragged fp32": (
            [(37, 53), (1, 70), (65, 1), (3, 100 * big), (64, 576), (75 * big, 257)],
            16,
            30,
        ),
        "rank blocks": ([(40 * big, 130), (90, 71 * big)], 80, 10),
        # ranks 17-32 on the grouped path (rank blocks of 32), several row blocks each
        "grouped rb32": ([(75 * big, 65 * big), (70 * big, 75 * big)], 24, 20),
        "bf16": ([(37, 53), (130, 75 * big)], 16, 20),
        "fp16": ([(37, 53), (130, 75 * big)], 24, 20),
    }
    for name, (shapes, rank, iters) in batches.items():
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)
        vs, ws, hs = problem(shapes, rank, device, dtype, seed=len(rows))
        ref = op("reference", vs, ws, hs, iters)
        got = op("triton", vs, ws, hs, iters)
        worst = max(
            float(((g - e).abs() / (e.abs() + 1e-6)).max())
            for gs, es in ((got[0], ref[0]), (got[1], ref[1]))
            for g, e in zip(gs, es, strict=True)
        )
        e_ref = rel_errors(vs, list(zip(ref[0], ref[1], strict=True)))
        e_got = rel_errors(vs, list(zip(got[0], got[1], strict=True)))
        gap = error_gap(e_got, e_ref)
        rows[name] = {"max_factor_rel_diff": worst, "error_gap": gap}
        expect(gap <= 1, f"{name}: reconstruction errors differ, gap {gap:.3g} (> 1)")
    # Per-matrix stopping (tol > 0): n_iter must equal the reference's.
    shapes, iters = (
        ([(12, 15), (40, 30)], 40) if small else ([(40, 60), (300, 200), (64, 576)], 200)
    )
    vs, ws, hs = problem(shapes, 8, device, seed=9)
    vs[0] = (ws[0] @ hs[0]).contiguous()  # exactly W0 H0: stops at the first check
    ref = op("reference", vs, ws, hs, iters, tol=1e-3)
    got = op("triton", vs, ws, hs, iters, tol=1e-3)
    rows["stopping"] = {"n_iter_reference": ref[2].tolist(), "n_iter_triton": got[2].tolist()}
    expect(ref[2].tolist() == got[2].tolist(), f"n_iter {got[2].tolist()} != {ref[2].tolist()}")
    return rows


def _resnet(workload, device, small, target_speedup, target_ms):
    shapes = weight_matrix_shapes(WORKLOADS[workload])
    iters = 200
    if small:  # the dry run: two of the matrices, and for ResNet-18 one on the grouped path
        shapes, iters = shapes[:2] + ([(96, 700)] if workload == "resnet18" else []), 3
    vs, ws, hs = problem(shapes, 16, device)
    t_triton, got = timed(lambda: op("triton", vs, ws, hs, iters), device, reps=5)
    t_ref, _ = timed(lambda: op("reference", vs, ws, hs, iters), device, reps=3)
    t_loop, loop = timed(lambda: torch_loop(vs, ws, hs, iters), device, reps=1)
    e_got = rel_errors(vs, list(zip(got[0], got[1], strict=True)))
    e_loop = rel_errors(vs, loop)
    gap = error_gap(e_got, e_loop)
    row = {
        "matrices": len(vs), "iterations": iters, "triton_ms": t_triton * 1e3,
        "reference_ms": t_ref * 1e3, "torch_loop_ms": t_loop * 1e3,
        "speedup_vs_loop": t_loop / t_triton, "speedup_vs_reference": t_ref / t_triton,
        "gflops_triton": flops(vs, ws, iters) / t_triton / 1e9, "error_gap_vs_loop": gap,
    }  # fmt: skip
    # Where the time goes: each launch group of the dispatcher alone (ResNet-18 has a
    # persistent and a grouped one; their sum is about the call's time).
    groups = tnmf.plan([(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(vs, ws, strict=True)],
                       [v.dtype for v in vs])  # fmt: skip
    if len(groups) > 1:
        for group in groups:
            sub = [[lst[i] for i in group.indices] for lst in (vs, ws, hs)]
            t, _ = timed(lambda sub=sub: op("triton", *sub, iters), device, reps=3)
            row[f"triton_{group.config.kernel}_part_ms"] = t * 1e3
            row[f"triton_{group.config.kernel}_matrices"] = len(group.indices)
    expect(gap <= 1, f"errors differ from the loop's (gap {gap:.3g} > 1)")
    if not small:
        expect(row["speedup_vs_loop"] >= target_speedup,
               f"{row['speedup_vs_loop']:.1f}x the loop (target {target_speedup}x)")  # fmt: skip
        if target_ms is not None:
            expect(row["triton_ms"] < target_ms, f"{row['triton_ms']:.2f} ms (target {target_ms})")
    return row


def case_resnet56(device, small):
    return _resnet("resnet56", device, small, 100, 10.0)


def case_resnet18(device, small):
    return _resnet("resnet18", device, small, 30, None)


def case_square4096(device, small):
    size, count, iters = (64, 2, 2) if small else (4096, 32, 20)
    rate = matmul_rate(device, 256 if small else 8192)
    vs, ws, hs = problem([(size, size)] * count, 64, device)
    work = flops(vs, ws, iters)
    row = {"matmul_fp32_tflops": rate / 1e12, "iterations": iters}
    base = None
    for precision in ("ieee", "tf32x3", "tf32"):
        t, got = timed(lambda p=precision: op("triton", vs, ws, hs, iters, precision=p), device)
        errors = rel_errors(vs, list(zip(got[0], got[1], strict=True)))
        base = errors if base is None else base
        row[f"{precision}_ms"] = t * 1e3
        row[f"{precision}_fraction_of_matmul"] = work / t / rate
        row[f"{precision}_error_rel_diff_vs_ieee"] = float(((errors - base).abs() / base).max())
    t_ref, ref = timed(lambda: op("reference", vs, ws, hs, iters), device)
    t_loop, _ = timed(lambda: torch_loop(vs, ws, hs, iters), device)
    row.update(reference_ms=t_ref * 1e3, torch_loop_ms=t_loop * 1e3)
    # The RB 64, 8-warp, 64-row update (the Llama / square configuration) against the
    # reference: the "ieee" errors, not only the precisions against each other.
    gap = error_gap(base, rel_errors(vs, list(zip(ref[0], ref[1], strict=True))))
    row["ieee_error_gap_vs_reference"] = gap
    expect(gap <= 1, f"ieee errors differ from the reference's (gap {gap:.3g} > 1)")
    if not small:
        share = row["ieee_fraction_of_matmul"]
        expect(share >= 0.5, f"{share:.0%} of the fp32 matmul rate (target 50%)")
    return row


def case_llama7b(device, small):
    blocks, iters, peer_iters = (1, 2, 1) if small else (32, 200, 3)
    shapes = LLAMA_BLOCK * blocks
    if small:
        shapes = [(m // 128, n // 128) for m, n in shapes]
    gen = torch.Generator(device=device).manual_seed(0)
    vs = [(torch.randn(m, n, generator=gen, device=device, dtype=torch.float16) * 0.02).abs_()
          for m, n in shapes]  # fmt: skip
    rank = [min(64, m, n) for m, n in shapes]
    ws = [torch.rand(m, r, generator=gen, device=device) * 0.05 + 0.01
          for (m, _), r in zip(shapes, rank, strict=True)]  # fmt: skip
    hs = [torch.rand(r, n, generator=gen, device=device) * 0.05 + 0.01
          for (_, n), r in zip(shapes, rank, strict=True)]  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    got = op("triton", vs, ws, hs, iters)
    sync(device)
    t_triton = time.perf_counter() - t0
    row = {
        "matrices": len(vs), "iterations": iters, "triton_s": t_triton,
        "triton_tflops": flops(vs, ws, iters) / t_triton / 1e12,
        "finite": all(bool(torch.isfinite(w).all()) for w in got[0]),
    }  # fmt: skip
    if device == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del got
    # Peers: a few iterations, extrapolated to `iters` (labelled as such).
    t_loop, _ = timed(lambda: torch_loop(vs, ws, hs, peer_iters), device)
    row["torch_loop_s_extrapolated"] = t_loop / peer_iters * iters
    t_ref, _ = timed(lambda: op("reference", vs, ws, hs, peer_iters), device)
    row["reference_s_extrapolated"] = t_ref / peer_iters * iters
    expect(row["finite"], "non-finite factors")
    return row


def case_tf32_masks(device, small):
    shapes = weight_matrix_shapes(WORKLOADS["resnet18"])
    iters = 3 if small else 200
    if small:
        shapes = shapes[:3]
    vs, ws, hs = problem(shapes, 16, device)
    base = masks(list(zip(*op("triton", vs, ws, hs, iters)[:2], strict=True)))
    row = {}
    for precision in ("tf32x3", "tf32"):
        got = op("triton", vs, ws, hs, iters, precision=precision)
        row[f"iou_{precision}_vs_ieee"] = iou(masks(list(zip(got[0], got[1], strict=True))), base)
    return row


def case_resnet56_restarts(device, small, k: int = 8):
    shapes = weight_matrix_shapes(WORKLOADS["resnet56"])
    iters = 200
    if small:
        shapes, iters, k = shapes[:2], 3, 2
    vs, ws, hs = problem(shapes, 16, device)
    # k restarts: matrix i k times in a row (the same tensor), each from its own start.
    vk = [v for v in vs for _ in range(k)]
    _, wk, hk = problem([s for s in shapes for _ in range(k)], 16, device, seed=1)
    t1, _ = timed(lambda: op("triton", vs, ws, hs, iters), device, reps=5)
    tk, got = timed(lambda: op("triton", vk, wk, hk, iters), device, reps=5)
    # Restart j of matrix i alone gives the factors it gets inside the batch of k (one
    # program per matrix: bit for bit unless the launch configuration differs).
    alone = op("triton", [vk[k - 1]], [wk[k - 1]], [hk[k - 1]], iters)
    diff = max(
        float(((a - g).abs() / (g.abs() + 1e-6)).max())
        for a, g in ((alone[0][0], got[0][k - 1]), (alone[1][0], got[1][k - 1]))
    )
    seeds = list(range(k))

    def call(mats, seed):
        return nmf_batched(mats, 16, max_iter=iters, tol=0.0, init="random", seed=seed,
                           backend="triton")  # fmt: skip

    c1, _ = timed(lambda: call(vs, 0), device, reps=3)
    ck, _ = timed(lambda: call(vk, seeds * len(vs)), device, reps=3)
    row = {
        "matrices": len(vs), "restarts": k, "iterations": iters,
        "op_ms_k1": t1 * 1e3, f"op_ms_k{k}": tk * 1e3, "op_ratio": tk / t1,
        "call_ms_k1": c1 * 1e3, f"call_ms_k{k}": ck * 1e3, "call_ratio": ck / c1,
        "restart_vs_alone_max_rel_diff": diff,
    }  # fmt: skip
    expect(diff <= 1e-5, f"a restart in the batch differs from its start alone by {diff:.3g}")
    if not small:
        expect(row["op_ratio"] <= k, f"op: {row['op_ratio']:.2f}x for {k} restarts (<= {k}x)")
        expect(row["call_ratio"] <= k, f"call: {row['call_ratio']:.2f}x (target <= {k}x)")
    return row


def case_init_workspace(device, small):
    """Issue 16 on the GPU: the nndsvda start of one Llama-7B block against its 200-iteration
    solve (target: at most 10%), and the solve's peak extra device memory against the Triton
    kernel's declared workspace (target: within 25%)."""
    shapes = [(m // 128, n // 128) for m, n in LLAMA_BLOCK] if small else LLAMA_BLOCK
    iters = 3 if small else 200
    row = {}
    for rank in (16, 64):
        vs, ws, hs = problem(shapes, rank, device, dtype=torch.float16)
        ranks = [w.shape[1] for w in ws]
        t_init, _ = timed(lambda vs=vs, ranks=ranks: initial_factors(vs, ranks, "nndsvda", 0),
                          device, reps=2)  # fmt: skip
        t_solve, _ = timed(lambda vs=vs, ws=ws, hs=hs: op("triton", vs, ws, hs, iters), device)
        row[f"r{rank}_init_s"], row[f"r{rank}_solve_s"] = t_init, t_solve
        row[f"r{rank}_init_share"] = t_init / t_solve
        if device == "cuda":
            w, h = [t.clone() for t in ws], [t.clone() for t in hs]
            sync(device)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _ops.nmf_mu_(vs, w, h, iters, 1e-4, "triton", "ieee")
            sync(device)
            extra = torch.cuda.max_memory_allocated() - base
            model = tnmf.workspace([(*v.shape, r, v.dtype) for v, r in zip(vs, ranks,
                                                                         strict=True)])  # fmt: skip
            row[f"r{rank}_extra_bytes"], row[f"r{rank}_model_bytes"] = extra, model
            row[f"r{rank}_extra_over_model"] = extra / max(1, model)
    if not small:
        expect(row["r16_init_share"] <= 0.1, f"init {row['r16_init_share']:.1%} of the solve")
    if device == "cuda":
        # Within 25%, plus 16 KiB: 32 of the caching allocator's 512-B blocks for small
        # temporaries the model does not list one by one (the stopping rule's).
        for rank in (16, 64):
            extra, model = row[f"r{rank}_extra_bytes"], row[f"r{rank}_model_bytes"]
            expect(abs(extra - model) <= 0.25 * model + 16384,
                   f"rank {rank}: peak extra {extra} B against the model's {model} B")  # fmt: skip
    return row


def beta_op(backend, vs, ws, hs, max_iter, tol, loss):
    w, h = [t.clone() for t in ws], [t.clone() for t in hs]
    n_iter = _ops.nmf_beta_mu_(vs, w, h, max_iter, tol, loss.beta, loss.alpha_w, loss.alpha_h,
                               loss.l1_ratio, loss.update_h, backend)  # fmt: skip
    return w, h, n_iter


def case_beta(device, small):
    """Issue 30 on the GPU: the Triton beta kernel against the reference on this device (KL,
    IS with regularisation, beta 1.5 with H fixed; ragged batches, per-matrix stopping), then
    KL at Fashion-MNIST's shape (60,000 x 784, random V in [0, 1)), rank 20, 200 iterations
    against the reference backend, with the written prediction (BETA_PREDICTIONS_H100_S)."""
    from ong_kernels.nmf_beta import BetaLoss

    row = {}
    big = 1 if small else 4
    shapes = [(37, 53), (65 * big, 31), (20, 90 * big)]
    losses = {
        "kl": BetaLoss(1.0, 0.0, 0.0, 0.0, True),
        "is_regularised": BetaLoss(0.0, 0.01, 0.02, 0.3, True),
        "beta1.5_fixed_h": BetaLoss(1.5, 0.0, 0.0, 0.0, False),
    }
    for i, (name, loss) in enumerate(losses.items()):
        vs, ws, hs = problem(shapes, 7, device, seed=20 + i)
        vs = [v + 0.01 for v in vs]  # beta <= 0 refuses zeros
        ref = beta_op("reference", vs, ws, hs, 30, 1e-4, loss)
        got = beta_op("triton", vs, ws, hs, 30, 1e-4, loss)
        worst = max(
            float(((g - e).abs() / (e.abs() + 1e-6)).max())
            for gs, es in ((got[0], ref[0]), (got[1], ref[1]))
            for g, e in zip(gs, es, strict=True)
        )
        row[f"{name}_max_factor_rel_diff"] = worst
        expect(got[2].tolist() == ref[2].tolist(), f"{name}: n_iter {got[2].tolist()} != "
               f"{ref[2].tolist()}")  # fmt: skip
        expect(worst <= 1e-2, f"{name}: factors differ by {worst:.3g} (relative)")
    m, n = (600, 78) if small else (60000, 784)
    iters = 3 if small else 200
    gen = torch.Generator(device=device).manual_seed(30)
    v = torch.rand(m, n, generator=gen, device=device)
    _, w0, h0 = problem([(m, n)], 20, device, seed=31)
    kl = losses["kl"]
    t_triton, _ = timed(lambda: beta_op("triton", [v], w0, h0, iters, 0.0, kl), device)
    t_ref, _ = timed(lambda: beta_op("reference", [v], w0, h0, iters, 0.0, kl), device)
    predicted = BETA_PREDICTIONS_H100_S["triton_kl_fashion_mnist_r20_200it"]
    row.update(kl_fmnist_shape_triton_s=t_triton, kl_fmnist_shape_reference_s=t_ref,
               reference_over_triton=t_ref / t_triton, predicted_s=predicted)  # fmt: skip
    return row


CASES = {  # in this order: the budget may skip the last ones
    "correctness": case_correctness,
    "beta": case_beta,
    "resnet56": case_resnet56,
    "resnet18": case_resnet18,
    "square4096": case_square4096,
    "llama7b": case_llama7b,
    "tf32_masks": case_tf32_masks,
    "resnet56_restarts": case_resnet56_restarts,
    "init_workspace": case_init_workspace,
}
# Seconds a case needs at least on an H100 (predictions, benchmarks/RESULTS.md): a case starts
# only when that much of the budget is left.
MIN_SECONDS = {"correctness": 20, "resnet56": 10, "resnet18": 15, "square4096": 25,
               "llama7b": 60, "tf32_masks": 10, "resnet56_restarts": 10,
               "init_workspace": 30, "beta": 20}  # fmt: skip


def tf32_estimate(workload: str = "resnet56", iters: int = 200) -> dict:
    """CPU: IoU of ONG masks from TF32-emulated MU against float32 MU (same starts)."""
    shapes = weight_matrix_shapes(WORKLOADS[workload])
    vs, ws, hs = problem(shapes, 16, "cpu")
    exact, rounded = [], []
    for v, w, h in zip(vs, ws, hs, strict=True):
        w1, h1 = w.clone()[None], h.clone()[None]
        for _ in range(iters):
            mu_iteration_(v[None], w1, h1)
        exact.append((w1[0], h1[0]))
        w2, h2 = w.clone()[None], h.clone()[None]
        mu_tf32_emulated(v[None], w2, h2, iters)
        rounded.append((w2[0], h2[0]))
    e1, e2 = rel_errors(vs, exact), rel_errors(vs, rounded)
    return {
        "workload": workload, "iterations": iters, "sparsity": SPARSITY,
        "iou_tf32_vs_fp32": iou(masks(rounded), masks(exact)),
        "max_error_rel_diff": float(((e2 - e1).abs() / e1).max()),
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT_DIR", "build/gpu_check"))
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for all cases")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU, interpreter)")
    parser.add_argument("--tf32-estimate", action="store_true")
    args = parser.parse_args(argv)
    if args.tf32_estimate:
        for workload in ("resnet56", "resnet18"):
            print(json.dumps(tf32_estimate(workload)), flush=True)
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "nmf_gpu.jsonl"
    log.write_text("")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    start, results = time.perf_counter(), []
    for case in args.cases:
        left = args.budget - (time.perf_counter() - start)
        record = {"case": case, "device": name}
        if not args.dry_run and left < MIN_SECONDS[case]:
            record.update(status="SKIPPED", why=f"{left:.0f} s of the budget left")
        else:
            t0 = time.perf_counter()
            try:
                record.update(status="PASS", **CASES[case](device, args.dry_run))
            except Failed as failure:
                record.update(status="FAIL", why=str(failure))
            except Exception as error:  # recorded; the next case still runs (gpu_check.sh)
                record.update(status="ERROR", why=f"{type(error).__name__}: {error}",
                              trace=traceback.format_exc()[-2000:])  # fmt: skip
            record["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(record)
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[nmf_gpu] {case}: {record['status']} {record.get('why', '')}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    summary = summarise(results, name)
    (out / "nmf_gpu_summary.txt").write_text(summary)
    print(summary)
    return 0 if all(r["status"] in ("PASS", "SKIPPED") for r in results) else 1


def summarise(results, name) -> str:
    lines = [f"=== NMF on {name} ==="]
    for r in results:
        figures = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r.items()
            if k not in ("case", "device", "status", "why", "trace")
        )
        lines.append(f"{r['case']:<12} {r['status']:<8} {r.get('why', '')} {figures}".rstrip())
    counts = {
        s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "ERROR", "SKIPPED")
    }
    lines.append(", ".join(f"{v} {k.lower()}" for k, v in counts.items()))
    return "\n".join(lines) + "\n"


# Issue 30, written predictions only (no GPU was lent; nothing below is run): beta-divergence
# MU on CUDA tensors. The first two are the reference nmf_beta_mu kernel (batched torch ops),
# the figures written before the Triton beta kernel existed; the "triton_" ones are the Triton
# beta kernel (ong_kernels/backends/triton/nmf_beta.py), now the default on CUDA. H100 SXM:
# ~3.35 TB/s HBM, fp32 FMA (no tensor cores) ~50 TFLOP/s, i.e. ~0.38 TFLOP/s per SM (132).
# - KL, Fashion-MNIST 60,000 x 784, rank 20, 200 iterations: 8 m n r = 7.5 GFLOP per
#   iteration (0.15 ms) but the reference moves ~20 m x n float32 arrays per iteration
#   (W H, its clipped copy, V / W H, the products' operands: ~3.8 GB, 1.3 ms): ~1.5 ms per
#   iteration, ~0.3 s for 200.
#   Triton: the rank is padded to its block (T in chunks of 16: 32; the numerator 32 wide),
#   so each half-step is 2 products of 2 m n 32 = 6.0 GFLOP (KL has no denominator product),
#   12 GFLOP per iteration; V is read once per half-step (0.38 GB, 0.11 ms: compute-bound).
#   The W step has 938 programs of 64 rows: 6.0 GFLOP / 50 TFLOP/s = 0.12 ms. The H step has
#   only 25 programs of 32 columns (one per SM, each walking all 60,000 rows): 6.0 GFLOP /
#   (25 x 0.38 TFLOP/s) = 0.63 ms at best, and one 4-warp program per SM reaches maybe half
#   its SM's FMA rate: ~1.3 ms. So ~0.75-1.4 ms per iteration, ~0.15-0.3 s for 200 (the 20
#   float64 error checks add ~2 ms): predicted 0.3 s, no faster than the reference, bound by
#   the H step's 25 programs. Splitting the H step's walk over programs (split-K) would bring
#   it to the W step's ~0.12 ms: ~0.05 s for 200.
# - cNMF-shaped (5,000 x 784, ranks 5..15 x 20 replicates, KL, tol 1e-4, <= 200 iterations):
#   11 shape buckets of 20 stacked V copies (3.4 GB); ~69 GB of traffic per iteration, ~23 ms:
#   <= ~4.6 s for 200 iterations (less as replicates stop).
#   Triton: 220 matrices in one ragged call (rank block 16: every rank padded to 16), per
#   matrix and iteration 2 half-steps x 2 products x 2 m n 16 = 0.50 GFLOP: 110 GFLOP per
#   iteration (69 GFLOP useful), 2.2 ms at 50 TFLOP/s; plenty of programs (17,380 W-step
#   and 2,860 H-step tiles of 64); V read twice per iteration (6.9 GB, 2.1 ms: as long as
#   the products, if the 20 replicates of a V do not share it through L2). ~2.2-4.4 ms per
#   iteration (peak to half of it): ~0.45-0.9 s for 200 iterations, predicted 0.9 s (less
#   as replicates stop).
BETA_PREDICTIONS_H100_S = {
    "kl_fashion_mnist_r20_200it": 0.3,
    "cnmf_5000x784_r5-15x20": 4.6,
    "triton_kl_fashion_mnist_r20_200it": 0.3,
    "triton_cnmf_5000x784_r5-15x20": 0.9,
}

if __name__ == "__main__":
    sys.exit(main())
