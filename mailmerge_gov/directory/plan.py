"""Make the consolidation plan: read sources, map units, resolve identities, assign addresses."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import hashlib
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from mailmerge_gov.config import Config, Source
from mailmerge_gov.directory.addressing import Assignment, Candidate, assign_addresses, held_addresses
from mailmerge_gov.directory.identity import Resolution, is_role, resolve_identities
from mailmerge_gov.directory.model import Alias, Issue, PlannedPerson, SourceRecord, Structure, UnitMapping
from mailmerge_gov.directory.sources import RecordRows, SourceRead, read_source
from mailmerge_gov.directory.structure import load_structure, map_unit
from mailmerge_gov.store import AddressRow, Store, open_store
from mailmerge_gov.vietnamese import NameParts, split_name


class PlanError(Exception):
    """A plan cannot be made; the message says what to fix."""


@dataclass(frozen=True)
class Plan:
    """A plan as stored: who gets which address in which unit, and what needs review."""

    id: int
    sources_digest: str
    people: tuple[PlannedPerson, ...]
    issues: tuple[Issue, ...]
    summary: dict[str, Any]
    structure: Structure
    groups: tuple[SourceRecord, ...] = ()

    @property
    def blocking(self) -> tuple[Issue, ...]:
        """The issues that stop apply."""
        return tuple(issue for issue in self.issues if issue.blocking)


# Issue kinds, in the order the report lists them.
ISSUE_KINDS = {
    "suggestion": "Possibly the same official: decide with `directory review`",
    "conflict": "A decision contradicts the sources",
    "unit-needs-review": "Old unit marked 'needs review' in the mapping file",
    "unit-unmapped": "Old unit missing from the mapping file",
    "no-unit": "Account without a unit",
    "disabled": "Disabled account: not carried over",
    "role": "Role mailbox",
    "collision": "Address taken: a later pattern or a number was used",
    "source-warning": "Warning from a source",
}


# Sources whose files add up to this many bytes (or any LDAP source) are read by worker processes,
# one source each and as many at once as there are cores: reading is a third of a large plan's time.
PARALLEL_BYTES = 16 * 1024 * 1024


def read_sources(config: Config, store: Store, parallel_bytes: int = PARALLEL_BYTES) -> tuple[dict[str, Any], str]:
    """Read every source into the store; return the reads and the digest of all inputs."""
    sources = config.sources
    workers = min(len(sources), os.cpu_count() or 1)
    if workers > 1 and _worth_parallel(sources, parallel_bytes):
        done = _read_in_workers(sources, store.path, workers)
    else:
        done = {source.name: _read_into(source, store) for source in sources}
    reads = {source.name: done[source.name][0] for source in sources}  # in the config's order, as read serially
    return reads, inputs_digest(config, {name: digest for name, (_, digest) in done.items()})


def _worth_parallel(sources: Sequence[Source], parallel_bytes: int) -> bool:
    """Tell whether the sources are big enough to be worth a process each (small ones: starting it costs more)."""
    # a server's size is unknown, and its network waits overlap as well
    return any(s.directory.kind == "ldap" for s in sources) or sum(map(_size, sources)) >= parallel_bytes


def _read_into(source: Source, store: Store) -> tuple[SourceRead, str]:
    """Read one source into the store; return the read (people without their raw attributes) and its digest."""
    read = read_source(source)
    rows = RecordRows(read.records)  # encoded once, for the store and the digest
    store.save_source_records(source.name, rows, rows.hexdigest)
    # The raw attributes of people are history for the store, which has them now; a plan never reads them
    # (a group's description it does). Left out, they are half of what a worker hands back and a quarter of
    # a large plan's memory.
    return SourceRead(tuple(map(_without_raw, read.records)), read.warnings), rows.hexdigest()


def _without_raw(record: SourceRecord) -> SourceRecord:
    """A person's record less its raw attributes; a group's as it is."""
    if record.kind != "person" or not record.raw:
        return record
    # a copy of the instance's fields with one changed: what dataclasses.replace does, without running
    # __init__ again (a third of a second for 100,000 records)
    lean = object.__new__(SourceRecord)
    lean.__dict__.update(record.__dict__, raw=())
    return lean


def _read_in_worker(source: Source, state_file: Path) -> tuple[SourceRead, str]:
    """_read_into in a worker process, with a connection of its own to the state file."""
    with collector_paused(), open_store(state_file) as store:
        return _read_into(source, store)


def _read_in_workers(sources: Sequence[Source], state_file: Path, workers: int) -> dict[str, tuple[SourceRead, str]]:
    """Read the sources in worker processes; each stores its own records (SQLite serialises the writes)."""
    # spawn, not fork: a forked child would inherit the parent's open SQLite connection, and SQLite forbids
    # using its locks' state across fork(). Not forkserver either: its server would stay, holding memory,
    # until the plan ends.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        # the biggest first: the last source to finish sets the time
        futures = {source.name: pool.submit(_read_in_worker, source, state_file)
                   for source in sorted(sources, key=_size, reverse=True)}
        try:
            return {name: future.result() for name, future in futures.items()}
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise


def _size(source: Source) -> int:
    """The bytes of a source's files (0 for LDAP)."""
    total = 0
    for path in (source.directory.path, source.directory.hr_csv):
        with contextlib.suppress(OSError):
            total += path.stat().st_size if path is not None else 0
    return total


def inputs_digest(config: Config, source_digests: dict[str, str]) -> str:
    """Digest of everything a plan is made from: sources, mapping file, and the policy in the config."""
    digest = hashlib.sha256()
    # The parts of the configuration that change what the plan says: a changed pattern, kept
    # source or transition end must send the administrator back to plan and review.
    policy = (config.target.mail_domain, config.target.base_dn, config.target.code, config.target.name,
              config.addressing, config.transition_ends.isoformat(),
              tuple((s.name, s.code, s.domains, s.directory.preset, s.directory.attributes) for s in config.sources),
              config.directory.privileged_groups)
    digest.update(repr(policy).encode())
    for name in sorted(source_digests):
        digest.update(f"{name}\0{source_digests[name]}\n".encode())
    structure = config.directory.structure
    if structure is not None:
        digest.update(b"structure\0" + hashlib.sha256(structure.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a block that builds a plan's worth of objects."""
    # A plan builds millions of small objects that all live until it ends: the cyclic garbage
    # collector would walk them again and again for nothing (12 of 52 s at 100,000 officials).
    # They hold no reference cycles, so reference counting frees them all the same.
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def make_plan(config: Config, store: Store) -> Plan:
    """Make a new plan from the sources and store it; earlier decisions and applies are honoured."""
    with collector_paused():
        return _make_plan(config, store)


def _make_plan(config: Config, store: Store) -> Plan:
    """make_plan without the garbage collector's pause."""
    if config.directory.structure is None:
        raise PlanError(f"{config.path}: [directory] structure is not set: name the unit mapping file "
                        "(mailmerge-gov directory draft-structure drafts one)")
    reads, digest = read_sources(config, store)
    structure = load_structure(config.directory.structure, config)
    units = _Units(structure)
    records = [record for read in reads.values() for record in read.records]
    resolution = resolve_identities(records, store.identity_links(), store.decisions(),
                                    config.addressing.reserved, store.new_identity,
                                    source_order=[source.name for source in config.sources],
                                    known_keys=store.identity_keys(), new_unit=units.new_code)
    store.link_records({r.ref: identity for identity, rs in resolution.identities.items() for r in rs})
    store.save_identity_keys({key: identity for identity, keys in resolution.keys.items() for key in keys})

    order = {source.name: index for index, source in enumerate(config.sources)}
    keep = set(config.addressing.keep_addresses_of)
    issues: list[Issue] = []
    drafts = {identity: _draft(identity, rs, config, order, keep)
              for identity, rs in resolution.identities.items()}
    assignments = _assign(config, store, drafts, resolution)
    valid_until = config.transition_ends.isoformat()
    people = []
    for identity in sorted(drafts):
        draft = drafts[identity]
        unit_code, unit_issues = _unit(units, draft)
        issues.extend(unit_issues)
        assignment = assignments.get(identity)
        address = assignment.address if assignment else ""
        aliases = tuple(
            Alias(a, source, None if a.endswith("@" + config.target.mail_domain) else valid_until)
            for a, source in _old_addresses(draft.records) if a != address
        )
        old_units = tuple((r.source, r.unit or "", units.old_code(r)) for r in draft.records)
        people.append(PlannedPerson(**draft.fields, address=address, kept=bool(assignment and assignment.kept),
                                    unit_code=unit_code, aliases=aliases, old_units=old_units))
        issues.extend(_person_issues(draft, assignment))
    issues = _resolution_issues(resolution) + _one_per_unit(issues)
    for read in reads.values():
        issues.extend(Issue("source-warning", warning, False, {}) for warning in read.warnings)
    _save_addresses(store, people)
    groups = tuple(r for r in records if r.kind == "group")
    summary = _summary(config, reads, people, issues, structure)
    plan_id = store.save_plan(digest, summary, [(p.identity, _person_json(p)) for p in people],
                              [(i.kind, i.subject, i.blocking, i.detail) for i in issues])
    store.audit("directory-plan", f"plan:{plan_id}", after=summary)
    return Plan(plan_id, digest, tuple(people), tuple(issues), summary, structure, groups)


@dataclass(frozen=True)
class _Draft:
    """An identity before it has an address: its records, the record that names it, its person."""

    records: tuple[SourceRecord, ...]
    naming: SourceRecord
    parts: NameParts  # of the naming record's name
    # The PlannedPerson's fields but the address and unit, which come later: the person is built
    # once, when they are known (dataclasses.replace of 100,000 people was half a second).
    fields: dict[str, Any]
    keep: str | None

    @property
    def kind(self) -> str:
        """"person" or "role"."""
        return self.fields["kind"]

    @property
    def disabled(self) -> bool:
        """Whether every record of the identity is disabled."""
        return self.fields["disabled"]

    @property
    def full_name(self) -> str:
        """The name the identity is known by."""
        return self.fields["full_name"]

    @property
    def refs(self) -> tuple[str, ...]:
        """The refs of the identity's records, naming record first."""
        return self.fields["records"]


def _draft(identity: int, records: Sequence[SourceRecord], config: Config, order: dict[str, int],
           keep: set[str]) -> _Draft:
    """Pick the record that names an identity and build its person without an address yet."""
    # The surviving unit's record first (it is what the official is known by), then enabled
    # records before disabled ones, then the config's source order.
    ranked = sorted(records, key=lambda r: (r.source not in keep, r.disabled, order[r.source], r.ref))
    naming = ranked[0]
    parts = split_name(naming.full_name)
    domain = "@" + config.target.mail_domain
    kept = next((r.mail for r in ranked if r.source in keep and r.mail and r.mail.endswith(domain)), None)
    role = any(is_role(r, config.addressing.reserved) for r in records)
    fields = dict(
        identity=identity, kind="role" if role else "person", full_name=parts.full, family=parts.family,
        middle=parts.middle, given=parts.given,
        title=next((r.title for r in ranked if r.title), None),
        phones=_merged(r.phones for r in ranked), mobiles=_merged(r.mobiles for r in ranked),
        disabled=all(r.disabled for r in records), records=tuple(r.ref for r in ranked),
        groups=_merged(tuple(f"{r.source}:{g}" for g in r.member_of) for r in ranked),
        mailboxes=tuple((r.source, r.mail) for r in ranked if r.mail),
    )
    return _Draft(tuple(ranked), naming, parts, fields, kept)


def _merged(groups: Any) -> tuple[str, ...]:
    """Concatenate tuples of strings without repeats, keeping the first order."""
    seen: dict[str, None] = {}
    for values in groups:
        for value in values:
            seen.setdefault(value, None)
    return tuple(seen)


def _old_addresses(records: Sequence[SourceRecord]) -> list[tuple[str, str]]:
    """Every address of an identity's records with its source, first owner winning."""
    seen: dict[str, str] = {}
    for record in records:
        for address in record.addresses:
            seen.setdefault(address, record.source)
    return sorted(seen.items())


def _assign(config: Config, store: Store, drafts: dict[int, _Draft], resolution: Resolution) -> dict[int, Assignment]:
    """Assign addresses to every identity that is carried over (not disabled)."""
    rows = store.addresses()
    owners = [(a, identity) for identity, d in drafts.items() for r in d.records for a in r.addresses]
    owners += [(row.address, row.identity_id) for row in rows if row.state != "planned"]
    official = {row.identity_id: (row.address, row.state) for row in rows
                if row.role == "official" and row.state == "applied"}
    candidates = [
        Candidate(identity=identity, kind=d.kind, parts=d.parts,
                  source=d.naming.source, own_addresses=tuple(a for r in d.records for a in r.addresses),
                  keep=d.keep)
        for identity, d in drafts.items() if not d.disabled
    ]
    return assign_addresses(candidates, config, held_addresses(owners), official)


class _Units:
    """map_unit for one plan, once per (source, old unit): a plan asks for each a thousand times."""

    def __init__(self, structure: Structure) -> None:
        self.structure = structure
        self.found: dict[tuple[str, str], UnitMapping | None] = {}

    def mapping(self, record: SourceRecord) -> UnitMapping | None:
        """Return the mapping line of a record's old unit, or None."""
        if not record.unit:
            return None
        key = (record.source, record.unit)
        if key not in self.found:
            self.found[key] = map_unit(self.structure, record.source, record.unit)
        return self.found[key]

    def new_code(self, record: SourceRecord) -> str | None:
        """Return the code of the new unit a record's old unit maps to, when it is settled."""
        mapping = self.mapping(record)
        return mapping.new_code if mapping is not None and mapping.status == "ok" else None

    def old_code(self, record: SourceRecord) -> str | None:
        """Return the official code of a record's old unit, when the mapping file gives one."""
        mapping = self.mapping(record)
        return mapping.old_code if mapping else None


def _unit(units: _Units, draft: _Draft) -> tuple[str | None, list[Issue]]:
    """Map an identity's old unit to a new unit code, with the issue if it cannot be.

    The unit comes from the first record (in the naming order) that has one: an official
    merged from a record without a unit and one with a unit is not left without one.
    Disabled accounts are not carried over, so their units raise no issue.
    """
    record = next((r for r in draft.records if r.unit), draft.naming)
    subject = f"{record.ref} ({draft.full_name})"
    if draft.disabled:
        mapping = units.mapping(record)
        return (mapping.new_code if mapping else None), []
    if record.unit is None:
        return None, [Issue("no-unit", subject, False, {"source": record.source})]
    mapping = units.mapping(record)
    if mapping is None:
        return None, [Issue("unit-unmapped", f"{record.source}: {record.unit}", True,
                            {"source": record.source, "old_unit": record.unit, "record": record.ref})]
    if mapping.status != "ok" or mapping.new_code is None:
        return mapping.new_code, [Issue("unit-needs-review", f"{record.source}: {record.unit}", True,
                                        {"source": record.source, "old_unit": record.unit, "line": mapping.line,
                                         "record": record.ref})]
    return mapping.new_code, []


def _one_per_unit(issues: list[Issue]) -> list[Issue]:
    """Report an unmapped or to-be-reviewed old unit once, with every official it concerns."""
    merged: dict[tuple[str, str], Issue] = {}
    out: list[Issue] = []
    for issue in issues:
        if issue.kind not in ("unit-unmapped", "unit-needs-review"):
            out.append(issue)
            continue
        key = (issue.kind, issue.subject)
        if key not in merged:
            detail = {k: v for k, v in issue.detail.items() if k != "record"}
            merged[key] = Issue(issue.kind, issue.subject, issue.blocking, {**detail, "records": []})
            out.append(merged[key])
        merged[key].detail["records"].append(issue.detail["record"])
    return out


def _person_issues(draft: _Draft, assignment: Assignment | None) -> list[Issue]:
    """Report disabled accounts, role mailboxes and collisions of one identity."""
    subject = f"{draft.full_name} ({', '.join(draft.refs)})"
    issues = []
    if draft.disabled:
        issues.append(Issue("disabled", subject, False, {"records": list(draft.refs)}))
    if draft.kind == "role" and assignment:
        issues.append(Issue("role", subject, False, {"address": assignment.address}))
    if assignment and assignment.taken:
        issues.append(Issue("collision", subject, False,
                            {"address": assignment.address, "taken": list(assignment.taken), "how": assignment.how}))
    return issues


def _resolution_issues(resolution: Resolution) -> list[Issue]:
    """Turn open suggestions and conflicting decisions into blocking issues."""
    issues = [Issue("suggestion", f"{s.ref_a} | {s.ref_b}", True, {"a": s.ref_a, "b": s.ref_b, "reason": s.reason})
              for s in resolution.suggestions]
    issues += [Issue("conflict", text, True, {}) for text in resolution.conflicts]
    return issues


def _save_addresses(store: Store, people: Sequence[PlannedPerson]) -> None:
    """Store the plan's official addresses and the old addresses kept as aliases."""
    rows = []
    for person in people:
        if person.address:
            rows.append(AddressRow(person.address, person.identity, "official", "planned"))
        rows += [AddressRow(a.address, person.identity, "alias", "planned", a.source, a.valid_until)
                 for a in person.aliases]
    # An address another identity holds for good (applied) is never touched: the assignment
    # already kept clear of those, so save_addresses' refusal would mean a bug, not bad input.
    store.drop_planned_addresses({row.address for row in rows})
    store.save_addresses(rows)


def _summary(config: Config, reads: dict[str, Any], people: Sequence[PlannedPerson], issues: Sequence[Issue],
             structure: Structure) -> dict[str, Any]:
    """Count what a reviewer wants to see first."""
    carried = [p for p in people if not p.disabled]
    return {
        "sources": {name: len(read.records) for name, read in reads.items()},
        "identities": len(people),
        "carried_over": len(carried),
        "kept_addresses": sum(p.kept for p in carried),
        "new_addresses": sum(not p.kept for p in carried if p.address),
        "aliases": sum(len(p.aliases) for p in carried),
        "disabled": len(people) - len(carried),
        "roles": sum(p.kind == "role" for p in carried),
        "units": len(structure.units),
        "issues": {kind: sum(i.kind == kind for i in issues) for kind in ISSUE_KINDS},
        "blocking": sum(i.blocking for i in issues),
        "transition_ends": config.transition_ends.isoformat(),
    }


_PERSON_FIELDS = tuple(field.name for field in dataclasses.fields(PlannedPerson))


def _person_json(person: PlannedPerson) -> dict[str, Any]:
    """Serialise a planned person for the store."""
    # By hand, one level deep: dataclasses.asdict deep-copies every tuple and string (4 s of a
    # 100,000-official plan); json writes tuples as lists all the same.
    data = {name: getattr(person, name) for name in _PERSON_FIELDS}
    data["aliases"] = [{"address": a.address, "source": a.source, "valid_until": a.valid_until}
                       for a in person.aliases]
    return data


def person_from_json(data: dict[str, Any]) -> PlannedPerson:
    """Rebuild a planned person from the store."""
    values = dict(data)
    values["aliases"] = tuple(Alias(**a) for a in data["aliases"])
    values["old_units"] = tuple(tuple(u) for u in data["old_units"])
    for key in ("phones", "mobiles", "records", "groups"):
        values[key] = tuple(data[key])
    values["mailboxes"] = tuple(tuple(m) for m in data.get("mailboxes", ()))
    return PlannedPerson(**values)


def load_plan(config: Config, store: Store, plan_id: int | None = None) -> Plan:
    """Load a stored plan (the newest by default) with the current unit mapping file."""
    header = store.plan(plan_id) if plan_id is not None else store.latest_plan()
    if header is None:
        raise PlanError("no plan yet: run `mailmerge-gov directory plan` first" if plan_id is None
                        else f"there is no plan {plan_id}")
    if config.directory.structure is None:
        raise PlanError(f"{config.path}: [directory] structure is not set")
    people = tuple(person_from_json(data) for data in store.plan_people(header.id))
    issues = tuple(store.plan_issues(header.id))
    groups = tuple(r for r in store.source_records() if r.kind == "group")
    return Plan(header.id, header.sources_digest, people, issues, header.summary,
                load_structure(config.directory.structure, config), groups)
