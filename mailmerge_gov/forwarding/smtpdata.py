"""Reading a message after DATA in large chunks, with the checks aiosmtpd makes line by line, and its wire form."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiosmtpd.smtp import Envelope

# aiosmtpd 1.4 reads DATA one line at a time (a readuntil, a debug log call and a bytearray per line: about
# 12,500 of each for a 1 MB message, and a list of them joined at the end). This module reads what the
# client sent in the chunks the socket delivers and finds the end of data and the over-long lines with
# bytes methods that run in C, with the same outcome: the end is a line that is exactly "." (CRLF before and
# after; a bare CR or LF never ends a line, so SMTP smuggling with \n.\n or \r.\r stays inside the message),
# a line over `line_limit` octets with its CRLF refuses the message (500), more than `size_limit` octets of
# lines refuses it too (552); which of the two comes first in the message decides the reply; after a
# refusal the rest is read up to the end and dropped, so memory stays bounded by the limits.
END = b"\r\n.\r\n"
_STUFFED = re.compile(rb"(?:\A|(?<=\r\n))\.")  # the transparency dot of each line (lines end with CRLF only)
_LINE_START_DOT = re.compile(rb"(?m)^\.")  # after normalise_line_endings every line ends with CRLF
TOO_LONG = "too-long"
TOO_MUCH = "too-much"


class DataLost(ConnectionResetError):
    """The client closed the connection before the end of data (aiosmtpd ends the session on this error)."""


@dataclass
class DataRead:
    """What came after DATA: the message as sent (dot-stuffed, CRLF at the end), or why it was refused."""

    wire: bytearray | None  # None when refused
    refused: str | None = None  # TOO_LONG or TOO_MUCH
    bare: bool = False  # a CR without LF or an LF without CR somewhere in the message
    dots: int = 0  # lines that start with a dot: the transparency dots in `wire`


@dataclass
class _Scan:
    """How far the message has been checked, and what was found in the lines checked."""

    checked: int = 2  # start of the first line not yet checked
    octets: int = 0  # octets in the lines checked (with CRLF, before un-stuffing)
    bare: bool = False
    dots: int = 0
    refused: str | None = None
    # Where a CRLF and a dot (a line that starts with a dot) were seen and not yet counted, or -1. The bytes
    # from checked - 2 up to it, among those searched so far, hold none: lines before it need no count.
    dot_seen: int = -1


_LINE_DOT = b"\r\n."  # the start of END, and of every line that starts with a dot
_DOT_PROBES = 8  # dots looked at one by one before _find_line_dot searches for the three octets
_CR_MAP = bytes(1 if octet == 13 else 0 for octet in range(256))  # translate(): 1 for a CR, 0 for anything else
_LF_MAP = bytes(1 if octet == 10 else 0 for octet in range(256))  # translate(): 1 for an LF, 0 for anything else


class DataReader:
    """The message after DATA, taken in the pieces the socket delivers, with what was found so far."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        """Nothing read yet; `size_limit` 0 or None: no limit."""
        self.buf = bytearray(b"\r\n")  # a CRLF before the first line: the end is found even for an empty message
        self.scan = _Scan()
        self.search = 0  # where the search for END resumes
        self.size_limit = size_limit or 0
        self.line_limit = line_limit

    def feed(self, chunk: bytes) -> tuple[DataRead, bytes] | None:
        """Take the next bytes; once the end of data is among them, what was read and the bytes after the end."""
        buf, scan = self.buf, self.scan
        buf += chunk
        # One search tells both whether the end may be here and whether a line starts with a dot: most
        # messages have neither, and the bytes are then looked at once, not twice.
        seen = _find_line_dot(buf, self.search, len(buf))
        end = -1 if seen < 0 else buf.find(END, seen)
        if scan.dot_seen < 0:
            scan.dot_seen = seen
        stop = len(buf) if end < 0 else end + 2  # the message is buf[2:end + 2]: its last line keeps its CRLF
        if scan.refused is None:
            _check(buf, stop, scan, self.size_limit, self.line_limit)
        if end >= 0:
            excess = bytes(buf[end + len(END):])
            if scan.refused is not None:
                return DataRead(None, scan.refused), excess
            del buf[stop:]
            del buf[:2]  # CPython drops a bytearray's head without moving the rest
            return DataRead(buf, None, scan.bare, scan.dots), excess
        self.search = max(len(buf) - len(END) + 1, 0)
        if scan.refused is not None:
            # Only the last bytes matter now: where END may start in the next chunk.
            del buf[:-(len(END) - 1)]
            self.search = 0
        return None


def _find_line_dot(buf: bytearray, start: int, stop: int) -> int:
    """Where the first CRLF and dot of buf[start:stop] starts, or -1 (buf.find(_LINE_DOT, start, stop))."""
    # Most of a large message is base64, with no dot at all: finding a dot is memchr, at memory speed, where
    # the three-octet search costs 0.3 ms per MB. In a text with many dots, a few dots that start no line send
    # the rest to the three-octet search.
    position = start + 2  # where the dot of a match at `start` is
    for _ in range(_DOT_PROBES):
        dot = buf.find(b".", position, stop)
        if dot < 0:
            return -1
        if buf[dot - 1] == 10 and buf[dot - 2] == 13:
            return dot - 2
        position = dot + 1
    return buf.find(_LINE_DOT, position - 2, stop)


def _check(buf: bytearray, stop: int, scan: _Scan, size_limit: int, line_limit: int) -> None:
    """Check the complete lines of buf[scan.checked:stop] and move scan.checked past them."""
    start = position = scan.checked
    while True:
        # The last CRLF that ends within line_limit octets of a line start: every line from `position` up
        # to it is short enough. One find per kilobyte or so rather than one per line.
        window = min(position + line_limit, stop)
        last = buf.rfind(b"\r\n", position, window)
        if last < 0:
            if window - position >= line_limit:
                # No CRLF in line_limit octets from a line start: that line is too long, whether it is
                # complete or not. Lines before it that are over the size limit answer first, as line by line.
                scan.refused = TOO_MUCH if size_limit and scan.octets + position - start > size_limit else TOO_LONG
                scan.octets += position - start
                return
            break  # the rest is an unfinished line: checked when more comes
        position = last + 2
    # lines of buf[start:position], all complete
    scan.octets += position - start
    if start < position:
        if not scan.bare:
            # Every CR is followed by an LF and every LF follows a CR exactly when the map of CRs, moved one
            # octet on, is the map of LFs. The lines with the CRLF before them (it maps neither end): two
            # translate() and a compare run in C at about 0.3 ms per MB, where counting CRs, LFs and CRLFs
            # took 1.4 ms (bytes.count of one octet is a plain loop, of two octets slower still).
            lines = buf[start - 2:position]
            if lines.translate(_CR_MAP)[:-1] != lines.translate(_LF_MAP)[1:]:
                scan.bare = True
        if 0 <= scan.dot_seen < position:
            scan.dots += buf.count(_LINE_DOT, start - 2, position)  # the CRLF before each line (buf starts with one)
            scan.dot_seen = _find_line_dot(buf, position - 2, stop)  # the rest of what feed() searched
    scan.checked = position
    if size_limit and scan.octets > size_limit:
        scan.refused = TOO_MUCH


def unstuff(wire: bytes | bytearray) -> bytes:
    """The message of its wire form: the transparency dot of each line removed (RFC 5321 4.5.2)."""
    if not wire.startswith(b".") and b"\r\n." not in wire:
        return bytes(wire)
    return _STUFFED.sub(b"", wire)


def stuff(content: bytes) -> bytes:
    """The wire form of a message whose lines all end with CRLF: a dot before each line that starts with one."""
    if not content.startswith(b".") and b"\n." not in content:
        return content
    return _LINE_START_DOT.sub(b"..", content)


def header_block(wire: bytes | bytearray) -> bytes:
    """The header section of a message in wire form, un-stuffed, with the CRLF of its last field."""
    if wire.startswith(b"\r\n"):
        return b""
    end = wire.find(b"\r\n\r\n")
    return unstuff(wire if end < 0 else wire[: end + 2])


class RelayEnvelope(Envelope):
    """aiosmtpd's Envelope, holding the message in its wire form; the plain message is made only when asked for."""

    def __init__(self) -> None:
        """An empty envelope."""
        self.wire: bytearray | None = None  # as the client sent it after DATA: dot-stuffed, CRLF at the end
        self.wire_bare = False  # whether it has a bare CR or LF
        self.wire_dots = 0  # its transparency dots
        self._content: bytes | None = None
        super().__init__()

    @property
    def original_content(self) -> bytes | None:  # type: ignore[override]
        """The message without transparency dots (made from the wire form, once)."""
        if self._content is None and self.wire is not None:
            self._content = unstuff(self.wire)
        return self._content

    @original_content.setter
    def original_content(self, value: bytes | None) -> None:
        self._content = value

    @property
    def content(self) -> bytes | None:  # type: ignore[override]
        """The message as bytes (the relay never decodes it)."""
        return self.original_content

    @content.setter
    def content(self, value: bytes | None) -> None:
        if value is not None:
            self._content = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
