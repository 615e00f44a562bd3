"""Whether two messages are one message whose MIME a server rewrote: Message-ID, size band, normalised body.

A byte-for-byte copy has the same SHA-256. Exchange does not keep the MIME it is given: it stores properties and
writes MIME anew when asked, so a copied message comes back with headers added (X-MS-Has-Attach, Content-Language
...) and reordered, its body re-encoded (8bit as quoted-printable or base64) and its headers folded differently.
Such a message is still the same message when all three hold:

- the same Message-ID (or neither has one);
- a size in the band: the copy is at least half and at most three times the original, plus 4 KB (re-encoding
  Vietnamese text as quoted-printable can almost triple it; added headers are a few hundred bytes);
- the same normalised content hash: the message parsed with the email package, then the SHA-256 of its decoded
  Subject (whitespace collapsed) and of each leaf part in order: its content type, and its decoded content
  (transfer encoding undone, text decoded with its charset, line ends as LF, trailing whitespace of each line and
  trailing empty lines removed); every other header is ignored.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

# The copy may be this much smaller or larger than the original (see the module docstring).
SIZE_LOW, SIZE_HIGH, SIZE_SLACK = 0.5, 3.0, 4096

_parser = email.parser.BytesParser(policy=email.policy.default)
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Fingerprint:
    """What is left of a message when a server rewrites its MIME: Message-ID, size and normalised content hash."""

    message_id: str | None
    size: int
    content: str  # hex SHA-256 of the normalised subject and body

    def matches(self, copy: Fingerprint) -> bool:
        """Whether copy is this message as a server rewrote it."""
        return (self.message_id == copy.message_id and self.content == copy.content
                and self.size * SIZE_LOW <= copy.size <= self.size * SIZE_HIGH + SIZE_SLACK)


class Copies:
    """Copies found in a target, by fingerprint, each to be claimed by one original."""

    def __init__(self, copies: Iterable[tuple[Fingerprint, str]]) -> None:
        """Keep (fingerprint, target key) pairs, in their order."""
        # by Message-ID and content hash, which a match needs equal: claiming is a lookup and a look at the few
        # copies of that one message, not a pass over all (a folder of 50,000 would take 50,000 x 50,000)
        self._by_content: dict[tuple[str | None, str], list[tuple[Fingerprint, str]]] = defaultdict(list)
        for copy, key in copies:
            self._by_content[(copy.message_id, copy.content)].append((copy, key))

    def claim(self, original: Fingerprint) -> str | None:
        """The key of the first copy that matches the original, which no later original can claim; None if none does."""
        same = self._by_content.get((original.message_id, original.content), [])
        for index, (copy, key) in enumerate(same):
            if original.matches(copy):
                del same[index]
                return key
        return None


def fingerprint(raw: bytes) -> Fingerprint:
    """Return the fingerprint of a raw message."""
    message = _parser.parsebytes(raw)
    digest = hashlib.sha256()
    digest.update(_header(message, "subject").encode("utf-8") + b"\0")
    for part in message.walk():
        if part.is_multipart():
            continue
        digest.update(part.get_content_type().encode("ascii", "replace") + b"\0")
        digest.update(_content(part) + b"\0")
    message_id = _header(message, "message-id").strip("<> ") or None
    return Fingerprint(message_id, len(raw), digest.hexdigest())


def _header(message: email.message.Message, name: str) -> str:
    """A header decoded (RFC 2047) with its whitespace collapsed; "" when absent or unreadable."""
    try:
        value = message.get(name)
    except (ValueError, LookupError, IndexError):  # a header the email package cannot parse: left out of both sides
        return ""
    # a header sent as raw 8-bit (not RFC 2047) comes as surrogate escapes: read its bytes as UTF-8, as a server
    # that re-encodes it does
    text = str(value or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _SPACES.sub(" ", text).strip()


def _content(part: email.message.Message) -> bytes:
    """A leaf part's content with transfer encoding, charset, line ends and trailing whitespace normalised."""
    payload = part.get_payload(decode=True) or b""
    if part.get_content_maintype() != "text":
        return payload
    charset = part.get_content_charset() or "us-ascii"
    try:
        text = payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset: compare the bytes as Latin-1, which never fails
        text = payload.decode("latin-1")
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines).encode("utf-8")


__all__ = ["Fingerprint", "fingerprint"]
