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

* ``ours_compact``: ``FusedMaskedSGD(..., compact_state=True)`` (momentum of kept weights only);
* ``ours_triton`` (CUDA only): ``FusedMaskedSGD(..., backend="triton")``, against ``ours`` (the
  CUDA C++ kernel) in the same run: the measurement that decides ``auto`` on a GPU.

Every timed provider is then checked, untimed, against torch.optim.SGD on clones for one more
step (``check_one_step``): a step that does nothing fails.

Targets on the 2-core CPU (issue 2): ours <= 1.05x torch_fused_nomask and >= 4x faster than
torch_foreach_masked. Issue 10: host time of a step <= 30 us with cached tables
(``test_step_host_time``), ours_compact >= 1.5x faster than ours at 90% sparsity, compact
state + masks <= 15% of dense momentum + bool masks (``state_bytes`` in the row's extra info).
On a GPU (gpu_check.sh): ours >= 85% of the copy bandwidth on the bytes a dense masked step
moves, no slower than torch_fused_nomask, 2x faster than torch_foreach_masked; the 100M
parameter and 1,000-tensor workloads (``test_masked_sgd_step_sizes``).
``test_masked_sgd_step_paired`` times ours and the fused peer alternately, for a ratio that
slow drift of the machine hardly moves; ``test_bandwidth`` measures the bandwidth behind the
floors.
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
PROVIDERS = ["ours", "ours_compact", "ours_triton", "torch_foreach_masked", "torch_fused_nomask"]
# Steps before timing: the first one only copies the gradient into the new momentum buffer.
WARMUP_STEPS = 2

# Minimum memory traffic per element of one step, in bytes (fp32): param read + write (8),
# grad read (4), momentum buffer read + write (8), and a bool mask read (1) where masked.
BYTES_DENSE = 20
BYTES_MASKED = BYTES_DENSE + 1


def make_problem(device: torch.device, masked: bool, specs=None):
    """(params, masks) of the workload on ``device``: seeded, grads filled, pruned weights 0.

    ``masks`` maps each conv/linear weight to a bool tensor keeping exactly
    round((1 - SPARSITY) * numel) entries, at random; empty when ``masked`` is False.
    ``specs``: other ParamSpecs than ResNet-18's.
    """
    gen = torch.Generator().manual_seed(0)
    params, masks = [], {}
    for spec in specs if specs is not None else WORKLOADS[WORKLOAD]:
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
    if provider in ("ours", "ours_compact", "ours_triton"):
        opt = ong_kernels.FusedMaskedSGD(
            params,
            **config,
            masks=masks,
            compact_state=provider == "ours_compact",
            backend="triton" if provider == "ours_triton" else "auto",
        )
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
def test_masked_sgd_step(measure, benchmark, provider, config, device):
    skip_unless_runs(provider, device)
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
    # after the timed steps, so the momentum exists: optimizer state + masks, and what dense
    # SGD momentum + bool masks take for the same parameters
    benchmark.extra_info["state_bytes"] = state_bytes(opt, params, masks)
    benchmark.extra_info["dense_state_bytes"] = sum(
        p.numel() * (p.element_size() + (p in masks)) for p in params
    )
    # lr 0.1 on these gradients keeps the weights small: any non-finite value is a bug.
    check_one_step(step, opt, params, masks, CONFIGS[config])


def skip_unless_runs(provider: str, device: torch.device) -> None:
    if provider == "ours_triton" and device.type != "cuda":
        pytest.skip("the Triton kernel is benchmarked on CUDA (the CPU runs its interpreter)")


def state_bytes(opt, params, masks) -> int:
    """Bytes of optimizer state (momentum, masks, bits, compact offsets) for the masked and
    dense parameters: what ours_compact shrinks."""
    total = 0
    for p in params:
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
        if not isinstance(opt, ong_kernels.FusedMaskedSGD):
            total += masks[p].numel() if p in masks else 0  # the user's bool masks
        elif p in opt._masks:  # the optimizer's own copy of the mask: bits (+ compact offsets)
            entry = opt._masks[p]
            total += entry.bits.numel()
            total += 0 if entry.offsets is None else entry.offsets.numel() * 8
    return total


def check_one_step(step, opt, params, masks, config) -> None:
    """Not timed: one more `step()` equals torch.optim.SGD's on clones (same momentum, the
    masked gradient), every kept weight it should move moved, pruned weights and momentum are
    exactly 0. A step that does nothing, or the wrong thing, fails here."""
    state = opt.state_dict()["state"]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.SGD(clones, **config, foreach=False)
    for i, (p, c) in enumerate(zip(params, clones, strict=True)):
        buf = state[i]["momentum_buffer"].clone()
        ref.state[c]["momentum_buffer"] = buf
        c.grad = p.grad * masks[p] if p in masks else p.grad.clone()
    before = [p.detach().clone() for p in params]
    step()
    ref.step()
    for i, (p, c) in enumerate(zip(params, clones, strict=True)):
        assert bool(torch.isfinite(p).all()), f"param {i} is not finite"
        torch.testing.assert_close(p.detach(), c.detach(), atol=1e-6, rtol=1e-4)
        moved = p.detach() != before[i]
        expected = c.detach() != before[i]
        assert bool(moved[expected].all()), f"param {i}: a weight that should move did not"
        if p in masks:
            assert not bool(p[~masks[p]].any()), "a pruned weight moved"
    if isinstance(opt, ong_kernels.FusedMaskedSGD):
        after = opt.state_dict()["state"]
        for i, p in enumerate(params):
            if p in masks:
                assert not bool(after[i]["momentum_buffer"][~masks[p]].any())


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
    check_one_step(ours, opt, params, masks, cfg)
    benchmark.extra_info["paired"] = {
        "ours": "ours",
        "peer": "torch_fused_nomask",
        "kernel": "masked_sgd_step",
        "pairs": pairs,
        "median": float(median),
        "p20": float(p20),
        "p80": float(p80),
    }


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", ["cached", "rebuilt", "op"])
def test_step_host_time(measure, mode, monkeypatch):
    """Host time of one ResNet-18 step (62 tensors) with the native kernel replaced by a no-op:
    what the host side costs. ``cached``: opt.step() with the optimizer's lists and the
    kernel's plan cached (every step goes through torch.ops.ong_kernels.masked_sgd_step_);
    ``rebuilt``: both dropped before every step (validation, partition, tables: a step after
    every layout change); ``op``: the op called with the lists directly (the op's share)."""
    from ong_kernels import _ops
    from ong_kernels.backends import _native, cpu

    if not _native.has_cpu():
        pytest.skip("needs the compiled CPU kernels")
    calls = []

    class NoKernel:
        def __getattr__(self, name):
            return getattr(_native._C, name)

        def masked_sgd_step_cpu(self, *args, **kwargs):
            calls.append(args[1])

    params, masks = make_problem(torch.device("cpu"), masked=True)
    opt = ong_kernels.FusedMaskedSGD(params, **CONFIGS["nesterov"], masks=masks)
    opt.step()  # buffers exist: every timed step is a steady-state step
    monkeypatch.setattr(_native, "lib", lambda: NoKernel())
    if mode == "cached":
        fn = opt.step
    elif mode == "rebuilt":

        def fn():
            opt._lists.clear()
            cpu.masked_sgd_step_.plans.clear()
            opt.step()

    else:
        grads = [p.grad for p in params]
        bufs = [opt.state[p]["momentum_buffer"] for p in params]
        bits = [opt._masks[p].bits if p in opt._masks else None for p in params]

        def fn():
            _ops.masked_sgd_step_(params, grads, bufs, bits, 0.1, 0.9, 0, 5e-4, True, False, False)

    measure(
        fn,
        kernel="masked_sgd_host",
        provider=f"ours_{mode}",
        workload=f"{WORKLOAD} no-op kernel",
        device=torch.device("cpu"),
        warmup_rounds=3,
    )
    assert calls and all(n == len(params) for n in calls)  # the (no-op) kernel saw every tensor


def tiny_problem(numel: int = 64):
    """ResNet-18's 62 tensors, each of `numel` elements, conv/linear weights masked (50%):
    a step whose time is all host time."""
    gen = torch.Generator().manual_seed(0)
    params, masks = [], {}
    for spec in WORKLOADS[WORKLOAD]:
        p = torch.nn.Parameter(torch.randn(numel, generator=gen))
        p.grad = torch.randn(numel, generator=gen)
        if spec.kind in ("conv", "linear"):
            masks[p] = torch.rand(numel, generator=gen) < 0.5
        params.append(p)
    return params, masks


def host_time_pairs(pairs: int = 400, repeats: int = 5) -> dict:
    """Host time of ours vs SGD(fused=True) over 62 tiny tensors, 1 thread (no OpenMP
    barrier on a loaded machine), timed alternately step by step: the median ratio over
    pairs and the min time of each (of `repeats` blocks). Public API only, so the same
    function times an older checkout (`python -m benchmarks.bench_optim host`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, masks = tiny_problem()
        peer_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, peer_params, strict=True):
            q.grad = p.grad.clone()
        ours = ong_kernels.FusedMaskedSGD(params, lr=1e-3, momentum=0.9, masks=masks)
        peer = torch.optim.SGD(peer_params, lr=1e-3, momentum=0.9, fused=True)
        for _ in range(5):
            ours.step()
            peer.step()
        clock = time.perf_counter
        ratios, t_ours, t_peer = [], [], []
        for k in range(pairs * repeats):
            first, second = (ours, peer) if k % 2 else (peer, ours)
            t0 = clock()
            first.step()
            t1 = clock()
            second.step()
            t2 = clock()
            a, b = (t1 - t0, t2 - t1) if first is ours else (t2 - t1, t1 - t0)
            t_ours.append(a)
            t_peer.append(b)
            ratios.append(a / b)
    finally:
        torch.set_num_threads(threads)
    return {
        "median_ratio": float(np.median(ratios)),
        "ours_us": 1e6 * float(np.percentile(t_ours, 10)),
        "peer_us": 1e6 * float(np.percentile(t_peer, 10)),
    }


@pytest.mark.benchmark
def test_step_host_time_paired(benchmark):
    """Issue 28 bar: a step over 62 tiny tensors at most 1.0x SGD(fused=True)'s host time
    (reported, not asserted: benchmarks never gate on a time)."""
    result = host_time_pairs(pairs=200, repeats=2)
    benchmark.extra_info["paired"] = result
    benchmark.pedantic(lambda: None, rounds=1)
    assert result["ours_us"] > 0 and result["peer_us"] > 0


def many_tensors_specs():
    """1,000 tensors of 1-10k elements (seeded sizes), as conv-like weights."""
    from benchmarks.shapes import ParamSpec

    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 10_001, (1000,), generator=gen).tolist()
    return [ParamSpec(f"t{i}", (n,), "linear") for i, n in enumerate(sizes)]


def big_specs():
    """100M parameters: 25 tensors of 4M (conv-like 1024x512x3x3... as flat weights)."""
    from benchmarks.shapes import ParamSpec

    return [ParamSpec(f"w{i}", (4_000_000,), "linear") for i in range(25)]


@pytest.mark.benchmark
@pytest.mark.parametrize("workload", ["1000 tensors 1-10k", "100M params"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_sgd_step_sizes(measure, provider, workload, device):
    """The issue-10 GPU workloads (the 100M case runs on CUDA only: 2 GB of state)."""
    skip_unless_runs(provider, device)
    if workload == "100M params" and device.type != "cuda":
        pytest.skip("100M parameters run on the GPU only")
    specs = many_tensors_specs() if workload.startswith("1000") else big_specs()
    params, masks = make_problem(device, masked=provider != "torch_fused_nomask", specs=specs)
    config = CONFIGS["nesterov"]
    opt, step = build_step(provider, params, masks, config)
    measure(
        step,
        kernel="masked_sgd_step",
        provider=provider,
        workload=workload,
        device=device,
        warmup_rounds=WARMUP_STEPS,
        bytes=step_bytes(params, masks),
        params=sum(p.numel() for p in params),
    )
    check_one_step(step, opt, params, masks, config)


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


ISSUE17_LAYOUTS = ((20, 1_000_000), (200, 100_000))
# Issue 28 item 7's layouts (one large tensor, LLM-sized rows, many small tensors).
ISSUE28_LAYOUTS = ((1, 40_000_000), (40, 1_000_000), (500, 20_000))


def isa_table(
    pairs: int = 7,
    layouts: tuple[tuple[int, int], ...] = ISSUE17_LAYOUTS,
    kept_fractions: tuple[float, ...] = (0.1, 0.5),
) -> list[dict]:
    """Issue 17's ISA x density x layout table on this CPU: for each ISA the CPU kernel can
    run (``_C.set_isa``), kept fraction and layout (tensor count x size), the dense-state and
    the compact-state step timed alternately (`pairs` pairs, 2 threads), with the minimum of
    each and the median (and 10th / 90th percentile) of the per-pair ratios. Public API plus
    set_isa only, so the same function times an older checkout (``python -m
    benchmarks.bench_optim isa``). Floors: bytes a step must move (``floor_bytes``) over the
    measured bandwidth."""
    from ong_kernels.backends import _native

    lib = _native.lib()
    best = lib.best_isa()
    isas = [i for i in (lib.Isa.avx512, lib.Isa.avx2, lib.Isa.portable) if i.value <= best.value]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for count, size in layouts:
        params = [torch.nn.Parameter(torch.randn(size, generator=gen) * 0.05) for _ in range(count)]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn(size, generator=gen) * 1e-2
            q.grad = p.grad.clone()
        for kept in kept_fractions:
            masks = [torch.rand(size, generator=gen) < kept for _ in params]
            dense = ong_kernels.FusedMaskedSGD(
                params, lr=1e-3, momentum=0.9, masks=dict(zip(params, masks, strict=True))
            )
            comp = ong_kernels.FusedMaskedSGD(
                twins,
                lr=1e-3,
                momentum=0.9,
                masks=dict(zip(twins, masks, strict=True)),
                compact_state=True,
            )
            for isa in isas:
                lib.set_isa(isa)
                dense.step()
                comp.step()
                t_d, t_c, ratios = [], [], []
                for k in range(pairs):
                    order = (dense, comp) if k % 2 else (comp, dense)
                    times = {}
                    for opt in order:
                        t0 = time.perf_counter()
                        opt.step()
                        times[opt is comp] = time.perf_counter() - t0
                    t_d.append(times[False])
                    t_c.append(times[True])
                    ratios.append(times[True] / times[False])
                rows.append(
                    dict(
                        isa=isa.name,
                        layout=f"{count} x {size:,}",
                        kept=kept,
                        dense_ms=1e3 * min(t_d),
                        compact_ms=1e3 * min(t_c),
                        compact_over_dense=float(np.median(ratios)),
                        # the spread of the per-pair ratios: a median alone hid run-to-run
                        # swings (issue 28 saw 0.70 and 1.12 in two runs of one cell on AMD)
                        ratio_p10=float(np.percentile(ratios, 10)),
                        ratio_p90=float(np.percentile(ratios, 90)),
                    )
                )
                print(rows[-1], flush=True)
            lib.set_isa(best)
            del dense, comp
    return rows


def resnet_pairs(pairs: int = 30) -> dict:
    """ResNet-18 at 90% masks (nesterov config): ours, ours_compact and SGD(fused=True)
    without masks, timed in rotation step by step; median ratios to the fused peer and of
    compact to dense. Run under ONG_KERNELS_ISA / ATEN_CPU_CAPABILITY to pair the ISAs."""
    cpu = torch.device("cpu")
    cfg = CONFIGS["nesterov"]
    steps = {}
    for provider in ("ours", "ours_compact", "torch_fused_nomask"):
        params, masks = make_problem(cpu, masked=provider != "torch_fused_nomask")
        steps[provider] = build_step(provider, params, masks, cfg)[1]
        for _ in range(WARMUP_STEPS):
            steps[provider]()
    names = list(steps)
    times = {n: [] for n in names}
    for k in range(pairs):
        for n in names[k % 3 :] + names[: k % 3]:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    t = {n: np.array(v) for n, v in times.items()}
    return {
        "ours_over_fused": float(np.median(t["ours"] / t["torch_fused_nomask"])),
        "compact_over_ours": float(np.median(t["ours_compact"] / t["ours"])),
        "ms": {n: 1e3 * float(v.min()) for n, v in t.items()},
    }


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["host"]:
        print(host_time_pairs())
    elif sys.argv[1:] == ["isa"]:
        isa_table()
    elif sys.argv[1:] == ["isa28"]:
        # issue 28 item 7: 10% kept, the issue's three layouts, 15 pairs per cell
        isa_table(pairs=15, layouts=ISSUE28_LAYOUTS, kept_fractions=(0.1,))
    elif sys.argv[1:] == ["resnet"]:
        print(resnet_pairs())
