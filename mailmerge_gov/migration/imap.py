"""The IMAP mail store: one logged-in connection to one mailbox, through imapclient."""

from __future__ import annotations

import datetime as dt
import imaplib
import logging
import re
import ssl
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import imapclient
import imapclient.exceptions
from imapclient.datetime_util import datetime_to_INTERNALDATE
from imapclient.imapclient import _literal  # bytes always sent as a literal, never quoted or line-end mapped
from imapclient.response_parser import parse_fetch_response

from mailmerge_gov.config import IMAP_LOGINS, MailServer, SecretError, mailbox_password
from mailmerge_gov.migration.protocol import (
    SPECIAL_USES,
    ConnectionLost,
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

# Messages and bytes per FETCH of bodies: a round trip stays short enough to survive a slow link.
FETCH_MESSAGES = 200
FETCH_BYTES = 20 << 20

_ITEMS_LISTED = "(UID RFC822.SIZE FLAGS INTERNALDATE)"
_ITEMS_FETCHED = "(UID RFC822.SIZE FLAGS INTERNALDATE BODY.PEEK[])"  # PEEK: reading must not set \Seen
# The same for messages the last listing described: their size, flags and date are known already, and
# parsing them again for every body was a sixth of the client's time copying a mailbox.
_BODY_FETCHED = "(UID BODY.PEEK[])"
# Dovecot ends every tagged answer with its timings, "(0.001 + 0.000 secs)": noise in an error message.
_TIMINGS = re.compile(r"\s*\(\d+\.\d+(?: \+ \d+\.\d+)* secs\)")
_FAILED = re.compile(r"^[a-z]+ failed: ")
_RESPONSE_CODE = re.compile(r"^\[([A-Z0-9-]+)[^\]]*\]\s*", re.IGNORECASE)
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)
_APPENDLIMIT = re.compile(rb"^APPENDLIMIT=(\d+)$")
# A flag that can go into an APPEND or STORE flag list: "\" system flags and keyword atoms (RFC 3501).
_FLAG = re.compile(r"^\\?[!#$&'+\-./0-9:;<=>?@A-Z^_`a-z|}~]+$")
# XLIST (old Gmail) names the junk folder \Spam; the other special uses are spelled as in RFC 6154.
_XLIST_USES = {"\\spam": "\\Junk"}
_QUOTA_WORDS = re.compile(r"quota", re.IGNORECASE)
_TOO_BIG_WORDS = re.compile(r"too (large|big)|maximum size|size limit", re.IGNORECASE)


class _Client(imapclient.IMAPClient):
    """IMAPClient whose errors keep the server's words in UTF-8, and that does not trace its traffic."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # imapclient sets imaplib's debug level to 5 and sends the trace to a logger: imaplib then formats a
        # repr of every line and message it reads (40% of the client's time copying a mailbox) for a logger
        # that drops it, and with DEBUG logging on, the LOGIN line with its password would reach the log.
        self._imap.debug = 0

    def _check_resp(self, expected: str, command: str, typ: str, data: list[Any]) -> None:
        """Raise IMAPClientError when a command did not end with `expected`."""
        # imapclient decodes the answer as ASCII and drops what is not: Dovecot's "Mailbox doesn't exist:
        # Lưu trữ" (raw UTF-8, not modified UTF-7) became "Lu tr"
        if typ != expected:
            raise imapclient.exceptions.IMAPClientError(f"{command} failed: {_text(data)}")


def open_imap(server: MailServer, mailbox: str) -> ImapStore:
    """Connect to an IMAP server and log in for one mailbox the way the configuration says."""
    url = server.url or ""
    if server.kind != "imap" or not url:
        raise MailboxError(f"{url or server.kind}: not an IMAP server (no imap:// or imaps:// URL)")
    who = _login_name(server, mailbox)
    try:
        if server.login == "user" and server.credentials_file is not None:
            password: str | None = mailbox_password(server.credentials_file, mailbox)
        else:
            password = server.password.reveal() if server.password else None
    except SecretError as exc:
        raise LoginFailed(f"{url}: cannot log in for {mailbox}: {exc}") from exc
    if password is None:
        raise LoginFailed(f"{url}: cannot log in for {mailbox}: no password configured")
    context = None
    if server.use_ssl or server.starttls:
        try:
            context = ssl.create_default_context(cafile=str(server.ca_file) if server.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise MailboxError(f"{url}: cannot read ca_file {server.ca_file}: {exc}") from exc
    try:
        client = _Client(server.host, port=server.port, ssl=server.use_ssl, ssl_context=context,
                         timeout=server.timeout)
    except ssl.SSLCertVerificationError as exc:
        # a certificate the CAs do not vouch for stays so on a retry
        raise MailboxError(f"{url}: TLS failed: {exc.verify_message or exc}") from exc
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        raise ConnectionLost(f"{url}: cannot connect: {_words(exc)}") from exc
    try:
        if server.starttls:
            client.starttls(context)
        _login(client, server, mailbox, password)
        store = ImapStore(client, url, mailbox)
    except imapclient.exceptions.LoginError as exc:
        _quietly_logout(client)
        raise LoginFailed(f"{url}: login for {mailbox} as {who} failed: {_words(exc)}") from exc
    except ssl.SSLCertVerificationError as exc:
        _quietly_logout(client)
        raise MailboxError(f"{url}: TLS failed: {exc.verify_message or exc}") from exc
    except (OSError, imapclient.exceptions.IMAPClientAbortError) as exc:
        _quietly_logout(client)
        raise ConnectionLost(f"{url}: connection lost while logging in for {mailbox}: {_words(exc)}") from exc
    except imapclient.exceptions.IMAPClientError as exc:
        _quietly_logout(client)
        raise MailboxError(f"{url}: cannot log in for {mailbox}: {_words(exc)}") from exc
    except MailboxError:
        _quietly_logout(client)
        raise
    return store


def _login_name(server: MailServer, mailbox: str) -> str:
    """Describe who logs in, for messages (never the password)."""
    if server.login not in IMAP_LOGINS:
        raise LoginFailed(f"{server.url}: unknown login = \"{server.login}\" (one of {', '.join(IMAP_LOGINS)})")
    if server.login == "user":
        return mailbox
    if not server.admin_user:
        raise LoginFailed(f"{server.url}: login = \"{server.login}\" needs admin_user, and none is configured")
    if server.login == "master":
        return f"{mailbox}{server.master_separator}{server.admin_user}"
    return f"{server.admin_user} (authzid {mailbox})"


def _login(client: imapclient.IMAPClient, server: MailServer, mailbox: str, password: str) -> None:
    """Log in with the configured mode."""
    if server.login == "authzid":
        client.plain_login(server.admin_user, password, authorization_identity=mailbox)
        return
    name = mailbox if server.login == "user" else f"{mailbox}{server.master_separator}{server.admin_user}"
    if (name + password).isascii():
        client.login(name, password)
    elif client.has_capability("AUTH=PLAIN"):
        # imaplib sends LOGIN arguments as ASCII; SASL PLAIN carries UTF-8 (a Vietnamese password)
        client.plain_login(name, password)
    else:
        raise imapclient.exceptions.LoginError("the login name or password is not ASCII and the server "
                                               "offers no AUTH=PLAIN to send it")


class ImapStore:
    """One mailbox on an IMAP server, as the migration reads and writes it."""

    def __init__(self, client: imapclient.IMAPClient, url: str, mailbox: str) -> None:
        """Take over a logged-in client; learn the capabilities and the separator."""
        self._client: imapclient.IMAPClient | None = client
        self.url = url
        self.mailbox = mailbox
        self._selected: str | None = None
        self._writable = False
        self._known: set[str] = set()  # folders known to exist, so create_folder need not ask again
        self._sizes: dict[str, dict[int, int]] = {}  # sizes from the last listing, to size FETCH batches
        self._listed: dict[str, dict[int, MessageInfo]] = {}  # the last listing of each folder
        with self._errors("read capabilities"):
            caps = set(client.capabilities())
            self._condstore = b"CONDSTORE" in caps
            if self._condstore and b"ENABLE" in caps:
                # ENABLE is only legal before a SELECT; with it every FETCH and SELECT reports mod-sequences
                client.enable("CONDSTORE")
            self._multiappend = b"MULTIAPPEND" in caps
            self._uidplus = b"UIDPLUS" in caps
            self._xlist = b"XLIST" in caps and b"SPECIAL-USE" not in caps
            self._limit = next((int(m.group(1)) for m in map(_APPENDLIMIT.match, caps) if m), None)
            top = client.list_folders("", "")  # LIST "" "" answers with the hierarchy separator
        delimiter = top[0][1] if top else None
        self._separator = delimiter.decode() if isinstance(delimiter, bytes) else (delimiter or "/")

    def __enter__(self) -> ImapStore:
        """Use the store in a with block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Log out at the end of a with block."""
        self.close()

    @property
    def separator(self) -> str:
        """The hierarchy separator new folders are written with."""
        return self._separator

    def folders(self) -> list[FolderInfo]:
        """List every folder, INBOX included, names decoded from modified UTF-7."""
        with self._errors("list folders"):
            client = self._live()
            listed = client.xlist_folders() if self._xlist else client.list_folders()
        result = [_folder_info(flags, delimiter, name) for flags, delimiter, name in listed]
        self._known.update(f.name for f in result if f.selectable)
        return result

    def status(self, folder: str) -> FolderStatus:
        """Return UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and the message count of a folder."""
        with self._errors("read the status", folder):
            client = self._live()
            if self._selected == folder:
                # STATUS SHOULD NOT be used on the selected folder (RFC 3501 6.3.10): select it again instead
                writable, self._selected = self._writable, None
                info = client.select_folder(folder, readonly=not writable)
                self._selected = folder
                return FolderStatus(int(info[b"UIDVALIDITY"]), _int_or_none(info.get(b"UIDNEXT")),
                                    _int_or_none(info.get(b"HIGHESTMODSEQ")) if self._condstore else None,
                                    int(info[b"EXISTS"]))
            items = ["MESSAGES", "UIDNEXT", "UIDVALIDITY"] + (["HIGHESTMODSEQ"] if self._condstore else [])
            info = client.folder_status(folder, items)
        return FolderStatus(int(info[b"UIDVALIDITY"]), _int_or_none(info.get(b"UIDNEXT")),
                            _int_or_none(info.get(b"HIGHESTMODSEQ")), int(info[b"MESSAGES"]))

    def list_messages(self, folder: str, after_uid: int = 0) -> list[MessageInfo]:
        """List the messages with a UID above after_uid: key, size, flags and INTERNALDATE."""
        with self._errors("list the messages", folder):
            self._select(folder, refresh=True)
            fetched = self._uid_fetch(f"{after_uid + 1}:*", _ITEMS_LISTED)
        # "n:*" always takes in the last message, even when its UID is below n (RFC 3501 6.4.8)
        infos = [self._info(uid, data, folder) for uid, data in sorted(fetched.items())
                 if uid > after_uid and b"RFC822.SIZE" in data]
        self._sizes[folder] = {info.uid: info.size for info in infos if info.uid is not None}
        self._listed[folder] = {info.uid: info for info in infos if info.uid is not None}
        return infos

    def fetch(self, folder: str, keys: Sequence[str]) -> Iterator[Message]:
        """Yield the messages with these keys, raw bytes as stored, in the order asked; vanished ones are left out."""
        uids = [self._uid_of(folder, key) for key in keys]
        sizes = self._sizes.get(folder, {})
        listed = self._listed.get(folder, {})
        for batch in _batches(uids, sizes):
            items = _BODY_FETCHED if all(uid in listed for uid in batch) else _ITEMS_FETCHED
            with self._errors("fetch messages", folder):
                self._select(folder)
                fetched = self._uid_fetch(_uid_set(batch), items)
                missing = [uid for uid in batch if uid not in fetched]
                if missing:
                    # messages that arrived after the SELECT are unknown to this session until a NOOP
                    self._live().noop()
                    fetched.update(self._uid_fetch(_uid_set(missing), items))
                messages = [Message(listed[uid] if items == _BODY_FETCHED else self._info(uid, fetched[uid], folder),
                                    fetched[uid][b"BODY[]"])
                            for uid in batch if isinstance(fetched.get(uid, {}).get(b"BODY[]"), bytes)]
            # outside the error mapping: an exception of the caller's loop is not the server's
            yield from messages

    def create_folder(self, folder: str) -> None:
        """Create a folder and its parents; nothing happens when it exists."""
        if folder in self._known:
            return
        parts = folder.split(self._separator) if self._separator else [folder]
        with self._errors("create the folder", folder):
            client = self._live()
            for depth in range(1, len(parts) + 1):
                name = self._separator.join(parts[:depth])
                if name in self._known:
                    continue
                try:
                    client.create_folder(name)
                except imapclient.exceptions.IMAPClientAbortError:
                    raise
                except imapclient.exceptions.IMAPClientError as exc:
                    # "already exists" is worded differently by every server ([ALREADYEXISTS] is RFC 5530):
                    # ask whether it is there now instead of reading the words
                    if not any(name == n for _f, _d, n in client.list_folders("", name)):
                        raise MailboxError(self._where(f"cannot create folder {name!r}: {_words(exc)}",
                                                       folder)) from exc
                self._known.add(name)

    def append(self, folder: str, messages: Sequence[Message]) -> list[str | None]:
        """Append messages with their flags and INTERNALDATE; return the UIDs they got (UIDPLUS) or None."""
        if not messages:
            return []
        if self._limit is not None:
            for message in messages:
                if len(message.raw) > self._limit:
                    raise MessageRefused(self._where(f"message {message.info.key} of {len(message.raw)} bytes is "
                                                     f"larger than the server's APPENDLIMIT ({self._limit} bytes)",
                                                     folder))
        if self._multiappend or len(messages) == 1:
            return self._append_command(folder, messages)
        keys: list[str | None] = []
        for message in messages:
            try:
                keys.extend(self._append_command(folder, [message]))
            except MessageRefused:
                # MULTIAPPEND is all or nothing, and the caller retries a refused batch one message at a time:
                # take back the ones that landed so that the retry does not copy them twice
                self._take_back(folder, keys)
                raise
        return keys

    def set_flags(self, folder: str, key: str, flags: Sequence[str]) -> None:
        """Replace the flags (system flags and keywords) of one message."""
        uid = self._uid_of(folder, key)
        with self._errors("set flags", folder):
            self._select(folder, writable=True)
            self._live().set_flags([uid], [f.encode() for f in _storable(flags)], silent=True)

    def changed_since(self, folder: str, modseq: int) -> dict[str, tuple[str, ...]]:
        """Return the flags of messages changed since a mod-sequence (CONDSTORE); {} without CONDSTORE."""
        if not self._condstore:
            return {}
        with self._errors("list changed flags", folder):
            self._select(folder, refresh=True)
            fetched = self._uid_fetch("1:*", "(UID FLAGS)", f"(CHANGEDSINCE {int(modseq)})")
        return {str(uid): _flags(data.get(b"FLAGS", ())) for uid, data in sorted(fetched.items())}

    def append_limit(self) -> int | None:
        """Return the largest message the server accepts (APPENDLIMIT=n), None when it does not say."""
        return self._limit

    def close(self) -> None:
        """Log out; a connection that is gone already is fine."""
        client, self._client = self._client, None
        self._selected = None
        if client is not None:
            _quietly_logout(client)

    # ------------------------------------------------------------------------------------------------ helpers

    def _live(self) -> imapclient.IMAPClient:
        """Return the client, or raise ConnectionLost after close() or a dropped connection."""
        if self._client is None:
            raise ConnectionLost(f"{self.url} mailbox {self.mailbox}: the connection is closed")
        return self._client

    def _where(self, text: str, folder: str | None = None) -> str:
        """Prefix a message with the server, the mailbox and the folder."""
        place = f", folder {folder!r}" if folder is not None else ""
        return f"{self.url} mailbox {self.mailbox}{place}: {text}"

    @contextmanager
    def _errors(self, doing: str, folder: str | None = None) -> Iterator[None]:
        """Turn imapclient, imaplib and socket errors into the protocol's exceptions."""
        try:
            yield
        except MailboxError:
            raise
        except (OSError, EOFError, imapclient.exceptions.IMAPClientAbortError) as exc:
            # the stream is out of step or gone: nothing more can be sent on it
            client, self._client = self._client, None
            if client is not None:
                _quietly_shutdown(client)
            raise ConnectionLost(self._where(f"connection lost while trying to {doing}: {_words(exc)}",
                                             folder)) from exc
        except imapclient.exceptions.IMAPClientError as exc:
            raise MailboxError(self._where(f"cannot {doing}: {_words(exc)}", folder)) from exc

    def _select(self, folder: str, writable: bool = False, refresh: bool = False) -> None:
        """Select a folder unless it is selected already (read-only for reading); NOOP to see new mail."""
        client = self._live()
        if self._selected == folder and (self._writable or not writable):
            if refresh:
                # a selected folder learns of messages delivered since only with a command: NOOP is the cheapest
                client.noop()
            return
        self._selected = None  # a failed SELECT leaves nothing selected (RFC 3501 6.3.1)
        client.select_folder(folder, readonly=not writable)
        self._selected, self._writable = folder, writable

    def _uid_fetch(self, uid_set: str, items: str, modifiers: str | None = None) -> dict[int, dict[bytes, Any]]:
        """Run one UID FETCH and return its answers by UID, without the unsolicited ones."""
        # Not IMAPClient.fetch: it turns the message set into ints to drop unsolicited answers, which fails
        # on "n:*" (ValueError in imapclient 4.1). imaplib's uid() sends the set as it is.
        imap = self._live()._imap
        imap.untagged_responses.pop("FETCH", None)  # answers left over from earlier commands
        typ, data = imap.uid("FETCH", uid_set, items, *([modifiers] if modifiers else []))
        if typ != "OK":
            raise imapclient.exceptions.IMAPClientError(f"fetch failed: {_text(data)}")
        # keyed by sequence number, so that an unsolicited "* 5 FETCH (FLAGS ...)" (no UID) merges into the
        # answer for the same message instead of being taken for UID 5
        parsed = parse_fetch_response(data, normalise_times=False, uid_is_key=False)
        return {item[b"UID"]: item for item in parsed.values() if b"UID" in item}

    def _info(self, uid: int, data: dict[bytes, Any], folder: str) -> MessageInfo:
        """Build a MessageInfo from one FETCH answer."""
        when = data.get(b"INTERNALDATE")
        if not isinstance(when, dt.datetime):
            raise MailboxError(self._where(f"the server gave no INTERNALDATE for UID {uid}", folder))
        offset = when.utcoffset() or dt.timedelta(0)
        return MessageInfo(str(uid), uid, int(data.get(b"RFC822.SIZE", 0)), _flags(data.get(b"FLAGS", ())),
                           when.replace(tzinfo=dt.timezone(offset)))

    def _uid_of(self, folder: str, key: str) -> int:
        """Return the UID a key names."""
        if not key.isdigit() or int(key) == 0:
            raise MailboxError(self._where(f"{key!r} is not an IMAP UID", folder))
        return int(key)

    def _append_command(self, folder: str, messages: Sequence[Message]) -> list[str | None]:
        """Send one APPEND (MULTIAPPEND when several messages) and return the UIDs from APPENDUID."""
        client = self._live()
        args: list[bytes] = [client._normalise_folder(folder)]
        for message in messages:
            args.append(b"(" + b" ".join(f.encode() for f in _storable(message.info.flags)) + b")")
            args.append(b'"' + datetime_to_INTERNALDATE(message.info.internal_date).encode() + b'"')
            # a literal, sent byte for byte: imaplib's own append() rewrites bare LF and CR to CRLF
            args.append(_literal(message.raw))
        with self._errors("append", folder):
            try:
                typ, data = client._raw_command(b"APPEND", args, uid=False)
            except imapclient.exceptions.IMAPClientAbortError as exc:
                # without LITERAL+ a refusal comes instead of the "+" for the literal: the command is over and
                # the connection still in step, and the tagged answer is left in imaplib's table
                answers = [tag for tag, answer in client._imap.tagged_commands.items() if answer is not None]
                if "waiting for continuation" not in str(exc) or not answers:
                    raise
                typ, data = client._imap.tagged_commands.pop(answers[-1])
            client._imap.untagged_responses.pop("APPENDUID", None)  # imaplib keeps every response code
        if typ != "OK":
            raise self._refusal(_text(data), folder, len(messages))
        found = _APPENDUID.search(data[0] if data and isinstance(data[0], bytes) else b"")
        if found is None:
            return [None] * len(messages)
        uids = _expand_uid_set(found.group(2).decode())
        if len(uids) != len(messages):
            return [None] * len(messages)
        return [str(uid) for uid in uids]

    def _refusal(self, words: str, folder: str, count: int) -> MailboxError:
        """Turn a NO to APPEND into QuotaExceeded, MessageRefused or MailboxError."""
        found = _RESPONSE_CODE.match(words)
        code = found.group(1).upper() if found else None
        what = "the message" if count == 1 else f"{count} messages"
        text = self._where(f"the server refused {what}: {words}", folder)
        if code == "OVERQUOTA" or (code is None and _QUOTA_WORDS.search(words)):
            return QuotaExceeded(text)
        # [TOOBIG] (RFC 4469/7889), [LIMIT] (RFC 5530; Dovecot's quota_max_mail_size), [PARSE] (malformed)
        if code in ("TOOBIG", "LIMIT", "PARSE") or (code is None and _TOO_BIG_WORDS.search(words)):
            return MessageRefused(text)
        if code in ("UNAVAILABLE", "INUSE"):
            return ConnectionLost(text)  # temporary: a reconnect and a retry may get through
        if code is None:
            return MessageRefused(text)  # a plain NO to APPEND is about the message
        return MailboxError(text)  # [TRYCREATE], [NOPERM], [SERVERBUG] ...: not one message's fault

    def _take_back(self, folder: str, keys: Sequence[str | None]) -> None:
        """Expunge messages just appended by this store (UIDPLUS), or fail the mailbox if that cannot be done."""
        if not keys:
            return
        if not self._uidplus or None in keys:
            raise MailboxError(self._where(f"a message was refused after {len(keys)} of the batch were appended, "
                                           "and without UIDPLUS they cannot be taken back; the next pass finds "
                                           "them by content", folder))
        uids = [int(k) for k in keys if k is not None]
        with self._errors("take back appended messages", folder):
            self._select(folder, writable=True)
            client = self._live()
            client.add_flags(uids, [imapclient.DELETED], silent=True)
            client.uid_expunge(uids)  # only these UIDs: a user's own \Deleted messages stay


def _folder_info(flags: Sequence[bytes], delimiter: bytes | str | None, name: str | int | bytes) -> FolderInfo:
    """Build a FolderInfo from one LIST (or XLIST) line."""
    attributes = {(f.decode() if isinstance(f, bytes) else str(f)).lower() for f in flags}
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    name = str(name)
    if "\\inbox" in attributes:
        name = "INBOX"  # XLIST gives INBOX a localized name
    special = next((use for use in SPECIAL_USES if use.lower() in attributes), None)
    special = special or next((use for flag, use in _XLIST_USES.items() if flag in attributes), None)
    separator = delimiter.decode() if isinstance(delimiter, bytes) else delimiter
    return FolderInfo(name, separator or None, special, not attributes & {"\\noselect", "\\nonexistent"})


def _flags(raw: Sequence[bytes | str]) -> tuple[str, ...]:
    """Decode FLAGS, without \\Recent (a session flag no store can set)."""
    decoded = (f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f) for f in raw)
    return tuple(f for f in decoded if f.lower() != "\\recent")


def _storable(flags: Sequence[str]) -> list[str]:
    """Keep the flags APPEND and STORE accept: no \\Recent, only atoms (a bad one would fail the command)."""
    kept = []
    for flag in flags:
        if flag.lower() == "\\recent" or flag in kept:
            continue
        if _FLAG.match(flag):
            kept.append(flag)
        else:
            log.warning("flag %r cannot be written over IMAP and is left out", flag)
    return kept


def _batches(uids: Sequence[int], sizes: dict[int, int]) -> Iterator[list[int]]:
    """Split UIDs into FETCH batches of at most FETCH_MESSAGES messages and about FETCH_BYTES bytes."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (len(batch) >= FETCH_MESSAGES or total + size > FETCH_BYTES):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


def _uid_set(uids: Sequence[int]) -> str:
    """Write UIDs as a compact IMAP sequence set: 1:3,7,9:10."""
    ordered = sorted(set(uids))
    ranges: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:] + [0]:
        if uid == prev + 1:
            prev = uid
            continue
        ranges.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = uid
    return ",".join(ranges)


def _expand_uid_set(text: str) -> list[int]:
    """Expand an APPENDUID UID set (5:7 or 5,6,7), the UIDs in the order of the appended messages."""
    uids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        first, last = sorted((int(low), int(high or low)))  # 7:5 is the same range as 5:7 (RFC 3501 9)
        uids.extend(range(first, last + 1))
    return uids


def _int_or_none(value: Any) -> int | None:
    """Return an int, or None for a missing value."""
    return int(value) if value is not None else None


def _text(data: Sequence[Any]) -> str:
    """Return the text of a tagged answer."""
    first = data[0] if data else b""
    text = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
    return _TIMINGS.sub("", text)


def _words(exc: BaseException) -> str:
    """Turn an imaplib or socket error into readable words (imaplib often gives a bytes repr)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    if text.startswith(("b'", 'b"')) and text.endswith(text[1]):
        text = text[2:-1]
    # imapclient says "select failed: <the server's words>": the caller names the action already
    return _TIMINGS.sub("", _FAILED.sub("", text))


def _quietly_logout(client: imapclient.IMAPClient) -> None:
    """Log out, ignoring a connection that is already gone."""
    try:
        client.logout()
    except (OSError, EOFError, imaplib.IMAP4.error, AttributeError):
        _quietly_shutdown(client)


def _quietly_shutdown(client: imapclient.IMAPClient) -> None:
    """Close the socket without a LOGOUT."""
    try:
        client.shutdown()
    except (OSError, EOFError, imaplib.IMAP4.error, AttributeError):
        pass


__all__ = ["FETCH_BYTES", "FETCH_MESSAGES", "ImapStore", "open_imap"]
