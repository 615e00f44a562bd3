"""The relay's SMTP server side: aiosmtpd's SMTP protocol with the relay's limits, replies and DATA reading."""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, AnyStr

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, Envelope, syntax

from mailmerge_gov.forwarding import eventloop, replies, smtpinit
from mailmerge_gov.forwarding.address import split_path
from mailmerge_gov.forwarding.handler import COMMAND_LINE_LIMIT, TEXT_LINE_LIMIT, RelayHandler, RelaySettings
from mailmerge_gov.forwarding.replies import Reply
from mailmerge_gov.forwarding.smtpdata import TOO_LONG, DataLost, DataRead, DataReader, RelayEnvelope, unstuff


def smtp_options(settings: RelaySettings, tls_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Keyword arguments for aiosmtpd's SMTP class that enforce the relay's limits (STARTTLS with a context)."""
    return {
        "tls_context": tls_context,
        "require_starttls": settings.require_tls and tls_context is not None,
        "hostname": settings.hostname,
        "ident": "ESMTP",  # no software name and version in the greeting
        "data_size_limit": settings.max_message_size,  # advertised as SIZE, enforced while reading DATA
        "enable_SMTPUTF8": True,  # non-ASCII addresses are then refused unless MAIL says SMTPUTF8
        "decode_data": False,  # bytes: the body is relayed untouched (DKIM)
        "timeout": settings.timeout,
    }


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP server with strict SMTP paths, connection limits, 421 on timeout, and the handler told."""

    def __init__(self, handler: Any, **options: Any) -> None:
        """aiosmtpd's SMTP with per-connection command size limits."""
        # aiosmtpd keeps command_size_limits on the class, shared by all connections and grown by every EHLO
        # (for SIZE and SMTPUTF8): one dict per connection, emptied at each EHLO, keeps the RFC 5321 limits.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        if smtpinit.applicable(options):
            smtpinit.init(self, handler, **options)  # the same, with its method tables made once per class
        else:
            super().__init__(handler, **options)
        self._client_ip: str | None = None
        self._refused = False  # over a connection limit: told so and closed before the greeting
        self._lost = False
        self._reading_message = False
        self._message: DataReader | None = None  # while DATA is read: the bytes go to it, not to the StreamReader
        self._message_read: asyncio.Future[DataRead] | None = None
        self._errors = 0  # refusals since the session began or a message was last relayed ([relay] max_errors)
        self._data_started = 0.0  # loop time of the 354 reply
        self._data_bytes = 0  # bytes of the message received so far
        self._too_slow = False  # the idle timer now stands for the min_data_rate deadline

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The path exactly as sent (source route kept): the handler decides, not the lenient RFC 5322 parser."""
        return split_path(arg)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection within the limits (421 4.7.0 and closed otherwise) and register it."""
        if self._client_ip is None:  # a second call comes after STARTTLS, on the same connection
            self._client_ip = _peer_ip(transport.get_extra_info("peername"))
            opened = getattr(self.event_handler, "connection_opened", None)
            refusal = opened(self, self._client_ip) if opened is not None else None
            if refusal is not None:
                self._refused = True
                transport.write(str(refusal).encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Tell the handler, so it can log the transaction and close the next-hop connection."""
        if self._refused or self._lost:
            # aiosmtpd calls this itself after a failed TLS handshake, and the transport again later.
            return
        self._lost = True
        session = self.session
        super().connection_lost(error)
        closed = getattr(self.event_handler, "connection_closed", None)
        if closed is not None:
            closed(self, session, self._client_ip or "")

    def _timeout_cb(self) -> None:
        """Say 421 to a client silent for `timeout` seconds, or sending a message too slowly, then close (aiosmtpd
        closes without a word)."""
        handler = self.event_handler
        if isinstance(handler, RelayHandler):
            handler.connection_timed_out(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._too_slow and isinstance(handler, RelayHandler):
                reply = replies.render(421, "4.4.2", "data_too_slow", rate=handler.settings.min_data_rate,
                                       seconds=f"{self._timeout_duration:g}")
            else:
                reply = replies.render(421, "4.4.2", "timeout", seconds=f"{self._timeout_duration:g}")
            transport.write(str(reply).encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
        super()._timeout_cb()

    def data_received(self, data: bytes) -> None:
        """Bytes from the client; while a message comes in, each chunk restarts the idle timer, within the
        deadline that [relay] min_data_rate sets."""
        # aiosmtpd times DATA from the command on: a large message on a slow link would be cut off however
        # steadily it arrives, and the sender would retry it for days. Silence is what `timeout` is about; and
        # so that a byte now and then cannot hold a connection for ever, the message must also come at
        # min_data_rate on average after its first `timeout` seconds (Postfix's smtpd_min_data_rate).
        if self._reading_message:
            self._data_bytes += len(data)
            self._reset_data_timer()
        message = self._message
        if message is None:
            super().data_received(data)
            return
        outcome = message.feed(data)
        if outcome is not None:
            read, excess = outcome
            self._message = None
            if excess:
                super().data_received(excess)  # the commands after the end of data, to the StreamReader
            if self._message_read is not None and not self._message_read.done():
                self._message_read.set_result(read)

    def _create_envelope(self) -> Envelope:
        """An envelope that keeps the message as it came (dot-stuffed): the relay sends it on as it is."""
        return RelayEnvelope()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in large chunks (aiosmtpd reads line by line), with the idle timer restarted as bytes arrive."""
        # The checks and replies are aiosmtpd 1.4's (SMTP.smtp_DATA): HELO first, RCPT first, no argument, then
        # 354; a line too long answers 500 and too much data 552 after the end of data; the handler's DATA
        # hook gives the final reply. smtpdata.DataReader says what differs in how the bytes are read.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reading_message = True
        self._data_started, self._data_bytes = self.loop.time(), 0
        try:
            read = await self._read_message()
        except asyncio.CancelledError:
            self._writer.close()  # the connection was lost during DATA (as aiosmtpd does)
            raise
        finally:  # DataLost (end of input without the cancellation aiosmtpd sends first) is a ConnectionResetError
            self._reading_message = self._too_slow = False
        # The whole message is here: what is left of the min_data_rate deadline no longer applies, and the
        # handler's work before its next-hop call (the ARC seal, with its DNS lookups) gets the full timeout.
        self._reset_timeout()
        if read.wire is None:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)" if read.refused == TOO_LONG
                            else "552 Error: Too much mail data")
            self._set_post_data_state()
            return
        if isinstance(envelope, RelayEnvelope):
            envelope.wire, envelope.wire_bare, envelope.wire_dots = read.wire, read.bare, read.dots
        else:  # a subclass with an envelope of its own: the plain message, as aiosmtpd gives it
            envelope.original_content = envelope.content = unstuff(read.wire)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        final = "250 OK" if status is MISSING else status
        await self.push(final)
        if isinstance(final, str) and final.startswith("2"):
            self._errors = 0  # the limit is on refusals without mail relayed, as in Postfix

    def _reset_data_timer(self) -> None:
        """Restart the idle timer for `timeout` seconds, or for less where the min_data_rate deadline is nearer."""
        handler = self.event_handler
        rate = handler.settings.min_data_rate if isinstance(handler, RelayHandler) else 0
        if not rate:
            self._reset_timeout()
            return
        deadline = self._data_started + self._timeout_duration + self._data_bytes / rate
        left = deadline - self.loop.time()
        self._too_slow = left < self._timeout_duration
        self._reset_timeout(max(min(left, self._timeout_duration), 0.001))  # 0 would mean the full timeout

    async def _read_message(self) -> DataRead:
        """The message after 354, fed by data_received straight from the transport."""
        # asyncio's StreamReader would copy each piece twice (into its buffer, out of it), stop and restart
        # reading the socket at each piece (its limit is one line), and wake this task for each: for 1 MB
        # messages that was a tenth of the relay's time. The bytes the client sent before this point (it
        # should have waited for 354, but may pipeline) are in the StreamReader: they come first.
        message = DataReader(self.data_size_limit, self.line_length_limit)
        reader = self._reader
        while reader._buffer:  # asyncio has no public way to ask whether bytes are buffered
            outcome = message.feed(await reader.read(len(reader._buffer)))  # returns at once: bytes are there
            if outcome is not None:
                read, excess = outcome
                if excess:
                    reader.feed_data(excess)  # the buffer was emptied above, so these come first
                return read
        if reader.at_eof():
            raise DataLost("connection closed during DATA")
        self._message_read = self.loop.create_future()
        self._message = message
        try:
            return await self._message_read
        finally:
            self._message = self._message_read = None

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        """EHLO, with the command size limits back at their start (aiosmtpd grows them at each EHLO)."""
        self.command_size_limits.clear()
        await super().smtp_EHLO(hostname)

    async def push(self, status: AnyStr) -> None:
        """Send a reply; aiosmtpd's own refusals get enhanced status codes and words from the templates; a client
        refused [relay] max_errors times without a message relayed is told 421 and disconnected."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # closed at the error limit: pipelined commands still being read get no reply
        if isinstance(status, str):
            status = self._reword(status)  # type: ignore[assignment]
        await super().push(status)
        handler = self.event_handler
        if not isinstance(handler, RelayHandler) or not isinstance(status, str) or status[:1] not in ("4", "5"):
            return
        # Each refusal counts, as in Postfix's smtpd_hard_error_limit: a client that floods RCPT with unknown
        # addresses (or with more than max_recipients) or repeats bad commands is cut off after max_errors.
        self._errors += 1
        if self._errors >= handler.settings.max_errors and not status.startswith("421"):
            transport = self.transport
            if transport is not None and not transport.is_closing():
                reply = str(handler.too_many_errors(self)).encode("ascii") + b"\r\n"
                transport.write(reply)  # type: ignore[attr-defined]
                transport.close()  # no more is read; aiosmtpd's connection_lost then ends its command loop
                # The commands the client pipelined behind this one are dropped, not run (no lookups, no next-hop
                # calls for them). aiosmtpd's own transport.close() after some of its replies still finds one.
                self._reader._buffer.clear()  # asyncio has no public way to drop what a StreamReader holds

    def _reword(self, status: str) -> str:
        """The relay's reply for one of aiosmtpd's fixed replies (counted in the metrics); others unchanged."""
        handler = self.event_handler
        if not isinstance(handler, RelayHandler):
            return status
        if status == "530 Must issue a STARTTLS command first":
            handler.metrics.add("commands_refused_total", "tls-required")
            return str(replies.render(530, "5.7.0", "starttls_required"))
        if status == "500 Command line too long":
            handler.metrics.add("commands_refused_total", "command-too-long")
            return str(replies.render(500, "5.5.2", "command_too_long", limit=COMMAND_LINE_LIMIT))
        if status == "500 Line too long (see RFC5321 4.5.3.1.6)":
            # aiosmtpd's code, but no enhanced status: RFC 5321 4.5.3.1.10 names 500 for a line too long.
            reply = replies.render(500, "5.6.0", "line_too_long", limit=TEXT_LINE_LIMIT)
            handler.message_refused(self, reply, "line-too-long", ends_transaction=True)
            return str(reply)
        if status == "552 Error: Too much mail data":
            handler.message_refused(self, Reply(552, "", ("Error: Too much mail data",)), "too-large",
                                    ends_transaction=True)
        elif status == "552 Error: message size exceeds fixed maximum message size":
            # Refused at MAIL (SIZE=): no transaction of this message was opened, an earlier one stays open.
            handler.message_refused(self, Reply(552), "too-large", ends_transaction=False)
        return status


def _peer_ip(peer: object) -> str:
    """The IP address of a socket peer name."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


class RelayController(Controller):
    """aiosmtpd's threaded Controller serving RelaySMTP: the relay embedded in another program or a test."""

    def factory(self) -> SMTP:
        """A RelaySMTP for each connection."""
        return RelaySMTP(self.handler, **self.SMTP_kwargs)

    def stop(self, no_assert: bool = False) -> None:
        """Close the sessions and their next-hop connections, then stop the loop and its thread."""
        # Controller.stop() cancels every task of the loop: next-hop connections would be left half-closed.
        if self._thread is not None and self.loop.is_running() and isinstance(self.handler, RelayHandler):
            done = asyncio.run_coroutine_threadsafe(self.handler.drain(0), self.loop)
            done.result(timeout=self.handler.settings.next_hop.timeout + 10)
        super().stop(no_assert)


def relay_controller(handler: RelayHandler, host: str, port: int, event_loop: str = "auto") -> RelayController:
    """A threaded relay on host:port with the handler's limits (call .start() and .stop()), on that kind of loop."""
    options = smtp_options(handler.settings, handler.tls_context)
    loop = eventloop.loop_factory(event_loop)()
    # Controller's `hostname` is the address to bind; the name in the greeting is `server_hostname`.
    return RelayController(handler, hostname=host, port=port, server_hostname=options.pop("hostname"), loop=loop,
                           **options)
