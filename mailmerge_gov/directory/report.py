"""The plan report a person reviews: an HTML page and CSV files of the same rows."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mailmerge_gov.config import Config
from mailmerge_gov.directory.access import Membership, group_codes
from mailmerge_gov.directory.model import Issue, NewUnit, Structure
from mailmerge_gov.directory.plan import ISSUE_KINDS, Plan, collector_paused
from mailmerge_gov.reportfiles import TEMPLATES, write_private_files

@dataclass(frozen=True)
class TreeNode:
    """A unit with the number of officials in it and in its sub-units, and its children."""

    unit: NewUnit
    members: int
    children: tuple[TreeNode, ...]


@dataclass(frozen=True)
class IssueSection:
    """The review items of one kind as the page lists them: all when they block apply, else a sample."""

    kind: str
    title: str
    count: int
    blocking: bool
    rows: tuple[tuple[str, str], ...]  # (subject, detail)


@dataclass(frozen=True)
class ReportFiles:
    """Where the report of a plan was written."""

    html: Path
    people_csv: Path
    issues_csv: Path


def unit_tree(structure: Structure, counts: dict[str, int], exclude: set[str] = frozenset()) -> tuple[TreeNode, ...]:
    """Build the organisation chart with member counts (a unit counts its sub-units' members)."""
    children: dict[str | None, list[NewUnit]] = defaultdict(list)
    units = [unit for unit in structure.units if unit.code not in exclude]
    codes = {unit.code for unit in units}
    for unit in units:
        children[unit.parent_code if unit.parent_code in codes else None].append(unit)

    def build(unit: NewUnit) -> TreeNode:
        kids = tuple(build(child) for child in sorted(children[unit.code], key=lambda u: u.code))
        return TreeNode(unit, counts.get(unit.code, 0) + sum(kid.members for kid in kids), kids)

    return tuple(build(unit) for unit in sorted(children[None], key=lambda u: u.code))


# How many items of a non-blocking kind the HTML page shows; the CSV has them all. At 100,000
# officials there are tens of thousands of collisions: a page of them helps nobody, a sample does.
SHOWN_PER_KIND = 200
# How many values of a list the detail of an issue names ("records" of an old unit may run into
# thousands: a cell that size breaks spreadsheets and csv readers' field limit).
LISTED_VALUES = 50


def people_csv(plan: Plan) -> str:
    """One row per identity: who, where, which address, which old ones, from which records and units."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["identity", "full_name", "kind", "status", "unit_code", "unit_name", "address", "kept",
                     "old_addresses", "records", "old_units"])
    names = {unit.code: unit.name for unit in plan.structure.units}
    for person in plan.people:
        writer.writerow([person.identity, person.full_name, person.kind, "disabled" if person.disabled else "active",
                         person.unit_code or "", names.get(person.unit_code or "", ""), person.address,
                         "yes" if person.kept else "no", " ".join(a.address for a in person.aliases),
                         " ".join(person.records),
                         " | ".join(f"{source}: {unit}" for source, unit, _ in person.old_units if unit)])
    return out.getvalue()


def issue_detail(issue: Issue) -> str:
    """The detail of an issue as one line of text; long lists name their first values and their count."""
    def value(item: Any) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, (list, tuple)):
            shown = ", ".join(map(str, item[:LISTED_VALUES]))
            return shown if len(item) <= LISTED_VALUES else f"{shown} … ({len(item)} in all)"
        return str(item)

    return "; ".join(f"{key}: {value(item)}" for key, item in issue.detail.items())


def issues_csv(plan: Plan) -> str:
    """One row per review item."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["kind", "blocking", "subject", "detail"])
    for issue in plan.issues:
        writer.writerow([issue.kind, "yes" if issue.blocking else "no", issue.subject, issue_detail(issue)])
    return out.getvalue()


def write_report(plan: Plan, config: Config, folder: Path, created_at: str, actor: str,
                 shown_per_kind: int = SHOWN_PER_KIND) -> ReportFiles:
    """Write the HTML page and the two CSV files of a plan into folder."""
    with collector_paused():
        return _write_report(plan, config, folder, created_at, actor, shown_per_kind)


def _write_report(plan: Plan, config: Config, folder: Path, created_at: str, actor: str,
                  shown_per_kind: int) -> ReportFiles:
    """write_report without the garbage collector's pause."""
    files = ReportFiles(folder / f"plan-{plan.id}.html", folder / f"plan-{plan.id}-people.csv",
                        folder / f"plan-{plan.id}-issues.csv")
    counts: dict[str, int] = defaultdict(int)
    for person in plan.people:
        if not person.disabled and person.unit_code:
            counts[person.unit_code] += 1
    issues_by_kind: dict[str, list[Issue]] = defaultdict(list)
    for issue in plan.issues:
        issues_by_kind[issue.kind].append(issue)
    sections = [IssueSection(kind, title, len(items), items[0].blocking,
                             tuple((issue.subject, issue_detail(issue))
                                   for issue in (items if items[0].blocking else items[:shown_per_kind])))
                for kind, title in ISSUE_KINDS.items() if (items := issues_by_kind.get(kind))]
    names = {unit.code: unit.name for unit in plan.structure.units}
    # Every changed address (the reviewer's work); the kept ones are only counted, and are in the CSV.
    # Plain tuples of strings: the page of a 100,000-official plan has some 65,000 of these rows.
    changed = [(p.full_name, p.kind == "role", names.get(p.unit_code or "", "—"), p.address,
                ", ".join(a.address for a in p.aliases), ", ".join(p.records))
               for p in plan.people if not p.disabled and not p.kept]
    html = TEMPLATES.get_template("plan.html").render(
        plan=plan, config=config, summary=plan.summary, created_at=created_at, actor=actor, sections=sections,
        files=files, changed=changed,
        tree_roots=unit_tree(plan.structure, counts, exclude=set(group_codes(plan.groups, plan.structure))),
    )
    write_private_files(folder, ((files.html, html), (files.people_csv, people_csv(plan)), (files.issues_csv, issues_csv(plan))))
    return files


def access_csv(rows: Sequence[Membership]) -> str:
    """One row per membership, with what happens to it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", "identity", "person", "address", "old_group", "old_group_name", "new_group",
                     "new_group_name", "privileged", "signed_by", "status"])
    for m in rows:
        writer.writerow([m.number, m.identity, m.person, m.address, m.group, m.group_name, m.new_group or "",
                         m.new_group_name or "", "yes" if m.privileged else "no", m.signed_by or "", m.status])
    return out.getvalue()


def write_access_report(plan: Plan, rows: Sequence[Membership], config: Config, folder: Path,
                        config_path: str) -> tuple[Path, Path]:
    """Write the access review of a plan as HTML and CSV; return both paths."""
    html = TEMPLATES.get_template("access.html").render(plan=plan, rows=rows, config=config, config_path=config_path)
    paths = (folder / f"access-review-{plan.id}.html", folder / f"access-review-{plan.id}.csv")
    write_private_files(folder, ((paths[0], html), (paths[1], access_csv(rows))))
    return paths
