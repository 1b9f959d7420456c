"""DistributedDataParallel plumbing: process group from torchrun's environment, helpers.

``torchrun --nproc_per_node N ong-train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; :func:`setup` reads them and joins the group with NCCL on
GPUs and gloo on CPU. Without those variables (a plain ``ong-train``) it returns a
single-process context and nothing distributed is touched.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_reduce_sum",
    "broadcast_masks",
    "resolve_device",
    "setup",
    "teardown",
]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> cuda if available else cpu; a bare ``cuda`` -> this local rank's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {requested!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(requested_device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by the environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        initialized_here = True
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
            f"RANK={rank} WORLD_SIZE={world_size} in the environment"
        )
    return DistContext(rank, world_size, local_rank, device, initialized_here)


def teardown(ctx: DistContext) -> None:
    """Leave the process group if :func:`setup` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over ranks (identity in a single process)."""
    if ctx.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_masks(ctx: DistContext, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make every rank's masks equal to rank 0's.

    Each rank prunes the same model from the same seed, so the masks should already agree;
    broadcasting makes that a guarantee (a score tie resolved differently by a different
    kernel would otherwise desynchronise the ranks). Key sets are checked first.
    """
    if not ctx.enabled:
        return masks
    names = sorted(masks)
    gathered: list[list[str] | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, names)
    if any(g != names for g in gathered):
        raise RuntimeError("pruning produced different masked parameters on different ranks")
    out = {}
    for name in names:
        buf = masks[name].to(torch.uint8).contiguous()
        dist.broadcast(buf, src=0)
        out[name] = buf.bool()
    return out
