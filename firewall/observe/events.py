"""EVE-style JSON events (one object per line), the sidecar's only output format.

Suricata's EVE conventions are kept so SIEM pipelines parse Palisade's events
unchanged: ``timestamp`` (ISO 8601 with offset), ``event_type``, ``src_ip``,
``src_port``, ``dest_ip``, ``dest_port``, ``proto``, ``app_proto``.

Event types and their fields (never remove a field; add only):

* ``flow`` - exactly one per TCP/UDP flow, on close::

    direction: "inbound" | "outbound", verdict: "allow" | "deny", rule: str,
    app_proto, l7: {...}, encrypted: bool, close_reason: str,
    flow: {bytes_toserver, bytes_toclient, start, end}
    src_workload / dest_workload: identity objects (namespace, pod, labels, scope)

* ``alert`` - policy deny / would-deny and DLP findings::

    alert: {action: "blocked" | "allowed", signature, signature_id, category: "policy" | "dlp",
            severity}, dlp: {...} (category dlp only, values masked)

* ``l7`` protocol events (``event_type`` = the app_proto: ``http``, ``tls``, ``dns`` ...),
  ``pcap`` capture lifecycle, ``policy`` reloads, ``quarantine`` changes.

Writers are thread-safe (captures and the podinfo watcher emit from their own
threads) and never raise into the data path: a broken sink is counted and skipped.

Two guarantees live here, at the one place every event passes:

* **redaction** - every event is rewritten by ``firewall.observe.redaction.redact_event``
  before it is written or handed to a consumer (webhook, learner), so no
  producer can put a full card number into the output;
* **evidence loss is visible** - an event that cannot be written (full disk,
  closed descriptor) is counted in ``palisade_events_dropped_total{reason}``,
  logged at most once per ``LOG_INTERVAL`` seconds, and reported to the
  consumers (the alert webhook) as an ``events-dropped`` alert at the same rate.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from prometheus_client import Counter

from firewall.observe.redaction import dlp_scanner, mask_text, redact_event
from firewall.observe.signature import signature_id

Event = dict[str, Any]

log = logging.getLogger("palisade.events")

EVENTS_DROPPED = Counter("palisade_events_dropped", "Events that could not be written or delivered",
                         ["reason"])
LOG_INTERVAL = 10.0  # seconds between two "events dropped" log lines / alerts
DROP_SIGNATURE = "palisade:events-dropped"


class RedactingFormatter(logging.Formatter):
    """Log lines get the same card masking as events (a traceback or a warning may quote
    traffic: a path, a name)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return mask_text(self.inner.format(record))


def redact_logs(logger: logging.Logger | None = None) -> None:
    """Wrap the formatter of every handler of ``logger`` (default: root) in RedactingFormatter."""
    for h in (logger or logging.getLogger()).handlers:
        if not isinstance(h.formatter, RedactingFormatter):
            h.setFormatter(RedactingFormatter(h.formatter))


def drop_reason(exc: BaseException) -> str:
    """A small, fixed label set for the drop counter."""
    if isinstance(exc, OSError):
        return {errno.ENOSPC: "no_space", errno.EDQUOT: "no_space", errno.EBADF: "closed",
                errno.EPIPE: "closed", errno.EIO: "io_error", errno.EFBIG: "too_large"}.get(
                    exc.errno or 0, "write_error")
    if isinstance(exc, ValueError):  # write to a closed Python file object
        return "closed"
    return "write_error"


@functools.lru_cache(maxsize=64)
def _second_prefix(sec: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.`` of one whole second; cached: a flow record needs up to three
    timestamps and ``strftime`` cost ~5 us each, while the second rarely changes between them."""
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def now_iso() -> str:
    """Timestamp in the EVE format (microseconds, explicit UTC offset)."""
    return ts_iso(time.time())


def ts_iso(epoch: float) -> str:
    sec = math.floor(epoch)
    return f"{_second_prefix(sec)}{int((epoch - sec) * 1e6):06d}+0000"


class EventSink:
    """Fan-out of events to a line-oriented stream and optional extra consumers.

    ``extra`` consumers (the alert webhook, the learner, tests) receive the event
    dict after it is written; they must not block - the webhook sink queues.
    """

    def __init__(self, stream: IO[str] | None = None, path: str | None = None) -> None:
        self._lock = threading.Lock()
        self._own = False
        self._fd: int | None = None  # a file we opened: one os.write per line, no buffer to poison
        self._stream: IO[str] | None = None
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            self._own = True
        else:
            self._stream = stream if stream is not None else sys.stdout
        self._extra: list[Callable[[Event], None]] = []
        self._scanner: Callable[[list[str]], list[str]] | None = None
        self.errors = 0
        self.count = 0
        self.dropped: dict[str, int] = {}
        self._unreported = 0
        self._last_report = float("-inf")
        self._partial = False  # the last write may have left a partial line

    def add_consumer(self, fn: Callable[[Event], None]) -> None:
        self._extra.append(fn)

    def set_scanner(self, engine: Any) -> None:
        """Also mask what the DLP engine finds (IBANs, SSNs, keys) in every string field."""
        self._scanner = dlp_scanner(engine) if engine is not None else None

    def emit(self, event: Event) -> None:
        event.setdefault("timestamp", now_iso())
        try:
            out = redact_event(event, self._scanner)
        except Exception:  # noqa: BLE001 - never write what could not be redacted
            self._drop("redaction_error")
            return
        line = json.dumps(out, separators=(",", ":"), default=str) + "\n"
        failed: str | None = None
        with self._lock:
            self.count += 1
            try:
                if self._fd is not None:
                    data = line.encode("utf-8", "backslashreplace")
                    if self._partial:  # a line cut short by a full disk: end it first
                        data = b"\n" + data
                    self._partial = True
                    written = os.write(self._fd, data)
                    if written != len(data):
                        raise OSError(errno.ENOSPC, "short write")
                    self._partial = False
                elif self._stream is not None:
                    self._stream.write(line)
                    self._stream.flush()
            except (OSError, ValueError) as exc:
                failed = drop_reason(exc)
        if failed is not None:
            self._drop(failed)
        for fn in self._extra:
            try:
                fn(out)
            except Exception:  # noqa: BLE001 - a consumer must never break the data path
                self._drop("consumer_error")

    def emit_many(self, events: list[Event]) -> None:
        """Several events in one write (flow records, batched by the proxy).

        Each event is still redacted on its own, exactly as by ``emit``; an event that cannot
        be redacted is dropped (and counted) alone.  A failed write counts every event of
        the batch as dropped."""
        lines: list[str] = []
        outs: list[Event] = []
        for event in events:
            event.setdefault("timestamp", now_iso())
            try:
                out = redact_event(event, self._scanner)
            except Exception:  # noqa: BLE001 - never write what could not be redacted
                self._drop("redaction_error")
                continue
            lines.append(json.dumps(out, separators=(",", ":"), default=str))
            outs.append(out)
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        failed: str | None = None
        with self._lock:
            self.count += len(lines)
            try:
                if self._fd is not None:
                    data = text.encode("utf-8", "backslashreplace")
                    if self._partial:
                        data = b"\n" + data
                    self._partial = True
                    view = memoryview(data)
                    while view:  # a large batch may be written in parts; O_APPEND keeps it whole
                        written = os.write(self._fd, view)
                        if written <= 0:
                            raise OSError(errno.ENOSPC, "short write")
                        view = view[written:]
                    self._partial = False
                elif self._stream is not None:
                    self._stream.write(text)
                    self._stream.flush()
            except (OSError, ValueError) as exc:
                failed = drop_reason(exc)
        if failed is not None:
            for _ in outs:
                self._drop(failed)
        for out in outs:
            for fn in self._extra:
                try:
                    fn(out)
                except Exception:  # noqa: BLE001 - a consumer must never break the data path
                    self._drop("consumer_error")

    def _drop(self, reason: str) -> None:
        """Count one lost event; at most once per LOG_INTERVAL log it and tell the consumers."""
        EVENTS_DROPPED.labels(reason).inc()
        with self._lock:
            self.errors += 1
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            self._unreported += 1
            now = time.monotonic()
            if now - self._last_report < LOG_INTERVAL:
                return
            self._last_report = now
            n, self._unreported = self._unreported, 0
            totals = dict(self.dropped)
        log.error("events dropped: %d since the last report (%s); evidence is missing from the events "
                  "output", n, ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
        alert = {"timestamp": now_iso(), "event_type": "alert",
                 "alert": {"action": "allowed", "signature": DROP_SIGNATURE,
                           "signature_id": signature_id(DROP_SIGNATURE),
                           "category": "evidence", "severity": 1},
                 "events_dropped": {"since_last": n, "total": totals}}
        for fn in self._extra:
            try:
                fn(alert)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if self._own and self._fd is not None:
            os.close(self._fd)
            self._fd = None


class MemorySink(EventSink):
    """Collects events in a list (tests, offline tools)."""

    def __init__(self) -> None:
        super().__init__(stream=None)
        self._stream = None
        self.events: list[Event] = []
        self.add_consumer(self.events.append)


def read_events(path: str) -> list[Event]:
    """Parse an EVE JSON-lines file, skipping blank and non-JSON lines."""
    out: list[Event] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
