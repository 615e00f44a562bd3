"""What the benchmark scripts share: timing a child process, a row of figures, verdicts, the table."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
    tree_rss: int = 0  # bytes: the highest sum of the RSS of the child and all its descendants, sampled


def tree_rss(pid: int) -> int:
    """Sum the resident memory of a process and every descendant it has now (0 once it is gone)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status", encoding="ascii", errors="replace") as status:
                total += next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):  # a child started by any thread
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as children:
                    pending += [int(child) for child in children.read().split()]
        except (OSError, ValueError):
            continue  # gone between two reads
    return total


class _TreeSampler(threading.Thread):
    """Sample the RSS of a process tree every few milliseconds; keep the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, tree_rss(self.pid))


def run_child(args: list[str], folder: Path, name: str, ok_codes: tuple[int, ...] = (0,)) -> Run:
    """Run a child process to its end in folder; measure its wall time and (wait4) its own CPU time and peak RSS."""
    log = folder / f"{name}.log"
    began = time.perf_counter()
    with log.open("wb") as out:
        child = subprocess.Popen(args, cwd=folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # wait4 gives the largest single process of the tree; worker processes run beside their parent, so
        # what the machine must hold is their sum, sampled
        sampler = _TreeSampler(child.pid)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        sampler.done.set()
        sampler.join()
    seconds = time.perf_counter() - began
    child.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    if child.returncode not in ok_codes:
        raise RuntimeError(f"{name} failed with exit code {child.returncode}:\n{output[-4000:]}")
    # Linux gives ru_maxrss in KiB
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, output, child.returncode,
               max(sampler.peak, usage.ru_maxrss * 1024))


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


@contextlib.contextmanager
def work_folder(prefix: str, keep: bool, parent: str | None = None) -> Iterator[Path]:
    """A temporary folder for a benchmark's files: removed at the end, or kept (--keep) and its path printed."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        if keep:
            print(f"kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def stopped(error: BaseException) -> int:
    """Say why a benchmark stopped before its table; the exit status for it."""
    print(f"benchmark stopped: {error}", file=sys.stderr)
    return 1
