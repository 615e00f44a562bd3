"""Line numbers of keys in a TOML file, for error messages that point at the line."""

from __future__ import annotations

import re

# tomllib returns plain dicts with no positions, so errors about a key's *value* (wrong type,
# unknown key, duplicate domain) would name no line. This scanner recovers the line of every
# `[table]`, `[[array]]` and `key = ` in the text. It only has to be right for files that
# tomllib already accepted, which keeps it small: no value parsing beyond skipping multi-line
# strings and arrays.

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=""")
_PART = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*(?:\.|$)""")


def _split_dotted(text: str) -> tuple[str, ...]:
    """Split a dotted TOML key into its parts, unquoting quoted parts."""
    parts = []
    for match in _PART.finditer(text):
        part = match.group(1)
        if part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def key_lines(text: str) -> dict[Path, int]:
    """Map each key path of a TOML document to the 1-based line where it is defined."""
    lines: dict[Path, int] = {}
    array_counts: dict[tuple[str, ...], int] = {}
    table: Path = ()
    open_string: str | None = None
    bracket_depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if open_string:
            if line.count(open_string) % 2 == 1:
                open_string = None
            continue
        if bracket_depth > 0:
            bracket_depth += _bracket_balance(line)
            continue
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            names = _split_dotted(header.group(2))
            is_array = header.group(1) == "[["
            table = _resolve(names, array_counts)
            if is_array:
                index = array_counts.get(names, 0)
                array_counts[names] = index + 1
                lines.setdefault(table, number)
                table = table + (index,)
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = table + _split_dotted(key.group(1))
            lines.setdefault(path, number)
            rest = line[key.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    open_string = quote
            if open_string is None:
                bracket_depth = max(0, _bracket_balance(rest))
    return lines


def _resolve(names: tuple[str, ...], array_counts: dict[tuple[str, ...], int]) -> Path:
    """Turn a table header's names into a path, pointing into the latest element of arrays."""
    path: list[str | int] = []
    for depth in range(1, len(names) + 1):
        path.append(names[depth - 1])
        prefix = names[:depth]
        if prefix in array_counts and depth < len(names):
            path.append(array_counts[prefix] - 1)
    return tuple(path)


def _bracket_balance(text: str) -> int:
    """Count open minus closed brackets outside strings and comments."""
    balance = 0
    quote: str | None = None
    for char in text:
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        elif char in "[{":
            balance += 1
        elif char in "]}":
            balance -= 1
    return balance


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """Return the line of a key path, or of its nearest ancestor that has one."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None
