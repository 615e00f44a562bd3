#!/usr/bin/env python3
"""Benchmark of the forwarding relay next to a Postfix forwarder: smtp-source -> forwarder -> smtp-sink.

Usage: python scripts/bench_relay.py [--messages N] [--size BYTES] [--sessions N] [--big-messages N]
                                     [--big-size BYTES] [--big-sessions N] [--addresses N] [--workers N|auto]
                                     [--rounds N] [--profile] [--keep]

A measurement, not a test: it prints a table of figures with a verdict per target and exits 0 whether the
targets are met or not (1 only when a step fails outright: a program missing, a server that does not start, a
client that gives up, or messages that never reach the sink). Needs root (the private Postfix instance) and the
Debian package postfix (smtp-source, smtp-sink, postfix).

Both forwarders get the same address map of N old addresses (10,000 by default) and forward to a fresh
Postfix smtp-sink each run (no dump files: it only counts, with -c). The client is Postfix's smtp-source, one
recipient per message, an old address of the map, a new SMTP session per message (its default; the variant
with -d, one session per thread for all its messages, is measured too).
- the relay: `mailmerge-gov relay serve` in a child process of its own for each run, listening on loopback, no
  SRS (Postfix does none either), log lines to a file, with its default [relay] workers ("auto": one worker
  process per CPU; --workers sets it) and event_loop ("auto": uvloop when installed). Its memory is the sum
  over its processes (parent and workers), sampled every 0.1 s, RSS and PSS, and at least the largest single
  process's peak from wait4.
- CPU: the CPU seconds each program used during the run (the forwarder's processes sampled from /proc,
  smtp-source and smtp-sink from wait4), and what share of all the cores they kept busy together: on a small
  machine the client and the sink compete with the forwarder for the same cores.
- Postfix: a private instance as root (main.cf/master.cf in a temporary folder, `postfix -c DIR start-fg`), its
  map in virtual_alias_maps (hash:, postmap), every other domain through smtp:[127.0.0.1]:SINK: the old domains
  are virtual alias domains, so a message is accepted into Postfix's queue (fsync'd) and then delivered. Its
  figures count from the first message sent to the last one the sink has received. Its memory is the sum over
  all its processes (master, smtpd, cleanup, qmgr, smtp...), sampled every 0.1 s: RSS (shared pages counted in
  every process) and PSS (shared pages divided among them).

Steps and targets:
- 2 KB: `--messages` messages (10,000) of `--size` bytes (2,048) over `--sessions` (20) concurrent sessions,
  through the relay and through Postfix. Target: the relay forwards at least 2.0x as many messages per second
  as the Postfix forwarder.
- 1 MB: `--big-messages` messages (500) of `--big-size` bytes (1,000,000) over `--big-sessions` (50)
  concurrent sessions, through both. Targets: 2.0x the Postfix forwarder's messages per second here too, and
  the relay's peak RSS at most 300 MB.
- Each step runs `--rounds` times (3), the relay then Postfix in each round; the ratio of the median round is
  held against the target (each round's ratio is printed too), the highest peak RSS against the memory target.
- Each run (2 KB a session per message, 1 MB) whose target the relay misses (each, with --profile) is repeated
  with the relay child under cProfile, and the functions that cost the most are printed below the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import pstats
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers for private servers (tests/ is not a package)

import configs  # noqa: E402  (tests/configs.py: the consolidation file the relay's config starts from)
from benchtable import Row, print_rows, stopped, verdict, work_folder  # noqa: E402  (this folder)
from servers import LOOPBACK, NOBODY, free_port, read_banner, require_program  # noqa: E402

from mailmerge_gov.config import Relay, load_config  # noqa: E402

SPEED_RATIO = 2.0  # relay messages/s over Postfix forwarder messages/s
RSS_LIMIT = 300_000_000  # bytes: the relay with 50 concurrent 1 MB messages
SENDER = "alice@example.org"
OLD_DOMAIN = "binhduong.gov.vn"
START_TIMEOUT = 15.0
RUN_TIMEOUT = 900.0  # one run: every message at the sink by then, or the step fails


@dataclasses.dataclass(frozen=True)
class Load:
    """What smtp-source sends in one run."""

    name: str
    messages: int
    size: int
    sessions: int
    reuse: bool = False  # smtp-source -d: all of a thread's messages over one SMTP session

    @property
    def megabytes(self) -> float:
        """The payload sent, in MB (10^6 bytes)."""
        return self.messages * self.size / 1e6


@dataclasses.dataclass(frozen=True)
class Result:
    """The figures of one run through one forwarder."""

    seconds: float  # first message sent to last message at the sink
    client_seconds: float  # smtp-source's own run: until the forwarder had accepted the last message
    delivered: int
    peak_rss: int  # bytes
    peak_pss: int | None = None  # bytes: the sum over the forwarder's processes (sampled)
    cpu: tuple[float, float, float] = (0.0, 0.0, 0.0)  # CPU seconds of the forwarder, smtp-source, smtp-sink
    workers: int | None = None  # the relay's worker processes (from its "listening" log line)
    event_loop: str | None = None  # the relay's event loop (from its "listening" log line)
    load: float = 0.0  # the 1-minute load average when the run began


# --- the sink ----------------------------------------------------------------------------------------------------


class CountingSink:
    """Postfix smtp-sink on a free loopback port that only counts what it receives (-c), with no dump files."""

    def __init__(self, folder: Path, name: str) -> None:
        self.port = free_port()
        self.out = folder / f"{name}.sink.out"
        args = [require_program("smtp-sink", "postfix"), "-4", "-c", "-h", "newmx.test"]
        if os.geteuid() == 0:
            args += ["-u", NOBODY]  # as root smtp-sink refuses to start without -u
        # -m: connections handled at once (256 by default), backlog 256
        args += ["-m", "512", f"{LOOPBACK}:{self.port}", "256"]
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for(lambda: read_banner(self.port).startswith(b"220"), self.proc, "smtp-sink", self.out)

    def count(self) -> int:
        """Messages received so far (smtp-sink -c rewrites 'sess=.. quit=.. mesg=N' after each message)."""
        with self.out.open("rb") as data:
            data.seek(max(0, self.out.stat().st_size - 200))
            found = re.findall(rb"mesg=(\d+)", data.read())
        return int(found[-1]) if found else 0

    def stop(self) -> float:
        """Stop it by its pid; its CPU seconds (wait4)."""
        return stop_process(self.proc)


# --- the forwarders ----------------------------------------------------------------------------------------------


def write_map(folder: Path, addresses: int) -> tuple[Path, list[tuple[str, str]]]:
    """The address map both forwarders use: canboNNNNN@old -> cbNNNNN@hcm.gov.vn, valid until 2099."""
    pairs = [(f"canbo{n:05d}@{OLD_DOMAIN}", f"cb{n:05d}@hcm.gov.vn") for n in range(addresses)]
    path = folder / "map.csv"
    rows = "".join(f"{old},{new},2099-12-31\n" for old, new in pairs)
    path.write_text("old_address,new_address,valid_until\n" + rows, encoding="utf-8")
    return path, pairs


class RelayChild:
    """`mailmerge-gov relay serve` in a child process, optionally under cProfile."""

    def __init__(self, folder: Path, name: str, sink_port: int, profile_to: Path | None = None,
                 workers: str | None = None) -> None:
        self.port = free_port()
        config = folder / f"{name}.toml"
        # Connection limits as high as Postfix's (100 smtpd processes): smtp-source opens a new session per
        # message from one IP address, and a closing session may still count for a moment.
        limits = ("max_connections = 1000\nmax_connections_per_ip = 1000\n"
                  if has_field(Relay, "max_connections") else "")
        if profile_to is not None and has_field(Relay, "workers"):
            workers = "1"  # cProfile sees only the process it runs: the relay in one process
        if workers is not None:
            limits += f"workers = {workers if workers.isdigit() else repr(workers)}\n"  # else "auto", the default
        config.write_text(configs.FILES_ONLY + "\n[relay]\n"
                          f'listen = "{LOOPBACK}:{self.port}"\nhostname = "relay.test"\nmap = "map.csv"\n'
                          f'next_hop = "smtp://{LOOPBACK}:{sink_port}"\nshutdown_timeout = 10\n' + limits,
                          encoding="utf-8")
        load_config(config)  # refuse now, with the loader's message, rather than in the child
        self.log = folder / f"{name}.relay.log"
        python = [sys.executable]
        if profile_to is not None:
            python += ["-m", "cProfile", "-o", str(profile_to)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([*python, "-m", "mailmerge_gov", "relay", "serve", "-c", str(config)],
                                         cwd=folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: read_banner(self.port).startswith(b"220"), self.proc, "the relay", self.log)
        listening = re.search(rb'"event": "listening".*?"workers": (\d+)', self.log.read_bytes())
        self.workers = int(listening.group(1)) if listening else 1
        loop = re.search(rb'"event": "listening".*?"event_loop": "(\w+)"', self.log.read_bytes())
        self.event_loop = loop.group(1).decode() if loop else "asyncio"

    def stop(self) -> int:
        """SIGTERM (the relay drains and exits), then return the peak RSS of its largest process in bytes (wait4)."""
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                _, status, usage = os.wait4(self.proc.pid, 0)
                raise RuntimeError(f"the relay did not stop within 30 s of SIGTERM\n{tail(self.log)}")
            time.sleep(0.02)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the relay exited with code {self.proc.returncode}\n{tail(self.log)}")
        return usage.ru_maxrss * 1024  # Linux gives ru_maxrss in KiB

    def pids(self) -> list[int]:
        """The relay's processes: the parent and its workers."""
        return descendants(self.proc.pid)


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60  1 pickup
cleanup   unix  n - n -   0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -   - trivial-rewrite
bounce    unix  - - n -   0 bounce
defer     unix  - - n -   0 bounce
trace     unix  - - n -   0 bounce
verify    unix  - - n -   1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -   - proxymap
showq     unix  n - n -   - showq
error     unix  - - n -   - error
retry     unix  - - n -   - error
discard   unix  - - n -   - discard
smtp      unix  - - n -   - smtp
anvil     unix  - - n -   1 anvil
scache    unix  - - n -   1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixForwarder:
    """A private Postfix instance (root only) that forwards the old addresses to the sink via virtual_alias_maps."""

    def __init__(self, folder: Path, name: str, pairs: list[tuple[str, str]], sink_port: int) -> None:
        self.program = require_program("postfix", "postfix")
        postmap = require_program("postmap", "postfix")
        if os.geteuid() != 0:
            raise RuntimeError("the Postfix forwarder needs root: Postfix's master cannot run as another user")
        # the postfix user must traverse the path of its queue (notes, section 4): main() makes `folder` 0755
        self.dir = folder / name
        self.etc = self.dir / "etc"
        self.etc.mkdir(parents=True)
        (self.dir / "queue").mkdir()
        data = self.dir / "data"
        data.mkdir()
        shutil.chown(data, "postfix")
        self.port = free_port()
        self.log = self.dir / "maillog"
        (self.etc / "virtual").write_text("".join(f"{old} {new}\n" for old, new in pairs), encoding="utf-8")
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {self.dir}/queue
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.log}
maillog_file_prefixes = /tmp
myhostname = forwarder.test
mydomain = test.local
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = reject_unauth_destination
smtp_dns_support_level = disabled
alias_maps =
alias_database =
# the old domains: the map rewrites each address to the new one (unknown ones are refused at RCPT)
virtual_alias_domains = {OLD_DOMAIN}
virtual_alias_maps = hash:{self.etc}/virtual
# the new addresses (and anything else, bounces included) go to the new server: the sink
default_transport = smtp:[127.0.0.1]:{sink_port}
relay_transport = smtp:[127.0.0.1]:{sink_port}
""", encoding="utf-8")
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port), encoding="utf-8")
        run([postmap, "-c", str(self.etc), f"hash:{self.etc}/virtual"], "postmap")
        run([self.program, "-c", str(self.etc), "check"], "postfix check")
        stdout = self.dir / "stdout.log"
        with stdout.open("wb") as out:
            self.proc = subprocess.Popen([self.program, "-c", str(self.etc), "start-fg"], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: read_banner(self.port).startswith(b"220"), self.proc, "postfix", self.log)

    def pids(self) -> list[int]:
        """Every process of the instance: the start-fg wrapper and its descendants."""
        return descendants(self.proc.pid)

    def stop(self) -> None:
        """`postfix stop`, wait for the wrapper, remove the queue."""
        subprocess.run([self.program, "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.dir / "queue", ignore_errors=True)


# --- processes and memory ----------------------------------------------------------------------------------------


def has_field(cls: type, name: str) -> bool:
    """Whether a dataclass has a field (a [relay] key of this version)."""
    return any(f.name == name for f in dataclasses.fields(cls))


def tail(path: Path, limit: int = 3000) -> str:
    """The end of a log file."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Poll until ready; RuntimeError with the log if the process exits or the deadline passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {START_TIMEOUT:.0f} s\n{tail(log)}")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes]) -> float:
    """SIGTERM by pid, SIGKILL after 5 s; its CPU seconds (wait4; 0 when it had been reaped already)."""
    if proc.poll() is not None:
        return 0.0
    proc.terminate()
    deadline = time.monotonic() + 5
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str], what: str) -> str:
    """Run a command; RuntimeError with its output when it fails (Postfix says why only on a terminal)."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {' '.join(args)}\n{result.stdout}{result.stderr}")
    return result.stdout


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) of processes, summed, in bytes."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """User + system clock ticks of each process so far."""
    ticks = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks


class Sampler(threading.Thread):
    """Sample the memory and CPU time of a set of processes every 0.1 s; keep the peaks and the CPU used."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak_rss = self.peak_pss = 0
        self.done = threading.Event()
        self.baseline = cpu_ticks(pids())  # what they had used before the run
        self.ticks = dict(self.baseline)  # last seen, per process (a process that exits keeps its last sample)

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.sample()

    def sample(self) -> None:
        pids = self.pids()
        rss, pss = memory(pids)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.ticks.update(cpu_ticks(pids))

    @property
    def cpu(self) -> float:
        """CPU seconds the processes used since the sampler was made."""
        return (sum(self.ticks.values()) - sum(self.baseline.values())) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()


# --- one run -----------------------------------------------------------------------------------------------------


def send(port: int, load: Load, recipient: str, folder: Path, name: str) -> tuple[float, float]:
    """smtp-source to a forwarder; return its wall time and CPU seconds; RuntimeError when it gives up."""
    args = [require_program("smtp-source", "postfix"), "-s", str(load.sessions), "-m", str(load.messages),
            "-l", str(load.size), "-f", SENDER, "-t", recipient, "-M", "client.test", "-S", "bench"]
    if load.reuse:
        args.append("-d")
    log = folder / f"{name}.source.log"
    began = time.perf_counter()
    with log.open("wb") as out:
        source = subprocess.Popen([*args, f"{LOOPBACK}:{port}"], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(source.pid, 0)
    seconds = time.perf_counter() - began
    source.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"smtp-source to port {port} ({name}) failed with code {code}:\n{tail(log)}")
    return seconds, usage.ru_utime + usage.ru_stime


def wait_delivered(sink: CountingSink, count: int, began: float, name: str) -> float:
    """Wait until the sink has `count` messages; return the seconds since `began`."""
    deadline = time.perf_counter() + RUN_TIMEOUT
    while (got := sink.count()) < count:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{name}: the sink has {got} of {count} messages after {RUN_TIMEOUT:.0f} s")
        time.sleep(0.005)
    return time.perf_counter() - began


def run_relay(folder: Path, load: Load, recipient: str, profile_to: Path | None = None,
              workers: str | None = None, tag: str = "") -> Result:
    """One run through a fresh relay child (`tag` tells its files from other runs')."""
    name = f"relay-{load.name}{tag}" + ("-profiled" if profile_to else "")
    sink = CountingSink(folder, name)
    relay = None
    try:
        relay = RelayChild(folder, name, sink.port, profile_to, workers)
        load_average = os.getloadavg()[0]
        sampler = Sampler(relay.pids)
        sampler.start()
        began = time.perf_counter()
        client, source_cpu = send(relay.port, load, recipient, folder, name)
        seconds = wait_delivered(sink, load.messages, began, name)
        sampler.stop()
        delivered = sink.count()
        peak = relay.stop()
        count, loop = relay.workers, relay.event_loop
        relay = None
        return Result(seconds, client, delivered, max(peak, sampler.peak_rss), sampler.peak_pss,
                      (sampler.cpu, source_cpu, sink.stop()), count, loop, load_average)
    finally:
        if relay is not None:
            stop_process(relay.proc)
        sink.stop()


def run_postfix(folder: Path, load: Load, recipient: str, pairs: list[tuple[str, str]], tag: str = "") -> Result:
    """One run through a fresh Postfix instance (`tag` tells its files from other runs')."""
    name = f"postfix-{load.name}{tag}"
    sink = CountingSink(folder, name)
    postfix = None
    try:
        postfix = PostfixForwarder(folder, name, pairs, sink.port)
        load_average = os.getloadavg()[0]
        sampler = Sampler(postfix.pids)
        sampler.start()
        began = time.perf_counter()
        client, source_cpu = send(postfix.port, load, recipient, folder, name)
        seconds = wait_delivered(sink, load.messages, began, name)
        sampler.stop()
        return Result(seconds, client, sink.count(), sampler.peak_rss, sampler.peak_pss,
                      (sampler.cpu, source_cpu, sink.stop()), None, None, load_average)
    finally:
        if postfix is not None:
            postfix.stop()
        sink.stop()


# --- the table ---------------------------------------------------------------------------------------------------


def mb(count: int) -> str:
    """Bytes as MB."""
    return f"{count / 1e6:,.0f} MB"


def figures(label: str, load: Load, result: Result) -> list[Row]:
    """The rows of one run."""
    rows = [
        Row(f"{label}: {result.delivered:,} of {load.messages:,} at the sink", f"{result.seconds:,.2f} s",
            f"{load.messages / result.seconds:,.0f} msg/s"),
        Row("     throughput", f"{load.megabytes:,.0f} MB", f"{load.megabytes / result.seconds:,.1f} MB/s"),
        Row("     smtp-source's own run (all accepted)", f"{result.client_seconds:,.2f} s",
            f"{load.messages / result.client_seconds:,.0f} msg/s"),
    ]
    if result.peak_pss is None:
        rows.append(Row("     peak RSS (wait4)", mb(result.peak_rss)))
    else:
        rows.append(Row("     peak RSS / PSS, all processes (sampled)",
                        f"{mb(result.peak_rss)} / {mb(result.peak_pss)}"))
    if result.workers is not None:
        rows.append(Row("     worker processes, event loop", f"{result.workers}, {result.event_loop}"))
    forwarder, source, sink = result.cpu
    cores = os.cpu_count() or 1
    rows.append(Row("     CPU s: forwarder / smtp-source / smtp-sink", f"{forwarder:.1f} / {source:.1f} / {sink:.1f}",
                    f"{(forwarder + source + sink) / result.seconds / cores:.0%} of {cores} cores"))
    rows.append(Row("     load average (1 min) as the run began", f"{result.load:.2f}"))
    return rows


def loads(args: argparse.Namespace) -> list[tuple[Load, str]]:
    """The runs, with their titles: 2 KB a session per message, 2 KB sessions kept, 1 MB."""
    small = Load("2k", args.messages, args.size, args.sessions)
    reused = dataclasses.replace(small, name="2k-reuse", reuse=True)
    big = Load("1m", args.big_messages, args.big_size, args.big_sessions)
    return [(small, f"{small.size:,} B x {small.messages:,}, {small.sessions} sessions, a session per message"),
            (reused, f"{reused.size:,} B x {reused.messages:,}, {reused.sessions} sessions kept (-d)"),
            (big, f"{big.size:,} B x {big.messages:,}, {big.sessions} sessions, a session per message")]


def benchmark(folder: Path, args: argparse.Namespace) -> tuple[list[Row], list[Load]]:
    """Run every step; return the rows and the loads whose targets the relay missed."""
    _, pairs = write_map(folder, args.addresses)
    recipient = pairs[len(pairs) // 2][0]
    rows: list[Row] = []
    missed: list[Load] = []
    for load, title in loads(args):
        rounds: list[tuple[float, Result, Result]] = []
        for number in range(1, args.rounds + 1):
            # The relay and Postfix one after the other in each round: a machine whose speed drifts (other
            # work, CPU boost, page cache) skews a round's two runs alike, and the median round's ratio counts.
            print(f"== {title}, round {number} of {args.rounds}", flush=True)
            relay = run_relay(folder, load, recipient, workers=args.workers, tag=f"-{number}")
            print(f"   relay:   {relay.seconds:.2f} s, peak RSS {mb(relay.peak_rss)}", flush=True)
            postfix = run_postfix(folder, load, recipient, pairs, tag=f"-{number}")
            print(f"   postfix: {postfix.seconds:.2f} s", flush=True)
            rounds.append((postfix.seconds / relay.seconds, relay, postfix))  # messages/s over messages/s
        ratio, relay, postfix = sorted(rounds, key=lambda item: item[0])[len(rounds) // 2]
        rows.append(Row(title + (f": the median of {len(rounds)} rounds" if len(rounds) > 1 else ""), ""))
        rows += figures("  relay", load, relay)
        rows += figures("  Postfix forwarder", load, postfix)
        if len(rounds) > 1:
            rows.append(Row("  relay msg/s over Postfix msg/s, each round",
                            ", ".join(f"{each:.2f}x" for each, _, _ in rounds)))
        ok = ratio >= SPEED_RATIO
        rows.append(Row("  relay msg/s over Postfix msg/s" + (", median" if len(rounds) > 1 else ""),
                        f"{ratio:.2f}x", target=f">= {SPEED_RATIO:.1f}x", verdict=verdict(ok)))
        if load.name == "1m":
            peak = max(each.peak_rss for _, each, _ in rounds)
            memory_ok = peak <= RSS_LIMIT
            rows.append(Row(f"  relay peak RSS, {load.sessions} concurrent {load.size / 1e6:g} MB messages"
                            + (", highest round" if len(rounds) > 1 else ""),
                            mb(peak), target=f"<= {mb(RSS_LIMIT)}", verdict=verdict(memory_ok)))
            ok = ok and memory_ok
        if not ok and not load.reuse:
            missed.append(load)
    return rows, missed


def profile(folder: Path, args: argparse.Namespace, load: Load) -> str:
    """One run through a relay child under cProfile; the top functions by own time and by cumulative time."""
    _, pairs = write_map(folder, args.addresses)
    out = folder / f"relay-{load.name}.prof"
    result = run_relay(folder, load, pairs[len(pairs) // 2][0], profile_to=out)
    text = [f"\n\nprofile of the relay child (cProfile), run {load.name} ({load.messages:,} x {load.size:,} B, "
            f"{load.sessions} sessions): {load.messages / result.seconds:,.0f} msg/s under the profiler, "
            f"{result.seconds:.1f} s, peak RSS {mb(result.peak_rss)}"]
    stats = pstats.Stats(str(out))
    by_file: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        # built-ins one by one (socket send, re.sub...); libraries as a whole; the project's modules one by one
        key = function if filename == "~" else _package_of(filename)
        if "site-packages" in Path(filename).parts:
            key = key.split("/")[0]
        by_file[key] = by_file.get(key, 0.0) + own
    total = sum(by_file.values())
    text.append(f"--- own time by package or module, built-in functions one by one (total {total:.1f} s) ---")
    text += [f"{seconds:8.2f} s {100 * seconds / total:5.1f} %  {name}"
             for name, seconds in sorted(by_file.items(), key=lambda item: -item[1])[:15]]
    stream = _Capture()
    listing = pstats.Stats(str(out), stream=stream)  # type: ignore[arg-type]
    listing.strip_dirs().sort_stats("tottime").print_stats(args.top)
    text.append(f"--- top {args.top} functions by own time ---")
    text.append(stream.text())
    # By cumulative time, only the relay's code and its SMTP libraries: the frames above them (click, asyncio's
    # loop) hold everything and say nothing.
    entries = stats.stats.items()  # type: ignore[attr-defined]
    ours = [(cumulative, own, calls, f"{_package_of(filename)}:{line}({function})")
            for (filename, line, function), (_, calls, own, cumulative, _) in entries
            if any(part in Path(filename).parts for part in ("mailmerge_gov", "aiosmtpd", "aiosmtplib"))]
    text.append(f"--- top {args.top} functions of mailmerge_gov, aiosmtpd and aiosmtplib by cumulative time ---")
    text.append(f"{'cumtime':>8} {'tottime':>8} {'ncalls':>8}  function")
    text += [f"{cumulative:8.2f} {own:8.2f} {calls:8d}  {name}"
             for cumulative, own, calls, name in sorted(ours, reverse=True)[:args.top]]
    return "\n".join(text)


def _package_of(filename: str) -> str:
    """Where a profiled function lives: the project's module, a library's package, a standard library module."""
    path = Path(filename)
    if "site-packages" in path.parts:
        return "/".join(path.parts[path.parts.index("site-packages") + 1:])
    if "mailmerge_gov" in path.parts:
        return "mailmerge_gov/" + "/".join(path.parts[path.parts.index("mailmerge_gov") + 1:])
    if filename.startswith("<"):
        return filename
    return "stdlib " + ("/".join(path.parts[-2:]) if path.parent.name == "asyncio" else path.name)


class _Capture:
    """A write()-only stream for pstats."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def text(self) -> str:
        lines = "".join(self.parts).splitlines()
        start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
        return "\n".join(lines[start:])


def print_table(rows: list[Row], load_before: tuple[float, float, float]) -> None:
    """Print the figures side by side, with the machine's load average before and after (others' work skews them)."""
    postfix = subprocess.run([require_program("postconf", "postfix"), "-d", "-h", "mail_version"], capture_output=True,
                             text=True).stdout.strip()
    print(f"\nmailmerge-gov relay benchmark: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"Postfix {postfix} (forwarder, smtp-source, smtp-sink)")
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
        *load_before, *os.getloadavg()))
    print_rows(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print the table (and the profile)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages of the 2 KB runs (default 10,000)")
    parser.add_argument("--size", type=int, default=2048, help="bytes of each (default 2,048)")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions at once (default 20)")
    parser.add_argument("--big-messages", type=int, default=500, help="messages of the 1 MB runs (default 500)")
    parser.add_argument("--big-size", type=int, default=1_000_000, help="bytes of each (default 1,000,000)")
    parser.add_argument("--big-sessions", type=int, default=50, help="sessions at once (default 50)")
    parser.add_argument("--addresses", type=int, default=10_000, help="old addresses in the map (default 10,000)")
    parser.add_argument("--workers", default=None,
                        help='[relay] workers of the relay (default: not set, so its default, "auto")')
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each step through each forwarder; the median round counts (default 3)")
    parser.add_argument("--profile", action="store_true", help="profile the relay even if it meets the target")
    parser.add_argument("--top", type=int, default=30, help="functions listed per profile order (default 30)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, profile)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    report = ""
    with work_folder("mmg-bench-relay-", args.keep, parent="/tmp") as folder:
        folder.chmod(0o755)  # Postfix's processes, as user postfix, reach their queue inside it
        try:
            rows, missed = benchmark(folder, args)
            for load, _ in loads(args):
                if load in missed or (args.profile and not load.reuse):
                    report += profile(folder, args, load)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return stopped(exc)
    print_table(rows, load_before)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
