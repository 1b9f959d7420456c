"""ONG scores: a low-rank non-negative reconstruction of |W| from one batched NMF.

For each prunable weight W, V = |W| viewed as (out, in * kh * kw) (a 1-D tensor as (1, n));
every V is factorised by ONE ``ong_kernels.nmf.nmf_batched`` call (all matrices advance
together), V ~= W_f H_f, and the score is W_f @ H_f reshaped to W's shape. At full rank and
many iterations the reconstruction tends to |W| and the masks to magnitude masks; at low rank
the score keeps the dominant non-negative structure of each layer and smooths away the rest.

The paper's exact settings are not available to us, so every choice is an argument:

* ``rank=0.25``: a float in (0, 1] is a fraction of min(m, n) per matrix (rounded, at
  least 1); an int is used as is, clipped to min(m, n). A quarter of the full rank keeps the
  NMF cost, O(m n r) per iteration, at ~33 s for ResNet-18 (200 iterations, reference
  backend, 2 CPU cores) while staying clearly below full rank (which would be magnitude).
* ``init=None``: ``"nndsvda"`` for one restart (SVD-based, so the same weights always give
  the same mask); ``"random"`` (seeded by ``seed``) and ``"nndsvd"`` are the alternatives, or
  one (W0, H0) pair per prunable weight.
* ``restarts=1``: with k > 1, consensus ONG: every matrix is factorised k times from
  init="random" with seeds ``seed, seed + 1, ..., seed + k - 1`` (so calls whose seeds are
  k or more apart use disjoint starts), all k restarts of all matrices in the SAME
  ``nmf_batched`` call, and the score is the mean of the k reconstructions W_f H_f (a
  running sum: one score buffer per weight, plus the k restarts' factors, r (m + n) floats
  each, kept to measure their agreement with the mask: ``Agreement``). Which weights a
  single ONG start keeps depends strongly on the start (two random starts: IoU 0.46 on a
  ResNet-20 at 90%); the mean over starts converges (benchmarks/RESULTS.md, issue 19).
  init="nndsvd"/"nndsvda" or (W0, H0) pairs with k > 1 is a ValueError: an NNDSVD start is
  a function of the matrix (the seed of its randomized SVD moves it only by that SVD's
  error) and custom pairs do not depend on the seed, so the restarts would all be (nearly)
  the same solve at k times its cost. restarts=1 is today's ONG exactly.
* ``max_iter=200``, ``tol=1e-4``: ``nmf_batched``'s defaults (scikit-learn's).
* ``backend="auto"``: passed to ``nmf_batched``.

With torch.distributed initialised, the matrices are spread over the ranks of ``group``
(default: the world) and the scores gathered (distributed.py); with a deterministic init the
scores equal the single-process ones up to float32 rounding of the batched kernels. Every
rank must then make the same call; ``distributed=False`` factorises everything locally.
The restarts of one matrix are solved on one rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ong_kernels import nmf  # module reference: tests spy on nmf.nmf_batched
from ong_kernels._validate import check_int, check_real, check_seed
from ong_kernels.nmf_rules import matrix_shape
from ong_kernels.pruning.allocation import select_top
from ong_kernels.pruning.distributed import run_sharded
from ong_kernels.pruning.targets import Target, resolve_targets

__all__ = [
    "CONSENSUS",
    "CONSENSUS_INIT",
    "CONSENSUS_RESTARTS",
    "DEFAULT_RANK",
    "ONG_SOLVER",
    "Agreement",
    "OngSettings",
    "check_restarts",
    "mean_product",
    "ong_scores",
    "resolve_ranks",
    "restart_init",
    "restart_overlaps",
    "restart_seeds",
]

DEFAULT_RANK = 0.25


def resolve_ranks(rank, shapes: Sequence[torch.Size]) -> list[int]:
    """Per-matrix NMF ranks: an int clipped to min(m, n), or a fraction of min(m, n)."""
    if isinstance(rank, float):
        fraction = check_real(rank, "rank (a fraction of min(m, n))", minimum=0.0, maximum=1.0,
                              min_open=True)  # fmt: skip
        return [max(1, round(fraction * min(matrix_shape(s)))) for s in shapes]
    rank = check_int(rank, "rank", 1)  # bool, str, ...: TypeError naming rank
    return [min(rank, *matrix_shape(s)) for s in shapes]


# ONG's NMF settings (the defaults of ong_scores and prune("ong")): nmf_batched's, with the
# deterministic nndsvda start.
ONG_SOLVER = nmf.Solver(init="nndsvda")
# What a consensus ("ong-consensus") restarts from, and how many restarts by default:
# consensus ONG is ONG with these defaults (api's method table, OngSettings.consensus).
CONSENSUS_INIT = "random"
CONSENSUS_RESTARTS = 8
CONSENSUS = {"init": CONSENSUS_INIT, "restarts": CONSENSUS_RESTARTS}


def check_restarts(restarts) -> int:
    """`restarts` as an int >= 1, or a TypeError / ValueError naming it."""
    return check_int(restarts, "restarts", 1)


def restart_init(init, restarts: int):
    """The init of `restarts` restarts: None means "nndsvda" for one, CONSENSUS_INIT for more.

    Several restarts need starts that differ, so they take init="random" (restart j seeded
    with seed + j). An NNDSVD start is a function of the matrix (its randomized SVD's seed
    moves it only by that SVD's error), so k NNDSVD restarts would be k copies of one
    solve at k times its cost: refused, as are custom (W0, H0) starts.
    """
    if init is None:
        return ONG_SOLVER.init if restarts == 1 else CONSENSUS_INIT
    if restarts > 1 and not (isinstance(init, str) and init == CONSENSUS_INIT):
        shown = repr(init) if isinstance(init, str) else "(W0, H0) pairs"
        raise ValueError(
            f"restarts={restarts} needs init={CONSENSUS_INIT!r} (restart j seeded with seed + j), "
            f"got init={shown}: NNDSVD and custom starts (nearly) do not change with the seed, "
            "so the restarts would all be the same solve"
        )
    return init


def restart_seeds(seed: int, restarts: int) -> list[int]:
    """seed, seed + 1, ..., seed + restarts - 1, checked against the generator's range."""
    check_seed(seed + restarts - 1, f"seed + restarts - 1 (seed={seed}, restarts={restarts})")
    return [seed + j for j in range(restarts)]


@dataclass(frozen=True)
class OngSettings:
    """ONG's settings in one object: the NMF rank (an int, or a fraction of min(m, n)),
    nmf_batched's solver settings, and the number of restarts (consensus ONG for k > 1). The
    module docstring gives each default's source. ``resolved()`` checks them all at once and
    fixes the start (init None: nndsvda for one restart, random for more); every entry point
    (prune, the streamed factors, ong-mask) resolves once, then only reads."""

    rank: int | float = DEFAULT_RANK
    max_iter: int = 200
    tol: float = 1e-4
    init: str | Sequence | None = None
    seed: int = 0
    restarts: int = 1
    backend: str = "auto"
    # Set by resolved() alone: not an argument, so no caller can skip the checks.
    checked: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def consensus(cls, **settings) -> OngSettings:
        """Consensus ONG: CONSENSUS's defaults, overridden by `settings`."""
        return cls(**{**CONSENSUS, **settings})

    def resolved(self) -> OngSettings:
        """Every setting checked (a TypeError / ValueError naming the first bad one), the
        start fixed by the number of restarts; resolved settings are returned as they are."""
        if self.checked:
            return self
        resolve_ranks(self.rank, [])  # the rank's type and range
        k = check_restarts(self.restarts)
        init = restart_init(self.init, k)
        solver = nmf.Solver(self.max_iter, self.tol, init, self.seed, self.backend).checked()
        restart_seeds(self.seed, k)
        out = dataclasses.replace(self, init=init, tol=solver.tol)
        object.__setattr__(out, "checked", True)  # frozen: set once, here
        return out

    def ranks(self, shapes: Sequence[Sequence[int]]) -> list[int]:
        return resolve_ranks(self.rank, shapes)

    def solver(self, weights: int) -> nmf.Solver:
        """The solver of `weights` weights' matrices, each weight's restarts in a row
        (restart j seeded with seed + j)."""
        seed = self.seed
        if self.restarts > 1:
            seed = tuple(restart_seeds(self.seed, self.restarts) * weights)
        return nmf.Solver(self.max_iter, self.tol, self.init, seed, self.backend)

    def costs(self, shapes: Sequence[Sequence[int]]) -> list[int]:
        """Per weight, the work of its restarts per MU iteration: k m n r (distributed's
        balance splits the weights by it)."""
        return [self.restarts * math.prod(matrix_shape(s)) * r
                for s, r in zip(shapes, self.ranks(shapes), strict=True)]  # fmt: skip


def mean_product(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(1/k) sum_j W_j H_j as a running sum: one (m, n) buffer, whatever k is. For one pair
    this is exactly W @ H (today's ONG score, bit for bit)."""
    (w, h), rest = factors[0], factors[1:]
    total = w @ h
    for w, h in rest:
        total.addmm_(w, h)  # in place: no second (m, n) temporary
    if rest:
        total.div_(len(factors))
    return total


def restart_overlaps(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], kept: torch.Tensor
) -> list[tuple[int, int]]:
    """(intersection, union) of each restart's kept set with `kept` (one layer's consensus
    mask), each restart keeping its top count(kept) of W_j H_j (ties by position, as
    allocate). A restart's IoU over all layers is sum(inter) / sum(union)."""
    flat = kept.reshape(-1)
    c = int(torch.count_nonzero(flat))
    out = []
    for w, h in factors:
        score = (w @ h).reshape(-1).to(flat.device)
        inter = int(torch.count_nonzero(select_top(score, c) & flat))
        out.append((inter, 2 * c - inter))
    return out


@dataclass(frozen=True)
class Agreement:
    """How start-dependent a consensus mask is: each restart's own kept set, taken at the
    consensus mask's per-layer counts, against the consensus kept set.

    ``per_layer[l]`` is the mean over restarts of that IoU in layer l; ``per_restart[j]`` the
    IoU of restart j over all layers together (kept sets of all layers concatenated);
    ``mean`` the mean of ``per_restart``. 1.0: every restart alone gives the consensus mask.
    """

    restarts: int
    per_layer: tuple[float, ...]
    per_restart: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.per_restart) / len(self.per_restart)

    @classmethod
    def from_overlaps(cls, overlaps: Sequence[Sequence[tuple[int, int]]]) -> Agreement:
        """From (intersection, union) per layer and restart (stream.restart_overlaps)."""
        k = len(overlaps[0])
        per_layer = [sum(i / u if u else 1.0 for i, u in layer) / k for layer in overlaps]
        inter = [sum(layer[j][0] for layer in overlaps) for j in range(k)]
        union = [sum(layer[j][1] for layer in overlaps) for j in range(k)]
        per_restart = [i / u if u else 1.0 for i, u in zip(inter, union, strict=True)]
        return cls(k, tuple(per_layer), tuple(per_restart))


@dataclass
class Scored:
    """ONG's scores, and for restarts > 1 the function that measures the restarts' agreement
    with the masks made from them (``agreement(masks) -> Agreement``)."""

    scores: list[torch.Tensor]
    agreement: Callable[[Sequence[torch.Tensor]], Agreement] | None = None


def _ong(
    model,
    targets: Sequence[Target],
    *,
    seed: int = 0,
    rank=DEFAULT_RANK,
    max_iter: int = 200,
    tol: float = 1e-4,
    init=None,
    restarts: int = 1,
    backend: str = "auto",
    group=None,
    distributed: bool = True,
) -> Scored:
    # Keyword-only: prune() passes the options a scorer declares (api._method_kwargs);
    # "ong-consensus" is this with CONSENSUS's defaults. Checked before any communication,
    # so every rank of a process group fails the same way.
    settings = OngSettings(rank, max_iter, tol, init, seed, restarts, backend).resolved()
    shapes = [t.shape for _, t in targets]
    ranks = settings.ranks(shapes)
    k = settings.restarts
    init = settings.init
    if not isinstance(init, str) and len(init) != len(targets):
        raise ValueError(
            f"init has {len(init)} (W0, H0) pairs but there are {len(targets)} weights"
        )
    device = targets[0][1].device
    restart_factors: dict[int, list] = {}  # this rank's matrices' k factor pairs (k > 1)

    def compute(indices: list[int]) -> list[torch.Tensor]:
        # Every restart of every matrix in ONE call: matrix i appears k times in a row (the
        # same tensor, not copies), restart j seeded with seed + j.
        mats = [targets[i][1].detach().abs().to(device) for i in indices]
        solver = settings.solver(len(indices))
        if not isinstance(init, str):
            solver = dataclasses.replace(solver, init=[init[i] for i in indices])
        names = [targets[i][0] for i in indices for _ in range(k)]  # errors name the parameter
        factors = nmf.nmf_batched(
            [v for v in mats for _ in range(k)], [ranks[i] for i in indices for _ in range(k)],
            **solver.kwargs(), names=names,
        )  # fmt: skip
        scores = []
        for pos, i in enumerate(indices):
            pairs = factors[pos * k : (pos + 1) * k]
            if k > 1:
                restart_factors[i] = pairs  # r (m + n) per restart, against m n per score
            # One (m, r) @ (r, n) per restart: ~1/(2 * max_iter) of the NMF's own matmul work.
            scores.append(mean_product(pairs).reshape(shapes[i]))
        return scores

    costs = settings.costs(shapes)
    # The restarts of one matrix are one item: they stay on one rank.
    scores = run_sharded(compute, costs, shapes, device, group, distributed)
    scores = [s.to(t.device) for s, (_, t) in zip(scores, targets, strict=True)]
    if k == 1:
        return Scored(scores)

    def agreement(masks: Sequence[torch.Tensor]) -> Agreement:
        def agree(indices: list[int]) -> list[torch.Tensor]:
            out = []
            for i in indices:
                pairs = restart_overlaps(restart_factors[i], masks[i].to(device))
                ious = [inter / union if union else 1.0 for inter, union in pairs]
                out.append(torch.tensor(ious, dtype=torch.float32))
            return out

        # Each rank measures the matrices it factorised (same owners: same costs).
        ious = run_sharded(agree, costs, [(k,)] * len(targets), device, group, distributed)
        ious = torch.stack([t.to("cpu", torch.float64) for t in ious])  # (layers, k)
        counts = torch.tensor([float(torch.count_nonzero(m)) for m in masks], dtype=torch.float64)
        # Back from IoU to counts per layer (|A| = |B| = c: inter = 2c IoU / (1 + IoU)).
        inter = 2 * counts[:, None] * ious / (1 + ious)
        union = 2 * counts[:, None] - inter
        total = union.sum(0)
        per_restart = torch.where(total > 0, inter.sum(0) / total.clamp_min(1), 1.0)
        return Agreement(k, tuple(ious.mean(1).tolist()), tuple(per_restart.tolist()))

    return Scored(scores, agreement)


def ong_scores(
    model_or_named,
    *,
    rank=DEFAULT_RANK,
    max_iter: int = 200,
    tol: float = 1e-4,
    init=None,
    restarts: int = 1,
    seed: int = 0,
    backend: str = "auto",
    group=None,
    distributed: bool = True,
    include=None,
    exclude=None,
) -> dict[str, torch.Tensor]:
    """ONG scores W_f @ H_f of NMF(|W|) per prunable weight (module docstring for arguments);
    with ``restarts=k`` the mean of k restarts' W_f @ H_f (consensus ONG).

    `model_or_named` is an ``nn.Module`` (its prunable weights, filtered by `include` /
    `exclude`) or an iterable of (name, tensor) pairs, all scored.
    """
    model, targets = resolve_targets(model_or_named, include, exclude)
    solver = dict(rank=rank, max_iter=max_iter, tol=tol, init=init, seed=seed, backend=backend)
    scored = _ong(model, targets, restarts=restarts, group=group, distributed=distributed, **solver)
    return {name: s for (name, _), s in zip(targets, scored.scores, strict=True)}
