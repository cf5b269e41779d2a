"""The one redaction rule for everything that leaves the data path as text.

Events, alerts, flow summaries (``l7``), webhook payloads and the files built
from them (report, learned policy) all pass through ``redact_event`` at the
event sink (``firewall/observe/events.py``), so no producer - a parser that keeps a
path, a summary that lists DNS names, a future module - can hand a full card
number to the SIEM.  Producers may mask more (``protocols/redact.py`` drops
query-string values, ``dlp/mask.py`` stars shorter numbers in context snippets); they
can never mask less.  Their digit runs go through ``mask_text`` here as well, so a card
reads the same (``411111******1111``) in a flow summary, a DLP context and an event.

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

Two kinds of string are exempt, both the sidecar's own: its ISO timestamps (their
shape cannot hold 12 free digits) and the SHA-256 digests of its capture files (exactly 64
lowercase hex characters under a ``sha256`` key; one digest in fourteen holds a run of 12
digits, and a masked digest no longer matches its file).  No parser declares a ``sha256``
field, so traffic cannot put text there.  Other DLP-pack values (IBANs, SSNs, keys) are
masked when the sink is given the DLP engine (``EventSink.set_scanner``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

MAX_FIELD = 4096
MAX_ITEMS = 256
MAX_DEPTH = 12
MIN_DIGITS = 12
_CUT_SLACK = 512  # 4 digits + 3 separators each, all double percent-encoded: < 100 characters
INT_LIMIT = 10**13
STAR = "*"
TRUNCATED = "...[truncated]"

# One regex, run by the C engine (a per-character Python loop over a 16 KiB hostile path
# cost 10 ms of event loop per field).  A digit: any Unicode decimal digit, or one percent-
# encoded once or twice (%34, %2534).  A separator: whitespace, control characters, - . / + _ \,
# Unicode dashes and zero-width characters, or one of those percent-encoded (%20, %2D, %0A ...).
_DIGIT = r"(?:\d|%(?:25)?3\d)"
_SEP = (r"(?:[\s\x00-\x1f\x7f\-./+_\\\u00ad\u2010-\u2015\u2212\u200b-\u200f\u2060-\u2064\ufeff\uff0d]"
        r"|%(?:25)?(?:[01][0-9a-fA-F]|2[0bBdDeEfF]|5[cCfF]|7[fF]))")
_RUN = re.compile(rf"{_DIGIT}(?:{_SEP}{{0,3}}{_DIGIT}){{{MIN_DIGITS - 1},}}")
_TOKEN = re.compile(rf"({_DIGIT})|{_SEP}")  # a run, token by token (group 1: a digit)
# the common case (ASCII, no '%'): plain character classes, about three times faster
_ASCII_RUN = re.compile(rf"[0-9](?:[\x00-\x20\x7f\-./+_\\]{{0,3}}[0-9]){{{MIN_DIGITS - 1},}}")
_STARS = str.maketrans("0123456789", STAR * 10)
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?")
# ints under these keys are the sidecar's own counters and ids, never traffic
_DIGEST_KEY = "sha256"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_INT_KEYS = frozenset({"flow_id", "signature_id", "bytes_toserver", "bytes_toclient", "pkts_toserver",
                       "pkts_toclient", "offset", "length", "bytes", "size"})


def _mask_run(m: re.Match[str]) -> str:
    run = m.group(0)
    digits = [t for t in _TOKEN.finditer(run) if t.group(1)]
    out, last = [], 0
    for d in digits[6:len(digits) - 4]:
        out.append(run[last:d.start()])
        out.append(STAR)
        last = d.end()
    out.append(run[last:])
    return "".join(out)


def _mask_ascii_run(m: re.Match[str]) -> str:
    run = m.group(0)
    first = last = -1
    seen = 0
    for i, c in enumerate(run):  # index just after the 6th digit, and of the 4th digit from the end
        if "0" <= c <= "9":
            seen += 1
            if seen == 6:
                first = i + 1
    seen = 0
    for i in range(len(run) - 1, -1, -1):
        if "0" <= run[i] <= "9":
            seen += 1
            if seen == 4:
                last = i
                break
    return run[:first] + run[first:last].translate(_STARS) + run[last:]


def mask_text(s: str, between: Callable[[str], str] | None = None) -> str:
    """Mask every card-shaped digit run in ``s`` (see the module docstring).

    ``between``, if given, rewrites the text between those runs: a producer that masks more
    (shorter numbers, say) without touching the card runs this rule already masked."""
    if len(s) < MIN_DIGITS or (s.isascii() and _TS.fullmatch(s)):
        return between(s) if between is not None else s
    if s.isascii() and "%" not in s:
        run, mask = _ASCII_RUN, _mask_ascii_run
    else:
        run, mask = _RUN, _mask_run
    if between is None:
        return run.sub(mask, s)
    out, last = [], 0
    for m in run.finditer(s):
        out += (between(s[last:m.start()]), mask(m))
        last = m.end()
    out.append(between(s[last:]))
    return "".join(out)


def bound(s: str, limit: int = MAX_FIELD) -> str:
    return s if len(s) <= limit else s[:limit] + TRUNCATED


def redact_str(s: str) -> str:
    """One string field: pre-cut (a megabyte path costs no more than a short one), mask, cut
    to ``MAX_FIELD``.  The pre-cut leaves ``_CUT_SLACK`` characters past the final cut, more
    than the last four digits of any run can span, so a run the pre-cut splits still shows at
    most its first six digits before ``MAX_FIELD``."""
    if len(s) < MIN_DIGITS:
        return s
    if len(s) > MAX_FIELD + _CUT_SLACK:
        s = s[:MAX_FIELD + _CUT_SLACK]
    return bound(mask_text(s))


Scanner = Callable[[list[str]], list[str]]
# strings worth a DLP look: a digit or an @ somewhere, or 16 characters without a blank (every
# detector of the shipped packs needs one: numbers, e-mail, keys and tokens of 16+ characters)
_DLP_WORTHY = re.compile(r"[0-9@]|[^\s]{16}")


def _worthy(s: str) -> bool:
    return len(s) >= 8 and not (s.isascii() and _TS.fullmatch(s)) and _DLP_WORTHY.search(s) is not None


def redact_value(v: Any, key: str = "", depth: int = 0, found: list | None = None) -> Any:
    """A copy of ``v`` with every string, key and large integer redacted and every size bounded.
    ``found`` collects ``(container, key)`` of the string values worth a DLP pass."""
    t = type(v)
    if t is str:
        if key == _DIGEST_KEY and _DIGEST.fullmatch(v):
            return v  # a capture file's digest (see the module docstring)
        return redact_str(v)
    if v is None or t is bool or t is float:
        return v
    if t is int:
        if (v >= INT_LIMIT or v <= -INT_LIMIT) and key not in _INT_KEYS:
            return mask_text(str(v))
        return v
    if depth >= MAX_DEPTH:
        return TRUNCATED
    if t is dict:
        out: dict[str, Any] = {}
        n = 0
        for k, item in v.items():
            n += 1
            if n > MAX_ITEMS:
                out["_truncated"] = len(v) - MAX_ITEMS
                break
            # the common cases inline (this runs for every field of every event)
            ks = k if type(k) is str and len(k) < MIN_DIGITS else redact_str(str(k))
            ti = type(item)
            if ti is str and _DIGEST_KEY in (key, ks) and _DIGEST.fullmatch(item):
                out[ks] = item  # a capture digest, or {file name: digest} (see the module docstring)
            elif ti is str:
                r = out[ks] = item if len(item) < MIN_DIGITS else redact_str(item)
                if found is not None and len(r) >= 8 and _worthy(r):
                    found.append((out, ks))
            elif item is None or ti is bool or ti is float or (
                    ti is int and (-INT_LIMIT < item < INT_LIMIT or ks in _INT_KEYS)):
                out[ks] = item
            else:
                out[ks] = redact_value(item, ks, depth + 1, found)
        return out
    if isinstance(v, list | tuple | set | frozenset):
        items = list(v)
        res = [redact_value(x, key, depth + 1, found) for x in items[:MAX_ITEMS]]
        if found is not None:
            found.extend((res, i) for i, x in enumerate(res) if type(x) is str and _worthy(x))
        if len(items) > MAX_ITEMS:
            res.append(TRUNCATED)
        return res
    if isinstance(v, str):  # a str subclass
        return redact_str(str(v))
    if isinstance(v, bool | float):
        return v
    if isinstance(v, int):
        return redact_value(int(v), key, depth, found)
    if isinstance(v, dict):
        return redact_value(dict(v), key, depth, found)
    if isinstance(v, bytes | bytearray | memoryview):
        return redact_str(bytes(v).decode("utf-8", "backslashreplace"))
    return redact_str(str(v))


def redact_event(event: dict[str, Any], scanner: Scanner | None = None) -> dict[str, Any]:
    """The event as it may leave the sidecar (a new dict; ``event`` is not changed).
    With ``scanner`` (``dlp_scanner(engine)``) the string values that could hold a value
    (a digit, an @, or 16 characters without a blank) are also passed through the DLP engine, all
    of one event in one scan."""
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
