"""The state store: migrations, upgrade of old files, refusal of newer ones, the audit log."""

import sqlite3
from pathlib import Path

import pytest

from mailmerge_gov.store import MIGRATIONS, Migration, StoreError, StoreStatus, inspect_store, open_store


def _add_notes(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")


def _broken(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE half_done (id INTEGER)")
    db.execute("INSERT INTO no_such_table VALUES (1)")


NEXT = (*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "notes", _add_notes))
LATEST = MIGRATIONS[-1].version


def test_new_file_gets_every_migration(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite"
    assert inspect_store(path) == StoreStatus(path, exists=False, version=0, latest=LATEST)
    with open_store(path) as store:
        assert store.version == LATEST
    status = inspect_store(path)
    assert (status.exists, status.version, status.needs_upgrade, status.too_new) == (True, LATEST, False, False)


def test_reopening_applies_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    open_store(path).close()
    with open_store(path) as store:
        rows = store.db.execute("SELECT version, name FROM schema_migrations").fetchall()
    assert rows == [(m.version, m.name) for m in MIGRATIONS]


def test_older_file_is_upgraded_and_backed_up(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with open_store(path) as store:
        store.audit("test", "before-upgrade", actor="tester")
    assert inspect_store(path, NEXT).needs_upgrade
    with open_store(path, NEXT) as store:
        assert store.version == LATEST + 1
        store.db.execute("INSERT INTO notes (text) VALUES ('ok')")
        assert [e.subject for e in store.audit_log()] == ["before-upgrade"]
    backup = tmp_path / f"state.sqlite.v{LATEST}.bak"
    assert inspect_store(backup).version == LATEST


def test_newer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    open_store(path, NEXT).close()
    with pytest.raises(StoreError) as caught:
        open_store(path)
    assert str(caught.value) == (
        f"{path} has schema version {LATEST + 1}, but this mailmerge-gov knows versions up to {LATEST}: "
        "it was written by a newer mailmerge-gov; upgrade mailmerge-gov to use it"
    )


def test_failed_migration_leaves_the_file_at_its_version(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    open_store(path).close()
    broken = (*MIGRATIONS, Migration(LATEST + 1, "broken", _broken))
    with pytest.raises(StoreError, match=rf"^upgrading the state file to schema version {LATEST + 1} \(broken\) "
                                         "failed: no such table: no_such_table$"):
        open_store(path, broken)
    with open_store(path) as store:
        assert store.version == LATEST
        tables = {row[0] for row in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "half_done" not in tables


@pytest.mark.parametrize("content", [b"not a database at all, just text" * 100, b""])
def test_foreign_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.sqlite"
    if content:
        path.write_bytes(content)
    else:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE customers (id INTEGER)")
        db.close()
    with pytest.raises(StoreError, match="not a mailmerge-gov state file"):
        open_store(path)


def test_audit_log_records_and_is_append_only(tmp_path: Path) -> None:
    with open_store(tmp_path / "state.sqlite") as store:
        first = store.audit("assign-address", "identity:42", before=None,
                            after={"mail": "annv@hcm.gov.vn", "tên": "Nguyễn Văn An"}, actor="quantri")
        store.audit("retire-address", "alias:annv@binhduong.gov.vn", before={"active": True},
                    after={"active": False}, actor="quantri")
        entries = list(store.audit_log())
        assert [(e.id, e.actor, e.action, e.subject, e.before, e.after) for e in entries] == [
            (first, "quantri", "assign-address", "identity:42", None, {"mail": "annv@hcm.gov.vn", "tên": "Nguyễn Văn An"}),
            (first + 1, "quantri", "retire-address", "alias:annv@binhduong.gov.vn", {"active": True}, {"active": False}),
        ]
        assert [e.action for e in store.audit_log(subject="identity:42")] == ["assign-address"]
        assert entries[0].at.endswith("+00:00")
        for statement in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.IntegrityError, match="the audit log is append-only"):
                store.db.execute(statement)
        assert len(list(store.audit_log())) == 2


def test_audit_actor_defaults_to_the_user(tmp_path: Path) -> None:
    import getpass

    with open_store(tmp_path / "state.sqlite") as store:
        store.audit("open", "state")
        assert [e.actor for e in store.audit_log()] == [getpass.getuser()]


def test_a_new_state_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with open_store(path) as store:
        store.audit("open", "state")
        assert oct((tmp_path / "state.sqlite-wal").stat().st_mode & 0o777) == "0o600"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_records_stored_before_version_5_keep_their_line(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    open_store(path, MIGRATIONS[:4]).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO source_records (source, dn, kind, data_json) VALUES ('hcm', 'uid=an', 'person', ?)",
                   ('{"source": "hcm", "dn": "uid=an", "kind": "person", "full_name": "Nguyễn Văn An", "line": 12}',))
    db.close()
    with open_store(path) as store:
        [record] = store.source_records()
    assert (record.dn, record.full_name, record.line) == ("uid=an", "Nguyễn Văn An", 12)
