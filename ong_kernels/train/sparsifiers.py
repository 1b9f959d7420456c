"""The trainer's seam: one object per sparsification method, called where BIMP's strategies are.

Per iteration, in this order (BIMP HEAD runners/baseRunner.py ``train_epoch``):
:meth:`Sparsifier.before_forward` (swap in a masked or reparametrised weight),
:meth:`Sparsifier.loss_term` (a penalty added to the loss), :meth:`Sparsifier.after_backward`
(gradients final: after backward and a GradScaler's unscale, before ``optimizer.step``; gradient
masking), :meth:`Sparsifier.after_step`. After each training epoch
:meth:`Sparsifier.epoch_end` changes masks through :meth:`SeamHost.apply_masks`
(``FusedMaskedSGD.update_masks``: newly pruned weights and their momentum become exactly 0)
*before* the epoch is evaluated and checkpointed. :meth:`Sparsifier.state_dict` goes into the
checkpoint, so every method resumes bit for bit. The step hooks run during the method's
``epochs``; the final cut's retraining (:class:`FinalCut`) is plain masked SGD.

The one-shot methods are the one-point schedule: masks from ``prune()`` at set-up, no hook
does anything, so their runs are the same as before the seam, bit for bit.

Every top-K here (GMP/BIMP cuts, GSM, LC, the final cut) is :func:`top_keep`:
``pruning.stream.stream_masks``'s radix select over the per-layer scores (two 16-bit
histogram passes, one counting pass, one writing pass; no sort, no concatenation of all
weights), exact in counts, ties kept by position in the concatenation of the layers, as
``allocate`` does. It is global (BIMP), except that the methods whose masks are magnitude
cuts (GMP, BIMP, DNW, DPF: ``MethodSpec.scopes``) follow the run's ``--scope``, as the
one-shot methods do.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from ong_kernels.optim import FusedMaskedSGD
from ong_kernels.pruning import methods as M
from ong_kernels.pruning.allocation import pruned_total
from ong_kernels.pruning.stream import stream_masks

from .config import TrainConfig
from .schedule import LRSchedule

__all__ = [
    "CLASSES",
    "FinalCut",
    "OneShot",
    "SeamHost",
    "Sparsifier",
    "SparsityError",
    "pruned_goal",
    "top_keep",
]


class SeamHost(Protocol):
    """What a sparsifier sees of the training run that hosts it (the trainer is one): the
    run's settings, its masked parameters and masks, the optimizer and lr schedule, and the
    few operations a method may ask for. Written out here so the methods depend on this seam,
    not on the trainer that implements it."""

    config: TrainConfig
    device: torch.device
    targets: list[tuple[str, torch.nn.Parameter]]  # the masked parameters, by name
    masks: dict[str, torch.Tensor]  # name -> bool mask (True: kept)
    pruned_count: int  # pruned entries over every mask
    masked_total: int  # entries over every mask
    optimizer: FusedMaskedSGD
    schedule: LRSchedule
    steps_per_epoch: int
    sparsifier: Sparsifier

    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Change the named parameters' masks (newly pruned weights and momentum to 0)."""

    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy of the model as it is now."""

    def measured_sparsity(self) -> tuple[int, int]:
        """(exact zeros in the masked weights, number of masked weights)."""


def top_keep(
    scores: list[torch.Tensor], sparsity: float, *, scope: str = "global", floor: bool = True
) -> list[torch.Tensor]:
    """Bool masks keeping the highest of the scores, one per score, at ``sparsity`` under
    ``scope`` (``allocate``'s scopes): exactly ``N - round(sparsity * N)`` of the N entries
    under "global", ties by position. ``floor``: at least one entry per layer (the
    project's rule for cuts; a per-step top-K like GSM's has none)."""
    shapes = [tuple(s.shape) for s in scores]
    return list(
        stream_masks(lambda: scores, shapes, sparsity, scope, min_density=_min_density(floor))
    )


def pruned_goal(host: SeamHost, sparsity: float, *, floor: bool = True) -> int:
    """Weights :func:`top_keep` prunes over the host's masked set at ``sparsity`` under the
    run's ``scope``: the exact count a cut must land on."""
    shapes = [tuple(p.shape) for _, p in host.targets]
    return pruned_total(shapes, sparsity, host.config.scope, _min_density(floor))


def _min_density(floor: bool) -> float | None:
    return None if floor else 0.0


def _masked_magnitude(host: SeamHost) -> list[torch.Tensor]:
    """|w| of the kept weights, -inf at pruned ones: a cut on these never revives a weight."""
    out = []
    for name, p in host.targets:
        mask = host.masks[name]
        out.append(p.detach().abs().float().masked_fill(~mask, -math.inf))
    return out


class SparsityError(RuntimeError):
    """The weights do not hold the sparsity the masks promise."""


class Sparsifier:
    """A method with no hooks: dense training, or masks fixed at set-up (one-shot)."""

    #: masks at set-up: "prune" (one-shot: prune() at initialisation), "all" (every
    #: prunable weight kept, masks change later), "none" (dense).
    initial = "none"

    def __init__(self, host: SeamHost, settings: Any):
        self.host = host
        self.settings = settings

    def plan_schedule(self, schedule) -> None:
        """Change the lr schedule before training starts (BIMP's budget and cycles)."""

    def before_forward(self) -> None:
        pass

    def loss_term(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def epoch_end(self, epoch: int) -> None:
        pass

    def train_end(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"cuts": list(getattr(self, "cuts", []))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self, "cuts"):
            self.cuts = list(state.get("cuts", []))


class OneShot(Sparsifier):
    initial = "prune"


class _Scheduled(Sparsifier):
    """Masks over every prunable weight from the start, cut at planned epochs."""

    initial = "all"

    def __init__(self, host: SeamHost, settings: Any):
        super().__init__(host, settings)
        self.plan: dict[int, float] = {}
        self.cuts: list[dict[str, Any]] = []

    def _cut(self, epoch: int, sparsity: float, scores: list[torch.Tensor]) -> dict[str, Any]:
        host = self.host
        before = host.pruned_count
        keep = top_keep(scores, sparsity, scope=host.config.scope)
        host.apply_masks(dict(zip((n for n, _ in host.targets), keep, strict=True)))
        want = pruned_goal(host, sparsity)
        if host.pruned_count != want:
            raise SparsityError(
                f"{host.config.method} cut at epoch {epoch}: {host.pruned_count} weights "
                f"pruned, the schedule asks for {want}"
            )
        record = {
            "epoch": epoch,
            "sparsity": sparsity,
            "pruned": host.pruned_count,
            "newly_pruned": host.pruned_count - before,
        }
        self.cuts.append(record)
        return record

    def epoch_end(self, epoch: int) -> None:
        if epoch in self.plan:
            self._cut(epoch, self.plan[epoch], _masked_magnitude(self.host))


class Gmp(_Scheduled):
    """Gradual magnitude pruning, BIMP HEAD ``GMP`` (scratchStrategies.py l.250-302): global
    magnitude cuts at epochs ``t * pruning_interval`` to the cubic schedule of Zhu & Gupta
    (:func:`methods.gmp_plan`), exact counts round(s N) at every cut.

    Masks only grow, unless ``allow_recovering``: then each cut is made from the dense
    weights, where a pruned weight keeps its value at the cut and evolves as BIMP's
    ``weight_orig`` does under SGD with zero loss gradient: weight decay and momentum only
    (momentum zeroed at the cut, as BIMP's ``prune_momentum``). That evolution is linear and
    the same for every pruned weight, so it is kept as one 2x2 transfer matrix (float64)
    accumulated per step from the step's lr and applied at the next cut: no per-step work
    on the weights. A weight that comes back returns with that value and zero momentum.
    """

    def __init__(self, host: SeamHost, settings: M.GmpSettings):
        super().__init__(host, settings)
        cfg = host.config
        self.plan = dict(M.gmp_plan(cfg.epochs, settings.pruning_interval, cfg.sparsity))
        self.recovering = settings.allow_recovering
        # Pruned weights' values and momentum (0 where kept), made at the first cut.
        self.dormant: dict[str, torch.Tensor] | None = None
        self.dormant_buf: dict[str, torch.Tensor] | None = None
        self.transfer = [1.0, 0.0, 0.0, 1.0]

    def after_step(self) -> None:
        if not self.recovering:
            return
        cfg = self.host.config
        lr = self.host.optimizer.param_groups[0]["lr"]
        wd, m = cfg.weight_decay, cfg.momentum
        if m == 0:
            step = [1.0 - lr * wd, 0.0, 0.0, 0.0]
        elif cfg.nesterov:  # buf' = wd w + m buf; w' = w - lr (wd w + m buf')
            step = [1.0 - lr * wd - lr * m * wd, -lr * m * m, wd, m]
        else:  # w' = w - lr buf'
            step = [1.0 - lr * wd, -lr * m, wd, m]
        a, b, c, d = step
        t0, t1, t2, t3 = self.transfer
        self.transfer = [a * t0 + b * t2, a * t1 + b * t3, c * t0 + d * t2, c * t1 + d * t3]

    def epoch_end(self, epoch: int) -> None:
        if epoch not in self.plan:
            return
        if not self.recovering:
            return super().epoch_end(epoch)
        host = self.host
        if self.dormant is None:
            self.dormant = {n: torch.zeros_like(p) for n, p in host.targets}
            self.dormant_buf = {n: torch.zeros_like(p) for n, p in host.targets}
        t0, t1, t2, t3 = self.transfer
        dense, old = [], {}
        with torch.no_grad():
            for name, p in host.targets:
                w, buf = self.dormant[name], self.dormant_buf[name]
                w_new = (w.double() * t0 + buf.double() * t1).to(w.dtype)
                buf_new = (w.double() * t2 + buf.double() * t3).to(w.dtype)
                self.dormant[name], self.dormant_buf[name] = w_new, buf_new
                old[name] = host.masks[name].clone()
                dense.append(torch.where(old[name], p.detach(), w_new))
        self.transfer = [1.0, 0.0, 0.0, 1.0]
        self._cut(epoch, self.plan[epoch], [d.abs().float() for d in dense])
        with torch.no_grad():
            for (name, p), value in zip(host.targets, dense, strict=True):
                keep = host.masks[name]
                back = keep & ~old[name]
                if bool(back.any()):
                    p[back] = value[back]  # momentum there is 0: update_masks zeroed it
                gone = ~keep & old[name]
                self.dormant[name] = torch.where(keep, 0.0, value)
                self.dormant_buf[name] = torch.where(keep | gone, 0.0, self.dormant_buf[name])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.recovering and self.dormant is not None:
            state.update(
                dormant={k: v.cpu() for k, v in self.dormant.items()},
                dormant_buf={k: v.cpu() for k, v in self.dormant_buf.items()},
                transfer=list(self.transfer),
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.recovering and "dormant" in state:
            dev = self.host.device
            self.dormant = {k: v.to(dev) for k, v in state["dormant"].items()}
            self.dormant_buf = {k: v.to(dev) for k, v in state["dormant_buf"].items()}
            self.transfer = [float(v) for v in state["transfer"]]


class Bimp(_Scheduled):
    """Budgeted IMP, BIMP INIT ``BIMP`` (strategies.py l.1052-1155) with its
    ``CyclicBudget`` lr (runners/baseRunner.py l.324-430): dense training for ``train_budget``
    epochs with the lr falling linearly to 0, then a cut every ``pruning_interval`` epochs to
    1 - (1 - s)^((t+1)/n) (:func:`methods.bimp_plan`), each followed by a triangular lr cycle
    (10% rise to the peak, 90% linear to 0; the last cycle spans the remaining epochs).
    ``allr``: the last cycle's peak is scaled by clip(d / sqrt(p), min, 1), d the relative
    L2 norm of the weights that cut removed, p the fraction of the remaining weights it cut,
    min = min(epochs left / train budget, 1) (INIT's BIMP_ALLR: only the last prune; the
    earlier cycles restart at the full peak). The run's ``--schedule`` and warm-up are
    replaced by this schedule.
    """

    def __init__(self, host: SeamHost, settings: M.BimpSettings):
        super().__init__(host, settings)
        cfg = host.config
        self.budget = M.bimp_budget(cfg.epochs, settings.train_budget)
        self.plan = dict(
            M.bimp_plan(cfg.epochs, settings.train_budget, settings.pruning_interval, cfg.sparsity)
        )

    def plan_schedule(self, schedule) -> None:
        spe, cfg = self.host.steps_per_epoch, self.host.config
        schedule.kind = "linear"
        schedule.total_steps = self.budget * spe
        schedule.warmup_steps = 0
        schedule.milestones = []
        epochs = sorted(self.plan)
        for i, start in enumerate(epochs):
            end = epochs[i + 1] if i + 1 < len(epochs) else cfg.epochs
            schedule.add_cycle(start * spe, end * spe)

    def epoch_end(self, epoch: int) -> None:
        if epoch not in self.plan:
            return
        scores = _masked_magnitude(self.host)
        norms = _norms(self.host)
        before = self.host.pruned_count
        record = self._cut(epoch, self.plan[epoch], scores)
        record.update(_drop(self.host, norms, before))
        if self.settings.allr and epoch == max(self.plan):
            floor = min((self.host.config.epochs - epoch) / self.budget, 1.0)
            peak = _allr_peak(record, floor)
            self.host.schedule.cycles[-1][3] = peak
            record["peak_lr_factor"] = peak


def _norms(host: SeamHost) -> float:
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for _, p in host.targets))


def _drop(host: SeamHost, norm_before: float, pruned_before: int) -> dict[str, float]:
    """d: relative L2 norm of what the cut removed; p: fraction of the remaining cut."""
    after = _norms(host)
    removed = math.sqrt(max(norm_before**2 - after**2, 0.0))
    remaining = host.masked_total - pruned_before
    return {
        "norm_drop": removed / norm_before if norm_before else 0.0,
        "fraction_cut": (host.pruned_count - pruned_before) / remaining if remaining else 0.0,
    }


def _allr_peak(record: dict[str, float], floor: float) -> float:
    """ALLR's peak factor clip(d / sqrt(p), floor, 1) (BIMP HEAD define_retrain_schedule)."""
    p, d = record["fraction_cut"], record["norm_drop"]
    ratio = d / math.sqrt(p) if p > 0 else 1.0
    return min(max(ratio, floor), 1.0)


class Gsm(Sparsifier):
    """Global sparse momentum, BIMP HEAD ``GSM`` (scratchStrategies.py l.217-247): after
    backward, only the global top-K prunable weights by |w * grad| (K = N - round(s N)) keep
    their gradients; the others' are zeroed, so they only decay (weight decay and their old
    momentum). The pool is the prunable set only, as the original GSM (2-D/4-D tensors;
    BIMP also pools BN and biases while counting K over the prunable weights). Dense during
    training: the final cut makes it sparse."""

    initial = "all"  # every weight kept until the final cut

    def after_backward(self) -> None:
        host = self.host
        grads = [p.grad for _, p in host.targets]
        if any(g is None for g in grads):
            return
        scores = [
            (p.detach() * g).abs().float() for (_, p), g in zip(host.targets, grads, strict=True)
        ]
        keep = top_keep(scores, host.config.sparsity, floor=False)
        for g, k in zip(grads, keep, strict=True):
            g.masked_fill_(~k, 0)


class Lc(Sparsifier):
    """Learning-compression in BIMP HEAD's version (``LC``, scratchStrategies.py l.183-214):
    after backward, the weight decay of the global top-K prunable weights by |w| is cancelled
    (-wd * w added to their gradients), so only the N - K would-be-pruned weights decay; the
    penalty is the run's weight decay, constant (HEAD has no mu schedule). Dense during
    training: the final cut makes it sparse."""

    initial = "all"  # every weight kept until the final cut

    def after_backward(self) -> None:
        host = self.host
        wd = host.config.weight_decay
        if wd == 0:
            return
        scores = [p.detach().abs().float() for _, p in host.targets]
        keep = top_keep(scores, host.config.sparsity, floor=False)
        with torch.no_grad():
            for (_, p), k in zip(host.targets, keep, strict=True):
                if p.grad is not None:
                    p.grad.add_(torch.where(k, p, 0.0), alpha=-wd)


# The sparsifiers of this module by method name (one-shot methods are OneShot); the
# reparametrisation methods' are in reparam.py, and train/methods_table.py joins them.
CLASSES = {"dense": Sparsifier, "gmp": Gmp, "bimp": Bimp, "gsm": Gsm, "lc": Lc}


class FinalCut:
    """BIMP's protocol at the end of training (HEAD pretrainedStrategies.IMP): ``phases``
    exact global magnitude cuts to the goal, each to 1 - (1 - s)^(j/phases) of the prunable
    weights, each followed by ``retrain_epochs`` of masked SGD on an LLR cycle (10% rise to
    the run's lr, linear to 0) or ALLR (peak scaled by clip(d / sqrt(p), min(retrain /
    epochs, 1), 1), every phase as HEAD does). A cut never revives a pruned weight and only
    prunes when the model holds fewer pruned weights than it asks. For methods whose
    sparsity is exact it is a no-op (their retraining still runs), for GSM and LC it is what
    makes them sparse.

    Cut j happens after epoch ``epochs + j * retrain_epochs``; each records the sparsity and
    test accuracy before and after it, the norm drop and fraction cut.
    """

    def __init__(self, host: SeamHost):
        self.host = host
        cfg = host.config
        self.active = cfg.method != "dense"
        self.exact = M.spec(cfg.method).exact
        self.targets = M.imp_phase_sparsities(cfg.sparsity, cfg.cut_phases) if self.active else []
        self.epochs = {cfg.epochs + j * cfg.retrain_epochs: j for j in range(cfg.cut_phases)}
        self.records: list[dict[str, Any]] = []

    def plan_schedule(self, schedule) -> None:
        cfg, spe = self.host.config, self.host.steps_per_epoch
        if not self.active or cfg.retrain_epochs == 0:
            return
        for j in range(cfg.cut_phases):
            start = (cfg.epochs + j * cfg.retrain_epochs) * spe
            schedule.add_cycle(start, start + cfg.retrain_epochs * spe)

    def epoch_end(self, epoch: int) -> dict[str, Any] | None:
        """Cut if ``epoch`` ends a phase; returns the record (test_acc_after filled in by the
        trainer's evaluation of the epoch) or None."""
        if not self.active or epoch not in self.epochs:
            return None
        host, cfg = self.host, self.host.config
        j = self.epochs[epoch]
        sparsity = self.targets[j]
        zeros, total = host.measured_sparsity()
        record: dict[str, Any] = {
            "phase": j + 1,
            "epoch": epoch,
            "target_sparsity": sparsity,
            # A reparametrisation method reports the sparsity its own masks reached (its
            # fold may have revived weights to reach the goal exactly).
            "sparsity_before": getattr(host.sparsifier, "reached_sparsity", None) or zeros / total,
        }
        before = host.pruned_count
        # Exact methods are at their goal already (a one-shot method with per-layer scopes
        # holds its own rounding of it, which the cut must not change).
        if self.exact or before >= M.goal_count(sparsity, total):
            record.update(changed=False, norm_drop=0.0, fraction_cut=0.0)
        else:
            record["test_acc_before"] = host.evaluate()["test_acc"]
            norms = _norms(host)
            keep = top_keep(_masked_magnitude(host), sparsity)
            host.apply_masks(dict(zip((n for n, _ in host.targets), keep, strict=True)))
            record.update(changed=True, **_drop(host, norms, before))
        record["pruned"] = host.pruned_count
        if cfg.retrain_epochs and cfg.retrain_schedule == "allr":
            floor = min(cfg.retrain_epochs / cfg.epochs, 1.0)
            peak = _allr_peak(record, floor) if record["changed"] else 1.0
            # Cycle j of the retraining: the last cycles of the schedule are the phases'.
            host.schedule.cycles[len(host.schedule.cycles) - cfg.cut_phases + j][3] = peak
            record["peak_lr_factor"] = peak
        self.records.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))
