"""One identity per official: exact keys merge, suggestions wait for a person, ids stay stable."""

import itertools

import hypothesis
import hypothesis.strategies as st
import pytest

from mailmerge_gov.directory.identity import Suggestion, exact_keys, is_role, resolve_identities
from mailmerge_gov.directory.model import SourceRecord
from mailmerge_gov.vietnamese import fold


def person(source: str, uid: str, name: str, **fields) -> SourceRecord:
    return SourceRecord(source=source, dn=f"uid={uid}", kind="person", full_name=name, uid=uid, **fields)


def resolve(records, links=None, decisions=None, start=1):
    counter = itertools.count(start)
    return resolve_identities(records, links or {}, decisions or {}, ("vanthu",), lambda: next(counter),
                              new_unit=lambda record: NEW_UNITS.get(record.unit))


# Old units and the new unit each maps to, as the plan's mapping file would say.
NEW_UNITS = {"Sở Y tế tỉnh Bình Dương": "79.SYT", "Sở Y tế": "79.SYT", "Sở Xây dựng": "79.SXD"}


def grouped(resolution) -> list[list[str]]:
    return sorted(sorted(r.ref for r in records) for records in resolution.identities.values())


@pytest.mark.parametrize(
    ("a", "b", "merged"),
    [
        pytest.param({"citizen_id": "074186004217"}, {"citizen_id": "074186004217"}, True, id="citizen-id"),
        pytest.param({"citizen_id": "074186004217"}, {"employee_id": "074186004217"}, True,
                     id="employee-number-that-is-a-citizen-id"),
        pytest.param({"employee_id": "BD100465"}, {"employee_id": "BD100465"}, False,
                     id="employee-numbers-of-two-employers"),
        pytest.param({"mail": "an@binhduong.gov.vn"}, {"aliases": ("an@binhduong.gov.vn",)}, True, id="shared-address"),
        pytest.param({"mail": "an@binhduong.gov.vn"}, {"mail": "an@baria-vungtau.gov.vn"}, False, id="nothing-shared"),
    ],
)
def test_exact_keys_merge_across_sources(a, b, merged) -> None:
    resolution = resolve([person("binhduong", "an", "Nguyễn Văn An", **a),
                          person("baria-vungtau", "nvan", "Lê Thị Bình", **b)])
    assert len(resolution.identities) == (1 if merged else 2)


def test_same_employee_number_in_one_source_is_one_official() -> None:
    resolution = resolve([person("hcm", "a1", "Nguyễn Văn An", employee_id="E1"),
                          person("hcm", "a2", "Nguyễn Văn An", employee_id="E1")])
    assert grouped(resolution) == [["hcm:uid=a1", "hcm:uid=a2"]]


def test_name_and_birth_date_is_only_a_suggestion() -> None:
    records = [person("binhduong", "ha", "Trần Thị Thu Hà", birth_date="1986-04-17"),
               person("baria-vungtau", "tttha", "TRẦN THỊ THU HÀ", birth_date="1986-04-17")]
    resolution = resolve(records)
    assert grouped(resolution) == [["baria-vungtau:uid=tttha"], ["binhduong:uid=ha"]]
    assert resolution.suggestions == (
        Suggestion("baria-vungtau:uid=tttha", "binhduong:uid=ha", "same name and date of birth"),)


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        ({"phones": ("0274 3822 111",)}, {"mobiles": ("+84 274 3822 111",)}, "same name and phone number"),
        ({"title": "Chuyên viên", "unit": "Sở Y tế tỉnh Bình Dương"}, {"title": "chuyen vien", "unit": "Sở Y tế"},
         "same name, title and new unit, in different sources"),
        ({"title": "Chuyên viên", "unit": "Sở Y tế tỉnh Bình Dương"}, {"title": "Chuyên viên", "unit": "Sở Xây dựng"},
         None),
        ({"title": "Chuyên viên", "unit": "Sở Y tế tỉnh Bình Dương"}, {"title": "Chuyên viên", "unit": "Phòng Khác"},
         None),
        ({"title": "Chuyên viên"}, {"title": "Chuyên viên"}, None),
        ({"title": "Chuyên viên", "unit": "Sở Y tế"}, {"title": "Phó Giám đốc", "unit": "Sở Y tế"}, None),
    ],
)
def test_suggestion_reasons(a, b, reason) -> None:
    resolution = resolve([person("binhduong", "x", "Lê Văn Tám", **a), person("hcm", "y", "Lê Văn Tám", **b)])
    assert [s.reason for s in resolution.suggestions] == ([reason] if reason else [])


def test_a_title_held_twice_in_one_source_is_no_hint() -> None:
    health = {"title": "Chuyên viên", "unit": "Sở Y tế"}
    records = [person("binhduong", "x", "Lê Văn Tám", **{**health, "unit": "Sở Y tế tỉnh Bình Dương"}),
               person("hcm", "y", "Lê Văn Tám", **health), person("hcm", "z", "Lê Văn Tám", **health)]
    assert resolve(records).suggestions == ()
    # two records of one official in a source are one holder
    records[2] = person("hcm", "z", "Lê Văn Tám", **health, aliases=("y@hcm.gov.vn",))
    records[1] = person("hcm", "y", "Lê Văn Tám", **health, mail="y@hcm.gov.vn")
    assert [s.reason for s in resolve(records).suggestions] == ["same name, title and new unit, in different sources"]


def test_decisions_are_honoured() -> None:
    records = [person("binhduong", "ha", "Trần Thị Thu Hà", birth_date="1986-04-17"),
               person("baria-vungtau", "tttha", "Trần Thị Thu Hà", birth_date="1986-04-17")]
    pair = ("baria-vungtau:uid=tttha", "binhduong:uid=ha")
    same = resolve(records, decisions={pair: "same"})
    assert (grouped(same), same.suggestions) == ([list(pair)], ())
    different = resolve(records, decisions={pair: "different"})
    assert (len(different.identities), different.suggestions) == (2, ())


def test_decision_contradicted_by_an_exact_key_is_a_conflict() -> None:
    records = [person("binhduong", "a", "Nguyễn Văn An", citizen_id="074000000001"),
               person("hcm", "b", "Nguyễn Văn An", mail="annv@hcm.gov.vn"),
               person("hcm", "c", "Nguyễn Văn An", citizen_id="074000000001", aliases=("annv@hcm.gov.vn",))]
    resolution = resolve(records, decisions={("binhduong:uid=a", "hcm:uid=b"): "different"})
    assert resolution.conflicts == (
        "binhduong:uid=a and hcm:uid=b were decided to be different officials, but share an ID or address "
        "with each other's records; decide again or correct the source",)


def test_identity_ids_are_kept_across_runs() -> None:
    first = resolve([person("hcm", "a", "Nguyễn Văn An"), person("hcm", "b", "Lê Văn Tám")])
    links = {r.ref: identity for identity, rs in first.identities.items() for r in rs}
    assert links == {"hcm:uid=a": 1, "hcm:uid=b": 2}
    # A newcomer with a lower ref does not take anyone's id.
    second = resolve([person("hcm", "0", "Võ Văn Ba"), person("hcm", "a", "Nguyễn Văn An"),
                      person("hcm", "b", "Lê Văn Tám")], links=links, start=3)
    assert {r.ref: i for i, rs in second.identities.items() for r in rs} == {
        "hcm:uid=0": 3, "hcm:uid=a": 1, "hcm:uid=b": 2}


def test_split_identity_keeps_its_id_for_the_lowest_ref() -> None:
    records = [person("binhduong", "ha", "Trần Thị Thu Hà"), person("hcm", "ha", "Trần Thị Thu Hà")]
    links = {"binhduong:uid=ha": 7, "hcm:uid=ha": 7}
    resolution = resolve(records, links=links, decisions={("binhduong:uid=ha", "hcm:uid=ha"): "different"}, start=8)
    assert {r.ref: i for i, rs in resolution.identities.items() for r in rs} == {
        "binhduong:uid=ha": 7, "hcm:uid=ha": 8}


def test_groups_are_not_identities() -> None:
    group = SourceRecord(source="hcm", dn="cn=quantri", kind="group", full_name="quantri")
    assert resolve([group]).identities == {}


@pytest.mark.parametrize(
    ("fields", "role"),
    [({"mail": "vanthu@binhduong.gov.vn"}, True), ({"mail": "postmaster@hcm.gov.vn"}, True),
     ({"mail": "annv@hcm.gov.vn"}, False), ({"mail": "annv@hcm.gov.vn", "aliases": ("abuse@hcm.gov.vn",)}, False)],
)
def test_role_mailboxes(fields, role) -> None:
    assert is_role(person("hcm", "x", "Văn thư", **fields), ("vanthu",)) is role


def test_exact_keys_of_a_record() -> None:
    record = person("binhduong", "an", "An", mail="an@bd.vn", aliases=("x@bd.vn",), citizen_id="074186004217",
                    employee_id="BD1")
    assert exact_keys(record) == {"address:an@bd.vn", "address:x@bd.vn", "citizen:074186004217",
                                  "employee:binhduong:BD1"}


def test_an_identity_follows_its_keys_when_the_record_moves() -> None:
    """An entry moved to another OU (new DN) or a CSV row shifted keeps its identity through its keys."""
    first = resolve([person("binhduong", "a", "Bùi Thị Oanh", mail="oanh.buithi@binhduong.gov.vn"),
                     person("binhduong", "b", "Lê Văn Cường", citizen_id="074000000009")])
    links = {r.ref: i for i, rs in first.identities.items() for r in rs}
    keys = {k: i for i, rs in first.identities.items() for r in rs for k in exact_keys(r)}
    moved = [person("binhduong", "z-new-row", "Nguyễn Văn Mới"),
             SourceRecord(source="binhduong", dn="uid=b", kind="person", full_name="Bùi Thị Oanh",
                          mail="oanh.buithi@binhduong.gov.vn"),
             person("binhduong", "x-moved", "Lê Văn Cường", citizen_id="074000000009")]
    second = resolve_identities(moved, links, {}, (), iter(range(3, 10)).__next__, known_keys=keys)
    assert {r.full_name: i for i, rs in second.identities.items() for r in rs} == {
        "Bùi Thị Oanh": 1, "Lê Văn Cường": 2, "Nguyễn Văn Mới": 3}


def test_a_different_decision_covers_every_record_of_the_two_officials() -> None:
    records = [person("binhduong", "ha", "Trần Thị Thu Hà", birth_date="1986-04-17", mail="ha@bd.vn"),
               person("binhduong", "ha2", "Trần Thị Thu Hà", birth_date="1986-04-17", aliases=("ha@bd.vn",)),
               person("hcm", "ha", "Trần Thị Thu Hà", birth_date="1986-04-17")]
    resolution = resolve(records, decisions={("binhduong:uid=ha", "hcm:uid=ha"): "different"})
    assert resolution.suggestions == ()


def test_a_merged_identity_is_numbered_by_its_first_record_in_source_order() -> None:
    records = [person("hcm", "z", "Trần Thị Thu Hà", citizen_id="074186004217"),
               person("baria-vungtau", "a", "Trần Thị Thu Hà", citizen_id="074186004217"),
               person("baria-vungtau", "b", "Lê Văn Tám")]
    counter = itertools.count(1)
    resolution = resolve_identities(records, {}, {}, (), lambda: next(counter),
                                    source_order=("hcm", "binhduong", "baria-vungtau"))
    assert {r.full_name: i for i, rs in resolution.identities.items() for r in rs} == {
        "Trần Thị Thu Hà": 1, "Lê Văn Tám": 2}


def _every_pair(records) -> set[tuple[str, str, str]]:
    """The suggestions by comparing each record with each (what the buckets must find), one per pair of officials."""
    resolution = resolve(records)
    root = {r.ref: identity for identity, rs in resolution.identities.items() for r in rs}
    found = {}
    for first, second in itertools.combinations(sorted(records, key=lambda r: r.ref), 2):
        a, b = sorted((root[first.ref], root[second.ref]))
        if a == b or fold(first.full_name) != fold(second.full_name):
            continue
        phones = {p[-9:] for p in first.phones} & {p[-9:] for p in second.phones}
        holders = lambda r: sum(fold(o.full_name) == fold(r.full_name) and o.title == r.title and o.source == r.source
                                and NEW_UNITS.get(o.unit) == NEW_UNITS.get(r.unit) for o in records)  # noqa: E731
        if first.birth_date and first.birth_date == second.birth_date:
            reason = "same name and date of birth"
        elif phones:
            reason = "same name and phone number"
        elif (first.source != second.source and first.title and first.title == second.title
              and NEW_UNITS.get(first.unit) and NEW_UNITS.get(first.unit) == NEW_UNITS.get(second.unit)
              and holders(first) == 1 and holders(second) == 1):
            reason = "same name, title and new unit, in different sources"
        else:
            continue
        found.setdefault((a, b), (first.ref, second.ref, reason))
    return set(found.values())


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(("hcm", "binhduong")), st.sampled_from(("Lê Văn Tám", "Lê Văn Tam", "Hồ Thị Lan")),
                                     st.sampled_from((None, "1980-01-02", "1981-03-04")),
                                     st.sampled_from(((), ("0912345678",), ("0912345678", "0987654321"))),
                                     st.sampled_from((None, "Chuyên viên", "Kế toán")),
                                     st.sampled_from((None, "Sở Y tế", "Sở Y tế tỉnh Bình Dương", "Sở Xây dựng"))),
                           max_size=12))
def test_suggestions_are_those_of_comparing_every_pair(rows) -> None:
    records = [person(source, f"u{index}", name, birth_date=birth, phones=phones, title=title, unit=unit)
               for index, (source, name, birth, phones, title, unit) in enumerate(rows)]
    assert {(s.ref_a, s.ref_b, s.reason) for s in resolve(records).suggestions} == _every_pair(records)
