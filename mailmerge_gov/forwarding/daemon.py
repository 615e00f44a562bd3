"""The relay daemon: serve in the foreground, reload the map on SIGHUP, drain on SIGTERM, log as JSON lines."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailmerge_gov.config import Config, ConfigError, load_config
from mailmerge_gov.forwarding import eventloop, replies
from mailmerge_gov.forwarding.addressmap import AddressMap, MapError, Outcome, load_map
from mailmerge_gov.forwarding.arc import ArcSealer
from mailmerge_gov.forwarding.handler import (RelayHandler, RelaySettings, event, old_domains, relay_settings,
                                              verdict_reply)
from mailmerge_gov.forwarding.metrics import RelayMetrics, start_metrics_server
from mailmerge_gov.forwarding.smtpserver import RelaySMTP, smtp_options
from mailmerge_gov.forwarding.srs import Srs, SrsError, srs_from_config

log = logging.getLogger("mailmerge_gov.forwarding")


class RelayError(Exception):
    """The relay cannot start or check; the message says what to fix."""


@dataclass(frozen=True)
class Prepared:
    """Everything the relay needs, checked before it listens: settings, map, SRS."""

    config: Config
    settings: RelaySettings
    address_map: AddressMap
    srs: Srs | None
    tls_context: ssl.SSLContext | None = None
    arc: ArcSealer | None = None
    event_loop: str = "asyncio"  # what [relay] event_loop resolved to here: "uvloop" or "asyncio"


def load_address_map(config: Config) -> AddressMap:
    """Load the [relay] map of a consolidation, checked against its old domains; RelayError/MapError."""
    if config.relay.map is None:
        raise RelayError(f"{config.path}: [relay] map is not set: name the address map CSV "
                         "(mailmerge-gov directory export-map -o FILE writes it)")
    return load_map(config.relay.map, old_domains(config))


def load_srs(config: Config) -> Srs | None:
    """The relay's SRS from [relay], secrets read now; SrsError naming the secret's source."""
    return srs_from_config(config.relay, old_domains(config) | {config.target.mail_domain})


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The TLS context of inbound STARTTLS, certificate and key loaded now; RelayError naming the key to fix."""
    for key, path, marker in (("tls_cert_file", cert_file, "CERTIFICATE-----"), ("tls_key_file", key_file,
                                                                                 "PRIVATE KEY-----")):
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise RelayError(f"[relay] {key}: cannot read {path}: {exc.strerror}") from None
        if "-----BEGIN " not in text or marker not in text:
            what = "certificate" if key == "tls_cert_file" else "private key"
            raise RelayError(f"[relay] {key}: {path} is not a PEM {what} (-----BEGIN {marker[:-5]}-----)")

    def no_passphrase() -> str:
        # Without this, OpenSSL would ask for the passphrase on the terminal of a daemon.
        raise RelayError(f"[relay] tls_key_file: {key_file} is encrypted; give the key without a passphrase, "
                         "readable only by the service user")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no client certificates asked for
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise RelayError(f"[relay] tls_key_file: {key_file} is not the key of the certificate in "
                             f"{cert_file}") from None
        raise RelayError(f"[relay] tls_cert_file, tls_key_file: cannot use {cert_file} with {key_file}: "
                         f"{exc.reason or exc}") from None
    return context


def load_tls(config: Config) -> ssl.SSLContext | None:
    """The inbound TLS context of [relay] tls_cert_file and tls_key_file; None when they are not set."""
    relay = config.relay
    if relay.tls_cert_file is None or relay.tls_key_file is None:
        return None
    return server_tls_context(relay.tls_cert_file, relay.tls_key_file)


def load_arc(config: Config) -> ArcSealer | None:
    """The ARC sealer of [relay] arc_selector, arc_domain and arc_key_file, key read now; None when not set."""
    relay = config.relay
    if relay.arc_selector is None or relay.arc_domain is None or relay.arc_key_file is None:
        return None
    try:
        import authres  # noqa: F401  dkimpy seals only with it, and says so only when sealing
        from dkim.crypto import UnparsableKeyError, parse_pem_private_key
    except ImportError:
        raise RelayError("[relay] arc_selector: ARC sealing needs the Python packages dkimpy and authres: "
                         "pip install 'mailmerge-gov[arc]' (or 'dkimpy[ARC]') into the relay's environment") from None
    try:
        key = relay.arc_key_file.read_bytes()
    except OSError as exc:
        raise RelayError(f"[relay] arc_key_file: cannot read {relay.arc_key_file}: {exc.strerror}") from None
    try:
        parse_pem_private_key(key)
    except (UnparsableKeyError, ValueError, IndexError):
        raise RelayError(f"[relay] arc_key_file: {relay.arc_key_file} is not an RSA private key in PEM form "
                         "(openssl genpkey -algorithm rsa -pkeyopt rsa_keygen_bits:2048 makes one)") from None
    return ArcSealer(relay.arc_selector, relay.arc_domain, key, relay.hostname)


def prepare(config: Config) -> Prepared:
    """Check and load what `serve` needs; RelayError, MapError or SrsError saying what is wrong."""
    try:
        settings = relay_settings(config)
    except ValueError as exc:
        raise RelayError(str(exc)) from None
    try:
        loop = eventloop.resolve(config.relay.event_loop)
    except eventloop.EventLoopError as exc:
        raise RelayError(str(exc)) from None
    return Prepared(config, settings, load_address_map(config), load_srs(config), load_tls(config), load_arc(config),
                    loop)


async def serve(prepared: Prepared, on_listening: Callable[[str, int], None] | None = None) -> None:
    """Run the relay until SIGTERM or SIGINT, reloading the map on SIGHUP."""
    config = prepared.config
    handler = RelayHandler(prepared.address_map, prepared.settings, prepared.srs, tls_context=prepared.tls_context,
                           metrics=RelayMetrics(), arc=prepared.arc)
    loop = asyncio.get_running_loop()
    host, port = config.relay.listen_host, config.relay.listen_port

    def connection() -> RelaySMTP:
        # handler.tls_context is read per connection: a certificate renewed by SIGHUP serves the next client.
        return RelaySMTP(handler, **smtp_options(prepared.settings, handler.tls_context))

    try:
        server = await loop.create_server(connection, host, port)
    except OSError as exc:
        raise RelayError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    metrics_server = None
    if config.relay.metrics_listen is not None:
        metrics_host, metrics_port = config.relay.metrics_listen
        try:
            metrics_server = await start_metrics_server(handler.metrics, metrics_host, metrics_port)
        except OSError as exc:
            server.close()
            raise RelayError(f"cannot listen for metrics on {metrics_host}:{metrics_port}: {exc.strerror}") from None
    stop = asyncio.Event()
    reloading = asyncio.Lock()

    async def reload() -> None:
        async with reloading:
            await _reload(config, handler)

    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    log.info("%s", listening_event(prepared, 1))
    if on_listening is not None:
        on_listening(host, port)
    try:
        await stop.wait()
    finally:
        for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)
    server.close()  # no new connections; open sessions may finish
    log.info("%s", event("stopping", sessions=len(handler.connections), deadline_seconds=config.relay.shutdown_timeout))
    await handler.drain(config.relay.shutdown_timeout)
    await server.wait_closed()
    if metrics_server is not None:
        metrics_server.close()  # last: a scrape during the drain still sees the sessions finish
        await metrics_server.wait_closed()
    log.info("%s", event("stopped"))


@dataclass(frozen=True)
class Reloaded:
    """What SIGHUP re-reads: the config, and the map, SRS secrets, TLS certificate and ARC key it names."""

    config: Config
    address_map: AddressMap
    srs: Srs | None
    tls_context: ssl.SSLContext | None
    arc: ArcSealer | None


RELOAD_ERRORS = (ConfigError, MapError, SrsError, RelayError)


def load_reloadable(path: Path) -> Reloaded:
    """Re-read the config file and what it names; ConfigError, MapError, SrsError or RelayError if any is wrong."""
    fresh = load_config(path)
    return Reloaded(fresh, load_address_map(fresh), load_srs(fresh), load_tls(fresh), load_arc(fresh))


def swap(handler: RelayHandler, address_map: AddressMap, srs: Srs | None, arc: ArcSealer | None,
         tls_context: ssl.SSLContext | None) -> None:
    """Put freshly loaded values in the handler's place."""
    # One attribute assignment each: a lookup running now sees the old map or the new one, never a mix.
    handler.address_map = address_map
    handler.srs = srs
    handler.arc = arc
    if handler.tls_context is not None and tls_context is not None:
        # Only a renewal: switching STARTTLS on or off takes a restart (require_tls was checked against it).
        handler.tls_context = tls_context


def listening_event(prepared: Prepared, workers: int) -> str:
    """The log line saying that the relay listens, and how it is set up."""
    config = prepared.config
    return event("listening", address=f"{config.relay.listen_host}:{config.relay.listen_port}", workers=workers,
                 event_loop=prepared.event_loop,
                 addresses=len(prepared.address_map), map=str(config.relay.map), next_hop=config.relay.next_hop,
                 srs_domain=prepared.srs.domain if prepared.srs else None,
                 starttls=prepared.tls_context is not None, require_tls=prepared.settings.require_tls,
                 metrics=_address(config.relay.metrics_listen),
                 arc=f"{prepared.arc.selector}._domainkey.{prepared.arc.domain}" if prepared.arc else None)


async def _reload(config: Config, handler: RelayHandler) -> None:
    """Re-read the config, the map and the SRS secrets; swap them in only if all are good."""
    try:
        fresh = await asyncio.to_thread(load_reloadable, config.path)
    except RELOAD_ERRORS as exc:
        log.warning("%s", event("reload-failed", reason=str(exc), kept_addresses=len(handler.address_map)))
        return
    swap(handler, fresh.address_map, fresh.srs, fresh.arc, fresh.tls_context)
    log.info("%s", event("reloaded", addresses=len(fresh.address_map), map=str(fresh.config.relay.map)))


def _address(listen: tuple[str, int] | None) -> str | None:
    """host:port for the log ([v6]:port for IPv6)."""
    if listen is None:
        return None
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(prepared: Prepared) -> int:
    """Serve in the foreground until stopped, in one process or several ([relay] workers); the exit status."""
    from mailmerge_gov.forwarding.workers import Supervisor, worker_count  # it builds on this module

    count = worker_count(prepared.config.relay)
    if count == 1:
        asyncio.run(serve(prepared), loop_factory=eventloop.loop_factory(prepared.event_loop))
        return 0
    return Supervisor(prepared, count).run()


def explain(config: Config, address: str, day: dt.date) -> list[str]:
    """What the relay would do on `day` with mail for `address`: a description line, then the reply lines."""
    srs_domain = config.relay.srs_domain
    if srs_domain is not None and address.rpartition("@")[2].lower() == srs_domain:
        srs = load_srs(config)
        if srs is not None and srs.is_srs_address(address):
            return _explain_srs(srs, address, day)
    verdict = load_address_map(config).lookup(address, day)
    head = f"{address} on {day.isoformat()}: "
    if verdict.outcome is Outcome.FORWARD:
        return [head + f"forward to {verdict.new_address} (until {verdict.valid_until})",
                f"reply: the next hop's answer to RCPT TO:<{verdict.new_address}>"]
    if verdict.outcome is Outcome.MOVED:
        first = head + f"moved to {verdict.new_address} (forwarding ended {verdict.valid_until})"
    elif verdict.outcome is Outcome.UNKNOWN:
        first = head + f"unknown ({verdict.reason})"
    else:
        first = head + f"relay denied ({verdict.reason})"
    reply = verdict_reply(verdict)
    assert reply is not None
    return [first, *(f"reply: {line}" for line in str(reply).split("\r\n"))]


def _explain_srs(srs: Srs, address: str, day: dt.date) -> list[str]:
    """Explain an address of the SRS domain: whose bounce address it is, or why it is refused."""
    noon = dt.datetime.combine(day, dt.time(12)).astimezone().timestamp()
    head = f"{address} on {day.isoformat()}: "
    try:
        original = srs.reverse(address, now=noon)
    except SrsError as exc:
        return [head + f"invalid SRS address ({exc})",
                *(f"reply: {line}" for line in str(replies.srs_invalid()).split("\r\n"))]
    return [head + f"SRS return address of {original} (bounces only, MAIL FROM:<>)",
            f"reply: the next hop's answer to RCPT TO:<{original}>"]
