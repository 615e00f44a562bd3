"""Read one old directory (an LDIF export, an LDAP server or a CSV file, plus an HR export) into SourceRecords."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import ldap3
import ldap3.core.exceptions
import orjson

from mailmerge_gov.config import DirectoryConfig, LdapServer, SecretError, Source
from mailmerge_gov.ldapconn import LdapConnectError, failure_reason, open_connection, result_reason
from mailmerge_gov.directory.ldif import LdifError, read_ldif
from mailmerge_gov.directory.model import RawAttributes, SourceRecord
from mailmerge_gov.directory.presets import (
    PRESETS, EntryError, FieldMap, Parsed, check_address, field_map, keep_raw, normalize_dn, parse_date, read_entry,
)

__all__ = ["PAGE_SIZE", "RecordRows", "SourceError", "SourceRead", "read_source", "record_json", "records_digest"]

# Entries per LDAP page. AD answers at most 1,000 per page (MaxPageSize) and OpenLDAP's default
# size limit is 500; 500 stays under both, and a page of 500 entries is a few hundred KB.
PAGE_SIZE = 500
_PAGED_RESULTS = "1.2.840.113556.1.4.319"  # RFC 2696 control OID, where ldap3 puts the cookie

CSV_REQUIRED = ("employee_id", "full_name", "citizen_id", "date_of_birth", "unit", "title", "phone")
CSV_OPTIONAL = ("mail", "aliases", "mobile", "disabled")
_TRUE = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}


class SourceError(Exception):
    """A source cannot be read; the message names the file and line, or the LDAP URL and DN."""


@dataclass(frozen=True)
class SourceRead:
    """What one source holds: its records, a digest to notice later changes, and notes for a person."""

    records: tuple[SourceRecord, ...]
    warnings: tuple[str, ...] = ()

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the records' canonical form (see records_digest), worked out when first asked."""
        return records_digest(self.records)

    @property
    def people(self) -> tuple[SourceRecord, ...]:
        """The person records (role mailboxes included)."""
        return tuple(record for record in self.records if record.kind == "person")

    @property
    def groups(self) -> tuple[SourceRecord, ...]:
        """The group records."""
        return tuple(record for record in self.records if record.kind == "group")


def read_source(source: Source) -> SourceRead:
    """Read one old directory into records, joined with its HR export when it names one."""
    directory = source.directory
    if directory.kind == "csv":
        if directory.attributes:
            raise SourceError(f"source {source.name}: directory.attributes: overrides apply to LDAP and LDIF "
                              f"sources; a CSV file names its columns ({', '.join(CSV_REQUIRED + CSV_OPTIONAL)})")
        assert directory.path is not None
        records, warnings = _csv_records(source.name, directory.path)
    else:
        try:
            rules = field_map(PRESETS[directory.preset], directory.attributes)
        except EntryError as exc:
            raise SourceError(f"source {source.name}: directory.attributes: {exc}") from None
        if directory.kind == "ldif":
            assert directory.path is not None
            records, warnings = _read_entries(source.name, rules, _ldif_entries(directory.path),
                                              directory.path.name)
        elif directory.kind == "ldap":
            assert directory.ldap is not None
            # '*' leaves out operational attributes, and two the presets read are operational on
            # OpenLDAP (pwdAccountLockedTime of ppolicy, memberOf of the memberof overlay): name them all.
            wanted = sorted({name for _, names in rules.fields for name in names})
            with contextlib.closing(_ldap_entries(directory.ldap, wanted)) as entries:
                records, warnings = _read_entries(source.name, rules, entries, directory.ldap.url)
        else:
            raise SourceError(f"source {source.name}: unknown directory kind '{directory.kind}'")
    if directory.hr_csv is not None:
        records, more = _join_hr(records, directory.hr_csv)
        warnings += more
    return SourceRead(records=tuple(records), warnings=tuple(warnings))


# The canonical form of a record: every field but `line` (a comment added to an export moves lines
# without changing any data), as JSON with sorted keys. The store keeps exactly this text, and the
# digest is taken over it: a plan encodes each record once, not once for each.
_CANONICAL = tuple(field.name for field in dataclasses.fields(SourceRecord) if field.name != "line")


def record_json(record: SourceRecord) -> str:
    """Return a record's canonical form (fields one level deep: dataclasses.asdict is 10x slower)."""
    # orjson: three times faster than the json module, and 100,000 records are encoded per plan
    return orjson.dumps({name: getattr(record, name) for name in _CANONICAL}, option=orjson.OPT_SORT_KEYS).decode()


class RecordRows:
    """A source's records as the store keeps them, (dn, kind, line, canonical JSON) in DN order, digested as taken."""

    def __init__(self, records: Sequence[SourceRecord]) -> None:
        # Sorted by DN: an LDAP server may return entries in any order. The DN as written is enough
        # (normalising 100,000 of them took a second): a source never has two entries with one DN.
        self.records = sorted(records, key=lambda record: record.dn)
        self._digest = hashlib.sha256(json.dumps(list(_CANONICAL)).encode() + b"\n")
        self._taken = 0

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[tuple[str, str, int | None, str]]:
        if self._taken:
            raise RuntimeError("the rows of a read are taken once (the digest is taken over them)")
        for record in self.records:
            text = record_json(record)
            self._digest.update(text.encode() + b"\n")
            self._taken += 1
            yield record.dn, record.kind, record.line, text

    def hexdigest(self) -> str:
        """Return the SHA-256 of every row's JSON; all of them must have been taken."""
        if self._taken != len(self.records):
            raise RuntimeError("the digest of a read is known once all its rows are taken")
        return self._digest.hexdigest()


def records_digest(records: Sequence[SourceRecord]) -> str:
    """Return the SHA-256 of the records' canonical form, in DN order."""
    rows = RecordRows(records)
    for _ in rows:
        pass
    return rows.hexdigest()


# --- entries to records --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One entry as a reader delivers it, with where it came from for messages."""

    dn: str
    attributes: RawAttributes
    line: int | None
    origin: str  # "<file>, line 12" or "<LDAP URL>"


def _read_entries(name: str, rules: FieldMap, entries: Iterator[_Entry],
                  label: str) -> tuple[list[SourceRecord], list[str]]:
    """Turn entries into records; refuse duplicate DNs; resolve group members; fill member_of."""
    parsed: list[Parsed] = []
    seen: dict[str, int | None] = {}
    keys: dict[str, str] = {}  # DN as written -> normalised, worked out once
    for entry in entries:
        key = keys[entry.dn] = normalize_dn(entry.dn)
        if key in seen:
            first = f"also at line {seen[key]}" if seen[key] is not None else "returned twice"
            raise SourceError(f"{entry.origin}: duplicate DN '{entry.dn}' ({first})")
        seen[key] = entry.line
        try:
            item = read_entry(rules, name, entry.dn, entry.attributes, entry.line)
        except EntryError as exc:
            raise SourceError(f"{entry.origin}: '{entry.dn}': {exc}") from None
        if item is not None:
            parsed.append(item)
    return _link_groups(parsed, label, keys)


def _link_groups(parsed: list[Parsed], label: str,
                 keys: dict[str, str] | None = None) -> tuple[list[SourceRecord], list[str]]:
    """Resolve members named by uid or address to DNs, and give every person the groups it is in."""
    by_uid: dict[str, str] = {}
    by_address: dict[str, str] = {}
    # people first, so that an address shared by a person and a list resolves to the person
    for item in sorted(parsed, key=lambda p: p.record.kind != "person"):
        record = item.record
        if record.kind == "person" and record.uid:
            by_uid.setdefault(record.uid.lower(), record.dn)
        for address in record.addresses:
            by_address.setdefault(address, record.dn)
    warnings: list[str] = []
    records: list[SourceRecord] = []
    member_of: dict[str, list[str]] = {}
    for item in parsed:
        record = item.record
        if record.kind == "group":
            members = list(record.members)
            for uid in item.member_uids:
                dn = by_uid.get(uid.lower())
                if dn is None:
                    where = f"{label} line {record.line}" if record.line is not None else label
                    warnings.append(f"{where}: group '{record.dn}': memberUid '{uid}' has no account in this "
                                    "source; left out")
                else:
                    members.append(dn)
            # A Zimbra list names its members by address: the DN of the account that has the address,
            # else the address itself (an outside recipient, still a member the new list must keep).
            members += [by_address.get(address, address) for address in item.member_addresses]
            record = dataclasses.replace(record, members=_unique(members))
            for member in record.members:
                member_of.setdefault(normalize_dn(member), []).append(record.dn)
        records.append(record)
    if member_of:
        for index, record in enumerate(records):
            if record.kind != "person":
                continue
            groups = member_of.get((keys or {}).get(record.dn) or normalize_dn(record.dn))
            if groups:
                records[index] = dataclasses.replace(record, member_of=_unique(record.member_of + tuple(groups)))
    return records, warnings


def _unique(dns: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Return DNs (or addresses) without repeats compared normalised, first spelling kept."""
    seen: dict[str, str] = {}
    for dn in dns:
        seen.setdefault(normalize_dn(dn) if "=" in dn else dn.lower(), dn)
    return tuple(seen.values())


# --- LDIF ----------------------------------------------------------------------------------------


def directory_entries(directory: DirectoryConfig) -> Iterator[tuple[str, RawAttributes]]:
    """Yield (DN, attributes) of every entry of an LDAP directory or LDIF file; SourceError when unreadable."""
    if directory.kind == "ldif" and directory.path is not None:
        entries = _ldif_entries(directory.path)
    elif directory.kind == "ldap" and directory.ldap is not None:
        entries = _ldap_entries(directory.ldap, ["mailmergeAccountStatus"])
    else:
        raise SourceError(f"a {directory.kind} directory cannot be read as entries")
    with contextlib.closing(entries):
        for entry in entries:
            yield entry.dn, entry.attributes


def _ldif_entries(path: Path) -> Iterator[_Entry]:
    """Stream the entries of an LDIF export; SourceError for unreadable or malformed input."""
    try:
        with path.open(encoding="utf-8") as stream:
            for entry in read_ldif(stream, str(path)):
                yield _Entry(entry.dn, entry.attributes, entry.line, f"{path}, line {entry.line}")
    except LdifError as exc:
        raise SourceError(str(exc)) from None
    except UnicodeDecodeError:
        raise SourceError(f"{path}, line {_first_bad_line(path)}: not UTF-8 text") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None


def _first_bad_line(path: Path) -> int:
    """Return the number of the first line that is not UTF-8 (only called after a decode error)."""
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


# --- LDAP ----------------------------------------------------------------------------------------


def _ldap_entries(server: LdapServer, wanted: list[str]) -> Iterator[_Entry]:
    """Bind and read the whole subtree under the base DN, page by page (RFC 2696)."""
    url = server.url
    try:
        password = server.password.reveal() if server.password else None
    except SecretError as exc:
        raise SourceError(f"{url}: cannot read the bind password: {exc}") from None
    try:
        connection = open_connection(server, password, read_only=True)
    except LdapConnectError as exc:
        raise SourceError(f"{url}: {exc}") from None
    try:
        cookie: bytes | None = None
        while True:
            # Our own page loop, not ldap3's paged_search generator: that one yields each page
            # backwards and, without raise_exceptions, ends silently on an error such as
            # sizeLimitExceeded: a partial directory must never look like a whole one.
            connection.search(server.base_dn, "(objectClass=*)", ldap3.SUBTREE, attributes=["*", *wanted],
                              paged_size=PAGE_SIZE, paged_cookie=cookie)
            if connection.result["result"] != 0:
                raise SourceError(f"{url}: search of '{server.base_dn}' failed: {result_reason(connection)}")
            for item in connection.response or ():
                if item.get("type") == "searchResEntry":  # referrals (AD's DomainDnsZones …) are not entries
                    yield _Entry(item["dn"], _decoded(item["raw_attributes"]), None, url)
            cookie = connection.result.get("controls", {}).get(_PAGED_RESULTS, {}).get("value", {}).get("cookie")
            if not cookie:
                break
    except ldap3.core.exceptions.LDAPException as exc:
        raise SourceError(f"{url}: {failure_reason(exc)}") from None
    finally:
        connection.unbind()


def _decoded(raw: dict[str, list[bytes]]) -> RawAttributes:
    """Return an entry's attributes as text; binary values (objectSid, jpegPhoto …) are left out."""
    attributes = []
    for name, values in raw.items():
        texts = []
        for value in values:
            try:
                texts.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                continue  # the LDIF reader refuses binary values too; neither is a field of ours
        if texts:
            attributes.append((name, tuple(texts)))
    return tuple(attributes)


# --- CSV -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One checked CSV row: its physical line and its values by column."""

    line: int
    values: dict[str, str]

    def get(self, column: str) -> str:
        """Return a column's value, stripped ('' when the column is absent)."""
        return self.values.get(column, "").strip()


def _csv_rows(path: Path) -> Iterator[_Row]:
    """Read a CSV file with a header (UTF-8, BOM or not); check columns, dates and yes/no values."""
    try:
        # utf-8-sig drops the BOM Excel writes; newline="" lets csv see CRLF and quoted line breaks
        with path.open(encoding="utf-8-sig", newline="") as stream:
            reader = csv.reader(stream)
            header = [name.strip().lower() for name in next(reader, [])]
            if not any(header):
                raise SourceError(f"{path}: a header line is required ({', '.join(CSV_REQUIRED)})")
            for name in header:
                if name not in CSV_REQUIRED + CSV_OPTIONAL:
                    raise SourceError(f"{path}, line 1: unknown column '{name}' "
                                      f"(known: {', '.join(CSV_REQUIRED + CSV_OPTIONAL)})")
                if header.count(name) > 1:
                    raise SourceError(f"{path}, line 1: column '{name}' is given twice")
            for name in CSV_REQUIRED:
                if name not in header:
                    raise SourceError(f"{path}, line 1: missing column '{name}'")
            for fields in reader:
                line = reader.line_num
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) != len(header):
                    raise SourceError(f"{path}, line {line}: {len(fields)} fields, the header has {len(header)}")
                row = _Row(line, dict(zip(header, fields)))
                born = row.get("date_of_birth")
                if born and parse_date(born) is None:
                    raise SourceError(f"{path}, line {line}: date_of_birth: '{born}' is not a date "
                                      "(write 1986-04-17 or 17/04/1986)")
                if row.get("disabled").lower() not in _TRUE:
                    raise SourceError(f"{path}, line {line}: disabled: '{row.get('disabled')}' is not "
                                      "true/false, yes/no or 1/0")
                yield row
    except UnicodeDecodeError:
        raise SourceError(f"{path}, line {_first_bad_line(path)}: not UTF-8 text") from None
    except csv.Error as exc:
        raise SourceError(f"{path}: not a CSV file: {exc}") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None


def _csv_records(name: str, path: Path) -> tuple[list[SourceRecord], list[str]]:
    """Read a CSV directory: every row is a person."""
    records = []
    for row in _csv_rows(path):
        full_name = row.values["full_name"]
        if not full_name.strip():
            raise SourceError(f"{path}, line {row.line}: a person without a name (full_name is empty)")
        addresses = []
        for column in ("mail", "aliases"):
            for value in re.split(r"[;\s]+", row.get(column)):
                if value and check_address(value) is None:
                    raise SourceError(f"{path}, line {row.line}: {column}: '{value}' is not a valid address")
                if value and check_address(value) not in addresses:
                    addresses.append(check_address(value))
        born = row.get("date_of_birth")
        records.append(SourceRecord(
            source=name, dn=f"csv:{path.name}:{row.line}", kind="person", full_name=full_name,
            mail=addresses[0] if addresses else None, aliases=tuple(addresses[1:]),
            title=row.get("title") or None, phones=_one(row.get("phone")), mobiles=_one(row.get("mobile")),
            unit=row.get("unit") or None, employee_id=row.get("employee_id") or None,
            citizen_id=row.get("citizen_id") or None, birth_date=parse_date(born) if born else None,
            disabled=_TRUE[row.get("disabled").lower()], line=row.line,
            raw=keep_raw(tuple((column, (value,)) for column, value in row.values.items() if value.strip())),
        ))
    return records, []


def _one(value: str) -> tuple[str, ...]:
    """Return a single optional value as a tuple."""
    return (value,) if value else ()


# --- HR join -------------------------------------------------------------------------------------


def _join_hr(records: list[SourceRecord], path: Path) -> tuple[list[SourceRecord], list[str]]:
    """Fill citizen ID, birth date (and a phone where none) from the HR export, by employee ID."""
    by_id: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        if record.kind == "person" and record.employee_id:
            by_id.setdefault(record.employee_id.casefold(), []).append(index)
    warnings: list[str] = []
    lines: dict[str, int] = {}
    joined = list(records)
    for row in _csv_rows(path):
        employee, full_name = row.get("employee_id"), row.get("full_name")
        where = f"{path.name} line {row.line}"
        if not employee:
            warnings.append(f"{where}: {full_name or 'a row'} has no employee_id; the row joins no account")
            continue
        if employee.casefold() in lines:
            raise SourceError(f"{path}, line {row.line}: employee_id {employee} is also on line "
                              f"{lines[employee.casefold()]}")
        lines[employee.casefold()] = row.line
        who = f"employee {employee} ({full_name})"
        matches = by_id.get(employee.casefold(), [])
        if not matches:
            warnings.append(f"{where}: {who} has no directory account")
        born = row.get("date_of_birth")
        hr = {"citizen_id": row.get("citizen_id") or None, "birth_date": parse_date(born) if born else None}
        for index in matches:
            record = joined[index]
            changes: dict[str, object] = {}
            for field, label in (("citizen_id", "citizen ID"), ("birth_date", "date of birth")):
                own, theirs = getattr(record, field), hr[field]
                if own is None:
                    changes[field] = theirs
                elif theirs is not None and own != theirs:
                    # the directory's value is kept; a person decides which one is right
                    warnings.append(f"{where}: {who}: {label} {theirs} in HR, {own} in the directory")
            # HR's phone is often a mobile and the directory's a desk phone: fill, never compare
            if not record.phones and not record.mobiles and row.get("phone"):
                changes["phones"] = (row.get("phone"),)
            hr_unit = row.get("unit")
            if hr_unit and record.unit is None:
                warnings.append(f"{where}: {who} has no unit in the directory; HR has '{hr_unit}'")
            elif hr_unit and record.unit != hr_unit:
                warnings.append(f"{where}: {who} is in '{record.unit}' in the directory, '{hr_unit}' in HR")
            if changes:
                joined[index] = dataclasses.replace(record, **changes)  # type: ignore[arg-type]
    return joined, warnings
