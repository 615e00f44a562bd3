"""The aiosmtpd handler: before-queue relaying of mail for old addresses to the next hop, with its verdicts."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import json
import logging
import secrets
import ssl
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from mailmerge_gov.config import Config
from mailmerge_gov.forwarding import replies
from mailmerge_gov.forwarding.address import NULL_PATH, AddressError, parse_mailbox
from mailmerge_gov.forwarding.addressmap import AddressMap, Outcome, Verdict
from mailmerge_gov.forwarding.arc import ArcSealer
from mailmerge_gov.forwarding.metrics import RelayMetrics
from mailmerge_gov.forwarding.message import (count_received, delivered_to, delivered_to_header, header_fields,
                                              normalise_line_endings, protocol_name, received_header)
from mailmerge_gov.forwarding.nexthop import HopReply, NextHop, NextHopPool, NextHopSettings, next_hop_settings
from mailmerge_gov.forwarding.replies import Reply
from mailmerge_gov.forwarding.shared import SharedLimits
from mailmerge_gov.forwarding.smtpdata import RelayEnvelope, header_block, stuff, unstuff
from mailmerge_gov.forwarding.srs import Srs, SrsError

log = logging.getLogger("mailmerge_gov.forwarding")
HEADER_ALLOWANCE = 2048  # bytes the relay may add to a message (Received, Delivered-To): SIZE to the next hop
COMMAND_LINE_LIMIT = 512  # octets with CRLF, RFC 5321 4.5.3.1.4 (aiosmtpd's command_size_limit)
TEXT_LINE_LIMIT = 1000  # octets with CRLF, RFC 5321 4.5.3.1.6 (aiosmtpd allows one more: the transparency dot)
ARC_ALLOWANCE = 4096  # bytes an ARC set adds (two RSA signatures, the authentication results)
# Why a reply that is not 2xx was given, for the metrics, when the reply itself says it.
_REASONS_BY_STATUS = {"4.4.1": "next-hop-unavailable", "4.4.2": "next-hop-unavailable", "4.4.0": "next-hop-deferred",
                      "4.3.0": "internal-error", "5.4.6": "loop"}


@dataclass(frozen=True)
class RelaySettings:
    """How the relay behaves: its name, limits and the next hop."""

    next_hop: NextHopSettings
    hostname: str = "localhost"
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 20  # refused commands in a session without a message relayed (Postfix's hard error limit)
    min_data_rate: int = 500  # bytes/s of DATA after its first `timeout` seconds (Postfix's smtpd_min_data_rate)
    max_hops: int = 50
    timeout: float = 300.0
    require_tls: bool = False  # MAIL only after STARTTLS (when the relay has a certificate)
    max_connections: int = 200
    max_connections_per_ip: int = 20


def event(name: str, **fields: object) -> str:
    """One JSON log line: the time, what happened, and its fields."""
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return json.dumps({"time": now, "event": name, **fields}, ensure_ascii=False)


def old_domains(config: Config) -> frozenset[str]:
    """The domains the relay answers for: every [[sources]] domain except the new unit's own."""
    # A surviving unit's domain can be both a source and the target (hcm.gov.vn); its MX is the new
    # server, so the relay must not claim it: mail for it here would be relaying.
    return frozenset(d for source in config.sources for d in source.domains if d != config.target.mail_domain)


def relay_settings(config: Config) -> RelaySettings:
    """The relay settings of a consolidation; ValueError when [relay] next_hop is missing."""
    relay = config.relay
    return RelaySettings(next_hop=next_hop_settings(config), hostname=relay.hostname,
                         max_message_size=relay.max_message_size, max_recipients=relay.max_recipients,
                         max_errors=relay.max_errors, min_data_rate=relay.min_data_rate,
                         max_hops=relay.max_hops, timeout=relay.timeout, require_tls=relay.require_tls,
                         max_connections=relay.max_connections, max_connections_per_ip=relay.max_connections_per_ip)


def verdict_reply(verdict: Verdict) -> Reply | None:
    """The RCPT reply for a refused address; None when the address forwards (the next hop decides)."""
    if verdict.outcome is Outcome.MOVED:
        assert verdict.new_address is not None
        return replies.moved(verdict.new_address)
    if verdict.outcome is Outcome.UNKNOWN:
        return replies.unknown(verdict.address)
    if verdict.outcome is Outcome.RELAY_DENIED:
        return replies.relay_denied(verdict.address)
    return None


@dataclass(frozen=True)
class RecipientRecord:
    """One RCPT of a transaction: the address, what the map said, where it went, what the client was told."""

    to: str
    verdict: str
    new: str | None
    reply: str


@dataclass(frozen=True)
class TransactionRecord:
    """One transaction, as logged: time, client, sender, recipients (old -> new), size, next hop, result."""

    id: str
    time: str
    client: str
    helo: str
    mail_from: str
    relayed_from: str
    recipients: tuple[RecipientRecord, ...]
    size: int | None
    next_hop: str
    result: str

    def as_json(self) -> str:
        """The record as one JSON line."""
        # Field by field rather than dataclasses.asdict, which deep-copies recursively: this runs per message.
        data = {"event": "transaction", "id": self.id, "time": self.time, "client": self.client, "helo": self.helo,
                "mail_from": self.mail_from, "relayed_from": self.relayed_from,
                "recipients": [{"to": r.to, "verdict": r.verdict, "new": r.new, "reply": r.reply}
                               for r in self.recipients],
                "size": self.size, "next_hop": self.next_hop, "result": self.result, "from": self.mail_from}
        return json.dumps(data, ensure_ascii=False)


@dataclass
class _Transaction:
    """The state of the transaction a client has open (mutable: it grows with each command)."""

    envelope: Envelope
    id: str
    started: dt.datetime
    mail_from: str
    relayed_from: str
    recipients: list[RecipientRecord] = field(default_factory=list)
    accepted: dict[str, list[str]] = field(default_factory=dict)  # new address -> old addresses sent to it
    hop_open: bool = False  # the next hop accepted our MAIL for this transaction
    failure: Reply | None = None  # once the next-hop transaction is lost, every later command gets this
    size: int | None = None
    next_hop: str = ""

    def record(self, client: str, helo: str, result: str) -> TransactionRecord:
        """The frozen log record of this transaction."""
        return TransactionRecord(self.id, self.started.isoformat(timespec="seconds"), client, helo,
                                 self.mail_from, self.relayed_from, tuple(self.recipients), self.size,
                                 self.next_hop, result)


@dataclass
class _Session:
    """What the handler keeps per client connection: its next-hop connection and open transaction."""

    client: str
    server: SMTP | None = None  # the client connection, whose idle timer the next-hop calls restart
    hop: NextHop | None = None
    transaction: _Transaction | None = None
    busy: asyncio.Future[HopReply] | None = None  # the next-hop call in progress
    closed_with: str = ""  # why the relay closed the connection, when it did (the log's result)


H = TypeVar("H", bound=Callable[..., Awaitable[str]])


def _guarded(hook: H) -> H:
    """Turn any exception of a hook into 451 4.3.0 without internals, logged with its traceback."""

    @functools.wraps(hook)
    async def wrapper(self: RelayHandler, server: SMTP, session: Session, envelope: Envelope, *args: Any) -> str:
        try:
            return await hook(self, server, session, envelope, *args)
        except Exception:
            log.error("%s", event("error", hook=hook.__name__, client=_client(session),
                                  error=traceback.format_exc()))
            state = self.sessions.get(session)
            if state is not None and state.transaction is not None:
                state.transaction.failure = replies.internal_error()
            if hook.__name__ in ("handle_RCPT", "handle_DATA"):
                self.metrics.add("recipients_deferred_total" if hook.__name__ == "handle_RCPT"
                                 else "messages_deferred_total", "internal-error")
            return str(replies.internal_error())

    return wrapper  # type: ignore[return-value]


class RelayHandler:
    """aiosmtpd handler: accepts a recipient only when the next hop does, and a message only when the next hop has."""

    def __init__(self, address_map: AddressMap, settings: RelaySettings, srs: Srs | None = None,
                 clock: Callable[[], dt.datetime] | None = None,
                 on_transaction: Callable[[TransactionRecord], None] | None = None,
                 tls_context: ssl.SSLContext | None = None, metrics: RelayMetrics | None = None,
                 arc: ArcSealer | None = None, limits: SharedLimits | None = None) -> None:
        """Serve `address_map` (replace the attribute to reload); `clock` gives the local date of lookups.

        `limits`: the connection limits counted over several worker processes (counted here when None).
        """
        self.address_map = address_map
        self.settings = settings
        self.srs = srs
        self.tls_context = tls_context  # inbound STARTTLS; replaced on reload (a renewed certificate)
        self.metrics = metrics or RelayMetrics()
        self.arc = arc  # replaced on reload (a rotated key)
        self.per_ip: collections.Counter[str] = collections.Counter()  # without `limits` only
        self.limits = limits
        self.clock = clock or (lambda: dt.datetime.now().astimezone())
        self.on_transaction = on_transaction or (lambda record: log.info("%s", record.as_json()))
        self.sessions: dict[Session, _Session] = {}
        self.connections: set[SMTP] = set()
        self.closing: set[asyncio.Task[None]] = set()
        self.draining = False
        self.pool = NextHopPool(settings.next_hop)  # idle next-hop connections, shared by the client sessions

    # --- aiosmtpd hooks ---------------------------------------------------------------------------------

    @_guarded
    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        """Check the sender and open a transaction; SRS-rewrite it for the next hop."""
        state = self._state(session, server)
        self._finish(session, state, "no DATA (new MAIL)")
        if self.draining:
            # SIGTERM: finish what is open, start nothing new; the client retries with another MX or later.
            asyncio.get_running_loop().call_soon(_close_transport, server)
            return "421 4.3.2 Service shutting down, try again later"
        if not address.isascii() and "SMTPUTF8" not in mail_options:
            return str(replies.smtputf8_required())
        relayed_from = address
        if address != NULL_PATH:
            try:
                mailbox = parse_mailbox(address)
            except AddressError as exc:
                return str(replies.bad_sender(str(exc)))
            if mailbox.route:
                return str(replies.bad_sender("source routes are not accepted"))
            if self.srs is not None:
                relayed_from = self.srs.forward(address, now=self.clock().timestamp())
        state.transaction = _Transaction(envelope, secrets.token_hex(6).upper(), self.clock(), address, relayed_from)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.OK_SENDER)

    @_guarded
    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        """Look the address up, and accept it only if the next hop accepts its new address."""
        state = self._state(session, server)
        tx = state.transaction
        if tx is None or tx.envelope is not envelope:
            return "503 5.5.1 Error: need MAIL command"
        verdict, target, reply = self._route(tx, envelope, address)
        refused_here = reply is not None
        if reply is None and tx.failure is not None:
            reply = tx.failure
        if reply is None and target in tx.accepted:
            reply = replies.OK_RECIPIENT  # two old addresses of one official: the next hop gets one RCPT
        if reply is None:
            assert target is not None
            reply = await self._ask_next_hop(state, tx, envelope, target)
        if reply.positive:
            assert target is not None
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            tx.accepted.setdefault(target, []).append(address)
        tx.recipients.append(RecipientRecord(address, verdict, target, reply.one_line()))
        self._count("recipients", reply, verdict if refused_here else None)
        return str(reply)

    @_guarded
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Check for loops, prepend Received and Delivered-To, and answer with the next hop's verdict."""
        state = self._state(session, server)
        tx = state.transaction
        if tx is None or tx.envelope is not envelope or not tx.accepted:
            return "503 5.5.1 Error: need RCPT command"
        reply = tx.failure or await self._relay_message(session, state, tx, envelope)
        self._finish(session, state, reply.one_line())
        self._count("messages", reply)
        return str(reply)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        """EHLO as aiosmtpd answers it, less AUTH: the relay logs nobody in (aiosmtpd offers AUTH after STARTTLS)."""
        session.host_name = hostname  # aiosmtpd leaves this to a handler that has an EHLO hook
        return [line for line in responses if not line.startswith("250-AUTH")]

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """End the open transaction (the next hop's is ended at the next RCPT)."""
        self._finish(session, self._state(session, server), "no DATA (RSET)")
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Log an unfinished transaction; the next-hop connection closes with the client's."""
        self._finish(session, self._state(session, server), "no DATA (QUIT)")
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        """Anything aiosmtpd itself could not handle: 451 4.3.0, the details only in the log."""
        if isinstance(error, TLSSetupException):
            # A client that cannot do TLS with us (old ciphers, a scanner): aiosmtpd closes it, nothing is lost.
            cause = error.__cause__
            log.warning("%s", event("tls-failed", reason=str(cause or error) or type(cause or error).__name__))
            self.metrics.add("tls_failures_total")
            return str(replies.internal_error())
        log.error("%s", event("error", error="".join(traceback.format_exception(error))))
        return str(replies.internal_error())

    # --- connection life cycle (called by RelaySMTP) ----------------------------------------------------

    def connection_opened(self, server: SMTP, client_ip: str) -> Reply | None:
        """Admit a client connection and count it (for the limits and the shutdown drain); the 421 when over a limit."""
        limit = None
        if self.limits is not None:
            limit, connections, from_client = self.limits.admit(client_ip)  # counted in when admitted
        else:
            connections, from_client = len(self.connections), self.per_ip[client_ip]
            if connections >= self.settings.max_connections:
                limit = "max_connections"
            elif from_client >= self.settings.max_connections_per_ip:
                limit = "max_connections_per_ip"
        if limit is not None:
            self.metrics.add("connections_refused_total", limit)
            log.warning("%s", event("connection-refused", client=client_ip, limit=limit,
                                    connections=connections, from_client=from_client))
            return replies.render(421, "4.7.0", "too_many_connections")
        self.connections.add(server)
        if self.limits is None:
            self.per_ip[client_ip] += 1
        self.metrics.add("connections_total")
        self.metrics.add("connections_open")
        return None

    def connection_closed(self, server: SMTP, session: Session | None, client_ip: str = "") -> None:
        """The client is gone: log what was open, then close the next-hop connection in the background."""
        if server in self.connections:
            self.connections.discard(server)
            self.metrics.add("connections_open", amount=-1)
            if self.limits is not None:
                self.limits.release(client_ip)
            else:
                self.per_ip[client_ip] -= 1
                if self.per_ip[client_ip] <= 0:
                    del self.per_ip[client_ip]  # the counter would otherwise keep every address ever seen
        state = self.sessions.pop(session, None) if session is not None else None
        if state is None:
            return
        if state.busy is None and state.transaction is None and (state.hop is None or self.pool.give_back(state.hop)):
            state.hop = None  # the usual end (QUIT after the message): nothing to log or wait for, no task needed
            return
        task = asyncio.get_running_loop().create_task(self._close_session(session, state))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    async def _close_session(self, session: Session, state: _Session) -> None:
        """Wait for a next-hop call still running, log the transaction, and QUIT the next hop."""
        tx = state.transaction
        if state.busy is not None:
            # The call was shielded from the client's disconnect: let it end, so the log says what the next
            # hop did (a message it accepted after the client left will be sent again: a duplicate, not a loss).
            hop_reply = await state.busy  # bounded by next_hop_timeout inside NextHop
            if tx is not None and tx.size is not None and not tx.next_hop:
                tx.next_hop = hop_reply.one_line()
        self._finish(session, state, state.closed_with or "client disconnected")
        hop, state.hop = state.hop, None
        if hop is not None and not self.pool.give_back(hop):
            await hop.close()

    async def drain(self, timeout: float) -> None:
        """Stop new transactions, give open sessions `timeout` seconds, then close what is left."""
        loop = asyncio.get_running_loop()
        self.draining = True
        for server in list(self.connections):
            state = self.sessions.get(server.session) if server.session is not None else None
            if state is None or state.transaction is None:
                # Idle between transactions: RFC 5321 lets a server say 421 at any time when it must stop.
                _say_and_close(server, "421 4.3.2 Service shutting down, try again later")
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        # A session whose next-hop call is still running may already have its message accepted there:
        # saying 421 now would make the client send it again (a duplicate). Its call is bounded by the
        # next hop's timeout; wait for it, so that the client hears the next hop's verdict first.
        running = [state.busy for server in list(self.connections)
                   if server.session is not None and (state := self.sessions.get(server.session)) is not None
                   and state.busy is not None]
        if running:
            await asyncio.wait(running, timeout=self.settings.next_hop.timeout + 5)
            await asyncio.sleep(0.05)  # let the hooks send the replies the calls ended with
        for server in list(self.connections):
            state = self.sessions.get(server.session) if server.session is not None else None
            if state is not None and state.busy is not None:
                continue  # still waiting for its next-hop verdict: closing now could lose or double it
            _say_and_close(server, "421 4.3.2 Service shutting down, try again later")
        await asyncio.sleep(0)
        if self.closing:
            await asyncio.wait(set(self.closing), timeout=self.settings.next_hop.timeout + 5)
        await self.pool.close()

    # --- the work ---------------------------------------------------------------------------------------

    def _route(self, tx: _Transaction, envelope: Envelope, address: str) -> tuple[str, str | None, Reply | None]:
        """Decide where a recipient's mail goes: (verdict name, target address, refusal or None)."""
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "too-many-recipients", None, replies.too_many_recipients(self.settings.max_recipients)
        if not address.isascii() and not envelope.smtp_utf8:
            return "smtputf8-required", None, replies.smtputf8_required()
        if self.srs is not None and self.srs.is_srs_address(address):
            # Bounces to a rewritten sender come back here; anything but <> would make us a relay for spam.
            if tx.mail_from != NULL_PATH:
                return "srs-not-bounce", None, replies.srs_bounces_only()
            try:
                return "srs-bounce", self.srs.reverse(address, now=self.clock().timestamp()), None
            except SrsError:
                return "srs-invalid", None, replies.srs_invalid()
        verdict = self.address_map.lookup(address, self.clock().date())
        return verdict.outcome.value, verdict.new_address, verdict_reply(verdict)

    async def _ask_next_hop(self, state: _Session, tx: _Transaction, envelope: Envelope, target: str) -> Reply:
        """Open the next-hop transaction if needed, then RCPT the new address there."""
        if not tx.hop_open:
            refusal = await self._open_next_hop(state, tx, envelope)
            if refusal is not None:
                tx.failure = refusal
                return refusal
        hop = state.hop
        if hop is None or not hop.connected:
            tx.failure = replies.next_hop_unavailable("connection lost", "4.4.2")
            return tx.failure
        answer = await self._call(state, hop.rcpt(target, envelope.smtp_utf8), "rcpt")
        if answer.failure:
            tx.failure = _client_reply(answer)
        return _client_reply(answer)

    async def _open_next_hop(self, state: _Session, tx: _Transaction, envelope: Envelope) -> Reply | None:
        """MAIL over the session's connection, an idle pooled one or a new one; the refusal, or None when accepted."""
        utf8 = envelope.smtp_utf8
        for attempt in (1, 2):
            fresh = False
            if state.hop is None or not state.hop.connected:
                state.hop = self.pool.take() if attempt == 1 else None
                if state.hop is None:
                    # The session holds it from the start: a client that leaves during the greeting must not
                    # strand a connection that nobody then pools or closes (_close_session does either).
                    state.hop = NextHop(self.settings.next_hop)
                    greeting = await self._call(state, state.hop.connect(), "connect")
                    if not greeting.positive:
                        state.hop = None  # connect() dropped it
                        return _unavailable(greeting)
                    fresh = True
            hop = state.hop
            if hop.in_transaction:
                await self._call(state, hop.rset(), "rset")  # the previous client transaction ended without DATA
            if utf8 and not hop.supports("smtputf8"):
                return replies.render(550, "5.6.7", "next_hop_without_smtputf8")
            answer = await self._call(state, hop.mail(tx.relayed_from, self._mail_options(envelope, hop), utf8), "mail")
            if answer.positive:
                tx.hop_open = True
                return None
            if fresh or attempt == 2 or not (answer.failure or answer.code == 421):
                return _client_reply(answer)
            # A connection that served an earlier transaction (pooled, or this session's) was closed by the
            # next hop while idle, or is being closed (421): nothing of this message was sent over it yet,
            # so MAIL goes again over a new connection before the client hears anything.
            log.info("%s", event("next-hop-retry", transaction=tx.id, reply=answer.one_line()))
            await hop.close()
            state.hop = None
        raise AssertionError("unreachable")  # the second attempt always returns

    def _mail_options(self, envelope: Envelope, hop: NextHop) -> list[str]:
        """The client's MAIL parameters that the next hop understands (SIZE grown by our headers)."""
        options = []
        for option in envelope.mail_options:
            name, _, value = option.partition("=")
            if name == "SIZE" and value.isdigit() and hop.supports("size"):
                allowance = HEADER_ALLOWANCE + (ARC_ALLOWANCE if self.arc is not None else 0)
                options.append(f"SIZE={int(value) + allowance}")
            elif name == "BODY" and value == "8BITMIME" and hop.supports("8bitmime"):
                options.append(option)
            elif name == "SMTPUTF8" and hop.supports("smtputf8"):
                options.append(option)
        return options

    async def _relay_message(self, session: Session, state: _Session, tx: _Transaction, envelope: Envelope) -> Reply:
        """Send the message to the next hop (loops refused first) and return the client's reply."""
        as_sent = envelope if isinstance(envelope, RelayEnvelope) else None
        wire = as_sent.wire if as_sent is not None else None
        content: bytes | None = None
        body: bytes | bytearray
        if as_sent is not None and wire is not None and not as_sent.wire_bare:
            # Nearly every message: sent on as the client sent it, transparency dots included, with no copy of
            # the body (the next hop removes the same dots, so it gets the very same message).
            body = wire
            size = len(wire) - as_sent.wire_dots
            fields = header_fields(header_block(wire))
        else:
            # A bare CR or LF becomes CRLF, which can make new lines that start with a dot: stuffed anew.
            content = normalise_line_endings(unstuff(wire) if wire is not None else envelope.original_content or b"")
            if content and not content.endswith(b"\r\n"):
                content += b"\r\n"  # as aiosmtplib did: the end of data needs a CRLF before the dot
            body = stuff(content)
            size = len(content)
            fields = header_fields(content)
        hops = count_received(fields)
        olds = {old.lower() for addresses in tx.accepted.values() for old in addresses}
        looped = delivered_to(fields) & olds
        hop = state.hop
        if hops > self.settings.max_hops or looped:
            reason = (f"{hops} Received header fields, more than {self.settings.max_hops}" if not looped
                      else f"already delivered to {sorted(looped)[0]}")
            if hop is not None:
                await self._call(state, hop.rset(), "rset")
            return replies.loop(reason)
        if hop is None or not hop.connected:
            return replies.next_hop_unavailable("connection lost", "4.4.2")
        single = next(iter(olds)) if len(olds) == 1 else None
        recipient = None
        if single is not None:
            recipient = next(old for addresses in tx.accepted.values() for old in addresses)
        headers = received_header(
            helo=session.host_name or "", client_ip=_client(session), hostname=self.settings.hostname,
            protocol=protocol_name(session.extended_smtp, tx.envelope.smtp_utf8, session.ssl is not None),
            queue_id=tx.id, recipient=recipient, when=self.clock())
        if recipient is not None:
            headers += delivered_to_header(recipient)
        parts = [headers, body]  # header fields never start with a dot: no stuffing needed
        if self.arc is not None:
            if content is None:
                content = unstuff(body)
            seal = await self._arc_seal(tx, headers + content)
            parts.insert(0, seal)
        tx.size = sum(len(part) for part in parts[:-1]) + size
        answer = await self._call(state, hop.send(parts), "data")
        tx.next_hop = answer.one_line()
        tx.hop_open = False
        return _client_reply(answer)

    async def _arc_seal(self, tx: _Transaction, message: bytes) -> bytes:
        """The ARC set for a message; empty (the message goes unsealed) when sealing fails."""
        assert self.arc is not None
        try:
            # dkimpy is synchronous and asks DNS for the signers' keys: off the event loop.
            seal, _ = await asyncio.to_thread(self.arc.seal, message)
        except Exception as exc:  # a seal is a courtesy to the next hop, never a reason to refuse the mail
            log.warning("%s", event("arc-not-sealed", transaction=tx.id, reason=f"{type(exc).__name__}: {exc}"))
            return b""
        if not seal:
            log.warning("%s", event("arc-not-sealed", transaction=tx.id, reason="dkimpy made no ARC set"))
        return seal

    async def _call(self, state: _Session, call: Awaitable[HopReply], command: str) -> HopReply:
        """Run one next-hop call shielded from the client's disconnect, and time it for the metrics."""
        # Cancelling an aiosmtplib command half-way leaves its reply unread and the connection out of step
        # (the next command would read the previous reply), and the log could not say what the next hop did.
        # aiosmtpd's idle timer runs from the client's last command (for DATA: from the DATA command, so the
        # reading of a large message counts). Restarted before each call, which next_hop_timeout (shorter
        # than timeout) bounds, the client connection is never closed while the relay waits for the next hop.
        reset = getattr(state.server, "_reset_timeout", None)
        if callable(reset):
            reset()
        task = asyncio.ensure_future(call)
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds, and a next hop on the same
        # network answers in less. Timed when the call ends, not when this await returns: a call outlives a
        # client that leaves.
        started = time.perf_counter()
        task.add_done_callback(lambda _: self.metrics.observe(command, time.perf_counter() - started))
        state.busy = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                state.busy = None

    def _state(self, session: Session, server: SMTP) -> _Session:
        """The handler's state for a client session."""
        state = self.sessions.get(session)
        if state is None:
            state = self.sessions[session] = _Session(_client(session), server)
        return state

    def _count(self, what: str, reply: Reply, reason: str | None = None) -> None:
        """Count the reply to a RCPT (`what` "recipients") or to a message ("messages") in the metrics."""
        if reply.positive:
            self.metrics.add("recipients_accepted_total" if what == "recipients" else "messages_relayed_total")
            return
        permanent = reply.code >= 500
        if reason is None:
            # Replies the relay did not decide itself: the next hop's verdict or its absence.
            reason = _REASONS_BY_STATUS.get(reply.status, "next-hop" if permanent else "next-hop-deferred")
        self.metrics.add(f"{what}_{'rejected' if permanent else 'deferred'}_total", reason)

    def message_refused(self, server: SMTP, reply: Reply, reason: str, ends_transaction: bool) -> None:
        """aiosmtpd refused a message itself (too large, a line too long): count it, and log the transaction."""
        self.metrics.add("messages_rejected_total", reason)
        session = server.session
        state = self.sessions.get(session) if session is not None else None
        if ends_transaction and session is not None and state is not None:
            self._finish(session, state, reply.one_line())

    def too_many_errors(self, server: SMTP) -> Reply:
        """Count a client closed at the error limit; its open transaction is logged with that result."""
        self._closed_by_relay(server, "error_limit_closes_total", "too many errors")
        log.info("%s", event("too-many-errors", client=_client(server.session), limit=self.settings.max_errors))
        return replies.render(421, "4.7.0", "too_many_errors")

    def connection_timed_out(self, server: SMTP) -> None:
        """Count a client closed for silence; its open transaction is logged with that result."""
        self._closed_by_relay(server, "timeouts_total", "timeout")

    def _closed_by_relay(self, server: SMTP, counter: str, result: str) -> None:
        """Count a connection the relay closes, and say why in the log line of its open transaction."""
        self.metrics.add(counter)
        session = server.session
        state = self.sessions.get(session) if session is not None else None
        if state is not None:
            state.closed_with = result

    def _finish(self, session: Session, state: _Session, result: str) -> None:
        """Log the open transaction (if any) and close it."""
        tx, state.transaction = state.transaction, None
        if tx is None:
            return
        try:
            self.on_transaction(tx.record(state.client, session.host_name or "", result))
        except Exception:
            log.error("%s", event("error", transaction=tx.id, error=traceback.format_exc()))


def _client_reply(answer: HopReply) -> Reply:
    """What the client is told for a next-hop answer: 2xx and 5xx passed on, 4xx and no answer as 451."""
    if answer.failure:
        return replies.next_hop_unavailable(answer.failure, "4.4.1" if answer.failure == "unreachable" else "4.4.2")
    if answer.positive or 500 <= answer.code < 600:
        return replies.passed_on(answer.code, answer.text)
    return replies.next_hop_deferred(answer.code, answer.text)


def _unavailable(greeting: HopReply) -> Reply:
    """The reply when the next hop could not be reached or greeted us with an error."""
    if greeting.failure:
        return replies.next_hop_unavailable(greeting.failure, "4.4.1")
    # A next hop that refuses the relay's own connection is a set-up problem here, not the sender's: 4xx.
    return replies.next_hop_unavailable(f"greeting {greeting.code}", "4.4.1")


def _client(session: Session | None) -> str:
    """The client's IP address."""
    peer = session.peer if session is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def _close_transport(server: SMTP) -> None:
    """Close a client connection (after the reply already written is flushed)."""
    if server.transport is not None:
        server.transport.close()


def _say_and_close(server: SMTP, line: str) -> None:
    """Write one reply line and close the connection."""
    transport = server.transport
    if transport is None or transport.is_closing():
        return
    transport.write(line.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
    transport.close()
