"""Reading old directories: the example's three presets, HR join, digests, bad input, LDAP paged search."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import ldap3
import pytest

from mailmerge_gov.config import DirectoryConfig, LdapServer, Secret, Source, load_config
from mailmerge_gov.directory.ldif import format_entry
from mailmerge_gov.directory.model import SourceRecord
from mailmerge_gov.directory.presets import FIELDS
from mailmerge_gov.directory.sources import SourceError, SourceRead, read_source
from servers import ServerNotInstalled, SlapdServer, free_port

OLD_SUFFIX = "dc=binhduong,dc=gov,dc=vn"
HR_HEADER = "employee_id,full_name,citizen_id,date_of_birth,unit,title,phone\n"


def source_for(path: Path, preset: str = "openldap", kind: str = "ldif", **extra: object) -> Source:
    """Return a source named "test" that reads one file."""
    return Source("test", "Test", "74", ("binhduong.gov.vn",),
                  DirectoryConfig(kind=kind, path=path, preset=preset, **extra))  # type: ignore[arg-type]


def by(records: tuple[SourceRecord, ...], **wanted: object) -> SourceRecord:
    """Return the one record whose fields have the wanted values."""
    (found,) = [r for r in records if all(getattr(r, k) == v for k, v in wanted.items())]
    return found


def fields(record: SourceRecord) -> dict[str, object]:
    """Return a record's fields without `raw` and `line`, for exact comparisons."""
    return {k: v for k, v in dataclasses.asdict(record).items() if k not in ("raw", "line")}


@pytest.fixture(scope="module")
def example(example_dir: Path) -> dict[str, SourceRead]:
    """The example's three sources, read as consolidation.toml describes them."""
    config = load_config(example_dir / "consolidation.toml")
    return {source.name: read_source(source) for source in config.sources}


@pytest.mark.parametrize(("name", "people", "groups", "disabled", "without_unit"), [
    ("hcm", 304, 3, 6, 2),
    ("binhduong", 253, 3, 6, 2),
    ("baria-vungtau", 223, 2, 7, 2),
])
def test_example_counts(example: dict[str, SourceRead], example_dir: Path, name: str, people: int, groups: int,
                        disabled: int, without_unit: int) -> None:
    manifest = json.loads((example_dir / "MANIFEST.json").read_text("utf-8"))["sources"][name]
    # role accounts are people here, never disabled and always in a unit
    assert (manifest["people"] + manifest["role_accounts"], manifest["groups"], manifest["disabled"],
            manifest["without_unit"]) == (people, groups, disabled, without_unit)
    read = example[name]
    assert len(read.records) == people + groups
    assert (len(read.people), len(read.groups)) == (people, groups)
    assert sum(r.disabled for r in read.people) == disabled
    assert sum(r.unit is None for r in read.people) == without_unit
    assert all(r.source == name and r.line for r in read.records)


def test_ad_record_after_the_hr_join(example: dict[str, SourceRead]) -> None:
    record = by(example["binhduong"].people, mail="ha.tranthithu@binhduong.gov.vn")
    assert fields(record) == {
        "source": "binhduong", "dn": "CN=Trần Thị Thu Hà,OU=Sở Tư pháp tỉnh Bình Dương,DC=binhduong,DC=gov,DC=vn",
        "kind": "person", "full_name": "Trần Thị Thu Hà", "uid": "ha.tranthithu",
        "mail": "ha.tranthithu@binhduong.gov.vn",
        "aliases": ("ha.tranthithu@sotp.binhduong.gov.vn", "tranthithuha@binhduong.gov.vn"),
        "title": "Chuyên viên chính", "phones": ("0274 3873 963",), "mobiles": ("0989242313",),
        "unit": "Sở Tư pháp tỉnh Bình Dương", "employee_id": "BD766093", "citizen_id": "074186004217",
        "birth_date": "1986-04-17", "disabled": False, "member_of": (), "members": (),
    }
    # raw keeps every attribute as read, sorted by name
    assert [name for name, _ in record.raw] == sorted((name for name, _ in record.raw), key=str.lower)
    assert dict(record.raw)["objectClass"] == ("top", "person", "organizationalPerson", "user")


def test_the_same_official_in_zimbra_with_citizen_id_from_employee_number(example_dir: Path) -> None:
    # Bà Rịa–Vũng Tàu keeps the citizen ID (CCCD) in employeeNumber: an override says so.
    source = load_config(example_dir / "consolidation.toml").source("baria-vungtau")
    directory = dataclasses.replace(source.directory, attributes=(("citizen_id", "employeeNumber"),))
    read = read_source(dataclasses.replace(source, directory=directory))
    record = by(read.people, uid="tttha")
    assert (record.full_name, record.citizen_id, record.employee_id, record.unit, record.disabled) == (
        "Trần Thị Thu Hà", "074186004217", "074186004217", "Sở Tư pháp", False)
    assert (record.mail, record.aliases) == ("tttha@baria-vungtau.gov.vn",
                                             ("tttha@brvt.gov.vn", "tranthithuha@baria-vungtau.gov.vn"))


def test_ad_addresses_come_from_proxy_addresses(example: dict[str, SourceRead]) -> None:
    record = by(example["binhduong"].people, uid="toan.leduc")
    assert dict(record.raw)["proxyAddresses"] == (
        "SMTP:toan.leduc@binhduong.gov.vn", "smtp:toan.leduc@sotp.binhduong.gov.vn",
        "smtp:leductoan@binhduong.gov.vn",
        "X500:/o=BinhDuong/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Recipients/cn=toan.leduc")
    assert (record.mail, record.aliases) == (
        "toan.leduc@binhduong.gov.vn", ("toan.leduc@sotp.binhduong.gov.vn", "leductoan@binhduong.gov.vn"))


def test_each_preset_disables_its_own_way(example: dict[str, SourceRead]) -> None:
    closed = by(example["baria-vungtau"].people, uid="ttthuy")
    assert (dict(closed.raw)["zimbraAccountStatus"], closed.disabled) == (("closed",), True)
    locked = by(example["hcm"].people, uid="thanghd")
    assert (dict(locked.raw)["pwdAccountLockedTime"], locked.disabled) == (("000001010000Z",), True)
    uac = {dict(r.raw)["userAccountControl"][0]: r.disabled for r in example["binhduong"].people}
    assert uac == {"512": False, "514": True, "66048": False, "66050": True}


def test_names_are_kept_as_the_source_spells_them(example: dict[str, SourceRead]) -> None:
    record = by(example["baria-vungtau"].people, uid="lxnam")
    assert record.full_name == unicodedata.normalize("NFD", "Lê Xuân Nam") != "Lê Xuân Nam"
    assert by(example["hcm"].people, full_name="Lê  Văn Tám").uid == "tamlv"


def test_units_from_the_dn_or_none(example: dict[str, SourceRead]) -> None:
    hcm = by(example["hcm"].people, uid="anhnt")
    assert (hcm.dn, hcm.unit) == ("uid=anhnt,dc=hcm,dc=gov,dc=vn", None)
    without = [r for r in example["binhduong"].people if r.unit is None]
    assert [r.dn.split(",", 1)[1] for r in without] == ["CN=Users,DC=binhduong,DC=gov,DC=vn"] * 2


def test_groups_in_each_preset(example: dict[str, SourceRead]) -> None:
    hcm = by(example["hcm"].groups, full_name="quantri-thu")
    assert hcm.members == (
        "uid=postmaster,ou=Văn phòng UBND Thành phố,dc=hcm,dc=gov,dc=vn",
        "uid=longpq,ou=Văn phòng UBND Thành phố,dc=hcm,dc=gov,dc=vn",
        "uid=longlt,ou=Văn phòng UBND Thành phố,dc=hcm,dc=gov,dc=vn",
        "uid=thanghd,ou=UBND Phường Tân Định,dc=hcm,dc=gov,dc=vn")
    # a disabled account in a privileged group, and the person knows the group (no memberOf in OpenLDAP's export)
    assert by(example["hcm"].people, uid="thanghd").member_of == ("cn=quantri-thu,ou=groups,dc=hcm,dc=gov,dc=vn",)
    ad = by(example["binhduong"].groups, full_name="Phong Ke toan STC")
    assert (ad.mail, ad.aliases, len(ad.members)) == ("ketoan.stc@binhduong.gov.vn",
                                                       ("ketoan@sotc.binhduong.gov.vn",), 4)
    assert by(example["binhduong"].people, uid="minh.nguyenvan").member_of == (
        "CN=Domain Admins,CN=Users,DC=binhduong,DC=gov,DC=vn", "CN=Mail Admins,CN=Users,DC=binhduong,DC=gov,DC=vn")
    zimbra = {g.uid: g for g in example["baria-vungtau"].groups}
    assert zimbra["quantri"].full_name == "Quản trị hệ thống thư"
    assert zimbra["quantri"].members[-2:] == ("uid=ttthuy,ou=people,dc=baria-vungtau,dc=gov,dc=vn",
                                              "hotro.thudientu@vnpt.vn")  # outside address kept as it is
    # listed by its old alias vttuan@brvt.gov.vn, resolved to the account
    assert zimbra["vanphong"].members[-1] == "uid=vttuan,ou=people,dc=baria-vungtau,dc=gov,dc=vn"


def test_hr_join_warnings(example: dict[str, SourceRead]) -> None:
    assert example["binhduong"].warnings == (
        "hr.csv line 61: employee BD344406 (Đỗ Kim Yến) has no unit in the directory; "
        "HR has 'Sở Tài chính tỉnh Bình Dương'",
        "hr.csv line 108: employee BD501863 (Lê Thị Hạnh) is in 'Sở Y tế tỉnh Bình Dương' in the directory, "
        "'Sở Nội vụ tỉnh Bình Dương' in HR",
        "hr.csv line 236: employee BD953888 (Hoàng Văn Tuấn) has no unit in the directory; HR has 'UBND Xã An Thái'",
        "hr.csv line 252: employee BD999990 (Vũ Thị Trang) has no directory account",
        "hr.csv line 253: employee BD999991 (Dương Văn Nam) has no directory account",
    )
    assert all(r.citizen_id and r.birth_date for r in example["binhduong"].people if r.employee_id)
    assert example["hcm"].warnings == example["baria-vungtau"].warnings == ()


AD_ENTRY = """\
dn: CN=Nguyen Van An,OU=So Tai chinh,DC=binhduong,DC=gov,DC=vn
objectClass: user
displayName: Nguyễn Văn An
mail: An.NguyenVan@binhduong.gov.vn
proxyAddresses: smtp:annv@sotc.binhduong.gov.vn
proxyAddresses: SMTP:an.nguyen@binhduong.gov.vn
proxyAddresses: SIP:an.nguyen@binhduong.gov.vn
proxyAddresses: smtp:ANNV@sotc.binhduong.gov.vn
userAccountControl: 66050
employeeID: BD000001

dn: CN=PC-STC-01,OU=So Tai chinh,DC=binhduong,DC=gov,DC=vn
objectClass: user
objectClass: computer
cn: PC-STC-01
"""


def test_ad_proxy_primary_wins_over_mail(tmp_path: Path) -> None:
    # Exchange delivers to the SMTP: address; a different `mail` becomes an alias; computers are skipped
    path = tmp_path / "ad.ldif"
    path.write_text(AD_ENTRY, encoding="utf-8")
    (record,) = read_source(source_for(path, "ad")).records
    assert (record.mail, record.aliases) == (
        "an.nguyen@binhduong.gov.vn", ("an.nguyenvan@binhduong.gov.vn", "annv@sotc.binhduong.gov.vn"))
    assert (record.full_name, record.unit, record.disabled, record.employee_id) == (
        "Nguyễn Văn An", "So Tai chinh", True, "BD000001")


def test_overrides_and_member_uids(tmp_path: Path) -> None:
    path = tmp_path / "o.ldif"
    path.write_text("dn: uid=a,ou=X,dc=t\nobjectClass: inetOrgPerson\nuid: a\ncn: A\nmail: a@t.vn\n"
                    "departmentNumber: Phòng A\nbirthDate: 17/04/1986\n\n"
                    "dn: cn=g,dc=t\nobjectClass: posixGroup\ncn: g\nmemberUid: A\nmemberUid: nobody\n", "utf-8")
    overrides = (("birth_date", "birthDate"), ("unit", "departmentNumber, ou"))
    read = read_source(source_for(path, attributes=overrides))
    person, group = read.records
    assert (person.unit, person.birth_date, person.member_of) == ("Phòng A", "1986-04-17", ("cn=g,dc=t",))
    assert group.members == ("uid=a,ou=X,dc=t",)
    assert read.warnings == ("o.ldif line 9: group 'cn=g,dc=t': memberUid 'nobody' has no account in this source; "
                             "left out",)


def test_csv_directory(tmp_path: Path) -> None:
    path = tmp_path / "staff.csv"
    path.write_bytes(("\ufeffemployee_id,full_name,citizen_id,date_of_birth,unit,title,phone,mail,aliases,disabled\r\n"
                      "X1,Trần Thị Thu Hà,074186004217,17/04/1986,Sở Tư pháp,Chuyên viên,0274 3873 963,"
                      "TTHA@x.gov.vn,a@x.gov.vn; b@x.gov.vn ttha@x.gov.vn,yes\r\n\r\n").encode())
    (record,) = read_source(source_for(path, kind="csv")).records
    assert fields(record) == {
        "source": "test", "dn": "csv:staff.csv:2", "kind": "person", "full_name": "Trần Thị Thu Hà", "uid": None,
        "mail": "ttha@x.gov.vn", "aliases": ("a@x.gov.vn", "b@x.gov.vn"), "title": "Chuyên viên",
        "phones": ("0274 3873 963",), "mobiles": (), "unit": "Sở Tư pháp", "employee_id": "X1",
        "citizen_id": "074186004217", "birth_date": "1986-04-17", "disabled": True, "member_of": (), "members": (),
    }
    assert record.line == 2


def test_digest(tmp_path: Path, example_dir: Path) -> None:
    text = (example_dir / "sources/hcm/directory.ldif").read_text("ascii")
    path = tmp_path / "d.ldif"
    path.write_text(text, "ascii")
    first = read_source(source_for(path)).digest
    assert read_source(source_for(path)).digest == first
    assert len(first) == 64 and int(first, 16) >= 0
    path.write_text("# a comment moves every line, the data stays\n" + text, "ascii")
    assert read_source(source_for(path)).digest == first
    path.write_text(text.replace("mail: annv@hcm.gov.vn", "mail: annw@hcm.gov.vn", 1), "ascii")
    assert read_source(source_for(path)).digest != first


PERSON = "dn: uid=a,dc=t\nobjectClass: inetOrgPerson\nuid: a\ncn: A\nmail: a@t.vn\n"


@pytest.mark.parametrize(("name", "text", "preset", "overrides", "message"), [
    ("malformed line", "dn: uid=a,dc=t\nobjectClass inetOrgPerson\n", "openldap", (),
     "{path}, line 2: expected 'attribute: value', found 'objectClass inetOrgPerson'"),
    ("change record", "dn: uid=a,dc=t\nchangetype: add\ncn: A\n", "openldap", (),
     "{path}, line 2: 'uid=a,dc=t' is a change record (changetype: add); export the directory's content "
     "(ldapsearch / slapcat output), not changes"),
    ("duplicate DN", PERSON + "\n" + PERSON.replace("uid=a,dc=t", "UID=A , dc = T"), "openldap", (),
     "{path}, line 7: duplicate DN 'UID=A , dc = T' (also at line 1)"),
    ("no name", "dn: uid=a,dc=t\nobjectClass: inetOrgPerson\nuid: a\n", "openldap", (),
     "{path}, line 1: 'uid=a,dc=t': a person entry without a name (no cn)"),
    ("no name, AD", "dn: CN=a,DC=t\nobjectClass: user\nsAMAccountName: a\n", "ad", (),
     "{path}, line 1: 'CN=a,DC=t': a person entry without a name (no displayName or cn)"),
    ("invalid address", PERSON + "mail: an nguyen@t.vn\n", "openldap", (),
     "{path}, line 1: 'uid=a,dc=t': mail: 'an nguyen@t.vn' is not a valid address"),
    ("invalid proxy address", PERSON + "proxyAddresses: SMTP:a@\n", "ad", (),
     "{path}, line 1: 'uid=a,dc=t': proxyAddresses: 'SMTP:a@' is not a valid address"),
    ("bad userAccountControl", "dn: CN=a,DC=t\nobjectClass: user\ncn: a\nuserAccountControl: x\n", "ad", (),
     "{path}, line 1: 'CN=a,DC=t': userAccountControl: 'x' is not a number"),
    ("unknown override", PERSON, "openldap", (("mial", "mail"),),
     f"source test: directory.attributes: unknown field 'mial' (known: {', '.join(FIELDS)})"),
    ("bad override", PERSON, "openldap", (("unit", "ou;x"),),
     "source test: directory.attributes: 'unit': 'ou;x' is not an attribute name (or names separated by commas)"),
])
def test_bad_ldif(tmp_path: Path, name: str, text: str, preset: str, overrides: tuple[tuple[str, str], ...],
                  message: str) -> None:
    path = tmp_path / "bad.ldif"
    path.write_text(text, "utf-8")
    with pytest.raises(SourceError) as caught:
        read_source(source_for(path, preset, attributes=overrides))
    assert str(caught.value) == message.format(path=path)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("missing column", "employee_id,full_name,citizen_id,date_of_birth,unit,title\n",
     "{path}, line 1: missing column 'phone'"),
    ("unknown column", HR_HEADER.replace("phone", "phone,email"),
     "{path}, line 1: unknown column 'email' (known: employee_id, full_name, citizen_id, date_of_birth, unit, "
     "title, phone, mail, aliases, mobile, disabled)"),
    ("no header", "", "{path}: a header line is required (employee_id, full_name, citizen_id, date_of_birth, unit, "
     "title, phone)"),
    ("bad date", HR_HEADER + 'X1,"Trần\nThị Hà",0,1986-04-17,,,\nX2,B,0,31/02/1990,,,\n',
     "{path}, line 4: date_of_birth: '31/02/1990' is not a date (write 1986-04-17 or 17/04/1986)"),
    ("short row", HR_HEADER + "X1,A,0\n", "{path}, line 2: 3 fields, the header has 7"),
    ("duplicate employee", HR_HEADER + "X1,A,0,,,,\nX1,B,0,,,,\n", "{path}, line 3: employee_id X1 is also on line 2"),
    ("not UTF-8", HR_HEADER + "X1,Tr\xe2n,0,,,,\n", "{path}, line 2: not UTF-8 text"),
])
def test_bad_hr_csv(tmp_path: Path, name: str, text: str, message: str) -> None:
    ldif, hr = tmp_path / "d.ldif", tmp_path / "hr.csv"
    ldif.write_text(PERSON, "utf-8")
    hr.write_bytes(text.encode("latin-1") if name == "not UTF-8" else text.encode())
    with pytest.raises(SourceError) as caught:
        read_source(source_for(ldif, hr_csv=hr))
    assert str(caught.value) == message.format(path=hr)


def test_bad_csv_directory(tmp_path: Path) -> None:
    path = tmp_path / "staff.csv"
    path.write_text(HR_HEADER + "X1,,0,,,,\n", "utf-8")
    with pytest.raises(SourceError) as caught:
        read_source(source_for(path, kind="csv"))
    assert str(caught.value) == f"{path}, line 2: a person without a name (full_name is empty)"
    path.write_text(HR_HEADER.replace("phone", "phone,disabled") + "X1,A,0,,,,,maybe\n", "utf-8")
    with pytest.raises(SourceError) as caught:
        read_source(source_for(path, kind="csv"))
    assert str(caught.value) == f"{path}, line 2: disabled: 'maybe' is not true/false, yes/no or 1/0"


@pytest.mark.parametrize("what", ["missing", "folder", "not UTF-8"])
def test_unreadable_ldif(tmp_path: Path, what: str) -> None:
    path = tmp_path / "d.ldif"
    if what == "folder":
        path.mkdir()
    elif what == "not UTF-8":
        path.write_bytes(PERSON.encode() + b"description: \xff\n")
    with pytest.raises(SourceError) as caught:
        read_source(source_for(path))
    assert str(caught.value) == {
        "missing": f"{path}: cannot read: No such file or directory",
        "folder": f"{path}: cannot read: Is a directory",
        "not UTF-8": f"{path}, line 6: not UTF-8 text",
    }[what]


# --- LDAP ----------------------------------------------------------------------------------------

PAGED_BASE = f"ou=Sở Tài chính,{OLD_SUFFIX}"
READER = f"cn=reader,{OLD_SUFFIX}"
PEOPLE = 1200
SIZE_LIMIT = 100


def paged_ldif() -> str:
    """Return 1,200 OpenLDAP-shaped people in three sub-units, and two groups, under PAGED_BASE."""
    entries = [format_entry(PAGED_BASE, (("objectClass", ("organizationalUnit",)), ("ou", ("Sở Tài chính",))))]
    units = ("Phòng Ngân sách", "Phòng Kế hoạch", "Văn phòng Sở")
    entries += [format_entry(f"ou={u},{PAGED_BASE}", (("objectClass", ("organizationalUnit",)), ("ou", (u,))))
                for u in units]
    for i in range(PEOPLE):
        entries.append(format_entry(f"uid=cv{i:04d},ou={units[i % 3]},{PAGED_BASE}", (
            ("objectClass", ("inetOrgPerson", "inetLocalMailRecipient")), ("uid", (f"cv{i:04d}",)),
            ("cn", (f"Nguyễn Văn Cường {i}",)), ("sn", ("Nguyễn",)),
            ("mail", (f"cv{i:04d}@binhduong.gov.vn",)), ("mailLocalAddress", (f"cv{i:04d}@sotc.binhduong.gov.vn",)),
            ("telephoneNumber", ("0274 3822 100",)), ("employeeNumber", (f"BD{i:06d}",)))))
    entries.append(format_entry(f"cn=lanhdao,{PAGED_BASE}", (
        ("objectClass", ("groupOfNames",)), ("cn", ("lanhdao",)),
        ("member", (f"uid=cv0000,ou={units[0]},{PAGED_BASE}", f"uid=cv0004,ou={units[1]},{PAGED_BASE}")))))
    entries.append(format_entry(f"cn=ketoan,{PAGED_BASE}", (
        ("objectClass", ("posixGroup",)), ("cn", ("ketoan",)), ("gidNumber", ("5000",)),
        ("memberUid", ("cv1199", "cv0002")))))
    return "".join(entries)


@pytest.fixture(scope="module")
def paged_slapd() -> Iterator[SlapdServer]:
    """A private slapd with PAGED_BASE full of people, a reader account, and a size limit of 100."""
    reader = f"dn: {READER}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: reader\n" \
             "userPassword: reader-secret\n\n"
    # Its own instance, seeded offline by slapadd (fast), so the size limit touches no other test.
    server = SlapdServer((OLD_SUFFIX,), seed_ldif=reader + paged_ldif())
    try:
        server.start()
    except ServerNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        config = ldap3.Connection(ldap3.Server(server.url, get_info=ldap3.NONE), server.config_dn,
                                  server.admin_password, auto_bind=True)
        config.search("cn=config", f"(olcSuffix={OLD_SUFFIX})", attributes=["1.1"])
        # Like AD's MaxPageSize: a plain search stops at 100, a paged one may go on (prtotal).
        limit = f"size.soft={SIZE_LIMIT} size.hard={SIZE_LIMIT} size.prtotal=unlimited"
        assert config.modify(config.response[0]["dn"], {"olcSizeLimit": [(ldap3.MODIFY_REPLACE, [limit])]})
        config.unbind()
        yield server
    finally:
        server.stop()


def ldap_source(server: SlapdServer, bind_dn: str | None = READER, port: int | None = None) -> Source:
    """Return a source that reads PAGED_BASE from the server, password from MMG_TEST_READER_PASSWORD."""
    url = f"ldap://127.0.0.1:{port or server.port}"
    ldap = LdapServer(url=url, base_dn=PAGED_BASE, bind_dn=bind_dn, password=Secret(env="MMG_TEST_READER_PASSWORD"),
                      timeout=5)
    return Source("binhduong", "Tỉnh Bình Dương", "74", ("binhduong.gov.vn",), DirectoryConfig(kind="ldap", ldap=ldap))


def test_ldap_paged_search_reads_past_the_size_limit(paged_slapd: SlapdServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMG_TEST_READER_PASSWORD", "reader-secret")
    plain = ldap3.Connection(ldap3.Server(paged_slapd.url, get_info=ldap3.NONE), READER, "reader-secret",
                             auto_bind=True)
    plain.search(PAGED_BASE, "(objectClass=inetOrgPerson)", attributes=["uid"])
    assert (plain.result["description"], len(plain.response)) == ("sizeLimitExceeded", SIZE_LIMIT)
    plain.unbind()

    read = read_source(ldap_source(paged_slapd))
    assert (len(read.people), len(read.groups)) == (PEOPLE, 2)
    path = tmp_path / "same.ldif"
    path.write_text(paged_ldif(), "utf-8")
    from_file = read_source(dataclasses.replace(ldap_source(paged_slapd),
                                                directory=DirectoryConfig(kind="ldif", path=path)))
    assert [dataclasses.replace(r, line=None) for r in from_file.records] == list(read.records)
    assert read.digest == from_file.digest
    person = by(read.people, uid="cv1199")
    assert (person.unit, person.aliases, person.member_of) == (
        "Văn phòng Sở", ("cv1199@sotc.binhduong.gov.vn",), (f"cn=ketoan,{PAGED_BASE}",))


def test_ldap_paged_search_never_returns_part_of_a_directory(paged_slapd: SlapdServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A server whose limit also caps paged searches: an error, never 100 people taken for the whole
    monkeypatch.setenv("MMG_TEST_READER_PASSWORD", "reader-secret")
    config = ldap3.Connection(ldap3.Server(paged_slapd.url, get_info=ldap3.NONE), paged_slapd.config_dn,
                              paged_slapd.admin_password, auto_bind=True)
    config.search("cn=config", f"(olcSuffix={OLD_SUFFIX})", attributes=["olcSizeLimit"])
    dn, before = config.response[0]["dn"], config.response[0]["raw_attributes"]["olcSizeLimit"]
    assert config.modify(dn, {"olcSizeLimit": [(ldap3.MODIFY_REPLACE, [f"size.hard={SIZE_LIMIT}"])]})
    try:
        with pytest.raises(SourceError) as caught:
            read_source(ldap_source(paged_slapd))
    finally:
        config.modify(dn, {"olcSizeLimit": [(ldap3.MODIFY_REPLACE, before)]})
        config.unbind()
    assert str(caught.value) == f"{paged_slapd.url}: search of '{PAGED_BASE}' failed: sizeLimitExceeded"


def test_ldap_errors(paged_slapd: SlapdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMG_TEST_READER_PASSWORD", "wrong-password")
    with pytest.raises(SourceError) as caught:
        read_source(ldap_source(paged_slapd))
    assert str(caught.value) == f"{paged_slapd.url}: bind as {READER} failed: invalidCredentials"
    assert "wrong-password" not in str(caught.value)
    port = free_port()
    with pytest.raises(SourceError) as caught:
        read_source(ldap_source(paged_slapd, port=port))
    assert str(caught.value) == f"ldap://127.0.0.1:{port}: cannot connect: connection refused"
    monkeypatch.delenv("MMG_TEST_READER_PASSWORD")
    with pytest.raises(SourceError) as caught:
        read_source(ldap_source(paged_slapd))
    assert str(caught.value) == (f"{paged_slapd.url}: cannot read the bind password: "
                                 "environment variable MMG_TEST_READER_PASSWORD is not set")
