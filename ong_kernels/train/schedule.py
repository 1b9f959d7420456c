"""Learning-rate schedules, stepped once per optimizer step.

Per-step (not per-epoch) schedules give a smooth warm-up and decay even for the short runs
used here. Each schedule is a :class:`LRSchedule` multiplier used through
``torch.optim.lr_scheduler.LambdaLR``; it is a plain object (not a closure) because
LambdaLR's ``state_dict`` stores such an object's attributes, which are plain numbers and
lists here, so the scheduler state survives ``torch.load(weights_only=True)``.

* ``cosine``: 0.5 * (1 + cos(pi * t)), t the fraction of post-warm-up training done.
* ``linear``: 1 - t, decaying to 0 at the end of training: the "LLR" schedule of BIMP
  (Zimmer et al., "How I Learned to Stop Worrying and Love Retraining", ICLR 2023).
* ``multistep``: multiplied by ``gamma`` at each milestone.
* ``constant``: 1.
* warm-up: a linear ramp from 1/warmup_steps to 1 over the first ``warmup_steps`` steps,
  before any of the above.
* cycles (budgeted IMP and the final cut's retraining): from a cycle's first step on, the
  base schedule gives way to triangular cycles ``[start, end, rise, peak]`` (steps, steps,
  steps, multiplier): ``peak * i / rise`` for the first ``rise`` steps of the cycle (i from
  0), then linear from ``peak`` down to 0 at ``end`` (BIMP's CyclicLR with base 0: 10% of
  a cycle rising, 90% falling). A method sets a cycle's peak when it cuts (ALLR); the
  cycles are attributes, so they are in the scheduler's state_dict and a resumed run
  follows them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["LRSchedule", "make_scheduler"]


# Learning-rate schedules by name (TrainConfig.schedule, --schedule).
SCHEDULES = ("cosine", "multistep", "linear", "constant")


class LRSchedule:
    """Multiplier of the base learning rate as a function of the optimizer step."""

    def __init__(
        self,
        kind: str,
        total_steps: int,
        *,
        warmup_steps: int = 0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        cycles: Sequence[Sequence[float]] = (),
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"kind: unknown schedule {kind!r}")
        if total_steps < 1:
            raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps: expected in [0, {total_steps}), got {warmup_steps}")
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.cycles: list[list[float]] = [list(c) for c in cycles]

    def add_cycle(self, start: int, end: int, peak: float = 1.0) -> None:
        """A triangular cycle over steps [start, end): 10% rising (at least one step)."""
        if self.cycles and start < self.cycles[-1][1]:
            raise ValueError(f"cycles overlap: one starts at step {start}")
        if end <= start:
            raise ValueError(f"a cycle needs at least 1 step, got [{start}, {end})")
        # (A 1-step cycle is its rise alone: lr 0, as BIMP's CyclicLR with base 0 starts.)
        rise = max(1, round(0.1 * (end - start)))
        self.cycles.append([int(start), int(end), int(rise), float(peak)])

    def __call__(self, step: int) -> float:
        if self.cycles and step >= self.cycles[0][0]:
            return self._cycle(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "multistep":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0 - t

    def _cycle(self, step: int) -> float:
        start, end, rise, peak = next(c for c in reversed(self.cycles) if step >= c[0])
        i = step - start
        if step >= end:
            return 0.0
        if i < rise:
            return peak * i / rise
        return peak * (1.0 - (i - rise) / (end - start - rise))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR for ``kind`` with epochs converted to optimizer steps."""
    schedule = LRSchedule(
        kind,
        epochs * steps_per_epoch,
        warmup_steps=warmup_epochs * steps_per_epoch,
        milestones=[m * steps_per_epoch for m in milestones],
        gamma=gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
