"""LDIF (RFC 2849): read content records with their line numbers, write entries and change records."""

from __future__ import annotations

import base64
import binascii
import re
import sys
from dataclasses import dataclass
from itertools import chain
from typing import IO, Iterable, Iterator

# Why our own: ldap3's LDIF support only writes, and python-ldap's ldif module needs the C
# library; we need line numbers in every error (an administrator fixes a 200,000-line export
# by line number), refusal of change records, and byte-exact output for backups and tests.

Attributes = tuple[tuple[str, tuple[str, ...]], ...]

_ATTR = re.compile(r"^([A-Za-z][A-Za-z0-9-]*(?:;[A-Za-z0-9-]+)*|[0-9]+(?:\.[0-9]+)*)(:<|::?)\s?(.*)$")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*(?:;[A-Za-z0-9-]+)*|[0-9]+(?:\.[0-9]+)*")
# RFC 2849 SAFE-STRING: no NUL, LF, CR; first char not space, ':' or '<'; ASCII only.
# \Z, not $: $ also matches before a final newline, and "x\n" written unencoded ends the record early.
_SAFE = re.compile(r"^(?:[\x01-\x09\x0b\x0c\x0e-\x1f\x21-\x39\x3b\x3d-\x7f][\x01-\x09\x0b\x0c\x0e-\x7f]*)?\Z")
FOLD_WIDTH = 76
_DECODED_SIZE = 32768  # base64 values read_ldif keeps decoded (of 256 characters at most): some 10 MB


class LdifError(Exception):
    """An LDIF file cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class LdifEntry:
    """One content record: its DN, attributes in file order, and the line it starts on."""

    dn: str
    attributes: Attributes
    line: int

    def get(self, name: str) -> tuple[str, ...]:
        """Return the values of an attribute (case-insensitive name), or ()."""
        wanted = name.lower()
        for key, values in self.attributes:
            if key.lower() == wanted:
                return values
        return ()

    def first(self, name: str) -> str | None:
        """Return the first value of an attribute, or None."""
        values = self.get(name)
        return values[0] if values else None


def read_ldif(stream: IO[str], name: str) -> Iterator[LdifEntry]:
    """Parse content records from a text stream; raise LdifError naming the line on bad input."""
    dn: str | None = None
    dn_line = 0
    attributes: dict[str, tuple[str, list[str]]] = {}  # lower-cased name -> (name as written, values)
    seen_record = False
    # An export of 100,000 officials has two million "name: value" lines with a few dozen distinct names. Each
    # name is checked once and then shared (one string object for every "objectClass", not a million: some
    # 100 MB less for the records that keep them). A line is cut at its first ": ": when what comes before is a
    # known name ("cn") the rest is a plain value, and when it is a known name and a colon ("cn:") the rest is
    # base64 - exactly what the regular expression would find, since a name holds neither ':' nor ' '. Every
    # other line (no space after the colon, URLs, bad names, bad base64) takes the slower way below, the one
    # that decides errors, so messages stay the same.
    spaced: dict[str, tuple[str, str, bool]] = {}  # "cn" or "cn:" -> (shared spelling, lower-cased, base64)
    names: dict[str, tuple[str, str] | None] = {}  # as written -> (shared spelling, lower-cased) or None: not plain
    # Base64 values decoded, by their text: an AD or Zimbra export encodes every Vietnamese name, title and unit,
    # and most of those 600,000 values repeat one seen before (decoding them was a fifth of the reading time;
    # repeats now also share one string). Bounded, and emptied when full.
    decoded: dict[str, str] = {}
    # Logical lines are unfolded here, not in a generator of their own: a generator step (and a tuple) for each
    # of two million lines was a tenth of a second spent on nothing. A line is handled once the next one shows
    # it does not continue; the blank line added at the end handles the last one and ends the last record.
    pending: str | None = None  # the logical line being read
    folded: list[str] | None = None  # its parts, once a continuation line came
    start = 0
    in_comment = False
    lines = iter(stream)
    head = next(lines, None)
    if head is None:
        return
    if head.startswith("\ufeff"):
        head = head[1:]
    for number, raw in enumerate(chain((head,), lines, ("",)), start=1):
        line = raw.rstrip("\r\n")
        first = line[:1]
        if first == " ":
            if in_comment:
                continue
            if pending is None:
                raise LdifError(f"{name}, line {number}: a continuation line (starting with a space) "
                                "follows nothing")
            if folded is None:
                folded = [pending]
            folded.append(line[1:])
            continue
        if pending is not None:
            text = pending if folded is None else "".join(folded)
            pending = folded = None
            value: str | None = None
            key, separator, rest = text.partition(": ")
            if separator:
                known = spaced.get(key)
                if known is None:
                    known = _spaced_name(key)
                    if known is not None:
                        spaced[key] = known
                if known is not None:
                    key, lowered, encoded = known
                    if not encoded:
                        value = rest
                    else:
                        value = decoded.get(rest)
                        if value is None:
                            # what b64decode(validate=True) does, less its Python layers; strict mode also
                            # refuses spaces around the value, which the slower way strips (or refuses: a
                            # line break inside a line is no 'attribute: value' there)
                            try:
                                value = binascii.a2b_base64(rest, strict_mode=True).decode("utf-8")
                            except ValueError:  # binascii.Error and UnicodeDecodeError too: decided below
                                value = None
                            else:
                                # a DN comes once, a long text seldom twice; titles, units and names come again
                                if lowered != "dn" and len(rest) <= 256:
                                    if len(decoded) >= _DECODED_SIZE:
                                        decoded.clear()
                                    decoded[rest] = value
            if value is None:
                key, _, rest = text.partition(":")
                plain = names.get(key, False)
                if plain is False:
                    plain = names[key] = (sys.intern(key), key.lower()) if _NAME.fullmatch(key) else None
                if plain is not None and rest[:1] not in (":", "<"):
                    key, lowered = plain
                    value = rest[1:] if rest[:1].isspace() else rest  # the regex's \s?(.*)
                else:
                    match = _ATTR.match(text)
                    if not match:
                        raise LdifError(f"{name}, line {start}: expected 'attribute: value', found {text[:60]!r}")
                    key, separator, rest = match.groups()
                    lowered = key.lower()
                    value = _value(name, start, separator, rest, key)
            if value is not None:
                if dn is None:
                    if lowered == "version" and not seen_record:
                        if value != "1":
                            raise LdifError(f"{name}, line {start}: unsupported LDIF version {value!r} "
                                            "(only 1 exists)")
                        seen_record = True
                    elif lowered != "dn":
                        raise LdifError(f"{name}, line {start}: a record must start with 'dn:', found '{key}:'")
                    else:
                        dn, dn_line, seen_record = value, start, True
                else:
                    if lowered == "changetype":
                        raise LdifError(f"{name}, line {start}: '{dn}' is a change record (changetype: {value}); "
                                        "export the directory's content (ldapsearch / slapcat output), not changes")
                    if lowered == "control":
                        raise LdifError(f"{name}, line {start}: '{dn}' carries a control: that is a change record")
                    found = attributes.get(lowered)
                    if found is None:
                        attributes[lowered] = (key, [value])
                    else:
                        found[1].append(value)
        in_comment = first == "#"
        if in_comment:
            continue
        if not line:
            if dn is not None:
                yield _entry(dn, attributes, dn_line)
                dn, attributes = None, {}
            continue
        start = number
        pending = line


def _spaced_name(key: str) -> tuple[str, str, bool] | None:
    """Tell what comes before a line's first ': ': a name (plain value), a name and ':' (base64), or neither."""
    encoded = key.endswith(":")
    bare = key[:-1] if encoded else key
    if not _NAME.fullmatch(bare):
        return None
    return sys.intern(bare), bare.lower(), encoded


def _entry(dn: str, attributes: dict[str, tuple[str, list[str]]], line: int) -> LdifEntry:
    """Freeze a parsed record (attributes in the order they first appear)."""
    return LdifEntry(dn=dn, attributes=tuple([(k, tuple(v)) for k, v in attributes.values()]), line=line)


# Attributes that hold bytes, not text (Active Directory's ldifde writes them into every export).
# Their values are skipped: nothing in a consolidation reads them, and refusing the whole export
# for an objectGUID would make AD exports unusable.
BINARY_ATTRIBUTES = frozenset(name.lower() for name in (
    "objectGUID", "objectSid", "sIDHistory", "jpegPhoto", "thumbnailPhoto", "photo", "audio", "logonHours",
    "userCertificate", "userSMIMECertificate", "userPKCS12", "cACertificate", "certificateRevocationList",
    "mSMQSignCertificates", "mSMQDigests", "msExchMailboxGuid", "msExchMailboxSecurityDescriptor",
    "msExchMasterAccountSid", "msExchArchiveGUID", "msDS-KeyCredentialLink", "msRTCSIP-UserRoutingGroupId",
    "terminalServer", "userParameters", "replicationSignature", "msDS-GenerationId",
))


def _value(name: str, number: int, separator: str, text: str, key: str = "") -> str | None:
    """Decode one value: plain, base64 (::) or refuse URLs (:<); None for a skipped binary value."""
    if separator == ":<":
        raise LdifError(f"{name}, line {number}: values read from URLs (':<') are not supported; "
                        "export with the values inline")
    if separator == "::":
        try:
            data = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LdifError(f"{name}, line {number}: invalid base64 value") from exc
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if key.lower() in BINARY_ATTRIBUTES or key.lower().endswith(";binary"):
                return None
            raise LdifError(f"{name}, line {number}: base64 value is not UTF-8 text "
                            f"(attribute '{key}' holds bytes: leave it out of the export)") from exc
    return text


def format_line(name: str, value: str) -> str:
    """Return one attribute line, base64-encoded when RFC 2849 requires it, folded at 76 columns."""
    if _SAFE.match(value) and not value.endswith(" "):
        line = f"{name}: {value}"
    else:
        line = f"{name}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"
    if len(line) <= FOLD_WIDTH:
        return line
    parts = [line[:FOLD_WIDTH]]
    rest = line[FOLD_WIDTH:]
    while rest:
        parts.append(" " + rest[: FOLD_WIDTH - 1])
        rest = rest[FOLD_WIDTH - 1:]
    return "\n".join(parts)


def format_entry(dn: str, attributes: Attributes) -> str:
    """Return a content record (ending with a blank line)."""
    lines = [format_line("dn", dn)]
    for key, values in attributes:
        lines.extend(format_line(key, value) for value in values)
    return "\n".join(lines) + "\n\n"


def format_change(dn: str, changetype: str, attributes: Attributes = (),
                  modifications: Iterable[tuple[str, str, tuple[str, ...]]] = ()) -> str:
    """Return a change record: add (attributes), delete, or modify ((op, attribute, values), …)."""
    lines = [format_line("dn", dn), f"changetype: {changetype}"]
    if changetype == "add":
        for key, values in attributes:
            lines.extend(format_line(key, value) for value in values)
    elif changetype == "modify":
        for operation, key, values in modifications:
            lines.append(f"{operation}: {key}")
            lines.extend(format_line(key, value) for value in values)
            lines.append("-")
    elif changetype != "delete":
        raise ValueError(f"unsupported changetype {changetype!r}")
    return "\n".join(lines) + "\n\n"
