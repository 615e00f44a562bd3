"""Drafting a unit mapping file from the official 2025 lists (vietnam_provinces) and the departments found."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mailmerge_gov.config import Config, Source
from mailmerge_gov.directory.model import NewUnit, Structure
from mailmerge_gov.directory.structure import COLUMNS, StructureError, parse_dn
from mailmerge_gov.vietnamese import fold

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
