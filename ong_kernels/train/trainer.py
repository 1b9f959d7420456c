"""The training loop: prune at initialisation, train with FusedMaskedSGD, never lose a run.

:class:`Trainer` runs one configuration end to end:

1. build the model from ``seed`` and the run's sparsification method (the seam,
   :mod:`ong_kernels.train.sparsifiers`; the registry is ``ong_kernels.pruning.methods``):
   a one-shot method prunes with ``ong_kernels.pruning.prune`` now and the masks are checked
   against the requested sparsity; a scheduled method (GMP, BIMP) starts with every
   prunable weight kept; GSM and LC train dense;
2. train with ``ong_kernels.FusedMaskedSGD`` and a per-step LR schedule, on data held in
   device memory with batched augmentation drawn from one seeded ``torch.Generator``; the
   method's hooks run before the forward, on the loss, after backward and after the step;
3. after every epoch apply the method's mask changes, then BIMP's final cut when the epoch
   ends a phase of it (:class:`~.sparsifiers.FinalCut`), evaluate on the test set, verify
   that every pruned weight is exactly 0 (and, for exact methods, that the zeros equal the
   pruned count), and atomically write the metrics CSV and a checkpoint (model, optimizer
   with masks, scheduler, RNG states, the method's state, history);
4. at the end write results.json (with BIMP's protocol columns: sparsity before the final
   cut, accuracy right after it and after retraining) and the loss/accuracy plots.

A run folder that holds a checkpoint is never overwritten: it is continued with
``resume=True``, and on CPU the resumed run ends bit-identical to an uninterrupted one
(everything random is drawn from checkpointed generators, and the restored state is exact).

Under ``torchrun`` the model is wrapped in DistributedDataParallel; see
:mod:`ong_kernels.train.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ong_kernels.optim import FusedMaskedSGD
from ong_kernels.pruning import masks_for, prune
from ong_kernels.pruning import methods as M
from ong_kernels.pruning.api import READS_DATA
from ong_kernels.pruning.targets import prunable_parameters

from . import augment
from . import distributed as D
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    RunFolderError,
    check_writable_folder,
    load_checkpoint,
    read_json_object,
    remove_stale_temp_files,
    restart_advice,
    save_checkpoint,
    write_csv,
    write_json,
)
from .config import TrainConfig, config_differences, describe_differences
from .data import ImageDataset, load_dataset
from .methods_table import build_sparsifier
from .models import build_model
from .schedule import LRSchedule
from .sparsifiers import FinalCut, SparsityError

__all__ = ["Callback", "SparsityError", "StopTraining", "Trainer"]

# A run folder holding one of these holds a run a new one must not write over. Not
# metrics.csv nor config.json: without a checkpoint they are a run killed in its first epoch
# (metrics.csv is written just before the checkpoint), which running again may replace.
_RUN_FILES = (CHECKPOINT_NAME, "results.json")


def _tqdm(show: bool):
    """tqdm (the [train] extra) when bars are shown; imported only then."""
    if not show:
        return lambda iterable, **kwargs: _NoBar(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(
            "progress bars need tqdm: pip install 'ong_kernels[train]', or pass --no-progress"
        ) from err
    return tqdm


class _NoBar:
    """The part of tqdm's interface train_epoch uses, doing nothing."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


class StopTraining(Exception):
    """Raise from a callback to end training early; the run stays resumable."""


class Callback(Protocol):
    def __call__(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        """Called on every rank after epoch ``epoch`` (1-based) is evaluated and saved."""


def _plain(value: Any) -> Any:
    """Convert a pruning report (rows of dataclasses / dicts / tensors) to JSON-able values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "_asdict"):
        return _plain(value._asdict())
    return str(value)


class Trainer:
    """Train one :class:`TrainConfig`; call :meth:`fit`.

    Args:
        config: the run's configuration. ``config.run_dir`` None trains without writing
            anything (and cannot be resumed).
        dataset: an already-loaded dataset to use instead of loading ``config.dataset``
            (tests, sweeps that reuse one dataset); subsets in the config still apply.
        resume: continue the run saved in ``config.run_dir``.
        callbacks: called after each epoch (see :class:`Callback`); raising
            :class:`StopTraining` ends training cleanly, any other exception propagates.
        dist_ctx: a distributed context; by default one is set up from the environment.
        log: where one-line progress messages go (rank 0 only); None silences them.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        dataset: ImageDataset | None = None,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
        dist_ctx: D.DistContext | None = None,
        log: Callable[[str], None] | None = print,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        config.validate()
        if dataset is not None and not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset: expected an ImageDataset, got {type(dataset).__name__}")
        self.run_dir = Path(config.run_dir) if config.run_dir is not None else None
        if self.run_dir is not None and self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run_dir: {self.run_dir} exists and is not a folder")
        if self.run_dir is not None and int(os.environ.get("RANK", "0")) == 0:
            check_writable_folder(self.run_dir)  # only rank 0 writes
        checkpoint_path = self.run_dir / CHECKPOINT_NAME if self.run_dir else None
        if resume and checkpoint_path is None:
            raise ValueError("resume: needs config.run_dir (the folder of the run to continue)")
        if not resume and self.run_dir is not None:
            held = [n for n in _RUN_FILES if (self.run_dir / n).exists()]
            if held:
                advice = (
                    f"continue it with --resume --run-dir {self.run_dir}, or choose another "
                    "--run-dir"
                    if CHECKPOINT_NAME in held
                    else "its checkpoint is gone, so it cannot be continued; "
                    + restart_advice(self.run_dir).replace(" without --resume", "")
                )
                raise ValueError(
                    f"run_dir: {self.run_dir} already holds a run ({', '.join(held)}); {advice}"
                )
        self.config = config
        self.callbacks = list(callbacks)
        self._resume_state = load_checkpoint(checkpoint_path) if resume else None
        if resume:
            remove_stale_temp_files(self.run_dir)
        self._epochs_change: tuple[int, int] | None = None
        if self._resume_state is not None:
            self._check_resumable(self._resume_state, checkpoint_path)
        # All checks above run before any process group exists or any file is written.
        # A context handed in belongs to the caller (e.g. a sweep reusing one process group).
        self._owns_ctx = dist_ctx is None
        self.ctx = dist_ctx if dist_ctx is not None else D.setup(config.device)
        self.device = self.ctx.device
        self._log = log if (log is not None and self.ctx.is_main) else (lambda msg: None)
        # setup() (called by fit()) loads the data, builds and prunes the model.
        self._dataset_arg = dataset
        self._setup_done = False
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        """The config may differ from the checkpoint's only in what does not change the
        result, and in ``epochs``: a run (finished or not) can be extended, or shortened
        down to the epochs it has completed; :meth:`_restore` re-plans the lr schedule."""
        differ = config_differences(state["config"], self.config.to_dict())
        epochs = differ.pop("epochs", None)
        if differ:
            raise CheckpointError(
                f"{path}: the run was started with a different config "
                f"({describe_differences(differ)}); resume it without those options, or "
                "train the new settings into another --run-dir"
            )
        done = int(state["epoch"])
        cfg = self.config
        method = M.spec(cfg.method)
        scheduled = not (method.one_shot or cfg.method == "dense")
        if epochs is not None and (scheduled or cfg.retrain_epochs):
            what = "its pruning schedule" if scheduled else "its final cut's retraining"
            raise ValueError(
                f"epochs: a {cfg.method} run cannot change its length on resume ({what} "
                f"depends on it): pass --epochs {epochs[0]}"
            )
        if epochs is not None and self.config.epochs < done:
            raise ValueError(
                f"epochs: the run in {self.run_dir} has completed {done} epochs; "
                f"--epochs {self.config.epochs} would end before that (pass {done} or more)"
            )
        self._epochs_change = epochs  # (saved, now) or None

    def _resolve_flags(self) -> None:
        cuda = self.device.type == "cuda"
        cfg = self.config
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
        if self.amp and cfg.amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"amp: bf16 is not supported on {torch.cuda.get_device_name(self.device)}"
            )
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # Bars only on a terminal: in a log file tqdm's \r redraws pile up as fragments.
        self.show_bars = cfg.progress and self.ctx.is_main and sys.stderr.isatty()
        if self.show_bars:
            try:
                import tqdm  # noqa: F401  (the [train] extra)
            except ImportError:
                self.show_bars = False  # said now, before the pruning and training
                self._log("progress bars need tqdm: pip install 'ong_kernels[train]'; no bars")

    def setup(self) -> None:
        """Load data, build and prune the model, create optimizer and scheduler (idempotent).

        The steps, in order (each a method): :meth:`_build_data`, :meth:`_build_model`,
        :meth:`_build_masks`, :meth:`_build_optimizer_and_schedule`, :meth:`_build_rng`
        (and the restore of a checkpoint), :meth:`_build_train_model` (DDP, compile).
        """
        if self._setup_done:
            return
        self._resolve_flags()
        self._build_data()
        self._build_model()
        self.sparsifier = build_sparsifier(self)
        self._build_masks()
        self.final_cut = FinalCut(self)
        self._build_optimizer_and_schedule()
        self._build_rng()
        if self._resume_state is not None:
            self._restore(self._resume_state)
            self._resume_state = None
        self._build_train_model()
        self._setup_done = True

    def _build_data(self) -> None:
        """The (subset) dataset on the device, its normalisation, steps per epoch."""
        cfg, ctx = self.config, self.ctx
        if cfg.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size: the global batch {cfg.batch_size} must divide evenly over "
                f"{ctx.world_size} processes"
            )
        ds = self._dataset_arg
        if ds is None:
            ds = load_dataset(cfg.dataset, cfg.data_dir, synthetic_shape=cfg.synthetic_shape)
        self.data = ds.subset(cfg.train_subset, cfg.test_subset).to(self.device)
        self._mean = torch.tensor(self.data.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.data.std, dtype=torch.float32, device=self.device)
        n_train = len(self.data.train_y)
        if n_train < cfg.batch_size:
            raise ValueError(
                f"batch_size: {cfg.batch_size} exceeds the {n_train} training examples"
            )
        self.steps_per_epoch = n_train // cfg.batch_size  # drop_last: equal shards, fixed BN batch

    def _build_model(self) -> None:
        """The network, initialised from ``seed``."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.model = build_model(
            cfg.model,
            in_channels=self.data.in_channels,
            num_classes=self.data.num_classes,
            width=cfg.width,
        ).to(self.device)

    def _build_masks(self) -> None:
        """The method's masks at set-up (one-shot: prune; scheduled: every prunable weight
        kept) or the checkpoint's, the same on every rank; for one-shot methods, check the
        sparsity the masks promise. The optimizer zeroes the pruned weights."""
        state = self._resume_state
        self.prune_time_s = 0.0
        initial = self.sparsifier.initial
        if state is not None:
            self.masks = {k: v.to(self.device) for k, v in state["masks"].items()}
            self.pruning_report = state["pruning_report"]
            self.prune_time_s = state["prune_time_s"]
        elif initial == "none":
            self.masks, self.pruning_report = {}, []
        elif initial == "all":
            self.masks = {
                n: torch.ones_like(p, dtype=torch.bool, memory_format=torch.contiguous_format)
                for n, p in prunable_parameters(self.model)
            }
            self.pruning_report = []
        else:
            start = time.perf_counter()
            self.masks, self.pruning_report = self._prune()
            self.prune_time_s = time.perf_counter() - start
        self.masks = D.broadcast_masks(self.ctx, self.masks)
        params = dict(self.model.named_parameters())
        unknown = sorted(set(self.masks) - set(params))
        if unknown:
            raise SparsityError(f"masks name parameters the model lacks: {', '.join(unknown)}")
        # The prunable set the method and the final cut rank, in the model's order.
        self.targets = [(n, p) for n, p in self.model.named_parameters() if n in self.masks]
        self._count_masks()
        if initial == "prune" and state is None:
            self._check_mask_sparsity()

    def _count_masks(self) -> None:
        self.pruned_count = sum(int((~m).sum()) for m in self.masks.values())
        self.masked_total = sum(m.numel() for m in self.masks.values())

    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Change the masks of the named parameters (the same on every rank, rank 0's):
        through FusedMaskedSGD.update_masks, which zeroes newly pruned weights and their
        momentum in either state format."""
        masks = D.broadcast_masks(self.ctx, {n: m.to(self.device) for n, m in masks.items()})
        params = dict(self.model.named_parameters())
        self.optimizer.update_masks({params[n]: m for n, m in masks.items()})
        self.masks.update(masks)
        self._count_masks()

    def _build_optimizer_and_schedule(self) -> None:
        """FusedMaskedSGD with the masks (after the model's memory format is set) and the
        per-step lr schedule."""
        cfg, spe = self.config, self.steps_per_epoch
        self.model.to(memory_format=self.memory_format)
        self.optimizer = self._make_optimizer()
        self.schedule = LRSchedule(
            cfg.schedule,
            cfg.epochs * spe,
            warmup_steps=cfg.warmup_epochs * spe,
            milestones=[m * spe for m in cfg.resolved_milestones()]
            if cfg.schedule == "multistep"
            else (),
            gamma=cfg.gamma,
        )
        # Before the scheduler exists: it computes the first step's lr when made.
        self.sparsifier.plan_schedule(self.schedule)
        self.final_cut.plan_schedule(self.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)

    def _build_rng(self) -> None:
        """The data generator (order and augmentation) and the run's counters."""
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.config.seed)
        self.start_epoch = 0
        self.elapsed_s = 0.0
        # Resumes that changed `epochs`: [{"after_epoch", "epochs_before", "epochs"}].
        self.epoch_changes: list[dict[str, int]] = []

    def _build_train_model(self) -> None:
        """The module the steps call: DDP-wrapped under torchrun, torch.compiled on request."""
        self.train_model: nn.Module = self.model
        if self.ctx.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)

    def _prune(self) -> tuple[dict[str, torch.Tensor], list[Any]]:

        cfg = self.config
        data = None
        if cfg.method in READS_DATA:
            # Un-augmented training batches from their own generator, so pruning does not
            # consume the training RNG stream.
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(self.data.train_y), generator=g).to(self.device)
            data = []
            for i in range(min(cfg.prune_batches, self.steps_per_epoch)):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                data.append((self._normalize(self.data.train_x[idx]), self.data.train_y[idx]))
        result = prune(
            self.model,
            method=cfg.method,
            sparsity=cfg.sparsity,
            scope=cfg.scope,
            data=data,
            loss_fn=nn.CrossEntropyLoss(),
            seed=cfg.seed,
            **cfg.method_kwargs,
        )
        masks = {
            name: m.detach().to(device=self.device, dtype=torch.bool)
            for name, m in result.masks.items()
        }
        return masks, _plain(getattr(result, "report", []))

    def _check_mask_sparsity(self) -> None:
        cfg = self.config
        if cfg.method == "dense":
            return
        if not self.masks:
            raise SparsityError(f"pruning with {cfg.method!r} returned no masks")
        if "min_density" in cfg.method_kwargs:
            return  # a user-set per-layer floor may keep more than the target: by request
        wanted = cfg.sparsity * self.masked_total
        # prune() removes exactly round(s * N) weights, except that it keeps at least one
        # weight per tensor and that per-layer allocations round once per tensor: at most
        # one weight per masked tensor away from s * N.
        if abs(self.pruned_count - wanted) > len(self.masks):
            raise SparsityError(
                f"pruning with {cfg.method!r} ({cfg.scope}) removed {self.pruned_count} of "
                f"{self.masked_total} weights; sparsity {cfg.sparsity} asks for {wanted:.1f}"
            )

    def _make_optimizer(self) -> torch.optim.Optimizer:

        cfg = self.config
        # The optimizer keeps its own copy of each mask in its parameter's layout and zeroes
        # the pruned weights (optim.ParamMask, FusedMaskedSGD.set_masks).
        masks = masks_for(self.model, self.masks) if self.masks else None
        return FusedMaskedSGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            dampening=0,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
            masks=masks,
        )

    # ------------------------------------------------------------------ state
    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self, epoch: int) -> dict[str, Any]:
        """The checkpoint after ``epoch`` completed epochs (plain tensors and containers)."""
        return {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "method_state": self.sparsifier.state_dict(),
            "final_cut": self.final_cut.state_dict(),
            "pruning_report": self.pruning_report,
            "prune_time_s": self.prune_time_s,
            "rng": self._rng_state(),
            "history": self.history,
            "elapsed_s": self.elapsed_s,
            "epoch_changes": self.epoch_changes,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        planned = [dict(vars(f)) for f in self.scheduler.lr_lambdas]  # for config.epochs
        self.scheduler.load_state_dict(state["scheduler"])  # restores the saved run's plan
        self.epoch_changes = list(state.get("epoch_changes", []))
        self.sparsifier.load_state_dict(state.get("method_state", {}))
        self.final_cut.load_state_dict(state.get("final_cut", {}))
        if self._epochs_change is not None:
            self._replan_schedule(planned, int(state["epoch"]))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["data"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"])
        self.elapsed_s = float(state["elapsed_s"])

    def _replan_schedule(self, planned: list[dict[str, Any]], done: int) -> None:
        """Continue with the lr schedule planned for the new ``epochs`` from the next step on
        (the steps already taken followed the old plan), and record the change."""
        saved, now = self._epochs_change
        for schedule, attributes in zip(self.scheduler.lr_lambdas, planned, strict=True):
            vars(schedule).update(attributes)
        # The next step's lr from the new plan, through the scheduler's public step(): back
        # one step and step again (it sets every group's lr and get_last_lr()).
        self.scheduler.last_epoch -= 1
        self.scheduler.step()
        self.epoch_changes.append({"after_epoch": done, "epochs_before": saved, "epochs": now})
        cfg = self.config
        if cfg.schedule == "constant" or (cfg.schedule == "multistep" and cfg.milestones):
            effect = f"the {cfg.schedule} lr schedule does not depend on the run's length"
        else:
            effect = (
                f"the {cfg.schedule} lr schedule is re-planned for {now} epochs from epoch "
                f"{done + 1} on (epochs 1-{done} followed the {saved}-epoch plan), so the "
                f"result differs from an uninterrupted {now}-epoch run"
            )
        self._log(f"epochs: {saved} -> {now}: {effect}")

    # ------------------------------------------------------------------ steps
    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = augment.normalize(images, self._mean, self._std)
        return x.contiguous(memory_format=self.memory_format)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set (drop-last batches); returns loss/acc/time."""
        cfg, ctx, data = self.config, self.ctx, self.data
        bsz = cfg.batch_size
        local = bsz // ctx.world_size
        mine = slice(ctx.rank * local, (ctx.rank + 1) * local)
        self.train_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, count
        start = time.perf_counter()
        order = torch.randperm(len(data.train_y), generator=self.generator, device=self.device)
        show = self.show_bars
        bar = _tqdm(show)(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch}/{cfg.total_epochs()}",
            unit="batch",
            leave=False,
        )
        shown_at = 0.0
        # The method's step hooks run during its epochs; the final cut's retraining is plain
        # masked SGD.
        hooks = self.sparsifier if epoch <= cfg.epochs else None
        for step in bar:
            # Draw for the global batch on every rank, then take this rank's slice.
            idx = order[step * bsz : (step + 1) * bsz]
            params = augment.draw_params(
                bsz, data.crop_padding, data.flip, self.generator, self.device
            )
            idx = idx[mine]
            x = self._normalize(augment.apply(data.train_x[idx], params[mine], data.crop_padding))
            y = data.train_y[idx]
            if hooks is not None:
                hooks.before_forward()
            with self._autocast():
                out = self.train_model(x)
                loss = F.cross_entropy(out, y)
                objective = loss if hooks is None else hooks.loss_term(loss)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if hooks is not None:
                hooks.after_backward()  # gradients final (no GradScaler: bf16 or fp32)
            self.optimizer.step()
            if hooks is not None:
                hooks.after_step()
            self.scheduler.step()
            with torch.no_grad():  # accumulated on the device: no sync per step
                sums[0] += loss.detach().double() * local
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += local
            # The loss shown is refreshed twice a second (each refresh is a device sync).
            if show and time.perf_counter() - shown_at >= 0.5:
                shown_at = time.perf_counter()
                bar.set_postfix(
                    loss=f"{loss.item():.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.4f}"
                )
        bar.close()
        sums = D.all_reduce_sum(ctx, sums)
        seconds = time.perf_counter() - start
        loss_sum, correct, count = sums.tolist()
        train_loss = loss_sum / count
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training diverged at epoch {epoch}: mean loss {train_loss}; lower --lr or "
                "add --warmup-epochs, and train into another --run-dir (ong-sweep: pass "
                "--rerun-changed, or choose another --out-dir)"
            )
        return {
            "train_loss": train_loss,
            "train_acc": 100.0 * correct / count,
            "epoch_time_s": seconds,
            "images_per_s": count / seconds,
        }

    def _sync_buffers(self) -> None:
        # DDP broadcasts buffers before each forward, so after the last step every rank's
        # BatchNorm statistics include its own last batch. Make them rank 0's so all ranks
        # evaluate - and end with - the same model.
        if self.ctx.enabled:
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy; each rank evaluates a contiguous shard, sums are reduced."""
        ctx, data = self.ctx, self.data
        self._sync_buffers()
        self.model.eval()
        n = len(data.test_y)
        lo, hi = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for s in range(lo, hi, self.config.eval_batch_size):
            e = min(s + self.config.eval_batch_size, hi)
            x, y = self._normalize(data.test_x[s:e]), data.test_y[s:e]
            with self._autocast():
                out = self.model(x).float()
            sums[0] += F.cross_entropy(out, y, reduction="sum").double()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += e - s
        loss_sum, correct, count = D.all_reduce_sum(ctx, sums).tolist()
        return {"test_loss": loss_sum / count, "test_acc": 100.0 * correct / count}

    def measured_sparsity(self) -> tuple[int, int]:
        """(exact zeros in the masked weights, number of masked weights)."""
        params = dict(self.model.named_parameters())
        zeros = sum(int((params[name] == 0).sum()) for name in self.masks)
        return zeros, self.masked_total

    def check_sparsity(self) -> float:
        """Raise SparsityError unless the zeros in the masked weights equal the pruned count
        (for GSM and LC, whose kept weights decay towards 0 by design: unless every pruned
        weight is 0).

        A kept weight becoming exactly 0.0 in float32 would also trip this; with SGD and
        multiplicative weight decay that does not happen in practice, and if it did the run
        would deserve a look anyway.
        """
        if not self.masks:
            return 0.0
        zeros, total = self.measured_sparsity()
        # While a reparametrisation is live the masks keep every weight and the exported
        # weights hold the method's zeros (ong_kernels.train.reparam).
        exact = M.spec(self.config.method).exact and not getattr(
            self.sparsifier, "reparametrised", False
        )
        if zeros < self.pruned_count or (exact and zeros != self.pruned_count):
            params = dict(self.model.named_parameters())
            leaked = {n: int((params[n][~m] != 0).sum()) for n, m in self.masks.items()}
            leaked = {n: c for n, c in leaked.items() if c}
            raise SparsityError(
                f"measured {zeros} zero weights, the masks prune {self.pruned_count} of {total}; "
                f"non-zero pruned weights per tensor: {leaked or 'none (kept weights hit 0)'}"
            )
        return zeros / total

    # ------------------------------------------------------------------ run
    def fit(self) -> dict[str, Any]:
        """Train (or continue) to ``config.epochs``; returns the results dict."""
        try:
            self.setup()
            return self._fit()
        finally:
            if self._owns_ctx:
                D.teardown(self.ctx)

    def _fit(self) -> dict[str, Any]:
        cfg, ctx = self.config, self.ctx
        if ctx.is_main and self.run_dir is not None:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise RunFolderError(f"{self.run_dir}: cannot create ({err.strerror})") from err
            write_json(self.run_dir / "config.json", cfg.to_dict())
            self._set_aside_stale_results()
        sparsity = self.check_sparsity()
        if self.start_epoch:
            self._log(f"resuming {self.run_dir} after epoch {self.start_epoch}")
        elif M.spec(cfg.method).one_shot:
            self._log(
                f"pruned {self.pruned_count}/{self.masked_total} weights with {cfg.method} "
                f"({cfg.scope}) in {self.prune_time_s:.1f}s: sparsity {sparsity:.4f}"
            )
        elif cfg.method != "dense":
            cuts = sorted(getattr(self.sparsifier, "plan", {}))
            when = getattr(self.sparsifier, "plan_text", None) or (
                f"cuts after epochs {', '.join(map(str, cuts))}"
                if cuts
                else f"dense until the final cut after epoch {cfg.epochs}"
            )
            self._log(
                f"{cfg.method}: {self.masked_total} prunable weights, goal sparsity "
                f"{cfg.sparsity:g}; {when}"
            )
        total = cfg.total_epochs()
        for epoch in range(self.start_epoch + 1, total + 1):
            metrics = {"epoch": epoch, **self.train_epoch(epoch)}
            if epoch <= cfg.epochs:
                self.sparsifier.epoch_end(epoch)  # mask changes, before the checkpoint
            if epoch == cfg.epochs:
                self.sparsifier.train_end()
            cut = self.final_cut.epoch_end(epoch)
            metrics.update(self.evaluate())
            if cut is not None:
                cut["test_acc_after"] = metrics["test_acc"]
                cut.setdefault("test_acc_before", metrics["test_acc"])  # a no-op cut
            metrics["sparsity"] = self.check_sparsity()
            metrics["lr"] = self.scheduler.get_last_lr()[0]
            self.elapsed_s += metrics["epoch_time_s"]
            self.history.append(metrics)
            if ctx.is_main and self.run_dir is not None:
                write_csv(self.run_dir / "metrics.csv", self.history)
                save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.state_dict(epoch))
            self._log(
                f"epoch {epoch}/{total}: train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_acc']:.2f}% | test loss {metrics['test_loss']:.4f} "
                f"acc {metrics['test_acc']:.2f}% | sparsity {metrics['sparsity']:.4f} | "
                f"{metrics['epoch_time_s']:.1f}s ({metrics['images_per_s']:.0f} img/s)"
            )
            try:
                for callback in self.callbacks:
                    callback(self, epoch, metrics)
            except StopTraining:
                return self.results(complete=False)
        results = self.results(complete=True)
        if ctx.is_main and self.run_dir is not None:
            write_json(self.run_dir / "results.json", results)
            self._plot()
        return results

    def _plot(self) -> None:
        """loss.png, accuracy.png and lr.png; without matplotlib, one line saying so."""
        from .plots import missing_matplotlib, plot_history

        no_plot = missing_matplotlib()
        if no_plot:
            self._log(f"{no_plot}; loss.png, accuracy.png and lr.png not drawn")
            return
        cfg = self.config
        what = "dense" if cfg.method == "dense" else f"{cfg.method} at {cfg.sparsity:.0%} sparsity"
        plot_history(
            self.history,
            self.run_dir / "loss.png",
            self.run_dir / "accuracy.png",
            lr_path=self.run_dir / "lr.png",
            title=f"{cfg.model} on {cfg.dataset}, {what} (seed {cfg.seed})",
        )

    def _set_aside_stale_results(self) -> None:
        """A finished run extended with more epochs is no longer finished: its results.json
        (which a sweep would reuse) moves to results-<N>-epochs.json, kept, not deleted."""
        done = self.run_dir / "results.json"
        if self._epochs_change is None or not done.is_file():
            return
        epochs = read_json_object(done).get("epochs_completed", 0)
        if epochs < self.config.epochs:
            done.replace(done.with_name(f"results-{epochs}-epochs.json"))

    def results(self, complete: bool) -> dict[str, Any]:
        """A JSON-able summary of the run so far."""
        cfg = self.config
        zeros, total = self.measured_sparsity() if self.masks else (0, 0)
        n_params = sum(p.numel() for p in self.model.parameters())
        last = self.history[-1] if self.history else {}
        cuts = self.final_cut.records
        first, final_cut = (cuts[0], cuts[-1]) if cuts else ({}, {})
        before, after = first.get("test_acc_before"), first.get("test_acc_after")
        return {
            "complete": complete,
            "config": cfg.to_dict(),
            "method_settings": _plain(M.resolve_settings(cfg.method, cfg.method_kwargs)),
            "budget_epochs": cfg.total_epochs(),
            "epochs_completed": len(self.history),
            # BIMP's protocol: sparsity reached before the final cut, test accuracy right
            # after it ("pruned"; pruning instability = relative drop) and after retraining.
            "sparsity_before_cut": first.get("sparsity_before"),
            "test_acc_before_cut": before,
            "test_acc_after_cut": after,
            "pruning_instability": (before - after) / before
            if before and after is not None
            else None,
            "final_cut": cuts,
            "final_cut_complete": bool(final_cut) and final_cut["phase"] == cfg.cut_phases,
            "method_cuts": list(getattr(self.sparsifier, "cuts", [])),
            "final": last,
            "test_acc": last.get("test_acc"),
            "best_test_acc": max((h["test_acc"] for h in self.history), default=None),
            "target_sparsity": cfg.sparsity,
            "measured_sparsity": zeros / total if total else 0.0,
            "pruned_weights": self.pruned_count,
            "prunable_weights": total,
            "parameters": n_params,
            "remaining_parameters": n_params - self.pruned_count,
            "prune_time_s": self.prune_time_s,
            "train_time_s": self.elapsed_s,
            # Training images per second over the whole run (evaluation not counted).
            "images_per_s": (
                sum(h["images_per_s"] * h["epoch_time_s"] for h in self.history) / self.elapsed_s
                if self.elapsed_s
                else 0.0
            ),
            "device": str(self.device),
            "world_size": self.ctx.world_size,
            "amp_bf16": self.amp,
            "channels_last": self.channels_last,
            "torch": torch.__version__,
            "pruning_report": self.pruning_report,
            "epoch_changes": self.epoch_changes,
        }


def train(config: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Convenience: ``Trainer(config, **kwargs).fit()``."""
    return Trainer(config, **kwargs).fit()
