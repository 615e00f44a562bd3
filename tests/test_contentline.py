"""vCard and iCalendar content lines (mailmerge_gov/contentline.py): escaping and folding."""

from __future__ import annotations

import pytest

from mailmerge_gov.contentline import escape_text, fold


@pytest.mark.parametrize(("value", "escaped"), [
    ("Sở Tài chính, Phòng 1; tầng 2", "Sở Tài chính\\, Phòng 1\\; tầng 2"),
    ("C:\\tmp", "C:\\\\tmp"),
    ("một\r\nhai\nba\rbốn", "một\\nhai\\nba\\nbốn"),
])
def test_escape_text(value: str, escaped: str) -> None:
    assert escape_text(value) == escaped


@pytest.mark.parametrize(("line", "folded"), [
    ("a" * 75, "a" * 75 + "\r\n"),
    ("a" * 76, "a" * 75 + "\r\n a\r\n"),
    ("a" * 74 + "ệ", "a" * 74 + "\r\n ệ\r\n"),  # "ệ" is 3 octets: not cut inside it
    ("a" * 73 + "ệ" + "b" * 80, "a" * 73 + "\r\n " + "ệ" + "b" * 71 + "\r\n " + "b" * 9 + "\r\n"),
])
def test_fold(line: str, folded: str) -> None:
    assert fold(line) == folded
    assert all(len(part.encode("utf-8")) <= 75 for part in folded.split("\r\n"))
    assert folded.replace("\r\n ", "") == line + "\r\n"
