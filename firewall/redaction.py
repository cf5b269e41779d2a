"""The one redaction rule for everything that leaves the data path as text.

Events, alerts, flow summaries (``l7``), webhook payloads and the files built
from them (report, learned policy) all pass through ``redact_event`` at the
event sink (``firewall/events.py``), so no producer - a parser that keeps a
path, a summary that lists DNS names, a future module - can hand a full card
number to the SIEM.  Producers may mask more (``protocols/redact.py`` drops
query-string values); they can never mask less.

The rule, applied to every string (and dict key) at any depth:

* **digit runs that could be a card** are masked to PCI DSS 3.4.1's first six /
  last four: 12 or more digits, where consecutive digits may be separated by up
  to three separators (whitespace and control characters, ``-``, ``.``, ``/``,
  ``+``, ``_``, backslash, Unicode spaces, dashes and zero-width characters), after
  percent-decoding (``%34``, double-encoded ``%2534``, ``%20``, ``%2D`` ...) and
  with Unicode decimal digits counted as digits.  No Luhn check on purpose: a
  15-digit prefix is as sensitive as the number (Luhn restores the 16th digit),
  and an over-masked order number in a log costs nothing;
* **integers** of 14 digits or more (a card sent where a number field was
  parsed, e.g. ``Content-Length``) become masked strings;
* **lengths are bounded**: strings to ``MAX_FIELD`` characters, lists to
  ``MAX_ITEMS`` items, nesting to ``MAX_DEPTH`` levels.

The sidecar's own ISO timestamps are the only strings exempt (their shape
cannot hold 12 free digits).  Other DLP-pack values (IBANs, SSNs, keys) are
masked when the sink is given the DLP engine (``EventSink.set_scanner``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

MAX_FIELD = 4096
MAX_ITEMS = 256
MAX_DEPTH = 12
MIN_DIGITS = 12
INT_LIMIT = 10**13
STAR = "*"
TRUNCATED = "...[truncated]"

# ASCII fast path: no '%' and no non-ASCII character in the string.
_SEP = r"[\x00-\x20\x7f\-./+_\\]"
_ASCII_RUN = re.compile(rf"[0-9](?:{_SEP}{{0,3}}[0-9]){{{MIN_DIGITS - 1},}}")
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?")
_SEPARATORS = frozenset([chr(i) for i in range(33)] + ["\x7f", "-", ".", "/", "+", "_", "\\"])
_SEP_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Pd"})  # spaces, controls, zero-width, dashes
_HEX = frozenset("0123456789abcdefABCDEF")
_MAX_GAP = 3
# ints under these keys are the sidecar's own counters and ids, never traffic
_INT_KEYS = frozenset({"flow_id", "signature_id", "bytes_toserver", "bytes_toclient", "pkts_toserver",
                       "pkts_toclient", "offset", "length", "bytes", "size"})


def _pct(s: str, i: int) -> tuple[str, int] | None:
    """The character a percent-escape at ``i`` stands for (one or two layers: ``%34``,
    ``%2534``) and the escape's length, or None when ``s[i:]`` is not an escape."""
    if i + 2 >= len(s) or s[i + 1] not in _HEX or s[i + 2] not in _HEX:
        return None
    ch = chr(int(s[i + 1:i + 3], 16))
    if ch == "%" and i + 4 < len(s) and s[i + 3] in _HEX and s[i + 4] in _HEX:
        return chr(int(s[i + 3:i + 5], 16)), 5
    return ch, 3


def _tokens(s: str) -> list[tuple[int, int, int]]:
    """(start, end, kind) per logical character: kind 1 digit, 2 separator, 0 other."""
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        width = 1
        if c == "%":
            dec = _pct(s, i)
            if dec is not None:
                c, width = dec
        if "0" <= c <= "9" or (not c.isascii() and unicodedata.decimal(c, None) is not None):
            kind = 1
        elif c in _SEPARATORS or (not c.isascii() and unicodedata.category(c) in _SEP_CATEGORIES):
            kind = 2
        else:
            kind = 0
        out.append((i, i + width, kind))
        i += width
    return out


def _mask_runs_slow(s: str) -> str:
    toks = _tokens(s)
    spans: list[list[tuple[int, int]]] = []  # digit spans per run
    cur: list[tuple[int, int]] = []
    gap = 0
    for start, end, kind in toks:
        if kind == 1:
            cur.append((start, end))
            gap = 0
        elif kind == 2 and cur and gap < _MAX_GAP:
            gap += 1
        else:
            if len(cur) >= MIN_DIGITS:
                spans.append(cur)
            cur, gap = [], 0
    if len(cur) >= MIN_DIGITS:
        spans.append(cur)
    if not spans:
        return s
    hide: list[tuple[int, int]] = []
    for run in spans:
        hide.extend(run[6:len(run) - 4])
    out, last = [], 0
    for start, end in hide:
        out.append(s[last:start])
        out.append(STAR)
        last = end
    out.append(s[last:])
    return "".join(out)


def _mask_ascii_run(m: re.Match[str]) -> str:
    run = m.group(0)
    total = sum(1 for c in run if c.isdigit())
    out, k = [], 0
    for c in run:
        if c.isdigit():
            out.append(c if k < 6 or k >= total - 4 else STAR)
            k += 1
        else:
            out.append(c)
    return "".join(out)


def mask_text(s: str) -> str:
    """Mask every card-shaped digit run in ``s`` (see the module docstring)."""
    if len(s) < MIN_DIGITS:
        return s
    if s.isascii() and "%" not in s:
        if _TS.fullmatch(s):
            return s
        return _ASCII_RUN.sub(_mask_ascii_run, s)
    return _mask_runs_slow(s)


def bound(s: str, limit: int = MAX_FIELD) -> str:
    return s if len(s) <= limit else s[:limit] + TRUNCATED


def redact_str(s: str) -> str:
    """One string field: pre-cut (a megabyte path costs no more than ``4 * MAX_FIELD``),
    mask, cut to ``MAX_FIELD``."""
    if len(s) > 4 * MAX_FIELD:
        s = s[:4 * MAX_FIELD]
    return bound(mask_text(s))


Scanner = Callable[[list[str]], list[str]]


def redact_value(v: Any, key: str = "", depth: int = 0, found: list | None = None) -> Any:
    """A copy of ``v`` with every string, key and large integer redacted and every size bounded.
    ``found`` collects ``(container, key)`` of every string value (for a DLP pass)."""
    if isinstance(v, str):
        return redact_str(v)
    if isinstance(v, bool) or v is None or isinstance(v, float):
        return v
    if isinstance(v, int):
        if abs(v) >= INT_LIMIT and key not in _INT_KEYS:
            return mask_text(str(v))
        return v
    if depth >= MAX_DEPTH:
        return TRUNCATED
    if isinstance(v, dict):
        out: dict[str, Any] = {}
        for i, (k, item) in enumerate(v.items()):
            if i >= MAX_ITEMS:
                out["_truncated"] = len(v) - MAX_ITEMS
                break
            ks = redact_str(k if isinstance(k, str) else str(k))
            out[ks] = redact_value(item, ks, depth + 1, found)
            if found is not None and isinstance(out[ks], str) and len(out[ks]) >= 8:
                found.append((out, ks))
        return out
    if isinstance(v, list | tuple | set | frozenset):
        items = list(v)
        res = [redact_value(x, key, depth + 1, found) for x in items[:MAX_ITEMS]]
        if found is not None:
            found.extend((res, i) for i, x in enumerate(res) if isinstance(x, str) and len(x) >= 8)
        if len(items) > MAX_ITEMS:
            res.append(TRUNCATED)
        return res
    if isinstance(v, bytes | bytearray | memoryview):
        return redact_str(bytes(v).decode("utf-8", "backslashreplace"))
    return redact_str(str(v))


def redact_event(event: dict[str, Any], scanner: Scanner | None = None) -> dict[str, Any]:
    """The event as it may leave the sidecar (a new dict; ``event`` is not changed).
    With ``scanner`` (``dlp_scanner(engine)``) every string value is also passed through the
    DLP engine, all of one event in one scan."""
    found: list | None = [] if scanner is not None else None
    out = redact_value(event, found=found)
    if scanner is not None and found:
        masked = scanner([c[k] for c, k in found])
        for (c, k), m in zip(found, masked, strict=True):
            c[k] = m
    return out  # type: ignore[no-any-return]


_JOIN = b"\n\x00\n"  # no detector spans a NUL line


def dlp_scanner(engine: Any) -> Scanner:
    """A batch scanner masking what ``engine`` (a DlpEngine) finds, with the finding's own
    masked form (first six / last four for cards, a type hint for the rest).  The strings of
    one event are joined and scanned once.  A scanner fault leaves the strings to the shape
    rules; it never raises."""

    def scan(strings: list[str]) -> list[str]:
        raws = [s.encode("utf-8", "surrogatepass") for s in strings]
        joined = _JOIN.join(raws)
        try:
            findings = engine.scan_bytes(joined)
        except Exception:  # noqa: BLE001 - redaction must never break the sink
            return strings
        if not findings:
            return strings
        starts, pos = [], 0
        for r in raws:
            starts.append(pos)
            pos += len(r) + len(_JOIN)
        out = list(strings)
        per: dict[int, list] = {}
        import bisect

        for f in sorted(findings, key=lambda f: (f.start, -f.end)):
            i = bisect.bisect_right(starts, f.start) - 1
            if i < 0 or f.end > starts[i] + len(raws[i]):
                continue
            per.setdefault(i, []).append(f)
        for i, fs in per.items():
            raw, base, buf, last = raws[i], starts[i], bytearray(), 0
            for f in fs:
                a, b = f.start - base, f.end - base
                if a < last:
                    continue
                buf += raw[last:a] + f.masked.encode()
                last = b
            buf += raw[last:]
            out[i] = buf.decode("utf-8", "replace")
        return out

    return scan
