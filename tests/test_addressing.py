"""One address per official: patterns in order, numeric suffix last, kept and applied ones fixed."""

import dataclasses
from pathlib import Path

import pytest

from mailmerge_gov.config import load_config
from mailmerge_gov.directory.addressing import (AddressingError, Assignment, Candidate, assign_addresses,
                                               local_part, pattern_values)
from mailmerge_gov.vietnamese import split_name


@pytest.fixture
def config(example_dir: Path):
    """The example's policy: {{ given }}{{ initials }}, then {{ given }}.{{ family }}."""
    return load_config(example_dir / "consolidation.toml")


def candidate(identity: int, name: str, **fields) -> Candidate:
    return Candidate(identity=identity, kind=fields.pop("kind", "person"), parts=split_name(name),
                     source=fields.pop("source", "binhduong"), own_addresses=fields.pop("own", ()), **fields)


def addresses(result: dict[int, Assignment]) -> dict[int, str]:
    return {identity: a.address for identity, a in sorted(result.items())}


@pytest.mark.parametrize(
    ("text", "local"),
    [("Nguyễn Văn An", "nguyenvanan"), ("an.nguyen", "an.nguyen"), ("..Đặng--Ánh..", "dang--anh"),
     ("a..b", "a.b"), ("<script>", "script"), ("tôn nữ", "tonnu")],
)
def test_local_part(text: str, local: str) -> None:
    assert local_part(text) == local


def test_pattern_values() -> None:
    assert pattern_values(split_name("Tôn Nữ Thị Hoa"), "hcm") == {
        "family": "tonnu", "middle": "thi", "given": "hoa", "initials": "tnt", "family_initial": "t",
        "middle_initials": "t", "given_initial": "h", "source": "hcm"}


def test_collisions_use_the_next_pattern_then_a_number(config) -> None:
    result = assign_addresses([candidate(1, "Nguyễn Văn An"), candidate(2, "Nguyễn Văn An"),
                               candidate(3, "NGUYỄN VĂN AN"), candidate(4, "Lê Thị Bình")], config, {}, {})
    assert addresses(result) == {1: "annv@hcm.gov.vn", 2: "an.nguyen@hcm.gov.vn", 3: "annv2@hcm.gov.vn",
                                 4: "binhlt@hcm.gov.vn"}
    assert [(result[i].how, result[i].taken) for i in (2, 3)] == [
        ("pattern 2", ("annv@hcm.gov.vn",)), ("pattern 1 + 2", ("annv@hcm.gov.vn", "an.nguyen@hcm.gov.vn"))]


def test_addresses_held_by_others_are_never_given(config) -> None:
    held = {"annv@hcm.gov.vn": 99, "annv2@hcm.gov.vn": 98, "an.nguyen@hcm.gov.vn": 97}
    result = assign_addresses([candidate(1, "Nguyễn Văn An")], config, held, {})
    assert addresses(result) == {1: "annv3@hcm.gov.vn"}


def test_reserved_names_are_never_given(config) -> None:
    # A reserved local part is skipped like a taken one: the next pattern is tried.
    result = assign_addresses([candidate(1, "Tiếp Dân"), candidate(2, "Post Master")], config, {}, {})
    assert addresses(result) == {1: "dant@hcm.gov.vn", 2: "masterp@hcm.gov.vn"}
    reserved = dataclasses.replace(config.addressing, reserved=("dant",))
    result = assign_addresses([candidate(1, "Tiếp Dân")], dataclasses.replace(config, addressing=reserved), {}, {})
    assert addresses(result) == {1: "dan.tiep@hcm.gov.vn"}


def test_kept_and_applied_addresses_do_not_move(config) -> None:
    result = assign_addresses(
        [candidate(5, "Nguyễn Văn An", keep="annv@hcm.gov.vn", source="hcm"),
         candidate(2, "Nguyễn Văn An"),
         candidate(3, "Lê Văn Tám")],
        config, {}, {3: ("tam.le@hcm.gov.vn", "applied")})
    assert addresses(result) == {2: "an.nguyen@hcm.gov.vn", 3: "tam.le@hcm.gov.vn", 5: "annv@hcm.gov.vn"}
    assert [result[i].how for i in (2, 3, 5)] == ["pattern 2", "applied earlier", "kept"]


def test_newcomers_never_displace_anyone(config) -> None:
    before = assign_addresses([candidate(1, "Nguyễn Văn An")], config, {}, {})
    after = assign_addresses([candidate(2, "Nguyễn Văn An"), candidate(1, "Nguyễn Văn An")], config, {}, {})
    assert (addresses(before), addresses(after)) == (
        {1: "annv@hcm.gov.vn"}, {1: "annv@hcm.gov.vn", 2: "an.nguyen@hcm.gov.vn"})


def test_role_mailboxes_of_absorbed_units(config) -> None:
    result = assign_addresses([candidate(1, "Văn thư", kind="role", own=("vanthu@binhduong.gov.vn",)),
                               candidate(2, "Văn thư", kind="role", own=("vanthu@binhduong.gov.vn",))],
                              config, {}, {})
    assert addresses(result) == {1: "vanthu.binhduong@hcm.gov.vn", 2: "vanthu.binhduong2@hcm.gov.vn"}


def test_a_pattern_with_an_unknown_variable_is_an_error(config) -> None:
    broken = dataclasses.replace(config.addressing, patterns=("{{ givne }}",))
    with pytest.raises(AddressingError, match=r"^address pattern '\{\{ givne \}\}' cannot be used: 'givne' is undefined$"):
        assign_addresses([candidate(1, "An")], dataclasses.replace(config, addressing=broken), {}, {})
