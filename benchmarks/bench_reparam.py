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
and the penalty by autograd) and ``after_step`` (theta's SGD step, the projection: a kthvalue
over every margin, CS's beta). DPF's mask refresh (a global top-k of the dense weights every 16
iterations) is timed once per round and counted as 1/16 of it per step. ``extra_info``
holds the medians and the ratios method / step.
"""

from __future__ import annotations

import statistics

import pytest
import torch.nn.functional as F

import ong_kernels
from benchmarks.conftest import report_against_step, seconds, training_batch
from ong_kernels.pruning import methods as M
from ong_kernels.pruning.targets import prunable_parameters
from ong_kernels.train.config import TrainConfig
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
    model, x, y = training_batch(name, channels, size, BATCH, device)
    opt = ong_kernels.FusedMaskedSGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
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

    def timed(fn) -> float:
        return seconds(fn, device)

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
    report_against_step(
        benchmark, kernel="reparam_hooks", workload=f"{workload} b{BATCH}", device=device,
        med=med, costs={m: m.upper() for m in methods},
        tail=f"; DPF refresh {med['dpf_refresh'] * 1e3:.2f} ms (every 16 steps)",
    )  # fmt: skip
