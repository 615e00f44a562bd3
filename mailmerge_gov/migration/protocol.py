"""The one small protocol every mail store speaks to the migration: folders, messages, append."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

# RFC 6154 special-use attributes the migration maps between stores, in the order it prefers them.
SPECIAL_USES = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive")


class MailboxError(Exception):
    """A mailbox cannot be read or written; the message names the server, mailbox and folder."""


class ConnectionLost(MailboxError):
    """The server dropped the connection or timed out: worth a reconnect and a retry."""


class LoginFailed(MailboxError):
    """The server refused the login (wrong password, unknown mailbox): retrying will not help."""


class QuotaExceeded(MailboxError):
    """The target mailbox is over its quota: this mailbox stops, the others go on."""


class MessageRefused(MailboxError):
    """The target refused one message (too large, malformed): it is listed as skipped with the reason."""


@dataclass(frozen=True)
class FolderInfo:
    """A folder of a mail store, its name decoded (Unicode) and written with the store's separator."""

    name: str
    separator: str | None  # hierarchy separator, None for a flat store
    special_use: str | None = None  # "\\Sent", "\\Drafts" ... (RFC 6154), None when the store says none
    selectable: bool = True  # False for a \Noselect parent that only holds sub-folders


@dataclass(frozen=True)
class FolderStatus:
    """What a store says of one folder before it is read: enough to resume and to notice a reset."""

    uidvalidity: int  # a change means the keys of its messages no longer name the same messages
    uidnext: int | None  # the key the next message will get, when the store numbers them (IMAP)
    highestmodseq: int | None  # CONDSTORE (RFC 7162); None when the store has no mod-sequences
    messages: int


@dataclass(frozen=True)
class MessageInfo:
    """One message as listed, without its content."""

    key: str  # the store's name of the message: an IMAP UID as text, a Maildir unique name, an mbox index
    uid: int | None  # the IMAP UID (also set for stores that number their messages), else None
    size: int
    flags: tuple[str, ...]  # system flags and keywords as IMAP spells them (\Seen, $Forwarded ...), no \Recent
    internal_date: dt.datetime  # timezone-aware: IMAP INTERNALDATE, a Maildir file's delivery time


@dataclass(frozen=True)
class Message:
    """One message with its raw bytes, exactly as the store holds them."""

    info: MessageInfo
    raw: bytes


class MailStore(Protocol):
    """A mailbox of one account on one store: what the migration reads from and writes to."""

    @property
    def separator(self) -> str:
        """The hierarchy separator new folders are written with."""

    def folders(self) -> list[FolderInfo]:
        """List every folder, INBOX included."""

    def status(self, folder: str) -> FolderStatus:
        """Return the status of a folder; MailboxError if it does not exist."""

    def list_messages(self, folder: str, after_uid: int = 0) -> list[MessageInfo]:
        """List the messages of a folder (only those with a UID above after_uid, where the store has UIDs)."""

    def fetch(self, folder: str, keys: Sequence[str]) -> Iterator[Message]:
        """Yield the messages with these keys, with their raw bytes, in the order asked."""

    def create_folder(self, folder: str) -> None:
        """Create a folder (and its parents); nothing happens when it exists."""

    def append(self, folder: str, messages: Sequence[Message]) -> list[str | None]:
        """Append messages with their flags and dates; return the key each got, when the store says."""

    def set_flags(self, folder: str, key: str, flags: Sequence[str]) -> None:
        """Replace the flags of one message."""

    def changed_since(self, folder: str, modseq: int) -> dict[str, tuple[str, ...]]:
        """Return the flags of messages changed since a mod-sequence (CONDSTORE); {} where unsupported."""

    def append_limit(self) -> int | None:
        """Return the largest message the store accepts (IMAP APPENDLIMIT), None when unknown."""

    def close(self) -> None:
        """Log out and release the connection or files."""


@dataclass(frozen=True)
class FolderDelta:
    """What changed in a folder since a server-side sync state (EWS SyncFolderItems)."""

    messages: tuple[MessageInfo, ...]  # created and changed messages; every message when full
    deleted: tuple[str, ...]  # keys of messages gone from the folder
    state: str  # the sync state the next pass asks from
    full: bool  # True: listed from the beginning (no state given, or the server refused it as invalid or expired)


@runtime_checkable
class SyncsChanges(Protocol):
    """A store that can say what changed in a folder since a sync state: the engine then lists only that."""

    def changes(self, folder: str, state: str | None) -> FolderDelta:
        """Return the changes since a state (every message, full=True, without one or when it is refused)."""


@dataclass(frozen=True)
class ExportedFolder:
    """A folder that holds no mail (calendar, contacts, tasks), written to a file an administrator can import."""

    folder: str
    kind: str  # "calendar", "contacts" or "tasks"
    path: Path
    items: int
    failed: int = 0  # items the server could not give; named in the log


@runtime_checkable
class ExportsNotMail(Protocol):
    """A store whose calendar, contact and task folders can be written to .ics / .vcf files."""

    def export_not_mail(self, destination: Path) -> list[ExportedFolder]:
        """Write every calendar, contact and task folder into a file under destination; return them."""


@dataclass(frozen=True)
class ServerWaits:
    """How often, and for how many seconds in all, a server asked to back off (throttling) during a run."""

    server: str
    waits: int
    seconds: float
