"""Write the new directory to its target safely: validate, back up, log every change, apply, roll back."""

from __future__ import annotations

import functools
import gc
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mailmerge_gov.config import DirectoryConfig
from mailmerge_gov.directory.ldif import Attributes, format_change, format_entry, read_ldif
from mailmerge_gov.directory.target import (
    ATTRIBUTE_NAME, Change, DnKey, Entry, LdapTarget, LdifTarget, Modification, Schema, TargetError, TargetRefused,
    applied, dn_key, edit_values, is_under, modified, open_target, rdn_values, same_content, write_atomically,
)
from mailmerge_gov.store import ApplyChangeRow, Store

__all__ = [
    "MANAGED_ATTRIBUTES", "ApplyError", "ApplyResult", "Change", "Entry", "ManagedScope", "RollbackError",
    "RollbackResult", "apply_entries", "format_changes", "rollback",
]

Progress = Callable[[int, int], None]  # (changes written so far, changes in all)

HISTORY_CLASS = "mailmergeHistory"
STATUS = "mailmergeAccountStatus"
ROUTING = "mailRoutingAddress"
DISABLED = "disabled"
PERSON_CLASSES = frozenset({"person", "organizationalperson", "inetorgperson"})
MAX_PROBLEMS = 20
# Changes per transaction of the apply log (see _write_ldap); at most this many may be left "intended" by a kill.
BATCH = 500

# The attributes apply owns on its entries (desired entries with objectClass mailmergeHistory: officials and
# units): it sets them to the desired values and removes them when a desired entry has none. Every attribute
# a desired entry carries is owned on that entry as well (on plain entries such as ou=people, only those).
# Anything else (userPassword, uidNumber, what another system set) is never touched. objectClass is special:
# missing classes are added, extra ones (posixAccount from another system …) are left alone.
MANAGED_ATTRIBUTES: tuple[str, ...] = (
    "cn", "sn", "givenName", "mail", "title", "telephoneNumber", "mobile", "ou", "departmentNumber",
    "mailRoutingAddress", "mailLocalAddress",
    "mailmergeIdentity", "mailmergeOldDN", "mailmergeOldUnit", "mailmergeOldUnitCode", "mailmergeSource",
    "mailmergeOldAddress", "mailmergeAccountStatus", "mailmergeUnitCode",
)


class ApplyError(Exception):
    """Apply refused or stopped; the message names the entry and the reason, one problem a line."""


class RollbackError(Exception):
    """Rollback refused or stopped; the message names the apply run or the entry and the reason."""


@dataclass(frozen=True)
class ManagedScope:
    """What apply may change: where it disables entries of its own, and which attributes it owns."""

    subtrees: tuple[str, ...]  # undesired mailmergeHistory entries strictly below these are disabled
    attributes: tuple[str, ...] = MANAGED_ATTRIBUTES

    @classmethod
    def default(cls, base_dn: str) -> ManagedScope:
        """The people and units subtrees of the base, with the default managed attributes."""
        return cls(subtrees=(f"ou=people,{base_dn}", f"ou=units,{base_dn}"))


@dataclass(frozen=True)
class ApplyResult:
    """What an apply did (or, in a dry run, would do): its id in the apply log, its changes, its backup."""

    apply_id: int | None  # None for a dry run
    changes: tuple[Change, ...]
    unmanaged: tuple[str, ...]  # DNs under the base that are neither desired nor ours: left alone
    backup: Path | None  # None: dry run, nothing changed, or an LDIF target that did not exist yet


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback undid (or, in a dry run, would undo)."""

    apply_id: int
    changes: tuple[Change, ...]


def _collector_paused[**P, R](function: Callable[P, R]) -> Callable[P, R]:
    """Run a function with the cyclic garbage collector paused (reference counting still frees memory)."""
    # An apply holds the plan and two copies of the directory, and builds hundreds of thousands of entries and
    # changes, none in a reference cycle. The collector would walk that whole heap again and again while they are
    # made: pausing it took 3 s off applying 100,000 officials and 4 s off applying them again.
    @functools.wraps(function)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return paused


@_collector_paused
def apply_entries(store: Store, target: DirectoryConfig, desired: Sequence[Entry], *, base_dn: str, plan_id: int,
                  managed: ManagedScope | None = None, max_disables: int, dry_run: bool = False, backup_dir: Path,
                  identities: Sequence[int] = (), on_change: Progress | None = None) -> ApplyResult:
    """Bring the target to the desired entries: add, modify owned attributes, disable; never delete."""
    scope = managed or ManagedScope.default(base_dn)
    directory = _open(target, base_dn, ApplyError)
    try:
        current = _read(directory, ApplyError)
        wanted = _validate(desired, base_dn, scope, directory.schema, current)
        changes, unmanaged = _diff(current, wanted, dn_key(base_dn), scope, directory.schema)
        disables = [change.dn for change in changes if change.op == "disable"]
        if len(disables) > max_disables:
            shown = "; ".join(disables[:10]) + ("; …" if len(disables) > 10 else "")
            raise ApplyError(f"apply would disable {len(disables)} entries, more than the limit of {max_disables} "
                             f"(max_disables): {shown}. Check the plan; if it is right, raise the limit.")
        if dry_run:
            return ApplyResult(None, changes, unmanaged, None)
        _close_interrupted_runs(store, ApplyError)
        apply_id = store.start_apply(plan_id, directory.description, base_dn)
        backup = None
        try:
            if changes:
                backup = _back_up(directory, apply_id, current, changes, backup_dir)
            if backup is not None:
                store.set_apply_backup(apply_id, backup)
            if isinstance(directory, LdifTarget):
                _write_file(store, directory, apply_id, current, changes, on_change)
            else:
                _write_ldap(store, directory, apply_id, changes, backup, on_change)
        except ApplyError:
            raise  # the server refused a change: the run is marked failed already
        except BaseException as exc:
            store.finish_apply(apply_id, "failed", error=str(exc) or type(exc).__name__)
            if isinstance(exc, (TargetError, OSError)):
                raise ApplyError(f"apply {apply_id} stopped: {exc}; its log says what may have been written "
                                 "(intended = maybe, done = yes)") from exc
            raise
        store.mark_addresses_applied(identities)
        store.finish_apply(apply_id, "finished")
        return ApplyResult(apply_id, changes, unmanaged, backup)
    finally:
        directory.close()


@_collector_paused
def rollback(store: Store, target: DirectoryConfig, apply_id: int, *, base_dn: str, dry_run: bool = False,
             on_change: Progress | None = None) -> RollbackResult:
    """Put the target back as it was before one apply: delete what it added, restore what it changed."""
    run = store.apply_run(apply_id)
    if run is None:
        raise RollbackError(f"there is no apply {apply_id} in {store.path}")
    if dn_key(run.base_dn) != dn_key(base_dn):
        raise RollbackError(f"apply {apply_id} wrote under {run.base_dn}, not under {base_dn}")
    later = [other.id for other in store.apply_runs()
             if other.id > apply_id and _pending(store.apply_changes(other.id))]
    if later:
        order = ", ".join(str(other) for other in reversed(later))
        raise RollbackError(f"apply {apply_id} cannot be rolled back while later applies are in place: roll back "
                            f"{order} first (newest first)")
    rows = _pending(store.apply_changes(apply_id))
    if run.status == "rolled-back" and not rows:
        return RollbackResult(apply_id, ())  # done before: nothing left to undo
    if not dry_run:
        _close_interrupted_runs(store, RollbackError)
    directory = _open(target, base_dn, RollbackError)
    try:
        current = _read(directory, RollbackError)
        by_key = {dn_key(entry.dn): entry for entry in current}
        undo = [(row.seq, _undo(row, by_key.get(dn_key(row.dn)))) for row in reversed(rows)]
        changes = tuple(change for _, change in undo if change is not None)
        if dry_run:
            return RollbackResult(apply_id, changes)
        if isinstance(directory, LdifTarget):
            if rows:
                _restore_file(directory, run.backup, current, changes)
            store.undo_apply_changes(apply_id, [(seq, *_logged(change)) for seq, change in undo])
            if on_change and changes:
                on_change(len(changes), len(changes))
        else:
            _undo_ldap(store, directory, apply_id, undo, on_change)
        store.finish_apply(apply_id, "rolled-back")
        return RollbackResult(apply_id, changes)
    finally:
        directory.close()


def format_changes(result: ApplyResult | RollbackResult) -> str:
    """Render the changes as LDIF change records: exactly what is (or would be) sent to the server."""
    records = []
    for change in result.changes:
        if change.op == "add":
            records.append(format_change(change.dn, "add", change.after))
        elif change.op == "delete":
            records.append(format_change(change.dn, "delete"))
        else:
            records.append(format_change(change.dn, "modify", modifications=change.modifications))
    return "".join(records)


# ---------------------------------------------------------------------------------------------- validation


def _validate(desired: Sequence[Entry], base_dn: str, scope: ManagedScope, schema: Schema | None,
              current: Sequence[Entry]) -> list[Entry]:
    """Check every desired entry before anything is written; return them with names spelled as the schema does."""
    problems: list[str] = []
    try:
        base = dn_key(base_dn)
    except ValueError as exc:
        raise ApplyError(f"{base_dn}: the base DN does not parse ({exc})") from exc
    for subtree in scope.subtrees:
        if not _parses_under(subtree, base):
            problems.append(f"{subtree}: a managed subtree must be under the base DN {base_dn}")
    existing: set[DnKey] = set()
    for entry in current:
        try:
            key = dn_key(entry.dn)
        except ValueError as exc:
            raise ApplyError(f"{entry.dn}: the target holds a DN that does not parse ({exc})") from exc
        if key in existing:
            problems.append(f"{entry.dn}: the entry appears twice in the target")
        existing.add(key)
    keys: dict[DnKey, str] = {}
    checked: list[Entry] = []
    for entry in desired:
        try:
            key = dn_key(entry.dn)
        except ValueError as exc:
            problems.append(f"{entry.dn}: the DN does not parse ({exc})")
            continue
        if not is_under(key, base):
            problems.append(f"{entry.dn}: not under the base DN {base_dn}")
            continue
        if key in keys:
            problems.append(f"{entry.dn}: the DN appears twice among the desired entries")
            continue
        keys[key] = entry.dn
        entry_problems = _entry_problems(entry, schema)
        problems.extend(entry_problems)
        if not entry_problems:
            checked.append(_spelled(entry, schema))
    for entry in checked:
        key = dn_key(entry.dn)
        if key != base and key not in existing and key[1:] not in existing and key[1:] not in keys:
            problems.append(f"{entry.dn}: its parent neither exists nor is among the desired entries")
    if problems:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"… and {len(problems) - MAX_PROBLEMS} more problems")
        raise ApplyError("\n".join(shown))
    return checked


def _parses_under(dn: str, base: DnKey) -> bool:
    """Tell whether a DN parses and is under the base."""
    try:
        return is_under(dn_key(dn), base)
    except ValueError:
        return False


def _entry_problems(entry: Entry, schema: Schema | None) -> list[str]:
    """Return what is wrong with one desired entry, one message per problem."""
    dn = entry.dn
    problems = []
    seen: set[str] = set()
    for name, values in entry.attributes:
        if not _valid_name(name):
            problems.append(f"{dn}: '{name}' is not a valid attribute name")
            continue
        if name.lower() in seen:
            problems.append(f"{dn}: attribute '{name}' appears twice")
        seen.add(name.lower())
        problems.extend(_value_problems(dn, name, values))
        known = schema.attribute(name) if schema else None
        if schema and known is None:
            ours = name.lower().startswith("mailmerge")
            hint = " (load directory/mailmerge-gov.schema into the server)" if ours else ""
            problems.append(f"{dn}: attribute '{name}' is not known to the server's schema{hint}")
        elif known and known.single_value and len(values) > 1:
            problems.append(f"{dn}: attribute '{name}' is single-valued but has {len(values)} values")
        elif known and known.ia5 and not all(isinstance(value, str) and value.isascii() for value in values):
            problems.append(f"{dn}: attribute '{name}' takes ASCII (IA5) text only")
    classes = entry.get("objectClass")
    if not classes:
        problems.append(f"{dn}: no objectClass")
    for value in classes:
        if schema and schema.object_class(str(value)) is None:
            problems.append(f"{dn}: object class '{value}' is not known to the server's schema")
    if PERSON_CLASSES & {str(value).lower() for value in classes}:
        problems.extend(f"{dn}: a person needs {name}" for name in ("cn", "sn") if not entry.get(name))
    for attribute, value in rdn_values(dn):
        if value.lower() not in {str(v).lower() for v in entry.get(attribute)}:
            problems.append(f"{dn}: the naming value {attribute}={value} is not among the entry's attributes")
    return problems


@functools.lru_cache(maxsize=1024)
def _valid_name(name: str) -> bool:
    """Tell whether a string is an attribute description (asked once per attribute of every entry)."""
    return bool(ATTRIBUTE_NAME.match(name))


def _value_problems(dn: str, name: str, values: tuple[str, ...]) -> list[str]:
    """Check the values of one attribute: text, UTF-8, no NUL, not empty, no value twice."""
    if len(values) == 1:
        # most attributes have one value: the checks below, in one expression (2 million attributes for
        # 100,000 officials)
        value = values[0]
        if isinstance(value, str) and value and value.isascii() and "\x00" not in value:
            return []
    problems = []
    seen: set[str] = set()
    for value in values:
        if not isinstance(value, str):
            problems.append(f"{dn}: attribute '{name}' has a value that is not text: {value!r}")
            continue
        if not value.isascii():  # ASCII is UTF-8: only other text can hold a lone surrogate
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(f"{dn}: attribute '{name}' has a value that is not valid UTF-8: {value!r}")
                continue
        lowered = value.lower()
        if "\x00" in value:
            problems.append(f"{dn}: attribute '{name}' has a value with a NUL character: {value!r}")
        elif value == "":
            problems.append(f"{dn}: attribute '{name}' has an empty value")
        elif lowered in seen:
            # most attributes compare without case: the server would refuse the second one
            problems.append(f"{dn}: attribute '{name}' has the value '{value}' twice")
        seen.add(lowered)
    return problems


def _spelled(entry: Entry, schema: Schema | None) -> Entry:
    """Spell attribute and object class names as the server's schema does, so that comparisons are exact."""
    if schema is None:
        return entry
    attributes = []
    for name, values in entry.attributes:
        spelled = schema.spelling(name)
        if spelled.lower() == "objectclass":
            values = tuple(schema.object_class(value) or value for value in values)
        attributes.append((spelled, values))
    return Entry(entry.dn, tuple(attributes))


# ---------------------------------------------------------------------------------------------- changes


def _diff(current: Sequence[Entry], desired: Sequence[Entry], base: DnKey, scope: ManagedScope,
          schema: Schema | None) -> tuple[tuple[Change, ...], tuple[str, ...]]:
    """Compute the changes (adds parents first, then modifies, then disables) and the unmanaged DNs."""
    by_key = {dn_key(entry.dn): entry for entry in current}
    wanted = {dn_key(entry.dn) for entry in desired}
    owned = tuple(_spell(name, schema) for name in scope.attributes)
    adds: list[tuple[int, Change]] = []
    modifies: list[Change] = []
    for entry in desired:
        key = dn_key(entry.dn)
        existing = by_key.get(key)
        if existing is None:
            present = tuple((name, values) for name, values in entry.attributes if values)
            adds.append((len(key), Change("add", entry.dn, (), present)))
        else:
            modifies.extend(_changed("modify", existing, _modifications(existing, entry, owned)))
    subtrees = [dn_key(subtree) for subtree in scope.subtrees]
    disables: list[Change] = []
    unmanaged: list[str] = []
    for key, entry in sorted(by_key.items(), key=lambda item: item[0][::-1]):  # parents first
        if key in wanted or not is_under(key, base):
            continue
        ours = HISTORY_CLASS.lower() in {value.lower() for value in entry.get("objectClass")}
        if ours and any(is_under(key, subtree, strictly=True) for subtree in subtrees):
            disables.extend(_changed("disable", entry, _disabling(entry, schema)))
        else:
            unmanaged.append(entry.dn)
    # a stable sort by depth: every parent is added before its children, otherwise in the desired order
    ordered = [change for _, change in sorted(adds, key=lambda item: item[0])]
    return tuple(ordered + modifies + disables), tuple(unmanaged)


def _spell(name: str, schema: Schema | None) -> str:
    """Spell one attribute name as the schema does (as given when there is no schema)."""
    known = schema.attribute(name) if schema else None
    return known.name if known else name


def _changed(op: str, entry: Entry, modifications: list[Modification]) -> list[Change]:
    """Return the change of an existing entry, or nothing when there is nothing to modify."""
    if not modifications:
        return []
    return [Change(op, entry.dn, entry.attributes, modified(entry.attributes, modifications), tuple(modifications))]


def _modifications(existing: Entry, desired: Entry, owned: tuple[str, ...]) -> list[Modification]:
    """Return what makes an existing entry's owned attributes equal to the desired ones (values in order)."""
    names = [name for name, _ in desired.attributes if name.lower() != "objectclass"]
    listed = {name.lower() for name in names}
    if HISTORY_CLASS.lower() in {value.lower() for value in desired.get("objectClass")}:
        names += [name for name in owned if name.lower() not in listed]
    have_classes = {value.lower() for value in existing.get("objectClass")}
    missing = tuple(value for value in desired.get("objectClass") if value.lower() not in have_classes)
    modifications: list[Modification] = [("add", "objectClass", missing)] if missing else []
    # the attributes by lower-cased name, looked up once per entry instead of scanned once per name
    have, want = _by_name(existing), _by_name(desired)
    for name in names:
        key = name.lower()
        modifications += edit_values(name, have.get(key, ()), want.get(key, ()))
    return modifications


def _by_name(entry: Entry) -> dict[str, tuple[str, ...]]:
    """An entry's values by lower-cased attribute name; the first attribute of a name wins, as in Entry.get."""
    values: dict[str, tuple[str, ...]] = {}
    for name, found in entry.attributes:
        values.setdefault(name.lower(), found)
    return values


def _disabling(entry: Entry, schema: Schema | None) -> list[Modification]:
    """Return what disables an entry of ours that is no longer desired (nothing when it is disabled already)."""
    status, routing = _spell(STATUS, schema), _spell(ROUTING, schema)
    modifications = []
    if [value.lower() for value in entry.get(status)] != [DISABLED]:
        modifications += edit_values(status, entry.get(status), (DISABLED,))
    if entry.get(routing):
        # without a routing address the mail system stops delivering to the account; its addresses stay
        # (mailLocalAddress) as history and so that nobody else is given them
        modifications.append(("delete", routing, ()))
    return modifications


# ---------------------------------------------------------------------------------------------- writing


def _open(target: DirectoryConfig, base_dn: str, error: type[Exception]) -> LdapTarget | LdifTarget:
    """Open the target, turning a connection problem into the caller's error."""
    try:
        return open_target(target, base_dn)
    except TargetError as exc:
        raise error(str(exc)) from exc


def _read(directory: LdapTarget | LdifTarget, error: type[Exception]) -> list[Entry]:
    """Read the target's current entries, turning a problem into the caller's error."""
    try:
        return directory.read()
    except TargetError as exc:
        raise error(str(exc)) from exc


def _close_interrupted_runs(store: Store, error: type[Exception]) -> None:
    """Refuse while another apply runs; mark runs whose process died (kill -9, power loss) as failed."""
    for run in store.apply_runs():
        if run.status != "running":
            continue
        if run.host == socket.gethostname() and run.pid != os.getpid() and _alive(run.pid):
            raise error(f"apply {run.id} is still running (process {run.pid}); wait until it ends")
        store.finish_apply(run.id, "failed", error=f"interrupted: process {run.pid} on {run.host} ended without "
                           "finishing; its changes marked intended may have been written")


def _alive(pid: int) -> bool:
    """Tell whether a process exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _back_up(directory: LdapTarget | LdifTarget, apply_id: int, current: Sequence[Entry],
             changes: Sequence[Change], backup_dir: Path) -> Path | None:
    """Write the state of everything the apply touches before the first write; return the backup's path."""
    path = backup_dir / f"apply-{apply_id}-before.ldif"
    # 0600: a backup holds whole entries, password hashes set by other systems included
    if isinstance(directory, LdifTarget):
        if directory.original is None:
            return None  # the file does not exist yet: nothing to back up, rollback removes it again
        write_atomically(path, directory.original, mode=0o600)
        return path
    touched = [Entry(change.dn, change.before) for change in changes if change.op != "add"]
    added = len(changes) - len(touched)
    text = (f"# mailmerge-gov directory apply {apply_id}: {directory.description}\n"
            f"# the {len(touched)} entries it modifies or disables, as they were before; "
            f"the {added} entries it adds did not exist\n"
            "# (binary attributes such as photos are left out: apply never changes them)\n\n")
    text += "".join(format_entry(entry.dn, entry.attributes) for entry in touched)
    write_atomically(path, text.encode("utf-8"), mode=0o600)
    return path


def _batches(total: int) -> Iterator[range]:
    """Split change indexes into batches of 1, 2, 4 … up to BATCH changes."""
    # Small batches first: when the very first changes fail (a missing ACL, a schema the server lacks) the run
    # stops with only a few changes logged as intended, and the batches soon reach the size that pays.
    start, size = 0, 1
    while start < total:
        yield range(start, min(start + size, total))
        start += size
        size = min(size * 2, BATCH)


def _write_ldap(store: Store, directory: LdapTarget, apply_id: int, changes: Sequence[Change],
                backup: Path | None, on_change: Progress | None) -> None:
    """Write changes batch by batch: logged as intended before sending, done (and audited) after the server's yes."""
    # The log keeps its promise with one transaction per batch instead of two per change: every change is
    # recorded as intended before it is sent, and marked done only after the server's yes. A kill -9 can leave
    # changes of the last batch that were in fact written marked intended, as the old one-at-a-time loop could
    # for its one change: intended means "may have been written", and both a rollback (it deletes an added entry
    # that exists, restores modified values that differ) and a new apply (it compares with the server) handle
    # such a change correctly. The audit log gets the changes of a batch when the batch is marked done.
    written = 0
    for batch in _batches(len(changes)):
        sent = [changes[index] for index in batch]
        store.record_apply_changes(apply_id, [(index + 1, change.op, change.dn, change.before, change.after)
                                              for index, change in zip(batch, sent)])
        done: list[int] = []  # sequence numbers (index + 1) in the log
        refused: list[tuple[int, TargetRefused]] = []
        try:
            for position, refusal in directory.write(sent):
                if refusal is None:
                    done.append(batch[position] + 1)
                else:
                    refused.append((batch[position] + 1, refusal))
        finally:
            # also when the connection failed: what the server confirmed is done; the rest stays intended
            done.sort()
            store.complete_apply_changes(apply_id, done)
        written += len(done)
        if refused:
            _, first = min(refused, key=lambda item: item[0])
            for seq, _ in refused:
                store.refuse_apply_change(apply_id, seq)
            # what was never sent is no part of this run: the log keeps only what was or may have been written
            answered = set(done) | {seq for seq, _ in refused}
            store.forget_apply_changes(apply_id, [index + 1 for index in batch if index + 1 not in answered])
            store.finish_apply(apply_id, "failed", error=str(first))
            raise ApplyError(f"{first}\napply {apply_id} stopped there: {written} of {len(changes)} changes were "
                             f"written (backup: {backup}); rollback {apply_id} undoes them") from first
        if on_change:
            for count in range(written - len(done) + 1, written + 1):
                on_change(count, len(changes))


def _write_file(store: Store, directory: LdifTarget, apply_id: int, current: Sequence[Entry],
                changes: Sequence[Change], on_change: Progress | None) -> None:
    """Write an LDIF target whole: all changes logged as intended, the file replaced, all marked done."""
    if not changes:
        return  # the file stays as it is, byte for byte
    seqs = list(range(1, len(changes) + 1))
    store.record_apply_changes(apply_id, [(seq, c.op, c.dn, c.before, c.after) for seq, c in zip(seqs, changes)])
    directory.write(applied(current, changes))
    store.complete_apply_changes(apply_id, seqs)
    if on_change:
        on_change(len(changes), len(changes))


# ---------------------------------------------------------------------------------------------- rollback


def _pending(rows: Sequence[ApplyChangeRow]) -> list[ApplyChangeRow]:
    """Return the changes that were or may have been written and are not undone yet."""
    return [row for row in rows if row.state in ("done", "intended")]


def _undo(row: ApplyChangeRow, entry: Entry | None) -> Change | None:
    """Return the change that undoes one logged change, given the entry as it is now (None: nothing to do)."""
    if row.op == "add":
        # the only deletion the tool ever makes: an entry it added itself
        return None if entry is None else Change("delete", entry.dn, entry.attributes, ())
    if entry is None:
        raise RollbackError(f"{row.dn}: the entry no longer exists, so its old values cannot be put back")
    before, after = Entry(row.dn, row.before), Entry(row.dn, row.after)
    names = [name for name, _ in row.before] + [name for name, _ in row.after if not before.get(name)]
    changed = [name for name in names if before.get(name) != after.get(name)]
    if all(entry.get(name) == before.get(name) for name in changed):
        return None  # already as it was: never written, or undone by an interrupted rollback
    return _changed("modify", entry, _restoring(entry, row.before, changed))[0]


def _restoring(entry: Entry, before: Attributes, changed: list[str]) -> list[Modification]:
    """Return what puts the changed attributes back, attribute order included where that is safe."""
    was = Entry(entry.dn, before)
    ours = {name.lower() for name in changed}
    lost = [i for i, (name, _) in enumerate(before) if name.lower() in ours and not entry.get(name)]
    tail = [name for name, _ in before[lost[0]:]] if lost else []
    # An attribute the apply removed comes back at the end of the entry. To put it back in its place, every
    # attribute after it is removed and added again in the old order, but only when all of those are ours.
    owned = ours | {name.lower() for name in MANAGED_ATTRIBUTES}
    if any(name.lower() == "objectclass" or (name.lower() not in owned and entry.get(name)) for name in tail):
        tail = []
    moved = {name.lower() for name in tail}
    modifications: list[Modification] = []
    for name in changed:
        if name.lower() not in moved:
            modifications += edit_values(name, entry.get(name), was.get(name))
    for name in tail:
        values = was.get(name) if name.lower() in ours else entry.get(name)
        if entry.get(name):
            modifications.append(("delete", name, ()))
        if values:
            modifications.append(("add", name, values))
    return modifications


def _undo_ldap(store: Store, directory: LdapTarget, apply_id: int, undo: Sequence[tuple[int, Change | None]],
               on_change: Progress | None) -> None:
    """Send the undo changes batch by batch, each marked undone (and audited) after the server's yes."""
    total = sum(1 for _, change in undo if change is not None)
    done = 0
    for batch in _batches(len(undo)):
        rows = [undo[index] for index in batch]
        sending = [index for index, (_, change) in enumerate(rows) if change is not None]
        confirmed: set[int] = set()
        problem: TargetError | None = None
        failed_at = len(rows)  # the first row that failed, when one did
        try:
            for position, refusal in directory.write([change for _, change in rows if change is not None]):
                if refusal is None:
                    confirmed.add(sending[position])
                elif sending[position] < failed_at:
                    problem, failed_at = refusal, sending[position]
        except TargetError as exc:
            problem = exc
            failed_at = min([index for index in sending if index not in confirmed] + [failed_at])
        # undone: the changes the server confirmed, and the rows with nothing to undo before the first failure
        marked = [(seq, *_logged(change)) for index, (seq, change) in enumerate(rows)
                  if index in confirmed or (change is None and index < failed_at)]
        store.undo_apply_changes(apply_id, marked)
        if on_change:
            for _ in confirmed:
                done += 1
                on_change(done, total)
        if problem is not None:
            raise RollbackError(f"{problem} (rollback of apply {apply_id} stopped there; run it again once the "
                                "cause is fixed)") from problem


def _logged(change: Change | None) -> tuple[Attributes | None, Attributes | None]:
    """Return what the audit log records of an undo (nothing when there was nothing to undo)."""
    return (None, None) if change is None else (change.before, change.after)


def _restore_file(directory: LdifTarget, backup: str | None, current: Sequence[Entry],
                  changes: Sequence[Change]) -> None:
    """Write an LDIF target back: the backup's very bytes when the undone content equals it."""
    restored = applied(current, changes)
    if backup is None and not restored:
        directory.path.unlink(missing_ok=True)  # apply created the file
        return
    if backup is not None and Path(backup).exists():
        data = Path(backup).read_bytes()
        with open(backup, encoding="utf-8") as stream:
            saved = [Entry(item.dn, item.attributes) for item in read_ldif(stream, backup)]
        if same_content(saved, restored):
            write_atomically(directory.path, data)
            return
    if changes:
        directory.write(restored)
