"""Cost of the trainer's seam: GSM's and LC's per-step hooks and a GMP/BIMP cut, against one
training step of the same network (issue 25's targets: each hook <= 5% of a step, a cut <=
one step).

* ``test_hook_cost[resnet20-fmnist]``: ResNet-20 on 1x28x28 inputs, batch 128 (the main
  job's network and data shape).
* ``test_hook_cost[resnet18-cifar]``: ResNet-18 (CIFAR variant, 11M weights) on 3x32x32
  inputs, batch 128, a few steps.

One round = one training step (forward, cross-entropy, backward, FusedMaskedSGD step with a
mask on every prunable weight, as the seam's scheduled methods run), then GSM's
``after_backward`` (|w * grad| per layer, radix-select top-K, gradients outside zeroed), LC's
(|w|, top-K, -wd * w added to the top-K's gradients) and a cut (global magnitude to 90% over
the kept weights by ``top_keep``, then ``FusedMaskedSGD.update_masks``), each timed on its
own; the masks are restored after each cut so every round does the same work. ``extra_info``
holds the medians and the ratios hook / step; the pytest-benchmark time is of the round.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

import ong_kernels
from benchmarks.conftest import report_against_step, seconds, training_batch
from ong_kernels.pruning.targets import prunable_parameters
from ong_kernels.train.config import TrainConfig
from ong_kernels.train.sparsifiers import Gsm, Lc, top_keep

BATCH = 128
WORKLOADS = {
    "resnet20-fmnist": ("resnet20", 1, 28, 10),
    "resnet18-cifar": ("resnet18", 3, 32, 6),
}


class _Host:
    """What GSM's and LC's hooks read from the trainer."""

    def __init__(self, model, sparsity: float, weight_decay: float):
        self.targets = prunable_parameters(model)
        self.config = TrainConfig(method="gsm", sparsity=sparsity, weight_decay=weight_decay)


@pytest.mark.benchmark
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_hook_cost(benchmark, workload, device):
    name, channels, size, rounds = WORKLOADS[workload]
    model, x, y = training_batch(name, channels, size, BATCH, device)
    host = _Host(model, 0.9, 1e-4)
    masks = {p: torch.ones_like(p, dtype=torch.bool) for _, p in host.targets}
    opt = ong_kernels.FusedMaskedSGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, masks=masks
    )
    gsm, lc = Gsm(host, None), Lc(host, None)
    times: dict[str, list[float]] = {"step": [], "gsm": [], "lc": [], "cut": []}

    def timed(key, fn):
        times[key].append(seconds(fn, device))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cut():
        scores = [
            p.detach().abs().float().masked_fill(~masks[p], -float("inf")) for _, p in host.targets
        ]
        keep = top_keep(scores, 0.9)
        opt.update_masks({p: k for (_, p), k in zip(host.targets, keep, strict=True)})

    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def one_round():
        timed("step", step)
        timed("gsm", gsm.after_backward)  # on the step's gradients (left in place)
        timed("lc", lc.after_backward)
        timed("cut", cut)
        opt.set_masks(masks)  # back to dense masks: every round cuts the same amount
        model.load_state_dict(saved)

    benchmark.group = f"hook_cost {workload}"
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1)
    med = {k: statistics.median(v[-rounds:]) for k, v in times.items()}
    report_against_step(
        benchmark, kernel="sparsifier_hooks", workload=f"{workload} b{BATCH}", device=device,
        med=med, costs={"gsm": "GSM", "lc": "LC", "cut": "cut"},
    )  # fmt: skip
