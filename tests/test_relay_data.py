"""Reading DATA in chunks (forwarding/smtpdata.py) gives what aiosmtpd's line-by-line reading gives; the fast init."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from mailmerge_gov.forwarding import smtpinit
from mailmerge_gov.forwarding.addressmap import parse_map
from mailmerge_gov.forwarding.handler import RelayHandler, RelaySettings
from mailmerge_gov.forwarding.nexthop import NextHopSettings
from mailmerge_gov.forwarding.smtpdata import (TOO_LONG, TOO_MUCH, DataReader, _find_line_dot, header_block, stuff,
                                               unstuff)
from mailmerge_gov.forwarding.smtpserver import RelaySMTP, smtp_options

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit: 1000 octets with CRLF, and the transparency dot


def reference(stream: bytes, size_limit: int, line_limit: int = LINE_LIMIT) -> tuple[str | None, bytes | None, bytes]:
    """aiosmtpd 1.4's reading, line by line: (refusal, message as sent or None, what follows the end)."""
    position = 0
    refused = None
    octets = 0
    lines = []
    while True:
        end = stream.find(b"\r\n", position)
        assert end >= 0, "the stream has no end of data"
        line = stream[position:end + 2]
        position = end + 2
        if line == b".\r\n":
            break
        if refused is None:
            if len(line) > line_limit:
                refused = TOO_LONG
                continue
            octets += len(line)
            if size_limit and octets > size_limit:
                refused = TOO_MUCH
            else:
                lines.append(line)
    return refused, None if refused else b"".join(lines), stream[position:]


def read(stream: bytes, cuts: list[int], size_limit: int = 0,
         line_limit: int = LINE_LIMIT) -> tuple[str | None, bytes | None, bytes, bool, int]:
    """A DataReader fed `stream` in pieces cut at `cuts`, as data_received gives them: (refusal, wire, what follows
    the end of data, bare, dots)."""
    data = DataReader(size_limit, line_limit)
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for n, piece in enumerate(pieces):
        outcome = data.feed(piece)
        if outcome is not None:
            result, excess = outcome
            wire = bytes(result.wire) if result.wire is not None else None
            return result.refused, wire, excess + b"".join(pieces[n + 1:]), result.bare, result.dots
    raise AssertionError("the end of data was not found")


def random_cuts(rng: random.Random, length: int) -> list[int]:
    """Cut points for feeding a stream: single bytes around some places, large pieces elsewhere."""
    return sorted(set(rng.sample(range(1, length), min(length - 1, rng.randint(0, 40))))) if length > 1 else []


@pytest.mark.parametrize("seed", range(300))
def test_chunked_reading_matches_line_by_line_reading(seed: int) -> None:
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randint(0, 30)):
        kind = rng.random()
        if kind < 0.05:
            parts.append(b"x" * rng.randint(995, 1010))  # around the line limit
        elif kind < 0.1:
            parts.append(b"y" * rng.randint(1000, 5000))
        else:
            parts.append(bytes(rng.choice(b"ab.\r\n") for _ in range(rng.randint(0, 12))))
        parts.append(rng.choice([b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n.", b"\n.\n", b"\r.\r", b"\n.\r\n"]))
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    size_limit = rng.choice([0, 0, 50, 500, 3000])
    refused, wire, rest = reference(stream, size_limit)
    got = read(stream, random_cuts(rng, len(stream)), size_limit)
    assert got[:3] == (refused, wire, rest)
    if wire is not None:
        plain = unstuff(wire)
        assert got[3] == (plain.count(b"\r") != plain.count(b"\r\n") or plain.count(b"\n") != plain.count(b"\r\n"))
        assert len(wire) - got[4] == len(plain)


@pytest.mark.parametrize("seed", range(200))
def test_line_dot_search_matches_a_plain_find(seed: int) -> None:
    # few dots (memchr only), many dots (the three-octet search after the probes), dots at the range's edges
    rng = random.Random(seed)
    alphabet = rng.choice([b"ab\r\n", b"a.\r\n", b"..\r\n", b"abcdefgh.\r\n"])
    buf = bytearray(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
    for _ in range(20):
        start = rng.randint(0, len(buf))
        stop = rng.randint(start, len(buf))
        assert _find_line_dot(buf, start, stop) == buf.find(b"\r\n.", start, stop)


@pytest.mark.parametrize("cut", range(1, 12))
def test_end_of_data_split_across_reads_and_pipelined_commands_stay(cut: int) -> None:
    stream = b"Subject: a\r\n.\r\nNOOP\r\nQUIT\r\n"
    assert read(stream, [cut]) == (None, b"Subject: a\r\n", b"NOOP\r\nQUIT\r\n", False, 0)


def test_empty_message() -> None:
    assert read(b".\r\nQUIT\r\n", [1]) == (None, b"", b"QUIT\r\n", False, 0)


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"])
def test_smuggled_ends_do_not_end_data(fake_end: bytes) -> None:
    stream = b"Subject: a\r\n\r\nfirst" + fake_end + b"MAIL FROM:<x@y>\r\n.\r\n"
    for cut in range(1, len(stream)):
        refused, wire, rest, bare, _ = read(stream, [cut])
        assert (refused, rest, bare) == (None, b"", True)
        assert wire is not None and b"MAIL FROM" in wire


@pytest.mark.parametrize(("length", "refused"), [(999, None), (1000, TOO_LONG), (1100, TOO_LONG),
                                                 (70_000, TOO_LONG)])
def test_line_limit(length: int, refused: str | None) -> None:
    # 999 octets and CRLF: the longest line aiosmtpd takes (998 and a transparency dot)
    stream = b"Subject: a\r\n\r\n" + b"z" * length + b"\r\nlast\r\n.\r\nNOOP\r\n"
    for cuts in ([], [20], [500, 1014], list(range(100, len(stream), 700))):
        got = read(stream, cuts)
        assert got[0] == refused and got[2] == b"NOOP\r\n"


def test_too_much_data_and_a_long_line_whichever_comes_first() -> None:
    long_line = b"z" * 1500 + b"\r\n"
    assert read(b"a\r\n" * 100 + long_line + b".\r\n", [50], size_limit=100)[0] == TOO_MUCH
    assert read(long_line + b"a\r\n" * 100 + b".\r\n", [50], size_limit=100)[0] == TOO_LONG


def test_refused_data_is_not_kept() -> None:
    data = DataReader(100_000, LINE_LIMIT)
    assert data.feed(b"a" * 2000) is None  # no CRLF: too long already
    sizes = []
    for _ in range(200):
        assert data.feed(b"b" * 50_000 + b"\r\n") is None
        sizes.append(len(data.buf))
    assert max(sizes) <= 60_000
    result, excess = data.feed(b"\r\n.\r\nNOOP\r\n")
    assert (result.refused, result.wire, excess) == (TOO_LONG, None, b"NOOP\r\n")


def test_stuffing_and_header_block() -> None:
    content = b".From: a\r\n\r\n.\r\n..two\r\nx.y\r\n"
    wire = stuff(content)
    assert wire == b"..From: a\r\n\r\n..\r\n...two\r\nx.y\r\n"
    assert unstuff(wire) == content
    assert unstuff(b"a\n.b\r\n.c\r\n") == b"a\n.b\r\nc\r\n"  # only after CRLF is a dot at a line start
    assert header_block(wire) == b".From: a\r\n"
    assert header_block(b"\r\nbody\r\n") == b""


# --- SMTP.__init__ without the reflection ---------------------------------------------------------------------


def test_fast_init_sets_what_aiosmtpd_sets() -> None:
    async def run() -> None:
        settings = RelaySettings(next_hop=NextHopSettings("127.0.0.1", 25), hostname="relay.test")
        handler = RelayHandler(parse_map("old_address,new_address,valid_until\n", "m.csv", ("a.vn",)), settings)
        options = smtp_options(settings)
        assert smtpinit.applicable(options)
        fast = RelaySMTP(handler, **options)
        slow = RelaySMTP.__new__(RelaySMTP)
        slow.command_size_limits = fast.command_size_limits.copy()
        super(RelaySMTP, slow).__init__(handler, **options)  # aiosmtpd's own
        slow.__dict__.update(_client_ip=None, _refused=False, _lost=False, _reading_message=False, _message=None,
                             _message_read=None, _errors=0, _data_started=0.0, _data_bytes=0, _too_slow=False)
        assert vars(fast).keys() == vars(slow).keys()
        for name in ("_smtp_methods", "_handle_hooks", "_auth_methods"):
            assert list(getattr(fast, name)) == list(getattr(slow, name)), name
        assert {name: getattr(method, "__func__", method) for name, method in fast._smtp_methods.items()} == {
            name: getattr(method, "__func__", method) for name, method in slow._smtp_methods.items()}
        assert all(method.__self__ is fast for method in fast._smtp_methods.values())
        assert all(hook.__self__ is handler for hook in fast._handle_hooks.values())
        skip = {"_stream_reader_wr", "_strong_reader", "_stream_reader", "_reader", "_writer", "_closed",
                "_smtp_methods", "_handle_hooks", "_auth_methods", "_client_connected_cb", "_loop", "loop",
                "command_size_limits", "_source_traceback", "_over_ssl", "_task"}
        for name in vars(fast).keys() - skip:
            assert getattr(fast, name) == getattr(slow, name), name

    asyncio.run(run())


def test_other_options_use_aiosmtpd_init() -> None:
    assert not smtpinit.applicable({"auth_required": True})
    assert not smtpinit.applicable({"proxy_protocol_timeout": 5})


# --- through a relay on loopback ----------------------------------------------------------------------------

from test_relay_handler import SinkHandler, address_map, sink, start_relay  # noqa: E402,F401  (fixtures)

from servers import Relay  # noqa: E402


def test_large_message_arrives_byte_for_byte(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    body = b"".join(b"%s line %d of the body, with words: Xin ch\xc3\xa0o\r\n" % (b"." if n % 7 == 0 else b"", n)
                    for n in range(25_000))
    message = b"Subject: big\r\nDKIM-Signature: v=1; b=AAAA\r\n\r\n" + body
    relay = start_relay(sink.port, max_message_size=2_000_000)
    with relay.client() as client:
        assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], message) == {}
    [delivered] = sink.messages
    headers, rest = delivered.content.split(b"\r\n", 1)[0], delivered.content
    assert headers.startswith(b"Received: from mail.example.org")
    assert rest.endswith(message) and rest.count(b"\r\nDelivered-To: nguyenvana@binhduong.gov.vn\r\n") == 1
    [record] = relay.wait_records(1)
    assert record.size == len(delivered.content)


def test_commands_sent_with_the_end_of_data_are_answered(sink: SinkHandler,
                                                         start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: a\r\n\r\nbody\r\n.\r\nNOOP\r\nMAIL FROM:<bob@example.org>\r\n")
        assert client.getreply() == (250, b"2.0.0 Ok: queued as Q1")
        assert client.getreply() == (250, b"OK")
        assert client.getreply() == (250, b"2.1.0 OK")
        assert client.rcpt("tranthib@binhduong.gov.vn")[0] == 250
        assert client.data(b"Subject: b\r\n\r\n..dot\r\n") == (250, b"2.0.0 Ok: queued as Q2")
    # smtplib's data() stuffed the dot itself
    assert [m.content.rsplit(b"\r\n\r\n", 1)[1] for m in sink.messages] == [b"body\r\n", b"..dot\r\n"]


def test_message_with_a_bare_line_feed_is_normalised(sink: SinkHandler, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(sink.port)
    with relay.client() as client:
        client.mail("alice@example.org")
        client.rcpt("nguyenvana@binhduong.gov.vn")
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: a\r\n\r\none\ntwo\rthree\r\n..four\r\n.\r\n")
        assert client.getreply()[0] == 250
    [message] = sink.messages
    assert message.content.endswith(b"\r\n\r\none\r\ntwo\r\nthree\r\n.four\r\n")
    [record] = relay.wait_records(1)
    assert record.size == len(message.content)
