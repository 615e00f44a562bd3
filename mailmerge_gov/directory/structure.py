"""The unit mapping file: the new organisation chart and where every old unit goes."""

from __future__ import annotations

import csv
import io
import re
import tomllib
import unicodedata
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailmerge_gov import tomlpos
from mailmerge_gov.config import Config
from mailmerge_gov.directory.model import NewUnit, Structure, UnitMapping
from mailmerge_gov.vietnamese import fold
from mailmerge_gov.textfile import read_utf8

STATUSES = ("ok", "needs review")
COLUMNS = ("source", "old_unit", "old_code", "new_code", "new_name", "new_parent_code", "status")
MATCH_RULES = ("exact name", "exact code", "folded name", "folded code", "DN to name")

_CODE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")  # the same shape config.py accepts for codes
_CODE_HELP = "is not a unit code (letters, digits, '.', '-', '_')"


class StructureError(Exception):
    """The unit mapping file (or a draft of one) cannot be used; the message names file and line."""


# --- loading -------------------------------------------------------------------------------------


class _Place:
    """Where a line of the mapping file is, for messages: file, line, and TOML key lines."""

    def __init__(self, file: str, line: int, key: str = "", fields: Mapping[str, int] | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key  # TOML only: "map[2]"; CSV lines have no key
        self.fields = fields or {}

    def line_of(self, field: str | None) -> int:
        """Return the line of a field (TOML keys have their own lines; a CSV line is one line)."""
        return self.fields.get(field, self.line) if field else self.line

    def error(self, message: str, field: str | None = None) -> StructureError:
        """Build an error naming the file, the line (of the field, in TOML) and the key."""
        line = self.line_of(field)
        key = self.key + (f".{field}" if field and self.key else "")
        return StructureError(f"{self.file}, line {line}: {key + ': ' if key else ''}{message}")


@dataclass(frozen=True)
class _UnitLine:
    """A new unit as one line of the file declares it."""

    code: str
    name: str
    parent: str | None  # None: a child of the target
    place: _Place
    listed: bool = False  # TOML [[units]]: a second declaration is an error, not a repetition


@dataclass(frozen=True)
class _MapLine:
    """A mapping line as read, before the new units are known."""

    source: str
    old_unit: str
    old_code: str | None
    new_code: str | None
    status: str
    place: _Place


def load_structure(path: Path, config: Config) -> Structure:
    """Read and check a unit mapping file (.csv or .toml); raise StructureError naming the line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".toml"):
        raise StructureError(f"{path}: a unit mapping file is a .csv or a .toml file")
    text = read_utf8(path, "unit mapping file", StructureError)
    units, maps = (_read_toml if suffix == ".toml" else _read_csv)(str(path), text, config)
    return _build(units, maps, config)


def _read_csv(file: str, text: str, config: Config) -> tuple[list[_UnitLine], list[_MapLine]]:
    """Read the CSV format: one mapping per line, the new unit declared on the same line."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise StructureError(f"{file}, line 1: the file is empty; the first line is the header "
                             f"{','.join(COLUMNS)}") from None
    start = _Place(file, 1)
    for name in header:
        if name not in COLUMNS:
            raise start.error(f"unknown column '{name}'; the header is {','.join(COLUMNS)}")
        if header.count(name) > 1:
            raise start.error(f"column '{name}' is given twice")
    for name in COLUMNS:
        if name not in header:
            raise start.error(f"missing column '{name}'; the header is {','.join(COLUMNS)}")
    units: list[_UnitLine] = []
    maps: list[_MapLine] = []
    while True:
        # csv counts physical lines, so a quoted value spanning lines still gets its first line.
        number = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise StructureError(f"{file}, line {number}: not valid CSV: {exc}") from exc
        if not any(value.strip() for value in row):
            continue  # blank lines (and Excel's rows of empty cells) carry nothing
        place = _Place(file, number)
        if len(row) != len(header):
            raise place.error(f"expected {len(header)} fields, found {len(row)}")
        # spreadsheets pad cells with spaces; no code or name begins or ends with one
        values = {name: value.strip() for name, value in zip(header, row)}
        unit, mapping = _csv_line(values, place, config)
        if unit:
            units.append(unit)
        maps.append(mapping)
    return units, maps


def _csv_line(values: dict[str, str], place: _Place, config: Config) -> tuple[_UnitLine | None, _MapLine]:
    """Check one CSV line on its own and split it into a unit declaration and a mapping."""
    mapping = _mapping(values["source"], values["old_unit"], values["old_code"], values["new_code"],
                       values["status"], place, config, {})
    name, parent = values["new_name"], values["new_parent_code"]
    if not mapping.new_code:
        if name or parent:
            raise place.error("new_name or new_parent_code is given but new_code is empty")
        return None, mapping
    if not name:
        raise place.error(f"new unit {mapping.new_code} has no new_name")
    if parent and not _CODE.match(parent):
        raise place.error(f"new_parent_code '{parent}' {_CODE_HELP}")
    return _UnitLine(mapping.new_code, name, parent or None, place), mapping


def _mapping(source: str, old_unit: str, old_code: str, new_code: str, status: str, place: _Place,
             config: Config, keys: Mapping[str, str]) -> _MapLine:
    """Check the mapping fields shared by both formats; keys name them as the format does."""
    names = [s.name for s in config.sources]
    if source not in names:
        raise place.error(f"unknown source '{source}'; the sources are {', '.join(names)}", keys.get("source"))
    if status not in STATUSES:
        raise place.error(f"unknown status '{status}'; use 'ok' or 'needs review'", keys.get("status"))
    if not old_unit and not old_code:
        raise place.error("names no old unit: give old_unit or old_code")
    for field, value in (("old_code", old_code), ("new_code", new_code)):
        if value and not _CODE.match(value):
            raise place.error(f"{field} '{value}' {_CODE_HELP}", keys.get(field))
    if status == "ok" and not new_code:
        raise place.error("status 'ok' needs a new_code (write 'needs review' until the new unit is known)",
                          keys.get("status"))
    return _MapLine(source, old_unit, old_code or None, new_code or None, status, place)


_TOML_UNIT_KEYS = ("code", "name", "parent")
_TOML_MAP_KEYS = ("source", "old_unit", "old_code", "new_code", "status")


def _read_toml(file: str, text: str, config: Config) -> tuple[list[_UnitLine], list[_MapLine]]:
    """Read the TOML format: [[units]] declare the new chart, [[map]] send old units to it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{file}, line {match.group(1)}" if match else file
        reason = str(exc)[: match.start()].strip() if match else str(exc)
        raise StructureError(f"{where}: not valid TOML: {reason}") from exc
    lines = tomlpos.key_lines(text)
    top = _Place(file, 1)
    for key in data:
        if key not in ("units", "map"):
            raise _Place(file, tomlpos.line_of(lines, (key,)) or 1, key).error(
                f"unknown key '{key}'; the file has [[units]] and [[map]] tables")
    units = [_UnitLine(table["code"], table["name"], table.get("parent"), place, listed=True)
             for table, place in _toml_tables(file, data, lines, "units", _TOML_UNIT_KEYS, ("code", "name"))]
    for unit in units:
        for field, value in (("code", unit.code), ("parent", unit.parent)):
            if value is not None and not _CODE.match(value):
                raise unit.place.error(f"{field} '{value}' {_CODE_HELP}", field)
    maps = []
    for table, place in _toml_tables(file, data, lines, "map", _TOML_MAP_KEYS, ("source",)):
        keys = {field: field for field in _TOML_MAP_KEYS}
        maps.append(_mapping(table["source"], table.get("old_unit", ""), table.get("old_code", ""),
                             table.get("new_code", ""), table.get("status", "ok"), place, config, keys))
    if not maps:
        raise top.error("no [[map]] tables: every old unit needs one")
    return units, maps


def _toml_tables(file: str, data: dict[str, Any], lines: dict[tomlpos.Path, int], name: str,
                 allowed: tuple[str, ...], required: tuple[str, ...]) -> Iterable[tuple[dict[str, str], _Place]]:
    """Yield each table of an array of tables with its place, checked: known keys, string values."""
    tables = data.get(name, [])
    if not isinstance(tables, list):
        raise _Place(file, tomlpos.line_of(lines, (name,)) or 1, name).error(f"expected [[{name}]] tables")
    for index, table in enumerate(tables):
        path: tomlpos.Path = (name, index)
        place = _Place(file, tomlpos.line_of(lines, path) or 1, f"{name}[{index + 1}]")
        if not isinstance(table, dict):
            raise place.error(f"expected [[{name}]] tables")
        place.fields = {key: lines[path + (key,)] for key in table if path + (key,) in lines}
        for key, value in table.items():
            if key not in allowed:
                raise place.error(f"unknown key '{key}'", key)
            if isinstance(value, int) and not isinstance(value, bool):
                # Codes like 79 are codes, not numbers: leading zeros of ward codes (00004) matter.
                raise place.error(f'write the value as a string ("{value}") so leading zeros are kept', key)
            if not isinstance(value, str):
                raise place.error(f"expected a string, got {type(value).__name__}", key)
        for key in required:
            if not table.get(key, "").strip():
                raise place.error("missing required key", key)
        yield {key: value.strip() for key, value in table.items()}, place


def _build(units: list[_UnitLine], maps: list[_MapLine], config: Config) -> Structure:
    """Check the lines against each other and return the chart and the mappings."""
    root = NewUnit(config.target.code, config.target.name, None)
    declared: dict[str, _UnitLine] = {}
    for unit in units:
        parent = None if unit.parent == root.code else unit.parent
        if unit.code == root.code:
            _check_root(unit, root, config)
            continue
        first = declared.get(unit.code)
        if first is None:
            declared[unit.code] = _UnitLine(unit.code, unit.name, parent, unit.place, unit.listed)
        elif unit.listed:
            raise unit.place.error(f"unit {unit.code} is listed twice (also on line {first.place.line_of('code')})",
                                   "code")
        elif _same(first.name) != _same(unit.name):
            raise unit.place.error(
                f"new unit {unit.code} is named '{unit.name}' here but '{first.name}' on line {first.place.line}")
        elif first.parent != parent:
            raise unit.place.error(
                f"new unit {unit.code} has parent {parent or root.code} here but "
                f"{first.parent or root.code} on line {first.place.line}")
    for unit in declared.values():
        if unit.parent is None or unit.parent in declared:
            continue
        if unit.listed:
            raise unit.place.error(f"parent '{unit.parent}' is not a unit: list it in [[units]]", "parent")
        raise unit.place.error(f"new_parent_code '{unit.parent}' is not a new unit: no line has it as new_code")
    _check_cycles(declared)
    mappings = _check_mappings(maps, declared, root)
    chart = (root,) + tuple(NewUnit(u.code, u.name, u.parent or root.code) for u in declared.values())
    return Structure(units=chart, mappings=mappings)


def _check_root(unit: _UnitLine, root: NewUnit, config: Config) -> None:
    """A line that names the target must agree with the consolidation file and have no parent."""
    field = "name" if unit.listed else None
    if unit.parent is not None:
        raise unit.place.error(f"new unit {root.code} is the target and cannot have a parent "
                               f"('{unit.parent}' given)", "parent" if unit.listed else None)
    if _same(unit.name) != _same(root.name):
        raise unit.place.error(f"new unit {root.code} is the target, named '{root.name}' in "
                               f"{config.path.name}, but '{unit.name}' here", field)


def _same(name: str) -> str:
    """Return a name as compared between lines: NFC, single spaces (spelling and case do count)."""
    return " ".join(unicodedata.normalize("NFC", name).split())


def _check_cycles(declared: dict[str, _UnitLine]) -> None:
    """Refuse a unit that is its own ancestor (the chart must be a tree under the target)."""
    done: set[str] = set()
    for start in declared.values():
        chain: list[str] = []
        code: str | None = start.code
        while code is not None and code not in done:
            if code in chain:
                loop = chain[chain.index(code):] + [code]
                first = min((declared[c] for c in loop), key=lambda u: u.place.line)
                at = loop.index(first.code)
                path = loop[at:-1] + loop[:at] + [first.code]
                raise first.place.error(f"new unit {first.code} is its own ancestor: {' → '.join(path)}",
                                        "parent" if first.listed else None)
            chain.append(code)
            code = declared[code].parent
        done.update(chain)


def _check_mappings(maps: list[_MapLine], declared: dict[str, _UnitLine], root: NewUnit) -> tuple[UnitMapping, ...]:
    """Refuse an old unit mapped twice or a mapping to an unknown unit; return the mappings."""
    names: dict[tuple[str, str], _MapLine] = {}
    codes: dict[tuple[str, str], _MapLine] = {}
    result = []
    for line in maps:
        if line.new_code and line.new_code != root.code and line.new_code not in declared:
            # Only TOML can get here: a CSV line declares the unit it maps to.
            raise line.place.error(f"new_code '{line.new_code}' is not a unit: list it in [[units]]", "new_code")
        for seen, value, field in ((names, line.old_unit, "old_unit"), (codes, line.old_code, "old_code")):
            if not value:
                continue
            first = seen.setdefault((line.source, value), line)
            if first is not line:
                what = field.replace("_", " ")
                raise line.place.error(f"{what} '{value}' of source {line.source} is mapped twice "
                                       f"(also on line {first.place.line_of(field)})", field)
        review = line.status != "ok"
        result.append(UnitMapping(
            source=line.source, old_unit=line.old_unit, old_code=line.old_code,
            new_code=None if review else line.new_code, status=line.status, line=line.place.line,
            proposed_code=line.new_code if review else None,
        ))
    return tuple(result)


# --- matching ------------------------------------------------------------------------------------

_DN_TYPE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)\s*=")


def parse_dn(text: str) -> tuple[tuple[tuple[str, str], ...], ...] | None:
    """Return the RDNs of a DN as ((type, value), ...) tuples, values unescaped; None if not a DN."""
    rdns: list[tuple[tuple[str, str], ...]] = []
    avas: list[tuple[str, str]] = []
    rest = text.strip()
    while True:
        match = _DN_TYPE.match(rest)
        if not match:
            return None
        rest = rest[match.end():].lstrip()
        value, rest, separator = _dn_value(rest)
        if value is None:
            return None
        avas.append((match.group(1).lower(), value))
        if separator != "+":
            rdns.append(tuple(avas))
            avas = []
        if separator is None:
            return tuple(rdns)
        rest = rest.lstrip()


def _dn_value(text: str) -> tuple[str | None, str, str | None]:
    """Read one RFC 4514 attribute value; return it, the text after its separator, and the separator."""
    raw = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            pair = text[index + 1: index + 3]
            if re.fullmatch(r"[0-9A-Fa-f]{2}", pair):
                # Hex pairs are UTF-8 bytes: \C3\A0 is "à", so collect bytes and decode at the end.
                raw.append(int(pair, 16))
                index += 3
                continue
            if index + 1 >= len(text):
                return None, "", None
            raw += text[index + 1].encode()
            index += 2
            continue
        if char in ",;+":
            return _decode(raw), text[index + 1:], "+" if char == "+" else ","
        raw += char.encode()
        index += 1
    return _decode(raw), "", None


def _decode(raw: bytearray) -> str | None:
    """Decode an unescaped DN value; trailing unescaped spaces are not part of it."""
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def _name_key(text: str) -> str:
    """Return the folded key of a unit name; a DN is compared RDN by RDN, spacing ignored."""
    dn = parse_dn(text)
    if dn is None:
        return fold(text)
    return ",".join("+".join(f"{kind}={fold(value)}" for kind, value in sorted(rdn)) for rdn in dn)


def _rdn_key(text: str) -> str:
    """Return the folded first RDN value of a DN, or the folded name itself."""
    dn = parse_dn(text)
    return fold(dn[0][0][1]) if dn else fold(text)


@dataclass(frozen=True)
class _Index:
    """Lookups of one Structure: units by code and mappings by (source, key) for each rule."""

    units: dict[str, NewUnit]
    rules: tuple[dict[tuple[str, str], list[UnitMapping]], ...]


# map_unit is called once per directory record (tens of thousands); building the lookups once per
# Structure keeps it a dictionary access. Keyed by id() with a weak reference, because a Structure
# hashes by value (slow for thousands of lines) and must not be kept alive by this cache.
_INDEXES: dict[int, tuple[weakref.ref[Structure], _Index]] = {}


def _keys(old_unit: str, old_code: str | None) -> tuple[str | None, ...]:
    """Return the key of an old unit under each matching rule, in MATCH_RULES order."""
    return (old_unit or None, old_code or None, _name_key(old_unit) if old_unit else None,
            fold(old_code) if old_code else None, _rdn_key(old_unit) if old_unit else None)


def _index(structure: Structure) -> _Index:
    """Return the lookups of a Structure, built on first use."""
    entry = _INDEXES.get(id(structure))
    if entry is not None and entry[0]() is structure:
        return entry[1]
    rules: tuple[dict[tuple[str, str], list[UnitMapping]], ...] = tuple({} for _ in MATCH_RULES)
    for mapping in structure.mappings:
        for rule, key in zip(rules, _keys(mapping.old_unit, mapping.old_code)):
            if key is not None:
                rule.setdefault((mapping.source, key), []).append(mapping)
    index = _Index({unit.code: unit for unit in structure.units}, rules)
    key = id(structure)
    _INDEXES[key] = (weakref.ref(structure, lambda _ref: _INDEXES.pop(key, None)), index)
    return index


def map_unit(structure: Structure, source: str, old_unit: str | None) -> UnitMapping | None:
    """Return the mapping line of a record's old unit, or None when no line (or several) match."""
    if old_unit is None or not old_unit.strip():
        return None
    text = old_unit.strip()
    # The record's unit is one string; it may be a name, a DN or a code, so every rule gets it.
    keys = (text, text, _name_key(text), fold(text), _rdn_key(text))
    for rule, key in zip(_index(structure).rules, keys):
        found = rule.get((source, key), [])
        if len(found) == 1:
            return found[0]
        if found:
            return None  # two lines fit equally well: a person decides, nothing is guessed
    return None


def unit_path(structure: Structure, code: str) -> tuple[NewUnit, ...]:
    """Return the new units from the root down to the unit with this code; KeyError if unknown."""
    units = _index(structure).units
    path = [units[code]]
    while path[-1].parent_code is not None:
        if len(path) > len(units):
            raise StructureError(f"new unit {code} is its own ancestor")
        path.append(units[path[-1].parent_code])
    return tuple(reversed(path))
