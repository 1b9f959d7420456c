"""How stable are ONG masks? Overlap (IoU of kept sets) across NMF starts, iteration counts
and ranks, and against magnitude masks, on a ResNet-20 at initialisation and after a short
training.

    python -m benchmarks.pruning_stability [--steps 200] [--sparsity 0.9] [--data fashion-mnist]
                                           [--json build/pruning_stability.json]

NMF has many local optima, so an ONG mask could depend on where the factorisation starts.
Each row compares two mask sets at the same sparsity (global scope). Two random masks at
density d overlap about d / (2 - d) (0.053 at sparsity 0.9): the floor to read the others
against. The short training is plain SGD on Fashion-MNIST (the Debian package's copy,
``ong_kernels.train.data``) or on the seeded synthetic set; it only has to move the weights
away from their i.i.d. initialisation. ``bench_pruning.py`` records the same table in the
benchmark JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ong_kernels.pruning import (
    mask_overlap,
    masks_from_scores,
    ong_scores,
    random_scores,
)
from ong_kernels.train.data import load_dataset
from ong_kernels.train.models import build_model

SEEDS = (0, 1, 2, 3, 4)
ITERATIONS = (50, 100, 400)  # each against 200, with tol=0 so every count is run in full
RANKS = (1, 0.1, 0.25, 0.5, 1.0)  # an int is a rank, a float a fraction of min(m, n)


def short_train(model: nn.Module, data: str, steps: int, seed: int = 0) -> nn.Module:
    """`steps` SGD steps (lr 0.05, momentum 0.9, batch 128) on `data`; returns `model`."""
    ds = load_dataset(data, synthetic_shape=(4096, 256, 1, 28))
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ds.train_y), (128,), generator=gen)
        x = (ds.train_x[idx].float() / 255 - mean) / std
        loss = F.cross_entropy(model(x), ds.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _mean_pairwise(masks: list[dict]) -> tuple[float, float]:
    values = [mask_overlap(a, b) for a, b in itertools.combinations(masks, 2)]
    return sum(values) / len(values), min(values)


def stability_rows(model: nn.Module, sparsity: float) -> list[tuple[str, float]]:
    """(comparison, IoU) rows for `model`'s ONG masks at `sparsity`; the model is not changed."""

    def masks(**kw) -> dict:
        return masks_from_scores(ong_scores(model, **kw), sparsity)

    reference = masks()  # the defaults: rank 0.25, init nndsvda, max_iter 200, tol 1e-4
    magnitude = masks_from_scores(
        {n: p.detach().abs() for n, p in model.named_parameters() if n in reference}, sparsity
    )
    rows = []
    seeds_mean, seeds_min = _mean_pairwise([masks(init="random", seed=s) for s in SEEDS])
    rows.append((f"ONG init=random, {len(SEEDS)} seeds: mean pairwise", seeds_mean))
    rows.append((f"ONG init=random, {len(SEEDS)} seeds: min pairwise", seeds_min))
    rows.append(("ONG nndsvda vs nndsvd", mask_overlap(reference, masks(init="nndsvd"))))
    rows.append(("ONG nndsvda vs random (seed 0)", mask_overlap(reference, masks(init="random"))))
    at_200 = masks(max_iter=200, tol=0.0)
    for iters in ITERATIONS:
        rows.append(
            (
                f"ONG max_iter {iters} vs 200 (tol 0)",
                mask_overlap(at_200, masks(max_iter=iters, tol=0.0)),
            )
        )
    rows.append(
        ("ONG tol 1e-4 (default) vs tol 0, 200 iterations", mask_overlap(reference, at_200))
    )
    for rank in RANKS:
        label = f"rank {rank}" if isinstance(rank, int) else f"rank {rank:.2f} of min(m, n)"
        rows.append((f"ONG {label} vs magnitude", mask_overlap(masks(rank=rank), magnitude)))
    random_pair = [masks_from_scores(random_scores(model, seed=s), sparsity) for s in (0, 1)]
    rows.append(("random vs random (seeds 0, 1): the chance level", mask_overlap(*random_pair)))
    return rows


def stability_table(
    steps: int = 200,
    sparsity: float = 0.9,
    data: str = "fashion-mnist",
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """{"rows": [(comparison, IoU at init, IoU after training)], ...} for a ResNet-20."""
    torch.manual_seed(0)
    in_channels = 1  # Fashion-MNIST and the synthetic set here are single-channel 28x28
    model = build_model("resnet20", in_channels=in_channels, num_classes=10)
    t0 = time.perf_counter()
    at_init = stability_rows(model, sparsity)
    log(f"at init: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    short_train(model, data, steps)
    log(f"training {steps} steps on {data}: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    trained = stability_rows(model, sparsity)
    log(f"after training: {time.perf_counter() - t0:.1f} s")
    return {
        "model": "resnet20",
        "data": data,
        "steps": steps,
        "sparsity": sparsity,
        "rows": [(name, a, b) for (name, a), (_, b) in zip(at_init, trained, strict=True)],
    }


def markdown(result: dict) -> str:
    head = (
        f"| comparison (ResNet-20, sparsity {result['sparsity']}, global) | at init | "
        f"after {result['steps']} steps on {result['data']} |"
    )
    lines = [head, "|---|---:|---:|"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} |" for name, a, b in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="SGD steps of the short training")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "synthetic"))
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    result = stability_table(
        args.steps, args.sparsity, args.data, log=lambda s: print(s, file=sys.stderr)
    )
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
