"""One official address per identity: kept, patterned, or suffixed, never reused."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import jinja2
import jinja2.sandbox

from mailmerge_gov.config import Config
from mailmerge_gov.directory.identity import RFC2142_NAMES
from mailmerge_gov.vietnamese import NameParts, fold

_LOCAL_CHARS = re.compile(r"[^a-z0-9._-]+")
# Patterns come from the administrator's file, but a sandbox costs nothing and keeps a typo
# like {{ given.__class__ }} from doing more than failing; StrictUndefined makes an unknown
# variable an error instead of an empty string (which would give everyone the same address).
_ENV = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


class AddressingError(Exception):
    """The addressing policy cannot give an address; the message says which pattern or person."""


@dataclass(frozen=True)
class Candidate:
    """What addressing needs to know of one identity."""

    identity: int
    kind: str  # "person" or "role"
    parts: NameParts
    source: str  # the source whose record names the identity
    own_addresses: tuple[str, ...]  # every address the identity's records have
    keep: str | None = None  # an address in the new domain the identity keeps (surviving unit)


@dataclass(frozen=True)
class Assignment:
    """The address an identity gets, and how it came to it."""

    identity: int
    address: str
    kept: bool
    how: str  # "kept", "applied earlier", "pattern 1", "pattern 1 + 2", "role", "role + 2"
    taken: tuple[str, ...] = ()  # the addresses it would have had but others hold (collisions)


def local_part(text: str) -> str:
    """Turn rendered text into a local part: folded, only a-z 0-9 . _ -, no dots at the ends."""
    value = _LOCAL_CHARS.sub("", fold(text).replace(" ", ""))
    return re.sub(r"\.{2,}", ".", value).strip(".-_")


def pattern_values(parts: NameParts, source: str) -> dict[str, str]:
    """Return the variables a pattern may use, folded and without spaces."""
    def squash(text: str) -> str:
        return fold(text).replace(" ", "")

    middle_words = parts.middle.split()
    return {
        "family": squash(parts.family),
        "middle": squash(parts.middle),
        "given": squash(parts.given),
        "initials": parts.initials,
        "family_initial": squash(parts.family)[:1],
        "middle_initials": "".join(squash(word)[:1] for word in middle_words),
        "given_initial": squash(parts.given)[:1],
        "source": source,
    }


# A pattern that is only text and {{ variable }} parts (every pattern of the documentation) renders to the text
# with the variables put in, as jinja2 renders it; any other pattern goes through jinja2.
_PLAIN_PATTERN = re.compile(r"(?:[^{}\r\n]|\{\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\})*")
_PATTERN_PART = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@functools.lru_cache(maxsize=64)
def _template(pattern: str) -> jinja2.Template:
    """Compile a pattern once."""
    # Compiling is 50 times slower than rendering, and a plan renders each pattern once per official: 66 of the
    # 80 s of assigning 100,000 addresses went into compiling.
    return _ENV.from_string(pattern)


@functools.lru_cache(maxsize=64)
def _plain_parts(pattern: str) -> tuple[tuple[str, str | None], ...] | None:
    """Split a plain pattern into (text, variable or None) parts; None for any other pattern."""
    if not _PLAIN_PATTERN.fullmatch(pattern):
        return None
    parts: list[tuple[str, str | None]] = []
    position = 0
    for match in _PATTERN_PART.finditer(pattern):
        parts.append((pattern[position:match.start()], match.group(1)))
        position = match.end()
    parts.append((pattern[position:], None))
    return tuple(parts)


def render(pattern: str, values: Mapping[str, str]) -> str:
    """Render one pattern into a local part; AddressingError names the pattern on failure."""
    parts = _plain_parts(pattern)
    if parts is not None and all(name is None or name in values for _, name in parts):
        # jinja2's sandboxed render costs 20 µs; 100,000 officials times two patterns is 4 s of a plan
        return local_part("".join(text + (str(values[name]) if name is not None else "") for text, name in parts))
    try:
        return local_part(_template(pattern).render(**values))
    except jinja2.TemplateError as exc:
        raise AddressingError(f"address pattern {pattern!r} cannot be used: {exc}") from exc


def assign_addresses(candidates: Sequence[Candidate], config: Config, held: Mapping[str, int],
                     official: Mapping[int, tuple[str, str]]) -> dict[int, Assignment]:
    """Give every candidate one address in the new domain.

    held: every address anyone holds or held (old addresses of all records, every address an
    apply made permanent or retired), with the identity it belongs to. official: the address an
    identity got from an earlier apply, with its state. Planned-but-never-applied addresses are
    worked out again each time, so a changed policy takes effect before the first apply.
    Identities are served in id order (the order they first appeared), so a newcomer never
    displaces anyone and the same inputs always give the same plan.
    """
    domain = config.target.mail_domain
    reserved = RFC2142_NAMES | set(config.addressing.reserved)
    taken: dict[str, int] = dict(held)
    result: dict[int, Assignment] = {}
    # For the numeric suffix: below floor[base] every number is reserved or taken (taken only grows), so the
    # search for a free one starts there, after a look at the identity's own addresses (one taken by the
    # identity itself is free for it). Counting up from 2 each time made 4 million lookups for 100,000 officials.
    floor: dict[str, int] = {}
    own: dict[int, list[str]] = {}
    for address, identity in held.items():
        own.setdefault(identity, []).append(address)

    def free(address: str, identity: int) -> bool:
        local = address.split("@", 1)[0]
        return local not in reserved and taken.get(address, identity) == identity

    def first_free_number(base: str, identity: int) -> int:
        start = floor.get(base, 2)
        ours = [int(middle) for address in own.get(identity, ()) if address.startswith(base)
                and address.endswith(f"@{domain}")
                and (middle := address[len(base):-len(domain) - 1]).isascii() and middle.isdigit()
                and middle == str(int(middle))
                and 2 <= int(middle) < start and free(address, identity)]
        if ours:
            return min(ours)
        number = start
        while not free(f"{base}{number}@{domain}", identity):
            number += 1
        floor[base] = number + 1  # every number below is reserved or taken, and this one is about to be
        return number

    ordered = sorted(candidates, key=lambda c: c.identity)
    # First everyone whose address is already fixed: kept, applied or planned earlier.
    for candidate in ordered:
        fixed = _fixed(candidate, official)
        if fixed:
            result[candidate.identity] = fixed
            taken[fixed.address] = candidate.identity
    for candidate in ordered:
        if candidate.identity in result:
            continue
        values = pattern_values(candidate.parts, candidate.source)
        if candidate.kind == "role":
            first_local = local_part(f"{candidate.own_addresses[0].split('@')[0]}.{candidate.source}") \
                if candidate.own_addresses else local_part(f"role.{candidate.source}")
            tried = [(first_local, "role")]
        else:
            tried = [(render(p, values), f"pattern {n}") for n, p in enumerate(config.addressing.patterns, 1)]
        collisions: list[str] = []
        chosen = None
        for local, how in tried:
            if not local:
                continue
            address = f"{local}@{domain}"
            if free(address, candidate.identity):
                chosen = Assignment(candidate.identity, address, False, how, tuple(collisions))
                break
            collisions.append(address)
        if chosen is None:
            base, how = next(((l, h) for l, h in tried if l), (None, None))
            if base is None:
                raise AddressingError(
                    f"identity {candidate.identity} ({candidate.parts.full}): every pattern gives an empty "
                    "local part; add a pattern that uses a part this name has")
            # Numeric suffix last, from 2 ("annv" is the first An, "annv2" the second).
            number = first_free_number(base, candidate.identity)
            chosen = Assignment(candidate.identity, f"{base}{number}@{domain}", False, f"{how} + {number}",
                                tuple(collisions))
        result[candidate.identity] = chosen
        taken[chosen.address] = candidate.identity
    return result


def _fixed(candidate: Candidate, official: Mapping[int, tuple[str, str]]) -> Assignment | None:
    """Return the assignment an identity already has, if any: applied earlier, or kept."""
    earlier = official.get(candidate.identity)
    if earlier and earlier[1] == "applied":
        return Assignment(candidate.identity, earlier[0], earlier[0] == candidate.keep, "applied earlier")
    if candidate.keep:
        return Assignment(candidate.identity, candidate.keep, True, "kept")
    return None


def held_addresses(owners: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Build the address → identity map of everything held, first owner winning."""
    held: dict[str, int] = {}
    for address, identity in owners:
        held.setdefault(address.lower(), identity)
    return held
