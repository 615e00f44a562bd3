"""The Exchange (EWS) store, against the test EWS server (tests/ews_server.py) and the real Dovecots.

Every direction goes through the copy engine as `mailbox migrate` and `mailbox verify` run it: EWS -> IMAP,
IMAP -> EWS, Maildir -> EWS, EWS -> EWS; then throttling, refusals, logins, the configuration keys and `check`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import imapclient
import pytest
import requests

import configs
from ews_server import EwsServer, _pretty
from servers import DovecotServer, free_port

from mailmerge_gov.check import check_config
from mailmerge_gov.config import ConfigError, MailServer, Secret, load_config
from mailmerge_gov.migration.batch import store_opener
from mailmerge_gov.migration.ews import EwsStore, open_ews
from mailmerge_gov.migration.imap import open_imap
from mailmerge_gov.migration.maildir import open_maildir
from mailmerge_gov.migration.protocol import (ConnectionLost, FolderInfo, LoginFailed, MailboxError, Message,
                                              MessageInfo, MessageRefused, ServerWaits)
from mailmerge_gov.migration.report import mailbox_reports, write_migration_report
from mailmerge_gov.migration.sync import MailboxJob, migrate_mailbox, verify_mailbox
from mailmerge_gov.store import open_store

UTC = dt.timezone.utc
ICT = dt.timezone(dt.timedelta(hours=7))
SVC_OLD, PW_OLD = "svc-migrate@binhduong.gov.vn", "mật-khẩu-cũ"
SVC_NEW, PW_NEW = "svc-migrate@hcm.gov.vn", "mật-khẩu-mới"
# The old mailbox's default folders, named the way a Vietnamese Outlook names them.
VIETNAMESE = {"inbox": "Hộp thư đến", "sentitems": "Thư đã gửi", "drafts": "Thư nháp", "deleteditems": "Thư đã xoá",
              "junkemail": "Thư rác", "calendar": "Lịch", "contacts": "Danh bạ", "tasks": "Công việc"}
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ews"
_numbers = itertools.count(1)


def message(subject: str, body: str = "Nội dung thư.", message_id: bool = True) -> bytes:
    """A small raw message with a Vietnamese subject (RFC 2047) and body (8bit)."""
    headers = [b"From: =?utf-8?b?" + base64.b64encode("Văn thư".encode()) + b"?= <vanthu@binhduong.gov.vn>",
               b"To: an@binhduong.gov.vn", b"Subject: =?utf-8?b?" + base64.b64encode(subject.encode()) + b"?=",
               b"Date: Mon, 03 Feb 2025 09:15:00 +0700", b"MIME-Version: 1.0",
               b"Content-Type: text/plain; charset=utf-8", b"Content-Transfer-Encoding: 8bit"]
    if message_id:
        headers.insert(0, f"Message-ID: <{next(_numbers)}.ews@binhduong.gov.vn>".encode())
    return b"\r\n".join(headers) + b"\r\n\r\n" + body.encode() + b"\r\n"


def at(minute: int) -> dt.datetime:
    """A distinct received time: 3 February 2025, 09:mm in Vietnam."""
    return dt.datetime(2025, 2, 3, 9, minute, tzinfo=ICT)


def ews_mail(server: EwsServer, tmp_path: Path, admin: str, password: str, **keys: object) -> MailServer:
    """The MailServer of a test EWS server, its service account's password in a file."""
    secret = tmp_path / f"{admin}.pw"
    secret.write_text(password + "\n", encoding="utf-8")
    settings: dict[str, object] = {"url": server.url, "auth": "basic", "timeout": 10.0, "max_backoff": 30.0}
    settings.update(keys)
    return MailServer(kind="ews", admin_user=admin, password=Secret(file=secret), **settings)  # type: ignore[arg-type]


def imap_server(dovecot: DovecotServer, tmp_path: Path) -> MailServer:
    """The MailServer of a Dovecot fixture, logging in through its master user."""
    secret = tmp_path / f"{dovecot.name}-master.pw"
    secret.write_text(dovecot.master_password + "\n", encoding="utf-8")
    return MailServer(kind="imap", url=f"imap://127.0.0.1:{dovecot.imap_port}", admin_user=dovecot.master_user,
                      password=Secret(file=secret), login="master", timeout=10.0)


def imap_contents(dovecot: DovecotServer, address: str) -> dict[str, list[tuple[bytes, tuple[str, ...], dt.datetime]]]:
    """Every folder of a Dovecot mailbox: raw bytes, sorted flags (no \\Recent) and INTERNALDATE (aware), sorted."""
    out = {}
    with imapclient.IMAPClient("127.0.0.1", port=dovecot.imap_port, ssl=False) as client:
        client.normalise_times = False
        client.login(dovecot.master_login(address), dovecot.master_password)
        for flags, _, name in client.list_folders():
            if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                out[name] = []
                continue
            client.select_folder(name, readonly=True)
            ids = client.search()
            data = client.fetch(ids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]) if ids else {}
            out[name] = sorted((d[b"BODY[]"], tuple(sorted(f.decode() for f in d[b"FLAGS"] if f != b"\\Recent")),
                                d[b"INTERNALDATE"].astimezone(UTC)) for d in data.values())
    return out


# The old Exchange mailbox the EWS-source tests copy: (folder, raw, flags as IMAP reads them, received).
TWIN = message("Giấy mời họp")
OLD_BOX = "an.nguyenvan@binhduong.gov.vn"


def seed_old_mailbox(server: EwsServer, category: str = "$Label1") -> list[tuple[str, bytes, tuple[str, ...], dt.datetime]]:
    """Fill the old Exchange mailbox; return what it holds, its folders named as the migration names them."""
    server.add_mailbox(OLD_BOX, names=VIETNAMESE)
    server.create_folder(OLD_BOX, "Văn bản đến/2024")
    rows = [
        ("inbox", TWIN, dict(is_read=True), ("\\Seen",)),
        ("inbox", TWIN, dict(is_read=True), ("\\Seen",)),
        ("inbox", message("Không Message-ID", message_id=False), {}, ()),
        ("inbox", message("Khẩn"), dict(flagged=True, categories=[category]), ("\\Flagged", category)),
        ("Văn bản đến", message("Chuyển tiếp"), dict(is_read=True, last_verb=104), ("$Forwarded", "\\Seen")),
        ("Văn bản đến/2024", message("Công văn 12/UBND"), dict(is_read=True, last_verb=102),
         ("\\Answered", "\\Seen")),
        ("sentitems", message("Trả lời"), dict(is_read=True), ("\\Seen",)),
        ("drafts", message("Bản nháp"), dict(is_read=True, draft=True), ("\\Draft", "\\Seen")),
        ("calendar", message("Lịch họp"), {}, ()),  # not a mail folder: never copied
    ]
    held = []
    for minute, (folder, raw, settings, flags) in enumerate(rows):
        server.put(OLD_BOX, folder, raw, received=at(minute), **settings)  # type: ignore[arg-type]
        name = {"inbox": "INBOX", "sentitems": "Thư đã gửi", "drafts": "Thư nháp", "calendar": "Lịch"}.get(folder, folder)
        held.append((name, raw, tuple(sorted(flags)), at(minute).astimezone(UTC)))
    return held


def grouped(rows: list[tuple[str, bytes, tuple[str, ...], dt.datetime]], names: dict[str, str],
            empty: tuple[str, ...]) -> dict[str, list[tuple[bytes, tuple[str, ...], dt.datetime]]]:
    """Messages by folder (renamed), sorted like the contents helpers sort them, with some empty folders."""
    out: dict[str, list[tuple[bytes, tuple[str, ...], dt.datetime]]] = {name: [] for name in empty}
    for folder, raw, flags, when in rows:
        if folder == "Lịch":
            continue
        out.setdefault(names.get(folder, folder), []).append((raw, flags, when))
    return {name: sorted(found) for name, found in out.items()}


@pytest.fixture
def state(tmp_path: Path):
    """A fresh state store."""
    store = open_store(tmp_path / "state.sqlite")
    yield store
    store.close()


# ------------------------------------------------------------------------------------ the store alone

def test_folders_status_and_messages_of_an_exchange_mailbox(ews_old: EwsServer, tmp_path: Path) -> None:
    seed_old_mailbox(ews_old)
    with open_ews(ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), OLD_BOX) as store:
        assert store.folders() == [
            FolderInfo("INBOX", "/"), FolderInfo("Công việc", "/", None, False), FolderInfo("Danh bạ", "/", None, False),
            FolderInfo("Lịch", "/", None, False), FolderInfo("Thư nháp", "/", "\\Drafts"),
            FolderInfo("Thư rác", "/", "\\Junk"), FolderInfo("Thư đã gửi", "/", "\\Sent"),
            FolderInfo("Thư đã xoá", "/", "\\Trash"), FolderInfo("Văn bản đến", "/"),
            FolderInfo("Văn bản đến/2024", "/"),
        ]
        status = store.status("INBOX")
        assert (status.uidnext, status.highestmodseq, status.messages) == (None, None, 4)
        assert status.uidvalidity == store.status("INBOX").uidvalidity != store.status("Thư nháp").uidvalidity
        infos = store.list_messages("INBOX")
        assert [(i.uid, i.size, i.flags, i.internal_date) for i in infos] == [
            (None, len(TWIN), ("\\Seen",), at(0)), (None, len(TWIN), ("\\Seen",), at(1)),
            (None, ews_old.item(infos[2].key).size, (), at(2)),
            (None, ews_old.item(infos[3].key).size, ("\\Flagged", "$Label1"), at(3))]
        assert [m.raw for m in store.fetch("INBOX", [infos[3].key, infos[0].key])] == [
            ews_old.mime(infos[3].key), TWIN]
        assert store.list_messages("Thư nháp")[0].flags == ("\\Seen", "\\Draft")
        assert store.list_messages("Văn bản đến")[0].flags == ("\\Seen", "$Forwarded")
        assert store.list_messages("Văn bản đến/2024")[0].flags == ("\\Seen", "\\Answered")
        with pytest.raises(MailboxError, match=r"mailbox an\.nguyenvan@binhduong\.gov\.vn, folder 'Không có': no such"):
            store.status("Không có")
        assert (store.separator, store.append_limit(), store.changed_since("INBOX", 1)) == ("/", None, {})


def test_list_pages_through_a_large_folder(ews_old: EwsServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import mailmerge_gov.migration.ews as ews

    monkeypatch.setattr(ews, "LIST_PAGE", 7)
    monkeypatch.setattr(ews, "GET_CHUNK", 3)
    monkeypatch.setattr(ews, "FETCH_CHUNK", 4)
    ews_old.add_mailbox(OLD_BOX)
    raws = [message(f"Thư số {n}") for n in range(23)]
    for n, raw in enumerate(reversed(raws)):  # delivered newest first: the listing sorts by received time
        ews_old.put(OLD_BOX, "inbox", raw, received=at(59 - n))
    with open_ews(ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), OLD_BOX) as store:
        infos = store.list_messages("INBOX")
        assert [m.raw for m in store.fetch("INBOX", [i.key for i in infos])] == raws
    finds = [r for r in ews_old.requests if r[0] == "FindItem"]
    assert len(finds) == 4  # pages of 7: 7 + 7 + 7 + 2
    assert sum(r[0] == "GetItem" for r in ews_old.requests) == 8 + 6  # listing in 3s, bodies in 4s


def test_append_writes_messages_that_are_not_drafts_with_flags_and_dates(ews_new: EwsServer, tmp_path: Path) -> None:
    ews_new.add_mailbox("an@hcm.gov.vn")
    when = dt.datetime(2024, 3, 5, 9, 30, 15, 250000, tzinfo=ICT)
    raws = [message("Đã đọc"), message("Chưa đọc"), message("Nháp"), message("Đã trả lời")]
    flags = [("\\Seen", "Quan trọng", "$MDNSent"), (), ("\\Draft",), ("\\Answered", "$Forwarded", "\\Flagged")]
    with open_ews(ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW), "an@hcm.gov.vn") as store:
        store.create_folder("Lưu trữ/2024")
        store.create_folder("Lưu trữ/2024")  # nothing happens the second time
        keys = store.append("Lưu trữ/2024", [Message(MessageInfo("", None, len(r), f, when), r)
                                             for r, f in zip(raws, flags)])
        assert [ews_new.mime(k) for k in keys] == raws  # byte for byte, in order
        assert [(ews_new.item(k).draft, ews_new.item(k).is_read, ews_new.item(k).categories) for k in keys] == [
            (False, True, ["Quan trọng"]), (False, False, []), (True, False, []), (False, False, [])]
        assert {ews_new.item(k).received for k in keys} == {"2024-03-05T02:30:15Z"}
        assert [i.flags for i in store.list_messages("Lưu trữ/2024")] == [
            ("\\Seen", "Quan trọng"), (), ("\\Draft",), ("\\Answered", "\\Flagged")]
        store.set_flags("Lưu trữ/2024", keys[0], ("\\Flagged", "$Forwarded"))
        store.set_flags("Lưu trữ/2024", keys[3], ("\\Seen",))
        assert [i.flags for i in store.list_messages("Lưu trữ/2024")] == [
            ("\\Flagged", "$Forwarded"), (), ("\\Draft",), ("\\Seen",)]
    created = [r for r in ews_new.requests if r[0] == "CreateFolder"]
    assert len(created) == 2  # "Lưu trữ", then "Lưu trữ/2024"


def test_a_refused_message_takes_back_the_rest_of_its_append(ews_new: EwsServer, tmp_path: Path) -> None:
    ews_new.add_mailbox("an@hcm.gov.vn")
    ews_new.max_message_size = 600
    small, big = message("Nhỏ"), message("Lớn", body="x" * 1000)
    with open_ews(ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW), "an@hcm.gov.vn") as store:
        batch = [Message(MessageInfo(str(n), None, len(r), (), at(n)), r) for n, r in enumerate((small, big, small))]
        with pytest.raises(MessageRefused, match=r"folder 'INBOX': the server refused message 1 of 1\d\d\d bytes: "
                                                 r"ErrorMessageSizeExceeded"):
            store.append("INBOX", batch)
        assert ews_new.contents("an@hcm.gov.vn")["Inbox"] == []  # the two that landed were deleted again
        assert [r[0] for r in ews_new.requests][-2:] == ["CreateItem", "DeleteItem"]


# ------------------------------------------------------------------------------------- logins and errors

def test_logins_and_errors_name_the_server_and_mailbox_never_the_password(ews_old: EwsServer, tmp_path: Path) -> None:
    ews_old.add_mailbox(OLD_BOX)
    ews_old.add_user("thuong@binhduong.gov.vn", "mật-khẩu")  # no impersonation right
    where = f"{ews_old.url} mailbox {OLD_BOX}: "
    (tmp_path / "wrong").mkdir()
    wrong = ews_mail(ews_old, tmp_path / "wrong", SVC_OLD, "sai-mật-khẩu")
    cases = [
        (wrong, OLD_BOX, LoginFailed, where + f"login as {SVC_OLD} by impersonation refused: the server refused the "
                                              f"credentials (HTTP 401) for {ews_old.url}"),
        (ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), "khong.co@binhduong.gov.vn", LoginFailed,
         f"{ews_old.url} mailbox khong.co@binhduong.gov.vn: cannot open the mailbox as {SVC_OLD} by impersonation: "
         "ErrorNonExistentMailbox: The SMTP address has no mailbox associated with it."),
        (ews_mail(ews_old, tmp_path, "thuong@binhduong.gov.vn", "mật-khẩu"), OLD_BOX, LoginFailed,
         where + "cannot open the mailbox as thuong@binhduong.gov.vn by impersonation: ErrorImpersonateUserDenied: "
                 "The account does not have permission to impersonate the requested user."),
        (ews_mail(ews_old, tmp_path, "thuong@binhduong.gov.vn", "mật-khẩu", access="delegate"), OLD_BOX, LoginFailed,
         where + "cannot open the mailbox as thuong@binhduong.gov.vn by delegate access: ErrorAccessDenied: Access "
                 "is denied. Check credentials and try again."),
        (ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD, auth="ntlm"), OLD_BOX, LoginFailed,
         where + f"login as {SVC_OLD} by impersonation refused: the server refused the credentials (HTTP 401) for "
                 f"{ews_old.url}"),
        (ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD, url=f"http://127.0.0.1:{free_port()}/EWS/Exchange.asmx"),
         OLD_BOX, ConnectionLost, "connection lost while trying to list folders: connection refused"),
        (ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), "khong-co-a-cong", LoginFailed,
         f"{ews_old.url}: cannot open 'khong-co-a-cong': an Exchange mailbox is named by its e-mail address"),
    ]
    for server, mailbox, error, text in cases:
        with pytest.raises(error) as caught:
            open_ews(server, mailbox)
        assert str(caught.value).endswith(text)
        assert "mật-khẩu" not in str(caught.value)
    # the NTLM login tried NTLM (no Basic header); the test server offers Basic only, so it was refused
    assert ews_old.auth_schemes[-1] == ""
    ews_old.grant(OLD_BOX, "thuong@binhduong.gov.vn")
    with open_ews(ews_mail(ews_old, tmp_path, "thuong@binhduong.gov.vn", "mật-khẩu", access="delegate"), OLD_BOX) as store:
        assert store.how == "thuong@binhduong.gov.vn by delegate access"
        assert store.folders()[0] == FolderInfo("INBOX", "/")
    assert ews_old.requests[-1] == ("FindFolder", "thuong@binhduong.gov.vn", None)  # no impersonation header


def test_https_is_verified_against_the_configured_ca_file(tls_certificate: tuple[Path, Path], tmp_path: Path) -> None:
    certificate = tls_certificate  # conftest's: made for relay.test and 127.0.0.1
    server = EwsServer(tmp_path / "ews", tls=certificate).start()
    try:
        server.add_user(SVC_NEW, PW_NEW, impersonation=True)
        server.add_mailbox("an@hcm.gov.vn")
        with pytest.raises(MailboxError) as caught:
            open_ews(ews_mail(server, tmp_path, SVC_NEW, PW_NEW), "an@hcm.gov.vn")
        assert type(caught.value) is MailboxError  # a certificate nobody vouches for is not retried
        assert str(caught.value) == (f"{server.url} mailbox an@hcm.gov.vn: cannot list folders: TLS failed: "
                                     "certificate verify failed: self-signed certificate")
        with open_ews(ews_mail(server, tmp_path, SVC_NEW, PW_NEW, ca_file=certificate[0]), "an@hcm.gov.vn") as store:
            assert store.url.startswith("https://") and store.folders()[0].name == "INBOX"
        # the ca_file held while its store was open: a later store without one verifies with the system's CAs
        with pytest.raises(MailboxError, match="certificate verify failed"):
            open_ews(ews_mail(server, tmp_path, SVC_NEW, PW_NEW), "an@hcm.gov.vn")
    finally:
        server.stop()


def test_a_server_that_wants_a_changekey_gets_one(ews_new: EwsServer, tmp_path: Path) -> None:
    ews_new.add_mailbox("an@hcm.gov.vn")
    key = ews_new.put("an@hcm.gov.vn", "inbox", message("Công văn"), received=at(0))
    ews_new.require_changekey = True
    with open_ews(ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW), "an@hcm.gov.vn") as store:
        store.set_flags("INBOX", key, ("\\Seen", "\\Flagged"))
        assert store.list_messages("INBOX")[0].flags == ("\\Seen", "\\Flagged")
    assert [r[0] for r in ews_new.requests] == [
        "GetFolder", "FindFolder", "UpdateItem", "GetItem", "UpdateItem", "FindItem", "GetItem"]  # refused, ChangeKey


def test_each_mailbox_can_log_in_with_its_own_password(ews_old: EwsServer, tmp_path: Path) -> None:
    ews_old.add_mailbox(OLD_BOX, password="Mật khẩu riêng")
    credentials = tmp_path / "passwords.csv"
    credentials.write_text(f"mailbox,password\n{OLD_BOX},Mật khẩu riêng\n", encoding="utf-8")
    credentials.chmod(0o600)
    server = MailServer(kind="ews", url=ews_old.url, credentials_file=credentials, auth="basic")
    with open_ews(server, OLD_BOX) as store:
        assert (store.how, store.folders()[0].name) == ("its own login", "INBOX")
    assert ews_old.requests[-1][1:] == (OLD_BOX.lower(), None)
    credentials.chmod(0o644)
    with pytest.raises(LoginFailed, match="can be read by others"):
        open_ews(server, OLD_BOX)


# ------------------------------------------------------------------------------- through the copy engine

def test_exchange_to_imap(ews_old: EwsServer, dovecot_new: DovecotServer, tmp_path: Path, state) -> None:
    held = seed_old_mailbox(ews_old)
    target = f"an.nguyen{next(_numbers)}@hcm.gov.vn"
    dovecot_new.add_user(target, "pw")
    old, new = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), imap_server(dovecot_new, tmp_path)
    job = MailboxJob("binhduong", OLD_BOX, target)
    source, sink = (lambda: open_ews(old, OLD_BOX)), (lambda: open_imap(new, target))
    outcome = migrate_mailbox(job, source, sink, state)
    assert (outcome.status, outcome.error, outcome.copied, outcome.skipped) == ("ok", None, 8, 0)
    assert sorted((f.folder, f.target_folder, f.copied, f.note) for f in outcome.folders) == [
        ("Công việc", None, 0, "not selectable"), ("Danh bạ", None, 0, "not selectable"),
        ("INBOX", "INBOX", 4, None), ("Lịch", None, 0, "not selectable"), ("Thư nháp", "Drafts", 1, None),
        ("Thư rác", "Junk", 0, None), ("Thư đã gửi", "Sent", 1, None), ("Thư đã xoá", "Trash", 0, None),
        ("Văn bản đến", "Văn bản đến", 1, None), ("Văn bản đến/2024", "Văn bản đến/2024", 1, None)]
    expected = grouped(held, {"Thư nháp": "Drafts", "Thư đã gửi": "Sent"}, ("Junk", "Trash"))
    assert imap_contents(dovecot_new, target) == expected
    check = verify_mailbox(job, source, sink, state)
    assert check.ok and sum(f.expected for f in check.folders) == 8
    again = migrate_mailbox(job, source, sink, state)
    assert (again.status, again.copied, sum(f.flags_synced for f in again.folders)) == ("ok", 0, 0)
    assert imap_contents(dovecot_new, target) == expected


def test_imap_to_exchange(dovecot_old: DovecotServer, ews_new: EwsServer, tmp_path: Path, state) -> None:
    source_box = f"an{next(_numbers)}@binhduong.gov.vn"
    folders = {
        "INBOX": [(TWIN, ("\\Seen",)), (TWIN, ("\\Seen",)), (message("Không Message-ID", message_id=False), ()),
                  (message("Khẩn"), ("\\Flagged", "$Label1"))],
        "Văn bản đến/2024": [(message("Công văn 12/UBND"), ("\\Seen", "\\Answered"))],
        "Sent": [(message("Trả lời"), ("\\Seen",))],
        "Drafts": [(message("Bản nháp"), ("\\Seen", "\\Draft"))],
        "Lưu trữ": [(message("Đã chuyển tiếp"), ("\\Seen", "$Forwarded", "$MDNSent"))],
    }
    dovecot_old.fill(source_box, folders)
    ews_new.add_mailbox("an.nguyen@hcm.gov.vn")
    old, new = imap_server(dovecot_old, tmp_path), ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW)
    job = MailboxJob("binhduong", source_box, "an.nguyen@hcm.gov.vn")
    source, sink = (lambda: open_imap(old, source_box)), (lambda: open_ews(new, "an.nguyen@hcm.gov.vn"))
    outcome = migrate_mailbox(job, source, sink, state)
    assert (outcome.status, outcome.error, outcome.copied, outcome.skipped) == ("ok", None, 8, 0)
    names = {"INBOX": "Inbox", "Sent": "Sent Items", "Lưu trữ": "Archive"}  # "Lưu trữ" is an Archive name
    kept = {"$MDNSent"}  # a client's bookkeeping keyword, not a category
    expected = {names.get(folder, folder): sorted(
        (raw, tuple(sorted(f for f in flags if f not in kept)), at(index).astimezone(UTC))
        for index, (raw, flags) in enumerate(rows)) for folder, rows in folders.items()}
    expected.update({"Văn bản đến": [], "Deleted Items": [], "Junk Email": []})
    assert ews_new.contents("an.nguyen@hcm.gov.vn") == expected
    drafts = [i for i in ews_new.items.values() if i.draft]
    assert [ews_new.mime(i.id) for i in drafts] == [folders["Drafts"][0][0]]  # only the \Draft message is a draft
    check = verify_mailbox(job, source, sink, state)
    assert check.ok and sum(f.expected for f in check.folders) == 8
    # a second pass copies what is new and brings changed flags over
    with imapclient.IMAPClient("127.0.0.1", port=dovecot_old.imap_port, ssl=False) as client:
        client.login(dovecot_old.master_login(source_box), dovecot_old.master_password)
        client.select_folder("Văn bản đến/2024")
        client.add_flags(client.search(), ["\\Flagged", "Quan_trong"])
        client.append("INBOX", message("Thư mới đến"), flags=("\\Seen",), msg_time=at(30))
    again = migrate_mailbox(job, source, sink, state)
    assert (again.status, again.copied, sum(f.flags_synced for f in again.folders)) == ("ok", 1, 1)
    assert ews_new.contents("an.nguyen@hcm.gov.vn")["Văn bản đến/2024"][0][1] == (
        "Quan_trong", "\\Answered", "\\Flagged", "\\Seen")
    assert len(ews_new.contents("an.nguyen@hcm.gov.vn")["Inbox"]) == 5
    assert migrate_mailbox(job, source, sink, state).copied == 0


BOX = "tqquang@baria-vungtau.gov.vn"


def test_maildir_to_exchange(example_dir: Path, ews_new: EwsServer, tmp_path: Path, state) -> None:
    root = tmp_path / "mail"
    shutil.copytree(example_dir / "sources" / "baria-vungtau" / "mail" / BOX, root / BOX)  # copy2: mtimes kept
    ews_new.add_mailbox("quangtq@hcm.gov.vn")
    new = ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW)
    job = MailboxJob("baria-vungtau", BOX, "quangtq@hcm.gov.vn")
    source, sink = (lambda: open_maildir(root, BOX)), (lambda: open_ews(new, "quangtq@hcm.gov.vn"))
    outcome = migrate_mailbox(job, source, sink, state)
    assert (outcome.status, outcome.error, outcome.copied, outcome.skipped) == ("ok", None, 30, 0)
    names = {"INBOX": "Inbox", "Sent": "Sent Items", "Trash": "Deleted Items"}
    maildir = open_maildir(root, BOX)
    expected = {names.get(f.name, f.name): sorted(
        (m.raw, tuple(sorted(m.info.flags)), m.info.internal_date.replace(microsecond=0))
        for m in maildir.fetch(f.name, [i.key for i in maildir.list_messages(f.name)]))
        for f in maildir.folders()}
    maildir.close()
    expected["Junk Email"] = []
    assert ews_new.contents("quangtq@hcm.gov.vn") == expected
    assert expected["Drafts"][0][1] == ("\\Draft", "\\Seen")
    assert sorted(len(v) for v in expected.values()) == [0, 0, 1, 1, 1, 1, 2, 3, 4, 17]
    check = verify_mailbox(job, source, sink, state)
    assert check.ok and sum(f.expected for f in check.folders) == 30
    assert migrate_mailbox(job, source, sink, state).copied == 0


def test_exchange_to_exchange(ews_old: EwsServer, ews_new: EwsServer, tmp_path: Path, state) -> None:
    seed_old_mailbox(ews_old, category="Quan trọng")
    ews_new.add_mailbox("an.nguyen@hcm.gov.vn")
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD)
    new = ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW, access="impersonation", version="Exchange2013_SP1")
    job = MailboxJob("binhduong", OLD_BOX, "an.nguyen@hcm.gov.vn")
    source, sink = (lambda: open_ews(old, OLD_BOX)), (lambda: open_ews(new, "an.nguyen@hcm.gov.vn"))
    outcome = migrate_mailbox(job, source, sink, state)
    assert (outcome.status, outcome.error, outcome.copied, outcome.skipped) == ("ok", None, 8, 0)
    renamed = {"Hộp thư đến": "Inbox", "Thư đã gửi": "Sent Items", "Thư nháp": "Drafts", "Thư đã xoá": "Deleted Items",
               "Thư rác": "Junk Email"}
    before = ews_old.contents(OLD_BOX)
    assert ews_new.contents("an.nguyen@hcm.gov.vn") == {renamed.get(k, k): v for k, v in before.items()}
    assert before["Hộp thư đến"][3][1] == ("Quan trọng", "\\Flagged")  # a Vietnamese category went through
    check = verify_mailbox(job, source, sink, state)
    assert check.ok and sum(f.expected for f in check.folders) == 8
    assert migrate_mailbox(job, source, sink, state).copied == 0


def test_a_throttled_run_waits_as_told_and_misses_nothing(ews_old: EwsServer, ews_new: EwsServer, tmp_path: Path,
                                                          state) -> None:
    seed_old_mailbox(ews_old)
    ews_new.add_mailbox("an.nguyen@hcm.gov.vn")
    old, new = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW)
    opened: list[EwsStore] = []

    def opener(server: MailServer, mailbox: str) -> Callable[[], EwsStore]:
        def open_one() -> EwsStore:
            opened.append(open_ews(server, mailbox))
            return opened[-1]
        return open_one

    job = MailboxJob("binhduong", OLD_BOX, "an.nguyen@hcm.gov.vn")
    ews_old.busy(4, back_off_ms=30)
    ews_new.busy(3, back_off_ms=20)
    outcome = migrate_mailbox(job, opener(old, OLD_BOX), opener(new, "an.nguyen@hcm.gov.vn"), state)
    assert (outcome.status, outcome.error, outcome.copied) == ("ok", None, 8)
    assert (ews_old.busy_answers, ews_new.busy_answers) == (4, 3)
    assert [(s.mailbox, s.throttled[0], round(s.throttled[1], 3)) for s in opened] == [
        (OLD_BOX, 4, 0.12), ("an.nguyen@hcm.gov.vn", 3, 0.06)]
    check = verify_mailbox(job, opener(old, OLD_BOX), opener(new, "an.nguyen@hcm.gov.vn"), state)
    assert check.ok and sum(f.expected for f in check.folders) == 8 and not any(f.missing for f in check.folders)


def test_folders_copied_side_by_side_share_the_server_connections(ews_old: EwsServer, ews_new: EwsServer,
                                                                   tmp_path: Path, state) -> None:
    ews_old.add_mailbox(OLD_BOX)
    for folder in range(6):
        ews_old.create_folder(OLD_BOX, f"Hồ sơ {folder}")
        for n in range(15):
            ews_old.put(OLD_BOX, f"Hồ sơ {folder}", message(f"Hồ sơ {folder}.{n}"), is_read=n % 2 == 0,
                        received=at(0) + dt.timedelta(hours=folder, minutes=n))
    ews_new.add_mailbox("an.nguyen@hcm.gov.vn")
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD, max_connections=3)
    new = ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW, max_connections=3)
    job = MailboxJob("binhduong", OLD_BOX, "an.nguyen@hcm.gov.vn")
    source, sink = (lambda: open_ews(old, OLD_BOX)), (lambda: open_ews(new, "an.nguyen@hcm.gov.vn"))
    ews_old.busy(5, back_off_ms=10)
    outcome = migrate_mailbox(job, source, sink, state, connections=3)
    assert (outcome.status, outcome.error, outcome.copied) == ("ok", None, 90)
    assert ews_new.contents("an.nguyen@hcm.gov.vn") == ews_old.contents(OLD_BOX)
    check = verify_mailbox(job, source, sink, state)
    assert check.ok and sum(f.expected for f in check.folders) == 90


def test_throttling_longer_than_max_backoff_fails_the_mailbox_for_a_later_run(ews_old: EwsServer, ews_new: EwsServer,
                                                                             tmp_path: Path, state) -> None:
    seed_old_mailbox(ews_old)
    ews_new.add_mailbox("an.nguyen@hcm.gov.vn")
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD, max_backoff=0.5)
    new = ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW)
    job = MailboxJob("binhduong", OLD_BOX, "an.nguyen@hcm.gov.vn")
    ews_old.busy(1000, back_off_ms=200)
    outcome = migrate_mailbox(job, lambda: open_ews(old, OLD_BOX), lambda: open_ews(new, "an.nguyen@hcm.gov.vn"),
                              state, pauses=())
    assert outcome.status == "failed"
    assert outcome.error == (f"{ews_old.url} mailbox {OLD_BOX}: cannot list folders: throttled: the server kept "
                             "asking to back off for over 0.5 s (gave up when asked to back off 0.200 seconds)")
    ews_old.busy(0)
    again = migrate_mailbox(job, lambda: open_ews(old, OLD_BOX), lambda: open_ews(new, "an.nguyen@hcm.gov.vn"), state)
    assert (again.status, again.copied) == ("ok", 8)


def test_a_message_exchange_refuses_is_skipped_with_its_reason(dovecot_old: DovecotServer, ews_new: EwsServer,
                                                                tmp_path: Path, state) -> None:
    source_box = f"an{next(_numbers)}@binhduong.gov.vn"
    big = message("Tệp đính kèm lớn", body="x" * 3000)
    dovecot_old.fill(source_box, {"INBOX": [(message("Một"), ()), (big, ("\\Seen",)), (message("Ba"), ())]})
    ews_new.add_mailbox("an.nguyen@hcm.gov.vn")
    ews_new.max_message_size = 2000
    old, new = imap_server(dovecot_old, tmp_path), ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW)
    job = MailboxJob("binhduong", source_box, "an.nguyen@hcm.gov.vn")
    source, sink = (lambda: open_imap(old, source_box)), (lambda: open_ews(new, "an.nguyen@hcm.gov.vn"))
    outcome = migrate_mailbox(job, source, sink, state)
    assert (outcome.status, outcome.copied, outcome.skipped) == ("ok", 2, 1)
    assert len(ews_new.contents("an.nguyen@hcm.gov.vn")["Inbox"]) == 2  # no duplicate of the batch's first
    skipped = [e for e in state.message_evidence(job.source, job.mailbox) if e.state == "skipped"]
    assert [e.source_key for e in skipped] == ["2"]
    assert "ErrorMessageSizeExceeded" in (skipped[0].reason or "")
    check = verify_mailbox(job, source, sink, state)
    assert check.ok and [(f.expected, f.present, len(f.skipped)) for f in check.folders if f.target_folder == "INBOX"] == [
        (2, 2, 1)]


def test_store_opener_opens_exchange_mailboxes(ews_old: EwsServer, tmp_path: Path) -> None:
    ews_old.add_mailbox(OLD_BOX)
    store = store_opener(ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), OLD_BOX, create=True)()
    try:
        assert isinstance(store, EwsStore) and store.folders()[0].name == "INBOX"
    finally:
        store.close()


# ---------------------------------------------------------------------------- configuration and check

def ews_config(write: Callable[[str], Path], url: str, mail: str) -> Path:
    """A consolidation file whose binhduong source reads mail from an Exchange server."""
    return write(configs.consolidation(
        target='\n[target.directory]\nldif = "out/new.ldif"\n',
        sources=configs.HCM_LDIF + configs.source("binhduong", "Tỉnh Bình Dương", "74", "binhduong.gov.vn",
                                                  'csv = "bd.csv"\n', f'ews_url = "{url}"\n{mail}')))


def test_exchange_keys_of_a_mail_table(write_config: Callable[..., Path]) -> None:
    path = ews_config(write_config, "https://mail.binhduong.gov.vn/EWS/Exchange.asmx",
                      f'admin_user = "{SVC_OLD}"\npassword_env = "BD_EWS"\naccess = "delegate"\nauth = "basic"\n'
                      'version = "Exchange2013_SP1"\nmax_backoff = 120\nmax_connections = 2\n')
    mail = load_config(path).source("binhduong").mail
    assert mail is not None
    assert (mail.kind, mail.url, mail.admin_user, mail.access, mail.auth, mail.version, mail.max_backoff,
            mail.max_connections) == ("ews", "https://mail.binhduong.gov.vn/EWS/Exchange.asmx", SVC_OLD, "delegate",
                                      "basic", "Exchange2013_SP1", 120.0, 2)
    defaults = load_config(ews_config(write_config, "https://mail.binhduong.gov.vn/EWS/Exchange.asmx",
                                      f'admin_user = "{SVC_OLD}"\npassword_env = "BD_EWS"\n')).source("binhduong").mail
    assert defaults is not None and (defaults.access, defaults.auth, defaults.version, defaults.max_backoff,
                                     defaults.max_connections) == ("impersonation", "ntlm", "Exchange2016", 600.0, 4)


@pytest.mark.parametrize(("mail", "error"), [
    ('admin_user = "svc"\npassword_env = "E"\naccess = "owner"\n',
     "sources[2].mail.access: unknown access 'owner'; choose one of impersonation, delegate"),
    ('admin_user = "svc"\npassword_env = "E"\nauth = "kerberos"\n',
     "sources[2].mail.auth: unknown auth 'kerberos'; choose one of ntlm, basic"),
    ('admin_user = "svc"\npassword_env = "E"\nversion = "Exchange2007"\n',
     "sources[2].mail.version: unknown version 'Exchange2007'; choose one of Exchange2010, Exchange2010_SP1, "
     "Exchange2010_SP2, Exchange2013, Exchange2013_SP1, Exchange2016, Exchange2019"),
    ('admin_user = "svc"\npassword_env = "E"\nlogin = "master"\n',
     'sources[2].mail.login: login = "master" is for IMAP servers; an Exchange server opens mailboxes with '
     'admin_user and access = "impersonation" or "delegate"'),
    ('password_env = "E"\n',
     "sources[2].mail: an Exchange server (ews_url) needs admin_user with password_env or password_file (a service "
     "account), or credentials_file with each mailbox's own password"),
    ('admin_user = "svc"\npassword_env = "E"\ncredentials_file = "p.csv"\n',
     'sources[2].mail.credentials_file: give admin_user (a service account opens every mailbox) or '
     'credentials_file (each mailbox logs in itself), not both'),
    ('credentials_file = "p.csv"\naccess = "delegate"\n',
     "sources[2].mail.access: with credentials_file each mailbox logs in itself: access is for admin_user"),
    ('admin_user = "svc"\npassword_env = "E"\nmax_backoff = 0\n',
     "sources[2].mail.max_backoff: must be greater than 0, got 0.0"),
])
def test_exchange_keys_are_checked(write_config: Callable[..., Path], mail: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(ews_config(write_config, "https://mail.binhduong.gov.vn/EWS/Exchange.asmx", mail))
    assert error in str(caught.value)


def test_exchange_keys_are_refused_on_an_imap_server(write_config: Callable[..., Path]) -> None:
    path = write_config(configs.consolidation(
        target='\n[target.directory]\nldif = "out/new.ldif"\n',
        sources=configs.HCM_LDIF + configs.source("binhduong", "Tỉnh Bình Dương", "74", "binhduong.gov.vn",
                                                  'csv = "bd.csv"\n', 'imap_url = "imaps://mail.binhduong.gov.vn"\n'
                                                  'admin_user = "admin"\npassword_env = "E"\n'
                                                  'access = "impersonation"\n')))
    with pytest.raises(ConfigError, match=r"sources\[2\]\.mail\.access: access is a key of an Exchange server "
                                          r"\(ews_url\), not of imap_url"):
        load_config(path)


def test_check_opens_the_probe_mailbox_on_exchange(ews_old: EwsServer, write_config: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    seed_old_mailbox(ews_old)
    (tmp_path / "ews.pw").write_text(PW_OLD + "\n", encoding="utf-8")
    (tmp_path / "bad.pw").write_text("sai\n", encoding="utf-8")
    (tmp_path / "bd.csv").write_text("x\n", encoding="utf-8")
    (tmp_path / "hcm.ldif").write_text("\n", encoding="utf-8")
    account = f'admin_user = "{SVC_OLD}"\nauth = "basic"\n'

    def line(mail: str) -> tuple[str, bool, str]:
        results = [r for r in check_config(load_config(ews_config(write_config, ews_old.url, account + mail)))
                   if r.subject == "source binhduong mail"]
        assert len(results) == 1
        return results[0].target, results[0].ok, results[0].detail

    assert line(f'password_file = "ews.pw"\nprobe_mailbox = "{OLD_BOX}"\n') == (
        ews_old.url, True, f"opened {OLD_BOX} as {SVC_OLD} by impersonation (EWS Exchange2016, BASIC), "
                           "7 mail folders")
    assert line(f'password_file = "bad.pw"\nprobe_mailbox = "{OLD_BOX}"\n') == (
        ews_old.url, False, f"mailbox {OLD_BOX}: login as {SVC_OLD} by impersonation refused: the server refused the "
                            f"credentials (HTTP 401) for {ews_old.url}")
    assert line('password_file = "ews.pw"\naccess = "delegate"\n') == (
        ews_old.url, False, f"{SVC_OLD} opens each mailbox by delegate access: set probe_mailbox to one to try")


# ------------------------------------------------------------------- captured requests and answers

def seed_capture(server: EwsServer) -> None:
    """The mailbox the captured requests were made on: a message, an appointment, a contact and a task."""
    server.add_mailbox("an@hcm.gov.vn", names={"inbox": "Hộp thư đến"})
    server.put("an@hcm.gov.vn", "inbox", message("Công văn", message_id=False), is_read=True, flagged=True,
               categories=["Quan trọng"], received=at(0))
    server.put_event("an@hcm.gov.vn", "calendar", "Họp giao ban", at(10), at(40), location="Phòng 2", created=at(1))
    server.put_contact("an@hcm.gov.vn", "contacts", "Hà", "Thị Thu", "Trần", "hattt@hcm.gov.vn", created=at(2))
    server.put_task("an@hcm.gov.vn", "tasks", "Nộp báo cáo", status="InProgress", due=dt.date(2025, 3, 31),
                    percent=40, created=at(3))


def capture_scenario(server: EwsServer, tmp_path: Path) -> None:
    """Drive every operation the store uses once, on a fresh server: the fixtures under tests/fixtures/ews."""
    seed_capture(server)
    mail = ews_mail(server, tmp_path, SVC_NEW, PW_NEW)
    with open_ews(mail, "an@hcm.gov.vn") as store:  # GetFolder, FindFolder
        store.status("INBOX")  # GetFolder
        keys = [i.key for i in store.list_messages("INBOX")]  # FindItem, GetItem
        list(store.fetch("INBOX", keys))  # GetItem with MimeContent
        store.create_folder("Lưu trữ")  # CreateFolder
        appended = store.append("Lưu trữ", [Message(MessageInfo("1", None, 10, ("\\Seen", "$Forwarded"), at(1)),
                                                     message("Đã chuyển tiếp", message_id=False))])  # CreateItem
        store.set_flags("Lưu trữ", appended[0], ("\\Flagged",))  # UpdateItem
        first = store.changes("Lưu trữ", None)  # SyncFolderItems from the beginning (a Create), GetItem
        store.set_flags("Lưu trữ", appended[0], ("\\Seen", "\\Flagged"))
        store.changes("Lưu trữ", first.state)  # SyncFolderItems: an Update (ReadFlagChange: the delta test)
        store.changes("INBOX", base64.b64encode(b"S:0:not-a-state:0").decode())  # ErrorInvalidSyncStateData, again
        store.export_not_mail(tmp_path / "exports")  # FindItem and GetItem of a CalendarItem, a Contact, a Task
        server.busy(1, back_off_ms=10)
        store.status("Lưu trữ")  # ErrorServerBusy, then GetFolder again
        server.max_message_size = 400
        with pytest.raises(MessageRefused):
            store.append("Lưu trữ", [Message(MessageInfo(str(n), None, len(r), (), at(2)), r)
                                     for n, r in enumerate((message("Nhỏ", message_id=False),
                                                            message("Lớn", body="x" * 500, message_id=False)))])
        # CreateItem with one refusal, DeleteItem taking back the other


def test_captured_requests_still_get_the_captured_answers(tmp_path: Path) -> None:
    captured = sorted(FIXTURES.glob("*.request.xml"))
    assert {p.name.split("-", 1)[1].split(".")[0] for p in captured} == {
        "GetFolder", "FindFolder", "FindItem", "GetItem", "CreateFolder", "CreateItem", "UpdateItem", "DeleteItem",
        "SyncFolderItems"}
    answers = " ".join(p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("*.response-*.xml")))
    for element in ("<t:CalendarItem>", "<t:Contact>", "<t:Task>", "<t:Update>", "<t:Create>",
                    "ErrorInvalidSyncStateData"):
        assert element in answers
    server = EwsServer(tmp_path / "ews").start()
    try:
        server.add_user(SVC_NEW, PW_NEW, impersonation=True)
        seed_capture(server)
        auth = "Basic " + base64.b64encode(f"{SVC_NEW}:{PW_NEW}".encode()).decode()
        for request in captured:
            answer = next(FIXTURES.glob(request.name.replace(".request.xml", ".response-*.xml")))
            if b"ErrorServerBusy" in answer.read_bytes():
                server.busy(1, back_off_ms=10)
                server.max_message_size = 400  # as the scenario sets it after its throttled request
            got = requests.post(server.url, data=request.read_bytes(), timeout=10,
                                headers={"Authorization": auth, "Content-Type": "text/xml; charset=utf-8"})
            assert (answer.name, _pretty(got.content).decode()) == (answer.name, answer.read_text(encoding="utf-8"))
    finally:
        server.stop()


def test_exchangelib_still_sends_the_captured_requests(tmp_path: Path) -> None:
    """When this fails after an exchangelib upgrade, look at the differences: the test server answers the captured
    requests, and may need to learn the new ones. MAILMERGE_EWS_CAPTURE=1 writes them anew."""
    server = EwsServer(tmp_path / "ews").start()
    server.add_user(SVC_NEW, PW_NEW, impersonation=True)
    server.capture_to = tmp_path / "captured"
    try:
        capture_scenario(server, tmp_path)
    finally:
        server.stop()
    if os.environ.get("MAILMERGE_EWS_CAPTURE") == "1":
        shutil.rmtree(FIXTURES, ignore_errors=True)
        shutil.copytree(server.capture_to, FIXTURES)
    made = {p.name: p.read_text(encoding="utf-8") for p in sorted(server.capture_to.iterdir())}
    kept = {p.name: p.read_text(encoding="utf-8") for p in sorted(FIXTURES.iterdir())}
    assert list(made) == list(kept)
    for name in made:
        assert (name, made[name]) == (name, kept[name])


# ------------------------------------------------------------- calendars, contacts and tasks as files

def ical(text: str) -> list[dict[str, str]]:
    """The components of an iCalendar or vCard text, unfolded: one {"": name, "NAME;PARAMS": value} per component
    below the top level (VTIMEZONE, VEVENT, VTODO) or per VCARD, values unescaped."""
    lines = text.replace("\r\n ", "").replace("\r\n\t", "").split("\r\n")
    found: list[dict[str, str]] = []
    depth = 0
    for line in lines:
        if line.startswith("BEGIN:"):
            depth += 1
            if line == "BEGIN:VCARD" or depth == 2:
                found.append({"": line[6:]})
        elif line.startswith("END:"):
            depth -= 1
        elif line and found and (depth == 2 or found[-1][""] == "VCARD"):
            name, _, value = line.partition(":")
            found[-1][name] = value.replace("\\n", "\n").replace("\\,", ",").replace("\\;", ";").replace("\\\\", "\\")
    return found


def test_a_calendar_folder_becomes_an_ics_listed_in_the_report(ews_old: EwsServer, tmp_path: Path, state) -> None:
    ews_old.add_mailbox(OLD_BOX, names=VIETNAMESE)
    ews_old.put(OLD_BOX, "inbox", message("Giấy mời"), received=at(0))
    ews_old.put_event(OLD_BOX, "calendar", "Họp giao ban, tuần 10", at(0), at(0) + dt.timedelta(minutes=90),
                      location="Phòng họp 2; tầng 3",
                      body="Chuẩn bị báo cáo.\nMang theo máy tính.")
    ews_old.put_event(OLD_BOX, "calendar", "Tiếp công dân" + " định kỳ" * 10, at(0) + dt.timedelta(hours=2),
                      at(0) + dt.timedelta(hours=3))
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD)
    job = MailboxJob("binhduong", OLD_BOX, "an@hcm.gov.vn")
    reports = tmp_path / "reports"
    outcome = migrate_mailbox(job, lambda: open_ews(old, OLD_BOX), lambda: open_maildir(tmp_path / "new", job.target_mailbox,
                              create=True), state, export_to=reports / "exports" / OLD_BOX)
    assert (outcome.status, outcome.copied) == ("ok", 1)
    calendar = reports / "exports" / OLD_BOX / "Lịch.ics"
    assert [(e.folder, e.kind, e.path, e.items, e.failed) for e in outcome.exports] == [
        ("Công việc", "tasks", calendar.with_name("Công việc.ics"), 0, 0),
        ("Danh bạ", "contacts", calendar.with_name("Danh bạ.vcf"), 0, 0), ("Lịch", "calendar", calendar, 2, 0)]
    assert [(f.folder, f.note) for f in outcome.folders if f.target_folder is None] == [
        ("Công việc", "not mail: exported to Công việc.ics"), ("Danh bạ", "not mail: exported to Danh bạ.vcf"),
        ("Lịch", "not mail: exported to Lịch.ics")]
    text = calendar.read_bytes().decode()
    assert text.startswith("BEGIN:VCALENDAR\r\nVERSION:2.0\r\n") and text.endswith("END:VCALENDAR\r\n")
    assert all(len(line.encode()) <= 75 for line in text.split("\r\n"))
    components = ical(text)
    assert [c[""] for c in components] == ["VTIMEZONE", "VEVENT", "VEVENT"]  # the one time zone once
    assert [(c["SUMMARY;LANGUAGE=vi-VN"], c["DTSTART;TZID=SE Asia Standard Time"],
             c["DTEND;TZID=SE Asia Standard Time"], c["LOCATION;LANGUAGE=vi-VN"]) for c in components[1:]] == [
        ("Họp giao ban, tuần 10", "20250203T090000", "20250203T103000", "Phòng họp 2; tầng 3"),
        ("Tiếp công dân" + " định kỳ" * 10, "20250203T110000", "20250203T120000", "")]
    assert components[1]["DESCRIPTION;LANGUAGE=vi-VN"] == "Chuẩn bị báo cáo.\nMang theo máy tính."
    assert oct(calendar.stat().st_mode & 0o777) == "0o600"
    html, data = write_migration_report(mailbox_reports(state, [job], [outcome]), reports, "mailbox-migration", "HCM")
    listed = json.loads(data.read_text(encoding="utf-8"))[0]["exports"]
    assert listed[2] == {"folder": "Lịch", "kind": "calendar", "file": str(calendar), "items": 2, "failed": 0}
    assert (f'<li>Lịch (calendar): <a href="exports/{OLD_BOX}/Lịch.ics">exports/{OLD_BOX}/Lịch.ics</a>, 2 mục '
            '<span class="en">items</span></li>') in html.read_text(encoding="utf-8")


def test_contacts_become_a_vcf_and_tasks_an_ics_of_vtodos(ews_old: EwsServer, tmp_path: Path) -> None:
    ews_old.add_mailbox(OLD_BOX, names=VIETNAMESE)
    ews_old.put_contact(OLD_BOX, "contacts", "An", "Văn", "Nguyễn", "an.nguyenvan@binhduong.gov.vn",
                        phone="+84 274 3822 222", company="UBND tỉnh Bình Dương", title="Chuyên viên")
    ews_old.put_contact(OLD_BOX, "contacts", "Hà", "Thị Thu", "Trần", "ha.tranthithu@binhduong.gov.vn")
    ews_old.put_task(OLD_BOX, "tasks", "Nộp báo cáo quý, bản 2", status="InProgress", due=dt.date(2025, 3, 31),
                     percent=40, body="Gửi Sở Nội vụ;\nbản giấy và bản điện tử.", importance="High")
    ews_old.put_task(OLD_BOX, "tasks", "Lưu trữ hồ sơ", status="Completed", percent=100)
    with open_ews(ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD), OLD_BOX) as store:
        exported = store.export_not_mail(tmp_path / "exports")
    assert [(e.folder, e.path.name, e.items) for e in exported] == [
        ("Công việc", "Công việc.ics", 2), ("Danh bạ", "Danh bạ.vcf", 2), ("Lịch", "Lịch.ics", 0)]
    cards = ical((tmp_path / "exports" / "Danh bạ.vcf").read_bytes().decode())
    assert [(c["FN"], c["N"], c["EMAIL;TYPE=INTERNET"], c["TITLE"]) for c in cards] == [
        ("Nguyễn Văn An", "Nguyễn;An;Văn;;", "an.nguyenvan@binhduong.gov.vn", "Chuyên viên"),
        ("Trần Thị Thu Hà", "Trần;Hà;Thị Thu;;", "ha.tranthithu@binhduong.gov.vn", "")]
    todos = ical((tmp_path / "exports" / "Công việc.ics").read_bytes().decode())
    assert [{k: v for k, v in t.items() if k not in ("UID", "DTSTAMP")} for t in todos] == [
        {"": "VTODO", "SUMMARY": "Nộp báo cáo quý, bản 2",
         "DESCRIPTION": "Gửi Sở Nội vụ;\nbản giấy và bản điện tử.",
         "DUE;VALUE=DATE": "20250331", "STATUS": "IN-PROCESS", "PERCENT-COMPLETE": "40", "PRIORITY": "1"},
        {"": "VTODO", "SUMMARY": "Lưu trữ hồ sơ", "STATUS": "COMPLETED", "PERCENT-COMPLETE": "100", "PRIORITY": "5"}]
    assert len({t["UID"] for t in todos}) == 2
    assert [r[0] for r in ews_old.requests].count("SyncFolderItems") == 0  # exports list with FindItem


# ---------------------------------------------------------------------------------- delta passes

def test_a_second_pass_asks_only_for_what_changed_since_the_sync_state(ews_old: EwsServer, tmp_path: Path, state,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mailmerge_gov.migration.ews as ews

    monkeypatch.setattr(ews, "SYNC_PAGE", 2)
    ews_old.add_mailbox(OLD_BOX)
    keys = [ews_old.put(OLD_BOX, "inbox", message(f"Thư {n}"), received=at(n)) for n in range(5)]
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD)
    job = MailboxJob("binhduong", OLD_BOX, "an@hcm.gov.vn")
    source, sink = (lambda: open_ews(old, OLD_BOX)), (lambda: open_maildir(tmp_path / "new", job.target_mailbox,
                                                                            create=True))
    assert migrate_mailbox(job, source, sink, state).copied == 5
    first = state.folder_checkpoint(job.source, job.mailbox, "INBOX")
    assert first is not None and first.sync_state
    assert [r[0] for r in ews_old.requests].count("SyncFolderItems") == 3 + 4  # INBOX in pages of 2; 4 empty folders
    assert "FindItem" not in [r[0] for r in ews_old.requests]
    ews_old.requests.clear()
    ews_old.set_read(keys[1], True)
    ews_old.delete(keys[2])
    ews_old.put(OLD_BOX, "inbox", message("Thư mới"), received=at(30))
    again = migrate_mailbox(job, source, sink, state)
    assert (again.status, again.copied, sum(f.flags_synced for f in again.folders)) == ("ok", 1, 1)
    operations = [r[0] for r in ews_old.requests]
    assert "FindItem" not in operations and operations.count("SyncFolderItems") == 2 + 4  # INBOX: 3 changes
    assert operations.count("GetItem") == 2  # the two changed items of INBOX (new, read), then the new one's MIME
    assert ews_old.sync_states_given[-6:] == [True] * 6  # every folder asked from its state
    new = open_maildir(tmp_path / "new", job.target_mailbox)
    inbox = new.list_messages("INBOX")
    assert len(inbox) == 6 and sum(i.flags == ("\\Seen",) for i in inbox) == 1  # the deleted one is kept
    new.close()
    assert state.folder_checkpoint(job.source, job.mailbox, "INBOX").sync_state != first.sync_state
    assert migrate_mailbox(job, source, sink, state).copied == 0


def test_an_expired_or_broken_sync_state_falls_back_to_a_full_listing(ews_old: EwsServer, tmp_path: Path,
                                                                        state) -> None:
    ews_old.add_mailbox(OLD_BOX)
    for n in range(3):
        ews_old.put(OLD_BOX, "inbox", message(f"Thư {n}"), received=at(n))
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD)
    job = MailboxJob("binhduong", OLD_BOX, "an@hcm.gov.vn")
    source, sink = (lambda: open_ews(old, OLD_BOX)), (lambda: open_maildir(tmp_path / "new", job.target_mailbox,
                                                                            create=True))
    assert migrate_mailbox(job, source, sink, state).copied == 3
    ews_old.expire_sync_states()
    ews_old.put(OLD_BOX, "inbox", message("Thư mới"), received=at(30))
    ews_old.sync_states_given.clear()
    assert migrate_mailbox(job, source, sink, state).copied == 1  # nothing copied twice
    assert ews_old.sync_states_given == [True, False] * 5  # refused, then from the beginning, in every folder
    checkpoint = state.folder_checkpoint(job.source, job.mailbox, "INBOX")
    state.save_checkpoint(dataclasses.replace(checkpoint, sync_state="không phải trạng thái"))
    ews_old.put(OLD_BOX, "inbox", message("Thư mới nữa"), received=at(31))
    assert migrate_mailbox(job, source, sink, state).copied == 1
    new = open_maildir(tmp_path / "new", job.target_mailbox)
    assert len(new.list_messages("INBOX")) == 5
    new.close()


# ------------------------------------------------------------------------- altered by the server

def maildir_to_rewriting_ews(example_dir: Path, ews_new: EwsServer, tmp_path: Path):
    """A job from a copy of an example Maildir into an EWS mailbox whose server rewrites MIME: (job, source, sink)."""
    root = tmp_path / "mail"
    shutil.copytree(example_dir / "sources" / "baria-vungtau" / "mail" / BOX, root / BOX)
    ews_new.add_mailbox("quangtq@hcm.gov.vn")
    ews_new.rewrite_mime = True
    new = ews_mail(ews_new, tmp_path, SVC_NEW, PW_NEW)
    job = MailboxJob("baria-vungtau", BOX, "quangtq@hcm.gov.vn")
    return job, (lambda: open_maildir(root, BOX)), (lambda: open_ews(new, "quangtq@hcm.gov.vn"))


def test_copies_are_claimed_once_each_by_the_original_they_match() -> None:
    from mailmerge_gov.migration.compare import Copies, Fingerprint

    copies = Copies([(Fingerprint("a@x", 1000, "h1"), "t1"), (Fingerprint("b@x", 1000, "h2"), "t2"),
                     (Fingerprint("a@x", 1000, "h1"), "t3"), (Fingerprint("a@x", 9000, "h1"), "t4"),
                     (Fingerprint(None, 500, "h3"), "t5")])
    originals = [Fingerprint("a@x", 900, "h1"), Fingerprint("a@x", 900, "h1"), Fingerprint("a@x", 900, "h1"),
                 Fingerprint("a@x", 2500, "h1"), Fingerprint("b@x", 1000, "h9"), Fingerprint(None, 400, "h3"),
                 Fingerprint("c@x", 500, "h3")]
    # in order, each copy once; 9,000 bytes is out of the band of 900 (up to 3 x 900 + 4,096) but not of 2,500
    assert [copies.claim(original) for original in originals] == ["t1", "t3", None, "t4", None, "t5", None]


def test_verify_says_altered_by_the_server_and_still_finds_a_missing_message(example_dir: Path, ews_new: EwsServer,
                                                                             tmp_path: Path, state) -> None:
    job, source, sink = maildir_to_rewriting_ews(example_dir, ews_new, tmp_path)
    assert migrate_mailbox(job, source, sink, state).copied == 30
    inbox = [i for i in ews_new.items.values() if ews_new.folders[i.folder].distinguished == "inbox"]
    rewritten = ews_new.mime(inbox[0].id)
    assert b"X-MS-Has-Attach:\r\n" in rewritten and b"Content-Transfer-Encoding: 8bit" not in rewritten
    check = verify_mailbox(job, source, sink, state)
    assert (check.ok, sum(f.present for f in check.folders), sum(len(f.altered) for f in check.folders)) == (
        True, 30, 30)
    ews_new.delete(inbox[0].id)
    check = verify_mailbox(job, source, sink, state)
    assert (check.ok, sum(len(f.missing) for f in check.folders), sum(len(f.altered) for f in check.folders)) == (
        False, 1, 29)
    html, data = write_migration_report(mailbox_reports(state, [job], checks=[check]), tmp_path / "reports",
                                        "mailbox-verify", "HCM")
    row = json.loads(data.read_text(encoding="utf-8"))[0]
    assert (len(row["altered"]), len(row["missing"]), row["status"]) == (29, 1, "missing messages")
    folder, key = row["altered"][0]
    assert f"<li>{folder} <code>{key}</code>: altered by the server</li>" in html.read_text(encoding="utf-8")


def test_an_interrupted_batch_to_a_rewriting_server_is_not_copied_twice(example_dir: Path, ews_new: EwsServer,
                                                                       tmp_path: Path, state) -> None:
    job, source, sink = maildir_to_rewriting_ews(example_dir, ews_new, tmp_path)
    migrate_mailbox(job, source, sink, state)
    # what a kill -9 between the append and its evidence leaves: rows 'appending', the messages in the target,
    # one of which (deleted here) had not landed
    rows = state.message_evidence(job.source, job.mailbox, "INBOX")
    state.record_messages([dataclasses.replace(r, state="appending", target_key=None) for r in rows])
    ews_new.delete(rows[0].target_key)
    again = migrate_mailbox(job, source, sink, state)
    assert (again.status, again.copied) == ("ok", 1)
    assert len(ews_new.contents("quangtq@hcm.gov.vn")["Inbox"]) == len(rows)
    recovered = state.message_evidence(job.source, job.mailbox, "INBOX")
    assert {e.state for e in recovered} == {"copied"}
    assert sum(e.reason == "altered by the server" for e in recovered) == len(rows) - 1
    assert verify_mailbox(job, source, sink, state).ok


# ----------------------------------------------------------------------------- throttling, NTLM

def test_throttling_waits_are_in_the_run_report(ews_old: EwsServer, tmp_path: Path, state) -> None:
    seed_old_mailbox(ews_old)
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD)
    job = MailboxJob("binhduong", OLD_BOX, "an@hcm.gov.vn")
    ews_old.busy(3, back_off_ms=40)
    outcome = migrate_mailbox(job, lambda: open_ews(old, OLD_BOX),
                              lambda: open_maildir(tmp_path / "new", job.target_mailbox, create=True), state)
    assert (outcome.status, outcome.copied, outcome.throttled) == ("ok", 8, (ServerWaits(ews_old.url, 3, 0.12),))
    html, data = write_migration_report(mailbox_reports(state, [job], [outcome]), tmp_path / "reports",
                                        "mailbox-migration", "HCM")
    assert json.loads(data.read_text(encoding="utf-8"))[0]["throttled"] == [
        {"server": ews_old.url, "waits": 3, "seconds": 0.12}]
    assert f'<tr><td>{ews_old.url}</td><td class="num">3</td><td class="num">0.1</td></tr>' in html.read_text(
        encoding="utf-8")


def test_an_ntlm_login(tmp_path: Path) -> None:
    server = EwsServer(tmp_path / "ews", ntlm=True).start()
    try:
        server.add_user(SVC_NEW, PW_NEW, impersonation=True)
        server.add_mailbox("an@hcm.gov.vn")
        mail = ews_mail(server, tmp_path, SVC_NEW, PW_NEW, auth="ntlm")
        with open_ews(mail, "an@hcm.gov.vn") as store:
            assert store.folders()[0].name == "INBOX"
        assert server.requests[0] == ("GetFolder", SVC_NEW, "an@hcm.gov.vn")
        assert set(server.auth_schemes) == {"NTLM"}
        (tmp_path / "wrong").mkdir()
        with pytest.raises(LoginFailed, match=r"login as svc-migrate@hcm\.gov\.vn by impersonation refused: the "
                                              r"server refused the credentials \(HTTP 401\)"):
            open_ews(ews_mail(server, tmp_path / "wrong", SVC_NEW, "sai", auth="ntlm"), "an@hcm.gov.vn")
        with pytest.raises(LoginFailed, match=r"HTTP 401"):  # a Basic login is not offered
            open_ews(ews_mail(server, tmp_path, SVC_NEW, PW_NEW, auth="basic"), "an@hcm.gov.vn")
    finally:
        server.stop()


def test_requests_to_one_server_never_exceed_its_max_connections(ews_old: EwsServer, tmp_path: Path, state) -> None:
    ews_old.add_mailbox(OLD_BOX)
    for folder in range(5):
        ews_old.create_folder(OLD_BOX, f"Hồ sơ {folder}")
        for n in range(3):
            ews_old.put(OLD_BOX, f"Hồ sơ {folder}", message(f"Hồ sơ {folder}.{n}"), received=at(n))
    old = ews_mail(ews_old, tmp_path, SVC_OLD, PW_OLD, max_connections=2)
    job = MailboxJob("binhduong", OLD_BOX, "an@hcm.gov.vn")
    ews_old.delay = 0.02
    outcome = migrate_mailbox(job, lambda: open_ews(old, OLD_BOX),
                              lambda: open_maildir(tmp_path / "new", job.target_mailbox, create=True), state,
                              connections=4)
    assert (outcome.status, outcome.copied) == ("ok", 15)
    assert ews_old.peak_in_flight == 2  # four folder workers (and their prefetching) share two connections


def test_the_cli_shows_throttling_and_messages_altered_by_the_server(example_copy: Path, ews_new: EwsServer) -> None:
    from click.testing import CliRunner

    from mailmerge_gov.cli import cli

    config = example_copy / "consolidation.toml"
    (example_copy / "ews.pw").write_text(PW_NEW + "\n", encoding="utf-8")
    config.write_text(config.read_text(encoding="utf-8").replace(
        '[target.mail]\nmaildir = "out/mail"\n',
        f'[target.mail]\news_url = "{ews_new.url}"\nadmin_user = "{SVC_NEW}"\npassword_file = "ews.pw"\n'
        'auth = "basic"\n'), encoding="utf-8")

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, [*args, "-c", str(config)], prog_name="mailmerge-gov", catch_exceptions=False)
        return result.exit_code, result.stdout

    assert run("directory", "plan")[0] == 0
    ews_new.add_mailbox("quangtq@hcm.gov.vn")
    ews_new.rewrite_mime = True
    ews_new.busy(2, back_off_ms=50)
    reports = example_copy / "state" / "reports"
    code, output = run("mailbox", "migrate", "--only", BOX)
    assert (code, output) == (0, f"baria-vungtau:{BOX} -> quangtq@hcm.gov.vn: copied 30 messages (46196 bytes)\n"
                                 f"throttled by {ews_new.url}: waited 2 times, 0.1 s in all\n"
                                 f"report: {reports / 'mailbox-migration.html'}\n"
                                 f"        {reports / 'mailbox-migration.json'}\n"
                                 "1 of 1 mailboxes done\n")
    code, output = run("mailbox", "verify", "--only", BOX)
    lines = output.splitlines()
    assert (code, lines[0], lines[-1]) == (
        0, f"baria-vungtau:{BOX} -> quangtq@hcm.gov.vn: 30 of 30 messages found, 30 altered by the server",
        "verified 1 mailboxes: nothing missing")
    assert sum(line.startswith("    altered by the server: ") for line in lines) == 30
    assert "    altered by the server: INBOX " in output


def test_releasing_a_login_under_the_sharing_lock_does_not_hang() -> None:
    # open_ews releases the login it just counted, still holding `sharing`, when exchangelib refuses the Account
    import threading

    from mailmerge_gov.migration.ews_session import release, sharing

    def release_under_lock() -> None:
        with sharing:
            release(("https://mail.example.org/EWS/Exchange.asmx", "svc"), None)

    worker = threading.Thread(target=release_under_lock, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()
