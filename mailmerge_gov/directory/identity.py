"""One identity per official: exact keys first, then suggestions a person confirms."""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field
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
    keys: dict[int, frozenset[str]] = field(default_factory=dict)  # each identity's exact keys


def is_role(record: SourceRecord, reserved: Iterable[str]) -> bool:
    """Tell whether a record is a role mailbox (vanthu@, postmaster@ …) rather than a person."""
    names = _role_names(tuple(reserved))
    first = record.addresses[:1]  # the primary address, or the first alias of an entry without one
    if first and first[0].split("@", 1)[0] in names:
        return True
    return bool(record.uid) and record.uid.lower() in names


@functools.lru_cache(maxsize=8)
def _role_names(reserved: tuple[str, ...]) -> frozenset[str]:
    """Return the role names with the configured ones (asked once per record: built once)."""
    return RFC2142_NAMES | {name.lower() for name in reserved}


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
                       new_id: Callable[[], int], source_order: Sequence[str] = (),
                       known_keys: Mapping[str, int] | None = None,
                       new_unit: Callable[[SourceRecord], str | None] | None = None) -> Resolution:
    """Group person records into identities, keeping the ids earlier runs gave them.

    New identities are numbered in source order (the config's order of [[sources]]), then by
    DN, so the surviving unit's officials come first and ids do not depend on source names.
    `new_unit` gives the code of the new unit a record's old unit maps to (None: none); without
    it, titles are never a hint.
    """
    people = sorted((r for r in records if r.kind == "person"), key=lambda r: r.ref)
    groups = _Groups(r.ref for r in people)
    different = {pair for pair, decision in decisions.items() if decision == "different"}
    keys_of = {record.ref: exact_keys(record) for record in people}  # asked for again and again below
    by_key: dict[str, list[str]] = defaultdict(list)
    for record in people:
        for key in keys_of[record.ref]:
            by_key[key].append(record.ref)
    # No sorting needed: the groups that come out (and their smallest-ref representatives) do not depend
    # on the order of the unions.
    for refs in by_key.values():
        for other in refs[1:]:
            if not different or tuple(sorted((refs[0], other))) not in different:
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
    # A group is served by its first record in source order (then DN): a merged official's id
    # does not depend on which source's name sorts first.
    first = {root: min((rank.get(r.source, len(rank)), r.ref) for r in rs) for root, rs in members.items()}
    identities = _number(members, links, new_id, key=first.__getitem__, known_keys=known_keys or {},
                         keys_of=keys_of)
    reserved = tuple(reserved)
    # A "different" decision is about two officials, not two records: it silences every
    # suggestion between the identities those records ended up in.
    apart = {frozenset((groups.find(a), groups.find(b))) for a, b in different if a in known and b in known}
    suggestions = _suggest(people, groups, decisions, reserved, apart, new_unit or (lambda record: None))
    keys = {identity: frozenset(key for r in rs for key in keys_of[r.ref]) for identity, rs in identities.items()}
    return Resolution(identities=identities, suggestions=suggestions, conflicts=conflicts, keys=keys)


def _number(members: Mapping[str, list[SourceRecord]], links: Mapping[str, int],
            new_id: Callable[[], int], key: Callable[[str], Any],
            known_keys: Mapping[str, int], keys_of: Mapping[str, set[str]]) -> dict[int, tuple[SourceRecord, ...]]:
    """Give each group an identity id: the one its keys had, else the one its records had, else a new one.

    Keys (citizen IDs, employee numbers, addresses) come first: a DN changes when an entry moves
    to another OU, and a CSV row's ref when a row is inserted above it, but the keys stay. Were
    the ref trusted first, an applied address would follow a row number to another person.
    """
    identities: dict[int, tuple[SourceRecord, ...]] = {}
    # Groups are served in a fixed order, so when an identity is split (after a "different"
    # decision) the first group keeps the id and the other gets a new one.
    for root in sorted(members, key=key):
        records = tuple(members[root])
        # A membership test per id, not `set - identities.keys()`: that difference walks every key of the
        # dict for each group, which made numbering quadratic (35 s of a 100,000-official plan).
        old = sorted({identity for r in records for k in keys_of[r.ref]
                      if (identity := known_keys.get(k)) is not None and identity not in identities})
        if not old:
            old = sorted({identity for r in records if (identity := links.get(r.ref)) is not None
                          and identity not in identities})
        identities[old[0] if old else new_id()] = records
    return identities


_NOT_DIGIT = re.compile(r"\D")


def _phone_digits(phone: str) -> str:
    """Return the last nine digits of a phone number, so +84 and 0 prefixes compare equal."""
    digits = _NOT_DIGIT.sub("", phone)
    return digits[-9:] if len(digits) >= 9 else digits


def _suggest(people: Sequence[SourceRecord], groups: _Groups, decisions: Mapping[tuple[str, str], str],
             reserved: tuple[str, ...], apart: set[frozenset[str]],
             new_unit: Callable[[SourceRecord], str | None]) -> tuple[Suggestion, ...]:
    """Pair records of different identities that share a folded name and one more fact."""
    named: dict[str, list[SourceRecord]] = defaultdict(list)
    for record in people:
        if not is_role(record, reserved):
            named[fold(record.full_name)].append(record)
    # Only a name two records share can make a pair: the facts of the others are never compared.
    by_name = {name: [_facts(record, groups, new_unit(record)) for record in records]
               for name, records in named.items() if len(records) > 1}
    # A title is a hint only when it singles an official out: "Nguyễn Văn An, Chuyên viên" of Sở Y tế
    # is a hint when each source has one such official, none when a source has three (and at
    # 100,000 officials the common names and titles made 260,000 suggestions no one could decide).
    holders: dict[tuple[str, str, str, str], set[str]] = defaultdict(set)
    for name, candidates in by_name.items():
        for facts in candidates:
            if facts.title is not None and facts.unit is not None:
                holders[(facts.source, name, facts.title, facts.unit)].add(facts.root)
    singled_out = {(source, name, title, unit) for (source, name, title, unit), roots in holders.items()
                   if len(roots) == 1}
    found: dict[tuple[str, str], Suggestion] = {}
    for name in sorted(by_name):
        candidates = by_name[name]
        for index, later in _sharing_pairs(name, candidates, singled_out):
            first, second = candidates[index], candidates[later]
            if first.root == second.root or (apart and frozenset((first.root, second.root)) in apart):
                continue
            if decisions and tuple(sorted((first.ref, second.ref))) in decisions:
                continue
            reason = _shared_fact(first, second, name, singled_out)
            if reason:
                pair = sorted((first.ref, second.ref))
                roots = (first.root, second.root) if first.root < second.root else (second.root, first.root)
                # One suggestion per pair of identities is enough for a person to decide.
                found.setdefault(roots, Suggestion(pair[0], pair[1], reason))
    return tuple(sorted(found.values(), key=lambda s: (s.ref_a, s.ref_b)))


def _sharing_pairs(name: str, candidates: Sequence[_Facts],
                   singled_out: set[tuple[str, str, str, str]]) -> list[tuple[int, int]]:
    """Return the pairs (i < j, in order) of records of one name that share a date of birth, phone or title."""
    # Not every pair of the name: Nguyễn Văn An is hundreds of officials at 100,000, and comparing
    # each with each was millions of comparisons. Records that share a fact meet in that fact's bucket;
    # the pairs come out in the order the comparison of every pair would have met them.
    buckets: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, facts in enumerate(candidates):
        if facts.birth_date:
            buckets[("birth", facts.birth_date)].append(index)
        for phone in facts.phones:
            buckets[("phone", phone)].append(index)
        if facts.title is not None and facts.unit is not None and (
                facts.source, name, facts.title, facts.unit) in singled_out:
            buckets[("title", facts.title, facts.unit)].append(index)
    pairs = {(members[i], later) for members in buckets.values() if len(members) > 1
             for i in range(len(members)) for later in members[i + 1:]}
    return sorted(pairs)


@dataclass(frozen=True, slots=True)
class _Facts:
    """What _shared_fact compares of one record, worked out once."""

    ref: str
    root: str  # its group's representative: records of one identity are never suggested
    source: str
    birth_date: str | None
    phones: frozenset[str]  # last nine digits of every phone and mobile, "" left out
    title: str | None  # folded; None when the record has none (a title of spaces folds to "" and counts)
    unit: str | None  # code of the new unit its old unit maps to; None when it maps to none


def _facts(record: SourceRecord, groups: _Groups, unit: str | None) -> _Facts:
    """Collect the facts of one record that suggestions compare."""
    phones = frozenset(_phone_digits(p) for p in record.phones + record.mobiles if p) - {""}
    return _Facts(record.ref, groups.find(record.ref), record.source, record.birth_date, phones,
                  fold(record.title) if record.title else None, unit)


def _shared_fact(a: _Facts, b: _Facts, name: str, singled_out: set[tuple[str, str, str, str]]) -> str | None:
    """Say which fact besides the name two records share, if any."""
    if a.birth_date and a.birth_date == b.birth_date:
        return "same name and date of birth"
    if a.phones & b.phones:
        return "same name and phone number"
    # A title is shared by many; only across sources (an official listed by both merged agencies)
    # in the same new unit, and only when each source has one official of that name, title and
    # unit, is it a hint.
    if (a.source != b.source and a.title is not None and a.title == b.title and a.unit is not None
            and a.unit == b.unit and (a.source, name, a.title, a.unit) in singled_out
            and (b.source, name, b.title, b.unit) in singled_out):
        return "same name, title and new unit, in different sources"
    return None
