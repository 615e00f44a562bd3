"""Sender Rewriting Scheme (Shevek's SRS0/SRS1, as libsrs2 and postsrsd write it): envelope senders the relay can vouch for."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailmerge_gov.config import Relay, Secret, SecretError
from mailmerge_gov.forwarding.address import NULL_PATH, AddressError, local_part, parse_mailbox

TIME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # base32, two characters: days modulo 1024
TIME_SLOTS = 1024
DAY_SECONDS = 24 * 60 * 60
SEPARATORS = "=+-"  # after the SRS0/SRS1 tag; we write "=", and read all three as libsrs2 does
MIN_HASH_LENGTH = 4
MAX_HASH_LENGTH = 27  # base64 characters that 20 bytes of HMAC-SHA1 fill completely
MIN_SECRET_LENGTH = 16


class SrsError(Exception):
    """An address cannot be rewritten or reversed; the message says why (never the secret)."""


@dataclass(frozen=True)
class Srs:
    """The relay's SRS settings: its domain, its secrets (the first signs, all verify), hash length and age."""

    domain: str
    secrets: tuple[str, ...] = field(repr=False)
    hash_length: int = 6
    max_age_days: int = 21
    exempt_domains: frozenset[str] = frozenset()  # senders here are ours (old and new domains): never rewritten

    def __post_init__(self) -> None:
        """Refuse settings that make forged bounces easy."""
        if not self.secrets:
            raise SrsError("SRS needs at least one secret")
        if any(len(secret) < MIN_SECRET_LENGTH for secret in self.secrets):
            raise SrsError(f"every SRS secret must be at least {MIN_SECRET_LENGTH} characters long")
        if not MIN_HASH_LENGTH <= self.hash_length <= MAX_HASH_LENGTH:
            raise SrsError(f"the SRS hash length must be {MIN_HASH_LENGTH} to {MAX_HASH_LENGTH}")
        if not 1 <= self.max_age_days < TIME_SLOTS:
            raise SrsError(f"the SRS maximum age must be 1 to {TIME_SLOTS - 1} days")

    def forward(self, sender: str, now: float | None = None) -> str:
        """Return the envelope sender to relay with: SRS0 (or SRS1 for an SRS0 sender) on our domain."""
        if sender in ("", NULL_PATH):
            return sender  # bounces stay bounces: rewriting <> would make them bounceable
        try:
            mailbox = parse_mailbox(sender)
        except AddressError as exc:
            raise SrsError(f"cannot rewrite sender {sender}: {exc}") from None
        host = mailbox.domain
        if self._ours(host):
            return str(mailbox)
        user = mailbox.unquoted_local
        tag = _tag(user)
        if tag == "SRS0":
            # Guarded scheme: someone else's SRS0 is wrapped once, not nested, so addresses do not grow.
            srs_user = user[4:]
            local = f"SRS1={self._hash(self.secrets[0], host, srs_user)}={host}={srs_user}"
        elif tag == "SRS1" and (parts := _srs1_parts(user)) is not None:
            _hash, srs_host, srs_user = parts
            local = f"SRS1={self._hash(self.secrets[0], srs_host, srs_user)}={srs_host}={srs_user}"
        else:
            stamp = timestamp(time.time() if now is None else now)
            local = f"SRS0={self._hash(self.secrets[0], stamp, host, user)}={stamp}={host}={user}"
        return f"{local_part(local)}@{self.domain}"

    def is_srs_address(self, address: str) -> bool:
        """Whether an address is on our SRS domain and shaped like SRS0/SRS1."""
        try:
            mailbox = parse_mailbox(address)
        except AddressError:
            return False
        return mailbox.ascii_domain == self.domain and _tag(mailbox.unquoted_local) is not None

    def reverse(self, address: str, now: float | None = None) -> str:
        """Return the original sender an SRS address stands for; SrsError if forged, malformed or too old."""
        try:
            mailbox = parse_mailbox(address)
        except AddressError as exc:
            raise SrsError(str(exc)) from None
        if mailbox.route or mailbox.literal or mailbox.ascii_domain != self.domain:
            raise SrsError(f"{address} is not on the SRS domain {self.domain}")
        user = mailbox.unquoted_local
        tag = _tag(user)
        if tag == "SRS1":
            parts = _srs1_parts(user)
            if parts is None:
                raise SrsError(f"{address} is a malformed SRS1 address")
            hash_, srs_host, srs_user = parts
            self._check_hash(hash_, srs_host, srs_user)
            return f"{local_part('SRS0' + srs_user)}@{srs_host}"
        if tag == "SRS0":
            parts0 = user[5:].split("=", 3)
            if len(parts0) != 4 or not all(parts0):
                raise SrsError(f"{address} is a malformed SRS0 address")
            hash_, stamp, host, original = parts0
            self._check_age(stamp, time.time() if now is None else now)
            self._check_hash(hash_, stamp, host, original)
            return f"{local_part(original)}@{host}"
        raise SrsError(f"{address} is not an SRS address")

    def _ours(self, host: str) -> bool:
        """Whether a sender domain is one the relay speaks for (old, new or the SRS domain)."""
        try:
            domain = parse_mailbox(f"x@{host}").ascii_domain
        except AddressError:
            return False
        return domain == self.domain or domain in self.exempt_domains

    def _hash(self, secret: str, *parts: str) -> str:
        """HMAC-SHA1 over the lower-cased parts, base64, cut to the hash length (as libsrs2 does)."""
        mac = hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha1)
        for part in parts:
            # ASCII-only lower case, like libsrs2's tolower(): MTAs may change the case of local parts.
            mac.update(part.encode("utf-8").lower())
        return base64.b64encode(mac.digest()).decode("ascii")[: self.hash_length]

    def _check_hash(self, hash_: str, *parts: str) -> None:
        """Accept a hash made with any of the secrets; the length must be exactly the configured one."""
        # libsrs2 accepts shorter hashes down to a minimum; a forger would then need fewer guesses.
        if len(hash_) != self.hash_length:
            raise SrsError(f"SRS hash has {len(hash_)} characters, expected {self.hash_length}")
        given = hash_.lower().encode("ascii", "replace")
        if not any(hmac.compare_digest(given, self._hash(secret, *parts).lower().encode("ascii"))
                   for secret in self.secrets):
            raise SrsError("SRS hash does not match: the address was not made by this relay")

    def _check_age(self, stamp: str, now: float) -> None:
        """Refuse a timestamp older than the maximum age (or not a timestamp at all)."""
        then = day_of(stamp)
        today = int(now // DAY_SECONDS) % TIME_SLOTS
        while today < then:
            today += TIME_SLOTS
        if today > then + self.max_age_days:
            raise SrsError(f"SRS address is {today - then} days old, more than {self.max_age_days}")


def timestamp(now: float) -> str:
    """The two-character SRS timestamp of a moment: its day number modulo 1024 in base32."""
    day = int(now // DAY_SECONDS)
    return TIME_CHARS[(day >> 5) & 31] + TIME_CHARS[day & 31]


def day_of(stamp: str) -> int:
    """The day number (modulo 1024) of an SRS timestamp; SrsError if it is not one."""
    if len(stamp) != 2 or any(char.upper() not in TIME_CHARS for char in stamp):
        raise SrsError(f"'{stamp}' is not an SRS timestamp")
    return (TIME_CHARS.index(stamp[0].upper()) << 5) | TIME_CHARS.index(stamp[1].upper())


def _tag(user: str) -> str | None:
    """Return "SRS0" or "SRS1" when a local part starts with that tag and a separator."""
    tag = user[:4].upper()
    if tag in ("SRS0", "SRS1") and len(user) > 5 and user[4] in SEPARATORS:
        return tag
    return None


def _srs1_parts(user: str) -> tuple[str, str, str] | None:
    """Split SRS1=HHH=host=rest into (hash, host, rest), or None if it is not shaped so."""
    hash_, sep, rest = user[5:].partition("=")
    host, sep2, srs_user = rest.partition("=")
    if not (hash_ and sep and host and sep2 and srs_user):
        return None
    return hash_, host, srs_user


def srs_from_config(relay: Relay, exempt_domains: Iterable[str]) -> Srs | None:
    """Build the relay's SRS from [relay], reading the secrets now; None when SRS is not configured."""
    if relay.srs_domain is None:
        return None
    secrets = tuple(_reveal(secret) for secret in relay.srs_secrets)
    return Srs(domain=relay.srs_domain, secrets=secrets, hash_length=relay.srs_hash_length,
               max_age_days=relay.srs_max_age_days, exempt_domains=frozenset(d.lower() for d in exempt_domains))


def _reveal(secret: Secret) -> str:
    """Read one SRS secret, saying where it comes from if it cannot be read."""
    try:
        value = secret.reveal()
    except SecretError as exc:
        raise SrsError(f"SRS secret ({secret.describe()}): {exc}") from None
    if len(value) < MIN_SECRET_LENGTH:
        # A short secret can be guessed offline from one rewritten address, and then anyone can forge bounces.
        raise SrsError(f"SRS secret ({secret.describe()}) is shorter than {MIN_SECRET_LENGTH} characters")
    return value
