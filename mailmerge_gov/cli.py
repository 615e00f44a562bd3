"""The `mailmerge-gov` command: parses, calls the library, renders; nothing else."""

from __future__ import annotations

from pathlib import Path

import click

from mailmerge_gov import __version__
from mailmerge_gov.check import check_config
from mailmerge_gov.config import Config, ConfigError, load_config

CONFIG_HELP = "The consolidation file (default: $MAILMERGE_GOV_CONFIG or ./consolidation.toml)."


def config_option(function):  # type: ignore[no-untyped-def]
    """Add the -c/--config option every command that reads the plan shares."""
    return click.option(
        "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
        default="consolidation.toml", show_default=False, envvar="MAILMERGE_GOV_CONFIG", help=CONFIG_HELP,
    )(function)


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


@cli.group()
def mailbox() -> None:
    """Migrate mailboxes from the old mail systems and verify nothing was lost."""


@cli.group()
def relay() -> None:
    """Forward mail sent to old addresses to the officials' new addresses."""


def main() -> None:
    """Entry point of the console script."""
    cli(prog_name="mailmerge-gov")
