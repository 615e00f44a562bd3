"""Mail stores in mbox files (read only): one file, or a directory of them as Thunderbird keeps them.

Standard library only, but not the mailbox module: mailbox.mbox splits on every "From " line (a body
line in a file written without quoting splits a message), does not undo ">From " quoting, and reads
line by line where a regular-expression scan over an mmap is many times faster on a multi-gigabyte
Google Takeout export.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import mmap
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from mailmerge_gov.migration.maildir import INBOX, SEPARATOR, UTC, _date_of_mtime, _parents, sort_flags
from mailmerge_gov.migration.protocol import FolderInfo, FolderStatus, MailboxError, Message, MessageInfo

__all__ = ["MboxStore", "open_mbox"]

_READ_ONLY = "mbox stores are read-only"
# A separator is a "From " line at the start of the file or after an empty line. Every mbox writer
# (mboxo, mboxrd, Thunderbird, Google Takeout) writes that empty line and quotes body lines that start
# with "From ", so a stray unquoted "From " inside a paragraph does not split a message.
_FROM_LINE = re.compile(rb"^From ", re.MULTILINE)
# mboxrd quoting: a body line ">From ", ">>From " ... was written with one more ">" than it had.
# Undone for mboxo files too: there only "From " -> ">From " was quoted, so a body line that really
# began with ">From " reads back as "From " -- mboxo's own loss, which no reader can undo.
_QUOTED = re.compile(rb"^>(>*From )", re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_HEADER = re.compile(rb"^(status|x-status|x-mozilla-status|date):[ \t]*(.*(?:\r?\n[ \t].*)*)",
                     re.MULTILINE | re.IGNORECASE)
_MBOX_LETTERS = {"R": "\\Seen", "A": "\\Answered", "F": "\\Flagged", "D": "\\Deleted", "T": "\\Draft"}
# Thunderbird's X-Mozilla-Status bits (nsMsgMessageFlags): read, replied, marked, expunged, forwarded
_MOZILLA_BITS = {0x0001: "\\Seen", 0x0002: "\\Answered", 0x0004: "\\Flagged", 0x0008: "\\Deleted",
                 0x1000: "$Forwarded"}
_FROM_DATE_FORMATS = ("%a %b %d %H:%M:%S %Y", "%a %b %d %H:%M %Y", "%a %b %d %H:%M:%S %z %Y",
                      "%a %b %d %H:%M:%S %Y %z", "%a %b %d %H:%M:%S %Z %Y")
_UIDVALIDITY_SAMPLE = 65536  # bytes of the first message that go into the mbox UIDVALIDITY


@dataclass(frozen=True)
class _MboxEntry:
    """Where one message lies in an mbox file, and what its headers say."""

    start: int  # just after the "From " line
    end: int  # before the empty line that precedes the next "From " line
    info: MessageInfo


def _from_line_date(line: bytes) -> dt.datetime | None:
    """Return the date of a "From sender date" line as UTC, None when it has none that parses."""
    words = line.decode("latin-1").split()[2:]  # "From", sender, then the asctime date
    text = " ".join(words)
    for fmt in _FROM_DATE_FORMATS:
        try:
            when = dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def _mbox_flags(headers: dict[str, str]) -> tuple[str, ...]:
    """Return the flags of Status:, X-Status: and X-Mozilla-Status: (O, "old", is no IMAP flag)."""
    flags = {_MBOX_LETTERS[c] for c in headers.get("status", "") + headers.get("x-status", "") if c in _MBOX_LETTERS}
    try:
        bits = int(headers.get("x-mozilla-status", "0").strip() or "0", 16)
    except ValueError:
        bits = 0
    flags |= {flag for bit, flag in _MOZILLA_BITS.items() if bits & bit}
    return sort_flags(flags)


class MboxStore:
    """A read-only store of mbox files: one file (as INBOX) or a directory of them, each a folder."""

    def __init__(self, path: Path, files: dict[str, Path]) -> None:
        """Use the given folder name -> mbox file map (see open_mbox)."""
        self.path = path
        self._files = files
        self._tocs: dict[str, tuple[tuple[int, int, int], list[_MboxEntry]]] = {}

    def __repr__(self) -> str:
        return f"MboxStore({str(self.path)!r})"

    @property
    def separator(self) -> str:
        """The hierarchy separator of folder names: "/"."""
        return SEPARATOR

    def folders(self) -> list[FolderInfo]:
        """List every mbox file as a folder; directories without a file of their own are not selectable."""
        names = set(self._files)
        parents = _parents(names)
        return [FolderInfo(n, SEPARATOR, None, selectable=n in names)
                for n in sorted(names | parents, key=lambda n: (n != INBOX, n))]

    def _file(self, folder: str) -> Path:
        """Return the mbox file of a folder; MailboxError naming it when there is none."""
        path = self._files.get(INBOX if folder.upper() == INBOX else folder)
        if path is None:
            raise MailboxError(f"mbox {self.path}: folder {folder!r} does not exist")
        return path

    def _toc(self, folder: str) -> list[_MboxEntry]:
        """Return the messages of a folder's file, scanned again only when the file has changed."""
        path = self._file(folder)
        try:
            st = path.stat()
        except OSError as exc:
            raise MailboxError(f"mbox {path}: {exc.strerror}") from exc
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._tocs.get(folder)
        if cached and cached[0] == stamp:
            return cached[1]
        entries = self._scan(path, st.st_mtime_ns) if st.st_size else []
        self._tocs[folder] = (stamp, entries)
        return entries

    @staticmethod
    def _scan(path: Path, mtime_ns: int) -> list[_MboxEntry]:
        """Find every message of an mbox file: bounds, size after unquoting, flags, date."""
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:5] != b"From ":
                raise MailboxError(f"mbox {path}: not an mbox file (it does not begin with a \"From \" line)")
            starts = [m.start() for m in _FROM_LINE.finditer(mm)
                      if m.start() == 0 or mm[m.start() - 2 : m.start()] == b"\n\n"
                      or mm[m.start() - 3 : m.start()] == b"\n\r\n"]
            entries = []
            for i, sep in enumerate(starts):
                line_end = mm.find(b"\n", sep)
                start = len(mm) if line_end < 0 else line_end + 1
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    end = nxt - (2 if mm[nxt - 3 : nxt] == b"\n\r\n" else 1)  # drop the empty line
                else:
                    end = len(mm)
                    # the writer's empty line after the last message
                    if mm[end - 4 : end] == b"\r\n\r\n":
                        end -= 2
                    elif mm[end - 2 : end] == b"\n\n":
                        end -= 1
                end = max(end, start)
                head_end = _HEADER_END.search(mm, start, end)
                head = mm[start : head_end.start() if head_end else end]
                headers: dict[str, str] = {}
                for m in _HEADER.finditer(head):
                    headers.setdefault(m[1].decode("ascii").lower(), m[2].decode("latin-1"))
                quoted = sum(1 for _ in _QUOTED.finditer(mm, start, end))
                when = _from_line_date(mm[sep:start])
                if when is None and "date" in headers:
                    try:
                        when = email.utils.parsedate_to_datetime(" ".join(headers["date"].split()))
                    except (TypeError, ValueError, IndexError):
                        when = None
                    if when is not None and when.tzinfo is None:
                        when = when.replace(tzinfo=UTC)
                if when is None:
                    when = _date_of_mtime(mtime_ns)  # no date anywhere: the file's own
                info = MessageInfo(key=str(i), uid=None, size=end - start - quoted,
                                   flags=_mbox_flags(headers), internal_date=when.astimezone(UTC))
                entries.append(_MboxEntry(start, end, info))
            return entries

    def status(self, folder: str) -> FolderStatus:
        """Return a UIDVALIDITY from the file's inode and its first message, and the message count."""
        entries = self._toc(folder)
        path = self._file(folder)
        # Keys are positions in the file. Appending keeps them, so size and mtime (which appends change)
        # would signal resets that did not happen. A rewrite that drops messages is what breaks them:
        # mail clients compact by writing a new file and renaming it (a new inode); deleting the first
        # message changes the sample. A rewrite in place that drops a later message goes unnoticed.
        sample = b""
        if entries:
            first = entries[0]
            with open(path, "rb") as f:
                f.seek(first.start)
                sample = f.read(min(first.end - first.start, _UIDVALIDITY_SAMPLE))
        validity = zlib.crc32(sample, zlib.crc32(str(path.stat().st_ino).encode())) or 1
        return FolderStatus(uidvalidity=validity, uidnext=None, highestmodseq=None, messages=len(entries))

    def list_messages(self, folder: str, after_uid: int = 0) -> list[MessageInfo]:
        """List every message in file order (mbox has no UIDs: after_uid is ignored)."""
        return [e.info for e in self._toc(folder)]

    def fetch(self, folder: str, keys: Sequence[str]) -> Iterator[Message]:
        """Yield messages as stored minus the "From " line, ">From " quoting undone; unknown keys skipped."""
        # Everything else stays as stored, Status: and X-Status: headers included: the copy is the
        # evidence of what the old system held, so nothing is rewritten that need not be.
        entries = self._toc(folder)
        with open(self._file(folder), "rb") as f:
            for key in keys:
                if not key.isdigit() or int(key) >= len(entries):
                    continue
                entry = entries[int(key)]
                f.seek(entry.start)
                raw = _QUOTED.sub(rb"\1", f.read(entry.end - entry.start))
                yield Message(entry.info, raw)

    def create_folder(self, folder: str) -> None:
        """Refuse: mbox stores are read-only."""
        raise MailboxError(_READ_ONLY)

    def append(self, folder: str, messages: Sequence[Message]) -> list[str | None]:
        """Refuse: mbox stores are read-only."""
        raise MailboxError(_READ_ONLY)

    def set_flags(self, folder: str, key: str, flags: Sequence[str]) -> None:
        """Refuse: mbox stores are read-only."""
        raise MailboxError(_READ_ONLY)

    def changed_since(self, folder: str, modseq: int) -> dict[str, tuple[str, ...]]:
        """Return {}: mbox has no mod-sequences."""
        return {}

    def append_limit(self) -> int | None:
        """Return None: nothing is appended to an mbox store."""
        return None

    def close(self) -> None:
        """Forget the scanned tables of contents."""
        self._tocs.clear()


def _is_mbox_file(path: Path) -> bool:
    """Tell whether a file is an mbox: empty (an empty folder, as Thunderbird leaves it) or "From " first."""
    try:
        with open(path, "rb") as f:
            head = f.read(5)
    except OSError:
        return False
    return head in (b"", b"From ")


def open_mbox(path: Path) -> MboxStore:
    """Return a read-only store of one mbox file (its folder is INBOX) or of a directory of mbox files."""
    path = Path(path)
    if path.is_file():
        # One file is one account's mail (an export, a spool file): it goes to INBOX like a spool does.
        return MboxStore(path, {INBOX: path})
    if not path.is_dir():
        raise MailboxError(f"mbox {path} does not exist")
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(path).parts
        # Thunderbird keeps the sub-folders of "X" in "X.sbd/"; the suffix is no part of the name
        parent = [p.removesuffix(".sbd") for p in rel_dir]
        for name in sorted(filenames):
            # dot files and Thunderbird's .msf indexes are never mail; other files must look like mbox
            if name.startswith(".") or name.endswith(".msf") or not _is_mbox_file(Path(dirpath) / name):
                continue
            parts = [*parent, name]
            if parts[0].upper() == INBOX:
                parts[0] = INBOX  # Thunderbird's "Inbox" is the account's INBOX
            files[SEPARATOR.join(parts)] = Path(dirpath) / name
    return MboxStore(path, files)
