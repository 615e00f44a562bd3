"""The relay in several processes, as Postfix runs several smtpd: the parent binds, forks the workers and watches them.

One Python process serves on one core (the GIL); with [relay] workers = N the parent binds the listening
socket(s) and forks N workers that all accept on them. The workers share the connection limits and the metrics
through shared memory (shared.py). The parent serves no client: it restarts a worker that dies, passes a map
reloaded on SIGHUP to every worker (checked once, so all run the same map or all keep the old one; a worker that
does not take it within [relay] reload_timeout is restarted, with the new one), and on SIGTERM tells every worker
to drain, waits for them, and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from mailmerge_gov.config import Relay
from mailmerge_gov.forwarding import eventloop
from mailmerge_gov.forwarding.daemon import (RELOAD_ERRORS, Prepared, RelayError, listening_event, load_reloadable,
                                             server_tls_context, swap)
from mailmerge_gov.forwarding.addressmap import AddressMap
from mailmerge_gov.forwarding.arc import ArcSealer
from mailmerge_gov.forwarding.handler import RelayHandler, event
from mailmerge_gov.forwarding.metrics import start_metrics_server_on
from mailmerge_gov.forwarding.shared import LOG_LINE, SharedLimits, SharedMetrics, SharedState
from mailmerge_gov.forwarding.smtpserver import RelaySMTP, smtp_options
from mailmerge_gov.forwarding.srs import Srs

log = logging.getLogger("mailmerge_gov.forwarding")
SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
LISTEN_BACKLOG = 100  # asyncio's default, as with one process
RESTART_DELAY = 1.0  # a worker that dies within this many seconds of its start is restarted only after as long
# ... and one that does so again and again waits twice as long each time, up to this: a worker that cannot start
# (a file it needs is gone, memory is short) must not be forked every second for as long as the relay runs
MAX_RESTART_DELAY = 60.0
ACCEPT_RETRY = 1.0  # seconds without accepting after running out of file descriptors (as asyncio does)


def worker_count(relay: Relay) -> int:
    """The number of worker processes of [relay] workers ("auto": one per CPU this process may run on)."""
    if relay.workers != "auto":
        return int(relay.workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))  # os.cpu_count(), less the CPUs taskset/cpusets keep from us
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- log lines -------------------------------------------------------------------------------------------------


_line_lock: SharedState | None = None  # set when several processes write to the one stream


class LineHandler(logging.Handler):
    """A log handler writing each record as one whole line with one write() call, never mixed with another's."""

    def __init__(self, stream: Any) -> None:
        """Write to `stream` (its file descriptor when it has one)."""
        super().__init__()
        self.stream = stream
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None  # a stream in memory (a test runner's): written as usual

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record and a newline."""
        try:
            line = self.format(record) + "\n"
            if self.fd is None:
                self.stream.write(line)
                self.stream.flush()
                return
            data = line.encode("utf-8", "backslashreplace")
            self.stream.flush()  # what Python itself wrote there (a traceback) comes first
            lock = _line_lock
            if lock is None:
                _write_all(self.fd, data)
                return
            # A pipe keeps writes of up to PIPE_BUF (4 KiB) whole, a socket (journald) not even that: a line of
            # a message with many recipients is longer. One lock over the workers keeps every line whole.
            with lock.locked(LOG_LINE):
                _write_all(self.fd, data)
        except Exception:
            self.handleError(record)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all is written (one call unless a signal or a full pipe cuts it short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- the listening sockets ---------------------------------------------------------------------------------------


def bind_listeners(host: str, port: int, what: str = "") -> list[socket.socket]:
    """Listening TCP sockets on every address of host:port (IPv4 and IPv6 for a name that has both)."""
    # One socket, inherited by every worker, rather than a socket per worker with SO_REUSEPORT: the kernel
    # then hands each connection to whichever worker accepts first (an idle one, not a busy one), a
    # connection waiting in the backlog is never lost when one worker stops or dies (with SO_REUSEPORT the
    # connections queued on its socket are reset), and no other process can bind the port beside us.
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RelayError(f"cannot listen{what} on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen = set()
    for family, kind, proto, _, address in infos:
        if (family, address) in seen:
            continue
        seen.add((family, address))
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio: the IPv4 one is separate
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            for other in sockets:
                other.close()
            raise RelayError(f"cannot listen{what} on {host}:{port}: {exc.strerror}") from None
        sockets.append(sock)
    return sockets


class Acceptor:
    """Accepts client connections on an inherited listening socket: one per wake-up, so that workers share them."""

    # asyncio's own servers accept up to 100 waiting connections at each wake-up: the first worker to wake
    # would take a whole burst (all 20 sessions of a client that keeps them) and leave the others idle.

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], RelaySMTP]) -> None:
        """Start accepting."""
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("%s", event("accept-failed", reason=exc.strerror, retry_seconds=ACCEPT_RETRY))
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(ACCEPT_RETRY, self._resume)
            else:  # a connection that failed before we took it (ECONNABORTED, EPROTO...): the next one may do
                log.warning("%s", event("accept-failed", reason=exc.strerror or str(exc)))
            return
        conn.setblocking(False)
        task = self.loop.create_task(self._connect(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except Exception:
            conn.close()
            log.error("%s", event("error", error=traceback.format_exc()))

    def close(self) -> None:
        """Accept no more (this process's copy of the socket is closed; the other workers' stay open)."""
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


# --- a worker ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Reload:
    """What the parent sends a worker on SIGHUP (the TLS context is made again in the worker: it cannot pickle)."""

    address_map: AddressMap
    srs: Srs | None
    arc: ArcSealer | None
    tls_files: tuple[Path, Path] | None


def _worker_main(prepared: Prepared, index: int, listeners: list[socket.socket],
                 metrics_listeners: list[socket.socket], state: SharedState, control: Connection) -> int:
    """The body of a forked worker: serve until SIGTERM (or the parent's end), then drain; the exit status."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the parent, checked, over `control`
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    asyncio.run(_serve_worker(prepared, index, listeners, metrics_listeners, state, control),
                loop_factory=eventloop.loop_factory(prepared.event_loop))
    return 0


async def _serve_worker(prepared: Prepared, index: int, listeners: list[socket.socket],
                        metrics_listeners: list[socket.socket], state: SharedState, control: Connection) -> None:
    """Serve on the inherited sockets with the limits and metrics shared by all workers."""
    config, settings = prepared.config, prepared.settings
    loop = asyncio.get_running_loop()
    metrics = SharedMetrics(state, index)
    limits = SharedLimits(state, index, settings.max_connections, settings.max_connections_per_ip)
    handler = RelayHandler(prepared.address_map, settings, prepared.srs, tls_context=prepared.tls_context,
                           metrics=metrics, arc=prepared.arc, limits=limits)

    def connection() -> RelaySMTP:
        return RelaySMTP(handler, **smtp_options(settings, handler.tls_context))

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # from the parent, or from systemd to the whole group
    loop.add_signal_handler(signal.SIGINT, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked by the parent before the fork: none was lost

    def on_control() -> None:
        try:
            # libuv (uvloop) made the pipe non-blocking when it began to watch it: a map larger than the pipe
            # holds would then be read in part, and recv() would fail half-way. The parent sends the rest at once.
            os.set_blocking(control.fileno(), True)
            message = control.recv()
        except (EOFError, OSError):
            loop.remove_reader(control.fileno())
            stop.set()  # the parent is gone: nobody would restart us or stop us, so stop serving
            return
        if isinstance(message, _Reload):
            control.send(_apply_reload(handler, message))

    loop.add_reader(control.fileno(), on_control)
    acceptors = [Acceptor(loop, sock, connection) for sock in listeners]
    metrics_servers = [await start_metrics_server_on(metrics, sock) for sock in metrics_listeners]
    await stop.wait()
    for acceptor in acceptors:
        acceptor.close()
    log.info("%s", event("worker-stopping", worker=index, pid=os.getpid(), sessions=len(handler.connections)))
    await handler.drain(config.relay.shutdown_timeout)
    for server in metrics_servers:
        server.close()  # last: a scrape during the drain still sees the sessions finish
    for server in metrics_servers:
        await server.wait_closed()


def _apply_reload(handler: RelayHandler, message: _Reload) -> tuple[str, str | int]:
    """Swap in what the parent loaded: ("reloaded", addresses), or ("certificate-kept", why) when only the
    certificate could not be loaded again here (the map, SRS and ARC are swapped all the same)."""
    tls_context = None
    kept = ""
    if message.tls_files is not None and handler.tls_context is not None:
        try:
            tls_context = server_tls_context(*message.tls_files)
        except RelayError as exc:
            # The files changed since the parent read them (an SSLContext cannot be sent, so each worker reads
            # them). The map must be the same in every worker, so it is swapped anyway; the certificate in use
            # stays valid until the next reload.
            kept = str(exc)
    swap(handler, message.address_map, message.srs, message.arc, tls_context)
    if kept:
        return "certificate-kept", kept
    return "reloaded", len(message.address_map)


def _send_quietly(control: Connection, payload: bytes) -> None:
    """Send a pickled message to a worker; a worker that is gone (or killed for not reading it) gets nothing."""
    try:
        control.send_bytes(payload)
    except OSError:
        pass  # it died: SIGCHLD restarts it with the values of this reload


# --- the parent --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    """A running worker as the parent knows it."""

    index: int
    pid: int
    control: Connection
    started: float


class Supervisor:
    """The parent process: binds, forks `count` workers, restarts those that die, reloads and stops them all."""

    def __init__(self, prepared: Prepared, count: int) -> None:
        """Nothing runs until run()."""
        self.prepared = prepared
        self.count = count
        self.workers: dict[int, _Worker] = {}
        self.restarts: dict[int, float] = {}  # worker index -> when to start it again
        self.quick_deaths: dict[int, int] = {}  # worker index -> deaths in a row each soon after its start
        self.listeners: list[socket.socket] = []
        self.metrics_listeners: list[socket.socket] = []
        self.state: SharedState | None = None

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status (0 when every worker drained and exited cleanly)."""
        global _line_lock
        relay = self.prepared.config.relay
        # Blocked from now on: the parent takes its signals with sigtimedwait, and each worker unblocks them
        # once its handlers are set, so that a signal sent just after the fork waits for them.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            self.listeners = bind_listeners(relay.listen_host, relay.listen_port)
            if relay.metrics_listen is not None:
                self.metrics_listeners = bind_listeners(*relay.metrics_listen, what=" for metrics")
            self.state = SharedState(self.count)
            _line_lock = self.state
            log.info("%s", listening_event(self.prepared, self.count))
            for index in range(self.count):
                self._start(index)
            self._supervise()
            return self._stop()
        finally:
            _line_lock = None
            for sock in self.listeners + self.metrics_listeners:
                sock.close()
            while signal.sigtimedwait(SIGNALS, 0) is not None:
                pass  # a second SIGTERM during the drain must not kill us once unblocked
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _start(self, index: int) -> None:
        """Fork worker number `index`."""
        assert self.state is not None
        ours, theirs = Pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                ours.close()
                for other in self.workers.values():
                    other.control.close()  # or a worker would not see the parent's end of its siblings' pipes
                code = _worker_main(self.prepared, index, self.listeners, self.metrics_listeners, self.state, theirs)
            except BaseException:
                try:
                    log.error("%s", event("error", worker=index, error=traceback.format_exc()))
                except BaseException:
                    pass
            finally:
                os._exit(code)
        theirs.close()
        self.workers[index] = _Worker(index, pid, ours, time.monotonic())
        log.info("%s", event("worker-started", worker=index, pid=pid))

    def _supervise(self) -> None:
        """Wait for signals: SIGCHLD restarts dead workers, SIGHUP reloads; return at SIGTERM or SIGINT."""
        while True:
            now = time.monotonic()
            for index, when in sorted(self.restarts.items()):
                if when <= now:
                    del self.restarts[index]
                    self._start(index)
            wait = min([when - now for when in self.restarts.values()] + [1.0])
            info = signal.sigtimedwait(SIGNALS, max(wait, 0.0))
            if info is None:
                continue
            if info.si_signo == signal.SIGCHLD:
                self._reap(restart=True)
            elif info.si_signo == signal.SIGHUP:
                self._reload()
            else:
                return

    def _reap(self, restart: bool) -> dict[int, int]:
        """Collect the workers that exited (index -> exit status); log and schedule a restart of each."""
        assert self.state is not None
        ended: dict[int, int] = {}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = next((w for w in self.workers.values() if w.pid == pid), None)
            if worker is None:
                continue
            del self.workers[worker.index]
            worker.control.close()
            self.state.clear_worker(worker.index)
            code = os.waitstatus_to_exitcode(status)
            ended[worker.index] = code
            if not restart:
                continue
            how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}
            now = time.monotonic()
            if now - worker.started < RESTART_DELAY:
                quick = self.quick_deaths[worker.index] = self.quick_deaths.get(worker.index, 0) + 1
                delay = min(RESTART_DELAY * 2 ** (quick - 1), MAX_RESTART_DELAY)
            else:
                self.quick_deaths.pop(worker.index, None)
                delay = 0.0
            log.error("%s", event("worker-died", worker=worker.index, pid=pid, **how, restart_in_seconds=delay))
            self.restarts[worker.index] = now + delay
        return ended

    def _reload(self) -> None:
        """Load the config and the map once; if good, give them to every worker and wait for each to take them."""
        try:
            fresh = load_reloadable(self.prepared.config.path)
        except RELOAD_ERRORS as exc:
            log.warning("%s", event("reload-failed", reason=str(exc), kept_addresses=len(self.prepared.address_map)))
            return
        relay = fresh.config.relay
        tls_files = ((relay.tls_cert_file, relay.tls_key_file)
                     if relay.tls_cert_file is not None and relay.tls_key_file is not None else None)
        message = _Reload(fresh.address_map, fresh.srs, fresh.arc, tls_files)
        # Workers started from now on get the new values at their fork.
        tls_context = self.prepared.tls_context
        if tls_context is not None and fresh.tls_context is not None:
            tls_context = fresh.tls_context  # a renewal only, as in one process (see daemon.swap)
        self.prepared = dataclasses.replace(self.prepared, address_map=fresh.address_map, srs=fresh.srs,
                                            arc=fresh.arc, tls_context=tls_context)
        # Pickled once for all the workers, and sent from threads: a map larger than the pipe's buffer would
        # block a plain send for as long as a hung worker does not read, and this process would stop
        # answering signals (SIGTERM included) meanwhile.
        payload = bytes(ForkingPickler.dumps(message))
        asked = list(self.workers.values())
        senders = [threading.Thread(target=_send_quietly, args=(worker.control, payload), daemon=True)
                   for worker in asked]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + relay.reload_timeout
        restarted = []
        for worker in asked:
            try:
                if not worker.control.poll(max(deadline - time.monotonic(), 0.0)):
                    # A worker that is stuck would go on with the old map (or answer this reload late, where the
                    # next one would read it): it is restarted instead, and starts with the new values.
                    log.error("%s", event("reload-worker-restarted", worker=worker.index, pid=worker.pid,
                                          reason=f"no answer in {relay.reload_timeout:g} s"))
                    os.kill(worker.pid, signal.SIGKILL)
                    restarted.append(worker.index)
                    continue
                answer, detail = worker.control.recv()
            except (EOFError, OSError):
                continue  # it died meanwhile: restarted with the new values
            if answer == "certificate-kept":
                log.warning("%s", event("reload-certificate-kept", worker=worker.index, reason=detail))
        for sender in senders:
            sender.join(5)  # at once: each worker has read its copy, or was killed (the send then fails)
        log.info("%s", event("reloaded", addresses=len(fresh.address_map), map=str(relay.map),
                             workers=len(self.workers), restarted=restarted))

    def _stop(self) -> int:
        """Close the listening sockets, tell every worker to drain, wait for them; the exit status."""
        assert self.state is not None
        relay = self.prepared.config.relay
        self.restarts.clear()
        log.info("%s", event("stopping", sessions=self.state.total_connections(),
                             deadline_seconds=relay.shutdown_timeout, workers=len(self.workers)))
        for sock in self.listeners:
            sock.close()  # the socket stops listening once the workers have closed their copies too
        for worker in self.workers.values():
            os.kill(worker.pid, signal.SIGTERM)
        # A worker drains within shutdown_timeout, then waits for next-hop calls in progress (next_hop_timeout).
        deadline = time.monotonic() + relay.shutdown_timeout + relay.next_hop_timeout + 10
        codes: dict[int, int] = {}
        while self.workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for worker in self.workers.values():
                    log.error("%s", event("worker-killed", worker=worker.index, pid=worker.pid,
                                          reason="still running after the drain deadline"))
                    os.kill(worker.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            signal.sigtimedwait({signal.SIGCHLD}, min(max(remaining, 0.01), 1.0))
            codes.update(self._reap(restart=False))
        failed = {index: code for index, code in codes.items() if code != 0}
        log.info("%s", event("stopped", **({"failed_workers": failed} if failed else {})))
        return 1 if failed else 0
