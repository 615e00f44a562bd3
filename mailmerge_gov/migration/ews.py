"""The Exchange mail store: one mailbox on an Exchange server, through Exchange Web Services (exchangelib).

A mailbox is opened at the configured endpoint (no autodiscover) with the configured server version (no version
probe), by a service account through impersonation or delegate access, or by the mailbox itself with its own
password. Its mail folders are the folder tree under the message folder root ("Top of Information Store"):
Inbox is INBOX, the levels are joined with "/", and the distinguished Sent Items, Drafts, Deleted Items and Junk
Email folders carry their special use. Calendar, contact, task and note folders are listed as not selectable:
the migration copies no mail from them, and exports calendars, contacts and tasks to .ics / .vcf files
(ews_export.py).

A message's key is its EWS item id; its flags come from IsRead (\\Seen), the follow-up flag (PR_FLAG_STATUS,
\\Flagged), the last verb executed (PR_LAST_VERB_EXECUTED: reply \\Answered, forward $Forwarded), IsDraft
(\\Draft) and its categories (keywords); its date is DateTimeReceived. Messages are written from their MIME
content with PR_MESSAGE_FLAGS (not a draft, read or unread) and PR_MESSAGE_DELIVERY_TIME (the received time).

Exchange throttles with ErrorServerBusy and a back-off time: exchangelib waits and retries (FaultTolerance), for
at most `max_backoff` seconds in total per request; the waits are counted per store (the store whose request
waited) and logged.

A second pass asks SyncFolderItems for what changed since the sync state of the last complete pass (`changes`);
a state the server refuses (ErrorInvalidSyncStateData: expired, or of another folder) gives a full listing.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import requests
import requests.adapters
from exchangelib import BASIC, DELEGATE, IMPERSONATION, NTLM, Account, Build, Configuration, Credentials, Version
from exchangelib import errors as ews_errors
from exchangelib.extended_properties import ExtendedProperty
from exchangelib.ewsdatetime import UTC
from exchangelib.fields import FieldOrder, FieldPath
from exchangelib.folders import (DeletedItems, Drafts, Folder, FolderCollection, Inbox, JunkEmail, MsgFolderRoot,
                                 Root, SentItems)
from exchangelib.folders.queryset import DEEP
from exchangelib.items import HARD_DELETE, ID_ONLY, SAVE_ONLY, SEND_TO_NONE, Message as EwsMessage
from exchangelib.properties import DistinguishedFolderId, FolderId, Mailbox
from exchangelib.protocol import BaseProtocol
from exchangelib.restriction import Q
from exchangelib.services import CreateFolder, CreateItem

from mailmerge_gov.config import MailServer, SecretError, mailbox_password
from mailmerge_gov.reportfiles import write_private_files
from mailmerge_gov.migration.ews_export import SUFFIXES, export_folder, folder_kind
from mailmerge_gov.migration.ews_session import (CaFileAdapter, Shared, Throttle, acting, origin_of,
                                                refresh_ca_files, release, shared_logins, sharing)
from mailmerge_gov.migration.protocol import (
    ConnectionLost,
    ExportedFolder,
    FolderDelta,
    FolderInfo,
    FolderStatus,
    LoginFailed,
    MailboxError,
    Message,
    MessageInfo,
    MessageRefused,
    QuotaExceeded,
)

log = logging.getLogger(__name__)

SEPARATOR = "/"
# Items per FindItem page, and per GetItem, CreateItem and DeleteItem request. A GetItem or CreateItem request
# carries MIME content, so it is also kept under about APPEND_BYTES of it.
LIST_PAGE = 200
GET_CHUNK = 50
FETCH_CHUNK = 20
APPEND_CHUNK = 20
APPEND_BYTES = 10 << 20
FOLDER_PAGE = 500
SYNC_PAGE = 512  # changes per SyncFolderItems request (the most EWS gives)

# RequestServerVersion names (config.EWS_VERSIONS) and the builds exchangelib knows them by.
BUILDS = {
    "Exchange2010": Build(14, 0), "Exchange2010_SP1": Build(14, 1), "Exchange2010_SP2": Build(14, 2),
    "Exchange2013": Build(15, 0), "Exchange2013_SP1": Build(15, 0, 847), "Exchange2016": Build(15, 1),
    "Exchange2019": Build(15, 2),
}

# MAPI properties read and written by tag (MS-OXPROPS).
MSGFLAG_READ = 0x1
MSGFLAG_UNSENT = 0x8
FLAG_STATUS_FLAGGED = 2
VERB_REPLY, VERB_REPLY_ALL, VERB_FORWARD = 102, 103, 104

# The distinguished folders whose use the migration maps (there is no distinguished "archive" folder on
# Exchange 2010-2019: an Archive folder is found by its name, like on any store).
_SPECIAL = ((SentItems, "\\Sent"), (Drafts, "\\Drafts"), (DeletedItems, "\\Trash"), (JunkEmail, "\\Junk"))
# IMAP keywords that are a client's bookkeeping, not a user's category: not written as categories.
_NOT_CATEGORIES = {"$mdnsent", "$junk", "$notjunk", "junk", "nonjunk", "$phishing", "$submitpending", "$submitted",
                   "$forwarded"}
# Fields of a new MIME message that exchangelib always writes from its defaults; each would override what
# Exchange reads from the MIME headers (Importance: X-Priority, IsReadReceiptRequested: Disposition-Notification-To).
_DEFAULTED_ELEMENTS = ("Sensitivity", "Importance", "ReminderIsSet", "ReminderMinutesBeforeStart",
                       "IsReadReceiptRequested", "IsDeliveryReceiptRequested", "IsResponseRequested")


class _FlagStatus(ExtendedProperty):
    """PR_FLAG_STATUS: 0 not flagged, 1 complete, 2 flagged for follow-up."""

    property_tag = 0x1090
    property_type = "Integer"


class _LastVerb(ExtendedProperty):
    """PR_LAST_VERB_EXECUTED: 102 reply, 103 reply all, 104 forward."""

    property_tag = 0x1081
    property_type = "Integer"


class _MessageFlags(ExtendedProperty):
    """PR_MESSAGE_FLAGS: set when the item is created; without MSGFLAG_UNSENT it is not a draft."""

    property_tag = 0x0E07
    property_type = "Integer"


class _DeliveryTime(ExtendedProperty):
    """PR_MESSAGE_DELIVERY_TIME: DateTimeReceived, settable when the item is created."""

    property_tag = 0x0E06
    property_type = "SystemTime"


_PROPERTIES = {"mmg_flag_status": _FlagStatus, "mmg_last_verb": _LastVerb, "mmg_message_flags": _MessageFlags,
               "mmg_delivery_time": _DeliveryTime}
_registering = threading.Lock()


def _register_properties() -> None:
    """Teach exchangelib's Message the extended properties this store reads and writes (once per process)."""
    with _registering:
        known = {f.name for f in EwsMessage.FIELDS}
        for name, cls in _PROPERTIES.items():
            if name not in known:
                EwsMessage.register(name, cls)


_register_properties()

# exchangelib's words for an HTTP answer it cannot use: "Unknown failure in response. Code: 404 headers: ..."
_HTTP_FAILURE = re.compile(r"^Unknown failure in response\. Code: (\d+)")

_LISTED_FIELDS = ("is_read", "is_draft", "categories", "datetime_received", "datetime_created", "size",
                  "mmg_flag_status", "mmg_last_verb")


# ----------------------------------------------------------------------------------------------- opening

def open_ews(server: MailServer, mailbox: str) -> EwsStore:
    """Open one mailbox on an Exchange server the way the configuration says, and read its folder tree."""
    url = server.url or ""
    if server.kind != "ews" or not url:
        raise MailboxError(f"{url or server.kind}: not an Exchange server (no ews_url)")
    if "@" not in mailbox:
        raise LoginFailed(f"{url}: cannot open {mailbox!r}: an Exchange mailbox is named by its e-mail address")
    per_user = server.credentials_file is not None
    username = mailbox if per_user else server.admin_user
    if not username:
        raise LoginFailed(f"{url}: cannot open {mailbox}: no admin_user configured")
    try:
        if per_user:
            assert server.credentials_file is not None
            password: str | None = mailbox_password(server.credentials_file, mailbox)
        else:
            password = server.password.reveal() if server.password else None
    except SecretError as exc:
        raise LoginFailed(f"{url}: cannot log in for {mailbox}: {exc}") from exc
    if password is None:
        raise LoginFailed(f"{url}: cannot log in for {mailbox}: no password configured")
    if server.version not in BUILDS:
        raise MailboxError(f"{url}: unknown EWS version {server.version!r} (one of {', '.join(BUILDS)})")
    access = DELEGATE if per_user or server.access == "delegate" else IMPERSONATION
    how = ("its own login" if per_user
           else f"{username} by {'delegate access' if access == DELEGATE else 'impersonation'}")
    # requests writes a Basic password as Latin-1 and fails on Vietnamese letters: give it UTF-8 bytes (RFC 7617)
    secret: str | bytes = password.encode() if server.auth == "basic" and not password.isascii() else password
    credentials = Credentials(username, secret)
    key = (url, username.lower())
    if server.ca_file is not None and BaseProtocol.HTTP_ADAPTER_CLS is requests.adapters.HTTPAdapter:
        BaseProtocol.HTTP_ADAPTER_CLS = CaFileAdapter  # once, and never over another program's own adapter
    with sharing:
        shared = shared_logins.get(key)
        if shared is None:
            shared = shared_logins[key] = Shared(Throttle(url, server.max_backoff))
        shared.policy.max_wait = server.max_backoff
        shared.ca_file = str(server.ca_file) if server.ca_file is not None else None
        refresh_ca_files(origin_of(url))
        config = Configuration(service_endpoint=url, credentials=credentials,
                               auth_type=NTLM if server.auth == "ntlm" else BASIC,
                               version=Version(build=BUILDS[server.version]), retry_policy=shared.policy,
                               max_connections=server.max_connections)
        shared.users += 1
        try:
            account = Account(primary_smtp_address=mailbox, config=config, autodiscover=False, access_type=access,
                              default_timezone=UTC)
        except (ValueError, ews_errors.EWSError) as exc:
            release(key, None)
            raise MailboxError(f"{url}: cannot open {mailbox}: {exc}") from exc
        account.protocol.TIMEOUT = server.timeout  # an instance attribute: this protocol's requests only
    store = EwsStore(account, url, mailbox, how, key)
    try:
        store.folders()  # the first request: the login, the access to the mailbox and its folder tree
    except BaseException:
        store.close()
        raise
    return store


# --------------------------------------------------------------------------------------------- the store

@dataclass(frozen=True)
class _Node:
    """A mail folder of the tree: its EWS id, and what the migration is told about it."""

    id: str
    info: FolderInfo
    folder_class: str | None = None


class _MimeCreateItem(CreateItem):
    """CreateItem for messages made from MIME content: no defaulted fields that would override the MIME
    headers, and every refusal returned per message (never raised midway, which would hide what landed)."""

    ERRORS_TO_CATCH_IN_RESPONSE = (ews_errors.ResponseMessageError,)

    def get_payload(self, *args: Any, **kwargs: Any) -> Any:
        payload = super().get_payload(*args, **kwargs)
        for item in payload.iterfind("{*}Items/{*}Message"):
            for child in list(item):
                if child.tag.rsplit("}", 1)[-1] in _DEFAULTED_ELEMENTS:
                    item.remove(child)
        return payload


class EwsStore:
    """One mailbox on an Exchange server, as the migration reads and writes it."""

    # Exchange keeps properties and writes MIME anew: a copy's bytes differ, verify matches by fingerprint
    rewrites_mime = True

    def __init__(self, account: Account, url: str, mailbox: str, how: str, key: tuple[str, str]) -> None:
        """Take over an exchangelib Account (no request is made here)."""
        self._account: Account | None = account
        self.url = url
        self.mailbox = mailbox
        self.how = how  # who opens the mailbox, for messages: "svc@hcm.gov.vn by impersonation"
        self._key = key
        self._waits = 0  # back-offs this store's requests were asked for, and their seconds
        self._wait_seconds = 0.0
        self._root = Root(account=account, _distinguished_id=DistinguishedFolderId(
            id=Root.DISTINGUISHED_FOLDER_ID, mailbox=Mailbox(email_address=mailbox)))
        self._lock = threading.RLock()
        self._nodes: dict[str, _Node] = {}  # path -> node
        self._top: str | None = None  # the id of the message folder root
        self._inbox: str | None = None

    def __enter__(self) -> EwsStore:
        """Use the store in a with block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close at the end of a with block."""
        self.close()

    @property
    def separator(self) -> str:
        """The hierarchy separator of folder names."""
        return SEPARATOR

    @property
    def throttled(self) -> tuple[int, float]:
        """Back-offs the server asked this store's requests for since it opened, and their seconds."""
        with self._lock:
            return self._waits, self._wait_seconds

    def note_back_off(self, seconds: float) -> None:
        """Count one back-off of a request of this store."""
        with self._lock:
            self._waits += 1
            self._wait_seconds += seconds

    def folders(self) -> list[FolderInfo]:
        """List the mail folders under the message folder root, INBOX first; other folders as not selectable."""
        with self._errors("list folders"):
            nodes = self._load()
        return [node.info for node in nodes.values()]

    def status(self, folder: str) -> FolderStatus:
        """Return a stable UIDVALIDITY (from the folder id) and the item count; no UIDNEXT, no mod-sequences."""
        node = self._node(folder)
        with self._errors("read the status", folder):
            found = list(FolderCollection(account=self._live(), folders=[self._folder(node.id)]).get_folders(
                additional_fields=_folder_fields("total_count")))
        result = found[0] if found else None
        if isinstance(result, Exception):
            raise self._mapped(result, "read the status", folder)
        total = getattr(result, "total_count", None) or 0
        return FolderStatus(zlib.crc32(node.id.encode()) or 1, None, None, int(total))

    def list_messages(self, folder: str, after_uid: int = 0) -> list[MessageInfo]:
        """List every item of a folder, oldest first: key (item id), size, flags and received time."""
        node = self._node(folder)
        with self._errors("list the messages", folder):
            account, target = self._live(), self._folder(node.id)
            # FindItem pages through the ids (oldest first), GetItem reads their properties in chunks: what
            # QuerySet.only() does, but with the folder passed on, where QuerySet would first GetFolder the root
            ids = FolderCollection(account=account, folders=[target]).find_items(
                Q(), shape=ID_ONLY, order_fields=[FieldOrder.from_string("datetime_received", folder=target)],
                page_size=LIST_PAGE)
            items = list(account.fetch(ids=ids, folder=target, only_fields=_LISTED_FIELDS, chunk_size=GET_CHUNK))
        infos = []
        for item in items:
            if isinstance(item, Exception):
                raise self._mapped(item, "list the messages", folder)
            infos.append(_info(item, None))
        return infos

    def fetch(self, folder: str, keys: Sequence[str]) -> Iterator[Message]:
        """Yield the items with these keys with their MIME content, in the order asked; vanished ones are left out."""
        node = self._node(folder)
        for start in range(0, len(keys), FETCH_CHUNK):
            batch = keys[start:start + FETCH_CHUNK]
            with self._errors("fetch messages", folder):
                account = self._live()
                got = list(account.fetch(ids=[(key, None) for key in batch], folder=self._folder(node.id),
                                         only_fields=("mime_content",) + _LISTED_FIELDS, chunk_size=FETCH_CHUNK))
            messages = []
            for key, item in zip(batch, got):
                if isinstance(item, ews_errors.ErrorItemNotFound):
                    log.info("%s mailbox %s, folder %r: item %s is gone", self.url, self.mailbox, folder, key)
                    continue
                if isinstance(item, Exception):
                    raise self._mapped(item, "fetch messages", folder)
                raw = item.mime_content
                if isinstance(raw, str):
                    raw = raw.encode("utf-8")
                if raw is None:
                    raise MailboxError(self._where(f"the server gave no MIME content for item {key}", folder))
                messages.append(Message(_info(item, len(raw)), raw))
            yield from messages  # outside the error mapping: an exception of the caller's loop is not the server's

    def create_folder(self, folder: str) -> None:
        """Create a folder and its parents (mail folders, IPF.Note); nothing happens when it exists."""
        if self._find(folder) is not None:
            return
        with self._errors("create the folder", folder):
            self._load()
            levels = folder.split(SEPARATOR)
            for depth in range(1, len(levels) + 1):
                path = SEPARATOR.join(levels[:depth])
                if self._find(path) is not None:
                    continue
                above = self._find(SEPARATOR.join(levels[:depth - 1])) if depth > 1 else None
                parent = above.id if above is not None else self._top
                assert parent is not None
                new = Folder(root=self._root, name=levels[depth - 1], folder_class="IPF.Note")
                result = list(CreateFolder(account=self._live()).call(parent_folder=self._folder(parent),
                                                                      folders=[new]))
                created = result[0] if result else None
                if isinstance(created, ews_errors.ErrorFolderExists):
                    self._load()  # made meanwhile by another connection
                    if self._find(path) is None:
                        raise MailboxError(self._where(f"cannot create folder {path!r}: {created}", folder))
                    continue
                if isinstance(created, Exception) or created is None:
                    raise self._mapped(created or MailboxError("no answer"), "create the folder", folder)
                with self._lock:
                    self._nodes[path] = _Node(created.id, FolderInfo(path, SEPARATOR))

    def append(self, folder: str, messages: Sequence[Message]) -> list[str | None]:
        """Create items from the messages' MIME content, not drafts, with their read state, flags, categories
        and received time; return their item ids. A refusal takes back what this call created."""
        if not messages:
            return []
        node = self._node(folder)
        target = self._folder(node.id)
        account = self._live()
        created: list[str] = []
        try:
            for chunk in _chunks(messages):
                items = [_new_item(account, target, message) for message in chunk]
                with self._errors("append", folder):
                    results = list(_MimeCreateItem(account=account, chunk_size=len(items)).call(
                        items=items, folder=target, message_disposition=SAVE_ONLY,
                        send_meeting_invitations=SEND_TO_NONE))
                refused = None
                for message, result in zip(chunk, results):
                    if isinstance(result, Exception):
                        refused = refused or (message, result)
                    elif getattr(result, "id", None):
                        created.append(result.id)
                if refused is not None or len(results) != len(chunk):
                    message, exc = refused or (chunk[-1], MailboxError("the server answered fewer messages than sent"))
                    raise self._refusal(exc, message, folder, len(messages))
        except MailboxError:
            self._take_back(folder, created)
            raise
        return list(created)

    def set_flags(self, folder: str, key: str, flags: Sequence[str]) -> None:
        """Replace the read state, follow-up flag, last verb and categories of one item (\\Draft cannot change)."""
        self._node(folder)
        seen, flagged, verb, _draft, categories = _split_flags(flags)
        changekey = None
        for _attempt in range(2):
            item = EwsMessage(account=self._live(), id=key, changekey=changekey)
            item.is_read = seen
            item.categories = categories or None
            item.mmg_flag_status = FLAG_STATUS_FLAGGED if flagged else None
            item.mmg_last_verb = verb
            with self._errors("set flags", folder):
                try:
                    results = self._live().bulk_update(
                        items=[(item, ["is_read", "categories", "mmg_flag_status", "mmg_last_verb"])],
                        suppress_read_receipts=True)
                    failed = next((r for r in results if isinstance(r, Exception)), None)
                except (ews_errors.ErrorChangeKeyRequired, ews_errors.ErrorChangeKeyRequiredForWriteOperations) as exc:
                    failed = exc
                if changekey is None and isinstance(failed, (ews_errors.ErrorChangeKeyRequired,
                                                             ews_errors.ErrorChangeKeyRequiredForWriteOperations)):
                    # without a ChangeKey AutoResolve is enough for Exchange; a server that wants one gets it
                    found = list(self._live().fetch(ids=[(key, None)], folder=self._folder(self._node(folder).id),
                                                    only_fields=("is_read",)))
                    if found and not isinstance(found[0], Exception):
                        changekey = found[0].changekey
                        continue
            if failed is not None:
                raise self._mapped(failed, f"set the flags of item {key}", folder)
            return

    def changes(self, folder: str, state: str | None) -> FolderDelta:
        """What SyncFolderItems says was created, changed (read state included) and deleted since a sync state;
        every item of the folder (full) without a state or when the server refuses it."""
        node = self._node(folder)
        with self._errors("list the changes", folder):
            account, target = self._live(), self._folder(node.id)
            try:
                changed, deleted, new_state = self._sync(target, state)
                full = state is None
            except ews_errors.ErrorInvalidSyncStateData as exc:
                log.warning("%s mailbox %s, folder %r: the sync state was refused (%s): listing the folder in full",
                            self.url, self.mailbox, folder, _words(exc))
                changed, deleted, new_state = self._sync(target, None)
                full = True
            infos = []
            for item in account.fetch(ids=[(key, None) for key in changed], folder=target, only_fields=_LISTED_FIELDS,
                                      chunk_size=GET_CHUNK):
                if isinstance(item, ews_errors.ErrorItemNotFound):
                    continue  # changed, then deleted before it was read
                if isinstance(item, Exception):
                    raise self._mapped(item, "list the changes", folder)
                infos.append(_info(item, None))
        infos.sort(key=lambda info: info.internal_date)  # oldest first, as list_messages
        return FolderDelta(tuple(infos), tuple(deleted), new_state, full)

    def _sync(self, target: Folder, state: str | None) -> tuple[list[str], list[str], str]:
        """Page through SyncFolderItems from a state: (created or changed ids, deleted ids, the new state)."""
        changed: dict[str, None] = {}
        deleted: list[str] = []
        target.item_sync_state = None
        for change, item in target.sync_items(sync_state=state, only_fields=(), max_changes_returned=SYNC_PAGE):
            if change == "delete":
                changed.pop(item.id, None)
                deleted.append(item.id)
            elif change == "read_flag_change":
                changed[item[0].id] = None  # (ItemId, IsRead): the item is read again, with its other flags
            else:
                changed[item.id] = None
        if not target.item_sync_state:
            raise MailboxError(self._where("the server gave no sync state"))
        return list(changed), deleted, target.item_sync_state

    def export_not_mail(self, destination: Path) -> list[ExportedFolder]:
        """Write each calendar (.ics), contact (.vcf) and task (.ics, VTODO) folder into destination."""
        with self._errors("list folders"):
            nodes = self._load()
        exported = []
        for path, node in nodes.items():
            kind = folder_kind(node.folder_class)
            if kind is None:
                continue
            with self._errors(f"export the {kind}", path):
                result = export_folder(self._live(), self._folder(node.id), kind, path)
            name = path.replace(SEPARATOR, " - ") + SUFFIXES[kind]
            file = destination / name
            write_private_files(destination, [(file, result.text)])
            exported.append(ExportedFolder(path, kind, file, result.items, result.failed))
        return exported

    def changed_since(self, folder: str, modseq: int) -> dict[str, tuple[str, ...]]:
        """Exchange has no mod-sequences the migration can use: {}."""
        return {}

    def append_limit(self) -> int | None:
        """The largest message the server accepts is not known ahead: None."""
        return None

    def close(self) -> None:
        """Release the connection (the last store of a server closes its sessions)."""
        with self._lock:
            account, self._account = self._account, None
        if account is not None:
            waits, seconds = self.throttled
            if waits:
                log.warning("%s mailbox %s: the server asked to back off %d times (%.1f s) while it was open",
                            self.url, self.mailbox, waits, seconds)
            release(self._key, account)

    # ------------------------------------------------------------------------------------------ helpers

    def _live(self) -> Account:
        account = self._account
        if account is None:
            raise ConnectionLost(f"{self.url} mailbox {self.mailbox}: the store is closed")
        return account

    def _where(self, text: str, folder: str | None = None) -> str:
        place = f", folder {folder!r}" if folder is not None else ""
        return f"{self.url} mailbox {self.mailbox}{place}: {text}"

    def _folder(self, folder_id: str) -> Folder:
        """An exchangelib folder object for an id (no request)."""
        return Folder(root=self._root, _id=FolderId(id=folder_id))

    def _find(self, path: str) -> _Node | None:
        """The known folder at a path; Exchange compares folder names without case."""
        with self._lock:
            node = self._nodes.get(path)
            if node is None:
                folded = path.casefold()
                node = next((n for p, n in self._nodes.items() if p.casefold() == folded), None)
            return node

    def _node(self, folder: str) -> _Node:
        """The folder at a path, reading the tree again when it is not known (made by another connection)."""
        node = self._find(folder)
        if node is None:
            with self._errors("list folders", folder):
                self._load()
            node = self._find(folder)
        if node is None:
            raise MailboxError(self._where("no such folder", folder))
        return node

    def _load(self) -> dict[str, _Node]:
        """Read the distinguished folders and the folder tree under the message folder root."""
        account = self._live()
        mailbox = Mailbox(email_address=self.mailbox)
        wanted = [MsgFolderRoot, Inbox] + [cls for cls, _ in _SPECIAL]
        asked = [cls(root=self._root, _distinguished_id=DistinguishedFolderId(id=cls.DISTINGUISHED_FOLDER_ID,
                                                                             mailbox=mailbox)) for cls in wanted]
        found = list(FolderCollection(account=account, folders=asked).get_folders(
            additional_fields=_folder_fields("name")))
        ids: dict[str, str] = {}
        for cls, result in zip(wanted, found):
            if isinstance(result, (ews_errors.ErrorFolderNotFound, ews_errors.ErrorItemNotFound)):
                continue  # a distinguished folder this mailbox does not have
            if isinstance(result, Exception):
                raise result
            ids[cls.DISTINGUISHED_FOLDER_ID] = result.id
        top = ids.get(MsgFolderRoot.DISTINGUISHED_FOLDER_ID)
        if top is None:
            raise MailboxError(self._where("the mailbox has no message folder root (msgfolderroot)"))
        special = {ids[cls.DISTINGUISHED_FOLDER_ID]: use for cls, use in _SPECIAL
                   if cls.DISTINGUISHED_FOLDER_ID in ids}
        inbox = ids.get(Inbox.DISTINGUISHED_FOLDER_ID)
        tree: dict[str, tuple[str, str | None, str | None]] = {}  # id -> (name, parent id, folder class)
        for result in FolderCollection(account=account, folders=[self._folder(top)]).find_folders(
                depth=DEEP, additional_fields=_folder_fields("name", "folder_class", "parent_folder_id"),
                page_size=FOLDER_PAGE):
            if isinstance(result, Exception):
                raise result
            parent = result.parent_folder_id.id if result.parent_folder_id is not None else None
            tree[result.id] = (result.name or "", parent, result.folder_class)
        nodes: dict[str, _Node] = {}
        for folder_id in tree:
            path = _path(folder_id, tree, top, inbox)
            if path is None:
                continue
            if path in nodes:
                log.warning("%s mailbox %s: two folders named %r; the second is listed as %r", self.url,
                            self.mailbox, path, f"{path} (2)")
                path = f"{path} (2)"
            selectable = folder_id == inbox or _is_mail(tree[folder_id][2])
            use = special.get(folder_id) if selectable else None
            nodes[path] = _Node(folder_id, FolderInfo(path, SEPARATOR, use, selectable), tree[folder_id][2])
        if inbox is not None and "INBOX" not in nodes:
            nodes["INBOX"] = _Node(inbox, FolderInfo("INBOX", SEPARATOR))
        ordered = dict(sorted(nodes.items(), key=lambda pair: (pair[0] != "INBOX", pair[0])))
        with self._lock:
            self._nodes, self._top, self._inbox = ordered, top, inbox
        return ordered

    @contextmanager
    def _errors(self, doing: str, folder: str | None = None) -> Iterator[None]:
        """Turn exchangelib and requests errors into the protocol's exceptions; count back-offs to this store."""
        before = getattr(acting, "store", None)
        acting.store = self
        try:
            yield
        except MailboxError:
            raise
        except (ews_errors.EWSError, requests.RequestException, OSError) as exc:
            raise self._mapped(exc, doing, folder) from exc
        finally:
            acting.store = before

    def _mapped(self, exc: BaseException, doing: str, folder: str | None = None) -> MailboxError:
        """The protocol's exception for an exchangelib error."""
        if isinstance(exc, MailboxError):
            return exc
        words = _words(exc)
        if isinstance(exc, ews_errors.UnauthorizedError):
            return LoginFailed(self._where(f"login as {self.how} refused: {words}"))
        if isinstance(exc, (ews_errors.ErrorNonExistentMailbox, ews_errors.ErrorImpersonateUserDenied,
                            ews_errors.ErrorImpersonationDenied, ews_errors.ErrorImpersonationFailed,
                            ews_errors.ErrorAccessDenied, ews_errors.ErrorAccountDisabled)):
            return LoginFailed(self._where(f"cannot open the mailbox as {self.how}: {words}", folder))
        if isinstance(exc, ews_errors.RateLimitError):
            return ConnectionLost(self._where(f"cannot {doing}: throttled: {words}", folder))
        if isinstance(exc, (ews_errors.ErrorTimeoutExpired, ews_errors.ErrorServerBusy,
                            ews_errors.ErrorInternalServerTransientError, ews_errors.ErrorMailboxStoreUnavailable,
                            ews_errors.ErrorMailboxMoveInProgress, ews_errors.ErrorConnectionFailed,
                            ews_errors.ErrorConnectionFailedTransientError, ews_errors.ErrorTooManyObjectsOpened,
                            ews_errors.ErrorExceededConnectionCount, requests.ConnectionError, requests.Timeout,
                            ConnectionError, TimeoutError)):
            return ConnectionLost(self._where(f"connection lost while trying to {doing}: {words}", folder))
        if isinstance(exc, ews_errors.ErrorQuotaExceeded):
            return QuotaExceeded(self._where(f"cannot {doing}: {words}", folder))
        if isinstance(exc, ews_errors.ErrorFolderNotFound):
            return MailboxError(self._where(f"cannot {doing}: the folder is gone ({words})", folder))
        if isinstance(exc, ews_errors.RedirectError):
            return MailboxError(self._where(f"cannot {doing}: the server redirects to {exc.url}: is ews_url the "
                                            "EWS endpoint (https://host/EWS/Exchange.asmx)?", folder))
        # the rest (TLS, HTTP answers that are not EWS, errors of one request) will not pass on a retry
        return MailboxError(self._where(f"cannot {doing}: {words}", folder))

    def _refusal(self, exc: BaseException, message: Message, folder: str, count: int) -> MailboxError:
        """The protocol's exception for a message the server refused to create."""
        what = f"message {message.info.key or '(new)'} of {len(message.raw)} bytes"
        if isinstance(exc, (ews_errors.ErrorMessageSizeExceeded, ews_errors.ErrorMimeContentConversionFailed,
                            ews_errors.ErrorMimeContentInvalid, ews_errors.ErrorMimeContentInvalidBase64String,
                            ews_errors.ErrorCorruptData, ews_errors.ErrorItemCorrupt, ews_errors.ErrorItemSave)):
            return MessageRefused(self._where(f"the server refused {what}: {_words(exc)}", folder))
        return self._mapped(exc, f"append {count} messages", folder)

    def _take_back(self, folder: str, created: Sequence[str]) -> None:
        """Delete the items this append created before a refusal, so that a retry does not copy them twice."""
        if not created:
            return
        try:
            results = list(self._live().bulk_delete(ids=[(item_id, None) for item_id in created],
                                                    delete_type=HARD_DELETE, chunk_size=GET_CHUNK))
            failed = [r for r in results if isinstance(r, Exception)]
        except (ews_errors.EWSError, requests.RequestException, OSError, MailboxError) as exc:
            failed = [exc]
        if failed:
            raise MailboxError(self._where(f"a message was refused after {len(created)} were created, and they "
                                           f"cannot be taken back ({_words(failed[0])}); the next pass finds them by "
                                           "content", folder))


# ------------------------------------------------------------------------------------------------ helpers

def _folder_fields(*names: str) -> set[FieldPath]:
    return {FieldPath(field=Folder.get_field_by_fieldname(name)) for name in names}


def _path(folder_id: str, tree: dict[str, tuple[str, str | None, str | None]], top: str,
          inbox: str | None) -> str | None:
    """The migration's name of a folder: its levels from the message folder root, Inbox as INBOX."""
    levels = []
    current: str | None = folder_id
    seen = set()
    while current is not None and current != top:
        if current in seen or current not in tree:
            return None  # not under the message folder root
        seen.add(current)
        if current == inbox:
            levels.append("INBOX")
            break
        name, parent, _ = tree[current]
        levels.append(name.replace(SEPARATOR, "\u2215") or "_")  # a "/" in a name would make two levels
        current = parent
    else:
        if current is None:
            return None
    return SEPARATOR.join(reversed(levels))


def _is_mail(folder_class: str | None) -> bool:
    """Whether a folder holds mail: IPF.Note and its kinds (or no class); not calendars, contacts, tasks, notes."""
    if not folder_class:
        return True
    return folder_class in ("IPF", "IPF.Note") or folder_class.startswith(("IPF.Note.", "IPF.Imap"))


def _info(item: Any, size: int | None) -> MessageInfo:
    """A MessageInfo from an exchangelib item."""
    flags = []
    if getattr(item, "is_read", False):
        flags.append("\\Seen")
    verb = getattr(item, "mmg_last_verb", None)
    if verb in (VERB_REPLY, VERB_REPLY_ALL):
        flags.append("\\Answered")
    if getattr(item, "mmg_flag_status", None) == FLAG_STATUS_FLAGGED:
        flags.append("\\Flagged")
    if getattr(item, "is_draft", False):
        flags.append("\\Draft")
    if verb == VERB_FORWARD:
        flags.append("$Forwarded")
    for category in getattr(item, "categories", None) or ():
        if category and category not in flags:
            flags.append(category)
    when = getattr(item, "datetime_received", None) or getattr(item, "datetime_created", None)
    internal = (dt.datetime.fromtimestamp(when.timestamp(), dt.timezone.utc) if when is not None
                else dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))
    return MessageInfo(item.id, None, size if size is not None else int(getattr(item, "size", 0) or 0),
                       tuple(flags), internal)


def _split_flags(flags: Sequence[str]) -> tuple[bool, bool, int | None, bool, list[str]]:
    """IMAP flags as EWS writes them: (read, flagged, last verb, draft, categories)."""
    lowered = {f.lower() for f in flags}
    verb = VERB_REPLY if "\\answered" in lowered else VERB_FORWARD if "$forwarded" in lowered else None
    categories = []
    for flag in flags:
        if flag.startswith("\\") or flag.lower() in _NOT_CATEGORIES or flag in categories:
            continue
        categories.append(flag)
    return "\\seen" in lowered, "\\flagged" in lowered, verb, "\\draft" in lowered, categories


def _new_item(account: Account, folder: Folder, message: Message) -> EwsMessage:
    """An exchangelib Message to create from a message's MIME content, flags and date."""
    seen, flagged, verb, draft, categories = _split_flags(message.info.flags)
    item = EwsMessage(account=account, folder=folder, mime_content=message.raw, is_read=seen,
                      categories=categories or None)
    item.mmg_message_flags = (MSGFLAG_READ if seen else 0) | (MSGFLAG_UNSENT if draft else 0)
    item.mmg_delivery_time = message.info.internal_date.astimezone(UTC)
    item.mmg_flag_status = FLAG_STATUS_FLAGGED if flagged else None
    item.mmg_last_verb = verb
    return item


def _chunks(messages: Sequence[Message]) -> Iterator[list[Message]]:
    """Split messages into CreateItem requests of at most APPEND_CHUNK messages and about APPEND_BYTES."""
    chunk: list[Message] = []
    size = 0
    for message in messages:
        if chunk and (len(chunk) >= APPEND_CHUNK or size + len(message.raw) > APPEND_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(message)
        size += len(message.raw)
    if chunk:
        yield chunk


def _words(exc: BaseException) -> str:
    """An exchangelib error in a few words: its class name when it says no more (ErrorItemNotFound)."""
    text = str(exc).strip() or type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, ews_errors.ErrorTimeoutExpired) and "Reraised from" in text:
        # exchangelib wraps every requests error in ErrorTimeoutExpired, with the pool's whole story
        for marker, words in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                              ("Name or service not known", "unknown host"), ("Connection reset", "connection reset"),
                              ("RemoteDisconnected", "the server closed the connection")):
            if marker in text:
                return words
        return "cannot connect"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        found = re.search(r"certificate verify failed: ([^(\"')]*)", text)
        return f"TLS failed: certificate verify failed{': ' + found.group(1).strip() if found else ''}"
    found = _HTTP_FAILURE.match(text)
    if found is not None:
        return f"HTTP {found.group(1)} from the server (is ews_url the EWS endpoint, https://host/EWS/Exchange.asmx?)"
    if name.startswith("Error") and name not in text:
        text = f"{name}: {text}"
    return text


__all__ = ["BUILDS", "EwsStore", "open_ews"]
