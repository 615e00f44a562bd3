"""The shapes of old directories: which attributes hold which field in OpenLDAP, AD and Zimbra."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass
from operator import itemgetter
from typing import Callable, Iterable

from mailmerge_gov.directory.model import RawAttributes, SourceRecord

# The fields an override may name (config `[sources.directory.attributes]`), and how each is read:
# single fields take the first value of the first listed attribute that has one; list fields take
# every value of every listed attribute, in order.
SINGLE_FIELDS = ("uid", "full_name", "title", "unit", "employee_id", "citizen_id", "birth_date", "disabled")
LIST_FIELDS = ("mail", "aliases", "proxy_addresses", "phones", "mobiles", "member_of", "members",
               "member_uids", "member_addresses")
FIELDS = tuple(sorted(SINGLE_FIELDS + LIST_FIELDS))
_READ_ORDER = SINGLE_FIELDS + LIST_FIELDS  # the order of FieldMap._read, unpacked by read_entry

# Never kept in `raw`: the state store and its reports must not hold password hashes.
SECRET_ATTRIBUTES = frozenset({
    "userpassword", "authpassword", "unicodepwd", "dbcspwd", "ntpwdhistory", "lmpwdhistory",
    "supplementalcredentials", "sambantpassword", "sambalmpassword", "sambapasswordhistory",
    "krbprincipalkey", "pwdhistory", "zimbrapassword",
})

_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDRESS = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*@(?=.{{1,253}}$)(?:(?!-)[a-z0-9-]{{1,63}}(?<!-)\.)+"
                      r"(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
_DATE = (re.compile(r"^(\d{4})-(\d{2})-(\d{2})$"), re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$"),
         re.compile(r"^(\d{4})(\d{2})(\d{2})(?:\d{4,6}(?:\.\d+)?)?Z?$"))


class EntryError(ValueError):
    """An entry cannot be read; the message says what is wrong, the reader adds where."""


@dataclass(frozen=True)
class Preset:
    """How one kind of directory server stores people and groups."""

    name: str
    person_classes: frozenset[str]  # lower-case objectClass values that make an entry a person
    group_classes: frozenset[str]
    skip_classes: frozenset[str]  # never people even with a person class (AD computers are users)
    attributes: tuple[tuple[str, tuple[str, ...]], ...]  # field -> attribute names, in priority order
    disabled_rule: str  # "present", "uac" (userAccountControl bit 2) or "status" (anything but active)
    unit_from_dn: bool  # no unit attribute: use the first ou= RDN above the entry
    skip_flags: tuple[str, ...] = ()  # attributes that, when TRUE, mark a system account to skip


PRESETS: dict[str, Preset] = {
    "openldap": Preset(
        name="openldap",
        person_classes=frozenset({"inetorgperson", "person", "organizationalperson"}),
        group_classes=frozenset({"groupofnames", "groupofuniquenames", "posixgroup"}),
        skip_classes=frozenset(),
        attributes=(
            ("uid", ("uid",)), ("full_name", ("cn",)), ("mail", ("mail",)),
            ("aliases", ("mailAlternateAddress", "mailLocalAddress")), ("title", ("title",)),
            ("phones", ("telephoneNumber",)), ("mobiles", ("mobile",)), ("unit", ("ou",)),
            ("employee_id", ("employeeNumber",)), ("disabled", ("pwdAccountLockedTime",)),
            ("member_of", ("memberOf",)), ("members", ("member", "uniqueMember")), ("member_uids", ("memberUid",)),
        ),
        disabled_rule="present",
        unit_from_dn=True,
    ),
    "ad": Preset(
        name="ad",
        person_classes=frozenset({"user", "person", "inetorgperson"}),
        group_classes=frozenset({"group"}),
        skip_classes=frozenset({"computer"}),
        attributes=(
            ("uid", ("sAMAccountName",)), ("full_name", ("displayName", "cn")), ("mail", ("mail",)),
            ("proxy_addresses", ("proxyAddresses",)), ("title", ("title",)),
            ("phones", ("telephoneNumber",)), ("mobiles", ("mobile",)), ("unit", ("department",)),
            ("employee_id", ("employeeID",)), ("disabled", ("userAccountControl",)),
            ("member_of", ("memberOf",)), ("members", ("member",)),
        ),
        disabled_rule="uac",
        unit_from_dn=True,
    ),
    "zimbra": Preset(
        name="zimbra",
        person_classes=frozenset({"zimbraaccount"}),
        group_classes=frozenset({"zimbradistributionlist", "zimbragroup"}),
        skip_classes=frozenset(),
        attributes=(
            ("uid", ("uid",)), ("full_name", ("displayName", "cn")),
            ("mail", ("zimbraMailDeliveryAddress", "mail")), ("aliases", ("zimbraMailAlias",)),
            ("title", ("title",)), ("phones", ("telephoneNumber",)), ("mobiles", ("mobile",)),
            ("unit", ("ou",)), ("employee_id", ("employeeNumber",)), ("disabled", ("zimbraAccountStatus",)),
            ("member_addresses", ("zimbraMailForwardingAddress",)),
        ),
        disabled_rule="status",
        # Zimbra puts every account in ou=people: that container is not a unit.
        unit_from_dn=False,
        # galsync, spam/ham training and quarantine accounts: Zimbra's own, nobody's mailbox
        skip_flags=("zimbraIsSystemResource", "zimbraIsSystemAccount"),
    ),
}


@dataclass(frozen=True)
class FieldMap:
    """A preset with the source's overrides applied: field -> attribute names."""

    preset: Preset
    fields: tuple[tuple[str, tuple[str, ...]], ...]
    _index: dict[str, tuple[str, ...]] = dataclasses.field(init=False, repr=False, compare=False, hash=False)
    # What read_entry needs of the map, worked out once (it runs for every entry of a 100,000-entry export,
    # and asking names() for each field was 1.4 million calls): the names of each field in _READ_ORDER, ...
    _read: tuple[tuple[str, ...], ...] = dataclasses.field(init=False, repr=False, compare=False, hash=False)
    # ... the preset's skip flags lower-cased, ...
    _skip_flags: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False, hash=False)
    # ... and objectClass values as an entry has them -> "person", "group" or "" (neither, or a class to skip): an
    # export holds a few combinations, each repeated thousands of times.
    _kinds: dict[tuple[str, ...], str] = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # attribute names compare case-insensitively
        object.__setattr__(self, "_index", {k: tuple(n.lower() for n in v) for k, v in self.fields})
        object.__setattr__(self, "_read", tuple(self.names(field) for field in _READ_ORDER))
        object.__setattr__(self, "_skip_flags", tuple(flag.lower() for flag in self.preset.skip_flags))
        object.__setattr__(self, "_kinds", {})

    def names(self, field: str) -> tuple[str, ...]:
        """Return the attribute names (lower-case) that hold a field, or ()."""
        return self._index.get(field, ())

    def spelled(self, field: str) -> tuple[str, ...]:
        """Return the attribute names that hold a field as the preset or override spells them."""
        return next((names for key, names in self.fields if key == field), ())


def field_map(preset: Preset, overrides: Iterable[tuple[str, str]]) -> FieldMap:
    """Apply overrides (field, "attr" or "attr1, attr2") to a preset; EntryError names a bad key."""
    table = dict(preset.attributes)
    for field, value in overrides:
        if field not in FIELDS:
            raise EntryError(f"unknown field '{field}' (known: {', '.join(FIELDS)})")
        names = tuple(name.strip() for name in value.split(",") if name.strip())
        bad = [name for name in names if not _ATTRIBUTE_NAME.match(name)]
        if not names or bad:
            raise EntryError(f"'{field}': '{value}' is not an attribute name (or names separated by commas)")
        table[field] = names
    return FieldMap(preset, tuple(sorted(table.items())))


def parse_date(value: str) -> str | None:
    """Return an ISO date from 1986-04-17, 17/04/1986 (Vietnamese order) or 19860417…Z; None if not a date."""
    for number, pattern in enumerate(_DATE):
        match = pattern.match(value.strip())
        if match:
            parts = [int(part) for part in match.groups()]
            year, month, day = (parts[2], parts[1], parts[0]) if number == 1 else parts
            try:
                return dt.date(year, month, day).isoformat()
            except ValueError:
                return None
    return None


def check_address(value: str) -> str | None:
    """Return the address lower-cased and stripped, or None when it is not local@domain."""
    address = value.strip().lower()
    return address if _ADDRESS.match(address) else None


def split_dn(dn: str) -> list[tuple[str, str]]:
    """Split a DN into (attribute, value) RDNs, values unescaped (RFC 4514); multi-valued RDNs keep '+'."""
    if "\\" not in dn and ";" not in dn:
        # the common case, and 100,000 entries pass here several times: no escapes to undo
        rdns = []
        for part in dn.split(","):
            attribute, _, value = part.partition("=")
            attribute, value = attribute.strip(), value.strip()
            if attribute or value:
                rdns.append((attribute, value))
        return rdns
    rdns: list[tuple[str, str]] = []
    attribute, current, escaped = None, bytearray(), False
    text = dn.encode("utf-8")
    index = 0
    while index < len(text):
        char = text[index:index + 1]
        if escaped:
            pair = text[index:index + 2]
            if re.fullmatch(rb"[0-9A-Fa-f]{2}", pair):
                current.append(int(pair, 16))
                index += 1
            else:
                current += char
            escaped = False
        elif char == b"\\":
            escaped = True
        elif char == b"=" and attribute is None:
            attribute, current = current.decode("utf-8", "replace").strip(), bytearray()
        elif char in (b",", b";"):
            rdns.append((attribute or "", current.decode("utf-8", "replace").strip()))
            attribute, current = None, bytearray()
        else:
            current += char
        index += 1
    if attribute is not None or current.strip():
        rdns.append((attribute or "", current.decode("utf-8", "replace").strip()))
    return rdns


def normalize_dn(dn: str) -> str:
    """Return a DN as a comparison key: attribute names and values lower-cased, spaces around , and = gone."""
    if "\\" not in dn and ";" not in dn:
        # split_dn's common case without its list of pairs: every entry's DN and every memberOf value pass here
        parts = []
        for part in dn.split(","):
            attribute, _, value = part.partition("=")
            attribute, value = attribute.strip(), value.strip()
            if attribute or value:
                parts.append(f"{attribute.lower()}={value.lower()}")
        return ",".join(parts)
    return ",".join(f"{attribute.lower()}={value.lower()}" for attribute, value in split_dn(dn))


def unit_from_dn(dn: str) -> str | None:
    """Return the value of the first ou= RDN above the entry, or None."""
    for attribute, value in split_dn(dn)[1:]:
        if attribute.lower() == "ou":
            return value
    return None


@dataclass(frozen=True)
class Parsed:
    """One entry read by a preset: its record, and group members still to resolve by uid or address."""

    record: SourceRecord
    member_uids: tuple[str, ...] = ()
    member_addresses: tuple[str, ...] = ()


def read_entry(rules: FieldMap, source: str, dn: str, attributes: RawAttributes, line: int | None) -> Parsed | None:
    """Turn one entry into a person or group record; None for entries that are neither."""
    names, found = tuple(zip(*attributes)) or ((), ())  # the names, and their values, each in one tuple
    # names lower-cased once per list of names, not twice per name and entry
    lowered, unique, raw = _shape(names)
    if unique:
        values = dict(zip(lowered, found))
    else:
        values = {}
        for name, more in zip(lowered, found):
            values[name] = values.get(name, ()) + more
    preset = rules.preset
    classes = values.get("objectclass", ())
    kind = rules._kinds.get(classes)
    if kind is None:
        kind = _kind(preset, classes)
        if len(rules._kinds) >= _CACHE_SIZE:
            rules._kinds.clear()
        rules._kinds[classes] = kind
    if not kind:
        return None
    if kind == "person":
        for flag in rules._skip_flags:
            if any(value.upper() == "TRUE" for value in values.get(flag, ())):
                return None
    group = kind == "group"
    (uid, full_names, title, unit_names, employee_id, citizen_id, birth_date, disabled, mail_names, alias_names,
     proxies, phones, mobiles, member_of, members, member_uids, member_addresses) = rules._read

    full_name = _first(values, full_names, strip=False)
    if full_name is None:
        if not group:
            wanted = " or ".join(rules.spelled("full_name"))
            raise EntryError(f"a person entry without a name (no {wanted})")
        full_name = split_dn(dn)[0][1] if split_dn(dn) else dn
    # (a field no attribute holds - citizen_id and birth_date in every preset - is not looked up at all)
    mail, aliases = _addresses(_every(values, proxies) if proxies else [], _every(values, mail_names),
                               _every(values, alias_names) if alias_names else [], attributes)
    birth = _first(values, birth_date) if birth_date else None
    if birth is not None and parse_date(birth) is None:
        name = next(n for n in birth_date if birth in (v.strip() for v in values.get(n, ())))
        raise EntryError(f"{_spelled(attributes, name)}: '{birth}' is not a date")
    unit = None if group else _first(values, unit_names)
    if unit is None and not group and preset.unit_from_dn:
        unit = unit_from_dn(dn)
    # only a group's members count: a Zimbra account's own zimbraMailForwardingAddress is a forward
    member_dns = [_member_dn(value) for value in _values(values, members)] if group else []
    groups = _values(values, member_of) if member_of and not group else []
    record = SourceRecord(
        source=source, dn=dn, kind=kind, full_name=full_name, uid=_first(values, uid), mail=mail, aliases=aliases,
        title=_first(values, title), phones=tuple(_values(values, phones)), mobiles=tuple(_values(values, mobiles)),
        unit=unit, employee_id=_first(values, employee_id),
        citizen_id=_first(values, citizen_id) if citizen_id else None,
        birth_date=parse_date(birth) if birth else None,
        disabled=_disabled(preset.disabled_rule, disabled, values, attributes),
        member_of=tuple(_unique_dns(groups)) if groups else (),
        members=tuple(_unique_dns(member_dns)) if member_dns else (), line=line, raw=raw(attributes),
    )
    if not group:
        return Parsed(record)
    addresses = []
    for name, value in _every(values, member_addresses):
        address = check_address(value)
        if address is None:
            raise EntryError(f"{_spelled(attributes, name)}: '{value}' is not a valid address")
        addresses.append(address)
    return Parsed(record, tuple(_values(values, member_uids)), tuple(dict.fromkeys(addresses)))


# Worked out once, not per entry: the entries of an export share a few lists of attribute names and a few
# combinations of objectClass values. The caches are emptied when full: entries that all differ only fill them again.
_CACHE_SIZE = 4096
# attribute names as an entry lists them -> (lower-cased, no name twice, the pairs `raw` keeps, sorted)
_SHAPES: dict[tuple[str, ...], tuple[tuple[str, ...], bool, Callable[[RawAttributes], RawAttributes]]] = {}


def _shape(names: tuple[str, ...]) -> tuple[tuple[str, ...], bool, Callable[[RawAttributes], RawAttributes]]:
    """Return an entry's attribute names lower-cased, whether none repeats, and what keep_raw keeps of it."""
    shape = _SHAPES.get(names)
    if shape is None:
        lowered = tuple(name.lower() for name in names)
        # sorting positions by (lower-cased, as written) is the stable sort of the pairs keep_raw did itself
        kept = sorted((index for index, name in enumerate(lowered) if name not in SECRET_ATTRIBUTES),
                      key=lambda index: (lowered[index], names[index]))
        if len(_SHAPES) >= _CACHE_SIZE:
            _SHAPES.clear()
        shape = _SHAPES[names] = (lowered, len(set(lowered)) == len(lowered), _picker(kept))
    return shape


def _picker(positions: list[int]) -> Callable[[RawAttributes], RawAttributes]:
    """Return a function that takes the pairs at these positions of an entry's attributes, as a tuple."""
    if len(positions) > 1:
        return itemgetter(*positions)  # the entry's own pairs, in one call
    # itemgetter of one position returns the pair itself, not a tuple of it
    return lambda attributes: tuple([attributes[index] for index in positions])


def _kind(preset: Preset, values: tuple[str, ...]) -> str:
    """Return what objectClass values make an entry: "group", "person" or "" (neither, or skipped)."""
    classes = {value.lower() for value in values}
    if classes & preset.group_classes:
        return "group"
    if classes & preset.person_classes and not classes & preset.skip_classes:
        return "person"
    return ""


def _first(values: dict[str, tuple[str, ...]], names: tuple[str, ...], strip: bool = True) -> str | None:
    """Return the first value of the first attribute that has one not blank (stripped unless told), or None."""
    for name in names:
        for value in values.get(name, ()):
            stripped = value.strip()
            if stripped:
                return stripped if strip else value
    return None


def _every(values: dict[str, tuple[str, ...]], names: tuple[str, ...]) -> list[tuple[str, str]]:
    """Return (attribute, value stripped) for every value not blank of the attributes, in order."""
    return [(name, stripped) for name in names for value in values.get(name, ()) if (stripped := value.strip())]


def _values(values: dict[str, tuple[str, ...]], names: tuple[str, ...]) -> list[str]:
    """Return every value not blank of the attributes, stripped, in order."""
    return [stripped for name in names for value in values.get(name, ()) if (stripped := value.strip())]


def keep_raw(attributes: RawAttributes) -> RawAttributes:
    """Return the attributes as kept for history: sorted by name, secrets left out, values in order."""
    # the entry's own (name, values) pairs, not copies: a record keeps them for as long as the plan runs
    return _shape(next(zip(*attributes), ()))[2](attributes)


def _spelled(attributes: RawAttributes, lower: str) -> str:
    """Return an attribute name as the entry spells it (for messages), else the lower-case name."""
    return next((name for name, _ in attributes if name.lower() == lower), lower)


def _addresses(proxies: list[tuple[str, str]], mails: list[tuple[str, str]], aliases: list[tuple[str, str]],
               attributes: RawAttributes) -> tuple[str | None, tuple[str, ...]]:
    """Return (primary, aliases): an SMTP: proxy address first, then the mail values, then the rest."""
    # Exchange delivers to the "SMTP:" proxy address; `mail` is a copy that can lag behind, so when
    # they differ the proxy address is primary and `mail` becomes one more alias.
    primary_proxies, other_proxies = [], []
    for name, value in proxies:
        prefix, _, address = value.partition(":")
        if prefix == "SMTP":
            primary_proxies.append((name, value, address))
        elif prefix.lower() == "smtp":
            other_proxies.append((name, value, address))
        # X500:, X400:, SIP:, EUM: … are routing data of other systems, not mail addresses
    candidates = primary_proxies + [(n, v, v) for n, v in mails] + other_proxies + [(n, v, v) for n, v in aliases]
    found: list[str] = []
    for name, written, value in candidates:
        address = check_address(value)
        if address is None:
            raise EntryError(f"{_spelled(attributes, name)}: '{written}' is not a valid address")
        if address not in found:
            found.append(address)
    return (found[0] if found else None), tuple(found[1:])


def _disabled(rule: str, names: tuple[str, ...], values: dict[str, tuple[str, ...]],
              attributes: RawAttributes) -> bool:
    """Tell whether the account is disabled, the preset's way."""
    found = [(name, value.strip()) for name in names for value in values.get(name, ())]
    if rule == "present":
        return bool(found)
    if not found:
        return False
    name, value = found[0]
    if rule == "uac":
        try:
            return bool(int(value) & 2)  # ACCOUNTDISABLE
        except ValueError:
            raise EntryError(f"{_spelled(attributes, name)}: '{value}' is not a number") from None
    return value.lower() != "active"  # Zimbra: locked, closed, maintenance, pending, lockout


def _member_dn(value: str) -> str:
    """Return the DN of a member value; uniqueMember may carry an optional #'0101'B uid suffix."""
    return _UID_SUFFIX.sub("", value) if "#" in value else value  # most members have none


_UID_SUFFIX = re.compile(r"#'[01]*'B$")


def _unique_dns(dns: Iterable[str]) -> list[str]:
    """Return DNs without repeats (compared normalised), first spelling kept."""
    seen: dict[str, str] = {}
    for dn in dns:
        seen.setdefault(normalize_dn(dn), dn)
    return list(seen.values())
