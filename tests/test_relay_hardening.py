"""Relay hardening on real loopback sockets: inbound STARTTLS, connection and line limits, timeouts, metrics."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import queue
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import configs
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from click.testing import CliRunner

from mailmerge_gov.cli import cli
from mailmerge_gov.config import load_config
from mailmerge_gov.forwarding import eventloop
from mailmerge_gov.forwarding.addressmap import parse_map
from mailmerge_gov.forwarding.daemon import server_tls_context
from mailmerge_gov.forwarding.arc import ArcSealer
from mailmerge_gov.forwarding.handler import RelayHandler, RelaySettings, TransactionRecord
from mailmerge_gov.forwarding.metrics import RelayMetrics, start_metrics_server
from mailmerge_gov.forwarding.nexthop import NextHopSettings
from mailmerge_gov.forwarding.smtpserver import relay_controller
from servers import EVENT_LOOPS, LOOPBACK, free_port, tied

MAP = """\
old_address,new_address,valid_until
nguyenvana@binhduong.gov.vn,annv@hcm.gov.vn,2099-12-31
lethic@binhduong.gov.vn,clt@hcm.gov.vn,2025-12-31
"""
NOW = dt.datetime(2026, 1, 15, 19, 0, tzinfo=dt.timezone(dt.timedelta(hours=7)))
MESSAGE = b"From: alice@example.org\r\nSubject: hello\r\n\r\nXin chao\r\n"
TOO_MANY = (b"4.7.0 May chu dang co qua nhieu ket noi; vui long thu lai sau.\n"
            b"4.7.0 Too many connections, try again later")
TOO_MANY_LINES = (b"421-4.7.0 May chu dang co qua nhieu ket noi; vui long thu lai sau.\r\n"
                  b"421 4.7.0 Too many connections, try again later\r\n")
TIMEOUT_LINES = (b"421-4.4.2 Qua 0.5 giay khong nhan duoc lenh; ket noi duoc dong lai.\r\n"
                 b"421 4.4.2 Error: timeout exceeded (0.5 seconds without a command)\r\n")


class Sink:
    """aiosmtpd handler of the next hop: keeps (recipients, content) of each message."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []
        self.port = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.original_content or b""))
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A next hop on a free loopback port."""
    handler = Sink()
    controller = Controller(handler, hostname=LOOPBACK, port=free_port())
    controller.start()
    handler.port = controller.port
    try:
        yield handler
    finally:
        controller.stop()


@dataclass
class Relay:
    """A running relay (aiosmtpd Controller thread), its metrics endpoint and the transactions it logged."""

    port: int
    handler: RelayHandler
    records: list[TransactionRecord]
    metrics_port: int

    def client(self, source: str = LOOPBACK) -> smtplib.SMTP:
        """An smtplib client from `source` (any 127.x.y.z address) that has said EHLO."""
        client = smtplib.SMTP(LOOPBACK, self.port, local_hostname="mail.example.org", timeout=10,
                              source_address=(source, 0))
        client.ehlo()
        return client

    def wait_connections(self, count: int) -> None:
        """Wait until the relay has `count` client connections open."""
        deadline = time.monotonic() + 5
        while len(self.handler.connections) != count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.handler.connections) == count

    def wait_records(self, count: int) -> list[TransactionRecord]:
        """Wait until the relay has logged `count` transactions; those it logged."""
        deadline = time.monotonic() + 5
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.records)

    def metrics(self) -> str:
        """GET /metrics."""
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            return response.read().decode("utf-8")


@pytest.fixture
def start_relay() -> Iterator[Callable[..., Relay]]:
    """Return a function that starts a relay in front of a next hop port; stopped at the end of the test."""
    running: list[tuple[Controller, asyncio.Server]] = []

    def start(next_hop_port: int, tls_context: ssl.SSLContext | None = None, arc: ArcSealer | None = None,
              event_loop: str = "auto", **settings: Any) -> Relay:
        relay_settings = RelaySettings(
            next_hop=NextHopSettings(LOOPBACK, next_hop_port, timeout=0.4, local_hostname="relay.test"),
            hostname="relay.test", **settings)
        records: list[TransactionRecord] = []
        handler = RelayHandler(parse_map(MAP, "map.csv", frozenset({"binhduong.gov.vn"})), relay_settings,
                               clock=lambda: NOW, on_transaction=records.append, tls_context=tls_context, arc=arc)
        controller = relay_controller(handler, LOOPBACK, free_port(), event_loop)
        controller.start()
        relay = Relay(controller.port, handler, records, free_port())
        # Controller.start() connects once to see the server up: that is no client, so count from after it.
        relay.wait_connections(0)
        handler.metrics = RelayMetrics()
        server = asyncio.run_coroutine_threadsafe(
            start_metrics_server(handler.metrics, LOOPBACK, relay.metrics_port), controller.loop).result(5)
        running.append((controller, server))
        return relay

    yield start
    for controller, server in running:
        controller.loop.call_soon_threadsafe(server.close)
        controller.stop()


def client_context(cert: Path) -> ssl.SSLContext:
    """A client TLS context that trusts only the test certificate."""
    return ssl.create_default_context(cafile=str(cert))


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def raw_connection(relay: Relay, source: str = LOOPBACK) -> socket.socket:
    """A plain TCP connection to the relay from `source`, with a 5 s read timeout."""
    return socket.create_connection((LOOPBACK, relay.port), timeout=5, source_address=(source, 0))


# --- inbound STARTTLS ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_starttls_with_the_configured_certificate(sink: Sink, start_relay: Callable[..., Relay],
                                                  tls_certificate: tuple[Path, Path], event_loop: str) -> None:
    relay = start_relay(sink.port, server_tls_context(*tls_certificate), event_loop=event_loop)
    with relay.client() as client:
        assert client.has_extn("starttls")
        assert client.starttls(context=client_context(tls_certificate[0])) == (220, b"Ready to start TLS")
        client.ehlo()
        # nobody logs in at a relay: aiosmtpd's AUTH, offered after STARTTLS, is not advertised
        assert not client.has_extn("starttls") and not client.has_extn("auth")
        client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], MESSAGE)
    [(rcpt_tos, content)] = sink.messages
    assert rcpt_tos == ["annv@hcm.gov.vn"]
    assert b"\tby relay.test (mailmerge-gov relay) with ESMTPS id " in content


def test_require_tls_refuses_mail_before_starttls(sink: Sink, start_relay: Callable[..., Relay],
                                                  tls_certificate: tuple[Path, Path]) -> None:
    relay = start_relay(sink.port, server_tls_context(*tls_certificate), require_tls=True)
    with relay.client() as client:
        assert client.mail("alice@example.org") == (530, (
            b"5.7.0 May chu nay chi nhan thu qua ket noi ma hoa: hay gui lenh STARTTLS truoc.\n"
            b"5.7.0 Must issue a STARTTLS command first"))
        client.starttls(context=client_context(tls_certificate[0]))
        client.ehlo()
        assert client.mail("alice@example.org") == (250, b"2.1.0 OK")
    assert relay.handler.metrics.get("commands_refused_total", "tls-required") == 1


def test_require_tls_without_a_certificate_is_off(sink: Sink, start_relay: Callable[..., Relay]) -> None:
    # config.py refuses require_tls without a certificate; a library caller gets no STARTTLS and no 530
    relay = start_relay(sink.port, require_tls=True)
    with relay.client() as client:
        assert not client.has_extn("starttls")
        assert client.mail("alice@example.org") == (250, b"2.1.0 OK")


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_failed_tls_handshake_frees_the_connection(sink: Sink, start_relay: Callable[..., Relay],
                                                   tls_certificate: tuple[Path, Path],
                                                   caplog: pytest.LogCaptureFixture, event_loop: str) -> None:
    relay = start_relay(sink.port, server_tls_context(*tls_certificate), max_connections_per_ip=1,
                        event_loop=event_loop)
    with raw_connection(relay) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO mail.example.org\r\n")
        time.sleep(0.1)
        sock.recv(1024)
        sock.sendall(b"STARTTLS\r\n")
        assert sock.recv(1024) == b"220 Ready to start TLS\r\n"
        with caplog.at_level(logging.WARNING, logger="mailmerge_gov.forwarding"):
            sock.sendall(b"this is not a TLS client hello\r\n" * 4)
            read_all(sock)  # perhaps a TLS alert, then the end of the connection
            relay.wait_connections(0)
    assert [json.loads(r.getMessage())["event"] for r in caplog.records if r.name == "mailmerge_gov.forwarding"] == [
        "tls-failed"]
    assert relay.handler.per_ip == {} and relay.handler.metrics.get("tls_failures_total") == 1
    with relay.client() as client:  # counted once and released once: the one allowed connection is free
        assert client.noop() == (250, b"OK")


# --- connection limits --------------------------------------------------------------------------------------------


def test_connections_per_ip_and_overall(sink: Sink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, max_connections=3, max_connections_per_ip=2)
    first, second = relay.client(), relay.client()
    with raw_connection(relay) as sock:
        assert read_all(sock) == TOO_MANY_LINES  # no greeting: the reply, then the connection is closed
    other_ip = relay.client("127.0.0.2")  # another address still gets in: 3 connections in all
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        relay.client("127.0.0.3")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (421, TOO_MANY)
    first.quit()
    relay.wait_connections(2)
    with relay.client("127.0.0.3") as third:
        assert third.noop() == (250, b"OK")
    for client in (second, other_ip):
        client.quit()
    metrics = relay.handler.metrics
    assert (metrics.get("connections_refused_total", "max_connections_per_ip"),
            metrics.get("connections_refused_total", "max_connections"), metrics.get("connections_total")) == (1, 1, 4)
    relay.wait_connections(0)
    assert relay.handler.per_ip == {} and metrics.get("connections_open") == 0


# --- the error limit: RCPT floods -------------------------------------------------------------------------------

TOO_MANY_ERRORS_LINES = (b"421-4.7.0 Qua nhieu lenh bi tu choi; ket noi duoc dong lai.\r\n"
                         b"421 4.7.0 Error: too many errors\r\n")


@pytest.mark.parametrize(("recipient", "accepted", "refused"), [
    ("nobody@binhduong.gov.vn", 0, b"550 5.1.1 No such user <nobody@binhduong.gov.vn>\r\n"),  # unknown, again and again
    ("nguyenvana@binhduong.gov.vn", 1, b"452 4.5.3 Too many recipients (at most 1 per message)\r\n"),  # over the limit
    ("someone@example.com", 0, b"554 5.7.1 Relay access denied\r\n"),  # relaying attempts
])
def test_rcpt_flood_is_cut_off_at_the_error_limit(sink: Sink, start_relay: Callable[..., Relay], recipient: str,
                                                  accepted: int, refused: bytes) -> None:
    relay = start_relay(sink.port, max_recipients=1, max_errors=3)
    with raw_connection(relay) as sock:
        sock.sendall(b"EHLO mail.example.org\r\nMAIL FROM:<alice@example.org>\r\n"
                     + f"RCPT TO:<{recipient}>\r\n".encode("ascii") * 50)  # pipelined, as a flood comes
        answer = read_all(sock)  # until the relay closes the connection
    lines = answer.split(b"\r\n")
    assert answer.endswith(TOO_MANY_ERRORS_LINES)
    assert answer.count(b"\r\n250 2.1.5 ") + answer.count(b"\r\n250 OK") == accepted
    # three refusals (a reply's last line has a space after the code), then 421 and nothing more
    assert answer.count(refused) == 3 and len([line for line in lines if line[:4] in (b"550 ", b"452 ", b"554 ")]) == 3
    [record] = relay.wait_records(1)  # logged once the relay has seen the connection end
    assert record.result == "too many errors" and len(record.recipients) == accepted + 3
    assert relay.handler.metrics.get("error_limit_closes_total") == 1 and sink.messages == []


def test_the_error_limit_reached_by_aiosmtpds_own_closing_reply(sink: Sink, start_relay: Callable[..., Relay],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # aiosmtpd closes the connection itself after its fifth unknown command; that reply is the fifth refusal too
    relay = start_relay(sink.port, max_errors=5)
    with caplog.at_level(logging.INFO, logger="mailmerge_gov.forwarding"), raw_connection(relay) as sock:
        sock.sendall(b"EHLO mail.example.org\r\n" + b"XYZZY\r\n" * 5 + b"MAIL FROM:<alice@example.org>\r\n")
        answer = read_all(sock)
        relay.wait_connections(0)
    assert answer.split(b"\r\n")[-3:] == [b"421-4.7.0 Qua nhieu lenh bi tu choi; ket noi duoc dong lai.",
                                          b"421 4.7.0 Error: too many errors", b""]
    assert answer.count(b"500 Error: command \"XYZZY\" not recognized\r\n") == 4
    # no error from aiosmtpd closing a connection the relay had closed, and the pipelined MAIL never ran
    assert [json.loads(r.getMessage())["event"] for r in caplog.records
            if r.name == "mailmerge_gov.forwarding"] == ["too-many-errors"]


def test_the_error_count_starts_again_after_a_relayed_message(sink: Sink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, max_errors=3)
    with relay.client() as client:
        for _ in range(3):  # two refusals a transaction, then a message: never three refusals in a row
            client.mail("alice@example.org")
            assert [client.rcpt(to)[0] for to in ("nobody@binhduong.gov.vn", "lethic@binhduong.gov.vn",
                                                  "nguyenvana@binhduong.gov.vn")] == [550, 550, 250]
            assert client.data(MESSAGE)[0] == 250
        assert client.noop() == (250, b"OK")
    assert len(sink.messages) == 3 and relay.handler.metrics.get("error_limit_closes_total") == 0


# --- long lines ---------------------------------------------------------------------------------------------------

COMMAND_TOO_LONG = (500, b"5.5.2 Dong lenh qua dai.\n"
                         b"5.5.2 Command line too long (at most 512 octets, RFC 5321 section 4.5.3.1.4)")


@pytest.mark.parametrize("length", [600, 1100, 70_000])
def test_command_line_too_long(sink: Sink, start_relay: Callable[..., Relay], length: int) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        assert client.docmd("NOOP " + "x" * length) == COMMAND_TOO_LONG
        assert client.mail("alice@example.org") == (250, b"2.1.0 OK")  # the session goes on
    assert relay.handler.metrics.get("commands_refused_total", "command-too-long") == 1


def test_command_size_limit_does_not_grow_with_each_ehlo(sink: Sink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        for _ in range(20):
            client.ehlo()
        # MAIL may be 512 + 26 (SIZE) + 10 (SMTPUTF8) octets after EHLO, however often EHLO was said
        assert client.docmd("MAIL FROM:<" + "a" * 600 + "@example.org>") == COMMAND_TOO_LONG


def test_text_line_too_long_refuses_the_message(sink: Sink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.data(b"Subject: long\r\n\r\n" + b"x" * 1100 + b"\r\n") == (500, (
            b"5.6.0 Thu co dong qua dai; thu khong duoc chuyen tiep.\n"
            b"5.6.0 Line too long (at most 1000 octets per line, RFC 5321 section 4.5.3.1.6)"))
        # 998 characters and CRLF is the longest line allowed; the next-hop transaction is reset first
        client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"],
                        b"Subject: ok\r\n\r\n" + b"y" * 998 + b"\r\n")
    assert [content.endswith(b"y" * 998 + b"\r\n") for _, content in sink.messages] == [True]
    records = relay.records
    assert [r.result for r in records] == [
        "500 5.6.0 Thu co dong qua dai; thu khong duoc chuyen tiep. / "
        "Line too long (at most 1000 octets per line, RFC 5321 section 4.5.3.1.6)", "250 2.0.0 Ok: queued"]
    assert relay.handler.metrics.get("messages_rejected_total", "line-too-long") == 1


# --- timeouts -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_idle_client_gets_421_and_is_closed(sink: Sink, start_relay: Callable[..., Relay], event_loop: str) -> None:
    relay = start_relay(sink.port, timeout=0.5, event_loop=event_loop)
    client = relay.client()
    client.mail("alice@example.org")
    assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
    time.sleep(0.8)
    assert client.getreply() == (421, b"4.4.2 Qua 0.5 giay khong nhan duoc lenh; ket noi duoc dong lai.\n"
                                      b"4.4.2 Error: timeout exceeded (0.5 seconds without a command)")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    relay.wait_connections(0)
    deadline = time.monotonic() + 5
    while not relay.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.result for r in relay.records] == ["timeout"]
    assert relay.handler.metrics.get("timeouts_total") == 1


@pytest.mark.parametrize("sent", [
    pytest.param(b"MAIL FROM:<alice@example.org>", id="half-a-command"),
    pytest.param(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<nguyenvana@binhduong.gov.vn>\r\nDATA\r\nSubject: x\r\n",
                 id="stalled-in-data"),
])
def test_stalled_client_gets_421(sink: Sink, start_relay: Callable[..., Relay], sent: bytes) -> None:
    relay = start_relay(sink.port, timeout=0.5)
    with raw_connection(relay) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO mail.example.org\r\n" + sent)
        assert read_all(sock).endswith(TIMEOUT_LINES)
    assert sink.messages == []


def test_a_message_arriving_slowly_is_not_cut_off(sink: Sink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, timeout=0.5, min_data_rate=10)  # about 40 bytes a second come
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: slow\r\n\r\n")
        for _ in range(6):  # 1.2 s for the message, never 0.5 s without a byte
            time.sleep(0.2)
            client.send(b"more\r\n")
        client.send(b".\r\n")
        assert client.getreply() == (250, b"2.0.0 Ok: queued")
    [(_, content)] = sink.messages
    assert content.endswith(b"Subject: slow\r\n\r\n" + b"more\r\n" * 6)


TOO_SLOW_LINES = (b"421-4.4.2 Thu duoc gui qua cham (duoi 100 byte moi giay sau 0.5 giay dau); ket noi duoc dong lai, "
                  b"hay gui lai sau.\r\n"
                  b"421 4.4.2 Error: message data too slow (under 100 bytes per second after the first 0.5 seconds)\r\n")


def test_a_message_trickling_in_below_the_minimum_rate_is_cut_off(sink: Sink,
                                                                   start_relay: Callable[..., Relay]) -> None:
    # a byte every 0.1 s never leaves the connection silent for `timeout`, but stays under min_data_rate
    relay = start_relay(sink.port, timeout=0.5, min_data_rate=100)
    with raw_connection(relay) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO mail.example.org\r\nMAIL FROM:<alice@example.org>\r\n"
                     b"RCPT TO:<nguyenvana@binhduong.gov.vn>\r\nDATA\r\n")
        began = time.monotonic()
        answer = b""
        while not answer.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
            answer += sock.recv(1024)
        sock.sendall(b"Subject: slow\r\n\r\n")
        try:
            while time.monotonic() - began < 5:
                time.sleep(0.1)
                sock.sendall(b"y")
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off, as it should be
        assert read_all(sock).endswith(TOO_SLOW_LINES)
        assert time.monotonic() - began < 3  # 0.5 s, then 100 bytes a second of what came: about 0.7 s
    [record] = relay.wait_records(1)
    assert record.result == "timeout" and sink.messages == []
    assert relay.handler.metrics.get("timeouts_total") == 1


# --- metrics ------------------------------------------------------------------------------------------------------


def test_metrics_after_one_relayed_and_one_refused(sink: Sink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, max_recipients=1)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("nobody@binhduong.gov.vn")[0] == 550
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
        assert client.rcpt("lethic@binhduong.gov.vn")[0] == 452  # over max_recipients before the map is asked
        assert client.data(MESSAGE)[0] == 250
    relay.wait_connections(0)
    text = relay.metrics()
    counters, histogram = text.split("# HELP mailmerge_relay_next_hop_seconds ")
    assert counters == COUNTERS
    samples = dict(line.rsplit(" ", 1) for line in histogram.splitlines()[2:])
    assert [samples[f'mailmerge_relay_next_hop_seconds_count{{command="{c}"}}'] for c in
            ("connect", "mail", "rcpt", "data", "rset")] == ["1", "1", "1", "1", "0"]
    assert samples['mailmerge_relay_next_hop_seconds_bucket{command="rcpt",le="+Inf"}'] == "1"
    assert float(samples['mailmerge_relay_next_hop_seconds_sum{command="data"}']) > 0


COUNTERS = """\
# HELP mailmerge_relay_connections_total Client connections accepted.
# TYPE mailmerge_relay_connections_total counter
mailmerge_relay_connections_total 1
# HELP mailmerge_relay_connections_refused_total Client connections refused with 421 4.7.0 at a connection limit.
# TYPE mailmerge_relay_connections_refused_total counter
mailmerge_relay_connections_refused_total{limit="max_connections"} 0
mailmerge_relay_connections_refused_total{limit="max_connections_per_ip"} 0
# HELP mailmerge_relay_connections_open Client connections open now.
# TYPE mailmerge_relay_connections_open gauge
mailmerge_relay_connections_open 0
# HELP mailmerge_relay_recipients_accepted_total Recipients accepted (the next hop accepted the new address).
# TYPE mailmerge_relay_recipients_accepted_total counter
mailmerge_relay_recipients_accepted_total 1
# HELP mailmerge_relay_recipients_rejected_total Recipients refused with a 5xx reply, by reason.
# TYPE mailmerge_relay_recipients_rejected_total counter
mailmerge_relay_recipients_rejected_total{reason="unknown"} 1
mailmerge_relay_recipients_rejected_total{reason="moved"} 0
mailmerge_relay_recipients_rejected_total{reason="relay-denied"} 0
mailmerge_relay_recipients_rejected_total{reason="srs-not-bounce"} 0
mailmerge_relay_recipients_rejected_total{reason="srs-invalid"} 0
mailmerge_relay_recipients_rejected_total{reason="smtputf8-required"} 0
mailmerge_relay_recipients_rejected_total{reason="next-hop"} 0
# HELP mailmerge_relay_recipients_deferred_total Recipients answered with a 4xx reply (the client retries), by reason.
# TYPE mailmerge_relay_recipients_deferred_total counter
mailmerge_relay_recipients_deferred_total{reason="too-many-recipients"} 1
mailmerge_relay_recipients_deferred_total{reason="next-hop-unavailable"} 0
mailmerge_relay_recipients_deferred_total{reason="next-hop-deferred"} 0
mailmerge_relay_recipients_deferred_total{reason="internal-error"} 0
# HELP mailmerge_relay_messages_relayed_total Messages the next hop accepted.
# TYPE mailmerge_relay_messages_relayed_total counter
mailmerge_relay_messages_relayed_total 1
# HELP mailmerge_relay_messages_rejected_total Messages refused with a 5xx reply, by reason.
# TYPE mailmerge_relay_messages_rejected_total counter
mailmerge_relay_messages_rejected_total{reason="loop"} 0
mailmerge_relay_messages_rejected_total{reason="next-hop"} 0
mailmerge_relay_messages_rejected_total{reason="too-large"} 0
mailmerge_relay_messages_rejected_total{reason="line-too-long"} 0
# HELP mailmerge_relay_messages_deferred_total Messages answered with a 4xx reply (the client retries), by reason.
# TYPE mailmerge_relay_messages_deferred_total counter
mailmerge_relay_messages_deferred_total{reason="next-hop-unavailable"} 0
mailmerge_relay_messages_deferred_total{reason="next-hop-deferred"} 0
mailmerge_relay_messages_deferred_total{reason="internal-error"} 0
# HELP mailmerge_relay_commands_refused_total Client commands refused before the relay looked at them, by reason.
# TYPE mailmerge_relay_commands_refused_total counter
mailmerge_relay_commands_refused_total{reason="tls-required"} 0
mailmerge_relay_commands_refused_total{reason="command-too-long"} 0
# HELP mailmerge_relay_tls_failures_total STARTTLS handshakes that failed (the connection is closed).
# TYPE mailmerge_relay_tls_failures_total counter
mailmerge_relay_tls_failures_total 0
# HELP mailmerge_relay_timeouts_total Client connections closed with 421 after [relay] timeout seconds of silence.
# TYPE mailmerge_relay_timeouts_total counter
mailmerge_relay_timeouts_total 0
# HELP mailmerge_relay_error_limit_closes_total Client connections closed with 421 after [relay] max_errors refused commands without a message relayed.
# TYPE mailmerge_relay_error_limit_closes_total counter
mailmerge_relay_error_limit_closes_total 0
"""


def test_metrics_count_refused_messages(start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(free_port(), max_message_size=2000)  # nothing listens at the next hop
    with relay.client() as client:
        assert client.mail("alice@example.org", ["SIZE=5000"])[0] == 552
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 451
    relay.wait_connections(0)
    lines = relay.metrics().splitlines()
    assert 'mailmerge_relay_messages_rejected_total{reason="too-large"} 1' in lines
    assert 'mailmerge_relay_recipients_deferred_total{reason="next-hop-unavailable"} 1' in lines
    assert 'mailmerge_relay_next_hop_seconds_count{command="connect"} 1' in lines


@pytest.mark.parametrize(("request_line", "status"), [
    (b"GET / HTTP/1.0", b"HTTP/1.0 404 Not Found"),
    (b"GET /metrics/x HTTP/1.1", b"HTTP/1.0 404 Not Found"),
    (b"POST /metrics HTTP/1.0", b"HTTP/1.0 405 Method Not Allowed"),
    (b"hello", b"HTTP/1.0 400 Bad Request"),
])
def test_metrics_endpoint_answers_get_metrics_only(sink: Sink, start_relay: Callable[..., Relay],
                                                   request_line: bytes, status: bytes) -> None:
    relay = start_relay(sink.port)
    with socket.create_connection((LOOPBACK, relay.metrics_port), timeout=5) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        assert read_all(sock).split(b"\r\n", 1)[0] == status


# --- [relay] keys -------------------------------------------------------------------------------------------------


def relay_config(tmp_path: Path, relay: str, map_text: str = MAP) -> Path:
    """This file's relay config: the files-only consolidation, a [relay] table and this file's address map."""
    return configs.relay_config(tmp_path, relay, map_text)


def test_hardening_keys(tmp_path: Path) -> None:
    relay = load_config(relay_config(tmp_path, 'tls_cert_file = "cert.pem"\ntls_key_file = "/etc/key.pem"\n'
                                               'require_tls = true\nmax_connections = 50\nmax_connections_per_ip = 5\n'
                                               'metrics_listen = "[::1]:9425"\nevent_loop = "asyncio"\n'
                                               'max_errors = 5\nmin_data_rate = 0\n')).relay
    assert (relay.tls_cert_file, relay.tls_key_file, relay.require_tls, relay.max_connections,
            relay.max_connections_per_ip, relay.metrics_listen, relay.event_loop, relay.max_errors,
            relay.min_data_rate) == (tmp_path / "cert.pem", Path("/etc/key.pem"), True, 50, 5, ("::1", 9425), "asyncio",
                                     5, 0)


def test_hardening_defaults(tmp_path: Path) -> None:
    relay = load_config(relay_config(tmp_path, "")).relay
    assert (relay.tls_cert_file, relay.tls_key_file, relay.require_tls, relay.max_connections,
            relay.max_connections_per_ip, relay.metrics_listen, relay.event_loop, relay.max_errors,
            relay.min_data_rate) == (None, None, False, 200, 20, None, "auto", 20, 500)


@pytest.mark.parametrize(("relay", "message"), [
    ('tls_cert_file = "cert.pem"\n', "relay.tls_cert_file: tls_cert_file needs tls_key_file (the certificate's "
                                     "private key)"),
    ('tls_key_file = "key.pem"\n', "relay.tls_key_file: tls_key_file needs tls_cert_file (the certificate it "
                                   "belongs to)"),
    ("require_tls = true\n", "relay.require_tls: require_tls needs tls_cert_file and tls_key_file (STARTTLS is "
                             "offered only with a certificate)"),
    ('require_tls = "yes"\n', "relay.require_tls: expected true or false, got a string ('yes')"),
    ("max_connections = 0\n", "relay.max_connections: must be greater than 0, got 0"),
    ("max_connections = 10\n", "relay.max_connections_per_ip: must be at most max_connections (10), got 20"),
    ('metrics_listen = "9425"\n', "relay.metrics_listen: '9425' is not host:port (use [::1]:25 for IPv6)"),
    ('metrics_listen = "0.0.0.0:9425"\n', "relay.metrics_listen: '0.0.0.0:9425' is not a loopback address: the metrics "
                                       "are served without a login, so only on 127.0.0.1, [::1] or localhost"),
    ('metrics_listen = "[2001:db8::1]:9425"\n', "relay.metrics_listen: '[2001:db8::1]:9425' is not a loopback address: "
                                             "the metrics are served without a login, so only on 127.0.0.1, [::1] "
                                             "or localhost"),
    ("max_errors = 0\n", "relay.max_errors: must be greater than 0, got 0"),
    ("min_data_rate = -1\n", "relay.min_data_rate: must be 0 or more, got -1"),
    ('event_loop = "trio"\n', "relay.event_loop: must be \"auto\", \"uvloop\" or \"asyncio\", got a string ('trio')"),
])
def test_hardening_key_errors(tmp_path: Path, relay: str, message: str) -> None:
    path = relay_config(tmp_path, relay)
    text = configs.config_error(path)
    assert text.startswith(f"{path}, line ") and text.split(": ", 1)[1] == message


@pytest.mark.parametrize(("choice", "installed", "runs_on"), [
    ("auto", True, "uvloop"), ("auto", False, "asyncio"), ("uvloop", True, "uvloop"), ("asyncio", True, "asyncio"),
    ("uvloop", False, "[relay] event_loop: uvloop cannot be imported in the relay's environment (pip install "
                      "uvloop, or event_loop = \"asyncio\")"),
])
def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch, choice: str, installed: bool, runs_on: str) -> None:
    if not installed:
        monkeypatch.setitem(sys.modules, "uvloop", None)  # what Python does for a module that cannot be imported
    try:
        got = eventloop.resolve(choice)
    except eventloop.EventLoopError as exc:
        got = str(exc)
    assert got == runs_on
    if got in ("uvloop", "asyncio"):
        loop = eventloop.loop_factory(choice)()
        try:
            assert type(loop).__module__.split(".")[0] == got
        finally:
            loop.close()


@pytest.mark.parametrize(("cert", "key", "message"), [
    ("cert", "missing.pem", "[relay] tls_key_file: cannot read {dir}/missing.pem: No such file or directory"),
    ("cert", "cert", "[relay] tls_key_file: {cert} is not a PEM private key (-----BEGIN PRIVATE KEY-----)"),
    ("key", "key", "[relay] tls_cert_file: {key} is not a PEM certificate (-----BEGIN CERTIFICATE-----)"),
])
def test_relay_serve_refuses_an_unusable_certificate(tmp_path: Path, tls_certificate: tuple[Path, Path], cert: str,
                                                     key: str, message: str) -> None:
    files = {"cert": tls_certificate[0], "key": tls_certificate[1], "missing.pem": tmp_path / "missing.pem"}
    path = relay_config(tmp_path, f'map = "map.csv"\nnext_hop = "smtp://127.0.0.1:2"\ntls_cert_file = "{files[cert]}"\n'
                                  f'tls_key_file = "{files[key]}"\n')
    result = CliRunner().invoke(cli, ["relay", "serve", "-c", str(path)], prog_name="mailmerge-gov")
    expected = message.format(dir=tmp_path, cert=tls_certificate[0], key=tls_certificate[1])
    assert (result.exit_code, result.output) == (1, f"Error: {expected}\n")


def test_key_of_another_certificate_is_refused(tmp_path: Path, tls_certificate: tuple[Path, Path]) -> None:
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out",
                    str(other)], check=True, capture_output=True)
    path = relay_config(tmp_path, f'map = "map.csv"\nnext_hop = "smtp://127.0.0.1:2"\n'
                                  f'tls_cert_file = "{tls_certificate[0]}"\ntls_key_file = "other.pem"\n')
    result = CliRunner().invoke(cli, ["relay", "serve", "-c", str(path)], prog_name="mailmerge-gov")
    assert (result.exit_code, result.output) == (
        1, f"Error: [relay] tls_key_file: {other} is not the key of the certificate in {tls_certificate[0]}\n")


# --- relay serve: TLS, limits and metrics from the consolidation file ---------------------------------------------


@pytest.mark.parametrize(("workers", "event_loop", "runs_on"), [(1, "auto", "uvloop"), (2, "auto", "uvloop"),
                                                              (1, "asyncio", "asyncio"), (2, "asyncio", "asyncio")])
def test_serve_with_tls_and_metrics(tmp_path: Path, sink: Sink, tls_certificate: tuple[Path, Path],
                                    workers: int, event_loop: str, runs_on: str) -> None:
    port, metrics_port = free_port(), free_port()
    config = relay_config(tmp_path, f'listen = "{LOOPBACK}:{port}"\nhostname = "relay.test"\nmap = "map.csv"\n'
                                    f'next_hop = "smtp://{LOOPBACK}:{sink.port}"\nnext_hop_timeout = 5\n'
                                    f'tls_cert_file = "{tls_certificate[0]}"\ntls_key_file = "{tls_certificate[1]}"\n'
                                    f'require_tls = true\nmax_connections_per_ip = 1\n'
                                    f'metrics_listen = "{LOOPBACK}:{metrics_port}"\nworkers = {workers}\n'
                                    f'event_loop = "{event_loop}"\n')
    proc = subprocess.Popen(tied([sys.executable, "-m", "mailmerge_gov", "relay", "serve", "-c", str(config)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ.copy(), start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(raw.decode()) for raw in proc.stderr or ()], daemon=True).start()
    try:
        listening = json.loads(lines.get(timeout=10))  # the first line the relay writes
        assert (listening["event"], listening["starttls"], listening["require_tls"], listening["metrics"],
                listening["workers"], listening["event_loop"]) == (
            "listening", True, True, f"{LOOPBACK}:{metrics_port}", workers, runs_on)
        with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
            client.ehlo("mail.example.org")
            assert client.mail("alice@example.org")[0] == 530
            with pytest.raises(smtplib.SMTPConnectError):  # one connection per IP address
                smtplib.SMTP(LOOPBACK, port, timeout=10)
            client.starttls(context=client_context(tls_certificate[0]))
            client.ehlo("mail.example.org")
            client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], MESSAGE)
        url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        deadline = time.monotonic() + 5
        while True:  # until the relay has seen the client leave
            with urllib.request.urlopen(url, timeout=5) as response:
                metrics = response.read().decode().splitlines()
            if "mailmerge_relay_connections_open 0" in metrics or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert [line for line in metrics if not line.startswith("#") and not line.endswith(" 0")
                and "_bucket" not in line and "_sum" not in line] == [
            "mailmerge_relay_connections_total 1",
            'mailmerge_relay_connections_refused_total{limit="max_connections_per_ip"} 1',
            "mailmerge_relay_recipients_accepted_total 1",
            "mailmerge_relay_messages_relayed_total 1",
            'mailmerge_relay_commands_refused_total{reason="tls-required"} 1',
            'mailmerge_relay_next_hop_seconds_count{command="connect"} 1',
            'mailmerge_relay_next_hop_seconds_count{command="mail"} 1',
            'mailmerge_relay_next_hop_seconds_count{command="rcpt"} 1',
            'mailmerge_relay_next_hop_seconds_count{command="data"} 1',
        ]
        assert len(sink.messages) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        with pytest.raises(urllib.error.URLError):  # the metrics port closes with the relay
            urllib.request.urlopen(url, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- ARC seal -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    """RSA keys made with openssl, for the sender's DKIM and the relay's ARC: name -> (key file, TXT record)."""
    try:
        import authres  # noqa: F401
        import dkim  # noqa: F401
    except ImportError as exc:  # a failure saying what to install, like a missing server program (never a skip)
        pytest.fail(f"the ARC tests need dkimpy with its ARC extra (authres): pip install 'dkimpy[ARC]' ({exc})",
                    pytrace=False)
    folder = tmp_path_factory.mktemp("dkim")
    keys = {}
    for name in ("sender", "arc"):
        key = folder / f"{name}.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:2048",
                        "-out", str(key)], check=True, capture_output=True)
        public = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                                capture_output=True).stdout
        keys[name] = (key, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public))
    return keys


def dns_of(keys: dict[str, tuple[Path, bytes]]) -> Callable[..., bytes | None]:
    """A TXT lookup answering for the two test keys (there is no DNS here)."""
    records = {b"sel._domainkey.example.org": keys["sender"][1], b"arc._domainkey.binhduong.gov.vn": keys["arc"][1]}
    return lambda name, timeout=5: records.get(name.rstrip(b"."))


def sealer(keys: dict[str, tuple[Path, bytes]]) -> ArcSealer:
    """The relay's ARC sealer with the test key and DNS."""
    return ArcSealer("arc", "binhduong.gov.vn", keys["arc"][0].read_bytes(), "relay.test", dnsfunc=dns_of(keys))


def signed(keys: dict[str, tuple[Path, bytes]], message: bytes = MESSAGE) -> bytes:
    """The message with the sender's DKIM signature on top."""
    import dkim

    return dkim.sign(message, b"sel", b"example.org", keys["sender"][0].read_bytes(),
                     include_headers=[b"from", b"subject"]) + message


def field(message: bytes, name: bytes) -> bytes:
    """The unfolded value of the first header field `name`."""
    for line in message.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ").split(b"\r\n"):
        if line.lower().startswith(name.lower() + b":"):
            return b" ".join(line.split(b":", 1)[1].split())
    raise AssertionError(f"no {name!r} field")


def test_arc_seal_over_an_intact_dkim_signature(sink: Sink, start_relay: Callable[..., Relay],
                                                dkim_keys: dict[str, tuple[Path, bytes]]) -> None:
    import dkim

    relay = start_relay(sink.port, arc=sealer(dkim_keys))
    with relay.client() as client:
        assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], signed(dkim_keys)) == {}
    [(_, content)] = sink.messages
    assert [line.split(b":")[0] for line in content.split(b"\r\n") if line[:1].isalpha()][:7] == [
        b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results", b"Authentication-Results",
        b"Received", b"Delivered-To", b"DKIM-Signature"]
    assert field(content, b"ARC-Authentication-Results") == (
        b"i=1; relay.test; dkim=pass header.d=example.org header.s=sel; arc=none")
    assert field(content, b"Authentication-Results") == b"relay.test; dkim=pass header.d=example.org header.s=sel; arc=none"
    dns = dns_of(dkim_keys)
    assert dkim.arc_verify(content, dnsfunc=dns)[0] == b"pass"
    assert dkim.verify(content, dnsfunc=dns)  # the sender's signature still verifies at the next hop


def test_sealing_after_a_message_that_came_late_in_its_time_is_not_cut_off(
        sink: Sink, start_relay: Callable[..., Relay], dkim_keys: dict[str, tuple[Path, bytes]]) -> None:
    # The message comes whole 0.5 s into a 1 s timeout, with min_data_rate too high for more to come in time:
    # 0.5 s of its deadline are left. The seal's DNS lookup then takes 0.75 s: the relay must not say 421.
    import dataclasses

    lookup = dns_of(dkim_keys)

    def slow_dns(name: bytes, timeout: float = 5) -> bytes | None:
        time.sleep(0.75)
        return lookup(name, timeout)

    relay = start_relay(sink.port, timeout=1.0, min_data_rate=10**9,
                        arc=dataclasses.replace(sealer(dkim_keys), dnsfunc=slow_dns))
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.docmd("DATA")[0] == 354
        time.sleep(0.5)
        client.send(signed(dkim_keys) + b".\r\n")
        assert client.getreply()[0] == 250
    [(_, content)] = sink.messages
    assert field(content, b"Authentication-Results") == b"relay.test; dkim=pass header.d=example.org header.s=sel; arc=none"


def test_arc_seal_records_a_broken_signature(sink: Sink, start_relay: Callable[..., Relay],
                                             dkim_keys: dict[str, tuple[Path, bytes]]) -> None:
    import dkim

    relay = start_relay(sink.port, arc=sealer(dkim_keys))
    with relay.client() as client:
        client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"],
                        signed(dkim_keys).replace(b"Xin chao", b"Xin chao, changed on the way"))
    [(_, content)] = sink.messages
    assert field(content, b"ARC-Authentication-Results") == (
        b"i=1; relay.test; dkim=fail header.d=example.org header.s=sel; arc=none")
    assert dkim.arc_verify(content, dnsfunc=dns_of(dkim_keys))[0] == b"pass"  # our seal of what we saw is sound


def test_message_that_cannot_be_sealed_is_relayed_unsealed(sink: Sink, start_relay: Callable[..., Relay],
                                                           dkim_keys: dict[str, tuple[Path, bytes]],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    relay = start_relay(sink.port, arc=sealer(dkim_keys))
    with caplog.at_level(logging.WARNING, logger="mailmerge_gov.forwarding"), relay.client() as client:
        # ARC must sign From (RFC 8617 4.1.2): dkimpy refuses a message without one
        message = b"Subject: x\r\n\r\nbody\r\n"
        assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], message) == {}
    [(_, content)] = sink.messages
    assert content.startswith(b"Received: ")
    [logged] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mailmerge_gov.forwarding"]
    assert (logged["event"], logged["reason"]) == ("arc-not-sealed",
                                                   "ParameterError: The From header field MUST be signed")


def test_arc_keys(tmp_path: Path, dkim_keys: dict[str, tuple[Path, bytes]]) -> None:
    relay = load_config(relay_config(tmp_path, f'arc_selector = "arc2026"\narc_domain = "BinhDuong.gov.vn"\n'
                                               f'arc_key_file = "{dkim_keys["arc"][0]}"\n')).relay
    assert (relay.arc_selector, relay.arc_domain, relay.arc_key_file) == (
        "arc2026", "binhduong.gov.vn", dkim_keys["arc"][0])


@pytest.mark.parametrize(("relay", "message"), [
    ('arc_selector = "arc"\n', "relay.arc_selector: ARC sealing needs arc_selector, arc_domain and arc_key_file; "
                               "arc_domain and arc_key_file are missing"),
    ('arc_domain = "binhduong.gov.vn"\narc_key_file = "k.pem"\n',
     "relay.arc_domain: ARC sealing needs arc_selector, arc_domain and arc_key_file; arc_selector is missing"),
    ('arc_selector = "a b"\narc_domain = "binhduong.gov.vn"\narc_key_file = "k.pem"\n',
     "relay.arc_selector: 'a b' is not a DKIM selector (DNS labels: letters, digits, '-')"),
])
def test_arc_key_errors(tmp_path: Path, relay: str, message: str) -> None:
    path = relay_config(tmp_path, relay)
    assert configs.config_error(path).split(": ", 1)[1] == message


def test_relay_serve_refuses_an_unusable_arc_key(tmp_path: Path, tls_certificate: tuple[Path, Path],
                                                 dkim_keys: dict[str, tuple[Path, bytes]]) -> None:
    path = relay_config(tmp_path, f'map = "map.csv"\nnext_hop = "smtp://127.0.0.1:2"\narc_selector = "arc"\n'
                                  f'arc_domain = "binhduong.gov.vn"\narc_key_file = "{tls_certificate[0]}"\n')
    result = CliRunner().invoke(cli, ["relay", "serve", "-c", str(path)], prog_name="mailmerge-gov")
    assert (result.exit_code, result.output) == (
        1, f"Error: [relay] arc_key_file: {tls_certificate[0]} is not an RSA private key in PEM form (openssl genpkey "
           "-algorithm rsa -pkeyopt rsa_keygen_bits:2048 makes one)\n")
