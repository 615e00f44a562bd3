"""Where apply writes: an LDAP server (connected through ldap3) or an LDIF file; DNs compared the LDAP way."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import select
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPInvalidDnError, LDAPOperationResult
from ldap3.core.results import RESULT_CODES
from ldap3.utils.dn import parse_dn

from mailmerge_gov.config import DirectoryConfig, LdapServer, SecretError
from mailmerge_gov.directory.ldif import Attributes, LdifError, format_entry, read_ldif

PAGE_SIZE = 500
# Write requests in flight on the connection at once. slapd reads ahead up to conn_max_pending_auth (1000 by
# default) requests per connection; 64 keeps its worker threads busy while we encode the next ones.
WINDOW = 64
# LDAP transactions (RFC 5805): the extended operations that start and end one, and the control of a change in one
START_TRANSACTION, END_TRANSACTION, TRANSACTION_CONTROL = "1.3.6.1.1.21.1", "1.3.6.1.1.21.3", "1.3.6.1.1.21.2"
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
        size = len(wanted)
        for key, values in self.attributes:
            # the length first: apply asks millions of times, and most names differ in length
            if len(key) == size and key.lower() == wanted:
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


# A DN without escapes, quotes, multi-valued RDNs or spaces around its parts: the DNs apply makes and nearly all
# it reads. ldap3's parse_dn takes some 40 µs for one; apply compares hundreds of thousands of DNs, so these
# are split directly (the same result: tests/test_target_write.py checks it against parse_dn); every other DN
# goes through parse_dn.
_PLAIN_DN = re.compile(r"[A-Za-z][A-Za-z0-9-]*=[^\x00-\x1f ,=+\"\\<>;#\ud800-\udfff]"
                       r"(?:[^\x00-\x1f,=+\"\\<>;#\ud800-\udfff]*[^\x00-\x1f ,=+\"\\<>;#\ud800-\udfff])?")
_PLAIN_DNS = re.compile(rf"{_PLAIN_DN.pattern}(?:,{_PLAIN_DN.pattern})*")


def _plain_rdns(dn: str) -> list[tuple[str, str]] | None:
    """Split a plain DN (see _PLAIN_DN) into (attribute, value) pairs; None for any other DN."""
    if not _PLAIN_DNS.fullmatch(dn):
        return None
    return [tuple(part.split("=", 1)) for part in dn.split(",")]  # type: ignore[misc]


def dn_key(dn: str) -> DnKey:
    """Return the comparison key of a DN; ValueError saying why when it does not parse."""
    plain = _plain_rdns(dn)
    if plain is not None:
        return tuple(((attribute.lower(), value.lower()),) for attribute, value in plain)
    return _parsed_dn_key(dn)


def _parsed_dn_key(dn: str) -> DnKey:
    """dn_key through ldap3's parser: for every DN, escaped, quoted or multi-valued ones included."""
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
    plain = _plain_rdns(dn)
    if plain is not None:
        return plain[:1]
    return _parsed_rdn_values(dn)


def _parsed_rdn_values(dn: str) -> list[tuple[str, str]]:
    """rdn_values through ldap3's parser."""
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
    # every spelling asked for (options included) -> its type: apply asks four million times for a few dozen names
    _spellings: dict[str, AttributeType | None] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False)

    def attribute(self, name: str) -> AttributeType | None:
        """Return an attribute type by any of its names or its OID, or None when unknown."""
        try:
            return self._spellings[name]
        except KeyError:
            found = self._spellings[name] = self.attributes.get(name.split(";")[0].lower())
            return found

    def spelling(self, name: str) -> str:
        """Return an attribute description as the schema spells its type, options kept (unknown: as given)."""
        known = self.attribute(name)
        return known.name + name[len(name.split(";")[0]):] if known else name

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
    """An LDAP server: connected and bound through ldap3, read (paged) and written (in batches) by our own code."""

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
        # get_info=ALL: the schema (validation checks every attribute and object class against what this server
        # knows) and the root DSE (whether it offers transactions, see write).
        ldap_server = ldap3.Server(server.host, port=server.port, use_ssl=server.use_ssl, tls=tls,
                                   get_info=ldap3.ALL, connect_timeout=server.timeout)
        self.conn = ldap3.Connection(ldap_server, user=server.bind_dn, password=password,
                                     # ldap3 packs receive_timeout into a socket option: whole seconds only
                                     receive_timeout=max(1, math.ceil(server.timeout)), raise_exceptions=True)
        try:
            self.conn.open()
            if server.starttls:
                self.conn.start_tls()
            self.conn.bind()
            self.schema = _schema_of(ldap_server)
            extensions = {item[0] for item in (ldap_server.info.supported_extensions if ldap_server.info else ())}
            self.transactions = {START_TRANSACTION, END_TRANSACTION} <= extensions
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
        # A paged search (RFC 2696) decoded here rather than by ldap3, which turns every value into Python
        # objects by the schema's syntaxes first: 75 s for 100,000 officials where apply needs 5. The request
        # is the one ldap3's paged_search sends: (objectClass=*), all user attributes, aliases dereferenced.
        if self.conn.socket is None or self.conn.closed:
            raise TargetError(f"{self.server.url}: the connection is closed")
        reader = _Responses(self.conn.socket)
        names: dict[bytes, str] = {}  # attribute names as the server sends them -> as the schema spells them
        entries: list[Entry] = []
        cookie = b""
        try:
            while True:
                message_id = ldap3.Server.next_message_id()
                self.conn.socket.sendall(_message(message_id, _search_request(self.base_dn), _paged_control(cookie)))
                while True:
                    tag, answer_id, message = reader.next_raw()
                    if answer_id != message_id:
                        raise ConnectionError(0, f"an answer to message {answer_id} came instead of {message_id}")
                    if tag == _SEARCH_ENTRY:
                        entries.append(_search_entry(message, names, self._name))
                    elif tag == _SEARCH_DONE:
                        break
                    # a SearchResultReference (a referral to another server) is not an entry of this one
                _, code, text, _ = _parse_response(message)
                if code == 32:  # noSuchObject: the base is not there yet
                    return []
                if code != 0:
                    raise TargetError(f"{self.server.url}: cannot read {self.base_dn}: {_describe(code, text)}")
                cookie = _paged_cookie(message)
                if not cookie:
                    return entries
        except OSError as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise TargetError(f"{self.server.url}: cannot read {self.base_dn}: {reason}") from exc

    def _name(self, name: str) -> str:
        """Spell an attribute name as the schema does."""
        known = self.schema.attribute(name)
        return known.name if known else name

    def write(self, changes: Sequence[Change]) -> Iterator[tuple[int, TargetRefused | None]]:
        """Make changes in order, yielding (index, None) or (index, refusal) per change; stop at a refusal."""
        # Each change the server made is answered (index, None), a refused one (index, the TargetRefused);
        # nothing is sent after a refusal, and the changes before it are made.
        # Why not ldap3 for writes: it builds each request out of pyasn1 objects, about 1 ms of CPU for an
        # official's entry, and waits for each answer before it sends the next request. Encoded here (RFC 4511
        # BER, see _request) a request costs some 30 µs, and several are in flight at once. ldap3 still opens
        # the connection (TLS, StartTLS, bind) and reads; the requests go over its bound socket, with message
        # ids from ldap3's own counter. Values are sent exactly as given (ldap3 would rewrite a Boolean "true"
        # as "TRUE"; the attributes apply writes have no such syntax); the server normalises DNs as always.
        if not changes:
            return
        if self.conn.socket is None or self.conn.closed:
            raise TargetError(f"{self.server.url}: the connection is closed")
        reader = _Responses(self.conn.socket)
        window = WINDOW
        try:
            if self.transactions:
                if self._write_transaction(reader, changes):
                    yield from ((index, None) for index in range(len(changes)))
                    return
                if self.transactions:
                    # The server refused a change of the transaction, so it made none of them: now one change at
                    # a time, so that the changes before the refused one are made and none after it, exactly.
                    window = 1
            for index, code, message in self._send(reader, changes, window=window):
                yield index, None if code == 0 else _refusal(changes[index], code, message)
        except OSError as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise TargetError(f"{self.server.url}: the connection failed while changes were in flight (the server "
                              f"may or may not have made them): {reason}") from exc

    def _write_transaction(self, reader: _Responses, changes: Sequence[Change]) -> bool:
        """Make the changes as one LDAP transaction (RFC 5805): True if committed, False if none was made."""
        # Speed: slapd stores each change in a database transaction of its own, and most of its work is copying
        # the index pages an entry touches. In one transaction for a batch the pages are copied once: 500 new
        # officials went in 5 times faster than ldapadd puts them in one by one. A transaction is all or nothing,
        # so when the server refuses any change of it none is made, and the caller sends the batch again change
        # by change: the changes before the refused one are then made, and the refusal comes with the server's
        # own words (the end of a transaction only gives a result code).
        message_id = ldap3.Server.next_message_id()
        self.conn.socket.sendall(_message(message_id, _extended(START_TRANSACTION)))
        answer_id, code, _, value = reader.next()
        if answer_id != message_id or code != 0 or value is None:
            if answer_id != message_id:
                raise ConnectionError(0, f"an answer to message {answer_id} came instead of {message_id}")
            self.transactions = False  # the server offers transactions but will not start one: do without
            return False
        control = _tlv(0xA0, _tlv(0x30, _text(TRANSACTION_CONTROL) + b"\x01\x01\xff" + _tlv(0x04, value)))
        # every answer is read (the list), also after a change the server would not queue
        queued = all([code == 0 for _, code, _ in self._send(reader, changes, control)])
        # txnEndReq: commit (BOOLEAN DEFAULT TRUE, so left out) or abandon (FALSE), and the identifier
        end = _tlv(0x30, (b"" if queued else b"\x01\x01\x00") + _tlv(0x04, value))
        message_id = ldap3.Server.next_message_id()
        self.conn.socket.sendall(_message(message_id, _extended(END_TRANSACTION, end)))
        answer_id, code, _, _ = reader.next()
        if answer_id != message_id:
            raise ConnectionError(0, f"an answer to message {answer_id} came instead of {message_id}")
        return queued and code == 0

    def _send(self, reader: _Responses, changes: Sequence[Change], control: bytes = b"",
              window: int = WINDOW) -> Iterator[tuple[int, int, str]]:
        """Send changes with up to `window` in flight; yield (index, result code, message) as answers come."""
        # Nothing more is sent once an answer is not a success. With several in flight, the changes sent before
        # that answer came are still answered, and made if the server can.
        flight = _InFlight()
        failed = False
        for index, change in enumerate(changes):
            key = dn_key(change.dn)
            # A change waits while a change of the same entry, of an entry above it or of one below it is in
            # flight: the server may work on requests of one connection in any order, and so a parent is added
            # before its children and deleted after them as if the changes went one at a time (changes of
            # unrelated entries commute). Answers already there are taken first, so that a refusal stops the
            # sending as early as it can.
            while flight and not failed and (len(flight) >= window or flight.conflicts(key) or reader.ready()):
                answer = self._answer(reader, flight)
                failed = answer[1] != 0
                yield answer
            if failed:
                break
            message_id = ldap3.Server.next_message_id()
            self.conn.socket.sendall(_message(message_id, _request(change), control))
            flight.add(message_id, index, key)
        while flight:
            yield self._answer(reader, flight)

    def _answer(self, reader: _Responses, flight: _InFlight) -> tuple[int, int, str]:
        """Wait for the next answer to a change in flight: (index, result code, message)."""
        message_id, code, message, _ = reader.next()
        index = flight.pop(message_id)
        if index is None:
            # message id 0: the server's notice that it is closing the connection (RFC 4511 4.4.1)
            raise ConnectionError(0, f"the server ended the connection: {_describe(code, message)}")
        return index, code, message


def _refusal(change: Change, code: int, message: str) -> TargetRefused:
    """The error for a change the server refused, in the server's words."""
    what = change.op if change.op in ("add", "delete") else "modify"
    return TargetRefused(f"{change.dn}: the server refused the {what}: {_describe(code, message)}")


class _InFlight:
    """The changes sent and not answered yet, by message id, with the DNs they hold."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[int, DnKey]] = {}  # message id -> (index of the change, DN key)
        self.entries: dict[DnKey, int] = {}  # DNs changed in flight -> how many changes
        self.under: dict[DnKey, int] = {}  # those DNs and every DN above them -> how many changes

    def __len__(self) -> int:
        return len(self.by_id)

    def conflicts(self, key: DnKey) -> bool:
        """Tell whether a change of this entry must wait: the entry, one above it or one below it is in flight."""
        return key in self.under or any(key[depth:] in self.entries for depth in range(1, len(key)))

    def add(self, message_id: int, index: int, key: DnKey) -> None:
        """Note a change sent."""
        self.by_id[message_id] = (index, key)
        self.entries[key] = self.entries.get(key, 0) + 1
        for depth in range(len(key)):
            self.under[key[depth:]] = self.under.get(key[depth:], 0) + 1

    def pop(self, message_id: int) -> int | None:
        """Forget an answered change and return its index (None: not one of ours)."""
        found = self.by_id.pop(message_id, None)
        if found is None:
            return None
        index, key = found
        _decrement(self.entries, key)
        for depth in range(len(key)):
            _decrement(self.under, key[depth:])
        return index


def _decrement(counts: dict[DnKey, int], key: DnKey) -> None:
    """Count one less of a key, dropping it at zero."""
    if counts[key] == 1:
        del counts[key]
    else:
        counts[key] -= 1


# ---------------------------------------------------------------------------------------------- LDAP encoding
# The few RFC 4511 messages apply writes, in BER as slapd and every LDAP server read them. Tags: 0x30 SEQUENCE,
# 0x31 SET, 0x04 OCTET STRING, 0x02 INTEGER, 0x0a ENUMERATED; [APPLICATION n] requests and responses.

_ADD_REQUEST, _MODIFY_REQUEST, _DELETE_REQUEST = 0x68, 0x66, 0x4A
_MODIFY_OPERATIONS = {"add": 0, "delete": 1, "replace": 2}


def _tlv(tag: int, content: bytes) -> bytes:
    """One BER element: tag, definite length, content."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _text(value: str) -> bytes:
    """An OCTET STRING holding UTF-8 text (LDAPDN, AttributeDescription, AttributeValue)."""
    return _tlv(0x04, value.encode("utf-8"))


def _attribute(name: str, values: Sequence[str]) -> bytes:
    """An Attribute / PartialAttribute: its description and the SET OF its values, in order."""
    return _tlv(0x30, _text(name) + _tlv(0x31, b"".join(_text(value) for value in values)))


def _request(change: Change) -> bytes:
    """The protocol operation of one change: AddRequest, DelRequest or ModifyRequest."""
    if change.op == "add":
        return _tlv(_ADD_REQUEST, _text(change.dn) + _tlv(0x30, b"".join(
            _attribute(name, values) for name, values in change.after)))
    if change.op == "delete":
        return _tlv(_DELETE_REQUEST, change.dn.encode("utf-8"))  # [APPLICATION 10] LDAPDN, primitive
    # The modifications of one attribute stay in their order, grouped by attribute in the order each first
    # appears: the order ldap3 sent them in, which the attribute order that rollback restores was checked with.
    grouped: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for operation, name, values in change.modifications:
        grouped.setdefault(name, []).append((operation, values))
    items = b"".join(_tlv(0x30, _tlv(0x0A, bytes((_MODIFY_OPERATIONS[operation],))) + _attribute(name, values))
                     for name, operations in grouped.items() for operation, values in operations)
    return _tlv(_MODIFY_REQUEST, _text(change.dn) + _tlv(0x30, items))


def _extended(name: str, value: bytes | None = None) -> bytes:
    """An ExtendedRequest: [APPLICATION 23] with requestName [0] and an optional requestValue [1]."""
    return _tlv(0x77, _tlv(0x80, name.encode("ascii")) + (b"" if value is None else _tlv(0x81, value)))


def _message(message_id: int, operation: bytes, controls: bytes = b"") -> bytes:
    """An LDAPMessage: message id, protocol operation and controls ([0], already encoded)."""
    return _tlv(0x30, _tlv(0x02, message_id.to_bytes(message_id.bit_length() // 8 + 1, "big")) + operation
                + controls)


class _Responses:
    """Read LDAPMessages from a socket and give the result of each: (message id, result code, message)."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.buffer = bytearray()

    def ready(self) -> bool:
        """Tell whether an answer can be read without waiting."""
        size = _element_size(self.buffer)
        if size is not None and len(self.buffer) >= size:
            return True
        if isinstance(self.connection, ssl.SSLSocket) and self.connection.pending():
            return True
        return bool(select.select([self.connection], [], [], 0)[0])

    def next(self) -> tuple[int, int, str, bytes | None]:
        """Return the next response's message id, result code, diagnostic message and extended responseValue."""
        message = self._message()
        try:
            return _parse_response(message)
        except (IndexError, ValueError) as exc:
            raise ConnectionError(0, f"the server sent an answer that is not LDAP ({exc})") from exc

    def next_raw(self) -> tuple[int, int, bytes]:
        """Return the next message's protocol operation tag, its message id and the whole message."""
        message = self._message()
        try:
            _, start, _ = _read_element(message, 0)
            _, id_start, id_end = _read_element(message, start)
            return message[id_end], int.from_bytes(message[id_start:id_end], "big", signed=True), message
        except IndexError as exc:
            raise ConnectionError(0, f"the server sent an answer that is not LDAP ({exc})") from exc

    def _message(self) -> bytes:
        """Return the next whole LDAPMessage."""
        while True:
            size = _element_size(self.buffer)
            if size is not None and len(self.buffer) >= size:
                break
            data = self.connection.recv(1 << 20)
            if not data:
                raise ConnectionResetError(0, "the server closed the connection")
            self.buffer += data
        message = bytes(self.buffer[:size])
        del self.buffer[:size]
        return message


_SEARCH_REQUEST, _SEARCH_ENTRY, _SEARCH_DONE = 0x63, 0x64, 0x65
_PAGED_RESULTS = "1.2.840.113556.1.4.319"


def _search_request(base_dn: str) -> bytes:
    """A SearchRequest for every entry of a subtree with its user attributes."""
    return _tlv(_SEARCH_REQUEST, _text(base_dn)
                + b"\x0a\x01\x02"  # scope: wholeSubtree
                + b"\x0a\x01\x03"  # derefAliases: derefAlways, as ldap3 sends it
                + b"\x02\x01\x00\x02\x01\x00"  # no size and no time limit (the server's own limits apply)
                + b"\x01\x01\x00"  # typesOnly: FALSE
                + _tlv(0x87, b"objectClass")  # filter: present [7]
                + _tlv(0x30, _text("*")))


def _paged_control(cookie: bytes) -> bytes:
    """The controls [0] of a paged search: page size and the cookie of the page before (b"" at first)."""
    value = _tlv(0x30, _tlv(0x02, PAGE_SIZE.to_bytes(PAGE_SIZE.bit_length() // 8 + 1, "big")) + _tlv(0x04, cookie))
    return _tlv(0xA0, _tlv(0x30, _text(_PAGED_RESULTS) + _tlv(0x04, value)))


def _paged_cookie(message: bytes) -> bytes:
    """Return the cookie of the paged results control of a SearchResultDone (b"": the last page)."""
    _, start, end = _read_element(message, 0)
    _, _, position = _read_element(message, start)  # message id
    _, _, position = _read_element(message, position)  # SearchResultDone
    while position < end:
        tag, controls_start, controls_end = _read_element(message, position)
        position = controls_end
        if tag != 0xA0:
            continue
        while controls_start < controls_end:
            _, control_start, control_end = _read_element(message, controls_start)
            controls_start = control_end
            _, oid_start, oid_end = _read_element(message, control_start)
            if message[oid_start:oid_end] != _PAGED_RESULTS.encode():
                continue
            tag, value_start, value_end = _read_element(message, oid_end)
            if tag == 0x01:  # criticality, then the value
                tag, value_start, value_end = _read_element(message, value_end)
            _, sequence_start, _ = _read_element(message, value_start)
            _, _, size_end = _read_element(message, sequence_start)
            _, cookie_start, cookie_end = _read_element(message, size_end)
            return message[cookie_start:cookie_end]
    return b""


def _search_entry(message: bytes, names: dict[bytes, str], spell: Callable[[str], str]) -> Entry:
    """Turn a SearchResultEntry into an Entry: names as the schema spells them, binary values left out (_texts)."""
    _, start, _ = _read_element(message, 0)
    _, _, position = _read_element(message, start)  # message id
    _, entry_start, _ = _read_element(message, position)
    _, dn_start, dn_end = _read_element(message, entry_start)
    _, position, attributes_end = _read_element(message, dn_end)
    attributes = []
    while position < attributes_end:
        _, attribute_start, attribute_end = _read_element(message, position)
        position = attribute_end
        _, name_start, name_end = _read_element(message, attribute_start)
        _, value, values_end = _read_element(message, name_end)
        raw = []
        while value < values_end:
            _, value_start, value_end = _read_element(message, value)
            raw.append(message[value_start:value_end])
            value = value_end
        texts = _texts(raw)
        if texts is None:
            continue
        key = message[name_start:name_end]
        name = names.get(key)
        if name is None:
            name = names[key] = spell(key.decode("utf-8"))
        attributes.append((name, texts))
    return Entry(message[dn_start:dn_end].decode("utf-8"), tuple(attributes))


def _element_size(data: bytearray) -> int | None:
    """Return the size of the BER element at the start of data, or None while its length is incomplete."""
    if len(data) < 2:
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if len(data) < 2 + count:
        return None
    return 2 + count + int.from_bytes(data[2:2 + count], "big")


def _read_element(data: bytes, position: int) -> tuple[int, int, int]:
    """Return (tag, start of content, end of content) of the element at position."""
    tag, first = data[position], data[position + 1]
    start = position + 2
    if first < 0x80:
        return tag, start, start + first
    count = first & 0x7F
    size = int.from_bytes(data[start:start + count], "big")
    return tag, start + count, start + count + size


def _parse_response(message: bytes) -> tuple[int, int, str, bytes | None]:
    """Return message id, result code, diagnostic message and responseValue of an LDAPMessage with a response."""
    tag, start, end = _read_element(message, 0)
    if tag != 0x30:
        raise ValueError(f"tag {tag:#x}")
    _, id_start, id_end = _read_element(message, start)
    message_id = int.from_bytes(message[id_start:id_end], "big", signed=True)
    _, result_start, result_end = _read_element(message, id_end)  # the response; its LDAPResult fields first
    _, code_start, code_end = _read_element(message, result_start)
    code = int.from_bytes(message[code_start:code_end], "big")
    _, _, matched_end = _read_element(message, code_end)  # matchedDN
    _, text_start, text_end = _read_element(message, matched_end)
    value = None
    position = text_end
    while position < result_end:  # referral [3], then an ExtendedResponse's responseName [10], responseValue [11]
        tag, start, end = _read_element(message, position)
        if tag == 0x8B:
            value = message[start:end]
        position = end
    return message_id, code, message[text_start:text_end].decode("utf-8", errors="replace"), value


def _describe(code: int, message: str) -> str:
    """The server's words for a result: its name and diagnostic message, as ldap3 gives them."""
    text = RESULT_CODES.get(code, f"result code {code}")
    message = message.strip()
    return f"{text} ({message})" if message else text


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
