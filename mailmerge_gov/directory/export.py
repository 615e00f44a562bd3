"""Exports of a plan: the address map (the relay's input), mailbox jobs, and the directory itself."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Sequence

from mailmerge_gov.config import Config, MailServer
from mailmerge_gov.directory.model import PlannedPerson, Structure


@dataclass(frozen=True)
class MapRow:
    """An old address and where mail to it goes until when."""

    old_address: str
    new_address: str
    valid_until: str


@dataclass(frozen=True)
class MailboxJob:
    """An old mailbox to copy into an official's new mailbox."""

    source: str
    source_mailbox: str
    target_mailbox: str
    identity: int


def address_map(people: Sequence[PlannedPerson], config: Config) -> list[MapRow]:
    """Every old address outside the new domain that forwards to an official's address."""
    domain = config.target.mail_domain
    rows = [MapRow(alias.address, person.address, alias.valid_until or config.transition_ends.isoformat())
            for person in people if person.address and not person.disabled
            for alias in person.aliases if alias.address.split("@", 1)[1] != domain]
    return sorted(rows, key=lambda row: row.old_address)


def mailbox_jobs(people: Sequence[PlannedPerson], config: Config) -> list[MailboxJob]:
    """One job per old mailbox of a carried-over official, from sources that have a mail system."""
    servers = {source.name: source.mail for source in config.sources if source.mail is not None}
    jobs = [MailboxJob(source, mailbox, person.address, person.identity)
            for person in people if person.address and not person.disabled
            for source, mailbox in person.mailboxes if source in servers and _exists(servers[source], mailbox)]
    return sorted(jobs, key=lambda job: (job.source, job.source_mailbox))


def _exists(server: MailServer, mailbox: str) -> bool:
    """Tell whether a mailbox exists, where that can be seen without a server (a Maildir root)."""
    # A server holds a mailbox for every account; a Maildir archive only for those it kept,
    # and a job for a missing folder would only fail later.
    if server.kind == "maildir" and server.path is not None:
        return (server.path / mailbox).is_dir()
    return True


def rows_csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as CSV with a header line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def map_csv(rows: Sequence[MapRow]) -> str:
    """The address map as CSV: old_address,new_address,valid_until."""
    return rows_csv(("old_address", "new_address", "valid_until"),
                    [(r.old_address, r.new_address, r.valid_until) for r in rows])


def jobs_csv(jobs: Sequence[MailboxJob]) -> str:
    """Mailbox jobs as CSV: source,source_mailbox,target_mailbox,identity."""
    return rows_csv(("source", "source_mailbox", "target_mailbox", "identity"),
                    [(j.source, j.source_mailbox, j.target_mailbox, j.identity) for j in jobs])


def directory_csv(people: Sequence[PlannedPerson], structure: Structure) -> str:
    """The new directory as CSV, one official per line."""
    names = {unit.code: unit.name for unit in structure.units}
    return rows_csv(
        ("full_name", "family", "middle", "given", "address", "unit_code", "unit_name", "title", "phones",
         "mobiles", "old_addresses"),
        [(p.full_name, p.family, p.middle, p.given, p.address, p.unit_code or "", names.get(p.unit_code or "", ""),
          p.title or "", " ".join(p.phones), " ".join(p.mobiles), " ".join(a.address for a in p.aliases))
         for p in people if p.address and not p.disabled])


def _vcard_text(value: str) -> str:
    """Escape a vCard 3.0 text value (RFC 2426 section 4)."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;").replace("\n", "\\n")


def directory_vcards(people: Sequence[PlannedPerson], structure: Structure, config: Config) -> str:
    """The new directory as vCard 3.0 cards, one per official (CRLF line ends, as RFC 2426 asks)."""
    names = {unit.code: unit.name for unit in structure.units}
    cards = []
    for p in people:
        if not p.address or p.disabled:
            continue
        lines = ["BEGIN:VCARD", "VERSION:3.0", f"FN:{_vcard_text(p.full_name)}",
                 f"N:{_vcard_text(p.family)};{_vcard_text(p.given)};{_vcard_text(p.middle)};;",
                 f"EMAIL;TYPE=INTERNET,PREF:{p.address}"]
        org = _vcard_text(config.target.name)
        if p.unit_code:
            org += ";" + _vcard_text(names.get(p.unit_code, p.unit_code))
        lines.append(f"ORG:{org}")
        if p.title:
            lines.append(f"TITLE:{_vcard_text(p.title)}")
        lines += [f"TEL;TYPE=WORK,VOICE:{_vcard_text(t)}" for t in p.phones]
        lines += [f"TEL;TYPE=CELL:{_vcard_text(t)}" for t in p.mobiles]
        lines.append("END:VCARD")
        cards.append("\r\n".join(lines) + "\r\n")
    return "".join(cards)
