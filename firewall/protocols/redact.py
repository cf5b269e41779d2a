"""Masking of values that L7 metadata may carry into logs.

Events and flow summaries are logged, and application traffic puts sensitive
values where metadata lives: card numbers in URL paths (``/cards/4111...``),
tokens in query strings, literals in SQL text. Policy needs the path and the
verb, never those values, so everything a parser keeps for *display* goes
through here first: query-string values and SQL string literals are replaced
outright, and digit runs that could be a PAN keep at most the first six and last
four digits (PCI DSS 3.4.1) - by the event sink's own rule
(``observe.redaction.mask_text``), so a parser never masks differently from the sink.
"""

from __future__ import annotations

import re

from firewall.observe.redaction import mask_text

_SQL_STRING = re.compile(r"'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?")


def redact_path(path: str | None) -> str | None:
    """Request target for logs: query values dropped, card-like numbers masked."""
    if path is None:
        return None
    base, sep, query = path.partition("?")
    if sep:
        names = [kv.split("=", 1)[0] + ("=…" if "=" in kv else "") for kv in query.split("&")]
        base = base + "?" + "&".join(names)
    return mask_text(base)


def redact_sql(text: str) -> str:
    """SQL for logs: string literals become ``'…'``, card-like numbers are masked."""
    return mask_text(_SQL_STRING.sub(lambda m: m.group(0)[0] + "…" + m.group(0)[0], text))
