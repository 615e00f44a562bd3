"""Mail stores on disk: Maildir++ as Dovecot writes it, read and written (mbox files: mbox.py).

Standard library only. The mailbox module is not used: mailbox.Maildir re-lists every folder on each
lookup (_refresh), knows neither modified UTF-7 folder names nor Dovecot's ",S=" sizes and keyword
files, and its add() neither fsyncs nor sets the file's mtime to the message's date.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import fcntl
import itertools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from mailmerge_gov.migration.protocol import FolderInfo, FolderStatus, MailboxError, Message, MessageInfo

__all__ = ["MaildirStore", "open_maildir"]

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
SEPARATOR = "/"  # what callers see; on disk Maildir++ uses "."
INBOX = "INBOX"

# Flags in the order every store of this module reports them (tests compare tuples).
_FLAG_ORDER = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Forwarded")

# --- modified UTF-7 (RFC 3501 5.1.3) ---------------------------------------------------------


def encode_mutf7(text: str) -> str:
    """Return text in IMAP modified UTF-7, as Dovecot names Maildir++ folders on disk."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_mutf7(text: str) -> str:
    """Return the Unicode text of a modified UTF-7 name; ValueError when it is not valid."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "&":
            if not " " <= ch <= "~":
                raise ValueError(f"not modified UTF-7: {text!r}")
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError(f"not modified UTF-7: {text!r}")
        chunk = text[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            try:
                data = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                decoded = data.decode("utf-16-be")
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"not modified UTF-7: {text!r}") from exc
            out.append(decoded)
        i = end + 1
    return "".join(out)


# --- Maildir++ folder names ------------------------------------------------------------------

# Maildir++ uses "." as its hierarchy separator and Dovecot refuses a "." inside a folder name
# ("Character not allowed in mailbox name: '.'", measured with Dovecot 2.3). Vietnamese folder names
# do carry dots ("V.v. tuyển dụng", "Quý 1.2024"), and refusing would leave such a folder behind, so a
# "." in a caller's name is stored as U+2024 ONE DOT LEADER, which looks like a full stop in a mail
# client, and read back as "." so that create -> folders() -> append round-trips. The price: a real
# U+2024 in an on-disk name (nobody types it) also reads back as ".".
DOT_SUBSTITUTE = "\u2024"


def folder_dir_name(folder: str) -> str:
    """Return the Maildir++ directory name of a folder ("" for INBOX); MailboxError for an unusable name."""
    if folder.upper() == INBOX:
        return ""
    parts = folder.split(SEPARATOR)
    if any(not p for p in parts) or any("\0" in p for p in parts):
        raise MailboxError(f"not a usable folder name: {folder!r}")
    return "." + ".".join(encode_mutf7(p.replace(".", DOT_SUBSTITUTE)) for p in parts)


def folder_of_dir_name(name: str) -> str | None:
    """Return the folder a ".x.y" directory holds, None when the name is no Maildir++ folder."""
    if not name.startswith(".") or name in (".", ".."):
        return None
    parts = name[1:].split(".")
    if any(not p for p in parts):
        return None
    decoded = []
    for part in parts:
        try:
            text = decode_mutf7(part)
        except ValueError:
            # Written by something other than Dovecot (raw UTF-8, a stray "&"): shown as it is on disk;
            # MaildirStore finds its directory again by listing (see _folder_path).
            text = part
        decoded.append(text.replace(DOT_SUBSTITUTE, "."))
    return SEPARATOR.join(decoded)


# --- Maildir file names ------------------------------------------------------------------------

_SIZE_IN_NAME = re.compile(r",S=(\d+)")
# Maildir info letters (cr.yp.to/proto/maildir.html). P ("passed": resent, forwarded, bounced) is read
# as $Forwarded, the IMAP keyword with that meaning: the example Maildirs carry it, and Dovecot keeps it
# in the name but shows nothing (measured). $Forwarded is written as a Dovecot keyword letter instead,
# which is what Dovecot itself writes and shows.
_FLAG_OF_LETTER = {"S": "\\Seen", "R": "\\Answered", "F": "\\Flagged", "T": "\\Deleted", "D": "\\Draft",
                   "P": "$Forwarded"}
_LETTER_OF_FLAG = {flag: letter for letter, flag in _FLAG_OF_LETTER.items() if letter != "P"}
_MAX_KEYWORDS = 26  # Dovecot's letters a-z; further keywords live only in its index, not in file names


def split_file_name(name: str) -> tuple[str, str]:
    """Return (key, info letters) of a Maildir file name; the key is the unique part before ":2,"."""
    key, _, info = name.partition(":")
    return key, info[2:] if info.startswith("2,") else ""


def sort_flags(flags: set[str]) -> tuple[str, ...]:
    """Return flags in the module's fixed order: system flags first, then keywords by name."""
    known = [f for f in _FLAG_ORDER if f in flags]
    return (*known, *sorted(flags - set(_FLAG_ORDER)))


def _host_part() -> str:
    """Return this host's name as a Maildir file name may carry it (qmail's escapes for "/" and ":")."""
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


_COUNTER = itertools.count()  # next() on a count is atomic under the GIL: unique per process


def _new_key(when: dt.datetime, size: int) -> str:
    """Return a fresh unique Maildir name (no info part) for a message delivered at `when`."""
    # The time part is the message's own date, not the copy's: keys then sort chronologically as
    # Dovecot's do (list_messages sorts by key). Uniqueness comes from the rest: the microseconds of
    # now, the pid, a per-process counter and the host; the link in _deliver never overwrites anyway.
    seconds = max(0, int(when.timestamp()))
    micros = time.time_ns() // 1000 % 1_000_000
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_COUNTER)}.{_host_part()},S={size}"


def _parents(names: set[str]) -> set[str]:
    """Return every proper ancestor of the given "/"-separated folder names."""
    return {SEPARATOR.join(n.split(SEPARATOR)[:i]) for n in names for i in range(1, n.count(SEPARATOR) + 1)}


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk, so that a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on a folder directory while its dovecot-keywords is changed."""
    # Two jobs may write one target mailbox at once (an official with mailboxes in two old units, the
    # batch runner's threads): a keyword letter given twice would name the wrong keyword. flock on the
    # directory serialises threads (each opens its own descriptor) and processes alike.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _mtime_of(when: dt.datetime) -> int:
    """Return a datetime as nanoseconds since the epoch, exactly (no float rounding)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // dt.timedelta(microseconds=1) * 1000


def _date_of_mtime(ns: int) -> dt.datetime:
    """Return an mtime in nanoseconds as an aware UTC datetime (microseconds kept)."""
    return _EPOCH + dt.timedelta(microseconds=ns // 1000)


def _inode_value(ino: int) -> int:
    """Fold an inode number into a non-zero 32-bit UIDVALIDITY."""
    return ((ino >> 32) ^ ino) & 0xFFFFFFFF or 1


@dataclass(frozen=True)
class _File:
    """One message file found in a folder."""

    sub: str  # "cur" or "new"
    name: str
    size: int
    mtime_ns: int


class MaildirStore:
    """One account's Maildir++ (INBOX at the root, sub-folders as ".a.b" directories)."""

    def __init__(self, path: Path) -> None:
        """Use the Maildir at path (see open_maildir)."""
        self.path = path
        # folder directory -> key -> file: lets fetch/set_flags find a file without listing the folder
        # again for every message; refreshed when a file has moved (flags changed, new -> cur)
        self._index: dict[Path, dict[str, _File]] = {}

    def __repr__(self) -> str:
        return f"MaildirStore({str(self.path)!r})"

    @property
    def separator(self) -> str:
        """The hierarchy separator callers use: "/" (on disk it is ".")."""
        return SEPARATOR

    # --- folders -----------------------------------------------------------------------------

    def _folder_dirs(self) -> dict[str, str]:
        """Return folder name -> directory name for every ".x" directory."""
        found: dict[str, str] = {}
        try:
            entries = list(os.scandir(self.path))
        except OSError as exc:
            raise MailboxError(f"Maildir {self.path}: cannot list folders: {exc.strerror}") from exc
        for entry in entries:
            folder = folder_of_dir_name(entry.name)
            # A ".INBOX" directory would claim INBOX, which is the root in Maildir++; Dovecot never
            # writes one, so it is left out rather than shown twice.
            if folder is None or folder.upper() == INBOX or not entry.is_dir():
                continue
            found[folder] = entry.name
        return found

    def _folder_path(self, folder: str) -> Path:
        """Return the directory of an existing folder; MailboxError naming it when there is none."""
        path = self.path / folder_dir_name(folder)
        if path.is_dir():
            return path
        # a directory whose name is not valid modified UTF-7 is listed under its raw name
        dir_name = self._folder_dirs().get(folder)
        if dir_name is None:
            raise MailboxError(f"Maildir {self.path}: folder {folder!r} does not exist")
        return self.path / dir_name

    def folders(self) -> list[FolderInfo]:
        """List INBOX and every folder; parents that exist only as a prefix are listed not selectable."""
        names = set(self._folder_dirs())
        # ".a.b" without ".a": Dovecot lists "a" as \Noselect; the same here, so that a mapping sees it
        parents = _parents(names) - {INBOX}  # "INBOX/x" has the root INBOX as its parent
        infos = [FolderInfo(INBOX, SEPARATOR)]
        for name in sorted(names | parents):
            infos.append(FolderInfo(name, SEPARATOR, None, selectable=name in names))
        return infos

    def create_folder(self, folder: str) -> None:
        """Create a folder with cur/new/tmp and its parents as real folders; nothing when it exists."""
        parts = folder.split(SEPARATOR)
        folder_dir_name(folder)  # validates every part before anything is created
        # "INBOX/x" is ".INBOX.x" whose parent is the root, not a ".INBOX" directory
        chain = [folder_dir_name(SEPARATOR.join(parts[:i])) for i in range(1, len(parts) + 1)]
        try:
            for dir_name in chain:
                path = self.path / dir_name
                # 0700: officials' mail is private; Dovecot's default mode for Maildirs too
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                for sub in ("cur", "new", "tmp"):
                    (path / sub).mkdir(mode=0o700, exist_ok=True)
                if dir_name:
                    (path / "maildirfolder").touch(mode=0o600, exist_ok=True)
        except OSError as exc:
            raise MailboxError(f"Maildir {self.path}: cannot create folder {folder!r}: {exc.strerror}") from exc

    # --- reading -----------------------------------------------------------------------------

    def status(self, folder: str) -> FolderStatus:
        """Return the folder's UIDVALIDITY (its directory's inode) and message count."""
        path = self._folder_path(folder)
        # Keys here are unique file names, never reused, so UIDVALIDITY only has to change when the
        # folder itself is replaced. The directory's inode does exactly that: it survives new mail,
        # flag changes and Dovecot creating its own files, where the ctime (changes with every entry
        # added) or dovecot-uidlist (appears when Dovecot first opens the folder, renewed when Dovecot
        # rebuilds it, and unrelated to these keys) would signal resets that did not happen.
        validity = _inode_value(path.stat().st_ino)
        return FolderStatus(uidvalidity=validity, uidnext=None, highestmodseq=None,
                            messages=len(self._scan(path)))

    def _scan(self, path: Path) -> dict[str, _File]:
        """List the message files of a folder directory (a missing cur/ or new/ is empty)."""
        found: dict[str, _File] = {}
        for sub in ("new", "cur"):  # cur last: a file seen in both (a move caught halfway) is the cur one
            try:
                entries = list(os.scandir(path / sub))
            except FileNotFoundError:
                continue  # git keeps no empty directories; Dovecot re-creates them when needed
            except OSError as exc:
                raise MailboxError(f"Maildir {path}: cannot list {sub}/: {exc.strerror}") from exc
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # Maildir readers skip dot files (editors, rsync temporaries)
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # renamed or removed while listing
                key, _ = split_file_name(entry.name)
                found[key] = _File(sub, entry.name, st.st_size, st.st_mtime_ns)
        self._index[path] = found
        return found

    @staticmethod
    def _keywords(path: Path) -> list[str]:
        """Return the folder's Dovecot keywords by letter index (dovecot-keywords), [] when none."""
        try:
            text = (path / "dovecot-keywords").read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        names: list[str] = [""] * _MAX_KEYWORDS
        for line in text.splitlines():
            index, _, name = line.partition(" ")
            if index.isdigit() and int(index) < _MAX_KEYWORDS and name:
                names[int(index)] = name
        while names and not names[-1]:
            names.pop()
        return names

    @staticmethod
    def _info(file: _File, keywords: list[str]) -> MessageInfo:
        """Return the MessageInfo of one file: size from ",S=", flags from the info part, date from mtime."""
        key, letters = split_file_name(file.name)
        flags: set[str] = set()
        for letter in letters:
            if letter in _FLAG_OF_LETTER:
                flags.add(_FLAG_OF_LETTER[letter])
            elif "a" <= letter <= "z":
                index = ord(letter) - ord("a")
                if index < len(keywords) and keywords[index]:
                    flags.add(keywords[index])
        size = _SIZE_IN_NAME.search(key)
        return MessageInfo(key=key, uid=None, size=int(size[1]) if size else file.size,
                           flags=sort_flags(flags), internal_date=_date_of_mtime(file.mtime_ns))

    def list_messages(self, folder: str, after_uid: int = 0) -> list[MessageInfo]:
        """List every message sorted by key (Maildir has no UIDs: after_uid is ignored)."""
        path = self._folder_path(folder)
        files = self._scan(path)
        keywords = self._keywords(path)
        return [self._info(files[key], keywords) for key in sorted(files)]

    def _locate(self, path: Path, key: str, rescan: bool = False) -> _File | None:
        """Return the file of a key, listing the folder again when it is not (or no longer) known."""
        index = self._index.get(path)
        if index is None or rescan or key not in index:
            index = self._scan(path)
        return index.get(key)

    def fetch(self, folder: str, keys: Sequence[str]) -> Iterator[Message]:
        """Yield the messages with these keys, raw bytes as on disk; a key gone since listing is skipped, as IMAP does."""
        path = self._folder_path(folder)
        keywords = self._keywords(path)
        for key in keys:
            for attempt in range(2):
                file = self._locate(path, key, rescan=attempt > 0)
                if file is None:
                    break
                try:
                    raw = (path / file.sub / file.name).read_bytes()
                except FileNotFoundError:
                    continue  # flags changed (the name moved) between listing and reading: look again
                yield Message(self._info(file, keywords), raw)
                break

    # --- writing -----------------------------------------------------------------------------

    def _letters(self, path: Path, flags: Sequence[str]) -> str:
        """Return the info letters of flags, adding new keywords to the folder's dovecot-keywords."""
        if not any(f not in _LETTER_OF_FLAG and not f.startswith("\\") for f in flags):
            return "".join(sorted(_LETTER_OF_FLAG[f] for f in set(flags) if f in _LETTER_OF_FLAG))
        with _folder_lock(path):
            return self._letters_locked(path, flags)

    def _letters_locked(self, path: Path, flags: Sequence[str]) -> str:
        """Do _letters' work while holding the folder's lock (dovecot-keywords is read, changed, written)."""
        letters: set[str] = set()
        keywords = self._keywords(path)
        added = False
        for flag in flags:
            if flag in _LETTER_OF_FLAG:
                letters.add(_LETTER_OF_FLAG[flag])
                continue
            if flag.startswith("\\"):
                continue  # \Recent and unknown system flags have no place on disk
            folded = [k.casefold() for k in keywords]  # IMAP keywords are case-insensitive
            if flag.casefold() in folded:
                index = folded.index(flag.casefold())
            elif "" in keywords:
                index = keywords.index("")
                keywords[index] = flag
                added = True
            elif len(keywords) < _MAX_KEYWORDS:
                index = len(keywords)
                keywords.append(flag)
                added = True
            else:
                continue  # a 27th keyword: Dovecot would keep it only in its index; dropped here
            letters.add(chr(ord("a") + index))
        if added:
            text = "".join(f"{i} {name}\n" for i, name in enumerate(keywords) if name)
            tmp = path / f".dovecot-keywords.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path / "dovecot-keywords")
        # ASCII order, as Maildir wants: system letters (upper case) before keyword letters
        return "".join(sorted(letters))

    def append(self, folder: str, messages: Sequence[Message]) -> list[str | None]:
        """Deliver messages into the folder's cur/ with their flags and dates; return their keys."""
        path = self._folder_path(folder)
        try:
            for sub in ("cur", "new", "tmp"):
                (path / sub).mkdir(mode=0o700, exist_ok=True)  # a folder copied through git may lack them
            keys: list[str | None] = []
            for message in messages:
                keys.append(self._deliver(path, message))
            if messages:
                # one directory flush for the batch: the keys are returned only once every entry is durable
                _fsync_dir(path / "cur")
        except OSError as exc:
            raise MailboxError(f"Maildir {self.path}: cannot append to {folder!r}: {exc.strerror}") from exc
        return keys

    def _deliver(self, path: Path, message: Message) -> str:
        """Write one message to tmp/, flush it, date it, and link it into cur/; return its key."""
        letters = self._letters(path, message.info.flags)
        mtime = _mtime_of(message.info.internal_date)
        while True:
            key = _new_key(message.info.internal_date, len(message.raw))
            tmp = path / "tmp" / key
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            break
        try:
            try:
                view = memoryview(message.raw)
                while view:
                    view = view[os.write(fd, view):]
                # the content reaches the disk before the name appears in cur/: a crash (kill -9, power)
                # can leave a file in tmp/, never half a message in cur/
                os.fsync(fd)
            finally:
                os.close(fd)
            os.utime(tmp, ns=(mtime, mtime))  # Dovecot's INTERNALDATE is the mtime; a rename keeps it
            while True:
                target = path / "cur" / f"{key}:2,{letters}"
                try:
                    # link, not rename: it fails on an existing name instead of replacing another message
                    os.link(tmp, target)
                except FileExistsError:
                    key = _new_key(message.info.internal_date, len(message.raw))
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    if target.exists():  # no hard links here (some network file systems): rename with care
                        key = _new_key(message.info.internal_date, len(message.raw))
                        continue
                    os.rename(tmp, target)
                break
        finally:
            tmp.unlink(missing_ok=True)
        index = self._index.get(path)
        if index is not None:
            index[key] = _File("cur", target.name, len(message.raw), mtime)
        return key

    def set_flags(self, folder: str, key: str, flags: Sequence[str]) -> None:
        """Replace the flags of one message by renaming its file (it moves to cur/ if it was in new/)."""
        path = self._folder_path(folder)
        file = self._locate(path, key)
        if file is None:
            raise MailboxError(f"Maildir {self.path}: folder {folder!r} has no message {key!r}")
        try:
            letters = self._letters(path, flags)
            name = f"{key}:2,{letters}"
            if (file.sub, file.name) == ("cur", name):
                return
            (path / "cur").mkdir(mode=0o700, exist_ok=True)
            os.rename(path / file.sub / file.name, path / "cur" / name)
            _fsync_dir(path / "cur")
            if file.sub != "cur":
                _fsync_dir(path / file.sub)
        except OSError as exc:
            raise MailboxError(f"Maildir {self.path}: cannot set flags of {key!r} in {folder!r}: {exc.strerror}") from exc
        self._index[path][key] = _File("cur", name, file.size, file.mtime_ns)

    def changed_since(self, folder: str, modseq: int) -> dict[str, tuple[str, ...]]:
        """Return {}: Maildir has no mod-sequences."""
        return {}

    def append_limit(self) -> int | None:
        """Return None: a Maildir takes messages of any size."""
        return None

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""


def open_maildir(root: Path, mailbox: str, create: bool = False) -> MaildirStore:
    """Return the Maildir++ store of root/mailbox; MailboxError naming the path when it does not exist."""
    if not mailbox or mailbox in (".", "..") or "/" in mailbox or "\0" in mailbox:
        raise MailboxError(f"Maildir root {root}: not a usable mailbox name: {mailbox!r}")
    path = Path(root) / mailbox
    if not path.is_dir():
        if path.exists():
            raise MailboxError(f"Maildir {path} is not a directory")
        if not create:
            raise MailboxError(f"Maildir {path} does not exist")
    store = MaildirStore(path)
    if create:
        store.create_folder(INBOX)
    return store
