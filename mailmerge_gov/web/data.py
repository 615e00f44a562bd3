"""What the web pages read from the staff search index: people by uid, the unit tree, vCards and QR codes."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import segno

from mailmerge_gov.contentline import escape_text, fold
from mailmerge_gov.directory.search import Person, person_from_row, person_json, reading, search

MAX_ADDRESS = 320  # RFC 3696: no mail address is longer
# what an official's card shows of a field that is hidden from this visitor
_HIDDEN: dict[str, object] = {"title": "", "mail": "", "phones": (), "mobile": (), "old_addresses": (),
                              "old_units": ()}

__all__ = ["Lookup", "Person", "Unit", "lookup", "person", "person_json", "qr_svg", "redact", "unit_members", "unit_tree",
           "vcard"]


def _rows(index: Path, sql: str, parameters: tuple = ()) -> list[tuple]:
    """Run one read-only query on the index; a missing, broken or outdated index is a SearchError."""
    with reading(index) as db:
        return db.execute(sql, parameters).fetchall()


def redact(official: Person, fields: Collection[str] | None) -> Person:
    """The official with only `fields` left (the name and uid always); all of them when None."""
    if fields is None:
        return official
    hidden = {key: value for key, value in _HIDDEN.items() if key not in fields}
    if "unit" not in fields:
        hidden |= {"unit": "", "unit_path": (), "unit_code": ""}
    return dataclasses.replace(official, **hidden)


def person(index: Path, uid: str) -> Person | None:
    """The active official with this uid, or None (disabled officials are not in the index)."""
    if len(uid) > 256:
        return None
    found = _rows(index, "SELECT * FROM people WHERE uid = ? ORDER BY id LIMIT 1", (uid,))
    return person_from_row(found[0]) if found else None


@dataclass
class Unit:
    """One unit of the tree: how many officials it has directly, and its sub-units (unit_members reads the officials)."""

    name: str
    path: tuple[str, ...]
    code: str = ""
    children: dict[str, "Unit"] = field(default_factory=dict)
    members: int = 0  # officials directly in the unit

    @property
    def total(self) -> int:
        """Officials in this unit and every unit below it."""
        return self.members + sum(child.total for child in self.children.values())

    def as_json(self) -> dict:
        """The unit and its sub-units, with member counts, as the API answers."""
        return {"code": self.code, "name": self.name, "path": list(self.path), "members": self.members,
                "total": self.total, "children": [child.as_json() for child in self.children.values()]}


def unit_tree(index: Path) -> list[Unit]:
    """The units of the new organisation as its directory's OUs nest them, empty units too, sisters in name order."""
    with reading(index) as db:
        units = db.execute("SELECT code, name, parent, members FROM units ORDER BY position").fetchall()
        # officials whose unit is not among the OUs (the count the units table cannot have)
        unplaced = db.execute("SELECT count(*) FROM people WHERE unit_code NOT IN (SELECT code FROM units)").fetchone()[0]
    parents = {code: parent for code, _, parent, _ in units}
    names = {code: name for code, name, _, _ in units}

    def path(code: str) -> tuple[str, ...]:
        seen: list[str] = []
        while code is not None and code not in seen:  # a loop of parents is cut, never followed forever
            seen.insert(0, code)
            code = parents[code]
        return tuple(names[c] for c in seen)

    nodes = {code: Unit(name, path(code), code, members=members) for code, name, _, members in units}
    roots: list[Unit] = []
    for code, _, parent, _ in units:
        if parent in nodes and parent != code:
            nodes[parent].children[code] = nodes[code]
        else:
            roots.append(nodes[code])
    if unplaced:
        roots.append(Unit("", (), "", members=unplaced))
    return roots


def unit_members(index: Path, code: str) -> tuple[Unit, list[Person]] | None:
    """A unit of the tree (its sub-units with counts) and its own officials; "" is the officials in no unit."""
    # One unit's officials at a time: the tree of a 100,000-official city with every name in it would be a page
    # of megabytes that a phone never finishes drawing.
    pending = unit_tree(index)
    node = None
    while pending and node is None:
        unit = pending.pop()
        node = unit if unit.code == code else None
        pending += unit.children.values()
    if node is None:
        return None
    if code:
        rows = _rows(index, "SELECT * FROM people WHERE unit_code = ? ORDER BY id", (code,))
    else:
        rows = _rows(index, "SELECT * FROM people WHERE unit_code NOT IN (SELECT code FROM units) ORDER BY id")
    return node, [person_from_row(row) for row in rows]


@dataclass(frozen=True)
class Lookup:
    """Where an address goes: `current` when it is someone's address today, else the official it moved to."""

    address: str
    person: Person | None
    current: bool

    def as_json(self, fields: Collection[str] | None = None) -> dict:
        """The answer as the API gives it, the official with only `fields` (all when None)."""
        return {"address": self.address, "found": self.person is not None, "current": self.current,
                "person": person_json(self.person, fields) if self.person else None}


def lookup(index: Path, address: str, fields: Collection[str] | None = None) -> Lookup | None:
    """Who an old or new address belongs to now (through `fields` only); None when the text is not an address."""
    address = address.strip()
    local, at, domain = address.partition("@")
    if not at or not local or "." not in domain or len(address) > MAX_ADDRESS or any(c.isspace() for c in address):
        return None
    found = search(index, address, 1, fields)
    official = found[0] if found else None
    current = official is not None and official.mail.lower() == address.lower()
    return Lookup(address, official, current)


def vcard(official: Person) -> str:
    """The official's contact card, vCard 3.0 (RFC 2426), CRLF lines."""
    words = official.full_name.split()
    # a Vietnamese name is family name first, given name last, middle names between
    family, given, middle = (words[0], words[-1], " ".join(words[1:-1])) if len(words) > 1 else ("", official.full_name, "")
    lines = ["BEGIN:VCARD", "VERSION:3.0",
             f"N:{escape_text(family)};{escape_text(given)};{escape_text(middle)};;",
             f"FN:{escape_text(official.full_name)}"]
    if official.unit_path:
        lines.append("ORG:" + ";".join(escape_text(name) for name in official.unit_path))
    if official.title:
        lines.append(f"TITLE:{escape_text(official.title)}")
    if official.mail:
        lines.append(f"EMAIL;TYPE=INTERNET,PREF:{escape_text(official.mail)}")
    lines += [f"TEL;TYPE=WORK,VOICE:{escape_text(phone)}" for phone in official.phones]
    lines += [f"TEL;TYPE=CELL,VOICE:{escape_text(phone)}" for phone in official.mobile]
    formerly = official.old_addresses + official.old_units
    if formerly:
        lines.append("NOTE:" + escape_text(", ".join(formerly)))
    lines += [f"UID:{escape_text(official.uid)}", "END:VCARD"]
    return "".join(fold(line) for line in lines)


def qr_svg(text: str) -> str:
    """A QR code of the text as a standalone SVG image."""
    out = io.BytesIO()
    segno.make(text, error="m", micro=False).save(out, kind="svg", scale=4, border=4)
    return out.getvalue().decode("utf-8")
