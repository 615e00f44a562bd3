"""The SQLite state store: schema versions, and the append-only audit log."""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import orjson

from mailmerge_gov.directory.model import Issue, SourceRecord

# Only this module speaks SQL. Statements stay portable (no SQLite-only syntax in the data
# statements) so that a PostgreSQL store can be added as a second backend behind the same
# functions; the SQLite-only parts (PRAGMAs, triggers, the backup API) are marked as such.


class StoreError(Exception):
    """The state file cannot be opened or used; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    """One step of the schema: applied once, in order, inside a transaction."""

    version: int
    name: str
    apply: Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log: when, who, what, on what, before and after."""

    id: int
    at: str
    actor: str
    action: str
    subject: str
    before: Any
    after: Any


@dataclass(frozen=True)
class StoreStatus:
    """What a state file is, found without changing it."""

    path: Path
    exists: bool
    version: int
    latest: int

    @property
    def needs_upgrade(self) -> bool:
        """True when opening the file will apply migrations."""
        return self.exists and self.version < self.latest

    @property
    def too_new(self) -> bool:
        """True when the file was written by a newer mailmerge-gov."""
        return self.version > self.latest


def _create_audit_log(db: sqlite3.Connection) -> None:
    """Version 1: the audit log, append-only."""
    db.execute(
        "CREATE TABLE audit_log ("
        " id INTEGER PRIMARY KEY,"
        " at TEXT NOT NULL,"
        " actor TEXT NOT NULL,"
        " action TEXT NOT NULL,"
        " subject TEXT NOT NULL,"
        " before_json TEXT,"
        " after_json TEXT)"
    )
    # SQLite-only: triggers make the log append-only even for code that forgets the rule.
    for verb in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
        )


def _create_directory_plan(db: sqlite3.Connection) -> None:
    """Version 2: records read, identities, decisions, addresses, plans and sign-offs."""
    statements = [
        "CREATE TABLE source_snapshots (source TEXT PRIMARY KEY, digest TEXT NOT NULL,"
        " records INTEGER NOT NULL, read_at TEXT NOT NULL)",
        # Every record read, as-is (JSON of the SourceRecord), marked with its source and DN.
        "CREATE TABLE source_records (source TEXT NOT NULL, dn TEXT NOT NULL, kind TEXT NOT NULL,"
        " data_json TEXT NOT NULL, PRIMARY KEY (source, dn))",
        "CREATE TABLE identities (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL)",
        "CREATE TABLE identity_records (record_ref TEXT PRIMARY KEY,"
        " identity_id INTEGER NOT NULL REFERENCES identities(id))",
        # A person's answer to "are these two records the same official?"; pair = sorted refs.
        "CREATE TABLE decisions (pair TEXT PRIMARY KEY, ref_a TEXT NOT NULL, ref_b TEXT NOT NULL,"
        " decision TEXT NOT NULL CHECK (decision IN ('same', 'different')),"
        " actor TEXT NOT NULL, decided_at TEXT NOT NULL)",
        # Every address ever given out: official ones (planned, then applied) and old ones kept
        # as aliases. The primary key is what makes an address impossible to hand out twice.
        "CREATE TABLE addresses (address TEXT PRIMARY KEY, identity_id INTEGER NOT NULL,"
        " role TEXT NOT NULL CHECK (role IN ('official', 'alias')),"
        " state TEXT NOT NULL CHECK (state IN ('planned', 'applied', 'retired')),"
        " source TEXT, valid_until TEXT, assigned_at TEXT NOT NULL)",
        "CREATE TABLE plans (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, actor TEXT NOT NULL,"
        " sources_digest TEXT NOT NULL, summary_json TEXT NOT NULL)",
        "CREATE TABLE plan_people (plan_id INTEGER NOT NULL REFERENCES plans(id),"
        " identity_id INTEGER NOT NULL, data_json TEXT NOT NULL, PRIMARY KEY (plan_id, identity_id))",
        # What a person must look at before apply: suggestions, units needing review, …
        "CREATE TABLE plan_issues (plan_id INTEGER NOT NULL REFERENCES plans(id), seq INTEGER NOT NULL,"
        " kind TEXT NOT NULL, subject TEXT NOT NULL, blocking INTEGER NOT NULL, detail_json TEXT NOT NULL,"
        " PRIMARY KEY (plan_id, seq))",
        "CREATE TABLE signoffs (subject TEXT PRIMARY KEY, actor TEXT NOT NULL, signed_at TEXT NOT NULL,"
        " note TEXT)",
    ]
    for statement in statements:
        db.execute(statement)


def _create_apply_log(db: sqlite3.Connection) -> None:
    """Version 3: the directory apply log: every apply run and every change it made or meant to make."""
    statements = [
        # pid and host tell a run that is still going from one whose process was killed.
        "CREATE TABLE directory_applies (id INTEGER PRIMARY KEY, plan_id INTEGER NOT NULL,"
        " target TEXT NOT NULL, base_dn TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT,"
        " status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed', 'rolled-back')),"
        " backup TEXT, actor TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL, error TEXT)",
        # A change is written here (intended) before it is sent and marked done after the server said
        # yes, so after a crash: done = written, intended = maybe written, refused = not written.
        "CREATE TABLE directory_apply_changes (apply_id INTEGER NOT NULL REFERENCES directory_applies(id),"
        " seq INTEGER NOT NULL, op TEXT NOT NULL CHECK (op IN ('add', 'modify', 'disable')),"
        " dn TEXT NOT NULL, before_json TEXT NOT NULL, after_json TEXT NOT NULL,"
        " state TEXT NOT NULL CHECK (state IN ('intended', 'done', 'refused', 'undone')),"
        " PRIMARY KEY (apply_id, seq))",
    ]
    for statement in statements:
        db.execute(statement)


def _create_identity_keys(db: sqlite3.Connection) -> None:
    """Version 4: the keys (IDs, addresses) each identity was known by, so it survives a moved DN."""
    db.execute("CREATE TABLE identity_keys (key TEXT PRIMARY KEY, identity_id INTEGER NOT NULL)")


def _add_record_lines(db: sqlite3.Connection) -> None:
    """Version 5: a record's line in a column of its own, so that its JSON is the digested canonical form."""
    db.execute("ALTER TABLE source_records ADD COLUMN line INTEGER")


def _create_mailbox_migration(db: sqlite3.Connection) -> None:
    """Version 6: mailbox migration: per-folder checkpoints, per-message evidence, per-mailbox results."""
    statements = [
        # A mailbox job is (source, source mailbox) -> target mailbox; its folders resume from here.
        "CREATE TABLE mailbox_folders (source TEXT NOT NULL, mailbox TEXT NOT NULL, folder TEXT NOT NULL,"
        " target_mailbox TEXT NOT NULL, target_folder TEXT NOT NULL, uidvalidity INTEGER NOT NULL,"
        " last_uid INTEGER NOT NULL, highestmodseq INTEGER, updated_at TEXT NOT NULL,"
        " PRIMARY KEY (source, mailbox, folder))",
        # One row per source message: 'appending' is written before the append and becomes 'copied'
        # (with the target's key) after it, so that a run killed in between can tell what landed.
        "CREATE TABLE mailbox_messages (source TEXT NOT NULL, mailbox TEXT NOT NULL, folder TEXT NOT NULL,"
        " uidvalidity INTEGER NOT NULL, source_key TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,"
        " internal_date TEXT NOT NULL, flags TEXT NOT NULL, target_mailbox TEXT NOT NULL,"
        " target_folder TEXT NOT NULL, target_key TEXT, state TEXT NOT NULL, reason TEXT,"
        " target_uidnext INTEGER, recorded_at TEXT NOT NULL,"
        " PRIMARY KEY (source, mailbox, folder, uidvalidity, source_key))",
        "CREATE TABLE mailbox_results (source TEXT NOT NULL, mailbox TEXT NOT NULL, target_mailbox TEXT NOT NULL,"
        " status TEXT NOT NULL, error TEXT, messages INTEGER NOT NULL, bytes INTEGER NOT NULL,"
        " skipped INTEGER NOT NULL, seconds REAL NOT NULL, finished_at TEXT NOT NULL,"
        " PRIMARY KEY (source, mailbox))",
    ]
    for statement in statements:
        db.execute(statement)


def _add_mailbox_sync_states(db: sqlite3.Connection) -> None:
    """Version 7: a folder's server-side sync state (EWS SyncFolderItems), where its next delta pass starts."""
    db.execute("ALTER TABLE mailbox_folders ADD COLUMN sync_state TEXT")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "audit log", _create_audit_log),
    Migration(2, "directory plan", _create_directory_plan),
    Migration(3, "directory apply log", _create_apply_log),
    Migration(4, "identity keys", _create_identity_keys),
    Migration(5, "record lines", _add_record_lines),
    Migration(6, "mailbox migration", _create_mailbox_migration),
    Migration(7, "mailbox sync states", _add_mailbox_sync_states),
)


def _read_version(db: sqlite3.Connection) -> int:
    """Return the schema version recorded in an open database (0 for a new one)."""
    has_table = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not has_table:
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def inspect_store(path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> StoreStatus:
    """Report a state file's schema version without creating or changing it."""
    latest = migrations[-1].version
    if not path.exists():
        return StoreStatus(path=path, exists=False, version=0, latest=latest)
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            version = _read_version(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a mailmerge-gov state file ({exc})") from exc
    return StoreStatus(path=path, exists=True, version=version, latest=latest)


class Store:
    """An open state file: migrated to the current schema, with the audit log."""

    def __init__(self, db: sqlite3.Connection, path: Path, version: int) -> None:
        self.db = db
        self.path = path
        self.version = version
        # identity ids handed out by new_identity whose rows are not written yet: (id, created_at)
        self._pending_identities: list[tuple[int, str]] = []

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (after writing the identities new_identity handed out, if any are left)."""
        try:
            if self._pending_identities:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    self._write_pending_identities()
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
        finally:
            self.db.close()

    def audit(self, action: str, subject: str, before: Any = None, after: Any = None,
              actor: str | None = None) -> int:
        """Append one entry to the audit log and return its id."""
        at = _now()
        cursor = self.db.execute(
            "INSERT INTO audit_log (at, actor, action, subject, before_json, after_json)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (at, actor or current_actor(), action, subject, _to_json(before), _to_json(after)),
        )
        return int(cursor.lastrowid)

    def audit_log(self, subject: str | None = None) -> Iterator[AuditEntry]:
        """Yield the audit log oldest first, optionally for one subject."""
        sql = "SELECT id, at, actor, action, subject, before_json, after_json FROM audit_log"
        args: tuple[str, ...] = ()
        if subject is not None:
            sql += " WHERE subject = ?"
            args = (subject,)
        for row in self.db.execute(sql + " ORDER BY id", args):
            yield AuditEntry(row[0], row[1], row[2], row[3], row[4], _from_json(row[5]), _from_json(row[6]))


    # --- directory: records read ---------------------------------------------------------------

    def save_source_records(self, source: str, rows: Iterable[tuple[str, str, int | None, str]],
                            digest: Callable[[], str]) -> None:
        """Replace what is stored of one source with a new read of it: (dn, kind, line, record JSON) rows.

        `digest` is asked once every row is written: the rows may be digested as they are taken.
        """
        now = _now()
        count = 0

        def counted() -> Iterator[tuple[str, str, str, int | None, str]]:
            nonlocal count
            for dn, kind, line, text in rows:
                count += 1
                yield source, dn, kind, line, text

        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM source_records WHERE source = ?", (source,))
            self.db.executemany(  # a generator: one record's JSON at a time in memory, not 100,000 of them
                "INSERT INTO source_records (source, dn, kind, line, data_json) VALUES (?, ?, ?, ?, ?)", counted())
            self.db.execute("DELETE FROM source_snapshots WHERE source = ?", (source,))
            self.db.execute(
                "INSERT INTO source_snapshots (source, digest, records, read_at) VALUES (?, ?, ?, ?)",
                (source, digest(), count, now),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def source_digests(self) -> dict[str, str]:
        """Return the digest of the last read of each source."""
        return dict(self.db.execute("SELECT source, digest FROM source_snapshots ORDER BY source"))

    def source_records(self, source: str | None = None) -> list[SourceRecord]:
        """Return the stored records, of one source or of all, in source then DN order."""
        sql = "SELECT data_json, line FROM source_records"
        args: tuple[str, ...] = ()
        if source is not None:
            sql += " WHERE source = ?"
            args = (source,)
        return [_record_from_json(text, line) for text, line in self.db.execute(sql + " ORDER BY source, dn", args)]

    # --- directory: identities and decisions ---------------------------------------------------

    def identity_links(self) -> dict[str, int]:
        """Return every record ref linked to an identity, with the identity's id."""
        return dict(self.db.execute("SELECT record_ref, identity_id FROM identity_records"))

    def identity_keys(self) -> dict[str, int]:
        """Return every key (citizen ID, employee number, address) an identity was known by."""
        return dict(self.db.execute("SELECT key, identity_id FROM identity_keys"))

    def save_identity_keys(self, keys: dict[str, int]) -> None:
        """Remember keys of identities; a key already known keeps its first identity."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT INTO identity_keys (key, identity_id) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                                sorted(keys.items()))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def link_records(self, links: dict[str, int | None]) -> dict[str, int]:
        """Link record refs to identities; None creates a new identity per distinct group key.

        Returns the final ref → identity id map for the refs given.
        """
        result: dict[str, int] = {}
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._write_pending_identities()
            for ref, identity in links.items():
                if identity is None:
                    identity = int(self.db.execute("INSERT INTO identities (created_at) VALUES (?)",
                                                   (_now(),)).lastrowid)
                result[ref] = identity
            # one executemany, not an execute per record (100,000 of them in a large plan)
            self.db.executemany(
                "INSERT INTO identity_records (record_ref, identity_id) VALUES (?, ?) "
                "ON CONFLICT (record_ref) DO UPDATE SET identity_id = excluded.identity_id",
                result.items(),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return result

    def new_identity(self) -> int:
        """Create an identity and return its id; its row is written by the next link_records (or close)."""
        # One INSERT, and so one commit (a WAL fsync), per identity took 20 s of a 100,000-official plan. The
        # ids are handed out here, as SQLite would (the highest id + 1), and their rows written in the same
        # transaction as the links to them: a crash in between leaves no identity without records behind,
        # and the next run hands the same ids out again.
        if self._pending_identities:
            identity = self._pending_identities[-1][0] + 1
        else:
            identity = (self.db.execute("SELECT MAX(id) FROM identities").fetchone()[0] or 0) + 1
        self._pending_identities.append((identity, _now()))
        return identity

    def _write_pending_identities(self) -> None:
        """Write the identities new_identity handed out, inside the caller's transaction."""
        if not self._pending_identities:
            return
        highest = self.db.execute("SELECT MAX(id) FROM identities").fetchone()[0] or 0
        if highest >= self._pending_identities[0][0]:
            self._pending_identities = []  # those ids are someone else's now: nothing of them may be written
            raise StoreError(f"{self.path}: another process created identities while this one was planning; "
                             "run the plan again")
        self.db.executemany("INSERT INTO identities (id, created_at) VALUES (?, ?)", self._pending_identities)
        self._pending_identities = []

    def decide(self, ref_a: str, ref_b: str, decision: str, actor: str | None = None) -> None:
        """Record (or change) a person's decision that two records are the same official or not."""
        first, second = sorted((ref_a, ref_b))
        before = self.decisions().get((first, second))
        self.db.execute(
            "INSERT INTO decisions (pair, ref_a, ref_b, decision, actor, decided_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (pair) DO UPDATE SET decision = excluded.decision, actor = excluded.actor, "
            "decided_at = excluded.decided_at",
            (f"{first}\n{second}", first, second, decision, actor or current_actor(), _now()),
        )
        self.audit("decide-identity", f"{first} | {second}", before=before, after=decision, actor=actor)

    def decisions(self) -> dict[tuple[str, str], str]:
        """Return every decision, keyed by the sorted pair of record refs."""
        return {(a, b): d for a, b, d in self.db.execute("SELECT ref_a, ref_b, decision FROM decisions")}

    # --- directory: addresses -----------------------------------------------------------------

    def addresses(self) -> list[AddressRow]:
        """Return every address ever given out or kept, in address order."""
        rows = self.db.execute(
            "SELECT address, identity_id, role, state, source, valid_until FROM addresses ORDER BY address")
        return [AddressRow(*row) for row in rows]

    def save_addresses(self, rows: Sequence[AddressRow]) -> None:
        """Insert new address rows and update planned ones; applied and retired rows never change owner."""
        # The rows are sorted out in memory against one read of the table, then written with two executemany:
        # a SELECT and an INSERT per address was 400,000 statements for a 100,000-official plan. The outcome
        # is that of taking the rows one by one (a later row for the same address updates the earlier one).
        inserts: dict[str, tuple[Any, ...]] = {}
        updates: dict[str, tuple[Any, ...]] = {}
        now = _now()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            existing = {address: (identity, state) for address, identity, state in
                        self.db.execute("SELECT address, identity_id, state FROM addresses")}
            for row in rows:
                have = existing.get(row.address)
                if have is None:
                    inserts[row.address] = (row.address, row.identity_id, row.role, row.state, row.source,
                                            row.valid_until, now)
                elif have[1] == "planned":
                    if row.address in inserts:  # inserted by an earlier row of this call
                        inserts[row.address] = (row.address, row.identity_id, row.role, row.state, row.source,
                                                row.valid_until, now)
                    else:
                        updates[row.address] = (row.identity_id, row.role, row.state, row.source, row.valid_until,
                                                row.address)
                elif have[0] != row.identity_id:
                    raise StoreError(f"address {row.address} is {have[1]} for identity {have[0]} "
                                     f"and cannot be given to identity {row.identity_id}")
                else:
                    continue
                existing[row.address] = (row.identity_id, row.state)
            self.db.executemany(
                "INSERT INTO addresses (address, identity_id, role, state, source, valid_until, assigned_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", list(inserts.values()))
            self.db.executemany(
                "UPDATE addresses SET identity_id = ?, role = ?, state = ?, source = ?, valid_until = ?"
                " WHERE address = ?", list(updates.values()))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def drop_planned_addresses(self, keep: set[str]) -> None:
        """Forget planned (never applied) addresses a new plan no longer uses."""
        # one transaction: in autocommit mode every DELETE of executemany would be a commit of its own
        self.db.execute("BEGIN IMMEDIATE")
        try:
            planned = [row[0] for row in self.db.execute("SELECT address FROM addresses WHERE state = 'planned'")]
            self.db.executemany("DELETE FROM addresses WHERE address = ? AND state = 'planned'",
                                [(address,) for address in planned if address not in keep])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def mark_addresses_applied(self, identity_ids: Sequence[int]) -> None:
        """Make the planned addresses of these identities permanent (after a successful apply)."""
        # By address (the primary key) in one transaction: by identity_id, which has no index, each UPDATE read
        # the whole table, and each was a commit of its own (40 s for 20,000 officials, growing as the square).
        wanted = set(identity_ids)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = [(address,) for address, identity in
                    self.db.execute("SELECT address, identity_id FROM addresses WHERE state = 'planned'")
                    if identity in wanted]
            self.db.executemany("UPDATE addresses SET state = 'applied' WHERE address = ? AND state = 'planned'", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # --- directory: plans and sign-offs ---------------------------------------------------------

    def save_plan(self, sources_digest: str, summary: dict[str, Any], people: Sequence[tuple[int, dict[str, Any]]],
                  issues: Sequence[tuple[str, str, bool, dict[str, Any]]], actor: str | None = None) -> int:
        """Store a new plan (people by identity, issues to review) and return its id."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            plan_id = int(self.db.execute(
                "INSERT INTO plans (created_at, actor, sources_digest, summary_json) VALUES (?, ?, ?, ?)",
                (_now(), actor or current_actor(), sources_digest, _to_json(summary))).lastrowid)
            # generators: the JSON of one row at a time in memory (the people of a 100,000-official plan are 150 MB
            # of JSON)
            self.db.executemany(
                "INSERT INTO plan_people (plan_id, identity_id, data_json) VALUES (?, ?, ?)",
                ((plan_id, identity, _to_json(data)) for identity, data in people))
            self.db.executemany(
                "INSERT INTO plan_issues (plan_id, seq, kind, subject, blocking, detail_json) VALUES (?, ?, ?, ?, ?, ?)",
                ((plan_id, seq, kind, subject, int(blocking), _to_json(detail))
                 for seq, (kind, subject, blocking, detail) in enumerate(issues, start=1)))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return plan_id

    def latest_plan(self) -> PlanRow | None:
        """Return the newest plan, or None when nothing was planned yet."""
        row = self.db.execute("SELECT MAX(id) FROM plans").fetchone()
        return None if row[0] is None else self.plan(row[0])

    def plan(self, plan_id: int) -> PlanRow | None:
        """Return one plan's header, or None if there is no such plan."""
        row = self.db.execute(
            "SELECT id, created_at, actor, sources_digest, summary_json FROM plans WHERE id = ?", (plan_id,)).fetchone()
        return None if row is None else PlanRow(row[0], row[1], row[2], row[3], _from_json(row[4]))

    def plan_people(self, plan_id: int) -> list[dict[str, Any]]:
        """Return the people of a plan, by identity id."""
        rows = self.db.execute("SELECT data_json FROM plan_people WHERE plan_id = ? ORDER BY identity_id", (plan_id,))
        return [_from_json(row[0]) for row in rows]

    def plan_issues(self, plan_id: int) -> list[Issue]:
        """Return the review items of a plan in the order they were found."""
        rows = self.db.execute(
            "SELECT kind, subject, blocking, detail_json FROM plan_issues WHERE plan_id = ? ORDER BY seq", (plan_id,))
        return [Issue(kind, subject, bool(blocking), _from_json(detail)) for kind, subject, blocking, detail in rows]

    def sign_off(self, subject: str, note: str | None = None, actor: str | None = None) -> None:
        """Record a person's explicit approval of a subject (e.g. a privileged membership)."""
        who = actor or current_actor()
        self.db.execute(
            "INSERT INTO signoffs (subject, actor, signed_at, note) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (subject) DO UPDATE SET actor = excluded.actor, signed_at = excluded.signed_at, "
            "note = excluded.note", (subject, who, _now(), note))
        self.audit("sign-off", subject, after={"note": note}, actor=who)

    def signoffs(self) -> dict[str, str]:
        """Return every signed-off subject with who signed it."""
        return dict(self.db.execute("SELECT subject, actor FROM signoffs"))

    # --- directory: apply log ---------------------------------------------------------------------

    def start_apply(self, plan_id: int, target: str, base_dn: str, actor: str | None = None) -> int:
        """Record a new apply run (status running) and return its id."""
        cursor = self.db.execute(
            "INSERT INTO directory_applies (plan_id, target, base_dn, started_at, status, actor, pid, host)"
            " VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
            (plan_id, target, base_dn, _now(), actor or current_actor(), os.getpid(), socket.gethostname()))
        return int(cursor.lastrowid)

    def set_apply_backup(self, apply_id: int, backup: Path) -> None:
        """Record where an apply run backed up the entries it touches."""
        self.db.execute("UPDATE directory_applies SET backup = ? WHERE id = ?", (str(backup), apply_id))

    def record_apply_changes(self, apply_id: int, changes: Sequence[tuple[int, str, str, Any, Any]]) -> None:
        """Record (seq, op, dn, before, after) changes as intended, before they are written."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT INTO directory_apply_changes (apply_id, seq, op, dn, before_json, after_json, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'intended')",
                [(apply_id, seq, op, dn, _to_json(before), _to_json(after)) for seq, op, dn, before, after in changes])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def complete_apply_changes(self, apply_id: int, seqs: Sequence[int]) -> None:
        """Mark changes written (done) and put each in the audit log, in one transaction."""
        # Two statements for the whole batch: the audit rows copy the change's DN and JSON straight from the log
        # (the very text audit() would write, without parsing it into Python and back).
        rows = [(apply_id, seq) for seq in seqs]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "UPDATE directory_apply_changes SET state = 'done' WHERE apply_id = ? AND seq = ?", rows)
            at, actor = _now(), current_actor()
            self.db.executemany(
                "INSERT INTO audit_log (at, actor, action, subject, before_json, after_json)"
                " SELECT ?, ?, 'directory-apply', dn, before_json, after_json FROM directory_apply_changes"
                " WHERE apply_id = ? AND seq = ?", [(at, actor, *row) for row in rows])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def refuse_apply_change(self, apply_id: int, seq: int) -> None:
        """Mark a change the server refused: nothing of it was written."""
        self.db.execute("UPDATE directory_apply_changes SET state = 'refused' WHERE apply_id = ? AND seq = ?",
                        (apply_id, seq))

    def forget_apply_changes(self, apply_id: int, seqs: Sequence[int]) -> None:
        """Remove changes recorded as intended that were never sent (the run stopped before them)."""
        self.db.executemany("DELETE FROM directory_apply_changes WHERE apply_id = ? AND seq = ? AND state = 'intended'",
                            [(apply_id, seq) for seq in seqs])

    def undo_apply_changes(self, apply_id: int, undone: Sequence[tuple[int, Any, Any]]) -> None:
        """Mark (seq, before, after) changes undone by a rollback and put each undo in the audit log."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "UPDATE directory_apply_changes SET state = 'undone' WHERE apply_id = ? AND seq = ?",
                [(apply_id, seq) for seq, _, _ in undone])
            at, actor = _now(), current_actor()
            # the audit rows in the order given, each naming the entry by the DN the log has for it
            self.db.executemany(
                "INSERT INTO audit_log (at, actor, action, subject, before_json, after_json)"
                " SELECT ?, ?, 'directory-rollback', dn, ?, ? FROM directory_apply_changes"
                " WHERE apply_id = ? AND seq = ?",
                [(at, actor, _to_json(before), _to_json(after), apply_id, seq) for seq, before, after in undone
                 if before is not None or after is not None])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def finish_apply(self, apply_id: int, status: str, error: str | None = None) -> None:
        """Record how an apply run ended (finished, failed or rolled-back) in the run and the audit log."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.execute("SELECT status FROM directory_applies WHERE id = ?", (apply_id,)).fetchone()[0]
            self.db.execute("UPDATE directory_applies SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                            (status, _now(), error, apply_id))
            action = "directory-rollback" if status == "rolled-back" else "directory-apply"
            self.audit(action, f"apply {apply_id}", {"status": before}, {"status": status, "error": error})
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # --- mailbox migration ---------------------------------------------------------------------

    def folder_checkpoint(self, source: str, mailbox: str, folder: str) -> FolderCheckpoint | None:
        """Return where the copy of a source folder stands, or None before its first copy."""
        row = self.db.execute(
            "SELECT source, mailbox, folder, target_mailbox, target_folder, uidvalidity, last_uid, highestmodseq,"
            " sync_state FROM mailbox_folders WHERE source = ? AND mailbox = ? AND folder = ?",
            (source, mailbox, folder)).fetchone()
        return FolderCheckpoint(*row) if row else None

    def save_checkpoint(self, checkpoint: FolderCheckpoint) -> None:
        """Record where the copy of a source folder stands."""
        c = checkpoint
        with self._transaction():
            self.db.execute(
                "INSERT INTO mailbox_folders (source, mailbox, folder, target_mailbox, target_folder, uidvalidity,"
                " last_uid, highestmodseq, sync_state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source, mailbox, folder) DO UPDATE SET target_mailbox = excluded.target_mailbox,"
                " target_folder = excluded.target_folder, uidvalidity = excluded.uidvalidity,"
                " last_uid = excluded.last_uid, highestmodseq = excluded.highestmodseq,"
                " sync_state = excluded.sync_state, updated_at = excluded.updated_at",
                (c.source, c.mailbox, c.folder, c.target_mailbox, c.target_folder, c.uidvalidity, c.last_uid,
                 c.highestmodseq, c.sync_state, _now()))

    def record_messages(self, rows: Sequence[MessageEvidence]) -> None:
        """Write evidence rows (new or replacing the row of the same source message) in one transaction."""
        now = _now()
        with self._transaction():
            self.db.executemany(
                "INSERT INTO mailbox_messages (source, mailbox, folder, uidvalidity, source_key, sha256, size,"
                " internal_date, flags, target_mailbox, target_folder, target_key, state, reason, target_uidnext,"
                " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source, mailbox, folder, uidvalidity, source_key) DO UPDATE SET"
                " sha256 = excluded.sha256, size = excluded.size, internal_date = excluded.internal_date,"
                " flags = excluded.flags, target_mailbox = excluded.target_mailbox,"
                " target_folder = excluded.target_folder, target_key = excluded.target_key,"
                " state = excluded.state, reason = excluded.reason, target_uidnext = excluded.target_uidnext,"
                " recorded_at = excluded.recorded_at",
                [(r.source, r.mailbox, r.folder, r.uidvalidity, r.source_key, r.sha256, r.size, r.internal_date,
                  " ".join(r.flags), r.target_mailbox, r.target_folder, r.target_key, r.state, r.reason,
                  r.target_uidnext, now) for r in rows])

    def forget_messages(self, keys: Sequence[tuple[str, str, str, int, str]]) -> None:
        """Drop evidence rows (source, mailbox, folder, uidvalidity, source key): appends that never landed."""
        with self._transaction():
            self.db.executemany("DELETE FROM mailbox_messages WHERE source = ? AND mailbox = ? AND folder = ?"
                                " AND uidvalidity = ? AND source_key = ?", keys)

    def claimed_target_keys(self, target_mailbox: str, target_folder: str) -> set[str]:
        """Return the keys of target messages any job's evidence says it copied into this folder."""
        rows = self.db.execute("SELECT target_key FROM mailbox_messages WHERE target_mailbox = ? AND target_folder = ?"
                               " AND state = 'copied' AND target_key IS NOT NULL", (target_mailbox, target_folder))
        return {row[0] for row in rows}

    def message_evidence(self, source: str, mailbox: str, folder: str | None = None,
                         state: str | None = None) -> list[MessageEvidence]:
        """Return the evidence of a mailbox (of one folder, of one state), in folder and key order."""
        sql = ("SELECT source, mailbox, folder, uidvalidity, source_key, sha256, size, internal_date, flags,"
               " target_mailbox, target_folder, target_key, state, reason, target_uidnext FROM mailbox_messages"
               " WHERE source = ? AND mailbox = ?")
        args: list[Any] = [source, mailbox]
        if folder is not None:
            sql += " AND folder = ?"
            args.append(folder)
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        rows = self.db.execute(sql + " ORDER BY folder, uidvalidity, source_key", args)
        return [MessageEvidence(*row[:8], tuple(row[8].split()), *row[9:]) for row in rows]

    def save_mailbox_result(self, result: MailboxResult) -> None:
        """Record the outcome of a mailbox job's run (the last one is kept)."""
        r = result
        with self._transaction():
            self.db.execute(
                "INSERT INTO mailbox_results (source, mailbox, target_mailbox, status, error, messages, bytes,"
                " skipped, seconds, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source, mailbox) DO UPDATE SET target_mailbox = excluded.target_mailbox,"
                " status = excluded.status, error = excluded.error, messages = excluded.messages,"
                " bytes = excluded.bytes, skipped = excluded.skipped, seconds = excluded.seconds,"
                " finished_at = excluded.finished_at",
                (r.source, r.mailbox, r.target_mailbox, r.status, r.error, r.messages, r.bytes, r.skipped,
                 r.seconds, r.finished_at))

    def mailbox_results(self) -> list[MailboxResult]:
        """Return the outcome of every mailbox job's last run, by source and mailbox."""
        rows = self.db.execute("SELECT source, mailbox, target_mailbox, status, error, messages, bytes, skipped,"
                               " seconds, finished_at FROM mailbox_results ORDER BY source, mailbox")
        return [MailboxResult(*row) for row in rows]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed at the end of the block, rolled back on any error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def apply_runs(self) -> list[ApplyRun]:
        """Return every apply run, oldest first."""
        rows = self.db.execute(
            "SELECT id, plan_id, target, base_dn, started_at, finished_at, status, backup, actor, pid, host, error"
            " FROM directory_applies ORDER BY id")
        return [ApplyRun(*row) for row in rows]

    def apply_run(self, apply_id: int) -> ApplyRun | None:
        """Return one apply run, or None when there is none with this id."""
        return next((run for run in self.apply_runs() if run.id == apply_id), None)

    def apply_changes(self, apply_id: int) -> list[ApplyChangeRow]:
        """Return the changes of an apply run in the order they were (to be) written."""
        rows = self.db.execute(
            "SELECT apply_id, seq, op, dn, before_json, after_json, state FROM directory_apply_changes"
            " WHERE apply_id = ? ORDER BY seq", (apply_id,))
        return [ApplyChangeRow(a, seq, op, dn, _attributes(before), _attributes(after), state)
                for a, seq, op, dn, before, after, state in rows]


@dataclass(frozen=True)
class FolderCheckpoint:
    """Where the copy of one source folder stands: resume after last_uid, flags after highestmodseq."""

    source: str
    mailbox: str
    folder: str
    target_mailbox: str
    target_folder: str
    uidvalidity: int
    last_uid: int
    highestmodseq: int | None
    sync_state: str | None = None  # EWS SyncFolderItems state after the last complete pass: the next asks from here


@dataclass(frozen=True)
class MessageEvidence:
    """What was done with one source message: copied (with the target's key), appending, or skipped."""

    source: str
    mailbox: str
    folder: str
    uidvalidity: int
    source_key: str
    sha256: str
    size: int
    internal_date: str
    flags: tuple[str, ...]
    target_mailbox: str
    target_folder: str
    target_key: str | None
    state: str  # "appending", "copied" or "skipped"
    reason: str | None = None  # why a message was skipped
    target_uidnext: int | None = None  # the target folder's UIDNEXT before the append (recovery looks there)


@dataclass(frozen=True)
class MailboxResult:
    """The outcome of one mailbox job's last run."""

    source: str
    mailbox: str
    target_mailbox: str
    status: str  # "ok", "failed"
    error: str | None
    messages: int
    bytes: int
    skipped: int
    seconds: float
    finished_at: str


@dataclass(frozen=True)
class AddressRow:
    """An address and whose it is: official (planned/applied/retired) or an old one kept as alias."""

    address: str
    identity_id: int
    role: str
    state: str
    source: str | None = None
    valid_until: str | None = None


@dataclass(frozen=True)
class ApplyRun:
    """One run of directory apply: where it wrote, how it ended, where its backup is."""

    id: int
    plan_id: int
    target: str
    base_dn: str
    started_at: str
    finished_at: str | None
    status: str  # running, finished, failed or rolled-back
    backup: str | None
    actor: str
    pid: int
    host: str
    error: str | None


@dataclass(frozen=True)
class ApplyChangeRow:
    """One change of an apply run: the attributes it changes, before and after, and how far it got."""

    apply_id: int
    seq: int
    op: str  # add, modify or disable
    dn: str
    before: tuple[tuple[str, tuple[str, ...]], ...]
    after: tuple[tuple[str, tuple[str, ...]], ...]
    state: str  # intended, done, refused or undone


@dataclass(frozen=True)
class PlanRow:
    """A stored plan's header."""

    id: int
    created_at: str
    actor: str
    sources_digest: str
    summary: dict[str, Any]


def _now() -> str:
    """Return the current UTC time as ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _record_from_json(text: str, line: int | None) -> SourceRecord:
    """Rebuild a SourceRecord from its stored JSON and line (lists become tuples again)."""
    data = json.loads(text)
    data.setdefault("line", line)  # before version 5 the line was part of the JSON
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    data["raw"] = tuple((name, tuple(values)) for name, values in data.get("raw", ()))
    return SourceRecord(**data)


def current_actor() -> str:
    """Name the person or service account running this process, for the audit log."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# The store serialises hundreds of thousands of values per plan and apply: orjson does it three times
# faster than the json module. Options keep json.dumps's text of the values stored here (sorted keys,
# str() of what JSON has no type for, dict keys that are not strings written as strings).
_JSON_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
                 | orjson.OPT_PASSTHROUGH_DATACLASS)


def _to_json(value: Any) -> str | None:
    """Serialise a before/after value; None stays NULL."""
    return None if value is None else orjson.dumps(value, default=str, option=_JSON_OPTIONS).decode()


def _from_json(text: str | None) -> Any:
    """Parse a stored before/after value."""
    return None if text is None else json.loads(text)


def _attributes(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Parse stored attributes ([[name, [value, …]], …]) back into tuples."""
    return tuple((name, tuple(values)) for name, values in json.loads(text))


def open_store(path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> Store:
    """Open (creating or upgrading) a state file; refuse one written by a newer version."""
    latest = migrations[-1].version
    status = inspect_store(path, migrations)
    if status.too_new:
        raise StoreError(
            f"{path} has schema version {status.version}, but this mailmerge-gov knows versions up "
            f"to {latest}: it was written by a newer mailmerge-gov; upgrade mailmerge-gov to use it"
        )
    if status.exists and status.version == 0 and _has_foreign_tables(path):
        raise StoreError(f"{path}: not a mailmerge-gov state file (it has tables but no schema version)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if status.needs_upgrade and status.version > 0:
        backup = path.with_name(f"{path.name}.v{status.version}.bak")
        _backup(path, backup)
    # Autocommit mode: every transaction in this module is explicit (BEGIN … COMMIT).
    if not path.exists():
        # The state file holds citizen IDs, dates of birth and every address: readable by its
        # owner only. SQLite gives the -wal and -shm files the database file's permissions.
        path.touch(mode=0o600)
    db = sqlite3.connect(path, isolation_level=None)
    # SQLite-only tuning: WAL lets the web page read while a batch job writes; the busy timeout
    # makes a second process wait for a lock instead of failing at once.
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA foreign_keys = ON")
    try:
        version = _migrate(db, migrations)
    except BaseException:
        db.close()
        raise
    return Store(db, path, version)


def _has_foreign_tables(path: Path) -> bool:
    """True when a file without our version table holds tables of something else."""
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] > 0
    finally:
        db.close()


def _backup(path: Path, backup: Path) -> None:
    """Copy a state file before upgrading it, so a failed or unwanted upgrade can be undone."""
    source = sqlite3.connect(path)
    target = sqlite3.connect(backup)
    try:
        source.backup(target)  # SQLite-only: a consistent copy even with WAL in use
    finally:
        target.close()
        source.close()


def _migrate(db: sqlite3.Connection, migrations: Sequence[Migration]) -> int:
    """Apply the migrations a database lacks, each in its own transaction; return the version."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    version = _read_version(db)
    for migration in migrations:
        if migration.version <= version:
            continue
        # BEGIN IMMEDIATE takes the write lock first: two processes opening an old file at once
        # must not both apply the same step.
        db.execute("BEGIN IMMEDIATE")
        try:
            if _read_version(db) < migration.version:
                migration.apply(db)
                db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, dt.datetime.now(dt.timezone.utc).isoformat()),
                )
            db.execute("COMMIT")
        except BaseException as exc:
            db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"upgrading the state file to schema version {migration.version} "
                                 f"({migration.name}) failed: {exc}") from exc
            raise
        version = migration.version
    return version
