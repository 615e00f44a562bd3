"""The new directory as LDAP entries: the unit tree and one entry per official, from a plan."""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Mapping, Sequence

from ldap3.utils.dn import escape_rdn

from mailmerge_gov.config import Config
from mailmerge_gov.directory.access import Membership
from mailmerge_gov.directory.apply import Entry
from mailmerge_gov.directory.model import NewUnit, PlannedPerson, Structure
from mailmerge_gov.directory.structure import unit_path
from mailmerge_gov.vietnamese import fold

PERSON_CLASSES = ("top", "person", "organizationalPerson", "inetOrgPerson", "inetLocalMailRecipient",
                  "mailmergeHistory")
UNIT_CLASSES = ("top", "organizationalUnit", "mailmergeHistory")


def groups_dn(base_dn: str) -> str:
    """DN of the container of the new groups (roles and authorities carried over)."""
    return f"ou=groups,{base_dn}"


def people_dn(base_dn: str) -> str:
    """DN of the container of every official."""
    return f"ou=people,{base_dn}"


def units_dn(base_dn: str) -> str:
    """DN of the container of the unit tree."""
    return f"ou=units,{base_dn}"


def person_dn(person: PlannedPerson, base_dn: str) -> str:
    """DN of an official: the local part of the one address, which never changes once applied."""
    return f"uid={escape_rdn(person.address.split('@', 1)[0])},{people_dn(base_dn)}"


def unit_dn(structure: Structure, code: str, base_dn: str) -> str:
    """DN of a unit, nested under its parents by official code (codes do not change; names may)."""
    rdns = [f"ou={escape_rdn(unit.code)}" for unit in reversed(unit_path(structure, code))]
    return ",".join(rdns + [units_dn(base_dn)])


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    """Non-empty values without case-insensitive repeats, first spelling and order kept."""
    seen: set[str] = set()
    out = []
    for value in values:
        if value and value.casefold() not in seen:
            seen.add(value.casefold())
            out.append(value)
    return tuple(out)


def _attributes(pairs: Iterable[tuple[str, Sequence[str]]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Drop empty attributes, dedupe values keeping order, sort by name (stable output)."""
    out = []
    for name, values in pairs:
        # The attributes used here compare case-insensitively in LDAP: "Post Master" and its
        # folded "post master" are one value to the server, so keep only the first.
        unique = _unique(values)
        if unique:
            out.append((name, unique))
    return tuple(sorted(out, key=lambda item: item[0].lower()))


def unit_entry(structure: Structure, unit: NewUnit, base_dn: str) -> Entry:
    """The entry of one unit of the new organisation chart."""
    return Entry(unit_dn(structure, unit.code, base_dn), _attributes([
        ("objectClass", UNIT_CLASSES), ("ou", (unit.code, unit.name)), ("description", (unit.name,)),
        ("mailmergeUnitCode", (unit.code,)),
    ]))


def person_entry(person: PlannedPerson, structure: Structure, base_dn: str, today: dt.date) -> Entry:
    """The entry of one official: one address, old addresses as aliases while they are valid."""
    active = [a.address for a in person.aliases if a.valid_until is None or a.valid_until >= today.isoformat()]
    unit = structure.unit(person.unit_code) if person.unit_code else None
    folded = fold(person.full_name)
    given_first = " ".join(part for part in (fold(person.given), fold(person.family), fold(person.middle)) if part)
    old_dns = [ref.split(":", 1)[1] for ref in person.records]
    role = person.kind == "role"
    return Entry(person_dn(person, base_dn), _attributes([
        ("objectClass", PERSON_CLASSES),
        ("uid", (person.address.split("@", 1)[0],)),
        # A folded cn (and a given-name-first one) lets Thunderbird's and Outlook's address
        # book filter (cn=X*) find "Nguyễn Văn An" when X is typed without diacritics. A role
        # mailbox ("Văn thư UBND tỉnh") is no personal name: it is not split.
        ("cn", (person.full_name, folded) if role else (person.full_name, folded, given_first)),
        ("sn", (person.full_name,) if role else (person.family or person.given,)),
        ("givenName", () if role else (" ".join(p for p in (person.middle, person.given) if p),)),
        ("displayName", (person.full_name,)),
        # The official address first: mail clients take the first value as the one to write to.
        ("mail", [person.address] + active),
        ("mailRoutingAddress", (person.address,)),
        ("mailLocalAddress", [person.address] + active),
        ("title", (person.title or "",)),
        ("telephoneNumber", person.phones),
        ("mobile", person.mobiles),
        ("ou", (unit.name,) if unit else ()),
        ("departmentNumber", (unit.code,) if unit else ()),
        ("mailmergeIdentity", (str(person.identity),)),
        ("mailmergeSource", [ref.split(":", 1)[0] for ref in person.records]),
        ("mailmergeOldDN", old_dns),
        ("mailmergeOldUnit", [name for _, name, _ in person.old_units]),
        ("mailmergeOldUnitCode", [code or "" for _, _, code in person.old_units]),
        ("mailmergeOldAddress", [a.address for a in person.aliases]),
        ("mailmergeUnitCode", (unit.code,) if unit else ()),
        ("mailmergeAccountStatus", ("active",)),
    ]))


def group_entries(memberships: Sequence[Membership], groups: Mapping[str, str], base_dn: str) -> list[Entry]:
    """One groupOfNames per new group, with the members whose membership is carried over."""
    members: dict[str, list[str]] = {code: [] for code in groups}
    for membership in memberships:
        if membership.carried and membership.new_group in members:
            members[membership.new_group].append(f"uid={escape_rdn(membership.address.split('@', 1)[0])},"
                                                 f"{people_dn(base_dn)}")
    entries = []
    for code in sorted(groups):
        # groupOfNames must have a member. A group nobody may be in any more keeps one that is
        # no person (its container), so that revoking the last membership really revokes it.
        dns = sorted(set(members[code])) or [groups_dn(base_dn)]
        entries.append(Entry(f"cn={escape_rdn(code)},{groups_dn(base_dn)}", _attributes([
            ("objectClass", ("top", "groupOfNames", "mailmergeHistory")), ("cn", (code, groups[code])),
            ("description", (groups[code],)), ("member", dns), ("mailmergeUnitCode", (code,)),
        ])))
    return entries


def desired_entries(people: Sequence[PlannedPerson], structure: Structure, config: Config,
                    today: dt.date, include_base: bool = False, memberships: Sequence[Membership] = (),
                    groups: Mapping[str, str] | None = None) -> list[Entry]:
    """Every entry the new directory should have, parents before children.

    groups: code -> name of the new groups (mapping-file targets of old groups); those codes
    are groups, not units, so they are left out of the unit tree.
    """
    groups = groups or {}
    base = config.target.base_dn
    entries = []
    if include_base:
        # An LDIF target starts empty: the file must carry the base entry to load anywhere.
        first = base.split(",", 1)[0].split("=", 1)
        entries.append(Entry(base, _attributes([
            ("objectClass", ("top", "dcObject", "organization")), (first[0], (first[1],)),
            ("o", (config.target.name,))])))
    entries.append(Entry(units_dn(base), _attributes([("objectClass", ("top", "organizationalUnit")),
                                                      ("ou", ("units",))])))
    entries.append(Entry(people_dn(base), _attributes([("objectClass", ("top", "organizationalUnit")),
                                                       ("ou", ("people",))])))
    units = sorted((u for u in structure.units if u.code not in groups),
                   key=lambda u: (len(unit_path(structure, u.code)), u.code))
    entries += [unit_entry(structure, unit, base) for unit in units]
    entries += [person_entry(p, structure, base, today) for p in people if not p.disabled and p.address]
    if groups:
        entries.append(Entry(groups_dn(base), _attributes([("objectClass", ("top", "organizationalUnit")),
                                                           ("ou", ("groups",))])))
        entries += group_entries(memberships, groups, base)
    return entries
