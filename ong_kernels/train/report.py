"""Plain-text tables for the terminal and for markdown files."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_mean_std", "format_table", "mean_std"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal).

    ``columns`` is a sequence of (key, header); floats are shown with two decimals, other
    values with ``str`` (pre-format a value as a string to control it).
    """
    header = [h for _, h in columns]
    body = [[_cell(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(columns))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; None for a single value (one value has no
    spread: not 0, which would claim a measured one)."""
    if not values:
        raise ValueError("values: empty")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def format_mean_std(mean: float, std: float | None) -> str:
    """``88.12 ± 0.40``, or ``88.12 (std n/a)`` when there is no std (one seed)."""
    return f"{mean:.2f} (std n/a)" if std is None else f"{mean:.2f} ± {std:.2f}"
