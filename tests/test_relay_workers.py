"""`relay serve` with [relay] workers = 2: limits, metrics, reload, drain, restarts and log lines over the processes.

Which worker serves a connection is made certain by stopping the other (SIGSTOP) while the connection is
accepted: a stopped process cannot accept, so the kernel's connection goes to the running one.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import smtplib
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import configs
import pytest
from aiosmtpd.controller import Controller

from mailmerge_gov.config import Relay, load_config
from mailmerge_gov.forwarding.addressmap import parse_map
from mailmerge_gov.forwarding.daemon import server_tls_context
from mailmerge_gov.forwarding.handler import RelayHandler, RelaySettings
from mailmerge_gov.forwarding.nexthop import NextHopSettings
from mailmerge_gov.forwarding.shared import SharedLimits, SharedMetrics, SharedState
from mailmerge_gov.forwarding.workers import _apply_reload, _Reload, worker_count
from servers import EVENT_LOOPS, LOOPBACK, RelayDaemon, free_port, process_state

LIVE_MAP = """\
old_address,new_address,valid_until
nguyenvana@binhduong.gov.vn,annv@hcm.gov.vn,2099-12-31
lethic@binhduong.gov.vn,clt@hcm.gov.vn,2025-12-31
"""
TOO_MANY = (421, b"4.7.0 May chu dang co qua nhieu ket noi; vui long thu lai sau.\n"
                 b"4.7.0 Too many connections, try again later")
SHUTTING_DOWN = (421, b"4.3.2 Service shutting down, try again later")
MESSAGE = b"From: alice@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


class Sink:
    """aiosmtpd next hop that keeps (sender, recipients)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str]]] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos)))  # type: ignore[attr-defined]
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def next_hop() -> Iterator[tuple[Sink, int]]:
    """A next hop on a free loopback port: (its handler, its port)."""
    sink = Sink()
    controller = Controller(sink, hostname=LOOPBACK, port=free_port())
    controller.start()
    try:
        yield sink, controller.port
    finally:
        controller.stop()


def write_config(tmp_path: Path, next_hop_port: int, more: str = "", host: str = LOOPBACK) -> tuple[Path, int]:
    """A consolidation file whose relay runs two workers; (its path, the relay's port)."""
    port = free_port()
    (tmp_path / "map.csv").write_text(LIVE_MAP, encoding="utf-8")
    path = tmp_path / "consolidation.toml"
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path.write_text(configs.FILES_ONLY + "\n[relay]\n"
                    f'listen = "{listen}"\nhostname = "relay.test"\nmap = "map.csv"\nworkers = 2\n'
                    f'next_hop = "smtp://{LOOPBACK}:{next_hop_port}"\nnext_hop_timeout = 5\nshutdown_timeout = 3\n'
                    + more, encoding="utf-8")
    return path, port


def start(config: Path) -> tuple[RelayDaemon, list[int]]:
    """The relay as a process, once listening; (it, the pids of its two workers)."""
    daemon = RelayDaemon(config)
    try:
        assert daemon.event("listening")["workers"] == 2
        started = [daemon.event("worker-started") for _ in range(2)]
    except BaseException:
        daemon.stop()
        raise
    assert [event["worker"] for event in started] == [0, 1]
    return daemon, [event["pid"] for event in started]


def wait_state(pid: int, stopped: bool) -> None:
    """Wait until a process is stopped (state T) or running again."""
    deadline = time.monotonic() + 5
    while (process_state(pid) == "T") != stopped:
        assert time.monotonic() < deadline, f"process {pid} did not {'stop' if stopped else 'continue'}"
        time.sleep(0.005)


def on_worker(port: int, pid: int, pids: list[int], source: str = LOOPBACK,
              host: str = LOOPBACK) -> smtplib.SMTP | tuple[int, bytes]:
    """A client session served by worker `pid` (from address `source`), or the refusal it got instead."""
    others = [other for other in pids if other != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        for other in others:
            wait_state(other, stopped=True)
        try:
            client = smtplib.SMTP(host, port, local_hostname="client.test", timeout=10,
                                  source_address=(source, 0))
        except smtplib.SMTPConnectError as exc:
            return exc.smtp_code, exc.smtp_error
        client.ehlo()  # answered: the session is in worker `pid` for good
        return client
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)
            wait_state(other, stopped=False)


def session(port: int, pid: int, pids: list[int], source: str = LOOPBACK) -> smtplib.SMTP:
    """on_worker() that must be admitted."""
    client = on_worker(port, pid, pids, source)
    assert isinstance(client, smtplib.SMTP), client
    return client


def rcpt(client: smtplib.SMTP, address: str) -> int:
    """MAIL and RCPT of `address` in a session; the RCPT reply code (the transaction is reset)."""
    assert client.mail("alice@example.org")[0] == 250
    code = client.rcpt(address)[0]
    client.rset()
    return code


def scrape(port: int) -> list[str]:
    """The metric lines that are not 0, without the histogram's buckets and sums, once no client is connected."""
    deadline = time.monotonic() + 5
    while True:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
        if "mailmerge_relay_connections_open 0" in lines or time.monotonic() > deadline:
            return [line for line in lines if not line.startswith("#") and not line.endswith(" 0")
                    and "_bucket" not in line and "_sum" not in line]
        time.sleep(0.02)


# --- the setting -------------------------------------------------------------------------------------------------


def test_workers_setting(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, 25)
    assert load_config(path).relay.workers == 2
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("workers = 2\n", ""), encoding="utf-8")
    assert load_config(path).relay.workers == "auto"
    assert worker_count(Relay(workers="auto")) == len(os.sched_getaffinity(0))
    assert (worker_count(Relay(workers=1)), worker_count(Relay(workers=3))) == (1, 3)
    for value, shown in (("0", "an integer (0)"), ('"all"', "a string ('all')"), ("true", "a boolean (true)"),
                         ("1.5", "a number (1.5)")):
        path.write_text(text.replace("workers = 2\n", f"workers = {value}\n"), encoding="utf-8")
        assert configs.config_error(path).split(": ", 1)[1] == (
            f'relay.workers: must be "auto" or an integer from 1 to 256, got {shown}')


# --- limits and metrics ------------------------------------------------------------------------------------------


def test_shared_limits_count_over_the_rows() -> None:
    state = SharedState(2)
    first, second = (SharedLimits(state, worker, 3, 2) for worker in (0, 1))
    assert [first.admit("192.0.2.1"), second.admit("192.0.2.1"), second.admit("192.0.2.1"),
            second.admit("192.0.2.2"), first.admit("192.0.2.3")] == [
        (None, 1, 1), (None, 2, 2), ("max_connections_per_ip", 2, 2), (None, 3, 1), ("max_connections", 3, 0)]
    second.release("192.0.2.1")
    assert first.admit("192.0.2.1") == (None, 3, 2)
    state.clear_worker(0)  # worker 0 died: its two connections are gone with it
    assert state.total_connections() == 1


def test_shared_metrics_add_up_over_the_rows() -> None:
    state = SharedState(2)
    first, second = SharedMetrics(state, 0), SharedMetrics(state, 1)
    first.add("connections_total")
    second.add("connections_total", amount=2)
    for metrics in (first, second):
        metrics.add("connections_open")
        metrics.add("recipients_rejected_total", "loop")  # not declared: registered in the shared table
    first.observe("data", 0.2)
    second.observe("data", 20.0)
    state.clear_worker(1)  # its open connection is gone, its counts stay
    with pytest.raises(KeyError):
        first.add("connection_total")
    data = 'mailmerge_relay_next_hop_seconds_{}{{command="data"{}}} {}'
    assert [line for line in second.render().splitlines() if not line.startswith("#") and not line.endswith(" 0")
            ] == ["mailmerge_relay_connections_total 3", "mailmerge_relay_connections_open 1",
                  'mailmerge_relay_recipients_rejected_total{reason="loop"} 2',
                  *(data.format("bucket", f',le="{bound}"', 1) for bound in ("0.25", "0.5", "1", "2.5", "5", "10")),
                  *(data.format("bucket", f',le="{bound}"', 2) for bound in ("30", "60", "+Inf")),
                  data.format("sum", "", "20.2"), data.format("count", "", 2)]
    assert (first.get("connections_total"), second.get("recipients_rejected_total", "loop")) == (3, 2)



def test_limits_and_metrics_span_the_workers(tmp_path: Path, next_hop: tuple[Sink, int]) -> None:
    sink, hop_port = next_hop
    metrics_port = free_port()
    config, port = write_config(tmp_path, hop_port, "max_connections = 4\nmax_connections_per_ip = 2\n"
                                                    f'metrics_listen = "{LOOPBACK}:{metrics_port}"\n')
    daemon, pids = start(config)
    first, second = pids
    clients: list[smtplib.SMTP] = []
    try:
        clients += [session(port, first, pids, "127.0.0.1"), session(port, first, pids, "127.0.0.2"),
                    session(port, second, pids, "127.0.0.1")]
        # 127.0.0.1's third connection, in the worker that has only one of them
        assert on_worker(port, second, pids, "127.0.0.1") == TOO_MANY
        clients.append(session(port, second, pids, "127.0.0.3"))
        # the fifth connection, in the worker that has two of the four
        assert on_worker(port, first, pids, "127.0.0.4") == TOO_MANY
        for client in (clients[0], clients[2]):  # one message through each worker
            assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], MESSAGE) == {}
        for client in clients:
            client.quit()
        metrics = scrape(metrics_port)
        refusals = [daemon.event("connection-refused") for _ in range(2)]
    finally:
        daemon.stop()
    assert [(r["client"], r["limit"], r["connections"], r["from_client"]) for r in refusals] == [
        ("127.0.0.1", "max_connections_per_ip", 3, 2), ("127.0.0.4", "max_connections", 4, 0)]
    assert metrics == [
        "mailmerge_relay_connections_total 4",
        'mailmerge_relay_connections_refused_total{limit="max_connections"} 1',
        'mailmerge_relay_connections_refused_total{limit="max_connections_per_ip"} 1',
        "mailmerge_relay_recipients_accepted_total 2",
        "mailmerge_relay_messages_relayed_total 2",
        'mailmerge_relay_next_hop_seconds_count{command="connect"} 2',  # each worker has its own connections
        'mailmerge_relay_next_hop_seconds_count{command="mail"} 2',
        'mailmerge_relay_next_hop_seconds_count{command="rcpt"} 2',
        'mailmerge_relay_next_hop_seconds_count{command="data"} 2',
    ]
    assert len(sink.messages) == 2


# --- signals -----------------------------------------------------------------------------------------------------


def test_sighup_reloads_every_worker(tmp_path: Path, next_hop: tuple[Sink, int]) -> None:
    config, port = write_config(tmp_path, next_hop[1])
    daemon, pids = start(config)
    try:
        clients = [session(port, pid, pids) for pid in pids]
        map_file = config.parent / "map.csv"
        map_file.write_text(LIVE_MAP + "newbie@binhduong.gov.vn,newbie@binhduong.gov.vn,2099-12-31\n",
                            encoding="utf-8")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.event("reload-failed")
        assert (failed["reason"], failed["kept_addresses"]) == (
            f"{map_file}, line 4: newbie@binhduong.gov.vn forwards to itself", 2)
        assert [(rcpt(c, "nguyenvana@binhduong.gov.vn"), rcpt(c, "newbie@binhduong.gov.vn")) for c in clients] == [
            (250, 550), (250, 550)]

        map_file.write_text(LIVE_MAP + "newbie@binhduong.gov.vn,newbie@hcm.gov.vn,2099-12-31\n", encoding="utf-8")
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = daemon.event("reloaded")  # logged once every worker has the new map
        assert (reloaded["addresses"], reloaded["workers"]) == (3, 2)
        assert [rcpt(client, "newbie@binhduong.gov.vn") for client in clients] == [250, 250]
        for client in clients:
            client.quit()
    finally:
        daemon.stop()
    daemon.event("stopped")
    events = [json.loads(line).get("event") for line in daemon.seen]
    assert (events.count("reload-failed"), events.count("reloaded")) == (1, 1)


# the live map, newbie@ and 20,000 more: about 2 MB pickled, far more than a pipe holds
LARGE_MAP = LIVE_MAP + "newbie@binhduong.gov.vn,newbie@hcm.gov.vn,2099-12-31\n" + "".join(
    f"canbo{n:05}@binhduong.gov.vn,cb{n:05}@hcm.gov.vn,2099-12-31\n" for n in range(20_000))


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_a_large_map_reaches_every_worker(tmp_path: Path, next_hop: tuple[Sink, int], event_loop: str) -> None:
    config, port = write_config(tmp_path, next_hop[1], f'event_loop = "{event_loop}"\n')
    daemon, pids = start(config)
    try:
        (config.parent / "map.csv").write_text(LARGE_MAP, encoding="utf-8")
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = daemon.event("reloaded")
        assert (reloaded["addresses"], reloaded["workers"], reloaded["restarted"]) == (20_003, 2, [])
        clients = [session(port, pid, pids) for pid in pids]
        assert [rcpt(client, "newbie@binhduong.gov.vn") for client in clients] == [250, 250]
        for client in clients:
            client.quit()
    finally:
        daemon.stop()
    assert '"worker-stopping"' not in "".join(daemon.seen) and '"worker-died"' not in "".join(daemon.seen)


def test_a_worker_that_does_not_take_a_reload_is_restarted_with_the_new_map(tmp_path: Path,
                                                                           next_hop: tuple[Sink, int]) -> None:
    config, port = write_config(tmp_path, next_hop[1], "reload_timeout = 0.5\n")
    daemon, pids = start(config)
    try:
        # sending a map larger than a pipe holds to a worker that does not read must not hold up the parent
        (config.parent / "map.csv").write_text(LARGE_MAP, encoding="utf-8")
        os.kill(pids[1], signal.SIGSTOP)  # stuck: it reads nothing and answers nothing
        wait_state(pids[1], stopped=True)
        daemon.proc.send_signal(signal.SIGHUP)
        stuck = daemon.event("reload-worker-restarted")
        assert (stuck["worker"], stuck["pid"], stuck["reason"]) == (1, pids[1], "no answer in 0.5 s")
        reloaded = daemon.event("reloaded")
        assert (reloaded["addresses"], reloaded["restarted"]) == (20_003, [1])
        died = daemon.event("worker-died")
        assert (died["worker"], died["pid"], died["signal"]) == (1, pids[1], "SIGKILL")
        restarted = daemon.event("worker-started")
        assert restarted["worker"] == 1 and restarted["pid"] not in pids
        pids = [pids[0], restarted["pid"]]
        clients = [session(port, pid, pids) for pid in pids]
        assert [rcpt(client, "newbie@binhduong.gov.vn") for client in clients] == [250, 250]  # the same map in both
        for client in clients:
            client.quit()
    finally:
        daemon.stop()


def test_sigterm_drains_every_worker(tmp_path: Path, next_hop: tuple[Sink, int]) -> None:
    sink, hop_port = next_hop
    config, port = write_config(tmp_path, hop_port)
    daemon, pids = start(config)
    try:
        busy = [session(port, pid, pids) for pid in pids]  # a transaction open in each worker
        for client in busy:
            assert client.mail("alice@example.org")[0] == 250
            assert client.rcpt("nguyenvana@binhduong.gov.vn")[0] == 250
        idle = [session(port, pid, pids) for pid in pids]
        daemon.proc.send_signal(signal.SIGTERM)
        stopping = daemon.event("stopping")
        assert (stopping["sessions"], stopping["workers"]) == (4, 2)
        assert [client.getreply() for client in idle] == [SHUTTING_DOWN, SHUTTING_DOWN]
        assert [client.data(MESSAGE) for client in busy] == [(250, b"2.0.0 Ok: queued")] * 2
        assert [client.docmd("MAIL FROM:<alice@example.org>") for client in busy] == [SHUTTING_DOWN] * 2
        assert daemon.proc.wait(10) == 0
        with pytest.raises(OSError):
            socket.create_connection((LOOPBACK, port), timeout=2).close()
        daemon.event("stopped")
    finally:
        daemon.stop()
    stopped = [json.loads(line) for line in daemon.seen if '"worker-stopping"' in line]
    assert sorted((event["pid"], event["sessions"]) for event in stopped) == sorted((pid, 2) for pid in pids)
    assert len(sink.messages) == 2


def test_a_worker_that_dies_is_restarted(tmp_path: Path, next_hop: tuple[Sink, int]) -> None:
    sink, hop_port = next_hop
    config, port = write_config(tmp_path, hop_port, "max_connections = 2\nmax_connections_per_ip = 2\n")
    daemon, pids = start(config)
    try:
        doomed = session(port, pids[1], pids)
        os.kill(pids[1], signal.SIGKILL)
        died = daemon.event("worker-died")
        assert (died["worker"], died["pid"], died["signal"]) == (1, pids[1], "SIGKILL")
        restarted = daemon.event("worker-started")
        assert restarted["worker"] == 1 and restarted["pid"] not in pids
        with pytest.raises(smtplib.SMTPServerDisconnected):
            doomed.noop()
        # the dead worker's connection no longer takes one of the two places
        pids = [pids[0], restarted["pid"]]
        clients = [session(port, pid, pids) for pid in pids]
        for client in clients:
            assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], MESSAGE) == {}
            client.quit()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
    finally:
        daemon.stop()
    assert len(sink.messages) == 2


def test_a_worker_that_keeps_dying_at_start_waits_longer_each_time(tmp_path: Path, next_hop: tuple[Sink, int]) -> None:
    _, hop_port = next_hop
    config, _ = write_config(tmp_path, hop_port)
    daemon, pids = start(config)
    try:
        delays = []
        pid = pids[1]
        for _ in range(3):
            os.kill(pid, signal.SIGKILL)  # at once: within a second of its start
            died = daemon.event("worker-died")
            assert (died["worker"], died["pid"]) == (1, pid)
            delays.append(died["restart_in_seconds"])
            started = daemon.event("worker-started")
            assert started["worker"] == 1
            pid = started["pid"]
        # twice as long after each death in a row soon after a start (the first kill may come after its first second)
        assert delays == ([0.0, 1.0, 2.0] if delays[0] == 0.0 else [1.0, 2.0, 4.0])
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
    finally:
        daemon.stop()


# --- the log and the addresses -----------------------------------------------------------------------------------


def test_log_lines_stay_whole(tmp_path: Path, next_hop: tuple[Sink, int]) -> None:
    # 60 refused recipients a transaction make the long lines; the error limit (20 by default) would cut them off
    config, port = write_config(tmp_path, next_hop[1], "max_errors = 100\n")
    daemon, _ = start(config)
    unknown = [f"nobody-{n:03d}-with-a-long-local-part@binhduong.gov.vn" for n in range(60)]

    def send(number: int) -> None:
        with smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=20) as client:
            for _ in range(5):
                refused = client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn", *unknown], MESSAGE)
                assert len(refused) == 60

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(8)))
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
        daemon.event("stopped")
    finally:
        daemon.stop()
    records = [json.loads(line) for line in daemon.seen]  # a line cut by another's write would not parse
    transactions = [r for r in records if r["event"] == "transaction"]
    assert len(transactions) == 40 and {len(r["recipients"]) for r in transactions} == {61}
    assert min(len(line.encode()) for line in daemon.seen if '"transaction"' in line) > 8192


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_workers_on_ipv6(tmp_path: Path, next_hop: tuple[Sink, int]) -> None:
    config, port = write_config(tmp_path, next_hop[1], host="::1")
    daemon, pids = start(config)
    try:
        for pid in pids:
            client = on_worker(port, pid, pids, source="::1", host="::1")
            assert isinstance(client, smtplib.SMTP), client
            assert client.sendmail("alice@example.org", ["nguyenvana@binhduong.gov.vn"], MESSAGE) == {}
            client.quit()
        logged = [daemon.event("transaction")["client"] for _ in pids]
    finally:
        daemon.stop()
    assert logged == ["::1", "::1"] and len(next_hop[0].messages) == 2


@pytest.mark.parametrize("certificate", ["renewed", "gone"])
def test_a_worker_always_takes_the_new_map(tmp_path: Path, tls_certificate: tuple[Path, Path],
                                           certificate: str) -> None:
    # Each worker reads the certificate files again (an SSLContext cannot be sent to it). Files that changed
    # since the parent checked them keep that worker's certificate, never its old map: every worker forwards alike.
    old_map = parse_map("old_address,new_address,valid_until\nnguyenvana@binhduong.gov.vn,a@hcm.gov.vn,2099-12-31\n",
                        "old.csv", ("binhduong.gov.vn",))
    new_map = parse_map("old_address,new_address,valid_until\nnguyenvana@binhduong.gov.vn,b@hcm.gov.vn,2099-12-31\n",
                        "new.csv", ("binhduong.gov.vn",))
    context = server_tls_context(*tls_certificate)
    handler = RelayHandler(old_map, RelaySettings(next_hop=NextHopSettings(LOOPBACK, 25), hostname="relay.test"),
                           tls_context=context)
    files = tls_certificate if certificate == "renewed" else (tmp_path / "gone.pem", tls_certificate[1])
    answer = _apply_reload(handler, _Reload(new_map, None, None, files))
    assert handler.address_map is new_map
    if certificate == "renewed":
        assert answer == ("reloaded", 1) and handler.tls_context is not context
    else:
        assert answer == ("certificate-kept", f"[relay] tls_cert_file: cannot read {tmp_path}/gone.pem: "
                                              "No such file or directory")
        assert handler.tls_context is context
