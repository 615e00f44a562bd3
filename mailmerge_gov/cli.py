"""The `mailmerge-gov` command: parses, calls the library, renders; nothing else."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import click
import rich.box
import rich.console
import rich.markup
import rich.progress
import rich.table

from mailmerge_gov import __version__
from mailmerge_gov.check import check_config
from mailmerge_gov.config import Config, ConfigError, SecretError, load_config
from mailmerge_gov.directory.access import AccessError, memberships
from mailmerge_gov.directory.addressing import AddressingError
from mailmerge_gov.directory.apply import ApplyError, ApplyResult, RollbackError, format_changes, rollback
from mailmerge_gov.directory.applyplan import apply_plan, plan_entries
from mailmerge_gov.directory.export import (address_map, directory_csv, directory_vcards, jobs_csv, mailbox_jobs,
                                           map_csv)
from mailmerge_gov.directory.ldif import format_entry
from mailmerge_gov.directory.plan import PlanError, collector_paused, load_plan, make_plan
from mailmerge_gov.directory.search import SearchError, build_index, index_path, person_json, search
from mailmerge_gov.directory.report import write_access_report, write_report
from mailmerge_gov.directory.sources import SourceError, read_source
from mailmerge_gov.directory.structure import StructureError, load_structure
from mailmerge_gov.directory.draft import draft_structure
from mailmerge_gov.forwarding.addressmap import MapError
from mailmerge_gov.forwarding.daemon import RelayError, explain, prepare, run
from mailmerge_gov.forwarding.srs import SrsError
from mailmerge_gov.forwarding.workers import LineHandler
from mailmerge_gov.migration.batch import JobsError, read_jobs_csv, run_jobs, verify_jobs
from mailmerge_gov.migration.protocol import MailboxError
from mailmerge_gov.migration.report import mailbox_reports, server_waits, write_migration_report
from mailmerge_gov.migration.sync import MailboxCheck, MailboxJob, MailboxOutcome, forget_missing
from mailmerge_gov.store import Store, StoreError, open_store

# The library's named errors: each carries a message a person can act on.
LIBRARY_ERRORS = (AccessError, ConfigError, SecretError, StoreError, SourceError, StructureError, AddressingError, PlanError,
                  ApplyError, RollbackError, JobsError)

CONFIG_HELP = "The consolidation file (default: $MAILMERGE_GOV_CONFIG or ./consolidation.toml)."


def config_option(function):  # type: ignore[no-untyped-def]
    """Add the -c/--config option every command that reads the plan shares."""
    return click.option(
        "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
        default="consolidation.toml", show_default=False, envvar="MAILMERGE_GOV_CONFIG", help=CONFIG_HELP,
    )(function)


def output_option(function):  # type: ignore[no-untyped-def]
    """Add the -o/--output option of the commands that write a file or standard output."""
    return click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Write here instead of standard output.")(function)


def read_config(path: Path) -> Config:
    """Load the configuration, turning its errors into messages for the command line."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailmerge-gov")
def cli() -> None:
    """Consolidate the mail systems and staff directories of merged agencies.

    Reads the old directories and mail servers named in a consolidation file, gives every
    official one address in the new unit, migrates mailboxes, and forwards mail sent to old
    addresses during the transition.
    """


@cli.command()
@config_option
def check(config_path: Path) -> None:
    """Try every server and file the consolidation file names.

    Prints one line per server or file with OK or the reason it failed; exits 1 if any failed.
    """
    config = read_config(config_path)
    results = list(check_config(config))
    width = max(len(result.subject) for result in results)
    for result in results:
        status = click.style("OK    ", fg="green") if result.ok else click.style("FAILED", fg="red", bold=True)
        click.echo(f"{status} {result.subject:<{width}}  {result.target}: {result.detail}")
    failed = sum(not result.ok for result in results)
    click.echo(f"{len(results)} checked, {failed} failed")
    if failed:
        raise SystemExit(1)


@cli.group()
def directory() -> None:
    """Consolidate the old directories into the new one, and search it."""


@contextlib.contextmanager
def opened(config: Config) -> Iterator[Store]:
    """Open the state store, turning library errors of the block into messages for the user."""
    try:
        with open_store(config.state_file) as store:
            yield store
    except LIBRARY_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc


@directory.command("plan")
@config_option
def directory_plan(config_path: Path) -> None:
    """Read the old directories and make the consolidation plan and its report.

    Nothing is written to the new directory: review the report, resolve what it lists
    (directory review, the unit mapping file), then run directory apply.
    """
    config = read_config(config_path)
    # The plan's objects live until the command ends: paused for the plan and the report, so that
    # the collector does not walk millions of them in between (a second at 100,000 officials).
    with opened(config) as store, collector_paused():
        plan = make_plan(config, store)
        header = store.plan(plan.id)
        files = write_report(plan, config, config.reports_folder, header.created_at, header.actor)
    summary = plan.summary
    records = sum(summary["sources"].values())
    click.echo(f"plan {plan.id}: {records} records from {len(summary['sources'])} sources -> "
               f"{summary['identities']} officials; {summary['carried_over']} carried over "
               f"({summary['kept_addresses']} keep their address, {summary['new_addresses']} get a new one), "
               f"{summary['disabled']} disabled not carried over")
    counts = ", ".join(f"{count} {kind}" for kind, count in summary["issues"].items() if count)
    click.echo(f"review items: {summary['blocking']} blocking apply; all: {counts or 'none'}")
    click.echo(f"report: {files.html}")
    click.echo(f"        {files.people_csv}")
    click.echo(f"        {files.issues_csv}")


@directory.command("review")
@config_option
@click.option("--same", "same", type=int, metavar="N", help="Suggestion N is one official: merge the records.")
@click.option("--different", "different", type=int, metavar="N", help="Suggestion N is two officials.")
def directory_review(config_path: Path, same: int | None, different: int | None) -> None:
    """List the open suggestions of the newest plan, or decide one.

    Decisions are kept in the state store and honoured by every later plan.
    """
    if same is not None and different is not None:
        raise click.UsageError("give --same or --different, not both")
    config = read_config(config_path)
    with opened(config) as store:
        plan = load_plan(config, store)
        suggestions = [issue for issue in plan.issues if issue.kind == "suggestion"]
        decided = store.decisions()
        open_ = [s for s in suggestions if tuple(sorted((s.detail["a"], s.detail["b"]))) not in decided]
        number = same if same is not None else different
        if number is not None:
            if not 1 <= number <= len(suggestions):
                raise click.ClickException(f"plan {plan.id} has no suggestion {number} (it has {len(suggestions)})")
            chosen = suggestions[number - 1]
            decision = "same" if same is not None else "different"
            store.decide(chosen.detail["a"], chosen.detail["b"], decision)
            click.echo(f"decided: {chosen.detail['a']} and {chosen.detail['b']} are "
                       f"{'the same official' if decision == 'same' else 'different officials'}; "
                       "run directory plan again to use the decision")
            return
        records = {r.ref: r for r in store.source_records()}
        for index, issue in enumerate(suggestions, start=1):
            state = "open" if issue in open_ else f"decided: {decided[tuple(sorted((issue.detail['a'], issue.detail['b'])))]}"
            click.echo(f"{index}. {issue.detail['reason']} ({state})")
            for ref in (issue.detail["a"], issue.detail["b"]):
                record = records.get(ref)
                if record:
                    facts = [record.full_name, record.unit or "(no unit)", record.birth_date or "",
                             record.mail or "", record.title or ""]
                    click.echo(f"     {ref}")
                    click.echo(f"       {' | '.join(f for f in facts if f)}")
        if open_:
            click.echo(f"{len(open_)} open suggestion{'s' if len(open_) > 1 else ''} of plan {plan.id}. "
                       "Decide with: mailmerge-gov directory review --same N | --different N")
        else:
            click.echo(f"plan {plan.id} has no open suggestions")


@directory.command("access-review")
@config_option
def directory_access_review(config_path: Path) -> None:
    """Report every group membership the newest plan carries over; flag privileged ones.

    Memberships are carried over only where the unit mapping file maps the old group to a
    new one; privileged ones (see [directory] privileged_groups) only after a sign-off.
    """
    config = read_config(config_path)
    with opened(config) as store:
        plan = load_plan(config, store)
        rows = memberships(plan.people, plan.groups, plan.structure, config, store.signoffs())
    html, table = write_access_report(plan, rows, config, config.reports_folder, str(config_path))
    carried = sum(m.carried for m in rows)
    waiting = [m for m in rows if m.new_group and m.privileged and not m.carried]
    unmapped = sum(m.new_group is None for m in rows)
    click.echo(f"plan {plan.id}: {len(rows)} memberships; {carried} carried over, {len(waiting)} privileged "
               f"waiting for sign-off, {unmapped} not carried over (group not in the mapping file)")
    for m in waiting:
        click.echo(f"  {m.number}. {m.person} <{m.address}> in {m.group_name} -> {m.new_group_name}")
    click.echo(f"report: {html}")
    click.echo(f"        {table}")


@directory.command("sign-off")
@config_option
@click.argument("numbers", type=int, nargs=-1, required=True)
@click.option("--note", default=None, help="Why the membership is right (kept in the state store).")
def directory_sign_off(config_path: Path, numbers: tuple[int, ...], note: str | None) -> None:
    """Approve privileged memberships NUMBERS... of the newest plan's access review."""
    config = read_config(config_path)
    with opened(config) as store:
        plan = load_plan(config, store)
        rows = {m.number: m for m in memberships(plan.people, plan.groups, plan.structure, config, store.signoffs())}
        unknown = [n for n in numbers if n not in rows]
        if unknown:
            raise click.ClickException(f"plan {plan.id}'s access review has no membership "
                                       f"{', '.join(map(str, unknown))} (it has {len(rows)})")
        for number in numbers:
            store.sign_off(rows[number].subject, note=note)
            click.echo(f"signed off: {rows[number].person} in {rows[number].group_name}")
    click.echo("run directory apply to write the signed-off memberships")


@directory.command("apply")
@config_option
@click.option("--dry-run", is_flag=True, help="Print the exact LDAP changes; write nothing.")
@click.option("--force", is_flag=True, help="Apply even if the sources changed or review items are open.")
@click.option("--max-disables", type=click.IntRange(min=0), default=None,
              help="Allow disabling this many accounts in this run (default: [directory] max_disables).")
def directory_apply(config_path: Path, dry_run: bool, force: bool, max_disables: int | None) -> None:
    """Write the newest plan into the new directory, with a backup first.

    Refuses a plan whose sources changed or that has unresolved review items (unless
    --force); never deletes an entry; every change is in the audit log and can be undone
    with directory rollback.
    """
    config = read_config(config_path)
    with opened(config) as store:
        applied = apply_plan(config, store, dry_run=dry_run, force=force, max_disables=max_disables)
    plan, result = applied.plan, applied.result
    if applied.waiting:
        click.echo(f"{len(applied.waiting)} privileged memberships wait for a sign-off and were left out "
                   "(see directory access-review)", err=True)
    if dry_run:
        click.echo(format_changes(result), nl=False)
        click.echo(f"dry run of plan {plan.id}: {_count_changes(result)}; nothing written")
        return
    click.echo(f"apply {result.apply_id} of plan {plan.id}: {_count_changes(result)}")
    if result.backup:
        click.echo(f"backup of the entries before the change: {result.backup}")
    if result.unmanaged:
        click.echo(f"{len(result.unmanaged)} entries under the base DN are not managed by mailmerge-gov and were left alone")
    if result.changes:
        click.echo(f"undo with: mailmerge-gov directory rollback -c {config_path} {result.apply_id}")


def _count_changes(result: ApplyResult) -> str:
    """Say how many entries an apply adds, modifies and disables."""
    counts = Counter(change.op for change in result.changes)
    return f"{counts['add']} added, {counts['modify']} modified, {counts['disable']} disabled"


@directory.command("rollback")
@config_option
@click.argument("apply_id", type=int)
@click.option("--dry-run", is_flag=True, help="Print the changes that would undo the apply; write nothing.")
def directory_rollback(config_path: Path, apply_id: int, dry_run: bool) -> None:
    """Restore the new directory to its state before apply APPLY_ID."""
    config = read_config(config_path)
    if config.target.directory is None:
        raise click.ClickException(f"{config.path}: [target.directory] is not set")
    with opened(config) as store:
        result = rollback(store, config.target.directory, apply_id, base_dn=config.target.base_dn, dry_run=dry_run)
    if dry_run:
        click.echo(format_changes(result), nl=False)
        click.echo(f"dry run of the rollback of apply {apply_id}: {len(result.changes)} changes; nothing written")
        return
    click.echo(f"rollback of apply {apply_id}: {len(result.changes)} changes made")


@directory.command("draft-structure")
@config_option
@click.option("--province", required=True, metavar="CODE", help="Official code of the new province (79).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of standard output (refuses to overwrite).")
def directory_draft_structure(config_path: Path, province: str, output: Path | None) -> None:
    """Draft the unit mapping file from the official 2025 lists and the old directories."""
    config = read_config(config_path)
    try:
        departments = {source.name: sorted({r.unit for r in read_source(source).records if r.unit})
                       for source in config.sources}
        path = config.directory.structure
        # An existing mapping file keeps the codes it gave: drafting again must not renumber units.
        existing = load_structure(path, config) if path is not None and path.exists() else None
        text = draft_structure(province, config, departments, existing=existing)
    except LIBRARY_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        with output.open("x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError as exc:
        raise click.ClickException(f"{output} exists; choose another name or remove it first") from exc
    review = sum(1 for line in text.splitlines() if line.endswith(",needs review"))
    click.echo(f"wrote {output}: {len(text.splitlines()) - 1} lines, {review} need review")


def _write_or_echo(text: str, output: Path | None, what: str) -> None:
    """Write text to a file atomically, or to standard output."""
    if output is None:
        click.echo(text, nl=False)
        return
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(text, encoding="utf-8", newline="")
    temporary.replace(output)
    click.echo(f"wrote {output}: {what}", err=True)


@directory.command("index")
@config_option
def directory_index(config_path: Path) -> None:
    """Build the staff search index from the new directory (LDAP or its LDIF file), replacing the old one whole."""
    config = read_config(config_path)
    if config.target.directory is None:
        raise click.ClickException(f"{config.path}: [target.directory] is not set: there is no new directory to index")
    path = index_path(config.state_file)
    try:
        count = build_index(config.target.directory, path)
    except (SourceError, SearchError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"indexed {count} officials: {path}")


@directory.command("search")
@config_option
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON, for scripts.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most this many results.")
def directory_search(config_path: Path, query: str, as_json: bool, limit: int) -> None:
    """Find officials by name (with or without diacritics), initials, address (old ones too), phone, title or unit."""
    config = read_config(config_path)
    try:
        found = search(index_path(config.state_file), query, limit)
    except SearchError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps([person_json(p) for p in found], ensure_ascii=False, indent=1))
        return
    if not found:
        click.echo(f"no official matches '{query}'")
        return
    table = rich.table.Table("name", "title", "unit", "mail", "phone", box=rich.box.SIMPLE)
    table.columns[3].overflow = "fold"  # an address is never cut short: it is what people copy
    for person in found:
        formerly = "; ".join(person.old_addresses + person.old_units)
        table.add_row(person.full_name + (f"\n[dim]formerly: {rich.markup.escape(formerly)}[/dim]" if formerly else ""),
                      person.title, person.unit, person.mail, ", ".join(person.phones + person.mobile))
    rich.console.Console(highlight=False).print(table)


@directory.command("serve")
@config_option
@click.option("--host", default=None, help="Address to listen on (default: [web] host, or 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port to listen on (default: [web] port, or 8080).")
@click.option("--access-log", is_flag=True, help="Log every request (with its query: the names people search for).")
def directory_serve(config_path: Path, host: str | None, port: int | None, access_log: bool) -> None:
    """Serve the staff directory website and JSON API over the index of `directory index` (uvicorn)."""
    config = read_config(config_path)
    path = index_path(config.state_file)
    if not path.exists():
        raise click.ClickException(f"there is no search index at {path}: build it with `mailmerge-gov directory index`")
    import uvicorn  # the web stack is loaded only by this command

    from mailmerge_gov.web import WebSetupError, app_from_config

    try:
        app = app_from_config(config)
    except WebSetupError as exc:
        raise click.ClickException(str(exc)) from exc
    host = host or config.web.host
    port = port or config.web.port
    proxies = config.web.trusted_proxies
    login = "with login" if config.web.session_secret else "public fields only, no login"
    click.echo(f"serving the staff directory of {path} at http://{host}:{port}/ ({login})", err=True)
    # X-Forwarded-For/-Proto are believed from the trusted proxies only: anyone else could fake them
    # No access log unless asked: each line would hold a search (a name someone looked for), and the
    # reverse proxy in front keeps one already.
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=bool(proxies),
                forwarded_allow_ips=",".join(proxies) if proxies else None, access_log=access_log)


@directory.command("export-map")
@config_option
@output_option
def directory_export_map(config_path: Path, output: Path | None) -> None:
    """Export the address map of the newest plan (old_address,new_address,valid_until): the relay's input."""
    config = read_config(config_path)
    with opened(config) as store:
        rows = address_map(load_plan(config, store).people, config)
    _write_or_echo(map_csv(rows), output, f"{len(rows)} old addresses")


@directory.command("export")
@config_option
@click.option("--format", "fmt", type=click.Choice(["ldif", "csv", "vcard"]), required=True)
@output_option
def directory_export(config_path: Path, fmt: str, output: Path | None) -> None:
    """Export the new directory of the newest plan as LDIF, CSV or vCards."""
    config = read_config(config_path)
    with opened(config) as store:
        plan = load_plan(config, store)
        signoffs = store.signoffs()
    if fmt == "ldif":
        rows = memberships(plan.people, plan.groups, plan.structure, config, signoffs)
        entries = plan_entries(plan, config, rows, dt.date.today(), include_base=True)
        text = "".join(format_entry(entry.dn, entry.attributes) for entry in entries)
    elif fmt == "csv":
        text = directory_csv(plan.people, plan.structure)
    else:
        text = directory_vcards(plan.people, plan.structure, config)
    carried = sum(1 for p in plan.people if p.address and not p.disabled)
    _write_or_echo(text, output, f"{carried} officials")


@cli.group()
def mailbox() -> None:
    """Migrate mailboxes from the old mail systems and verify nothing was lost."""


@mailbox.command("jobs")
@config_option
@output_option
def mailbox_jobs_command(config_path: Path, output: Path | None) -> None:
    """List the mailbox jobs of the newest plan (source,source_mailbox,target_mailbox,identity)."""
    config = read_config(config_path)
    with opened(config) as store:
        jobs = mailbox_jobs(load_plan(config, store).people, config)
    _write_or_echo(jobs_csv(jobs), output, f"{len(jobs)} mailboxes")


def _selected_jobs(config: Config, jobs_file: Path | None, only: tuple[str, ...]) -> list[MailboxJob]:
    """The jobs of a CSV file, or of the newest plan; narrowed to the mailboxes named with --only."""
    if jobs_file is not None:
        try:
            jobs = read_jobs_csv(jobs_file, config)
        except JobsError as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        with opened(config) as store:
            jobs = [MailboxJob(j.source, j.source_mailbox, j.target_mailbox)
                    for j in mailbox_jobs(load_plan(config, store).people, config)]
    if only:
        wanted = set(only)
        jobs = [j for j in jobs if j.mailbox in wanted or f"{j.source}:{j.mailbox}" in wanted]
        unknown = wanted - {j.mailbox for j in jobs} - {f"{j.source}:{j.mailbox}" for j in jobs}
        if unknown:
            raise click.ClickException(f"no mailbox job for {', '.join(sorted(unknown))}")
    return jobs


JOBS_FILE_HELP = "Read the jobs from this CSV (source,source_mailbox,target_mailbox) instead of the newest plan."


@mailbox.command("migrate")
@config_option
@click.option("--from-csv", "jobs_file", type=click.Path(dir_okay=False, path_type=Path), help=JOBS_FILE_HELP)
@click.option("--only", multiple=True, metavar="MAILBOX", help="Only this old mailbox (or SOURCE:MAILBOX); repeatable.")
@click.option("--jobs", "workers", type=click.IntRange(min=1), help="Mailboxes copied at once (default: [migration] jobs).")
@click.option("--dry-run", is_flag=True, help="List what would be copied; copy and record nothing.")
def mailbox_migrate(config_path: Path, jobs_file: Path | None, only: tuple[str, ...], workers: int | None,
                    dry_run: bool) -> None:
    """Copy every mailbox job's new messages and flag changes, with evidence; run again to resume.

    Exit code 1 when any mailbox failed; the others are copied all the same.
    """
    config = read_config(config_path)
    jobs = _selected_jobs(config, jobs_file, only)
    console = rich.console.Console(stderr=True)
    with rich.progress.Progress(rich.progress.TextColumn("{task.description}"), rich.progress.BarColumn(),
                                rich.progress.MofNCompleteColumn(), console=console, transient=True,
                                disable=not console.is_terminal) as bars:  # no bars in logs and pipes
        overall = bars.add_task("mailboxes", total=len(jobs))
        tasks: dict[tuple[str, str], rich.progress.TaskID] = {}

        def progress(job: MailboxJob, folder: str, done: int, total: int) -> None:
            key = (job.source, job.mailbox)
            if key not in tasks:
                tasks[key] = bars.add_task(job.mailbox, total=total)
            bars.update(tasks[key], completed=done, total=total, description=f"{job.mailbox} {folder}")

        def finished(outcome: MailboxOutcome) -> None:
            bars.advance(overall)
            key = (outcome.job.source, outcome.job.mailbox)
            if key in tasks:
                bars.remove_task(tasks.pop(key))

        try:
            outcomes = run_jobs(config, jobs, workers, dry_run=dry_run, progress=progress, done=finished)
        except (MailboxError, *LIBRARY_ERRORS) as exc:
            raise click.ClickException(str(exc)) from exc
    for outcome in outcomes:
        job = outcome.job
        verb = "would copy" if dry_run else "copied"
        line = (f"{job.source}:{job.mailbox} -> {job.target_mailbox}: {verb} {outcome.copied} messages "
                f"({outcome.bytes} bytes)")
        if outcome.skipped:
            line += f", skipped {outcome.skipped}"
        if any(f.flags_synced for f in outcome.folders):
            line += f", flags synced on {sum(f.flags_synced for f in outcome.folders)}"
        if outcome.exports:
            line += f", exported {len(outcome.exports)} calendar/contact/task folders"
        click.echo(line + (f"; FAILED: {outcome.error}" if outcome.status == "failed" else ""))
        if dry_run:
            for folder in outcome.folders:
                click.echo(f"    {folder.folder} -> {folder.target_folder or '(not copied)'}: "
                           f"{folder.copied} messages" + (f" ({folder.note})" if folder.note else ""))
    failed = sum(o.status == "failed" for o in outcomes)
    if not dry_run:
        with opened(config) as store:
            reports = mailbox_reports(store, jobs, outcomes)
            html, data = write_migration_report(reports, config.reports_folder, "mailbox-migration", config.name)
        for waits in server_waits(reports):
            click.echo(f"throttled by {waits.server}: waited {waits.waits} times, {waits.seconds:.1f} s in all")
        click.echo(f"report: {html}\n        {data}")
    click.echo(f"{len(outcomes) - failed} of {len(outcomes)} mailboxes done"
               + (f"; {failed} failed (run again to retry them)" if failed else ""))
    if failed:
        raise SystemExit(1)


@mailbox.command("verify")
@config_option
@click.option("--from-csv", "jobs_file", type=click.Path(dir_okay=False, path_type=Path), help=JOBS_FILE_HELP)
@click.option("--only", multiple=True, metavar="MAILBOX", help="Only this old mailbox (or SOURCE:MAILBOX); repeatable.")
@click.option("--repair", is_flag=True, help="Forget the evidence of missing messages: the next migrate copies them again.")
def mailbox_verify(config_path: Path, jobs_file: Path | None, only: tuple[str, ...], repair: bool) -> None:
    """Re-read both sides: every old message is in the new mailbox, or listed as skipped with its reason.

    Exit code 1 when a message is missing or a mailbox cannot be read.
    """
    config = read_config(config_path)
    jobs = _selected_jobs(config, jobs_file, only)

    def show(check: MailboxCheck) -> None:
        job = check.job
        if check.error:
            click.echo(f"{job.source}:{job.mailbox} -> {job.target_mailbox}: CANNOT VERIFY: {check.error}")
            return
        expected = sum(f.expected for f in check.folders)
        present = sum(f.present for f in check.folders)
        skipped = sum(len(f.skipped) for f in check.folders)
        extra = sum(f.extra for f in check.folders)
        altered = sum(len(f.altered) for f in check.folders)
        click.echo(f"{job.source}:{job.mailbox} -> {job.target_mailbox}: {present} of {expected} messages found"
                   + (f", {altered} altered by the server" if altered else "")
                   + (f", {skipped} skipped with a reason" if skipped else "")
                   + (f", {extra} more in the new mailbox" if extra else "") + ("" if check.ok else ": MISSING"))
        for f in check.folders:
            for folder, key in f.altered:
                click.echo(f"    altered by the server: {folder} {key}")
            for folder, key in f.missing:
                click.echo(f"    missing: {folder} {key}")

    try:
        checks = verify_jobs(config, jobs, done=show)
    except (MailboxError, *LIBRARY_ERRORS) as exc:
        raise click.ClickException(str(exc)) from exc
    with opened(config) as store:
        html, data = write_migration_report(mailbox_reports(store, jobs, checks=checks), config.reports_folder,
                                            "mailbox-verify", config.name)
        forgotten = sum(forget_missing(check, store) for check in checks) if repair else 0
    bad = sum(not c.ok for c in checks)
    click.echo(f"report: {html}\n        {data}")
    click.echo(f"verified {len(checks)} mailboxes: " + (f"{bad} incomplete" if bad else "nothing missing"))
    if forgotten:
        click.echo(f"repair: {forgotten} missing messages will be copied again by the next mailbox migrate")
    if bad:
        raise SystemExit(1)


@cli.group()
def relay() -> None:
    """Forward mail sent to old addresses to the officials' new addresses."""


RELAY_ERRORS = (ConfigError, SecretError, MapError, SrsError, RelayError)


@relay.command("serve")
@config_option
def relay_serve(config_path: Path) -> None:
    """Run the relay in the foreground until SIGTERM.

    Logs one JSON line per transaction on standard error. SIGHUP reloads the config's
    address map, SRS secrets and TLS certificate (a bad map is refused and the old one kept);
    SIGTERM stops accepting and lets open sessions finish within [relay] shutdown_timeout.
    With [relay] metrics_listen, GET /metrics on that address shows the counters.
    With [relay] workers above 1 ("auto": one per CPU), a parent process listens and that
    many worker processes serve, sharing the connection limits and the counters.
    """
    config = read_config(config_path)
    try:
        prepared = prepare(config)
    except RELAY_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    logger = logging.getLogger("mailmerge_gov.forwarding")
    stream = LineHandler(sys.stderr)  # whole lines, one write() each: several worker processes share stderr
    stream.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(stream)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        status = run(prepared)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        logger.removeHandler(stream)
    if status:
        raise SystemExit(status)


@relay.command("check")
@config_option
@click.argument("address")
@click.option("--date", "day", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Check as on this day (YYYY-MM-DD; default: today).")
def relay_check(config_path: Path, address: str, day: dt.datetime | None) -> None:
    """Say what the relay would do with mail for ADDRESS, and the reply it would give."""
    config = read_config(config_path)
    try:
        lines = explain(config, address, day.date() if day else dt.date.today())
    except RELAY_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    for line in lines:
        click.echo(line)


def main() -> None:
    """Entry point of the console script."""
    cli(prog_name="mailmerge-gov")
