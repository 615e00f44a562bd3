"""The unit mapping file: the example loads, old units match in order, mistakes name the line, drafts load."""

import csv
from pathlib import Path

import pytest

from mailmerge_gov.config import Config, load_config
from mailmerge_gov.directory.model import NewUnit, Structure, UnitMapping
from mailmerge_gov.directory.draft import _partly_merged, draft_structure
from mailmerge_gov.directory.structure import StructureError, load_structure, map_unit, parse_dn, unit_path

HEADER = "source,old_unit,old_code,new_code,new_name,new_parent_code,status\n"
BASE = HEADER + (
    "hcm,Thành phố Hồ Chí Minh,79,79,Thành phố Hồ Chí Minh,,ok\n"
    "hcm,Sở Tài chính,79.STC,79.STC,Sở Tài chính,79,ok\n"
    "binhduong,Sở Tài chính tỉnh Bình Dương,74.STC,79.STC,Sở Tài chính,,ok\n"
)


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(Path(__file__).resolve().parent.parent / "examples/hcm-merger/consolidation.toml")


@pytest.fixture(scope="module")
def example(config: Config) -> Structure:
    return load_structure(config.directory.structure, config)


def example_departments(config: Config) -> dict[str, list[str]]:
    """Return the departments the example's sources have, as the directory readers would list them."""
    with open(config.directory.structure, encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    departments: dict[str, list[str]] = {}
    for row in rows:
        if "." in row["old_code"]:
            departments.setdefault(row["source"], []).append(row["old_unit"])
    return departments


@pytest.fixture(scope="module")
def draft(config: Config) -> str:
    return draft_structure("79", config, example_departments(config))


# --- the example ---------------------------------------------------------------------------------


def test_example_loads(example: Structure) -> None:
    assert (len(example.units), len(example.mappings)) == (32, 55)
    assert len([m for m in example.mappings if m.status == "needs review"]) == 7
    assert example.units[0] == NewUnit("79", "Thành phố Hồ Chí Minh", None)
    assert unit_path(example, "26740") == (
        NewUnit("79", "Thành phố Hồ Chí Minh", None), NewUnit("26740", "UBND Phường Sài Gòn", "79"))


def test_needs_review_keeps_the_proposal_apart(example: Structure) -> None:
    long_son = map_unit(example, "baria-vungtau", "UBND Xã Long Sơn")
    assert long_son == UnitMapping("baria-vungtau", "UBND Xã Long Sơn", "26545", None, "needs review", 51,
                                   proposed_code="26545")
    assert example.unit("26545") == NewUnit("26545", "UBND Xã Long Sơn", "79")
    assert map_unit(example, "hcm", "UBND Phường 4 Quận 3").proposed_code is None


def test_bom_and_crlf_are_accepted(tmp_path: Path, config: Config) -> None:
    path = tmp_path / "structure.csv"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.replace("\n", "\r\n").encode())
    structure = load_structure(path, config)
    assert [u.code for u in structure.units] == ["79", "79.STC"]
    assert [(m.source, m.new_code, m.line) for m in structure.mappings] == [
        ("hcm", "79", 2), ("hcm", "79.STC", 3), ("binhduong", "79.STC", 4)]


# --- matching ------------------------------------------------------------------------------------

MATCHES = [
    pytest.param("binhduong", "Sở Tài chính tỉnh Bình Dương", 23, id="exact-name"),
    pytest.param("binhduong", "74.SYT", 26, id="exact-code"),
    pytest.param("binhduong", "SỞ TÀI CHÍNH TỈNH  BÌNH DƯƠNG", 23, id="folded-upper-case"),
    pytest.param("binhduong", "So Tai chinh tinh Binh Duong", 23, id="folded-no-diacritics"),
    pytest.param("binhduong", "So Ta\u0300i chi\u0301nh ti\u0309nh Bi\u0300nh Dương", 23, id="folded-nfd"),
    pytest.param("binhduong", "74.syt", 26, id="folded-code"),
    pytest.param("binhduong", "OU=Sở Y tế tỉnh Bình Dương,DC=binhduong,DC=gov,DC=vn", 26, id="dn-to-name"),
    pytest.param("binhduong", r"OU=S\E1\BB\9F Y t\E1\BA\BF t\E1\BB\89nh B\C3\ACnh D\C6\B0\C6\A1ng,DC=vn", 26,
                 id="dn-hex-escaped"),
    pytest.param("baria-vungtau", "ou=so y te,dc=baria-vungtau,dc=gov,dc=vn", 43, id="dn-folded"),
    pytest.param("hcm", "Sở Tài chính tỉnh Bình Dương", None, id="other-source"),
    pytest.param("binhduong", "Sở Tài chính", None, id="unknown"),
    pytest.param("binhduong", "", None, id="empty"),
    pytest.param("binhduong", None, None, id="none"),
]


@pytest.mark.parametrize(("source", "unit", "line"), MATCHES)
def test_map_unit(example: Structure, source: str, unit: str | None, line: int | None) -> None:
    found = map_unit(example, source, unit)
    assert (found.line if found else None) == line


def review(old_unit: str, old_code: str, line: int) -> UnitMapping:
    return UnitMapping("hcm", old_unit, old_code, None, "needs review", line)


# Two old wards whose names differ only in a mark, and a line written as a DN.
TAN_QUY = Structure(
    units=(NewUnit("79", "Thành phố Hồ Chí Minh"),),
    mappings=(review("UBND Phường Tân Quý", "27019", 2), review("UBND Phường Tân Quy", "27481", 3),
              review("ou=Sở Y tế,dc=hcm,dc=gov,dc=vn", "79.SYT", 4), review("27019", "79.X", 5)),
)


@pytest.mark.parametrize(("unit", "line"), [
    pytest.param("UBND Phường Tân Quý", 2, id="exact-beats-folded"),
    pytest.param("UBND Phường Tân Quy", 3, id="exact-other-mark"),
    pytest.param("UBND PHƯỜNG TÂN QUÝ", None, id="folded-ambiguous-is-no-match"),
    pytest.param("27019", 5, id="exact-name-beats-exact-code"),
    pytest.param("27481", 3, id="code"),
    pytest.param("sở y tế", 4, id="name-to-dn-line"),
    pytest.param("OU=Sở Y tế, DC=hcm, DC=gov, DC=vn", 4, id="dn-spacing-and-case"),
])
def test_match_order(unit: str, line: int | None) -> None:
    found = map_unit(TAN_QUY, "hcm", unit)
    assert (found.line if found else None) == line


def test_parse_dn() -> None:
    assert parse_dn(r"ou=Sở Y tế\, Dân số+l=HCM , dc=vn") == ((("ou", "Sở Y tế, Dân số"), ("l", "HCM")), (("dc", "vn"),))
    assert parse_dn("Sở Y tế") is None
    assert parse_dn("Phòng A = B") is None


def test_unit_path_unknown_code(example: Structure) -> None:
    with pytest.raises(KeyError):
        unit_path(example, "99999")


# --- errors --------------------------------------------------------------------------------------

# (lines appended to BASE, or a replaced header, expected message after "<file>, line ")
CSV_ERRORS = [
    pytest.param("dongnai,Sở Y tế,75.SYT,79.SYT,Sở Y tế,79,ok\n",
                 "5: unknown source 'dongnai'; the sources are hcm, binhduong, baria-vungtau", id="unknown-source"),
    pytest.param("hcm,Phòng Kế toán,79.PKT,79.PKT,Phòng Kế toán,79.SXX,ok\n",
                 "5: new_parent_code '79.SXX' is not a new unit: no line has it as new_code", id="unknown-parent"),
    pytest.param("hcm,Sở Y tế,79.SYT,79.SYT,Sở Y tế,79,done\n",
                 "5: unknown status 'done'; use 'ok' or 'needs review'", id="bad-status"),
    pytest.param("hcm,Sở Y tế,79.SYT,,,,ok\n",
                 "5: status 'ok' needs a new_code (write 'needs review' until the new unit is known)",
                 id="ok-without-new-code"),
    pytest.param("hcm,Sở Y tế,79.SYT,,Sở Y tế,,needs review\n",
                 "5: new_name or new_parent_code is given but new_code is empty", id="name-without-code"),
    pytest.param("hcm,Sở Y tế,79.SYT,79.SYT,,79,ok\n", "5: new unit 79.SYT has no new_name", id="code-without-name"),
    pytest.param("hcm,,,,,,needs review\n", "5: names no old unit: give old_unit or old_code", id="no-old-unit"),
    pytest.param("binhduong,Sở Tài chính tỉnh Bình Dương,74.STC2,79.STC,Sở Tài chính,79,ok\n",
                 "5: old unit 'Sở Tài chính tỉnh Bình Dương' of source binhduong is mapped twice (also on line 4)",
                 id="duplicate-mapping"),
    pytest.param("binhduong,Sở Tài chính Bình Dương,74.STC,79.STC,Sở Tài chính,79,ok\n",
                 "5: old code '74.STC' of source binhduong is mapped twice (also on line 4)", id="duplicate-code"),
    pytest.param("baria-vungtau,Sở Tài chính,77.STC,79.STC,Sở Tài chánh,79,ok\n",
                 "5: new unit 79.STC is named 'Sở Tài chánh' here but 'Sở Tài chính' on line 3",
                 id="conflicting-names"),
    pytest.param("hcm,Sở Y tế,79.SYT,79.SYT,Sở Y tế,79,ok\nbaria-vungtau,Sở Tài chính,77.STC,79.STC,Sở Tài chính,79.SYT,ok\n",
                 "6: new unit 79.STC has parent 79.SYT here but 79 on line 3", id="conflicting-parents"),
    pytest.param("hcm,Phòng A,79.A,79.A,Phòng A,79.B,ok\nhcm,Phòng B,79.B,79.B,Phòng B,79.A,ok\n",
                 "5: new unit 79.A is its own ancestor: 79.A → 79.B → 79.A", id="cycle"),
    pytest.param("hcm,Phòng A,79.A,79.A,Phòng A,79.A,ok\n",
                 "5: new unit 79.A is its own ancestor: 79.A → 79.A", id="own-parent"),
    pytest.param("baria-vungtau,Tỉnh Bà Rịa - Vũng Tàu,77,79,TP. Hồ Chí Minh,,ok\n",
                 "5: new unit 79 is the target, named 'Thành phố Hồ Chí Minh' in consolidation.toml, "
                 "but 'TP. Hồ Chí Minh' here", id="target-renamed"),
    pytest.param("baria-vungtau,Tỉnh Bà Rịa - Vũng Tàu,77,79,Thành phố Hồ Chí Minh,79,ok\n",
                 "5: new unit 79 is the target and cannot have a parent ('79' given)", id="target-with-parent"),
    pytest.param("hcm,Sở Y tế,79 SYT,79.SYT,Sở Y tế,79,ok\n",
                 "5: old_code '79 SYT' is not a unit code (letters, digits, '.', '-', '_')", id="bad-code"),
    pytest.param("hcm,Sở Y tế,79.SYT,79.SYT,Sở Y tế,79\n", "5: expected 7 fields, found 6", id="field-count"),
    pytest.param("\n,,,,,,\ndongnai,Sở Y tế,75.SYT,79.SYT,Sở Y tế,79,ok\n",
                 "7: unknown source 'dongnai'; the sources are hcm, binhduong, baria-vungtau",
                 id="blank-lines-counted"),
    pytest.param('hcm,"Sở Y tế\nDân số",79.SYT,79.SYT,Sở Y tế,79,ok\ndongnai,x,1,,,,needs review\n',
                 "7: unknown source 'dongnai'; the sources are hcm, binhduong, baria-vungtau",
                 id="quoted-line-break-counted"),
]


@pytest.mark.parametrize(("extra", "message"), CSV_ERRORS)
def test_csv_errors(tmp_path: Path, config: Config, extra: str, message: str) -> None:
    path = tmp_path / "structure.csv"
    path.write_text(BASE + extra, encoding="utf-8")
    with pytest.raises(StructureError) as caught:
        load_structure(path, config)
    assert str(caught.value) == f"{path}, line {message}"


@pytest.mark.parametrize(("text", "message"), [
    pytest.param(BASE.replace(",new_parent_code", "").replace(",,ok", ",ok").replace(",79,ok", ",ok"),
                 "1: missing column 'new_parent_code'; the header is "
                 "source,old_unit,old_code,new_code,new_name,new_parent_code,status", id="missing-column"),
    pytest.param(BASE.replace(",status", ",state"),
                 "1: unknown column 'state'; the header is "
                 "source,old_unit,old_code,new_code,new_name,new_parent_code,status", id="unknown-column"),
    pytest.param("", "1: the file is empty; the first line is the header "
                     "source,old_unit,old_code,new_code,new_name,new_parent_code,status", id="empty"),
])
def test_csv_header_errors(tmp_path: Path, config: Config, text: str, message: str) -> None:
    path = tmp_path / "structure.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(StructureError) as caught:
        load_structure(path, config)
    assert str(caught.value) == f"{path}, line {message}"


def test_file_errors(tmp_path: Path, config: Config) -> None:
    with pytest.raises(StructureError, match=r"structure\.xlsx: a unit mapping file is a \.csv or a \.toml file"):
        load_structure(tmp_path / "structure.xlsx", config)
    with pytest.raises(StructureError, match="cannot read the unit mapping file: No such file or directory"):
        load_structure(tmp_path / "missing.csv", config)
    path = tmp_path / "latin1.csv"
    path.write_bytes(HEADER.encode() + b"hcm,S\xf4 Y t\xea,,,,,needs review\n")  # Latin-1, from an old editor
    with pytest.raises(StructureError) as caught:
        load_structure(path, config)
    assert str(caught.value) == f"{path}, line 2: the file is not valid UTF-8"


# --- TOML ----------------------------------------------------------------------------------------

TOML = """\
# the new chart: every unit under the target (parent defaults to the target)
[[units]]
code = "79.STC"
name = "Sở Tài chính"

[[map]]
source = "hcm"
old_unit = "Sở Tài chính"
old_code = "79.STC"
new_code = "79.STC"

[[map]]
source = "binhduong"
old_unit = "Sở Tài chính tỉnh Bình Dương"
old_code = "74.STC"
new_code = "79.STC"
status = "ok"
"""


def test_toml_equals_csv(tmp_path: Path, config: Config) -> None:
    (tmp_path / "structure.toml").write_text(TOML, encoding="utf-8")
    (tmp_path / "structure.csv").write_text(BASE, encoding="utf-8")
    from_toml = load_structure(tmp_path / "structure.toml", config)
    from_csv = load_structure(tmp_path / "structure.csv", config)
    assert from_toml.units == from_csv.units
    assert [(m.line, m.new_code) for m in from_toml.mappings] == [(6, "79.STC"), (12, "79.STC")]
    assert map_unit(from_toml, "binhduong", "So Tai chinh tinh Binh Duong").old_code == "74.STC"


TOML_ERRORS = [
    pytest.param('source = "binhduong"', 'source = "dongnai"',
                 "13: map[2].source: unknown source 'dongnai'; the sources are hcm, binhduong, baria-vungtau",
                 id="unknown-source"),
    pytest.param('status = "ok"', 'status = "xong"',
                 "17: map[2].status: unknown status 'xong'; use 'ok' or 'needs review'", id="bad-status"),
    pytest.param('name = "Sở Tài chính"\n', 'name = "Sở Tài chính"\nparent = "79.SXX"\n',
                 "5: units[1].parent: parent '79.SXX' is not a unit: list it in [[units]]", id="unknown-parent"),
    pytest.param('new_code = "79.STC"\nstatus', 'new_code = "79.SYT"\nstatus',
                 "16: map[2].new_code: new_code '79.SYT' is not a unit: list it in [[units]]", id="unknown-unit"),
    pytest.param('source = "binhduong"\nold_unit = "Sở Tài chính tỉnh Bình Dương"', 'source = "hcm"\nold_unit = "Sở Tài chính"',
                 "14: map[2].old_unit: old unit 'Sở Tài chính' of source hcm is mapped twice (also on line 8)",
                 id="duplicate-mapping"),
    pytest.param('code = "79.STC"', 'code = 79', '3: units[1].code: write the value as a string ("79") so '
                 'leading zeros are kept', id="integer-code"),
    pytest.param('name = "Sở Tài chính"\n', 'name = "Sở Tài chính"\nnote = "x"\n',
                 "5: units[1].note: unknown key 'note'", id="unknown-key"),
    pytest.param('name = "Sở Tài chính"\n', 'name = "Sở Tài chính"\n\n[[units]]\ncode = "79.STC"\nname = "Sở TC"\n',
                 "7: units[2].code: unit 79.STC is listed twice (also on line 3)", id="unit-twice"),
    pytest.param('new_code = "79.STC"\n\n', 'new_code = "79.STC"\nstatus = "ok"\nstatus = "ok"\n\n',
                 "12: not valid TOML: Cannot overwrite a value", id="syntax"),
]


@pytest.mark.parametrize(("old", "new", "message"), TOML_ERRORS)
def test_toml_errors(tmp_path: Path, config: Config, old: str, new: str, message: str) -> None:
    path = tmp_path / "structure.toml"
    assert old in TOML
    path.write_text(TOML.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(StructureError) as caught:
        load_structure(path, config)
    assert str(caught.value) == f"{path}, line {message}"


# --- drafting ------------------------------------------------------------------------------------


def test_draft_head(draft: str) -> None:
    assert draft.splitlines()[:4] == [
        HEADER.strip(),
        "hcm,Thành phố Hồ Chí Minh,79,79,Thành phố Hồ Chí Minh,,ok",
        "binhduong,Tỉnh Bình Dương,74,79,Thành phố Hồ Chí Minh,,ok",
        "baria-vungtau,Tỉnh Bà Rịa - Vũng Tàu,77,79,Thành phố Hồ Chí Minh,,ok",
    ]
    assert (len(draft.splitlines()), draft.count(",needs review\n")) == (472, 62)


@pytest.mark.parametrize("line", [
    pytest.param("hcm,UBND Phường Bến Nghé,26740,26740,UBND Phường Sài Gòn,79,ok", id="ward-went-whole"),
    pytest.param("hcm,UBND Phường 4 Quận 3,27148,,,,needs review", id="numbered-ward-split"),
    pytest.param("hcm,UBND Phường Nguyễn Thái Bình,26746,,,,needs review", id="ward-split"),
    pytest.param("baria-vungtau,UBND Xã Long Sơn,26545,26545,UBND Xã Long Sơn,79,needs review", id="partly-merged"),
    pytest.param("hcm,UBND Phường 14 Quận Bình Thạnh,26935,,,,needs review", id="not-in-conversion-table"),
    pytest.param("hcm,UBND Phường Tân Quý Quận Tân Phú,27019,,,,needs review", id="same-folded-name"),
    pytest.param("hcm,Sở Tài chính,79.STC,79.STC,Sở Tài chính,79,ok", id="surviving-department"),
    pytest.param("binhduong,Sở Tài chính tỉnh Bình Dương,74.STC,79.STC,Sở Tài chính,79,ok", id="department"),
    pytest.param("baria-vungtau,Văn phòng UBND tỉnh,77.VPUBND,79.VPUBND,Văn phòng UBND Thành phố,79,ok",
                 id="abbreviation-kept-whole"),
    pytest.param("binhduong,Ban Quản lý các Khu công nghiệp Bình Dương,74.BQLKCN,,,,needs review",
                 id="unmatched-department"),
    pytest.param("baria-vungtau,Sở GD&ĐT,77.SGDDT,,,,needs review", id="abbreviated-name-unmatched"),
])
def test_draft_lines(draft: str, line: str) -> None:
    assert line in draft.splitlines()


def test_draft_has_every_ward_line_of_the_example(config: Config, draft: str) -> None:
    example = config.directory.structure.read_text(encoding="utf-8").splitlines()
    wards = [line for line in example if line.split(",")[2].isdigit() and len(line.split(",")[2]) == 5]
    assert len(wards) == 25
    assert set(wards) <= set(draft.splitlines())


def test_draft_loads(tmp_path: Path, config: Config, draft: str) -> None:
    path = tmp_path / "structure.csv"
    path.write_text(draft, encoding="utf-8")
    structure = load_structure(path, config)
    assert (len(structure.units), len(structure.mappings)) == (174, 471)
    assert len([m for m in structure.mappings if m.status == "needs review"]) == 62
    assert [u.name for u in unit_path(structure, "79.STC")] == ["Thành phố Hồ Chí Minh", "Sở Tài chính"]


def test_draft_is_deterministic(config: Config, draft: str) -> None:
    departments = {name: list(reversed(units)) for name, units in reversed(example_departments(config).items())}
    assert draft_structure("79", config, departments) == draft


def test_draft_keeps_codes_of_an_existing_file(config: Config, example: Structure) -> None:
    lines = draft_structure("79", config, example_departments(config), existing=example).splitlines()
    assert "binhduong,Thanh tra tỉnh Bình Dương,74.TTR,79.TTR,Thanh tra Thành phố,79,ok" in lines
    assert "hcm,Văn phòng UBND Thành phố,79.VPUB,79.VPUB,Văn phòng UBND Thành phố,79,ok" in lines


def test_draft_code_collisions(config: Config) -> None:
    departments = {"hcm": ["Ban Đào tạo", "Ban Dân tộc", "UBND Phường Bến Nghé", "Thành phố Hồ Chí Minh"],
                   "binhduong": ["Ban Dân tộc tỉnh Bình Dương", "ou=Ban Đào tạo Bình Dương,dc=binhduong,dc=gov,dc=vn"]}
    lines = [line for line in draft_structure("79", config, departments).splitlines() if ",Ban " in line]
    assert lines == [
        "hcm,Ban Dân tộc,79.BDT,79.BDT,Ban Dân tộc,79,ok",
        "hcm,Ban Đào tạo,79.BDT2,79.BDT2,Ban Đào tạo,79,ok",
        "binhduong,Ban Dân tộc tỉnh Bình Dương,74.BDT,79.BDT,Ban Dân tộc,79,ok",
        "binhduong,\"ou=Ban Đào tạo Bình Dương,dc=binhduong,dc=gov,dc=vn\",74.BDT2,79.BDT2,Ban Đào tạo,79,ok",
    ]


@pytest.mark.parametrize(("province", "departments", "message"), [
    ("99", {}, "province 99 is not one of the 34 provinces of 2025"),
    ("01", {}, "consolidation.toml: the target's code is 79, not the province 01 asked for"),
    ("79", {"dongnai": ["Sở Y tế"]},
     "departments given for unknown source 'dongnai'; the sources are hcm, binhduong, baria-vungtau"),
])
def test_draft_errors(config: Config, province: str, departments: dict[str, list[str]], message: str) -> None:
    with pytest.raises(StructureError) as caught:
        draft_structure(province, config, departments)
    assert str(caught.value) == message


def test_vietnam_provinces_private_conversion_table_has_the_expected_shape() -> None:
    # _partly_merged reads vietnam_provinces' private conversion module (the only place with the
    # "partly merged" flag); if the package reshapes it, this fails before a draft goes wrong.
    from vietnam_provinces import _ward_conversion_2025 as conversion

    entry = conversion.OLD_TO_NEW[26746]
    assert entry.old_ward._fields == ("code", "district_code", "province_code", "is_partly_merged")
    assert (entry.old_ward, [ward.code for ward in entry.new_wards]) == ((26746, 760, 79, True), [26740, 26743])
    assert (_partly_merged(26545), _partly_merged(26740), _partly_merged(26935)) == (True, False, None)
