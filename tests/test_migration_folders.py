"""Folder mapping: special uses, well-known (Vietnamese) names, separators, rules, merged folders."""

from __future__ import annotations

import pytest

from mailmerge_gov.migration.folders import FolderMapping, FolderRules, map_folders, special_use_of_name
from mailmerge_gov.migration.protocol import FolderInfo

NO_RULES = FolderRules()


def src(*names: str, sep: str | None = "/") -> list[FolderInfo]:
    """Return source folders with the given names and separator."""
    return [FolderInfo(n, sep) for n in names]


def targets(mappings: list[FolderMapping]) -> dict[str, str | None]:
    """Return source -> target of a mapping list."""
    return {m.source: m.target for m in mappings}


@pytest.mark.parametrize(("name", "use"), [
    ("Sent", "\\Sent"), ("sent items", "\\Sent"), ("Sent Messages", "\\Sent"), ("Thư đã gửi", "\\Sent"),
    ("Thu da gui", "\\Sent"), ("THƯ ĐÃ GỬI", "\\Sent"), ("Đã gửi", "\\Sent"),
    ("Drafts", "\\Drafts"), ("Thư nháp", "\\Drafts"), ("Nháp", "\\Drafts"),
    ("Trash", "\\Trash"), ("Deleted Items", "\\Trash"), ("Deleted Messages", "\\Trash"), ("Thùng rác", "\\Trash"),
    ("Thư đã xoá", "\\Trash"), ("Thư đã xóa", "\\Trash"),
    ("Junk", "\\Junk"), ("Spam", "\\Junk"), ("Junk E-mail", "\\Junk"), ("Bulk Mail", "\\Junk"), ("Thư rác", "\\Junk"),
    ("Archive", "\\Archive"), ("Archives", "\\Archive"), ("Lưu trữ", "\\Archive"),
    ("Văn bản đến", None), ("Sentinel", None),
])
def test_well_known_names(name: str, use: str | None) -> None:
    assert special_use_of_name([name]) == use


@pytest.mark.parametrize(("parts", "use"), [
    (["INBOX", "Sent"], "\\Sent"), (["Inbox", "Thư rác"], "\\Junk"), (["Dự án", "Sent"], None),
    (["INBOX", "Dự án", "Sent"], None),
])
def test_well_known_names_count_at_top_level_and_under_inbox_only(parts: list[str], use: str | None) -> None:
    assert special_use_of_name(parts) == use


def test_special_folders_go_to_the_conventional_names_on_an_empty_target() -> None:
    mapped = map_folders(src("INBOX", "Thư đã gửi", "Thư nháp", "Thùng rác", "Thư rác", "Lưu trữ", "Văn bản đến"),
                         [FolderInfo("INBOX", "/")], NO_RULES, "/")
    assert mapped == [
        FolderMapping("INBOX", "INBOX"), FolderMapping("Thư đã gửi", "Sent"), FolderMapping("Thư nháp", "Drafts"),
        FolderMapping("Thùng rác", "Trash"), FolderMapping("Thư rác", "Junk"), FolderMapping("Lưu trữ", "Archive"),
        FolderMapping("Văn bản đến", "Văn bản đến"),
    ]


def test_the_targets_flag_wins_over_names() -> None:
    target = [FolderInfo("INBOX", "/"), FolderInfo("Sent", "/"), FolderInfo("Thư đã gửi", "/", "\\Sent"),
              FolderInfo("Deleted Items", "/")]
    assert targets(map_folders(src("Sent", "Trash"), target, NO_RULES, "/")) == {
        "Sent": "Thư đã gửi", "Trash": "Deleted Items"}


def test_a_target_with_two_unflagged_candidates_gets_the_conventional_one() -> None:
    target = [FolderInfo("Sent Items", "/"), FolderInfo("Sent", "/")]
    assert targets(map_folders(src("Đã gửi"), target, NO_RULES, "/")) == {"Đã gửi": "Sent"}


def test_the_sources_own_flag_at_any_depth() -> None:
    source = [FolderInfo("[Gmail]", "/", None, selectable=False), FolderInfo("[Gmail]/Sent Mail", "/", "\\Sent"),
              FolderInfo("[Gmail]/Starred", "/"), FolderInfo("Hộp thư gửi", "/", "\\Sent")]
    assert map_folders(source, [], NO_RULES, "/") == [
        FolderMapping("[Gmail]", None, "not selectable"),
        FolderMapping("[Gmail]/Sent Mail", "Sent", "merged with Hộp thư gửi"),
        FolderMapping("[Gmail]/Starred", "[Gmail]/Starred"),
        FolderMapping("Hộp thư gửi", "Sent", "merged with [Gmail]/Sent Mail"),
    ]


def test_sub_folders_follow_their_special_parent() -> None:
    source = src("Thư đã gửi", "Thư đã gửi/2024", "Dự án/Sent")
    assert targets(map_folders(source, [], NO_RULES, "/")) == {
        "Thư đã gửi": "Sent", "Thư đã gửi/2024": "Sent/2024", "Dự án/Sent": "Dự án/Sent"}


@pytest.mark.parametrize(("name", "expected"), [("inbox", "INBOX"), ("Inbox/Dự án", "INBOX/Dự án"),
                                                ("INBOX/Sent", "Sent"), ("INBOX/Sent/2024", "Sent/2024")])
def test_inbox_is_case_insensitive(name: str, expected: str) -> None:
    assert map_folders(src(name), [], NO_RULES, "/") == [FolderMapping(name, expected)]


@pytest.mark.parametrize(("name", "source_sep", "target_sep", "expected"), [
    ("Văn bản đến.2024", ".", "/", "Văn bản đến/2024"),
    ("Văn bản đến/2024", "/", ".", "Văn bản đến.2024"),
    ("Văn bản đến", None, "/", "Văn bản đến"),
    ("Dự án\\2024", "\\", "/", "Dự án/2024"),
    ("INBOX.Dự án.2024", ".", "/", "INBOX/Dự án/2024"),
])
def test_separator_translation(name: str, source_sep: str | None, target_sep: str, expected: str) -> None:
    assert map_folders(src(name, sep=source_sep), [], NO_RULES, target_sep) == [FolderMapping(name, expected)]


@pytest.mark.parametrize(("name", "source_sep", "target_sep", "expected"), [
    ("Đi/Đến.2024", ".", "/", "Đi\u2215Đến/2024"),  # ∕ DIVISION SLASH
    ("V.v. tuyển dụng/2024", "/", ".", "V\u2024v\u2024 tuyển dụng.2024"),  # ․ ONE DOT LEADER
    ("a\\b/c", "/", "\\", "a\u2216b\\c"),  # ∖ SET MINUS
    ("a|b/c", "/", "|", "a_b|c"),
])
def test_a_name_holding_the_target_separator_gets_a_look_alike(name: str, source_sep: str, target_sep: str,
                                                               expected: str) -> None:
    assert map_folders(src(name, sep=source_sep), [], NO_RULES, target_sep) == [FolderMapping(name, expected)]


def test_renames_first_match_only_on_the_slash_name() -> None:
    rules = FolderRules(renames=((r"^Văn bản đến (\d{4})$", r"Văn bản đến/\1"), (r"bản", "BẢN"), (r"^Cũ$", "Sent")))
    source = src("Văn bản đến 2024", "Văn bản đi", "Cũ", sep=".")
    assert targets(map_folders(source, [], rules, ".")) == {
        "Văn bản đến 2024": "Văn bản đến.2024", "Văn bản đi": "Văn BẢN đi", "Cũ": "Sent"}


def test_a_rename_drops_the_sources_special_flag() -> None:
    rules = FolderRules(renames=((r"^Sent$", "Lưu trữ cũ/Đã gửi"),))
    assert map_folders([FolderInfo("Sent", "/", "\\Sent")], [], rules, "/") == [
        FolderMapping("Sent", "Lưu trữ cũ/Đã gửi")]


def test_a_rename_to_an_empty_level_excludes_the_folder() -> None:
    rules = FolderRules(renames=((r"^Tạm$", ""),))
    assert map_folders(src("Tạm"), [], rules, "/") == [
        FolderMapping("Tạm", None, "excluded: rename '^Tạm$' gives no usable name ('')")]


def test_include_and_exclude_with_exclude_winning() -> None:
    rules = FolderRules(include=(r"^INBOX$", r"^Văn bản"), exclude=(r"/2023$", r"^Trash$"))
    source = src("INBOX", "Văn bản đến", "Văn bản đến/2023", "Trash", "Dự án")
    assert map_folders(source, [], rules, "/") == [
        FolderMapping("INBOX", "INBOX"),
        FolderMapping("Văn bản đến", "Văn bản đến"),
        FolderMapping("Văn bản đến/2023", None, "excluded by rule '/2023$'"),
        FolderMapping("Trash", None, "excluded by rule '^Trash$'"),
        FolderMapping("Dự án", None, "excluded: matches no include rule"),
    ]


def test_filters_see_the_source_name_before_renames() -> None:
    rules = FolderRules(renames=((r"^Cũ$", "Mới"),), exclude=(r"^Mới$",))
    assert targets(map_folders(src("Cũ", "Mới"), [], rules, "/")) == {"Cũ": "Mới", "Mới": None}


def test_prefix_takes_every_folder_inbox_as_the_prefix_itself() -> None:
    rules = FolderRules(prefix="Lưu trữ/Bình Dương")
    source = src("INBOX", "INBOX/Dự án", "Thư đã gửi", "Văn bản đến/2024", sep="/")
    assert targets(map_folders(source, [FolderInfo("Sent", "/", "\\Sent")], rules, ".")) == {
        "INBOX": "Lưu trữ.Bình Dương",
        "INBOX/Dự án": "Lưu trữ.Bình Dương.Dự án",
        "Thư đã gửi": "Lưu trữ.Bình Dương.Thư đã gửi",
        "Văn bản đến/2024": "Lưu trữ.Bình Dương.Văn bản đến.2024",
    }


def test_two_sources_for_one_target_are_merged_and_say_so() -> None:
    source = src("INBOX", "Sent", "Sent Items", "Thư đã gửi", "Trash")
    assert map_folders(source, [FolderInfo("Sent", "/", "\\Sent")], NO_RULES, "/") == [
        FolderMapping("INBOX", "INBOX"),
        FolderMapping("Sent", "Sent", "merged with Sent Items, Thư đã gửi"),
        FolderMapping("Sent Items", "Sent", "merged with Sent, Thư đã gửi"),
        FolderMapping("Thư đã gửi", "Sent", "merged with Sent, Sent Items"),
        FolderMapping("Trash", "Trash"),
    ]


def test_not_selectable_folders_are_left_out_and_their_children_kept() -> None:
    source = [FolderInfo("Văn bản đến", "/", None, selectable=False), FolderInfo("Văn bản đến/2024", "/")]
    assert map_folders(source, [], NO_RULES, "/") == [
        FolderMapping("Văn bản đến", None, "not selectable"), FolderMapping("Văn bản đến/2024", "Văn bản đến/2024")]


@pytest.mark.parametrize("kwargs", [{"include": ("[unclosed",)}, {"renames": (("(", "x"),)},
                                    {"prefix": "Lưu trữ//Bình Dương"}])
def test_bad_rules_are_refused_at_once(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FolderRules(**kwargs)  # type: ignore[arg-type]
