"""Tests for mailmerge_gov.vietnamese: folding, name splitting, initials and collation."""

import random
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailmerge_gov.vietnamese import NameParts, fold, initials, sort_key, sort_key_word, split_name


def nfd(text: str) -> str:
    """Return text in decomposed form, as some Mac and web forms submit it."""
    return unicodedata.normalize("NFD", text)


# --- fold ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Đặng  Thị Ánh ", "dang thi anh"),
        ("Nguyễn Văn An", "nguyen van an"),
        ("ĐẶNG THỊ ÁNH", "dang thi anh"),
        ("Phường Thủ Dầu Một", "phuong thu dau mot"),
        ("Bà Rịa–Vũng Tàu", "ba ria–vung tau"),
        ("Quỳnh", "quynh"),
        ("Hồ  Chí\tMinh\n", "ho chi minh"),
        ("Trần\u00a0Thị\u3000Ưng", "tran thi ung"),
        ("Sở Tư pháp tỉnh Bắc Ninh", "so tu phap tinh bac ninh"),
        ("ƯƠNG ƠN ẮT ẤM ỄNH ỖI", "uong on at am enh oi"),
        ("", ""),
        (" \t\n", ""),
        ("plain ascii", "plain ascii"),
        ("Straße ç ü 東京", "strasse ç ü 東京"),
        (nfd("  Đặng  Thị Ánh "), "dang thi anh"),
        (nfd("ĐẶNG THỊ ÁNH"), "dang thi anh"),
        (nfd("Phường Thủ Dầu Một"), "phuong thu dau mot"),
        (nfd("Quỳnh"), "quynh"),
        ("a\u0301\u0302", "a"),  # marks NFC cannot compose (wrong order) still go
    ],
)
def test_fold(text: str, expected: str) -> None:
    assert fold(text) == expected


# --- split_name ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("full_name", "family", "middle", "given_name"),
    [
        ("Nguyễn Văn An", "Nguyễn", "Văn", "An"),
        ("Trần Thị Ngọc Ánh", "Trần", "Thị Ngọc", "Ánh"),
        ("Lê Bình", "Lê", "", "Bình"),
        ("Hùng", "", "", "Hùng"),
        ("  Phạm   Minh\tChính ", "Phạm", "Minh", "Chính"),
        ("NGUYỄN VĂN AN", "Nguyễn", "Văn", "An"),
        ("đặng thị ánh", "Đặng", "Thị", "Ánh"),
        (nfd("Đỗ Quang Ưng"), "Đỗ", "Quang", "Ưng"),
        ("Tôn Nữ Thị Hoa", "Tôn Nữ", "Thị", "Hoa"),
        ("Tôn Nữ Thị Ninh", "Tôn Nữ", "Thị", "Ninh"),
        ("Tôn Thất Thuyết", "Tôn Thất", "", "Thuyết"),
        ("TÔN THẤT TÙNG", "Tôn Thất", "", "Tùng"),
        (nfd("Tôn Thất Đàm"), "Tôn Thất", "", "Đàm"),
        ("Ton Nu Thi Hoa", "Ton Nu", "Thi", "Hoa"),
        ("Nguyễn Phúc Vĩnh Lộc", "Nguyễn Phúc", "Vĩnh", "Lộc"),
        ("Nguyễn Phước Bửu Chánh", "Nguyễn Phước", "Bửu", "Chánh"),
        ("Công Tằng Tôn Nữ Diệu Hương", "Công Tằng Tôn Nữ", "Diệu", "Hương"),
        ("Công Tôn Nữ Thanh Tâm", "Công Tôn Nữ", "Thanh", "Tâm"),
        ("Âu Dương Minh", "Âu Dương", "", "Minh"),
        ("Hoàng Phủ Ngọc Tường", "Hoàng Phủ", "Ngọc", "Tường"),
        ("Hoàng Phú Quốc", "Hoàng", "Phú", "Quốc"),  # Phú here is a middle name, not Phủ
        ("Nguyễn Văn Phúc", "Nguyễn", "Văn", "Phúc"),
        ("Tôn Thất", "Tôn", "", "Thất"),  # nothing left after the compound to be a given name
        ("Nguyễn Thị Minh Khai", "Nguyễn", "Thị Minh", "Khai"),
        ("McDonald Lê", "McDonald", "", "Lê"),  # mixed case is kept as typed
        ("H'HEN NIÊ", "H'Hen", "", "Niê"),
    ],
)
def test_split_name(full_name: str, family: str, middle: str, given_name: str) -> None:
    assert split_name(full_name) == NameParts(family=family, middle=middle, given=given_name)


@pytest.mark.parametrize("blank", ["", "   ", "\t\n", "\u00a0"])
def test_split_name_rejects_blank(blank: str) -> None:
    with pytest.raises(ValueError, match="empty name"):
        split_name(blank)


@pytest.mark.parametrize(
    ("full_name", "expected_initials", "expected_full"),
    [
        ("Nguyễn Văn An", "nv", "Nguyễn Văn An"),
        ("Tôn Nữ Thị Hoa", "tnt", "Tôn Nữ Thị Hoa"),
        ("Đặng Thị Ánh", "dt", "Đặng Thị Ánh"),
        ("  ĐỖ   ĐỨC  ĐẠT ", "dd", "Đỗ Đức Đạt"),
        ("Trần Thị Ngọc Ánh", "ttn", "Trần Thị Ngọc Ánh"),
        ("Lê Bình", "l", "Lê Bình"),
        ("Hùng", "", "Hùng"),
        ("Âu Dương Minh", "ad", "Âu Dương Minh"),
    ],
)
def test_initials_and_full(full_name: str, expected_initials: str, expected_full: str) -> None:
    parts = split_name(full_name)
    assert initials(parts) == expected_initials
    assert parts.initials == expected_initials
    assert parts.full == expected_full


# --- sort_key ------------------------------------------------------------------------------------

STAFF_SORTED = [
    "Nguyễn Văn An",
    "Vũ Thị Ánh",
    "Đỗ Văn Ăn",
    "Trần Thị Ân",
    "Lê Bình",
    "Lê Văn Dung",
    "Hoàng Dũng",
    "Phạm Đức",
    "Mai Em",
    "Trương Ê",
    "Vi Fong",
    "Lê Thị Hoa",
    "Lê Thị Hòa",
    "Lê Thị Hóa",
    "Ngô Thị Ơn",
    "Tạ Văn Út",
    "Lý Ưng",
]


def test_sort_key_orders_staff_list() -> None:
    shuffled = STAFF_SORTED[:]
    random.Random(2025).shuffle(shuffled)
    assert sorted(shuffled, key=sort_key) == STAFF_SORTED


def test_sort_key_given_then_family_then_middle() -> None:
    names = ["Trần Văn An", "Lê Văn An", "Lê Thị An", "An", "Lê An", "Bùi Bình"]
    assert sorted(names, key=sort_key) == [
        "An",
        "Lê An",
        "Lê Thị An",
        "Lê Văn An",
        "Trần Văn An",
        "Bùi Bình",
    ]


def test_sort_key_tones_in_dictionary_order() -> None:
    words = ["mạ", "má", "mã", "mả", "mà", "ma", "mác", "mai"]
    expected = ["ma", "mà", "mả", "mã", "má", "mạ", "mác", "mai"]
    assert sorted(words, key=sort_key_word) == expected
    assert sorted(words, key=sort_key) == expected


def test_sort_key_letters_before_tones() -> None:
    # Base letters decide first (a < ă < â, d < đ); tones only between equal letters.
    assert sorted(["Ân", "Ăn", "Án", "An", "Bình"], key=sort_key) == [
        "An", "Án", "Ăn", "Ân", "Bình"
    ]
    assert sorted(["Đan", "Dũng", "Dung", "Em"], key=sort_key) == ["Dung", "Dũng", "Đan", "Em"]


def letters_only(key: tuple) -> list[list[tuple[int, ...]]]:
    """Return the primary (base letter) weights of each word in a sort_key() result."""
    return [[letters for letters, _ in part] for part in key[:3]]


def test_sort_key_tone_is_secondary_only() -> None:
    plain, marked = sort_key("Nguyên Văn An"), sort_key("Nguyễn Văn An")
    assert letters_only(plain) == letters_only(marked)
    assert plain < marked


def test_sort_key_case_last() -> None:
    assert sorted(["LÊ AN", "Lê An", "lê an"], key=sort_key) == ["lê an", "Lê An", "LÊ AN"]
    assert sorted(["LÊ AN", "Lê Ân"], key=sort_key) == ["LÊ AN", "Lê Ân"]


def test_sort_key_tone_position_does_not_matter() -> None:
    # Old (hoà) and new (hòa) tone placement spell the same syllable.
    assert sort_key("Lê Thị Hoà")[:-1] == sort_key("Lê Thị Hòa")[:-1]


def test_sort_key_blank_sorts_first() -> None:
    assert sorted(["Lê An", "  ", "An"], key=sort_key) == ["  ", "An", "Lê An"]


# --- properties ----------------------------------------------------------------------------------

VIETNAMESE_LETTERS = (
    "aàảãáạăằẳẵắặâầẩẫấậbcdđeèẻẽéẹêềểễếệghiìỉĩíịklmn"
    "oòỏõóọôồổỗốộơờởỡớợpqrstuùủũúụưừửữứựvxyỳỷỹýỵ"
)
VIETNAMESE_TEXT = st.text(
    alphabet=st.sampled_from(
        VIETNAMESE_LETTERS
        + VIETNAMESE_LETTERS.upper()
        + "fjwzFJWZ0123456789-–'., \t\n\u00a0\u3000"
        + "\u0300\u0301\u0303\u0309\u0323\u0302\u0306\u031b"
    )
)
FAMILY = (
    "Nguyễn Trần Lê Phạm Hoàng Huỳnh Vũ Đặng Bùi Đỗ Hồ Ngô Dương Lý".split()
    + ["Tôn Nữ", "Tôn Thất", "Âu Dương", "Công Tằng Tôn Nữ", "Nguyễn Phúc", "Hoàng Phủ"]
)
MIDDLE = "Văn Thị Hữu Đức Ngọc Minh Thanh Xuân Quốc Diệu Bảo Phú".split()
GIVEN = (
    "An Ánh Bình Cường Dũng Đạt Giang Hà Hương Khánh Lộc Mỹ Nguyệt Oanh Phượng Quỳnh Sơn Thảo"
    " Uyên Vỹ Yến Ưng"
).split()


@st.composite
def vietnamese_names(draw: st.DrawFn) -> str:
    """Draw a family-first name with messy spacing, in NFC or NFD."""
    words = [draw(st.sampled_from(FAMILY))] if draw(st.booleans()) else []
    words += draw(st.lists(st.sampled_from(MIDDLE), max_size=3))
    words.append(draw(st.sampled_from(GIVEN)))
    gaps = [draw(st.sampled_from([" ", "  ", "\t", "\u00a0"])) for _ in words]
    name = draw(st.sampled_from(["", " "])) + "".join(w + g for w, g in zip(words, gaps))
    return nfd(name) if draw(st.booleans()) else name


@given(st.text())
def test_fold_idempotent(text: str) -> None:
    assert fold(fold(text)) == fold(text)


@given(st.text())
def test_fold_same_for_nfc_and_nfd(text: str) -> None:
    assert fold(nfd(text)) == fold(unicodedata.normalize("NFC", text))


@given(VIETNAMESE_TEXT)
def test_fold_removes_all_vietnamese_marks(text: str) -> None:
    folded = fold(text)
    assert not any(unicodedata.combining(c) for c in folded)
    assert "đ" not in folded
    assert set(folded) <= set("abcdefghijklmnopqrstuvwxyz0123456789-–'., ")


@given(st.text())
def test_fold_spacing(text: str) -> None:
    folded = fold(text)
    assert folded == folded.strip()
    assert "  " not in folded
    assert all(c == " " or not c.isspace() for c in folded)


@given(vietnamese_names())
def test_split_name_round_trips(name: str) -> None:
    parts = split_name(name)
    assert parts.full == " ".join(unicodedata.normalize("NFC", name).split())
    for part in (parts.family, parts.middle, parts.given):
        assert part == part.strip()
        assert "  " not in part
    assert parts.given
    assert split_name(name.upper()) == parts
    assert split_name(name.lower()) == parts


@given(vietnamese_names())
def test_sort_key_same_for_nfc_and_nfd(name: str) -> None:
    assert sort_key(nfd(name)) == sort_key(unicodedata.normalize("NFC", name))


@given(VIETNAMESE_TEXT)
def test_sort_key_total_on_any_text(text: str) -> None:
    assert sort_key(nfd(text)) == sort_key(unicodedata.normalize("NFC", text))
