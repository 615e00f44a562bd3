"""Reports for people: the package's HTML templates, and files written whole and owner-readable only."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jinja2

# One environment for every HTML report: templates ship inside the package, autoescape on.
TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("mailmerge_gov", "templates"),
                               autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def write_private_files(folder: Path, files: Sequence[tuple[Path, str]]) -> None:
    """Write report files atomically (a reader never sees half a report), readable by their owner only."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in files:
        temporary = path.with_name(path.name + ".tmp")
        # Reports name officials with their addresses, units and mailboxes: owner-readable only.
        temporary.touch(mode=0o600)
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
