"""Apply a reviewed plan to the target directory, refusing what a person has not seen."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from mailmerge_gov.config import Config
from mailmerge_gov.directory.access import Membership, group_codes, memberships
from mailmerge_gov.directory.apply import ApplyResult, Entry, ManagedScope, apply_entries
from mailmerge_gov.directory.entries import desired_entries, groups_dn, people_dn, units_dn
from mailmerge_gov.directory.plan import Plan, PlanError, inputs_digest, load_plan
from mailmerge_gov.directory.sources import read_source
from mailmerge_gov.store import Store


def check_plan_is_current(config: Config, plan: Plan) -> None:
    """Refuse a plan whose sources or unit mapping changed since it was made."""
    digests = {source.name: read_source(source).digest for source in config.sources}
    if inputs_digest(config, digests) != plan.sources_digest:
        raise PlanError(f"the sources, the mapping file or the consolidation policy changed since plan {plan.id} "
                        "was made: "
                        "run `mailmerge-gov directory plan` again and review it (or --force)")


def check_plan_is_reviewed(plan: Plan) -> None:
    """Refuse a plan with blocking review items."""
    if plan.blocking:
        counts = Counter(issue.kind for issue in plan.blocking)
        listed = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
        raise PlanError(f"plan {plan.id} has {len(plan.blocking)} unresolved review items ({listed}): "
                        "resolve them (directory review, the unit mapping file) and plan again, or --force")


@dataclass(frozen=True)
class PlanApplied:
    """What applying a plan did, and the privileged memberships it left out for want of a sign-off."""

    plan: Plan
    result: ApplyResult
    waiting: tuple[Membership, ...]


def plan_entries(plan: Plan, config: Config, rows: Sequence[Membership], today: dt.date,
                 include_base: bool) -> list[Entry]:
    """The entries a plan gives the new directory: units, officials and groups with their members."""
    return desired_entries(plan.people, plan.structure, config, today, include_base=include_base,
                           memberships=rows, groups=group_codes(plan.groups, plan.structure))


def apply_plan(config: Config, store: Store, *, dry_run: bool = False, force: bool = False,
               max_disables: int | None = None, today: dt.date | None = None) -> PlanApplied:
    """Write the newest plan into the target directory (see apply_entries for the guarantees).

    Privileged memberships without a sign-off are never written, --force or not.
    """
    target = config.target.directory
    if target is None:
        raise PlanError(f"{config.path}: [target.directory] is not set: name the new directory "
                        "(ldap_url or an ldif file)")
    plan = load_plan(config, store)
    if not force:
        check_plan_is_current(config, plan)
        check_plan_is_reviewed(plan)
    rows = memberships(plan.people, plan.groups, plan.structure, config, store.signoffs())
    entries = plan_entries(plan, config, rows, today or dt.date.today(), include_base=target.kind == "ldif")
    base = config.target.base_dn
    managed = ManagedScope(subtrees=(people_dn(base), units_dn(base), groups_dn(base)))
    result = apply_entries(
        store, target, entries, base_dn=base, plan_id=plan.id, managed=managed,
        max_disables=config.directory.max_disables if max_disables is None else max_disables,
        dry_run=dry_run, backup_dir=config.state_file.parent / "backups",
        identities=[p.identity for p in plan.people if p.address and not p.disabled],
    )
    return PlanApplied(plan, result, tuple(m for m in rows if m.new_group and m.privileged and not m.carried))
