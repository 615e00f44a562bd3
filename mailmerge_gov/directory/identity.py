"""One identity per official: exact keys first, then suggestions a person confirms."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from mailmerge_gov.directory.model import SourceRecord
from mailmerge_gov.vietnamese import fold

# RFC 2142 mailbox names (section 3-5) plus the ones every mail system has. They name roles,
# never people: they are not matched to people and never handed out by a pattern.
RFC2142_NAMES = frozenset({
    "info", "marketing", "sales", "support", "abuse", "noc", "security", "postmaster", "hostmaster",
    "usenet", "news", "webmaster", "www", "uucp", "ftp", "root", "mailer-daemon", "nobody",
})

# Vietnam's citizen identity number (CCCD) has 12 digits. Many agencies store it as the employee
# number, so a 12-digit employee number is compared with citizen IDs of other sources.
_CITIZEN_ID = re.compile(r"^\d{12}$")


@dataclass(frozen=True)
class Suggestion:
    """Two records that may be the same official; a person decides."""

    ref_a: str
    ref_b: str
    reason: str  # e.g. "same name and date of birth"


@dataclass(frozen=True)
class Resolution:
    """Records grouped into identities, with what a person still has to decide."""

    identities: dict[int, tuple[SourceRecord, ...]]
    suggestions: tuple[Suggestion, ...]
    conflicts: tuple[str, ...]  # decisions that the exact keys contradict


def is_role(record: SourceRecord, reserved: Iterable[str]) -> bool:
    """Tell whether a record is a role mailbox (vanthu@, postmaster@ …) rather than a person."""
    names = RFC2142_NAMES | {name.lower() for name in reserved}
    locals_ = {address.split("@", 1)[0] for address in record.addresses[:1]}
    if record.uid:
        locals_.add(record.uid.lower())
    return bool(locals_ & names)


def exact_keys(record: SourceRecord) -> set[str]:
    """Return the keys that identify an official for certain: IDs and addresses."""
    keys = {f"address:{address}" for address in record.addresses}
    if record.citizen_id:
        keys.add(f"citizen:{record.citizen_id.strip()}")
    if record.employee_id:
        value = record.employee_id.strip()
        # Employee numbers are only unique within one employer's HR system, except when they
        # are in fact citizen IDs.
        keys.add(f"citizen:{value}" if _CITIZEN_ID.match(value) else f"employee:{record.source}:{value}")
    return keys


class _Groups:
    """Union-find over record refs."""

    def __init__(self, refs: Iterable[str]) -> None:
        self.parent = {ref: ref for ref in refs}

    def find(self, ref: str) -> str:
        """Return the representative of ref's group."""
        root = ref
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[ref] != root:
            self.parent[ref], ref = root, self.parent[ref]
        return root

    def union(self, a: str, b: str) -> None:
        """Join the groups of a and b (the smaller ref stays representative: deterministic)."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            low, high = sorted((root_a, root_b))
            self.parent[high] = low


def resolve_identities(records: Sequence[SourceRecord], links: Mapping[str, int],
                       decisions: Mapping[tuple[str, str], str], reserved: Iterable[str],
                       new_id: Callable[[], int], source_order: Sequence[str] = ()) -> Resolution:
    """Group person records into identities, keeping the ids earlier runs gave them.

    New identities are numbered in source order (the config's order of [[sources]]), then by
    DN, so the surviving unit's officials come first and ids do not depend on source names.
    """
    people = sorted((r for r in records if r.kind == "person"), key=lambda r: r.ref)
    groups = _Groups(r.ref for r in people)
    different = {pair for pair, decision in decisions.items() if decision == "different"}
    by_key: dict[str, list[str]] = defaultdict(list)
    for record in people:
        for key in sorted(exact_keys(record)):
            by_key[key].append(record.ref)
    for key in sorted(by_key):
        refs = by_key[key]
        for other in refs[1:]:
            if tuple(sorted((refs[0], other))) not in different:
                groups.union(refs[0], other)
    known = {r.ref for r in people}
    for (a, b), decision in sorted(decisions.items()):
        if decision == "same" and a in known and b in known:
            groups.union(a, b)
    conflicts = tuple(
        f"{a} and {b} were decided to be different officials, but share an ID or address with each "
        "other's records; decide again or correct the source"
        for a, b in sorted(different) if a in known and b in known and groups.find(a) == groups.find(b)
    )
    members: dict[str, list[SourceRecord]] = defaultdict(list)
    for record in people:
        members[groups.find(record.ref)].append(record)
    rank = {name: index for index, name in enumerate(source_order)}
    identities = _number(members, links, new_id,
                         key=lambda root: (rank.get(root.split(":", 1)[0], len(rank)), root))
    reserved = tuple(reserved)
    suggestions = _suggest(people, groups, decisions, reserved)
    return Resolution(identities=identities, suggestions=suggestions, conflicts=conflicts)


def _number(members: Mapping[str, list[SourceRecord]], links: Mapping[str, int],
            new_id: Callable[[], int], key: Callable[[str], Any]) -> dict[int, tuple[SourceRecord, ...]]:
    """Give each group an identity id: the lowest id its records had, else a new one."""
    identities: dict[int, tuple[SourceRecord, ...]] = {}
    # Groups are served in a fixed order, so when an identity is split (after a "different"
    # decision) the first group keeps the id and the other gets a new one.
    for root in sorted(members, key=key):
        records = tuple(members[root])
        old = sorted({links[r.ref] for r in records if r.ref in links} - identities.keys())
        identities[old[0] if old else new_id()] = records
    return identities


def _phone_digits(phone: str) -> str:
    """Return the last nine digits of a phone number, so +84 and 0 prefixes compare equal."""
    digits = re.sub(r"\D", "", phone)
    return digits[-9:] if len(digits) >= 9 else digits


def _suggest(people: Sequence[SourceRecord], groups: _Groups, decisions: Mapping[tuple[str, str], str],
             reserved: tuple[str, ...]) -> tuple[Suggestion, ...]:
    """Pair records of different identities that share a folded name and one more fact."""
    by_name: dict[str, list[SourceRecord]] = defaultdict(list)
    for record in people:
        if not is_role(record, reserved):
            by_name[fold(record.full_name)].append(record)
    found: dict[tuple[str, str], Suggestion] = {}
    for name in sorted(by_name):
        candidates = by_name[name]
        for index, first in enumerate(candidates):
            for second in candidates[index + 1:]:
                pair = tuple(sorted((first.ref, second.ref)))
                if pair in decisions or groups.find(first.ref) == groups.find(second.ref):
                    continue
                reason = _shared_fact(first, second)
                if reason:
                    roots = tuple(sorted((groups.find(first.ref), groups.find(second.ref))))
                    # One suggestion per pair of identities is enough for a person to decide.
                    found.setdefault(roots, Suggestion(pair[0], pair[1], reason))
    return tuple(sorted(found.values(), key=lambda s: (s.ref_a, s.ref_b)))


def _shared_fact(a: SourceRecord, b: SourceRecord) -> str | None:
    """Say which fact besides the name two records share, if any."""
    if a.birth_date and a.birth_date == b.birth_date:
        return "same name and date of birth"
    phones_a = {_phone_digits(p) for p in a.phones + a.mobiles if p}
    phones_b = {_phone_digits(p) for p in b.phones + b.mobiles if p}
    if phones_a & phones_b - {""}:
        return "same name and phone number"
    # A title is shared by many; only across sources (an official who moved) is it a hint.
    if a.source != b.source and a.title and b.title and fold(a.title) == fold(b.title):
        return "same name and title, in different sources"
    return None
