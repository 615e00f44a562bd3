"""Right person, right role, right authority: group memberships carried over, privileged ones signed off."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from mailmerge_gov.config import Config
from mailmerge_gov.directory.model import PlannedPerson, SourceRecord, Structure, UnitMapping
from mailmerge_gov.directory.presets import normalize_dn, split_dn
from mailmerge_gov.directory.structure import map_unit
from mailmerge_gov.vietnamese import fold


@dataclass(frozen=True)
class Membership:
    """One official's membership of an old group, and what becomes of it in the new directory."""

    number: int  # row number in the access review of this plan (what `directory sign-off` takes)
    identity: int
    person: str
    address: str
    group: str  # ref of the old group: "<source>:<dn>"
    group_name: str
    new_group: str | None  # code of the new group from the mapping file; None: not carried over
    new_group_name: str | None
    privileged: bool
    signed_by: str | None  # who signed it off, for privileged memberships

    @property
    def subject(self) -> str:
        """The sign-off subject of this membership in the state store."""
        return f"membership:{self.identity}:{self.group}"

    @property
    def carried(self) -> bool:
        """True when apply writes this membership: mapped, and signed off if privileged."""
        return self.new_group is not None and (not self.privileged or self.signed_by is not None)

    @property
    def status(self) -> str:
        """Say in words what happens to the membership."""
        if self.new_group is None:
            return "not carried over (the mapping file does not map this group)"
        if self.privileged and self.signed_by is None:
            return "waits for sign-off (privileged)"
        if self.privileged:
            return f"carried over, signed off by {self.signed_by}"
        return "carried over"


def group_name(group: SourceRecord) -> str:
    """The name people know a group by: its cn/displayName, else the first RDN value."""
    if group.full_name:
        return group.full_name
    rdns = split_dn(group.dn)
    return rdns[0][1] if rdns else group.dn


def is_privileged(group: SourceRecord, patterns: Iterable[str]) -> bool:
    """Tell whether a group grants authority: its name, DN or description matches a pattern."""
    descriptions = [value for name, values in group.raw if name.lower() == "description" for value in values]
    texts = [group_name(group), *(value for _, value in split_dn(group.dn)[:1]), *descriptions]
    candidates = {text.lower() for text in texts} | {fold(text) for text in texts}
    return any(fnmatch.fnmatchcase(text, pattern.lower()) or fnmatch.fnmatchcase(text, fold(pattern))
               for text in candidates for pattern in patterns)


# Group lines of the mapping file name the old group as "group:<name>" or "group:<DN>", so a
# group can never be mapped by accident through a unit of the same name ("Văn phòng UBND tỉnh"
# is both a unit and a mailing list in Zimbra directories).
GROUP_PREFIX = "group:"


class AccessError(Exception):
    """The mapping file's group lines cannot be used; the message names the line."""


def group_codes(groups: Sequence[SourceRecord], structure: Structure) -> dict[str, str]:
    """New group code -> name, for every group the mapping file maps (these are groups, not units)."""
    unit_codes = {m.new_code for m in structure.mappings if not m.old_unit.startswith(GROUP_PREFIX)}
    codes: dict[str, str] = {}
    for mapping in structure.mappings:
        if mapping.old_unit.startswith(GROUP_PREFIX) and mapping.new_code:
            if mapping.new_code in unit_codes:
                raise AccessError(f"unit mapping file, line {mapping.line}: group line maps onto "
                                  f"{mapping.new_code}, which unit lines use: give the group a code of its own")
    for group in groups:
        mapping = _mapping(group, structure)
        if mapping is not None:
            codes[mapping.new_code] = structure.unit(mapping.new_code).name
    return codes


def _mapping(group: SourceRecord, structure: Structure) -> UnitMapping | None:
    """The mapping line of a group (group:<name>, then group:<DN>), if it is mapped and reviewed."""
    for key in (group_name(group), group.dn):
        mapping = map_unit(structure, group.source, GROUP_PREFIX + key)
        if mapping is not None and mapping.status == "ok" and mapping.new_code:
            return mapping
    return None


def memberships(people: Sequence[PlannedPerson], groups: Sequence[SourceRecord], structure: Structure,
                config: Config, signoffs: Mapping[str, str]) -> list[Membership]:
    """Every membership of a carried-over official in an old group, in a stable order."""
    group_codes(groups, structure)  # refuses group lines that map onto units before anything is listed
    by_dn: dict[tuple[str, str], PlannedPerson] = {}
    by_address: dict[tuple[str, str], PlannedPerson] = {}
    for person in people:
        if person.disabled or not person.address:
            continue
        for ref in person.records:
            source, dn = ref.split(":", 1)
            by_dn[(source, normalize_dn(dn))] = person
        for alias in person.aliases:
            by_address[(alias.source, alias.address)] = person
    found: dict[tuple[int, str], tuple[PlannedPerson, SourceRecord]] = {}
    groups_by_dn = {(g.source, normalize_dn(g.dn)): g for g in groups}
    for group in groups:
        for member in group.members:
            person = by_address.get((group.source, member.lower())) if "@" in member and "=" not in member \
                else by_dn.get((group.source, normalize_dn(member)))
            if person is not None:
                found[(person.identity, group.ref)] = (person, group)
    for person in people:
        for ref in person.groups:
            source, dn = ref.split(":", 1)
            group = groups_by_dn.get((source, normalize_dn(dn)))
            if group is not None and not person.disabled and person.address:
                found[(person.identity, group.ref)] = (person, group)
    rows = []
    for number, key in enumerate(sorted(found, key=lambda k: (k[1], k[0])), start=1):
        person, group = found[key]
        mapping = _mapping(group, structure)
        subject = f"membership:{person.identity}:{group.ref}"
        rows.append(Membership(
            number=number, identity=person.identity, person=person.full_name, address=person.address,
            group=group.ref, group_name=group_name(group),
            new_group=mapping.new_code if mapping else None,
            new_group_name=structure.unit(mapping.new_code).name if mapping else None,
            privileged=is_privileged(group, config.directory.privileged_groups),
            signed_by=signoffs.get(subject),
        ))
    return rows
