"""The values the directory steps pass to each other: records read, units, identities, the plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# Attributes as read from a source, in a stable order: ((name, (value, ...)), ...).
RawAttributes = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class SourceRecord:
    """One entry of an old directory (a person, a role mailbox or a group), as the source has it."""

    source: str  # name of the [[sources]] table it came from
    dn: str  # DN as written by the source; CSV rows get "csv:<file name>:<line>"
    kind: str  # "person" or "group" (role mailboxes are people here; the plan tells them apart)
    full_name: str  # cn / displayName exactly as the source spells it (may be NFD, ALL CAPS …)
    uid: str | None = None  # login name: uid, sAMAccountName
    mail: str | None = None  # primary address, lower-cased
    aliases: tuple[str, ...] = ()  # every other address of the entry, lower-cased, primary excluded
    title: str | None = None
    phones: tuple[str, ...] = ()
    mobiles: tuple[str, ...] = ()
    unit: str | None = None  # old unit as the source spells it (ou, department, or from the DN)
    employee_id: str | None = None
    citizen_id: str | None = None
    birth_date: str | None = None  # ISO date
    disabled: bool = False
    member_of: tuple[str, ...] = ()  # DNs of the groups the entry is a member of (people)
    members: tuple[str, ...] = ()  # DNs of the members (groups)
    line: int | None = None  # line of the file it was read from, for messages
    raw: RawAttributes = ()  # every attribute as read, kept as history

    # Worked out once per record (a plan asks a record for them a dozen times); cached_property
    # writes the instance's __dict__ directly, which a frozen dataclass allows.
    @cached_property
    def ref(self) -> str:
        """A key naming this record across all sources: "<source>:<dn>"."""
        return f"{self.source}:{self.dn}"

    @cached_property
    def addresses(self) -> tuple[str, ...]:
        """Every address of the record: primary first, then aliases."""
        return ((self.mail,) if self.mail else ()) + self.aliases


@dataclass(frozen=True)
class NewUnit:
    """A unit of the new organisation chart."""

    code: str
    name: str
    parent_code: str | None = None


@dataclass(frozen=True)
class UnitMapping:
    """One line of the unit mapping file: an old unit of a source and where it goes."""

    source: str
    old_unit: str  # as the source spells it (OU name, department, or DN)
    old_code: str | None
    new_code: str | None  # None while the line needs review
    status: str  # "ok" or "needs review"
    line: int
    # A "needs review" line may carry a suggested new unit (an old commune only partly merged into
    # one new one); it is kept apart from new_code so that nothing uses it before a person agrees.
    proposed_code: str | None = None


@dataclass(frozen=True)
class Structure:
    """The new organisation chart and how every old unit maps onto it."""

    units: tuple[NewUnit, ...]
    mappings: tuple[UnitMapping, ...]

    def unit(self, code: str) -> NewUnit:
        """Return the new unit with this code; KeyError if there is none."""
        for unit in self.units:
            if unit.code == code:
                return unit
        raise KeyError(code)


@dataclass(frozen=True)
class Alias:
    """An old address of an official, kept as history and forwarded until the transition ends."""

    address: str
    source: str
    valid_until: str | None  # ISO date; None: stays (an address in the new domain)


@dataclass(frozen=True)
class PlannedPerson:
    """One official (or role mailbox) of the new directory, as the plan has it."""

    identity: int  # stable identity id from the state store
    kind: str  # "person" or "role"
    full_name: str  # normalised, diacritics kept
    family: str
    middle: str
    given: str
    address: str  # the one official address
    kept: bool  # True when the address is the official's existing one (surviving unit)
    unit_code: str | None  # None: no unit (reported)
    title: str | None
    phones: tuple[str, ...]
    mobiles: tuple[str, ...]
    disabled: bool
    records: tuple[str, ...]  # refs of the source records merged into this identity
    aliases: tuple[Alias, ...] = ()
    old_units: tuple[tuple[str, str, str | None], ...] = ()  # (source, old unit, old code)
    groups: tuple[str, ...] = field(default_factory=tuple)  # refs of source groups the person is in
    mailboxes: tuple[tuple[str, str], ...] = ()  # (source, primary address) of each record: its mailbox


@dataclass(frozen=True)
class Issue:
    """Something a person must look at in a plan; blocking ones stop apply until resolved."""

    kind: str
    subject: str
    blocking: bool
    detail: dict[str, Any]
