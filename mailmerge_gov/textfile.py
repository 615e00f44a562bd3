"""Reading the text files people edit (configuration, mapping files), with errors that name the line."""

from __future__ import annotations

from pathlib import Path


def read_utf8(path: Path, what: str, error: type[Exception]) -> str:
    """Return a UTF-8 file's text (a leading byte order mark dropped); raise `error` naming file and line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    try:
        # utf-8-sig: Excel and Notepad save with a byte order mark; it is not part of the first line.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{path}, line {line}: the file is not valid UTF-8") from exc
