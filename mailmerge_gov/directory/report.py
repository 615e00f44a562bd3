"""The plan report a person reviews: an HTML page and CSV files of the same rows."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jinja2

from mailmerge_gov.config import Config
from mailmerge_gov.directory.access import Membership, group_codes
from mailmerge_gov.directory.model import NewUnit, Structure
from mailmerge_gov.directory.plan import ISSUE_KINDS, Plan

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("mailmerge_gov", "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


@dataclass(frozen=True)
class TreeNode:
    """A unit with the number of officials in it and in its sub-units, and its children."""

    unit: NewUnit
    members: int
    children: tuple[TreeNode, ...]


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


def people_csv(plan: Plan) -> str:
    """One row per identity: who, where, which address, which old ones, from which records."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["identity", "full_name", "kind", "status", "unit_code", "unit_name", "address", "kept",
                     "old_addresses", "records"])
    names = {unit.code: unit.name for unit in plan.structure.units}
    for person in plan.people:
        writer.writerow([person.identity, person.full_name, person.kind, "disabled" if person.disabled else "active",
                         person.unit_code or "", names.get(person.unit_code or "", ""), person.address,
                         "yes" if person.kept else "no", " ".join(a.address for a in person.aliases),
                         " ".join(person.records)])
    return out.getvalue()


def issues_csv(plan: Plan) -> str:
    """One row per review item."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["kind", "blocking", "subject", "detail"])
    for issue in plan.issues:
        detail = "; ".join(f"{k}: {v if isinstance(v, str) else ', '.join(map(str, v)) if isinstance(v, list) else v}"
                           for k, v in issue.detail.items())
        writer.writerow([issue.kind, "yes" if issue.blocking else "no", issue.subject, detail])
    return out.getvalue()


def write_report(plan: Plan, config: Config, folder: Path, created_at: str, actor: str) -> ReportFiles:
    """Write the HTML page and the two CSV files of a plan into folder."""
    counts: dict[str, int] = defaultdict(int)
    for person in plan.people:
        if not person.disabled and person.unit_code:
            counts[person.unit_code] += 1
    issues_by_kind: dict[str, list] = defaultdict(list)
    for issue in plan.issues:
        issues_by_kind[issue.kind].append(issue)
    html = _ENV.get_template("plan.html").render(
        plan=plan, config=config, summary=plan.summary, created_at=created_at, actor=actor,
        issue_kinds=ISSUE_KINDS, issues_by_kind=issues_by_kind,
        tree_roots=unit_tree(plan.structure, counts, exclude=set(group_codes(plan.groups, plan.structure))),
        people=[p for p in plan.people if not p.disabled],
        unit_names={unit.code: unit.name for unit in plan.structure.units},
    )
    files = ReportFiles(folder / f"plan-{plan.id}.html", folder / f"plan-{plan.id}-people.csv",
                        folder / f"plan-{plan.id}-issues.csv")
    _write_files(folder, ((files.html, html), (files.people_csv, people_csv(plan)), (files.issues_csv, issues_csv(plan))))
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
    html = _ENV.get_template("access.html").render(plan=plan, rows=rows, config=config, config_path=config_path)
    paths = (folder / f"access-review-{plan.id}.html", folder / f"access-review-{plan.id}.csv")
    _write_files(folder, ((paths[0], html), (paths[1], access_csv(rows))))
    return paths


def _write_files(folder: Path, files: Sequence[tuple[Path, str]]) -> None:
    """Write report files atomically (a reader never sees half a report)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in files:
        temporary = path.with_name(path.name + ".tmp")
        # Reports name officials with their old addresses and units: owner-readable only.
        temporary.touch(mode=0o600)
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
