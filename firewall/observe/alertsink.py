"""Delivery of events to an HTTP endpoint (``--alert-webhook URL``).

The sink is an :class:`firewall.observe.events.EventSink` consumer: ``sink(event)`` is
called on whatever thread emitted the event - often the proxy's event loop -
so it must never wait for the network. It only filters by ``event_type``,
appends a shallow copy to a bounded in-memory queue and wakes one background
thread. The queue is bounded twice: by count (``queue_size``) and by the bytes
of the queued events (``queue_bytes``; each event is stored JSON-encoded, so the
bound is exact - a count bound alone let 10,000 alerts with 60 KB paths hold
630 MiB behind a slow receiver). When either bound would be exceeded the event
is dropped and counted (``palisade_alert_webhook_dropped_total{reason=
"queue_full"}``, or ``"too_large"`` for one event bigger than the whole byte
budget): losing an alert copy is better than slowing traffic or exhausting the
pod's memory, and the events file still has every event.

Wire format: ``POST`` with ``Content-Type: application/json``. With
``batch > 1`` (default 100) the body is a JSON **array** of up to ``batch``
events (whatever is queued when the thread wakes, so a lone alert is sent at
once, not held back for a batch to fill); with ``batch == 1`` the body is one
JSON **object** per request, for receivers that expect that.

Failures: connection errors, timeouts, 5xx, 408 and 429 are retried up to
``max_retries`` times with exponential backoff and jitter (``Retry-After`` is
honoured, capped at ``max_backoff_s``); then the batch is dropped
(``reason="retries_exhausted"``). Other 4xx mean the receiver will never take
it: dropped at once (``reason="rejected"``). Delivery is at-least-once per
attempt window - a receiver may see a batch twice if its 2xx was lost.
Only stdlib ``http.client`` is used (no new dependency); https uses the
system's default trust store.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge

from firewall import __version__

log = logging.getLogger(__name__)

try:  # https (ssl's server_hostname) needs the idna codec; import it while the stdlib is readable
    import encodings.idna  # noqa: F401
except ImportError:  # imported after the sidecar dropped privileges: plain http still works
    pass

DEFAULT_EVENT_TYPES = frozenset({"alert", "dlp", "pcap", "policy", "quarantine"})

WEBHOOK_DROPPED = Counter("palisade_alert_webhook_dropped", "Events not delivered to the alert webhook",
                          ["reason"])
WEBHOOK_SENT = Counter("palisade_alert_webhook_sent", "Events delivered to the alert webhook (2xx)")
WEBHOOK_RETRIES = Counter("palisade_alert_webhook_retries", "Alert webhook POST attempts that are retried")
WEBHOOK_QUEUED_BYTES = Gauge("palisade_alert_webhook_queued_bytes", "Bytes of events waiting for the alert webhook")

_RETRY_STATUS = {408, 429}


class WebhookError(ValueError):
    """A webhook URL or option that cannot be used."""


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Reject(Exception):
    pass


class WebhookSink:
    """Bounded, non-blocking JSON POST delivery of events on one background thread."""

    def __init__(self, url: str, *, queue_size: int = 10000, queue_bytes: int = 16 << 20,
                 timeout_s: float = 2, max_retries: int = 5,
                 batch: int = 100, event_types: Iterable[str] | None = DEFAULT_EVENT_TYPES,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 headers: dict[str, str] | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookError(f"alert webhook: {_redact(url)!r} is not an http(s) URL with a host")
        try:
            self._port = parts.port
        except ValueError:
            raise WebhookError(f"alert webhook: bad port in {_redact(url)!r}") from None
        if queue_size < 1 or queue_bytes < 1 or batch < 1 or max_retries < 0 or timeout_s <= 0:
            raise WebhookError("alert webhook: queue_size, queue_bytes, batch and timeout must be positive, "
                               "max_retries >= 0")
        self.url = url
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json", "User-Agent": f"palisade/{__version__}"}
        if parts.username is not None:  # https://user:token@host/... -> Basic auth
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        if headers:
            self._headers.update(headers)
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.batch = batch
        self.event_types = frozenset(event_types) if event_types is not None else None
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._q: deque[bytes] = deque()  # JSON-encoded events
        self._q_lock = threading.Lock()  # the byte total and the deque change together
        self._bytes = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush_deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        # per-instance counters (the Prometheus ones are process-wide)
        self._count_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
        self.retries = 0
        self.requests = 0

    # -- producer side (any thread; never blocks)
    def __call__(self, event: dict[str, Any]) -> None:
        if self.event_types is not None and event.get("event_type") not in self.event_types:
            return
        if self._stopping.is_set():
            self._drop(1, "stopped")
            return
        if len(self._q) >= self.queue_size or self._bytes >= self.queue_bytes:
            self._drop(1, "queue_full")  # checked before encoding: a flood costs no JSON work
            return
        data = json.dumps(event, separators=(",", ":"), default=str).encode("utf-8")
        with self._q_lock:
            if len(data) > self.queue_bytes:
                reason = "too_large"
            elif self._bytes + len(data) > self.queue_bytes or len(self._q) >= self.queue_size:
                reason = "queue_full"
            else:
                reason = ""
                self._q.append(data)
                self._bytes += len(data)
        if reason:
            self._drop(1, reason)
            return
        WEBHOOK_QUEUED_BYTES.inc(len(data))
        if not self._wake.is_set():
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._q)

    @property
    def queued_bytes(self) -> int:
        """Bytes of JSON waiting to be sent (what the ``queue_bytes`` bound counts)."""
        return self._bytes

    def _pop(self, n: int) -> list[bytes]:
        with self._q_lock:
            items = []
            while self._q and len(items) < n:
                items.append(self._q.popleft())
            size = sum(len(i) for i in items)
            self._bytes -= size
        WEBHOOK_QUEUED_BYTES.dec(size)
        return items

    # -- lifecycle
    def start(self) -> WebhookSink:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
            self._thread.start()
        return self

    def stop(self, flush_timeout: float = 5.0) -> bool:
        """Deliver what is queued for up to ``flush_timeout`` s, then stop.

        Returns True when everything queued was delivered (nothing dropped while flushing).
        """
        dropped_before = self.dropped
        self._flush_deadline = time.monotonic() + flush_timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(flush_timeout + self.timeout_s + 1)
            self._thread = None
        left = len(self._pop(len(self._q)))
        if left:
            self._drop(left, "stopped")
        self._close_conn()
        return self.dropped == dropped_before

    # -- sender thread
    def _drop(self, n: int, reason: str) -> None:
        with self._count_lock:  # producers and the sender both drop
            self.dropped += n
        WEBHOOK_DROPPED.labels(reason).inc(n)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._q:
                if self._stopping.is_set() and time.monotonic() >= self._flush_deadline:
                    break
                items = self._pop(self.batch)
                try:
                    self._deliver(items)
                except Exception:  # noqa: BLE001 - the thread must survive anything
                    log.exception("alert webhook delivery crashed; %d events dropped", len(items))
                    self._drop(len(items), "error")
                continue
            if self._stopping.is_set():
                break
            self._wake.wait(1.0)

    def _deliver(self, items: list[bytes]) -> None:
        body = items[0] if self.batch == 1 else b"[" + b",".join(items) + b"]"
        attempt = 0
        while True:
            try:
                self._post(body)
                self.sent += len(items)
                WEBHOOK_SENT.inc(len(items))
                return
            except _Reject as exc:
                log.warning("alert webhook rejected %d events: %s", len(items), exc)
                self._drop(len(items), "rejected")
                return
            except _Retry as exc:
                if attempt >= self.max_retries:
                    log.warning("alert webhook: giving up on %d events after %d attempts: %s",
                                len(items), attempt + 1, exc)
                    self._drop(len(items), "retries_exhausted")
                    return
                delay = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
                delay = random.uniform(delay / 2, delay)
                if exc.retry_after is not None:
                    delay = min(self.max_backoff_s, max(delay, exc.retry_after))
                attempt += 1
                self.retries += 1
                WEBHOOK_RETRIES.inc()
                if self._stopping.is_set():
                    remaining = self._flush_deadline - time.monotonic()
                    if remaining <= delay:
                        self._drop(len(items), "stopped")
                        return
                    time.sleep(delay)
                elif self._stopping.wait(delay):
                    continue  # stop requested during backoff: retry now, within the flush window

    def _post(self, body: bytes) -> None:
        self.requests += 1
        try:
            conn = self._connection()
            conn.request("POST", self._path, body=body, headers=self._headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
            retry_after = resp.getheader("Retry-After")
            if resp.will_close:
                self._close_conn()
        except (OSError, http.client.HTTPException) as exc:
            self._close_conn()
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return
        if status >= 500 or status in _RETRY_STATUS:
            raise _Retry(f"HTTP {status}", _retry_after(retry_after))
        raise _Reject(f"HTTP {status}")

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = _HTTPSConnection if self._scheme == "https" else _HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None


class _HTTPConnection(http.client.HTTPConnection):
    """Resolves an ASCII host as bytes: a str host makes getaddrinfo() look up the idna
    codec, which fails once the sidecar has dropped to a user that cannot read the stdlib."""

    def connect(self) -> None:
        host: str | bytes = self.host
        if isinstance(host, str) and host.isascii():
            host = host.encode("ascii")
        self.sock = _marked_connection(host, self.port, self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPSConnection(http.client.HTTPSConnection):
    """TLS over the same marked socket."""

    def connect(self) -> None:
        _HTTPConnection.connect(self)  # type: ignore[arg-type]
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _marked_connection(host: str | bytes, port: int, timeout: Any) -> socket.socket:
    """socket.create_connection, but the socket carries the sidecar's SO_MARK before it connects:
    the redirect exempts that mark (not the proxy's user), so the webhook is not looped through
    the sidecar's own outbound listener and its policy (issue 16)."""
    from firewall.datapath.redirect import mark_own

    err: OSError | None = None
    for family, kind, proto, _name, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            mark_own(sock)
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as exc:
            err = exc
            sock.close()
    raise err or OSError(f"cannot resolve {host!r}")


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _redact(url: str) -> str:
    """Never echo credentials embedded in a URL (``https://user:token@host``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if _safe_port(parts) else "")
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return url


def _safe_port(parts: urllib.parse.SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None
