"""FusedMaskedSGD.step against the torch.optim.SGD setups a user would run instead.

Workload: the 62 parameter tensors of CIFAR ResNet-18 (11,173,962 parameters, real shapes);
every conv/linear weight (11.16M entries) carries a random mask keeping exactly 10% of it
(90% sparsity); BatchNorm parameters and the bias stay dense. Gradients are filled once,
so only ``step()`` is timed. Hyper-parameters: the paper's (lr 0.1, momentum 0.9, Nesterov,
weight decay 5e-4), and plain momentum.

Providers, measured in the same run:
* ``ours``: ``ong_kernels.FusedMaskedSGD(..., masks=...)``;
* ``torch_foreach_masked``: ``torch.optim.SGD(foreach=True)`` with ``g.mul_(mask)`` on every
  masked gradient before the step and ``p.mul_(mask)`` after (part of its timed step);
* ``torch_fused_nomask``: ``torch.optim.SGD(fused=True)`` without masks: the same update with
  less work (no mask read), the speed-of-light peer.

Targets on the 2-core CPU (issue 2): ours <= 1.05x torch_fused_nomask and >= 4x faster than
torch_foreach_masked. ``test_masked_sgd_step_paired`` times ours and the fused peer
alternately, for a ratio that slow drift of the machine hardly moves; ``test_bandwidth`` measures
the bandwidth behind the floors.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import ong_kernels
from benchmarks.shapes import WORKLOADS

WORKLOAD = "resnet18"
SPARSITY = 0.9
CONFIGS = {
    "nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "momentum": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
}
PROVIDERS = ["ours", "torch_foreach_masked", "torch_fused_nomask"]
# Steps before timing: the first one only copies the gradient into the new momentum buffer.
WARMUP_STEPS = 2

# Minimum memory traffic per element of one step, in bytes (fp32): param read + write (8),
# grad read (4), momentum buffer read + write (8), and a bool mask read (1) where masked.
BYTES_DENSE = 20
BYTES_MASKED = BYTES_DENSE + 1


def make_problem(device: torch.device, masked: bool):
    """(params, masks) of the workload on ``device``: seeded, grads filled, pruned weights 0.

    ``masks`` maps each conv/linear weight to a bool tensor keeping exactly
    round((1 - SPARSITY) * numel) entries, at random; empty when ``masked`` is False.
    """
    gen = torch.Generator().manual_seed(0)
    params, masks = [], {}
    for spec in WORKLOADS[WORKLOAD]:
        p = torch.nn.Parameter((torch.randn(spec.shape, generator=gen) * 0.05).to(device))
        p.grad = (torch.randn(spec.shape, generator=gen) * 1e-2).to(device)
        if masked and spec.kind in ("conv", "linear"):
            keep = round((1 - SPARSITY) * spec.numel)
            flat = torch.zeros(spec.numel, dtype=torch.bool)
            flat[torch.randperm(spec.numel, generator=gen)[:keep]] = True
            masks[p] = flat.view(spec.shape).to(device)
            with torch.no_grad():
                p.mul_(masks[p])
        params.append(p)
    return params, masks


def step_bytes(params, masks) -> int:
    return sum(p.numel() * (BYTES_MASKED if p in masks else BYTES_DENSE) for p in params)


def build_step(provider: str, params, masks, config: dict):
    """The optimizer of ``provider`` and the callable that is timed as one step."""
    if provider == "ours":
        opt = ong_kernels.FusedMaskedSGD(params, **config, masks=masks)
        return opt, opt.step
    if provider == "torch_fused_nomask":
        opt = torch.optim.SGD(params, **config, fused=True)
        return opt, opt.step
    if provider == "torch_foreach_masked":
        opt = torch.optim.SGD(params, **config, foreach=True)
        pairs = list(masks.items())

        @torch.no_grad()
        def step():
            for p, m in pairs:
                p.grad.mul_(m)
            opt.step()
            for p, m in pairs:
                p.mul_(m)

        return opt, step
    raise ValueError(f"provider: unknown {provider!r}, expected one of {PROVIDERS}")


@pytest.mark.benchmark
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_sgd_step(measure, provider, config, device):
    params, masks = make_problem(device, masked=provider != "torch_fused_nomask")
    assert sum(p.numel() for p in params) == 11_173_962  # the real ResNet-18, not a lookalike
    opt, step = build_step(provider, params, masks, CONFIGS[config])
    nbytes = step_bytes(params, masks)
    measure(
        step,
        kernel="masked_sgd_step",
        provider=provider,
        workload=f"{WORKLOAD} {config}",
        device=device,
        warmup_rounds=WARMUP_STEPS,
        bytes=nbytes,
        params=sum(p.numel() for p in params),
        sparsity=SPARSITY if masks else 0.0,
    )
    # lr 0.1 on these gradients keeps the weights small: any non-finite value is a bug.
    check_pruned_stay_zero(opt, params, masks)


def check_pruned_stay_zero(opt, params, masks) -> None:
    """Not timed: pruned weights and their momentum are exactly 0, every value is finite."""
    for p in params:
        assert bool(torch.isfinite(p).all())
        buf = opt.state[p].get("momentum_buffer")
        assert buf is not None and bool(torch.isfinite(buf).all())
        if p in masks:
            assert not bool(p[~masks[p]].any()), "a pruned weight moved"
            assert not bool(buf[~masks[p]].any()), "a pruned momentum entry is not 0"


@pytest.mark.benchmark
@pytest.mark.parametrize("config", list(CONFIGS))
def test_masked_sgd_step_paired(measure, benchmark, config, device):
    """ours and torch_fused_nomask timed alternately, step by step: the ratio of each pair.

    The 1.05x target sits within run-to-run drift on the shared 2-core CPU: two runs a few
    minutes apart measured the unmasked fused step at 4.05 and 4.70 ms (momentum). Timing the
    two steps back to back and taking the median of the per-pair ratios cancels drift that
    is slower than a pair (~10 ms); the order alternates so that neither always goes first.
    The report prints the ratio (extra_info "paired"); the row's own time is the pair's.
    """
    cfg = CONFIGS[config]
    params, masks = make_problem(device, masked=True)
    params_dense, _ = make_problem(device, masked=False)
    opt, ours = build_step("ours", params, masks, cfg)
    _, peer = build_step("torch_fused_nomask", params_dense, {}, cfg)
    clock = time.perf_counter
    ratios: list[float] = []

    def timed(step) -> float:
        t0 = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - t0

    def pair() -> None:
        if len(ratios) % 2:
            t_peer, t_ours = timed(peer), timed(ours)
        else:
            t_ours, t_peer = timed(ours), timed(peer)
        ratios.append(t_ours / t_peer)

    pairs = 300 if device.type == "cuda" else 100  # ~1 s of pairs on the 2-core CPU
    measure(
        pair,
        kernel="masked_sgd_step_paired",
        provider="ours_and_torch_fused_nomask",
        workload=f"{WORKLOAD} {config}",
        device=device,
        rounds=pairs,
        warmup_rounds=WARMUP_STEPS,
    )
    p20, median, p80 = np.percentile(ratios[-pairs:], [20, 50, 80])
    benchmark.extra_info["paired"] = {
        "ours": "ours",
        "peer": "torch_fused_nomask",
        "kernel": "masked_sgd_step",
        "pairs": pairs,
        "median": float(median),
        "p20": float(p20),
        "p80": float(p80),
    }
    check_pruned_stay_zero(opt, params, masks)


@pytest.mark.benchmark
@pytest.mark.parametrize("op", ["copy_", "add_"])
def test_bandwidth(measure, op, device):
    """Memory bandwidth behind the optimizer floors, two ways (fp32, far beyond the caches).

    ``copy_``: dst.copy_(src), 2 x 4 bytes per element counted (read + write), as STREAM
    counts them; the CPU also reads dst before writing it (write-allocate), which this count
    leaves out. ``add_``: a.add_(b) in place, 3 x 4 bytes (read a, read b, write a), with no
    write-allocate, like the optimizer's in-place updates. The report's floors use the
    faster of the two, so a floor is never above what the memory system can do.
    """
    # 256 MiB per tensor on the CPU (far beyond any L3); 1 GiB on a GPU (beyond its L2).
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    gen = torch.Generator().manual_seed(0)
    src = torch.rand(numel, generator=gen).to(device)
    dst = torch.rand(numel, generator=gen).to(device)
    if op == "copy_":
        fn, nbytes = (lambda: dst.copy_(src)), 2 * 4 * numel
    else:
        # Adding 0 keeps dst's values, so every round does identical work.
        src.zero_()
        fn, nbytes = (lambda: dst.add_(src)), 3 * 4 * numel
    expected = src.clone() if op == "copy_" else dst.clone()
    measure(
        fn,
        kernel="bandwidth",
        provider=op,
        workload=f"fp32 {numel * 4 >> 20} MiB",
        device=device,
        warmup_rounds=1,
        bytes=nbytes,
    )
    assert torch.equal(dst, expected)
