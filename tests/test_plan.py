"""The plan of the example merger: who gets which address, what needs review, and stability."""

import base64
import csv
from pathlib import Path

import pytest

from mailmerge_gov.config import load_config
from mailmerge_gov.directory.plan import load_plan, make_plan, read_sources
from mailmerge_gov.directory.sources import SourceError
from mailmerge_gov.directory.report import write_report
from mailmerge_gov.store import open_store


@pytest.fixture
def planned(example_copy: Path):
    """The example's config, an open store, and its first plan."""
    config = load_config(example_copy / "consolidation.toml")
    with open_store(config.state_file) as store:
        yield config, store, make_plan(config, store)


def by_name(plan, name: str):
    return [p for p in plan.people if p.full_name == name]


def test_summary_of_the_example(planned) -> None:
    _, _, plan = planned
    assert plan.summary == {
        "sources": {"hcm": 307, "binhduong": 256, "baria-vungtau": 225}, "identities": 779, "carried_over": 760,
        "kept_addresses": 298, "new_addresses": 462, "aliases": 913, "disabled": 19, "roles": 10, "units": 32,
        "issues": {"suggestion": 1, "conflict": 0, "unit-needs-review": 7, "unit-unmapped": 0, "no-unit": 6,
                   "disabled": 19, "role": 10, "collision": 142, "source-warning": 5},
        "blocking": 8, "transition_ends": "2027-06-30",
    }


def test_official_in_two_sources_is_one_identity_with_every_old_address(planned) -> None:
    _, _, plan = planned
    [ha] = by_name(plan, "Trần Thị Thu Hà")
    assert (ha.address, ha.unit_code, ha.kept) == ("hattt@hcm.gov.vn", "79.STP", False)
    assert [(a.address, a.source, a.valid_until) for a in ha.aliases] == [
        ("ha.tranthithu@binhduong.gov.vn", "binhduong", "2027-06-30"),
        ("ha.tranthithu@sotp.binhduong.gov.vn", "binhduong", "2027-06-30"),
        ("tranthithuha@baria-vungtau.gov.vn", "baria-vungtau", "2027-06-30"),
        ("tranthithuha@binhduong.gov.vn", "binhduong", "2027-06-30"),
        ("tttha@baria-vungtau.gov.vn", "baria-vungtau", "2027-06-30"),
        ("tttha@brvt.gov.vn", "baria-vungtau", "2027-06-30"),
    ]
    assert ha.old_units == (("binhduong", "Sở Tư pháp tỉnh Bình Dương", "74.STP"), ("baria-vungtau", "Sở Tư pháp", "77.STP"))


def test_surviving_unit_keeps_its_addresses_and_newcomers_queue_behind(planned) -> None:
    _, _, plan = planned
    ans = sorted((p.address, p.kept, p.records[0].split(":")[0]) for p in by_name(plan, "Nguyễn Văn An"))
    # an.nguyen@ (the second pattern) went to Nguyễn Quốc An, who came first in source order.
    assert ans == [
        ("annv2@hcm.gov.vn", True, "hcm"), ("annv3@hcm.gov.vn", True, "hcm"), ("annv4@hcm.gov.vn", True, "hcm"),
        ("annv5@hcm.gov.vn", True, "hcm"), ("annv6@hcm.gov.vn", False, "binhduong"),
        ("annv7@hcm.gov.vn", False, "binhduong"), ("annv8@hcm.gov.vn", False, "binhduong"),
        ("annv9@hcm.gov.vn", False, "baria-vungtau"), ("annv@hcm.gov.vn", True, "hcm"),
    ]


def test_the_same_inputs_give_the_same_plan(example_copy: Path, tmp_path: Path) -> None:
    config = load_config(example_copy / "consolidation.toml")
    plans = []
    for name in ("a.sqlite", "b.sqlite"):
        with open_store(tmp_path / name) as store:
            plans.append(make_plan(config, store))
    assert plans[0].people == plans[1].people
    assert plans[0].issues == plans[1].issues


def test_a_replan_keeps_applied_addresses_and_decisions(planned) -> None:
    config, store, first = planned
    [ha] = by_name(first, "Trần Thị Thu Hà")
    store.mark_addresses_applied([p.identity for p in first.people])
    suggestion = next(i for i in first.issues if i.kind == "suggestion")
    store.decide(suggestion.detail["a"], suggestion.detail["b"], "different")
    second = make_plan(config, store)
    assert {p.identity: p.address for p in second.people} == {p.identity: p.address for p in first.people}
    assert [i.subject for i in second.issues if i.kind == "suggestion"] == [
        i.subject for i in first.issues if i.kind == "suggestion" and i is not suggestion]
    assert load_plan(config, store).people == second.people


def test_report_files(planned) -> None:
    config, store, plan = planned
    header = store.plan(plan.id)
    files = write_report(plan, config, config.state_file.parent / "reports", header.created_at, header.actor)
    html = files.html.read_text(encoding="utf-8")
    assert "<h1>Kế hoạch hợp nhất danh bạ #1 <span class=\"en\">Directory consolidation plan</span></h1>" in html
    assert "<td>hattt@hcm.gov.vn</td>" in html
    assert "<td>annv@hcm.gov.vn</td>" not in html  # kept: counted on the page, listed in the CSV
    with files.people_csv.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 779
    [ha] = [r for r in rows if r["full_name"] == "Trần Thị Thu Hà"]
    assert (ha["address"], ha["unit_name"], ha["kept"]) == ("hattt@hcm.gov.vn", "Sở Tư pháp", "no")
    with files.issues_csv.open(encoding="utf-8") as handle:
        issues = list(csv.DictReader(handle))
    assert sum(r["blocking"] == "yes" for r in issues) == 8


def test_an_applied_address_stays_with_its_official_when_the_entry_moves(planned, example_copy: Path) -> None:
    config, store, first = planned
    [an] = [p for p in first.people if p.address == "annv@hcm.gov.vn"]
    store.mark_addresses_applied([p.identity for p in first.people])
    ldif = example_copy / "sources" / "hcm" / "directory.ldif"
    text = ldif.read_text(encoding="utf-8")
    old_dn = an.records[0].split(":", 1)[1]
    encoded = base64.b64encode(old_dn.encode()).decode()
    moved = "uid=annv,ou=Sở Tài chính,dc=hcm,dc=gov,dc=vn"
    new_text = text.replace(
        _unfolded_dn_block(text, encoded), "dn:: " + base64.b64encode(moved.encode()).decode() + "\n")
    assert new_text != text
    ldif.write_text(new_text, encoding="utf-8")
    second = make_plan(config, store)
    [after] = [p for p in second.people if p.address == "annv@hcm.gov.vn"]
    assert (after.identity, after.full_name, after.records) == (an.identity, "Nguyễn Văn An", (f"hcm:{moved}",))


def _unfolded_dn_block(text: str, encoded: str) -> str:
    """Return the (possibly folded) 'dn:: <encoded>' lines of an LDIF text, as they stand in it."""
    start = text.index("dn:: " + encoded[:40])
    end = start
    lines = []
    for line in text[start:].split("\n"):
        if lines and not line.startswith(" "):
            break
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_the_page_samples_the_items_that_do_not_block(planned) -> None:
    config, store, plan = planned
    files = write_report(plan, config, config.state_file.parent / "reports", "2026-11-27", "tester", shown_per_kind=2)
    html = files.html.read_text(encoding="utf-8")
    collisions = html.split("<h3>Address taken: a later pattern or a number was used (142)</h3>\n")[1]
    assert collisions.split("</table>")[0].count("<tr>") == 3  # the header and two items
    assert collisions.startswith("<p>2 mục đầu tiên; tất cả trong <code>plan-1-issues.csv</code>")
    needs_review = html.split("<h3>Old unit marked &#39;needs review&#39; in the mapping file (7) <span class="
                              "\"blocking\">— chặn áp dụng / blocks apply</span></h3>\n")[1].split("</table>")[0]
    assert needs_review.count("<tr>") == 8  # blocking items are all listed


@pytest.mark.parametrize("parallel_bytes", [0, 1 << 40], ids=["worker processes", "in turn"])
def test_sources_read_in_worker_processes_or_in_turn_store_the_same(example_copy: Path, parallel_bytes: int) -> None:
    config = load_config(example_copy / "consolidation.toml")
    with open_store(config.state_file) as store:
        reads, digest = read_sources(config, store, parallel_bytes=parallel_bytes)
        stored = store.source_records()
        snapshots = store.source_digests()
    assert list(reads) == ["hcm", "binhduong", "baria-vungtau"]  # the config's order either way
    assert {name: len(read.records) for name, read in reads.items()} == {"hcm": 307, "binhduong": 256,
                                                                          "baria-vungtau": 225}
    assert len(stored) == 788
    assert sorted(r.ref for read in reads.values() for r in read.records) == sorted(r.ref for r in stored)
    # the digest of the example's inputs, whichever way they were read
    assert (digest, snapshots) == _serial_digest(example_copy)


def _serial_digest(folder: Path) -> tuple[str, dict[str, str]]:
    """The inputs digest and source digests of a plain, in-turn read of a copy of the example."""
    config = load_config(folder / "consolidation.toml")
    with open_store(folder / "serial.sqlite") as store:
        _, digest = read_sources(config, store, parallel_bytes=1 << 40)
        return digest, store.source_digests()


@pytest.mark.parametrize("parallel_bytes", [0, 1 << 40], ids=["worker processes", "in turn"])
def test_a_bad_line_read_in_a_worker_process_is_named_as_in_turn(example_copy: Path, parallel_bytes: int) -> None:
    ldif = example_copy / "sources" / "binhduong" / "directory.ldif"
    text = ldif.read_text(encoding="utf-8").rstrip("\n") + "\n\ndn: uid=broken,dc=binhduong,dc=gov,dc=vn\nno colon here\n"
    ldif.write_text(text, encoding="utf-8")
    line = text.count("\n")  # the last line
    config = load_config(example_copy / "consolidation.toml")
    with open_store(config.state_file) as store, pytest.raises(SourceError) as caught:
        read_sources(config, store, parallel_bytes=parallel_bytes)
    assert str(caught.value) == f"{ldif}, line {line}: expected 'attribute: value', found 'no colon here'"
