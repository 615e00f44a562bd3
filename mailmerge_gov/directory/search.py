"""The staff search index: every active official of the new directory, found by name with or without diacritics."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Iterator, Sequence

from mailmerge_gov.config import DirectoryConfig
from mailmerge_gov.directory.model import RawAttributes
from mailmerge_gov.directory.presets import split_dn
from mailmerge_gov.directory.sources import directory_entries
from mailmerge_gov.vietnamese import fold, sort_key, sort_key_word

# Words of a query: letters and digits after folding. Everything else (quotes, *, parentheses, -, :)
# separates words, so nothing a person types is ever FTS5 syntax.
_WORD = re.compile(r"[0-9a-z]+")
_NOT_DIGIT = re.compile(r"\D")
# A query of digits (and spaces, +, -, ., parentheses) with at least this many digits is a phone number.
_PHONE_DIGITS = 6
# Bumped whenever the tables change: an index built by another version is refused with "build it again".
SCHEMA_VERSION = 6
SCHEMA = f"""
CREATE TABLE people (id INTEGER PRIMARY KEY, uid TEXT NOT NULL, full_name TEXT NOT NULL, folded TEXT NOT NULL,
                     title TEXT NOT NULL, unit TEXT NOT NULL, unit_path TEXT NOT NULL, mail TEXT NOT NULL,
                     phones TEXT NOT NULL, old_addresses TEXT NOT NULL, old_units TEXT NOT NULL,
                     mobile TEXT NOT NULL, unit_code TEXT NOT NULL);
CREATE INDEX people_by_uid ON people (uid);
CREATE INDEX people_by_unit ON people (unit_code);
CREATE TABLE units (code TEXT PRIMARY KEY, name TEXT NOT NULL, parent TEXT, position INTEGER NOT NULL,
                    folded_path TEXT NOT NULL, members INTEGER NOT NULL);
CREATE TABLE addresses (address TEXT NOT NULL, person INTEGER NOT NULL, current INTEGER NOT NULL);
CREATE INDEX addresses_by_address ON addresses (address);
CREATE TABLE phones (digits TEXT NOT NULL, person INTEGER NOT NULL, mobile INTEGER NOT NULL);
CREATE INDEX phones_by_digits ON phones (digits);
CREATE TABLE handles (handle TEXT NOT NULL, person INTEGER NOT NULL, kind TEXT NOT NULL);
CREATE INDEX handles_by_handle ON handles (handle, person);
CREATE VIRTUAL TABLE words USING fts5(names, initials, mail, old, title, unit, old_units, tokenize = 'unicode61',
                                      prefix = '1 2 3', detail = column);
CREATE VIRTUAL TABLE fullnames USING fts5(name, tokenize = 'unicode61', prefix = '1 2 3');
PRAGMA user_version = {SCHEMA_VERSION};
"""
# The word index's columns that each field of an official feeds (the names and initials always count).
_FIELD_COLUMNS = {"mail": "mail", "old_addresses": "old", "title": "title", "unit": "unit", "old_units": "old_units"}
# What the exact comparison of the ranking looks at: the whole name and every handle, by the field it comes from.
_HANDLE_KINDS = {"names": "names", "initials": "initials", "mail": "mail", "old": "old"}


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
    mobile: tuple[str, ...] = ()  # apart from `phones` (the office's numbers): a private field by default
    unit_code: str = ""


@dataclass(frozen=True)
class UnitEntry:
    """One unit of the new organisation as the directory's OUs describe it."""

    code: str
    name: str
    parent: str | None


def person_json(person: Person, fields: Collection[str] | None = None) -> dict:
    """An official as JSON (the API's and `directory search --json`'s shape); only `fields` when given."""
    values = {"title": person.title, "unit": person.unit, "unit_path": list(person.unit_path), "mail": person.mail,
              "phones": list(person.phones), "mobile": list(person.mobile),
              "old_addresses": list(person.old_addresses), "old_units": list(person.old_units)}
    shown = {key: value for key, value in values.items()
             if fields is None or (key if key != "unit_path" else "unit") in fields}
    return {"uid": person.uid, "full_name": person.full_name} | shown


def index_path(state_file: Path) -> Path:
    """Where the search index of a consolidation lives: beside its state file."""
    return state_file.parent / "directory-index.sqlite"


def build_index(directory: DirectoryConfig, path: Path) -> int:
    """Build the index of the new directory's active officials into path, atomically; return how many."""
    people, units = _people(directory_entries(directory))
    temporary = path.with_name(path.name + ".building")
    temporary.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(temporary)
    try:
        db.executescript(SCHEMA)
        # unit names in Vietnamese order: the tree lists sister units that way
        ordered = sorted(units.values(), key=lambda unit: (_unit_key(unit.name), unit.code))
        members = collections.Counter(person.unit_code for person in people)
        db.executemany("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)",
                       [(unit.code, unit.name, unit.parent if unit.parent in units else None, position,
                         " ".join(_WORD.findall(fold(" ".join(_below_top(_unit_path(unit.code, units)))))),
                         members[unit.code])
                        for position, unit in enumerate(ordered)])
        for number, person in enumerate(sorted(people, key=lambda p: (sort_key(p.full_name), p.uid)), start=1):
            _insert(db, number, person)
        db.commit()
    finally:
        db.close()
    # readers keep the old file until the new one is whole: a rename replaces it in one step
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return len(people)


def _unit_path(code: str, units: dict[str, UnitEntry]) -> list[str]:
    """The names from the top of the organisation down to the unit `code` (a loop of parents is cut)."""
    path: list[str] = []
    seen: set[str] = set()
    while code in units and code not in seen:
        seen.add(code)
        path.insert(0, units[code].name)
        code = units[code].parent or ""
    return path


def _below_top(path: Sequence[str]) -> Sequence[str]:
    """A unit path less the top of the organisation, which every official shares: as a search word it would
    find everybody (and make every search with one of its words, "minh" or "thanh", read the whole index)."""
    return path[1:] if len(path) > 1 else path


def _unit_key(name: str) -> tuple:
    """A unit name's place in Vietnamese dictionary order, word by word from the first (not a person's name order)."""
    return tuple((letters, tones) for letters, tones, _ in map(sort_key_word, name.split())), name


def _people(entries: Iterable[tuple[str, RawAttributes]]) -> tuple[list[Person], dict[str, UnitEntry]]:
    """Turn the directory's entries into people and units: units resolved into names and paths."""
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
        code = start = values.get("mailmergeunitcode", values.get("departmentnumber", ("",)))[0]
        path: list[str] = []
        seen: set[str] = set()
        while code in units and code not in seen:
            seen.add(code)
            path.insert(0, units[code][0])
            code = units[code][1] or ""
        people.append(Person(
            uid=values.get("uid", (mail.split("@")[0],))[0], full_name=values.get("displayname", values["cn"])[0],
            title=values.get("title", ("",))[0], unit=path[-1] if path else values.get("ou", ("",))[0],
            unit_path=tuple(path), mail=mail, phones=values.get("telephonenumber", ()),
            old_addresses=tuple(a for a in values.get("mailmergeoldaddress", ()) if a != mail),
            old_units=tuple(dict.fromkeys(values.get("mailmergeoldunit", ()))),
            mobile=values.get("mobile", ()), unit_code=start if path else "",
        ))
    return people, {code: UnitEntry(code, name, parent) for code, (name, parent) in units.items()}


def _insert(db: sqlite3.Connection, number: int, person: Person) -> None:
    """Add one official to the tables and to the word index."""
    db.execute("INSERT INTO people VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (number, person.uid, person.full_name, fold(person.full_name), person.title, person.unit,
                "\x1f".join(person.unit_path), person.mail, "\x1f".join(person.phones),
                "\x1f".join(person.old_addresses), "\x1f".join(person.old_units), "\x1f".join(person.mobile),
                person.unit_code))
    addresses = [(person.mail.lower(), number, 1)] + [(a.lower(), number, 0) for a in person.old_addresses]
    db.executemany("INSERT INTO addresses VALUES (?, ?, ?)", addresses)
    db.executemany("INSERT INTO phones VALUES (?, ?, ?)",
                   [(digits[-9:], number, int(mobile)) for phones, mobile in ((person.phones, False), (person.mobile, True))
                    for phone in phones if len(digits := _NOT_DIGIT.sub("", phone)) >= 6])
    words = fold(person.full_name).split()
    # Handles: what people type instead of a name: given name + initials and initials + given name
    # ("annv", "nvan"), and the local parts of the addresses ("annv7", "an.nguyenvan"), each address
    # kind in a column of its own so that a private field can be left out of a visitor's search.
    initials = {words[-1] + "".join(w[0] for w in words[:-1]), "".join(w[0] for w in words[:-1]) + words[-1]} \
        if len(words) > 1 else set()

    kinds = {"names": [person.full_name], "initials": sorted(initials),
             "mail": [person.mail.split("@", 1)[0]] if person.mail else [],
             "old": [a.split("@", 1)[0] for a in person.old_addresses]}
    # each handle as its words ("an.nguyenvan" is "an nguyenvan"), the form the ranking compares whole
    normal = {kind: sorted({" ".join(_WORD.findall(fold(value))) for value in values} - {""})
              for kind, values in kinds.items()}
    db.executemany("INSERT INTO handles VALUES (?, ?, ?)",
                   [(handle, number, kind) for kind, handles in normal.items() for handle in handles])
    db.execute("INSERT INTO words (rowid, names, initials, mail, old, title, unit, old_units) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (number, " ".join(words), " , ".join(normal["initials"]), " , ".join(normal["mail"]),
                " , ".join(normal["old"]), fold(person.title), fold(" ".join(_below_top(person.unit_path))),
                fold(" ".join(person.old_units))))
    # the names alone, for the name tiers of the ranking: their words only, not the units' or titles'
    db.execute("INSERT INTO fullnames (rowid, name) VALUES (?, ?)", (number, " ".join(words)))


def open_index(path: Path) -> sqlite3.Connection:
    """Open the index read-only; SearchError when it is missing, unreadable or of another version."""
    if not path.exists():
        raise SearchError(f"there is no search index at {path}: build it with `mailmerge-gov directory index`")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise SearchError(f"the search index {path} cannot be read ({exc}): build it again") from exc
    if version != SCHEMA_VERSION:
        db.close()
        raise SearchError(f"the search index {path} was built by another version of mailmerge-gov: build it again "
                          "with `mailmerge-gov directory index`")
    return db


_open = threading.local()  # per thread: {index path: (the file's identity, its connection)}


@contextlib.contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the index, kept per thread until the file is replaced; SearchError if unusable."""
    # Opening the file and reading its schema costs more than most searches: a web server asks many times a
    # second. A rebuild replaces the file (a new inode), which the next request notices and reopens.
    try:
        status = path.stat()
    except OSError:
        raise SearchError(f"there is no search index at {path}: build it with `mailmerge-gov directory index`") from None
    identity = (status.st_ino, status.st_dev, status.st_mtime_ns, status.st_size)
    connections: dict[str, tuple[tuple, sqlite3.Connection]] = _open.__dict__.setdefault("connections", {})
    key = str(path)
    cached = connections.get(key)
    if cached is None or cached[0] != identity:
        if cached is not None:
            del connections[key]
            cached[1].close()
        connections[key] = (identity, open_index(path))
    db = connections[key][1]
    try:
        yield db
    except sqlite3.DatabaseError as exc:
        connections.pop(key, None)
        db.close()
        raise SearchError(f"the search index {path} cannot be read ({exc}): build it again") from exc


def search(path: Path, query: str, limit: int = 50, fields: Collection[str] | None = None) -> list[Person]:
    """Find active officials by name (diacritics optional), initials, address, phone, title or unit.

    `fields`: only these fields of an official are searched (config.WEB_FIELDS; the name always is); all when None.
    """
    text = query.strip()[:200]  # a name is short; a page of text is no query
    with reading(path) as db:
        ranked = _ranked(db, text, limit, fields)
        rows = {row[0]: row for row in db.execute(
            f"SELECT * FROM people WHERE id IN ({','.join('?' * len(ranked))})", ranked)} if ranked else {}
    return [person_from_row(rows[number]) for number in ranked if number in rows]


def _ranked(db: sqlite3.Connection, text: str, limit: int, fields: Collection[str] | None) -> list[int]:
    """Return the ids of the officials that match, best first."""
    def allowed(field: str) -> bool:
        return fields is None or field in fields

    folded = fold(text)
    if "@" in text:
        # an address is looked up whole: a near miss would name someone else as its owner
        kinds = [current for current, field in ((1, "mail"), (0, "old_addresses")) if allowed(field)]
        found = [row[0] for row in db.execute(
            f"SELECT person FROM addresses WHERE address = ? AND current IN ({','.join('?' * len(kinds))}) "
            "ORDER BY current DESC, person", (folded, *kinds))]
        return list(dict.fromkeys(found))[:limit]
    digits = _NOT_DIGIT.sub("", text)
    if len(digits) >= _PHONE_DIGITS and not re.search(r"[^\d\s+().\-]", text):
        kinds = [mobile for mobile, field in ((0, "phones"), (1, "mobile")) if allowed(field)]
        return list(dict.fromkeys(row[0] for row in db.execute(
            f"SELECT person FROM phones WHERE digits = ? AND mobile IN ({','.join('?' * len(kinds))}) ORDER BY person",
            (digits[-9:], *kinds))))[:limit]
    words = _WORD.findall(folded)
    if not words:
        return []
    whole = " ".join(words)
    columns = ["names", "initials"] + [column for field, column in _FIELD_COLUMNS.items() if allowed(field)]
    handle_kinds = [kind for column, kind in _HANDLE_KINDS.items() if column in columns]
    ranked: dict[int, None] = {}

    def take(sql: str, *parameters: object) -> None:
        """Add the next best officials, in name order (ids follow the Vietnamese order of names)."""
        if len(ranked) < limit:
            for (number,) in db.execute(sql + " LIMIT ?", (*parameters, limit + len(ranked))):
                ranked.setdefault(number)
                if len(ranked) >= limit:
                    break

    def words_match(expression: str, table: str = "words") -> None:
        take(f"SELECT rowid FROM {table} WHERE {table} MATCH ? ORDER BY rowid", expression)

    # Best first, each tier asked for no more than it can add: the exact name, or exactly a local part or
    # initials form; then every word a whole word of the name; then the name beginning with what was typed;
    # then every word the start of some word of the names, handles, title or unit. Each word is quoted, so
    # what a person types is never FTS5 syntax; private fields are left out by the column filter.
    take(f"SELECT DISTINCT person FROM handles WHERE handle = ? AND kind IN ({','.join('?' * len(handle_kinds))}) "
         "ORDER BY person", whole, *handle_kinds)
    words_match(" ".join(f'"{word}"' for word in words), "fullnames")
    words_match('^"' + whole + '"*', "fullnames")
    if allowed("unit") and len(ranked) < limit:
        _unit_members(db, whole, take)
    match = " ".join(f'"{word}"*' for word in words)
    words_match(("{" + " ".join(columns) + "} : (" + match + ")") if fields is not None else match)
    return list(ranked)


def _unit_members(db: sqlite3.Connection, whole: str, take) -> None:  # type: ignore[no-untyped-def]
    """Rank next the officials of the units (and units below them) whose names hold the words typed, in order."""
    # a unit's path below the top, "so tai chinh van phong", holds "so tai chinh" from a word's start
    units = [(code, members) for code, path, members in db.execute("SELECT code, folded_path, members FROM units")
             if f" {whole}" in f" {path}"]
    if not units:
        return
    codes = [code for code, _ in units]
    marks = ",".join("?" * len(codes))
    total = db.execute("SELECT max(id) FROM people").fetchone()[0] or 1  # ids are 1..n: no count(*) scan
    if sum(members for _, members in units) * 20 > total:
        # many officials: walk them in name order and stop at the limit ("+" keeps SQLite off the index)
        take(f"SELECT id FROM people WHERE +unit_code IN ({marks}) ORDER BY id", *codes)
    else:
        take(f"SELECT id FROM people WHERE unit_code IN ({marks}) ORDER BY id", *codes)


def person_from_row(row: Sequence) -> Person:
    """Rebuild a Person from its row."""
    def split(value: str) -> tuple[str, ...]:
        return tuple(value.split("\x1f")) if value else ()

    return Person(uid=row[1], full_name=row[2], title=row[4], unit=row[5], unit_path=split(row[6]), mail=row[7],
                  phones=split(row[8]), old_addresses=split(row[9]), old_units=split(row[10]), mobile=split(row[11]),
                  unit_code=row[12])
