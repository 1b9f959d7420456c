"""Pruning: scores -> masks at an exact sparsity, for ONG and the methods it is compared with.

    result = prune(model, "ong", sparsity=0.9)          # zeroes pruned weights in place
    opt = FusedMaskedSGD(model.parameters(), lr=0.1, masks=masks_for(model, result.masks))

Modules: targets (what is prunable), ong (ONG scores), scores (magnitude, random, SNIP, GraSP,
SynFlow), allocation (global / layer / ERK at an exact count), distributed (ONG over ranks),
api (prune, masks_for, mask_overlap), io (bit-packed safetensors), result (the report).
"""

from ong_kernels.pruning.allocation import SCOPES, allocate, erk_densities
from ong_kernels.pruning.api import (
    DATA_METHODS,
    METHODS,
    mask_overlap,
    masks_for,
    masks_from_scores,
    ong_masks,
    prune,
)
from ong_kernels.pruning.io import load_masks, save_masks
from ong_kernels.pruning.ong import ong_scores
from ong_kernels.pruning.result import LayerReport, PruneResult
from ong_kernels.pruning.scores import (
    grasp_scores,
    magnitude_scores,
    random_scores,
    snip_scores,
    synflow_scores,
)
from ong_kernels.pruning.targets import DEFAULT_PRUNABLE_TYPES, prunable_parameters

__all__ = [
    "DATA_METHODS",
    "DEFAULT_PRUNABLE_TYPES",
    "METHODS",
    "SCOPES",
    "LayerReport",
    "PruneResult",
    "allocate",
    "erk_densities",
    "grasp_scores",
    "load_masks",
    "magnitude_scores",
    "mask_overlap",
    "masks_for",
    "masks_from_scores",
    "ong_masks",
    "ong_scores",
    "prunable_parameters",
    "prune",
    "random_scores",
    "save_masks",
    "snip_scores",
    "synflow_scores",
]
