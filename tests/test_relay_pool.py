"""Next-hop connections kept between client sessions (NextHopPool): reused, bounded, retried when found closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailmerge_gov.forwarding.addressmap import parse_map
from mailmerge_gov.forwarding.handler import RelayHandler, RelaySettings
from mailmerge_gov.forwarding.nexthop import NextHopSettings
from servers import LOOPBACK, Relay, free_port, relay_in_thread

MAP = """\
old_address,new_address,valid_until
nguyenvana@binhduong.gov.vn,annv@hcm.gov.vn,2099-06-30
tranthib@binhduong.gov.vn,btt@hcm.gov.vn,2099-06-30
"""


@dataclass
class PoolSink:
    """aiosmtpd next hop that keeps its connections, so a test can close them or make them answer 421."""

    servers: list[SMTP] = field(default_factory=list)
    closed: list[SMTP] = field(default_factory=list)
    stale: set[int] = field(default_factory=set)  # ids of connections that answer MAIL with 421 and close
    messages: list[tuple[int, list[str], bytes]] = field(default_factory=list)  # (connection id, rcpts, content)
    mails: list[int] = field(default_factory=list)  # the connection of each MAIL
    port: int = 0
    controller: Any = None
    ehlo_delay: float = 0.0

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        self.servers.append(server)  # the relay's connections (the Controller's own readiness check says no EHLO)
        await asyncio.sleep(self.ehlo_delay)
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.mails.append(id(server))
        if id(server) in self.stale:
            server.loop.call_soon(server.transport.close)  # type: ignore[union-attr]
            return "421 4.3.2 Service shutting down"
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append((id(server), list(envelope.rcpt_tos), envelope.original_content or b""))
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    def open(self) -> list[SMTP]:
        """Its connections still open."""
        return [server for server in self.servers if server not in self.closed]

    def close_all(self) -> None:
        """Close every connection from the server side (the next hop restarted, or timed them out)."""
        async def close() -> None:
            for server in self.open():
                if server.transport is not None:
                    server.transport.close()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(close(), self.controller.loop).result(5)


class _RecordingSMTP(SMTP):
    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.closed.append(self)
        super().connection_lost(error)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def sink() -> Iterator[PoolSink]:
    handler = PoolSink()
    controller = _Controller(handler, hostname=LOOPBACK, port=free_port(), server_hostname="mx.hcm.test")
    controller.start()
    handler.port, handler.controller = controller.port, controller
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def start_relay() -> Iterator[Callable[..., Relay]]:
    controllers = []

    def start(port: int, **pool: Any) -> Relay:
        settings = RelaySettings(next_hop=NextHopSettings(LOOPBACK, port, timeout=2.0, local_hostname="relay.test",
                                                          **pool), hostname="relay.test")
        return relay_in_thread(
            lambda log: RelayHandler(parse_map(MAP, "map.csv", ("binhduong.gov.vn",)), settings, on_transaction=log),
            controllers)

    yield start
    for controller in controllers:
        if controller._thread is not None:  # noqa: SLF001  (a test may have stopped it)
            controller.stop()


def send(relay: Relay, recipient: str = "nguyenvana@binhduong.gov.vn", body: bytes = b"x\r\n") -> tuple[int, bytes]:
    """One message in a client session of its own; the reply to the end of data."""
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt(recipient)[0] == 250
        return client.data(b"Subject: pool\r\n\r\n" + body)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sessions_one_after_another_reuse_one_connection(sink: PoolSink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    for n in range(5):
        assert send(relay, body=f"{n}\r\n".encode())[0] == 250
        wait_for(lambda: len(relay.handler.pool.idle) == 1)
    assert len(sink.servers) == 1 and len(sink.messages) == 5
    assert [content.rsplit(b"\r\n\r\n", 1)[1] for _, _, content in sink.messages] == [b"0\r\n", b"1\r\n", b"2\r\n",
                                                                                       b"3\r\n", b"4\r\n"]


def test_a_client_leaving_while_the_next_hop_greets_leaves_no_connection_behind(
        sink: PoolSink, start_relay: Callable[..., Relay]) -> None:
    sink.ehlo_delay = 0.5
    relay = start_relay(sink.port)
    client = relay.client()
    client.mail("alice@example.org")
    client.putcmd("RCPT", "TO:<nguyenvana@binhduong.gov.vn>")  # the relay connects to the next hop now
    wait_for(lambda: len(sink.servers) == 1)
    client.close()  # before the next hop has answered EHLO
    wait_for(lambda: len(relay.handler.pool.idle) == 1)  # the greeted connection is kept, not stranded
    sink.ehlo_delay = 0.0
    assert send(relay)[0] == 250
    assert len(sink.servers) == 1 and sink.open() == sink.servers


def test_pooled_connection_closed_by_the_next_hop_delivers_once(sink: PoolSink,
                                                                start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    assert send(relay, body=b"first\r\n")[0] == 250
    wait_for(lambda: len(relay.handler.pool.idle) == 1)
    sink.close_all()  # between the two client sessions
    assert send(relay, body=b"second\r\n")[0] == 250
    bodies = [content.rsplit(b"\r\n\r\n", 1)[1] for _, _, content in sink.messages]
    assert bodies == [b"first\r\n", b"second\r\n"]
    assert len(sink.servers) == 2


def test_pooled_connection_that_answers_421_is_retried_on_a_new_one(sink: PoolSink,
                                                                    start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    assert send(relay, body=b"first\r\n")[0] == 250
    wait_for(lambda: len(relay.handler.pool.idle) == 1)
    sink.stale.add(id(sink.servers[0]))  # still open, but it says 421 to the next MAIL and closes
    assert send(relay, body=b"second\r\n") == (250, b"2.0.0 Ok: queued as Q2")
    assert len(sink.servers) == 2 and len(sink.mails) == 3  # MAIL on the old connection, then on a new one
    assert [(conn, content.rsplit(b"\r\n\r\n", 1)[1]) for conn, _, content in sink.messages] == [
        (id(sink.servers[0]), b"first\r\n"), (id(sink.servers[1]), b"second\r\n")]
    [_, record] = relay.wait_records(2)
    assert record.result == "250 2.0.0 Ok: queued as Q2"


def test_a_fresh_connection_that_answers_421_is_not_retried(sink: PoolSink,
                                                            start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    sink.stale = _Everything()  # type: ignore[assignment]
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 451
    assert len(sink.mails) == 1 and sink.messages == []


class _Everything(set[int]):
    def __contains__(self, item: object) -> bool:
        return True


def test_concurrent_sessions_never_share_a_connection(sink: PoolSink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, pool_size=2)
    clients = [relay.client() for _ in range(4)]
    try:
        for client in clients:
            client.mail("alice@example.org")
            assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250  # each has a next-hop transaction open
        assert len(sink.servers) == 4
        for n, client in enumerate(clients):
            assert client.data(f"Subject: {n}\r\n\r\n{n}\r\n".encode())[0] == 250
    finally:
        for client in clients:
            client.quit()
    assert sorted(conn for conn, _, _ in sink.messages) == sorted(id(server) for server in sink.servers)
    wait_for(lambda: len(sink.open()) == 2)  # the pool keeps at most pool_size; the others are closed
    assert len(relay.handler.pool.idle) == 2


def test_idle_connections_are_closed_after_pool_idle(sink: PoolSink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, pool_idle=0.3)
    assert send(relay)[0] == 250
    wait_for(lambda: len(relay.handler.pool.idle) == 1)
    wait_for(lambda: not sink.open() and not relay.handler.pool.idle, timeout=3)


def test_no_pool_with_pool_size_0(sink: PoolSink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port, pool_size=0)
    assert send(relay)[0] == 250
    assert send(relay)[0] == 250
    assert len(sink.servers) == 2
    wait_for(lambda: not sink.open())


def test_connection_left_in_a_transaction_is_not_pooled(sink: PoolSink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
    # QUIT without DATA: the next hop has MAIL and RCPT of it, so that connection is closed, not kept
    wait_for(lambda: not sink.open())
    assert relay.handler.pool.idle == []
    assert send(relay)[0] == 250 and len(sink.messages) == 1


def test_stopping_the_relay_closes_pooled_connections(sink: PoolSink, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    assert send(relay)[0] == 250
    wait_for(lambda: len(relay.handler.pool.idle) == 1)
    relay.controller.stop()
    wait_for(lambda: not sink.open())
