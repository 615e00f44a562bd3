"""The old directories' URLs ([[web.redirects]]) turned into the new site's pages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Collection, Sequence
from urllib.parse import parse_qsl, quote, urlencode

from mailmerge_gov.config import WebRedirect
from mailmerge_gov.directory.search import search

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
MAX_VALUE = 320  # a query parameter longer than any address is nobody's uid


def same_path(a: str, b: str) -> bool:
    """Paths equal up to a trailing slash ("/danhba" and "/danhba/" are one old page)."""
    return (a.rstrip("/") or "/") == (b.rstrip("/") or "/")


def old_url_target(redirects: Sequence[WebRedirect], path: str, query: str, index: Path,
                   fields: Collection[str] | None) -> tuple[str, bool] | None:
    """The new page for an old URL (the first redirect whose path, parameters and placeholders fit) and whether
    that answer is permanent, or None."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    for redirect in redirects:
        if not same_path(redirect.old_path, path):
            continue
        if any(params.get(name) != value for name, value in redirect.old_query):
            continue
        template = redirect.to if redirect.to is not None else redirect.address or ""
        names = _PLACEHOLDER.findall(template)
        values = {name: params.get(name, "").strip() for name in names}
        if any(not value or len(value) > MAX_VALUE for value in values.values()):
            continue  # this redirect needs a parameter the old URL does not carry: try the next one
        if redirect.to is not None:
            # each value is quoted whole: "/people/{uid}" with uid "../x?y" stays one path segment
            return _PLACEHOLDER.sub(lambda m: quote(values[m.group(1)], safe=""), redirect.to), True
        address = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
        # Not permanent: who has an old address comes from today's index and from what this visitor may search,
        # and browsers keep a 301 for good (after a re-index, or once the visitor has logged in).
        found = search(index, address, 1, fields) if "@" in address and " " not in address else []
        if found:
            return "/people/" + quote(found[0].uid, safe=""), False
        return "/lookup?" + urlencode({"address": address}), False
    return None
