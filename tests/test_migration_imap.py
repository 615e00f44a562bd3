"""The IMAP mail store against real Dovecots: logins, folders, byte-identical copies, flags, refusals."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import started
from mailmerge_gov.config import MailServer, Secret
from mailmerge_gov.migration import imap as imap_module
from mailmerge_gov.migration.imap import ImapStore, _expand_uid_set, _folder_info, _uid_set, open_imap
from mailmerge_gov.migration.protocol import (ConnectionLost, FolderInfo, FolderStatus, LoginFailed, MailboxError,
                                              Message, MessageInfo, MessageRefused, QuotaExceeded)
from servers import DovecotServer, require_program, run_checked

ICT = timezone(timedelta(hours=7))
VAN_BAN_DEN = "Văn bản đến"


def raw(subject: str, message_id: str, body: str = "Công văn số 123/UBND về việc sáp nhập.") -> bytes:
    """Return an RFC 5322 message with CRLF line ends and an 8-bit UTF-8 body."""
    return (
        "From: Văn thư <vanthu@binhduong.gov.vn>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{message_id}@binhduong.gov.vn>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


def message(content: bytes, flags: tuple[str, ...] = (), when: datetime = datetime(2024, 3, 15, 8, 31, 5, tzinfo=ICT),
            key: str = "src") -> Message:
    """Wrap raw bytes as a Message to append (key and size are the source's, unused by append)."""
    return Message(MessageInfo(key, None, len(content), flags, when), content)


def info(uid: int, content: bytes, flags: tuple[str, ...], when: datetime) -> MessageInfo:
    """Return the MessageInfo an IMAP store lists for a message."""
    return MessageInfo(str(uid), uid, len(content), flags, when)


def imap_config(server: DovecotServer, tmp_path: Path, password: str, login: str = "master",
                timeout: float = 5.0) -> MailServer:
    """Return the [mail] table of a Dovecot, the password in a file."""
    secret = tmp_path / f"imap-{login}.pw"
    secret.write_text(password + "\n", encoding="utf-8")
    return MailServer("imap", url=f"imap://{server.host}:{server.imap_port}", admin_user=server.master_user,
                      password=Secret(file=secret), login=login, master_separator=server.separator, timeout=timeout)


def open_as_master(server: DovecotServer, tmp_path: Path, address: str) -> ImapStore:
    """Create `address` on `server` and open its mailbox through the master user."""
    server.add_user(address, "mk-" + address.split("@")[0])
    return open_imap(imap_config(server, tmp_path, server.master_password), address)


class ConfiguredDovecot(DovecotServer):
    """A private Dovecot with extra configuration lines (quota, special-use folders, capabilities)."""

    def __init__(self, name: str, extra: str) -> None:
        """Describe the instance; nothing runs until start()."""
        super().__init__(name)
        self.extra = extra

    def config_text(self) -> str:
        """Return the fixture's dovecot.conf with the extra lines after it."""
        return super().config_text() + self.extra


# quota_max_mail_size makes Dovecot 2.3 refuse a larger message with NO [LIMIT]; 4 KB of storage fills fast
LIMITS = """
mail_plugins = $mail_plugins quota
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=4K
  quota_max_mail_size = 2000
}
namespace inbox {
  mailbox Sent {
    special_use = \\Sent
    auto = create
  }
  mailbox "Thùng rác" {
    special_use = \\Trash
    auto = create
  }
}
"""
# a server without MULTIAPPEND and LITERAL+: one APPEND per message, each literal waits for the server's "+"
PLAIN_APPEND = "imap_capability = IMAP4rev1 SASL-IR ID ENABLE IDLE UNSELECT CHILDREN NAMESPACE UIDPLUS CONDSTORE\n"


@contextmanager
def dovecot_with(name: str, extra: str) -> Iterator[DovecotServer]:
    """Run a private Dovecot with extra configuration for one test."""
    server = started(ConfiguredDovecot(name, extra))
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ logins


def test_user_login_opens_the_mailbox_with_its_own_password(dovecot_old: DovecotServer, tmp_path: Path) -> None:
    address = "imapstore-user@binhduong.gov.vn"
    dovecot_old.add_user(address, "mk-rieng")
    with open_imap(imap_config(dovecot_old, tmp_path, "mk-rieng", login="user"), address) as store:
        assert store.separator == "/"
        assert store.folders() == [FolderInfo("INBOX", "/", None, True)]
        assert store.append_limit() is None


def test_master_and_authzid_logins_see_the_same_mailbox(dovecot_old: DovecotServer, tmp_path: Path) -> None:
    address = "imapstore-master@binhduong.gov.vn"
    with open_as_master(dovecot_old, tmp_path, address) as store:
        assert store.append("INBOX", [message(raw("Giấy mời họp", "gm-1"))]) == ["1"]
    config = imap_config(dovecot_old, tmp_path, dovecot_old.master_password, login="authzid")
    with open_imap(config, address) as store:
        assert [m.raw for m in store.fetch("INBOX", ["1"])] == [raw("Giấy mời họp", "gm-1")]


@pytest.mark.parametrize("login", ["master", "authzid"])
def test_wrong_password_is_login_failed_naming_server_and_mailbox(dovecot_old: DovecotServer, tmp_path: Path,
                                                                  login: str) -> None:
    address = "imapstore-wrong@binhduong.gov.vn"
    dovecot_old.add_user(address, "mk-wrong")
    config = imap_config(dovecot_old, tmp_path, "not-the-master-password", login=login)
    with pytest.raises(LoginFailed) as refused:
        open_imap(config, address)
    who = f"{address}*admin" if login == "master" else f"admin (authzid {address})"
    assert str(refused.value) == (f"imap://127.0.0.1:{dovecot_old.imap_port}: login for {address} as {who} failed: "
                                  "[AUTHENTICATIONFAILED] Authentication failed.")
    assert "not-the-master-password" not in str(refused.value)


def test_missing_password_file_is_login_failed(dovecot_old: DovecotServer, tmp_path: Path) -> None:
    config = MailServer("imap", url=f"imap://127.0.0.1:{dovecot_old.imap_port}", admin_user="admin",
                        password=Secret(file=tmp_path / "none.pw"), login="master")
    with pytest.raises(LoginFailed) as refused:
        open_imap(config, "imapstore-nopw@binhduong.gov.vn")
    assert str(refused.value) == (f"imap://127.0.0.1:{dovecot_old.imap_port}: cannot log in for "
                                  f"imapstore-nopw@binhduong.gov.vn: cannot read password file {tmp_path}/none.pw: "
                                  "No such file or directory")


def test_refused_connection_is_connection_lost(free_port: Callable[[], int], tmp_path: Path) -> None:
    port = free_port()
    config = MailServer("imap", url=f"imap://127.0.0.1:{port}", admin_user="admin",
                        password=Secret(file=tmp_path / "pw"), login="master")
    (tmp_path / "pw").write_text("secret\n")
    with pytest.raises(ConnectionLost) as lost:
        open_imap(config, "a@hcm.gov.vn")
    assert str(lost.value) == f"imap://127.0.0.1:{port}: cannot connect: [Errno 111] Connection refused"


def test_server_that_never_greets_is_connection_lost(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts the connection; nobody ever says "* OK"
        port = silent.getsockname()[1]
        (tmp_path / "pw").write_text("secret\n")
        config = MailServer("imap", url=f"imap://127.0.0.1:{port}", admin_user="admin",
                            password=Secret(file=tmp_path / "pw"), login="master", timeout=0.3)
        with pytest.raises(ConnectionLost) as lost:
            open_imap(config, "a@hcm.gov.vn")
    assert str(lost.value) == f"imap://127.0.0.1:{port}: cannot connect: timed out"


def test_dropped_connection_is_connection_lost(tmp_path: Path) -> None:
    with dovecot_with("gone", "") as server:
        store = open_as_master(server, tmp_path, "imapstore-gone@hcm.gov.vn")
        server.stop()  # SIGKILL of the whole Dovecot: the socket dies under the store
        with pytest.raises(ConnectionLost) as lost:
            store.folders()
    assert str(lost.value).startswith(f"imap://127.0.0.1:{server.imap_port} mailbox imapstore-gone@hcm.gov.vn: "
                                      "connection lost while trying to list folders: ")
    with pytest.raises(ConnectionLost):
        store.status("INBOX")  # the store knows it has no connection any more
    store.close()


def test_non_ascii_password_logs_in_through_sasl_plain(dovecot_old: DovecotServer, tmp_path: Path) -> None:
    # imaplib sends LOGIN arguments as ASCII only; the store falls back to AUTHENTICATE PLAIN (UTF-8)
    address = "imapstore-utf8@binhduong.gov.vn"
    dovecot_old.add_user(address, "mật-khẩu-Bình-Dương")
    with open_imap(imap_config(dovecot_old, tmp_path, "mật-khẩu-Bình-Dương", login="user"), address) as store:
        assert [f.name for f in store.folders()] == ["INBOX"]


def test_master_login_without_admin_user_is_login_failed() -> None:
    config = MailServer("imap", url="imap://127.0.0.1:1", login="master")
    with pytest.raises(LoginFailed) as refused:
        open_imap(config, "a@hcm.gov.vn")
    assert str(refused.value) == 'imap://127.0.0.1:1: login = "master" needs admin_user, and none is configured'


def test_starttls_and_imaps_verify_the_server_with_ca_file(tmp_path: Path, free_port: Callable[[], int]) -> None:
    openssl = require_program("openssl", "openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run_checked([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                 "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], "openssl req")
    imaps_port = free_port()
    tls = (f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\nservice imap-login {{\n  inet_listener imaps {{\n"
           f"    address = 127.0.0.1\n    port = {imaps_port}\n    ssl = yes\n  }}\n}}\n")
    address = "imapstore-tls@hcm.gov.vn"
    with dovecot_with("tls", tls) as server:
        server.add_user(address, "mk-tls")
        starttls = replace(imap_config(server, tmp_path, server.master_password), starttls=True, ca_file=cert)
        with open_imap(starttls, address) as store:
            assert [f.name for f in store.folders()] == ["INBOX"]
        imaps = replace(starttls, url=f"imaps://127.0.0.1:{imaps_port}", starttls=False)
        with open_imap(imaps, address) as store:
            assert [f.name for f in store.folders()] == ["INBOX"]
        with pytest.raises(MailboxError) as untrusted:
            open_imap(replace(imaps, ca_file=None), address)  # the system CAs do not know this certificate
    assert str(untrusted.value) == f"imaps://127.0.0.1:{imaps_port}: TLS failed: self-signed certificate"
    assert type(untrusted.value) is MailboxError  # not ConnectionLost: a retry would not help


# ------------------------------------------------------------------------------------------------ folders


def test_vietnamese_folders_are_created_with_parents_and_listed_decoded(dovecot_new: DovecotServer,
                                                                         tmp_path: Path) -> None:
    address = "imapstore-folders@hcm.gov.vn"
    with open_as_master(dovecot_new, tmp_path, address) as store:
        store.create_folder(f"{VAN_BAN_DEN}/2024")
        store.create_folder(f"{VAN_BAN_DEN}/2024")  # exists: nothing happens
        store.create_folder("INBOX")
        assert sorted(store.folders(), key=lambda f: f.name) == [
            FolderInfo("INBOX", "/", None, True),
            FolderInfo(VAN_BAN_DEN, "/", None, True),  # created, not the \Noselect stub CREATE would leave
            FolderInfo(f"{VAN_BAN_DEN}/2024", "/", None, True),
        ]
        status = store.status(f"{VAN_BAN_DEN}/2024")
        assert (status.uidnext, status.highestmodseq, status.messages) == (1, 1, 0)
    with open_as_master(dovecot_new, tmp_path, address) as store:
        # a fresh session does not know them yet: the server answers that they exist
        store.create_folder(f"{VAN_BAN_DEN}/2024")
    maildir = dovecot_new.maildir_of(address)
    assert sorted(p.name for p in maildir.iterdir() if p.name.startswith(".V")) == [
        ".V&AQM-n b&HqM-n &AREevw-n", ".V&AQM-n b&HqM-n &AREevw-n.2024"]


def test_special_use_folders_are_reported(tmp_path: Path) -> None:
    with dovecot_with("special", LIMITS) as server, \
            open_as_master(server, tmp_path, "imapstore-su@hcm.gov.vn") as store:
        assert sorted(store.folders(), key=lambda f: f.name) == [
            FolderInfo("INBOX", "/", None, True),
            FolderInfo("Sent", "/", "\\Sent", True),
            FolderInfo("Thùng rác", "/", "\\Trash", True),
        ]


def test_missing_folder_is_mailbox_error_naming_server_mailbox_and_folder(dovecot_new: DovecotServer,
                                                                          tmp_path: Path) -> None:
    with open_as_master(dovecot_new, tmp_path, "imapstore-missing@hcm.gov.vn") as store:
        where = f"imap://127.0.0.1:{dovecot_new.imap_port} mailbox imapstore-missing@hcm.gov.vn, folder 'Lưu trữ'"
        with pytest.raises(MailboxError) as status_error:
            store.status("Lưu trữ")
        with pytest.raises(MailboxError) as list_error:
            store.list_messages("Lưu trữ")
        with pytest.raises(MailboxError) as append_error:
            store.append("Lưu trữ", [message(raw("x", "x-1"))])
        assert store.list_messages("INBOX") == []  # the store is still usable
    assert str(status_error.value) == f"{where}: cannot read the status: Mailbox doesn't exist: Lưu trữ."
    assert str(list_error.value) == f"{where}: cannot list the messages: Mailbox doesn't exist: Lưu trữ."
    assert str(append_error.value) == (f"{where}: the server refused the message: [TRYCREATE] Mailbox doesn't "
                                       "exist: Lưu trữ.")
    assert type(append_error.value) is MailboxError


# ------------------------------------------------------------------------------------------------ messages

WHEN_1 = datetime(2024, 3, 15, 8, 31, 5, tzinfo=ICT)
WHEN_2 = datetime(2023, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
WHEN_3 = datetime(2020, 2, 29, 7, 0, 0, tzinfo=timezone(timedelta(hours=-5)))
RAW_1 = raw("Công văn đến", "cv-1")
RAW_2 = raw("Thông báo", "tb-2", body="Kính gửi các đồng chí,\r\nĐề nghị phản hồi trước 20/3.")
RAW_3 = raw("Báo cáo", "bc-3", body="x" * 5000)


def test_append_list_fetch_round_trip_between_two_servers(dovecot_old: DovecotServer, dovecot_new: DovecotServer,
                                                          tmp_path: Path) -> None:
    address = "imapstore-copy@binhduong.gov.vn"
    folder = f"{VAN_BAN_DEN}/2024"
    with open_as_master(dovecot_old, tmp_path, address) as source:
        source.create_folder(folder)
        keys = source.append(folder, [message(RAW_1, ("\\Seen", "$Label1"), WHEN_1),
                                      message(RAW_2, ("\\Answered", "\\Flagged", "\\Draft"), WHEN_2),
                                      message(RAW_3, (), WHEN_3)])
        assert keys == ["1", "2", "3"]  # MULTIAPPEND with UIDPLUS: one [APPENDUID v 1:3]
        listed = source.list_messages(folder)
        assert listed == [info(1, RAW_1, ("\\Seen", "$Label1"), WHEN_1),
                          info(2, RAW_2, ("\\Answered", "\\Flagged", "\\Draft"), WHEN_2),
                          info(3, RAW_3, (), WHEN_3)]
        assert all(i.internal_date.utcoffset() is not None for i in listed)
        fetched = list(source.fetch(folder, ["3", "1", "2"]))
        assert [(m.info, m.raw) for m in fetched] == [(listed[2], RAW_3), (listed[0], RAW_1), (listed[1], RAW_2)]
        # BODY.PEEK: reading did not mark the unread message \Seen
        assert source.list_messages(folder)[2].flags == ()
    with open_as_master(dovecot_new, tmp_path, address.replace("binhduong", "hcm")) as target:
        target.create_folder(folder)
        assert target.append(folder, fetched) == ["1", "2", "3"]
        copied = list(target.fetch(folder, ["1", "2", "3"]))
    # appended in the order fetched: byte-identical, with the source's flags and INTERNALDATE
    assert [(m.info, m.raw) for m in copied] == [
        (info(1, RAW_3, (), WHEN_3), RAW_3),
        (info(2, RAW_1, ("\\Seen", "$Label1"), WHEN_1), RAW_1),
        (info(3, RAW_2, ("\\Answered", "\\Flagged", "\\Draft"), WHEN_2), RAW_2),
    ]


def test_fetch_yields_in_the_order_asked_and_leaves_out_unknown_keys(dovecot_old: DovecotServer,
                                                                     tmp_path: Path) -> None:
    with open_as_master(dovecot_old, tmp_path, "imapstore-order@binhduong.gov.vn") as store:
        assert store.append("INBOX", [message(RAW_1), message(RAW_2)]) == ["1", "2"]
        assert [(m.info.key, m.raw) for m in store.fetch("INBOX", ["2", "9", "1", "2"])] == [
            ("2", RAW_2), ("1", RAW_1), ("2", RAW_2)]
        assert list(store.fetch("INBOX", [])) == []
        with pytest.raises(MailboxError):
            list(store.fetch("INBOX", ["abc"]))


def test_fetch_in_small_batches_keeps_the_order(dovecot_old: DovecotServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imap_module, "FETCH_MESSAGES", 2)
    bodies = [raw(f"Số {n}", f"n-{n}") for n in range(1, 6)]
    with open_as_master(dovecot_old, tmp_path, "imapstore-batches@binhduong.gov.vn") as store:
        assert store.append("INBOX", [message(b) for b in bodies]) == ["1", "2", "3", "4", "5"]
        store.list_messages("INBOX")
        assert [m.raw for m in store.fetch("INBOX", ["5", "1", "4", "2", "3"])] == [
            bodies[4], bodies[0], bodies[3], bodies[1], bodies[2]]


def test_single_append_returns_the_uid_and_keeps_crlf_bytes(dovecot_old: DovecotServer, tmp_path: Path) -> None:
    # a bare CR inside a line is kept as it is: the message goes out as a literal, not through imaplib.append
    odd = b"Subject: odd\r\n\r\nline with a bare \r in it\r\n"
    with open_as_master(dovecot_old, tmp_path, "imapstore-single@binhduong.gov.vn") as store:
        assert store.append("INBOX", [message(odd, ("\\Seen",))]) == ["1"]
        assert [m.raw for m in store.fetch("INBOX", ["1"])] == [odd]
        assert store.append("INBOX", []) == []


def test_list_messages_after_uid_leaves_out_the_last_message_below_it(dovecot_old: DovecotServer,
                                                                        tmp_path: Path) -> None:
    with open_as_master(dovecot_old, tmp_path, "imapstore-after@binhduong.gov.vn") as store:
        store.append("INBOX", [message(RAW_1, (), WHEN_1), message(RAW_2, (), WHEN_2), message(RAW_3, (), WHEN_3)])
        assert [i.key for i in store.list_messages("INBOX", after_uid=1)] == ["2", "3"]
        assert store.list_messages("INBOX", after_uid=2) == [info(3, RAW_3, (), WHEN_3)]
        # "4:*" names the last message (UID 3) too; the store drops it
        assert store.list_messages("INBOX", after_uid=3) == []
        assert store.list_messages("INBOX", after_uid=100) == []


def test_messages_delivered_while_the_folder_is_selected_are_listed(dovecot_old: DovecotServer,
                                                                    tmp_path: Path) -> None:
    address = "imapstore-live@binhduong.gov.vn"
    with open_as_master(dovecot_old, tmp_path, address) as reader:
        reader.append("INBOX", [message(RAW_1)])
        assert [i.key for i in reader.list_messages("INBOX")] == ["1"]
        with open_as_master(dovecot_old, tmp_path, address) as writer:
            assert writer.append("INBOX", [message(RAW_2)]) == ["2"]
        assert [i.key for i in reader.list_messages("INBOX")] == ["1", "2"]
        assert [m.raw for m in reader.fetch("INBOX", ["2"])] == [RAW_2]
        assert reader.status("INBOX").messages == 2


def test_status_counts_messages_and_moves_uidnext_and_modseq(dovecot_old: DovecotServer, tmp_path: Path) -> None:
    with open_as_master(dovecot_old, tmp_path, "imapstore-status@binhduong.gov.vn") as store:
        before = store.status("INBOX")
        store.append("INBOX", [message(RAW_1), message(RAW_2)])
        after = store.status("INBOX")
        assert after == FolderStatus(before.uidvalidity, 3, after.highestmodseq, 2)
        assert after.highestmodseq is not None and before.highestmodseq is not None
        assert after.highestmodseq > before.highestmodseq
        store.list_messages("INBOX")  # selected now: status selects it again instead of STATUS
        assert store.status("INBOX") == after


def test_set_flags_replaces_flags_and_changed_since_reports_it(dovecot_old: DovecotServer, tmp_path: Path) -> None:
    with open_as_master(dovecot_old, tmp_path, "imapstore-flags@binhduong.gov.vn") as store:
        store.append("INBOX", [message(RAW_1, ("\\Seen", "$Label1"), WHEN_1), message(RAW_2, ("\\Flagged",), WHEN_2)])
        modseq = store.status("INBOX").highestmodseq
        assert modseq is not None
        assert store.changed_since("INBOX", modseq) == {}
        store.set_flags("INBOX", "2", ["\\Answered", "$Label2", "\\Recent"])
        assert store.changed_since("INBOX", modseq) == {"2": ("\\Answered", "$Label2")}
        store.set_flags("INBOX", "1", [])
        assert store.list_messages("INBOX") == [info(1, RAW_1, (), WHEN_1),
                                                info(2, RAW_2, ("\\Answered", "$Label2"), WHEN_2)]
        assert store.changed_since("INBOX", modseq) == {"1": (), "2": ("\\Answered", "$Label2")}
        latest = store.status("INBOX").highestmodseq
        assert latest is not None and store.changed_since("INBOX", latest) == {}


# ------------------------------------------------------------------------------------------------ refusals


def test_too_large_message_is_refused_and_a_full_mailbox_is_quota_exceeded(tmp_path: Path) -> None:
    small = raw("nhỏ", "s-1", body="x" * 1000)
    big = raw("lớn", "b-1", body="x" * 2500)
    with dovecot_with("quota", LIMITS) as server, open_as_master(server, tmp_path, "imapstore-q@hcm.gov.vn") as store:
        where = f"imap://127.0.0.1:{server.imap_port} mailbox imapstore-q@hcm.gov.vn, folder 'INBOX'"
        with pytest.raises(MessageRefused) as refused:
            store.append("INBOX", [message(small), message(big)])
        # MULTIAPPEND is all or nothing: the small one did not land either
        assert str(refused.value) == (f"{where}: the server refused 2 messages: [LIMIT] Mail size is larger than "
                                      "the maximum size allowed by server configuration.")
        assert store.status("INBOX").messages == 0
        with pytest.raises(MessageRefused):
            store.append("INBOX", [message(big)])
        assert store.append("INBOX", [message(small)] * 3) == ["1", "2", "3"]
        with pytest.raises(QuotaExceeded) as full:
            store.append("INBOX", [message(small)])
        assert str(full.value) == (f"{where}: the server refused the message: [OVERQUOTA] Quota exceeded "
                                   "(mailbox for user is full).")


def test_without_multiappend_a_refused_message_takes_back_the_batch(tmp_path: Path) -> None:
    small = raw("nhỏ", "s-1", body="x" * 100)
    big = raw("lớn", "b-1", body="x" * 2500)
    with dovecot_with("plain", PLAIN_APPEND + LIMITS) as server, \
            open_as_master(server, tmp_path, "imapstore-p@hcm.gov.vn") as store:
        # no LITERAL+: Dovecot says NO instead of "+" for the literal of the large message
        with pytest.raises(MessageRefused) as refused:
            store.append("INBOX", [message(small), message(big)])
        assert "[LIMIT] Mail size is larger than the maximum size allowed" in str(refused.value)
        # the small one had landed as UID 1: it was expunged, so a retry does not copy it twice
        assert store.list_messages("INBOX") == []
        assert store.append("INBOX", [message(small, ("\\Seen",), WHEN_1), message(small, (), WHEN_2)]) == ["2", "3"]
        assert store.list_messages("INBOX") == [info(2, small, ("\\Seen",), WHEN_1), info(3, small, (), WHEN_2)]


def test_appendlimit_is_read_and_larger_messages_are_refused_before_sending(tmp_path: Path) -> None:
    with dovecot_with("limit", "imap_capability = +APPENDLIMIT=2000\n") as server, \
            open_as_master(server, tmp_path, "imapstore-l@hcm.gov.vn") as store:
        assert store.append_limit() == 2000
        big = raw("lớn", "b-1", body="x" * 2500)
        with pytest.raises(MessageRefused) as refused:
            store.append("INBOX", [message(raw("nhỏ", "s-1")), message(big, key="7")])
        assert str(refused.value) == (f"imap://127.0.0.1:{server.imap_port} mailbox imapstore-l@hcm.gov.vn, folder "
                                      f"'INBOX': message 7 of {len(big)} bytes is larger than the server's "
                                      "APPENDLIMIT (2000 bytes)")
        assert store.status("INBOX").messages == 0


# ------------------------------------------------------------------------------------------------ helpers


def test_uid_sets_are_written_compactly_and_read_in_order() -> None:
    assert _uid_set([7, 1, 2, 3, 9, 10, 3]) == "1:3,7,9:10"
    assert _expand_uid_set("5:7") == [5, 6, 7]
    assert _expand_uid_set("5,6,9") == [5, 6, 9]
    assert _expand_uid_set("9:8,3") == [8, 9, 3]


def test_xlist_flags_give_special_use_and_the_inbox() -> None:
    assert _folder_info((b"\\HasNoChildren", b"\\Spam"), b"/", "[Gmail]/Spam") == \
        FolderInfo("[Gmail]/Spam", "/", "\\Junk", True)
    assert _folder_info((b"\\HasNoChildren", b"\\Inbox"), b"/", "Hộp thư đến") == \
        FolderInfo("INBOX", "/", None, True)
    assert _folder_info((b"\\Noselect", b"\\HasChildren"), None, "[Gmail]") == FolderInfo("[Gmail]", None, None, False)
    assert _folder_info((b"\\HasNoChildren", b"\\SENT"), b".", 2024) == FolderInfo("2024", ".", "\\Sent", True)
