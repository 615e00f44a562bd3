"""What the benchmark scripts share: timing a child process, a row of figures, verdicts, the table."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Run:
    """One child process: how long it took, its CPU time and its peak resident memory."""

    seconds: float
    cpu: float  # user + system seconds of the child (its own children included when it waited for them)
    max_rss: int  # bytes
    output: str
    code: int


def run_child(args: list[str], folder: Path, name: str, ok_codes: tuple[int, ...] = (0,)) -> Run:
    """Run a child process to its end in folder; measure its wall time and (wait4) its own CPU time and peak RSS."""
    log = folder / f"{name}.log"
    began = time.perf_counter()
    with log.open("wb") as out:
        child = subprocess.Popen(args, cwd=folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    child.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    if child.returncode not in ok_codes:
        raise RuntimeError(f"{name} failed with exit code {child.returncode}:\n{output[-4000:]}")
    # Linux gives ru_maxrss in KiB
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, output, child.returncode)


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
