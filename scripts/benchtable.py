"""What the benchmark scripts share: a row of figures, verdicts, and printing the table side by side."""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a benchmark's table."""

    step: str
    figure: str
    rate: str = ""
    target: str = ""
    verdict: str = ""


def verdict(ok: bool) -> str:
    """The verdict of one target."""
    return "OK" if ok else "MISSED"


def megabytes(count: int) -> str:
    """Bytes as MB."""
    return f"{count / 1e6:,.0f} MB"


def print_rows(rows: Sequence[Row]) -> None:
    """Print the rows under a heading: step left, figures right, target and verdict left."""
    heading = Row("step", "figure", "rate", "target", "verdict")
    names = ("step", "figure", "rate", "target", "verdict")
    widths = [max(len(getattr(row, name)) for row in [heading, *rows]) for name in names]
    for row in [heading, *rows]:
        cells = (row.step, row.figure, row.rate, row.target, row.verdict)
        print("  ".join(cell.ljust(width) if index == 0 else cell.rjust(width) if index < 3 else cell.ljust(width)
                        for index, (cell, width) in enumerate(zip(cells, widths))).rstrip())
