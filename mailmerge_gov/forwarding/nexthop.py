"""The relay's SMTP client to the next hop (aiosmtplib): one connection per client session, replies as values."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

from mailmerge_gov.config import Config
from mailmerge_gov.forwarding.address import NULL_PATH


@dataclass(frozen=True)
class NextHopSettings:
    """Where the next hop is and how long each of its answers may take."""

    host: str
    port: int
    implicit_tls: bool = False  # smtps://; smtp:// uses STARTTLS when offered, without verifying (like Postfix "may")
    timeout: float = 60.0
    local_hostname: str = "localhost"
    ca_file: Path | None = None


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

    async def data(self, message: bytes) -> HopReply:
        """DATA and the message (aiosmtplib dot-stuffs it); after a refusal the transaction counts as still open."""
        assert self.client is not None
        reply = await self._run(self.client.data(message))
        # A 2xx ends the transaction. A refusal may not: a next hop that refuses the DATA command itself keeps
        # MAIL and RCPT (Postfix and smtp-sink then answer the next MAIL "503 5.5.1 Error: nested MAIL
        # command", which the client would take as permanent), and aiosmtplib raises the same SMTPDataError
        # for that as for a refusal after the final dot. So the next transaction starts with RSET, which is
        # harmless when this one had ended. Without an answer _run has dropped the connection already.
        self.in_transaction = not reply.positive and self.connected
        return reply

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
        return await self._run(self.client.execute_command(*args))

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
