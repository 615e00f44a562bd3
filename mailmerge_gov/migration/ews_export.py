"""Calendar, contact and task folders of an Exchange mailbox as files an administrator can import: .ics and .vcf.

The migration copies mail only; these folders are never silently left behind. Exchange gives a calendar item's
MIME content as iCalendar and a contact's as a vCard, written by Exchange itself (recurrences, time zones and
attendees included): the items of a calendar folder are gathered into one VCALENDAR (each time zone once), the
cards of a contact folder into one .vcf. EWS gives no iCalendar form of a task, so a task folder becomes VTODO
components written from the task's properties (subject, body, start, due and completion dates, status, percent
done, importance, categories).
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from exchangelib import Account
from exchangelib import errors as ews_errors
from exchangelib.folders import Folder, FolderCollection
from exchangelib.items import ID_ONLY
from exchangelib.restriction import Q

from mailmerge_gov.contentline import escape_text, fold

log = logging.getLogger(__name__)

# Folder classes (PR_CONTAINER_CLASS) exported, and the kind of file each becomes.
KINDS = {"IPF.Appointment": "calendar", "IPF.Contact": "contacts", "IPF.Task": "tasks"}
SUFFIXES = {"calendar": ".ics", "contacts": ".vcf", "tasks": ".ics"}
PAGE, CHUNK = 200, 20
PRODID = "-//mailmerge-gov//Exchange export//VI"
TASK_FIELDS = ("subject", "body", "status", "percent_complete", "due_date", "start_date", "complete_date",
               "importance", "categories", "datetime_created")
# EWS task status -> iCalendar VTODO STATUS (RFC 5545 3.8.1.11)
_STATUS = {"NotStarted": "NEEDS-ACTION", "InProgress": "IN-PROCESS", "Completed": "COMPLETED",
           "WaitingOnOthers": "NEEDS-ACTION", "Deferred": "CANCELLED"}
_PRIORITY = {"High": "1", "Normal": "5", "Low": "9"}
_mime = email.parser.BytesParser(policy=email.policy.default)


def folder_kind(folder_class: str | None) -> str | None:
    """The kind of file a folder class is exported to, or None for mail and for folders that are not exported."""
    if not folder_class:
        return None
    return next((kind for prefix, kind in KINDS.items()
                 if folder_class == prefix or folder_class.startswith(prefix + ".")), None)


@dataclass(frozen=True)
class ExportText:
    """A folder's export: the file's text, the items in it, the items the server could not give."""

    text: str
    items: int
    failed: int


def export_folder(account: Account, folder: Folder, kind: str, name: str) -> ExportText:
    """Read every item of a calendar, contact or task folder and return the file's text."""
    ids = FolderCollection(account=account, folders=[folder]).find_items(Q(), shape=ID_ONLY, page_size=PAGE)
    fields = TASK_FIELDS if kind == "tasks" else ("mime_content",)
    parts: list[str] = []
    failed = 0
    for item in account.fetch(ids=ids, folder=folder, only_fields=fields, chunk_size=CHUNK):
        if isinstance(item, ews_errors.ErrorItemNotFound):
            continue  # deleted while the folder was read
        if isinstance(item, Exception):
            failed += 1
            log.warning("%s: folder %r: an item cannot be exported: %s", account.primary_smtp_address, name, item)
            continue
        if kind == "tasks":
            parts.append(_vtodo(item))
            continue
        text = _unwrap(item.mime_content, "text/calendar" if kind == "calendar" else "text/vcard")
        if text is None:
            failed += 1
            log.warning("%s: folder %r: item %s has no %s content", account.primary_smtp_address, name, item.id,
                        kind)
            continue
        parts.append(text)
    if kind == "contacts":
        text = "".join(_refold(card) for card in parts)
    elif kind == "calendar":
        text = _calendar(parts)
    else:
        text = _calendar([], parts)
    return ExportText(text, len(parts), failed)


def _unwrap(content: bytes | str | None, wanted: str) -> str | None:
    """The iCalendar or vCard text of an item's MIME content: as Exchange gives it, or the part of that type when
    it comes wrapped in a MIME message."""
    if content is None:
        return None
    raw = content.encode("utf-8") if isinstance(content, str) else content
    head = raw.lstrip()[:20].upper()
    if head.startswith(b"BEGIN:VCALENDAR") or head.startswith(b"BEGIN:VCARD"):
        return raw.decode("utf-8", errors="replace")
    for part in _mime.parsebytes(raw).walk():
        if part.get_content_type() in (wanted, "text/x-vcard", "text/directory") and not part.is_multipart():
            return str(part.get_content())
    return None


def _refold(text: str) -> str:
    """Content lines unfolded and folded again at 75 octets with CRLF line ends (RFC 5545 3.1, RFC 6350 3.2):
    a server that folds by characters gives longer lines for Vietnamese text."""
    return "".join(fold(_unfold(logical)) for logical in _logical_lines(text))


def _unfold(logical: list[str]) -> str:
    """One content line from its folded lines."""
    return "".join(part[1:] if n else part for n, part in enumerate(logical))


def _logical_lines(text: str) -> Iterator[list[str]]:
    """The content lines of an iCalendar text, each with its folded continuation lines."""
    current: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line[:1] in (" ", "\t") and current:
            current.append(line)
            continue
        if current:
            yield current
        current = [line] if line else []
    if current:
        yield current


def _components(text: str) -> Iterator[tuple[str, list[str], str]]:
    """The top-level components of the VCALENDARs of a text: (name, their lines unfolded, TZID of a VTIMEZONE)."""
    depth, name, lines, tzid = 0, "", [], ""
    for logical in _logical_lines(text):
        unfolded = _unfold(logical)
        upper = unfolded.upper()
        if upper.startswith("BEGIN:"):
            depth += 1
            if depth == 2:
                name, lines, tzid = upper[6:].strip(), [], ""
        if depth >= 2:
            lines.append(unfolded)
            if depth == 2 and upper.startswith("TZID:"):
                tzid = unfolded[5:].strip()
        if upper.startswith("END:"):
            if depth == 2:
                yield name, lines, tzid
            depth -= 1


def _calendar(calendars: Iterable[str], todos: Iterable[str] = ()) -> str:
    """One VCALENDAR holding the events of several (each time zone once) and the given VTODO texts."""
    zones: dict[str, list[str]] = {}
    events: list[list[str]] = []
    for text in calendars:
        for name, lines, tzid in _components(text):
            if name == "VTIMEZONE":
                zones.setdefault(tzid, lines)
            else:
                events.append(lines)
    out = ["BEGIN:VCALENDAR", "VERSION:2.0", f"PRODID:{PRODID}", "METHOD:PUBLISH"]
    for lines in list(zones.values()) + events:
        out.extend(lines)
    return "".join(fold(line) for line in out) + "".join(todos) + "END:VCALENDAR\r\n"


def _vtodo(task: Any) -> str:
    """A VTODO component from an exchangelib Task."""
    lines = ["BEGIN:VTODO", f"UID:{_uid(task.id)}"]
    created = getattr(task, "datetime_created", None)
    stamp = created if created is not None else dt.datetime.now(dt.timezone.utc)
    lines.append(f"DTSTAMP:{_utc(stamp)}")
    lines.append(f"SUMMARY:{escape_text(task.subject or '')}")
    if getattr(task, "body", None):
        lines.append(f"DESCRIPTION:{escape_text(str(task.body))}")
    for prop, value in (("DTSTART", task.start_date), ("DUE", task.due_date)):
        if value is not None:
            lines.append(f"{prop};VALUE=DATE:{value.strftime('%Y%m%d')}")
    if task.complete_date is not None:
        lines.append(f"COMPLETED:{_utc(task.complete_date)}")
    if task.status:
        lines.append(f"STATUS:{_STATUS.get(task.status, 'NEEDS-ACTION')}")
    if task.percent_complete is not None:
        lines.append(f"PERCENT-COMPLETE:{int(task.percent_complete)}")
    if task.importance in _PRIORITY:
        lines.append(f"PRIORITY:{_PRIORITY[task.importance]}")
    if task.categories:
        lines.append("CATEGORIES:" + ",".join(escape_text(c) for c in task.categories))
    lines.append("END:VTODO")
    return "".join(fold(line) for line in lines)


def _uid(item_id: str) -> str:
    """A UID for a task: its EWS item id, which is unique in the mailbox and stable."""
    return item_id.replace("\r", "").replace("\n", "")


def _utc(when: dt.datetime) -> str:
    """A UTC DATE-TIME (exchangelib's EWSDateTime converts only to its own time zones: go by the timestamp)."""
    return dt.datetime.fromtimestamp(when.timestamp(), dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


__all__ = ["ExportText", "KINDS", "SUFFIXES", "export_folder", "folder_kind"]
