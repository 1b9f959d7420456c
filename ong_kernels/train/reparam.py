"""The reparametrisation methods on the trainer's seam: DNW, DPF, STR, CS and DST.

These change the weight the forward pass sees. Every one keeps a *latent* weight ``w`` per
prunable tensor (what the optimizer steps, with the run's momentum and weight decay) and,
for STR/CS/DST, learnable thresholds or mask logits ``theta`` (stepped by an SGD of their
own with the run's lr at every step, momentum and Nesterov flag). One mechanism serves all
five, so the model keeps its plain ``weight`` parameters (DDP, ``torch.compile``,
``masks_for`` and the checkpoint's names are untouched):

* :meth:`before_forward` saves ``w`` and writes the effective weight ``f(w, theta)`` into
  the parameter in place; forward and backward give ``G = dL/df`` in ``p.grad``;
* :meth:`after_backward` puts ``w`` back and replaces ``p.grad`` by ``dL/dw``: ``G`` itself
  for the straight-through methods (DNW, DPF), else ``G`` pulled back through ``f`` by
  autograd together with the method's penalty (CS, DST, STR), which also gives
  ``theta.grad``;
* :meth:`after_step` steps ``theta`` with the lr the optimizer just used and runs the
  method's per-iteration work (DPF's mask refresh, CS's beta, the projection onto the
  target sparsity).

Between epochs the parameters hold the *exported* weights: the reparametrisation folded
into plain weights with exact zeros (STR ``sign(w) relu(|w| - sigmoid(s))``, CS ``w
sigma(beta m) / sigma(s0)`` where ``m > 0``, DST ``w`` where ``|w| > t``, DNW/DPF the
masked ``w``), so evaluation measures the model a user would get if training stopped
there and every checkpoint's ``model`` entry is an ordinary sparse model; ``w``, ``theta``,
their optimizer state are the method's checkpoint state, and a
resumed run continues bit for bit. At the end of the method's epochs :meth:`train_end`
folds for good: the masks become the method's own through ``FusedMaskedSGD.update_masks``,
the latent weights are dropped, and the final cut and its retraining see a plain model.

**Sparsity a user asks for** (STR, CS, DST). The papers and BIMP give these no target:
they reach whatever their penalty, initial threshold and weight decay give, and BIMP
compares them at that sparsity. Here ``--sparsity`` means something, so with ``calibrate``
(the default) we deviate from them: after every optimizer step (theta's step included) the
thresholds or logits are *projected* onto the iteration's target. One global shift
``delta`` of the method's own margin (> 0 exactly where the mask keeps: STR ``|w| -
sigmoid(s)``, CS ``m``, DST ``|w| - t``) is found over the whole prunable set so that
exactly round(target N) margins fall to ``<= 0`` (:func:`boundary_shift`: the midpoint
between the k-th and (k+1)-th smallest margins, torch.kthvalue on the concatenated float64
margins; margins tied at the boundary are pruned together), and applied to theta: STR's
thresholds sigmoid(s) += delta (in threshold space, kept in (0, 1)), DST's t += delta, CS's
m -= delta. The method still learns theta with its own loss gradient and its penalty at
the documented default, fixed; the projection only moves all thresholds together, so the
*global* count follows the target while the split between layers (STR, DST) and between
weights (CS) stays the method's. The target follows GMP's cubic ramp from 0 to the goal
over the first ``ramp`` of the method's iterations for STR and DST, which start dense;
CS's mask starts at ``m = m0`` (every weight on the pruned side of ``m > 0``) and is held
at the goal from the start. All on the device, no host sync, nothing to checkpoint (the
projection is a function of ``w`` and theta, which are). It replaced a controller of the
penalty's coefficient, which on a 138-iteration Fashion-MNIST run lagged (STR 62% for 90%)
or collapsed STR and overshot CS to 96-99.9% (benchmarks/RESULTS.md). Without
``calibrate``: BIMP's fixed penalty, no projection. The sparsity reached is reported
(``sparsity_before_cut``), then BIMP's final cut makes it exact: a method that ends less
sparse than the goal is cut by global magnitude (:class:`~.sparsifiers.FinalCut`); one
that ends sparser gets back the pruned weights of the largest margin at their latent
value, to exactly round(s N) zeros (counted in the method's record as ``revived``).

Weight decay, per method (BIMP HEAD gives the optimizer's weight decay to every latent
weight and to thresholds and logits, and CS/DST a second explicit 0.5 wd sum w^2; INIT
switched the optimizer's off for CS):

* DNW, DPF: the run's weight decay on the dense latent weights (BIMP, both authors).
* STR: the run's weight decay on ``w``; on ``s`` the penalty ``lambda`` (0.5 lambda s^2,
  i.e. weight decay on s): it is STR's sparsity driver (Kusupati et al. 2020 train s with
  weight decay), here a coefficient of its own (fixed).
* CS: once on ``w`` (the optimizer; INIT and the CS paper, not HEAD's double decay), none
  on the mask logits (CS's code steps them with an optimizer without weight decay).
* DST: once on ``w``; none on the thresholds (BIMP decays them and ``w`` twice; weight
  decay on ``t`` pulls it back to 0 against the penalty, so the sparsity would depend on
  weight decay as well as the penalty).

GSM's and LC's top-K pools do not apply here; DNW's and DPF's top-K is over the prunable
set only (every conv and linear weight; BIMP's prunable set), by
:func:`~.sparsifiers.top_keep` (radix select, exact counts, ties by position): global as
in BIMP by default, per layer or ERK with ``--scope layer`` / ``--scope erk``.

**DNW and DPF at extreme sparsity with BatchNorm.** With the global top-K, both collapse
to chance at 98% on ResNet-20 / Fashion-MNIST (all seeds; benchmarks/RESULTS.md, "DNW and
DPF at 98%"), and the cause is the methods', not a defect. At initialisation the global
top-2% keeps 129-152 of the 36,864 weights of each of stage 3's second convs; BatchNorm
rescales their small output back to unit variance, so the loss gradient reaching them is
large (first step: norm 153-359 there, at most 33 at any other layer), and the
straight-through backward hands it to all 36,864 latent weights. One step at lr 0.1 takes
two of those layers' latent norm from 11 to 60-69; the next global top-K gives them most of
the budget and empties seven other layers, whose BatchNorm then divides by sqrt(eps)
(x316): latent norms reach 3e4-7e5 at the next step and the network outputs a constant. A
per-layer budget bounds what a layer can take: DNW at 98% then trains (after 4 epochs of
3,000 images, same seed: 65.8% with ``--scope erk``, 41.1% with ``layer``, 9.3% global).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ong_kernels.pruning import methods as M

from .sparsifiers import SeamHost, Sparsifier, pruned_goal, top_keep

__all__ = ["CLASSES", "Cs", "Dnw", "Dpf", "Dst", "Str", "binary_step", "boundary_shift", "cs_beta"]


def cs_beta(beta_final: float, iteration: int, total: int) -> float:
    """CS's temperature at ``iteration`` of ``total``: beta_final^(i / T), 1 -> beta_final
    (BIMP HEAD CS.after_training_iteration)."""
    return beta_final ** (min(iteration, total) / total)


class _BinaryStep(torch.autograd.Function):
    """DST's step: forward 1[x > 0]; backward the official DST code's surrogate (BIMP HEAD
    scratchStrategies.py l.689-824): 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, else 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        a = x.abs()
        slope = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, 0.4, 0.0))
        return grad * slope


binary_step = _BinaryStep.apply


class _Reparam(Sparsifier):
    """What the five share: the latent weights, the swap, the fold, the state."""

    initial = "all"  # the host's masks keep every weight until train_end folds
    straight_through = False  # dL/dw = dL/d(effective weight) (DNW, DPF)
    floor = True  # the method's masks keep at least one weight per layer (top_keep's floor)

    def __init__(self, host: SeamHost, settings: Any):
        super().__init__(host, settings)
        self.reparametrised = True  # the trainer checks exact counts only after the fold
        self.total_iterations = host.config.epochs * host.steps_per_epoch
        self.iteration = 0
        self.cuts: list[dict[str, Any]] = []
        self.latent: dict[str, torch.Tensor] | None = None  # while params hold the export
        self.saved: list[torch.Tensor] | None = None  # the latent w during a step
        self.reached_sparsity: float | None = None
        self.theta: dict[str, torch.Tensor] = {}
        self.theta_opt: torch.optim.Optimizer | None = None
        self._started = False

    # ----------------------------------------------------------------- set-up
    def _init_theta(self, w: torch.Tensor) -> torch.Tensor | None:
        """The method's learnable thresholds or logits for weight ``w`` (None: none)."""
        return None

    def _start(self) -> None:
        """Create theta and its optimizer (the host's prunable set exists from here on)."""
        if self._started:
            return
        self._started = True
        cfg = self.host.config
        for name, p in self.host.targets:
            t = self._init_theta(p.detach())
            if t is not None:
                self.theta[name] = t.requires_grad_()
        if self.theta:
            self.theta_opt = torch.optim.SGD(
                list(self.theta.values()),
                lr=cfg.lr,
                momentum=cfg.momentum,
                nesterov=cfg.nesterov and cfg.momentum > 0,
                weight_decay=0.0,  # theta's decay, where a method has one, is its penalty
            )

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.host.targets]

    def weights(self) -> list[torch.Tensor]:
        """The latent weights, wherever they are now."""
        if self.latent is not None:
            return [self.latent[n] for n in self.names]
        if self.saved is not None:
            return list(self.saved)
        return [p.detach() for _, p in self.host.targets]

    # ----------------------------------------------------------------- the method
    def effective(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The weight the forward pass uses (differentiable in ``w`` and theta)."""
        raise NotImplementedError

    def masks_of(self, ws: list[torch.Tensor]) -> list[torch.Tensor]:
        """The method's own masks (bool) of the latent weights ``ws``."""
        return [self.keep(n, w) for n, w in zip(self.names, ws, strict=True)]

    def keep(self, name: str, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def margin(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Ranks the pruned weights for revival (> 0 exactly where kept)."""
        return w.abs()

    def kept_value(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The plain value a kept weight folds to."""
        with torch.no_grad():
            return w if self.straight_through else self.effective(name, w)

    def penalty(self) -> torch.Tensor | None:
        """The method's penalty on theta, added to the loss (None: none)."""
        return None

    def _prepare(self) -> None:
        """Per-step work before the effective weights are made (DNW's top-k, DST's reset)."""

    def _iteration_done(self) -> None:
        """Per-iteration work after the step (DPF's refresh, the projection)."""

    def folded(self, ws: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(plain weights with exact zeros, masks) of the latent weights ``ws``."""
        with torch.no_grad():
            keep = self.masks_of(ws)
            values = [
                torch.where(k, self.kept_value(n, w), 0.0)
                for n, w, k in zip(self.names, ws, keep, strict=True)
            ]
        return values, keep

    def pruned_fraction(self) -> torch.Tensor:
        """Fraction of the prunable weights the method's masks prune now (on the device)."""
        with torch.no_grad():
            pruned = sum((~k).sum() for k in self.masks_of(self.weights()))
        return pruned.double() / self.host.masked_total

    # ----------------------------------------------------------------- hooks
    def before_forward(self) -> None:
        self._start()
        with torch.no_grad():
            if self.latent is not None:  # the params hold the export since the epoch end
                self.saved = [self.latent[n] for n in self.names]
                self.latent = None
            else:
                self.saved = [p.detach().clone() for _, p in self.host.targets]
            self._prepare()
            for (name, p), w in zip(self.host.targets, self.saved, strict=True):
                p.copy_(self.effective(name, w))

    def after_backward(self) -> None:
        targets, saved = self.host.targets, self.saved
        if self.straight_through:
            with torch.no_grad():
                for (_, p), w in zip(targets, saved, strict=True):
                    p.copy_(w)
            self.saved = None
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in targets]
        for t in self.theta.values():
            t.grad = None
        with torch.enable_grad():
            leaves = [w.requires_grad_() for w in saved]
            outs = [self.effective(n, w) for n, w in zip(self.names, leaves, strict=True)]
            pen = self.penalty()
            if pen is not None:
                outs.append(pen)
                grads.append(torch.ones_like(pen))
            torch.autograd.backward(outs, grads)
        with torch.no_grad():
            for (_, p), w in zip(targets, leaves, strict=True):
                p.copy_(w)
                p.grad = w.grad
        self.saved = None

    def after_step(self) -> None:
        if self.theta_opt is not None:
            lr = self.host.optimizer.param_groups[0]["lr"]  # the lr of the step just taken
            for group in self.theta_opt.param_groups:
                group["lr"] = lr
            self.theta_opt.step()
        self.iteration += 1
        self._iteration_done()

    def epoch_end(self, epoch: int) -> None:
        """Export: the params get the folded weights (exact zeros); the latent is kept."""
        self._start()
        self._schedule(epoch)
        ws = self.weights()
        self.latent = dict(zip(self.names, [w.clone() for w in ws], strict=True))
        values, _ = self.folded(ws)
        with torch.no_grad():
            for (_, p), v in zip(self.host.targets, values, strict=True):
                p.copy_(v)
        self.cuts.append(self._epoch_record(epoch))

    def _schedule(self, epoch: int) -> None:
        """Epoch-level work before the export (DPF's cuts)."""

    def _epoch_record(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "sparsity": float(self.pruned_fraction())}

    @property
    def plan_text(self) -> str:
        """What the run will do, for the trainer's first log line."""
        return (
            f"{self._plan_text()}; folded into plain weights after epoch {self.host.config.epochs}"
        )

    def _plan_text(self) -> str:
        raise NotImplementedError

    def train_end(self) -> None:
        """Fold for good: the method's masks through update_masks, exact zeros; a method
        sparser than the goal gets its largest-margin pruned weights back at their latent
        value, so that the final cut makes every method exact."""
        host = self.host
        self._start()
        ws = self.weights()
        values, keep = self.folded(ws)
        total = host.masked_total
        pruned = sum(int((~k).sum()) for k in keep)
        self.reached_sparsity = pruned / total
        goal = pruned_goal(host, host.config.sparsity, floor=self.floor)
        revived = 0
        if pruned > goal:
            with torch.no_grad():
                margins = [
                    torch.where(k, math.inf, self.margin(n, w).float())
                    for n, w, k in zip(self.names, ws, keep, strict=True)
                ]
                new = top_keep(margins, host.config.sparsity, floor=False)
                values = [torch.where(k, v, w) for v, w, k in zip(values, ws, keep, strict=True)]
            keep, revived = new, pruned - goal
        with torch.no_grad():
            for (_, p), v, k in zip(host.targets, values, keep, strict=True):
                p.copy_(torch.where(k, v, 0.0))
        self.latent = None
        self.reparametrised = False
        host.apply_masks(dict(zip(self.names, keep, strict=True)))
        self.cuts.append(
            {
                "fold": True,
                "sparsity_reached": self.reached_sparsity,
                "revived": revived,
                "pruned": host.pruned_count,
            }
        )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "cuts": list(self.cuts),
            "iteration": self.iteration,
            "reparametrised": self.reparametrised,
            "reached_sparsity": self.reached_sparsity,
        }
        if self.latent is not None:
            state["latent"] = {k: v.cpu() for k, v in self.latent.items()}
        if self.theta:
            state["theta"] = {k: v.detach().cpu() for k, v in self.theta.items()}
            state["theta_opt"] = self.theta_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start()
        dev = self.host.device
        self.cuts = list(state.get("cuts", []))
        self.iteration = int(state.get("iteration", 0))
        self.reparametrised = bool(state.get("reparametrised", True))
        self.reached_sparsity = state.get("reached_sparsity")
        if "latent" in state:
            self.latent = {k: v.to(dev) for k, v in state["latent"].items()}
        with torch.no_grad():
            for k, v in state.get("theta", {}).items():
                self.theta[k].copy_(v.to(dev))
        if "theta_opt" in state:
            self.theta_opt.load_state_dict(state["theta_opt"])


class Dnw(_Reparam):
    """Discovering Neural Wirings (Wortsman et al. 2019) as BIMP HEAD ``DNW``
    (scratchStrategies.py l.369-478): every forward uses the top-k of |w| over the
    prunable set, global as BIMP (k = N - round(s N), ties by position; BIMP's kthvalue
    threshold prunes ties together) or per the run's ``--scope`` (no floor: a layer may
    keep nothing, as under BIMP's threshold), the backward is straight-through to the dense
    latent weights, which the optimizer steps with the run's momentum and weight decay (as
    BIMP). Exact at every step; the fold keeps the top-k of the final weights. No settings:
    the goal is ``sparsity``."""

    straight_through = True
    floor = False  # BIMP's kthvalue threshold has none

    def masks_of(self, ws):
        cfg = self.host.config
        return top_keep(
            [w.abs().float() for w in ws], cfg.sparsity, scope=cfg.scope, floor=self.floor
        )

    def _prepare(self) -> None:
        self._step_masks = dict(zip(self.names, self.masks_of(self.saved), strict=True))

    def effective(self, name, w):
        return w * self._step_masks[name]

    def _plan_text(self):
        return f"every forward at the goal's top-k |w| ({self.host.config.scope}), straight through"


class Dpf(_Reparam):
    """Dynamic Pruning with Feedback (Lin et al. 2020) as BIMP HEAD ``DPF``
    (scratchStrategies.py l.305-366): GMP's cubic schedule (:func:`methods.gmp_plan`, cuts
    after epochs ``t * pruning_interval``) sets the sparsity; the magnitude mask of the
    *dense* latent weights (global as BIMP, or per the run's ``--scope``) is recomputed at
    each scheduled epoch and after every ``refresh_interval``-th iteration (counted from the
    run's start), exact counts (round(s N) when global; ties by position, at least one
    weight per layer as the project's cuts).
    Forward and backward at the masked point; the optimizer steps every dense weight with
    that gradient (error feedback), momentum dense. The fold multiplies the last mask in
    (BIMP's make_pruning_permanent): exact at the end."""

    straight_through = True

    def __init__(self, host: SeamHost, settings: M.DpfSettings):
        super().__init__(host, settings)
        cfg = host.config
        self.plan = dict(M.gmp_plan(cfg.epochs, settings.pruning_interval, cfg.sparsity))
        self.current = 0.0  # the sparsity the mask holds
        self.mask: dict[str, torch.Tensor] | None = None  # None: every weight kept

    def _refresh(self, ws: list[torch.Tensor]) -> None:
        scores = [w.abs().float() for w in ws]
        keep = top_keep(scores, self.current, scope=self.host.config.scope, floor=self.floor)
        self.mask = dict(zip(self.names, keep, strict=True))

    def masks_of(self, ws):
        if self.mask is None:
            return [torch.ones_like(w, dtype=torch.bool) for w in ws]
        return [self.mask[n] for n in self.names]

    def effective(self, name, w):
        return w if self.mask is None else w * self.mask[name]

    def _plan_text(self):
        cuts = ", ".join(map(str, sorted(self.plan)))
        return (
            f"masks at GMP's cuts after epochs {cuts}, recomputed every "
            f"{self.settings.refresh_interval} iterations"
        )

    def _iteration_done(self) -> None:
        if self.current > 0 and self.iteration % self.settings.refresh_interval == 0:
            self._refresh(self.weights())

    def _schedule(self, epoch: int) -> None:
        if epoch in self.plan:
            self.current = self.plan[epoch]
            self._refresh(self.weights())

    def state_dict(self):
        state = super().state_dict()
        state["current"] = self.current
        if self.mask is not None:
            state["mask"] = {k: v.cpu() for k, v in self.mask.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.current = float(state.get("current", 0.0))
        if "mask" in state:
            self.mask = {k: v.to(self.host.device) for k, v in state["mask"].items()}


def boundary_shift(margins: torch.Tensor, k: int) -> torch.Tensor:
    """The shift ``delta`` (0-dim, on the margins' device, no host sync) such that exactly
    ``k`` of ``margins`` are ``<= delta``: the midpoint between the k-th and (k+1)-th
    smallest margins (torch.kthvalue, then a masked min). Tie rule: margins equal to the
    k-th fall on one side together, the pruned one (``<= delta``), so where the k-th and
    (k+1)-th are tied the count is the number of margins ``<=`` the k-th (> k); a single
    shift cannot split a tie (BIMP's kthvalue thresholds prune ties together too).
    ``k = 0``: 1 below the smallest margin (every one kept); ``k = N``: 1 above the
    largest."""
    n = margins.numel()
    if k <= 0:
        return margins.min() - 1.0
    if k >= n:
        return margins.max() + 1.0
    kth = torch.kthvalue(margins, k).values
    above = torch.where(margins > kth, margins, math.inf).min()
    return torch.where(torch.isinf(above), kth + 1.0, (kth + above) / 2)


class _Calibrated(_Reparam):
    """What STR, CS and DST share: the fixed penalty ``lambda`` (``penalty``) and, when
    ``calibrate``, the projection onto the target sparsity after every iteration (see the
    module docstring): one global shift ``delta`` of the method's margins (``margin()``,
    > 0 where kept) puts the pruned count of the method's own mask at round(target N) over
    the prunable set; :meth:`_shift` applies it to the thresholds or logits."""

    hold_goal = False  # CS: the target is the goal from the start, not a ramp

    def _plan_text(self):
        what = f"penalty {self.settings.penalty:g} (fixed)"
        if self.settings.calibrate:
            how = (
                "held at it"
                if self.hold_goal
                else f"ramped to it over {self.settings.ramp:g} of the run"
            )
            return (
                f"{what}; thresholds shifted after every step so that the mask prunes the "
                f"goal's share ({how}); the final cut makes it exact"
            )
        return f"{what}, no projection (BIMP); the final cut makes it exact"

    def target(self, iteration: int) -> float:
        """The sparsity the projection puts the mask at after ``iteration`` iterations."""
        goal = self.host.config.sparsity
        if self.hold_goal:
            return goal
        ramp = max(1, round(self.settings.ramp * self.total_iterations))
        return goal * (1.0 - (1.0 - min(iteration / ramp, 1.0)) ** 3)

    def _shift(self, delta: torch.Tensor) -> None:
        """Move every threshold or logit so that each margin becomes ``margin - delta``."""
        raise NotImplementedError

    def project(self, sparsity: float) -> None:
        """Shift theta so that the method's mask prunes round(sparsity N) of the prunable
        weights (ties: :func:`boundary_shift`). The margins are taken in float64, where the
        difference of two float32 values is exact, so their order and signs are the
        mask's; the shifted thresholds are rounded back to float32 (CS's logits keep their
        sign exactly; an STR or DST weight within one float32 ulp of its shifted threshold
        may fall on either side)."""
        with torch.no_grad():
            margins = torch.cat(
                [
                    self.margin(n, w.double()).double().reshape(-1)
                    for n, w in zip(self.names, self.weights(), strict=True)
                ]
            )
            k = M.goal_count(sparsity, margins.numel())
            self._shift(boundary_shift(margins, k))

    def _iteration_done(self) -> None:
        if self.settings.calibrate:
            self.project(self.target(self.iteration))

    def _epoch_record(self, epoch):
        record = super()._epoch_record(epoch)
        if self.settings.calibrate:
            record["target"] = self.target(self.iteration)
        return record


class Str(_Calibrated):
    """Soft Threshold Reparameterization (Kusupati et al. 2020) as BIMP HEAD ``STR``
    (scratchStrategies.py l.481-569): one learnable threshold logit ``s`` per layer (init
    ``s_initial``), forward ``sign(w) relu(|w| - sigmoid(s))``, gradients to ``w`` and
    ``s``; the mask is ``|w| > sigmoid(s)`` and the fold writes the shrunken weights. STR's
    sparsity driver is weight decay on ``s`` (STR trains s with the model's weight decay;
    s < 0 is pulled towards 0, the threshold grows): here ``penalty`` * 0.5 s^2, fixed.
    With ``calibrate`` (ours, not STR's or BIMP's) every threshold is then moved by the
    same ``delta`` *in threshold space* after every step, sigmoid(s) -> sigmoid(s) +
    delta, s = logit of it (clamped to [1e-12, 1 - 1e-7], so thresholds stay in (0, 1)):
    the global pruned fraction follows GMP's ramp to the goal, the layers' thresholds keep
    the differences STR learnt (a shift in logit space would scale them instead). The clamp
    means a weight exactly 0 is always pruned (latent weights are not 0 in practice)."""

    def _init_theta(self, w):
        return torch.full((), float(self.settings.s_initial), dtype=w.dtype, device=w.device)

    def effective(self, name, w):
        return torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(self.theta[name]))

    def keep(self, name, w):
        return w.abs() > torch.sigmoid(self.theta[name].detach())

    def margin(self, name, w):
        return w.abs() - torch.sigmoid(self.theta[name].detach())

    def penalty(self):
        return 0.5 * self.settings.penalty * sum(s.pow(2) for s in self.theta.values())

    def _shift(self, delta):
        for s in self.theta.values():
            tau = (torch.sigmoid(s.double()) + delta).clamp(1e-12, 1 - 1e-7)
            s.copy_(torch.logit(tau).to(s.dtype))


class Cs(_Calibrated):
    """Continuous Sparsification (Savarese et al. 2020) as BIMP HEAD ``CS``
    (scratchStrategies.py l.572-686): one mask logit ``m`` per weight (init
    ``mask_initial``), forward ``w sigmoid(beta m) / sigmoid(mask_initial)`` (BIMP's
    rescaling, as CS's code), beta = beta_final^(i / T) after every iteration i of the
    method's T (one round, no rewinding, as BIMP), penalty ``penalty * sum sigmoid(beta
    m)`` (fixed); the mask is ``m > 0`` and the fold writes the effective weight at the last
    beta. Weight decay once on ``w`` (the optimizer), none on ``m``. With ``calibrate``
    (ours, not CS's or BIMP's) every logit is moved by the same ``-delta`` after every step
    so that the mask prunes the goal's share from the start (``m = mask_initial <= 0``
    puts every weight on the pruned side at first; the first step's gradients separate the
    logits, the first projection splits them at the goal)."""

    hold_goal = True

    def _init_theta(self, w):
        return torch.full_like(w, float(self.settings.mask_initial))

    def beta(self) -> float:
        return cs_beta(self.settings.beta_final, self.iteration, self.total_iterations)

    def effective(self, name, w):
        scale = 1.0 / (1.0 / (1.0 + math.exp(-self.settings.mask_initial)))
        return w * torch.sigmoid(self.beta() * self.theta[name]) * scale

    def keep(self, name, w):
        return self.theta[name].detach() > 0

    def margin(self, name, w):
        return self.theta[name].detach()

    def penalty(self):
        beta = self.beta()
        return self.settings.penalty * sum(
            torch.sigmoid(beta * m).sum() for m in self.theta.values()
        )

    def _shift(self, delta):
        for m in self.theta.values():
            m.copy_((m.double() - delta).to(m.dtype))

    def _epoch_record(self, epoch):
        record = super()._epoch_record(epoch)
        record["beta"] = self.beta()
        return record


class Dst(_Calibrated):
    """Dynamic Sparse Training (Liu et al. 2020) as BIMP HEAD ``DST`` (scratchStrategies.py
    l.689-824): one learnable threshold ``t`` per output channel (init 0), forward ``w *
    step(|w| - t)`` with the official DST code's surrogate gradient (:func:`binary_step`),
    penalty ``penalty * sum exp(-t)``; a layer keeping 1% or less of its weights has its
    thresholds reset to 0 (before the forward, as BIMP). The fold writes the unshrunken
    kept weights. Weight decay once on ``w``, none on ``t``. With ``calibrate`` (ours, not
    DST's or BIMP's) every threshold gets the same ``+delta`` after every step, so the
    global pruned fraction follows GMP's ramp to the goal. The reset and the projection
    interplay so: a layer the projection leaves at <= 1% kept is reset to 0 before the
    next forward (that forward sees it dense, DST's anti-collapse rule), and the projection
    after that step places it again with every other layer (0 + delta); the exported mask
    at an epoch's end is always the projected one."""

    def _init_theta(self, w):
        return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)

    def _t(self, name, w):
        return self.theta[name].view(-1, *([1] * (w.dim() - 1)))

    def effective(self, name, w):
        return w * binary_step(w.abs() - self._t(name, w))

    def keep(self, name, w):
        return w.abs() > self._t(name, w).detach()

    def margin(self, name, w):
        return w.abs() - self._t(name, w).detach()

    def _prepare(self) -> None:
        with torch.no_grad():  # no host sync: where() on the device
            for name, w in zip(self.names, self.saved, strict=True):
                kept = self.keep(name, w).float().mean()
                t = self.theta[name]
                t.copy_(torch.where(kept <= 0.01, torch.zeros_like(t), t))

    def penalty(self):
        return self.settings.penalty * sum(torch.exp(-t).sum() for t in self.theta.values())

    def _shift(self, delta):
        for t in self.theta.values():
            t.copy_((t.double() + delta).to(t.dtype))


CLASSES = {"dnw": Dnw, "dpf": Dpf, "str": Str, "cs": Cs, "dst": Dst}
