"""Masking of values that L7 metadata may carry into logs.

Events and flow summaries are logged, and application traffic puts sensitive
values where metadata lives: card numbers in URL paths (``/cards/4111...``),
tokens in query strings, literals in SQL text. Policy needs the path and the
verb, never those values, so everything a parser keeps for *display* goes
through here first: digit runs that could be a PAN keep at most the first six
and last four digits (PCI DSS 3.4.1), query-string values and SQL string
literals are replaced outright.
"""

from __future__ import annotations

import re

# 12..19 digits, optionally separated by single spaces or dashes (card shapes)
_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d){11,18}")
_SQL_STRING = re.compile(r"'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?")
MASK = "*"


def _mask_run(m: re.Match[str]) -> str:
    run = m.group(0)
    digits = [c for c in run if c.isdigit()]
    keep = set(range(6)) | set(range(len(digits) - 4, len(digits)))
    out, k = [], 0
    for c in run:
        if c.isdigit():
            out.append(c if k in keep else MASK)
            k += 1
        else:
            out.append(c)
    return "".join(out)


def mask_digits(text: str) -> str:
    """Mask the middle of every card-length digit run: ``411111******1111``."""
    return _DIGIT_RUN.sub(_mask_run, text)


def redact_path(path: str | None) -> str | None:
    """Request target for logs: query values dropped, card-like numbers masked."""
    if path is None:
        return None
    base, sep, query = path.partition("?")
    if sep:
        names = [kv.split("=", 1)[0] + ("=…" if "=" in kv else "") for kv in query.split("&")]
        base = base + "?" + "&".join(names)
    return mask_digits(base)


def redact_sql(text: str) -> str:
    """SQL for logs: string literals become ``'…'``, card-like numbers are masked."""
    return mask_digits(_SQL_STRING.sub(lambda m: m.group(0)[0] + "…" + m.group(0)[0], text))
