"""The copy engine against two real Dovecots: multiset copies, evidence, resume, faults, verification."""

import datetime as dt
import email.utils
import itertools
import time
from pathlib import Path

import imapclient
import pytest

from servers import DovecotServer

from mailmerge_gov.config import MailServer, Secret
from mailmerge_gov.migration.folders import FolderRules
from mailmerge_gov.migration.imap import open_imap
from mailmerge_gov.migration.protocol import LoginFailed
from mailmerge_gov.migration.sync import MailboxJob, migrate_mailbox, verify_mailbox
from mailmerge_gov.store import open_store

_numbers = itertools.count(1)


def imap_server(dovecot: DovecotServer, tmp_path: Path) -> MailServer:
    """The MailServer of a Dovecot fixture, logging in through its master user."""
    secret = tmp_path / f"{dovecot.name}-master.pw"
    secret.write_text(dovecot.master_password + "\n", encoding="utf-8")
    return MailServer(kind="imap", url=f"imap://127.0.0.1:{dovecot.imap_port}", admin_user=dovecot.master_user,
                      password=Secret(file=secret), login="master", timeout=10.0)


def message(subject: str, body: str = "Nội dung thư.", message_id: bool = True) -> bytes:
    """A small raw message with a Vietnamese subject (RFC 2047) and body (8bit)."""
    headers = [f"From: Văn thư <vanthu@binhduong.gov.vn>".encode(), b"To: an@binhduong.gov.vn",
               f"Subject: =?utf-8?b?{__import__('base64').b64encode(subject.encode()).decode()}?=".encode(),
               b"Date: Mon, 03 Feb 2025 09:15:00 +0700", b"MIME-Version: 1.0",
               b"Content-Type: text/plain; charset=utf-8", b"Content-Transfer-Encoding: 8bit"]
    if message_id:
        headers.insert(0, f"Message-ID: <{next(_numbers)}.{subject.encode().hex()[:12]}@binhduong.gov.vn>".encode())
    return b"\r\n".join(headers) + b"\r\n\r\n" + body.encode() + b"\r\n"


def contents(dovecot: DovecotServer, address: str) -> dict[str, list[tuple[bytes, tuple[bytes, ...], dt.datetime]]]:
    """Every folder of a mailbox: its messages' raw bytes, flags and INTERNALDATE, sorted."""
    out = {}
    with imapclient.IMAPClient("127.0.0.1", port=dovecot.imap_port, ssl=False) as client:
        client.login(dovecot.master_login(address), dovecot.master_password)
        for flags, _, name in client.list_folders():
            if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                out[name] = []  # a parent that only holds folders (the copy makes it a real, empty folder)
                continue
            client.select_folder(name, readonly=True)
            ids = client.search()
            data = client.fetch(ids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]) if ids else {}
            out[name] = sorted((d[b"BODY[]"], tuple(sorted(f for f in d[b"FLAGS"] if f != b"\\Recent")),
                                d[b"INTERNALDATE"]) for d in data.values())
    return out


@pytest.fixture
def mailboxes(dovecot_old, dovecot_new, tmp_path):
    """A source mailbox on the old Dovecot, an empty target on the new one, openers and a state store."""
    number = next(_numbers)
    source, target = f"an{number}@binhduong.gov.vn", f"an.nguyen{number}@hcm.gov.vn"
    twin = message("Giấy mời họp")
    dovecot_old.fill(source, {
        "INBOX": [(twin, ("\\Seen",)), (twin, ("\\Seen",)), (message("Không Message-ID", message_id=False), ()),
                  (message("Khẩn"), ("\\Flagged", "$Label1"))],
        "Văn bản đến/2024": [(message("Công văn 12/UBND"), ("\\Seen", "\\Answered"))],
        "Sent": [(message("Trả lời"), ("\\Seen",))],
    })
    dovecot_new.add_user(target, "pw")
    old, new = imap_server(dovecot_old, tmp_path), imap_server(dovecot_new, tmp_path)
    store = open_store(tmp_path / "state.sqlite")
    job = MailboxJob("binhduong", source, target)
    yield job, (lambda: open_imap(old, source)), (lambda: open_imap(new, target)), store
    store.close()


def test_a_mailbox_is_copied_byte_for_byte_with_flags_dates_and_twins(mailboxes, dovecot_old, dovecot_new) -> None:
    job, source, target, store = mailboxes
    outcome = migrate_mailbox(job, source, target, store)
    assert (outcome.status, outcome.error, outcome.copied, outcome.skipped) == ("ok", None, 6, 0)
    assert contents(dovecot_new, job.target_mailbox) == contents(dovecot_old, job.mailbox)
    evidence = store.message_evidence(job.source, job.mailbox)
    assert sorted((e.folder, e.state, e.target_folder) for e in evidence) == [
        ("INBOX", "copied", "INBOX")] * 4 + [("Sent", "copied", "Sent"), ("Văn bản đến/2024", "copied", "Văn bản đến/2024")]
    assert all(e.target_key and len(e.sha256) == 64 for e in evidence)
    check = verify_mailbox(job, source, target, store)
    assert check.ok and sum(f.expected for f in check.folders) == 6


def test_a_second_pass_copies_nothing_and_syncs_flags(mailboxes, dovecot_old, dovecot_new) -> None:
    job, source, target, store = mailboxes
    migrate_mailbox(job, source, target, store)
    with imapclient.IMAPClient("127.0.0.1", port=dovecot_old.imap_port, ssl=False) as client:
        client.login(dovecot_old.master_login(job.mailbox), dovecot_old.master_password)
        client.select_folder("Văn bản đến/2024")
        client.add_flags(client.search(), ["\\Flagged"])
        client.select_folder("INBOX")
        client.append("INBOX", message("Thư mới đến"))
    again = migrate_mailbox(job, source, target, store)
    assert (again.copied, sum(f.flags_synced for f in again.folders)) == (1, 1)
    assert contents(dovecot_new, job.target_mailbox) == contents(dovecot_old, job.mailbox)
    assert migrate_mailbox(job, source, target, store).copied == 0


def test_the_target_restarting_mid_run_loses_and_doubles_nothing(mailboxes, dovecot_old, dovecot_new) -> None:
    job, source, target, store = mailboxes
    restarted = []

    def restart_once(job_, folder, done, total) -> None:
        if not restarted:
            restarted.append(folder)
            dovecot_new.restart()  # every connection to the target drops here

    outcome = migrate_mailbox(job, source, target, store, progress=restart_once, pauses=(0.1,))
    assert restarted and outcome.status == "ok"
    assert contents(dovecot_new, job.target_mailbox) == contents(dovecot_old, job.mailbox)
    assert verify_mailbox(job, source, target, store).ok


def test_an_append_that_landed_before_a_kill_is_not_copied_again(mailboxes, dovecot_old, dovecot_new) -> None:
    job, source, target, store = mailboxes
    migrate_mailbox(job, source, target, store)
    # What a kill -9 between the append and its evidence leaves: rows still 'appending', the messages in the target.
    rows = store.message_evidence(job.source, job.mailbox, "INBOX")
    store.record_messages([type(rows[0])(**{**r.__dict__, "state": "appending", "target_key": None}) for r in rows])
    store.save_checkpoint(type(store.folder_checkpoint(job.source, job.mailbox, "INBOX"))(
        job.source, job.mailbox, "INBOX", job.target_mailbox, "INBOX", rows[0].uidvalidity, 0, None))
    again = migrate_mailbox(job, source, target, store)
    assert (again.status, again.copied) == ("ok", 0)
    assert contents(dovecot_new, job.target_mailbox) == contents(dovecot_old, job.mailbox)
    assert {e.state for e in store.message_evidence(job.source, job.mailbox)} == {"copied"}


def test_a_wrong_password_fails_that_mailbox_with_a_clear_reason(mailboxes, dovecot_old, tmp_path) -> None:
    job, _, target, store = mailboxes
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password\n")
    server = MailServer(kind="imap", url=f"imap://127.0.0.1:{dovecot_old.imap_port}", admin_user="admin",
                        password=Secret(file=wrong), login="master")
    outcome = migrate_mailbox(job, lambda: open_imap(server, job.mailbox), target, store)
    assert outcome.status == "failed"
    assert job.mailbox in outcome.error and "not-the-password" not in outcome.error
    assert store.mailbox_results()[0].status == "failed"


def test_an_over_quota_target_fails_the_mailbox_and_the_next_run_finishes_it(dovecot_old, tmp_path) -> None:
    quota = DovecotServer("quota", quota=True)
    quota.start()
    try:
        source, target = "quota.src@binhduong.gov.vn", "quota.dst@hcm.gov.vn"
        dovecot_old.fill(source, {"INBOX": [(message(f"Thư {i}", "x" * 3000), ()) for i in range(8)]})
        quota.quotas[target] = "10K"
        quota.add_user(target, "pw")
        old, new = imap_server(dovecot_old, tmp_path), imap_server(quota, tmp_path)
        job = MailboxJob("binhduong", source, target)
        with open_store(tmp_path / "state.sqlite") as store:
            opener = (lambda: open_imap(old, source)), (lambda: open_imap(new, target))
            outcome = migrate_mailbox(job, *opener, store)
            assert outcome.status == "failed" and "quota" in outcome.error.lower()
            quota.set_quota(target, "1M")
            assert migrate_mailbox(job, *opener, store).status == "ok"
            assert verify_mailbox(job, *opener, store).ok
            assert len(contents(quota, target)["INBOX"]) == 8
    finally:
        quota.stop()


def test_a_message_over_the_size_limit_is_skipped_and_listed(dovecot_old, tmp_path) -> None:
    small = DovecotServer("limit", max_mail_size="20k")
    small.start()
    try:
        source, target = "big.src@binhduong.gov.vn", "big.dst@hcm.gov.vn"
        dovecot_old.fill(source, {"INBOX": [(message("Nhỏ"), ()), (message("Lớn", "y" * 40000), ())]})
        small.add_user(target, "pw")
        old, new = imap_server(dovecot_old, tmp_path), imap_server(small, tmp_path)
        job = MailboxJob("binhduong", source, target)
        with open_store(tmp_path / "state.sqlite") as store:
            opener = (lambda: open_imap(old, source)), (lambda: open_imap(new, target))
            outcome = migrate_mailbox(job, *opener, store)
            assert (outcome.status, outcome.copied, outcome.skipped) == ("ok", 1, 1)
            [skip] = [e for e in store.message_evidence(job.source, source) if e.state == "skipped"]
            assert skip.reason.startswith("refused by the target: ") and skip.size > 40000
            check = verify_mailbox(job, *opener, store)
            assert check.ok and [s[2] for f in check.folders for s in f.skipped] == [skip.reason]
    finally:
        small.stop()


def test_folders_go_under_a_subtree(mailboxes, dovecot_new) -> None:
    job, source, target, store = mailboxes
    migrate_mailbox(job, source, target, store, FolderRules(prefix="Lưu trữ/Bình Dương"))
    assert sorted(contents(dovecot_new, job.target_mailbox)) == [
        "INBOX", "Lưu trữ", "Lưu trữ/Bình Dương", "Lưu trữ/Bình Dương/Sent", "Lưu trữ/Bình Dương/Văn bản đến",
        "Lưu trữ/Bình Dương/Văn bản đến/2024"]


def test_verify_finds_a_message_deleted_from_the_target(mailboxes, dovecot_new) -> None:
    job, source, target, store = mailboxes
    migrate_mailbox(job, source, target, store)
    with imapclient.IMAPClient("127.0.0.1", port=dovecot_new.imap_port, ssl=False) as client:
        client.login(dovecot_new.master_login(job.target_mailbox), dovecot_new.master_password)
        client.select_folder("Sent")
        client.delete_messages(client.search())
        client.expunge()
    check = verify_mailbox(job, source, target, store)
    assert not check.ok
    assert [(f.target_folder, [m[0] for m in f.missing]) for f in check.folders if f.missing] == [("Sent", ["Sent"])]


@pytest.mark.parametrize(("content", "mode", "error"), [
    ("mailbox,password\n{mailbox},pw\n", 0o600, None),
    ("mailbox,password\n{mailbox},pw\n", 0o644, "can be read by others (mode 644): chmod 600 it"),
    ("mailbox,password\nother@binhduong.gov.vn,pw\n", 0o600, "has no password for {mailbox}"),
])
def test_login_as_the_user_with_a_credentials_file(mailboxes, dovecot_old, tmp_path, content, mode, error) -> None:
    job, _, _, _ = mailboxes
    credentials = tmp_path / "credentials.csv"
    credentials.write_text(content.format(mailbox=job.mailbox), encoding="utf-8")
    credentials.chmod(mode)
    server = MailServer(kind="imap", url=f"imap://127.0.0.1:{dovecot_old.imap_port}", login="user",
                        credentials_file=credentials)
    if error is None:
        with open_imap(server, job.mailbox) as store:
            assert "INBOX" in [f.name for f in store.folders()]
    else:
        with pytest.raises(LoginFailed) as caught:
            open_imap(server, job.mailbox)
        assert str(caught.value) == (f"imap://127.0.0.1:{dovecot_old.imap_port}: cannot log in for {job.mailbox}: "
                                     f"credentials file {credentials} " + error.format(mailbox=job.mailbox))


def test_a_folder_reset_is_matched_by_content_and_its_flag_changes_follow(example_dir, tmp_path) -> None:
    import shutil

    from mailmerge_gov.migration.maildir import open_maildir

    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(example_dir / "sources" / "hcm" / "mail" / "annv@hcm.gov.vn", old / "annv@hcm.gov.vn")
    job = MailboxJob("hcm", "annv@hcm.gov.vn", "annv@hcm.gov.vn")
    source, target = (lambda: open_maildir(old, job.mailbox)), (lambda: open_maildir(new, job.target_mailbox, True))
    with open_store(tmp_path / "state.sqlite") as store:
        assert migrate_mailbox(job, source, target, store).copied == 23
        trash = old / job.mailbox / ".Trash"
        [first] = sorted((trash / "cur").iterdir())[:1]
        first.rename(first.with_name(first.name.split(":2,")[0] + ":2,FS"))
        shutil.copytree(trash, tmp_path / "moved")  # the folder is rebuilt: a new UIDVALIDITY
        shutil.rmtree(trash)
        (tmp_path / "moved").rename(trash)
        again = migrate_mailbox(job, source, target, store)
        assert (again.status, again.copied) == ("ok", 0)
        flags = sorted(info.flags for info in target().list_messages("Trash"))
        assert flags == sorted(info.flags for info in source().list_messages("Trash"))
        assert ("\\Seen", "\\Flagged") in flags
        assert verify_mailbox(job, source, target, store).ok


def test_the_source_restarting_mid_folder_loses_and_doubles_nothing(mailboxes, dovecot_old, dovecot_new) -> None:
    job, source, target, store = mailboxes
    restarted = []

    def restart_once(job_, folder, done, total) -> None:
        if not restarted:
            restarted.append(folder)
            dovecot_old.restart()  # the source connection (and the prefetch on it) drops here

    outcome = migrate_mailbox(job, source, target, store, progress=restart_once, pauses=(0.1,))
    assert restarted and (outcome.status, outcome.error) == ("ok", None)
    assert contents(dovecot_new, job.target_mailbox) == contents(dovecot_old, job.mailbox)
    assert verify_mailbox(job, source, target, store).ok


def test_an_unknown_mailbox_fails_at_once_with_a_clear_reason(dovecot_old, dovecot_new, tmp_path) -> None:
    old, new = imap_server(dovecot_old, tmp_path), imap_server(dovecot_new, tmp_path)
    job = MailboxJob("binhduong", "nobody@binhduong.gov.vn", "unknown.source@hcm.gov.vn")
    dovecot_new.add_user(job.target_mailbox, "pw")
    with open_store(tmp_path / "state.sqlite") as store:
        began = time.monotonic()
        outcome = migrate_mailbox(job, lambda: open_imap(old, job.mailbox), lambda: open_imap(new, job.target_mailbox),
                                  store, pauses=(30.0,))
        assert time.monotonic() - began < 10  # a refused login is not retried (a retry would wait 30 s)
    assert outcome.status == "failed"
    assert outcome.error == (f"imap://127.0.0.1:{dovecot_old.imap_port}: login for nobody@binhduong.gov.vn as "
                             "nobody@binhduong.gov.vn*admin failed: [AUTHORIZATIONFAILED] Authorization failed")
