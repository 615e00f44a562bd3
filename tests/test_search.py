"""The staff search: the example's new directory indexed, found by the query rules people use."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailmerge_gov.cli import cli
from mailmerge_gov.config import load_config
from mailmerge_gov.directory.plan import load_plan
from mailmerge_gov.directory.search import SearchError, index_path, search
from mailmerge_gov.store import open_store


def run(*args: str) -> tuple[int, str]:
    """Run the CLI in-process and return its exit code and standard output."""
    result = CliRunner().invoke(cli, list(args), prog_name="mailmerge-gov", catch_exceptions=False)
    return result.exit_code, result.stdout


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, example_dir: Path) -> Path:
    """The example planned, applied to its LDIF target and indexed; returns the config path."""
    import shutil

    copy = tmp_path_factory.mktemp("search") / "hcm-merger"
    shutil.copytree(example_dir, copy, ignore=shutil.ignore_patterns("state", "out"))
    config = str(copy / "consolidation.toml")
    assert run("directory", "plan", "-c", config)[0] == 0
    assert run("directory", "apply", "-c", config, "--force")[0] == 0
    code, output = run("directory", "index", "-c", config)
    assert (code, output) == (0, f"indexed 760 officials: {copy / 'state' / 'directory-index.sqlite'}\n")
    return copy / "consolidation.toml"


def uids(config: Path, query: str, limit: int = 5) -> list[str]:
    """The uids the search finds, best first."""
    return [p.uid for p in search(index_path(load_config(config).state_file), query, limit)]


@pytest.mark.parametrize(("query", "first"), [
    ("nguyen van an", ["annv", "annv2", "annv3"]),
    ("Nguyễn Văn An", ["annv", "annv2", "annv3"]),
    ("NGUYEN VAN AN", ["annv", "annv2", "annv3"]),
    ("an nv", ["annv", "annv2", "annv3"]),
    ("annv", ["annv", "annv2", "annv3"]),
    ("annv7", ["annv7"]),
    ("an.nguyenvan@binhduong.gov.vn", ["annv7"]),  # an old address
    ("AN.NGUYENVAN@BINHDUONG.GOV.VN", ["annv7"]),
    ("an.nguyenvan", ["annv7"]),  # its local part
    ("annv7@hcm.gov.vn", ["annv7"]),
    ("0274 3827 438", ["annv7"]),  # a phone number with spaces
    ("02743827438", ["annv7"]),  # and without
    ("+84 274 3827 438", ["annv7"]),
    ("so tai chinh", ["sotaichinh"]),  # a unit: its role mailbox first, then its officials
    ("tran thi thu ha", ["hattt"]),
])
def test_query_rules(indexed: Path, query: str, first: list[str]) -> None:
    assert uids(indexed, query, len(first)) == first


def test_a_prefix_finds_names_that_begin_with_it(indexed: Path) -> None:
    found = search(index_path(load_config(indexed).state_file), "nguy", 50)
    assert len(found) == 50 and all(p.full_name.startswith("Nguy") for p in found)


@pytest.mark.parametrize("query", ['"', "*", "(", "-", "NEAR", 'an" OR "b', "*)(uid=*", "<script>alert(1)</script>",
                                   "a" * 5000, "", "   ", "@", "nguyen AND", "^an", "an:nv"])
def test_hostile_queries_are_text_and_never_raise(indexed: Path, query: str) -> None:
    assert isinstance(uids(indexed, query), list)


def test_disabled_officials_are_never_found(indexed: Path) -> None:
    config = load_config(indexed)
    with open_store(config.state_file) as store:
        disabled = [p for p in load_plan(config, store).people if p.disabled]
    assert len(disabled) == 19
    for person in disabled:
        for _, address in person.mailboxes:
            assert search(index_path(config.state_file), address) == [], address


def test_an_entry_the_apply_disabled_is_left_out(tmp_path: Path) -> None:
    ldif = tmp_path / "directory.ldif"
    ldif.write_text("".join(
        f"dn: uid={uid},ou=people,dc=hcm,dc=gov,dc=vn\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: Lê Văn {name}\n"
        f"sn: Lê\nmail: {uid}@hcm.gov.vn\nmailmergeAccountStatus: {status}\n\n"
        for uid, name, status in (("tamlv", "Tám", "active"), ("chinlv", "Chín", "disabled"))), encoding="utf-8")
    from mailmerge_gov.config import DirectoryConfig
    from mailmerge_gov.directory.search import build_index

    assert build_index(DirectoryConfig(kind="ldif", path=ldif), tmp_path / "index.sqlite") == 1
    assert [p.uid for p in search(tmp_path / "index.sqlite", "le van")] == ["tamlv"]


def test_json_output(indexed: Path) -> None:
    code, output = run("directory", "search", "-c", str(indexed), "0274 3827 438", "--json")
    assert code == 0
    assert json.loads(output) == [{
        "uid": "annv7", "full_name": "Nguyễn Văn An", "title": "Kế toán", "unit": "Sở Xây dựng",
        "unit_path": ["Thành phố Hồ Chí Minh", "Sở Xây dựng"], "mail": "annv7@hcm.gov.vn",
        "phones": ["0274 3827 438"], "mobile": ["0792890605"],
        "old_addresses": ["an.nguyenvan@binhduong.gov.vn", "nguyenvanan@binhduong.gov.vn"],
        "old_units": ["Sở Xây dựng tỉnh Bình Dương"]}]


def test_the_terminal_table_names_the_former_address(indexed: Path) -> None:
    code, output = run("directory", "search", "-c", str(indexed), "an.nguyenvan@binhduong.gov.vn")
    assert code == 0
    assert "Nguyễn Văn An" in output and "annv7@hcm.gov.vn" in output and "formerly:" in output
    assert run("directory", "search", "-c", str(indexed), "zzzz") == (0, "no official matches 'zzzz'\n")


def test_no_index_yet(example_copy: Path) -> None:
    config = load_config(example_copy / "consolidation.toml")
    with pytest.raises(SearchError, match="build it with `mailmerge-gov directory index`"):
        search(index_path(config.state_file), "an")


def test_a_rebuild_is_seen_at_once_and_whole(tmp_path: Path) -> None:
    from mailmerge_gov.config import DirectoryConfig
    from mailmerge_gov.directory.search import build_index

    def directory(*people: tuple[str, str]) -> DirectoryConfig:
        ldif = tmp_path / "directory.ldif"
        ldif.write_text("".join(f"dn: uid={uid},ou=people,dc=hcm,dc=gov,dc=vn\nobjectClass: inetOrgPerson\n"
                                f"uid: {uid}\ncn: {name}\nsn: x\nmail: {uid}@hcm.gov.vn\n\n" for uid, name in people),
                        encoding="utf-8")
        return DirectoryConfig(kind="ldif", path=ldif)

    index = tmp_path / "index.sqlite"
    build_index(directory(("tamlv", "Lê Văn Tám")), index)
    assert [p.uid for p in search(index, "le van")] == ["tamlv"]  # this thread now keeps a connection open
    build_index(directory(("chinlv", "Lê Văn Chín"), ("tamlv2", "Lê Văn Tám")), index)
    assert [p.uid for p in search(index, "le van")] == ["chinlv", "tamlv2"]
    assert not index.with_name("index.sqlite.building").exists()
    index.unlink()
    with pytest.raises(SearchError, match="there is no search index"):
        search(index, "le van")


def test_a_unit_finds_its_officials_and_those_of_the_units_below(indexed: Path) -> None:
    found = search(index_path(load_config(indexed).state_file), "so xay dung", 100)
    # its 50 officials first, then the words found elsewhere (a title "… Xây dựng", an old unit)
    assert len(found) == 55 and {p.unit for p in found[:50]} == {"Sở Xây dựng"}
    assert "Sở Xây dựng" not in {p.unit for p in found[50:]}
    # the top of the organisation is everybody's unit: its words find names, not the whole directory
    minh = search(index_path(load_config(indexed).state_file), "minh", 5)
    assert len(minh) == 5 and all("Minh" in p.full_name.split() for p in minh)
