"""Per-step cost of the reparametrisation methods (DNW, DPF, STR, CS, DST) against one
dense training step of the same network (issue 26's target: each at most 15% of a step).

* ``test_reparam_cost[resnet20-fmnist]``: ResNet-20 on 1x28x28 inputs, batch 128 (the main
  job's network and data shape).
* ``test_reparam_cost[resnet18-cifar]``: ResNet-18 (CIFAR variant, 11M weights) on 3x32x32
  inputs, batch 128, a few steps.

One round = one dense training step (forward, cross-entropy, backward, FusedMaskedSGD step)
timed on its own, then for each method one step with its hooks, the hooks timed:
``before_forward`` (latent saved, effective weights written: DNW's per-step radix-select
top-k, DST's reset check), ``after_backward`` (straight-through restore, or the chain rule
and the penalty by autograd) and ``after_step`` (theta's SGD step, the controller's sparsity
count, CS's beta). DPF's mask refresh (a global top-k of the dense weights every 16
iterations) is timed once per round and counted as 1/16 of it per step. ``extra_info``
holds the medians and the ratios method / step.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import ong_kernels
from benchmarks.conftest import device_name
from ong_kernels.pruning import methods as M
from ong_kernels.pruning.targets import prunable_parameters
from ong_kernels.train.config import TrainConfig
from ong_kernels.train.models import build_model
from ong_kernels.train.reparam import CLASSES

BATCH = 128
WORKLOADS = {
    "resnet20-fmnist": ("resnet20", 1, 28, 8),
    "resnet18-cifar": ("resnet18", 3, 32, 3),
}


class _Host:
    """What the reparametrisation hooks read from the trainer."""

    def __init__(self, model, method, optimizer, device):
        self.targets = prunable_parameters(model)
        self.masked_total = sum(p.numel() for _, p in self.targets)
        self.config = TrainConfig(method=method, sparsity=0.9, epochs=10)
        self.steps_per_epoch = 100
        self.device = device
        self.optimizer = optimizer


@pytest.mark.benchmark
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_reparam_cost(benchmark, workload, device):
    name, channels, size, rounds = WORKLOADS[workload]
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=10).to(device)
    opt = ong_kernels.FusedMaskedSGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, channels, size, size, generator=gen).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(device)
    methods = {}
    for method in CLASSES:
        host = _Host(model, method, opt, device)
        sp = CLASSES[method](host, M.resolve_settings(method, {}))
        sp._start()
        methods[method] = sp
    dpf = methods["dpf"]
    dpf.current = 0.9
    dpf._refresh(dpf.weights())
    times: dict[str, list[float]] = {"step": [], "dpf_refresh": []}
    times.update({m: [] for m in methods})

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def forward_backward():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def step():
        forward_backward()
        opt.step()

    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def one_round():
        times["step"].append(timed(step))
        for method, sp in methods.items():
            hooks = timed(sp.before_forward)
            forward_backward()
            hooks += timed(sp.after_backward)
            opt.step()
            hooks += timed(sp.after_step)
            times[method].append(hooks)
        times["dpf_refresh"].append(timed(lambda: dpf._refresh(dpf.weights())))
        model.load_state_dict(saved)

    benchmark.group = f"reparam_cost {workload}"
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1)
    med = {k: statistics.median(v[-rounds:]) for k, v in times.items()}
    med["dpf"] += med["dpf_refresh"] / dpf.settings.refresh_interval
    ratios = {f"{m}_over_step": med[m] / med["step"] for m in methods}
    benchmark.extra_info.update(
        kernel="reparam_hooks",
        provider="ours",
        workload=f"{workload} b{BATCH}",
        device=device.type,
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        **{f"{k}_median_s": v for k, v in med.items()},
        **ratios,
    )
    print(
        f"\n{workload} ({device_name(device)}, {torch.get_num_threads()} threads): dense step "
        f"{med['step'] * 1e3:.1f} ms; "
        + ", ".join(
            f"{m.upper()} {med[m] * 1e3:.2f} ms ({100 * ratios[m + '_over_step']:.1f}%)"
            for m in methods
        )
        + f"; DPF refresh {med['dpf_refresh'] * 1e3:.2f} ms (every 16 steps)"
    )
