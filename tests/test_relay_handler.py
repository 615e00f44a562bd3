"""The relay on real loopback sockets: smtplib as the sending client, aiosmtpd or Postfix smtp-sink as the next hop."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from conftest import started
from mailmerge_gov.forwarding.addressmap import AddressMap, parse_map
from mailmerge_gov.forwarding.handler import HEADER_ALLOWANCE, RelayHandler, RelaySettings, TransactionRecord
from mailmerge_gov.forwarding.nexthop import NextHopSettings
from mailmerge_gov.forwarding.smtpdata import unstuff
from mailmerge_gov.forwarding.srs import Srs
from servers import EVENT_LOOPS, LOOPBACK, Relay, SmtpSink, free_port, relay_in_thread

OLD_DOMAINS = ("binhduong.gov.vn", "brvt.gov.vn")
MAP = """\
old_address,new_address,valid_until
nguyenvana@binhduong.gov.vn,annv@hcm.gov.vn,2026-06-30
tranthib@binhduong.gov.vn,btt@hcm.gov.vn,2026-06-30
tran.thi.b@brvt.gov.vn,btt@hcm.gov.vn,2026-06-30
lethic@binhduong.gov.vn,clt@hcm.gov.vn,2025-12-31
trần@binhduong.gov.vn,tranvan@hcm.gov.vn,2026-06-30
phamd@binhduong.gov.vn,rejectme@hcm.gov.vn,2026-06-30
hoange@binhduong.gov.vn,full@hcm.gov.vn,2026-06-30
"""
ICT = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 1, 15, 19, 0, tzinfo=ICT)  # 12:00 UTC, the SRS tests' clock
SRS_DOMAIN = "srs.binhduong.gov.vn"
SECRETS = ("thisisthefirstsecret123", "anolderonestillverifies")
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: nguyenvana@binhduong.gov.vn\r\n"
           b"Subject: =?utf-8?q?Th=C6=B0_th=E1=BB=AD?=\r\nMessage-ID: <1@example.org>\r\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from:to:subject;\r\n"
           b"\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\r\n"
           b"\r\n"
           b"Xin ch\xc3\xa0o,  \r\n.a line that starts with a dot\r\n..two dots\r\n\tindented\r\n\r\n\r\n")


# --- the next hop: an aiosmtpd sink that keeps what it gets and answers what a test tells it to ------------------


@dataclass
class Delivered:
    """One message as the next hop received it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class SinkHandler:
    """aiosmtpd handler of the next hop."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    delays: dict[str, float] = field(default_factory=dict)
    messages: list[Delivered] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.commands.append(f"MAIL {address} {' '.join(options)}".strip())
        await asyncio.sleep(self.delays.get("MAIL", 0))
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.commands.append(f"RCPT {address}")
        await asyncio.sleep(self.delays.get("RCPT", 0))
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("RSET")
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("DATA")
        await asyncio.sleep(self.delays.get("DATA", 0))
        if self.data_reply:
            return self.data_reply
        self.messages.append(Delivered(envelope.mail_from or "", list(envelope.rcpt_tos),
                                       envelope.original_content or b"", list(envelope.mail_options)))
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"


def next_hop(**options: Any) -> Iterator[SinkHandler]:
    """A fresh aiosmtpd next hop on a free loopback port (its port in .port), with more Controller options."""
    handler = SinkHandler()
    controller = Controller(handler, hostname=LOOPBACK, port=free_port(), server_hostname="mx.hcm.test", **options)
    controller.start()
    handler.port = controller.port  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def sink() -> Iterator[SinkHandler]:
    """A next hop that announces what aiosmtpd announces (SMTPUTF8 among it)."""
    yield from next_hop()


# --- the relay -------------------------------------------------------------------------------------------------


@pytest.fixture
def address_map() -> AddressMap:
    return parse_map(MAP, "map.csv", OLD_DOMAINS)


@pytest.fixture
def start_relay(address_map: AddressMap) -> Iterator[Callable[..., Relay]]:
    """Return a function that starts a relay in front of a next hop port; stopped at the end of the test."""
    controllers = []

    def start(next_hop_port: int, srs: bool = True, next_hop_timeout: float = 2.0, event_loop: str = "auto",
              **limits: Any) -> Relay:
        settings = RelaySettings(
            next_hop=NextHopSettings(LOOPBACK, next_hop_port, timeout=next_hop_timeout, local_hostname="relay.test"),
            hostname="relay.test", **{"max_recipients": 3, "max_hops": 5, "max_message_size": 100_000, **limits})
        srs_value = Srs(SRS_DOMAIN, SECRETS, exempt_domains=frozenset(OLD_DOMAINS + ("hcm.gov.vn",))) if srs else None
        return relay_in_thread(
            lambda log: RelayHandler(address_map, settings, srs_value, clock=lambda: NOW, on_transaction=log),
            controllers, event_loop)

    yield start
    for controller in controllers:
        controller.stop()


def received_of(record: TransactionRecord, recipient: str | None) -> bytes:
    """The Received field the relay writes for a transaction of these tests."""
    for_clause = f"\tfor <{recipient}>; Thu, 15 Jan 2026 19:00:00 +0700" if recipient else \
        "\tThu, 15 Jan 2026 19:00:00 +0700"
    by = f"\tby relay.test (mailmerge-gov relay) with ESMTP id {record.id}" + ("" if recipient else ";")
    return f"Received: from mail.example.org ([127.0.0.1])\r\n{by}\r\n{for_clause}\r\n".encode()


# --- forwarding ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_forward_relays_exact_bytes_with_srs(sink: SinkHandler, start_relay: Callable[..., Relay], event_loop: str) -> None:
    relay = start_relay(sink.port, event_loop=event_loop)
    with relay.client() as client:
        assert client.mail("alice@example.org") == (250, b"2.1.0 OK")
        assert client.rcpt("NguyenVanA@BinhDuong.gov.vn") == (250, b"2.1.5 Ok")
        assert client.data(MESSAGE) == (250, b"2.0.0 Ok: queued as Q1")
    [record] = relay.wait_records(1)
    [message] = sink.messages
    assert message.mail_from == "SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn"
    assert message.rcpt_tos == ["annv@hcm.gov.vn"]
    # DKIM: two header fields on top, every original byte after them unchanged
    assert message.content == (received_of(record, "NguyenVanA@BinhDuong.gov.vn")
                               + b"Delivered-To: NguyenVanA@BinhDuong.gov.vn\r\n" + MESSAGE)
    assert (record.client, record.helo, record.mail_from, record.relayed_from, record.size, record.next_hop,
            record.result) == ("127.0.0.1", "mail.example.org", "alice@example.org",
                               "SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn", len(message.content),
                               "250 2.0.0 Ok: queued as Q1", "250 2.0.0 Ok: queued as Q1")
    assert [(r.to, r.verdict, r.new, r.reply) for r in record.recipients] == [
        ("NguyenVanA@BinhDuong.gov.vn", "forward", "annv@hcm.gov.vn", "250 2.1.5 Ok")]


def test_next_hop_is_asked_during_the_session(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org", ["SIZE=1000", "BODY=8BITMIME"])
        client.rcpt("nguyenvana@binhduong.gov.vn")
        # before DATA the next hop has already seen MAIL and RCPT: its verdict is the relay's
        assert sink.commands == ["MAIL SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn SIZE=3048 BODY=8BITMIME",
                                 "RCPT annv@hcm.gov.vn"]
        client.rset()
        client.mail("bob@example.org")
        client.rcpt("tranthib@binhduong.gov.vn")
        assert client.data(MESSAGE)[0] == 250
    assert sink.commands[2:] == ["RSET", "MAIL SRS0=gHJ/F/=7U=example.org=bob@srs.binhduong.gov.vn",
                                 "RCPT btt@hcm.gov.vn", "DATA"]
    records = relay.wait_records(2)
    assert [r.result for r in records] == ["no DATA (RSET)", "250 2.0.0 Ok: queued as Q1"]


def test_sender_in_an_old_or_new_domain_is_not_rewritten(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.sendmail("vanthu@binhduong.gov.vn", ["nguyenvana@binhduong.gov.vn"], MESSAGE)
        client.sendmail("", ["nguyenvana@binhduong.gov.vn"], MESSAGE)
    assert [m.mail_from for m in sink.messages] == ["vanthu@binhduong.gov.vn", "<>"]


def test_without_srs_the_sender_is_kept(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, srs=False)
    with relay.client() as client:
        client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], MESSAGE)
    assert sink.messages[0].mail_from == "alice@example.org"


def test_several_recipients_one_message_no_delivered_to(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert [client.rcpt(a)[0] for a in ("nguyenvana@binhduong.gov.vn", "tranthib@binhduong.gov.vn",
                                            "tran.thi.b@brvt.gov.vn")] == [250, 250, 250]
        assert client.data(MESSAGE)[0] == 250
    [record] = relay.wait_records(1)
    [message] = sink.messages
    # two old addresses of one official: the next hop gets one RCPT; and no Delivered-To or "for" that would
    # tell each recipient who else (Bcc too) received it
    assert message.rcpt_tos == ["annv@hcm.gov.vn", "btt@hcm.gov.vn"]
    assert message.content == received_of(record, None) + MESSAGE


def test_srs_bounce_goes_back_to_the_original_sender(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    bounce_to = "SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn"
    with relay.client() as client:
        client.mail("<>")
        assert client.rcpt(bounce_to) == (250, b"2.1.5 Ok")
        assert client.data(b"Subject: Undelivered Mail\r\n\r\nsorry\r\n")[0] == 250
        client.mail("mallory@example.org")
        assert client.rcpt(bounce_to) == (550, b"5.7.1 Dia chi tra thu nay chi nhan thu bao loi gui (MAIL FROM:<>).\n"
                                                b"5.7.1 This return address accepts bounces only")
        client.rset()
        client.mail("<>")
        forged = "SRS0=AAAAAA=7U=example.org=alice@srs.binhduong.gov.vn"
        assert client.rcpt(forged) == (550, b"5.1.1 Dia chi tra thu khong hop le hoac da het han.\n"
                                            b"5.1.1 Invalid or expired return address")
    assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [("<>", ["alice@example.org"])]


def test_smtputf8_recipient(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.command_encoding = "utf-8"  # a client that sends UTF-8 without asking for SMTPUTF8
        assert client.rcpt("trần@binhduong.gov.vn") == (553, (
            "5.6.7 Dia chi co ky tu ngoai ASCII chi duoc nhan khi lenh MAIL co tham so SMTPUTF8.\n"
            "5.6.7 Non-ASCII address without the SMTPUTF8 parameter").encode())
        client.rset()
        client.mail("alice@example.org", ["SMTPUTF8"])
        assert client.rcpt("trần@binhduong.gov.vn") == (250, b"2.1.5 Ok")
        assert client.data(MESSAGE)[0] == 250
    assert sink.messages[0].rcpt_tos == ["tranvan@hcm.gov.vn"]
    assert "SMTPUTF8" in sink.messages[0].mail_options
    assert b"Delivered-To: tr\xe1\xba\xa7n@binhduong.gov.vn\r\n" in sink.messages[0].content


# --- refusals ----------------------------------------------------------------------------------------------------

DENIED = (554, b"5.7.1 May chu nay chi nhan thu cho cac dia chi cu cua don vi, khong chuyen tiep thu cho <{}>.\n"
               b"5.7.1 Relay access denied")
UNKNOWN = (550, b"5.1.1 Khong co hop thu <{}> trong ten mien cu.\n5.1.1 No such user <{}>")


@pytest.mark.parametrize(("command", "address", "expected"), [
    pytest.param("<victim@example.org>", "victim@example.org", DENIED, id="other-domain"),
    pytest.param("<victim@hcm.gov.vn>", "victim@hcm.gov.vn", DENIED, id="new-domain"),
    pytest.param("<victim%example.org@binhduong.gov.vn>", "victim%example.org@binhduong.gov.vn", UNKNOWN,
                 id="percent-hack"),
    pytest.param("<example.org!victim@binhduong.gov.vn>", "example.org!victim@binhduong.gov.vn", UNKNOWN,
                 id="bang-path"),
    pytest.param("<@binhduong.gov.vn:victim@example.org>", "@binhduong.gov.vn:victim@example.org", DENIED,
                 id="source-route"),
    pytest.param("<@example.org:nguyenvana@binhduong.gov.vn>", "@example.org:nguyenvana@binhduong.gov.vn", DENIED,
                 id="source-route-to-a-real-old-address"),
    pytest.param('<"victim@example.org"@binhduong.gov.vn>', '"victim@example.org"@binhduong.gov.vn', UNKNOWN,
                 id="quoted-local-part-with-at"),
    pytest.param('<"nguyenvana"@binhduong.gov.vn>', '"nguyenvana"@binhduong.gov.vn', UNKNOWN, id="quoted-local-part"),
    pytest.param("<victim@[127.0.0.1]>", "victim@[127.0.0.1]", DENIED, id="ip-literal"),
    pytest.param("<victim@[IPv6:::1]>", "victim@[IPv6:::1]", DENIED, id="ipv6-literal"),
    pytest.param("<victim>", "victim", DENIED, id="no-domain"),
    pytest.param("<postmaster>", "postmaster", UNKNOWN, id="postmaster-not-in-the-map"),  # RFC 5321 4.5.1 aside
    pytest.param("<nobody@binhduong.gov.vn>", "nobody@binhduong.gov.vn", UNKNOWN, id="unknown"),
])
def test_open_relay_tricks_are_refused(sink: SinkHandler, start_relay: Callable[..., Relay], command: str,
                                       address: str, expected: tuple[int, bytes]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("spammer@example.org")
        code, text = client.docmd("RCPT TO:" + command)
        assert (code, text) == (expected[0], expected[1].replace(b"{}", address.encode()))
        assert client.docmd("DATA") == (503, b"Error: need RCPT command")
    assert sink.commands == []  # the next hop was never even asked
    [record] = relay.wait_records(1)
    assert [(r.to, r.verdict, r.new) for r in record.recipients] == [
        (address, "unknown" if expected[0] == 550 else "relay-denied", None)]


def test_expired_address_names_the_new_one(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("lethic@binhduong.gov.vn") == (550, (
            "5.1.6 Dia chi nay da ngung su dung; nguoi nhan da chuyen sang dia chi moi <clt@hcm.gov.vn>, "
            "vui long gui lai thu toi dia chi moi.\n5.1.6 User has moved; please use <clt@hcm.gov.vn>").encode())
    assert sink.commands == []


def test_too_many_recipients(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, max_recipients=2)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
        assert client.rcpt("tranthib@binhduong.gov.vn")[0] == 250
        assert client.rcpt("tran.thi.b@brvt.gov.vn") == (452, (
            "4.5.3 Qua nhieu nguoi nhan trong mot thu (toi da 2); vui long gui cho nhung nguoi con lai sau.\n"
            "4.5.3 Too many recipients (at most 2 per message)").encode())


def test_message_size_limit_is_advertised_and_enforced(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, max_message_size=2000)
    with relay.client() as client:
        assert client.esmtp_features["size"] == "2000"
        assert client.mail("alice@example.org", ["SIZE=5000"]) == (
            552, b"Error: message size exceeds fixed maximum message size")
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.data(b"Subject: big\r\n\r\n" + b"x" * 80 + b"\r\n" * 3000) == (552, b"Error: Too much mail data")
        # the next-hop transaction left open by the refused message is reset before the next one
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.data(MESSAGE)[0] == 250
    assert sink.commands.count("RSET") == 1 and len(sink.messages) == 1


@pytest.mark.parametrize(("header", "reason"), [
    (b"Delivered-To: NGUYENVANA@binhduong.gov.vn\r\n", "already delivered to nguyenvana@binhduong.gov.vn"),
    (b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * 6, "6 Received header fields, more than 5"),
])
def test_loops_are_refused(sink: SinkHandler, start_relay: Callable[..., Relay], header: bytes, reason: str) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.data(header + MESSAGE) == (554, (
            "5.4.6 Phat hien thu chay vong giua cac may chu; thu khong duoc chuyen tiep.\n"
            f"5.4.6 Mail loop detected: {reason}").encode())
        # five Received fields are fine, and the session goes on
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.data(b"Received: x\r\n" * 5 + MESSAGE)[0] == 250
    assert "RSET" in sink.commands and len(sink.messages) == 1


# --- the next hop's verdicts -----------------------------------------------------------------------------------


def test_next_hop_5xx_at_rcpt_is_passed_back(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    sink.rcpt_replies["rejectme@hcm.gov.vn"] = "550 5.1.1 <rejectme@hcm.gov.vn>: Recipient address rejected"
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("phamd@binhduong.gov.vn") == (550, b"5.1.1 <rejectme@hcm.gov.vn>: Recipient address rejected")
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert sink.messages[0].rcpt_tos == ["annv@hcm.gov.vn"]


def test_next_hop_4xx_at_rcpt_becomes_451(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    sink.rcpt_replies["full@hcm.gov.vn"] = "452 4.2.2 Mailbox full"
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("hoange@binhduong.gov.vn") == (451, (
            b"4.4.0 May chu thu moi tam thoi chua nhan thu; vui long thu lai sau.\n"
            b"4.4.0 Next hop deferred: 452 4.2.2 Mailbox full"))


@pytest.mark.parametrize(("reply", "expected"), [
    ("554 5.6.0 Message content rejected", (554, b"5.6.0 Message content rejected")),
    ("452 4.3.1 Insufficient system storage", (451, b"4.4.0 May chu thu moi tam thoi chua nhan thu; vui long thu "
                                                    b"lai sau.\n4.4.0 Next hop deferred: 452 4.3.1 Insufficient system "
                                                    b"storage")),
])
def test_next_hop_verdict_at_data(sink: SinkHandler, start_relay: Callable[..., Relay], reply: str,
                                  expected: tuple[int, bytes]) -> None:
    sink.data_reply = reply
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.data(MESSAGE) == expected
    assert relay.wait_records(1)[0].next_hop == reply


def test_next_hop_mail_refusal(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    sink.mail_reply = "553 5.7.1 Sender address rejected"
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn") == (553, b"5.7.1 Sender address rejected")
        assert client.rcpt("tranthib@binhduong.gov.vn") == (553, b"5.7.1 Sender address rejected")
    assert sink.commands == ["MAIL SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn"]


def test_next_hop_unreachable(start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(free_port())  # nothing listens there
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn") == (451, (
            b"4.4.1 Tam thoi chua chuyen duoc thu toi may chu thu moi; vui long thu lai sau.\n"
            b"4.4.1 Next hop unavailable (unreachable); try again later"))
        assert client.docmd("DATA") == (503, b"Error: need RCPT command")


def test_next_hop_timeout(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    sink.delays["RCPT"] = 3.0
    relay = start_relay(sink.port, next_hop_timeout=0.5)
    started_at = time.monotonic()
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn") == (451, (
            b"4.4.2 Tam thoi chua chuyen duoc thu toi may chu thu moi; vui long thu lai sau.\n"
            b"4.4.2 Next hop unavailable (timeout); try again later"))
        # the next-hop connection is out of step after a timeout: the transaction is over for this client
        assert client.rcpt("tranthib@binhduong.gov.vn")[0] == 451
    assert time.monotonic() - started_at < 2.5


def test_waiting_for_the_next_hop_does_not_time_the_client_out(sink: SinkHandler,
                                                               start_relay: Callable[..., Relay]) -> None:
    sink.delays.update(MAIL=0.6, RCPT=0.6, DATA=0.6)
    relay = start_relay(sink.port, next_hop_timeout=0.9, timeout=1.0)
    with relay.client() as client:
        client.mail("alice@example.org")
        # 1.2 s of next-hop answers for one RCPT, with a 1 s session timeout: each call restarts the timer
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert len(sink.messages) == 1


def _broken(*args: object, **kwargs: object) -> None:
    raise RuntimeError("database password is hunter2")


class Broken:
    """An address map or SRS whose every call fails."""

    lookup = forward = staticmethod(_broken)


# What breaks, set just before the command of that hook: the SRS rewriting of the sender (MAIL), the address
# map (RCPT), the clock of the Received field (DATA).
BREAKERS: dict[str, Callable[[RelayHandler], None]] = {
    "MAIL": lambda handler: setattr(handler, "srs", Broken()),
    "RCPT": lambda handler: setattr(handler, "address_map", Broken()),
    "DATA": lambda handler: setattr(handler, "clock", _broken),
}


@pytest.mark.parametrize("hook", ["MAIL", "RCPT", "DATA"])
def test_handler_exception_is_451_without_internals(sink: SinkHandler, start_relay: Callable[..., Relay],
                                                    caplog: pytest.LogCaptureFixture, hook: str) -> None:
    relay = start_relay(sink.port)
    commands = {"MAIL": lambda: client.mail("alice@example.org"),
                "RCPT": lambda: client.rcpt("nguyenvana@binhduong.gov.vn"),
                "DATA": lambda: client.data(MESSAGE)}
    with caplog.at_level(logging.ERROR, logger="mailmerge_gov.forwarding"), relay.client() as client:
        for command, send in commands.items():
            if command == hook:
                BREAKERS[hook](relay.handler)
                assert send() == (451, b"4.3.0 Loi tam thoi o may chu chuyen tiep; vui long thu lai sau.\n"
                                       b"4.3.0 Temporary relay error; try again later")
                break
            assert send()[0] == 250
        assert client.noop() == (250, b"OK")
    assert sink.messages == [] and "DATA" not in sink.commands
    [logged] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mailmerge_gov.forwarding"]
    assert (logged["event"], logged["hook"], logged["client"]) == ("error", f"handle_{hook}", "127.0.0.1")
    assert logged["error"].endswith("RuntimeError: database password is hunter2\n")


# --- SMTP smuggling --------------------------------------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<ceo@binhduong.gov.vn>\r\nRCPT TO:<tranthib@binhduong.gov.vn>\r\nDATA\r\nSubject: forged\r\n\r\nx\r\n"


@pytest.mark.parametrize(("fake_end", "body"), [
    # a bare CR or LF became CRLF, so the lone dot is now a line of its own: dot-stuffed on the way out and
    # un-stuffed by the next hop, it stays in the one message, which shows the smuggling attempt
    (b"\n.\n", b"first part\r\n.\r\nMAIL FROM:"),
    (b"\r.\r", b"first part\r\n.\r\nMAIL FROM:"),
    (b"\n.\r\n", b"first part\r\n.\r\nMAIL FROM:"),
    (b"\r.\r\n", b"first part\r\n.\r\nMAIL FROM:"),
    # after a real CRLF the dot is the transparency dot of RFC 5321 4.5.2, which the receiver removes
    (b"\r\n.\n", b"first part\r\n\r\nMAIL FROM:"),
    (b"\r\n.\r", b"first part\r\n\r\nMAIL FROM:"),
])
@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_smuggling_does_not_end_data(sink: SinkHandler, start_relay: Callable[..., Relay], fake_end: bytes,
                                     body: bytes, event_loop: str) -> None:
    relay = start_relay(sink.port, event_loop=event_loop)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: hello\r\n\r\nfirst part" + fake_end + SMUGGLED + b".\r\n")
        assert client.getreply() == (250, b"2.0.0 Ok: queued as Q1")
        assert client.noop() == (250, b"OK")  # still in step: no reply was left over
    [message] = sink.messages
    assert sink.commands.count("DATA") == 1 and message.rcpt_tos == ["annv@hcm.gov.vn"]
    assert message.content.split(b"\r\n\r\n", 1)[1] == body + SMUGGLED.split(b":", 1)[1]


# The message after DATA, cut where a client may cut it: sent with the command before the 354 (a client that
# does not wait), in one piece after it, in pieces, with the next command right behind the final dot.
@pytest.mark.parametrize("cuts", [[], [0], [0, 5], [0, 40, 41, 42], [0, len(MESSAGE) + 1], [0, len(MESSAGE) + 3]])
@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_message_in_pieces_and_the_command_after_it(sink: SinkHandler, start_relay: Callable[..., Relay],
                                                    cuts: list[int], event_loop: str) -> None:
    relay = start_relay(sink.port, event_loop=event_loop)
    stream = MESSAGE + b".\r\nNOOP\r\n"  # cut points count from the start of the message; no 0: with DATA
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        client.send(b"DATA\r\n" + pieces[0])
        assert client.getreply()[0] == 354
        for piece in pieces[1:]:
            time.sleep(0.02)  # each piece in a read of its own
            client.send(piece)
        assert client.getreply() == (250, b"2.0.0 Ok: queued as Q1")
        assert client.getreply() == (250, b"OK")  # the NOOP that came behind the final dot
        assert client.noop() == (250, b"OK")  # nothing left over
    [message] = sink.messages
    assert message.content.endswith(b"\r\n" + unstuff(MESSAGE))


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_client_gone_during_data_next_hop_call_is_finished(sink: SinkHandler,
                                                          start_relay: Callable[..., Relay], event_loop: str) -> None:
    sink.delays["DATA"] = 0.5
    relay = start_relay(sink.port, event_loop=event_loop)
    client = relay.client()
    client.mail("alice@example.org")
    client.rcpt("nguyenvana@binhduong.gov.vn")
    client.docmd("DATA")
    client.send(MESSAGE + b".\r\n")
    time.sleep(0.1)
    client.close()  # the client gives up before the next hop answered
    [record] = relay.wait_records(1)
    assert (record.result, record.next_hop) == ("client disconnected", "250 2.0.0 Ok: queued as Q1")
    assert len(sink.messages) == 1  # shielded: the next-hop call was not cut off half-way


# --- Postfix smtp-sink as the next hop -------------------------------------------------------------------------


def test_postfix_smtp_sink_receives_the_exact_message(smtp_sink: SmtpSink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(smtp_sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.data(MESSAGE)[0] == 250
    [record] = relay.wait_records(1)
    deadline = time.monotonic() + 5
    while not smtp_sink.messages() and time.monotonic() < deadline:
        time.sleep(0.02)
    [dump] = smtp_sink.messages()
    # smtp-sink writes its own X- fields and Received first, and stores lines with LF
    assert b"X-Mail-Args: <SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn>\n" in dump
    assert b"X-Rcpt-Args: <annv@hcm.gov.vn>\n" in dump
    relayed = received_of(record, "nguyenvana@binhduong.gov.vn") + b"Delivered-To: nguyenvana@binhduong.gov.vn\r\n" + MESSAGE
    assert dump.endswith(relayed.replace(b"\r\n", b"\n") + b"\n")


@pytest.mark.parametrize(("options", "expected"), [
    (("-r", "RCPT"), (451, b"4.4.0 May chu thu moi tam thoi chua nhan thu; vui long thu lai sau.\n"
                           b"4.4.0 Next hop deferred: 450 4.3.0 Error: command failed")),
    (("-f", "RCPT"), (500, b"5.3.0 Error: command failed")),
])
def test_postfix_smtp_sink_refusals(start_relay: Callable[..., Relay], options: tuple[str, ...],
                                    expected: tuple[int, bytes]) -> None:
    sink = started(SmtpSink(hostname="mx.hcm.test", options=options))
    try:
        relay = start_relay(sink.port)
        with relay.client() as client:
            client.mail("alice@example.org")
            assert client.rcpt("nguyenvana@binhduong.gov.vn") == expected
    finally:
        sink.stop()


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_a_client_gone_mid_data_delivers_nothing(sink: SinkHandler, start_relay: Callable[..., Relay], event_loop: str) -> None:
    relay = start_relay(sink.port, event_loop=event_loop)
    client = relay.client()
    client.mail("alice@example.org")
    client.rcpt("nguyenvana@binhduong.gov.vn")
    client.docmd("DATA")
    client.send(MESSAGE[: len(MESSAGE) // 2])  # half a message, no final dot
    client.close()
    [record] = relay.wait_records(1)
    assert record.result == "client disconnected"
    assert sink.messages == [] and "DATA" not in sink.commands


@pytest.mark.parametrize(("address", "verdict", "code", "status", "last_line"), [
    # a quoted local part carrying a header: valid SMTP (\\r is a quoted pair), never forwarded
    ('"a\\r\\nBcc: victim@example.org"@binhduong.gov.vn', "unknown", 550, b"5.1.1",
     b'5.1.1 No such user <"a\\r\\nBcc: victim@example.org"@binhduong.gov.vn>'),
    # a Unicode line separator, without SMTPUTF8
    ("nguyenvana@binhduong.gov.vn\u2028Bcc: victim@example.org", "smtputf8-required", 553, b"5.6.7",
     b"5.6.7 Non-ASCII address without the SMTPUTF8 parameter"),
    # a bare CR inside the command: not an address at all; its last @ is in example.org
    ("nguyenvana@binhduong.gov.vn\rBcc: victim@example.org", "relay-denied", 554, b"5.7.1",
     b"5.7.1 Relay access denied"),
])
def test_header_injection_through_an_address_goes_nowhere(sink: SinkHandler, start_relay: Callable[..., Relay],
                                                          address: str, verdict: str, code: int, status: bytes,
                                                          last_line: bytes) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.send(f"RCPT TO:<{address}>\r\n".encode("utf-8"))  # raw: smtplib refuses to send such lines
        reply_code, text = client.getreply()
        lines = text.split(b"\n")
        assert (reply_code, lines[-1]) == (code, last_line)
        assert all(line.startswith(status + b" ") for line in lines)
        assert client.docmd("DATA") == (503, b"Error: need RCPT command")
        client.rset()
    assert sink.messages == [] and not any(c.startswith("RCPT") for c in sink.commands)
    [record] = relay.wait_records(1)
    assert [(r.to, r.verdict, r.new) for r in record.recipients] == [(address, verdict, None)]


@pytest.mark.parametrize("separator", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"])
def test_control_characters_of_an_echoed_address_stay_in_their_reply_line(
        sink: SinkHandler, start_relay: Callable[..., Relay], separator: str) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org", ["SMTPUTF8"])
        client.send(f"RCPT TO:<nguyenvana@binhduong.gov.vn{separator}Bcc: victim@example.org>\r\n".encode("utf-8"))
        assert client.getreply() == (554, b"5.7.1 May chu nay chi nhan thu cho cac dia chi cu cua don vi, khong chuyen "
                                          b"tiep thu cho <nguyenvana@binhduong.gov.vn?Bcc: victim@example.org>.\n"
                                          b"5.7.1 Relay access denied")


@pytest.mark.parametrize("sender", [
    "trần@example.org".encode(),  # UTF-8 local part
    "an@bộ.example.org".encode(),  # UTF-8 domain (a U-label)
    b"tr\xe0n@example.org",  # 8-bit, not even UTF-8
])
def test_non_ascii_sender_needs_smtputf8(sink: SinkHandler, start_relay: Callable[..., Relay], sender: bytes) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.send(b"MAIL FROM:<" + sender + b">\r\n")
        assert client.getreply() == (553, b"5.6.7 Dia chi co ky tu ngoai ASCII chi duoc nhan khi lenh MAIL co tham so "
                                          b"SMTPUTF8.\n5.6.7 Non-ASCII address without the SMTPUTF8 parameter")
        # no transaction was opened
        assert client.rcpt("nguyenvana@binhduong.gov.vn") == (503, b"Error: need MAIL command")
    assert sink.commands == [] and relay.records == []


@pytest.fixture
def ascii_sink() -> Iterator[SinkHandler]:
    """A next hop that does not announce SMTPUTF8."""
    yield from next_hop(enable_SMTPUTF8=False)


NO_SMTPUTF8 = ("550 5.6.7 May chu thu moi khong nhan dia chi co ky tu ngoai ASCII (SMTPUTF8); hay gui toi dia chi chi "
               "gom ky tu ASCII. / Next hop does not support SMTPUTF8")


def test_smtputf8_to_a_next_hop_without_it_is_refused(ascii_sink: SinkHandler,
                                                      start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(ascii_sink.port)
    refused = (550, b"5.6.7 May chu thu moi khong nhan dia chi co ky tu ngoai ASCII (SMTPUTF8); hay gui toi dia chi "
                    b"chi gom ky tu ASCII.\n5.6.7 Next hop does not support SMTPUTF8")
    with relay.client() as client:
        assert client.mail("alice@example.org", ["SMTPUTF8"]) == (250, b"2.1.0 OK")
        assert client.rcpt("trần@binhduong.gov.vn") == refused
        assert client.rcpt("nguyenvana@binhduong.gov.vn") == refused  # the transaction cannot go there at all
        assert client.docmd("DATA") == (503, b"Error: need RCPT command")
        client.rset()
        # without SMTPUTF8 the same next hop, over the same connection, takes the mail
        assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], MESSAGE) == {}
    assert ascii_sink.commands == ["MAIL SRS0=YGd8Ke=7U=example.org=alice@srs.binhduong.gov.vn "
                                   f"SIZE={len(MESSAGE) + HEADER_ALLOWANCE}", "RCPT annv@hcm.gov.vn", "DATA"]
    first = relay.wait_records(2)[0]
    assert [(r.to, r.verdict, r.new, r.reply) for r in first.recipients] == [
        ("trần@binhduong.gov.vn", "forward", "tranvan@hcm.gov.vn", NO_SMTPUTF8),
        ("nguyenvana@binhduong.gov.vn", "forward", "annv@hcm.gov.vn", NO_SMTPUTF8)]
    assert (first.result, first.next_hop) == ("no DATA (RSET)", "")


# Raw UTF-8 in the header (RFC 6532): Vietnamese display names and subject, no encoded words.
VIETNAMESE = ("From: Nguyễn Văn An <an@example.org>\r\n"
              "To: \"Trần Thị B\" <tranthib@binhduong.gov.vn>, Nguyễn Văn A <nguyenvana@binhduong.gov.vn>\r\n"
              "Subject: Giấy mời họp Sở Nội vụ\r\nMessage-ID: <2@example.org>\r\n"
              "\r\nKính gửi anh Đức,\r\n.Đây là dòng bắt đầu bằng dấu chấm.\r\n").encode("utf-8")


@pytest.mark.parametrize(("options", "recipient", "new", "protocol"), [
    (["SMTPUTF8", "BODY=8BITMIME"], "trần@binhduong.gov.vn", "tranvan@hcm.gov.vn", b"UTF8ESMTP"),
    (["SMTPUTF8", "BODY=8BITMIME"], "nguyenvana@binhduong.gov.vn", "annv@hcm.gov.vn", b"UTF8ESMTP"),
    # 8-bit header fields without SMTPUTF8 (RFC 6532 wants it; old clients do it anyway): untouched too
    (["BODY=8BITMIME"], "nguyenvana@binhduong.gov.vn", "annv@hcm.gov.vn", b"ESMTP"),
])
def test_vietnamese_header_bytes_pass_through(sink: SinkHandler, start_relay: Callable[..., Relay],
                                              options: list[str], recipient: str, new: str, protocol: bytes) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        assert client.sendmail("an@example.org", [recipient], VIETNAMESE, mail_options=options) == {}
    [record] = relay.wait_records(1)
    [message] = sink.messages
    assert (message.rcpt_tos, message.mail_options) == (
        [new], [f"SIZE={len(VIETNAMESE) + HEADER_ALLOWANCE}", *options])
    received = received_of(record, recipient).replace(b"with ESMTP", b"with " + protocol)
    assert message.content == (received + b"Delivered-To: " + recipient.encode() + b"\r\n" + VIETNAMESE)


@pytest.mark.parametrize(("raw", "clean"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n"), (b"a\nb", b"a\r\nb"), (b"a\rb", b"a\r\nb"), (b"a\r\r\nb", b"a\r\n\r\nb"),
    (b"a\r\n\n.\nb", b"a\r\n\r\n.\r\nb"), (b"\r", b"\r\n"), (b"", b""),
])
def test_line_endings_become_crlf(raw: bytes, clean: bytes) -> None:
    from mailmerge_gov.forwarding.message import normalise_line_endings

    assert normalise_line_endings(raw) == clean
    if raw == clean:
        assert normalise_line_endings(raw) is raw  # a clean message is not copied
