"""Directory apply and rollback against a real slapd: exact changes, safety limits, crash and refusal recovery."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ldap3
import pytest

from conftest import NEW_SUFFIX, PROJECT_SCHEMA, TESTS_DIR, started
from mailmerge_gov.config import DirectoryConfig, LdapServer, Secret
from mailmerge_gov.directory.apply import (
    ApplyError, ApplyResult, Change, Entry, RollbackError, apply_entries, format_changes, rollback,
)
from mailmerge_gov.directory.ldif import format_entry
from mailmerge_gov.store import AddressRow, Store, open_store
from servers import SlapdServer, ldif_entries, require_program

PERSON = ("top", "person", "organizationalPerson", "inetOrgPerson", "inetLocalMailRecipient", "mailmergeHistory")
UNIT = ("top", "organizationalUnit", "mailmergeHistory")
_bases = itertools.count(1)

# ------------------------------------------------------------------------------------------------ helpers


def container(dn: str) -> Entry:
    """A plain organizationalUnit, as the plan makes ou=people and ou=units."""
    return Entry(dn, (("objectClass", ("top", "organizationalUnit")), ("ou", (dn.split(",")[0][3:],))))


def unit(base: str, code: str, name: str, parent: str | None = None) -> Entry:
    """A unit of the new organisation chart, nested under its parent's code."""
    under = f"ou={parent},ou=units,{base}" if parent else f"ou=units,{base}"
    return Entry(f"ou={code},{under}", (("objectClass", UNIT), ("ou", (code, name)), ("description", (name,)),
                                        ("mailmergeUnitCode", (code,))))


def person(base: str, uid: str, name: str, folded: str, unit_code: str, identity: int, *, title: str = "Chuyên viên",
           old: tuple[str, ...] = (), mobile: tuple[str, ...] = ()) -> Entry:
    """An official: one address on the new domain, old addresses kept."""
    address = f"{uid}@hcm.gov.vn"
    family, *_, given = name.split()
    attributes = (
        ("objectClass", PERSON), ("uid", (uid,)), ("cn", (name, folded)), ("sn", (family,)), ("givenName", (given,)),
        ("mail", (address,)), ("mailRoutingAddress", (address,)), ("mailLocalAddress", (address, *old)),
        ("title", (title,)), ("telephoneNumber", ("+84 28 3829 1234",)), ("mobile", mobile),
        ("departmentNumber", (unit_code,)), ("mailmergeIdentity", (str(identity),)), ("mailmergeOldAddress", old),
        ("mailmergeAccountStatus", ("active",)),
    )
    return Entry(f"uid={uid},ou=people,{base}", tuple((key, values) for key, values in attributes if values))


def sample(base: str) -> list[Entry]:
    """Two containers, three units (one nested) and three officials, parents listed first."""
    return [
        container(f"ou=units,{base}"), container(f"ou=people,{base}"),
        unit(base, "79001", "Văn phòng UBND"), unit(base, "79002", "Sở Nội vụ"),
        unit(base, "7900201", "Phòng Tổ chức", parent="79002"),
        person(base, "annv", "Nguyễn Văn An", "Nguyen Van An", "79001", 1),
        person(base, "binhtt", "Trần Thị Bình", "Tran Thi Binh", "7900201", 2, old=("binhtt@binhduong.gov.vn",)),
        person(base, "cuonglv", "Lê Văn Cường", "Le Van Cuong", "79002", 3, mobile=("0909 123 456",)),
    ]


def replaced(entry: Entry, **changes: tuple[str, ...]) -> Entry:
    """The entry with some attributes set (an empty tuple removes one)."""
    attributes = dict(entry.attributes)
    attributes.update(changes)
    return Entry(entry.dn, tuple((key, values) for key, values in attributes.items() if values))


def ldap_target(server: SlapdServer, base: str, bind_dn: str | None = None, password_file: Path | None = None
                ) -> DirectoryConfig:
    """The target directory: the given slapd, bound as the suffix's admin unless told otherwise."""
    return DirectoryConfig(kind="ldap", ldap=LdapServer(
        url=server.url, base_dn=base, bind_dn=bind_dn or server.admin_dn(server.suffix_of(base)),
        password=Secret(file=password_file or server.password_file)))


def dump(server: SlapdServer, base: str) -> list[str]:
    """The sub-tree's entries with their user attributes, as the real ldapsearch prints them, sorted."""
    result = subprocess.run(
        [require_program("ldapsearch", "ldap-utils"), "-x", "-LLL", "-H", server.url,
         "-D", server.admin_dn(server.suffix_of(base)), "-y", str(server.password_file), "-b", base],
        capture_output=True, text=True, env=server.client_env(), timeout=30, check=True)
    return sorted(ldif_entries(result.stdout))


def read(server: SlapdServer, dn: str) -> dict[str, list[str]]:
    """One entry's user attributes, read as the suffix's admin."""
    conn = ldap3.Connection(ldap3.Server(server.url), server.admin_dn(server.suffix_of(dn)), server.admin_password,
                            auto_bind=True)
    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["*"])
    entry = {name: [value.decode(errors="backslashreplace") for value in values]
             for name, values in conn.response[0]["raw_attributes"].items()}
    conn.unbind()
    return entry


def ldif(entries: list[Entry]) -> list[str]:
    """Entries as ldapsearch prints them, sorted like dump()."""
    return sorted(format_entry(entry.dn, entry.attributes)[:-1] for entry in entries)


def apply(store: Store, target: DirectoryConfig, entries: list[Entry], base: str, tmp_path: Path, *,
          max_disables: int = 10, dry_run: bool = False, identities: tuple[int, ...] = ()) -> ApplyResult:
    """apply_entries with this module's plan id and backup folder."""
    return apply_entries(store, target, entries, base_dn=base, plan_id=1, backup_dir=tmp_path / "backups",
                         max_disables=max_disables, dry_run=dry_run, identities=identities)


def summary(changes: tuple[Change, ...]) -> list[tuple[str, str]]:
    """(op, first RDN) of each change: the order and kind of the writes."""
    return [(change.op, change.dn.split(",")[0]) for change in changes]


@pytest.fixture
def base(slapd: SlapdServer) -> str:
    """A fresh sub-tree of the new unit's suffix for one test, so that tests never share entries."""
    name = f"apply-test-{next(_bases)}"
    slapd.add_ldif(f"dn: ou={name},{NEW_SUFFIX}\nobjectClass: organizationalUnit\nou: {name}\n")
    return f"ou={name},{NEW_SUFFIX}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh state file."""
    with open_store(tmp_path / "state.sqlite") as opened:
        yield opened


@pytest.fixture
def target(slapd: SlapdServer, base: str) -> DirectoryConfig:
    """The session slapd as the target, bound as the suffix's admin."""
    return ldap_target(slapd, base)


# ------------------------------------------------------------------------------------------------ apply


def test_add_into_empty_target(slapd, base, store, target, tmp_path) -> None:
    store.save_addresses([AddressRow("annv@hcm.gov.vn", 1, "official", "planned"),
                          AddressRow("binhtt@hcm.gov.vn", 2, "official", "planned")])
    result = apply(store, target, sample(base), base, tmp_path, identities=(1,))
    assert summary(result.changes) == [
        ("add", "ou=units"), ("add", "ou=people"), ("add", "ou=79001"), ("add", "ou=79002"), ("add", "uid=annv"),
        ("add", "uid=binhtt"), ("add", "uid=cuonglv"), ("add", "ou=7900201"),
    ]
    assert result.changes[4] == Change("add", f"uid=annv,ou=people,{base}", (), sample(base)[5].attributes)
    assert (result.apply_id, result.unmanaged) == (1, (base,))
    assert result.backup == tmp_path / "backups" / "apply-1-before.ldif"
    assert result.backup.read_text() == (
        f"# mailmerge-gov directory apply 1: {slapd.url} ({base})\n"
        "# the 0 entries it modifies or disables, as they were before; the 8 entries it adds did not exist\n"
        "# (binary attributes such as photos are left out: apply never changes them)\n\n")
    assert oct(result.backup.stat().st_mode & 0o777) == "0o600"
    assert dump(slapd, base) == ldif([Entry(base, (("objectClass", ("organizationalUnit",)),
                                                   ("ou", (base.split(",")[0][3:],)))), *sample(base)])
    [run] = store.apply_runs()
    assert (run.status, run.plan_id, run.backup, run.error) == ("finished", 1, str(result.backup), None)
    assert [(c.seq, c.op, c.state) for c in store.apply_changes(1)][-2:] == [(7, "add", "done"), (8, "add", "done")]
    assert [(a.address, a.state) for a in store.addresses()] == [("annv@hcm.gov.vn", "applied"),
                                                                 ("binhtt@hcm.gov.vn", "planned")]


def test_second_apply_changes_nothing(slapd, base, store, target, tmp_path) -> None:
    apply(store, target, sample(base), base, tmp_path)
    before = dump(slapd, base)
    again = apply(store, target, sample(base), base, tmp_path)
    assert (again.apply_id, again.changes, again.backup) == (2, (), None)
    assert dump(slapd, base) == before
    assert [run.status for run in store.apply_runs()] == ["finished", "finished"]


def test_modify_replaces_only_the_differing_managed_attributes(slapd, base, store, target, tmp_path) -> None:
    # an official of the surviving unit whose entry exists already, with a password another system set; the
    # container has a telephone number: a plain entry, so apply owns only the attributes it gives it
    slapd.add_ldif(f"dn: ou=people,{base}\nobjectClass: top\nobjectClass: organizationalUnit\nou: people\n"
                   "telephoneNumber: +84 28 3829 0000\n\n"
                   f"dn: uid=annv,ou=people,{base}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\n"
                   "uid: annv\ncn: Nguyen Van An\nsn: Nguyen\nmail: annv@hcm.gov.vn\ntitle: Chuyen vien\n"
                   "uidNumber: 1001\ngidNumber: 1001\nhomeDirectory: /home/annv\nuserPassword: {SSHA}old-hash\n"
                   "jpegPhoto:: /9j/4AAQSkZJRg==\n")
    first = apply(store, target, sample(base), base, tmp_path)
    [annv] = [change for change in first.changes if change.op == "modify"]  # and not ou=people
    # values are added and deleted so that no attribute is ever empty: each keeps its place in the entry
    assert annv.modifications == (
        ("add", "objectClass", ("top", "person", "organizationalPerson", "inetLocalMailRecipient", "mailmergeHistory")),
        ("add", "cn", ("Nguyễn Văn An",)), ("delete", "cn", ("Nguyen Van An",)), ("add", "cn", ("Nguyen Van An",)),
        ("add", "sn", ("Nguyễn",)), ("delete", "sn", ("Nguyen",)),
        ("add", "givenName", ("An",)), ("add", "mailRoutingAddress", ("annv@hcm.gov.vn",)),
        ("add", "mailLocalAddress", ("annv@hcm.gov.vn",)),
        ("add", "title", ("Chuyên viên",)), ("delete", "title", ("Chuyen vien",)),
        ("add", "telephoneNumber", ("+84 28 3829 1234",)), ("add", "departmentNumber", ("79001",)),
        ("add", "mailmergeIdentity", ("1",)), ("add", "mailmergeAccountStatus", ("active",)),
    )
    desired = sample(base)
    changed = desired[:6] + [replaced(desired[6], title=("Trưởng phòng",)), replaced(desired[7], mobile=())]
    result = apply(store, target, changed, base, tmp_path)
    assert [(c.op, c.dn.split(",")[0], c.modifications) for c in result.changes] == [
        ("modify", "uid=binhtt", (("add", "title", ("Trưởng phòng",)), ("delete", "title", ("Chuyên viên",)))),
        ("modify", "uid=cuonglv", (("delete", "mobile", ()),)),
    ]
    # before and after are the whole entry
    assert result.changes[1].before == desired[7].attributes
    assert result.changes[1].after == tuple(item for item in desired[7].attributes if item[0] != "mobile")
    entry = read(slapd, f"uid=annv,ou=people,{base}")
    # the missing classes were added, posixAccount kept, the password, uidNumber and photo never touched, and
    # every attribute that was there kept its place
    assert list(entry) == ["objectClass", "uid", "cn", "sn", "mail", "title", "uidNumber", "gidNumber",
                           "homeDirectory", "userPassword", "jpegPhoto", "givenName", "mailRoutingAddress",
                           "mailLocalAddress", "telephoneNumber", "departmentNumber", "mailmergeIdentity",
                           "mailmergeAccountStatus"]
    assert entry["objectClass"] == ["inetOrgPerson", "posixAccount", "top", "person", "organizationalPerson",
                                    "inetLocalMailRecipient", "mailmergeHistory"]
    assert (entry["userPassword"], entry["uidNumber"], entry["jpegPhoto"]) == (
        ["{SSHA}old-hash"], ["1001"], ["\\xff\\xd8\\xff\\xe0\x00\x10JFIF"])
    assert (entry["cn"], entry["title"]) == (["Nguyễn Văn An", "Nguyen Van An"], ["Chuyên viên"])


def test_undesired_entries_are_disabled_never_deleted(slapd, base, store, target, tmp_path) -> None:
    apply(store, target, sample(base), base, tmp_path)
    # an entry another tool put under ou=people: not ours (no mailmergeHistory), so left alone; and one of
    # ours outside the managed sub-trees: left alone too
    slapd.add_ldif(f"dn: uid=scanner,ou=people,{base}\nobjectClass: account\nuid: scanner\n\n"
                   f"dn: cn=vanthu,{base}\nobjectClass: organizationalRole\nobjectClass: mailmergeHistory\n"
                   "cn: vanthu\n")
    result = apply(store, target, sample(base)[:7], base, tmp_path)  # cuonglv left the plan
    cuong = sample(base)[7]
    assert result.changes == (Change(
        "disable", cuong.dn, cuong.attributes,
        tuple(item for item in replaced(cuong, mailmergeAccountStatus=("disabled",)).attributes
              if item[0] != "mailRoutingAddress"),
        (("add", "mailmergeAccountStatus", ("disabled",)), ("delete", "mailmergeAccountStatus", ("active",)),
         ("delete", "mailRoutingAddress", ()))),)
    assert result.unmanaged == (base, f"cn=vanthu,{base}", f"uid=scanner,ou=people,{base}")
    entry = read(slapd, f"uid=cuonglv,ou=people,{base}")
    assert (entry["mailmergeAccountStatus"], "mailRoutingAddress" in entry) == (["disabled"], False)
    assert entry["mailLocalAddress"] == ["cuonglv@hcm.gov.vn"]  # kept: history, and nobody else gets it
    assert apply(store, target, sample(base)[:7], base, tmp_path).changes == ()  # disabled once, not again


def test_max_disables_refuses_before_writing(slapd, base, store, target, tmp_path) -> None:
    apply(store, target, sample(base), base, tmp_path)
    before = dump(slapd, base)
    with pytest.raises(ApplyError) as refused:
        apply(store, target, sample(base)[:5] + [replaced(sample(base)[5], title=("Phó phòng",))], base, tmp_path,
              max_disables=1)
    assert str(refused.value) == (
        f"apply would disable 2 entries, more than the limit of 1 (max_disables): uid=binhtt,ou=people,{base}; "
        f"uid=cuonglv,ou=people,{base}. Check the plan; if it is right, raise the limit.")
    assert dump(slapd, base) == before
    assert len(store.apply_runs()) == 1


@pytest.mark.parametrize("case, message", [
    ("unknown attribute", "{dn}: attribute 'mailmergeNickname' is not known to the server's schema "
                          "(load directory/mailmerge-gov.schema into the server)"),
    ("outside base", "uid=khang,ou=people,dc=binhduong,dc=gov,dc=vn: not under the base DN {base}"),
    ("duplicate", "UID=AnNV,ou=people,{base}: the DN appears twice among the desired entries"),
    ("no objectClass", "{dn}: no objectClass"),
    ("person without sn", "{dn}: a person needs sn"),
    ("bad DN", "uid=khang,,{base}: the DN does not parse (special character , must be escaped)"),
    ("NUL", "{dn}: attribute 'title' has a value with a NUL character: 'a\\x00b'"),
    ("not UTF-8", "{dn}: attribute 'title' has a value that is not valid UTF-8: 'a\\udcffb'"),
    ("single-valued", "{dn}: attribute 'mailRoutingAddress' is single-valued but has 2 values"),
    ("orphan", "uid=khang,ou=gone,{base}: its parent neither exists nor is among the desired entries"),
])
def test_validation_refuses_before_any_write(slapd, base, store, target, tmp_path, case, message) -> None:
    good = sample(base)
    dn = f"uid=khang,ou=people,{base}"
    new = person(base, "khang", "Phạm Minh Khang", "Pham Minh Khang", "79001", 9)
    bad = {
        "unknown attribute": replaced(new, mailmergeNickname=("Khang",)),
        "outside base": Entry(new.dn.replace(base, "dc=binhduong,dc=gov,dc=vn"), new.attributes),
        "duplicate": Entry(f"UID=AnNV,ou=people,{base}", good[5].attributes),
        "no objectClass": replaced(new, objectClass=()),
        "person without sn": replaced(new, sn=()),
        "bad DN": Entry(f"uid=khang,,{base}", new.attributes),
        "NUL": replaced(new, title=("a\x00b",)),
        "not UTF-8": replaced(new, title=("a\udcffb",)),
        "single-valued": replaced(new, mailRoutingAddress=("khang@hcm.gov.vn", "k@hcm.gov.vn")),
        "orphan": Entry(f"uid=khang,ou=gone,{base}", new.attributes),
    }[case]
    before = dump(slapd, base)
    with pytest.raises(ApplyError) as refused:
        apply(store, target, good + [bad], base, tmp_path)
    assert str(refused.value) == message.format(dn=dn, base=base)
    assert dump(slapd, base) == before
    assert store.apply_runs() == [] and not (tmp_path / "backups").exists()


def test_several_problems_are_reported_together(slapd, base, store, target, tmp_path) -> None:
    new = person(base, "khang", "Phạm Minh Khang", "Pham Minh Khang", "79001", 9)
    with pytest.raises(ApplyError) as refused:
        apply(store, target, [replaced(new, objectClass=(), cn=("X", "x")), container(f"ou=people,{base}")], base,
              tmp_path)
    assert str(refused.value).split("\n") == [
        f"{new.dn}: attribute 'cn' has the value 'x' twice",
        f"{new.dn}: no objectClass",
    ]


def test_dry_run_shows_exact_ldif_change_records_and_writes_nothing(slapd, base, store, target, tmp_path) -> None:
    apply(store, target, sample(base), base, tmp_path)
    before = dump(slapd, base)
    desired = sample(base)[:6] + [replaced(sample(base)[6], title=("Trưởng phòng",), mobile=("0912 000 111",)),
                                  person(base, "dungpt", "Phạm Thị Dung", "Pham Thi Dung", "79001", 4)]
    result = apply(store, target, desired, base, tmp_path, dry_run=True)
    assert (result.apply_id, result.backup) == (None, None)
    assert format_changes(result) == (
        f"dn: uid=dungpt,ou=people,{base}\n"
        "changetype: add\n"
        "objectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\nobjectClass: inetOrgPerson\n"
        "objectClass: inetLocalMailRecipient\nobjectClass: mailmergeHistory\n"
        "uid: dungpt\n"
        "cn:: UGjhuqFtIFRo4buLIER1bmc=\ncn: Pham Thi Dung\nsn:: UGjhuqFt\ngivenName: Dung\n"
        "mail: dungpt@hcm.gov.vn\nmailRoutingAddress: dungpt@hcm.gov.vn\nmailLocalAddress: dungpt@hcm.gov.vn\n"
        "title:: Q2h1ecOqbiB2acOqbg==\ntelephoneNumber: +84 28 3829 1234\ndepartmentNumber: 79001\n"
        "mailmergeIdentity: 4\nmailmergeAccountStatus: active\n"
        "\n"
        f"dn: uid=binhtt,ou=people,{base}\n"
        "changetype: modify\n"
        "add: title\ntitle:: VHLGsOG7n25nIHBow7JuZw==\n-\n"
        "delete: title\ntitle:: Q2h1ecOqbiB2acOqbg==\n-\n"
        "add: mobile\nmobile: 0912 000 111\n-\n"
        "\n"
        f"dn: uid=cuonglv,ou=people,{base}\n"
        "changetype: modify\n"
        "add: mailmergeAccountStatus\nmailmergeAccountStatus: disabled\n-\n"
        "delete: mailmergeAccountStatus\nmailmergeAccountStatus: active\n-\n"
        "delete: mailRoutingAddress\n-\n"
        "\n")
    assert dump(slapd, base) == before
    assert len(store.apply_runs()) == 1 and sorted(p.name for p in (tmp_path / "backups").iterdir()) == [
        "apply-1-before.ldif"]


def test_apply_killed_half_way_then_run_again_converges(slapd, base, store, target, tmp_path) -> None:
    # the same entries into two sub-trees: one apply runs through, the other is killed with SIGKILL after 3
    # of its 8 writes and then run again
    other = f"ou=apply-test-{next(_bases)},{NEW_SUFFIX}"
    slapd.add_ldif(f"dn: {other}\nobjectClass: organizationalUnit\nou: {other.split(',')[0][3:]}\n")
    apply(store, target, sample(base), base, tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "url": slapd.url, "base_dn": other, "bind_dn": slapd.admin_dn(NEW_SUFFIX),
        "password_file": str(slapd.password_file), "state": str(tmp_path / "killed.sqlite"),
        "backup_dir": str(tmp_path / "killed-backups"), "kill_after": 3,
        "entries": [[e.dn, e.attributes] for e in sample(other)]}))
    worker = subprocess.run([sys.executable, str(TESTS_DIR / "apply_worker.py"), str(spec)], capture_output=True,
                            timeout=60)
    assert (worker.returncode, worker.stderr) == (-9, b"")
    assert len(dump(slapd, other)) == 1 + 3
    with open_store(tmp_path / "killed.sqlite") as killed:
        [run] = killed.apply_runs()
        assert run.status == "running"
        assert [(c.seq, c.state) for c in killed.apply_changes(run.id)] == [(1, "done"), (2, "done"), (3, "done")]
        again = apply(killed, ldap_target(slapd, other), sample(other), other, tmp_path)
        assert summary(again.changes) == [("add", "ou=79002"), ("add", "uid=annv"), ("add", "uid=binhtt"),
                                          ("add", "uid=cuonglv"), ("add", "ou=7900201")]
        first, second = killed.apply_runs()
        assert (first.status, second.status) == ("failed", "finished")
        assert first.error.startswith(f"interrupted: process {first.pid} on ")
    relative = [entry.replace(other, "BASE").replace(other.split(",")[0][3:], "TOP") for entry in dump(slapd, other)]
    expected = [entry.replace(base, "BASE").replace(base.split(",")[0][3:], "TOP") for entry in dump(slapd, base)]
    assert sorted(relative) == sorted(expected)


def test_wrong_password_is_refused_naming_the_server(slapd, base, store, tmp_path) -> None:
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password")
    with pytest.raises(ApplyError) as refused:
        apply(store, ldap_target(slapd, base, password_file=wrong), sample(base), base, tmp_path)
    assert str(refused.value) == (f"{slapd.url}: cannot connect and bind as {slapd.admin_dn(NEW_SUFFIX)}: "
                                  "invalidCredentials")
    assert store.apply_runs() == []


# ------------------------------------------------------------------------------------------------ rollback


def test_rollback_restores_the_exact_directory(slapd, base, store, target, tmp_path) -> None:
    slapd.add_ldif(f"dn: ou=people,{base}\nobjectClass: top\nobjectClass: organizationalUnit\nou: people\n\n"
                   f"dn: uid=annv,ou=people,{base}\nobjectClass: inetOrgPerson\nuid: annv\ncn: Nguyen Van An\n"
                   "sn: Nguyen\ntitle: Chuyen vien\nuserPassword: secret-of-someone-else\n")
    empty = dump(slapd, base)
    first = apply(store, target, sample(base), base, tmp_path)
    after_first = dump(slapd, base)
    second = apply(store, target, sample(base)[:6] + [replaced(sample(base)[6], title=("Trưởng phòng",))], base,
                   tmp_path)
    assert summary(second.changes) == [("modify", "uid=binhtt"), ("disable", "uid=cuonglv")]
    with pytest.raises(RollbackError) as refused:
        rollback(store, target, first.apply_id, base_dn=base)
    assert str(refused.value) == ("apply 1 cannot be rolled back while later applies are in place: roll back 2 "
                                  "first (newest first)")
    undo = rollback(store, target, second.apply_id, base_dn=base)
    assert summary(undo.changes) == [("modify", "uid=cuonglv"), ("modify", "uid=binhtt")]
    assert dump(slapd, base) == after_first
    dry = rollback(store, target, first.apply_id, base_dn=base, dry_run=True)
    assert summary(dry.changes) == [("modify", "uid=annv"), ("delete", "ou=7900201"), ("delete", "uid=cuonglv"),
                                    ("delete", "uid=binhtt"), ("delete", "ou=79002"), ("delete", "ou=79001"),
                                    ("delete", "ou=units")]
    assert format_changes(dry).startswith(
        f"dn: uid=annv,ou=people,{base}\nchangetype: modify\n"
        "delete: objectClass\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
        "objectClass: inetLocalMailRecipient\nobjectClass: mailmergeHistory\n-\n"
        "delete: cn\ncn:: Tmd1eeG7hW4gVsSDbiBBbg==\n-\n"
        "add: sn\nsn: Nguyen\n-\ndelete: sn\nsn:: Tmd1eeG7hW4=\n-\n"
        "add: title\ntitle: Chuyen vien\n-\ndelete: title\ntitle:: Q2h1ecOqbiB2acOqbg==\n-\n"
        "delete: givenName\n-\n"
        "delete: mail\n-\n"
        "delete: mailRoutingAddress\n-\n"
        "delete: mailLocalAddress\n-\n"
        "delete: telephoneNumber\n-\n"
        "delete: departmentNumber\n-\n"
        "delete: mailmergeIdentity\n-\n"
        "delete: mailmergeAccountStatus\n-\n\n"
        f"dn: ou=7900201,ou=79002,ou=units,{base}\nchangetype: delete\n\n")
    assert dump(slapd, base) == after_first
    assert rollback(store, target, first.apply_id, base_dn=base).changes == dry.changes
    assert dump(slapd, base) == empty
    assert rollback(store, target, first.apply_id, base_dn=base).changes == ()
    assert [run.status for run in store.apply_runs()] == ["rolled-back", "rolled-back"]
    assert {c.state for c in store.apply_changes(1)} == {"undone"}


def test_audit_log_has_every_change_and_rollback(slapd, base, store, target, tmp_path) -> None:
    apply(store, target, sample(base)[:2], base, tmp_path)
    rollback(store, target, 1, base_dn=base)
    log = [(e.action, e.subject, e.before, e.after) for e in store.audit_log()]
    assert log == [
        ("directory-apply", f"ou=units,{base}", [], [["objectClass", ["top", "organizationalUnit"]],
                                                     ["ou", ["units"]]]),
        ("directory-apply", f"ou=people,{base}", [], [["objectClass", ["top", "organizationalUnit"]],
                                                      ["ou", ["people"]]]),
        ("directory-apply", "apply 1", {"status": "running"}, {"status": "finished", "error": None}),
        ("directory-rollback", f"ou=people,{base}", [["objectClass", ["top", "organizationalUnit"]],
                                                     ["ou", ["people"]]], []),
        ("directory-rollback", f"ou=units,{base}", [["objectClass", ["top", "organizationalUnit"]],
                                                    ["ou", ["units"]]], []),
        ("directory-rollback", "apply 1", {"status": "finished"}, {"status": "rolled-back", "error": None}),
    ]


APPLIER = "cn=applier,dc=hcm,dc=gov,dc=vn"
LOCKED_SEED = f"""\
dn: {APPLIER}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: applier
userPassword: applier-secret

dn: ou=people,{NEW_SUFFIX}
objectClass: top
objectClass: organizationalUnit
ou: people

dn: ou=units,{NEW_SUFFIX}
objectClass: top
objectClass: organizationalUnit
ou: units

dn: ou=79001,ou=units,{NEW_SUFFIX}
objectClass: top
objectClass: organizationalUnit
objectClass: mailmergeHistory
ou: 79001
ou: Văn phòng UBND
description: Văn phòng UBND
mailmergeUnitCode: 79001

dn: ou=79002,ou=units,{NEW_SUFFIX}
objectClass: top
objectClass: organizationalUnit
objectClass: mailmergeHistory
ou: 79002
ou: Sở Nội vụ
description: Sở Nội vụ (cũ)
mailmergeUnitCode: 79002
"""


def test_server_refusal_stops_at_once_and_rollback_undoes_what_was_written(tmp_path) -> None:
    # A second slapd whose ACL lets the applier write everywhere but under ou=79002 (another team's unit).
    server = started(SlapdServer([NEW_SUFFIX], seed_ldif=LOCKED_SEED, schemas=(PROJECT_SCHEMA,)))
    try:
        server.lock_subtree(f"ou=79002,ou=units,{NEW_SUFFIX}", APPLIER)
        password = tmp_path / "applier.pw"
        password.write_text("applier-secret")
        target = ldap_target(server, NEW_SUFFIX, bind_dn=APPLIER, password_file=password)
        before = dump(server, NEW_SUFFIX)
        desired = sample(NEW_SUFFIX)[:6]  # ou=79002 gets a new description, and a child
        with open_store(tmp_path / "state.sqlite") as store:
            with pytest.raises(ApplyError) as refused:
                apply(store, target, desired, NEW_SUFFIX, tmp_path)
            backup = tmp_path / "backups" / "apply-1-before.ldif"
            assert str(refused.value) == (
                f"ou=7900201,ou=79002,ou=units,{NEW_SUFFIX}: the server refused the add: insufficientAccessRights "
                "(no write access to parent)\n"
                f"apply 1 stopped there: 1 of 3 changes were written (backup: {backup}); rollback 1 undoes them")
            [run] = store.apply_runs()
            assert (run.status, run.error) == ("failed", str(refused.value).split("\n")[0])
            assert [(c.op, c.dn.split(",")[0], c.state) for c in store.apply_changes(1)] == [
                ("add", "uid=annv", "done"), ("add", "ou=7900201", "refused")]
            assert backup.read_text() == (
                f"# mailmerge-gov directory apply 1: {server.url} ({NEW_SUFFIX})\n"
                "# the 1 entries it modifies or disables, as they were before; the 2 entries it adds did not exist\n"
                "# (binary attributes such as photos are left out: apply never changes them)\n\n"
                f"dn: ou=79002,ou=units,{NEW_SUFFIX}\n"
                "objectClass: top\nobjectClass: organizationalUnit\nobjectClass: mailmergeHistory\n"
                "ou: 79002\nou:: U+G7nyBO4buZaSB24bul\ndescription:: U+G7nyBO4buZaSB24bulIChjxakp\n"
                "mailmergeUnitCode: 79002\n\n")
            assert len(dump(server, NEW_SUFFIX)) == len(before) + 1
            undo = rollback(store, target, 1, base_dn=NEW_SUFFIX)
            assert summary(undo.changes) == [("delete", "uid=annv")]
            assert dump(server, NEW_SUFFIX) == before
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ LDIF target


HAND_WRITTEN = """\
version: 1
# exported by hand: comments, a version line and a long folded value must come back byte for byte
dn: dc=hcm,dc=gov,dc=vn
objectClass: dcObject
objectClass: organization
dc: hcm
o: Thành phố Hồ Chí Minh — a long organisation name that the writer folds at seventy-six
  columns

dn: ou=people,dc=hcm,dc=gov,dc=vn
objectClass: top
objectClass: organizationalUnit
ou: people
"""


def test_ldif_target_written_atomically_and_rolled_back_byte_for_byte(tmp_path) -> None:
    path = tmp_path / "out" / "new.ldif"
    path.parent.mkdir()
    path.write_text(HAND_WRITTEN)
    target = DirectoryConfig(kind="ldif", path=path)
    desired = [container(f"ou=people,{NEW_SUFFIX}"), container(f"ou=units,{NEW_SUFFIX}"),
               unit(NEW_SUFFIX, "79001", "Văn phòng UBND"),
               person(NEW_SUFFIX, "annv", "Nguyễn Văn An", "Nguyen Van An", "79001", 1)]
    with open_store(tmp_path / "state.sqlite") as store:
        first = apply(store, target, desired, NEW_SUFFIX, tmp_path)
        assert summary(first.changes) == [("add", "ou=units"), ("add", "ou=79001"), ("add", "uid=annv")]
        assert first.unmanaged == (NEW_SUFFIX,)
        assert first.backup.read_text() == HAND_WRITTEN
        written = path.read_text()
        assert written.startswith("dn: dc=hcm,dc=gov,dc=vn\nobjectClass: dcObject\n")
        assert written.endswith("".join(format_entry(e.dn, e.attributes) for e in desired[1:]))
        assert sorted(p.name for p in path.parent.iterdir()) == ["new.ldif"]  # no temporary file left
        assert apply(store, target, desired, NEW_SUFFIX, tmp_path).changes == ()
        assert path.read_text() == written
        second = apply(store, target, desired[:3] + [replaced(desired[3], title=("Giám đốc",))], NEW_SUFFIX,
                       tmp_path)
        assert [c.modifications for c in second.changes] == [(("add", "title", ("Giám đốc",)),
                                                              ("delete", "title", ("Chuyên viên",)))]
        assert second.backup.read_text() == written
        [undo] = rollback(store, target, second.apply_id, base_dn=NEW_SUFFIX).changes
        assert undo.after == desired[3].attributes
        assert path.read_text() == written
        rollback(store, target, first.apply_id, base_dn=NEW_SUFFIX)
        assert path.read_bytes() == HAND_WRITTEN.encode()


def test_ldif_target_created_by_apply_is_removed_by_rollback(tmp_path) -> None:
    path = tmp_path / "new.ldif"
    target = DirectoryConfig(kind="ldif", path=path)
    base = Entry(NEW_SUFFIX, (("objectClass", ("dcObject", "organization")), ("dc", ("hcm",)), ("o", ("HCM",))))
    with open_store(tmp_path / "state.sqlite") as store:
        result = apply(store, target, [base, container(f"ou=people,{NEW_SUFFIX}")], NEW_SUFFIX, tmp_path)
        assert (summary(result.changes), result.backup) == ([("add", "dc=hcm"), ("add", "ou=people")], None)
        assert path.read_text() == (f"dn: {NEW_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: hcm\n"
                                    f"o: HCM\n\ndn: ou=people,{NEW_SUFFIX}\nobjectClass: top\n"
                                    "objectClass: organizationalUnit\nou: people\n\n")
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        rollback(store, target, result.apply_id, base_dn=NEW_SUFFIX)
        assert not path.exists()


# ------------------------------------------------------------------------------------------------ schema


def definitions(text: str) -> list[str]:
    """The attribute type and object class definitions of a slapd.conf schema or a cn=config LDIF, normalised."""
    unfolded = re.sub(r"\n[ \t]", " ", text)
    found = re.findall(r"^(?:attributetype|objectclass|olcAttributeTypes:|olcObjectClasses:)\s*(\(.*\))\s*$",
                       unfolded, re.M | re.I)
    return [" ".join(definition.split()) for definition in found]


def test_schema_files_agree_and_the_ldif_loads_into_cn_config(tmp_path) -> None:
    schema = PROJECT_SCHEMA.read_text()
    config_ldif = PROJECT_SCHEMA.with_suffix(".ldif").read_text()
    assert len(definitions(schema)) == 9 and definitions(schema) == definitions(config_ldif)
    arc = "2.25.180063080388020990390285794123249002269"
    assert int("8776e34977ec44589bb1a7ebd03ea71d", 16) == int(arc.split(".")[2])
    server = started(SlapdServer([NEW_SUFFIX]))  # without the project schema: loaded at run time below
    try:
        subprocess.run([require_program("ldapadd", "ldap-utils"), "-x", "-H", server.url, "-D", server.config_dn,
                        "-y", str(server.password_file), "-f", str(PROJECT_SCHEMA.with_suffix(".ldif"))],
                       env=server.client_env(), check=True, capture_output=True, timeout=30)
        ldap = ldap3.Server(server.url, get_info=ldap3.SCHEMA)
        ldap3.Connection(ldap, auto_bind=True).unbind()
        history = ldap.schema.object_classes["mailmergeHistory"]
        assert (history.oid, history.kind) == (f"{arc}.2.1", "AUXILIARY")
        assert ldap.schema.attribute_types["mailmergeAccountStatus"].single_value
    finally:
        server.stop()
