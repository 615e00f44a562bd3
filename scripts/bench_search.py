#!/usr/bin/env python3
"""Benchmark of the staff search at scale: index build, and query latency over HTTP next to ldapsearch on slapd.

Usage: python scripts/bench_search.py [--scale N] [--queries N] [--clients N] [--seed N] [--keep]

A measurement, not a test: it prints a table of figures with a verdict per target and exits 0 whether the
targets are met or not (1 only when a step fails outright). In a temporary folder it writes an LDIF export of
a new directory as `directory apply` shapes it (the unit OUs under ou=units, officials under ou=people with
inetOrgPerson, inetLocalMailRecipient and the project's history attributes), N officials (100,000 by default)
with the example generator's Vietnamese names (scripts/generate_example.py), so many namesakes and numbered
addresses, old addresses, old units and 1% disabled accounts, from a fixed seed.

Steps and targets (DESIGN.md: speed targets live in scripts that print figures; the issue's figures):
- index: `mailmerge-gov directory index` of that LDIF in a child process (wall time, peak RSS); target 30 s.
- HTTP: `mailmerge-gov directory serve` (uvicorn) in a child process on 127.0.0.1; a fixed mix of queries
  (names with and without diacritics, prefixes, initials, addresses old and new, local parts, phone numbers,
  units, misses) sent to /api/people by concurrent clients on keep-alive connections; p50/p95/p99 of each
  request's latency as the client sees it; target p95 <= 20 ms.
- ldapsearch: a private slapd (tests/servers.py, mdb, the tests' indexes: uid, mail, cn eq,sub) loaded with the
  same LDIF; the same queries as the substring filters an address book sends (Thunderbird's
  (|(cn=q*)(mail=q*)(sn=q*)), telephoneNumber=*q* for numbers), by the same number of concurrent clients,
  each query one ldapsearch process with -z 20 (the API's default limit). Latency includes starting the
  ldapsearch process: that is what an administrator typing ldapsearch waits for.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' private slapd (tests/ is not a package)

import generate_example as generator  # noqa: E402  (this folder: the example's generator)
from bench_directory import example_config, toml_table  # noqa: E402  (this folder)
from benchtable import Row, megabytes, print_rows, run_child, stopped, verdict, work_folder  # noqa: E402  (this folder)
from servers import SlapdServer, free_port, require_program, slapd_version  # noqa: E402

from mailmerge_gov.config import load_config  # noqa: E402
from mailmerge_gov.vietnamese import fold, split_name  # noqa: E402

PROJECT_SCHEMA = ROOT / "directory" / "mailmerge-gov.schema"
BASE = "dc=hcm,dc=gov,dc=vn"
DOMAIN = "hcm.gov.vn"
OLD_DOMAINS = (("binhduong.gov.vn", "tỉnh Bình Dương"), ("baria-vungtau.gov.vn", "tỉnh Bà Rịa - Vũng Tàu"))
INDEX_SECONDS = 30.0
P95_MS = 20.0
LIMIT = 20  # the API's default; ldapsearch gets the same size limit
MDB_MAXSIZE = 16 << 30  # address space only; 100,000 officials take a few hundred MB
START_TIMEOUT = 60.0  # seconds for the web server to answer its first request
# Sub-units of each department: the tree has three levels, as a real city's does.
OFFICES = ("Văn phòng", "Phòng Tổ chức cán bộ", "Phòng Kế hoạch", "Phòng Pháp chế", "Thanh tra", "Phòng Tổng hợp")
WARD_PREFIXES = ("Phường", "Xã")
WARD_WORDS = ("Tân", "Bình", "Phú", "An", "Long", "Thạnh", "Hòa", "Phước", "Thới", "Hiệp", "Mỹ", "Đông", "Tây",
              "Nhơn", "Vĩnh", "Lộc", "Xuân", "Thuận")


@dataclass(frozen=True)
class Unit:
    """One unit of the generated organisation."""

    code: str
    name: str
    parent: str | None
    dn: str


@dataclass(frozen=True)
class Official:
    """What the queries are drawn from: one generated official."""

    uid: str
    name: str
    unit: Unit
    phone: str
    old_address: str


def units_of(rng: random.Random) -> list[Unit]:
    """The new city: its departments with their offices, and some 170 wards and communes (one with nobody)."""
    top = Unit("79", "Thành phố Hồ Chí Minh", None, f"ou=79,ou=units,{BASE}")
    units = [top]
    for code, name, _ in generator.DEPARTMENTS:
        department = Unit(f"79.{code}", name, "79", f"ou=79.{code},{top.dn}")
        units.append(department)
        units += [Unit(f"79.{code}.{n}", office, department.code, f"ou=79.{code}.{n},{department.dn}")
                  for n, office in enumerate(OFFICES, start=1)]
    names: set[str] = set()
    while len(names) < 170:
        names.add(f"UBND {rng.choice(WARD_PREFIXES)} {rng.choice(WARD_WORDS)} {rng.choice(WARD_WORDS)}")
    units += [Unit(str(26000 + n), name, "79", f"ou={26000 + n},{top.dn}") for n, name in enumerate(sorted(names))]
    return units


def ldif_entry(pairs: list[tuple[str, str]]) -> str:
    """One LDIF entry (values base64 where RFC 2849 asks), with the generator's line writer."""
    return "\n".join(generator.ldif_line(attribute, value) for attribute, value in pairs if value) + "\n"


def directory_ldif(scale: int, seed: int) -> tuple[str, list[Official], list[Unit]]:
    """The new directory as LDIF, and the officials and units the queries are drawn from."""
    rng = random.Random(seed)
    units = units_of(rng)
    staffed = units[1:-1]  # the city itself holds nobody directly, and the last ward is still empty
    weights = [3.0 if unit.code.count(".") == 2 else 1.0 for unit in staffed]
    entries = [ldif_entry([("dn", f"ou=units,{BASE}"), ("objectClass", "organizationalUnit"), ("ou", "units")]),
               ldif_entry([("dn", f"ou=people,{BASE}"), ("objectClass", "organizationalUnit"), ("ou", "people")])]
    for unit in units:
        entries.append(ldif_entry([("dn", unit.dn), ("objectClass", "top"), ("objectClass", "organizationalUnit"),
                                   ("objectClass", "mailmergeHistory"), ("ou", unit.code), ("ou", unit.name),
                                   ("description", unit.name), ("mailmergeUnitCode", unit.code)]))
    taken: collections.Counter[str] = collections.Counter()
    officials = []
    for number in range(scale):
        gender = rng.choice("MF")
        name = generator.random_name(rng, gender)
        parts = split_name(name)
        given = fold(parts.given).replace(" ", "")
        stem = f"{given}{parts.initials}"
        taken[stem] += 1
        uid = stem if taken[stem] == 1 else f"{stem}{taken[stem]}"  # annv, annv2 … as the address policy does
        unit = rng.choices(staffed, weights)[0]
        title = rng.choices(*zip(*generator.TITLES["ward" if unit.code.isdigit() else "dept"]))[0]
        phone = f"028 {3800 + number // 10000:04d} {number % 10000:04d}"
        mobile = f"09{rng.randrange(10 ** 8):08d}"
        mail = f"{uid}@{DOMAIN}"
        old_address, old_unit = "", ""
        if rng.random() < 0.45:  # from an absorbed province: an old address, an old unit
            domain, province = rng.choice(OLD_DOMAINS)
            old_address = f"{given}.{fold(parts.family + parts.middle).replace(' ', '')}{number}@{domain}"
            old_unit = f"{unit.name} {province}"
        disabled = rng.random() < 0.01
        folded = fold(name)
        entries.append(ldif_entry([
            ("dn", f"uid={uid},ou=people,{BASE}"),
            *[("objectClass", c) for c in ("top", "person", "organizationalPerson", "inetOrgPerson",
                                           "inetLocalMailRecipient", "mailmergeHistory")],
            ("uid", uid), ("cn", name), ("cn", folded), ("sn", parts.family), ("givenName", parts.given),
            ("displayName", name), ("title", title), ("departmentNumber", unit.code), ("mail", mail),
            ("mail", old_address), ("mailLocalAddress", mail), ("mailLocalAddress", old_address),
            ("mailRoutingAddress", mail), ("telephoneNumber", phone), ("mobile", mobile),
            ("mailmergeUnitCode", unit.code), ("mailmergeOldAddress", old_address), ("mailmergeOldUnit", old_unit),
            ("mailmergeAccountStatus", "disabled" if disabled else "active")]))
        if not disabled:
            officials.append(Official(uid, name, unit, phone, old_address))
    return "\n".join(entries), officials, units


@dataclass(frozen=True)
class Query:
    """One query of the mix: what a person types, its kind, and the LDAP filter an address book would send."""

    kind: str
    text: str
    ldap_filter: str


def ldap_escape(value: str) -> str:
    """RFC 4515 escaping of a filter value."""
    return "".join(f"\\{ord(c):02x}" if c in "*()\\\0" else c for c in value)


def queries(officials: list[Official], units: list[Unit], count: int, seed: int) -> list[Query]:
    """A fixed mix of what staff type: names, prefixes, initials, addresses, numbers, units, and misses."""
    rng = random.Random(seed + 1)
    with_old = [o for o in officials if o.old_address]

    def book(text: str) -> str:  # Thunderbird's default address-book search
        value = ldap_escape(text)
        return f"(|(cn={value}*)(mail={value}*)(sn={value}*))"

    makers = [
        (20, lambda: ("name", (o := rng.choice(officials)).name, book(o.name))),
        (15, lambda: ("name without diacritics", (t := fold(rng.choice(officials).name)), book(t))),
        (10, lambda: ("prefix", (t := fold(rng.choice(officials).name)[:rng.randint(3, 6)].strip()), book(t))),
        (10, lambda: ("uid", (t := rng.choice(officials).uid), f"(|(uid={ldap_escape(t)}*)(mail={ldap_escape(t)}*))")),
        (10, lambda: ("old address", (t := rng.choice(with_old).old_address), f"(mail={ldap_escape(t)})")),
        (5, lambda: ("old local part", (t := rng.choice(with_old).old_address.split("@")[0]),
                     f"(mail={ldap_escape(t)}@*)")),
        (10, lambda: ("phone", (t := rng.choice(officials).phone), f"(telephoneNumber=*{ldap_escape(t)}*)")),
        (10, lambda: ("unit", (t := fold(rng.choice(units).name)), book(t))),
        (5, lambda: ("initials", (t := " ".join(fold(rng.choice(officials).name).split()[::-1][:1]
                                                + [fold(rng.choice(officials).name).split()[0][:1]])), book(t))),
        (5, lambda: ("miss", (t := "".join(rng.choice("qxzjwf") for _ in range(6))), book(t))),
    ]
    weights = [weight for weight, _ in makers]
    return [Query(*rng.choices(makers, weights)[0][1]()) for _ in range(count)]


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 of latencies in seconds, as milliseconds."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[94] * 1000, cuts[98] * 1000


def in_parallel(items: list[Query], clients: int, work) -> tuple[list[float], float, list[str]]:  # type: ignore[no-untyped-def]
    """Run work(client_state, item) for every item on `clients` threads; return latencies, wall time, errors."""
    todo: queue.Queue[Query] = queue.Queue()
    for item in items:
        todo.put(item)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        state: dict = {}
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                break
            began = time.perf_counter()
            try:
                work(state, item)
            except Exception as exc:  # one failed query is a figure, not the end of the run
                with lock:
                    errors.append(f"{item.kind} {item.text!r}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - began)
        if "connection" in state:
            state["connection"].close()

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - began, errors


def api_query(port: int):  # type: ignore[no-untyped-def]
    """The work of one HTTP client: GET /api/people on its own keep-alive connection."""
    def work(state: dict, query: Query) -> None:
        connection = state.setdefault("connection", http.client.HTTPConnection("127.0.0.1", port, timeout=30))
        connection.request("GET", "/api/people?" + urlencode({"q": query.text}))
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        state["found"] = state.get("found", 0) + len(json.loads(body)["people"])
    return work


def ldapsearch_query(server: SlapdServer, program: str):  # type: ignore[no-untyped-def]
    """The work of one LDAP client: one anonymous ldapsearch process per query, at most LIMIT entries."""
    env = server.client_env()

    def work(state: dict, query: Query) -> None:
        done = subprocess.run([program, "-x", "-LLL", "-H", server.url, "-b", f"ou=people,{BASE}", "-z", str(LIMIT),
                               query.ldap_filter, "uid", "cn", "mail", "title", "telephoneNumber"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if done.returncode not in (0, 4):  # 4: size limit exceeded, more than LIMIT entries match
            raise RuntimeError(f"ldapsearch exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}")
    return work


def write_config(folder: Path, ldif: Path, port: int) -> Path:
    """The example's consolidation file with the generated LDIF as the new directory, and [web] on `port`."""
    data = example_config()
    data["project"]["state_file"] = str(folder / "state" / "bench.sqlite")
    data["target"]["directory"] = {"ldif": str(ldif)}
    data["target"].pop("mail", None)
    example = ROOT / "examples" / "hcm-merger"
    for source in data["sources"]:
        source.pop("mail", None)
        for key in ("ldif", "hr_csv"):
            if key in source["directory"]:
                source["directory"][key] = str(example / source["directory"][key])
    data["directory"]["structure"] = str(example / data["directory"]["structure"])
    data["web"] = {"host": "127.0.0.1", "port": port}
    path = folder / "consolidation.toml"
    path.write_text("# written by scripts/bench_search.py from examples/hcm-merger/consolidation.toml\n"
                    + toml_table(data), encoding="utf-8")
    load_config(path)  # refuse now, with the loader's message, rather than in the child
    return path


def start_web(config: Path, folder: Path, port: int) -> subprocess.Popen[bytes]:
    """Start `directory serve` in a child process and wait (bounded) until the API answers."""
    with (folder / "serve.log").open("wb") as log:  # the child keeps its own copy of the file
        child = subprocess.Popen([sys.executable, "-m", "mailmerge_gov", "directory", "serve", "-c", str(config)],
                                 cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"directory serve exited with {child.returncode}:\n"
                               + (folder / "serve.log").read_text(errors="replace")[-4000:])
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/api/openapi.json")
            if connection.getresponse().status == 200:
                connection.close()
                return child
        except OSError:
            time.sleep(0.1)
    stop(child)
    raise RuntimeError(f"directory serve did not answer on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s")


def stop(child: subprocess.Popen[bytes]) -> None:
    """Stop a child this script started, by its pid: SIGTERM, then SIGKILL after a deadline."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def latency_rows(label: str, latencies: list[float], seconds: float, errors: list[str], target: bool) -> list[Row]:
    """The rows of one client's figures: percentiles, throughput, failures."""
    p50, p95, p99 = percentiles(latencies)
    rows = [Row(f"{label}: p50", f"{p50:,.1f} ms"),
            Row(f"{label}: p95", f"{p95:,.1f} ms", target=f"<= {P95_MS:.0f} ms" if target else "",
                verdict=verdict(p95 <= P95_MS) if target else ""),
            Row(f"{label}: p99", f"{p99:,.1f} ms"),
            Row(f"{label}: {len(latencies):,} queries", f"{seconds:,.1f} s", f"{len(latencies) / seconds:,.0f} q/s")]
    if errors:
        rows.append(Row(f"{label}: failed queries", str(len(errors)), verdict="MISSED"))
        print(f"{label}: {len(errors)} failed, the first: {errors[0]}", flush=True)
    return rows


def benchmark(folder: Path, scale: int, count: int, clients: int, seed: int) -> list[Row]:
    """Run every step in `folder`; return the table's rows."""
    began = time.perf_counter()
    text, officials, units = directory_ldif(scale, seed)
    ldif = folder / "directory.ldif"
    ldif.write_text(text, encoding="utf-8")
    mix = queries(officials, units, count, seed)
    kinds = collections.Counter(query.kind for query in mix)
    print(f"generated {scale:,} officials ({scale - len(officials):,} disabled) in {len(units)} units, "
          f"{ldif.stat().st_size / 1e6:,.0f} MB of LDIF, in {time.perf_counter() - began:.1f} s; queries: "
          + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()), flush=True)
    port = free_port()
    config = write_config(folder, ldif, port)
    rows: list[Row] = []

    index = run_child([sys.executable, "-m", "mailmerge_gov", "directory", "index", "-c", str(config)], folder, "index")
    print(index.output.strip(), flush=True)
    size = (folder / "state" / "directory-index.sqlite").stat().st_size
    rows += [Row(f"index build: {len(officials):,} officials", f"{index.seconds:,.1f} s",
                 f"{len(officials) / index.seconds:,.0f} officials/s", f"<= {INDEX_SECONDS:.0f} s",
                 verdict(index.seconds <= INDEX_SECONDS)),
             Row("     peak RSS of the index command", megabytes(index.max_rss)),
             Row("     index file", megabytes(size))]

    web = start_web(config, folder, port)
    print("load average before the HTTP queries: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()), flush=True)
    try:
        warm = mix[:50]  # the first requests load modules and fill the page cache: not what people wait for
        in_parallel(warm, clients, api_query(port))
        latencies, seconds, errors = in_parallel(mix, clients, api_query(port))
    finally:
        stop(web)
    rows += latency_rows(f"HTTP /api/people, {clients} clients", latencies, seconds, errors, target=True)

    server = SlapdServer([BASE], seed_ldif=text, schemas=(PROJECT_SCHEMA,),
                         maxsize=MDB_MAXSIZE, database_options=("dbnosync",))
    loading = time.perf_counter()
    server.start()
    try:
        print(f"slapd loaded (slapadd) and started in {time.perf_counter() - loading:.1f} s", flush=True)
        program = require_program("ldapsearch", "ldap-utils")
        in_parallel(mix[:50], clients, ldapsearch_query(server, program))
        ldap_latencies, ldap_seconds, ldap_errors = in_parallel(mix, clients, ldapsearch_query(server, program))
    finally:
        server.stop()
    rows += latency_rows(f"ldapsearch on slapd, {clients} clients", ldap_latencies, ldap_seconds, ldap_errors,
                         target=False)
    rows.append(Row("HTTP p95 / ldapsearch p95", f"{percentiles(latencies)[1] / percentiles(ldap_latencies)[1]:.2f}x"))
    return rows


def print_table(rows: list[Row], scale: int, count: int, clients: int) -> None:
    """Print the figures side by side."""
    version = slapd_version()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\nmailmerge-gov search benchmark: {scale:,} officials, {count:,} queries, {clients} clients, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, {version}, load average at the end {load}")
    print_rows(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=100_000, help="officials in all (default 100,000)")
    parser.add_argument("--queries", type=int, default=1000, help="queries measured (default 1,000)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients (default 10)")
    parser.add_argument("--seed", type=int, default=generator.DEFAULT_SEED)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if args.scale < 1000 or args.queries < 100 or not 1 <= args.clients <= 100:
        parser.error("at least 1,000 officials and 100 queries, 1 to 100 clients")
    with work_folder("mmg-bench-search-", args.keep) as folder:
        try:
            rows = benchmark(folder, args.scale, args.queries, args.clients, args.seed)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            return stopped(exc)
    print_table(rows, args.scale, args.queries, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
