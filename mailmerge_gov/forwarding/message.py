"""What the relay does to a message: line endings, the headers it prepends, and the loop checks."""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Iterable

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
# a CR not followed by LF, or an LF not preceded by CR: what needs rewriting
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def normalise_line_endings(data: bytes) -> bytes:
    """Turn bare LF and bare CR into CRLF, the only line ending SMTP and DKIM know."""
    # A bare LF or CR that one server treats as a line end and another does not is how SMTP smuggling
    # hides a second message (\n.\n); after this the next hop sees exactly the lines we saw.
    if _BARE.search(data) is None:
        return data  # already clean (nearly every message): no copy of a message of megabytes
    return _LINE_ENDINGS.sub(b"\r\n", data)


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """The header fields of a CRLF message as (name, unfolded value), in order."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        return []
    head = message if end < 0 else message[: end + 2]
    fields: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.append((name.strip(), value.strip()))
    return fields


def count_received(fields: Iterable[tuple[str, str]]) -> int:
    """The number of Received header fields: the hops the message has made."""
    return sum(1 for name, _ in fields if name.lower() == "received")


def delivered_to(fields: Iterable[tuple[str, str]]) -> set[str]:
    """The addresses of the Delivered-To header fields, lower-cased, without angle brackets."""
    return {value.strip().strip("<>").strip().lower() for name, value in fields if name.lower() == "delivered-to"}


def protocol_name(extended: bool, utf8: bool, tls: bool) -> str:
    """The `with` keyword of a Received field (RFC 3848, RFC 6531): SMTP, ESMTP, ESMTPS, UTF8ESMTPS..."""
    return ("UTF8" if utf8 else "") + ("ESMTP" if extended else "SMTP") + ("S" if tls and extended else "")


def received_header(*, helo: str, client_ip: str, hostname: str, protocol: str, queue_id: str,
                    recipient: str | None, when: dt.datetime) -> bytes:
    """The Received field the relay prepends (RFC 5321 section 4.4); `for` only with a single recipient."""
    # `for <…>` names one recipient only, as Postfix does: with several it would tell every recipient who
    # else (Bcc included) got the message.
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    helo_text = _HELO_SAFE.sub("?", helo or "unknown")[:255]
    lines = [f"Received: from {helo_text} ([{literal}])",
             f"\tby {hostname} (mailmerge-gov relay) with {protocol} id {queue_id}"]
    stamp = email.utils.format_datetime(when)
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def delivered_to_header(address: str) -> bytes:
    """The Delivered-To field naming the old address: the next pass through the relay sees the loop."""
    return f"Delivered-To: {address}\r\n".encode("utf-8")
