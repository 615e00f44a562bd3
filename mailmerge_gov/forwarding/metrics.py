"""The relay's counters, and a tiny HTTP responder that shows them in the Prometheus text format."""

from __future__ import annotations

import asyncio
import functools
import math
import socket
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "mailmerge_relay_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
NEXT_HOP_COMMANDS = ("connect", "mail", "rcpt", "data", "rset")
MAX_REQUEST_LINES = 100  # request line and headers; a client sending more is not a scraper
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class Family:
    """One metric: its name (without the prefix), help text, type, and the label it is split by."""

    name: str
    help: str
    kind: str = "counter"
    label: str | None = None
    values: tuple[str, ...] = ()  # label values shown (at 0) before they first happen


FAMILIES = (
    Family("connections_total", "Client connections accepted."),
    Family("connections_refused_total", "Client connections refused with 421 4.7.0 at a connection limit.",
           label="limit", values=("max_connections", "max_connections_per_ip")),
    Family("connections_open", "Client connections open now.", kind="gauge"),
    Family("recipients_accepted_total", "Recipients accepted (the next hop accepted the new address)."),
    Family("recipients_rejected_total", "Recipients refused with a 5xx reply, by reason.", label="reason",
           values=("unknown", "moved", "relay-denied", "srs-not-bounce", "srs-invalid", "smtputf8-required",
                   "next-hop")),
    Family("recipients_deferred_total", "Recipients answered with a 4xx reply (the client retries), by reason.",
           label="reason", values=("too-many-recipients", "next-hop-unavailable", "next-hop-deferred",
                                   "internal-error")),
    Family("messages_relayed_total", "Messages the next hop accepted."),
    Family("messages_rejected_total", "Messages refused with a 5xx reply, by reason.", label="reason",
           values=("loop", "next-hop", "too-large", "line-too-long")),
    Family("messages_deferred_total", "Messages answered with a 4xx reply (the client retries), by reason.",
           label="reason", values=("next-hop-unavailable", "next-hop-deferred", "internal-error")),
    Family("commands_refused_total", "Client commands refused before the relay looked at them, by reason.",
           label="reason", values=("tls-required", "command-too-long")),
    Family("tls_failures_total", "STARTTLS handshakes that failed (the connection is closed)."),
    Family("timeouts_total", "Client connections closed with 421 after [relay] timeout seconds of silence."),
    Family("error_limit_closes_total", "Client connections closed with 421 after [relay] max_errors refused commands "
                                       "without a message relayed."),
)
_FAMILIES = {family.name: family for family in FAMILIES}


class RelayMetrics:
    """Counters and the next-hop latency histogram of one relay (updated and read on its event loop)."""

    def __init__(self) -> None:
        """All counters at 0."""
        self.values: dict[str, dict[str, float]] = {
            family.name: dict.fromkeys(family.values if family.label else ("",), 0) for family in FAMILIES}
        self.buckets = {command: [0] * len(LATENCY_BUCKETS) for command in NEXT_HOP_COMMANDS}
        self.latency_sum = dict.fromkeys(NEXT_HOP_COMMANDS, 0.0)
        self.latency_count = dict.fromkeys(NEXT_HOP_COMMANDS, 0)

    def add(self, name: str, label: str = "", amount: float = 1) -> None:
        """Add `amount` to a counter (or a gauge), split by `label` when the family has one."""
        family = _FAMILIES.get(name)
        if family is None or bool(label) != bool(family.label):
            # a typo in the relay must fail its tests, not vanish from the graphs
            raise KeyError(f"{name}{{{label}}}" if label else name)
        values = self.values[name]
        values[label] = values.get(label, 0) + amount

    def get(self, name: str, label: str = "") -> float:
        """The current value of a counter."""
        return self.values[name].get(label, 0)

    def observe(self, command: str, seconds: float) -> None:
        """Record how long one next-hop command took."""
        if command not in self.buckets:
            self.buckets[command] = [0] * len(LATENCY_BUCKETS)
            self.latency_sum[command] = 0.0
            self.latency_count[command] = 0
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[command][index] += 1
        self.latency_sum[command] += seconds
        self.latency_count[command] += 1

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        return "".join(line + "\n" for line in self._lines())

    def _lines(self) -> Iterator[str]:
        """The exposition lines: HELP, TYPE and samples of each family, then the histogram."""
        for family in FAMILIES:
            name = PREFIX + family.name
            yield f"# HELP {name} {family.help}"
            yield f"# TYPE {name} {family.kind}"
            for label, value in self.values[family.name].items():
                labels = f'{{{family.label}="{_escape(label)}"}}' if family.label else ""
                yield f"{name}{labels} {_number(value)}"
        name = PREFIX + "next_hop_seconds"
        yield f"# HELP {name} Time the next hop took to answer one command."
        yield f"# TYPE {name} histogram"
        for command, counts in self.buckets.items():
            for bound, count in zip(LATENCY_BUCKETS, counts):
                yield f'{name}_bucket{{command="{command}",le="{_number(bound)}"}} {count}'
            yield f'{name}_bucket{{command="{command}",le="+Inf"}} {self.latency_count[command]}'
            yield f'{name}_sum{{command="{command}"}} {_number(self.latency_sum[command])}'
            yield f'{name}_count{{command="{command}"}} {self.latency_count[command]}'


def _number(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a decimal point."""
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e15):
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    """A label value with backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def start_metrics_server(metrics: RelayMetrics, host: str, port: int) -> asyncio.Server:
    """Listen on host:port and answer GET /metrics with the metrics; OSError when the address is taken."""
    return await asyncio.start_server(functools.partial(_respond, metrics), host, port, limit=8192)


async def start_metrics_server_on(metrics: RelayMetrics, sock: socket.socket) -> asyncio.Server:
    """Answer GET /metrics on a listening socket bound already (by the parent of the relay's workers)."""
    return await asyncio.start_server(functools.partial(_respond, metrics), sock=sock, limit=8192)


async def _respond(metrics: RelayMetrics, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one HTTP/1.0 request, then close the connection."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            lines = await _read_request(reader)
        status, headers, body = _answer(metrics, lines[0] if lines else b"")
        head = f"HTTP/1.0 {status}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
        writer.write(head.encode("ascii") + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        await writer.drain()
    except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
        pass  # a slow, oversized or vanished request gets no answer: only a scraper is meant to call
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def _read_request(reader: asyncio.StreamReader) -> list[bytes]:
    """The request line and header lines, up to the empty line; ValueError when there are too many."""
    lines: list[bytes] = []
    while True:
        line = await reader.readline()  # ValueError past the reader's limit
        if not line.strip():
            return lines
        lines.append(line.rstrip(b"\r\n"))
        if len(lines) > MAX_REQUEST_LINES:
            raise ValueError("too many header lines")


def _answer(metrics: RelayMetrics, request_line: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status, headers and body for a request line: the metrics for GET /metrics only."""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return "400 Bad Request", [("Content-Type", "text/plain")], b"bad request\n"
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return "404 Not Found", [("Content-Type", "text/plain")], b"not found; the metrics are at /metrics\n"
    if method != b"GET":
        return "405 Method Not Allowed", [("Allow", "GET"), ("Content-Type", "text/plain")], b"use GET\n"
    return "200 OK", [("Content-Type", CONTENT_TYPE)], metrics.render().encode("utf-8")
