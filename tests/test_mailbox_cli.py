"""The mailbox commands on the example's Maildirs: migrate, a second pass, dry run, verify, kill -9 and resume."""

import collections
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailmerge_gov.cli import cli


def run(*args: str) -> tuple[int, str]:
    """Run the CLI in-process and return its exit code and standard output."""
    result = CliRunner().invoke(cli, list(args), prog_name="mailmerge-gov", catch_exceptions=False)
    return result.exit_code, result.stdout


@pytest.fixture
def planned(example_copy: Path) -> str:
    """The example copy with its plan made: the mailbox jobs come from it."""
    config = str(example_copy / "consolidation.toml")
    assert run("directory", "plan", "-c", config)[0] == 0
    return config


def maildir_hashes(root: Path) -> collections.Counter:
    """The multiset of SHA-256 of every message file under a Maildir root (all mailboxes, all folders)."""
    return collections.Counter(hashlib.sha256(path.read_bytes()).hexdigest()
                               for path in root.rglob("*") if path.is_file() and path.parent.name in ("cur", "new"))


def source_hashes(example_copy: Path, planned: str) -> collections.Counter:
    """The multiset of the messages of every mailbox job's source."""
    code, jobs = run("mailbox", "jobs", "-c", planned)
    total: collections.Counter = collections.Counter()
    for line in jobs.splitlines()[1:]:
        source, mailbox = line.split(",")[:2]
        total += maildir_hashes(example_copy / "sources" / source / "mail" / mailbox)
    return total


def test_migrate_verify_and_a_second_pass(planned: str, example_copy: Path) -> None:
    code, output = run("mailbox", "migrate", "-c", planned)
    lines = output.splitlines()
    assert code == 0 and lines[-1] == "28 of 28 mailboxes done"
    assert "hcm:annv@hcm.gov.vn -> annv@hcm.gov.vn: copied 23 messages (30980 bytes)" in lines
    assert maildir_hashes(example_copy / "out" / "mail") == source_hashes(example_copy, planned)
    reports = example_copy / "state" / "reports"
    assert lines[-3:-1] == [f"report: {reports / 'mailbox-migration.html'}",
                            f"        {reports / 'mailbox-migration.json'}"]
    code, output = run("mailbox", "verify", "-c", planned)
    assert (code, output.splitlines()[-1]) == (0, "verified 28 mailboxes: nothing missing")
    assert "hcm:annv@hcm.gov.vn -> annv@hcm.gov.vn: 23 of 23 messages found" in output.splitlines()
    code, output = run("mailbox", "migrate", "-c", planned)
    assert code == 0 and all(" copied 0 messages (0 bytes)" in line for line in output.splitlines()[:28])


def test_dry_run_lists_folders_and_writes_nothing(planned: str, example_copy: Path) -> None:
    code, output = run("mailbox", "migrate", "-c", planned, "--dry-run", "--only", "annv@hcm.gov.vn")
    assert (code, output) == (0, (
        "hcm:annv@hcm.gov.vn -> annv@hcm.gov.vn: would copy 23 messages (30980 bytes)\n"
        "    INBOX -> INBOX: 5 messages\n"
        "    Drafts -> Drafts: 1 messages\n"
        "    Thư đã gửi -> Sent: 1 messages\n"
        "    Trash -> Trash: 3 messages\n"
        "    Văn bản đi -> Văn bản đi: 3 messages\n"
        "    Văn bản đến -> Văn bản đến: 3 messages\n"
        "    Văn bản đến/2024 -> Văn bản đến/2024: 2 messages\n"
        "    Văn bản đến/2025 -> Văn bản đến/2025: 5 messages\n"
        "1 of 1 mailboxes done\n"))
    assert not (example_copy / "out").exists()
    assert not (example_copy / "state" / "reports" / "mailbox-migration.html").exists()


@pytest.mark.parametrize(("rows", "error"), [
    ("source,mailbox,target\n", "line 1: the header must start with source,source_mailbox,target_mailbox"),
    ("source,source_mailbox,target_mailbox\nhcm,annv@hcm.gov.vn\n",
     "line 2: three values are needed: source,source_mailbox,target_mailbox"),
    ("source,source_mailbox,target_mailbox\nhanoi,a@hanoi.gov.vn,a@hcm.gov.vn\n",
     "line 2: unknown source 'hanoi' (the config has baria-vungtau, binhduong, hcm)"),
])
def test_a_bad_jobs_file_is_refused_with_its_line(planned: str, tmp_path: Path, rows: str, error: str) -> None:
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(rows, encoding="utf-8")
    result = CliRunner().invoke(cli, ["mailbox", "migrate", "-c", planned, "--from-csv", str(jobs)])
    assert (result.exit_code, result.stderr) == (1, f"Error: {jobs}, {error}\n")


def test_kill_9_mid_run_then_resume_loses_and_doubles_nothing(planned: str, example_copy: Path) -> None:
    state = example_copy / "state" / "hcm-merger.sqlite"
    command = [sys.executable, "-m", "mailmerge_gov", "mailbox", "migrate", "-c", planned, "--jobs", "2"]
    kills = 0
    for wanted in (40, 300, 700):  # evidence rows written before each kill: early, mid-way, late
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            if _evidence_rows(state) >= wanted:
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        child.wait()
    assert kills >= 2  # at least two runs were cut short mid-way
    code, output = run("mailbox", "migrate", "-c", planned)
    assert code == 0, output
    assert maildir_hashes(example_copy / "out" / "mail") == source_hashes(example_copy, planned)
    code, output = run("mailbox", "verify", "-c", planned)
    assert (code, output.splitlines()[-1]) == (0, "verified 28 mailboxes: nothing missing")


def _evidence_rows(state: Path) -> int:
    """Count the evidence rows a running migration has committed so far (0 before the table exists)."""
    try:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM mailbox_messages").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_verify_repair_makes_the_next_pass_copy_a_lost_message_again(planned: str, example_copy: Path) -> None:
    run("mailbox", "migrate", "-c", planned, "--only", "annv@hcm.gov.vn")
    [lost] = sorted((example_copy / "out" / "mail" / "annv@hcm.gov.vn" / ".Trash" / "cur").iterdir())[:1]
    size = lost.stat().st_size
    lost.unlink()
    code, output = run("mailbox", "verify", "-c", planned, "--only", "annv@hcm.gov.vn", "--repair")
    assert code == 1
    assert output.splitlines()[0] == "hcm:annv@hcm.gov.vn -> annv@hcm.gov.vn: 22 of 23 messages found: MISSING"
    assert output.splitlines()[-1] == "repair: 1 missing messages will be copied again by the next mailbox migrate"
    code, output = run("mailbox", "migrate", "-c", planned, "--only", "annv@hcm.gov.vn")
    assert output.splitlines()[0] == f"hcm:annv@hcm.gov.vn -> annv@hcm.gov.vn: copied 1 messages ({size} bytes)"
    code, output = run("mailbox", "verify", "-c", planned, "--only", "annv@hcm.gov.vn")
    assert (code, output.splitlines()[-1]) == (0, "verified 1 mailboxes: nothing missing")


def test_a_failing_mailbox_does_not_stop_the_others_and_the_exit_code_says_so(planned: str, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("source,source_mailbox,target_mailbox\nhcm,gone@hcm.gov.vn,gone@hcm.gov.vn\n"
                    "hcm,annv@hcm.gov.vn,annv@hcm.gov.vn\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["mailbox", "migrate", "-c", planned, "--from-csv", str(jobs)])
    lines = result.stdout.splitlines()
    assert result.exit_code == 1
    assert lines[0].startswith("hcm:gone@hcm.gov.vn -> gone@hcm.gov.vn: copied 0 messages (0 bytes); FAILED: Maildir ")
    assert lines[0].endswith("gone@hcm.gov.vn does not exist")
    assert lines[1] == "hcm:annv@hcm.gov.vn -> annv@hcm.gov.vn: copied 23 messages (30980 bytes)"
    assert lines[-1] == "1 of 2 mailboxes done; 1 failed (run again to retry them)"
