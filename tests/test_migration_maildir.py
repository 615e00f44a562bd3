"""Maildir++ and mbox stores: the example Maildirs, temporary Maildirs and mbox files, and a real Dovecot."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from imapclient import IMAPClient, imap_utf7

from mailmerge_gov.migration.maildir import (
    MaildirStore,
    decode_mutf7,
    encode_mutf7,
    folder_dir_name,
    open_maildir,
)
from mailmerge_gov.migration.mbox import open_mbox
from mailmerge_gov.migration.protocol import FolderInfo, MailboxError, Message, MessageInfo
from servers import DovecotServer

UTC = timezone.utc
ICT = timezone(timedelta(hours=7))
BOX = "tqquang@baria-vungtau.gov.vn"
VAN_BAN_DEN = ".V&AQM-n b&HqM-n &AREevw-n"  # "Văn bản đến" on disk


@pytest.fixture
def example(example_dir: Path, tmp_path: Path) -> MaildirStore:
    """A private copy of one example Maildir as a git checkout has it: without empty directories."""
    copy = tmp_path / "mail" / BOX
    shutil.copytree(example_dir / "sources" / "baria-vungtau" / "mail" / BOX, copy)
    for dirpath, _dirs, files in sorted(os.walk(copy), reverse=True):  # children before parents
        if not files and not os.listdir(dirpath):
            os.rmdir(dirpath)
    return open_maildir(tmp_path / "mail", BOX)


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    """A new, empty Maildir."""
    return open_maildir(tmp_path / "out" / "mail", "annv@hcm.gov.vn", create=True)


def message(body: str, flags: tuple[str, ...] = (), when: datetime = datetime(2024, 3, 5, 9, 30, tzinfo=ICT),
            crlf: bool = False) -> Message:
    """Return a small message to append, with its flags and date."""
    text = f"From: Văn thư <vanthu@binhduong.gov.vn>\nSubject: {body}\n\n{body}\n"
    raw = (text.replace("\n", "\r\n") if crlf else text).encode()
    return Message(MessageInfo(key="", uid=None, size=len(raw), flags=flags, internal_date=when), raw)


# --- the example Maildirs --------------------------------------------------------------------


def test_example_folders_are_decoded_from_modified_utf7(example: MaildirStore) -> None:
    assert example.folders() == [
        FolderInfo("INBOX", "/"),
        FolderInfo("Drafts", "/"),
        FolderInfo("Dự án & Đầu tư", "/"),
        FolderInfo("Sent", "/"),
        FolderInfo("Trash", "/"),
        FolderInfo("Văn bản đi", "/"),
        FolderInfo("Văn bản đến", "/"),
        FolderInfo("Văn bản đến/2024", "/"),
        FolderInfo("Văn bản đến/2025", "/"),
    ]
    assert example.separator == "/"


def test_example_flags_keys_and_sizes(example: MaildirStore) -> None:
    assert [(m.key, m.size, m.flags) for m in example.list_messages("Văn bản đến/2024")] == [
        ("1707026538.M866355P33528.example,S=1540", 1540, ("\\Seen", "\\Answered", "\\Flagged")),
        ("1726051456.M178101P33528.example,S=1484", 1484, ("\\Seen",)),
    ]
    # P ("passed") reads as $Forwarded
    assert example.list_messages("Văn bản đến")[0].flags == ("\\Seen", "$Forwarded")
    assert [m.flags for m in example.list_messages("Drafts")] == [("\\Seen", "\\Draft")]
    assert all(m.uid is None and m.internal_date.tzinfo is UTC for m in example.list_messages("INBOX"))


def test_example_message_in_new_counts_without_flags(example: MaildirStore) -> None:
    inbox = {m.key: m for m in example.list_messages("INBOX")}
    assert len(inbox) == 17
    assert example.status("INBOX").messages == 17
    assert inbox["1743743832.M122510P33528.example,S=2329"].flags == ()
    assert inbox["1743743832.M122510P33528.example,S=2329"].size == 2329


def test_example_fetch_gives_the_bytes_on_disk_in_the_order_asked(example: MaildirStore) -> None:
    keys = ["1726051456.M178101P33528.example,S=1484", "1707026538.M866355P33528.example,S=1540"]
    fetched = list(example.fetch("Văn bản đến/2024", keys))
    assert [m.info.key for m in fetched] == keys
    on_disk = example.path / f"{VAN_BAN_DEN}.2024" / "cur"
    assert fetched[0].raw == (on_disk / f"{keys[0]}:2,S").read_bytes()
    assert fetched[1].raw == (on_disk / f"{keys[1]}:2,FRS").read_bytes()
    assert len(fetched[1].raw) == fetched[1].info.size


def test_missing_cur_new_tmp_are_empty(example: MaildirStore) -> None:
    # the fixture is a git checkout: no empty cur/, new/ or tmp/
    assert sorted(p.name for p in (example.path / f"{VAN_BAN_DEN}.2025").iterdir()) == ["maildirfolder"]
    assert not (example.path / "tmp").exists()
    shutil.rmtree(example.path / "new")
    assert example.list_messages("Văn bản đến/2025") == []
    assert example.status("Văn bản đến/2025").messages == 0
    assert len(example.list_messages("INBOX")) == 16
    assert list(example.fetch("Văn bản đến/2025", ["nothing"])) == []


def test_status_has_no_uidnext_nor_modseq(example: MaildirStore) -> None:
    status = example.status("Sent")
    assert (status.uidnext, status.highestmodseq, status.messages) == (None, None, 3)
    assert 0 < status.uidvalidity < 2**32


def test_uidvalidity_survives_new_mail_and_dovecot_files_but_not_a_new_folder(example: MaildirStore) -> None:
    before = example.status("Sent").uidvalidity
    example.append("Sent", [message("Báo cáo")])
    (example.path / ".Sent" / "dovecot-uidlist").write_text("3 V1700000000 N5\n")
    assert example.status("Sent").uidvalidity == before
    # the folder replaced by another one (the old one still exists, so its inode is not reused)
    (example.path / ".Sent").rename(example.path / "old-sent")
    example.create_folder("Sent")
    assert example.status("Sent").uidvalidity != before


def test_unknown_folder_is_named_in_the_error(example: MaildirStore) -> None:
    with pytest.raises(MailboxError, match="folder 'Hộp thư cũ' does not exist"):
        example.status("Hộp thư cũ")
    with pytest.raises(MailboxError, match="Hộp thư cũ"):
        example.list_messages("Hộp thư cũ")
    with pytest.raises(MailboxError, match="Hộp thư cũ"):
        example.append("Hộp thư cũ", [message("x")])


# --- opening ------------------------------------------------------------------------------------


def test_open_maildir_names_the_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MailboxError, match=f"Maildir {tmp_path / 'nobody@hcm.gov.vn'} does not exist"):
        open_maildir(tmp_path, "nobody@hcm.gov.vn")
    with pytest.raises(MailboxError, match="not a usable mailbox name"):
        open_maildir(tmp_path, "../etc")


def test_open_maildir_create_makes_an_empty_inbox(store: MaildirStore) -> None:
    assert sorted(p.name for p in store.path.iterdir()) == ["cur", "new", "tmp"]
    assert store.folders() == [FolderInfo("INBOX", "/")]
    assert store.list_messages("inbox") == []
    assert (store.append_limit(), store.changed_since("INBOX", 5), store.close()) == (None, {}, None)


# --- folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Văn bản đến", "Dự án & Đầu tư", "Thư đã gửi", "a&b", "日本語", "😀 vui"])
def test_modified_utf7_agrees_with_imapclient(name: str) -> None:
    assert encode_mutf7(name) == imap_utf7.encode(name).decode("ascii")
    assert decode_mutf7(encode_mutf7(name)) == name


def test_create_folder_makes_parents_with_maildirfolder(store: MaildirStore) -> None:
    store.create_folder("Văn bản đến/2024/Quý 1")
    store.create_folder("Văn bản đến/2024/Quý 1")  # exists: nothing happens
    for name in (VAN_BAN_DEN, f"{VAN_BAN_DEN}.2024", f"{VAN_BAN_DEN}.2024.Qu&AP0- 1"):
        assert sorted(p.name for p in (store.path / name).iterdir()) == ["cur", "maildirfolder", "new", "tmp"]
    assert [f.name for f in store.folders()] == ["INBOX", "Văn bản đến", "Văn bản đến/2024", "Văn bản đến/2024/Quý 1"]


def test_a_parent_without_a_directory_is_listed_not_selectable(store: MaildirStore) -> None:
    (store.path / f"{VAN_BAN_DEN}.2024" / "cur").mkdir(parents=True)
    assert store.folders() == [
        FolderInfo("INBOX", "/"),
        FolderInfo("Văn bản đến", "/", None, selectable=False),
        FolderInfo("Văn bản đến/2024", "/"),
    ]


def test_a_dot_in_a_folder_name_is_stored_as_one_dot_leader_and_reads_back(store: MaildirStore) -> None:
    store.create_folder("V.v. tuyển dụng/2024")
    assert folder_dir_name("V.v. tuyển dụng") == ".V&ICQ-v&ICQ- tuy&HsM-n d&HuU-ng"
    assert (store.path / ".V&ICQ-v&ICQ- tuy&HsM-n d&HuU-ng.2024" / "cur").is_dir()
    assert [f.name for f in store.folders()] == ["INBOX", "V.v. tuyển dụng", "V.v. tuyển dụng/2024"]
    store.append("V.v. tuyển dụng/2024", [message("Thông báo")])
    assert store.status("V.v. tuyển dụng/2024").messages == 1


def test_an_empty_level_in_a_folder_name_is_refused(store: MaildirStore) -> None:
    with pytest.raises(MailboxError, match="not a usable folder name: 'a//b'"):
        store.create_folder("a//b")


def test_a_folder_under_inbox_has_the_root_as_parent(store: MaildirStore) -> None:
    store.create_folder("INBOX/Dự án")
    assert not (store.path / ".INBOX").exists()
    assert [f.name for f in store.folders()] == ["INBOX", "INBOX/Dự án"]


# --- writing ------------------------------------------------------------------------------------


def test_append_list_fetch_round_trip(store: MaildirStore) -> None:
    store.create_folder("Văn bản đến/2024")
    sent = [
        message("Giấy mời họp", ("\\Seen", "\\Flagged", "$Forwarded")),
        message("Công văn 12", ("\\Answered", "\\Recent"), datetime(2024, 1, 2, 8, 0, 0, 123456, tzinfo=ICT), crlf=True),
    ]
    keys = store.append("Văn bản đến/2024", sent)
    listed = store.list_messages("Văn bản đến/2024")
    assert sorted(keys) == [m.key for m in listed]
    by_key = {m.key: m for m in listed}
    for key, original in zip(keys, sent):
        assert key is not None and key.endswith(f",S={len(original.raw)}")
        info = by_key[key]
        assert info.internal_date == original.info.internal_date and info.internal_date.tzinfo is UTC
        assert info.size == len(original.raw)
    assert by_key[keys[0]].flags == ("\\Seen", "\\Flagged", "$Forwarded")
    assert by_key[keys[1]].flags == ("\\Answered",)  # \Recent is never stored
    assert [m.raw for m in store.fetch("Văn bản đến/2024", keys)] == [m.raw for m in sent]
    folder = store.path / f"{VAN_BAN_DEN}.2024"
    assert sorted(p.name for p in (folder / "cur").iterdir()) == sorted([f"{keys[0]}:2,FSa", f"{keys[1]}:2,R"])
    assert (folder / "dovecot-keywords").read_text() == "0 $Forwarded\n"
    assert list((folder / "tmp").iterdir()) == []


def test_append_names_are_unique_for_identical_messages(store: MaildirStore) -> None:
    same = message("Trùng lặp", ("\\Seen",))
    keys = store.append("INBOX", [same, same, same])
    assert len(set(keys)) == 3
    assert [m.raw for m in store.fetch("INBOX", keys)] == [same.raw] * 3


def test_append_reuses_known_keywords_case_insensitively(store: MaildirStore) -> None:
    (store.path / "dovecot-keywords").write_text("0 $Forwarded\n1 Junk\n")
    (key,) = store.append("INBOX", [message("Quảng cáo", ("junk", "$label1"))])
    assert (store.path / "dovecot-keywords").read_text() == "0 $Forwarded\n1 Junk\n2 $label1\n"
    assert list((store.path / "cur").iterdir())[0].name == f"{key}:2,bc"
    assert store.list_messages("INBOX")[0].flags == ("$label1", "Junk")


def test_two_writers_on_one_folder_keep_keyword_letters_apart(store: MaildirStore) -> None:
    # an official with mailboxes in two old units: two jobs append to one target mailbox at once
    def write(label: str) -> list[str | None]:
        other = open_maildir(store.path.parent, store.path.name)
        return [key for i in range(10) for key in other.append("INBOX", [message(f"{label} {i}", (f"{label}{i}",))])]

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(write, ["$a", "$b"]))
    flags = {m.key: m.flags for m in store.list_messages("INBOX")}
    assert [flags[key] for key in done[0]] == [(f"$a{i}",) for i in range(10)]
    assert [flags[key] for key in done[1]] == [(f"$b{i}",) for i in range(10)]


def test_append_creates_missing_cur_and_tmp(example: MaildirStore) -> None:
    (key,) = example.append("Văn bản đến/2025", [message("Thư mới")])
    assert [m.key for m in example.list_messages("Văn bản đến/2025")] == [key]
    assert sorted(p.name for p in (example.path / f"{VAN_BAN_DEN}.2025").iterdir()) == [
        "cur", "maildirfolder", "new", "tmp"]


def test_set_flags_renames_and_moves_new_to_cur(example: MaildirStore) -> None:
    key = "1743743832.M122510P33528.example,S=2329"
    before = os.stat(example.path / "new" / key).st_mtime_ns
    example.set_flags("INBOX", key, ["\\Seen", "\\Answered", "$Forwarded"])
    assert not (example.path / "new" / key).exists()
    assert os.stat(example.path / "cur" / f"{key}:2,RSa").st_mtime_ns == before
    (info,) = [m for m in example.list_messages("INBOX") if m.key == key]
    assert info.flags == ("\\Seen", "\\Answered", "$Forwarded")
    example.set_flags("INBOX", key, [])
    assert (example.path / "cur" / f"{key}:2,").is_file()
    with pytest.raises(MailboxError, match="has no message 'missing'"):
        example.set_flags("INBOX", "missing", ["\\Seen"])


def test_fetch_follows_a_file_renamed_after_listing_and_skips_a_removed_one(example: MaildirStore) -> None:
    keys = [m.key for m in example.list_messages("Sent")]
    cur = example.path / ".Sent" / "cur"
    os.rename(cur / f"{keys[0]}:2,S", cur / f"{keys[0]}:2,FS")  # a mail client flagged it meanwhile
    (cur / f"{keys[1]}:2,S").unlink()
    fetched = list(example.fetch("Sent", keys))
    assert [(m.info.key, m.info.flags) for m in fetched] == [(keys[0], ("\\Seen", "\\Flagged")), (keys[2], ("\\Seen",))]


def test_keyword_letters_read_through_dovecot_keywords(store: MaildirStore) -> None:
    (store.path / "dovecot-keywords").write_text("0 $Forwarded\n2 NonJunk\n")
    for name in ("1.M1P1.h,S=3:2,Sac", "2.M1P1.h,S=3:2,b"):
        (store.path / "cur" / name).write_bytes(b"x\n\n")
    assert [m.flags for m in store.list_messages("INBOX")] == [("\\Seen", "$Forwarded", "NonJunk"), ()]
    (store.path / "dovecot-keywords").unlink()
    assert [m.flags for m in store.list_messages("INBOX")] == [("\\Seen",), ()]


def test_size_without_s_in_the_name_is_the_file_size_and_date_the_mtime(store: MaildirStore) -> None:
    path = store.path / "cur" / "1700000000.M1P1.mutt:2,S"
    path.write_bytes(b"Subject: x\n\nhello\n")
    os.utime(path, (1700000000, 1700000000))
    (info,) = store.list_messages("INBOX")
    assert (info.key, info.size, info.internal_date) == ("1700000000.M1P1.mutt", 18,
                                                         datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC))


# --- a real Dovecot on the same files -----------------------------------------------------------


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give a directory tree to the mail user, as an administrator does before Dovecot serves it."""
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), uid, gid)


def test_dovecot_serves_what_the_store_wrote_and_the_store_reads_what_dovecot_wrote(
        dovecot_new: DovecotServer) -> None:
    user, password = "maildir.store@hcm.gov.vn", "mk-maildir-store"
    dovecot_new.add_user(user, password)
    maildir = dovecot_new.maildir_of(user)
    store = open_maildir(maildir.parent, maildir.name, create=True)
    store.create_folder("Văn bản đến/2024")
    store.create_folder("V.v. tuyển dụng")
    sent = message("Giấy mời", ("\\Seen", "\\Flagged", "$Forwarded"), crlf=True)
    (key,) = store.append("Văn bản đến/2024", [sent])
    validity = store.status("Văn bản đến/2024").uidvalidity
    chown_tree(maildir.parent, DovecotServer.MAIL_UID, DovecotServer.MAIL_GID)
    received = message("Phản hồi", crlf=True)
    with IMAPClient(dovecot_new.host, port=dovecot_new.imap_port, ssl=False) as client:
        client.login(user, password)
        client.normalise_times = False
        assert sorted(name for _flags, _sep, name in client.list_folders()) == [
            "INBOX", "Văn bản đến", "Văn bản đến/2024", "V\u2024v\u2024 tuyển dụng"]
        client.select_folder("Văn bản đến/2024")
        (uid,) = client.search("ALL")
        fetched = client.fetch([uid], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE", "RFC822.SIZE"])[uid]
        assert fetched[b"BODY[]"] == sent.raw
        assert set(fetched[b"FLAGS"]) == {b"\\Seen", b"\\Flagged", b"$Forwarded", b"\\Recent"}
        assert fetched[b"INTERNALDATE"] == sent.info.internal_date
        assert fetched[b"RFC822.SIZE"] == len(sent.raw)
        client.append("Văn bản đến/2024", received.raw, flags=[b"\\Answered", b"NonJunk"],
                      msg_time=datetime(2025, 6, 30, 16, 45, tzinfo=ICT))
    listed = {m.key: m for m in store.list_messages("Văn bản đến/2024")}
    assert listed.pop(key).flags == ("\\Seen", "\\Flagged", "$Forwarded")
    (theirs,) = listed.values()
    assert theirs.flags == ("\\Answered", "NonJunk")
    assert theirs.internal_date == datetime(2025, 6, 30, 9, 45, tzinfo=UTC)
    # Dovecot stores LF line ends (mail_save_crlf = no); the store hands over the file as it is
    assert [m.raw for m in store.fetch("Văn bản đến/2024", [theirs.key])] == [received.raw.replace(b"\r\n", b"\n")]
    # Dovecot has written its dovecot-uidlist meanwhile: no reset for the store's keys
    assert (maildir / f"{VAN_BAN_DEN}.2024" / "dovecot-uidlist").is_file()
    assert store.status("Văn bản đến/2024").uidvalidity == validity


# --- mbox ---------------------------------------------------------------------------------------

MBOX = (
    b"From vanthu@binhduong.gov.vn Tue Mar  5 02:30:00 2024\n"
    b"From: vanthu@binhduong.gov.vn\n"
    b"Subject: one\n"
    b"Status: RO\n"
    b"X-Status: AF\n"
    b"\n"
    b"first\n"
    b"\n"
    b"From - Wed Jan 10 08:00:00 2024\n"
    b"Subject: two\n"
    b"\n"
    b">From the minutes:\n"
    b">>From quoted twice\n"
    b"a line with >From inside stays\n"
    b"\n"
    b"From MAILER-DAEMON Thu Feb  1 00:00:00 2024\n"
    b"Subject: three\n"
    b"X-Mozilla-Status: 1003\n"
    b"Date: Thu, 01 Feb 2024 07:00:00 +0700\n"
    b"\n"
    b"third\n"
    b"\n"
)


def test_mbox_messages_flags_dates_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "export.mbox").write_bytes(MBOX)
    store = open_mbox(tmp_path / "export.mbox")
    assert store.folders() == [FolderInfo("INBOX", "/")]
    assert [(m.key, m.uid, m.flags, m.internal_date) for m in store.list_messages("INBOX")] == [
        ("0", None, ("\\Seen", "\\Answered", "\\Flagged"), datetime(2024, 3, 5, 2, 30, tzinfo=UTC)),
        ("1", None, (), datetime(2024, 1, 10, 8, 0, tzinfo=UTC)),
        ("2", None, ("\\Seen", "\\Answered", "$Forwarded"), datetime(2024, 2, 1, 0, 0, tzinfo=UTC)),
    ]
    fetched = list(store.fetch("INBOX", ["1", "0", "9"]))
    assert [m.raw for m in fetched] == [
        b"Subject: two\n\nFrom the minutes:\n>From quoted twice\na line with >From inside stays\n",
        b"From: vanthu@binhduong.gov.vn\nSubject: one\nStatus: RO\nX-Status: AF\n\nfirst\n",
    ]
    assert [m.info.size for m in fetched] == [len(m.raw) for m in fetched]
    assert store.status("INBOX").messages == 3


def test_mbox_date_header_when_the_from_line_has_no_date(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"From x\nDate: Thu, 01 Feb 2024 07:00:00 +0700\n\nbody\n")
    (info,) = open_mbox(tmp_path / "a").list_messages("INBOX")
    assert info.internal_date == datetime(2024, 2, 1, 0, 0, tzinfo=UTC)
    assert info.internal_date.tzinfo is UTC


def test_mbox_from_line_inside_a_paragraph_does_not_split(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"From a Mon Jan  1 00:00:00 2024\nSubject: x\n\nhello\nFrom here on\n")
    store = open_mbox(tmp_path / "a")
    assert [m.raw for m in store.fetch("INBOX", ["0"])] == [b"Subject: x\n\nhello\nFrom here on\n"]


def test_mbox_with_crlf_line_ends(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(MBOX.replace(b"\n", b"\r\n"))
    store = open_mbox(tmp_path / "a")
    assert [m.raw for m in store.fetch("INBOX", ["1"])] == [
        b"Subject: two\r\n\r\nFrom the minutes:\r\n>From quoted twice\r\na line with >From inside stays\r\n"]
    assert [m.flags for m in store.list_messages("INBOX")][0] == ("\\Seen", "\\Answered", "\\Flagged")


def test_mbox_directory_like_thunderbird(tmp_path: Path) -> None:
    root = tmp_path / "Local Folders"
    (root / "Inbox.sbd" / "Dự án.sbd").mkdir(parents=True)
    (root / "Inbox").write_bytes(MBOX)
    (root / "Inbox.msf").write_bytes(b"// <!-- <mdb:mork:z v=\"1.4\"/> -->")
    (root / "Sent").write_bytes(b"")  # an empty folder
    (root / "Inbox.sbd" / "Dự án.sbd" / "2024").write_bytes(MBOX)
    (root / "msgFilterRules.dat").write_text('version="9"\n')
    store = open_mbox(root)
    assert store.folders() == [
        FolderInfo("INBOX", "/"),
        FolderInfo("INBOX/Dự án", "/", None, selectable=False),
        FolderInfo("INBOX/Dự án/2024", "/"),
        FolderInfo("Sent", "/"),
    ]
    assert store.status("Sent").messages == 0
    assert len(store.list_messages("INBOX/Dự án/2024")) == 3
    with pytest.raises(MailboxError, match="folder 'Trash' does not exist"):
        store.list_messages("Trash")


def test_mbox_uidvalidity_survives_appends_but_not_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.write_bytes(MBOX)
    store = open_mbox(path)
    before = store.status("INBOX").uidvalidity
    with open(path, "ab") as f:
        f.write(b"From b Fri Mar  1 00:00:00 2024\nSubject: four\n\n4\n\n")
    assert (store.status("INBOX").uidvalidity, store.status("INBOX").messages) == (before, 4)
    # a mail client compacting the file: a new file renamed over the old one
    (tmp_path / "a.new").write_bytes(b"From - " + MBOX.split(b"\n\nFrom - ", 1)[1])
    os.replace(tmp_path / "a.new", path)
    assert store.status("INBOX").uidvalidity != before


def test_mbox_store_is_read_only(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(MBOX)
    store = open_mbox(tmp_path / "a")
    for call in (lambda: store.append("INBOX", [message("x")]), lambda: store.create_folder("x"),
                 lambda: store.set_flags("INBOX", "0", ["\\Seen"])):
        with pytest.raises(MailboxError, match="mbox stores are read-only"):
            call()


def test_open_mbox_errors(tmp_path: Path) -> None:
    with pytest.raises(MailboxError, match=f"mbox {tmp_path / 'none'} does not exist"):
        open_mbox(tmp_path / "none")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(MailboxError, match="not an mbox file"):
        open_mbox(tmp_path / "notes.txt").list_messages("INBOX")
