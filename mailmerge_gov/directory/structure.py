"""The unit mapping file: the new organisation chart and where every old unit goes; drafting one."""

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
from mailmerge_gov.config import Config, Source
from mailmerge_gov.directory.model import NewUnit, Structure, UnitMapping
from mailmerge_gov.vietnamese import fold

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
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StructureError(f"{path}: cannot read the unit mapping file: {exc.strerror}") from exc
    try:
        # utf-8-sig: Excel saves CSV with a byte order mark; it is not part of the first column name.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StructureError(f"{path}, line {line}: the file is not valid UTF-8") from exc
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


# --- drafting ------------------------------------------------------------------------------------

_CONNECTIVES = frozenset({"va", "cac", "cua"})  # và, các, của: left out of department initials
_PROVINCE_WORDS = (("thanh", "pho"), ("tinh",), ("tp",))  # "Thành phố", "tỉnh", "TP." before a name


def _partly_merged(old_ward_code: int) -> bool | None:
    """Return whether an old ward was only partly merged (None: not in the 2025 conversion table)."""
    # vietnam_provinces exposes the old→new ward codes publicly (Ward.search_from_legacy) but the
    # "partly merged" flag of the official conversion table only in this private module; the flag
    # is what tells a whole commune from a part of one, so it is read here and nowhere else, and
    # tests/test_structure.py checks the module still has this shape.
    from vietnam_provinces import _ward_conversion_2025 as conversion

    entry = conversion.OLD_TO_NEW.get(old_ward_code)
    return None if entry is None else bool(entry.old_ward.is_partly_merged)


@dataclass(frozen=True)
class _Ward:
    """An old ward/commune and what the 2025 conversion made of it."""

    code: int
    name: str  # as the old directories spell a ward unit: "UBND Phường 4 Quận 3"
    new: tuple[tuple[int, str, int], ...]  # (code, name, province code) of each new ward
    partly: bool | None


def _old_wards(province: int) -> list[_Ward]:
    """Return the old wards of an old province with their successors, ordered by code."""
    from vietnam_provinces import Ward
    from vietnam_provinces import legacy

    wards = sorted(legacy.Ward.iter_by_province(legacy.ProvinceCode(province)), key=lambda w: w.code.value)
    counts: dict[str, int] = {}
    for ward in wards:
        counts[fold(ward.name)] = counts.get(fold(ward.name), 0) + 1
    result = []
    for ward in wards:
        name = f"UBND {ward.name}"
        # Numbered wards ("Phường 4") repeat in every district and a few names repeat across
        # districts (or differ only in marks: Tân Quý, Tân Quy), so the district tells them apart,
        # as the old directories do.
        if ward.name[-1].isdigit() or counts[fold(ward.name)] > 1:
            district = legacy.District.from_code(ward.district_code).name
            name = f"{name} {district.removeprefix('Thành phố ')}"
        new = tuple((found.ward.code.value, found.ward.name, found.ward.province_code.value)
                    for found in Ward.search_from_legacy(code=ward.code.value))
        result.append(_Ward(ward.code.value, name, new, _partly_merged(ward.code.value)))
    return result


def _ward_row(source: str, ward: _Ward, province: int, root: NewUnit) -> list[str]:
    """Return the mapping line of an old ward: ok only when it went whole into one new ward."""
    old_code = f"{ward.code:05d}"
    if len(ward.new) != 1 or ward.new[0][2] != province or ward.partly is None:
        # Split across several new wards, gone to another province, or not in the conversion
        # table: which new ward each official belongs to is a person's decision.
        return [source, ward.name, old_code, "", "", "", "needs review"]
    code, name, _ = ward.new[0]
    # Only partly merged into one new ward: the table says only part of the old commune went
    # there, so some of its staff may belong elsewhere; the new ward is written as a suggestion
    # that a person confirms.
    return [source, ward.name, old_code, f"{code:05d}", f"UBND {name}", root.code,
            "needs review" if ward.partly else "ok"]


def _words(text: str) -> tuple[list[str], list[str]]:
    """Return the words of a unit name as written and folded (a DN gives its first RDN value)."""
    dn = parse_dn(text)
    name = unicodedata.normalize("NFC", dn[0][0][1] if dn else text)
    written = re.findall(r"\w+", name)
    return written, [fold(word) for word in written]


def _province_names(source: Source) -> list[list[str]]:
    """Return the folded word lists a department name may end with to say its province."""
    from vietnam_provinces import legacy

    names = [source.unit_name]
    if source.code.isdigit():
        try:
            names.append(legacy.Province.from_code(legacy.ProvinceCode(int(source.code))).name)
        except ValueError:
            pass
    result = []
    for name in names:
        words = _words(name)[1]
        result.append(words)
        for prefix in _PROVINCE_WORDS:
            if tuple(words[: len(prefix)]) == prefix and len(words) > len(prefix):
                result.append(words[len(prefix):])
    return sorted(result, key=len, reverse=True)


def _strip_province(written: list[str], folded: list[str], names: list[list[str]]) -> tuple[list[str], list[str]]:
    """Drop a trailing province ("tỉnh Bình Dương", "Thành phố", "tỉnh") from a department name."""
    end = len(folded)
    for name in names:
        if len(name) < end and folded[end - len(name): end] == name:
            end -= len(name)
            break
    for word in _PROVINCE_WORDS:
        if len(word) < end and tuple(folded[end - len(word): end]) == word:
            end -= len(word)
            break
    return written[:end], folded[:end]


def _initials(written: list[str]) -> str:
    """Return the code letters of a department: first letters, abbreviations kept whole."""
    letters = []
    for word in written:
        folded = fold(word)
        if folded in _CONNECTIVES:
            continue
        if word.isdigit() or (len(word) > 1 and word.isupper()):
            letters.append(folded.upper())  # UBND, GD, ĐT, 1: already an abbreviation or a number
        else:
            letters.append(folded[0].upper())
    return "".join(letters) or "DV"  # đơn vị: a name with no letters still gets a code


def _codes(prefix: str, initials: Iterable[tuple[str, str]], kept: Mapping[str, str]) -> dict[str, str]:
    """Give each key a code prefix.INITIALS, in key order, suffixing 2, 3 … on a collision."""
    result = {key: kept[key] for key, _ in initials if key in kept}
    taken = set(kept.values())
    for key, letters in sorted(initials):
        if key in result:
            continue
        code, number = f"{prefix}.{letters}", 1
        while code in taken:
            number += 1
            code = f"{prefix}.{letters}{number}"
        taken.add(code)
        result[key] = code
    return result


@dataclass(frozen=True)
class _Department:
    """A department as one source spells it, with its matching key and code letters."""

    spelled: str
    key: str  # folded name without the province: "so tai chinh"
    initials: str


def _departments(source: Source, names: Iterable[str], skip: set[str]) -> list[_Department]:
    """Return a source's departments, sorted, without repeats and without units already written."""
    province = _province_names(source)
    result: dict[str, _Department] = {}
    for spelled in names:
        spelled = (spelled or "").strip()
        if not spelled or spelled in result or fold(spelled) in skip:
            continue
        written, folded = _strip_province(*_words(spelled), province)
        result[spelled] = _Department(spelled, " ".join(folded), _initials(written))
    return sorted(result.values(), key=lambda d: (d.key, fold(d.spelled), d.spelled))


def _new_departments(root: NewUnit, surviving: list[_Department],
                     existing: Structure | None) -> dict[str, tuple[str, str]]:
    """Return the new chart's departments, the surviving unit's: matching key → (code, name)."""
    # Codes an earlier file gave stay as they were: they may already be in the new directory.
    earlier = {fold(u.name): (u.code, u.name) for u in existing.units if u.code != root.code} if existing else {}
    kept = {d.key: earlier[fold(d.spelled)] for d in surviving if fold(d.spelled) in earlier}
    codes = _codes(root.code, {(d.key, d.initials) for d in surviving}, {k: code for k, (code, _) in kept.items()})
    result: dict[str, tuple[str, str]] = {}
    for department in surviving:
        # Several spellings of one department make one new unit, named as the earlier file or
        # else the first spelling (in sorted order) names it.
        name = kept[department.key][1] if department.key in kept else department.spelled
        result.setdefault(department.key, (codes[department.key], name))
    return result


def draft_structure(province_code: str, config: Config, departments: Mapping[str, Iterable[str]],
                    existing: Structure | None = None) -> str:
    """Return a unit mapping file (CSV) drafted from the official 2025 lists and the departments found."""
    from vietnam_provinces import Province, ProvinceCode

    if not province_code.isdigit():
        raise StructureError(f"province '{province_code}' is not a province code (digits, e.g. 79)")
    province = int(province_code)
    try:
        new_province = Province.from_code(ProvinceCode(province))
    except ValueError:
        raise StructureError(f"province {province_code} is not one of the 34 provinces of 2025") from None
    target = config.target
    if target.code.isdigit() and int(target.code) != province:
        raise StructureError(f"{config.path.name}: the target's code is {target.code}, "
                             f"not the province {province_code} asked for")
    old_provinces = sorted(p.code.value for p in new_province.get_legacy_sources())
    for source in config.sources:
        if not source.code.isdigit() or int(source.code) not in old_provinces:
            listed = ", ".join(f"{code:02d}" for code in old_provinces)
            raise StructureError(f"{config.path.name}: source {source.name} has code {source.code}, which is "
                                 f"not an old province merged into {province_code} ({listed})")
    names = [source.name for source in config.sources]
    for name in departments:
        if name not in names:
            raise StructureError(f"departments given for unknown source '{name}'; the sources are {', '.join(names)}")

    root = NewUnit(target.code, target.name)
    rows = [list(COLUMNS)]
    rows += [[s.name, s.unit_name, s.code, root.code, root.name, "", "ok"] for s in config.sources]
    found: dict[str, list[_Department]] = {}
    wards: dict[str, list[list[str]]] = {}
    for source in config.sources:
        wards[source.name] = [_ward_row(source.name, w, province, root) for w in _old_wards(int(source.code))]
        # Units already on a province or ward line are not departments, whatever the readers found.
        written = {fold(source.unit_name)} | {fold(row[1]) for row in wards[source.name]}
        found[source.name] = _departments(source, departments.get(source.name, ()), written)
    surviving = next((s.name for s in config.sources if int(s.code) == province), None)
    new_units = _new_departments(root, found[surviving] if surviving else [], existing)
    # Codes an earlier file gave to old departments stay too: the state store keeps them as history.
    kept_old = {(m.source, m.old_unit): m.old_code for m in existing.mappings if m.old_code} if existing else {}
    for source in config.sources:
        kept = {d.spelled: kept_old[source.name, d.spelled] for d in found[source.name]
                if (source.name, d.spelled) in kept_old}
        old_codes = _codes(source.code, {(d.spelled, d.initials) for d in found[source.name]}, kept)
        for department in found[source.name]:
            code, name = new_units.get(department.key, ("", ""))
            rows.append([source.name, department.spelled, old_codes[department.spelled], code, name,
                         root.code if code else "", "ok" if code else "needs review"])
        rows += wards[source.name]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
