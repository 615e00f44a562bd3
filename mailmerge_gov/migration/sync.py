"""Copy one mailbox to its new home: folder by folder, resumable, with evidence for every message."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from mailmerge_gov.migration.compare import Copies, Fingerprint, fingerprint
from mailmerge_gov.migration.folders import FolderMapping, FolderRules, map_folders
from mailmerge_gov.migration.protocol import (ConnectionLost, ExportedFolder, ExportsNotMail, FolderStatus,
                                              MailboxError, MailStore, Message, MessageInfo, MessageRefused,
                                              ServerWaits, SyncsChanges)
from mailmerge_gov.store import FolderCheckpoint, MailboxResult, MessageEvidence, Store, open_store

# Messages per FETCH and APPEND round; a batch is also what a kill -9 can leave half done.
BATCH_MESSAGES = 200
BATCH_BYTES = 20 << 20
# A dropped connection is retried this many times per folder, after these pauses (seconds).
RETRY_PAUSES = (0.5, 2.0, 5.0)
# What verify and the recovery of an interrupted batch say of a message found by its fingerprint, not its bytes.
ALTERED = "altered by the server"


@dataclass(frozen=True)
class MailboxJob:
    """One old mailbox and the new mailbox it goes to."""

    source: str  # the [[sources]] name
    mailbox: str  # the old mailbox (address or Maildir name)
    target_mailbox: str


@dataclass(frozen=True)
class FolderOutcome:
    """What one pass did with one source folder."""

    folder: str
    target_folder: str | None
    copied: int = 0
    bytes: int = 0
    skipped: int = 0
    flags_synced: int = 0
    note: str | None = None  # why a folder was not copied, or that it was merged with another


@dataclass(frozen=True)
class MailboxOutcome:
    """What one pass did with one mailbox."""

    job: MailboxJob
    status: str  # "ok" or "failed"
    error: str | None
    folders: tuple[FolderOutcome, ...]
    seconds: float
    exports: tuple[ExportedFolder, ...] = ()  # calendar, contact and task folders written to files
    throttled: tuple[ServerWaits, ...] = ()  # back-offs servers asked for while this mailbox was copied

    @property
    def copied(self) -> int:
        """Messages copied by this pass."""
        return sum(f.copied for f in self.folders)

    @property
    def bytes(self) -> int:
        """Bytes copied by this pass."""
        return sum(f.bytes for f in self.folders)

    @property
    def skipped(self) -> int:
        """Messages deliberately not copied by this pass (each listed with its reason)."""
        return sum(f.skipped for f in self.folders)


# Called after every batch: (job, folder, messages done in the folder, messages in the folder).
Progress = Callable[[MailboxJob, str, int, int], None]


class _WaitTally:
    """Back-offs of every store a job opened, added up per server (the stores of several threads report here)."""

    def __init__(self) -> None:
        """Start from nothing."""
        self._lock = threading.Lock()
        self._waits: dict[str, list[float]] = {}

    def add(self, store: MailStore) -> None:
        """Add what a store that is being closed waited (stores that are never throttled have no `throttled`)."""
        waits, seconds = getattr(store, "throttled", (0, 0.0))
        if waits:
            with self._lock:
                tally = self._waits.setdefault(str(getattr(store, "url", "?")), [0, 0.0])
                tally[0] += waits
                tally[1] += seconds

    def totals(self) -> tuple[ServerWaits, ...]:
        """The waits per server, by server."""
        with self._lock:
            return tuple(ServerWaits(server, int(n), round(seconds, 3))
                         for server, (n, seconds) in sorted(self._waits.items()))


@dataclass
class _Stores:
    """The two open stores of a job, reopened after a dropped connection."""

    open_source: Callable[[], MailStore]
    open_target: Callable[[], MailStore]
    source: MailStore | None = None
    target: MailStore | None = None
    tally: _WaitTally = dataclasses.field(default_factory=_WaitTally)

    def both(self) -> tuple[MailStore, MailStore]:
        """Return the two stores, opening the ones that are not open."""
        if self.source is None:
            self.source = self.open_source()
        if self.target is None:
            self.target = self.open_target()
        return self.source, self.target

    def drop(self) -> None:
        """Close both stores (quietly: the connection may be gone already)."""
        for store in (self.source, self.target):
            if store is not None:
                self.tally.add(store)
                try:
                    store.close()
                except Exception:  # noqa: BLE001 - closing a dead connection may fail any way; nothing to keep
                    pass
        self.source = self.target = None


def sha256(raw: bytes) -> str:
    """Return the SHA-256 of a raw message (the evidence's identity of its content)."""
    return hashlib.sha256(raw).hexdigest()


def migrate_mailbox(job: MailboxJob, open_source: Callable[[], MailStore], open_target: Callable[[], MailStore],
                    store: Store, rules: FolderRules = FolderRules(), dry_run: bool = False,
                    progress: Progress | None = None, pauses: Sequence[float] = RETRY_PAUSES,
                    connections: int = 1, export_to: Path | None = None) -> MailboxOutcome:
    """Copy what is new in one mailbox and sync changed flags; record evidence; never raise for the mailbox's own faults.

    `connections` pairs of connections (source and target) copy folders side by side. With `export_to`, the
    source's calendar, contact and task folders (where the store has them) are written to files in that folder.
    """
    began = time.monotonic()
    stores = _Stores(open_source, open_target)
    outcomes: list[FolderOutcome] = []
    exports: list[ExportedFolder] = []
    try:
        if dry_run:
            outcomes = _dry_run(job, stores, rules, store)
            return MailboxOutcome(job, "ok", None, tuple(outcomes), time.monotonic() - began)
        source, target = stores.both()
        mappings = map_folders(source.folders(), target.folders(), rules, target.separator)
        outcomes = [FolderOutcome(m.source, None, note=m.reason) for m in mappings if m.target is None]
        # Folders that go into one target folder are copied by one worker, one after the other: the
        # recovery of an interrupted batch matches by content and must not meet another folder's batch.
        groups: dict[str, list[FolderMapping]] = defaultdict(list)
        for mapping in mappings:
            if mapping.target is not None:
                groups[mapping.target].append(mapping)
        work = list(groups.values())
        workers = max(1, min(connections, len(work)))
        if workers == 1:
            for group in work:
                outcomes += _copy_group(job, group, stores, store, progress, pauses)
        else:
            outcomes += _copy_side_by_side(job, work, stores, store, progress, pauses, workers)
        source, _ = stores.both()
        if export_to is not None and isinstance(source, ExportsNotMail):
            exports = source.export_not_mail(export_to)
            written = {e.folder: e.path.name for e in exports}
            outcomes = [dataclasses.replace(o, note=f"not mail: exported to {written[o.folder]}")
                        if o.target_folder is None and o.folder in written else o for o in outcomes]
        outcome = MailboxOutcome(job, "ok", None, tuple(outcomes), time.monotonic() - began, tuple(exports))
    except MailboxError as exc:
        outcome = MailboxOutcome(job, "failed", str(exc), tuple(outcomes), time.monotonic() - began, tuple(exports))
    finally:
        stores.drop()
    outcome = dataclasses.replace(outcome, throttled=stores.tally.totals())
    if not dry_run:
        evidence = store.message_evidence(job.source, job.mailbox)
        copied = [e for e in evidence if e.state == "copied"]
        store.save_mailbox_result(MailboxResult(
            job.source, job.mailbox, job.target_mailbox, outcome.status, outcome.error, len(copied),
            sum(e.size for e in copied), sum(e.state == "skipped" for e in evidence), round(outcome.seconds, 3),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    return outcome


def _copy_group(job: MailboxJob, group: Sequence[FolderMapping], stores: _Stores, store: Store,
                progress: Progress | None, pauses: Sequence[float]) -> list[FolderOutcome]:
    """Copy the source folders of one target folder, reconnecting after a dropped connection."""
    outcomes = []
    for mapping in group:
        for pause in (*pauses, None):
            try:
                source, target = stores.both()
                outcomes.append(_copy_folder(job, mapping, source, target, store, progress))
                break
            except ConnectionLost:
                # the batch in flight is 'appending' in the evidence: the retry finds out whether it landed
                stores.drop()
                if pause is None:
                    raise
                time.sleep(pause)
    return outcomes


def _copy_side_by_side(job: MailboxJob, work: list[list[FolderMapping]], stores: _Stores, store: Store,
                       progress: Progress | None, pauses: Sequence[float], workers: int) -> list[FolderOutcome]:
    """Copy groups of folders on several pairs of connections; the first failure stops the others."""
    queue = list(reversed(work))
    taking = threading.Lock()
    failed = threading.Event()

    def worker(index: int) -> list[FolderOutcome]:
        # worker 0 uses the connections already open; the others open their own pair, and their own
        # state-store connection (SQLite connections stay in their thread)
        own = stores if index == 0 else _Stores(stores.open_source, stores.open_target, tally=stores.tally)
        done: list[FolderOutcome] = []
        try:
            with contextlib.ExitStack() as held:
                state = store if index == 0 else held.enter_context(open_store(store.path))
                while not failed.is_set():
                    with taking:
                        if not queue:
                            break
                        group = queue.pop()
                    done += _copy_group(job, group, own, state, progress, pauses)
        except BaseException:
            failed.set()
            raise
        finally:
            if own is not stores:
                own.drop()
        return done

    # worker 0 runs in this thread: it uses this thread's connections and state store
    with ThreadPoolExecutor(workers - 1, thread_name_prefix="folders") as pool:
        futures = [pool.submit(worker, index) for index in range(1, workers)]
        outcomes = worker(0)  # a failure here stops the others (failed is set) before the pool is left
    for future in futures:
        outcomes += future.result()  # raises a failure of another worker, after every worker stopped
    return outcomes


def _dry_run(job: MailboxJob, stores: _Stores, rules: FolderRules, store: Store) -> list[FolderOutcome]:
    """Say what a pass would copy: every source folder, where it would go, its new messages; nothing written."""
    source = stores.source = stores.open_source()
    try:
        target: MailStore | None = stores.open_target()
    except MailboxError:
        target = None  # a mailbox that does not exist yet: the copy would create it
    stores.target = target
    mappings = map_folders(source.folders(), target.folders() if target else [], rules,
                           target.separator if target else "/")
    outcomes = []
    for mapping in mappings:
        infos = []
        if mapping.target is not None:
            uidvalidity = source.status(mapping.source).uidvalidity
            done = {e.source_key for e in store.message_evidence(job.source, job.mailbox, mapping.source)
                    if e.uidvalidity == uidvalidity and e.state in ("copied", "skipped")}
            infos = [info for info in source.list_messages(mapping.source) if info.key not in done]
        outcomes.append(FolderOutcome(mapping.source, mapping.target, copied=len(infos),
                                      bytes=sum(i.size for i in infos), note=mapping.reason))
    return outcomes


def _copy_folder(job: MailboxJob, mapping: FolderMapping, source: MailStore, target: MailStore, store: Store,
                 progress: Progress | None) -> FolderOutcome:
    """Bring one target folder up to date with one source folder."""
    folder, target_folder = mapping.source, mapping.target
    assert target_folder is not None
    status = source.status(folder)
    checkpoint = store.folder_checkpoint(job.source, job.mailbox, folder)
    evidence = store.message_evidence(job.source, job.mailbox, folder)
    pending = [e for e in evidence if e.state == "appending"]
    if (checkpoint is not None and not pending and checkpoint.uidvalidity == status.uidvalidity
            and status.uidnext is not None and status.uidnext <= checkpoint.last_uid + 1
            and status.highestmodseq is not None and status.highestmodseq == checkpoint.highestmodseq):
        # nothing arrived and no flag changed since the last pass (CONDSTORE): no need to list anything
        return FolderOutcome(folder, target_folder, note=mapping.reason)
    target.create_folder(target_folder)
    if pending:
        _recover(job, folder, status.uidvalidity, target_folder, pending, source, target, store)
        evidence = store.message_evidence(job.source, job.mailbox, folder)
    current = {e.source_key: e for e in evidence if e.uidvalidity == status.uidvalidity and e.state != "appending"}
    sync_state = None
    if isinstance(source, SyncsChanges):
        # a delta: only what was created or changed since the state of the last complete pass (the store lists
        # the folder in full, full=True, without a state or when the server no longer knows it)
        same = checkpoint is not None and checkpoint.uidvalidity == status.uidvalidity
        known = checkpoint.sync_state if same and checkpoint is not None else None
        delta = source.changes(folder, known)
        listed, sync_state = list(delta.messages), delta.state
    else:
        listed = source.list_messages(folder)
    new = [info for info in listed if info.key not in current]
    # After a UIDVALIDITY change the old keys name nothing: messages are matched by content with what
    # was copied before, so that nothing is copied twice (multiset: two equal messages need two copies).
    earlier = [e for e in evidence if e.uidvalidity != status.uidvalidity and e.state == "copied"]
    flags_synced = _sync_flags(listed, current, target, target_folder, store)
    limit = target.append_limit()
    copied = size = skipped = 0
    skips = [info for info in new if limit is not None and info.size > limit]
    if skips:
        store.record_messages([_evidence(job, folder, status.uidvalidity, info, "", target_folder, None, "skipped",
                                         f"larger than the target's APPENDLIMIT ({info.size} > {limit} bytes)")
                               for info in skips])
        skipped += len(skips)
    skipped_keys = {info.key for info in skips}
    todo = [info for info in new if info.key not in skipped_keys]
    reused: Counter[str] = Counter()  # earlier copies (by content) already claimed by a message of this pass
    matchable: dict[str, list[MessageEvidence]] = defaultdict(list)
    for e in earlier:
        matchable[e.sha256].append(e)
    done = 0
    batches = list(_batches(todo))
    # The next batch is fetched from the source while this one is appended to the target (two connections,
    # two servers): the copy takes about as long as the slower side instead of the sum of both.
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch:
        coming = prefetch.submit(_fetch, source, folder, batches[0]) if batches else None
        for index, batch in enumerate(batches):
            assert coming is not None
            messages = coming.result()
            coming = prefetch.submit(_fetch, source, folder, batches[index + 1]) if index + 1 < len(batches) else None
            copied, size, skipped = _copy_batch(job, folder, status, target_folder, batch, messages, matchable,
                                                reused, target, store, (copied, size, skipped))
            done += len(batch)
            if status.uidnext is not None:
                uids = [info.uid for info in batch if info.uid is not None]
                if uids:
                    store.save_checkpoint(FolderCheckpoint(job.source, job.mailbox, folder, job.target_mailbox,
                                                           target_folder, status.uidvalidity, max(uids), None))
            if progress is not None:
                progress(job, folder, done, len(todo))
    last_uid = max([info.uid for info in listed if info.uid is not None], default=0)
    # the sync state is kept only now, the folder copied: a pass that stops midway asks from the older state again
    store.save_checkpoint(FolderCheckpoint(job.source, job.mailbox, folder, job.target_mailbox, target_folder,
                                           status.uidvalidity, last_uid, status.highestmodseq, sync_state))
    return FolderOutcome(folder, target_folder, copied, size, skipped, flags_synced, mapping.reason)


def _fetch(source: MailStore, folder: str, batch: Sequence[MessageInfo]) -> list[Message]:
    """Fetch one batch of messages with their bytes."""
    return list(source.fetch(folder, [info.key for info in batch]))


def _copy_batch(job: MailboxJob, folder: str, status: FolderStatus, target_folder: str, batch: Sequence[MessageInfo],
                messages: Sequence[Message], matchable: dict[str, list[MessageEvidence]], reused: Counter[str],
                target: MailStore, store: Store, totals: tuple[int, int, int]) -> tuple[int, int, int]:
    """Append the messages of one batch that earlier copies do not account for; return the running totals."""
    copied, size, skipped = totals
    fresh: list[tuple[Message, str]] = []
    for message in messages:
        digest = sha256(message.raw)
        if matchable.get(digest) and reused[digest] < len(matchable[digest]):
            old = matchable[digest][reused[digest]]
            reused[digest] += 1
            if old.target_key is not None and sorted(old.flags) != sorted(message.info.flags):
                # flags changed since that copy was made: the evidence says what the target now has
                target.set_flags(old.target_folder, old.target_key, message.info.flags)
            store.record_messages([_evidence(job, folder, status.uidvalidity, message.info, digest,
                                             old.target_folder, old.target_key, "copied")])
            continue
        fresh.append((message, digest))
    if fresh:
        result = _append(job, folder, status.uidvalidity, target_folder, fresh, target, store)
        copied, size, skipped = copied + result[0], size + result[1], skipped + result[2]
    return copied, size, skipped


def _batches(infos: Sequence[MessageInfo]) -> Iterable[list[MessageInfo]]:
    """Split messages into batches of at most BATCH_MESSAGES messages and about BATCH_BYTES bytes."""
    batch: list[MessageInfo] = []
    size = 0
    for info in infos:
        if batch and (len(batch) >= BATCH_MESSAGES or size + info.size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(info)
        size += info.size
    if batch:
        yield batch


def _append(job: MailboxJob, folder: str, uidvalidity: int, target_folder: str,
            batch: Sequence[tuple[Message, str]], target: MailStore, store: Store) -> tuple[int, int, int]:
    """Append (message, SHA-256) pairs with evidence written before (appending) and after (copied); return copied, bytes, skipped."""
    uidnext = target.status(target_folder).uidnext
    messages = [m for m, _ in batch]
    digests = [d for _, d in batch]
    store.record_messages([_evidence(job, folder, uidvalidity, m.info, d, target_folder, None, "appending",
                                     uidnext=uidnext) for m, d in zip(messages, digests)])
    try:
        keys = target.append(target_folder, messages)
    except MessageRefused:
        if len(messages) == 1:
            raise
        # one message of the batch was refused: append them one by one to find it (and keep the rest)
        copied = size = skipped = 0
        for message, digest in batch:
            try:
                result = _append(job, folder, uidvalidity, target_folder, [(message, digest)], target, store)
            except MessageRefused as exc:
                store.record_messages([_evidence(job, folder, uidvalidity, message.info, digest,
                                                 target_folder, None, "skipped", f"refused by the target: {exc}")])
                skipped += 1
                continue
            copied, size, skipped = copied + result[0], size + result[1], skipped + result[2]
        return copied, size, skipped
    store.record_messages([_evidence(job, folder, uidvalidity, m.info, d, target_folder, k, "copied")
                           for m, d, k in zip(messages, digests, keys)])
    return len(messages), sum(len(m.raw) for m in messages), 0


def _recover(job: MailboxJob, folder: str, uidvalidity: int, target_folder: str, pending: Sequence[MessageEvidence],
             source: MailStore, target: MailStore, store: Store) -> None:
    """Find out which appends of an interrupted batch landed: match them by content in the target folder (by
    SHA-256, else by fingerprint for a server that rewrites MIME)."""
    # Target messages that no evidence row claims yet, from where the interrupted appends would be. Rows of
    # every job count: an official's two old mailboxes go into one new one, and may hold the same message.
    claimed = store.claimed_target_keys(job.target_mailbox, target_folder)
    since = min((e.target_uidnext for e in pending if e.target_uidnext is not None), default=0)
    candidates = [info for info in target.list_messages(target_folder, after_uid=max(since - 1, 0))
                  if info.key not in claimed]
    landed: dict[str, list[str]] = defaultdict(list)
    others: list[tuple[Fingerprint, str]] = []  # candidates that are no pending message byte for byte
    digests = {e.sha256 for e in pending}
    rewrites = _rewrites_mime(target)
    for message in target.fetch(target_folder, [info.key for info in candidates]):
        digest = sha256(message.raw)
        if digest in digests:
            landed[digest].append(message.info.key)
        elif rewrites:
            others.append((fingerprint(message.raw), message.info.key))
    rows = []
    for e in pending:
        keys = landed.get(e.sha256)
        if keys:
            rows.append(_replace_state(e, "copied", keys.pop(0)))
        else:
            rows.append(_replace_state(e, "lost", None))  # not there: it is copied again below
    unmatched = [r.source_key for r in rows if r.state == "lost" and r.uidvalidity == uidvalidity]
    if others and unmatched:
        # a server that rewrites MIME (Exchange) keeps no SHA-256: the original is read again and compared by
        # fingerprint, each landed copy claimed once
        originals = {m.info.key: fingerprint(m.raw) for m in source.fetch(folder, unmatched)}
        copies = Copies(others)
        for index, row in enumerate(rows):
            original = originals.get(row.source_key)
            if row.state != "lost" or row.uidvalidity != uidvalidity or original is None:
                continue
            key = copies.claim(original)
            if key is not None:
                rows[index] = dataclasses.replace(_replace_state(row, "copied", key), reason=ALTERED)
    store.record_messages([r for r in rows if r.state == "copied"])
    lost = [r for r in rows if r.state == "lost"]
    if lost:
        store.forget_messages([(r.source, r.mailbox, r.folder, r.uidvalidity, r.source_key) for r in lost])


def _replace_state(e: MessageEvidence, state: str, target_key: str | None) -> MessageEvidence:
    """Return an evidence row with another state and target key."""
    return MessageEvidence(e.source, e.mailbox, e.folder, e.uidvalidity, e.source_key, e.sha256, e.size,
                           e.internal_date, e.flags, e.target_mailbox, e.target_folder, target_key, state,
                           e.reason, e.target_uidnext)


def _sync_flags(listed: Sequence[MessageInfo], current: dict[str, MessageEvidence], target: MailStore,
                target_folder: str, store: Store) -> int:
    """Give copied messages whose flags changed in the source the same flags in the target; return how many."""
    changed = []
    for info in listed:
        e = current.get(info.key)
        if e is None or e.state != "copied" or e.target_key is None or sorted(e.flags) == sorted(info.flags):
            continue
        target.set_flags(e.target_folder, e.target_key, info.flags)
        changed.append(MessageEvidence(e.source, e.mailbox, e.folder, e.uidvalidity, e.source_key, e.sha256,
                                       e.size, e.internal_date, tuple(info.flags), e.target_mailbox,
                                       e.target_folder, e.target_key, e.state, e.reason, e.target_uidnext))
    if changed:
        store.record_messages(changed)
    return len(changed)


def _evidence(job: MailboxJob, folder: str, uidvalidity: int, info: MessageInfo, digest: str, target_folder: str,
              target_key: str | None, state: str, reason: str | None = None,
              uidnext: int | None = None) -> MessageEvidence:
    """Build the evidence row of one source message."""
    return MessageEvidence(job.source, job.mailbox, folder, uidvalidity, info.key, digest, info.size,
                           info.internal_date.isoformat(), tuple(info.flags), job.target_mailbox, target_folder,
                           target_key, state, reason, uidnext)


def forget_missing(check: MailboxCheck, store: Store) -> int:
    """Forget the evidence of messages verify did not find, so that the next pass copies them again."""
    missing = {(folder, key) for f in check.folders for folder, key in f.missing}
    if not missing:
        return 0
    job = check.job
    rows = [e for e in store.message_evidence(job.source, job.mailbox) if (e.folder, e.source_key) in missing]
    store.forget_messages([(e.source, e.mailbox, e.folder, e.uidvalidity, e.source_key) for e in rows])
    for folder in {folder for folder, _ in missing}:
        checkpoint = store.folder_checkpoint(job.source, job.mailbox, folder)
        if checkpoint is not None:
            # without a mod-sequence or sync state the next pass lists the folder instead of trusting it is unchanged
            store.save_checkpoint(dataclasses.replace(checkpoint, highestmodseq=None, sync_state=None))
    return len(rows)


@dataclass(frozen=True)
class FolderCheck:
    """Verification of one target folder: the source messages it must hold, and those it does not."""

    source_folders: tuple[str, ...]
    target_folder: str
    expected: int  # source messages that must be in the target (deliberate skips left out)
    present: int
    missing: tuple[tuple[str, str], ...] = ()  # (source folder, source key) not found in the target
    skipped: tuple[tuple[str, str, str], ...] = ()  # (source folder, source key, reason)
    extra: int = 0  # target messages no source message accounts for (mail that was there, or a duplicate)
    altered: tuple[tuple[str, str], ...] = ()  # (source folder, source key) found by fingerprint, not byte for byte


@dataclass(frozen=True)
class MailboxCheck:
    """Verification of one mailbox."""

    job: MailboxJob
    folders: tuple[FolderCheck, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when every source message is in the target or deliberately skipped, and both could be read."""
        return self.error is None and all(not f.missing for f in self.folders)


def verify_mailbox(job: MailboxJob, open_source: Callable[[], MailStore], open_target: Callable[[], MailStore],
                   store: Store, rules: FolderRules = FolderRules()) -> MailboxCheck:
    """Re-read both sides and check, per target folder, that the multiset of source hashes is in the target's."""
    stores = _Stores(open_source, open_target)
    try:
        source, target = stores.both()
        mappings = [m for m in map_folders(source.folders(), target.folders(), rules, target.separator)
                    if m.target is not None]
        target_names = {f.name for f in target.folders()}
        skips = {(e.folder, e.source_key): e.reason or "" for e in store.message_evidence(job.source, job.mailbox)
                 if e.state == "skipped"}
        by_target: dict[str, list[FolderMapping]] = defaultdict(list)
        for mapping in mappings:
            by_target[mapping.target].append(mapping)  # type: ignore[index]
        checks = []
        for target_folder, group in by_target.items():
            wanted: list[tuple[str, str, str]] = []  # (hash, source folder, key)
            skipped: list[tuple[str, str, str]] = []
            for mapping in group:
                infos = source.list_messages(mapping.source)
                for message in source.fetch(mapping.source, [i.key for i in infos]):
                    reason = skips.get((mapping.source, message.info.key))
                    if reason is not None:
                        skipped.append((mapping.source, message.info.key, reason))
                    else:
                        wanted.append((sha256(message.raw), mapping.source, message.info.key))
            needed = Counter(digest for digest, _, _ in wanted)
            have: Counter[str] = Counter()
            loose: list[str] = []  # keys of target messages that are no source message byte for byte
            if target_folder in target_names:
                infos = target.list_messages(target_folder)
                for m in target.fetch(target_folder, [i.key for i in infos]):
                    digest = sha256(m.raw)
                    if have[digest] < needed[digest]:
                        have[digest] += 1
                    else:
                        loose.append(m.info.key)
            missing = []
            for digest, folder, key in wanted:
                if have[digest] > 0:
                    have[digest] -= 1
                else:
                    missing.append((folder, key))
            altered = (_altered(source, target, target_folder, missing, loose)
                       if missing and loose and _rewrites_mime(target) else [])
            missing = [m for m in missing if m not in altered]
            checks.append(FolderCheck(tuple(m.source for m in group), target_folder, len(wanted),
                                      len(wanted) - len(missing), tuple(missing), tuple(skipped),
                                      len(loose) - len(altered), tuple(altered)))
        return MailboxCheck(job, tuple(checks))
    except MailboxError as exc:
        return MailboxCheck(job, error=str(exc))
    finally:
        stores.drop()




def _rewrites_mime(target: MailStore) -> bool:
    """Whether a store keeps other bytes than it was given (Exchange): only there is a fingerprint evidence, where
    a store that keeps the bytes (IMAP, Maildir) would let an independently delivered twin stand in for a copy."""
    return bool(getattr(target, "rewrites_mime", False))


def _altered(source: MailStore, target: MailStore, target_folder: str, missing: Sequence[tuple[str, str]],
             loose: Sequence[str]) -> list[tuple[str, str]]:
    """Which of the messages not found byte for byte are in the target as the server rewrote them (by fingerprint);
    each target message accounts for one source message."""
    copies = Copies((fingerprint(m.raw), m.info.key) for m in target.fetch(target_folder, list(loose)))
    by_folder: dict[str, list[str]] = defaultdict(list)
    for folder, key in missing:
        by_folder[folder].append(key)
    found = []
    for folder, keys in by_folder.items():
        for message in source.fetch(folder, keys):
            if copies.claim(fingerprint(message.raw)) is not None:
                found.append((folder, message.info.key))
    return found
