"""What the web pages read from the staff search index: people by uid, the unit tree, vCards and QR codes."""

from __future__ import annotations

import io
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import segno

from mailmerge_gov.directory.search import Person, SearchError, search

# the people table's columns, named: the web reads the index that search.py writes, and no more
_COLUMNS = "uid, full_name, title, unit, unit_path, mail, phones, old_addresses, old_units"
MAX_ADDRESS = 320  # RFC 3696: no mail address is longer


def _split(value: str) -> tuple[str, ...]:
    return tuple(value.split("\x1f")) if value else ()


def _row_person(row: tuple) -> Person:
    uid, full_name, title, unit, unit_path, mail, phones, old_addresses, old_units = row
    return Person(uid=uid, full_name=full_name, title=title, unit=unit, unit_path=_split(unit_path), mail=mail,
                  phones=_split(phones), old_addresses=_split(old_addresses), old_units=_split(old_units))


def _rows(index: Path, sql: str, parameters: tuple = ()) -> list[tuple]:
    """Run one read-only query on the index; a missing or broken index is a SearchError."""
    if not index.exists():
        raise SearchError(f"there is no search index at {index}: build it with `mailmerge-gov directory index`")
    try:
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            return db.execute(sql, parameters).fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise SearchError(f"the search index {index} cannot be read ({exc}): build it again") from exc


def person(index: Path, uid: str) -> Person | None:
    """The active official with this uid, or None (disabled officials are not in the index)."""
    if len(uid) > 256:
        return None
    found = _rows(index, f"SELECT {_COLUMNS} FROM people WHERE uid = ? ORDER BY id LIMIT 1", (uid,))
    return _row_person(found[0]) if found else None


@dataclass
class Unit:
    """One unit of the tree: its officials directly, and its sub-units."""

    name: str
    path: tuple[str, ...]
    people: list[Person] = field(default_factory=list)
    children: dict[str, "Unit"] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Officials in this unit and every unit below it."""
        return len(self.people) + sum(child.total for child in self.children.values())

    def as_json(self) -> dict:
        return {"name": self.name, "path": list(self.path), "members": len(self.people), "total": self.total,
                "children": [child.as_json() for child in self.children.values()]}


def unit_tree(index: Path) -> list[Unit]:
    """The units of the new organisation, built from the officials' unit paths (in the index's name order)."""
    roots: dict[str, Unit] = {}
    unplaced: list[Person] = []
    for row in _rows(index, f"SELECT {_COLUMNS} FROM people ORDER BY id"):
        official = _row_person(row)
        if not official.unit_path:
            unplaced.append(official)
            continue
        level = roots
        unit = None
        for depth, name in enumerate(official.unit_path):
            unit = level.setdefault(name, Unit(name, official.unit_path[:depth + 1]))
            level = unit.children
        unit.people.append(official)
    tree = list(roots.values())
    if unplaced:
        tree.append(Unit("", (), unplaced))
    return tree


@dataclass(frozen=True)
class Lookup:
    """Where an address goes: `current` when it is someone's address today, else the official it moved to."""

    address: str
    person: Person | None
    current: bool

    def as_json(self) -> dict:
        return {"address": self.address, "found": self.person is not None, "current": self.current,
                "person": person_json(self.person) if self.person else None}


def lookup(index: Path, address: str) -> Lookup | None:
    """Who an old or new address belongs to now; None when the text is not an address at all."""
    address = address.strip()
    local, at, domain = address.partition("@")
    if not at or not local or "." not in domain or len(address) > MAX_ADDRESS or any(c.isspace() for c in address):
        return None
    found = search(index, address, 1)
    official = found[0] if found else None
    current = official is not None and official.mail.lower() == address.lower()
    return Lookup(address, official, current)


def person_json(official: Person) -> dict:
    return {"uid": official.uid, "full_name": official.full_name, "title": official.title, "unit": official.unit,
            "unit_path": list(official.unit_path), "mail": official.mail, "phones": list(official.phones),
            "old_addresses": list(official.old_addresses), "old_units": list(official.old_units)}


def _escape(value: str) -> str:
    """A vCard 3.0 text value (RFC 2426 section 4): backslash, comma, semicolon and newlines escaped."""
    return (value.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
            .replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n"))


def _fold(line: str) -> str:
    """Fold a content line at 75 octets, never inside a UTF-8 character (RFC 2425 section 5.8.1)."""
    parts, current, size = [], "", 0
    for char in line:
        width = len(char.encode("utf-8"))
        if size + width > 75:
            parts.append(current)
            current, size = " ", 1
        current += char
        size += width
    parts.append(current)
    return "\r\n".join(parts)


def vcard(official: Person) -> str:
    """The official's contact card, vCard 3.0 (RFC 2426), CRLF lines."""
    words = official.full_name.split()
    # a Vietnamese name is family name first, given name last, middle names between
    family, given, middle = (words[0], words[-1], " ".join(words[1:-1])) if len(words) > 1 else ("", official.full_name, "")
    lines = ["BEGIN:VCARD", "VERSION:3.0",
             f"N:{_escape(family)};{_escape(given)};{_escape(middle)};;",
             f"FN:{_escape(official.full_name)}"]
    if official.unit_path:
        lines.append("ORG:" + ";".join(_escape(name) for name in official.unit_path))
    if official.title:
        lines.append(f"TITLE:{_escape(official.title)}")
    if official.mail:
        lines.append(f"EMAIL;TYPE=INTERNET,PREF:{_escape(official.mail)}")
    lines += [f"TEL;TYPE=WORK,VOICE:{_escape(phone)}" for phone in official.phones]
    formerly = official.old_addresses + official.old_units
    if formerly:
        lines.append("NOTE:" + _escape(", ".join(formerly)))
    lines += [f"UID:{_escape(official.uid)}", "END:VCARD"]
    return "".join(_fold(line) + "\r\n" for line in lines)


def qr_svg(text: str) -> str:
    """A QR code of the text as a standalone SVG image."""
    out = io.BytesIO()
    segno.make(text, error="m", micro=False).save(out, kind="svg", scale=4, border=4)
    return out.getvalue().decode("utf-8")
