"""SMTP paths and mailboxes (RFC 5321, RFC 6531): strict parsing, no guessing, for an MX that must never relay."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# atext of RFC 5322 plus the UTF-8 of RFC 6531, but no surrogates: aiosmtpd hands undecodable bytes over as
# surrogate escapes, and those are never part of a real address.
_UTF8 = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]+"
_DOT_STRING = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED_STRING = re.compile(rf'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"$')
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_ADDRESS_LITERAL = re.compile(r"^\[[\x21-\x5a\x5e-\x7e]+\]$")
NULL_PATH = "<>"  # how aiosmtpd (and so this package) writes the null reverse-path of bounces


class AddressError(ValueError):
    """A string is not a mailbox an SMTP command may carry; the message says why."""


@dataclass(frozen=True)
class Mailbox:
    """A parsed SMTP mailbox: local part and domain as written, and the source route if one was given."""

    local: str  # a dot-string, or a quoted-string with its quotes
    domain: str  # a host name (ASCII or U-labels) or an address literal in brackets
    route: str = ""  # "@a,@b" of an obsolete source route <@a,@b:x@y>, else empty

    @property
    def quoted(self) -> bool:
        """Whether the local part is a quoted-string."""
        return self.local.startswith('"')

    @property
    def literal(self) -> bool:
        """Whether the domain is an address literal such as [192.0.2.1]."""
        return self.domain.startswith("[")

    @property
    def unquoted_local(self) -> str:
        """The local part with quotes and backslash escapes removed."""
        if not self.quoted:
            return self.local
        return re.sub(r"\\(.)", r"\1", self.local[1:-1])

    @property
    def ascii_domain(self) -> str:
        """The domain in lower-case ASCII (U-labels converted to A-labels); literals as written."""
        if self.literal:
            return self.domain
        return ascii_domain(self.domain)

    def __str__(self) -> str:
        """The mailbox as an SMTP command carries it (without the route)."""
        return f"{self.local}@{self.domain}"


def ascii_domain(domain: str) -> str:
    """Return a host name in lower-case ASCII; AddressError when it is not a host name."""
    text = domain.lower()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError(f"'{domain}' is not a valid internationalised domain name") from None
    if not _HOSTNAME.match(text) or "." not in text:
        raise AddressError(f"'{domain}' is not a domain name")
    return text


def split_path(argument: str) -> tuple[str | None, str | None]:
    """Split the argument of MAIL FROM:/RCPT TO: into the path as written and its parameters; (None, None) if malformed."""
    # aiosmtpd parses paths with the lenient RFC 5322 header parser, which accepts comments and silently
    # drops source routes. A relay that must refuse <@a,@b:x@old> has to see the path as it was sent.
    text = argument.lstrip()
    if not text:
        return "", ""
    if not text.startswith("<"):
        # Without brackets (not RFC 5321, but common): the path ends at the first space.
        path, _, rest = text.partition(" ")
        return path, rest.strip()
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 2
                continue
            if char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "<":
            return None, None
        elif char == ">":
            inner, rest = text[1:index], text[index + 1:]
            if rest and not rest.startswith(" "):
                return None, None
            return inner or NULL_PATH, rest.strip()
        index += 1
    return None, None


def parse_mailbox(text: str) -> Mailbox:
    """Parse a path's content (a mailbox, optionally after a source route); AddressError saying why not."""
    route = ""
    rest = text
    if rest.startswith("@"):
        route, colon, rest = rest.partition(":")
        if not colon or not all(part.startswith("@") and _HOSTNAME.match(part[1:]) for part in route.split(",")):
            raise AddressError(f"'{text}' has a malformed source route")
    if rest.startswith('"'):
        end = _quoted_end(rest)
        if end is None:
            raise AddressError(f"'{text}' has an unterminated quoted local part")
        local, rest = rest[: end + 1], rest[end + 1:]
        if not rest.startswith("@"):
            raise AddressError(f"'{text}' has no @ after its quoted local part")
        domain = rest[1:]
        if not _QUOTED_STRING.match(local):
            raise AddressError(f"'{text}' has a quoted local part with characters SMTP does not allow")
    else:
        local, at, domain = rest.partition("@")
        if not at:
            raise AddressError(f"'{text}' has no domain")
        if not _DOT_STRING.match(local):
            raise AddressError(f"'{text}' has a local part that is not a dot-string")
    if "@" in domain or not domain:
        raise AddressError(f"'{text}' has a malformed domain")
    if domain.startswith("["):
        if not _ADDRESS_LITERAL.match(domain):
            raise AddressError(f"'{text}' has a malformed address literal")
    else:
        ascii_domain(domain)
    return Mailbox(local=local, domain=domain, route=route)


def _quoted_end(text: str) -> int | None:
    """Return the index of the quote that closes the quoted-string text starts with, or None."""
    index = 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == '"':
            return index
        index += 1
    return None


def local_part(text: str) -> str:
    """Write a local part as a dot-string when it is one, else as a quoted-string."""
    if _DOT_STRING.match(text):
        return text
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def is_plain_mailbox(mailbox: Mailbox) -> bool:
    """Whether a mailbox can name one person of the map: no route, no quotes, no %/! relaying, no IP literal."""
    # '%' and '!' are the old "percent hack" and UUCP bang paths: a server that honours them relays to
    # whatever the local part names. None of them can be an official's address, so none is looked up.
    return not (mailbox.route or mailbox.quoted or mailbox.literal or "%" in mailbox.local or "!" in mailbox.local)


def normalise(mailbox: Mailbox) -> str:
    """The key a plain mailbox is looked up by: local part and domain case-insensitive."""
    # NFC: an SMTPUTF8 local part may arrive composed or decomposed; both are the same name.
    return f"{unicodedata.normalize('NFC', mailbox.local).lower()}@{mailbox.ascii_domain}"
