"""SRS: exact rewrites (cross-checked against Perl's Mail::SRS 0.31), reversal, rotation, age, and the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailmerge_gov.config import Relay, Secret
from mailmerge_gov.forwarding.srs import DAY_SECONDS, Srs, SrsError, day_of, srs_from_config, timestamp

SECRETS = ("thisisthefirstsecret123", "anolderonestillverifies")
DOMAIN = "srs.binhduong.gov.vn"
NOW = 1768478400.0  # 2026-01-15 12:00 UTC: day 20468, timestamp "7U"
EXEMPT = frozenset({"binhduong.gov.vn", "hcm.gov.vn"})


@pytest.fixture
def srs() -> Srs:
    return Srs(DOMAIN, SECRETS, hash_length=6, max_age_days=21, exempt_domains=EXEMPT)


# Expected values produced by Mail::SRS 0.31 (Debian libmail-srs-perl, the Guarded scheme by Shevek) with
# Secret => [the two secrets], HashLength => 6 and the clock at NOW: the two implementations agree exactly.
FORWARDS = [
    pytest.param("alice@example.org", "SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn", id="srs0"),
    pytest.param("Bob.Smith@Mail.Example.COM", "SRS0=sbhCuV=7U=Mail.Example.COM=Bob.Smith@srs.binhduong.gov.vn",
                 id="srs0-case-kept"),
    pytest.param("SRS0=abcd=AB=orig.example=user@fwd.example",
                 "SRS1=Efnuxq=fwd.example==abcd=AB=orig.example=user@srs.binhduong.gov.vn", id="srs0-sender-to-srs1"),
    pytest.param("SRS1=wxyz=orig.example==abcd=AB=x.org=u@fwd2.example",
                 "SRS1=GGFVY0=orig.example==abcd=AB=x.org=u@srs.binhduong.gov.vn", id="srs1-sender-rehashed"),
]


@pytest.mark.parametrize(("sender", "rewritten"), FORWARDS)
def test_forward_matches_mail_srs(srs: Srs, sender: str, rewritten: str) -> None:
    assert srs.forward(sender, now=NOW) == rewritten


@pytest.mark.parametrize(("address", "original"), [
    ("SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn", "alice@example.org"),
    ("srs0=ygd8ke=7u=example.org=alice@SRS.BINHDUONG.GOV.VN", "alice@example.org"),  # an MTA lower-cased it
    ("SRS0+YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn", "alice@example.org"),  # libsrs2 separators
    ("SRS0-YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn", "alice@example.org"),
    ("SRS1=Efnuxq=fwd.example==abcd=AB=orig.example=user@srs.binhduong.gov.vn",
     "SRS0=abcd=AB=orig.example=user@fwd.example"),
    ("SRS1=GGFVY0=orig.example==abcd=AB=x.org=u@srs.binhduong.gov.vn", "SRS0=abcd=AB=x.org=u@orig.example"),
])
def test_reverse(srs: Srs, address: str, original: str) -> None:
    assert srs.reverse(address, now=NOW) == original


@pytest.mark.parametrize("sender", ["<>", "", "someone@binhduong.gov.vn", "Someone@HCM.gov.vn",
                                    "SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn"])
def test_not_rewritten(srs: Srs, sender: str) -> None:
    assert srs.forward(sender, now=NOW) == sender


def test_quoted_local_part_round_trip(srs: Srs) -> None:
    rewritten = srs.forward('"john doe"@example.org', now=NOW)
    assert rewritten.startswith('"SRS0=') and rewritten.endswith('=7U=example.org=john doe"@srs.binhduong.gov.vn')
    assert srs.reverse(rewritten, now=NOW) == '"john doe"@example.org'


@pytest.mark.parametrize(("address", "message"), [
    ("SRS0=YGd8Kf=7U=example.org=alice@srs.binhduong.gov.vn",
     "SRS hash does not match: the address was not made by this relay"),
    ("SRS0=YGd8Ke=7U=example.org=mallory@srs.binhduong.gov.vn",
     "SRS hash does not match: the address was not made by this relay"),
    ("SRS0=YGd8=7U=example.org=alice@srs.binhduong.gov.vn", "SRS hash has 4 characters, expected 6"),
    ("SRS0=YGd8KeX=7U=example.org=alice@srs.binhduong.gov.vn", "SRS hash has 7 characters, expected 6"),
    ("SRS0=YGd8Ke=7!=example.org=alice@srs.binhduong.gov.vn", "'7!' is not an SRS timestamp"),
    ("SRS0=YGd8Ke=7U=example.org@srs.binhduong.gov.vn",
     "SRS0=YGd8Ke=7U=example.org@srs.binhduong.gov.vn is a malformed SRS0 address"),
    ("SRS1=Efnuxq=fwd.example@srs.binhduong.gov.vn", "SRS1=Efnuxq=fwd.example@srs.binhduong.gov.vn is a malformed SRS1 address"),
    ("SRS0=YGd8Ke=7U=example.org=alice@example.org", "SRS0=YGd8Ke=7U=example.org=alice@example.org is not on the SRS "
                                                      "domain srs.binhduong.gov.vn"),
    ("alice@srs.binhduong.gov.vn", "alice@srs.binhduong.gov.vn is not an SRS address"),
])
def test_reverse_refuses(srs: Srs, address: str, message: str) -> None:
    with pytest.raises(SrsError) as caught:
        srs.reverse(address, now=NOW)
    assert str(caught.value) == message


@pytest.mark.parametrize(("days_later", "ok"), [(0, True), (21, True), (22, False), (1023, False), (1024 + 5, True)])
def test_max_age(srs: Srs, days_later: int, ok: bool) -> None:
    # the timestamp counts days modulo 1024, so 1029 days later looks like 5 (the scheme's known limit)
    address = srs.forward("alice@example.org", now=NOW)
    later = NOW + days_later * DAY_SECONDS
    if ok:
        assert srs.reverse(address, now=later) == "alice@example.org"
    else:
        with pytest.raises(SrsError) as caught:
            srs.reverse(address, now=later)
        assert str(caught.value) == f"SRS address is {days_later % 1024} days old, more than 21"


def test_a_future_timestamp_counts_as_old(srs: Srs) -> None:
    address = srs.forward("alice@example.org", now=NOW + 3 * DAY_SECONDS)
    with pytest.raises(SrsError) as caught:
        srs.reverse(address, now=NOW)
    assert str(caught.value) == "SRS address is 1021 days old, more than 21"


def test_rotation_first_signs_all_verify() -> None:
    old_only = Srs(DOMAIN, (SECRETS[1],))
    rotated = Srs(DOMAIN, SECRETS)
    new_only = Srs(DOMAIN, (SECRETS[0],))
    made_before = old_only.forward("alice@example.org", now=NOW)
    assert rotated.reverse(made_before, now=NOW) == "alice@example.org"
    assert rotated.forward("alice@example.org", now=NOW) == new_only.forward("alice@example.org", now=NOW)
    with pytest.raises(SrsError):
        new_only.reverse(made_before, now=NOW)


def test_hash_length_is_configurable() -> None:
    long = Srs(DOMAIN, SECRETS, hash_length=10)
    address = long.forward("alice@example.org", now=NOW)
    assert address == "SRS0=YGd8Ke5WmF=7U=example.org=alice@srs.binhduong.gov.vn"  # as Mail::SRS
    assert long.reverse(address, now=NOW) == "alice@example.org"


@pytest.mark.parametrize(("when", "stamp"), [(0.0, "AA"), (NOW, "7U"), (1023 * DAY_SECONDS, "77"),
                                             (1024 * DAY_SECONDS, "AA"), (33 * DAY_SECONDS + 5, "BB")])
def test_timestamp(when: float, stamp: str) -> None:
    assert timestamp(when) == stamp
    assert day_of(stamp.lower()) == int(when // DAY_SECONDS) % 1024


def test_is_srs_address(srs: Srs) -> None:
    assert srs.is_srs_address("SRS0=x=AA=a.b=c@SRS.binhduong.gov.vn")
    assert srs.is_srs_address("srs1+x=a.b==c@srs.binhduong.gov.vn")
    assert not srs.is_srs_address("SRS0=x=AA=a.b=c@binhduong.gov.vn")
    assert not srs.is_srs_address("SRS2=x@srs.binhduong.gov.vn")
    assert not srs.is_srs_address("nguyenvana@srs.binhduong.gov.vn")


def test_secrets_are_not_in_the_repr(srs: Srs) -> None:
    assert SECRETS[0] not in repr(srs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"secrets": ()}, "SRS needs at least one secret"),
    ({"secrets": ("short",)}, "every SRS secret must be at least 16 characters long"),
    ({"hash_length": 3}, "the SRS hash length must be 4 to 27"),
    ({"hash_length": 28}, "the SRS hash length must be 4 to 27"),
    ({"max_age_days": 0}, "the SRS maximum age must be 1 to 1023 days"),
])
def test_settings_refused(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"domain": DOMAIN, "secrets": SECRETS, **kwargs}
    with pytest.raises(SrsError) as caught:
        Srs(**values)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_from_config_reads_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMG_TEST_SRS", SECRETS[0])
    file = tmp_path / "srs-old.key"
    file.write_text(SECRETS[1] + "\n", encoding="utf-8")
    relay = Relay(srs_domain=DOMAIN, srs_secrets=(Secret(env="MMG_TEST_SRS"), Secret(file=file)))
    srs = srs_from_config(relay, ["binhduong.gov.vn"])
    assert srs is not None
    assert (srs.secrets, srs.hash_length, srs.max_age_days, srs.exempt_domains) == (
        SECRETS, 6, 21, frozenset({"binhduong.gov.vn"}))
    assert srs_from_config(Relay(), []) is None


@pytest.mark.parametrize(("value", "message"), [
    (None, "SRS secret (environment variable MMG_TEST_SRS): environment variable MMG_TEST_SRS is not set"),
    ("tooshort", "SRS secret (environment variable MMG_TEST_SRS) is shorter than 16 characters"),
])
def test_from_config_errors(monkeypatch: pytest.MonkeyPatch, value: str | None, message: str) -> None:
    if value is None:
        monkeypatch.delenv("MMG_TEST_SRS", raising=False)
    else:
        monkeypatch.setenv("MMG_TEST_SRS", value)
    with pytest.raises(SrsError) as caught:
        srs_from_config(Relay(srs_domain=DOMAIN, srs_secrets=(Secret(env="MMG_TEST_SRS"),)), [])
    assert str(caught.value) == message
