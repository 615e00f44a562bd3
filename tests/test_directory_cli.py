"""The directory commands end to end on the example: plan, review, apply, exports, rollback."""

import csv
import datetime as dt
import io
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import NEW_SUFFIX, ldap_target
from mailmerge_gov.cli import cli


def run(*args: str) -> tuple[int, str]:
    """Run the CLI in-process and return its exit code and output."""
    result = CliRunner().invoke(cli, list(args), prog_name="mailmerge-gov", catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def config_path(example_copy: Path) -> str:
    return str(example_copy / "consolidation.toml")


def test_plan_prints_counts_and_where_the_report_is(config_path: str, example_copy: Path) -> None:
    code, output = run("directory", "plan", "-c", config_path)
    reports = example_copy / "state" / "reports"
    assert (code, output) == (0, (
        "plan 1: 788 records from 3 sources -> 779 officials; 760 carried over (298 keep their address, "
        "462 get a new one), 19 disabled not carried over\n"
        "review items: 8 blocking apply; all: 1 suggestion, 7 unit-needs-review, 6 no-unit, 19 disabled, "
        "10 role, 142 collision, 5 source-warning\n"
        f"report: {reports / 'plan-1.html'}\n"
        f"        {reports / 'plan-1-people.csv'}\n"
        f"        {reports / 'plan-1-issues.csv'}\n"))


def test_apply_refuses_open_review_items_and_changed_sources(config_path: str, example_copy: Path) -> None:
    run("directory", "plan", "-c", config_path)
    assert run("directory", "apply", "-c", config_path) == (1, (
        "Error: plan 1 has 8 unresolved review items (1 suggestion, 7 unit-needs-review): resolve them "
        "(directory review, the unit mapping file) and plan again, or --force\n"))
    ldif = example_copy / "sources" / "hcm" / "directory.ldif"
    ldif.write_text(ldif.read_text(encoding="utf-8") + "\ndn: uid=moi,dc=hcm,dc=gov,dc=vn\nobjectClass: inetOrgPerson\n"
                    "uid: moi\ncn: Người Mới\nsn: Người\nmail: moi@hcm.gov.vn\n", encoding="utf-8")
    code, output = run("directory", "apply", "-c", config_path)
    assert (code, output) == (1, "Error: the sources, the mapping file or the consolidation policy changed since "
                                 "plan 1 was made: run `mailmerge-gov directory plan` again and review it (or --force)\n")
    assert not (example_copy / "out").exists()


def test_review_decisions_are_kept_for_the_next_plan(config_path: str) -> None:
    run("directory", "plan", "-c", config_path)
    code, output = run("directory", "review", "-c", config_path)
    assert code == 0
    assert output.splitlines() == [
        "1. same name, title and new unit, in different sources (open)",
        "     binhduong:CN=Lê Thị Kim Linh,OU=Sở Y tế tỉnh Bình Dương,DC=binhduong,DC=gov,DC=vn",
        "       Lê Thị Kim Linh | Sở Y tế tỉnh Bình Dương | 1988-04-28 | linh.lethikim@binhduong.gov.vn | Chuyên viên",
        "     hcm:uid=linhltk,ou=Sở Y tế,dc=hcm,dc=gov,dc=vn",
        "       Lê Thị Kim Linh | Sở Y tế | linhltk@hcm.gov.vn | Chuyên viên",
        "1 open suggestion of plan 1. Decide with: mailmerge-gov directory review --same N | --different N",
    ]
    assert run("directory", "review", "-c", config_path, "--same", "1") == (0, (
        "decided: binhduong:CN=Lê Thị Kim Linh,OU=Sở Y tế tỉnh Bình Dương,DC=binhduong,DC=gov,DC=vn and "
        "hcm:uid=linhltk,ou=Sở Y tế,dc=hcm,dc=gov,dc=vn are the same official; "
        "run directory plan again to use the decision\n"))
    assert run("directory", "review", "-c", config_path, "--different", "99") == (
        1, "Error: plan 1 has no suggestion 99 (it has 1)\n")
    code, output = run("directory", "plan", "-c", config_path)
    assert output.splitlines()[:2] == [
        "plan 2: 788 records from 3 sources -> 778 officials; 759 carried over (298 keep their address, "
        "461 get a new one), 19 disabled not carried over",
        "review items: 7 blocking apply; all: 7 unit-needs-review, 6 no-unit, 19 disabled, 10 role, 141 collision, "
        "5 source-warning"]
    assert run("directory", "review", "-c", config_path) == (0, "plan 2 has no open suggestions\n")


def test_apply_to_ldif_then_exports_and_rollback(config_path: str, example_copy: Path) -> None:
    run("directory", "plan", "-c", config_path)
    code, output = run("directory", "apply", "-c", config_path, "--force")
    assert (code, output) == (0, "apply 1 of plan 1: 795 added, 0 modified, 0 disabled\n"
                                 f"undo with: mailmerge-gov directory rollback -c {config_path} 1\n")
    target = example_copy / "out" / "directory.ldif"
    # 760 officials, 32 units, and the base, ou=units and ou=people entries
    assert target.read_text(encoding="utf-8").count("\ndn: ") + 1 == 795
    assert run("directory", "apply", "-c", config_path, "--force") == (
        0, "apply 2 of plan 1: 0 added, 0 modified, 0 disabled\n")

    code, output = run("directory", "export-map", "-c", config_path)
    rows = list(csv.reader(io.StringIO(output)))
    assert rows[0] == ["old_address", "new_address", "valid_until"]
    assert ["tttha@brvt.gov.vn", "hattt@hcm.gov.vn", "2027-06-30"] in rows
    assert ["letronglong@tphcm.gov.vn", "longlt@hcm.gov.vn", "2027-06-30"] in rows
    assert not [row for row in rows[1:] if row[0].endswith("@hcm.gov.vn")]

    code, output = run("mailbox", "jobs", "-c", config_path)
    jobs = list(csv.reader(io.StringIO(output)))
    assert jobs[0] == ["source", "source_mailbox", "target_mailbox", "identity"]
    assert [row[:3] for row in jobs if row[2] == "hattt@hcm.gov.vn"] == [
        ["baria-vungtau", "tttha@baria-vungtau.gov.vn", "hattt@hcm.gov.vn"],
        ["binhduong", "ha.tranthithu@binhduong.gov.vn", "hattt@hcm.gov.vn"]]

    code, output = run("directory", "export", "-c", config_path, "--format", "vcard")
    card = next(c for c in output.split("BEGIN:VCARD") if "FN:Trần Thị Thu Hà" in c)
    assert card.replace("\r\n", "\n") == (
        "\nVERSION:3.0\nFN:Trần Thị Thu Hà\nN:Trần;Hà;Thị Thu;;\nEMAIL;TYPE=INTERNET,PREF:hattt@hcm.gov.vn\n"
        "ORG:Thành phố Hồ Chí Minh;Sở Tư pháp\nTITLE:Chuyên viên chính\nTEL;TYPE=WORK,VOICE:0274 3873 963\n"
        "TEL;TYPE=WORK,VOICE:+84 254 385 6547\nTEL;TYPE=CELL:0989242313\nEND:VCARD\n")

    assert run("directory", "rollback", "-c", config_path, "1") == (0, "rollback of apply 1: 795 changes made\n")
    assert not target.exists()


def ldapsearch(server, filter_: str, *attributes: str) -> str:
    """Run the real ldapsearch against a server, as a mail client would (anonymous)."""
    done = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", server.url, "-b", NEW_SUFFIX,
                           filter_, *attributes], capture_output=True, text=True, check=True)
    return done.stdout


def dump(server) -> str:
    """Every entry and user attribute under the new suffix, as the admin sees them."""
    done = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", server.url, "-D",
                           server.admin_dn(NEW_SUFFIX), "-y", str(server.password_file), "-b", NEW_SUFFIX],
                          capture_output=True, text=True, check=True)
    return done.stdout


def set_transition_end(config_path: str, day: dt.date) -> None:
    """Move the example's transition end, so a test does not depend on today's date."""
    path = Path(config_path)
    path.write_text(path.read_text(encoding="utf-8").replace("ends = 2027-06-30", f"ends = {day.isoformat()}"),
                    encoding="utf-8")


def test_apply_to_ldap_mail_clients_find_officials_then_rollback(config_path: str, new_directory, monkeypatch) -> None:
    monkeypatch.setenv("MMG_NEW_LDAP_PASSWORD", new_directory.admin_password)
    ldap_target(Path(config_path), new_directory, "MMG_NEW_LDAP_PASSWORD")
    set_transition_end(config_path, dt.date.today() + dt.timedelta(days=30))
    before = dump(new_directory)
    run("directory", "plan", "-c", config_path)
    code, output = run("directory", "apply", "-c", config_path, "--force")
    assert (code, output.splitlines()[0]) == (0, "apply 1 of plan 1: 794 added, 0 modified, 0 disabled")
    # Thunderbird's default address-book filter, typed without diacritics, and by an old address.
    for typed in ("nguyen van an", "Nguyễn Văn An", "an nguyen van", "an"):
        found = ldapsearch(new_directory, f"(|(cn={typed}*)(mail={typed}*)(sn={typed}*))", "mail")
        assert "dn: uid=annv,ou=people,dc=hcm,dc=gov,dc=vn\nmail: annv@hcm.gov.vn\n" in found, typed
    found = ldapsearch(new_directory, "(|(cn=tttha@brvt*)(mail=tttha@brvt*)(sn=tttha@brvt*))", "mail")
    assert found.splitlines()[:2] == ["dn: uid=hattt,ou=people,dc=hcm,dc=gov,dc=vn", "mail: hattt@hcm.gov.vn"]
    assert run("directory", "rollback", "-c", config_path, "1")[0] == 0
    assert dump(new_directory) == before


def test_after_the_transition_old_addresses_leave_the_address_book(config_path: str, new_directory,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("MMG_NEW_LDAP_PASSWORD", new_directory.admin_password)
    ldap_target(Path(config_path), new_directory, "MMG_NEW_LDAP_PASSWORD")
    set_transition_end(config_path, dt.date.today() - dt.timedelta(days=1))
    run("directory", "plan", "-c", config_path)
    assert run("directory", "apply", "-c", config_path, "--force")[0] == 0
    assert ldapsearch(new_directory, "(mail=tttha@brvt*)", "mail") == ""
    found = ldapsearch(new_directory, "(mailmergeOldAddress=tttha@brvt.gov.vn)", "mail", "mailmergeOldAddress")
    assert found.splitlines()[:2] == ["dn: uid=hattt,ou=people,dc=hcm,dc=gov,dc=vn", "mail: hattt@hcm.gov.vn"]


GROUP_LINES = (
    "hcm,group:quantri-thu,,79.QTTHU,Quản trị hệ thống thư điện tử,79,ok\n"
    "binhduong,group:Mail Admins,,79.QTTHU,Quản trị hệ thống thư điện tử,79,ok\n"
    "baria-vungtau,group:Quản trị hệ thống thư,,79.QTTHU,Quản trị hệ thống thư điện tử,79,ok\n"
    "hcm,group:ketoan,,79.KT,Kế toán,79,ok\n"
)


def test_privileged_memberships_wait_for_a_sign_off(config_path: str, example_copy: Path, new_directory,
                                                    monkeypatch) -> None:
    monkeypatch.setenv("MMG_NEW_LDAP_PASSWORD", new_directory.admin_password)
    ldap_target(Path(config_path), new_directory, "MMG_NEW_LDAP_PASSWORD")
    with (example_copy / "structure.csv").open("a", encoding="utf-8") as handle:
        handle.write(GROUP_LINES)
    run("directory", "plan", "-c", config_path)
    code, output = run("directory", "access-review", "-c", config_path)
    assert code == 0
    assert output.splitlines()[:2] == [
        "plan 1: 25 memberships; 4 carried over, 8 privileged waiting for sign-off, 13 not carried over "
        "(group not in the mapping file)",
        "  1. Lê Ngọc Hoa <hoaln@hcm.gov.vn> in Quản trị hệ thống thư -> Quản trị hệ thống thư điện tử",
    ]
    assert run("directory", "apply", "-c", config_path, "--force")[0] == 0
    admins = ldapsearch(new_directory, "(cn=79.QTTHU)", "member")
    assert admins == "dn: cn=79.QTTHU,ou=groups,dc=hcm,dc=gov,dc=vn\nmember: ou=groups,dc=hcm,dc=gov,dc=vn\n\n"
    accountants = ldapsearch(new_directory, "(cn=79.KT)", "member")
    assert accountants.count("member: uid=") == 4
    assert run("directory", "sign-off", "-c", config_path, "1", "25", "--note", "quản trị thư") == (0, (
        "signed off: Lê Ngọc Hoa in Quản trị hệ thống thư\n"
        "signed off: Quản trị hệ thống thư in quantri-thu\n"
        "run directory apply to write the signed-off memberships\n"))
    assert run("directory", "sign-off", "-c", config_path, "26") == (
        1, "Error: plan 1's access review has no membership 26 (it has 25)\n")
    code, output = run("directory", "apply", "-c", config_path, "--force")
    assert output.splitlines()[0] == "6 privileged memberships wait for a sign-off and were left out " \
                                     "(see directory access-review)"
    assert output.splitlines()[1] == "apply 2 of plan 1: 0 added, 1 modified, 0 disabled"
    assert ldapsearch(new_directory, "(cn=79.QTTHU)", "member") == (
        "dn: cn=79.QTTHU,ou=groups,dc=hcm,dc=gov,dc=vn\n"
        "member: uid=hoaln,ou=people,dc=hcm,dc=gov,dc=vn\nmember: uid=postmaster,ou=people,dc=hcm,dc=gov,dc=vn\n\n")


def test_a_group_line_onto_a_unit_code_is_refused(config_path: str, example_copy: Path) -> None:
    with (example_copy / "structure.csv").open("a", encoding="utf-8") as handle:
        handle.write("hcm,group:ketoan,,79.STC,Sở Tài chính,79,ok\n")
    run("directory", "plan", "-c", config_path)
    assert run("directory", "access-review", "-c", config_path) == (1, (
        "Error: unit mapping file, line 57: group line maps onto 79.STC, which unit lines use: "
        "give the group a code of its own\n"))


def test_exports_as_csv_and_ldif(config_path: str) -> None:
    run("directory", "plan", "-c", config_path)
    code, output = run("directory", "export", "-c", config_path, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(output)))
    assert len(rows) == 760
    [ha] = [r for r in rows if r["address"] == "hattt@hcm.gov.vn"]
    assert (ha["full_name"], ha["unit_name"], ha["family"], ha["middle"], ha["given"]) == (
        "Trần Thị Thu Hà", "Sở Tư pháp", "Trần", "Thị Thu", "Hà")
    code, output = run("directory", "export", "-c", config_path, "--format", "ldif")
    assert output.startswith("dn: dc=hcm,dc=gov,dc=vn\n")
    assert output.count("\n\ndn: ") + 1 == 795
    code, output = run("mailbox", "jobs", "-c", config_path)
    # 31 Maildirs in the example; 3 belong to disabled accounts, which are not carried over
    assert output.count("\n") - 1 == 28


def test_draft_structure_writes_a_file_it_will_not_overwrite(config_path: str, tmp_path: Path) -> None:
    output = tmp_path / "draft.csv"
    code, text = run("directory", "draft-structure", "-c", config_path, "--province", "79", "-o", str(output))
    assert (code, text) == (0, f"wrote {output}: 471 lines, 62 need review\n")
    lines = output.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "source,old_unit,old_code,new_code,new_name,new_parent_code,status"
    assert "binhduong,Sở Tài chính tỉnh Bình Dương,74.STC,79.STC,Sở Tài chính,79,ok" in lines
    assert run("directory", "draft-structure", "-c", config_path, "--province", "79", "-o", str(output)) == (
        1, f"Error: {output} exists; choose another name or remove it first\n")
