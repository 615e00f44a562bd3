"""The relay's SMTP replies: codes and enhanced status codes here, the words in templates/relay/replies.txt."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import jinja2

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("mailmerge_gov", "templates"), autoescape=False,
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
MAX_LINE = 400  # reply lines stay well under the 512 octets of RFC 5321 section 4.5.3.1.5
MAX_LINES = 6


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code, enhanced status code (RFC 3463) and text lines."""

    code: int
    status: str = ""  # "5.1.6"; empty for a reply passed on as the next hop wrote it
    lines: tuple[str, ...] = ("OK",)

    @property
    def positive(self) -> bool:
        """A 2xx reply."""
        return 200 <= self.code < 300

    def __str__(self) -> str:
        """The reply as sent, lines joined by CRLF (aiosmtpd adds the last CRLF)."""
        status = f"{self.status} " if self.status else ""
        lines = self.lines or ("",)
        return "\r\n".join(f"{self.code}{' ' if index == len(lines) - 1 else '-'}{status}{line}".rstrip()
                           for index, line in enumerate(lines))

    def one_line(self) -> str:
        """The reply on one line, for logs."""
        status = f"{self.status} " if self.status else ""
        return f"{self.code} {status}{' / '.join(self.lines)}".rstrip()


def to_ascii(text: str) -> str:
    """Text safe for an SMTP reply: Vietnamese without diacritics, anything else non-printable as '?'."""
    # RFC 5321 section 4.2: reply text is US-ASCII. Folded Vietnamese ("Dia chi nay") stays readable.
    text = text.replace("đ", "d").replace("Đ", "D")
    bare = "".join(char for char in unicodedata.normalize("NFKD", text) if not unicodedata.combining(char))
    return "".join(char if " " <= char <= "~" else "?" for char in bare)


def render(code: int, status: str, name: str, **values: object) -> Reply:
    """Render the reply template `name` into a Reply with ASCII-only lines."""
    macro = getattr(_ENV.get_template("relay/replies.txt").module, name)
    # Values come from the client (an address): made safe before they go in, so a CR, VT, NEL or U+2028 in
    # one becomes '?' rather than a line break; only the template's own newlines make lines.
    text = str(macro(**{key: to_ascii(value) if isinstance(value, str) else value for key, value in values.items()}))
    lines = tuple(to_ascii(line.strip())[:MAX_LINE] for line in text.split("\n") if line.strip())
    return Reply(code, status, lines)


def passed_on(code: int, text: str) -> Reply:
    """The next hop's reply, passed back to the client with its own code and text (cleaned, bounded)."""
    lines = tuple(to_ascii(line.strip())[:MAX_LINE] for line in text.splitlines() if line.strip())
    return Reply(code, "", lines[:MAX_LINES] or ("",))


OK_SENDER = Reply(250, "2.1.0", ("OK",))
OK_RECIPIENT = Reply(250, "2.1.5", ("OK",))


def moved(new_address: str) -> Reply:
    """550 5.1.6: the forwarding period of an old address has ended."""
    return render(550, "5.1.6", "moved", new_address=new_address)


def unknown(address: str) -> Reply:
    """550 5.1.1: no such old address."""
    return render(550, "5.1.1", "unknown", address=address)


def relay_denied(address: str) -> Reply:
    """554 5.7.1: not an address of an old domain; the relay is never an open relay."""
    return render(554, "5.7.1", "relay_denied", address=address)


def too_many_recipients(limit: int) -> Reply:
    """452 4.5.3: the client sends the remaining recipients in another transaction (RFC 5321 4.5.3.1.10)."""
    return render(452, "4.5.3", "too_many_recipients", limit=limit)


def smtputf8_required() -> Reply:
    """553 5.6.7: a non-ASCII address in a transaction without SMTPUTF8 (RFC 6531 section 3.5)."""
    return render(553, "5.6.7", "smtputf8_required")


def bad_sender(reason: str) -> Reply:
    """553 5.1.7: the envelope sender is not an address."""
    return render(553, "5.1.7", "bad_sender", reason=reason)


def next_hop_unavailable(reason: str, status: str = "4.4.1") -> Reply:
    """451 4.4.1 (no answer) or 4.4.2 (connection lost, timeout): the client retries later."""
    return render(451, status, "next_hop_unavailable", reason=reason)


def next_hop_deferred(code: int, text: str) -> Reply:
    """451 4.4.0: the next hop answered 4xx; the client retries later."""
    said = " ".join(line.strip() for line in text.splitlines())
    return render(451, "4.4.0", "next_hop_deferred", reply=f"{code} {said}".strip()[:200])


def loop(reason: str) -> Reply:
    """554 5.4.6: the message has been here before."""
    return render(554, "5.4.6", "loop", reason=reason)


def srs_bounces_only() -> Reply:
    """550 5.7.1: an SRS address with a sender other than <>."""
    return render(550, "5.7.1", "srs_bounces_only")


def srs_invalid() -> Reply:
    """550 5.1.1: a forged, malformed or expired SRS address."""
    return render(550, "5.1.1", "srs_invalid")


def internal_error() -> Reply:
    """451 4.3.0: something went wrong inside the relay; nothing of it is shown to the client."""
    return render(451, "4.3.0", "internal_error")
