"""What the relay's worker processes share: the client connection counts of the limits, and the metrics."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from mailmerge_gov.forwarding.metrics import _FAMILIES, FAMILIES, LATENCY_BUCKETS, NEXT_HOP_COMMANDS, RelayMetrics

# Per-IP counts are kept in a table of hashed buckets, not per address: a fixed size, shared without a
# dictionary. Two addresses in one bucket share its count, so a collision can only make the per-IP limit
# stricter for them (never looser); with 65,536 buckets and max_connections (200) clients at most, that is
# rare, and the hash is keyed with a secret drawn at start so that nobody can aim their addresses at
# another's bucket.
IP_BUCKETS = 65536
EXTRA_LABELS = 64  # label values not declared in metrics.FAMILIES (a next hop's own status), registered on first use
_ENTRY = 64  # bytes of a registered label: its length, then "family\0label" in UTF-8
# Byte ranges of the lock file, one lock each (fcntl record locks: per process, released by the kernel when
# the process dies, so a worker killed inside a critical section cannot block the others).
ADMISSION, LOG_LINE, REGISTRY = 0, 1, 2


class SharedState:
    """Memory shared by the forked workers (an anonymous MAP_SHARED mapping) and the locks that guard it."""

    def __init__(self, workers: int, ip_buckets: int = IP_BUCKETS) -> None:
        """Room for `workers` rows of counters, all 0; made in the parent before it forks."""
        self.workers = workers
        self.ip_buckets = ip_buckets
        self.slots, histogram = _metric_slots()
        self.histograms = histogram  # command -> first slot: a count per bucket, then the sum, then the count
        self.metric_width = len(self.slots) + sum(len(LATENCY_BUCKETS) + 2 for _ in histogram) + EXTRA_LABELS
        self.connection_width = 1 + ip_buckets  # the worker's connections, then its count per IP bucket
        metric_bytes = 8 * workers * self.metric_width
        connection_bytes = 8 * workers * self.connection_width
        # Each worker writes only its own row (no lock needed to count); readers add the rows up.
        self._memory = mmap.mmap(-1, metric_bytes + connection_bytes + EXTRA_LABELS * _ENTRY)
        view = memoryview(self._memory)
        self.metrics = view[:metric_bytes].cast("d")
        self.connections = view[metric_bytes:metric_bytes + connection_bytes].cast("q")
        self.registry = view[metric_bytes + connection_bytes:]
        self.lock_fd = _lock_file()
        self._key = secrets.token_bytes(16)

    @contextmanager
    def locked(self, which: int) -> Iterator[None]:
        """Hold one of the locks (ADMISSION, LOG_LINE, REGISTRY) across the workers."""
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX, 1, which)
        try:
            yield
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, which)

    def bucket(self, client_ip: str) -> int:
        """The per-IP bucket of an address (keyed hash)."""
        digest = hashlib.blake2b(client_ip.encode("utf-8", "replace"), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.ip_buckets

    def total_connections(self) -> int:
        """Client connections open in all workers."""
        width = self.connection_width
        return sum(self.connections[worker * width] for worker in range(self.workers))

    def clear_worker(self, worker: int) -> None:
        """Forget the connections of a worker that died (its gauge too); its counters keep counting."""
        with self.locked(ADMISSION):
            start = worker * self.connection_width
            self.connections[start:start + self.connection_width] = memoryview(
                bytes(8 * self.connection_width)).cast("q")
        self.metrics[worker * self.metric_width + self.slots[("connections_open", "")]] = 0

    def extra_slot(self, name: str, label: str) -> int | None:
        """The slot of a label value not declared in FAMILIES, registered now if new; None when the table is full."""
        key = f"{name}\0{label}".encode("utf-8")[:_ENTRY - 1]
        first = len(self.slots) + sum(len(LATENCY_BUCKETS) + 2 for _ in self.histograms)
        with self.locked(REGISTRY):
            for index in range(EXTRA_LABELS):
                entry = self.registry[index * _ENTRY:(index + 1) * _ENTRY]
                length = entry[0]
                if length == 0:
                    entry[0] = len(key)
                    entry[1:1 + len(key)] = key
                    return first + index
                if bytes(entry[1:1 + length]) == key:
                    return first + index
        return None

    def extra_labels(self) -> Iterator[tuple[str, str, int]]:
        """(family, label, slot) of every registered label value."""
        first = len(self.slots) + sum(len(LATENCY_BUCKETS) + 2 for _ in self.histograms)
        for index in range(EXTRA_LABELS):
            entry = self.registry[index * _ENTRY:(index + 1) * _ENTRY]
            if entry[0] == 0:
                return
            name, _, label = bytes(entry[1:1 + entry[0]]).decode("utf-8", "replace").partition("\0")
            yield name, label, first + index

    def total(self, slot: int) -> float:
        """One metric slot added up over the workers."""
        width = self.metric_width
        return sum(self.metrics[worker * width + slot] for worker in range(self.workers))


def _lock_file() -> int:
    """A file descriptor of a file that only carries the locks: in memory (memfd), or an unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("mailmerge-relay-locks")  # no file system needed (systemd ProtectSystem=strict)
        except OSError:
            pass
    descriptor, name = tempfile.mkstemp(prefix="mailmerge-relay-")
    os.unlink(name)
    return descriptor


def _metric_slots() -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """Slots of the declared counters ((family, label) -> slot) and of the histogram (command -> first slot)."""
    slots: dict[tuple[str, str], int] = {}
    for family in FAMILIES:
        for label in family.values if family.label else ("",):
            slots[(family.name, label)] = len(slots)
    histograms: dict[str, int] = {}
    next_slot = len(slots)
    for command in NEXT_HOP_COMMANDS:
        histograms[command] = next_slot
        next_slot += len(LATENCY_BUCKETS) + 2
    return slots, histograms


class SharedLimits:
    """max_connections and max_connections_per_ip over all the workers, counted in the shared memory."""

    def __init__(self, state: SharedState, worker: int, max_connections: int, max_per_ip: int) -> None:
        """The limits as worker number `worker` (its row) applies them."""
        self.state = state
        self.row = worker * state.connection_width
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip

    def admit(self, client_ip: str) -> tuple[str | None, int, int]:
        """Count a new connection in unless over a limit: (the limit hit or None, connections, from this IP)."""
        state = self.state
        counts, width, bucket = state.connections, state.connection_width, 1 + state.bucket(client_ip)
        # Reading the totals and counting in must be one step, or two workers could both take the last place.
        fcntl.lockf(state.lock_fd, fcntl.LOCK_EX, 1, ADMISSION)
        try:
            total = sum(counts[worker * width] for worker in range(state.workers))
            from_ip = sum(counts[worker * width + bucket] for worker in range(state.workers))
            if total >= self.max_connections:
                return "max_connections", total, from_ip
            if from_ip >= self.max_per_ip:
                return "max_connections_per_ip", total, from_ip
            counts[self.row] += 1
            counts[self.row + bucket] += 1
            return None, total + 1, from_ip + 1
        finally:
            fcntl.lockf(state.lock_fd, fcntl.LOCK_UN, 1, ADMISSION)

    def release(self, client_ip: str) -> None:
        """Count a closed connection out (no lock: only this worker writes its row, and 8-byte stores are whole)."""
        counts = self.state.connections
        counts[self.row] -= 1
        counts[self.row + 1 + self.state.bucket(client_ip)] -= 1


class SharedMetrics(RelayMetrics):
    """RelayMetrics kept in the shared memory: each worker adds to its own row, a scrape shows the sums."""

    def __init__(self, state: SharedState, worker: int) -> None:
        """The metrics as worker number `worker` counts them."""
        super().__init__()  # local structures: only for label values the shared table has no room for
        self.state = state
        self.base = worker * state.metric_width
        self.slots = dict(state.slots)  # grows with the registered label values this worker meets

    def add(self, name: str, label: str = "", amount: float = 1) -> None:
        """Add `amount` to a counter (or a gauge) in this worker's row."""
        slot = self.slots.get((name, label))
        if slot is None:
            family = _FAMILIES.get(name)
            if family is None or bool(label) != bool(family.label):
                raise KeyError(f"{name}{{{label}}}" if label else name)
            slot = self.state.extra_slot(name, label)
            if slot is None:
                super().add(name, label, amount)  # the table is full: seen only in this worker's scrapes
                return
            self.slots[(name, label)] = slot
        self.state.metrics[self.base + slot] += amount

    def get(self, name: str, label: str = "") -> float:
        """The value of a counter over all the workers."""
        slot = self.slots.get((name, label))
        if slot is None:
            slot = next((s for n, lab, s in self.state.extra_labels() if (n, lab) == (name, label)), None)
        return (self.state.total(slot) if slot is not None else 0) + super().get(name, label)

    def observe(self, command: str, seconds: float) -> None:
        """Record how long one next-hop command took, in this worker's row."""
        first = self.state.histograms.get(command)
        if first is None:
            super().observe(command, seconds)
            return
        values, base = self.state.metrics, self.base + first
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                values[base + index] += 1
        values[base + len(LATENCY_BUCKETS)] += seconds
        values[base + len(LATENCY_BUCKETS) + 1] += 1

    def render(self) -> str:
        """All metrics, added up over the workers, in the Prometheus text format."""
        return self.snapshot().render()

    def snapshot(self) -> RelayMetrics:
        """A plain RelayMetrics holding the sums over the workers now."""
        state = self.state
        total = RelayMetrics()
        for (name, label), slot in state.slots.items():
            total.values[name][label] = _whole(state.total(slot))
        for name, label, slot in state.extra_labels():
            if name in total.values:
                total.values[name][label] = _whole(state.total(slot))
        for command, first in state.histograms.items():
            bounds = len(LATENCY_BUCKETS)
            total.buckets[command] = [int(state.total(first + index)) for index in range(bounds)]
            total.latency_sum[command] = state.total(first + bounds)
            total.latency_count[command] = int(state.total(first + bounds + 1))
        for name, values in self.values.items():  # what only this worker holds (a full label table)
            for label, value in values.items():
                if value:
                    total.values[name][label] = total.values[name].get(label, 0) + value
        for command, counts in self.buckets.items():
            if command not in total.buckets:
                total.buckets[command] = counts
                total.latency_sum[command] = self.latency_sum[command]
                total.latency_count[command] = self.latency_count[command]
        return total


def _whole(value: float) -> float:
    """A sum of counts as an int when it is one (counters are added as floats in the shared memory)."""
    return int(value) if value == int(value) else value
