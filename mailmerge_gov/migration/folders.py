"""Which source folder goes to which target folder: special uses, well-known names, rules, separators."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from mailmerge_gov.migration.protocol import SPECIAL_USES, FolderInfo
from mailmerge_gov.vietnamese import fold

__all__ = ["CONVENTIONAL_NAMES", "FolderMapping", "FolderRules", "SEPARATOR_SUBSTITUTES", "WELL_KNOWN",
           "map_folders", "special_use_of_name"]

INBOX = "INBOX"
RULE_SEPARATOR = "/"  # rules, prefixes and renames are written with "/" whatever the stores use

# The name a special folder gets on a target that has none yet (what Dovecot and most clients create).
CONVENTIONAL_NAMES: dict[str, str] = {
    "\\Sent": "Sent", "\\Drafts": "Drafts", "\\Trash": "Trash", "\\Junk": "Junk", "\\Archive": "Archive",
}

_NAMES: dict[str, tuple[str, ...]] = {
    "\\Sent": ("Sent", "Sent Items", "Sent Messages", "Sent Mail", "Thư đã gửi", "Đã gửi"),
    "\\Drafts": ("Drafts", "Draft", "Thư nháp", "Nháp", "Bản nháp"),
    "\\Trash": ("Trash", "Deleted Items", "Deleted Messages", "Deleted", "Thùng rác", "Thư đã xoá", "Đã xoá"),
    "\\Junk": ("Junk", "Spam", "Junk E-mail", "Junk Email", "Bulk Mail", "Thư rác"),
    "\\Archive": ("Archive", "Archives", "Lưu trữ"),
}
# Folded names (vietnamese.fold: no marks, đ -> d, case-insensitive): "Thư đã gửi", "Thu da gui" and
# "THƯ ĐÃ GỬI" are one key, and so are the two spellings of xoá/xóa (the mark on o or on a).
WELL_KNOWN: dict[str, str] = {fold(name): use for use, names in _NAMES.items() for name in names}

# A folder name part that holds the target's separator would split into two levels; it gets a look-alike
# instead, so that the name still reads the same in a mail client and the change is easy to spot and undo.
# "." matches what MaildirStore stores a "." as (U+2024), so both stores render a dot alike.
SEPARATOR_SUBSTITUTES: dict[str, str] = {"/": "\u2215", ".": "\u2024", "\\": "\u2216"}  # ∕ ․ ∖
_OTHER_SUBSTITUTE = "_"


@dataclass(frozen=True)
class FolderRules:
    """An administrator's folder rules: renames, include/exclude filters and a prefix for everything."""

    # (regex, replacement): the first regex that matches the source name (written with "/") replaces
    # every match in it (re.sub); the result may hold "/" to move a folder into another level
    renames: tuple[tuple[str, str], ...] = ()
    # regexes searched (re.search, not anchored) in the source name as it is, before any rename;
    # with includes, only folders matching one are copied; an exclude wins over an include
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # e.g. "Lưu trữ/Bình Dương": INBOX becomes the prefix itself and every other folder
    # "<prefix>/<name>", special folders included (under a prefix, an old mailbox is kept as it was
    # and not mixed into the target's Sent or Trash)
    prefix: str | None = None

    def __post_init__(self) -> None:
        """Refuse a bad regex or an empty prefix at once, not halfway through a migration."""
        for pattern in (*(r for r, _ in self.renames), *self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"folder rule {pattern!r} is not a valid regular expression: {exc}") from None
        if self.prefix is not None and not all(self.prefix.split(RULE_SEPARATOR)):
            raise ValueError(f"folder prefix {self.prefix!r} has an empty level")


@dataclass(frozen=True)
class FolderMapping:
    """Where one source folder goes: target None means not copied, and reason says why."""

    source: str
    target: str | None
    reason: str | None = None  # why excluded, or "merged with ..." when another folder goes there too


def special_use_of_name(parts: Sequence[str]) -> str | None:
    """Return the special use of a folder by its well-known name, when it is a top-level folder."""
    # Top level, or directly under INBOX where Courier and Cyrus (separator ".") keep every folder
    # ("INBOX.Sent"). "Dự án/Sent" deeper down is a user's own folder and keeps its path.
    if len(parts) == 1 or (len(parts) == 2 and parts[0].upper() == INBOX):
        return WELL_KNOWN.get(fold(parts[-1]))
    return None


def _parts(folder: FolderInfo) -> list[str]:
    """Return the levels of a folder name, split on its store's separator."""
    return folder.name.split(folder.separator) if folder.separator else [folder.name]


def _target_specials(target: Sequence[FolderInfo]) -> dict[str, str]:
    """Return special use -> the target folder that has it: its own flag first, else its well-known name."""
    found: dict[str, str] = {}
    selectable = [f for f in target if f.selectable]
    for folder in selectable:
        if folder.special_use in SPECIAL_USES:
            found.setdefault(folder.special_use, folder.name)
    by_name: dict[str, list[str]] = {}
    for folder in selectable:
        use = special_use_of_name(_parts(folder))
        if use is not None:
            by_name.setdefault(use, []).append(folder.name)
    for use, names in by_name.items():
        # two unflagged candidates ("Sent" and "Sent Items"): the conventional name, else the first listed
        conventional = [n for n in names if n.split(RULE_SEPARATOR)[-1] == CONVENTIONAL_NAMES[use]]
        found.setdefault(use, (conventional or names)[0])
    return found


def _join(parts: Sequence[str], separator: str) -> str:
    """Return name parts joined with the target separator, a separator inside a part replaced."""
    substitute = SEPARATOR_SUBSTITUTES.get(separator, _OTHER_SUBSTITUTE)
    return separator.join(p.replace(separator, substitute) for p in parts)


def map_folders(source: list[FolderInfo], target: list[FolderInfo], rules: FolderRules,
                target_separator: str) -> list[FolderMapping]:
    """Map every source folder to a target folder name (or None with a reason), in source order."""
    specials = _target_specials(target)
    # special folders by the source's own flag, so that "Sent/2024" follows wherever "Sent" goes
    source_flags: dict[tuple[str, ...], str] = {
        tuple(_inbox_first(_parts(f))): f.special_use for f in source
        if f.special_use is not None and f.special_use in SPECIAL_USES and f.selectable}
    renames = [(re.compile(p), r) for p, r in rules.renames]
    includes = [re.compile(p) for p in rules.include]
    excludes = [re.compile(p) for p in rules.exclude]
    prefix = rules.prefix.split(RULE_SEPARATOR) if rules.prefix else None

    def special_target(use: str) -> list[str]:
        """Return the target folder of a special use as name parts in the target's separator."""
        name = specials.get(use)
        return name.split(target_separator) if name is not None else [CONVENTIONAL_NAMES[use]]

    mappings: list[FolderMapping] = []
    for folder in source:
        parts = _parts(folder)
        name = RULE_SEPARATOR.join(parts)
        excluded_by = next((rx.pattern for rx in excludes if rx.search(name)), None)
        if excluded_by is not None:
            mappings.append(FolderMapping(folder.name, None, f"excluded by rule {excluded_by!r}"))
            continue
        if includes and not any(rx.search(name) for rx in includes):
            mappings.append(FolderMapping(folder.name, None, "excluded: matches no include rule"))
            continue
        if not folder.selectable:
            # a \Noselect parent holds no mail; its children are mapped on their own and the target
            # store creates their parents
            mappings.append(FolderMapping(folder.name, None, "not selectable"))
            continue
        renamed = next(((rx, repl) for rx, repl in renames if rx.search(name)), None)
        if renamed is not None:
            rx, repl = renamed
            new_name = rx.sub(repl, name)
            parts = new_name.split(RULE_SEPARATOR)
            if not all(parts):
                mappings.append(FolderMapping(folder.name, None,
                                              f"excluded: rename {rx.pattern!r} gives no usable name ({new_name!r})"))
                continue
        if prefix is not None:
            # INBOX becomes the prefix folder itself, so its sub-folders go directly under the prefix
            parts = _inbox_first(parts)
            mapped = [*prefix, *parts[1:]] if parts[0] == INBOX else [*prefix, *parts]
        else:
            mapped = _map_parts(parts, None if renamed else source_flags, special_target)
        mappings.append(FolderMapping(folder.name, _join(mapped, target_separator)))
    return _mark_merged(mappings)


def _map_parts(parts: list[str], source_flags: dict[tuple[str, ...], str] | None,
               special_target: Callable[[str], list[str]]) -> list[str]:
    """Return the target parts of a source folder: INBOX, a special folder (and its sub-folders), or as is."""
    parts = _inbox_first(parts)
    if parts == [INBOX]:
        return parts
    if source_flags is not None:  # after a rename the administrator's name counts, not the old flag
        # its own flag at any depth (Gmail: "[Gmail]/Sent Mail"), else the nearest flagged ancestor's
        for n in range(len(parts), 0, -1):
            use = source_flags.get(tuple(parts[:n]))
            if use is not None:
                return [*special_target(use), *parts[n:]]
    # the top-level name that decides: "Sent" for "Sent/2024", "INBOX/Sent" for "INBOX/Sent/2024"
    depth = 2 if parts[0] == INBOX else 1
    use = special_use_of_name(parts[:depth])
    if use is None:
        return parts
    return [*special_target(use), *parts[depth:]]


def _inbox_first(parts: list[str]) -> list[str]:
    """Return name parts with a leading INBOX written in capitals (INBOX is case-insensitive)."""
    return [INBOX, *parts[1:]] if parts[0].upper() == INBOX else parts


def _mark_merged(mappings: list[FolderMapping]) -> list[FolderMapping]:
    """Say so on every mapping whose target also receives another source folder."""
    by_target: dict[str, list[str]] = {}
    for m in mappings:
        if m.target is not None:
            # INBOX is case-insensitive on every server; other names are compared as written
            by_target.setdefault(INBOX if m.target.upper() == INBOX else m.target, []).append(m.source)
    marked = []
    for m in mappings:
        if m.target is None:
            marked.append(m)
            continue
        sources = by_target[INBOX if m.target.upper() == INBOX else m.target]
        others = [s for s in sources if s != m.source]
        marked.append(FolderMapping(m.source, m.target, f"merged with {', '.join(others)}") if others else m)
    return marked
