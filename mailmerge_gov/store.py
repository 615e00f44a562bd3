"""The SQLite state store: schema versions, and the append-only audit log."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "audit log", _create_audit_log),
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

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def audit(self, action: str, subject: str, before: Any = None, after: Any = None,
              actor: str | None = None) -> int:
        """Append one entry to the audit log and return its id."""
        at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
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


def current_actor() -> str:
    """Name the person or service account running this process, for the audit log."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _to_json(value: Any) -> str | None:
    """Serialise a before/after value; None stays NULL."""
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _from_json(text: str | None) -> Any:
    """Parse a stored before/after value."""
    return None if text is None else json.loads(text)


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
