"""The migration report: per mailbox what was copied, skipped (with reasons) and verified; HTML and JSON."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mailmerge_gov.migration.protocol import ServerWaits
from mailmerge_gov.migration.sync import MailboxCheck, MailboxJob, MailboxOutcome
from mailmerge_gov.reportfiles import TEMPLATES, write_private_files
from mailmerge_gov.store import Store

@dataclass(frozen=True)
class FolderTotals:
    """What the evidence says of one source folder of a mailbox."""

    folder: str
    target_folder: str
    messages: int
    bytes: int
    skipped: int


@dataclass(frozen=True)
class ExportRow:
    """A calendar, contact or task folder written to a file by this run."""

    folder: str
    kind: str  # "calendar", "contacts", "tasks"
    file: str  # the file's path
    items: int
    failed: int  # items the server could not give


@dataclass(frozen=True)
class MailboxReport:
    """One mailbox in the report: totals from the evidence, this run's figures, verification."""

    source: str
    mailbox: str
    target_mailbox: str
    status: str
    error: str | None
    messages: int
    bytes: int
    seconds: float  # of the last run
    copied_this_run: int
    folders: tuple[FolderTotals, ...]
    skipped: tuple[tuple[str, str, str], ...]  # (folder, source key, reason)
    verified: bool | None  # None: not verified in this run
    missing: tuple[tuple[str, str], ...] = ()  # (source folder, source key) verify did not find
    altered: tuple[tuple[str, str], ...] = ()  # (source folder, source key) verify found only by fingerprint
    exports: tuple[ExportRow, ...] = ()
    throttled: tuple[ServerWaits, ...] = ()  # back-offs servers asked for while this run copied the mailbox

    @property
    def speed(self) -> float:
        """Messages per second of the last run."""
        return self.copied_this_run / self.seconds if self.seconds else 0.0


def mailbox_reports(store: Store, jobs: Sequence[MailboxJob], outcomes: Sequence[MailboxOutcome] = (),
                    checks: Sequence[MailboxCheck] = ()) -> list[MailboxReport]:
    """Gather the report rows of these jobs from the state store and this run's outcomes and checks."""
    results = {(r.source, r.mailbox): r for r in store.mailbox_results()}
    ran = {(o.job.source, o.job.mailbox): o for o in outcomes}
    checked = {(c.job.source, c.job.mailbox): c for c in checks}
    reports = []
    for job in jobs:
        key = (job.source, job.mailbox)
        evidence = store.message_evidence(job.source, job.mailbox)
        totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        for e in evidence:
            row = totals[(e.folder, e.target_folder)]
            if e.state == "copied":
                row[0] += 1
                row[1] += e.size
            elif e.state == "skipped":
                row[2] += 1
        result, outcome, check = results.get(key), ran.get(key), checked.get(key)
        status = outcome.status if outcome else result.status if result else "not run"
        error = outcome.error if outcome else result.error if result else None
        if check is not None and check.error:
            status, error = "failed", check.error
        elif check is not None and not check.ok:
            status = "missing messages"
        reports.append(MailboxReport(
            job.source, job.mailbox, job.target_mailbox, status, error,
            sum(v[0] for v in totals.values()), sum(v[1] for v in totals.values()),
            outcome.seconds if outcome else result.seconds if result else 0.0,
            outcome.copied if outcome else 0,
            tuple(FolderTotals(f, t, *v) for (f, t), v in sorted(totals.items())),
            tuple((e.folder, e.source_key, e.reason or "") for e in evidence if e.state == "skipped"),
            None if check is None else check.ok,
            tuple(m for f in check.folders for m in f.missing) if check is not None else (),
            tuple(m for f in check.folders for m in f.altered) if check is not None else (),
            tuple(ExportRow(e.folder, e.kind, str(e.path), e.items, e.failed) for e in outcome.exports)
            if outcome else (),
            outcome.throttled if outcome else ()))
    return reports


def server_waits(reports: Sequence[MailboxReport]) -> list[ServerWaits]:
    """The back-offs of every server, added up over the mailboxes of a run, by server."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for report in reports:
        for waits in report.throttled:
            totals[waits.server][0] += waits.waits
            totals[waits.server][1] += waits.seconds
    return [ServerWaits(server, int(n), round(seconds, 3)) for server, (n, seconds) in sorted(totals.items())]


def write_migration_report(reports: Sequence[MailboxReport], folder: Path, name: str, title: str) -> tuple[Path, Path]:
    """Write the report as HTML and JSON into folder; return both paths."""
    html = TEMPLATES.get_template("migration.html").render(
        reports=reports, title=title, servers=server_waits(reports),
        link=lambda path: Path(os.path.relpath(path, folder)).as_posix())  # export files beside the report
    data: list[dict[str, Any]] = [{**asdict(r), "speed": round(r.speed, 1)} for r in reports]
    paths = (folder / f"{name}.html", folder / f"{name}.json")
    write_private_files(folder, ((paths[0], html), (paths[1], json.dumps(data, ensure_ascii=False, indent=1) + "\n")))
    return paths
