"""The registry of sparsification methods the trainer runs: one entry per method.

Each :class:`MethodSpec` declares the method's name, a frozen settings dataclass (every field
with a documented default and the source of that default), what the method needs (``data``:
training batches; ``schedule``: masks change on a schedule over training; ``final cut``: the
run ends sparse only through BIMP's final magnitude cut) and whether its sparsity is exact
during training. ``ong-train`` / ``ong-sweep`` generate one option per setting from these
dataclasses (``--pruning-interval``, ``--train-budget``, ...); ``--method-kwargs`` sets the
same values as JSON. The implementations live in ``ong_kernels.train.sparsifiers``.

Sources (see also the project's research notes on BIMP):

* BIMP: ZIB-IOL/BIMP, Zimmer, Spiegel & Pokutta, "How I Learned to Stop Worrying and Love
  Retraining", ICLR 2023. HEAD = commit 7bad593 (strategies/scratchStrategies.py,
  strategies/pretrainedStrategies.py); INIT = commit 8f2b836 (strategies/strategies.py,
  runners/baseRunner.py: budgeted IMP). BIMP has no defaults in its code (every value comes
  from W&B sweeps); where we give one, its source is said.
* GMP: Zhu & Gupta, "To prune, or not to prune", 2017 (cubic schedule, eq. 1).
* GSM: Ding et al., "Global Sparse Momentum SGD", NeurIPS 2019.
* LC: Carreira-Perpinan & Idelbayev, "Learning-Compression algorithms for neural net
  pruning", CVPR 2018, in BIMP's version (selective weight decay).
* DNW: Wortsman et al., "Discovering Neural Wirings", NeurIPS 2019; DPF: Lin et al.,
  "Dynamic Model Pruning with Feedback", ICLR 2020; STR: Kusupati et al., "Soft Threshold
  Weight Reparameterization", ICML 2020 (RAIVNLab/STR); CS: Savarese et al., "Winning the
  Lottery with Continuous Sparsification", NeurIPS 2020 (lolemacs/continuous-sparsification);
  DST: Liu et al., "Dynamic Sparse Training", ICLR 2020 (junjieliu2910/DynamicSparseTraining);
  all as BIMP HEAD runs them, implemented in ``ong_kernels.train.reparam`` (which says where
  we differ and why).

The one-shot methods (ONG, consensus ONG, magnitude, random, SNIP, GraSP, SynFlow) prune at
initialisation through :func:`ong_kernels.pruning.prune`; their settings are that function's
keyword arguments (checked against the scorer's signature, as ``prune`` does).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ong_kernels._validate import is_finite_real, is_int
from ong_kernels.pruning.allocation import SCOPES
from ong_kernels.pruning.api import _SCORERS, READS_DATA

__all__ = [
    "IMP_SCHEDULES",
    "METHODS",
    "BimpSettings",
    "CsSettings",
    "DnwSettings",
    "DpfSettings",
    "DstSettings",
    "GmpSettings",
    "GsmSettings",
    "LcSettings",
    "MethodSpec",
    "Setting",
    "StrSettings",
    "bimp_plan",
    "gmp_plan",
    "imp_phase_sparsities",
    "resolve_settings",
    "setting_options",
    "spec",
]

# Retraining schedules of the final cut (BIMP's retrain_schedule): LLR = linear from the
# peak to 0 after a 10% rise; ALLR = the same with the peak scaled by the cut's norm drop.
IMP_SCHEDULES = ("llr", "allr")


@dataclass(frozen=True)
class Setting:
    """How one settings field is documented and checked (field metadata)."""

    help: str
    source: str
    check: Callable[[Any], bool]
    expected: str  # what `check` accepts, in words, for the error message
    metavar: str | None = None
    shown: str | None = None  # the default in --help, where the owners' defaults differ


def _setting(
    default: Any, help: str, source: str, check, expected: str, metavar=None, shown=None
) -> Any:
    return field(
        default=default,
        metadata={"setting": Setting(help, source, check, expected, metavar, shown)},
    )


def _pos_int(v) -> bool:
    return is_int(v) and v >= 1


def _opt_pos_int(v) -> bool:
    return v is None or _pos_int(v)


def _bool(v) -> bool:
    return isinstance(v, bool)


@dataclass(frozen=True)
class GmpSettings:
    """Gradual magnitude pruning (Zhu & Gupta 2017) as BIMP HEAD's ``GMP`` runs it."""

    pruning_interval: int = _setting(
        1,
        "GMP/BIMP: epochs between two cuts",
        "BIMP main.py --debug block (pruning_interval=1); the paper's values come from W&B "
        "sweeps not in the code",
        _pos_int,
        "an int >= 1",
        "EPOCHS",
    )
    allow_recovering: bool = _setting(
        False,
        "GMP: recompute each cut from the dense weights (pruned weights keep decaying and may "
        "come back) instead of only growing the masks",
        "BIMP HEAD GMP (allow_recovering; False = masks only grow, Zhu & Gupta's original)",
        _bool,
        "a bool",
    )


@dataclass(frozen=True)
class BimpSettings:
    """Budgeted IMP (BIMP INIT strategies.py l.1052-1155, runners/baseRunner.py l.324-430)."""

    train_budget: int | None = _setting(
        None,
        "BIMP: dense epochs before the first cut, the lr falling linearly to 0 over them "
        "(default: half the epochs)",
        "BIMP INIT n_train_budget (no default in the code); half the run is our choice",
        _opt_pos_int,
        "an int >= 1 or None",
        "EPOCHS",
    )
    pruning_interval: int = dataclasses.field(
        default=1, metadata=GmpSettings.__dataclass_fields__["pruning_interval"].metadata
    )
    allr: bool = _setting(
        False,
        "BIMP: ALLR, the last cycle's peak lr scaled by clip(d / sqrt(p), min, 1) (d: relative "
        "L2 norm of the weights the cut removed, p: fraction cut, min: remaining epochs / "
        "train budget)",
        "BIMP INIT BIMP_ALLR (set_stability_scaling_LCN, applied to the last prune only)",
        _bool,
        "a bool",
    )


@dataclass(frozen=True)
class GsmSettings:
    """Global sparse momentum (BIMP HEAD ``GSM``): no settings of its own; the goal is
    ``sparsity`` and the momentum is the run's ``--momentum`` (BIMP's required params)."""


@dataclass(frozen=True)
class LcSettings:
    """Learning-compression in BIMP HEAD's version: no settings of its own; the penalty is the
    run's ``--weight-decay`` (BIMP HEAD has no penalty schedule)."""


def _finite(v) -> bool:
    return is_finite_real(v)


def _positive(v) -> bool:
    return is_finite_real(v) and v > 0


def _fraction(v) -> bool:
    return is_finite_real(v) and 0 < v <= 1


# The reparametrisation methods (ong_kernels.train.reparam). STR, CS and DST share the
# projection's settings; BIMP has no defaults for any of these (W&B sweeps).
_PENALTY_HELP = (
    "STR/CS/DST: the penalty coefficient lambda (STR: weight decay 0.5 lambda s^2 on the "
    "threshold logits; CS: lambda sum sigmoid(beta m); DST: lambda sum exp(-t)); fixed, "
    "--calibrate or not"
)
_PENALTY_SHOWN = "str 5e-4, cs 1e-8, dst 5e-6"


def _penalty(default: float, source: str) -> Any:
    return _setting(
        default, _PENALTY_HELP, source, _positive, "a number > 0", "LAMBDA", _PENALTY_SHOWN
    )


_CALIBRATE = _setting(
    True,
    "STR/CS/DST: after every step, shift all thresholds (CS: logits) together so that the "
    "method's own mask prunes the target share of the prunable weights (GMP's ramp to "
    "--sparsity; CS: --sparsity from the start); off: BIMP's fixed penalty alone, the "
    "sparsity is whatever it gives",
    "ours (BIMP's STR/CS/DST have no sparsity target; the issue asks that --sparsity mean "
    "something)",
    _bool,
    "a bool",
)
_RAMP = _setting(
    0.5,
    "STR/DST: fraction of the method's iterations over which the projection's target rises "
    "from 0 to --sparsity (GMP's cubic shape); the rest trains at the target",
    "ours: half the run, leaving the other half to settle at the goal (GMP reaches its goal "
    "one pruning interval before the end)",
    _fraction,
    "a number in (0, 1]",
    "FRACTION",
)


@dataclass(frozen=True)
class DnwSettings:
    """DNW (Wortsman et al. 2019) as BIMP HEAD ``DNW``: no settings of its own; the goal is
    ``sparsity`` (BIMP's only required parameter)."""


@dataclass(frozen=True)
class DpfSettings:
    """DPF (Lin et al. 2020) as BIMP HEAD ``DPF``: GMP's schedule, the mask refreshed every
    ``refresh_interval`` iterations."""

    pruning_interval: int = dataclasses.field(
        default=1, metadata=GmpSettings.__dataclass_fields__["pruning_interval"].metadata
    )
    refresh_interval: int = _setting(
        16,
        "DPF: iterations between two recomputations of the mask from the dense weights",
        'BIMP INIT DPF ("16 is a hardcoded value used by the authors"); HEAD the same',
        _pos_int,
        "an int >= 1",
        "ITERATIONS",
    )


@dataclass(frozen=True)
class _ControllerSettings:
    """The projection's settings, shared by STR, CS and DST (train/reparam.py)."""

    calibrate: bool = _CALIBRATE
    ramp: float = _RAMP


@dataclass(frozen=True)
class StrSettings(_ControllerSettings):
    """STR (Kusupati et al. 2020) as BIMP HEAD ``STR``, with the projection onto --sparsity."""

    s_initial: float = _setting(
        -8.0,
        "STR: initial threshold logit s of every layer (threshold sigmoid(s))",
        "ours: BIMP sweeps it (debug block -0.1); STR's authors advise about -100 for "
        "CIFAR-10 over 200 epochs (STR#2); -8 (threshold 3.4e-4, below ~0.5% of ResNet-20's "
        "initial weights) starts dense and lets the penalty's decay of s reach useful "
        "thresholds within a short run",
        _finite,
        "a finite number",
        "S",
    )
    penalty: float = _penalty(
        5e-4, "STR#2: 'weight decay above 5e-4' for CIFAR-10 (BIMP: the run's weight decay)"
    )


@dataclass(frozen=True)
class CsSettings(_ControllerSettings):
    """CS (Savarese et al. 2020) as BIMP HEAD ``CS``, with the projection onto --sparsity."""

    mask_initial: float = _setting(
        0.0,
        "CS: initial mask logit m of every weight (the forward is rescaled by "
        "1/sigmoid(mask_initial))",
        "CS README (default mask initial value 0.0; -0.1 for high sparsity, which the "
        "projection reaches without it)",
        _finite,
        "a finite number",
        "M",
    )
    beta_final: float = _setting(
        200.0,
        "CS: final temperature; beta = beta_final^(i/T) over the method's iterations",
        "CS code --final-temp 200 (BIMP INIT debug block: 200)",
        lambda v: is_finite_real(v) and v > 1,
        "a number > 1",
        "BETA",
    )
    penalty: float = _penalty(1e-8, "CS code --lmbda 1e-8")


@dataclass(frozen=True)
class DstSettings(_ControllerSettings):
    """DST (Liu et al. 2020) as BIMP HEAD ``DST``, with the projection onto --sparsity."""

    penalty: float = _penalty(5e-6, "DST README: --alpha 5e-6 for CIFAR-10 VGG16/WideResNet")


@dataclass(frozen=True)
class MethodSpec:
    """One registered method."""

    name: str
    summary: str
    settings: type | None  # a frozen dataclass; None: prune()'s keyword arguments
    needs: tuple[str, ...] = ()
    exact: bool = True  # exact sparsity during training (else only after the final cut)
    one_shot: bool = False  # prunes once at initialisation
    # The --scope values the method's masks follow. Magnitude cuts take every scope; GSM's
    # and LC's top-K and the STR/CS/DST projection rank every prunable weight together
    # (BIMP), and their sparsity comes from the final cut, which is global (BIMP).
    scopes: tuple[str, ...] = SCOPES

    def setting_names(self) -> tuple[str, ...]:
        if self.settings is None:
            return ()
        return tuple(f.name for f in dataclasses.fields(self.settings))


_ONE_SHOT = {
    "ong": "ONG: NMF reconstruction of |W| scores each weight, pruned once at initialisation",
    "ong-consensus": "ONG scored by the mean W H of random NMF restarts",
    "magnitude": "global magnitude at initialisation",
    "random": "uniformly random at initialisation",
    "snip": "SNIP |g * w| at initialisation",
    "grasp": "GraSP at initialisation",
    "synflow": "SynFlow at initialisation",
}

# The methods that act during training: name, summary, settings, needs, and whether the
# sparsity comes from a final cut (GSM, LC, STR, CS, DST as BIMP: inexact during training,
# and global only, MethodSpec.scopes).
# fmt: off
_DURING_TRAINING = (
    ("gmp", "gradual global magnitude pruning on the cubic schedule (BIMP HEAD GMP)",
     GmpSettings, ("schedule",), False),
    ("bimp", "budgeted IMP: dense training, then cuts each followed by a triangular lr cycle",
     BimpSettings, ("schedule",), False),
    ("gsm", "global sparse momentum: only the top-K |w * grad| weights get gradients",
     GsmSettings, (), True),
    ("lc", "learning-compression: weight decay only on the weights outside the top-K |w|",
     LcSettings, (), True),
    ("dnw", "DNW: forward with the top-k |w|, straight-through to the dense weights",
     DnwSettings, ("reparametrisation",), False),
    ("dpf", "DPF: GMP's schedule, forward at the masked point, dense weights stepped (feedback)",
     DpfSettings, ("schedule", "reparametrisation"), False),
    ("str", "STR: learnable soft threshold per layer, penalty calibrated to --sparsity",
     StrSettings, ("reparametrisation",), True),
    ("cs", "continuous sparsification: a mask logit per weight, penalty calibrated to --sparsity",
     CsSettings, ("reparametrisation",), True),
    ("dst", "DST: learnable threshold per output channel, penalty calibrated to --sparsity",
     DstSettings, ("reparametrisation",), True),
)
# fmt: on

_SPECS: dict[str, MethodSpec] = {
    "dense": MethodSpec("dense", "no pruning", None),
    **{
        name: MethodSpec(
            name,
            summary,
            None,
            needs=("data",) if name in READS_DATA else (),
            one_shot=True,
        )
        for name, summary in _ONE_SHOT.items()
    },
    **{
        name: MethodSpec(
            name,
            summary,
            settings,
            needs=(*needs, "final cut") if final_cut else needs,
            exact=not final_cut,
            scopes=("global",) if final_cut else SCOPES,
        )
        for name, summary, settings, needs, final_cut in _DURING_TRAINING
    },
}
assert set(_SCORERS) == set(_ONE_SHOT), "every prune() method is registered"

METHODS: tuple[str, ...] = tuple(_SPECS)
# prune()'s own keyword arguments a one-shot method's kwargs may also hold.
_PRUNE_KEYWORDS = ("include", "exclude", "min_density")
_CONTEXT = ("seed", "data", "loss_fn", "sparsity", "allocate")


def spec(name: str) -> MethodSpec:
    if name not in _SPECS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return _SPECS[name]


def _one_shot_keywords(name: str) -> list[str]:
    params = inspect.signature(_SCORERS[name]).parameters
    own = [
        n
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _CONTEXT
    ]
    return [*own, *_PRUNE_KEYWORDS]


def resolve_settings(name: str, kwargs: dict[str, Any]) -> Any:
    """The method's settings from ``kwargs`` (``--method-kwargs`` and the generated options):
    a settings dataclass instance, or for one-shot methods the kwargs themselves (their names
    checked against what prune() and the scorer take). ValueError naming the first unknown
    or out-of-range setting."""
    s = spec(name)
    if s.settings is None:
        allowed = _one_shot_keywords(name) if s.one_shot else []
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"method_kwargs: method {name!r} has no setting {unknown[0]!r}; it takes: "
                f"{', '.join(allowed) or 'none'}"
            )
        return dict(kwargs)
    fields = {f.name: f for f in dataclasses.fields(s.settings)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(
            f"method_kwargs: method {name!r} has no setting {unknown[0]!r}; it takes: "
            f"{', '.join(fields) or 'none'}"
        )
    for key, value in kwargs.items():
        meta: Setting = fields[key].metadata["setting"]
        if not meta.check(value):
            raise ValueError(f"{key}: expected {meta.expected}, got {value!r}")
    return s.settings(**kwargs)


def setting_options() -> dict[str, tuple[Setting, Any, type, list[str]]]:
    """Every setting name over the registered methods: (its Setting, default, annotation
    type, the methods that have it), in registry order, for the command-line options."""
    out: dict[str, tuple[Setting, Any, type, list[str]]] = {}
    for s in _SPECS.values():
        if s.settings is None:
            continue
        hints = typing.get_type_hints(s.settings)
        for f in dataclasses.fields(s.settings):
            if f.name in out:
                out[f.name][3].append(s.name)
            else:
                out[f.name] = (f.metadata["setting"], f.default, hints[f.name], [s.name])
    return out


def accepted(name: str) -> tuple[str, ...] | None:
    """The setting names ``name`` takes (None: one-shot, prune()'s keyword arguments)."""
    s = spec(name)
    if s.one_shot:
        return tuple(_one_shot_keywords(name))
    return s.setting_names()


def settings_for(name: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``shared`` (settings given once for several methods, as in a sweep)
    that method ``name`` takes."""
    keys = accepted(name) or ()
    return {k: v for k, v in shared.items() if k in keys}


def check_shared(names: Sequence[str], shared: dict[str, Any]) -> None:
    """ValueError naming a shared setting none of ``names`` takes."""
    taken = {k for n in names for k in (accepted(n) or ())}
    unknown = sorted(set(shared) - taken)
    if unknown:
        raise ValueError(
            f"method_kwargs: no method of {', '.join(names)} has the setting {unknown[0]!r}"
        )


# ----------------------------------------------------------------------------- schedules


def goal_count(sparsity: float, n: int) -> int:
    """Pruned weights at ``sparsity`` of ``n``: round(s N), as everywhere in ong_kernels."""
    return round(sparsity * n)


def gmp_plan(epochs: int, interval: int, sparsity: float) -> list[tuple[int, float]]:
    """GMP's cuts: [(epoch after which to cut, sparsity)] (BIMP HEAD GMP.pruning_scheduler).

    ``n = epochs // interval - 1`` cuts at epochs ``t * interval``, t = 1..n, to
    ``s_f (1 - (1 - t/n)^3)``: the first at ``interval``, the goal at ``n * interval``
    (= ``epochs - interval`` when ``interval`` divides ``epochs``).
    """
    n = epochs // interval - 1
    if n < 1:
        raise ValueError(
            f"pruning_interval: GMP needs 2 * pruning_interval <= epochs, got interval "
            f"{interval} with {epochs} epochs"
        )
    return [(t * interval, sparsity * (1.0 - (1.0 - t / n) ** 3)) for t in range(1, n + 1)]


def bimp_budget(epochs: int, train_budget: int | None) -> int:
    return train_budget if train_budget is not None else max(1, epochs // 2)


def bimp_plan(
    epochs: int, train_budget: int | None, interval: int, sparsity: float
) -> list[tuple[int, float]]:
    """BIMP's cuts: [(epoch after which to cut, cumulative sparsity)] (BIMP INIT BIMP).

    ``n = (epochs - budget) // interval`` cuts at epochs ``budget + t * interval``, t =
    0..n-1, to ``1 - (1 - s)^((t + 1) / n)``: the same fraction of the remaining weights
    each time, the first right at the end of the budget.
    """
    budget = bimp_budget(epochs, train_budget)
    if budget >= epochs:
        raise ValueError(
            f"train_budget: BIMP needs train_budget < epochs, got {budget} with {epochs} epochs"
        )
    n = (epochs - budget) // interval
    if n < 1:
        raise ValueError(
            f"pruning_interval: BIMP needs pruning_interval <= epochs - train_budget, got "
            f"{interval} with {epochs} epochs and budget {budget}"
        )
    return [(budget + t * interval, 1.0 - (1.0 - sparsity) ** ((t + 1) / n)) for t in range(n)]


def imp_phase_sparsities(sparsity: float, phases: int) -> list[float]:
    """IMP's cumulative sparsity after each of ``phases`` cuts: each removes the fraction
    1 - (1 - s)^(1/phases) of the remaining weights (BIMP HEAD pretrainedStrategies.IMP)."""
    return [1.0 - (1.0 - sparsity) ** (j / phases) for j in range(1, phases + 1)]


def check_run(name: str, settings: Any, *, epochs: int, sparsity: float) -> None:
    """The checks that need the run's length: ValueError naming the setting."""
    if name in ("gmp", "dpf"):
        gmp_plan(epochs, settings.pruning_interval, sparsity)
    elif name == "bimp":
        bimp_plan(epochs, settings.train_budget, settings.pruning_interval, sparsity)


def describe(names: Sequence[str] | None = None) -> str:
    """One line per method: name, what it needs, exactness (for --help)."""
    lines = []
    for s in _SPECS.values():
        if names is not None and s.name not in names:
            continue
        extra = []
        if s.needs:
            extra.append("needs " + ", ".join(s.needs))
        if not s.exact:
            extra.append("sparse only after the final cut")
        lines.append(f"{s.name}: {s.summary}" + (f" ({'; '.join(extra)})" if extra else ""))
    return "\n".join(lines)
