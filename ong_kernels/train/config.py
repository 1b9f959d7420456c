"""Training configuration: one validated dataclass, plus the paper's presets.

A :class:`TrainConfig` holds only JSON-friendly values (str, int, float, bool, None,
lists, dicts of those), so it round-trips through ``config.json`` and through a checkpoint
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ong_kernels._validate import as_int, is_finite_real, is_int
from ong_kernels.pruning import methods as M
from ong_kernels.pruning.allocation import SCOPES
from ong_kernels.pruning.ong import CONSENSUS_RESTARTS

from .data import DATASETS
from .models import MODELS
from .schedule import SCHEDULES

__all__ = [
    "METHODS",
    "PRESETS",
    "SCHEDULES",
    "SCOPES",
    "TrainConfig",
    "config_differences",
    "describe_differences",
    "preset",
]

# The registered sparsification methods (ong_kernels.pruning.methods): "dense" trains
# without pruning, the one-shot methods prune at initialisation with ong_kernels.prune, the
# others (gmp, bimp, gsm, lc) act during training through the trainer's seam.
METHODS = M.METHODS
_TRISTATE = ("auto", "on", "off")
AMP_MODES = ("auto", "bf16", "off")

# Fields that may differ when a run is resumed: they do not change what is computed.
RESUMABLE_OVERRIDES = frozenset({"data_dir", "run_dir", "progress", "compile"})


def scoped_methods(per_layer: bool = True) -> list[str]:
    """The registered pruning methods that follow a per-layer --scope (per_layer False: those
    that take only "global")."""
    return [m for m in METHODS if m != "dense" and (len(M.spec(m).scopes) > 1) == per_layer]


def _parses_as_device(text: str) -> bool:
    import torch

    if text == "auto":
        return True
    try:
        torch.device(text)
    except RuntimeError:
        return False
    return True


def _effective(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the ``auto`` settings replaced by what they resolve to here, so that
    e.g. ``device=auto`` and ``cpu`` on a machine without CUDA compare equal."""
    import torch

    # A field added since the run was saved computes what its default computes.
    out = {**_FIELD_DEFAULTS, **values}
    device = out.get("device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, str):
        out["device"] = "cuda" if device.startswith("cuda") and ":" not in device else device
    cuda = isinstance(out["device"], str) and out["device"].startswith("cuda")
    if out.get("amp") == "auto":
        out["amp"] = "bf16" if cuda else "off"
    if out.get("channels_last") == "auto":
        out["channels_last"] = "on" if cuda else "off"
    return out


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = RESUMABLE_OVERRIDES
) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, current)} for the fields that change what a run computes.

    Fields in ``ignore`` are skipped, and settings that resolve to the same thing here
    (``device auto`` vs ``cpu`` without CUDA, ``amp auto`` vs ``off`` on a CPU) are equal.
    """
    a, b = _effective(saved), _effective(current)
    return {
        k: (saved.get(k), current.get(k))
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k) != b.get(k)
    }


def describe_differences(differences: dict[str, tuple[Any, Any]]) -> str:
    """``epochs: saved 1, now 2; lr: saved 0.1, now 0.01``."""
    return "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())


@dataclass(frozen=True)
class Option:
    """How a :class:`TrainConfig` field appears on the command line (``ong-train``,
    ``ong-sweep``): the options are generated from these, so a field and its flag cannot
    drift apart. Types come from the field's annotation; ``choices`` are also what
    :meth:`TrainConfig.validate` accepts."""

    group: str
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | str | None = None
    # Text for the help's "(default: ...)"; None: the field's default value.
    default_text: str | None = None
    # ong-sweep takes lists of these instead (--methods, --sparsities, --seeds).
    swept: bool = False


def _field(default: Any, group: str, help: str, **option: Any) -> Any:
    """A dataclass field whose metadata carries its :class:`Option`."""
    meta = {"option": Option(group, help, **option)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def option_of(f: dataclasses.Field) -> Option | None:
    """The :class:`Option` of a TrainConfig field (None: no command-line option)."""
    return f.metadata.get("option")


_DATA, _PRUNE, _OPTIM, _EXEC = "model and data", "pruning", "optimisation", "execution"
_CUT = "final cut (BIMP's protocol)"


@dataclass
class TrainConfig:
    """Everything that determines a training run. See ``ong-train --help`` for each field."""

    model: str = _field("resnet20", _DATA, "network", choices=MODELS)
    dataset: str = _field("fashion-mnist", _DATA, "dataset", choices=DATASETS)
    data_dir: str | None = _field(
        None,
        _DATA,
        "folder with the dataset files (Fashion-MNIST: the four IDX .gz files; CIFAR: the "
        "extracted python-version folder or its parent)",
        metavar="DIR",
        default_text="/usr/share/datasets/fashion-mnist for Fashion-MNIST",
    )
    train_subset: int | None = _field(
        None,
        _DATA,
        "train on the first N training examples, 0 for all",
        metavar="N",
        default_text="all",
    )
    test_subset: int | None = _field(
        None,
        _DATA,
        "evaluate on the first N test examples, 0 for all",
        metavar="N",
        default_text="all",
    )
    synthetic_shape: list[int] = _field(
        [512, 256, 3, 16],
        _DATA,
        "size of --dataset synthetic",
        nargs=4,
        metavar=("TRAIN", "TEST", "CHANNELS", "SIZE"),
    )
    width: float = _field(1.0, _DATA, "channel-width multiplier of the network")

    method: str = _field(
        "ong",
        _PRUNE,
        "sparsification method: dense; at initialisation ong, ong-consensus (ONG scored by "
        f"the mean W H of {CONSENSUS_RESTARTS} random NMF restarts; another count: "
        "--method-kwargs '{\"restarts\": K}'), magnitude, random, snip, grasp, synflow; "
        "during training gmp (gradual magnitude), bimp (budgeted IMP), gsm (global sparse "
        "momentum), lc (learning-compression), dnw, dpf, str, cs, dst (reparametrisations); "
        "see the method settings below",
        choices=METHODS,
        swept=True,
    )
    sparsity: float = _field(0.9, _PRUNE, "fraction of prunable weights removed", swept=True)
    scope: str = _field(
        "global",
        _PRUNE,
        "how sparsity is spread over layers (global only for "
        f"{', '.join(scoped_methods(per_layer=False))}: they rank every "
        "prunable weight together)",
        choices=SCOPES,
    )
    prune_batches: int = _field(
        1,
        _PRUNE,
        "training batches scored by data-driven methods (snip, grasp, synflow)",
        metavar="N",
    )
    method_kwargs: dict[str, Any] = _field(
        {},
        _PRUNE,
        "the method's settings as a JSON object: for one-shot methods keyword arguments of "
        "ong_kernels.pruning.prune (e.g. '{\"rank\": 8}'), for the others the settings "
        "below (e.g. '{\"pruning_interval\": 2}')",
        metavar="JSON",
        default_text="{}",
    )

    epochs: int = _field(
        200, _OPTIM, "training epochs (the final cut's retraining epochs come on top)"
    )
    batch_size: int = _field(128, _OPTIM, "global batch size, split evenly over processes")
    eval_batch_size: int = _field(1000, _OPTIM, "batch size for evaluation")
    lr: float = _field(0.1, _OPTIM, "peak learning rate")
    momentum: float = _field(0.9, _OPTIM, "SGD momentum")
    nesterov: bool = _field(True, _OPTIM, "Nesterov momentum")
    weight_decay: float = _field(1e-4, _OPTIM, "L2 weight decay")
    schedule: str = _field(
        "cosine", _OPTIM, "learning-rate schedule, stepped per batch", choices=SCHEDULES
    )
    milestones: list[int] | None = _field(
        None,
        _OPTIM,
        "multistep: epochs where the lr is multiplied by --gamma",
        nargs="+",
        metavar="EPOCH",
        default_text="50%% and 75%% of --epochs",
    )
    gamma: float = _field(0.1, _OPTIM, "multistep factor")
    warmup_epochs: int = _field(0, _OPTIM, "linear lr warm-up epochs")

    cut_phases: int = _field(
        1,
        _CUT,
        "after training, cut to the goal by global magnitude in this many phases, each to "
        "1-(1-s)^(j/phases) (a no-op for methods already at the goal; what makes gsm and lc "
        "sparse)",
        metavar="N",
    )
    retrain_epochs: int = _field(
        0,
        _CUT,
        "epochs of retraining after each final-cut phase (BIMP's n_epochs_per_phase)",
        metavar="N",
    )
    retrain_schedule: str = _field(
        "llr",
        _CUT,
        "retraining lr per phase: llr (10%% rise to --lr, linear to 0) or allr (peak scaled "
        "by the cut's norm drop, BIMP's ALLR)",
        choices=M.IMP_SCHEDULES,
    )

    seed: int = _field(0, _EXEC, "seed of everything", swept=True)
    device: str = _field("auto", _EXEC, "cpu, cuda, cuda:N or auto (cuda when available)")
    amp: str = _field(
        "auto", _EXEC, "bf16 autocast; auto = on for CUDA, off on CPU", choices=AMP_MODES
    )
    channels_last: str = _field(
        "auto", _EXEC, "channels_last memory format; auto = on for CUDA", choices=_TRISTATE
    )
    compile: bool = _field(False, _EXEC, "torch.compile the model")
    progress: bool = _field(True, _EXEC, "progress bars (only when writing to a terminal)")
    # No Option: ong-train's --run-dir defaults to a folder named after the run, and
    # ong-sweep names one folder per run itself.
    run_dir: str | None = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""

        def check(cond: bool, name: str, what: str, exc=ValueError):
            if not cond:
                raise exc(f"{name}: {what}, got {getattr(self, name)!r}")

        is_num = is_finite_real
        self._integers_as_ints()
        for f in dataclasses.fields(self):
            choices = getattr(option_of(f), "choices", None)
            if choices is not None:
                check(
                    getattr(self, f.name) in choices,
                    f.name,
                    f"expected one of {', '.join(choices)}",
                )
        check(
            self.data_dir is None or isinstance(self.data_dir, str), "data_dir", "expected a path"
        )
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) == 0:
                setattr(self, name, None)  # 0 = all, as in the main job's options
            v = getattr(self, name)
            check(v is None or (is_int(v) and v > 0), name, "expected an int >= 0 (0 or None: all)")
        s = self.synthetic_shape
        check(
            isinstance(s, (list, tuple)) and len(s) == 4 and all(is_int(v) and v > 0 for v in s),
            "synthetic_shape",
            "expected 4 positive ints (num_train, num_test, channels, size)",
        )
        self.synthetic_shape = list(s)
        check(is_num(self.width) and self.width > 0, "width", "expected a positive number")

        check(is_num(self.sparsity) and 0 <= self.sparsity < 1, "sparsity", "expected in [0, 1)")
        if self.method == "dense":
            self.sparsity = 0.0
        else:
            check(self.sparsity > 0, "sparsity", f"method {self.method!r} needs sparsity > 0")
            check(
                self.scope in M.spec(self.method).scopes,
                "scope",
                f"method {self.method!r} ranks every prunable weight together (BIMP); "
                f"per-layer scopes are for {', '.join(scoped_methods())}",
            )
        check(
            is_int(self.prune_batches) and self.prune_batches > 0, "prune_batches", "expected > 0"
        )
        check(
            isinstance(self.method_kwargs, dict)
            and all(isinstance(k, str) for k in self.method_kwargs),
            "method_kwargs",
            "expected a dict with str keys",
            TypeError,
        )
        check(
            is_int(self.cut_phases) and self.cut_phases >= 1, "cut_phases", "expected an int >= 1"
        )
        check(
            is_int(self.retrain_epochs) and self.retrain_epochs >= 0,
            "retrain_epochs",
            "expected an int >= 0",
        )
        check(
            self.cut_phases == 1 or self.retrain_epochs > 0,
            "cut_phases",
            "several phases need --retrain-epochs > 0 (back-to-back cuts are one cut)",
        )

        check(is_int(self.epochs) and self.epochs > 0, "epochs", "expected a positive int")
        check(
            is_int(self.batch_size) and self.batch_size > 1,
            "batch_size",
            "expected >= 2 (BatchNorm needs 2 examples per batch to train)",
        )
        check(
            is_int(self.eval_batch_size) and self.eval_batch_size > 0,
            "eval_batch_size",
            "expected > 0",
        )
        check(is_num(self.lr) and self.lr > 0, "lr", "expected a positive number")
        check(is_num(self.momentum) and 0 <= self.momentum < 1, "momentum", "expected in [0, 1)")
        check(isinstance(self.nesterov, bool), "nesterov", "expected a bool", TypeError)
        check(not self.nesterov or self.momentum > 0, "nesterov", "nesterov needs momentum > 0")
        check(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "expected >= 0")
        if self.milestones is not None:
            m = self.milestones
            check(
                isinstance(m, (list, tuple))
                and all(is_int(v) and 0 < v < self.epochs for v in m)
                and list(m) == sorted(set(m)),
                "milestones",
                f"expected increasing epochs in (0, {self.epochs})",
            )
            self.milestones = list(m)
        check(is_num(self.gamma) and 0 < self.gamma <= 1, "gamma", "expected in (0, 1]")
        check(
            is_int(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            f"expected an int in [0, epochs={self.epochs})",
        )

        settings = M.resolve_settings(self.method, self.method_kwargs)
        if is_int(self.epochs) and self.epochs > 0:
            M.check_run(self.method, settings, epochs=self.epochs, sparsity=self.sparsity)

        check(is_int(self.seed) and self.seed >= 0, "seed", "expected an int >= 0")
        check(
            isinstance(self.device, str) and _parses_as_device(self.device),
            "device",
            "expected cpu, cuda, cuda:N or auto",
        )
        check(isinstance(self.compile, bool), "compile", "expected a bool", TypeError)
        check(isinstance(self.progress, bool), "progress", "expected a bool", TypeError)
        check(self.run_dir is None or isinstance(self.run_dir, str), "run_dir", "expected a path")

    def _integers_as_ints(self) -> None:
        """Integer-like values of the int fields (numpy integers, 0-d integer tensors) as
        Python ints: config.json and the checkpoint hold plain ints."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "int | None") and is_int(value):
                setattr(self, f.name, as_int(value))
            elif f.type in ("list[int]", "list[int] | None") and isinstance(value, (list, tuple)):
                setattr(self, f.name, [as_int(v) if is_int(v) else v for v in value])

    # ------------------------------------------------------------------ helpers
    def resolved_milestones(self) -> list[int]:
        """Multistep milestones in epochs: the configured ones, or 50% and 75% of training
        (epochs 100 and 150 of 200, the schedule of He et al. and of the BIMP baselines)."""
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({m for m in (self.epochs // 2, self.epochs * 3 // 4) if 0 < m < self.epochs})

    def total_epochs(self) -> int:
        """Training epochs plus the final cut's retraining: the run's budget."""
        return self.epochs + (
            self.cut_phases * self.retrain_epochs if self.method != "dense" else 0
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. config.json); unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def run_name(self) -> str:
        """A folder name describing the run, e.g. ``resnet20-fashion-mnist-ong-0.9-seed0``."""
        method = self.method if self.method == "dense" else f"{self.method}-{self.sparsity:g}"
        return f"{self.model}-{self.dataset}-{method}-seed{self.seed}"


def unused_options(method: str, given: dict[str, Any]) -> list[str]:
    """The options in ``given`` (explicitly set: command-line flags) that ``method`` does not
    read, as flags: a dense run prunes nothing (--sparsity, --scope, --prune-batches,
    --method-kwargs), only the data-reading methods take --prune-batches. Dropping them
    silently would train something other than what the command says."""
    unused = []
    if method == "dense":
        if given.get("sparsity", 0) != 0:
            unused.append("sparsity")
        if given.get("method_kwargs"):
            unused.append("method_kwargs")
        unused += [k for k in ("scope",) if k in given]
    if "data" not in M.spec(method).needs and "prune_batches" in given:
        unused.append("prune_batches")
    return ["--" + k.replace("_", "-") for k in unused]


_FIELD_DEFAULTS = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(TrainConfig)
    if f.name != "run_dir"
}

# The paper's settings: 200 epochs, batch 128, SGD with nesterov momentum 0.9, lr 0.1,
# cosine decay, weight decay 1e-4 on CIFAR-10 and 5e-4 on CIFAR-100. Each preset also
# lists the sparsities the paper reports, which `ong-sweep --preset` uses by default.
_PAPER = dict(epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, schedule="cosine")
PRESETS: dict[str, dict[str, Any]] = {
    "resnet56-cifar10": dict(_PAPER, model="resnet56", dataset="cifar10", weight_decay=1e-4),
    "resnet18-cifar10": dict(_PAPER, model="resnet18", dataset="cifar10", weight_decay=1e-4),
    "resnet34-cifar10": dict(_PAPER, model="resnet34", dataset="cifar10", weight_decay=1e-4),
    "resnet18-cifar100": dict(_PAPER, model="resnet18", dataset="cifar100", weight_decay=5e-4),
    "resnet34-cifar100": dict(_PAPER, model="resnet34", dataset="cifar100", weight_decay=5e-4),
}
PRESET_SPARSITIES = (0.9, 0.95, 0.98)


def preset(name: str) -> dict[str, Any]:
    """The field values of a named preset (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
