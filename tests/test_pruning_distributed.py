"""Pruning under torch.distributed: 2 CPU processes on gloo. ONG splits the matrices, SNIP
sums gradients over the ranks' different batches; both give identical masks on every rank,
equal to one process doing all the work; an error on one rank is raised on both."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_two
from torch import nn

from ong_kernels.pruning import load_masks, mask_overlap, ong_scores, prune, save_masks
from ong_kernels.pruning.distributed import balance, run_sharded

TIMEOUT_S = 120
ONG = {"rank": 0.4, "max_iter": 60}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 11, 3),
        nn.ReLU(),
        nn.Conv2d(11, 13, 3),
        nn.ReLU(),
        nn.Conv2d(13, 5, 1),
        nn.Flatten(),
        nn.Linear(5 * 7 * 7, 9),
        nn.Linear(9, 7),
    )


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 3, 11, 11, generator=g), torch.randint(0, 7, (4,), generator=g)


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        torch.set_num_threads(1)
        torch.save(ong_scores(model(), **ONG), f"{out_dir}/scores{rank}.pt")
        save_masks(f"{out_dir}/masks{rank}.safetensors", prune(model(), "ong", 0.9, **ONG))
        # Consensus: each matrix's 3 restarts on one rank, the agreement gathered too.
        consensus = prune(model(), "ong", 0.9, restarts=3, **ONG)
        save_masks(f"{out_dir}/consensus{rank}.safetensors", consensus)
        torch.save(consensus.agreement, f"{out_dir}/agreement{rank}.pt")
        # SNIP on different batches per rank: the gradients are summed over the ranks.
        snip = prune(model(), "snip", 0.9, data=rank_batch(rank))
        save_masks(f"{out_dir}/snip{rank}.safetensors", snip)
        if rank == 1:  # alone: with communication this would wait for rank 0 forever
            local = prune(model(), "snip", 0.9, data=rank_batch(1), distributed=False)
            save_masks(f"{out_dir}/snip_local.safetensors", local)

        def fail_on_rank_1(indices):
            if rank == 1:
                raise ArithmeticError("planted failure")
            return [torch.ones(3) for _ in indices]

        try:
            run_sharded(fail_on_rank_1, [1.0, 1.0], [(3,), (3,)], torch.device("cpu"))
        except ArithmeticError:
            outcome = "own error"
        except RuntimeError as exc:
            outcome = "other rank" if "another rank" in str(exc) else repr(exc)
        else:
            outcome = "no error"
        with open(f"{out_dir}/outcome{rank}.txt", "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_identical_masks(tmp_path):
    spawn_two(_worker, 2, free_port(), str(tmp_path), timeout=TIMEOUT_S)

    m0 = load_masks(tmp_path / "masks0.safetensors")
    m1 = load_masks(tmp_path / "masks1.safetensors")
    assert list(m0) == list(m1)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    s0 = torch.load(tmp_path / "scores0.pt")
    s1 = torch.load(tmp_path / "scores1.pt")
    assert all(torch.equal(s0[k], s1[k]) for k in s0)

    # Each rank factorised a share; the result matches one process doing all matrices.
    single = prune(model(), "ong", 0.9, **ONG)
    assert mask_overlap(single, m0) > 0.99
    for k, s in ong_scores(model(), **ONG).items():
        torch.testing.assert_close(s0[k], s, rtol=1e-4, atol=1e-6)

    # SNIP: both ranks scored both batches, i.e. the two batches in one process.
    snip0 = load_masks(tmp_path / "snip0.safetensors")
    snip1 = load_masks(tmp_path / "snip1.safetensors")
    assert all(torch.equal(snip0[k], snip1[k]) for k in snip0)
    both = prune(model(), "snip", 0.9, data=[rank_batch(0), rank_batch(1)])
    assert mask_overlap(both, snip0) > 0.99
    alone = prune(model(), "snip", 0.9, data=rank_batch(0))
    assert mask_overlap(alone, snip0) < mask_overlap(both, snip0)
    local = load_masks(tmp_path / "snip_local.safetensors")
    own = prune(model(), "snip", 0.9, data=rank_batch(1))
    assert all(torch.equal(local[k], own.masks[k]) for k in local)

    # Consensus ONG: the same masks and agreement on both ranks, and as in one process.
    c0 = load_masks(tmp_path / "consensus0.safetensors")
    c1 = load_masks(tmp_path / "consensus1.safetensors")
    assert all(torch.equal(c0[k], c1[k]) for k in c0)
    a0, a1 = (torch.load(tmp_path / f"agreement{r}.pt", weights_only=False) for r in range(2))
    assert a0 == a1 and a0.restarts == 3
    alone = prune(model(), "ong", 0.9, restarts=3, **ONG)
    assert mask_overlap(alone, c0) > 0.99
    assert a0.per_layer == pytest.approx(alone.agreement.per_layer, abs=0.02)

    outcomes = [(tmp_path / f"outcome{r}.txt").read_text() for r in range(2)]
    assert outcomes == ["other rank", "own error"]


def test_balance_is_greedy_by_cost():
    # 5 -> r0, 4 -> r1, 3 -> r1 (4 < 5), 2 -> r0 (5 < 7), 1 -> r0 (7 = 7, lower rank): 8 vs 7
    assert balance([5, 1, 4, 2, 3], 2) == [0, 0, 1, 0, 1]
    assert balance([1, 1, 1], 4) == [0, 1, 2]
    assert balance([3], 1) == [0]
