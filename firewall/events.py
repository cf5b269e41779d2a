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
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

Event = dict[str, Any]


def now_iso() -> str:
    """Timestamp in the EVE format (microseconds, explicit UTC offset)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


def ts_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


class EventSink:
    """Fan-out of events to a line-oriented stream and optional extra consumers.

    ``extra`` consumers (the alert webhook, the learner, tests) receive the event
    dict after it is written; they must not block - the webhook sink queues.
    """

    def __init__(self, stream: IO[str] | None = None, path: str | None = None) -> None:
        self._lock = threading.Lock()
        self._own = False
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._stream: IO[str] | None = os.fdopen(fd, "a", buffering=1)
            self._own = True
        else:
            self._stream = stream if stream is not None else sys.stdout
        self._extra: list[Callable[[Event], None]] = []
        self.errors = 0
        self.count = 0

    def add_consumer(self, fn: Callable[[Event], None]) -> None:
        self._extra.append(fn)

    def emit(self, event: Event) -> None:
        event.setdefault("timestamp", now_iso())
        line = json.dumps(event, separators=(",", ":"), default=str)
        with self._lock:
            self.count += 1
            if self._stream is not None:
                try:
                    self._stream.write(line + "\n")
                    self._stream.flush()
                except (OSError, ValueError):
                    self.errors += 1
        for fn in self._extra:
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - a consumer must never break the data path
                self.errors += 1

    def close(self) -> None:
        if self._own and self._stream is not None:
            self._stream.close()
            self._stream = None


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
