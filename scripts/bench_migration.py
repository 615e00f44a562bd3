#!/usr/bin/env python3
"""Benchmark of the mailbox migration: mailmerge-gov and mbsync copy one large mailbox between private Dovecots.

Usage: python scripts/bench_migration.py [--messages N] [--folders N] [--seed N] [--keep] [--profile]

A measurement, not a test: it prints a table of figures with a verdict per target and exits 0 whether the
targets are met or not (1 only when a step fails outright). Everything runs on 127.0.0.1, in a temporary
folder removed at the end unless --keep.

Steps:
- servers: three private Dovecot 2.3 (tests/servers.py, the tests' own configuration: Maildir, mail_fsync =
  never, a master user): the source A, the target B that mailmerge-gov writes into and the target C that mbsync
  writes into, so that both tools copy into an empty mailbox. bulk@binhduong.gov.vn exists on all three.
- mailbox: N messages (10,000 by default) in F folders (10: INBOX, Sent, "Văn bản đến", "Văn bản đến/2024" …),
  appended to A with MULTIAPPEND, from a fixed seed. Vietnamese subjects and bodies; sizes from 1 KB to 1 MB
  (most 2-20 KB of text, some with base64 attachments of 100 KB to 1 MB); \\Seen, \\Answered, \\Flagged and a
  keyword mixed; every INTERNALDATE distinct; a few exact duplicates and a few messages without Message-ID.
- mailmerge-gov: `mailbox migrate` A -> B from a jobs CSV, in a child process (wall time, CPU and peak RSS
  through wait4, and the CPU the two Dovecots spent meanwhile); the same command again (nothing new);
  `mailbox verify`. Then the benchmark reads A and B
  itself: per folder, the multiset of SHA-256 of BODY.PEEK[] must be the same, and so must flags and
  INTERNALDATE.
- mbsync (isync, shared/server-notes.md section 5: Far/Near, SyncState, PipelineDepth 50, master login):
  A -> C, first run (measured as mailmerge-gov's) and second run. mbsync adds an X-TUID header to every copy,
  so its copies are compared with that header taken out, and the number of messages that differ is reported.
- --profile: one more first pass, into a fourth Dovecot D, under cProfile; the top costs are printed after the
  table (not in the table's timings: the profiler slows the command down).

Targets:
- first pass: mailmerge-gov copies at least 1.5 times as many messages per second as mbsync;
- second pass (nothing to copy): at most 2 s for the whole command;
- mailmerge-gov's copies are byte-identical to the source, with the same flags and INTERNALDATEs;
- `mailbox verify` says nothing is missing.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import datetime as dt
import email.header
import email.utils
import hashlib
import io
import os
import platform
import pstats
import random
import re
import subprocess
import sys
import time
import unicodedata
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' private Dovecot (tests/ is not a package)

import imapclient  # noqa: E402
from benchtable import Row, Run, print_rows, run_child, stopped, verdict, work_folder  # noqa: E402  (this folder)
from servers import DovecotServer, group_members, require_program  # noqa: E402

from mailmerge_gov.config import ConfigError, load_config  # noqa: E402

EXAMPLE = ROOT / "examples" / "hcm-merger"
ADDRESS = "bulk@binhduong.gov.vn"
DEFAULT_SEED = 74  # Bình Dương's unit code: any fixed number gives the same mailbox every run
SPEED_RATIO = 1.5  # mailmerge-gov messages/s over mbsync messages/s, first pass
SECOND_PASS_SECONDS = 2.0
ICT = dt.timezone(dt.timedelta(hours=7))
CRLF = b"\r\n"
# MULTIAPPEND chunks while generating: few round trips, but no command holding hundreds of MB in memory.
APPEND_MESSAGES = 100
APPEND_BYTES = 16 << 20
# FETCH batches when the benchmark reads a mailbox back (BODY.PEEK[]: reading must not set \Seen).
READ_MESSAGES = 200
READ_BYTES = 32 << 20
# mbsync inserts this header line into every message it copies (notes, section 5).
X_TUID = re.compile(rb"^X-TUID: [^\r\n]*\r\n", re.MULTILINE)

# Parents before their children: a child created alone leaves a \Noselect parent, which mailmerge-gov
# skips and mbsync handles its own way; real mailboxes have the parent as a folder too.
FOLDERS = ("INBOX", "Sent", "Văn bản đến", "Văn bản đi", "Văn bản đến/2024", "Văn bản đi/2024",
           "Văn bản đến/2025", "Văn bản đi/2025", "Họp giao ban", "Dự án", "Dự án/Chuyển đổi số",
           "Tiếp công dân", "Phòng Tổ chức cán bộ", "Thông báo nội bộ", "Kế hoạch năm 2025")
# INBOX and Sent hold most of a real mailbox; the rest share what is left evenly.
INBOX_SHARE, SENT_SHARE = 0.35, 0.15
# Size classes (share of messages, smallest and largest raw size in bytes, attachment or not); sizes are drawn
# log-uniformly within a class so that the large ones do not dominate the total.
SIZE_CLASSES = (
    ("1-2 KB", 0.08, 1_000, 2_000, False),
    ("2-20 KB", 0.77, 2_000, 20_000, False),
    ("20-100 KB", 0.10, 20_000, 100_000, True),
    ("100 KB-1 MB", 0.05, 100_000, 1_000_000, True),
)
KEYWORD = "$DaXuLy"  # "đã xử lý" (dealt with): a keyword as mail clients set them (an IMAP atom, ASCII)

FAMILY = ("Nguyễn", "Trần", "Lê", "Phạm", "Huỳnh", "Hoàng", "Võ", "Phan", "Trương", "Bùi", "Đặng", "Đỗ")
MIDDLE = ("Văn", "Thị", "Minh", "Hữu", "Ngọc", "Thanh", "Quốc", "Thu", "Đức", "Kim")
GIVEN = ("An", "Bình", "Cường", "Dũng", "Hà", "Hải", "Hạnh", "Hùng", "Lan", "Linh", "Mai", "Nam", "Phương",
         "Quân", "Tâm", "Thảo", "Trang", "Tuấn", "Vy", "Yến", "Đạt", "Khoa")
DOMAINS = ("binhduong.gov.vn", "sotc.binhduong.gov.vn", "sotp.binhduong.gov.vn", "soyt.binhduong.gov.vn")
KINDS = ("Công văn", "Quyết định", "Thông báo", "Kế hoạch", "Báo cáo", "Tờ trình", "Giấy mời")
AGENCIES = ("Ủy ban nhân dân tỉnh", "Sở Tài chính", "Sở Nội vụ", "Văn phòng Ủy ban", "Phòng Tổ chức cán bộ",
            "Ban Quản lý dự án", "Trung tâm Phục vụ hành chính công", "Sở Y tế", "Sở Tư pháp", "Thanh tra tỉnh")
VERBS = ("đề nghị", "yêu cầu", "thông báo", "báo cáo", "hướng dẫn", "đôn đốc", "giao", "xin ý kiến về",
         "phối hợp thực hiện", "tổng hợp")
TOPICS = ("việc sắp xếp đơn vị hành chính cấp tỉnh", "kế hoạch chuyển đổi số năm 2025",
          "danh sách cán bộ, công chức, viên chức", "phương án bố trí trụ sở làm việc",
          "hồ sơ thủ tục hành chính tồn đọng", "việc bàn giao tài liệu lưu trữ", "dự toán ngân sách nhà nước",
          "kết quả giải quyết đơn thư của công dân", "việc chuyển đổi địa chỉ thư điện tử công vụ",
          "lịch tiếp công dân định kỳ", "công tác phòng chống thiên tai", "chế độ chính sách sau sắp xếp")
TAILS = ("trước ngày {d}.", "theo đúng quy định hiện hành.", "và báo cáo kết quả về Văn phòng.",
         "để tổng hợp trình Ủy ban nhân dân tỉnh.", "trong thời gian sớm nhất.", "bảo đảm an toàn thông tin.",
         "(có văn bản kèm theo).", "theo Nghị quyết số {n}/NQ-HĐND.")


@dataclasses.dataclass
class Generated:
    """What was appended to the source: counts and bytes, by folder and by size class."""

    messages: int = 0
    bytes: int = 0
    by_folder: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    classes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    class_bytes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    duplicates: int = 0
    without_id: int = 0
    with_attachment: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ the mailbox


def connect(server: DovecotServer) -> imapclient.IMAPClient:
    """An IMAP connection of the benchmark's own to one of its servers."""
    client = imapclient.IMAPClient(server.host, port=server.imap_port, ssl=False, timeout=60)
    # imapclient sets imaplib's debug level to 5, and imaplib then formats the repr() of every response, message
    # bodies included, before the logger drops it: seconds of CPU for the benchmark's own reading of 300 MB
    client._imap.debug = 0
    return client


def ascii_fold(text: str) -> str:
    """Vietnamese to plain lower-case ASCII, as old mail systems built local parts (Đạt -> dat)."""
    text = text.replace("Đ", "D").replace("đ", "d")
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c)).lower()


def folder_names(count: int) -> list[str]:
    """The first `count` folder names; beyond the list, numbered archive folders."""
    names = list(FOLDERS[:count])
    names += [f"Hồ sơ lưu {index}" for index in range(1, count - len(names) + 1)]
    return names


def folder_weights(folders: list[str]) -> list[float]:
    """How likely a message is to land in each folder."""
    if len(folders) == 1:
        return [1.0]
    if len(folders) == 2:
        return [0.7, 0.3]
    rest = (1.0 - INBOX_SHARE - SENT_SHARE) / (len(folders) - 2)
    return [INBOX_SHARE, SENT_SHARE] + [rest] * (len(folders) - 2)


def person(rng: random.Random) -> tuple[str, str]:
    """A Vietnamese official: display name and address."""
    family, middle, given = rng.choice(FAMILY), rng.choice(MIDDLE), rng.choice(GIVEN)
    local = ascii_fold(given) + ascii_fold(family)[0] + ascii_fold(middle)[0]
    return f"{family} {middle} {given}", f"{local}@{rng.choice(DOMAINS)}"


def sentence_pool(rng: random.Random, count: int = 2000) -> list[bytes]:
    """Body lines made once: building every line of 300 MB word by word would take most of the generation."""
    pool = []
    for _ in range(count):
        tail = rng.choice(TAILS).format(d=f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/2025",
                                        n=rng.randint(1, 250))
        line = f"{rng.choice(AGENCIES)} {rng.choice(VERBS)} {rng.choice(TOPICS)} {tail}"
        pool.append(line.encode())
    return pool


def header(name: str, value: str) -> bytes:
    """One header field, RFC 2047-encoded when not ASCII, folded with CRLF."""
    if value.isascii():
        return f"{name}: {value}".encode() + CRLF
    encoded = email.header.Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}".encode() + CRLF


def text_body(rng: random.Random, pool: list[bytes], size: int) -> bytes:
    """About `size` bytes of Vietnamese text: lines from the pool, in paragraphs, CRLF line ends."""
    lines: list[bytes] = [b"K\xc3\xadnh g\xe1\xbb\xadi c\xc3\xa1c \xc4\x91\xe1\xbb\x93ng ch\xc3\xad,", b""]
    total = sum(len(line) + 2 for line in lines)
    # bounded: every pass adds at least one line of the pool (tens of bytes), and size is at most 1 MB
    while total < size:
        line = rng.choice(pool)
        lines.append(line)
        total += len(line) + 2
        if rng.random() < 0.15:
            lines.append(b"")
            total += 2
    return CRLF.join(lines) + CRLF


def attachment_part(rng: random.Random, boundary: str, filename: str, size: int) -> bytes:
    """A base64 attachment part of about `size` encoded bytes (random content: mail is not compressible)."""
    raw = rng.randbytes(max(1, size * 57 // 78))  # 57 bytes -> 76 characters + CRLF
    encoded = base64.encodebytes(raw).rstrip(b"\n").replace(b"\n", CRLF)  # 76-character lines
    quoted = urllib.parse.quote(filename)
    return (f"--{boundary}\r\nContent-Type: application/pdf; name*=utf-8''{quoted}\r\n"
            f"Content-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename*=utf-8''{quoted}\r\n\r\n").encode() + encoded + CRLF


def make_message(rng: random.Random, pool: list[bytes], folder: str, when: dt.datetime, size: int,
                 attachment: bool, message_id: bool) -> bytes:
    """One message of about `size` bytes as a mail client would have stored it."""
    sender_name, sender = person(rng)
    recipient_name, recipient = "Văn thư Bình Dương", ADDRESS
    if folder == "Sent":
        sender_name, sender, (recipient_name, recipient) = recipient_name, ADDRESS, person(rng)
    number = rng.randint(1, 9999)
    kind = rng.choice(KINDS)
    subject = f"{kind} số {number}/{when.year}/UBND-VP về {rng.choice(TOPICS)}"
    head = b"".join([
        b"Return-Path: <" + sender.encode() + b">" + CRLF,
        header("From", email.utils.formataddr((sender_name, sender), charset="utf-8")),
        header("To", email.utils.formataddr((recipient_name, recipient), charset="utf-8")),
        header("Subject", subject),
        # a Date a little before the arrival, as a real client's clock is
        header("Date", email.utils.format_datetime(when - dt.timedelta(seconds=rng.randint(0, 300)))),
        header("Message-ID", f"<{rng.randbytes(8).hex()}.{number}@{sender.split('@')[1]}>") if message_id else b"",
        b"MIME-Version: 1.0" + CRLF,
    ])
    if not attachment:
        head += b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
        return head + text_body(rng, pool, size - len(head))
    boundary = f"=_mmg_{rng.randbytes(6).hex()}"
    text = text_body(rng, pool, rng.randint(1_000, 6_000))
    head += f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode()
    first = (f"--{boundary}\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n"
             f"Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + text
    end = f"--{boundary}--\r\n".encode()
    room = size - len(head) - len(first) - len(end) - 300  # 300: the attachment part's own header lines
    part = attachment_part(rng, boundary, f"{kind} {number}.pdf", max(room, 1_000))
    return head + first + part + end


def message_size(rng: random.Random) -> tuple[int, bool]:
    """Draw a size class and a size in it: (bytes, with an attachment)."""
    pick = rng.random()
    for _name, share, low, high, attachment in SIZE_CLASSES:
        if pick < share:
            return int(low * (high / low) ** rng.random()), attachment
        pick -= share
    _name, _share, low, _high, attachment = SIZE_CLASSES[-1]  # the shares' rounding left a sliver
    return low, attachment


def flags_for(rng: random.Random, folder: str) -> list[bytes]:
    """A realistic mix: most mail read, some answered, few flagged, some with a keyword."""
    flags = []
    if folder == "Sent" or rng.random() < 0.8:
        flags.append(b"\\Seen")
    if folder != "Sent" and rng.random() < 0.2:
        flags.append(b"\\Answered")
    if rng.random() < 0.08:
        flags.append(b"\\Flagged")
    if rng.random() < 0.1:
        flags.append(KEYWORD.encode())
    return flags


def size_class(size: int) -> str:
    """The size class a raw message falls in, by its real size."""
    for name, _share, _low, high, _attachment in SIZE_CLASSES:
        if size < high:
            return name
    return SIZE_CLASSES[-1][0]


def generate(server: DovecotServer, password: str, messages: int, folders: int, seed: int) -> Generated:
    """Append the benchmark's mailbox to `server` with MULTIAPPEND; return what was appended."""
    rng = random.Random(seed)
    pool = sentence_pool(rng)
    names = folder_names(folders)
    weights = folder_weights(names)
    # a few exact duplicates (the same bytes twice in a folder: forwarded twice, saved twice) and a few
    # messages without Message-ID (some old systems and scanners send none)
    duplicates = set(rng.sample(range(1, messages), min(messages - 1, max(2, messages // 500))))
    without_id = set(rng.sample(range(messages), min(messages, max(2, messages // 200))))
    result = Generated()
    began = time.perf_counter()
    pending: dict[str, list[dict]] = {name: [] for name in names}
    pending_bytes: collections.Counter[str] = collections.Counter()
    last: dict[str, bytes] = {}
    when = dt.datetime(2023, 1, 3, 7, 30, tzinfo=ICT)
    with connect(server) as client:
        client.login(ADDRESS, password)
        for name in names[1:]:
            client.create_folder(name)

        def flush(name: str) -> None:
            """Append a folder's pending messages in one MULTIAPPEND."""
            if pending[name]:
                client.multiappend(name, pending[name])
                pending[name], pending_bytes[name] = [], 0

        for index in range(messages):
            folder = rng.choices(names, weights)[0]
            # strictly increasing, whole seconds (Maildir keeps INTERNALDATE as a file time): all distinct
            when += dt.timedelta(seconds=rng.randint(60, 4 * 3600))
            if index in duplicates and folder in last:
                raw = last[folder]
                result.duplicates += 1
            else:
                size, attachment = message_size(rng)
                raw = make_message(rng, pool, folder, when, size, attachment, index not in without_id)
                result.without_id += index in without_id
                result.with_attachment += attachment
            last[folder] = raw
            pending[folder].append({"msg": raw, "flags": flags_for(rng, folder), "date": when})
            pending_bytes[folder] += len(raw)
            result.messages += 1
            result.bytes += len(raw)
            result.by_folder[folder] += 1
            result.classes[size_class(len(raw))] += 1
            result.class_bytes[size_class(len(raw))] += len(raw)
            if len(pending[folder]) >= APPEND_MESSAGES or pending_bytes[folder] >= APPEND_BYTES:
                flush(folder)
        for name in names:
            flush(name)
    result.seconds = time.perf_counter() - began
    return result


# ------------------------------------------------------------------------------------------ reading mailboxes


@dataclasses.dataclass
class Snapshot:
    """A mailbox as the benchmark reads it back: per folder, a multiset of (sha256, flags, INTERNALDATE)."""

    folders: dict[str, collections.Counter[tuple[str, tuple[str, ...], int]]]
    messages: int = 0
    bytes: int = 0
    x_tuid: int = 0  # messages holding an X-TUID header (mbsync's)


def snapshot(server: DovecotServer, strip_x_tuid: bool = False) -> Snapshot:
    """Read every message of the mailbox through the master user; digest bodies (with X-TUID taken out if asked)."""
    result = Snapshot({})
    with connect(server) as client:
        client.normalise_times = False  # aware datetimes: compared as instants, whatever zone the server says
        client.login(server.master_login(ADDRESS), server.master_password)
        for flags, _delimiter, name in client.list_folders():
            if {bytes(f).lower() for f in flags} & {b"\\noselect", b"\\nonexistent"}:
                continue
            client.select_folder(name, readonly=True)
            uids = client.search("ALL")
            sizes = client.fetch(uids, ["RFC822.SIZE"]) if uids else {}
            digests: collections.Counter[tuple[str, tuple[str, ...], int]] = collections.Counter()
            batch: list[int] = []
            total = 0
            for uid in [*uids, None]:  # None: flush the last batch
                if uid is not None and len(batch) < READ_MESSAGES and total < READ_BYTES:
                    batch.append(uid)
                    total += sizes[uid][b"RFC822.SIZE"]
                    continue
                if batch:
                    for data in client.fetch(batch, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]).values():
                        raw = data[b"BODY[]"]
                        result.messages += 1
                        result.bytes += len(raw)
                        if strip_x_tuid:
                            # in the header only: a body line that happens to start with "X-TUID: " stays
                            head, blank, body = raw.partition(b"\r\n\r\n")
                            stripped = X_TUID.sub(b"", head + b"\r\n", count=1)[:-2] + blank + body
                            result.x_tuid += stripped != raw
                            raw = stripped
                        flagset = tuple(sorted(f.decode() for f in data[b"FLAGS"] if f.lower() != b"\\recent"))
                        digests[(hashlib.sha256(raw).hexdigest(), flagset,
                                 int(data[b"INTERNALDATE"].timestamp()))] += 1
                batch, total = ([uid], sizes[uid][b"RFC822.SIZE"]) if uid is not None else ([], 0)
            result.folders[name] = digests
    return result


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How a copy differs from the source."""

    same_folders: bool
    bodies_differ: int  # copy messages whose bytes are in no source message of the folder (multiset)
    missing: int  # source messages whose bytes are in no copy of the folder (multiset)
    meta_differ: int  # copies whose bytes match but whose flags or INTERNALDATE do not


def compare(source: Snapshot, copy: Snapshot) -> Comparison:
    """Compare two snapshots folder by folder, as multisets (duplicates count twice)."""
    bodies_differ = missing = meta_differ = 0
    for name in set(source.folders) | set(copy.folders):
        want = source.folders.get(name, collections.Counter())
        have = copy.folders.get(name, collections.Counter())
        want_bodies = collections.Counter()
        have_bodies = collections.Counter()
        for (digest, _flags, _date), count in want.items():
            want_bodies[digest] += count
        for (digest, _flags, _date), count in have.items():
            have_bodies[digest] += count
        bodies_differ += sum((have_bodies - want_bodies).values())
        missing += sum((want_bodies - have_bodies).values())
        # same bytes, other flags or date: what is left of the full triples once the bodies that differ are out
        meta_differ += sum((have - want).values()) - sum((have_bodies - want_bodies).values())
    return Comparison(set(source.folders) == set(copy.folders), bodies_differ, missing, meta_differ)


def without_keywords(shot: Snapshot) -> Snapshot:
    """The same snapshot with only system flags (\\Seen ...): to tell a lost keyword from any other difference."""
    folders = {}
    for name, items in shot.folders.items():
        kept: collections.Counter[tuple[str, tuple[str, ...], int]] = collections.Counter()
        for (digest, flags, date), count in items.items():
            kept[(digest, tuple(f for f in flags if f.startswith("\\")), date)] += count
        folders[name] = kept
    return Snapshot(folders, shot.messages, shot.bytes, shot.x_tuid)


# ------------------------------------------------------------------------------------------ the two copiers


def write_config(folder: Path, name: str, source: DovecotServer, target: DovecotServer) -> Path:
    """Write a consolidation file in the example's shape: one source (binhduong) whose mail is `source`."""
    secrets_dir = folder / "secrets"
    secrets_dir.mkdir(exist_ok=True, mode=0o700)
    files = {}
    for role, server in (("source", source), ("target", target)):
        files[role] = secrets_dir / f"{name}-{role}.pw"
        files[role].write_text(server.master_password + "\n", encoding="utf-8")
        files[role].chmod(0o600)
    bd = EXAMPLE / "sources" / "binhduong"
    # The directory tables are required by the loader but not used by `mailbox migrate`: they point at the
    # example's files so that the config stays a real one (`mailmerge-gov check` would pass on it).
    text = f"""\
# written by scripts/bench_migration.py in the shape of examples/hcm-merger/consolidation.toml
[project]
name = "Đo tốc độ chuyển hộp thư"
state_file = "state/{name}.sqlite"

[target]
name = "Thành phố Hồ Chí Minh"
code = "79"
mail_domain = "hcm.gov.vn"
base_dn = "dc=hcm,dc=gov,dc=vn"

[target.directory]
ldif = "out/directory.ldif"

[target.mail]
imap_url = "imap://{target.host}:{target.imap_port}"
admin_user = "{target.master_user}"
password_file = "{files['target']}"
login = "master"
master_separator = "{target.separator}"

[[sources]]
name = "binhduong"
unit_name = "Tỉnh Bình Dương"
code = "74"
domains = ["binhduong.gov.vn", "sotc.binhduong.gov.vn", "sotp.binhduong.gov.vn", "soyt.binhduong.gov.vn"]

[sources.directory]
ldif = "{bd / 'directory.ldif'}"
preset = "ad"
hr_csv = "{bd / 'hr.csv'}"

[sources.mail]
imap_url = "imap://{source.host}:{source.imap_port}"
admin_user = "{source.master_user}"
password_file = "{files['source']}"
login = "master"
master_separator = "{source.separator}"

[addressing]
patterns = ["{{{{ given }}}}{{{{ initials }}}}", "{{{{ given }}}}.{{{{ family }}}}"]
reserved = ["vanthu", "tiepdan", "lanhdao"]

[transition]
ends = 2027-06-30

[migration]
# one mailbox: one job (more would change nothing, there is one mailbox to copy)
jobs = 1
"""
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    load_config(path)  # refuse now, with the loader's message, rather than in the first child
    return path


def write_jobs(folder: Path) -> Path:
    """The jobs CSV: the one mailbox, to the same address on the target."""
    path = folder / "jobs.csv"
    path.write_text(f"source,source_mailbox,target_mailbox\nbinhduong,{ADDRESS},{ADDRESS}\n", encoding="utf-8")
    return path


def write_mbsyncrc(folder: Path, source: DovecotServer, target: DovecotServer) -> Path:
    """mbsync's configuration as in the notes (section 5), with master-user logins on both sides."""
    state = folder / "mbsync-state"
    state.mkdir(exist_ok=True)
    accounts = []
    for label, server in (("src", source), ("dst", target)):
        accounts.append(f"""\
IMAPAccount {label}
Host {server.host}
Port {server.imap_port}
User {server.master_login(ADDRESS)}
Pass {server.master_password}
SSLType None
AuthMechs LOGIN
PipelineDepth 50

IMAPStore {label}
Account {label}
""")
    # comments on their own lines only (notes): mbsync reads a trailing comment as part of the value
    text = "\n".join(accounts) + f"""
Channel mig
Far :src:
Near :dst:
Patterns *
Create Near
Sync Pull
# SyncState is required for IMAP to IMAP (a directory, trailing /)
SyncState {state}/
CopyArrivalDate yes
Expunge None
"""
    path = folder / "mbsyncrc"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # it holds the master password
    return path


def server_cpu(server: DovecotServer) -> float:
    """CPU seconds of a Dovecot: its master's own and those of its children it has reaped (the imap processes)."""
    assert server.proc is not None
    # An imap process ends with its connection, but its time reaches the master's cutime only once the master
    # has reaped it: wait (bounded) until no imap process of the instance is left.
    for _ in range(200):
        if not [pid for pid, state, _ppid in group_members(server.proc.pid)
                if state != "Z" and process_name(pid) == "imap"]:
            break
        time.sleep(0.01)
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    """The command name of a process, "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def run_between(args: list[str], folder: Path, name: str, source: DovecotServer, target: DovecotServer,
                ok_codes: tuple[int, ...] = (0,)) -> tuple[Run, float, float]:
    """Run a copier; return its Run and the CPU seconds the source and the target Dovecot spent meanwhile."""
    # The copiers differ in how they keep the servers busy (mbsync pipelines one APPEND per message,
    # mailmerge-gov alternates FETCH and MULTIAPPEND batches): the servers' CPU tells where the wall time goes.
    before = server_cpu(source), server_cpu(target)
    run = run_child(args, folder, name, ok_codes)
    return run, server_cpu(source) - before[0], server_cpu(target) - before[1]


def migrate_args(config: Path, jobs: Path) -> list[str]:
    """The command line of one `mailbox migrate`, the way an administrator runs it."""
    return ["-m", "mailmerge_gov", "mailbox", "migrate", "-c", str(config), "--from-csv", str(jobs)]


def copied_by(run: Run) -> tuple[int, int]:
    """Messages and bytes that `mailbox migrate` says it copied."""
    found = re.search(r"copied (\d+) messages \((\d+) bytes\)", run.output)
    if found is None:
        raise RuntimeError(f"mailbox migrate printed no 'copied N messages' line:\n{run.output[-2000:]}")
    return int(found.group(1)), int(found.group(2))


def profile(folder: Path, source: DovecotServer, jobs: Path) -> str:
    """A first pass into a fresh Dovecot under cProfile; return its top costs as text."""
    target = DovecotServer("profile")
    target.add_user(ADDRESS, "bench-pass")
    try:
        target.start()
        config = write_config(folder, "profile", source, target)
        stats_file = folder / "migrate.pstats"
        run = run_child([sys.executable, "-m", "cProfile", "-o", str(stats_file), *migrate_args(config, jobs)],
                        folder, "migrate-profiled")
    finally:
        target.stop()
    out = io.StringIO()
    out.write(f"cProfile of a first pass (wall {run.seconds:.1f} s under the profiler, CPU {run.cpu:.1f} s)\n")
    stats = pstats.Stats(str(stats_file), stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(35)
    return out.getvalue()


# ------------------------------------------------------------------------------------------ the benchmark


def rates(messages: int, size: int, seconds: float) -> str:
    """Messages per second and MB per second."""
    return f"{messages / seconds:,.0f} msg/s, {size / seconds / 1e6:,.1f} MB/s"


def describe(generated: Generated) -> str:
    """The generated mailbox in a few lines: total, size classes, folders, oddities."""
    lines = [f"generated {generated.messages:,} messages, {generated.bytes / 1e6:,.1f} MB, in "
             f"{generated.seconds:.1f} s ({generated.messages / generated.seconds:,.0f} msg/s, "
             f"{generated.bytes / generated.seconds / 1e6:,.1f} MB/s through MULTIAPPEND)"]
    for name, *_rest in SIZE_CLASSES:
        count = generated.classes[name]
        lines.append(f"    {name:>12}: {count:6,} messages ({count / generated.messages:5.1%}), "
                     f"{generated.class_bytes[name] / 1e6:8,.1f} MB")
    lines.append("    folders: " + ", ".join(f"{name} {count:,}" for name, count in
                                            sorted(generated.by_folder.items(), key=lambda item: -item[1])))
    lines.append(f"    {generated.with_attachment:,} with a base64 attachment, {generated.duplicates} exact "
                 f"duplicates, {generated.without_id} without Message-ID")
    return "\n".join(lines)


def benchmark(folder: Path, messages: int, folders: int, seed: int, with_profile: bool) -> tuple[list[Row], str]:
    """Run every step in `folder`; return the table's rows and the profile (empty without --profile)."""
    mbsync = require_program("mbsync", "isync")
    password = "bench-pass"  # the user's own password, the same on every server; the copiers use the master user
    servers = {role: DovecotServer(role) for role in ("src", "mmg", "mbsync")}
    rows: list[Row] = []
    report = ""
    try:
        for server in servers.values():
            server.add_user(ADDRESS, password)
            server.start()
        source, ours, theirs = servers["src"], servers["mmg"], servers["mbsync"]
        generated = generate(source, password, messages, folders, seed)
        print(describe(generated), flush=True)
        rows.append(Row(f"generate: {generated.messages:,} messages, {len(generated.by_folder)} folders",
                        f"{generated.seconds:,.1f} s", rates(generated.messages, generated.bytes, generated.seconds)))

        config = write_config(folder, "bench", source, ours)
        jobs = write_jobs(folder)
        python = sys.executable
        first, first_src, first_dst = run_between([python, *migrate_args(config, jobs)], folder, "migrate-1", source,
                                                   ours)
        copied, copied_bytes = copied_by(first)
        print(f"mailmerge-gov first pass: {first.seconds:.1f} s, copied {copied:,} messages", flush=True)
        second = run_child([python, *migrate_args(config, jobs)], folder, "migrate-2")
        again, _ = copied_by(second)
        print(f"mailmerge-gov second pass: {second.seconds:.2f} s, copied {again}", flush=True)
        # verify exits 1 when something is missing: a result to report, not a failed step
        check = run_child([python, "-m", "mailmerge_gov", "mailbox", "verify", "-c", str(config), "--from-csv",
                           str(jobs)], folder, "verify", ok_codes=(0, 1))
        verified = next((line for line in check.output.splitlines() if line.startswith("verified ")), "")
        verify_ok = check.code == 0 and verified.endswith("nothing missing")

        rc = write_mbsyncrc(folder, source, theirs)
        sync1, sync_src, sync_dst = run_between([mbsync, "-c", str(rc), "-q", "mig"], folder, "mbsync-1", source,
                                                 theirs)
        print(f"mbsync first run: {sync1.seconds:.1f} s", flush=True)
        sync2 = run_child([mbsync, "-c", str(rc), "-q", "mig"], folder, "mbsync-2")

        began = time.perf_counter()
        original = snapshot(source)
        mine = snapshot(ours)
        other = snapshot(theirs, strip_x_tuid=True)
        print(f"read back the three mailboxes in {time.perf_counter() - began:.1f} s", flush=True)
        ours_vs = compare(original, mine)
        theirs_vs = compare(original, other)
        # mbsync's copies with X-TUID taken out: compare() counted the copies whose bytes still differ after that
        mbsync_copied = other.messages
        original_count = original.messages

        reference = mbsync_copied / sync1.seconds
        rate = copied / first.seconds
        rows += [
            Row(f"mailmerge-gov first pass: {copied:,} messages", f"{first.seconds:,.1f} s",
                rates(copied, copied_bytes, first.seconds), f">= {SPEED_RATIO:.1f}x mbsync",
                verdict(rate >= SPEED_RATIO * reference) + f" ({rate / reference:.2f}x)"),
            Row("     CPU (user+sys) and peak RSS of the command", f"{first.cpu:,.1f} s",
                f"{first.max_rss / 1e6:,.0f} MB"),
            Row("     CPU of the source and target Dovecot meanwhile", f"{first_src:,.1f} s", f"{first_dst:,.1f} s"),
            Row(f"mbsync first run: {mbsync_copied:,} messages", f"{sync1.seconds:,.1f} s",
                rates(mbsync_copied, other.bytes, sync1.seconds)),
            Row("     CPU (user+sys) and peak RSS of mbsync", f"{sync1.cpu:,.1f} s", f"{sync1.max_rss / 1e6:,.0f} MB"),
            Row("     CPU of the source and target Dovecot meanwhile", f"{sync_src:,.1f} s", f"{sync_dst:,.1f} s"),
            Row(f"mailmerge-gov second pass: {again} copied", f"{second.seconds:,.2f} s", "",
                f"<= {SECOND_PASS_SECONDS:.0f} s", verdict(second.seconds <= SECOND_PASS_SECONDS and again == 0)),
            Row("mbsync second run", f"{sync2.seconds:,.2f} s"),
            Row(f"mailmerge-gov verify: {verified.partition(': ')[2] or f'exit code {check.code}'}",
                f"{check.seconds:,.1f} s", rates(original_count, generated.bytes, check.seconds),
                "nothing missing", verdict(verify_ok)),
        ]
        identical = (ours_vs.same_folders and ours_vs.bodies_differ == 0 and ours_vs.missing == 0
                     and mine.messages == original.messages)
        rows.append(Row("mailmerge-gov copies byte-identical",
                        "yes" if identical else f"NO: {ours_vs.bodies_differ} differ, {ours_vs.missing} missing"
                        + ("" if ours_vs.same_folders else ", folders differ"), f"{mine.messages:,} messages",
                        "yes", verdict(identical)))
        rows.append(Row("mailmerge-gov flags and INTERNALDATE", "same" if ours_vs.meta_differ == 0
                        else f"{ours_vs.meta_differ} differ", "", "same", verdict(ours_vs.meta_differ == 0)))
        rows.append(Row("mbsync copies not byte-identical (X-TUID added)", f"{other.x_tuid:,} of {mbsync_copied:,}"))
        rows.append(Row("     differing once X-TUID is taken out",
                        f"{theirs_vs.bodies_differ:,}" + (f", {theirs_vs.missing:,} missing" if theirs_vs.missing
                                                           else "")
                        + ("" if theirs_vs.same_folders else ", folders differ")))
        # mbsync 1.4 copies system flags only: count what differs beyond the keywords separately
        beyond = compare(without_keywords(original), without_keywords(other)).meta_differ
        rows.append(Row("     flags or INTERNALDATE differ (mbsync)", f"{theirs_vs.meta_differ:,}",
                        f"{theirs_vs.meta_differ - beyond:,} lost keywords only" if theirs_vs.meta_differ else ""))
        if beyond:
            rows.append(Row("     ... differing in system flags or date", f"{beyond:,}"))
        if with_profile:
            report = profile(folder, source, jobs)
    finally:
        for server in servers.values():
            server.stop()
    return rows, report


def versions() -> str:
    """Dovecot's and mbsync's versions, for the table's heading."""
    dovecot = subprocess.run([require_program("dovecot", "dovecot-core"), "--version"], capture_output=True,
                             text=True).stdout.split()
    isync = subprocess.run([require_program("mbsync", "isync"), "--version"], capture_output=True, text=True)
    return f"Dovecot {dovecot[0] if dovecot else '?'}, {(isync.stdout or isync.stderr).strip() or 'mbsync ?'}"


def print_table(rows: list[Row], messages: int, folders: int, loads: tuple[float, float]) -> None:
    """Print the figures side by side."""
    print(f"\nmailmerge-gov mailbox migration benchmark: {messages:,} messages in {folders} folders, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, {versions()}, "
          "Dovecot mail_fsync = never")
    # the copiers and the three Dovecots share the machine's cores: other work on it moves every figure
    print(f"load average (1 min) before and after: {loads[0]:.2f}, {loads[1]:.2f}")
    print_rows(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages in the mailbox (default 10,000)")
    parser.add_argument("--folders", type=int, default=10, help="folders, INBOX included (default 10)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, logs, state)")
    parser.add_argument("--profile", action="store_true",
                        help="also run a first pass under cProfile and print its top costs")
    args = parser.parse_args(argv)
    if args.messages < 10:
        parser.error("--messages: at least 10")
    if not 1 <= args.folders <= 100:
        parser.error("--folders: from 1 to 100")
    load_before = os.getloadavg()[0]
    with work_folder("mmg-bench-mail-", args.keep) as folder:
        try:
            rows, report = benchmark(folder, args.messages, args.folders, args.seed, args.profile)
        except (RuntimeError, ConfigError, subprocess.CalledProcessError, imapclient.exceptions.IMAPClientError,
                OSError) as exc:
            return stopped(exc)
    print_table(rows, args.messages, args.folders, (load_before, os.getloadavg()[0]))
    if report:
        print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
