"""The relay end to end on real loopback sockets: what reaches the next hop, and when.

DKIM signatures survive the relay (dkimpy signs and verifies, the public key served by a `dnsfunc` stub);
swaks as the sending client; Postfix's smtp-sink as a next hop that answers 4xx and 5xx; the next hop down in
the middle of a load of 1,000 messages; and `mailmerge-gov relay serve` stopped by SIGTERM while clients are in
the middle of DATA.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import re
import signal
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import configs
import dkim
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import started
from mailmerge_gov.forwarding.addressmap import AddressMap, parse_map
from mailmerge_gov.forwarding.handler import RelayHandler, RelaySettings
from mailmerge_gov.forwarding.nexthop import NextHopSettings
from mailmerge_gov.forwarding.smtpserver import RelayController
from servers import EVENT_LOOPS, LOOPBACK, Relay, RelayDaemon, SmtpSink, free_port, relay_in_thread, require_program

OLD_DOMAINS = ("binhduong.gov.vn", "brvt.gov.vn")
# 20 officials: the load test spreads its messages over them
PEOPLE = [(f"canbo{n:02d}@binhduong.gov.vn", f"cb{n:02d}@hcm.gov.vn") for n in range(20)]
MAP = "old_address,new_address,valid_until\n" + "".join(f"{old},{new},2026-06-30\n" for old, new in PEOPLE) + \
    "nguyenvana@binhduong.gov.vn,annv@hcm.gov.vn,2026-06-30\n"
ICT = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 1, 15, 19, 0, tzinfo=ICT)
DEFERRED_PREFIX = b"4.4.0 May chu thu moi tam thoi chua nhan thu; vui long thu lai sau.\n4.4.0 Next hop deferred: "
UNAVAILABLE = b"Tam thoi chua chuyen duoc thu toi may chu thu moi; vui long thu lai sau.\n"
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r?$", re.MULTILINE | re.IGNORECASE)


# --- the next hop: an aiosmtpd sink that keeps every message -----------------------------------------------------


@dataclass
class Received:
    """One message as the next hop received it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class SinkHandler:
    """aiosmtpd handler of the next hop; `data_delay` makes it slow to answer the end of DATA."""

    data_delay: float = 0.0
    messages: list[Received] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        # appended and answered in one step of the loop: a sink stopped in between cannot keep a message unanswered
        self.messages.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos),
                                      envelope.original_content or b""))
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    def message_ids(self) -> list[str]:
        """The Message-ID of every message received, in order of arrival."""
        return [message_id(m.content) for m in self.messages]


def message_id(content: bytes) -> str:
    """The Message-ID of a message (the first one, as the tests write exactly one)."""
    found = MESSAGE_ID.search(content)
    assert found is not None, content[:300]
    return found.group(1).decode()


def next_hop_controller(handler: SinkHandler, port: int | None = None) -> Controller:
    """A started aiosmtpd next hop on `port` (a free one when None)."""
    controller = Controller(handler, hostname=LOOPBACK, port=port or free_port(), server_hostname="mx.hcm.test")
    controller.start()
    return controller


@pytest.fixture
def sink() -> Iterator[tuple[SinkHandler, int]]:
    """A next hop on a free port: (its handler, its port)."""
    handler = SinkHandler()
    controller = next_hop_controller(handler)
    try:
        yield handler, controller.port
    finally:
        controller.stop()


# --- the relay, in this process ----------------------------------------------------------------------------------


@pytest.fixture
def address_map() -> AddressMap:
    return parse_map(MAP, "map.csv", OLD_DOMAINS)


@pytest.fixture
def start_relay(address_map: AddressMap) -> Iterator[Callable[..., Relay]]:
    """Return a function that starts a relay in front of a next-hop port; stopped at the end of the test."""
    controllers: list[RelayController] = []

    def start(next_hop_port: int, next_hop_timeout: float = 5.0, event_loop: str = "auto", **limits: Any) -> Relay:
        settings = RelaySettings(
            next_hop=NextHopSettings(LOOPBACK, next_hop_port, timeout=next_hop_timeout, local_hostname="relay.test"),
            hostname="relay.test", **{"max_message_size": 1_000_000, **limits})
        return relay_in_thread(
            lambda log: RelayHandler(address_map, settings, None, clock=lambda: NOW, on_transaction=log), controllers,
            event_loop)

    yield start
    for controller in controllers:
        controller.stop()


# --- 1. DKIM survives the relay ----------------------------------------------------------------------------------

SELECTOR = b"sel2026"
SIGNER = b"example.org"
# Everything a relay could be tempted to touch: a folded header, an encoded-word, 8-bit UTF-8 in the body,
# trailing spaces and tabs, lines that start with a dot (dot-stuffing), a long line, empty lines at the end.
UNSIGNED = (
    "From: Alice Nguyen <alice@example.org>\r\n"
    "To: Nguyen Van A <nguyenvana@binhduong.gov.vn>,\r\n"
    "\tPhong Van Thu <vanthu@binhduong.gov.vn>\r\n"
    "Subject: =?utf-8?b?" + base64.b64encode("Công văn số 12/UBND – hỏa tốc".encode()).decode() + "?=\r\n"
    "Date: Thu, 15 Jan 2026 18:59:00 +0700\r\n"
    "Message-ID: <dkim-1@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Kính gửi anh Nguyễn Văn A,  \r\n"
    "\r\n"
    ".Dòng bắt đầu bằng dấu chấm\r\n"
    "..hai dấu chấm\r\n"
    ".\t\r\n"
    "\tthụt lề bằng tab\t \r\n"
    + "Đây là một dòng dài. " * 35 + "\r\n"  # 980 octets: near the 998 of RFC 5322
    "\r\n"
    "Trân trọng.\r\n"
    "\r\n"
    "\r\n"
).encode("utf-8")
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
                  b"content-transfer-encoding"]


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, bytes]:
    """A fresh 2048-bit RSA key: (PKCS#1 PEM private key, the TXT record of its selector)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def dns_stub(record: bytes) -> Callable[..., bytes | None]:
    """dkimpy's `dnsfunc`: the TXT record of our selector, nothing for any other name (no real DNS)."""
    asked: list[bytes] = []

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name)
        return record if name == SELECTOR + b"._domainkey." + SIGNER + b"." else None

    txt.asked = asked  # type: ignore[attr-defined]
    return txt


@pytest.mark.parametrize("canonicalize", [(b"simple", b"simple"), (b"relaxed", b"relaxed"), (b"relaxed", b"simple")],
                         ids=lambda c: "/".join(part.decode() for part in c))
@pytest.mark.parametrize("next_hop", ["aiosmtpd", "postfix-smtp-sink"])
def test_dkim_signature_survives(dkim_key: tuple[bytes, bytes], start_relay: Callable[..., Relay],
                                 smtp_sink: SmtpSink, sink: tuple[SinkHandler, int], next_hop: str,
                                 canonicalize: tuple[bytes, bytes]) -> None:
    private, record = dkim_key
    signature = dkim.sign(UNSIGNED, SELECTOR, SIGNER, private, canonicalize=canonicalize,
                          include_headers=SIGNED_HEADERS)
    signed = signature + UNSIGNED
    dnsfunc = dns_stub(record)
    assert dkim.verify(signed, dnsfunc=dnsfunc)  # the signature is good before the relay
    handler, sink_port = sink
    relay = start_relay(sink_port if next_hop == "aiosmtpd" else smtp_sink.port)
    with relay.client() as client:
        assert client.mail("alice@example.org", ["BODY=8BITMIME", f"SIZE={len(signed)}"]) == (250, b"2.1.0 OK")
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
        code, _ = client.data(signed)
        assert code == 250
    if next_hop == "aiosmtpd":
        [message] = handler.messages
        received = message.content
        # exactly the signed bytes, below the two fields the relay prepends (Received, Delivered-To)
        head, _, rest = received.partition(b"Delivered-To: nguyenvana@binhduong.gov.vn\r\n")
        assert rest == signed and head.startswith(b"Received: from mail.example.org ([127.0.0.1])\r\n")
    else:
        deadline = time.monotonic() + 5
        while not smtp_sink.messages() and time.monotonic() < deadline:
            time.sleep(0.02)
        [received] = smtp_sink.messages()  # smtp-sink's own X- fields and Received first, lines stored with LF
        assert received.endswith(signed.replace(b"\r\n", b"\n") + b"\n")
    assert dkim.verify(received, dnsfunc=dnsfunc), "the relayed message no longer verifies"
    assert dnsfunc.asked and set(dnsfunc.asked) == {b"sel2026._domainkey.example.org."}  # type: ignore[attr-defined]
    # the check is not vacuous: one changed body byte, and the same verification fails
    assert not dkim.verify(received.replace("Trân trọng".encode(), "Tran trong".encode()), dnsfunc=dnsfunc)


# --- 2. swaks as the client --------------------------------------------------------------------------------------


def swaks(port: int, *args: str) -> tuple[int, list[str]]:
    """Run swaks against the relay; return its exit code and every reply line it printed (`<-` and `<**`)."""
    program = require_program("swaks", "swaks")
    result = subprocess.run([program, "--server", f"{LOOPBACK}:{port}", "--helo", "client.test",
                             "--from", "alice@example.org", "--timeout", "15", *args],
                            capture_output=True, text=True, timeout=60)
    replies = [line[4:] for line in result.stdout.splitlines() if line.startswith(("<-  ", "<** "))]
    return result.returncode, replies


EHLO_REPLY = ["220 relay.test ESMTP", "250-relay.test", "250-SIZE 1000000", "250-8BITMIME", "250-SMTPUTF8",
              "250 HELP"]
SWAKS_BODY = "Subject: thu qua swaks\n\nXin chao\n.dong co dau cham\n"


def test_swaks_forward(start_relay: Callable[..., Relay], sink: tuple[SinkHandler, int]) -> None:
    handler, sink_port = sink
    relay = start_relay(sink_port)
    code, replies = swaks(relay.port, "--to", "NguyenVanA@BinhDuong.gov.vn",
                          "--data", "Message-ID: <swaks-1@example.org>\n" + SWAKS_BODY)
    assert (code, replies) == (0, [*EHLO_REPLY, "250 2.1.0 OK", "250 OK", "354 End data with <CR><LF>.<CR><LF>",
                                   "250 2.0.0 Ok: queued as Q1", "221 2.0.0 Bye"])
    [message] = handler.messages
    assert (message.mail_from, message.rcpt_tos, message_id(message.content)) == (
        "alice@example.org", ["annv@hcm.gov.vn"], "swaks-1@example.org")
    # the line that starts with a dot arrives as it was sent (swaks dot-stuffs it, the relay and aiosmtplib too)
    assert message.content.endswith(b"\r\n\r\nXin chao\r\n.dong co dau cham\r\n\r\n")


DENIED = ["554-5.7.1 May chu nay chi nhan thu cho cac dia chi cu cua don vi, khong chuyen tiep thu cho <{}>.",
          "554 5.7.1 Relay access denied"]
UNKNOWN = ["550-5.1.1 Khong co hop thu <{}> trong ten mien cu.", "550 5.1.1 No such user <{}>"]


@pytest.mark.parametrize(("to", "expected"), [
    pytest.param("victim@example.org", DENIED, id="other-domain"),
    pytest.param("victim@hcm.gov.vn", DENIED, id="new-domain"),
    pytest.param("victim%example.org@binhduong.gov.vn", UNKNOWN, id="percent-hack"),
    pytest.param("@binhduong.gov.vn:victim@example.org", DENIED, id="source-route"),
])
def test_swaks_open_relay_attempt(start_relay: Callable[..., Relay], sink: tuple[SinkHandler, int], to: str,
                                  expected: list[str]) -> None:
    handler, sink_port = sink
    relay = start_relay(sink_port)
    code, replies = swaks(relay.port, "--to", to, "--data", SWAKS_BODY)
    # swaks gives up after the refused RCPT (exit code 24: "error in RCPT") and says QUIT
    assert (code, replies) == (24, [*EHLO_REPLY, "250 2.1.0 OK", *(line.format(to) for line in expected),
                                    "221 2.0.0 Bye"])
    assert handler.messages == []


def test_swaks_open_relay_next_to_a_real_recipient(start_relay: Callable[..., Relay],
                                                   sink: tuple[SinkHandler, int]) -> None:
    handler, sink_port = sink
    relay = start_relay(sink_port)
    code, replies = swaks(relay.port, "--to", "victim@example.org,nguyenvana@binhduong.gov.vn", "--data", SWAKS_BODY)
    assert (code, replies) == (0, [*EHLO_REPLY, "250 2.1.0 OK", *(line.format("victim@example.org") for line in DENIED),
                                   "250 OK", "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as Q1",
                                   "221 2.0.0 Bye"])
    assert [(m.rcpt_tos) for m in handler.messages] == [["annv@hcm.gov.vn"]]  # the victim got nothing


# --- 3. Postfix smtp-sink as a next hop that refuses -------------------------------------------------------------


def deferred(reply: str) -> tuple[int, bytes]:
    """The relay's 451 for a next-hop 4xx reply."""
    return 451, DEFERRED_PREFIX + reply.encode()


def unavailable(status: str, reason: str) -> tuple[int, bytes]:
    """The relay's 451 for a next hop that gave no answer."""
    return 451, (f"{status} ".encode() + UNAVAILABLE + f"{status} Next hop unavailable ({reason}); try again later"
                 .encode())


SOFT = "450 4.3.0 Error: command failed"  # smtp-sink's default replies
HARD = (500, b"5.3.0 Error: command failed")
CLOSING = "421 4.0.0 Server closing connection"
OK = (250, b"2.1.5 Ok")
# (smtp-sink options, the client's reply at RCPT, the client's reply at the end of DATA or None when RCPT failed)
REFUSALS = [
    pytest.param(("-r", "MAIL"), deferred(SOFT), None, id="4xx-at-MAIL"),
    pytest.param(("-f", "MAIL"), HARD, None, id="5xx-at-MAIL"),
    pytest.param(("-r", "RCPT", "-b", "452 4.2.2 Mailbox full"), deferred("452 4.2.2 Mailbox full"), None,
                 id="4xx-at-RCPT"),
    pytest.param(("-f", "RCPT", "-B", "550 5.1.1 <annv@hcm.gov.vn>: Recipient address rejected"),
                 (550, b"5.1.1 <annv@hcm.gov.vn>: Recipient address rejected"), None, id="5xx-at-RCPT"),
    pytest.param(("-r", "DATA"), OK, deferred(SOFT), id="4xx-at-DATA"),
    pytest.param(("-f", "DATA"), OK, HARD, id="5xx-at-DATA"),
    pytest.param(("-r", "."), OK, deferred(SOFT), id="4xx-at-dot"),
    pytest.param(("-f", ".", "-B", "554 5.7.1 Message rejected as spam"), OK,
                 (554, b"5.7.1 Message rejected as spam"), id="5xx-at-dot"),
    pytest.param(("-Q", "RCPT"), deferred(CLOSING), None, id="421-at-RCPT"),
    pytest.param(("-Q", "."), OK, deferred(CLOSING), id="421-at-dot"),
    pytest.param(("-q", "RCPT"), unavailable("4.4.2", "connection lost"), None, id="drop-at-RCPT"),
    pytest.param(("-q", "."), OK, unavailable("4.4.2", "connection lost"), id="drop-at-dot"),
    # smtp-sink writes its 421 and closes at once: aiosmtplib reads the greeting, or sees only the close first
    pytest.param(("-Q", "CONNECT"), [unavailable("4.4.1", "greeting 421"), unavailable("4.4.1", "unreachable")],
                 None, id="421-greeting"),
    pytest.param(("-q", "CONNECT"), unavailable("4.4.1", "unreachable"), None, id="no-greeting"),
]


@pytest.mark.parametrize(("options", "at_rcpt", "at_dot"), REFUSALS)
def test_smtp_sink_refusals(start_relay: Callable[..., Relay], options: tuple[str, ...],
                           at_rcpt: tuple[int, bytes] | list[tuple[int, bytes]],
                           at_dot: tuple[int, bytes] | None) -> None:
    rcpt_replies = at_rcpt if isinstance(at_rcpt, list) else [at_rcpt]
    next_hop = started(SmtpSink(hostname="mx.hcm.test", options=options))
    try:
        relay = start_relay(next_hop.port)
        with relay.client() as client:
            # twice on one client connection: the relay's next-hop connection is reset or made again in between
            for attempt in range(2):
                assert client.mail("alice@example.org") == (250, b"2.1.0 OK"), attempt
                assert client.rcpt("nguyenvana@binhduong.gov.vn") in rcpt_replies, attempt
                if at_dot is None:
                    assert client.docmd("DATA") == (503, b"Error: need RCPT command"), attempt
                    client.rset()
                else:
                    assert client.data(b"Message-ID: <refused@example.org>\r\n\r\nbody\r\n") == at_dot, attempt
        records = relay.wait_records(2)
        # the log says what the client was told: the RCPT reply, or the result of the message
        expected = rcpt_replies[0] if at_dot is None else at_dot
        logged = [record.recipients[0].reply if at_dot is None else record.result for record in records]
        assert [line.split()[0] for line in logged] == [str(expected[0])] * 2, logged
    finally:
        next_hop.stop()


# --- 4. the next hop down in the middle of 1,000 messages --------------------------------------------------------

LOAD_MESSAGES = 1000
LOAD_SESSIONS = 16  # below the relay's default limit of connections per client IP (20)
MAX_ATTEMPTS = 60  # per message; the outage lasts about 1.5 s and a retry waits 0.1 s or more
STOP_AFTER = 300  # delivered messages before the next hop is stopped
OUTAGE = 1.5  # seconds


def load_message(number: int) -> tuple[str, str, bytes]:
    """Message `number` of the load: (old recipient, its new address, content of about 1.5 KB)."""
    old, new = PEOPLE[number % len(PEOPLE)]
    body = "".join(f"Dòng {line} của thư số {number}: nội dung thử tải.\r\n" for line in range(25))
    content = (f"From: alice@example.org\r\nTo: {old}\r\nSubject: Tai {number}\r\n"
               f"Message-ID: <load-{number}@example.org>\r\nMIME-Version: 1.0\r\n"
               f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()
    return old, new, content


@dataclass
class LoadResult:
    """What the sending client saw."""

    accepted: dict[int, int] = field(default_factory=dict)  # message number -> attempts it took
    deferrals: dict[str, int] = field(default_factory=dict)  # "451 4.4.1" and the like -> how many times
    failures: list[str] = field(default_factory=list)  # anything permanent or unexpected


async def send_load(port: int, result: LoadResult, outage: Callable[[], Any]) -> None:
    """Send every message through the relay over LOAD_SESSIONS connections, retrying each 4xx (bounded)."""
    pending: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for number in range(LOAD_MESSAGES):
        pending.put_nowait((number, 1))
    retries: set[asyncio.Task[None]] = set()

    async def later(number: int, attempt: int) -> None:
        await asyncio.sleep(0.1)
        pending.put_nowait((number, attempt))

    def defer(number: int, attempt: int, reply: str) -> None:
        key = " ".join(reply.split()[:2])
        result.deferrals[key] = result.deferrals.get(key, 0) + 1
        if attempt >= MAX_ATTEMPTS:
            result.failures.append(f"message {number}: still deferred after {attempt} attempts: {reply}")
            pending.task_done()
            return
        task = asyncio.get_running_loop().create_task(later(number, attempt + 1))
        retries.add(task)
        task.add_done_callback(retries.discard)
        pending.task_done()

    async def session() -> None:
        client: aiosmtplib.SMTP | None = None
        while True:
            number, attempt = await pending.get()
            old, _, content = load_message(number)
            try:
                if client is None or not client.is_connected:
                    client = aiosmtplib.SMTP(hostname=LOOPBACK, port=port, timeout=20, local_hostname="load.test")
                    await client.connect()
                await client.mail("alice@example.org")
                await client.rcpt(old)
                reply = await client.data(content)
            except aiosmtplib.SMTPResponseException as exc:
                reply = f"{exc.code} {exc.message}"
                if client.is_connected:
                    try:
                        await client.rset()
                    except aiosmtplib.SMTPException:
                        client.close()
                if 400 <= exc.code < 500:
                    defer(number, attempt, reply)
                else:
                    result.failures.append(f"message {number}: {reply}")
                    pending.task_done()
                continue
            except (aiosmtplib.SMTPException, OSError) as exc:
                # the relay closed on us (421 at a command counts as a deferral above): resend on a new connection
                if client is not None:
                    client.close()
                defer(number, attempt, f"connection {type(exc).__name__}")
                continue
            if reply.code == 250:
                result.accepted[number] = attempt
            else:
                result.failures.append(f"message {number}: {reply.code} {reply.message}")
            pending.task_done()

    workers = [asyncio.create_task(session()) for _ in range(LOAD_SESSIONS)]
    outage_task = asyncio.create_task(outage())
    while True:  # join() returns while a retry sleeps in `later`: wait for those too
        await asyncio.wait_for(pending.join(), timeout=120)
        if not retries:
            break
        await asyncio.wait(set(retries))
    await outage_task
    for worker in workers:
        worker.cancel()


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_next_hop_down_during_a_load(start_relay: Callable[..., Relay], event_loop: str) -> None:
    handler = SinkHandler()
    port = free_port()
    controllers = [next_hop_controller(handler, port)]
    relay = start_relay(port, next_hop_timeout=3.0, event_loop=event_loop)
    times: dict[str, float] = {}

    async def outage() -> None:
        deadline = time.monotonic() + 60
        while len(handler.messages) < STOP_AFTER and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        times["stopped at"] = len(handler.messages)
        await asyncio.to_thread(controllers[0].stop)  # closes the port: connections refused, open ones dropped
        began = time.monotonic()
        await asyncio.sleep(OUTAGE)
        controllers.append(await asyncio.to_thread(next_hop_controller, handler, port))  # the same port again
        times["down for"] = time.monotonic() - began

    result = LoadResult()
    try:
        asyncio.run(send_load(relay.port, result, outage))
    finally:
        controllers[-1].stop()
    ids = handler.message_ids()
    assert result.failures == []
    assert len(result.accepted) == LOAD_MESSAGES
    # every message at the next hop exactly once, to its official's new address
    assert len(ids) == LOAD_MESSAGES and set(ids) == {f"load-{n}@example.org" for n in range(LOAD_MESSAGES)}
    assert all(m.rcpt_tos == [load_message(int(message_id(m.content)[5:].split("@")[0]))[1]]
               for m in handler.messages)
    # the outage happened in the middle and was felt: the relay answered 451 4.4.x, the client resent
    assert STOP_AFTER <= times["stopped at"] < LOAD_MESSAGES and times["down for"] >= OUTAGE
    assert sum(result.deferrals.values()) >= 1 and set(result.deferrals) <= {"451 4.4.1", "451 4.4.2"}, \
        result.deferrals
    assert max(result.accepted.values()) > 1


# --- 5. SIGTERM with sessions in the middle of DATA --------------------------------------------------------------

SHUTDOWN_TIMEOUT = 3.0
LIVE_MAP = MAP.replace("2026-06-30", "2099-12-31")  # the daemon looks up on the real today


def daemon_config(tmp_path: Path, next_hop_port: int, listen_port: int, next_hop_timeout: float = 5.0,
                  workers: int = 1) -> Path:
    """A consolidation file whose [relay] listens on `listen_port` and forwards to the next hop."""
    (tmp_path / "map.csv").write_text(LIVE_MAP, encoding="utf-8")
    path = tmp_path / "consolidation.toml"
    path.write_text(configs.FILES_ONLY + "\n[relay]\n"
                    f'listen = "{LOOPBACK}:{listen_port}"\nhostname = "relay.test"\nmap = "map.csv"\n'
                    f'next_hop = "smtp://{LOOPBACK}:{next_hop_port}"\nnext_hop_timeout = {next_hop_timeout}\n'
                    f"shutdown_timeout = {SHUTDOWN_TIMEOUT}\nworkers = {workers}\n", encoding="utf-8")
    return path


def in_data(port: int, number: int, first_half: bytes) -> smtplib.SMTP:
    """A client in the middle of DATA: MAIL, RCPT, DATA answered 354, and half of the message sent."""
    client = smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=20)
    client.ehlo()
    assert client.mail("alice@example.org") == (250, b"2.1.0 OK")
    assert client.rcpt(PEOPLE[number][0]) == (250, b"OK")
    assert client.docmd("DATA")[0] == 354
    client.send(first_half)
    return client


def sigterm_message(number: int) -> tuple[bytes, bytes]:
    """Message `number` of the SIGTERM test in two halves."""
    content = (f"From: alice@example.org\r\nSubject: {number}\r\nMessage-ID: <term-{number}@example.org>\r\n\r\n"
               + "noi dung thu\r\n" * 200).encode()
    return content[:1500], content[1500:] + b".\r\n"


def finish(client: smtplib.SMTP, rest: bytes) -> tuple[int, bytes]:
    """Send the rest of the message and the final dot; return the reply (0 when the connection was closed)."""
    try:
        client.send(rest)
        return client.getreply()
    except (smtplib.SMTPServerDisconnected, OSError):
        return 0, b"connection closed"


def first_line(client: smtplib.SMTP) -> tuple[int, bytes]:
    """The next reply the server sends unasked, and whether it then closed (as (code, text))."""
    try:
        return client.getreply()
    except smtplib.SMTPServerDisconnected:
        return 0, b"connection closed"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_sessions_in_data_loses_none(tmp_path: Path, workers: int) -> None:
    handler = SinkHandler(data_delay=0.3)  # the next hop takes a moment: the relay waits for it during the drain
    next_hop = next_hop_controller(handler)
    daemon = RelayDaemon(daemon_config(tmp_path, next_hop.port, free_port(), workers=workers))
    try:
        port = int(daemon.event("listening")["address"].rsplit(":", 1)[1])
        finishers = list(range(0, 6))  # finish their message after SIGTERM, within the deadline
        stallers = list(range(6, 9))  # never finish: the deadline cuts them off
        enveloped = list(range(9, 11))  # MAIL and RCPT done, DATA after SIGTERM
        halves = {number: sigterm_message(number) for number in range(11)}
        clients = {number: in_data(port, number, halves[number][0]) for number in finishers + stallers}
        for number in enveloped:
            client = smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=20)
            client.ehlo()
            client.mail("alice@example.org")
            assert client.rcpt(PEOPLE[number][0]) == (250, b"OK")
            clients[number] = client
        idle = smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=20)
        idle.ehlo()
        time.sleep(0.2)  # the relay has read the first halves

        daemon.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert daemon.event("stopping")["sessions"] == len(clients) + 1
        # the idle session is told at once
        assert first_line(idle) == (421, b"4.3.2 Service shutting down, try again later")
        with concurrent.futures.ThreadPoolExecutor(len(finishers) + len(enveloped)) as pool:
            finished = dict(zip(finishers, pool.map(lambda n: finish(clients[n], halves[n][1]), finishers)))
            finished |= dict(zip(enveloped, pool.map(
                lambda n: clients[n].data(b"".join(halves[n])[:-3]), enveloped)))
        # a new transaction on a session that finished is refused
        assert clients[0].docmd("MAIL FROM:<alice@example.org>") == (
            421, b"4.3.2 Service shutting down, try again later")
        cut_off = {number: first_line(clients[number]) for number in stallers}
        exit_code = daemon.proc.wait(SHUTDOWN_TIMEOUT + 10)
        took = time.monotonic() - signalled
        daemon.event("stopped")
    finally:
        daemon.stop()
        next_hop.stop()
    assert exit_code == 0
    assert {n: code for n, (code, _) in finished.items()} == {n: 250 for n in finishers + enveloped}
    assert cut_off == {n: (421, b"4.3.2 Service shutting down, try again later") for n in stallers}
    # every transaction the client saw 250 for is at the next hop exactly once; none of the others is
    assert sorted(handler.message_ids()) == sorted(f"term-{n}@example.org" for n in finishers + enveloped)
    assert SHUTDOWN_TIMEOUT - 0.1 <= took <= SHUTDOWN_TIMEOUT + 1.5, took


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_while_the_next_hop_is_slower_than_the_deadline(tmp_path: Path, workers: int) -> None:
    # The message is complete and the relay waits for the next hop's answer when the drain deadline passes.
    handler = SinkHandler(data_delay=SHUTDOWN_TIMEOUT + 1.0)
    next_hop = next_hop_controller(handler)
    daemon = RelayDaemon(daemon_config(tmp_path, next_hop.port, free_port(), next_hop_timeout=10.0, workers=workers))
    try:
        port = int(daemon.event("listening")["address"].rsplit(":", 1)[1])
        first, rest = sigterm_message(0)
        client = in_data(port, 0, first)
        time.sleep(0.2)
        daemon.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        daemon.event("stopping")
        reply = finish(client, rest)
        exit_code = daemon.proc.wait(SHUTDOWN_TIMEOUT + 15)
        took = time.monotonic() - signalled
    finally:
        daemon.stop()
        next_hop.stop()
    delivered = handler.message_ids()
    assert exit_code == 0
    # the relay waits for a next-hop call in progress in any case, which next_hop_timeout bounds
    assert took <= SHUTDOWN_TIMEOUT + 10.0 + 1.5, took
    # What the client was told and what the next hop has agree: 250 and delivered once, or 4xx and not delivered
    # (a 421 for a message the next hop then accepts is resent by the client: a duplicate).
    assert (reply[0], delivered) in [(250, ["term-0@example.org"]), (421, [])], (reply, delivered)
