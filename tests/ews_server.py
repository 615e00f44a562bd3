"""A small Exchange Web Services server for the tests: HTTP + SOAP on a free loopback port.

It answers what exchangelib sends for the migration's flows, the way Exchange 2016 answers them:
GetFolder (folder ids and distinguished folder ids, with a mailbox), FindFolder (shallow or deep,
IndexedPageFolderView paging), CreateFolder, FindItem (IndexedPageItemView paging, SortOrder on
DateTimeReceived), GetItem (MimeContent and item properties, extended properties by tag), CreateItem from
MimeContent (SaveOnly; PR_MESSAGE_FLAGS 0x0E07 decides draft and read, PR_MESSAGE_DELIVERY_TIME 0x0E06 the
received time), UpdateItem (set and delete fields and extended properties), DeleteItem and SyncFolderItems
(Create, Update, Delete and ReadFlagChange since a sync state, MaxChangesReturned paging with
IncludesLastItemInRange; a state it did not make, of another folder, or made before `expire_sync_states()` is
ErrorInvalidSyncStateData). Anything else is a SOAP fault that names the operation, so that a flow sending
something new fails loudly instead of silently.

Calendar items, contacts and tasks (`put_event`, `put_contact`, `put_task`) are stored as properties and
answered as t:CalendarItem, t:Contact and t:Task; like Exchange, the server writes the MIME content of a calendar
item as iCalendar and of a contact as a vCard from those properties; it gives none for a task (the export
reads a task's properties).

Logins are HTTP Basic (or NTLM, see below) against a user table. A user reaches its own mailbox, a mailbox it has been granted
(delegate access: the folder ids of requests name the mailbox), or any mailbox through the ExchangeImpersonation
header when it holds the impersonation right. `busy(n, back_off_ms)` makes the next n requests fail with
ErrorServerBusy and a BackOffMilliseconds hint, the way Exchange throttles.

By default, unlike Exchange, the server keeps the MIME content of a created message byte for byte: the tests can
then check that a message went through unchanged. With `rewrite_mime = True` it rewrites what CreateItem stores
the way Exchange does: headers added (X-MS-Has-Attach, X-MS-TNEF-Correlator, Content-Language) and reordered,
text re-encoded (quoted-printable, or base64 for a message that is mostly not ASCII), headers folded at 76
characters, CRLF line ends.

With `ntlm = True` logins are NTLM instead of Basic (the server answers 401 with "WWW-Authenticate: NTLM" and checks
the client's NTLM messages with pyspnego's NTLM acceptor, against the user table; one handshake per HTTP
connection, as IIS does).

Folders and items live on disk in a temporary folder: a JSON file per mailbox, one .eml file per item. Ids are
base64 of a counter and the mailbox, so that a scenario run twice gives the same ids (see `capture`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lxml import etree

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
NSMAP = {"s": SOAP, "m": M, "t": T}
LOOPBACK = "127.0.0.1"

# Exchange 2016 CU23, as its ServerVersionInfo says.
SERVER_VERSION = {"MajorVersion": "15", "MinorVersion": "1", "MajorBuildNumber": "2507", "MinorBuildNumber": "6",
                  "Version": "V2017_07_11"}
API_VERSIONS = ("Exchange2007", "Exchange2007_SP1", "Exchange2010", "Exchange2010_SP1", "Exchange2010_SP2",
                "Exchange2013", "Exchange2013_SP1", "Exchange2015", "Exchange2016")

PR_MESSAGE_FLAGS = 0x0E07
PR_MESSAGE_DELIVERY_TIME = 0x0E06
MSGFLAG_READ = 0x1
MSGFLAG_UNSENT = 0x8

# The folders of a new mailbox: (distinguished id, display name, folder class, parent's distinguished id).
DEFAULT_FOLDERS: tuple[tuple[str, str, str | None, str | None], ...] = (
    ("root", "", None, None),
    ("msgfolderroot", "Top of Information Store", "IPF.Note", "root"),
    ("inbox", "Inbox", "IPF.Note", "msgfolderroot"),
    ("sentitems", "Sent Items", "IPF.Note", "msgfolderroot"),
    ("drafts", "Drafts", "IPF.Note", "msgfolderroot"),
    ("deleteditems", "Deleted Items", "IPF.Note", "msgfolderroot"),
    ("junkemail", "Junk Email", "IPF.Note", "msgfolderroot"),
    ("calendar", "Calendar", "IPF.Appointment", "msgfolderroot"),
    ("contacts", "Contacts", "IPF.Contact", "msgfolderroot"),
    ("tasks", "Tasks", "IPF.Task", "msgfolderroot"),
)
# GetFolder answers with the element of the folder's kind.
_FOLDER_ELEMENTS = {"IPF.Appointment": "CalendarFolder", "IPF.Contact": "ContactsFolder", "IPF.Task": "TasksFolder"}
_FOLDER_PROPERTIES = ("folder:ParentFolderId", "folder:FolderClass", "folder:DisplayName", "folder:TotalCount",
                      "folder:ChildFolderCount", "folder:UnreadCount")
# Task properties in the schema's order (t:TaskType), as the field URIs name them.
_TASK_FIELDS = ("CompleteDate", "DueDate", "PercentComplete", "StartDate", "Status")
_ITEM_PROPERTIES = ("item:MimeContent", "item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Body",
                    "item:DateTimeReceived", "item:Size", "item:Categories", "item:Importance", "item:IsDraft",
                    "item:DateTimeCreated", "message:IsRead") + tuple(f"task:{n}" for n in _TASK_FIELDS)


class Fault(Exception):
    """A SOAP fault: the whole request fails (bad version, impersonation refused, throttled, unsupported)."""

    def __init__(self, code: str, text: str, values: dict[str, str] | None = None, status: int = 500) -> None:
        super().__init__(f"{code}: {text}")
        self.code, self.text, self.values, self.status = code, text, values or {}, status


class Refused(Exception):
    """One response message fails (ResponseClass="Error") while the others of the request go on."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code, self.text = code, text


@dataclass
class StoredFolder:
    """A folder of a mailbox."""

    id: str
    mailbox: str
    name: str
    folder_class: str | None
    parent: str | None
    distinguished: str | None = None
    changes: int = 1


@dataclass
class StoredItem:
    """An item of a mailbox: its MIME content is in <mailbox dir>/mime/<number>.eml."""

    id: str
    mailbox: str
    number: int
    folder: str
    is_read: bool
    draft: bool
    received: str  # ISO 8601, UTC, "2025-02-03T02:15:00Z"
    categories: list[str] = field(default_factory=list)
    extended: dict[str, str] = field(default_factory=dict)  # "0x1090/Integer" -> the value as EWS writes it
    item_class: str = "IPM.Note"
    size: int = 0
    changes: int = 1
    properties: dict[str, str] = field(default_factory=dict)  # of a calendar item, contact or task: "Subject" -> text


@dataclass
class User:
    """A login: its password, and whether it may impersonate every mailbox (ApplicationImpersonation)."""

    password: str
    impersonation: bool = False


class EwsServer:
    """The test EWS server: one temporary folder, one listening thread; start() ... stop()."""

    def __init__(self, root: Path | None = None, max_message_size: int | None = None,
                 tls: tuple[Path, Path] | None = None, ntlm: bool = False) -> None:
        """Describe the server; nothing listens until start(). max_message_size: larger MIME content is refused
        with ErrorMessageSizeExceeded; tls: (certificate, key) files to answer HTTPS instead of HTTP; ntlm: log
        in with NTLM instead of Basic."""
        self.dir = Path(root) if root is not None else Path()
        self.tls = tls
        self.ntlm = ntlm
        self._ntlm_env: str | None = None
        self.require_changekey = False  # UpdateItem without a ChangeKey: ErrorChangeKeyRequiredForWriteOperations
        self._own_dir = root is None
        self.users: dict[str, User] = {}
        self.delegates: set[tuple[str, str]] = set()  # (mailbox, user) with full access
        self.quotas: dict[str, int] = {}  # mailbox -> bytes its items may take
        self.max_message_size = max_message_size
        self.folders: dict[str, StoredFolder] = {}
        self.items: dict[str, StoredItem] = {}
        self.mailboxes: set[str] = set()
        self.requests: list[tuple[str, str | None, str | None]] = []  # (operation, login, acting mailbox)
        self.auth_schemes: list[str] = []  # the scheme of each request's Authorization header ("" when none)
        self.busy_answers = 0  # ErrorServerBusy faults sent
        self.rewrite_mime = False  # store created messages' MIME rewritten, as Exchange does
        self.changes_log: list[tuple[int, str, str, str]] = []  # (sequence, folder id, item id, create/update/read/delete)
        self._sequence = 0
        self.delay = 0.0  # seconds each answer waits: requests overlap, so that a connection cap shows
        self.in_flight = 0  # requests being answered now, and the most there were at once
        self.peak_in_flight = 0
        self.sync_states_given: list[bool] = []  # per SyncFolderItems request: whether it carried a SyncState
        self._sync_generation = 1  # part of every sync state: expire_sync_states() makes the earlier ones invalid
        self.capture_to: Path | None = None  # every request and answer is written here, numbered
        self._captured = 0
        self._busy_left = 0
        self._back_off_ms = 0
        self._counter = 0
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- running

    @property
    def port(self) -> int:
        """The port the server listens on (0 before start)."""
        return self._httpd.server_address[1] if self._httpd else 0

    @property
    def url(self) -> str:
        """The EWS endpoint, as a configuration's ews_url names it."""
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}/EWS/Exchange.asmx"

    def start(self) -> EwsServer:
        """Listen on a free loopback port and answer requests in threads."""
        if self._own_dir:
            self.dir = Path(tempfile.mkdtemp(prefix="ews-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_Handler,), {"ews": self})
        self._httpd = ThreadingHTTPServer((LOOPBACK, 0), handler)
        self._httpd.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="ews-server", daemon=True)
        self._thread.start()
        if self.ntlm:
            # pyspnego's NTLM acceptor reads the accounts it checks from the file NTLM_USER_FILE names (the
            # variable is the process's: one NTLM server at a time)
            self._ntlm_env = os.environ.get("NTLM_USER_FILE")
            os.environ["NTLM_USER_FILE"] = str(self.dir / "ntlm-users")
            self._write_ntlm_users()
        return self

    def stop(self) -> None:
        """Stop listening and remove the folder the server made."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.ntlm:
            if self._ntlm_env is None:
                os.environ.pop("NTLM_USER_FILE", None)
            else:
                os.environ["NTLM_USER_FILE"] = self._ntlm_env
        if self._own_dir and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------------------- the tests' controls

    def add_user(self, name: str, password: str, impersonation: bool = False) -> None:
        """Add a login; a user named like a mailbox owns it."""
        with self._lock:
            self.users[name.lower()] = User(password, impersonation)
            if self.ntlm and self._httpd is not None:
                self._write_ntlm_users()

    def _write_ntlm_users(self) -> None:
        """The user table in the Heimdal format pyspnego reads: ":user@domain:password" (no domain: a UPN)."""
        with self._lock:
            lines = []
            for name, user in self.users.items():
                if ":" in name + user.password:
                    raise ValueError(f"an NTLM test user's name or password has a colon: {name}")
                lines.append(f":{name}:{user.password}\n")
        (self.dir / "ntlm-users").write_text("".join(lines), encoding="utf-8")

    def add_mailbox(self, address: str, password: str | None = None, names: dict[str, str] | None = None) -> None:
        """Create a mailbox with the default folders (names: display names by distinguished id, e.g. Vietnamese);
        with a password, also a login of the same name."""
        address = address.lower()
        with self._lock:
            if address in self.mailboxes:
                return
            self.mailboxes.add(address)
            ids: dict[str, str] = {}
            for distinguished, name, folder_class, parent in DEFAULT_FOLDERS:
                folder = StoredFolder(self._new_id("F", address), address, (names or {}).get(distinguished, name),
                                      folder_class, ids.get(parent or ""), distinguished)
                ids[distinguished] = folder.id
                self.folders[folder.id] = folder
            self._save(address)
        if password is not None:
            self.add_user(address, password)

    def grant(self, mailbox: str, user: str) -> None:
        """Give a user full (delegate) access to a mailbox."""
        with self._lock:
            self.delegates.add((mailbox.lower(), user.lower()))

    def busy(self, requests: int, back_off_ms: int = 50) -> None:
        """Answer the next `requests` requests with ErrorServerBusy, asking to back off back_off_ms."""
        with self._lock:
            self._busy_left, self._back_off_ms = requests, back_off_ms

    def folder_id(self, mailbox: str, path: str) -> str:
        """The id of a folder named by its path under the message folder root ("Inbox/Dự án"), or a
        distinguished id ("inbox")."""
        mailbox = mailbox.lower()
        with self._lock:
            for folder in self.folders.values():
                if folder.mailbox == mailbox and folder.distinguished == path:
                    return folder.id
            found = {self._path(f): f.id for f in self.folders.values() if f.mailbox == mailbox}
        if path not in found:
            raise KeyError(f"{mailbox} has no folder {path!r} (it has {sorted(p for p in found if p)})")
        return found[path]

    def create_folder(self, mailbox: str, path: str, folder_class: str | None = "IPF.Note") -> str:
        """Create a folder and its parents under the message folder root; return its id."""
        parent = self.folder_id(mailbox, "msgfolderroot")
        with self._lock:
            for level in path.split("/"):
                found = [f for f in self.folders.values() if f.parent == parent and f.name.lower() == level.lower()]
                if found:
                    parent = found[0].id
                    continue
                folder = StoredFolder(self._new_id("F", mailbox.lower()), mailbox.lower(), level, folder_class, parent)
                self.folders[folder.id] = folder
                parent = folder.id
            self._save(mailbox.lower())
        return parent

    def put(self, mailbox: str, path: str, raw: bytes, is_read: bool = False, flagged: bool = False,
            categories: Sequence[str] = (), received: dt.datetime | None = None, draft: bool = False,
            last_verb: int | None = None) -> str:
        """Deliver a message into a folder (by path or distinguished id); return its item id."""
        mailbox = mailbox.lower()
        folder = self.folder_id(mailbox, path)
        when = (received or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
        extended = {"0x1090/Integer": "2"} if flagged else {}
        if last_verb is not None:
            extended["0x1081/Integer"] = str(last_verb)
        with self._lock:
            return self._store_item(mailbox, folder, raw, is_read, draft, _ews_time(when), list(categories),
                                    extended).id

    def contents(self, mailbox: str) -> dict[str, list[tuple[bytes, tuple[str, ...], dt.datetime]]]:
        """Every mail folder of a mailbox by path: its messages' MIME bytes, IMAP-style flags and received time."""
        mailbox = mailbox.lower()
        out: dict[str, list[tuple[bytes, tuple[str, ...], dt.datetime]]] = {}
        with self._lock:
            for folder in self.folders.values():
                if folder.mailbox != mailbox or folder.distinguished in ("root", "msgfolderroot"):
                    continue
                if folder.folder_class not in (None, "IPF.Note"):
                    continue
                rows = [(self.mime(item.id), _imap_flags(item), _parse_time(item.received))
                        for item in self.items.values() if item.folder == folder.id]
                out[self._path(folder)] = sorted(rows)
        return out

    def put_event(self, mailbox: str, path: str, subject: str, start: dt.datetime, end: dt.datetime,
                  location: str = "", body: str = "", created: dt.datetime | None = None) -> str:
        """Store a calendar item (an appointment) in a calendar folder; return its item id."""
        properties = {"Subject": subject, "Start": _ews_time(start), "End": _ews_time(end), "Location": location,
                      "Body": body}
        return self._put_properties(mailbox, path, "IPM.Appointment", properties, created)

    def put_contact(self, mailbox: str, path: str, given: str, middle: str, surname: str, email: str,
                    phone: str = "", company: str = "", title: str = "", created: dt.datetime | None = None) -> str:
        """Store a contact in a contacts folder; return its item id."""
        properties = {"GivenName": given, "MiddleName": middle, "Surname": surname, "EmailAddress": email,
                      "BusinessPhone": phone, "CompanyName": company, "JobTitle": title,
                      "Subject": " ".join(p for p in (surname, middle, given) if p)}
        return self._put_properties(mailbox, path, "IPM.Contact", properties, created)

    def put_task(self, mailbox: str, path: str, subject: str, status: str = "NotStarted", due: dt.date | None = None,
                 percent: int = 0, body: str = "", importance: str = "Normal",
                 created: dt.datetime | None = None) -> str:
        """Store a task in a tasks folder; return its item id."""
        properties = {"Subject": subject, "Status": status, "PercentComplete": str(percent), "Body": body,
                      "Importance": importance}
        if due is not None:
            properties["DueDate"] = f"{due.isoformat()}T00:00:00Z"
        return self._put_properties(mailbox, path, "IPM.Task", properties, created)

    def _put_properties(self, mailbox: str, path: str, item_class: str, properties: dict[str, str],
                        created: dt.datetime | None) -> str:
        """Store an item that is not mail, created (and received) at `created` (now by default)."""
        mailbox = mailbox.lower()
        folder = self.folder_id(mailbox, path)
        with self._lock:
            item = self._store_item(mailbox, folder, b"", False, False,
                                    _ews_time(created or dt.datetime.now(dt.timezone.utc)), [], {})
            item.item_class, item.properties, item.size = item_class, properties, len(json.dumps(properties))
            self._save(mailbox)
            return item.id

    def set_read(self, item_id: str, is_read: bool) -> None:
        """Mark an item read or unread, as a user's mail client does."""
        with self._lock:
            item = self.items[item_id]
            item.is_read = is_read
            item.changes += 1
            self._log(item.folder, item.id, "read")
            self._save(item.mailbox)

    def delete(self, item_id: str) -> None:
        """Delete an item, as a user does."""
        with self._lock:
            _remove(self, self.items[item_id])

    def expire_sync_states(self) -> None:
        """Make every sync state given out so far invalid (as after a mailbox move or a long pause)."""
        with self._lock:
            self._sync_generation += 1

    def item(self, item_id: str) -> StoredItem:
        """An item as stored."""
        with self._lock:
            return self.items[item_id]

    def mime(self, item_id: str) -> bytes:
        """The MIME content of an item, as stored."""
        item = self.items[item_id]
        return (self.dir / item.mailbox / "mime" / f"{item.number}.eml").read_bytes()

    # ----------------------------------------------------------------------------------------- storage

    def _new_id(self, kind: str, mailbox: str) -> str:
        self._counter += 1
        return base64.b64encode(f"{kind}:{self._counter}:{mailbox}".encode()).decode()

    def _path(self, folder: StoredFolder) -> str:
        """A folder's path under the message folder root, "/" between levels; "" for the roots."""
        parts = []
        current: StoredFolder | None = folder
        while current is not None and current.distinguished not in ("root", "msgfolderroot"):
            parts.append(current.name)
            current = self.folders.get(current.parent or "")
        return "/".join(reversed(parts))

    def _save(self, mailbox: str) -> None:
        """Write a mailbox's folders and items (without their MIME content) to its JSON file."""
        where = self.dir / mailbox
        where.mkdir(parents=True, exist_ok=True)
        state = {"folders": [f.__dict__ for f in self.folders.values() if f.mailbox == mailbox],
                 "items": [i.__dict__ for i in self.items.values() if i.mailbox == mailbox]}
        temporary = where / "state.json.tmp"
        temporary.write_text(json.dumps(state, ensure_ascii=False, indent=1), encoding="utf-8")
        temporary.replace(where / "state.json")

    def _store_item(self, mailbox: str, folder: str, raw: bytes, is_read: bool, draft: bool, received: str,
                    categories: list[str], extended: dict[str, str]) -> StoredItem:
        """Store a new item and its MIME content."""
        item_id = self._new_id("I", mailbox)
        number = self._counter
        mime = self.dir / mailbox / "mime"
        mime.mkdir(parents=True, exist_ok=True)
        (mime / f"{number}.eml").write_bytes(raw)
        item = StoredItem(item_id, mailbox, number, folder, is_read, draft, received, categories, extended,
                          size=len(raw))
        self.items[item_id] = item
        self._log(folder, item_id, "create")
        self._save(mailbox)
        return item

    def _log(self, folder: str, item_id: str, kind: str) -> None:
        """Record a change of a folder's items, for SyncFolderItems."""
        self._sequence += 1
        self.changes_log.append((self._sequence, folder, item_id, kind))

    # ------------------------------------------------------------------------------------ the protocol

    def handle(self, body: bytes, authorization: str | None,
               user: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """Answer one HTTP POST: (status, headers, body); user: the login its NTLM connection authenticated."""
        scheme = "NTLM" if user is not None else (authorization or "").split(" ", 1)[0]
        with self._lock:
            self.auth_schemes.append(scheme)
        if user is None:
            user = self._login(authorization)
        if user is None:
            return 401, {"WWW-Authenticate": 'Basic realm="ews-test"'}, b""
        operation = "?"
        try:
            try:
                envelope = etree.fromstring(body)
            except etree.XMLSyntaxError as exc:
                raise Fault("ErrorSchemaValidation", f"The request failed schema validation: {exc}") from exc
            header = envelope.find(f"{{{SOAP}}}Header")
            request = envelope.find(f"{{{SOAP}}}Body")
            if request is None or len(request) == 0:
                raise Fault("ErrorSchemaValidation", "The request has no body.")
            request = request[0]
            operation = etree.QName(request).localname
            with self._lock:
                if self._busy_left > 0:
                    self._busy_left -= 1
                    self.busy_answers += 1
                    raise Fault("ErrorServerBusy", "The server cannot service this request right now. Try again "
                                "later.", {"BackOffMilliseconds": str(self._back_off_ms)})
                acting = self._acting_mailbox(header, user)
                self.requests.append((operation, user, acting))
                handler = _OPERATIONS.get(operation)
                if handler is None:
                    raise Fault("ErrorInvalidRequest", f"The test EWS server does not implement {operation}.")
                messages = handler(self, request, _Context(user, acting))
            status, answer = 200, _envelope(_response(operation, messages))
        except Fault as fault:
            status, answer = fault.status, _fault(fault)
        self._capture(operation, body, status, answer)
        return status, {"Content-Type": "text/xml; charset=utf-8"}, answer

    def _login(self, authorization: str | None) -> str | None:
        """Check HTTP Basic credentials; return the user name, or None."""
        if not authorization or not authorization.startswith("Basic "):
            return None
        try:
            name, _, password = base64.b64decode(authorization[6:]).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        name = name.lower()
        with self._lock:
            user = self.users.get(name)
        return name if user is not None and user.password == password else None

    def _acting_mailbox(self, header: etree._Element | None, user: str) -> str | None:
        """The mailbox an ExchangeImpersonation header names (checked), or None without one."""
        if header is None:
            return None
        version = header.find(f"{{{T}}}RequestServerVersion")
        if version is not None and version.get("Version") not in API_VERSIONS:
            raise Fault("ErrorInvalidServerVersion", "The specified server version is invalid.")
        sid = header.find(f"{{{T}}}ExchangeImpersonation/{{{T}}}ConnectingSID")
        if sid is None:
            return None
        address = next((e.text for e in sid if etree.QName(e).localname in ("PrimarySmtpAddress", "SmtpAddress",
                                                                             "PrincipalName") and e.text), None)
        if not self.users[user].impersonation:
            raise Fault("ErrorImpersonateUserDenied",
                        "The account does not have permission to impersonate the requested user.")
        if address is None or address.lower() not in self.mailboxes:
            raise Fault("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it.")
        return address.lower()

    def _capture(self, operation: str, request: bytes, status: int, answer: bytes) -> None:
        """Write a request and its answer into capture_to, numbered in the order they came."""
        if self.capture_to is None:
            return
        with self._lock:
            self._captured += 1
            stem = self.capture_to / f"{self._captured:02d}-{operation}"
        self.capture_to.mkdir(parents=True, exist_ok=True)
        stem.with_name(stem.name + ".request.xml").write_bytes(_pretty(request))
        stem.with_name(stem.name + f".response-{status}.xml").write_bytes(_pretty(answer))


@dataclass
class _Context:
    """Who asks: the logged-in user, and the mailbox it impersonates (None without impersonation)."""

    user: str
    acting: str | None


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: POST to /EWS/Exchange.asmx."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the answer goes out in two writes: no 40 ms delayed-ACK stall per request
    ews: EwsServer
    ntlm_user: str | None = None  # the login this connection authenticated with NTLM
    ntlm_context: Any = None  # the pyspnego acceptor of a handshake under way

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with self.ews._lock:
            self.ews.in_flight += 1
            self.ews.peak_in_flight = max(self.ews.peak_in_flight, self.ews.in_flight)
        try:
            self._answer(body)
        finally:
            with self.ews._lock:
                self.ews.in_flight -= 1

    def _answer(self, body: bytes) -> None:
        """Answer one POST (after the server's delay, outside its lock)."""
        if self.ews.delay:
            time.sleep(self.ews.delay)
        if self.path.lower() != "/ews/exchange.asmx":
            status, headers, answer = 404, {"Content-Type": "text/plain"}, b"not found"
        elif self.ews.ntlm:
            challenge = self._ntlm(self.headers.get("Authorization"))
            if challenge is not None:
                status, headers, answer = 401, {"WWW-Authenticate": challenge}, b""
            else:
                status, headers, answer = self.ews.handle(body, None, user=self.ntlm_user)
        else:
            status, headers, answer = self.ews.handle(body, self.headers.get("Authorization"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _ntlm(self, authorization: str | None) -> str | None:
        """One step of an NTLM handshake: the WWW-Authenticate value to answer 401 with, or None when this
        connection is authenticated (IIS keeps an NTLM login for the connection)."""
        import spnego
        import spnego.exceptions

        if authorization and authorization.startswith("NTLM "):
            token = base64.b64decode(authorization[5:])
            if token[8:9] == b"\x01" or self.ntlm_context is None:  # a NEGOTIATE message starts a handshake
                self.ntlm_context, self.ntlm_user = spnego.server(protocol="ntlm"), None
            try:
                answer = self.ntlm_context.step(token)
            except spnego.exceptions.SpnegoError:
                self.ntlm_context = None  # a wrong password: refused, as Exchange answers a failed NTLM login
                with self.ews._lock:
                    self.ews.auth_schemes.append("NTLM")
                return "NTLM"
            if answer:
                return "NTLM " + base64.b64encode(answer).decode()  # the CHALLENGE message
            name = (self.ntlm_context.client_principal or "").split("\\")[-1].lower()
            self.ntlm_context = None
            self.ntlm_user = name if name in self.ews.users else None
        return None if self.ntlm_user is not None else "NTLM"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Stay quiet: the tests read server.requests instead."""


# ------------------------------------------------------------------------------------------ operations

def _folder_of(server: EwsServer, context: _Context, elem: etree._Element) -> StoredFolder:
    """Resolve a t:FolderId or t:DistinguishedFolderId to a folder the caller may use."""
    name = etree.QName(elem).localname
    if name == "FolderId":
        folder = server.folders.get(elem.get("Id") or "")
        if folder is None:
            raise Refused("ErrorFolderNotFound" if _decodes(elem.get("Id")) else "ErrorInvalidIdMalformed",
                          "The specified folder could not be found in the store." if _decodes(elem.get("Id"))
                          else "Id is malformed.")
        _check_access(server, context, folder.mailbox)
        return folder
    if name == "DistinguishedFolderId":
        address = elem.findtext(f"{{{T}}}Mailbox/{{{T}}}EmailAddress")
        mailbox = (address or context.acting or context.user).lower()
        if mailbox not in server.mailboxes:
            raise Refused("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it.")
        _check_access(server, context, mailbox)
        for folder in server.folders.values():
            if folder.mailbox == mailbox and folder.distinguished == elem.get("Id"):
                return folder
        raise Refused("ErrorFolderNotFound", "The specified folder could not be found in the store.")
    raise Fault("ErrorSchemaValidation", f"unexpected folder id element {name}")


def _check_access(server: EwsServer, context: _Context, mailbox: str) -> None:
    """Refuse a mailbox the caller neither impersonates, owns, nor has been granted."""
    if context.acting is not None:
        if mailbox != context.acting:
            raise Refused("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return
    if mailbox != context.user and (mailbox, context.user) not in server.delegates:
        raise Refused("ErrorAccessDenied", "Access is denied. Check credentials and try again.")


def _item_of(server: EwsServer, context: _Context, elem: etree._Element) -> StoredItem:
    """Resolve a t:ItemId to an item the caller may use."""
    item = server.items.get(elem.get("Id") or "")
    if item is None:
        if not _decodes(elem.get("Id")):
            raise Refused("ErrorInvalidIdMalformed", "Id is malformed.")
        raise Refused("ErrorItemNotFound", "The specified object was not found in the store.")
    _check_access(server, context, item.mailbox)
    return item


def _wanted(shape: etree._Element | None, everything: Sequence[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """The field URIs and extended properties (tag, type) a FolderShape or ItemShape asks for."""
    if shape is None:
        return set(), []
    base = shape.findtext(f"{{{T}}}BaseShape")
    fields = set(everything) if base in ("AllProperties", "Default") else set()
    extended = []
    for elem in shape.iterfind(f"{{{T}}}AdditionalProperties/*"):
        local = etree.QName(elem).localname
        if local == "FieldURI":
            fields.add(elem.get("FieldURI") or "")
        elif local == "ExtendedFieldURI":
            if elem.get("PropertyTag") is None:
                continue  # named properties (by set and name) are not stored by this server
            extended.append((_tag(elem.get("PropertyTag") or "0"), elem.get("PropertyType") or ""))
    return fields, extended


def _folder_xml(server: EwsServer, folder: StoredFolder, fields: set[str]) -> etree._Element:
    """A t:Folder (or CalendarFolder ...) element with the fields asked for."""
    elem = _t(_FOLDER_ELEMENTS.get(folder.folder_class or "", "Folder"))
    _t("FolderId", elem, Id=folder.id, ChangeKey=_changekey("F", folder.changes))
    parent = server.folders.get(folder.parent or "")
    if "folder:ParentFolderId" in fields and parent is not None:
        _t("ParentFolderId", elem, Id=parent.id, ChangeKey=_changekey("F", parent.changes))
    if "folder:FolderClass" in fields and folder.folder_class:
        _t("FolderClass", elem).text = folder.folder_class
    if "folder:DisplayName" in fields:
        _t("DisplayName", elem).text = folder.name
    items = [i for i in server.items.values() if i.folder == folder.id]
    if "folder:TotalCount" in fields:
        _t("TotalCount", elem).text = str(len(items))
    if "folder:ChildFolderCount" in fields:
        _t("ChildFolderCount", elem).text = str(sum(f.parent == folder.id for f in server.folders.values()))
    if "folder:UnreadCount" in fields:
        _t("UnreadCount", elem).text = str(sum(not i.is_read for i in items))
    return elem


def _get_folder(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    fields, _ = _wanted(request.find(f"{{{M}}}FolderShape"), _FOLDER_PROPERTIES)
    messages = []
    for elem in request.iterfind(f"{{{M}}}FolderIds/*"):
        try:
            folder = _folder_of(server, context, elem)
        except Refused as refused:
            messages.append(_message("GetFolder", refused))
            continue
        container = _m("Folders")
        container.append(_folder_xml(server, folder, fields))
        messages.append(_message("GetFolder", container))
    return messages


def _paging(request: etree._Element, view_name: str, total: int) -> tuple[int, int]:
    """The slice an IndexedPage...View asks for: (offset, end)."""
    view = request.find(f"{{{M}}}{view_name}")
    if view is None:
        return 0, total
    if view.get("BasePoint", "Beginning") != "Beginning":
        raise Fault("ErrorInvalidRequest", "The test EWS server pages from the beginning only.")
    offset = int(view.get("Offset") or 0)
    size = int(view.get("MaxEntriesReturned") or total)
    return offset, min(total, offset + size)


def _root_folder(offset: int, end: int, total: int, container: etree._Element) -> etree._Element:
    """The m:RootFolder paging element of FindFolder and FindItem."""
    root = _m("RootFolder", IndexedPagingOffset=str(end), TotalItemsInView=str(total),
              IncludesLastItemInRange="true" if end >= total else "false")
    root.append(container)
    return root


def _find_folder(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    fields, _ = _wanted(request.find(f"{{{M}}}FolderShape"), _FOLDER_PROPERTIES)
    if request.find(f"{{{M}}}Restriction") is not None:
        raise Fault("ErrorInvalidRequest", "The test EWS server does not filter folders (Restriction).")
    deep = request.get("Traversal") == "Deep"
    messages = []
    for elem in request.iterfind(f"{{{M}}}ParentFolderIds/*"):
        try:
            parent = _folder_of(server, context, elem)
        except Refused as refused:
            messages.append(_message("FindFolder", refused))
            continue
        found = _children(server, parent.id, deep)
        offset, end = _paging(request, "IndexedPageFolderView", len(found))
        container = _t("Folders")
        for folder in found[offset:end]:
            container.append(_folder_xml(server, folder, fields))
        messages.append(_message("FindFolder", _root_folder(offset, end, len(found), container)))
    return messages


def _children(server: EwsServer, parent: str, deep: bool) -> list[StoredFolder]:
    """The sub-folders of a folder in creation order, depth first when deep."""
    out = []
    for folder in server.folders.values():
        if folder.parent == parent:
            out.append(folder)
            if deep:
                out.extend(_children(server, folder.id, True))
    return out


def _create_folder(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    parent_elem = request.find(f"{{{M}}}ParentFolderId")
    if parent_elem is None or len(parent_elem) == 0:
        raise Fault("ErrorSchemaValidation", "CreateFolder needs a ParentFolderId.")
    messages = []
    for elem in request.iterfind(f"{{{M}}}Folders/*"):
        try:
            parent = _folder_of(server, context, parent_elem[0])
            name = elem.findtext(f"{{{T}}}DisplayName") or ""
            if not name.strip():
                raise Refused("ErrorInvalidFolderName", "The folder name is not valid.")
            if any(f.parent == parent.id and f.name.lower() == name.lower() for f in server.folders.values()):
                raise Refused("ErrorFolderExists", "A folder with the specified name already exists.")
            folder = StoredFolder(server._new_id("F", parent.mailbox), parent.mailbox, name,
                                  elem.findtext(f"{{{T}}}FolderClass") or "IPF.Note", parent.id)
            server.folders[folder.id] = folder
            server._save(parent.mailbox)
        except Refused as refused:
            messages.append(_message("CreateFolder", refused))
            continue
        container = _m("Folders")
        answer = _t(_FOLDER_ELEMENTS.get(folder.folder_class or "", "Folder"), container)
        _t("FolderId", answer, Id=folder.id, ChangeKey=_changekey("F", folder.changes))
        messages.append(_message("CreateFolder", container))
    return messages


# The element of an item by its class, as Exchange answers (t:Message for mail).
_ITEM_ELEMENTS = {"IPM.Appointment": "CalendarItem", "IPM.Contact": "Contact", "IPM.Task": "Task"}


def _item_xml(server: EwsServer, item: StoredItem, fields: set[str], extended: list[tuple[str, str]]) -> etree._Element:
    """A t:Message (t:CalendarItem, t:Contact, t:Task) element with the fields asked for, in the schema's order."""
    kind = _ITEM_ELEMENTS.get(item.item_class, "Message")
    elem = _t(kind)
    if "item:MimeContent" in fields:
        mime = (_icalendar(item) if kind == "CalendarItem" else _vcard(item) if kind == "Contact"
                else None if kind == "Task" else server.mime(item.id))
        if mime is not None:
            _t("MimeContent", elem, CharacterSet="UTF-8").text = base64.b64encode(mime).decode()
    _t("ItemId", elem, Id=item.id, ChangeKey=_changekey("I", item.changes))
    folder = server.folders[item.folder]
    if "item:ParentFolderId" in fields:
        _t("ParentFolderId", elem, Id=folder.id, ChangeKey=_changekey("F", folder.changes))
    if "item:ItemClass" in fields:
        _t("ItemClass", elem).text = item.item_class
    if "item:Subject" in fields and "Subject" in item.properties:
        _t("Subject", elem).text = item.properties["Subject"]
    if "item:Body" in fields and item.properties.get("Body"):
        _t("Body", elem, BodyType="Text").text = item.properties["Body"]
    if "item:DateTimeReceived" in fields:
        _t("DateTimeReceived", elem).text = item.received
    if "item:Size" in fields:
        _t("Size", elem).text = str(item.size)
    if "item:Categories" in fields and item.categories:
        categories = _t("Categories", elem)
        for category in item.categories:
            _t("String", categories).text = category
    if "item:Importance" in fields and "Importance" in item.properties:
        _t("Importance", elem).text = item.properties["Importance"]
    if "item:IsDraft" in fields:
        _t("IsDraft", elem).text = _bool(item.draft)
    if "item:DateTimeCreated" in fields:
        _t("DateTimeCreated", elem).text = item.received
    for tag, kind_ in extended:
        value = _extended_value(item, tag, kind_)
        if value is not None:
            prop = _t("ExtendedProperty", elem)
            _t("ExtendedFieldURI", prop, PropertyTag=tag, PropertyType=kind_)
            _t("Value", prop).text = value
    if kind == "Task":
        for name in _TASK_FIELDS:
            if f"task:{name}" in fields and item.properties.get(name):
                _t(name, elem).text = item.properties[name]
    if kind == "Message" and "message:IsRead" in fields:
        _t("IsRead", elem).text = _bool(item.is_read)
    return elem


def _icalendar(item: StoredItem) -> bytes:
    """A calendar item's MIME content as Exchange writes it: iCalendar, times in the item's time zone."""
    p = item.properties
    ict = dt.timezone(dt.timedelta(hours=7))
    local = [_parse_time(p[name]).astimezone(ict).strftime("%Y%m%dT%H%M%S") for name in ("Start", "End")]
    lines = ["BEGIN:VCALENDAR", "METHOD:PUBLISH", "PRODID:Microsoft Exchange Server 2016", "VERSION:2.0",
             "BEGIN:VTIMEZONE", "TZID:SE Asia Standard Time", "BEGIN:STANDARD", "DTSTART:16010101T000000",
             "TZOFFSETFROM:+0700", "TZOFFSETTO:+0700", "END:STANDARD", "END:VTIMEZONE", "BEGIN:VEVENT",
             f"DESCRIPTION;LANGUAGE=vi-VN:{_ical_text(p.get('Body', ''))}",
             f"UID:{base64.b16encode(item.id.encode()).decode()}",
             f"SUMMARY;LANGUAGE=vi-VN:{_ical_text(p['Subject'])}",
             f"DTSTART;TZID=SE Asia Standard Time:{local[0]}", f"DTEND;TZID=SE Asia Standard Time:{local[1]}",
             "CLASS:PUBLIC", "PRIORITY:5", f"DTSTAMP:{item.received.replace('-', '').replace(':', '')}",
             "TRANSP:OPAQUE", "STATUS:CONFIRMED", "SEQUENCE:0", f"LOCATION;LANGUAGE=vi-VN:{_ical_text(p['Location'])}",
             "X-MICROSOFT-CDO-BUSYSTATUS:BUSY", "END:VEVENT", "END:VCALENDAR"]
    return "".join(_fold_line(line) for line in lines).encode()


def _vcard(item: StoredItem) -> bytes:
    """A contact's MIME content as Exchange writes it: a vCard 3.0."""
    p = item.properties
    full = " ".join(x for x in (p["Surname"], p["MiddleName"], p["GivenName"]) if x)
    lines = ["BEGIN:VCARD", "VERSION:3.0", f"N:{p['Surname']};{p['GivenName']};{p['MiddleName']};;", f"FN:{full}",
             f"ORG:{_ical_text(p['CompanyName'])};", f"TITLE:{_ical_text(p['JobTitle'])}",
             f"TEL;TYPE=WORK:{p['BusinessPhone']}", f"EMAIL;TYPE=INTERNET:{p['EmailAddress']}", "END:VCARD"]
    return "".join(_fold_line(line) for line in lines).encode()


def _ical_text(value: str) -> str:
    """An iCalendar / vCard TEXT value, escaped."""
    return value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\n", "\\n")


def _fold_line(line: str) -> str:
    """A content line folded every 73 characters, not octets: over 75 octets for Vietnamese text, as an export must
    expect from a server (RFC 5545 only says SHOULD), CRLF."""
    parts = [line[i:i + 73] for i in range(0, len(line), 73)] or [""]
    return "\r\n ".join(parts) + "\r\n"


def rewrite_like_exchange(raw: bytes) -> bytes:
    """Rewrite a message the way Exchange does when it stores it: headers added and reordered, text re-encoded
    (quoted-printable; base64 when most of it is not ASCII), headers folded at 76 characters, CRLF line ends."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        text = part.get_content()
        wide = sum(ord(c) > 127 for c in text) * 3 > len(text)
        part.set_content(text, subtype=part.get_content_subtype(), charset="utf-8",
                         cte="base64" if wide else "quoted-printable")
    order = ("From", "To", "Cc", "Subject", "Thread-Topic", "Date", "Message-ID", "In-Reply-To", "References")
    headers = list(message.items())
    for name in [n for n, _ in headers]:
        del message[name]
    first = sorted((h for h in headers if h[0] in order), key=lambda h: order.index(h[0]))
    rest = [h for h in headers if h[0] not in order and h[0].lower() != "mime-version"]
    for name, value in first + [("Accept-Language", "vi-VN, en-US"), ("Content-Language", "vi-VN"),
                                ("X-MS-Has-Attach", ""), ("X-MS-TNEF-Correlator", "")] + rest:
        # a raw 8-bit header is read as UTF-8 and written as RFC 2047 encoded words
        message[name] = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    message["MIME-Version"] = "1.0"
    return message.as_bytes(policy=email.policy.SMTP.clone(max_line_length=76))


def _extended_value(item: StoredItem, tag: str, kind: str) -> str | None:
    """An extended property's value: stored, or computed for the message flags and the delivery time."""
    if _tag(tag) == _tag(hex(PR_MESSAGE_FLAGS)):
        return str((MSGFLAG_READ if item.is_read else 0) | (MSGFLAG_UNSENT if item.draft else 0))
    if _tag(tag) == _tag(hex(PR_MESSAGE_DELIVERY_TIME)):
        return item.received
    return item.extended.get(f"{tag}/{kind}")


def _find_item(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    fields, extended = _wanted(request.find(f"{{{M}}}ItemShape"), ())
    if request.find(f"{{{M}}}Restriction") is not None or request.find(f"{{{M}}}QueryString") is not None:
        raise Fault("ErrorInvalidRequest", "The test EWS server does not filter items (Restriction, QueryString).")
    if request.get("Traversal") != "Shallow":
        raise Fault("ErrorInvalidRequest", "The test EWS server lists items with Traversal=\"Shallow\" only.")
    order = request.find(f"{{{M}}}SortOrder/{{{T}}}FieldOrder")
    messages = []
    for elem in request.iterfind(f"{{{M}}}ParentFolderIds/*"):
        try:
            folder = _folder_of(server, context, elem)
        except Refused as refused:
            messages.append(_message("FindItem", refused))
            continue
        found = [i for i in server.items.values() if i.folder == folder.id]
        if order is not None:
            uri = order.find(f"{{{T}}}FieldURI")
            if uri is None or uri.get("FieldURI") != "item:DateTimeReceived":
                raise Fault("ErrorInvalidRequest", "The test EWS server sorts on item:DateTimeReceived only.")
            found.sort(key=lambda i: (i.received, i.number), reverse=order.get("Order") == "Descending")
        offset, end = _paging(request, "IndexedPageItemView", len(found))
        container = _t("Items")
        for item in found[offset:end]:
            container.append(_item_xml(server, item, fields, extended))
        messages.append(_message("FindItem", _root_folder(offset, end, len(found), container)))
    return messages


def _get_item(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    fields, extended = _wanted(request.find(f"{{{M}}}ItemShape"), _ITEM_PROPERTIES)
    messages = []
    for elem in request.iterfind(f"{{{M}}}ItemIds/*"):
        try:
            item = _item_of(server, context, elem)
        except Refused as refused:
            messages.append(_message("GetItem", refused))
            continue
        container = _m("Items")
        container.append(_item_xml(server, item, fields, extended))
        messages.append(_message("GetItem", container))
    return messages


def _create_item(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    if request.get("MessageDisposition") != "SaveOnly":
        raise Fault("ErrorInvalidRequest", "The test EWS server saves messages (SaveOnly); it sends none.")
    target = request.find(f"{{{M}}}SavedItemFolderId")
    if target is None or len(target) == 0:
        raise Fault("ErrorInvalidRequest", "SaveOnly needs a SavedItemFolderId.")
    messages = []
    for elem in request.iterfind(f"{{{M}}}Items/*"):
        try:
            folder = _folder_of(server, context, target[0])
            if etree.QName(elem).localname != "Message" or elem.find(f"{{{T}}}MimeContent") is None:
                raise Refused("ErrorInvalidRequest", "The test EWS server creates messages from MimeContent only.")
            try:
                raw = base64.b64decode(elem.findtext(f"{{{T}}}MimeContent") or "", validate=True)
            except binascii.Error as exc:
                raise Refused("ErrorMimeContentInvalidBase64String", "The MIME content is not valid Base64.") from exc
            if server.max_message_size is not None and len(raw) > server.max_message_size:
                raise Refused("ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
            quota = server.quotas.get(folder.mailbox)
            used = sum(i.size for i in server.items.values() if i.mailbox == folder.mailbox)
            if quota is not None and used + len(raw) > quota:
                raise Refused("ErrorQuotaExceeded", "The mailbox quota has been exceeded.")
            extended = {}
            for prop in elem.iterfind(f"{{{T}}}ExtendedProperty"):
                uri = prop.find(f"{{{T}}}ExtendedFieldURI")
                if uri is None or uri.get("PropertyTag") is None:
                    continue
                extended[f"{_tag(uri.get('PropertyTag') or '0')}/{uri.get('PropertyType')}"] = prop.findtext(
                    f"{{{T}}}Value") or ""
            flags = extended.pop(f"{_tag(hex(PR_MESSAGE_FLAGS))}/Integer", None)
            received = extended.pop(f"{_tag(hex(PR_MESSAGE_DELIVERY_TIME))}/SystemTime", None)
            # Like Exchange: an item saved without PR_MESSAGE_FLAGS is a draft (MSGFLAG_UNSENT)
            draft = flags is None or bool(int(flags) & MSGFLAG_UNSENT)
            is_read_text = elem.findtext(f"{{{T}}}IsRead")
            is_read = (is_read_text in ("true", "1") if is_read_text is not None
                       else flags is not None and bool(int(flags) & MSGFLAG_READ))
            when = _ews_time(_parse_time(received)) if received else _ews_time(dt.datetime.now(dt.timezone.utc))
            categories = [c.text or "" for c in elem.iterfind(f"{{{T}}}Categories/{{{T}}}String")]
            if server.rewrite_mime:
                raw = rewrite_like_exchange(raw)
            item = server._store_item(folder.mailbox, folder.id, raw, is_read, draft, when, categories, extended)
        except Refused as refused:
            messages.append(_message("CreateItem", refused))
            continue
        container = _m("Items")
        answer = _t("Message", container)
        _t("ItemId", answer, Id=item.id, ChangeKey=_changekey("I", item.changes))
        messages.append(_message("CreateItem", container))
    return messages


def _update_item(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    messages = []
    for change in request.iterfind(f"{{{M}}}ItemChanges/{{{T}}}ItemChange"):
        try:
            id_elem = change.find(f"{{{T}}}ItemId")
            if id_elem is None:
                raise Fault("ErrorInvalidRequest", "The test EWS server updates items by ItemId only.")
            item = _item_of(server, context, id_elem)
            if server.require_changekey and id_elem.get("ChangeKey") is None:
                raise Refused("ErrorChangeKeyRequiredForWriteOperations",
                              "ChangeKey is required if overriding conflict resolution.")
            updates = list(change.iterfind(f"{{{T}}}Updates/*"))
            for update in updates:
                _apply_update(item, update)
            item.changes += 1
            read_only = all(u.find(f"{{{T}}}FieldURI") is not None
                            and u.find(f"{{{T}}}FieldURI").get("FieldURI") == "message:IsRead" for u in updates)
            server._log(item.folder, item.id, "read" if updates and read_only else "update")
            server._save(item.mailbox)
        except Refused as refused:
            messages.append(_message("UpdateItem", refused))
            continue
        container = _m("Items")
        answer = _t("Message", container)
        _t("ItemId", answer, Id=item.id, ChangeKey=_changekey("I", item.changes))
        message = _message("UpdateItem", container)
        conflicts = _m("ConflictResults", message)
        _t("Count", conflicts).text = "0"
        messages.append(message)
    return messages


def _apply_update(item: StoredItem, update: etree._Element) -> None:
    """Apply one SetItemField or DeleteItemField (AppendToItemField is refused)."""
    kind = etree.QName(update).localname
    uri = update.find(f"{{{T}}}FieldURI")
    extended_uri = update.find(f"{{{T}}}ExtendedFieldURI")
    if kind not in ("SetItemField", "DeleteItemField"):
        raise Refused("ErrorInvalidRequest", f"The test EWS server does not {kind}.")
    if extended_uri is not None:
        tag = _tag(extended_uri.get("PropertyTag") or "0")
        key = f"{tag}/{extended_uri.get('PropertyType')}"
        if tag in (_tag(hex(PR_MESSAGE_FLAGS)), _tag(hex(PR_MESSAGE_DELIVERY_TIME))):
            raise Refused("ErrorInvalidPropertySet", "This property can only be set when the item is created.")
        if kind == "DeleteItemField":
            item.extended.pop(key, None)
        else:
            item.extended[key] = update.findtext(f"{{{T}}}Message/{{{T}}}ExtendedProperty/{{{T}}}Value") or ""
        return
    name = uri.get("FieldURI") if uri is not None else None
    if name == "message:IsRead":
        item.is_read = kind == "SetItemField" and update.findtext(f"{{{T}}}Message/{{{T}}}IsRead") in ("true", "1")
    elif name == "item:Categories":
        item.categories = ([c.text or "" for c in update.iterfind(f"{{{T}}}Message/{{{T}}}Categories/{{{T}}}String")]
                           if kind == "SetItemField" else [])
    else:
        raise Refused("ErrorInvalidPropertySet", f"The test EWS server does not update {name}.")


def _delete_item(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    messages = []
    for elem in request.iterfind(f"{{{M}}}ItemIds/*"):
        try:
            item = _item_of(server, context, elem)
        except Refused as refused:
            messages.append(_message("DeleteItem", refused))
            continue
        _remove(server, item)
        messages.append(_message("DeleteItem", None))
    return messages


def _remove(server: EwsServer, item: StoredItem) -> None:
    """Delete an item and its MIME content."""
    del server.items[item.id]
    (server.dir / item.mailbox / "mime" / f"{item.number}.eml").unlink(missing_ok=True)
    server._log(item.folder, item.id, "delete")
    server._save(item.mailbox)


def _sync_folder_items(server: EwsServer, request: etree._Element, context: _Context) -> list[etree._Element]:
    """SyncFolderItems: the changes of a folder since a sync state, each item once with its latest change."""
    fields, extended = _wanted(request.find(f"{{{M}}}ItemShape"), ())
    folder_elem = request.find(f"{{{M}}}SyncFolderId")
    if folder_elem is None or len(folder_elem) == 0:
        raise Fault("ErrorSchemaValidation", "SyncFolderItems needs a SyncFolderId.")
    server.sync_states_given.append(bool(request.findtext(f"{{{M}}}SyncState")))
    try:
        folder = _folder_of(server, context, folder_elem[0])
        since = _sync_position(server, request.findtext(f"{{{M}}}SyncState"), folder.id)
    except Refused as refused:
        # as Exchange answers a refused state (its SyncFolderItems reference shows it): an empty SyncState and
        # IncludesLastItemInRange follow the error
        message = _message("SyncFolderItems", refused)
        _m("SyncState", message)
        _m("IncludesLastItemInRange", message).text = "true"
        return [message]
    limit = int(request.findtext(f"{{{M}}}MaxChangesReturned") or 100)
    events: dict[str, list[tuple[int, str]]] = {}
    for sequence, folder_id, item_id, kind in server.changes_log:
        if folder_id == folder.id and sequence > since:
            events.setdefault(item_id, []).append((sequence, kind))
    changes: list[tuple[int, str, str]] = []  # (last sequence, change, item id)
    for item_id, happened in events.items():
        kinds = {kind for _, kind in happened}
        exists = item_id in server.items and server.items[item_id].folder == folder.id
        if "create" in kinds:
            change = "Create" if exists else None  # made and deleted since the state: nothing to say
        elif "delete" in kinds or not exists:
            change = "Delete"
        else:
            change = "ReadFlagChange" if kinds == {"read"} else "Update"
        if change is not None:
            changes.append((happened[-1][0], change, item_id))
    changes.sort()
    page, more = changes[:limit], len(changes) > limit
    position = page[-1][0] if more else server._sequence
    message = _m("SyncFolderItemsResponseMessage", ResponseClass="Success")
    _m("ResponseCode", message).text = "NoError"
    _m("SyncState", message).text = base64.b64encode(
        f"S:{server._sync_generation}:{folder.id}:{position}".encode()).decode()
    _m("IncludesLastItemInRange", message).text = _bool(not more)
    container = _m("Changes", message)
    for _, change, item_id in page:
        elem = _t(change, container)
        if change in ("Create", "Update"):
            elem.append(_item_xml(server, server.items[item_id], fields, extended))
        elif change == "Delete":
            _t("ItemId", elem, Id=item_id)
        else:
            item = server.items[item_id]
            _t("ItemId", elem, Id=item_id, ChangeKey=_changekey("I", item.changes))
            _t("IsRead", elem).text = _bool(item.is_read)
    return [message]


def _sync_position(server: EwsServer, state: str | None, folder: str) -> int:
    """The change sequence a sync state stands for; ErrorInvalidSyncStateData for a state not of this folder."""
    if not state:
        return 0
    try:
        kind, generation, folder_id, position = base64.b64decode(state, validate=True).decode().rsplit(":", 3)
        if kind == "S" and int(generation) == server._sync_generation and folder_id == folder:
            return int(position)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise Refused("ErrorInvalidSyncStateData", "Synchronization state data is corrupt or otherwise invalid.")


_OPERATIONS: dict[str, Callable[[EwsServer, etree._Element, _Context], list[etree._Element]]] = {
    "GetFolder": _get_folder, "FindFolder": _find_folder, "CreateFolder": _create_folder, "FindItem": _find_item,
    "GetItem": _get_item, "CreateItem": _create_item, "UpdateItem": _update_item, "DeleteItem": _delete_item,
    "SyncFolderItems": _sync_folder_items,
}


# ----------------------------------------------------------------------------------------------- XML

def _t(name: str, parent: etree._Element | None = None, **attrs: str) -> etree._Element:
    """A types-namespace element."""
    tag = f"{{{T}}}{name}"
    return etree.SubElement(parent, tag, attrs, nsmap=NSMAP) if parent is not None else etree.Element(tag, attrs,
                                                                                                          nsmap=NSMAP)


def _m(name: str, parent: etree._Element | None = None, **attrs: str) -> etree._Element:
    """A messages-namespace element."""
    tag = f"{{{M}}}{name}"
    return etree.SubElement(parent, tag, attrs, nsmap=NSMAP) if parent is not None else etree.Element(tag, attrs,
                                                                                                          nsmap=NSMAP)


def _message(operation: str, content: etree._Element | Refused | None) -> etree._Element:
    """One m:<Operation>ResponseMessage: success with its container, or an error."""
    if isinstance(content, Refused):
        message = _m(f"{operation}ResponseMessage", ResponseClass="Error")
        _m("MessageText", message).text = content.text
        _m("ResponseCode", message).text = content.code
        _m("DescriptiveLinkKey", message).text = "0"
        return message
    message = _m(f"{operation}ResponseMessage", ResponseClass="Success")
    _m("ResponseCode", message).text = "NoError"
    if content is not None:
        message.append(content)
    return message


def _response(operation: str, messages: Iterable[etree._Element]) -> etree._Element:
    response = _m(f"{operation}Response")
    container = _m("ResponseMessages", response)
    for message in messages:
        container.append(message)
    return response


def _envelope(body_content: etree._Element) -> bytes:
    envelope = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"s": SOAP})
    header = etree.SubElement(envelope, f"{{{SOAP}}}Header")
    etree.SubElement(header, f"{{{T}}}ServerVersionInfo", SERVER_VERSION, nsmap={"h": T})
    body = etree.SubElement(envelope, f"{{{SOAP}}}Body")
    body.append(body_content)
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def _fault(fault: Fault) -> bytes:
    """A SOAP fault as Exchange writes it, the response code and values in its detail."""
    envelope = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"s": SOAP})
    body = etree.SubElement(envelope, f"{{{SOAP}}}Body")
    elem = etree.SubElement(body, f"{{{SOAP}}}Fault")
    code = etree.SubElement(elem, "faultcode", nsmap={"a": T})
    code.text = f"a:{fault.code}"
    etree.SubElement(elem, "faultstring").text = fault.text
    detail = etree.SubElement(elem, "detail")
    etree.SubElement(detail, f"{{{E}}}ResponseCode", nsmap={"e": E}).text = fault.code
    etree.SubElement(detail, f"{{{E}}}Message", nsmap={"e": E}).text = fault.text
    if fault.values:
        values = etree.SubElement(detail, f"{{{T}}}MessageXml", nsmap={"t": T})
        for name, value in fault.values.items():
            etree.SubElement(values, f"{{{T}}}Value", {"Name": name}).text = value
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def _pretty(data: bytes) -> bytes:
    """Indent an XML document for reading (a fixture); other bytes unchanged."""
    try:
        return etree.tostring(etree.fromstring(data, etree.XMLParser(remove_blank_text=True)), pretty_print=True,
                              xml_declaration=True, encoding="utf-8")
    except etree.XMLSyntaxError:
        return data


def _changekey(kind: str, changes: int) -> str:
    return base64.b64encode(f"CK:{kind}:{changes}".encode()).decode()


def _decodes(value: str | None) -> bool:
    """Whether an id is one this server could have made (base64 of "F:..." or "I:...")."""
    try:
        return base64.b64decode(value or "", validate=True)[:2] in (b"F:", b"I:")
    except binascii.Error:
        return False


def _tag(text: str) -> str:
    """A property tag written one way: "0x1090"."""
    return hex(int(text, 16) if text.lower().startswith("0x") else int(text))


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _ews_time(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.timezone.utc)


def _imap_flags(item: StoredItem) -> tuple[str, ...]:
    """An item's state as IMAP flags, for the tests' comparisons: \\Seen, \\Flagged, \\Answered, $Forwarded,
    \\Draft and the categories."""
    flags = []
    if item.is_read:
        flags.append("\\Seen")
    if item.extended.get("0x1090/Integer") == "2":
        flags.append("\\Flagged")
    verb = item.extended.get("0x1081/Integer")
    if verb in ("102", "103"):
        flags.append("\\Answered")
    elif verb == "104":
        flags.append("$Forwarded")
    if item.draft:
        flags.append("\\Draft")
    flags.extend(item.categories)
    return tuple(sorted(flags))


__all__ = ["DEFAULT_FOLDERS", "EwsServer", "SERVER_VERSION"]
