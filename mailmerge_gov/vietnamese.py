"""Vietnamese text rules: folding for matching, splitting personal names, collation for sorting."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

__all__ = [
    "COMPOUND_FAMILY_NAMES",
    "NameParts",
    "fold",
    "initials",
    "sort_key",
    "sort_key_word",
    "split_name",
]

# --- Marks -------------------------------------------------------------------------------------

# The five written tones, in the conventional dictionary order (ngang, the unmarked tone, is 0).
# The values double as the secondary collation weight.
_TONE_MARKS: dict[str, int] = {
    "\u0300": 1,  # huyền (grave)
    "\u0309": 2,  # hỏi (hook above)
    "\u0303": 3,  # ngã (tilde)
    "\u0301": 4,  # sắc (acute)
    "\u0323": 5,  # nặng (dot below)
}
# Marks that make a separate letter of the alphabet: ă â ê ô ơ ư.
_VOWEL_MARKS: frozenset[str] = frozenset({"\u0306", "\u0302", "\u031b"})  # breve, circumflex, horn
_VIETNAMESE_MARKS: frozenset[str] = frozenset(_TONE_MARKS) | _VOWEL_MARKS

# --- fold --------------------------------------------------------------------------------------


def _build_fold_table() -> dict[int, str | None]:
    """Return the str.translate table that fold() applies after NFC and casefold."""
    table: dict[int, str | None] = {ord("đ"): "d", ord("Đ"): "D"}
    # Marks that NFC could not attach to a letter (odd input such as acute-then-circumflex) are
    # dropped, so that no Vietnamese mark survives folding whatever order it came in.
    for mark in _VIETNAMESE_MARKS:
        table[ord(mark)] = None
    # Every precomposed Latin letter that carries Vietnamese marks loses exactly those marks;
    # other marks are kept (ǘ -> ü, ç stays ç) so non-Vietnamese letters pass through. ñ does
    # become n: its tilde is the ngã mark, which is dropped on every other letter too. Latin
    # precomposed letters all live below U+2000; scanning that range once costs ~5 ms at import
    # and lets fold() do one C-level translate instead of per-character normalisation.
    for code in range(0xC0, 0x2000):
        char = chr(code)
        decomposed = unicodedata.normalize("NFD", char)
        if len(decomposed) < 2 or not ("a" <= decomposed[0].lower() <= "z"):
            continue
        kept = "".join(c for c in decomposed if c not in _VIETNAMESE_MARKS)
        if kept != decomposed:
            table[code] = unicodedata.normalize("NFC", kept)
    return table


_FOLD_TABLE = _build_fold_table()


# Names, titles and unit names repeat thousands of times in a directory of 100,000 officials (there
# are only so many Nguyễn Văn An and Chuyên viên): fold and split_name remember recent answers.
@functools.lru_cache(maxsize=1 << 16)
def fold(text: str) -> str:
    """Return text as a matching key: no Vietnamese marks, đ as d, casefolded, one-spaced."""
    if text.isascii():
        # Fast path for the many names already typed without diacritics.
        return " ".join(text.lower().split())
    folded = unicodedata.normalize("NFC", text).casefold().translate(_FOLD_TABLE)
    # casefold() and the mark removal can leave a decomposed sequence ("ǰ" folds to j + caron,
    # "ú" + diaeresis becomes u + diaeresis); a final NFC keeps fold() idempotent.
    return " ".join(unicodedata.normalize("NFC", folded).split())


# --- names -------------------------------------------------------------------------------------

# Multi-word family names (họ kép) recognised by split_name(). Only well-attested ones:
# - Nguyễn Phúc / Nguyễn Phước: the Nguyễn royal clan (both spellings are in use).
# - Tôn Thất (men) and Tôn Nữ, Công Tôn Nữ, Công Tằng Tôn Nữ, Công Huyền Tôn Nữ,
#   Huyền Tôn Nữ (women): names given to descendants of the Nguyễn lords and emperors since
#   Minh Mạng, now carried as family names (Tôn Thất Thuyết, Tôn Nữ Thị Ninh).
# - Âu Dương, Hoàng Phủ: Sino-Vietnamese compound surnames carried by Vietnamese families
#   (Âu Dương Lân, Hoàng Phủ Ngọc Tường).
# - Tư Mã, Gia Cát, Thượng Quan, Đông Phương: Sino-Vietnamese readings of Chinese compound
#   surnames that Hoa citizens may carry; their first words are not ordinary Vietnamese
#   surnames, so recognising them costs nothing for other names.
# Deliberately absent: pairs such as "Nguyễn Văn", "Lê Văn", "Trần Đình", "Nguyễn Hữu": the
# second word there is a middle name (tên đệm), not part of the surname.
COMPOUND_FAMILY_NAMES: tuple[str, ...] = (
    "Công Tằng Tôn Nữ",
    "Công Huyền Tôn Nữ",
    "Công Tôn Nữ",
    "Huyền Tôn Nữ",
    "Tôn Nữ",
    "Tôn Thất",
    "Nguyễn Phúc",
    "Nguyễn Phước",
    "Âu Dương",
    "Hoàng Phủ",
    "Tư Mã",
    "Gia Cát",
    "Thượng Quan",
    "Đông Phương",
)


# Compared after NFC and casefold, so upper-case and NFD input match; longest first, so that
# "Công Tằng Tôn Nữ" wins over the "Tôn Nữ" it ends with.
_COMPOUNDS: tuple[tuple[str, ...], ...] = tuple(
    sorted(
        (
            tuple(unicodedata.normalize("NFC", name).casefold().split())
            for name in COMPOUND_FAMILY_NAMES
        ),
        key=len,
        reverse=True,
    )
)


def _starts_with_compound(words: list[str], compound: tuple[str, ...]) -> bool:
    """Return whether the name words begin with the given compound family name."""
    if len(words) < len(compound):
        return False
    for word, expected in zip(words, compound):
        key = unicodedata.normalize("NFC", word).casefold()
        # An accented word must match exactly, so that "Hoàng Phú Quốc" (middle name Phú) is
        # not taken for the surname Hoàng Phủ. A word typed without diacritics carries no such
        # information and is compared folded, so "TON NU THI HOA" is still recognised.
        if key != expected and not (key.isascii() and key == fold(expected)):
            return False
    return True


def _split_words(words: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Return (family, middle, given) word lists for a name already split into words."""
    if len(words) <= 1:
        return [], [], list(words)
    for compound in _COMPOUNDS:
        # The compound needs at least one word after it to serve as the given name.
        if len(words) > len(compound) and _starts_with_compound(words, compound):
            size = len(compound)
            return words[:size], words[size:-1], words[-1:]
    return words[:1], words[1:-1], words[-1:]


@dataclass(frozen=True)
class NameParts:
    """A Vietnamese personal name split into family name, middle name(s) and given name."""

    family: str
    middle: str
    given: str

    @property
    def initials(self) -> str:
        """Folded initials of the family and middle words ("Nguyễn Văn An" -> "nv")."""
        return initials(self)

    @property
    def full(self) -> str:
        """The name in Vietnamese order (family, middle, given) with single spaces."""
        return " ".join(part for part in (self.family, self.middle, self.given) if part)


def _normalise_name(full_name: str) -> str:
    """Return the name in NFC with white space collapsed and trimmed."""
    return " ".join(unicodedata.normalize("NFC", full_name).split())


# A letter that starts a word or follows an apostrophe or hyphen: "H'HEN NIÊ" -> "H'Hen Niê".
_CAPITAL_AT = re.compile(r"(?:^|(?<=[\s'’ʼ\-]))(\w)")


def _restore_case(name: str) -> str:
    """Capitalise each word of a name written all in upper or all in lower case."""
    if not (name.isupper() or name.islower()):
        return name  # mixed case was typed deliberately (e.g. "McDonald", "H'Hen"); keep it
    return _CAPITAL_AT.sub(lambda m: m.group(1).upper(), name.lower())


@functools.lru_cache(maxsize=1 << 16)
def split_name(full_name: str) -> NameParts:
    """Split a Vietnamese name written family-first into family, middle and given name."""
    name = _normalise_name(full_name)
    if not name:
        raise ValueError(f"cannot split an empty name: {full_name!r}")
    family, middle, given = _split_words(_restore_case(name).split(" "))
    return NameParts(family=" ".join(family), middle=" ".join(middle), given=" ".join(given))


def initials(parts: NameParts) -> str:
    """Return the folded lower-case initials of the family and middle words of a name."""
    # Every word counts, compound surnames included: Tôn Nữ Thị Hoa -> "tnt", as in the
    # e-mail addresses (hoatnt@...) this is used to build.
    words = fold(f"{parts.family} {parts.middle}").split()
    return "".join(word[0] for word in words)


# --- collation ---------------------------------------------------------------------------------

# The Vietnamese alphabet. f, j, w and z are not part of it but occur in loanwords and minority
# names; they go where English puts them (f after e/ê, j after i, w after v, z after y).
_ALPHABET = "aăâbcdđeêfghijklmnoôơpqrstuưvwxyz"
_LETTER_BASE = 1000  # primary weights of letters; punctuation and digits (code points < 128) sort
_OTHER_BASE = 2000  # before them, every other character after z, in code-point order

_CASE_LOWER, _CASE_UPPER = 0, 1  # lower case first, as in most collations


def _build_collation_table() -> dict[str, tuple[int, int, int]]:
    """Return a map from each Vietnamese letter (any tone, either case) to its weights."""
    spelled = {
        "ă": "a\u0306", "â": "a\u0302", "ê": "e\u0302",
        "ô": "o\u0302", "ơ": "o\u031b", "ư": "u\u031b",
    }
    table: dict[str, tuple[int, int, int]] = {}
    for rank, letter in enumerate(_ALPHABET):
        marks = {0: ""}
        if letter in "aăâeêioôơuưy":
            marks |= {tone: mark for mark, tone in _TONE_MARKS.items()}
        for tone, mark in marks.items():
            lower = unicodedata.normalize("NFC", spelled.get(letter, letter) + mark)
            upper = lower.upper()
            assert len(lower) == len(upper) == 1, (lower, upper)  # every form is precomposed
            table[lower] = (_LETTER_BASE + rank, tone, _CASE_LOWER)
            table[upper] = (_LETTER_BASE + rank, tone, _CASE_UPPER)
    return table


_COLLATION = _build_collation_table()


def _other_weights(char: str) -> tuple[int, int, int]:
    """Return the weights of a character outside the Vietnamese alphabet."""
    lower = char.lower()
    code = ord(lower[0]) if len(lower) == 1 else ord(char)
    primary = code if code < 128 else _OTHER_BASE + code
    return primary, 0, _CASE_UPPER if char != lower else _CASE_LOWER


def sort_key_word(word: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Return (letters, tones, cases) weights of one word in Vietnamese alphabetical order."""
    letters: list[int] = []
    tones: list[int] = []
    cases: list[int] = []
    for char in unicodedata.normalize("NFC", word):
        primary, tone, case = _COLLATION.get(char) or _other_weights(char)
        letters.append(primary)
        cases.append(case)
        if tone:
            tones.append(tone)
    # A syllable carries one tone, whichever vowel it is written on ("hoà" and "hòa" are the
    # same word), so tones are kept as a sequence without positions: () = ngang sorts first.
    return tuple(letters), tuple(tones), tuple(cases)


def sort_key(full_name: str) -> tuple:
    """Return a key that orders names as Vietnamese staff lists do: given, family, middle name."""
    name = _normalise_name(full_name)
    family, middle, given = _split_words(name.split(" ") if name else [])
    # Words are compared one by one, base letters then tone, as in a dictionary where every
    # "an ..." comes before any "án ..."; case decides only between otherwise equal names,
    # and the NFC text itself breaks the last ties so that sorting is deterministic.
    keyed = [[sort_key_word(w) for w in part] for part in (given, family, middle)]
    words_key = tuple(tuple((letters, tones) for letters, tones, _ in part) for part in keyed)
    case_key = tuple(cases for part in keyed for _, _, cases in part)
    return (*words_key, case_key, name)
