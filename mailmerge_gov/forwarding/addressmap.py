"""The address map the relay forwards by: old address → new address until a date, and what to answer otherwise."""

from __future__ import annotations

import csv
import datetime as dt
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from mailmerge_gov.forwarding.address import AddressError, Mailbox, is_plain_mailbox, normalise, parse_mailbox
from mailmerge_gov.textfile import read_utf8

HEADER = ("old_address", "new_address", "valid_until")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class MapError(Exception):
    """The address map cannot be used; the message names the file and the line."""


class Outcome(enum.Enum):
    """What the relay does with mail for an address."""

    FORWARD = "forward"  # an old address within its transition period: relayed to the new address
    MOVED = "moved"  # an old address whose period has ended: 550 5.1.6 naming the new address
    UNKNOWN = "unknown"  # an old domain, but no such old address: 550 5.1.1
    RELAY_DENIED = "relay-denied"  # not an old domain (or not an address at all): 554 5.7.1


@dataclass(frozen=True)
class Verdict:
    """The outcome for one address on one day, with the new address where there is one."""

    outcome: Outcome
    address: str  # as asked
    new_address: str | None = None
    valid_until: dt.date | None = None
    reason: str = ""  # for UNKNOWN and RELAY_DENIED: why, for logs and `relay check`


@dataclass(frozen=True)
class MapEntry:
    """One old address: where its mail goes (chains already followed) and until when."""

    old_address: str  # normalised
    new_address: str  # the end of the chain, normalised
    valid_until: dt.date
    line: int
    via: tuple[str, ...] = ()  # old addresses passed through on the way (A→B→C: (B,))


@dataclass(frozen=True)
class AddressMap:
    """A loaded, checked address map: lookups only, never changed (a reload builds a new one)."""

    entries: Mapping[str, MapEntry]
    old_domains: frozenset[str]
    source: str = ""  # the file it was read from, for messages
    _by_new: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        """Number of old addresses."""
        return len(self.entries)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """Pickle as plain dicts (a reload sends the map to the relay's worker processes; mappingproxy cannot)."""
        return _rebuild, (dict(self.entries), self.old_domains, self.source, dict(self._by_new))

    def lookup(self, address: str, today: dt.date) -> Verdict:
        """Say what happens on `today` to mail sent to `address` (as an SMTP path carries it)."""
        if address.lower() == "postmaster":
            return self._postmaster(address, today)
        try:
            mailbox = parse_mailbox(address)
        except AddressError as exc:
            return Verdict(Outcome.RELAY_DENIED, address, reason=str(exc))
        if mailbox.route:
            return Verdict(Outcome.RELAY_DENIED, address, reason="source routes are not accepted")
        if mailbox.literal:
            return Verdict(Outcome.RELAY_DENIED, address, reason=f"{mailbox.domain} is an address literal")
        domain = mailbox.ascii_domain
        if domain not in self.old_domains:
            return Verdict(Outcome.RELAY_DENIED, address, reason=f"{domain} is not an old domain")
        if not is_plain_mailbox(mailbox):
            return Verdict(Outcome.UNKNOWN, address,
                           reason="quoted local parts and local parts with % or ! are never forwarded")
        entry = self.entries.get(normalise(mailbox))
        if entry is None:
            return Verdict(Outcome.UNKNOWN, address, reason="not in the address map")
        return _verdict(entry, address, today)

    def _postmaster(self, address: str, today: dt.date) -> Verdict:
        """<postmaster> with no domain: the postmaster of the first old domain (by name) that the map has."""
        # RFC 5321 4.5.1: a server takes mail for "postmaster" with no domain. The relay has no mailbox of its
        # own, so it is the postmaster@ line of an old domain (the runbook says to add one for each).
        for domain in sorted(self.old_domains):
            entry = self.entries.get(f"postmaster@{domain}")
            if entry is not None:
                return _verdict(entry, address, today)
        return Verdict(Outcome.UNKNOWN, address, reason="no postmaster@ of an old domain in the address map")

    def old_addresses_of(self, new_address: str) -> tuple[str, ...]:
        """The old addresses that forward to a new address."""
        return self._by_new.get(new_address.lower(), ())


def _verdict(entry: MapEntry, address: str, today: dt.date) -> Verdict:
    """Forward to the entry's new address until its last day, then moved there."""
    outcome = Outcome.FORWARD if today <= entry.valid_until else Outcome.MOVED
    return Verdict(outcome, address, entry.new_address, entry.valid_until)


def load_map(path: Path, old_domains: Iterable[str] = ()) -> AddressMap:
    """Read and check an address map CSV (old_address,new_address,valid_until); MapError naming file and line."""
    text = read_utf8(path, "address map", MapError)
    return parse_map(text, str(path), old_domains)


def parse_map(text: str, source: str, old_domains: Iterable[str] = ()) -> AddressMap:
    """Check the text of an address map and resolve its chains; MapError naming `source` and the line."""
    domains = frozenset(d.lower() for d in old_domains)
    rows: dict[str, MapEntry] = {}
    for number, row in _rows(text):
        where = f"{source}, line {number}"
        if len(row) != 3:
            raise MapError(f"{where}: expected 3 fields ({','.join(HEADER)}), found {len(row)}")
        old = _map_address(where, "old_address", row[0])
        new = _map_address(where, "new_address", row[1])
        until = _date(where, row[2])
        if domains and old.ascii_domain not in domains:
            raise MapError(f"{where}: old address {row[0]} is not in an old domain ({', '.join(sorted(domains))})")
        key, target = normalise(old), normalise(new)
        if key == target:
            raise MapError(f"{where}: {row[0]} forwards to itself")
        earlier = rows.get(key)
        if earlier is not None:
            if earlier.new_address != target:
                raise MapError(f"{where}: {key} is given twice with different new addresses: "
                               f"{earlier.new_address} on line {earlier.line} and {target} on line {number}")
            # the same forwarding written twice (two exports pasted together): the later end date wins
            if until <= earlier.valid_until:
                continue
        rows[key] = MapEntry(key, target, until, number)
    entries = {key: _follow(source, rows, entry, domains) for key, entry in rows.items()}
    by_new: dict[str, list[str]] = {}
    for entry in entries.values():
        by_new.setdefault(entry.new_address, []).append(entry.old_address)
    return AddressMap(MappingProxyType(entries), domains, source,
                      MappingProxyType({new: tuple(sorted(olds)) for new, olds in by_new.items()}))


def _rebuild(entries: dict[str, MapEntry], old_domains: frozenset[str], source: str,
             by_new: dict[str, tuple[str, ...]]) -> AddressMap:
    """An AddressMap from its pickled parts."""
    return AddressMap(MappingProxyType(entries), old_domains, source, MappingProxyType(by_new))


def _rows(text: str) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number, cells) of the data rows: no header, blank lines or # comments."""
    first = True
    reader = csv.reader(text.splitlines())
    for row in reader:
        number = reader.line_num
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if first and tuple(cell.lower() for cell in cells) == HEADER:
            first = False
            continue
        first = False
        yield number, cells


def _map_address(where: str, column: str, text: str) -> Mailbox:
    """Parse an address of the map: a plain mailbox on a host name, nothing a relay could be tricked with."""
    if not text:
        raise MapError(f"{where}: {column} is empty")
    try:
        mailbox = parse_mailbox(text)
    except AddressError as exc:
        raise MapError(f"{where}: {column} {exc}") from None
    if not is_plain_mailbox(mailbox):
        # A new address with % or ! would make the next hop relay; an old one could never be matched.
        raise MapError(f"{where}: {column} '{text}' is not a plain address (quotes, source routes, % and !, "
                       "and IP literals are not allowed)")
    return mailbox


def _date(where: str, text: str) -> dt.date:
    """Parse valid_until, written YYYY-MM-DD."""
    try:
        if not _DATE.match(text):
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise MapError(f"{where}: valid_until '{text}' is not a date like 2026-06-30") from None


def _follow(source: str, rows: Mapping[str, MapEntry], entry: MapEntry, domains: frozenset[str]) -> MapEntry:
    """Resolve a chain A→B→C to A→C; MapError naming the lines of a cycle."""
    path = [entry.old_address]
    target = entry.new_address
    while target in rows:
        if target in path:
            cycle = path[path.index(target):] + [target]
            lines = sorted({rows[address].line for address in cycle})
            raise MapError(f"{source}, line {lines[0]}: forwarding loop {' → '.join(cycle)} "
                           f"(lines {', '.join(str(line) for line in lines)})")
        path.append(target)
        target = rows[target].new_address
    if domains and target.rsplit("@", 1)[1] in domains:
        # The next hop would send it straight back to the old domain's MX, where it is unknown.
        last = rows[path[-1]]
        raise MapError(f"{source}, line {last.line}: new address {target} is in an old domain and has no line "
                       "of its own")
    return MapEntry(entry.old_address, target, entry.valid_until, entry.line, tuple(path[1:]))
