"""The real-server fixtures work: slapd, two Dovecots and smtp-sink, driven by real clients."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ldap3
import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from conftest import NEW_SUFFIX, SUFFIXES
from servers import (
    DovecotServer,
    ServerNotInstalled,
    ServerStartError,
    SlapdServer,
    SmtpSink,
    group_members,
    process_state,
    require_program,
    wait_until,
)

ICT = timezone(timedelta(hours=7))
VAN_BAN_DEN = "Văn bản đến"

PERSONS_LDIF = """\
dn: uid=annv,dc=binhduong,dc=gov,dc=vn
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: annv
cn: Nguyễn Văn An
sn: Nguyễn
givenName: An
mail: annv@binhduong.gov.vn
mailLocalAddress: annv@binhduong.gov.vn
mailRoutingAddress: annv@hcm.gov.vn
userPassword: an-mat-khau-1

dn: uid=binhtt,dc=baria-vungtau,dc=gov,dc=vn
objectClass: inetOrgPerson
uid: binhtt
cn: Trần Thị Bình
sn: Trần
mail: binhtt@baria-vungtau.gov.vn
"""


def message(subject: str, message_id: str) -> bytes:
    """Return a small RFC 5322 message with CRLF line ends."""
    return (
        "From: Văn thư <vanthu@binhduong.gov.vn>\r\n"
        "To: <nguyenvana@hcm.gov.vn>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{message_id}@binhduong.gov.vn>\r\n"
        "Date: Fri, 15 Mar 2024 08:30:00 +0700\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Kính gửi các đồng chí,\r\n"
        "Công văn số 123/UBND về việc sáp nhập.\r\n"
    ).encode()


def imap(server: DovecotServer) -> IMAPClient:
    """Return an IMAP connection to `server`, not logged in yet."""
    return IMAPClient(server.host, port=server.imap_port, ssl=False, timeout=5)


def base_entry(conn: ldap3.Connection, dn: str) -> dict[str, object]:
    """Return the attributes of entry `dn` as read through `conn`."""
    assert conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=ldap3.ALL_ATTRIBUTES)
    return dict(conn.response[0]["attributes"])


# ------------------------------------------------------------------------------------------------ slapd


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_admin_binds_and_reads_base_entry_of_each_suffix(slapd: SlapdServer, suffix: str) -> None:
    conn = ldap3.Connection(ldap3.Server(slapd.url), slapd.admin_dn(suffix), slapd.admin_password, auto_bind=True)
    assert conn.extend.standard.who_am_i() == f"dn:cn=admin,{suffix}"
    dc = suffix.split(",")[0].removeprefix("dc=")
    domain = f"{dc}.gov.vn"
    # ldap3 returns SINGLE-VALUE attributes (dc here) as a scalar, the others as lists
    assert base_entry(conn, suffix) == {"objectClass": ["dcObject", "organization"], "dc": dc, "o": [domain]}
    conn.unbind()


def test_root_dse_lists_the_three_suffixes(slapd: SlapdServer) -> None:
    conn = ldap3.Connection(ldap3.Server(slapd.url), auto_bind=True)
    assert conn.search("", "(objectClass=*)", ldap3.BASE, attributes=["namingContexts"])
    assert conn.response[0]["attributes"]["namingContexts"] == [
        "dc=hcm,dc=gov,dc=vn",
        "dc=binhduong,dc=gov,dc=vn",
        "dc=baria-vungtau,dc=gov,dc=vn",
    ]
    conn.unbind()


def test_anonymous_cannot_read_user_password(slapd: SlapdServer) -> None:
    slapd.add_ldif(PERSONS_LDIF)
    anonymous = ldap3.Connection(ldap3.Server(slapd.url), auto_bind=True)
    assert anonymous.search(
        "dc=binhduong,dc=gov,dc=vn",
        "(mailLocalAddress=annv@binhduong.gov.vn)",
        attributes=ldap3.ALL_ATTRIBUTES,
    )
    assert [entry["dn"] for entry in anonymous.response] == ["uid=annv,dc=binhduong,dc=gov,dc=vn"]
    assert anonymous.response[0]["attributes"] == {
        "objectClass": ["inetOrgPerson", "inetLocalMailRecipient"],
        "uid": ["annv"],
        "cn": ["Nguyễn Văn An"],
        "sn": ["Nguyễn"],
        "givenName": ["An"],
        "mail": ["annv@binhduong.gov.vn"],
        "mailLocalAddress": ["annv@binhduong.gov.vn"],
        "mailRoutingAddress": "annv@hcm.gov.vn",
    }
    admin_dn = slapd.admin_dn("dc=binhduong,dc=gov,dc=vn")
    admin = ldap3.Connection(ldap3.Server(slapd.url), admin_dn, slapd.admin_password, auto_bind=True)
    assert base_entry(admin, "uid=annv,dc=binhduong,dc=gov,dc=vn")["userPassword"] == [b"an-mat-khau-1"]
    # "by anonymous auth": the person can still bind with the password nobody can read
    person = ldap3.Connection(ldap3.Server(slapd.url), "uid=annv,dc=binhduong,dc=gov,dc=vn", "an-mat-khau-1")
    assert person.bind() is True
    # the second entry of the same LDIF went to the other old unit's database
    assert base_entry(admin, "dc=binhduong,dc=gov,dc=vn")["o"] == ["binhduong.gov.vn"]
    other = ldap3.Connection(ldap3.Server(slapd.url), auto_bind=True)
    assert other.search("dc=baria-vungtau,dc=gov,dc=vn", "(uid=binhtt)", attributes=["cn"])
    assert other.response[0]["attributes"]["cn"] == ["Trần Thị Bình"]
    for conn in (anonymous, admin, person, other):
        conn.unbind()


def test_ldapsearch_command_binds_and_finds_base_entry(slapd: SlapdServer) -> None:
    result = subprocess.run(
        [
            require_program("ldapsearch", "ldap-utils"),
            *("-x", "-LLL", "-H", slapd.url, "-D", slapd.admin_dn(NEW_SUFFIX), "-y", str(slapd.password_file)),
            *("-b", NEW_SUFFIX, "-s", "base", "(objectClass=*)", "o"),
        ],
        env=slapd.client_env(),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "dn: dc=hcm,dc=gov,dc=vn\no: hcm.gov.vn\n\n"


# ------------------------------------------------------------------------------------------------ Dovecot


def test_imap_vietnamese_folders_and_append_round_trip(dovecot_new: DovecotServer) -> None:
    user = "nguyenvana@hcm.gov.vn"
    dovecot_new.add_user(user, "pass1234")
    body = message("Công văn đến", "cv-123")
    when = datetime(2024, 3, 15, 8, 31, 5, tzinfo=ICT)
    with imap(dovecot_new) as client:
        client.login(user, "pass1234")
        client.create_folder(VAN_BAN_DEN)
        client.create_folder(f"{VAN_BAN_DEN}/2024")
        assert sorted((delimiter, name) for _flags, delimiter, name in client.list_folders()) == [
            (b"/", "INBOX"),
            (b"/", VAN_BAN_DEN),
            (b"/", f"{VAN_BAN_DEN}/2024"),
        ]
        client.append(f"{VAN_BAN_DEN}/2024", body, flags=[b"\\Seen", b"\\Flagged"], msg_time=when)
        client.select_folder(f"{VAN_BAN_DEN}/2024", readonly=True)
        client.normalise_times = False  # aware datetimes, as the server reports them
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS", "INTERNALDATE", "RFC822.SIZE"])
    assert list(fetched) == [1]
    assert fetched[1][b"BODY[]"] == body
    # \Recent too: this is the first session to see the message
    assert set(fetched[1][b"FLAGS"]) == {b"\\Seen", b"\\Flagged", b"\\Recent"}
    # the same instant, but not the +07:00 offset: Maildir keeps INTERNALDATE as the file's mtime, and
    # Dovecot reports it in the server's own time zone
    assert fetched[1][b"INTERNALDATE"] == when
    assert fetched[1][b"RFC822.SIZE"] == len(body)
    # on disk: a Maildir++ folder named in modified UTF-7 (notes, section 2)
    folder = dovecot_new.maildir_of(user) / ".V&AQM-n b&HqM-n &AREevw-n.2024"
    files = list((folder / "cur").iterdir())
    assert len(files) == 1 and files[0].name.endswith(":2,FS")


def test_master_user_logs_in_both_ways(dovecot_new: DovecotServer) -> None:
    user = "tranthib@hcm.gov.vn"
    dovecot_new.add_user(user, "mk-tranthib")
    with imap(dovecot_new) as client:
        client.login(user, "mk-tranthib")
        client.append("INBOX", message("Giấy mời họp", "gm-7"))
    with imap(dovecot_new) as client:
        client.login(f"{user}*admin", dovecot_new.master_password)
        client.select_folder("INBOX", readonly=True)
        assert client.fetch(client.search("ALL"), ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) == {
            1: {b"BODY[HEADER.FIELDS (MESSAGE-ID)]": b"Message-ID: <gm-7@binhduong.gov.vn>\r\n\r\n", b"SEQ": 1}
        }
    with imap(dovecot_new) as client:
        client.plain_login("admin", dovecot_new.master_password, authorization_identity=user)
        client.select_folder("INBOX", readonly=True)
        assert client.search(["HEADER", "Message-ID", "gm-7@binhduong.gov.vn"]) == [1]
    assert dovecot_new.master_login(user) == "tranthib@hcm.gov.vn*admin"


def test_wrong_master_password_is_refused(dovecot_new: DovecotServer) -> None:
    user = "phamvand@hcm.gov.vn"
    dovecot_new.add_user(user, "mk-phamvand")
    with imap(dovecot_new) as client, pytest.raises(LoginError) as refused:
        client.login(f"{user}*admin", "not-the-master-password")
    assert str(refused.value) == "b'[AUTHENTICATIONFAILED] Authentication failed.'"


def test_lmtp_delivers_into_the_new_server(dovecot_new: DovecotServer) -> None:
    user = "lethic@hcm.gov.vn"
    dovecot_new.add_user(user, "mk-lethic")
    body = message("Thông báo chuyển địa chỉ thư", "tb-1")
    # one recipient per transaction: smtplib.LMTP reads only one reply after DATA (notes, section 2)
    with smtplib.LMTP(dovecot_new.host, dovecot_new.lmtp_port, timeout=5) as lmtp:
        assert lmtp.sendmail("vanthu@binhduong.gov.vn", [user], body) == {}
    with imap(dovecot_new) as client:
        client.login(user, "mk-lethic")
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
    delivered = fetched[1][b"BODY[]"]
    assert delivered.startswith(b"Return-Path: <vanthu@binhduong.gov.vn>\r\nDelivered-To: lethic@hcm.gov.vn\r\n")
    assert delivered.endswith(body)


def test_lmtp_refuses_unknown_recipient(dovecot_new: DovecotServer) -> None:
    with smtplib.LMTP(dovecot_new.host, dovecot_new.lmtp_port, timeout=5) as lmtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            lmtp.sendmail("vanthu@binhduong.gov.vn", ["nobody@hcm.gov.vn"], message("x", "x-1"))
    assert refused.value.recipients == {
        "nobody@hcm.gov.vn": (550, b"5.1.1 <nobody@hcm.gov.vn> User doesn't exist: nobody@hcm.gov.vn")
    }


def test_two_dovecot_instances_are_independent(dovecot_old: DovecotServer, dovecot_new: DovecotServer) -> None:
    ports = {dovecot_old.imap_port, dovecot_old.lmtp_port, dovecot_new.imap_port, dovecot_new.lmtp_port}
    assert len(ports) == 4
    assert dovecot_old.dir != dovecot_new.dir
    user = "annv@binhduong.gov.vn"
    dovecot_old.add_user(user, "mk-cu")
    with imap(dovecot_old) as client:
        client.login(user, "mk-cu")
        client.create_folder("Lưu trữ")
    with imap(dovecot_new) as client, pytest.raises(LoginError):
        client.login(user, "mk-cu")
    dovecot_new.add_user(user, "mk-moi")
    with imap(dovecot_new) as client:
        client.login(user, "mk-moi")
        assert [name for _flags, _delimiter, name in client.list_folders()] == ["INBOX"]
    with imap(dovecot_old) as client:
        client.login(user, "mk-cu")
        assert sorted(name for _flags, _delimiter, name in client.list_folders()) == ["INBOX", "Lưu trữ"]


def test_add_user_is_visible_at_once_and_password_change_applies(dovecot_old: DovecotServer) -> None:
    dovecot_old.add_user("first@binhduong.gov.vn", "mk-1")
    assert dovecot_old.password_works("first@binhduong.gov.vn", "mk-1")
    # same second as the login above: a shared users file would not be re-read yet (see write_user)
    dovecot_old.add_user("second@binhduong.gov.vn", "mk-2")
    assert dovecot_old.password_works("second@binhduong.gov.vn", "mk-2")
    dovecot_old.add_user("first@binhduong.gov.vn", "mk-9")
    assert dovecot_old.password_works("first@binhduong.gov.vn", "mk-9")
    assert not dovecot_old.password_works("first@binhduong.gov.vn", "mk-1")


# ------------------------------------------------------------------------------------------------ smtp-sink


def test_smtp_sink_answers_ehlo_and_keeps_the_message(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, local_hostname="client.test", timeout=5) as smtp:
        code, text = smtp.ehlo()
        assert (code, text.split(b"\n")[0]) == (250, b"sink.test")
        assert smtp.has_extn("8bitmime") and smtp.has_extn("pipelining")
        assert smtp.sendmail("vanthu@binhduong.gov.vn", ["annv@hcm.gov.vn"], message("Thử", "t-1")) == {}
    [dump] = smtp_sink.messages()
    assert dump.startswith(
        b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: client.test\n"
        b"X-Mail-Args: <vanthu@binhduong.gov.vn>\nX-Rcpt-Args: <annv@hcm.gov.vn>\nReceived: from client.test"
    )
    assert dump.endswith(message("Thử", "t-1").replace(b"\r\n", b"\n") + b"\n")


# ------------------------------------------------------------------------------------------------ life cycle


def test_seeded_servers_start_and_leave_nothing_behind() -> None:
    # dn:: is base64 of "uid=hoa,dc=hcm,dc=gov,dc=vn": slapadd gets it in the right database all the same
    seed = "dn:: dWlkPWhvYSxkYz1oY20sZGM9Z292LGRjPXZu\nobjectClass: account\nuid: hoa\n"
    ldap = SlapdServer(["dc=hcm,dc=gov,dc=vn"], seed_ldif=seed)
    mail = DovecotServer("life", users={"hoa@hcm.gov.vn": "mk-hoa"})
    sink = SmtpSink()
    for server in (ldap, mail, sink):
        server.start()
    pids = [server.proc.pid for server in (ldap, mail, sink) if server.proc]
    try:
        conn = ldap3.Connection(ldap3.Server(ldap.url), auto_bind=True)
        assert conn.search("dc=hcm,dc=gov,dc=vn", "(uid=hoa)", attributes=["uid"])
        assert [entry["dn"] for entry in conn.response] == ["uid=hoa,dc=hcm,dc=gov,dc=vn"]
        conn.unbind()
        assert mail.password_works("hoa@hcm.gov.vn", "mk-hoa")
    finally:
        for server in (ldap, mail, sink):
            server.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # waited for: not even a zombie is left
        assert group_members(pid) == []  # nor any child of theirs (dovecot has several)
    assert [server.dir.exists() for server in (ldap, mail, sink)] == [False, False, False]


# ------------------------------------------------------------------------------------------------ helpers


def test_missing_program_names_the_debian_packages() -> None:
    with pytest.raises(ServerNotInstalled) as missing:
        require_program("mmg-no-such-slapd", "slapd and ldap-utils")
    assert str(missing.value) == (
        "mmg-no-such-slapd not found: install the Debian packages slapd and ldap-utils (scripts/test does this)"
    )


def test_wait_fails_fast_with_the_log_when_the_server_dies(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-c", f"open({str(log)!r}, 'w').write('fatal: port in use'); exit(3)"])
    with pytest.raises(ServerStartError) as died:
        wait_until(lambda: False, proc, "fake server", [log], timeout=30)
    assert str(died.value) == f"fake server exited with code 3 before it was ready\n--- {log} ---\nfatal: port in use"


def test_free_port_can_be_bound(free_port: Callable[[], int]) -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname() == ("127.0.0.1", port)


def test_a_server_does_not_outlive_a_test_run_killed_with_sigkill() -> None:
    # A test process killed with SIGKILL runs no fixture teardown: the server must go with it all the same.
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from servers import SmtpSink\n"
            "sink = SmtpSink(); sink.start(); print(sink.proc.pid, sink.dir, flush=True); time.sleep(60)")
    test_run = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent)], stdout=subprocess.PIPE,
                                text=True)
    assert test_run.stdout is not None
    pid, folder = test_run.stdout.readline().split(maxsplit=1)
    try:
        # alive: waiting for clients (S), or still busy with the readiness check's connection (R, D)
        assert process_state(int(pid)) in ("S", "R", "D")
        test_run.kill()
        test_run.wait()
        deadline = time.monotonic() + 5
        while process_state(int(pid)) not in ("gone", "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_state(int(pid)) in ("gone", "Z")  # Z: ended, not yet reaped by init
    finally:
        if process_state(int(pid)) not in ("gone", "Z"):
            os.kill(int(pid), 9)  # the server this test started, should the check above have failed
        shutil.rmtree(folder.strip(), ignore_errors=True)
