"""Grouping of ragged matrix lists into same-shape buckets for batched matmuls."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def group_indices(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices of equal keys, in first-seen order of the keys and ascending index order."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups
