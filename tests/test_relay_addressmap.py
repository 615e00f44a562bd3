"""The relay's address map: loading and checking the CSV, chains, and the verdict for every kind of address."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from mailmerge_gov.forwarding.address import AddressError, parse_mailbox, split_path
from mailmerge_gov.forwarding.addressmap import AddressMap, MapError, Outcome, Verdict, load_map, parse_map

OLD_DOMAINS = ("binhduong.gov.vn", "sotc.binhduong.gov.vn", "brvt.gov.vn")
MAP = """\
old_address,new_address,valid_until
nguyenvana@binhduong.gov.vn,annv@hcm.gov.vn,2026-06-30
TranThiB@SoTC.BinhDuong.gov.vn,btt@hcm.gov.vn,2026-06-30
# hand-written lines: a chain (an official moved twice) and comments are allowed
chain1@brvt.gov.vn,chain2@brvt.gov.vn,2026-06-30

chain2@brvt.gov.vn,final@hcm.gov.vn,2025-12-31
"""
TODAY = dt.date(2026, 1, 15)


@pytest.fixture(scope="module")
def address_map() -> AddressMap:
    return parse_map(MAP, "map.csv", OLD_DOMAINS)


FORWARD, MOVED, UNKNOWN, DENIED = Outcome.FORWARD, Outcome.MOVED, Outcome.UNKNOWN, Outcome.RELAY_DENIED


@pytest.mark.parametrize("address", ["postmaster", "PostMaster"])
def test_postmaster_without_a_domain_is_the_first_old_domain_s(address: str) -> None:
    # RFC 5321 4.5.1: <postmaster> needs no domain; the relay takes it as the first old domain's (by name)
    lines = "postmaster@sotc.binhduong.gov.vn,vp@hcm.gov.vn,2026-06-30\nPostmaster@BRVT.gov.vn,ht@hcm.gov.vn,2026-06-30\n"
    with_postmasters = parse_map(MAP + lines, "map.csv", OLD_DOMAINS)
    assert with_postmasters.lookup(address, TODAY) == Verdict(FORWARD, address, "ht@hcm.gov.vn", dt.date(2026, 6, 30))
    assert with_postmasters.lookup(address, dt.date(2026, 7, 1)).outcome == MOVED


@pytest.mark.parametrize(("address", "day", "outcome", "new_address", "reason"), [
    pytest.param("nguyenvana@binhduong.gov.vn", TODAY, FORWARD, "annv@hcm.gov.vn", "", id="forward"),
    pytest.param("NguyenVanA@BinhDuong.GOV.VN", TODAY, FORWARD, "annv@hcm.gov.vn", "", id="case-insensitive"),
    pytest.param("tranthib@sotc.binhduong.gov.vn", TODAY, FORWARD, "btt@hcm.gov.vn", "", id="map-written-in-capitals"),
    pytest.param("nguyenvana@binhduong.gov.vn", dt.date(2026, 6, 30), FORWARD, "annv@hcm.gov.vn", "",
                 id="last-day-still-forwards"),
    pytest.param("nguyenvana@binhduong.gov.vn", dt.date(2026, 7, 1), MOVED, "annv@hcm.gov.vn", "", id="expired"),
    pytest.param("chain1@brvt.gov.vn", TODAY, FORWARD, "final@hcm.gov.vn", "", id="chain-resolved"),
    pytest.param("chain2@brvt.gov.vn", TODAY, MOVED, "final@hcm.gov.vn", "", id="chain-middle-expired"),
    pytest.param("nobody@binhduong.gov.vn", TODAY, UNKNOWN, None, "not in the address map", id="unknown"),
    pytest.param("nguyễn@binhduong.gov.vn", TODAY, UNKNOWN, None, "not in the address map", id="utf8-unknown"),
    pytest.param("nguyenvana@example.org", TODAY, DENIED, None, "example.org is not an old domain", id="other-domain"),
    pytest.param("nguyenvana@hcm.gov.vn", TODAY, DENIED, None, "hcm.gov.vn is not an old domain", id="new-domain"),
    pytest.param("nguyenvana@binhduong.gov.vn.example.org", TODAY, DENIED, None,
                 "binhduong.gov.vn.example.org is not an old domain", id="old-domain-as-prefix"),
    pytest.param('"nguyenvana"@binhduong.gov.vn', TODAY, UNKNOWN, None,
                 "quoted local parts and local parts with % or ! are never forwarded", id="quoted"),
    pytest.param('"x@example.org"@binhduong.gov.vn', TODAY, UNKNOWN, None,
                 "quoted local parts and local parts with % or ! are never forwarded", id="quoted-with-at"),
    pytest.param("x%example.org@binhduong.gov.vn", TODAY, UNKNOWN, None,
                 "quoted local parts and local parts with % or ! are never forwarded", id="percent-hack"),
    pytest.param("example.org!x@binhduong.gov.vn", TODAY, UNKNOWN, None,
                 "quoted local parts and local parts with % or ! are never forwarded", id="bang-path"),
    pytest.param("@binhduong.gov.vn:x@example.org", TODAY, DENIED, None, "source routes are not accepted",
                 id="source-route"),
    pytest.param("@a.example,@b.example:nguyenvana@binhduong.gov.vn", TODAY, DENIED, None,
                 "source routes are not accepted", id="source-route-to-old-address"),
    pytest.param("nguyenvana@[127.0.0.1]", TODAY, DENIED, None, "[127.0.0.1] is an address literal", id="ipv4-literal"),
    pytest.param("nguyenvana@[IPv6:::1]", TODAY, DENIED, None, "[IPv6:::1] is an address literal", id="ipv6-literal"),
    pytest.param("nguyenvana", TODAY, DENIED, None, "'nguyenvana' has no domain", id="no-domain"),
    pytest.param("postmaster", TODAY, UNKNOWN, None, "no postmaster@ of an old domain in the address map",
                 id="postmaster-not-in-the-map"),
    pytest.param("<>", TODAY, DENIED, None, "'<>' has no domain", id="null-path"),
    pytest.param("a..b@binhduong.gov.vn", TODAY, DENIED, None,
                 "'a..b@binhduong.gov.vn' has a local part that is not a dot-string", id="bad-dot-string"),
    pytest.param("x@binhduong.gov.vn@example.org", TODAY, DENIED, None,
                 "'x@binhduong.gov.vn@example.org' has a malformed domain", id="two-at-signs"),
])
def test_lookup(address_map: AddressMap, address: str, day: dt.date, outcome: Outcome, new_address: str | None,
                reason: str) -> None:
    verdict = address_map.lookup(address, day)
    assert (verdict.outcome, verdict.new_address, verdict.reason) == (outcome, new_address, reason)


def test_verdict_carries_the_date(address_map: AddressMap) -> None:
    assert address_map.lookup("chain1@brvt.gov.vn", TODAY) == Verdict(
        FORWARD, "chain1@brvt.gov.vn", "final@hcm.gov.vn", dt.date(2026, 6, 30))


def test_chains_are_resolved_at_load_time(address_map: AddressMap) -> None:
    entry = address_map.entries["chain1@brvt.gov.vn"]
    assert (entry.new_address, entry.via, entry.line) == ("final@hcm.gov.vn", ("chain2@brvt.gov.vn",), 5)
    assert len(address_map) == 4
    assert address_map.old_addresses_of("final@hcm.gov.vn") == ("chain1@brvt.gov.vn", "chain2@brvt.gov.vn")


def test_map_is_frozen(address_map: AddressMap) -> None:
    with pytest.raises(TypeError):
        address_map.entries["x@brvt.gov.vn"] = address_map.entries["chain1@brvt.gov.vn"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        address_map.old_domains = frozenset()  # type: ignore[misc]


def test_export_map_format_loads(tmp_path: Path) -> None:
    # exactly what `directory export-map` writes (map_csv): header, \n line ends
    path = tmp_path / "map.csv"
    path.write_bytes(b"\xef\xbb\xbfold_address,new_address,valid_until\r\nbd@binhduong.gov.vn,a@hcm.gov.vn,2027-06-30\r\n")
    loaded = load_map(path, OLD_DOMAINS)
    assert loaded.lookup("BD@binhduong.gov.vn", TODAY).new_address == "a@hcm.gov.vn"
    assert loaded.source == str(path)


def test_same_line_twice_keeps_the_later_date() -> None:
    loaded = parse_map("x@brvt.gov.vn,y@hcm.gov.vn,2026-01-01\nX@BRVT.GOV.VN,Y@hcm.gov.vn,2026-06-30\n", "m", OLD_DOMAINS)
    assert loaded.entries["x@brvt.gov.vn"].valid_until == dt.date(2026, 6, 30)


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("a@brvt.gov.vn,b@brvt.gov.vn,2026-01-01\nb@brvt.gov.vn,a@brvt.gov.vn,2026-01-01\n",
                 "line 1: forwarding loop a@brvt.gov.vn → b@brvt.gov.vn → a@brvt.gov.vn (lines 1, 2)", id="cycle"),
    pytest.param("z@brvt.gov.vn,a@brvt.gov.vn,2026-01-01\na@brvt.gov.vn,b@brvt.gov.vn,2026-01-01\n"
                 "b@brvt.gov.vn,c@brvt.gov.vn,2026-01-01\nc@brvt.gov.vn,A@BRVT.gov.vn,2026-01-01\n",
                 "line 2: forwarding loop a@brvt.gov.vn → b@brvt.gov.vn → c@brvt.gov.vn → a@brvt.gov.vn (lines 2, 3, 4)",
                 id="cycle-entered-from-outside"),
    pytest.param("x@brvt.gov.vn,y@hcm.gov.vn,2026-01-01\n# note\nx@BRVT.gov.vn,z@hcm.gov.vn,2026-01-01\n",
                 "line 3: x@brvt.gov.vn is given twice with different new addresses: y@hcm.gov.vn on line 1 and "
                 "z@hcm.gov.vn on line 3", id="duplicate"),
    pytest.param("x@brvt.gov.vn,x@brvt.gov.vn,2026-01-01\n", "line 1: x@brvt.gov.vn forwards to itself", id="self"),
    pytest.param("old_address,new_address,valid_until\nx@,y@hcm.gov.vn,2026-01-01\n",
                 "line 2: old_address 'x@' has a malformed domain", id="no-domain"),
    pytest.param("x y@brvt.gov.vn,y@hcm.gov.vn,2026-01-01\n",
                 "line 1: old_address 'x y@brvt.gov.vn' has a local part that is not a dot-string", id="space"),
    pytest.param("x@brvt.gov.vn,y@-hcm.gov.vn,2026-01-01\n",
                 "line 1: new_address '-hcm.gov.vn' is not a domain name", id="bad-domain"),
    pytest.param("x%y@brvt.gov.vn,y@hcm.gov.vn,2026-01-01\n",
                 "line 1: old_address 'x%y@brvt.gov.vn' is not a plain address (quotes, source routes, % and !, "
                 "and IP literals are not allowed)", id="percent-old"),
    pytest.param("x@brvt.gov.vn,a!y@hcm.gov.vn,2026-01-01\n",
                 "line 1: new_address 'a!y@hcm.gov.vn' is not a plain address (quotes, source routes, % and !, "
                 "and IP literals are not allowed)", id="bang-new"),
    pytest.param("x@brvt.gov.vn,y@[192.0.2.1],2026-01-01\n",
                 "line 1: new_address 'y@[192.0.2.1]' is not a plain address (quotes, source routes, % and !, "
                 "and IP literals are not allowed)", id="literal-new"),
    pytest.param("x@brvt.gov.vn,,2026-01-01\n", "line 1: new_address is empty", id="empty"),
    pytest.param("x@brvt.gov.vn,y@hcm.gov.vn\n",
                 "line 1: expected 3 fields (old_address,new_address,valid_until), found 2", id="two-fields"),
    pytest.param("x@brvt.gov.vn,y@hcm.gov.vn,30/06/2026\n",
                 "line 1: valid_until '30/06/2026' is not a date like 2026-06-30", id="date-format"),
    pytest.param("x@brvt.gov.vn,y@hcm.gov.vn,2026-02-30\n",
                 "line 1: valid_until '2026-02-30' is not a date like 2026-06-30", id="no-such-day"),
    pytest.param("x@example.org,y@hcm.gov.vn,2026-06-30\n",
                 "line 1: old address x@example.org is not in an old domain "
                 "(binhduong.gov.vn, brvt.gov.vn, sotc.binhduong.gov.vn)", id="not-old-domain"),
    pytest.param("x@brvt.gov.vn,y@binhduong.gov.vn,2026-06-30\n",
                 "line 1: new address y@binhduong.gov.vn is in an old domain and has no line of its own",
                 id="dead-end-in-old-domain"),
])
def test_load_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "map.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MapError) as caught:
        load_map(path, OLD_DOMAINS)
    assert str(caught.value) == f"{path}, {message}"


def test_unreadable_map_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MapError) as caught:
        load_map(tmp_path / "missing.csv")
    assert str(caught.value) == f"{tmp_path / 'missing.csv'}: cannot read the address map: No such file or directory"


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_bytes(b"x@brvt.gov.vn,y@hcm.gov.vn,2026-01-01\nNguy\xe1n@brvt.gov.vn,z@hcm.gov.vn,2026-01-01\n")
    with pytest.raises(MapError) as caught:
        load_map(path)
    assert str(caught.value) == f"{path}, line 2: the file is not valid UTF-8"


@pytest.mark.parametrize(("argument", "expected"), [
    ("<a@b.vn>", ("a@b.vn", "")),
    ("<a@b.vn> SIZE=100 BODY=8BITMIME", ("a@b.vn", "SIZE=100 BODY=8BITMIME")),
    ("<>", ("<>", "")),
    ("<> SIZE=10", ("<>", "SIZE=10")),
    ("<@x.vn,@y.vn:a@b.vn>", ("@x.vn,@y.vn:a@b.vn", "")),  # aiosmtpd's own parser would drop the route
    ('<"a>b"@b.vn>', ('"a>b"@b.vn', "")),
    ('<"a\\"b"@b.vn>', ('"a\\"b"@b.vn', "")),
    ("a@b.vn SIZE=1", ("a@b.vn", "SIZE=1")),
    ("<a@b.vn", (None, None)),
    ("<a@b.vn>SIZE=1", (None, None)),
    ("<<a@b.vn>>", (None, None)),
])
def test_split_path(argument: str, expected: tuple[str | None, str | None]) -> None:
    assert split_path(argument) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("@x.vn:", "'@x.vn:' has no domain"),
    ("@x..vn:a@b.vn", "'@x..vn:a@b.vn' has a malformed source route"),
    ('"abc@b.vn', "'\"abc@b.vn' has an unterminated quoted local part"),
    ('"abc"b.vn', "'\"abc\"b.vn' has no @ after its quoted local part"),
    ("a@[1.2.3.4", "'a@[1.2.3.4' has a malformed address literal"),
    ("a@b", "'b' is not a domain name"),
])
def test_parse_mailbox_errors(text: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_mailbox(text)
    assert str(caught.value) == message
