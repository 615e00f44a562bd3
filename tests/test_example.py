"""The bundled example (examples/hcm-merger) is what the generator makes and holds the deliberate cases."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate_example.py"
EXAMPLE = ROOT / "examples" / "hcm-merger"
SOURCES = EXAMPLE / "sources"
LDIFS = {s: SOURCES / s / "directory.ldif" for s in ("hcm", "binhduong", "baria-vungtau")}
# <epoch>.M<n>P<k>.<host>,S=<size> plus ":2,<flags>" in cur/ (flags in ASCII order), none in new/
MAILDIR_NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)\.example,S=(\d+)(?::2,([A-Z]*))?$")
TZ = timezone(timedelta(hours=7))


def generated_files(root: Path) -> dict[str, bytes]:
    """Return the files the generator owns under an example directory, by relative path."""
    paths = [p for p in (root / "sources").rglob("*") if p.is_file()]
    paths += [root / "structure.csv", root / "MANIFEST.json"]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths}


def run_generator(out: Path, *args: str) -> None:
    """Run the generator script into out."""
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], check=True, capture_output=True)


def parse_ldif(path: Path) -> list[dict[str, list[str]]]:
    """Return the entries of an LDIF file as attribute -> values (dn included), values decoded."""
    text = path.read_text("ascii")
    entries = []
    for block in text.split("\n\n"):
        lines = [line for line in block.replace("\n ", "").splitlines() if not line.startswith("#")]
        entry: dict[str, list[str]] = {}
        for line in lines:
            attr, _, value = line.partition(":")
            if value.startswith(":"):
                value = base64.b64decode(value[1:].strip(), validate=True).decode("utf-8")
            else:
                value = value.strip()
            entry.setdefault(attr, []).append(value)
        if entry:
            entries.append(entry)
    return entries


GROUP_CLASSES = {"groupOfNames", "group", "zimbraDistributionList"}


def people(source: str) -> list[dict[str, list[str]]]:
    """Return the account entries of one source's LDIF (groups with an address left out)."""
    return [e for e in parse_ldif(LDIFS[source]) if "mail" in e and not GROUP_CLASSES & set(e["objectClass"])]


def groups(source: str) -> list[dict[str, list[str]]]:
    """Return the group entries of one source's LDIF."""
    return [e for e in parse_ldif(LDIFS[source]) if GROUP_CLASSES & set(e["objectClass"])]


def message_files() -> list[Path]:
    """Return every Maildir message file of the example."""
    return sorted(p for p in SOURCES.glob("*/mail/*/**/*") if p.is_file() and p.parent.name in ("cur", "new"))


def hr_rows() -> list[dict[str, str]]:
    """Return Bình Dương's HR export as dicts."""
    return list(csv.DictReader(io.StringIO((SOURCES / "binhduong" / "hr.csv").read_text("utf-8-sig"))))


def test_default_seed_reproduces_the_committed_example(tmp_path: Path) -> None:
    run_generator(tmp_path)
    made, committed = generated_files(tmp_path), generated_files(EXAMPLE)
    assert sorted(made) == sorted(committed)
    assert [p for p in made if made[p] != committed[p]] == []
    manifest = json.loads(committed["MANIFEST.json"])
    assert sorted(manifest["files"]) == sorted(p for p in made if p != "MANIFEST.json")


def test_another_seed_gives_another_example(tmp_path: Path) -> None:
    run_generator(tmp_path, "--seed", "7")
    made, committed = generated_files(tmp_path), generated_files(EXAMPLE)
    for source in LDIFS:
        path = f"sources/{source}/directory.ldif"
        assert made[path] != committed[path]
    assert made["structure.csv"] == committed["structure.csv"]  # the unit mapping does not depend on the seed


def test_ldif_files_follow_rfc_2849() -> None:
    for source, path in LDIFS.items():
        raw = path.read_bytes()
        assert raw.isascii(), source  # non-ASCII values must be base64 ("attr:: ...")
        lines = raw.decode().splitlines()
        assert lines[0].startswith("# ")
        assert max(map(len, lines)) <= 76
        entries = parse_ldif(path)
        assert all(list(e)[0] == "dn" and len(e["dn"]) == 1 for e in entries)
        assert len({e["dn"][0] for e in entries}) == len(entries)


def test_maildir_file_names_carry_the_internal_date() -> None:
    files = message_files()
    assert files
    for path in files:
        match = MAILDIR_NAME.match(path.name)
        assert match, path
        epoch, size, flags = int(match[1]), int(match[4]), match[5]
        assert datetime.fromtimestamp(epoch, TZ).year in (2024, 2025)
        assert size == path.stat().st_size
        assert (flags is None) == (path.parent.name == "new")
        assert flags is None or (list(flags) == sorted(set(flags)) and set(flags) <= set("DFPRST"))
        assert b"\r" not in path.read_bytes()


def test_maildir_folders_use_dovecot_modified_utf7_names() -> None:
    boxes = sorted(SOURCES.glob("*/mail/*"))
    names = {p.name for box in boxes for p in box.iterdir() if p.name.startswith(".")}
    assert {".V&AQM-n b&HqM-n &AREevw-n", ".V&AQM-n b&HqM-n &AREevw-n.2024", ".V&AQM-n b&HqM-n &ARE-i",
            ".Th&AbA- &AREA4w- g&Hu0-i", ".Sent", ".Drafts", ".Trash"} <= names
    assert all((box / name / "maildirfolder").is_file() for box in boxes for name in names if (box / name).is_dir())


def test_manifest_counts() -> None:
    counts = json.loads((EXAMPLE / "MANIFEST.json").read_text("utf-8"))["sources"]
    keys = ("people", "role_accounts", "groups", "disabled", "without_unit", "units", "mailboxes", "role_mailboxes",
            "folders", "messages", "duplicates", "without_message_id", "raw_8bit_headers")
    assert {s: [c[k] for k in keys] for s, c in counts.items()} == {
        "hcm": [300, 4, 3, 6, 2, 18, 13, 1, 107, 394, 2, 20, 17],
        "binhduong": [250, 3, 3, 6, 2, 17, 10, 0, 85, 223, 2, 11, 9],
        "baria-vungtau": [220, 3, 2, 7, 2, 17, 8, 0, 66, 218, 1, 10, 9],
    }
    assert counts["binhduong"]["hr_rows"] == 252
    for source, c in counts.items():
        assert len(people(source)) == c["people"] + c["role_accounts"]
        assert len(groups(source)) == c["groups"]
        assert len(list(SOURCES.glob(f"{source}/mail/*"))) == c["mailboxes"]
        assert sum(1 for p in message_files() if p.parts[len(SOURCES.parts)] == source) == c["messages"]


def test_the_same_official_is_in_two_sources() -> None:
    (zimbra,) = [e for e in people("baria-vungtau") if e["uid"] == ["tttha"]]
    (ad,) = [e for e in people("binhduong") if e["mail"] == ["ha.tranthithu@binhduong.gov.vn"]]
    (hr,) = [r for r in hr_rows() if r["employee_id"] == ad["employeeID"][0]]
    assert hr["citizen_id"] == zimbra["employeeNumber"][0] == "074186004217"
    assert hr["full_name"] == zimbra["cn"][0] == ad["displayName"][0] == "Trần Thị Thu Hà"
    assert hr["date_of_birth"] == "1986-04-17"
    assert (SOURCES / "binhduong/mail/ha.tranthithu@binhduong.gov.vn").is_dir()
    assert (SOURCES / "baria-vungtau/mail/tttha@baria-vungtau.gov.vn").is_dir()


def test_name_collisions_get_numbered_old_addresses() -> None:
    def named_an(source: str) -> set[str]:
        return {e["mail"][0] for e in people(source) if unicodedata.normalize("NFC", e["cn"][0]) == "Nguyễn Văn An"}

    assert {"annv@hcm.gov.vn", "annv2@hcm.gov.vn", "annv3@hcm.gov.vn"} <= named_an("hcm")
    assert {"an.nguyenvan@binhduong.gov.vn", "an.nguyenvan2@binhduong.gov.vn"} <= named_an("binhduong")
    assert "nvan@baria-vungtau.gov.vn" in named_an("baria-vungtau")
    ad_rdns = [e["dn"][0].split(",", 1) for e in people("binhduong")]
    assert len({tuple(r) for r in ad_rdns}) == len(ad_rdns)  # same-OU namesakes got distinct CNs


def test_each_preset_disables_accounts_its_own_way() -> None:
    assert sum("pwdAccountLockedTime" in e for e in people("hcm")) == 6
    uac = Counter(e["userAccountControl"][0] for e in people("binhduong"))
    assert uac["514"] == 5 and uac["66050"] == 1 and uac["512"] > 200
    status = Counter(e["zimbraAccountStatus"][0] for e in people("baria-vungtau"))
    assert (status["locked"], status["closed"]) == (3, 4)


def test_groups_in_each_preset_shape() -> None:
    hcm = {e["dn"][0] for e in people("hcm")}
    assert {g["cn"][0]: len(g["member"]) for g in groups("hcm")} == {
        "quantri-thu": 4, "lanhdao-so-tai-chinh": 3, "ketoan": 4}
    assert all(set(g["member"]) <= hcm for g in groups("hcm"))
    # AD keeps both directions: member on the group, memberOf on each member
    ad_members = {(m, g["dn"][0]) for g in groups("binhduong") for m in g["member"]}
    assert ad_members == {(e["dn"][0], g) for e in people("binhduong") for g in e.get("memberOf", [])}
    assert len(ad_members) == 9
    # Zimbra lists members by address: accounts (one by an old alias) and one outside address
    addresses = {a for e in people("baria-vungtau") for a in e["mail"]}
    forwards = [a for g in groups("baria-vungtau") for a in g["zimbraMailForwardingAddress"]]
    assert [a for a in forwards if a not in addresses] == ["hotro.thudientu@vnpt.vn"]
    assert sum(a.endswith("@brvt.gov.vn") for a in forwards) == 2


def test_accounts_without_a_unit() -> None:
    assert sum("ou" not in e and e["dn"][0].count(",") == 3 for e in people("hcm")) == 2
    assert sum(e["dn"][0].endswith(",CN=Users,DC=binhduong,DC=gov,DC=vn") and "department" not in e
               for e in people("binhduong")) == 2
    assert sum("ou" not in e for e in people("baria-vungtau")) == 2


def test_role_mailboxes() -> None:
    roles = {e["mail"][0] for s in LDIFS for e in people(s) if e.get("description") == ["Hộp thư chức năng"]}
    assert {"vanthu@hcm.gov.vn", "postmaster@hcm.gov.vn", "tiepdan@hcm.gov.vn", "sotaichinh@hcm.gov.vn",
            "vanthu@binhduong.gov.vn", "tiepdan@baria-vungtau.gov.vn"} <= roles
    assert (SOURCES / "hcm/mail/vanthu@hcm.gov.vn/cur").is_dir()


def test_dirty_names() -> None:
    names = {s: [e["cn"][0] for e in people(s)] for s in LDIFS}
    assert "Lê  Văn Tám" in names["hcm"]
    assert "Tôn Nữ Thị Lan" in names["hcm"] and "Tôn Thất Quang" in names["binhduong"]
    brvt = names["baria-vungtau"]
    assert sum(n != unicodedata.normalize("NFC", n) for n in brvt) == 4
    assert sum(n.isupper() for n in brvt) == 5


def test_dirty_messages() -> None:
    files = message_files()
    heads = [p.read_bytes().split(b"\n\n", 1)[0] for p in files]
    assert any(b"\nMessage-ID:" not in h for h in heads)
    assert any(not h.isascii() for h in heads)  # raw 8-bit UTF-8 header
    assert sum(b"=?UTF-8?B?" in h for h in heads) > len(heads) / 2
    assert any(b"multipart/mixed" in h for h in heads)
    by_folder = Counter((p.parent.parent, p.read_bytes()) for p in files)
    assert max(by_folder.values()) == 2  # exact duplicates within one folder


def test_hr_export_mismatches() -> None:
    raw = (SOURCES / "binhduong" / "hr.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # as saved for Excel
    rows = hr_rows()
    ad_ids = {e["employeeID"][0] for e in people("binhduong") if "employeeID" in e}
    assert len([r for r in rows if r["employee_id"] not in ad_ids]) == 2
    assert any(" " in r["phone"] for r in rows)
    assert all(re.fullmatch(r"\d{12}", r["citizen_id"]) for r in rows)


def test_structure_file() -> None:
    rows = list(csv.DictReader(io.StringIO((EXAMPLE / "structure.csv").read_text("utf-8"))))
    assert [r["old_code"] for r in rows[:3]] == ["79", "74", "77"]
    by_unit = {(r["source"], r["old_unit"]): r for r in rows}
    assert by_unit["binhduong", "Sở Tài chính tỉnh Bình Dương"]["new_code"] == "79.STC"
    assert by_unit["hcm", "UBND Phường Bến Nghé"]["new_name"] == "UBND Phường Sài Gòn"
    assert by_unit["binhduong", "Ban Quản lý các Khu công nghiệp Bình Dương"]["status"] == "needs review"
    units_in_ldif = {(s, v) for s in LDIFS for e in people(s) for v in e.get("ou", []) + e.get("department", [])}
    assert units_in_ldif <= set(by_unit)


def test_ward_table_matches_vietnam_provinces() -> None:
    import vietnam_provinces as vp  # a runtime dependency: a missing one must fail, not skip
    from vietnam_provinces._ward_conversion_2025 import OLD_TO_NEW
    from vietnam_provinces.legacy import Ward as LegacyWard

    spec = importlib.util.spec_from_file_location("generate_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    legacy = {w.code.value: w for w in LegacyWard.iter_all()}
    for wards in module.WARDS.values():
        for code, name, _district, partly, targets in wards:
            assert legacy[code].name == name
            entry = OLD_TO_NEW[code]
            assert entry.old_ward.is_partly_merged == partly
            assert tuple((n.code, vp.Ward.from_code(vp.WardCode(n.code)).name) for n in entry.new_wards) == targets
