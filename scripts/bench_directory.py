#!/usr/bin/env python3
"""Benchmark of the directory steps at scale: plan, apply into a real slapd next to ldapadd, re-apply, rollback.

Usage: python scripts/bench_directory.py [--scale N] [--seed N] [--keep]

A measurement, not a test: it prints a table of figures with a verdict per target and exits 0 whether the
targets are met or not (1 only when a step fails outright). In a temporary folder it generates N officials
(100,000 by default) spread over the example's three old directories, in their three shapes (OpenLDAP, Active
Directory with the HR export, Zimbra), with the example's generator (scripts/generate_example.py): the same
Vietnamese names, so many collisions, units, aliases and disabled accounts, from a fixed seed. The unit mapping
file comes from the generator too, and consolidation.toml from the example's, pointed at the temporary folder.

Steps and targets (DESIGN.md: speed and memory targets live in scripts that print figures):
- plan: `mailmerge-gov directory plan` in a child process, alone, so that its peak RSS is its own (wait4);
  target 20 s and 1 GB. A second run under tracemalloc, into a scratch state file, gives the Python heap peak.
- apply: two private slapd (same slapd.conf: mdb, the project schema, dbnosync), one suffix each. ldapadd (the
  OpenLDAP client) loads the entries of the plan, as `directory export --format ldif` writes them, into one;
  `mailmerge-gov directory apply` writes the same plan into the other. Target: apply at least as many entries
  per second as ldapadd, counting the whole command (reading the plan and the sources again, checking, backing
  up, logging). Both directories are then compared entry by entry.
- re-apply with nothing to do, and rollback of the apply (its throughput).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' private slapd (tests/ is not a package)

import generate_example as generator  # noqa: E402  (this folder: the example's generator)
from benchtable import Row, megabytes, print_rows, run_child, stopped, verdict, work_folder  # noqa: E402  (this folder)
from servers import SlapdServer, ldif_dn, ldif_entries, require_program, slapd_version  # noqa: E402

from mailmerge_gov.config import load_config  # noqa: E402
from mailmerge_gov.store import open_store  # noqa: E402

EXAMPLE_CONFIG = ROOT / "examples" / "hcm-merger" / "consolidation.toml"
PROJECT_SCHEMA = ROOT / "directory" / "mailmerge-gov.schema"
PLAN_SECONDS = 20.0
PLAN_RUNS = 3
PLAN_BYTES = 1_000_000_000  # 1 GB
APPLY_RATIO = 1.0  # apply entries/s over ldapadd entries/s
# 100,000 officials take some 400 MB in an mdb database with the tests' indexes; maxsize only reserves
# address space, so be generous.
MDB_MAXSIZE = 16 << 30
# The same tuning for both clients, as the tests' Dovecot runs with mail_fsync = never: no fsync per write.
SLAPD_TUNING = ("dbnosync",)

# Child processes. Each imports the package itself, so what it measures is the command alone.
TRACED_PLAN = """\
import json, sys, tracemalloc
tracemalloc.start()  # before the imports: the heap the command needs includes its modules
from mailmerge_gov.cli import cli
try:
    cli.main(["directory", "plan", "-c", sys.argv[1]], standalone_mode=False)
finally:
    with open(sys.argv[2], "w") as out:
        json.dump(tracemalloc.get_traced_memory()[1], out)
"""
APPLY = """\
import sys
import mailmerge_gov.directory.applyplan as applyplan
# The generated plan has blocking review items (suggestions, units to review) that a person resolves before
# applying. The benchmark stands in for that person by not refusing them; everything else the command does
# without --force, re-reading the sources to check that the plan is current included, is timed.
applyplan.check_plan_is_reviewed = lambda plan: None
from mailmerge_gov.cli import cli
cli.main(["directory", "apply", "-c", sys.argv[1]], standalone_mode=False)
"""


def scaled_sources(total: int) -> list[generator.Source]:
    """The example's three sources with `total` officials between them, disabled accounts in proportion."""
    count = len(generator.SOURCES)
    sources = []
    for index, source in enumerate(generator.SOURCES):
        people = total // count + (1 if index < total % count else 0)
        disabled = max(1, round(len(source.disabled) * people / source.people))
        sources.append(dataclasses.replace(source, people=people, mailboxes=0,
                                           disabled=tuple(itertools.islice(itertools.cycle(source.disabled),
                                                                           disabled))))
    return sources


def toml_value(value: Any) -> str:
    """One TOML value: strings, booleans, numbers, dates and lists of them."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, dt.date)):
        return value.isoformat() if isinstance(value, dt.date) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(table: dict[str, Any], name: str = "", header: str = "") -> str:
    """A table as TOML (what tomllib read): its keys, then its sub-tables and arrays of tables, in order."""
    def is_tables(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)

    lines = [header] if header else []
    lines += [f"{key} = {toml_value(value)}" for key, value in table.items()
              if not isinstance(value, dict) and not is_tables(value)]
    text = "\n".join(lines) + "\n" if lines else ""
    for key, value in table.items():
        path = f"{name}.{key}" if name else key
        if isinstance(value, dict):
            text += "\n" + toml_table(value, path, f"[{path}]")
        elif is_tables(value):
            text += "".join("\n" + toml_table(item, path, f"[[{path}]]") for item in value)
    return text


def example_config() -> dict[str, Any]:
    """The example's consolidation file, as tomllib reads it."""
    return tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8"))


def write_config(path: Path, server: SlapdServer, state_file: str) -> Path:
    """Write a consolidation file: the example's, with its directories beside it and the new directory on `server`."""
    data = example_config()
    data["project"]["state_file"] = state_file
    suffix = server.suffixes[0]
    data["target"]["directory"] = {"ldap_url": server.url, "bind_dn": server.admin_dn(suffix),
                                   "password_file": str(server.password_file)}
    data["target"].pop("mail", None)
    for source in data["sources"]:
        source.pop("mail", None)  # mailboxes are not part of this benchmark
    path.write_text("# written by scripts/bench_directory.py from examples/hcm-merger/consolidation.toml\n"
                    + toml_table(data), encoding="utf-8")
    load_config(path)  # refuse now, with the loader's message, rather than in the first child
    return path


def generate(folder: Path, scale: int, seed: int) -> dict[str, dict]:
    """Write the old directories and the unit mapping file of `scale` officials; return the generator's counts."""
    directories = generator.build_directories(seed, scaled_sources(scale))
    for relative, data in directories.files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return directories.counts


def ldapadd(server: SlapdServer, ldif: Path) -> float:
    """Load an LDIF file with the OpenLDAP client, one synchronous add after another; return the seconds."""
    program = require_program("ldapadd", "ldap-utils")
    suffix = server.suffixes[0]
    began = time.perf_counter()
    subprocess.run([program, "-x", "-H", server.url, "-D", server.admin_dn(suffix), "-y", str(server.password_file),
                    "-f", str(ldif)], env=server.client_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   check=True)
    return time.perf_counter() - began


def directory_digest(server: SlapdServer) -> tuple[int, str]:
    """Count and digest the entries of a server's suffix as ldapsearch prints them, sorted (order-free)."""
    program = require_program("ldapsearch", "ldap-utils")
    suffix = server.suffixes[0]
    text = subprocess.run([program, "-x", "-LLL", "-o", "ldif-wrap=no", "-H", server.url, "-D", server.admin_dn(suffix),
                           "-y", str(server.password_file), "-b", suffix], env=server.client_env(),
                          capture_output=True, check=True).stdout
    entries = sorted(block for block in text.split(b"\n\n") if block.strip())
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry + b"\n\n")
    return len(entries), digest.hexdigest()


def export_ldif(config_path: Path, folder: Path, base_dn: str) -> tuple[Path, int]:
    """Write what ldapadd loads (`directory export --format ldif` less the base entry); return it and its size."""
    # export writes exactly what apply writes; the base entry is left out because the server has it already
    exported = folder / "export.ldif"
    run_child([sys.executable, "-m", "mailmerge_gov", "directory", "export", "-c", str(config_path), "--format", "ldif",
               "-o", str(exported)], folder, "export")
    entries = [entry for entry in ldif_entries(exported.read_text(encoding="utf-8"))
               if ldif_dn(entry).lower() != base_dn.lower()]
    path = folder / "ldapadd.ldif"
    path.write_text("\n".join(entries), encoding="utf-8")
    return path, len(entries)


def last_apply(config_path: Path) -> tuple[int, int, float]:
    """The newest apply run: its id, how many changes it made, and the seconds it spent writing."""
    config = load_config(config_path)
    with open_store(config.state_file) as store:
        run = store.apply_runs()[-1]
        changes = len(store.apply_changes(run.id))
    started, finished = (dt.datetime.fromisoformat(value) for value in (run.started_at, run.finished_at))
    return run.id, changes, (finished - started).total_seconds()


def benchmark(folder: Path, scale: int, seed: int) -> list[Row]:
    """Run every step in `folder`; return the table's rows."""
    began = time.perf_counter()
    counts = generate(folder, scale, seed)
    people = sum(c["people"] for c in counts.values())
    print(f"generated {people:,} officials in {time.perf_counter() - began:.1f} s: "
          + ", ".join(f"{name} {c['people']:,} ({c['disabled']:,} disabled)" for name, c in counts.items()),
          flush=True)
    base_dn = example_config()["target"]["base_dn"]
    servers = [SlapdServer([base_dn], schemas=(PROJECT_SCHEMA,), maxsize=MDB_MAXSIZE,
                           database_options=SLAPD_TUNING) for _ in ("apply", "ldapadd")]
    rows: list[Row] = []
    try:
        for server in servers:
            server.start()
        target, other = servers
        config = write_config(folder / "consolidation.toml", target, "state/bench.sqlite")
        python = sys.executable

        plan = run_child([python, "-m", "mailmerge_gov", "directory", "plan", "-c", str(config)], folder, "plan")
        print(plan.output.strip().splitlines()[0], flush=True)
        # A run's time moves by a tenth or more with whatever else the machine does: the same plan, from scratch,
        # PLAN_RUNS times in all, and the median is what is held against the target.
        plans = [plan] + [
            run_child([python, "-m", "mailmerge_gov", "directory", "plan", "-c",
                       str(write_config(folder / f"consolidation-{run}.toml", target, f"state-{run}/bench.sqlite"))],
                      folder, f"plan-{run}")
            for run in range(2, PLAN_RUNS + 1)]
        seconds = statistics.median(p.seconds for p in plans)
        tree_rss = max(p.tree_rss for p in plans)
        # the same plan again, from scratch, into a state file of its own (tracemalloc slows it down 2 to 3 times)
        traced_config = write_config(folder / "consolidation-traced.toml", target, "state-traced/bench.sqlite")
        heap_file = folder / "plan-heap.json"
        traced = run_child([python, "-c", TRACED_PLAN, str(traced_config), str(heap_file)], folder, "plan-traced")
        heap = json.loads(heap_file.read_text())
        rows += [
            Row(f"plan: wall time, median of {len(plans)}", f"{seconds:,.1f} s", target=f"<= {PLAN_SECONDS:.0f} s",
                verdict=verdict(seconds <= PLAN_SECONDS)),
            Row("     each run", ", ".join(f"{p.seconds:,.1f}" for p in plans) + " s"),
            Row("plan: peak RSS of the process tree (sampled sum)", megabytes(tree_rss),
                target=f"<= {megabytes(PLAN_BYTES)}", verdict=verdict(tree_rss <= PLAN_BYTES)),
            Row("     largest single process (wait4)", megabytes(max(p.max_rss for p in plans))),
            Row("plan: peak Python heap, plan process (tracemalloc)", megabytes(heap), target=f"<= {megabytes(PLAN_BYTES)}",
                verdict=verdict(heap <= PLAN_BYTES)),
            Row("     (the tracemalloc run's wall time)", f"{traced.seconds:,.1f} s"),
        ]

        ldif, entries = export_ldif(config, folder, base_dn)
        seconds = ldapadd(other, ldif)
        reference = entries / seconds
        rows.append(Row(f"ldapadd: {entries:,} entries", f"{seconds:,.1f} s", f"{reference:,.0f} entries/s"))
        print(f"ldapadd: {seconds:.1f} s", flush=True)

        apply = run_child([python, "-c", APPLY, str(config)], folder, "apply")
        apply_id, changes, writing = last_apply(config)
        rate = changes / apply.seconds
        rows += [
            Row(f"apply: whole command, {changes:,} entries", f"{apply.seconds:,.1f} s", f"{rate:,.0f} entries/s",
                f">= {APPLY_RATIO:.1f}x ldapadd", verdict(rate >= APPLY_RATIO * reference)
                + f" ({rate / reference:.2f}x)"),
            Row("     of which writing (apply log times)", f"{writing:,.1f} s", f"{changes / writing:,.0f} entries/s"),
            Row("     peak RSS of the apply command", megabytes(apply.max_rss)),
        ]
        print(apply.output.strip().splitlines()[0], flush=True)
        same = directory_digest(target) == directory_digest(other)
        rows.append(Row("apply and ldapadd wrote the same entries", "yes" if same else "NO: the directories differ",
                        verdict="OK" if same else "MISSED"))

        again = run_child([python, "-c", APPLY, str(config)], folder, "reapply")
        _, nothing, _ = last_apply(config)
        rows.append(Row(f"re-apply, {nothing} changes to make", f"{again.seconds:,.1f} s"))

        undo = run_child([python, "-m", "mailmerge_gov", "directory", "rollback", "-c", str(config), str(apply_id)],
                         folder, "rollback")
        left, _ = directory_digest(target)
        rows.append(Row(f"rollback of apply {apply_id}: {changes:,} deletes", f"{undo.seconds:,.1f} s",
                        f"{changes / undo.seconds:,.0f} entries/s"))
        rows.append(Row("entries left after the rollback", f"{left} (the base entry)" if left == 1 else str(left),
                        verdict="OK" if left == 1 else "MISSED"))
    finally:
        for server in servers:
            server.stop()
    return rows


def print_table(rows: list[Row], scale: int) -> None:
    """Print the figures side by side."""
    version = slapd_version()
    print(f"\nmailmerge-gov directory benchmark: {scale:,} officials, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {version}, slapd.conf tuning: {', '.join(SLAPD_TUNING)}")
    print_rows(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=100_000, help="officials in all (default 100,000)")
    parser.add_argument("--seed", type=int, default=generator.DEFAULT_SEED)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if args.scale < 300:
        parser.error("--scale: at least 300 (the example's own size)")
    with work_folder("mmg-bench-", args.keep) as folder:
        try:
            rows = benchmark(folder, args.scale, args.seed)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            return stopped(exc)
    print_table(rows, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
