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
* ``init="nndsvda"``: deterministic (SVD-based), so the same weights always give the same
  mask; ``"random"`` (seeded by ``seed``) and ``"nndsvd"`` are the alternatives, or one
  (W0, H0) pair per prunable weight.
* ``max_iter=200``, ``tol=1e-4``: ``nmf_batched``'s defaults (scikit-learn's).
* ``backend="auto"``: passed to ``nmf_batched``.

With torch.distributed initialised, the matrices are spread over the ranks of ``group``
(default: the world) and the scores gathered (distributed.py); with a deterministic init the
scores equal the single-process ones up to float32 rounding of the batched kernels. Every
rank must then make the same call; ``distributed=False`` factorises everything locally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ong_kernels import nmf  # module reference: tests spy on nmf.nmf_batched
from ong_kernels._validate import check_int, check_real
from ong_kernels.nmf_rules import matrix_shape
from ong_kernels.pruning.distributed import run_sharded
from ong_kernels.pruning.targets import Target, resolve_targets

__all__ = ["DEFAULT_RANK", "ONG_SOLVER", "ong_scores", "resolve_ranks"]

DEFAULT_RANK = 0.25


def resolve_ranks(rank, shapes: Sequence[torch.Size]) -> list[int]:
    """Per-matrix NMF ranks: an int clipped to min(m, n), or a fraction of min(m, n)."""
    if isinstance(rank, float):
        fraction = check_real(rank, "rank (a fraction of min(m, n))", minimum=0.0, maximum=1.0,
                              min_open=True)  # fmt: skip
        return [max(1, round(fraction * min(matrix_shape(s)))) for s in shapes]
    check_int(rank, "rank", 1)  # bool, str, ...: TypeError naming rank
    return [min(rank, *matrix_shape(s)) for s in shapes]


# ONG's NMF settings (the defaults of ong_scores and prune("ong")): nmf_batched's, with the
# deterministic nndsvda start.
ONG_SOLVER = nmf.Solver(init="nndsvda")


def _ong(
    model,
    targets: Sequence[Target],
    *,
    seed: int = 0,
    rank=DEFAULT_RANK,
    max_iter: int = 200,
    tol: float = 1e-4,
    init="nndsvda",
    backend: str = "auto",
    group=None,
    distributed: bool = True,
) -> list[torch.Tensor]:
    # Keyword-only: prune() passes the options a scorer declares (api._method_kwargs).
    shapes = [t.shape for _, t in targets]
    ranks = resolve_ranks(rank, shapes)
    # nmf_batched checks these too; checking first means every rank of a process group fails
    # the same way before any communication.
    solver = nmf.Solver(max_iter, tol, init, seed, backend).checked()
    init = solver.init
    if not isinstance(init, str) and len(init) != len(targets):
        raise ValueError(
            f"init has {len(init)} (W0, H0) pairs but there are {len(targets)} weights"
        )
    device = targets[0][1].device

    def compute(indices: list[int]) -> list[torch.Tensor]:
        mats = [targets[i][1].detach().abs().to(device) for i in indices]
        group_init = init if isinstance(init, str) else [init[i] for i in indices]
        settings = {**solver.kwargs(), "init": group_init}
        names = [targets[i][0] for i in indices]  # errors name the parameter
        factors = nmf.nmf_batched(mats, [ranks[i] for i in indices], **settings, names=names)
        # One (m, r) @ (r, n) per matrix: ~1/(2 * max_iter) of the NMF's own matmul work.
        return [(w @ h).reshape(shapes[i]) for i, (w, h) in zip(indices, factors, strict=True)]

    costs = [math.prod(matrix_shape(s)) * r for s, r in zip(shapes, ranks, strict=True)]
    scores = run_sharded(compute, costs, shapes, device, group, distributed)
    return [s.to(t.device) for s, (_, t) in zip(scores, targets, strict=True)]


def ong_scores(
    model_or_named,
    *,
    rank=DEFAULT_RANK,
    max_iter: int = 200,
    tol: float = 1e-4,
    init="nndsvda",
    seed: int = 0,
    backend: str = "auto",
    group=None,
    distributed: bool = True,
    include=None,
    exclude=None,
) -> dict[str, torch.Tensor]:
    """ONG scores W_f @ H_f of NMF(|W|) per prunable weight (module docstring for arguments).

    `model_or_named` is an ``nn.Module`` (its prunable weights, filtered by `include` /
    `exclude`) or an iterable of (name, tensor) pairs, all scored.
    """
    model, targets = resolve_targets(model_or_named, include, exclude)
    solver = dict(rank=rank, max_iter=max_iter, tol=tol, init=init, seed=seed, backend=backend)
    scores = _ong(model, targets, group=group, distributed=distributed, **solver)
    return {name: s for (name, _), s in zip(targets, scores, strict=True)}
