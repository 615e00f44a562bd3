"""The relay's SMTP client to the next hop (aiosmtplib): connections kept in a small pool, replies as values."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

from mailmerge_gov.config import Config
from mailmerge_gov.forwarding.address import NULL_PATH


_JOIN_LIMIT = 64 * 1024  # a message up to this size is joined and written at once; a larger one part by part


@dataclass(frozen=True)
class NextHopSettings:
    """Where the next hop is and how long each of its answers may take."""

    host: str
    port: int
    implicit_tls: bool = False  # smtps://; smtp:// uses STARTTLS when offered, without verifying (like Postfix "may")
    timeout: float = 60.0
    local_hostname: str = "localhost"
    ca_file: Path | None = None
    pool_size: int = 32  # idle connections kept for later client sessions (0: a connection per session)
    pool_idle: float = 10.0  # seconds an idle connection is kept
    pool_max_age: float = 300.0  # seconds after its opening a connection is no longer reused (as Postfix's smtp)


def next_hop_settings(config: Config) -> NextHopSettings:
    """The next hop of a consolidation's [relay]; ValueError when next_hop is not set."""
    relay = config.relay
    if not relay.next_hop:
        raise ValueError(f"{config.path}: [relay] next_hop is not set: the relay needs the new mail server")
    return NextHopSettings(host=relay.next_hop_host, port=relay.next_hop_port,
                           implicit_tls=relay.next_hop.startswith("smtps:"), timeout=relay.next_hop_timeout,
                           local_hostname=relay.hostname, ca_file=relay.next_hop_ca_file)


@dataclass(frozen=True)
class HopReply:
    """The next hop's answer to one command, or why there was none."""

    code: int  # 0 when there was no answer
    text: str = ""
    failure: str = ""  # "unreachable", "timeout", "connection lost" or another reason; empty when it answered

    @property
    def positive(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.code < 300

    def one_line(self) -> str:
        """The answer on one line, for logs."""
        if self.failure:
            return f"no answer: {self.failure}"
        return f"{self.code} {' '.join(self.text.split())}".strip()


class NextHop:
    """One SMTP connection to the next hop; every method returns a HopReply and never raises for SMTP trouble."""

    def __init__(self, settings: NextHopSettings) -> None:
        """Prepare the client; nothing is connected until connect()."""
        self.settings = settings
        self.client: aiosmtplib.SMTP | None = None
        self.in_transaction = False  # MAIL accepted and the transaction not yet ended by DATA or RSET
        self.opened = 0.0  # loop time of connect()

    @property
    def connected(self) -> bool:
        """Whether the connection is open."""
        return self.client is not None and self.client.is_connected

    def supports(self, extension: str) -> bool:
        """Whether the next hop announced an ESMTP extension."""
        return self.client is not None and self.client.supports_extension(extension)

    async def connect(self) -> HopReply:
        """Connect and greet (EHLO, STARTTLS where offered)."""
        settings = self.settings
        context = None
        if settings.implicit_tls and settings.ca_file is not None:
            context = ssl.create_default_context(cafile=str(settings.ca_file))
        self.client = aiosmtplib.SMTP(
            hostname=settings.host, port=settings.port, timeout=settings.timeout,
            local_hostname=settings.local_hostname, use_tls=settings.implicit_tls,
            start_tls=False if settings.implicit_tls else None,
            validate_certs=settings.implicit_tls, tls_context=context,
        )
        self.opened = asyncio.get_running_loop().time()
        reply = await self._run(self._connect(), connecting=True)
        if not reply.positive:
            self._drop()
        return reply

    async def _connect(self) -> HopReply:
        """Open the connection and make sure EHLO (or HELO) has been said."""
        assert self.client is not None
        greeting = await self.client.connect()
        if self.client.is_ehlo_or_helo_needed:
            try:
                await self.client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await self.client.helo()
        return HopReply(greeting.code, greeting.message)

    async def mail(self, sender: str, options: list[str], utf8: bool = False) -> HopReply:
        """MAIL FROM:<sender> with ESMTP parameters."""
        path = "" if sender == NULL_PATH else sender
        reply = await self._command(b"MAIL", b"FROM:<" + path.encode("utf-8" if utf8 else "ascii") + b">",
                                    *(option.encode("ascii") for option in options))
        self.in_transaction = reply.positive
        return reply

    async def rcpt(self, recipient: str, utf8: bool = False) -> HopReply:
        """RCPT TO:<recipient>."""
        return await self._command(b"RCPT", b"TO:<" + recipient.encode("utf-8" if utf8 else "ascii") + b">")

    async def rset(self) -> HopReply:
        """RSET: end the open transaction."""
        reply = await self._command(b"RSET")
        self.in_transaction = False
        return reply

    async def send(self, parts: Sequence[bytes | bytearray]) -> HopReply:
        """DATA and a message already in wire form (dot-stuffed, CRLF line ends), given in parts to save copies;
        after a refusal the transaction counts as still open."""
        assert self.client is not None
        reply = await self._run(self._send(self.client, parts))
        # A 2xx ends the transaction. A refusal may not: a next hop that refuses the DATA command itself keeps
        # MAIL and RCPT (Postfix and smtp-sink then answer the next MAIL "503 5.5.1 Error: nested MAIL
        # command", which the client would take as permanent), and the same SMTPDataError comes for that as for
        # a refusal after the final dot. So the next transaction starts with RSET, which is harmless when this
        # one had ended. Without an answer _run has dropped the connection already.
        self.in_transaction = not reply.positive and self.connected
        return reply

    async def _send(self, client: aiosmtplib.SMTP, parts: Sequence[bytes | bytearray]) -> aiosmtplib.SMTPResponse:
        """What aiosmtplib's data() does, less its own pass over the message (line endings, dot-stuffing, +=)."""
        # aiosmtplib copies a message three times (normalise, dot-stuff, append the end) before it writes it: for
        # 1 MB messages that was most of the relay's memory and time. The relay already has the message in wire
        # form, so it writes the parts itself, between the same two replies as aiosmtplib's
        # execute_data_command. The command lock is not needed: a NextHop carries one transaction at a time, and
        # nothing is awaited between the writes and read_response, so no reply can come in unclaimed.
        # timeout=None: _run bounds the whole call already (one timer rather than two per reply)
        start = await client.execute_command(b"DATA", timeout=None)  # closes the connection on 421 or a disconnect
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        try:
            if sum(len(part) for part in parts) <= _JOIN_LIMIT:
                protocol.write(b"".join((*parts, b".\r\n")))  # one send() for a small message
            else:
                for part in parts:
                    if part:
                        protocol.write(part)  # type: ignore[arg-type]  # the transport takes any bytes-like object
                protocol.write(b".\r\n")
            response = await protocol.read_response(timeout=None)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            client.close()
            raise
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def close(self) -> None:
        """QUIT politely (briefly), then close."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.is_connected:
                await asyncio.wait_for(client.quit(), timeout=min(5.0, self.settings.timeout))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            client.close()

    async def _command(self, *args: bytes) -> HopReply:
        """Send one command, bounded by the timeout."""
        if self.client is None or not self.client.is_connected:
            return HopReply(0, failure="connection lost")
        # timeout=None: _run bounds the call (aiosmtplib would set a second timer for the same limit)
        return await self._run(self.client.execute_command(*args, timeout=None))

    async def _run(self, call: Awaitable[Any], connecting: bool = False) -> HopReply:
        """Await an aiosmtplib call within the timeout and turn its outcome into a HopReply."""
        try:
            async with asyncio.timeout(self.settings.timeout):
                response = await call
        except aiosmtplib.SMTPResponseException as exc:
            return HopReply(exc.code, exc.message)
        except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPConnectError):
            self._drop()
            return HopReply(0, failure="unreachable")
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            self._drop()
            return HopReply(0, failure="unreachable" if connecting else "timeout")
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
            self._drop()
            return HopReply(0, failure="unreachable" if connecting else "connection lost")
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self._drop()
            return HopReply(0, failure=type(exc).__name__)
        if isinstance(response, HopReply):
            return response
        return HopReply(response.code, response.message)

    def _drop(self) -> None:
        """Forget a connection that can no longer be trusted to be in step."""
        if self.client is not None:
            self.client.close()
        self.client = None
        self.in_transaction = False


class NextHopPool:
    """Greeted next-hop connections that no transaction uses, kept for the next client session (Postfix's scache)."""

    # Each client session used to open its own connection (connect, EHLO, QUIT: about a tenth of the relay's
    # time at 2 KB). aiosmtplib has no pool of its own, hence this small one. A connection is pooled only
    # between transactions (in_transaction False) and is handed to one session at a time; one that the next
    # hop closed meanwhile is found out by is_connected or by the first command, which the handler then sends
    # again over a fresh connection (nothing was sent yet, so nothing is lost or doubled).

    def __init__(self, settings: NextHopSettings) -> None:
        """An empty pool for the next hop of `settings`."""
        self.settings = settings
        self.idle: list[NextHop] = []  # most recently released last
        self._timers: dict[NextHop, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False  # after close(): nothing more is kept (the relay is stopping)

    def take(self) -> NextHop | None:
        """An idle connection still fit for use, or None (then the caller opens one)."""
        now = asyncio.get_running_loop().time()
        while self.idle:
            hop = self.idle.pop()  # the most recent: the least likely to have been closed by the next hop
            self._timers.pop(hop).cancel()
            if hop.connected and not hop.in_transaction and now - hop.opened < self.settings.pool_max_age:
                return hop
            self._close_later(hop)
        return None

    def give_back(self, hop: NextHop) -> bool:
        """Keep a connection between transactions for a later session; False when not kept (the caller closes it)."""
        loop = asyncio.get_running_loop()
        if (self.closed or not hop.connected or hop.in_transaction or len(self.idle) >= self.settings.pool_size
                or loop.time() - hop.opened >= self.settings.pool_max_age):
            return False
        self.idle.append(hop)
        self._timers[hop] = loop.call_later(self.settings.pool_idle, self._expire, hop)
        return True

    def _expire(self, hop: NextHop) -> None:
        """Close a connection idle for pool_idle seconds."""
        if hop in self._timers:
            del self._timers[hop]
            self.idle.remove(hop)
            self._close_later(hop)

    def _close_later(self, hop: NextHop) -> None:
        """QUIT a connection in the background."""
        task = asyncio.get_running_loop().create_task(hop.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection and wait for the QUITs; keep none from now on."""
        self.closed = True
        while self.idle:
            hop = self.idle.pop()
            self._timers.pop(hop).cancel()
            self._close_later(hop)
        if self._closing:
            await asyncio.wait(set(self._closing))
