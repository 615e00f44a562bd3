"""Content lines of vCard (RFC 2425/2426) and iCalendar (RFC 5545): TEXT values escaped, long lines folded."""

from __future__ import annotations


def escape_text(value: str) -> str:
    """A TEXT value: backslash, semicolon and comma escaped, each line end (CRLF, LF or CR) as \\n."""
    return (value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
            .replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n"))


def fold(line: str) -> str:
    """A content line folded at 75 octets, never inside a UTF-8 character, ending with CRLF."""
    data = line.encode("utf-8")
    out: list[bytes] = []
    limit = 75
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # a continuation byte: cut before its character
            cut -= 1
        out.append(data[:cut])
        data = data[cut:]
        limit = 74  # the leading space of a continuation line counts
    out.append(data)
    return "\r\n ".join(part.decode("utf-8") for part in out) + "\r\n"


__all__ = ["escape_text", "fold"]
