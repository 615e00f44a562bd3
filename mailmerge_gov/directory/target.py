"""Where apply writes: an LDAP server (through ldap3) or an LDIF file; DNs compared the LDAP way."""

from __future__ import annotations

import io
import math
import os
import re
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPInvalidDnError, LDAPNoSuchObjectResult, LDAPOperationResult
from ldap3.utils.dn import parse_dn

from mailmerge_gov.config import DirectoryConfig, LdapServer, SecretError
from mailmerge_gov.directory.ldif import Attributes, LdifError, format_entry, read_ldif

PAGE_SIZE = 500
# an attribute description as LDAP allows it: a name (with options) or a numeric OID
ATTRIBUTE_NAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*(?:;[A-Za-z0-9-]+)*|[0-9]+(?:\.[0-9]+)+)$")
IA5_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.26"
_ESCAPE = re.compile(r"\\([0-9A-Fa-f]{2})|\\(.)")

# A DN as LDAP compares it: RDNs from the entry up to the root, each a sorted tuple of
# (attribute, value) pairs, lower-cased and unescaped ("OU=A\2Cb" and "ou=a\,B" are the same entry).
DnKey = tuple[tuple[tuple[str, str], ...], ...]


class TargetError(Exception):
    """The target directory cannot be read or written; the message names the server or file."""


class TargetRefused(TargetError):
    """The server refused one write; the message names the entry and the server's reason."""


@dataclass(frozen=True)
class Entry:
    """The desired (or current) state of one directory entry: its DN and attributes, values in order."""

    dn: str
    attributes: Attributes

    def get(self, name: str) -> tuple[str, ...]:
        """Return the values of an attribute (case-insensitive name), or ()."""
        wanted = name.lower()
        for key, values in self.attributes:
            if key.lower() == wanted:
                return values
        return ()


Modification = tuple[str, str, tuple[str, ...]]  # ("add" | "replace" | "delete", attribute, values)


@dataclass(frozen=True)
class Change:
    """One LDAP change: add, modify or disable (rollback: delete or modify), with the whole entry before and after."""

    op: str
    dn: str
    before: Attributes  # the entry before the change; () for an add
    after: Attributes  # the entry after the change; () for a delete
    modifications: tuple[Modification, ...] = ()  # what a modify or disable sends


def edit_values(name: str, have: tuple[str, ...], want: tuple[str, ...]) -> list[Modification]:
    """Return the modifications that turn one attribute's values into `want`, in order, keeping its place."""
    # slapd puts an attribute that a modify empties and fills again (a replace does that) at the end of the
    # entry. Adding and deleting values so that the attribute is never empty keeps it where it was, so that a
    # rollback gives back the very same entry, attribute order included. The server checks the entry only at
    # the end of a modify, so a single-valued attribute may hold two values in between.
    if have == want:
        return []
    if not want:
        return [("delete", name, ())]
    if not have:
        return [("add", name, want)]
    kept = 0
    position = 0
    for value in want:  # the longest start of `want` already there in order: those values stay
        if value not in have[position:]:
            break
        position = have.index(value, position) + 1
        kept += 1
    if kept:
        stale = tuple(value for value in have if value not in want[:kept])
        return ([("delete", name, stale)] if stale else []) + ([("add", name, want[kept:])] if want[kept:] else [])
    # values equal but for case are one value to the server: it cannot hold both at once
    anchor = next((value for value in have if value.lower() not in {w.lower() for w in want}), None)
    if anchor is not None:  # keep one old value until the new ones are in
        others = tuple(value for value in have if value != anchor)
        return ([("delete", name, others)] if others else []) + [("add", name, want), ("delete", name, (anchor,))]
    spare = next((value for value in want if value.lower() not in {h.lower() for h in have}), None)
    if spare == want[0]:
        return [("add", name, want[:1]), ("delete", name, have)] + ([("add", name, want[1:])] if want[1:] else [])
    if spare is not None:  # hold a later new value while the first one goes in
        return [("add", name, (spare,)), ("delete", name, have), ("add", name, want[:1]), ("delete", name, (spare,)),
                ("add", name, want[1:])]
    return [("replace", name, want)]  # only the case of the values changes: the attribute moves last


def modified(attributes: Attributes, modifications: Sequence[Modification]) -> Attributes:
    """Apply modifications to attributes in memory the way slapd does (a replace moves the attribute last)."""
    result = [[name, list(values)] for name, values in attributes]
    for operation, name, values in modifications:
        index = next((i for i, (have, _) in enumerate(result) if have.lower() == name.lower()), None)
        if operation == "add" and index is not None:
            result[index][1].extend(values)
            continue
        if operation == "delete" and index is not None and values:
            gone = {value.lower() for value in values}
            result[index][1] = [value for value in result[index][1] if value.lower() not in gone]
            if result[index][1]:
                continue
        if index is not None:
            del result[index]
        if operation in ("add", "replace") and values:
            result.append([name, list(values)])
    return tuple((name, tuple(values)) for name, values in result)


def applied(entries: Sequence[Entry], changes: Sequence[Change]) -> list[Entry]:
    """Return a file's entries after the changes: new entries at the end, deleted ones gone."""
    result: list[Entry | None] = list(entries)
    where = {dn_key(entry.dn): index for index, entry in enumerate(entries)}
    for change in changes:
        key = dn_key(change.dn)
        index = where.get(key)
        if change.op == "add":
            where[key] = len(result)
            result.append(Entry(change.dn, change.after))
        elif index is None:
            continue
        elif change.op == "delete":
            result[index] = None
            del where[key]
        elif (entry := result[index]) is not None:
            result[index] = Entry(entry.dn, modified(entry.attributes, change.modifications))
    return [entry for entry in result if entry is not None]


def same_content(first: Sequence[Entry], second: Sequence[Entry]) -> bool:
    """Tell whether two lists of entries are the same directory for LDAP (order does not matter)."""
    def content(entries: Sequence[Entry]) -> dict[DnKey, dict[str, list[str]]]:
        return {dn_key(entry.dn): {name.lower(): sorted(values) for name, values in entry.attributes}
                for entry in entries}
    return content(first) == content(second)


def _unescape(value: str) -> str:
    r"""Undo DN value escapes: \2C and \, are both a comma (hex pairs may spell UTF-8 bytes)."""
    data = bytearray()
    position = 0
    for match in _ESCAPE.finditer(value):
        data += value[position:match.start()].encode("utf-8")
        data += bytes.fromhex(match.group(1)) if match.group(1) else match.group(2).encode("utf-8")
        position = match.end()
    data += value[position:].encode("utf-8")
    return data.decode("utf-8", errors="replace")


def dn_key(dn: str) -> DnKey:
    """Return the comparison key of a DN; ValueError saying why when it does not parse."""
    try:
        parts = parse_dn(dn, strip=True)
    except LDAPInvalidDnError as exc:
        raise ValueError(str(exc)) from exc
    rdns: list[tuple[tuple[str, str], ...]] = []
    current: list[tuple[str, str]] = []
    for attribute, value, separator in parts:
        current.append((attribute.lower(), _unescape(value).lower()))
        if separator != "+":
            rdns.append(tuple(sorted(current)))
            current = []
    return tuple(rdns)


def rdn_values(dn: str) -> list[tuple[str, str]]:
    """Return the (attribute, value) pairs of a DN's first RDN, unescaped."""
    pairs = []
    for attribute, value, separator in parse_dn(dn, strip=True):
        pairs.append((attribute, _unescape(value)))
        if separator != "+":
            break
    return pairs


def is_under(key: DnKey, base: DnKey, strictly: bool = False) -> bool:
    """Tell whether a DN is the base (unless strictly) or below it."""
    if len(key) < len(base) + (1 if strictly else 0):
        return False
    return key[len(key) - len(base):] == base


@dataclass(frozen=True)
class AttributeType:
    """What apply needs to know of one attribute type of the server's schema."""

    name: str  # the schema's first name: the spelling the server uses in its answers
    single_value: bool
    ia5: bool  # IA5 String syntax: ASCII only


@dataclass(frozen=True)
class Schema:
    """The attribute types and object classes a server knows, by every lower-cased name and OID."""

    attributes: dict[str, AttributeType]
    object_classes: dict[str, str]

    def attribute(self, name: str) -> AttributeType | None:
        """Return an attribute type by any of its names or its OID, or None when unknown."""
        return self.attributes.get(name.split(";")[0].lower())

    def object_class(self, name: str) -> str | None:
        """Return an object class's first name, or None when unknown."""
        return self.object_classes.get(name.lower())


def _schema_of(server: ldap3.Server) -> Schema:
    """Index ldap3's view of a server's subschema."""
    info = server.schema
    if info is None:
        raise TargetError(f"{server.host}: the server did not give its schema (cn=Subschema is not readable)")
    attributes: dict[str, AttributeType] = {}
    for definition in info.attribute_types.values():
        names = list(definition.name or [definition.oid])
        syntax = definition.syntax or ""
        attribute = AttributeType(name=names[0], single_value=bool(definition.single_value),
                                  ia5=syntax.split("{")[0] == IA5_SYNTAX)
        for alias in (*names, definition.oid):
            attributes[alias.lower()] = attribute
    object_classes: dict[str, str] = {}
    for definition in info.object_classes.values():
        names = list(definition.name or [definition.oid])
        for alias in (*names, definition.oid):
            object_classes[alias.lower()] = names[0]
    return Schema(attributes, object_classes)


class LdapTarget:
    """An LDAP server written through ldap3, one operation per change."""

    def __init__(self, server: LdapServer, base_dn: str) -> None:
        self.server = server
        self.base_dn = base_dn
        self.description = f"{server.url} ({base_dn})"
        try:
            password = server.password.reveal() if server.password else None
        except SecretError as exc:
            raise TargetError(f"{server.url}: {exc}") from exc
        tls = None
        if server.use_ssl or server.starttls:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(server.ca_file) if server.ca_file else None)
        # get_info=SCHEMA: validation checks every attribute and object class against what this server knows.
        ldap_server = ldap3.Server(server.host, port=server.port, use_ssl=server.use_ssl, tls=tls,
                                   get_info=ldap3.SCHEMA, connect_timeout=server.timeout)
        self.conn = ldap3.Connection(ldap_server, user=server.bind_dn, password=password,
                                     # ldap3 packs receive_timeout into a socket option: whole seconds only
                                     receive_timeout=max(1, math.ceil(server.timeout)), raise_exceptions=True)
        try:
            self.conn.open()
            if server.starttls:
                self.conn.start_tls()
            self.conn.bind()
            self.schema = _schema_of(ldap_server)
        except LDAPException as exc:
            self.close()
            raise TargetError(f"{server.url}: cannot connect and bind as {server.bind_dn or 'anonymous'}: "
                              f"{_reason(exc)}") from exc

    def close(self) -> None:
        """Close the connection."""
        try:
            self.conn.unbind()
        except LDAPException:
            pass  # closing a broken connection: nothing left to do

    def read(self) -> list[Entry]:
        """Return every entry of the base's subtree with its user attributes ([] when the base does not exist)."""
        entries = []
        try:
            for item in self.conn.extend.standard.paged_search(
                    self.base_dn, "(objectClass=*)", ldap3.SUBTREE, attributes=["*"], paged_size=PAGE_SIZE,
                    generator=True):
                if item.get("type") != "searchResEntry":
                    continue
                entries.append(Entry(item["dn"], tuple(
                    (self._name(name), texts) for name, values in item["raw_attributes"].items()
                    if (texts := _texts(values)) is not None)))
        except LDAPNoSuchObjectResult:
            return []
        except LDAPException as exc:
            raise TargetError(f"{self.server.url}: cannot read {self.base_dn}: {_reason(exc)}") from exc
        return entries

    def _name(self, name: str) -> str:
        """Spell an attribute name as the schema does."""
        known = self.schema.attribute(name)
        return known.name if known else name

    def add(self, dn: str, attributes: Attributes) -> None:
        """Add one entry."""
        self._call("add", dn, lambda: self.conn.add(dn, attributes={name: list(values) for name, values in attributes}))

    def send(self, change: Change) -> None:
        """Send one change."""
        if change.op == "add":
            self.add(change.dn, change.after)
        elif change.op == "delete":
            self.delete(change.dn)
        else:
            self.modify(change.dn, change.modifications)

    def modify(self, dn: str, modifications: Sequence[Modification]) -> None:
        """Apply the (operation, attribute, values) modifications of one entry in one operation."""
        operations = {"add": ldap3.MODIFY_ADD, "replace": ldap3.MODIFY_REPLACE, "delete": ldap3.MODIFY_DELETE}
        # ldap3 takes {attribute: [(operation, values), …]}: the operations of one attribute stay in order
        changes: dict[str, list[tuple[int, list[str]]]] = {}
        for operation, name, values in modifications:
            changes.setdefault(name, []).append((operations[operation], list(values)))
        self._call("modify", dn, lambda: self.conn.modify(dn, changes))

    def delete(self, dn: str) -> None:
        """Delete one entry (only ever an entry that apply itself added)."""
        self._call("delete", dn, lambda: self.conn.delete(dn))

    def _call(self, what: str, dn: str, operation: Callable[[], object]) -> None:
        """Run one write; a refusal becomes TargetRefused naming the entry and the server's words."""
        try:
            operation()
        except LDAPOperationResult as exc:
            raise TargetRefused(f"{dn}: the server refused the {what}: {_reason(exc)}") from exc
        except LDAPException as exc:
            raise TargetError(f"{dn}: the {what} failed, the server may or may not have done it: "
                              f"{_reason(exc)}") from exc


def _reason(exc: LDAPException) -> str:
    """The server's words for a failed operation: result name and diagnostic message."""
    if isinstance(exc, LDAPOperationResult):
        message = (exc.message or "").strip()
        return f"{exc.description}" + (f" ({message})" if message else "")
    return str(exc) or type(exc).__name__


def _texts(values: Sequence[bytes]) -> tuple[str, ...] | None:
    """Decode the values of one attribute; None for binary data (jpegPhoto, certificates)."""
    # Binary attributes are left out of what apply sees: it never manages them, never writes them, and so
    # never needs to compare or back them up.
    try:
        return tuple(value.decode("utf-8") for value in values)
    except UnicodeDecodeError:
        return None


class LdifTarget:
    """An LDIF file written whole and atomically: a temporary file in the same folder, then os.replace."""

    schema: Schema | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self.original: bytes | None = None  # the file as read: the backup is exactly these bytes

    def close(self) -> None:
        """Nothing to close."""

    def read(self) -> list[Entry]:
        """Return every entry of the file in file order ([] when the file does not exist yet)."""
        try:
            self.original = self.path.read_bytes()
        except FileNotFoundError:
            self.original = None
            return []
        except OSError as exc:
            raise TargetError(f"{self.path}: cannot read the target file: {exc.strerror}") from exc
        try:
            stream = io.StringIO(self.original.decode("utf-8"))
            return [Entry(item.dn, item.attributes) for item in read_ldif(stream, str(self.path))]
        except (UnicodeDecodeError, LdifError) as exc:
            raise TargetError(f"{self.path}: cannot read the target file: {exc}") from exc

    def write(self, entries: Sequence[Entry]) -> None:
        """Replace the file with these entries."""
        write_atomically(self.path, "".join(format_entry(entry.dn, entry.attributes) for entry in entries).encode())


def write_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write a file so that readers see the old or the new content, never a part (fsync, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp made it 0600: right for a new file (a directory may hold password hashes); an existing
        # file keeps the mode its administrator gave it
        if mode is not None:
            os.chmod(temporary, mode)
        elif path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the folder is synced
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def open_target(target: DirectoryConfig, base_dn: str) -> LdapTarget | LdifTarget:
    """Open the target a consolidation writes to."""
    if target.kind == "ldap" and target.ldap is not None:
        return LdapTarget(target.ldap, base_dn)
    if target.kind == "ldif" and target.path is not None:
        return LdifTarget(target.path)
    raise TargetError(f"a target directory must be an LDAP server or an LDIF file, not {target.kind}")
