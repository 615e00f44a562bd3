"""`relay check` (exact output), `relay serve` as a real process (SIGHUP reload, SIGTERM drain), and [relay] keys."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import configs
import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner

from mailmerge_gov.cli import cli
from mailmerge_gov.config import Secret, load_config
from servers import LOOPBACK, RelayDaemon, free_port

MAP = """\
old_address,new_address,valid_until
nguyenvana@binhduong.gov.vn,annv@hcm.gov.vn,2026-06-30
lethic@binhduong.gov.vn,clt@hcm.gov.vn,2025-12-31
"""
SECRET = "thisisthefirstsecret123"
LIVE_MAP = MAP.replace("2026-06-30", "2099-12-31")  # the daemon looks up on the real today


def relay_config(tmp_path: Path, relay: str, map_text: str = MAP) -> Path:
    """This file's relay config: the files-only consolidation, a [relay] table and this file's address map."""
    return configs.relay_config(tmp_path, relay, map_text)


def run(*args: str) -> tuple[int, str]:
    """Run the CLI in-process; return its exit code and output."""
    result = CliRunner().invoke(cli, list(args), prog_name="mailmerge-gov", catch_exceptions=False)
    return result.exit_code, result.output


# --- relay check -------------------------------------------------------------------------------------------------

CHECKS = [
    pytest.param("NguyenVanA@BinhDuong.gov.vn", "2026-01-15", [
        "NguyenVanA@BinhDuong.gov.vn on 2026-01-15: forward to annv@hcm.gov.vn (until 2026-06-30)",
        "reply: the next hop's answer to RCPT TO:<annv@hcm.gov.vn>",
    ], id="forward"),
    pytest.param("nguyenvana@binhduong.gov.vn", "2026-07-01", [
        "nguyenvana@binhduong.gov.vn on 2026-07-01: moved to annv@hcm.gov.vn (forwarding ended 2026-06-30)",
        "reply: 550-5.1.6 Dia chi nay da ngung su dung; nguoi nhan da chuyen sang dia chi moi <annv@hcm.gov.vn>, "
        "vui long gui lai thu toi dia chi moi.",
        "reply: 550 5.1.6 User has moved; please use <annv@hcm.gov.vn>",
    ], id="moved"),
    pytest.param("nobody@binhduong.gov.vn", "2026-01-15", [
        "nobody@binhduong.gov.vn on 2026-01-15: unknown (not in the address map)",
        "reply: 550-5.1.1 Khong co hop thu <nobody@binhduong.gov.vn> trong ten mien cu.",
        "reply: 550 5.1.1 No such user <nobody@binhduong.gov.vn>",
    ], id="unknown"),
    pytest.param("x%example.org@binhduong.gov.vn", "2026-01-15", [
        "x%example.org@binhduong.gov.vn on 2026-01-15: unknown "
        "(quoted local parts and local parts with % or ! are never forwarded)",
        "reply: 550-5.1.1 Khong co hop thu <x%example.org@binhduong.gov.vn> trong ten mien cu.",
        "reply: 550 5.1.1 No such user <x%example.org@binhduong.gov.vn>",
    ], id="percent-hack"),
    pytest.param("annv@hcm.gov.vn", "2026-01-15", [
        # hcm.gov.vn is a source's domain but also the new unit's: the new server is its MX, not the relay
        "annv@hcm.gov.vn on 2026-01-15: relay denied (hcm.gov.vn is not an old domain)",
        "reply: 554-5.7.1 May chu nay chi nhan thu cho cac dia chi cu cua don vi, khong chuyen tiep thu cho "
        "<annv@hcm.gov.vn>.",
        "reply: 554 5.7.1 Relay access denied",
    ], id="relay-denied"),
    pytest.param("SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn", "2026-01-20", [
        "SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn on 2026-01-20: SRS return address of "
        "alice@example.org (bounces only, MAIL FROM:<>)",
        "reply: the next hop's answer to RCPT TO:<alice@example.org>",
    ], id="srs"),
    pytest.param("SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn", "2026-03-01", [
        "SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn on 2026-03-01: invalid SRS address "
        "(SRS address is 45 days old, more than 21)",
        "reply: 550-5.1.1 Dia chi tra thu khong hop le hoac da het han.",
        "reply: 550 5.1.1 Invalid or expired return address",
    ], id="srs-expired"),
]


@pytest.mark.parametrize(("address", "day", "lines"), CHECKS)
def test_relay_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str, day: str,
                     lines: list[str]) -> None:
    monkeypatch.setenv("MMG_TEST_SRS", SECRET)
    path = relay_config(tmp_path, 'map = "map.csv"\nsrs_domain = "srs.binhduong.gov.vn"\n'
                                  '[[relay.srs_secrets]]\npassword_env = "MMG_TEST_SRS"\n')
    assert run("relay", "check", "-c", str(path), address, "--date", day) == (0, "\n".join(lines) + "\n")


def test_relay_check_without_a_date_is_on_the_local_today(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = relay_config(tmp_path, 'map = "map.csv"\n', LIVE_MAP)
    # a time zone whose date differs from UTC's right now: UTC-12 before noon UTC, UTC+14 from 10:00 UTC
    monkeypatch.setenv("TZ", "MMG+12" if dt.datetime.now(dt.UTC).hour < 12 else "MMG-14")
    time.tzset()
    try:
        before = dt.date.today()
        assert before != dt.datetime.now(dt.UTC).date()
        code, output = run("relay", "check", "-c", str(path), "nguyenvana@binhduong.gov.vn")
        after = dt.date.today()
    finally:
        monkeypatch.undo()
        time.tzset()
    assert code == 0 and output in {
        f"nguyenvana@binhduong.gov.vn on {day.isoformat()}: forward to annv@hcm.gov.vn (until 2099-12-31)\n"
        "reply: the next hop's answer to RCPT TO:<annv@hcm.gov.vn>\n" for day in (before, after)}


def test_relay_check_without_a_map(tmp_path: Path) -> None:
    path = relay_config(tmp_path, 'hostname = "relay.test"\n')
    assert run("relay", "check", "-c", str(path), "a@binhduong.gov.vn") == (
        1, f"Error: {path}: [relay] map is not set: name the address map CSV "
           "(mailmerge-gov directory export-map -o FILE writes it)\n")


def test_relay_check_bad_map(tmp_path: Path) -> None:
    path = relay_config(tmp_path, 'map = "map.csv"\n', MAP + "nguyenvana@binhduong.gov.vn,other@hcm.gov.vn,2026-06-30\n")
    assert run("relay", "check", "-c", str(path), "a@binhduong.gov.vn") == (
        1, f"Error: {tmp_path / 'map.csv'}, line 4: nguyenvana@binhduong.gov.vn is given twice with different new "
           "addresses: annv@hcm.gov.vn on line 2 and other@hcm.gov.vn on line 4\n")


def test_relay_check_bad_date(tmp_path: Path) -> None:
    path = relay_config(tmp_path, 'map = "map.csv"\n')
    code, output = run("relay", "check", "-c", str(path), "a@binhduong.gov.vn", "--date", "15/01/2026")
    assert code == 2 and "Invalid value for '--date'" in output


def test_relay_serve_needs_a_next_hop(tmp_path: Path) -> None:
    path = relay_config(tmp_path, 'map = "map.csv"\n')
    assert run("relay", "serve", "-c", str(path)) == (
        1, f"Error: {path}: [relay] next_hop is not set: the relay needs the new mail server\n")


def test_relay_serve_refuses_a_missing_srs_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMG_TEST_SRS", raising=False)
    path = relay_config(tmp_path, 'map = "map.csv"\nnext_hop = "smtp://127.0.0.1:2"\nsrs_domain = "srs.binhduong.gov.vn"\n'
                                  '[[relay.srs_secrets]]\npassword_env = "MMG_TEST_SRS"\n')
    assert run("relay", "serve", "-c", str(path)) == (
        1, "Error: SRS secret (environment variable MMG_TEST_SRS): environment variable MMG_TEST_SRS is not set\n")


# --- [relay] in the consolidation file -----------------------------------------------------------------------------


def test_relay_keys(tmp_path: Path) -> None:
    path = relay_config(tmp_path, 'map = "map.csv"\nsrs_domain = "SRS.BinhDuong.gov.vn"\nsrs_hash_length = 8\n'
                                  'srs_max_age_days = 30\ntimeout = 120\nnext_hop_timeout = 20\nmax_hops = 30\n'
                                  'shutdown_timeout = 5\nnext_hop = "smtps://mx.hcm.gov.vn"\nnext_hop_ca_file = "ca.pem"\n'
                                  'srs_secrets = [{ password_env = "NEW_SRS" }, { password_file = "old-srs.key" }]\n')
    relay = load_config(path).relay
    assert (relay.map, relay.srs_domain, relay.srs_secrets, relay.srs_hash_length, relay.srs_max_age_days,
            relay.timeout, relay.next_hop_timeout, relay.max_hops, relay.shutdown_timeout, relay.next_hop_port,
            relay.next_hop_ca_file) == (
        tmp_path / "map.csv", "srs.binhduong.gov.vn", (Secret(env="NEW_SRS"), Secret(file=tmp_path / "old-srs.key")),
        8, 30, 120.0, 20.0, 30, 5.0, 465, tmp_path / "ca.pem")


def test_relay_defaults(tmp_path: Path) -> None:
    relay = load_config(relay_config(tmp_path, "")).relay
    assert (relay.map, relay.srs_domain, relay.srs_secrets, relay.srs_hash_length, relay.srs_max_age_days,
            relay.timeout, relay.next_hop_timeout, relay.max_hops, relay.shutdown_timeout) == (
        None, None, (), 6, 21, 300.0, 60.0, 50, 30.0)


HELP = ('literal passwords are not allowed in the configuration; use password_env = "VARIABLE" (read from the '
        'environment) or password_file = "/path/to/file" (first line of a file readable only by the service)')


@pytest.mark.parametrize(("relay", "message"), [
    ('srs_domain = "srs.binhduong.gov.vn"\n',
     "relay.srs_domain: srs_domain needs srs_secrets: [[relay.srs_secrets]] with password_env or password_file "
     "(the first signs, all verify)"),
    ('[[relay.srs_secrets]]\npassword_env = "X"\n', "relay.srs_secrets: srs_secrets are used only with srs_domain"),
    ('srs_domain = "srs.binhduong.gov.vn"\nsrs_secrets = ["my-literal-secret"]\n',
     f"relay.srs_secrets: {HELP}; write each as [[relay.srs_secrets]] with one of them"),
    ('srs_domain = "srs.binhduong.gov.vn"\nsrs_secret = "my-literal-secret"\n', f"relay.srs_secret: {HELP}"),
    ('srs_domain = "srs.binhduong.gov.vn"\n[[relay.srs_secrets]]\nsecret = "my-literal-secret"\n',
     f"relay.srs_secrets[1].secret: {HELP}"),
    ('srs_domain = "srs.binhduong.gov.vn"\n[[relay.srs_secrets]]\nname = "x"\n',
     "relay.srs_secrets[1]: each SRS secret needs password_env or password_file"),
    ("srs_hash_length = 3\n", "relay.srs_hash_length: must be 4 to 27 characters, got 3"),
    ("srs_max_age_days = 2000\n", "relay.srs_max_age_days: must be at most 1000 days, got 2000"),
    ("timeout = 30\nnext_hop_timeout = 30\n", "relay.next_hop_timeout: must be shorter than timeout (30 s), got 30"),
    ('srs_domain = "not a domain"\n[[relay.srs_secrets]]\npassword_env = "X"\n',
     "relay.srs_domain: 'not a domain' is not a mail domain"),
])
def test_relay_key_errors(tmp_path: Path, relay: str, message: str) -> None:
    path = relay_config(tmp_path, relay)
    text = configs.config_error(path)
    assert text.startswith(f"{path}, line ") and text.split(": ", 1)[1] == message
    assert "my-literal-secret" not in text


# --- relay serve as a process ------------------------------------------------------------------------------------


class Sink:
    """aiosmtpd next hop that keeps (sender, recipients, content)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))  # type: ignore[attr-defined]
        return "250 2.0.0 Ok: queued"


@pytest.fixture(params=[1, 2], ids=["workers=1", "workers=2"])
def daemon_setup(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, Sink, int]]:
    """A next hop, and a config for a relay in front of it (one process, or two workers); yields (config, sink,
    relay port)."""
    sink = Sink()
    controller = Controller(sink, hostname=LOOPBACK, port=free_port())
    controller.start()
    port = free_port()
    config = relay_config(tmp_path, f'listen = "{LOOPBACK}:{port}"\nhostname = "relay.test"\nmap = "map.csv"\n'
                                    f'next_hop = "smtp://{LOOPBACK}:{controller.port}"\nnext_hop_timeout = 5\n'
                                    f'shutdown_timeout = 10\nworkers = {request.param}\n',
                          LIVE_MAP)
    try:
        yield config, sink, port
    finally:
        controller.stop()


def rcpt(port: int, address: str) -> tuple[int, bytes]:
    """RCPT one address through the relay and return the reply."""
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("alice@example.org")
        return client.rcpt(address)


def test_serve_logs_reloads_and_drains(daemon_setup: tuple[Path, Sink, int]) -> None:
    config, sink, port = daemon_setup
    daemon = RelayDaemon(config, {**os.environ, "TZ": "Asia/Ho_Chi_Minh"})
    try:
        listening = daemon.event("listening")
        assert (listening["address"], listening["addresses"]) == (f"{LOOPBACK}:{port}", 2)

        with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
            client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], b"Subject: hi\r\n\r\nbody\r\n")
        logged = daemon.event("transaction")
        assert (logged["from"], logged["relayed_from"], logged["recipients"], logged["result"]) == (
            "alice@example.org", "alice@example.org",
            [{"to": "nguyenvana@binhduong.gov.vn", "verdict": "forward", "new": "annv@hcm.gov.vn",
              "reply": "250 OK"}], "250 2.0.0 Ok: queued")
        assert [(m[0], m[1]) for m in sink.messages] == [("alice@example.org", ["annv@hcm.gov.vn"])]

        # a broken map is refused, the old one keeps working
        map_file = config.parent / "map.csv"
        map_file.write_text(LIVE_MAP + "newbie@binhduong.gov.vn,newbie@binhduong.gov.vn,2099-12-31\n", encoding="utf-8")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.event("reload-failed")
        assert failed["reason"] == f"{map_file}, line 4: newbie@binhduong.gov.vn forwards to itself"
        assert failed["kept_addresses"] == 2
        assert rcpt(port, "nguyenvana@binhduong.gov.vn")[0] == 250
        assert rcpt(port, "newbie@binhduong.gov.vn")[0] == 550

        # a good map is swapped in
        map_file.write_text(LIVE_MAP + "newbie@binhduong.gov.vn,newbie@hcm.gov.vn,2099-12-31\n", encoding="utf-8")
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.event("reloaded")["addresses"] == 3
        assert rcpt(port, "newbie@binhduong.gov.vn")[0] == 250

        # SIGTERM: no new connections, but the open transaction may finish
        client = smtplib.SMTP(LOOPBACK, port, timeout=10)
        client.ehlo("client.test")
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.event("stopping")["sessions"] == 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                smtplib.SMTP(LOOPBACK, port, timeout=1).close()
            except OSError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the relay still accepts connections after SIGTERM")
        assert client.data(b"Subject: last\r\n\r\nbody\r\n") == (250, b"2.0.0 Ok: queued")
        assert client.docmd("MAIL FROM:<alice@example.org>") == (421, b"4.3.2 Service shutting down, try again later")
        client.close()
        daemon.event("stopped")
        assert daemon.proc.wait(10) == 0
        assert len(sink.messages) == 2
    finally:
        daemon.stop()


def test_serve_logs_one_json_line_per_transaction(daemon_setup: tuple[Path, Sink, int]) -> None:
    config, sink, port = daemon_setup
    daemon = RelayDaemon(config, {**os.environ, "TZ": "Asia/Ho_Chi_Minh"})
    try:
        daemon.event("listening")
        with smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=10) as client:
            assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn", "lethic@binhduong.gov.vn",
                                                         "nobody@binhduong.gov.vn"], b"Subject: hi\r\n\r\nbody\r\n") \
                == {"lethic@binhduong.gov.vn": (550, b"5.1.6 Dia chi nay da ngung su dung; nguoi nhan da chuyen sang "
                                                     b"dia chi moi <clt@hcm.gov.vn>, vui long gui lai thu toi dia chi "
                                                     b"moi.\n5.1.6 User has moved; please use <clt@hcm.gov.vn>"),
                    "nobody@binhduong.gov.vn": (550, b"5.1.1 Khong co hop thu <nobody@binhduong.gov.vn> trong ten "
                                                     b"mien cu.\n5.1.1 No such user <nobody@binhduong.gov.vn>")}
        logged = daemon.event("transaction")
    finally:
        daemon.stop()
    [(_, _, content)] = sink.messages
    started = dt.datetime.fromisoformat(logged.pop("time"))
    assert started.utcoffset() == dt.timedelta(hours=7)  # the local time of the relay's machine
    assert abs(dt.datetime.now(dt.UTC) - started) < dt.timedelta(minutes=1)
    assert re.fullmatch(r"[0-9A-F]{12}", logged.pop("id"))
    assert logged == {
        "event": "transaction", "client": "127.0.0.1", "helo": "client.test",
        "from": "alice@example.org", "mail_from": "alice@example.org", "relayed_from": "alice@example.org",
        "recipients": [  # old -> new, and what the client was told for each
            {"to": "nguyenvana@binhduong.gov.vn", "verdict": "forward", "new": "annv@hcm.gov.vn", "reply": "250 OK"},
            {"to": "lethic@binhduong.gov.vn", "verdict": "moved", "new": "clt@hcm.gov.vn",
             "reply": "550 5.1.6 Dia chi nay da ngung su dung; nguoi nhan da chuyen sang dia chi moi <clt@hcm.gov.vn>, "
                      "vui long gui lai thu toi dia chi moi. / User has moved; please use <clt@hcm.gov.vn>"},
            {"to": "nobody@binhduong.gov.vn", "verdict": "unknown", "new": None,
             "reply": "550 5.1.1 Khong co hop thu <nobody@binhduong.gov.vn> trong ten mien cu. / "
                      "No such user <nobody@binhduong.gov.vn>"}],
        "size": len(content),  # as sent to the next hop: with the relay's Received and Delivered-To
        "next_hop": "250 2.0.0 Ok: queued", "result": "250 2.0.0 Ok: queued"}
