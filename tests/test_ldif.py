"""LDIF (RFC 2849): reading with line numbers and clear refusals, writing that reads back the same."""

import base64
import io

import pytest
from hypothesis import example, given, strategies as st

from mailmerge_gov.directory.ldif import LdifEntry, LdifError, format_change, format_entry, format_line, read_ldif


def read(text: str) -> list[LdifEntry]:
    return list(read_ldif(io.StringIO(text), "old.ldif"))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_reads_comments_folding_base64_and_version() -> None:
    text = (
        "version: 1\n"
        "# xuất từ danh bạ cũ\n"
        "dn: uid=annv,ou=people,dc=hcm,dc=gov,dc=vn\n"
        f"cn:: {b64('Nguyễn Văn An')}\n"
        "description: a long\n"
        "  value\n"
        "# a comment inside an entry\n"
        "#  continued comment\n"
        "mail: annv@hcm.gov.vn\n"
        "MAIL: an@hcm.gov.vn\n"
        "\n\n"
        "dn: uid=b,dc=hcm,dc=gov,dc=vn\n"
        "uid: b\n"
    )
    assert read(text) == [
        LdifEntry("uid=annv,ou=people,dc=hcm,dc=gov,dc=vn",
                  (("cn", ("Nguyễn Văn An",)), ("description", ("a long value",)),
                   ("mail", ("annv@hcm.gov.vn", "an@hcm.gov.vn"))), 3),
        LdifEntry("uid=b,dc=hcm,dc=gov,dc=vn", (("uid", ("b",)),), 13),
    ]


def test_binary_attributes_of_ad_exports_are_skipped() -> None:
    text = f"dn: CN=An,DC=bd\nobjectGUID:: {base64.b64encode(bytes([0xff, 0xfe, 0x01])).decode()}\ncn: An\n"
    assert read(text)[0].attributes == (("cn", ("An",)),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dn: uid=a,dc=x\nchangetype: modify\nreplace: cn\ncn: b\n",
         "old.ldif, line 2: 'uid=a,dc=x' is a change record (changetype: modify); export the directory's "
         "content (ldapsearch / slapcat output), not changes"),
        ("uid: a\n", "old.ldif, line 1: a record must start with 'dn:', found 'uid:'"),
        ("dn: uid=a,dc=x\nthis is not ldif\n", "old.ldif, line 2: expected 'attribute: value', found 'this is not ldif'"),
        ("dn: uid=a,dc=x\ncn:: ###\n", "old.ldif, line 2: invalid base64 value"),
        (f"dn: uid=a,dc=x\ndescription:: {base64.b64encode(bytes([0xff, 0xfe])).decode()}\n",
         "old.ldif, line 2: base64 value is not UTF-8 text (attribute 'description' holds bytes: leave it out "
         "of the export)"),
        ("dn: uid=a,dc=x\njpegPhoto:< file:///tmp/a.jpg\n",
         "old.ldif, line 2: values read from URLs (':<') are not supported; export with the values inline"),
        (" continued\n", "old.ldif, line 1: a continuation line (starting with a space) follows nothing"),
        ("version: 2\n", "old.ldif, line 1: unsupported LDIF version '2' (only 1 exists)"),
    ],
)
def test_bad_ldif_names_the_line(text: str, message: str) -> None:
    with pytest.raises(LdifError) as caught:
        read(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("annv@hcm.gov.vn", "mail: annv@hcm.gov.vn"),
        ("Nguyễn Văn An", f"cn:: {b64('Nguyễn Văn An')}"),
        (" leading space", f"cn:: {b64(' leading space')}"),
        ("trailing space ", f"cn:: {b64('trailing space ')}"),
        (":colon first", f"cn:: {b64(':colon first')}"),
        ("<less-than first", f"cn:: {b64('<less-than first')}"),
        ("", "cn: "),
    ],
)
def test_format_line_encodes_what_rfc_2849_requires(value: str, line: str) -> None:
    name = line.split(":", 1)[0]
    assert format_line(name, value) == line


def test_long_lines_are_folded_at_76_columns() -> None:
    text = format_line("description", "x" * 200)
    assert [len(line) for line in text.split("\n")] == [76, 76, 63]
    assert read(f"dn: a=b\n{text}\n")[0].first("description") == "x" * 200


def test_change_records() -> None:
    assert format_change("uid=a,dc=x", "modify", modifications=[("replace", "mail", ("a@x.vn",)),
                                                                ("delete", "mobile", ())]) == (
        "dn: uid=a,dc=x\nchangetype: modify\nreplace: mail\nmail: a@x.vn\n-\ndelete: mobile\n-\n\n")
    assert format_change("uid=a,dc=x", "delete") == "dn: uid=a,dc=x\nchangetype: delete\n\n"


names = st.sampled_from(["cn", "mail", "description", "ou"])
values = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=120)


@given(st.lists(st.tuples(names, st.lists(values, min_size=1, max_size=3)), max_size=4, unique_by=lambda p: p[0]))
@example([("cn", ["\n"])]).via("a final newline: a regex $ matches before it")
@example([("description", ["Dòng một\n", "x\n"])]).via("a final newline: a regex $ matches before it")
def test_what_is_written_reads_back_the_same(attributes) -> None:
    frozen = tuple((name, tuple(vals)) for name, vals in attributes)
    assert read(format_entry("uid=Nguyễn Văn An,dc=hcm", frozen)) == [LdifEntry("uid=Nguyễn Văn An,dc=hcm", frozen, 1)]
