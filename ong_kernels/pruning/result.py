"""What ``prune`` returns: the masks and a per-layer report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ong_kernels.pruning.ong import Agreement

__all__ = ["LayerReport", "PruneResult", "layer_reports"]


@dataclass(frozen=True)
class LayerReport:
    """One prunable weight after pruning: how many of its entries are kept, and for ONG with
    restarts > 1 how well its restarts agree (ong.Agreement.per_layer)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    kept: int
    sparsity: float  # fraction pruned in this layer
    # Mean IoU of each restart's kept set (at this layer's count) with the consensus kept set.
    agreement: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def layer_reports(
    names: Sequence[str], masks: Sequence[torch.Tensor], agreement: Agreement | None = None
) -> list[LayerReport]:
    """Rows for `masks`. count_nonzero: on 11M bools, 6 ms against 52 ms for .sum() (CPU)."""
    kept = [int(torch.count_nonzero(m)) for m in masks]
    agree = [None] * len(kept) if agreement is None else agreement.per_layer
    rows = []
    for name, mask, k, a in zip(names, masks, kept, agree, strict=True):
        n = mask.numel()
        rows.append(LayerReport(name, tuple(mask.shape), n, int(k), 1.0 - k / n, a))
    return rows


@dataclass(repr=False)
class PruneResult:
    """Masks (parameter name -> bool tensor, True = kept) and the per-layer report.

    ``target_sparsity`` is what was asked for; ``sparsity`` is what the masks have overall
    (equal to round(target * N) / N except where a per-layer floor raised a count).
    ``agreement`` (ONG with restarts > 1, else None): the restarts' agreement with the
    consensus mask (ong.Agreement; per layer also in ``report``).
    """

    masks: dict[str, torch.Tensor]
    report: list[LayerReport]
    method: str
    scope: str
    target_sparsity: float
    options: dict = field(default_factory=dict)  # the method's keyword arguments
    agreement: Agreement | None = None

    def __repr__(self) -> str:
        # One line: the dataclass default would print every mask tensor.
        stability = ""
        if self.agreement is not None:
            stability = f", restarts={self.agreement.restarts}, agreement={self.agreement.mean:.3f}"
        return (
            f"PruneResult(method={self.method!r}, scope={self.scope!r}, "
            f"target_sparsity={self.target_sparsity:g}, sparsity={self.sparsity:.4f}, "
            f"layers={len(self.report)}, weights={self.numel}, kept={self.kept}{stability})"
        )

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.report)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.report)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.numel

    def table(self) -> str:
        """The report as an aligned text table, one row per layer and a total; with restarts,
        an ``agreement`` column (per layer; the total row: the mean over restarts of each
        restart's IoU over all layers) and a line saying what it is."""
        agree = self.agreement is not None
        width = max([len(r.name) for r in self.report] + [5])
        head = f"{'layer':<{width}}  {'shape':<20} {'numel':>10} {'kept':>10} {'sparsity':>9}"
        lines = [head + (f" {'agreement':>9}" if agree else "")]
        for r in self.report:
            shape = "x".join(map(str, r.shape))
            row = f"{r.name:<{width}}  {shape:<20} {r.numel:>10} {r.kept:>10} {r.sparsity:>9.4f}"
            lines.append(row + (f" {r.agreement:>9.4f}" if agree else ""))
        total = f"{'total':<{width}}  {'':<20} {self.numel:>10} {self.kept:>10}"
        total += f" {self.sparsity:>9.4f}"
        lines.append(total + (f" {self.agreement.mean:>9.4f}" if agree else ""))
        if agree:
            worst = min(self.agreement.per_restart)
            lines.append(
                f"agreement: mean IoU of each of the {self.agreement.restarts} restarts' own kept "
                f"set (at the consensus per-layer counts) with the consensus kept set; lowest "
                f"restart {worst:.4f}; 1 = start-independent"
            )
        return "\n".join(lines)
