#!/usr/bin/env python3
"""Generate the bundled example consolidation: Bình Dương and Bà Rịa–Vũng Tàu merge into TP.HCM.

Usage: python scripts/generate_example.py [--seed N] [--out DIR]

Writes old directories (LDIF in three presets, an HR CSV), the unit mapping file, Maildir
mailboxes and MANIFEST.json. The output is a pure function of the seed: no clock, no host
name, no package data read at run time (ward names are copied into WARDS below), so the
committed example can be checked byte for byte by tests/test_example.py.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import quopri
import random
import shutil
import sys
import textwrap
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

# Dovecot stores Maildir++ folder names in IMAP modified UTF-7 (RFC 3501 5.1.3); imapclient's
# encoder is the reference implementation the migration code uses too, so names agree exactly.
from imapclient import imap_utf7

from mailmerge_gov.vietnamese import fold, split_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "examples" / "hcm-merger"
DEFAULT_SEED = 20250701  # the day the merger took effect
OWNED = ("sources", "structure.csv", "MANIFEST.json")  # the rest of the example is the lead's
# Asia/Ho_Chi_Minh is UTC+7 all year (no DST since 1975); a fixed offset needs no tzdata.
TZ = timezone(timedelta(hours=7))
FIRST_DAY, DAYS = datetime(2024, 1, 2, tzinfo=TZ), 698  # messages from 2024-01-02 to 2025-11-30


@dataclass(frozen=True)
class Source:
    """One old mail system and directory."""

    key: str
    code: int
    domain: str
    org: str  # province name as the source spells it (base entry `o`, structure.csv)
    people: int  # officials, role accounts not included
    mailboxes: int  # officials with a Maildir (role mailboxes not included)
    disabled: tuple[str, ...]  # how this preset disables accounts, one value per account


SOURCES = (
    Source("hcm", 79, "hcm.gov.vn", "Thành phố Hồ Chí Minh", 300, 12, ("ppolicy",) * 6),
    Source("binhduong", 74, "binhduong.gov.vn", "Tỉnh Bình Dương", 250, 10, ("514",) * 5 + ("66050",)),
    Source("baria-vungtau", 77, "baria-vungtau.gov.vn", "Tỉnh Bà Rịa - Vũng Tàu", 220, 8,
           ("locked",) * 3 + ("closed",) * 4),
)
NEW_PROVINCE = (79, "Thành phố Hồ Chí Minh")

# Departments of the new TP.HCM: code suffix, name, share of staff.
DEPARTMENTS = (
    ("STC", "Sở Tài chính", 3), ("SNV", "Sở Nội vụ", 2), ("STP", "Sở Tư pháp", 2),
    ("SYT", "Sở Y tế", 3), ("SGDDT", "Sở Giáo dục và Đào tạo", 3),
    ("VPUB", "Văn phòng UBND Thành phố", 3), ("SXD", "Sở Xây dựng", 2),
    ("SKHCN", "Sở Khoa học và Công nghệ", 1), ("TTR", "Thanh tra Thành phố", 1),
)
# How each absorbed source spells its departments: old code suffix, name, new department
# (None: no counterpart, a person decides). Sở KH&ĐT went into Sở Tài chính in March 2025;
# Sở LĐ-TB&XH was split between Nội vụ and Y tế, so it cannot be mapped by name.
OLD_DEPARTMENTS = {
    "binhduong": (
        ("STC", "Sở Tài chính tỉnh Bình Dương", "STC"), ("SNV", "Sở Nội vụ tỉnh Bình Dương", "SNV"),
        ("STP", "Sở Tư pháp tỉnh Bình Dương", "STP"), ("SYT", "Sở Y tế tỉnh Bình Dương", "SYT"),
        ("SGDDT", "Sở Giáo dục và Đào tạo tỉnh Bình Dương", "SGDDT"),
        ("VPUB", "Văn phòng UBND tỉnh Bình Dương", "VPUB"), ("SXD", "Sở Xây dựng tỉnh Bình Dương", "SXD"),
        ("TTR", "Thanh tra tỉnh Bình Dương", "TTR"),
        ("BQLKCN", "Ban Quản lý các Khu công nghiệp Bình Dương", None),
    ),
    "baria-vungtau": (
        ("STC", "Sở Tài chính", "STC"), ("SNV", "Sở Nội vụ", "SNV"), ("STP", "Sở Tư pháp", "STP"),
        ("SYT", "Sở Y tế", "SYT"), ("SGDDT", "Sở GD&ĐT", "SGDDT"), ("VPUB", "Văn phòng UBND tỉnh", "VPUB"),
        ("SXD", "Sở Xây dựng", "SXD"), ("SKHDT", "Sở Kế hoạch và Đầu tư", "STC"),
        ("SLDTBXH", "Sở Lao động - Thương binh và Xã hội", None),
    ),
}
# Old wards/communes and their 2025 successors, copied from vietnam-provinces 2026.9.0
# (legacy.Ward and _ward_conversion_2025): code, name, district, partly merged, new wards.
WARDS = {
    "hcm": (
        (26740, "Phường Bến Nghé", "Quận 1", False, ((26740, "Phường Sài Gòn"),)),
        (26734, "Phường Tân Định", "Quận 1", False, ((26737, "Phường Tân Định"),)),
        (26746, "Phường Nguyễn Thái Bình", "Quận 1", True, ((26740, "Phường Sài Gòn"), (26743, "Phường Bến Thành"))),
        (26758, "Phường Nguyễn Cư Trinh", "Quận 1", False, ((26758, "Phường Cầu Ông Lãnh"),)),
        (27148, "Phường 4", "Quận 3", True, ((27139, "Phường Xuân Hòa"), (27154, "Phường Bàn Cờ"))),
        (27160, "Phường 1", "Quận 3", False, ((27154, "Phường Bàn Cờ"),)),
        (26815, "Phường Linh Chiểu", "Thành phố Thủ Đức", False, ((26824, "Phường Thủ Đức"),)),
        (27562, "Xã Tân Hiệp", "Huyện Hóc Môn", False, ((27559, "Xã Hóc Môn"),)),
        (27646, "Xã Phước Kiển", "Huyện Nhà Bè", False, ((27655, "Xã Nhà Bè"),)),
    ),
    "binhduong": (
        (25753, "Phường Phú Thọ", "Thành phố Thủ Dầu Một", False, ((25747, "Phường Thủ Dầu Một"),)),
        (25741, "Phường Hiệp Thành", "Thành phố Thủ Dầu Một", True,
         ((25747, "Phường Thủ Dầu Một"), (25750, "Phường Phú Lợi"))),
        (25762, "Phường Phú Mỹ", "Thành phố Thủ Dầu Một", False, ((25760, "Phường Bình Dương"),)),
        (25942, "Phường Dĩ An", "Thành phố Dĩ An", False, ((25942, "Phường Dĩ An"),)),
        (25966, "Phường Lái Thiêu", "Thành phố Thuận An", False, ((25966, "Phường Lái Thiêu"),)),
        (25888, "Phường Uyên Hưng", "Thành phố Tân Uyên", False, ((25888, "Phường Tân Uyên"),)),
        (25843, "Phường An Tây", "Thành phố Bến Cát", False, ((25843, "Phường Tây Nam"),)),
        (25865, "Xã An Thái", "Huyện Phú Giáo", False, ((25864, "Xã Phước Thành"),)),
    ),
    "baria-vungtau": (
        (26506, "Phường 1", "Thành phố Vũng Tàu", False, ((26506, "Phường Vũng Tàu"),)),
        (26535, "Phường Rạch Dừa", "Thành phố Vũng Tàu", False, ((26536, "Phường Rạch Dừa"),)),
        (26545, "Xã Long Sơn", "Thành phố Vũng Tàu", True, ((26545, "Xã Long Sơn"),)),
        (26558, "Phường Long Tâm", "Thành phố Bà Rịa", False, ((26572, "Phường Tam Long"),)),
        (26575, "Thị trấn Ngãi Giao", "Huyện Châu Đức", False, ((26575, "Xã Ngãi Giao"),)),
        (26659, "Thị trấn Long Điền", "Huyện Long Đất", False, ((26659, "Xã Long Điền"),)),
        (26719, "Phường Mỹ Xuân", "Thị xã Phú Mỹ", False, ((26704, "Phường Phú Mỹ"),)),
        (26647, "Xã Hòa Hiệp", "Huyện Xuyên Mộc", True, ((26647, "Xã Hòa Hiệp"),)),
    ),
}
FAMILY = (("Nguyễn", 38), ("Trần", 11), ("Lê", 9), ("Phạm", 7), ("Huỳnh", 4), ("Hoàng", 2), ("Phan", 4),
          ("Võ", 4), ("Vũ", 2), ("Đặng", 2), ("Bùi", 2), ("Đỗ", 2), ("Hồ", 2), ("Ngô", 1), ("Dương", 1), ("Lý", 1))
MIDDLE = {"M": ("Văn", "Văn", "Văn", "Hữu", "Minh", "Đức", "Quốc", "Thanh", "Công", "Hoàng", "Ngọc", "Trọng", "Xuân"),
          "F": ("Thị", "Thị", "Thị", "Ngọc", "Thanh", "Thu", "Kim", "Mỹ", "Thị Ngọc", "Thị Thu", "Thị Kim", "Phương")}
GIVEN = {"M": ("An", "Bình", "Cường", "Dũng", "Đức", "Hải", "Hùng", "Huy", "Khoa", "Long", "Minh", "Nam", "Phong",
               "Phúc", "Quang", "Sơn", "Tâm", "Thắng", "Thành", "Toàn", "Trung", "Tuấn", "Việt", "Vinh"),
         "F": ("Anh", "Ánh", "Châu", "Dung", "Giang", "Hà", "Hạnh", "Hằng", "Hoa", "Hương", "Lan", "Linh", "Mai",
               "My", "Nga", "Ngân", "Nhung", "Oanh", "Phương", "Quyên", "Thảo", "Thủy", "Trang", "Vân", "Yến")}
TITLES = {"dept": (("Chuyên viên", 50), ("Chuyên viên chính", 15), ("Phó Trưởng phòng", 10), ("Trưởng phòng", 6),
                   ("Phó Giám đốc", 3), ("Cán sự", 5), ("Kế toán", 4), ("Văn thư", 3), ("", 4)),
          "ward": (("Công chức Văn phòng - Thống kê", 20), ("Công chức Tư pháp - Hộ tịch", 15),
                   ("Công chức Địa chính - Xây dựng", 15), ("Công chức Văn hóa - Xã hội", 15),
                   ("Công chức Tài chính - Kế toán", 12), ("Phó Chủ tịch UBND", 6), ("Chủ tịch UBND", 3), ("", 4))}
# The deliberate cases: source, name exactly as the source spells it, gender, unit key
# (department code or old ward code; None = no unit), gets a mailbox, tag.
DELIBERATE = (
    ("hcm", "Nguyễn Văn An", "M", "STC", False, "collision"),
    ("hcm", "Nguyễn Văn An", "M", "STC", False, "collision"),  # same OU as the first
    ("hcm", "Nguyễn Văn An", "M", "26740", True, "collision"),
    ("hcm", "Tôn Nữ Thị Lan", "F", "SNV", False, "compound"),
    ("hcm", "Lê  Văn Tám", "M", "STP", True, "double space"),
    ("hcm", "Lý Hùng", "M", "TTR", False, "no middle name"),
    ("binhduong", "Nguyễn Văn An", "M", "STC", True, "collision"),
    ("binhduong", "Nguyễn Văn An", "M", "25753", False, "collision"),
    ("binhduong", "Trần Thị Thu Hà", "F", "STP", True, "moved"),
    ("binhduong", "Tôn Thất Quang", "M", "SXD", False, "compound"),
    ("baria-vungtau", "Trần Thị Thu Hà", "F", "STP", True, "moved"),
    ("baria-vungtau", "Nguyễn Văn An", "M", "SYT", False, "collision"),
)
# The official who moved from Bình Dương to Bà Rịa–Vũng Tàu: same citizen id and birth date.
MOVED = ("1986-04-17", "074186004217")
ROLE_ACCOUNTS = {  # local part, display name, unit; marked `description: Hộp thư chức năng`
    "hcm": (("vanthu", "Văn thư UBND Thành phố", "VPUB"), ("postmaster", "Quản trị hệ thống thư", "VPUB"),
            ("tiepdan", "Ban Tiếp công dân Thành phố", "VPUB"), ("sotaichinh", "Sở Tài chính - Hộp thư chung", "STC")),
    "binhduong": (("vanthu", "Văn thư UBND tỉnh Bình Dương", "VPUB"), ("postmaster", "Postmaster", "VPUB"),
                  ("sonoivu", "Sở Nội vụ - Hộp thư chung", "SNV")),
    "baria-vungtau": (("vanthu", "Văn thư UBND tỉnh", "VPUB"), ("tiepdan", "Tiếp công dân tỉnh", "VPUB"),
                      ("postmaster", "Postmaster", "VPUB")),
}
ROLE_MAILBOX = ("hcm", "vanthu")
AD_FINANCE = "Sở Tài chính tỉnh Bình Dương"  # the OU that holds Bình Dương's one non-admin group
# Old per-department mail domains still listed as aliases (Bình Dương) and the pre-rename
# domains (TP.HCM's tphcm.gov.vn, Bà Rịa–Vũng Tàu's brvt.gov.vn).
BD_SUBDOMAINS = {"STC": "sotc", "STP": "sotp", "SYT": "soyt"}
OLD_DOMAINS = {"hcm": ("tphcm.gov.vn",), "binhduong": tuple(f"{s}.binhduong.gov.vn" for s in BD_SUBDOMAINS.values()),
               "baria-vungtau": ("brvt.gov.vn",)}
EXTERNAL = tuple((name, address, name) for name, address in (  # name, address, unit
    ("Văn phòng Chính phủ", "vanthu@chinhphu.vn"), ("Bộ Nội vụ", "vanthu@moha.gov.vn"),
    ("Cổng Dịch vụ công quốc gia", "noreply@dichvucong.gov.vn"), ("Bộ Tài chính", "vanthu@mof.gov.vn")))
SUBJECTS = (
    "Công văn số {n}/UBND-KT về việc triển khai sắp xếp đơn vị hành chính cấp xã",
    "Quyết định số {n}/QĐ-UBND về việc điều động, bổ nhiệm công chức",
    "Báo cáo kết quả thực hiện nhiệm vụ tháng {m}/{y}",
    "Giấy mời họp giao ban {unit}",
    "Kế hoạch tổ chức Hội nghị tổng kết công tác năm {y}",
    "Thông báo lịch tiếp công dân tháng {m}/{y}",
    "Đề nghị cung cấp số liệu phục vụ đề án sắp xếp, hợp nhất tỉnh",
    "V/v cập nhật danh bạ điện tử và địa chỉ thư công vụ sau sắp xếp",
    "Tờ trình số {n}/TTr-STC về dự toán ngân sách năm {y}",
    "Báo cáo tình hình giải ngân vốn đầu tư công quý {q}/{y}",
    "Hướng dẫn bàn giao hồ sơ, tài liệu khi sắp xếp tổ chức bộ máy",
    "Thông báo kết luận cuộc họp ngày {d}/{m}/{y}",
)
PARAGRAPHS = (
    "Thực hiện Kế hoạch số {n}/KH-UBND ngày {d}/{m}/{y} của Ủy ban nhân dân {org} về việc sắp xếp tổ chức "
    "bộ máy, {unit} đề nghị các đơn vị rà soát, tổng hợp số liệu và gửi về trước ngày {d2}/{m}/{y}.",
    "Đề nghị đồng chí nghiên cứu, cho ý kiến đối với dự thảo văn bản đính kèm.",
    "Hồ sơ gồm: tờ trình, dự thảo quyết định và báo cáo thẩm định của cơ quan chuyên môn.",
    "{unit} gửi kèm theo đây báo cáo kết quả thực hiện nhiệm vụ tháng {m} năm {y} để lãnh đạo theo dõi, chỉ đạo.",
    "Kính đề nghị lãnh đạo xem xét, cho ý kiến chỉ đạo để đơn vị kịp thời triển khai thực hiện.",
    "Thời gian: {h} giờ 00, ngày {d2}/{m}/{y}. Địa điểm: Phòng họp số 2, trụ sở {unit}.",
    "Trong quá trình thực hiện, nếu có vướng mắc, đề nghị liên hệ đồng chí {sender} để được hướng dẫn.",
)
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"


@dataclass(eq=False)
class Unit:
    """An old unit as a source spells it, and where it goes in the new organisation."""

    key: str
    name: str
    old_code: str
    new_code: str
    new_name: str
    status: str
    kind: str  # "dept" or "ward"
    weight: float


@dataclass(eq=False)
class Person:
    """One directory account (an official or a role mailbox) during generation."""

    source: Source
    name: str  # as the source spells it: may be upper-case, NFD or double-spaced
    gender: str
    unit: Unit | None
    title: str = ""
    hr_unit: Unit | None = None  # the unit HR knows, even when the directory has none
    mailbox: bool = False
    role: bool = False
    tag: str = ""  # why a deliberate case is there ("moved", "collision" ...)
    dirt: str = ""  # "upper" or "nfd"
    disabled: str = ""  # the preset's own value, "" when enabled
    local: str = ""
    emp_id: str = ""
    citizen_id: str = ""
    dob: str = ""
    phone: str = ""
    mobile: str = ""
    aliases: list[str] = field(default_factory=list)
    rdn: str = ""  # the cn of the AD entry, unique within its OU

    @property
    def address(self) -> str:
        """The primary old address."""
        return f"{self.local}@{self.source.domain}"


# ---------------------------------------------------------------------------------------------
# Units and people


def build_units(src: Source) -> list[Unit]:
    """Return the old units of one source with their new counterparts."""
    new = {code: name for code, name, _ in DEPARTMENTS}
    weights = {code: w for code, _, w in DEPARTMENTS}
    depts = OLD_DEPARTMENTS.get(src.key, tuple((c, n, c) for c, n, _ in DEPARTMENTS))
    units = [Unit(c, n, f"{src.code}.{c}", f"79.{t}" if t else "", new.get(t, ""), "ok" if t else "needs review",
                  "dept", weights.get(c, 1.5)) for c, n, t in depts]
    for code, name, district, partly, targets in WARDS[src.key]:
        # Numbered wards repeat in every district, so the old directories add the district.
        spelled = f"UBND {name} {district.removeprefix('Thành phố ')}" if name[-1].isdigit() else f"UBND {name}"
        single = len(targets) == 1
        units.append(Unit(str(code), spelled, str(code), str(targets[0][0]) if single else "",
                          f"UBND {targets[0][1]}" if single else "", "needs review" if partly else "ok", "ward", 1.2))
    return units


def random_name(rng: random.Random, gender: str) -> str:
    """Return a plausible Vietnamese full name."""
    family = rng.choices([f for f, _ in FAMILY], [w for _, w in FAMILY])[0]
    return f"{family} {rng.choice(MIDDLE[gender])} {rng.choice(GIVEN[gender])}"


def make_people(src: Source, units: list[Unit], rng: random.Random) -> list[Person]:
    """Return the officials of one source, deliberate cases shuffled in among random ones."""
    by_key = {u.key: u for u in units}
    people = [Person(src, name, g, by_key[u] if u else None, mailbox=mb, tag=tag)
              for s, name, g, u, mb, tag in DELIBERATE if s == src.key]
    while len(people) < src.people:
        gender = rng.choice("MF")
        people.append(Person(src, random_name(rng, gender), gender, rng.choices(units, [u.weight for u in units])[0]))
    rng.shuffle(people)
    for p in people:
        p.hr_unit = p.unit
        p.title = rng.choices(*zip(*TITLES[p.unit.kind]))[0]
    plain = [p for p in people if not p.tag]
    picks = rng.sample(plain, len(src.disabled) + 2 + (9 if src.key == "baria-vungtau" else 0))
    for p, how in zip(picks, src.disabled):
        p.disabled = how
    for p in picks[len(src.disabled):len(src.disabled) + 2]:
        p.unit = None  # the account lost its unit; HR still knows it
    if src.key == "baria-vungtau":  # real-world dirt: names typed in capitals, NFD from a Mac
        for i, p in enumerate(picks[len(src.disabled) + 2:]):
            p.dirt = "upper" if i < 5 else "nfd"
            p.name = p.name.upper() if i < 5 else unicodedata.normalize("NFD", p.name)
    return people


def old_local(src: Source, name: str) -> str:
    """Return the local part the old system's convention builds from a name."""
    parts = split_name(name)
    given = fold(parts.given).replace(" ", "")
    if src.key == "hcm":
        return f"{given}{parts.initials}"  # annv
    if src.key == "binhduong":
        return f"{given}.{fold(parts.family + ' ' + parts.middle).replace(' ', '')}"  # an.nguyenvan
    return f"{parts.initials}{given}"  # nvan


def assign_identifiers(src: Source, people: list[Person], rng: random.Random) -> None:
    """Give every person a unique address, aliases, ids and phone numbers, in list order."""
    taken = {local for local, _, _ in ROLE_ACCOUNTS[src.key]}
    rdns: set[tuple[str, str]] = set()
    ids = rng.sample(range(100000, 1000000), len(people))
    citizen_ids: set[str] = set()
    for p, number in zip(people, ids):
        base = old_local(src, p.name)
        local, k = base, 1
        while local in taken:  # annv, annv2, annv3 ... in directory order
            k += 1
            local = f"{base}{k}"
        p.local = local
        taken.add(local)
        dob = datetime(1965, 1, 1) + timedelta(days=rng.randrange(35 * 365))
        p.dob = dob.strftime("%Y-%m-%d")
        birth_province = rng.choice((src.code,) * 6 + (38, 40, 52, 80))
        century = {"M": 0, "F": 1}[p.gender] + (2 if dob.year >= 2000 else 0)
        p.citizen_id = f"{birth_province:03d}{century}{dob.year % 100:02d}{rng.randrange(10**6):06d}"
        while p.citizen_id in citizen_ids:
            # Six random digits repeat by chance among tens of thousands of people (the benchmark's
            # scale); a redraw only happens then, so the example's RNG stream, and its bytes, stay.
            p.citizen_id = f"{birth_province:03d}{century}{dob.year % 100:02d}{rng.randrange(10**6):06d}"
        if p.tag == "moved":
            p.dob, p.citizen_id = MOVED
        assert p.citizen_id not in citizen_ids
        citizen_ids.add(p.citizen_id)
        p.emp_id = {"hcm": f"79{number}", "binhduong": f"BD{number:06d}", "baria-vungtau": p.citizen_id}[src.key]
        mobile = f"0{rng.choice((90, 91, 93, 94, 97, 98, 77, 79, 86, 33))}{rng.randrange(10**7):07d}"
        p.mobile = f"{mobile[:4]} {mobile[4:7]} {mobile[7:]}" if src.key == "hcm" else mobile
        p.phone = {"hcm": f"028 38{rng.randrange(10, 99)} {rng.randrange(10**4):04d}",
                   "binhduong": f"0274 38{rng.randrange(10, 99)} {rng.randrange(10**3):03d}",
                   "baria-vungtau": f"+84 254 385 {rng.randrange(10**4):04d}"}[src.key]
        full = fold(p.name).replace(" ", "")  # nguyenvanan, an older convention kept as alias
        if src.key == "hcm" and rng.random() < 0.1:
            if full not in taken:  # two Nguyễn Văn An with this alias: rare at 300 people, common at 30,000
                taken.add(full)
                p.aliases.append(f"{full}@tphcm.gov.vn")
        elif src.key == "binhduong":
            if p.unit and p.unit.key in BD_SUBDOMAINS:
                p.aliases.append(f"{local}@{BD_SUBDOMAINS[p.unit.key]}.binhduong.gov.vn")
            if rng.random() < 0.25 and full not in taken:
                taken.add(full)
                p.aliases.append(f"{full}@binhduong.gov.vn")
        elif src.key == "baria-vungtau":
            p.aliases.append(f"{local}@brvt.gov.vn")
            if rng.random() < 0.35 and full not in taken:
                taken.add(full)
                p.aliases.append(f"{full}@baria-vungtau.gov.vn")
        # AD needs a unique cn per container: admins append a number, displayName keeps the name.
        ou, p.rdn, k = (p.unit.name if p.unit else ""), p.name, 1
        while (ou, p.rdn) in rdns:
            k += 1
            p.rdn = f"{p.name} {k}"
        rdns.add((ou, p.rdn))


def role_accounts(src: Source, units: list[Unit]) -> list[Person]:
    """Return the role (functional) mailboxes of one source."""
    by_key = {u.key: u for u in units}
    return [Person(src, name, "", by_key[unit], role=True, local=local, hr_unit=by_key[unit], rdn=name)
            for local, name, unit in ROLE_ACCOUNTS[src.key]]


@dataclass(eq=False)
class Group:
    """A group of one old directory: its name, what it is for, its members."""

    name: str  # cn as the directory spells it
    description: str
    members: list[Person]
    privileged: bool  # administrators: their memberships need a sign-off before they carry over
    external: tuple[str, ...] = ()  # member addresses outside the directory (Zimbra lists only)


def make_groups(src: Source, accounts: list[Person]) -> list[Group]:
    """Return a few groups per source, members picked in directory order (no RNG, so the rest stays)."""
    staff = [p for p in accounts if not p.role]
    role = {p.local: p for p in accounts if p.role}
    office = [p for p in staff if p.unit and p.unit.key == "VPUB" and not p.tag and not p.disabled]
    # one disabled account among the administrators: the case a review must catch
    admins = office[:2] + [p for p in staff if p.disabled][:1]
    finance = [p for p in staff if p.unit and p.unit.key == "STC" and not p.tag and not p.disabled]
    if src.key == "hcm":
        leaders = [p for p in finance if p.title in ("Phó Giám đốc", "Trưởng phòng", "Phó Trưởng phòng")]
        return [Group("quantri-thu", "Quản trị hệ thống thư điện tử", [role["postmaster"], *admins], True),
                Group("lanhdao-so-tai-chinh", "Lãnh đạo Sở Tài chính", leaders[:4], False),
                Group("ketoan", "Kế toán các đơn vị", [p for p in staff if p.title == "Kế toán"][:4], False)]
    if src.key == "binhduong":
        return [Group("Domain Admins", "Designated administrators of the domain", admins, True),
                Group("Mail Admins", "Quản trị hệ thống thư", [role["postmaster"], office[0]], True),
                Group("Phong Ke toan STC", "Phòng Kế toán - Sở Tài chính", finance[:4], False)]
    return [Group("quantri", "Quản trị hệ thống thư", [role["postmaster"], *admins], True,
                  external=("hotro.thudientu@vnpt.vn",)),  # the provider's support desk
            Group("vanphong", "Văn phòng UBND tỉnh", [role["vanthu"], *office[2:5]], False)]


# ---------------------------------------------------------------------------------------------
# LDIF (RFC 2849) and CSV


def ldif_line(attr: str, value: str) -> str:
    """Return one attribute line, base64 where RFC 2849 requires it, folded at 76 columns."""
    unsafe = not value.isascii() or value[:1] in (" ", ":", "<") or value.endswith(" ") or \
        any(c in value for c in "\0\r\n")
    line = f"{attr}:: {base64.b64encode(value.encode()).decode()}" if unsafe else f"{attr}: {value}"
    parts = [line[:76]] + [" " + line[i:i + 75] for i in range(76, len(line), 75)]
    return "\n".join(parts)


def dn_value(value: str) -> str:
    """Escape one RDN value as RFC 4514 asks."""
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    out = "\\" + out if out[:1] in ("#", " ") else out
    return out[:-1] + "\\ " if out.endswith(" ") else out


def ldif(header: str, entries: list[list[tuple[str, str]]]) -> bytes:
    """Return an LDIF file: a comment header and the entries in order."""
    # No "version: 1" line: slapcat, ldifde and ldapsearch -LLL do not write one, and slapadd
    # rejects it. The comment names the generator so nobody takes the file for a real export.
    blocks = [f"# {header}\n# made by scripts/generate_example.py; all people are fictitious"]
    blocks += ["\n".join(ldif_line(a, v) for a, v in entry if v) for entry in entries]
    return ("\n\n".join(blocks) + "\n").encode()


def ldif_hcm(src: Source, units: list[Unit], people: list[Person], groups: list[Group]) -> bytes:
    """Return TP.HCM's OpenLDAP export (inetOrgPerson; ppolicy lock marks disabled accounts; groupOfNames)."""
    base = "dc=hcm,dc=gov,dc=vn"
    dns: dict[int, str] = {}
    entries = [[("dn", base), ("objectClass", "top"), ("objectClass", "dcObject"),
                ("objectClass", "organization"), ("dc", "hcm"), ("o", src.org)]]
    entries += [[("dn", f"ou={dn_value(u.name)},{base}"), ("objectClass", "organizationalUnit"), ("ou", u.name)]
                for u in units]
    for p in people:
        parts = split_name(p.name) if not p.role else None
        parent = f"ou={dn_value(p.unit.name)},{base}" if p.unit else base
        entry = [("dn", f"uid={p.local},{parent}"), *[("objectClass", c) for c in
                 ("top", "person", "organizationalPerson", "inetOrgPerson")],
                 ("uid", p.local), ("cn", p.name), ("sn", parts.family if parts else p.name),
                 ("givenName", f"{parts.middle} {parts.given}".strip() if parts else ""),
                 ("mail", p.address), *[("mail", a) for a in p.aliases],
                 ("telephoneNumber", p.phone), ("mobile", p.mobile), ("title", p.title),
                 ("ou", p.unit.name if p.unit else ""), ("employeeNumber", p.emp_id),
                 ("description", "Hộp thư chức năng" if p.role else "")]
        if p.disabled:  # ppolicy's "locked by the administrator" value
            entry.append(("pwdAccountLockedTime", "000001010000Z"))
        entries.append(entry)
        dns[id(p)] = f"uid={p.local},{parent}"
    entries.append([("dn", f"ou=groups,{base}"), ("objectClass", "organizationalUnit"), ("ou", "groups")])
    for g in groups:
        entries.append([("dn", f"cn={dn_value(g.name)},ou=groups,{base}"), ("objectClass", "groupOfNames"),
                        ("cn", g.name), ("description", g.description),
                        *[("member", dns[id(p)]) for p in g.members]])
    return ldif(f"{src.key}: OpenLDAP export (slapcat) of {src.domain}", entries)


def ldif_ad(src: Source, units: list[Unit], people: list[Person], groups: list[Group]) -> bytes:
    """Return Bình Dương's Active Directory export (userAccountControl bit 2 = disabled; groups with memberOf)."""
    base = "DC=binhduong,DC=gov,DC=vn"
    # AD keeps both directions: member on the group, memberOf (back-link) on every member.
    group_dns = [f"CN={dn_value(g.name)},{'CN=Users' if g.privileged else 'OU=' + dn_value(AD_FINANCE)},{base}"
                 for g in groups]
    member_of: dict[int, list[str]] = {}
    for g, dn in zip(groups, group_dns):
        for p in g.members:
            member_of.setdefault(id(p), []).append(dn)
    dns: dict[int, str] = {}
    entries = [[("dn", base), ("objectClass", "top"), ("objectClass", "domain"), ("objectClass", "domainDNS"),
                ("dc", "binhduong"), ("name", "binhduong")],
               [("dn", f"CN=Users,{base}"), ("objectClass", "top"), ("objectClass", "container"), ("cn", "Users")]]
    entries += [[("dn", f"OU={dn_value(u.name)},{base}"), ("objectClass", "top"),
                 ("objectClass", "organizationalUnit"), ("ou", u.name)] for u in units]
    sams: set[str] = set()
    for p in people:
        parts = split_name(p.name) if not p.role else None
        parent = f"OU={dn_value(p.unit.name)},{base}" if p.unit else f"CN=Users,{base}"
        sam, k = p.local[:20], 1  # sAMAccountName: at most 20 characters, unique in the domain
        while sam in sams:
            k += 1
            sam = f"{p.local[:20 - len(str(k))]}{k}"
        sams.add(sam)
        proxies = [f"SMTP:{p.address}"] + [f"smtp:{a}" for a in p.aliases]
        if not p.role and int(p.emp_id[2:]) % 10 == 0:  # leftovers of an Exchange migration
            proxies.append(f"X500:/o=BinhDuong/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)"
                           f"/cn=Recipients/cn={p.local}")
        entries.append([
            ("dn", f"CN={dn_value(p.rdn)},{parent}"),
            *[("objectClass", c) for c in ("top", "person", "organizationalPerson", "user")],
            ("cn", p.rdn), ("sn", f"{parts.family} {parts.middle}".strip() if parts else ""),
            ("givenName", parts.given if parts else ""), ("displayName", p.name),
            ("sAMAccountName", sam), ("userPrincipalName", p.address), ("mail", p.address),
            *[("proxyAddresses", x) for x in proxies], ("department", p.unit.name if p.unit else ""),
            ("title", p.title), ("telephoneNumber", p.phone), ("mobile", p.mobile), ("employeeID", p.emp_id),
            ("description", "Hộp thư chức năng" if p.role else ""),
            ("userAccountControl", p.disabled or ("66048" if not p.role and p.emp_id.endswith("7") else "512")),
            *[("memberOf", dn) for dn in member_of.get(id(p), [])]])
        dns[id(p)] = f"CN={dn_value(p.rdn)},{parent}"
    for g, dn in zip(groups, group_dns):
        # security groups (global, -2147483646) for the administrators; a mail-enabled distribution group (2)
        mail = [] if g.privileged else [("mail", f"ketoan.stc@{src.domain}"),
                                        ("proxyAddresses", f"SMTP:ketoan.stc@{src.domain}"),
                                        ("proxyAddresses", f"smtp:ketoan@sotc.{src.domain}")]
        entries.append([("dn", dn), ("objectClass", "top"), ("objectClass", "group"), ("cn", g.name),
                        ("sAMAccountName", g.name), ("groupType", "-2147483646" if g.privileged else "2"),
                        ("description", g.description), *mail, *[("member", dns[id(p)]) for p in g.members]])
    return ldif(f"{src.key}: Active Directory export (ldifde) of {src.domain}", entries)


def ldif_zimbra(src: Source, units: list[Unit], people: list[Person], groups: list[Group],
                rng: random.Random) -> bytes:
    """Return Bà Rịa–Vũng Tàu's Zimbra LDAP export (zimbraAccountStatus locked/closed; distribution lists)."""
    base = "dc=baria-vungtau,dc=gov,dc=vn"
    entries = [[("dn", base), ("objectClass", "dcObject"), ("objectClass", "organization"),
                ("dc", "baria-vungtau"), ("o", src.org)],
               [("dn", f"ou=people,{base}"), ("objectClass", "organizationalUnit"), ("ou", "people")]]
    for p in people:
        parts = split_name(p.name) if not p.role else None
        entries.append([
            ("dn", f"uid={p.local},ou=people,{base}"),
            *[("objectClass", c) for c in ("inetOrgPerson", "zimbraAccount", "amavisAccount")],
            ("zimbraId", str(uuid.UUID(int=rng.getrandbits(128), version=4))),
            ("uid", p.local), ("cn", p.name), ("displayName", p.name),
            ("sn", parts.family if parts else p.name), ("givenName", parts.given if parts else ""),
            ("mail", p.address), *[("mail", a) for a in p.aliases], ("zimbraMailDeliveryAddress", p.address),
            *[("zimbraMailAlias", a) for a in p.aliases], ("zimbraAccountStatus", p.disabled or "active"),
            ("ou", p.unit.name if p.unit else ""), ("title", p.title), ("telephoneNumber", p.phone),
            ("employeeNumber", p.citizen_id if not p.role else ""),
            ("description", "Hộp thư chức năng" if p.role else "")])
    for g in groups:
        # Zimbra lists members by address, not DN; one member is listed by an old alias, as happens
        members = [p.aliases[0] if i == len(g.members) - 1 and p.aliases else p.address
                   for i, p in enumerate(g.members)] + list(g.external)
        entries.append([
            ("dn", f"uid={g.name},ou=people,{base}"),
            *[("objectClass", c) for c in ("zimbraDistributionList", "zimbraMailRecipient")],
            ("zimbraId", str(uuid.UUID(int=rng.getrandbits(128), version=4))), ("uid", g.name),
            ("mail", f"{g.name}@{src.domain}"), ("zimbraMailAlias", f"{g.name}@brvt.gov.vn"),
            ("displayName", g.description), ("zimbraMailStatus", "enabled"),
            *[("zimbraMailForwardingAddress", a) for a in members]])
    return ldif(f"{src.key}: Zimbra 8.8 LDAP export of {src.domain}", entries)


def csv_bytes(rows: list[list[str]], excel: bool = False) -> bytes:
    """Return CSV text; excel=True gives what an HR system saves for Excel (BOM, CRLF)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n" if excel else "\n").writerows(rows)
    return (("\ufeff" if excel else "") + buf.getvalue()).encode()


def hr_csv(people: list[Person], rng: random.Random) -> tuple[bytes, int]:
    """Return Bình Dương's HR export: mostly the AD people, with realistic mismatches."""
    staff = [p for p in people if not p.role]
    spaced = set(map(id, rng.sample(staff, 5)))  # HR typed these phones with spaces; AD did not
    # One transfer that reached HR but not AD.
    transferred = rng.choice([p for p in staff if p.unit and p.unit.kind == "dept" and not p.tag])
    rows = [[p.emp_id, p.name, p.citizen_id, p.dob,
             "Sở Nội vụ tỉnh Bình Dương" if p is transferred else p.hr_unit.name, p.title,
             f"{p.mobile[:4]} {p.mobile[4:7]} {p.mobile[7:]}" if id(p) in spaced else p.mobile] for p in staff]
    for i, gender in enumerate("FM"):  # new hires without an AD account yet
        dob = f"{1995 + i}-0{3 + i}-1{i}"
        rows.append([f"BD{999990 + i}", random_name(rng, gender), f"074{i ^ 1}{dob[2:4]}{rng.randrange(10**6):06d}",
                     dob, staff[0].hr_unit.name, "Chuyên viên", f"09{rng.randrange(10**8):08d}"])
    rows.sort()
    header = ["employee_id", "full_name", "citizen_id", "date_of_birth", "unit", "title", "phone"]
    return csv_bytes([header] + rows, excel=True), len(rows)


def structure_csv(units: dict[str, list[Unit]], sources: Sequence[Source] = SOURCES) -> bytes:
    """Return the unit mapping file: the provinces first, then every old unit of every source."""
    rows = [["source", "old_unit", "old_code", "new_code", "new_name", "new_parent_code", "status"]]
    rows += [[s.key, s.org, str(s.code), str(NEW_PROVINCE[0]), NEW_PROVINCE[1], "", "ok"] for s in sources]
    for s in sources:
        rows += [[s.key, u.name, u.old_code, u.new_code, u.new_name, "79" if u.new_code else "", u.status]
                 for u in units[s.key]]
    return csv_bytes(rows)


# ---------------------------------------------------------------------------------------------
# Maildir


def encoded_words(text: str) -> str:
    """Return text as RFC 2047 B encoded-words of at most 64 characters, folded with LF + space."""
    if text.isascii():
        return text
    chunks = [""]
    for ch in text:
        if len((chunks[-1] + ch).encode()) > 39:
            chunks.append("")
        chunks[-1] += ch
    return "\n ".join(f"=?UTF-8?B?{base64.b64encode(c.encode()).decode()}?=" for c in chunks)


def folder_dir(name: str) -> str:
    """Return the Maildir++ directory of an IMAP folder ("" for INBOX), as Dovecot names it."""
    if name == "INBOX":
        return ""
    return "." + ".".join(imap_utf7.encode(part).decode() for part in name.split("/"))


def message(rng: random.Random, owner: Person, peer: tuple[str, str, str], kind: str, when: datetime,
            colleagues: list[Person], stats: dict[str, int]) -> bytes:
    """Return one RFC 5322 message (LF line ends) in a folder of the given kind; peer = name, address, unit."""
    n, y, m = rng.randrange(100, 2000), when.year, when.month
    me = (owner.name, owner.address, owner.unit.name if owner.unit else owner.source.org)
    sender, rcpt = (peer, me) if kind == "in" else (me, peer)
    fill = dict(n=n, y=y, m=m, q=(m - 1) // 3 + 1, d=when.day, d2=min(when.day + 7, 28), h=rng.choice((8, 9, 14)),
                unit=sender[2], org=owner.source.org.replace("Tỉnh", "tỉnh"), sender=sender[0])
    subject = rng.choice(SUBJECTS).format(**fill)
    subject = rng.choice(("", "", "", "Re: ", "TL: ", "Fwd: ")) + subject
    raw = rng.random() < 0.04  # real-world dirt: 8-bit UTF-8 straight in the header
    stats["raw_8bit_headers"] += raw

    def addr(who: tuple[str, str, str]) -> str:
        return f"{who[0] if raw else encoded_words(who[0])} <{who[1]}>"

    date = format_datetime(when - timedelta(seconds=rng.randrange(5, 600)))
    head = []
    if kind == "in":
        host = sender[1].split("@")[1]
        head += [f"Return-Path: <{sender[1]}>", f"Delivered-To: {owner.address}",
                 f"Received: from mail.{host} (mail.{host} [10.{owner.source.code}.{rng.randrange(256)}."
                 f"{rng.randrange(1, 255)}])\n\tby mail.{owner.source.domain} (Postfix) with ESMTPS id "
                 f"{rng.getrandbits(40):010X}\n\tfor <{owner.address}>; {format_datetime(when)}"]
    head += [f"Date: {date}", f"From: {addr(sender)}", f"To: {addr(rcpt)}",
             f"Subject: {subject if raw else encoded_words(subject)}"]
    if rng.random() < 0.05:
        stats["without_message_id"] += 1  # old clients and scanners; must still be migrated
    else:
        head.append(f"Message-ID: <{rng.getrandbits(64):016x}.{int(when.timestamp())}@{sender[1].split('@')[1]}>")
    head.append("MIME-Version: 1.0")
    paras = [textwrap.fill(p.format(**fill), 72) for p in rng.sample(PARAGRAPHS, rng.randint(2, 4))]
    body = "\n\n".join([f"Kính gửi: {rcpt[0]},", *paras, f"Trân trọng./\n\n{sender[0]}"]) + "\n"
    cte = rng.choices(("8bit", "quoted-printable", "base64"), (70, 15, 15))[0]
    encoded = {"8bit": body.encode(), "quoted-printable": quopri.encodestring(body.encode()),
               "base64": base64.encodebytes(body.encode())}[cte].decode()
    text = f"Content-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: {cte}\n\n{encoded}"
    if rng.random() < 0.15:  # a small attachment; multipart/mixed
        stats["with_attachment"] += 1
        boundary = f"----=_NextPart_{rng.getrandbits(48):012x}"
        if rng.random() < 0.5:
            fname, ctype, data = f"Công văn số {n}.pdf", "application/pdf", PDF + f"%%{n}\n%%EOF\n".encode()
        else:
            fname, ctype = "Danh sách cán bộ.csv", "text/csv"
            data = "STT,Họ và tên,Chức vụ\n".encode() + "".join(
                f"{i},{c.name},{c.title}\n" for i, c in enumerate(rng.sample(colleagues, 3), 1)).encode()
        attachment = (f"Content-Type: {ctype}; name=\"{encoded_words(fname)}\"\n"
                      f"Content-Disposition: attachment; filename*=UTF-8''{quote(fname)}\n"
                      f"Content-Transfer-Encoding: base64\n\n{base64.encodebytes(data).decode()}")
        head.append(f"Content-Type: multipart/mixed; boundary=\"{boundary}\"")
        text = (f"\nThis is a multi-part message in MIME format.\n\n--{boundary}\n{text}\n--{boundary}\n"
                f"{attachment}--{boundary}--\n")
    return ("\n".join(head) + "\n" + text).encode()


def random_time(rng: random.Random, year: int | None) -> datetime:
    """Return a working-hours moment in 2024–2025 (in the given year if one is given), local time."""
    while True:
        day = FIRST_DAY + timedelta(days=rng.randrange(DAYS), hours=rng.randint(7, 17), minutes=rng.randrange(60),
                                    seconds=rng.randrange(60))
        if year is None or day.year == year:
            return day


def build_mailbox(rng: random.Random, owner: Person, peers: list[tuple[str, str, str]], colleagues: list[Person],
                  files: dict[str, bytes], dirs: list[str], stats: dict[str, int], force_duplicate: bool) -> None:
    """Add one Maildir++ mailbox (folders, messages, flags in file names) to files."""
    root = f"sources/{owner.source.key}/mail/{owner.address}"
    folders = ["INBOX", rng.choice(("Sent", "Thư đã gửi")), "Drafts", "Trash", "Văn bản đến",
               "Văn bản đến/2024", "Văn bản đi"]
    folders += [f for f in ("Văn bản đi/2024", "Văn bản đến/2025", "Dự án & Đầu tư") if rng.random() < 0.4]
    weights = {"INBOX": 12, "Drafts": 1, "Trash": 1.5}
    counts = dict.fromkeys(folders, 0)
    for _ in range(rng.randint(10, 40)):
        counts[rng.choices(folders, [weights.get(f, 3) for f in folders])[0]] += 1
    pid = rng.randrange(1000, 65000)
    for folder in folders:
        path = f"{root}/{folder_dir(folder)}".rstrip("/")
        dirs.extend(f"{path}/{d}" for d in ("cur", "new", "tmp"))
        if folder != "INBOX":
            files[f"{path}/maildirfolder"] = b""  # Maildir++ marks subfolders with this empty file
        kind = "out" if folder in ("Sent", "Thư đã gửi") or folder.startswith("Văn bản đi") else \
            "draft" if folder == "Drafts" else "in"
        year = int(folder[-4:]) if folder[-4:].isdigit() else None
        batch = []
        for _ in range(counts[folder]):
            when = random_time(rng, year)
            data = message(rng, owner, rng.choice(peers), kind, when, colleagues, stats)
            flags = {"out": "S", "draft": "DS"}.get(kind) or rng.choices(
                ("S", "RS", "FS", "FRS", "PS", ""), (50, 15, 8, 4, 5, 12))[0]
            batch.append((when, data, flags))
        if batch and ((force_duplicate and folder == "INBOX") or rng.random() < 0.02):
            batch.append(rng.choice(batch))  # the same bytes twice: both must reach the target
            stats["duplicates"] += 1
        for when, data, flags in sorted(batch, key=lambda b: b[0]):
            # Unseen mail just delivered sits in new/ without an info suffix, as Dovecot leaves it.
            unseen_new = folder == "INBOX" and not flags and rng.random() < 0.5
            while True:  # a unique name even for the duplicate, which shares the epoch
                name = f"{int(when.timestamp())}.M{rng.randrange(10**6)}P{pid}.example,S={len(data)}"
                rel = f"{path}/new/{name}" if unseen_new else f"{path}/cur/{name}:2,{flags}"
                if rel not in files:
                    break
            files[rel] = data
            stats["messages"] += 1
        stats["folders"] += 1
    stats["mailboxes"] += 1


def pick_mailbox_owners(rng: random.Random, people: list[Person], count: int) -> list[Person]:
    """Return the officials who get a Maildir: the deliberate ones first, then a random few."""
    owners = [p for p in people if p.mailbox]
    for wanted in ("disabled", "nfd", "upper"):
        owners += [p for p in people if (p.disabled if wanted == "disabled" else p.dirt == wanted)
                   and p not in owners][:1]
    rest = [p for p in people if p not in owners]
    return owners + rng.sample(rest, count - len(owners))


# ---------------------------------------------------------------------------------------------


@dataclass
class Directories:
    """The old directories of every source: files (path -> bytes), counts, and the units and people behind them."""

    files: dict[str, bytes]
    counts: dict[str, dict]
    units: dict[str, list[Unit]]
    people: dict[str, list[Person]]  # officials only, role accounts not included


def build_directories(seed: int, sources: Sequence[Source] = SOURCES) -> Directories:
    """Return the old directories (LDIF, Bình Dương's HR CSV) and the unit mapping file of the sources.

    Shared by build() (the example, with mailboxes) and scripts/bench_directory.py (the same shapes with
    tens of thousands of officials per source: pass copies of SOURCES with a larger `people`).
    """
    files: dict[str, bytes] = {}
    units, people = {}, {}
    for src in sources:  # one RNG per source and purpose, so one part changing leaves the rest
        units[src.key] = build_units(src)
        people[src.key] = make_people(src, units[src.key], random.Random(f"{seed}:{src.key}:people"))
        assign_identifiers(src, people[src.key], random.Random(f"{seed}:{src.key}:ids"))
    counts: dict = {}
    for src in sources:
        staff = people[src.key]
        accounts = staff + role_accounts(src, units[src.key])
        rng = random.Random(f"{seed}:{src.key}:files")
        c = counts[src.key] = {"domain": src.domain, "old_domains": list(OLD_DOMAINS[src.key]),
                               "people": len(staff), "role_accounts": len(accounts) - len(staff),
                               "disabled": sum(bool(p.disabled) for p in staff),
                               "without_unit": sum(p.unit is None for p in staff),
                               "units": len(units[src.key])}
        if src.key == "binhduong":
            files[f"sources/{src.key}/hr.csv"], c["hr_rows"] = hr_csv(staff, rng)
        groups = make_groups(src, accounts)
        c["groups"] = len(groups)
        writer = {"hcm": ldif_hcm, "binhduong": ldif_ad}.get(src.key)
        files[f"sources/{src.key}/directory.ldif"] = writer(src, units[src.key], accounts, groups) if writer \
            else ldif_zimbra(src, units[src.key], accounts, groups, rng)
    files["structure.csv"] = structure_csv(units, sources)
    return Directories(files, counts, units, people)


def build(seed: int) -> tuple[dict[str, bytes], list[str], dict]:
    """Return every generated file (path -> bytes), the Maildir directories and the counts."""
    directories = build_directories(seed)
    files, counts, people = directories.files, directories.counts, directories.people
    dirs: list[str] = []
    for src in SOURCES:
        staff = people[src.key]
        accounts = staff + role_accounts(src, directories.units[src.key])
        c = counts[src.key]
        stats = dict.fromkeys(("mailboxes", "folders", "messages", "duplicates", "without_message_id",
                               "raw_8bit_headers", "with_attachment"), 0)
        mrng = random.Random(f"{seed}:{src.key}:mail")
        owners = pick_mailbox_owners(mrng, staff, src.mailboxes)
        owners += [p for p in accounts if p.role and (src.key, p.local) == ROLE_MAILBOX]
        peers = [(p.name, p.address, p.unit.name if p.unit else p.source.org)
                 for p in accounts + [q for s in SOURCES if s is not src for q in people[s.key][:20]]]
        peers += list(EXTERNAL) * 5
        for i, owner in enumerate(owners):
            build_mailbox(mrng, owner, [x for x in peers if x[1] != owner.address], staff, files, dirs, stats,
                          force_duplicate=i == 0)
        c.update(stats, role_mailboxes=sum(p.role for p in owners))
    return files, dirs, counts


def write(out: Path, seed: int) -> dict:
    """Generate into out, replacing only what this script owns; return the manifest."""
    files, dirs, counts = build(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for d in dirs:
        (out / d).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        if "/mail/" in rel and rel.rsplit("/", 2)[1] in ("cur", "new"):
            # Dovecot takes the received date from the mtime; git drops it, the name keeps it.
            epoch = int(rel.rsplit("/", 1)[1].split(".", 1)[0])
            os.utime(out / rel, (epoch, epoch))
    manifest = {"generator": "scripts/generate_example.py", "seed": seed, "sources": counts,
                "files": {rel: hashlib.sha256(files[rel]).hexdigest() for rel in sorted(files)}}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, generate, print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    manifest = write(args.out, args.seed)
    keys = ("people", "role_accounts", "groups", "disabled", "without_unit", "units", "mailboxes", "role_mailboxes",
            "folders", "messages", "duplicates", "without_message_id", "raw_8bit_headers")
    print(f"{'source':<15}" + "".join(f"{k[:10]:>11}" for k in keys))
    for name, c in manifest["sources"].items():
        print(f"{name:<15}" + "".join(f"{c[k]:>11}" for k in keys))
    size = sum((args.out / rel).stat().st_size for rel in manifest["files"])
    print(f"{len(manifest['files'])} files, {size / 1e6:.2f} MB, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
