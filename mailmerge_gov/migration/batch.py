"""Run many mailbox jobs: the stores each job opens, several mailboxes at once, capped per server."""

from __future__ import annotations

import csv
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Sequence

from mailmerge_gov.config import Config, MailServer
from mailmerge_gov.migration.folders import FolderRules
from mailmerge_gov.migration.protocol import MailboxError, MailStore
from mailmerge_gov.migration.sync import (MailboxCheck, MailboxJob, MailboxOutcome, Progress, migrate_mailbox,
                                          verify_mailbox)
from mailmerge_gov.store import open_store
from mailmerge_gov.textfile import read_utf8


class JobsError(Exception):
    """The list of mailbox jobs cannot be used; the message names the file and line."""


def read_jobs_csv(path: Path, config: Config) -> list[MailboxJob]:
    """Read jobs from a CSV with the columns source,source_mailbox,target_mailbox (more columns are ignored)."""
    text = read_utf8(path, "mailbox jobs", JobsError)
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0][:3]] != ["source", "source_mailbox", "target_mailbox"]:
        raise JobsError(f"{path}, line 1: the header must start with source,source_mailbox,target_mailbox")
    names = {source.name for source in config.sources}
    jobs = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 3 or not all(cell.strip() for cell in row[:3]):
            raise JobsError(f"{path}, line {number}: three values are needed: source,source_mailbox,target_mailbox")
        source, mailbox, target = (cell.strip() for cell in row[:3])
        if source not in names:
            raise JobsError(f"{path}, line {number}: unknown source '{source}' (the config has {', '.join(sorted(names))})")
        if config.source(source).mail is None:
            raise JobsError(f"{path}, line {number}: source '{source}' has no [sources.mail] in the config")
        jobs.append(MailboxJob(source, mailbox, target))
    return jobs


def store_opener(server: MailServer, mailbox: str, create: bool = False) -> Callable[[], MailStore]:
    """Return a function that opens one mailbox of a mail server (a new connection each call)."""
    if server.kind == "imap":
        from mailmerge_gov.migration.imap import open_imap  # imports imapclient only when a job needs it
        return lambda: open_imap(server, mailbox)
    if server.kind == "ews":
        from mailmerge_gov.migration.ews import open_ews  # imports exchangelib only when a job needs it
        return lambda: open_ews(server, mailbox)  # an Exchange mailbox must exist: it is never created here
    if server.kind == "maildir" and server.path is not None:
        from mailmerge_gov.migration.maildir import open_maildir
        path = server.path
        return lambda: open_maildir(path, mailbox, create=create)
    if server.kind == "mbox" and server.path is not None:
        from mailmerge_gov.migration.mbox import open_mbox
        path = server.path / mailbox
        return lambda: open_mbox(path)
    raise MailboxError(f"mail stores of kind '{server.kind}' cannot be migrated yet")


def folder_rules(config: Config, source: str) -> FolderRules:
    """The folder rules of the config for a job of one source (its subtree included)."""
    policy = config.migration
    mail = config.source(source).mail
    return FolderRules(renames=policy.rename, include=policy.include, exclude=policy.exclude,
                       prefix=mail.subtree if mail is not None else None)


def exports_folder(config: Config, job: MailboxJob) -> Path:
    """Where a job's calendar, contact and task folders are exported: beside the reports, per source and mailbox."""
    return config.reports_folder / "exports" / job.source / job.mailbox


def _server_key(server: MailServer) -> str:
    """Name a server for its connection cap: its URL, or the folder of a Maildir/mbox."""
    return server.url or str(server.path)


def run_jobs(config: Config, jobs: Sequence[MailboxJob], workers: int | None = None, dry_run: bool = False,
             progress: Progress | None = None, done: Callable[[MailboxOutcome], None] | None = None,
             ) -> list[MailboxOutcome]:
    """Migrate mailboxes, several at once, never more connections to a server than it allows."""
    if config.target.mail is None:
        raise MailboxError(f"{config.path}: [target.mail] is not set: there is nowhere to copy mailboxes to")
    target = config.target.mail
    caps: dict[str, threading.Semaphore] = {}
    limits: dict[str, int] = {}
    gate = threading.Lock()  # one job takes all its connection slots at a time: no two wait on each other
    # Jobs that write into one new mailbox (an official with two old ones) run one after the other: the
    # recovery of an interrupted batch matches messages by content, and must not meet another job's batch.
    targets = {job.target_mailbox.lower(): threading.Lock() for job in jobs}
    for server in [target] + [s.mail for s in config.sources if s.mail is not None]:
        caps.setdefault(_server_key(server), threading.Semaphore(server.max_connections))
        limits.setdefault(_server_key(server), server.max_connections)

    def run(job: MailboxJob) -> MailboxOutcome:
        source = config.source(job.source).mail
        assert source is not None
        # a state-store connection of the job's own: SQLite connections stay in the thread that opened them
        keys = list(dict.fromkeys((_server_key(source), _server_key(target))))
        # each connection pair takes a slot on both servers; never more than a server allows
        connections = max(1, min([config.migration.connections] + [limits[key] for key in keys]))
        with ExitStack() as held, targets[job.target_mailbox.lower()], open_store(config.state_file) as store:
            with gate:
                for key in keys:
                    for _ in range(connections):
                        held.enter_context(caps[key])
            outcome = migrate_mailbox(job, store_opener(source, job.mailbox),
                                      store_opener(target, job.target_mailbox, create=not dry_run), store,
                                      folder_rules(config, job.source), dry_run=dry_run, progress=progress,
                                      connections=connections,
                                      export_to=None if dry_run else exports_folder(config, job))
        if done is not None:
            done(outcome)
        return outcome

    count = max(1, min(workers or config.migration.jobs, len(jobs) or 1))
    with ThreadPoolExecutor(count, thread_name_prefix="mailbox") as pool:
        return list(pool.map(run, jobs))


def verify_jobs(config: Config, jobs: Sequence[MailboxJob],
                done: Callable[[MailboxCheck], None] | None = None) -> list[MailboxCheck]:
    """Verify mailboxes one after the other: every source message is in the target or deliberately skipped."""
    if config.target.mail is None:
        raise MailboxError(f"{config.path}: [target.mail] is not set: there is nothing to verify against")
    checks = []
    with open_store(config.state_file) as store:
        for job in jobs:
            source = config.source(job.source).mail
            assert source is not None
            check = verify_mailbox(job, store_opener(source, job.mailbox),
                                   store_opener(config.target.mail, job.target_mailbox), store,
                                   folder_rules(config, job.source))
            if done is not None:
                done(check)
            checks.append(check)
    return checks
