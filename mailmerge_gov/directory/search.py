"""The staff search index: every active official of the new directory, found by name with or without diacritics."""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mailmerge_gov.config import DirectoryConfig
from mailmerge_gov.directory.model import RawAttributes
from mailmerge_gov.directory.presets import split_dn
from mailmerge_gov.directory.sources import directory_entries
from mailmerge_gov.vietnamese import fold, sort_key

# Words of a query: letters and digits after folding. Everything else (quotes, *, parentheses, -, :)
# separates words, so nothing a person types is ever FTS5 syntax.
_WORD = re.compile(r"[0-9a-z]+")
_NOT_DIGIT = re.compile(r"\D")
# A query of digits (and spaces, +, -, ., parentheses) with at least this many digits is a phone number.
_PHONE_DIGITS = 6
SCHEMA = """
CREATE TABLE people (id INTEGER PRIMARY KEY, uid TEXT NOT NULL, full_name TEXT NOT NULL, folded TEXT NOT NULL,
                     title TEXT NOT NULL, unit TEXT NOT NULL, unit_path TEXT NOT NULL, mail TEXT NOT NULL,
                     phones TEXT NOT NULL, old_addresses TEXT NOT NULL, old_units TEXT NOT NULL);
CREATE TABLE addresses (address TEXT NOT NULL, person INTEGER NOT NULL, current INTEGER NOT NULL);
CREATE INDEX addresses_by_address ON addresses (address);
CREATE TABLE phones (digits TEXT NOT NULL, person INTEGER NOT NULL);
CREATE INDEX phones_by_digits ON phones (digits);
CREATE VIRTUAL TABLE words USING fts5(names, handles, title, unit, tokenize = 'unicode61');
"""


class SearchError(Exception):
    """The index cannot be built or read; the message says what to do."""


@dataclass(frozen=True)
class Person:
    """One official as the search shows them."""

    uid: str
    full_name: str
    title: str
    unit: str
    unit_path: tuple[str, ...]  # from the top of the new organisation down to the official's unit
    mail: str
    phones: tuple[str, ...]
    old_addresses: tuple[str, ...]
    old_units: tuple[str, ...]


def index_path(state_file: Path) -> Path:
    """Where the search index of a consolidation lives: beside its state file."""
    return state_file.parent / "directory-index.sqlite"


def build_index(directory: DirectoryConfig, path: Path) -> int:
    """Build the index of the new directory's active officials into path, atomically; return how many."""
    people = _people(directory_entries(directory))
    temporary = path.with_name(path.name + ".building")
    temporary.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(temporary)
    try:
        db.executescript(SCHEMA)
        for number, person in enumerate(sorted(people, key=lambda p: (sort_key(p.full_name), p.uid)), start=1):
            _insert(db, number, person)
        db.commit()
    finally:
        db.close()
    # readers keep the old file until the new one is whole: a rename replaces it in one step
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return len(people)


def _people(entries: Iterable[tuple[str, RawAttributes]]) -> list[Person]:
    """Turn the directory's entries into people: units first resolved into names and paths."""
    units: dict[str, tuple[str, str | None]] = {}  # unit code -> (name, parent code)
    persons = []
    for dn, attributes in entries:
        values = {name.lower(): found for name, found in attributes}
        classes = {value.lower() for value in values.get("objectclass", ())}
        if "organizationalunit" in classes and "mailmergeunitcode" in values:
            rdns = split_dn(dn)
            parent = rdns[1][1] if len(rdns) > 1 and rdns[1][0].lower() == "ou" and rdns[1][1] != "units" else None
            code = values["mailmergeunitcode"][0]
            names = [v for v in values.get("ou", ()) if v != code] or list(values.get("description", (code,)))
            units[code] = (names[0], parent)
        elif "inetorgperson" in classes:
            persons.append(values)
    people = []
    for values in persons:
        # disabled officials are never shown (their entries stay in the directory, marked)
        if values.get("mailmergeaccountstatus", ("active",))[0].lower() != "active":
            continue
        mail = values.get("mail", ("",))[0]
        code = values.get("mailmergeunitcode", values.get("departmentnumber", ("",)))[0]
        path: list[str] = []
        seen: set[str] = set()
        while code in units and code not in seen:
            seen.add(code)
            path.insert(0, units[code][0])
            code = units[code][1] or ""
        people.append(Person(
            uid=values.get("uid", (mail.split("@")[0],))[0], full_name=values.get("displayname", values["cn"])[0],
            title=values.get("title", ("",))[0], unit=path[-1] if path else values.get("ou", ("",))[0],
            unit_path=tuple(path), mail=mail, phones=values.get("telephonenumber", ()) + values.get("mobile", ()),
            old_addresses=tuple(a for a in values.get("mailmergeoldaddress", ()) if a != mail),
            old_units=tuple(dict.fromkeys(values.get("mailmergeoldunit", ()))),
        ))
    return people


def _insert(db: sqlite3.Connection, number: int, person: Person) -> None:
    """Add one official to the tables and to the word index."""
    db.execute("INSERT INTO people VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (number, person.uid, person.full_name, fold(person.full_name), person.title, person.unit,
                "\x1f".join(person.unit_path), person.mail, "\x1f".join(person.phones),
                "\x1f".join(person.old_addresses), "\x1f".join(person.old_units)))
    addresses = [(person.mail.lower(), number, 1)] + [(a.lower(), number, 0) for a in person.old_addresses]
    db.executemany("INSERT INTO addresses VALUES (?, ?, ?)", addresses)
    db.executemany("INSERT INTO phones VALUES (?, ?)",
                   [(digits[-9:], number) for phone in person.phones if len(digits := _NOT_DIGIT.sub("", phone)) >= 6])
    words = fold(person.full_name).split()
    # Handles: what people type instead of a name: the local parts of every address ("annv",
    # "an.nguyenvan"), given name + initials and initials + given name ("annv", "nvan").
    initials = "".join(w[0] for w in words[:-1])
    handles = {a.split("@", 1)[0] for a, _, _ in addresses} | ({words[-1] + initials, initials + words[-1]}
                                                               if len(words) > 1 else set())
    # handles are kept apart by a unit separator, which the tokenizer takes as space: one handle's words
    # ("an nguyenvan") stay together for the exact comparison of the ranking
    db.execute("INSERT INTO words (rowid, names, handles, title, unit) VALUES (?, ?, ?, ?, ?)",
               (number, " ".join(words), "\x1f".join(" ".join(_WORD.findall(h)) for h in sorted(handles)),
                fold(person.title), fold(" ".join(person.unit_path + person.old_units))))


def search(path: Path, query: str, limit: int = 50) -> list[Person]:
    """Find active officials by name (diacritics optional), initials, address, phone, title or unit."""
    if not path.exists():
        raise SearchError(f"there is no search index at {path}: build it with `mailmerge-gov directory index`")
    text = query.strip()[:200]  # a name is short; a page of text is no query
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ranked = _ranked(db, text, limit)
        rows = {row[0]: row for row in db.execute(
            f"SELECT * FROM people WHERE id IN ({','.join('?' * len(ranked))})", ranked)} if ranked else {}
    except sqlite3.DatabaseError as exc:
        raise SearchError(f"the search index {path} cannot be read ({exc}): build it again") from exc
    finally:
        db.close()
    return [_person(rows[number]) for number in ranked if number in rows]


def _ranked(db: sqlite3.Connection, text: str, limit: int) -> list[int]:
    """Return the ids of the officials that match, best first."""
    folded = fold(text)
    if "@" in text:
        # an address is looked up whole: a near miss would name someone else as its owner
        found = [row[0] for row in db.execute(
            "SELECT person FROM addresses WHERE address = ? ORDER BY current DESC, person", (folded,))]
        return list(dict.fromkeys(found))[:limit]
    digits = _NOT_DIGIT.sub("", text)
    if len(digits) >= _PHONE_DIGITS and not re.search(r"[^\d\s+().\-]", text):
        return list(dict.fromkeys(row[0] for row in db.execute(
            "SELECT person FROM phones WHERE digits = ? ORDER BY person", (digits[-9:],))))[:limit]
    words = _WORD.findall(folded)
    if not words:
        return []
    # Every word must start some word of the official's names, handles, title or unit; each is quoted,
    # so what a person types is never FTS5 syntax.
    match = " ".join(f'"{word}"*' for word in words)
    candidates = [row[0] for row in db.execute("SELECT rowid FROM words WHERE words MATCH ? LIMIT 2000", (match,))]
    if not candidates:
        return []
    marks = ",".join("?" * len(candidates))
    names = {row[0]: row[1] for row in db.execute(f"SELECT id, folded FROM people WHERE id IN ({marks})", candidates)}
    handles = {row[0]: set(row[1].split("\x1f")) for row in db.execute(
        f"SELECT rowid, handles FROM words WHERE rowid IN ({marks})", candidates)}
    whole = " ".join(words)

    def rank(number: int) -> tuple[int, int]:
        name = names[number]
        if name == whole or whole in handles[number]:
            return 0, number  # the exact name, or exactly a local part or initials form
        if all(word in name.split() for word in words):
            return 1, number  # every word a whole word of the name
        if name.startswith(whole):
            return 2, number  # the name begins with what was typed
        return 3, number  # (ids follow the Vietnamese order of names: ties stay in that order)

    return sorted(candidates, key=rank)[:limit]


def _person(row: Sequence) -> Person:
    """Rebuild a Person from its row."""
    def split(value: str) -> tuple[str, ...]:
        return tuple(value.split("\x1f")) if value else ()

    return Person(uid=row[1], full_name=row[2], title=row[4], unit=row[5], unit_path=split(row[6]), mail=row[7],
                  phones=split(row[8]), old_addresses=split(row[9]), old_units=split(row[10]))
