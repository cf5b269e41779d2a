"""Bounded packet captures of the pod's traffic, written as pcap files.

Two triggers share one engine:

* the ``palisade.dev/pcap`` annotation (``duration=60s,filter=tcp port 5432``),
  delivered by :mod:`firewall.identity.podinfo` to :meth:`CaptureManager.on_annotations`;
* policy/DLP rules with ``capture: true``, through :meth:`CaptureManager.auto_capture`
  (filter ``host <peer>``, at most one per peer per window).

What is captured: an ``AF_PACKET``/``SOCK_RAW`` socket in the sidecar's (= the
pod's) network namespace. By default it is bound to no interface, so it sees
every interface of the pod - in both directions, outgoing packets included -
except ``lo``: loopback carries the proxy<->app legs of every redirected
connection, so capturing it would duplicate each payload. ``lo`` is dropped in
the kernel by a two-instruction prefix on the filter (ancillary ``ifindex``
load), not in Python. Only Ethernet-framed interfaces are written (pod
interfaces are veths); ``iface=NAME`` binds to one interface instead (``lo``
allowed when asked for). A veth shows each packet once (received or sent);
GRO/TSO can deliver packets larger than the MTU, which ``snaplen`` truncates.
VLAN tags offloaded by the NIC are not re-inserted.

Why this shape:

* The tcpdump-style filter is compiled to classic BPF by libpcap through ctypes
  (``pcap_compile`` on a dead handle; no subprocess per capture) and attached
  with ``SO_ATTACH_FILTER``, so non-matching packets never leave the kernel.
  The socket is opened with a reject-all filter and drained before the real
  filter goes in, so no packet from before the filter can leak into a file.
* Every capture runs in its own thread (never the proxy's event loop); a
  capture stops at ``duration``, ``max-bytes`` or ``max-packets``, whichever
  comes first. Original lengths come from ``PACKET_AUXDATA`` and timestamps from
  the kernel (``SO_TIMESTAMPNS``), written as nanosecond pcap that tcpdump,
  tshark and Wireshark read.
* Files are created ``0600`` with ``O_EXCL|O_NOFOLLOW``. The pcap directory has a
  disk budget: before a capture starts, the oldest finished files are removed
  (each removal is a ``pcap`` event with state ``removed``) until what is on
  disk plus what running captures may still write fits; a capture's
  ``max-bytes`` is lowered to what is left. ENOSPC or any I/O error ends the
  capture with a ``failed`` event, never an exception into the caller.
* The annotation value's SHA-256 is persisted in the pcap directory, so a
  sidecar restart or a reload that sees the same value does not capture again.
  Each distinct value gets exactly one attempt (a bad value gets one ``failed``
  event, not one per reload). A new value supersedes a running annotation
  capture; removing the annotation does not stop one (it is bounded anyway).

Capturing needs ``CAP_NET_RAW`` in the pod's namespace; without it a capture
fails with an event saying so.

This module is the engine's entry point (``CaptureManager``: triggers, concurrency, the disk
budget); the pieces are ``spec`` (options), ``bpf`` (filters), ``pcapfile`` (files, rotation,
retention), ``worker`` (one capture's thread) and ``triggers`` (annotation state, auto triggers).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from firewall import ANN_PCAP
from firewall.capture.pcapfile import id_of, make_room
from firewall.capture.spec import (
    MAX_DURATION_S,
    MIN_CAPTURE_BYTES,
    CaptureSpec,
    CaptureSpecError,
    MiB,
    parse_spec,
)
from firewall.capture.triggers import STATE_FILE, AnnotationState, auto_trigger
from firewall.capture.worker import CAPTURES_FAILED, Capture

# the spec's names stay importable from here (the engine's entry point) for existing callers
__all__ = ["STATE_FILE", "Capture", "CaptureManager", "CaptureSpec", "CaptureSpecError", "parse_spec"]

log = logging.getLogger(__name__)

AUTO_MAX_BYTES = 10 * MiB

PCAP_FILES_REMOVED = Counter("palisade_pcap_files_removed", "Pcap files removed to keep the disk budget")
AUTO_SKIPPED = Counter("palisade_pcap_auto_skipped", "Automatic captures not started", ["reason"])


class CaptureManager:
    """Starts, bounds and accounts for captures; the sidecar's single entry point.

    Thread-safe: ``on_annotations`` runs on the podinfo watcher's thread and
    ``auto_capture`` on the proxy's event loop. Neither does file I/O beyond the
    small state file on an annotation change; disk-budget work happens on the
    capture's own thread.
    """

    def __init__(self, pcap_dir: str, emit: Callable[[dict], None], *, max_concurrent: int = 2,
                 disk_budget_bytes: int = 500 * MiB, state_path: str | None = None,
                 auto_window_s: float = 300, auto_max_bytes: int = AUTO_MAX_BYTES,
                 netns: str | None = None) -> None:
        self.pcap_dir = pcap_dir
        self.emit = emit
        self.max_concurrent = max_concurrent
        self.disk_budget_bytes = disk_budget_bytes
        self.state_path = state_path or os.path.join(pcap_dir, STATE_FILE)
        self.auto_window_s = auto_window_s
        self.auto_max_bytes = auto_max_bytes
        self.netns = netns
        self._lock = threading.RLock()
        self._budget_lock = threading.Lock()
        self._active: dict[str, Capture] = {}
        self._annotation_capture: Capture | None = None
        self._auto_last: dict[str, float] = {}
        os.makedirs(pcap_dir, mode=0o700, exist_ok=True)
        if not os.access(pcap_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"pcap directory {pcap_dir} is not writable by uid {os.getuid()}")
        self._state = AnnotationState(self.state_path)
        self._last_annotation_hash = self._state.load().get("annotation_sha256")

    @staticmethod
    def _new_id(kind: str) -> str:
        """Sortable and unique across managers and restarts (the sidecar is often PID 1 again)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return f"{stamp}-{kind}-{secrets.token_hex(4)}"

    # -- triggers
    def on_annotations(self, annotations: dict[str, str]) -> None:
        """React to the pod's annotations: a new or changed ``palisade.dev/pcap`` starts a capture."""
        value = annotations.get(ANN_PCAP)
        if value is None or not value.strip():
            # Annotation removed: forget the value, so annotating the same value again
            # later is a new request (while it stays, restarts never repeat it).
            with self._lock:
                if self._last_annotation_hash is not None:
                    self._last_annotation_hash = None
                    self._state.save(self._last_annotation_hash)
            return
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            if digest == self._last_annotation_hash:
                return
            self._last_annotation_hash = digest
            self._state.save(self._last_annotation_hash)
            trigger = {"annotation": value}
            try:
                spec = parse_spec(value)
            except CaptureSpecError as exc:
                self._refuse(self._new_id("ann"), trigger, f"{ANN_PCAP}: {exc}")
                return
            old = self._annotation_capture
            if old is not None and old.running:
                old.stop("superseded")
            self._annotation_capture = self.start(spec, trigger, kind="ann", replacing=old)

    def auto_capture(self, peer_ip: str, reason: dict, duration_s: float = 30) -> bool:
        """Capture ``host <peer_ip>`` for ``duration_s``; at most one per peer per ``auto_window_s``.

        ``reason`` carries ``rule`` and either ``flow`` (a dict) or the flow's fields at top
        level (``flow_id``, ``src_ip``, ``dest_port`` ...), which become the trigger's ``flow``.
        Returns whether a capture was started. Cheap and non-blocking: safe on the event loop.
        """
        try:
            ip = ipaddress.ip_address(peer_ip)
        except ValueError:
            AUTO_SKIPPED.labels("bad-peer").inc()
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:  # dual-stack sockets report ::ffff:a.b.c.d
            ip = ip.ipv4_mapped
        key = str(ip)
        now = time.monotonic()
        with self._lock:
            last = self._auto_last.get(key)
            if last is not None and now - last < self.auto_window_s:
                AUTO_SKIPPED.labels("rate-limited").inc()
                return False
            if self._running_count() >= self.max_concurrent:
                AUTO_SKIPPED.labels("busy").inc()
                return False
            if len(self._auto_last) >= 4096:
                self._auto_last = {p: t for p, t in self._auto_last.items() if now - t < self.auto_window_s}
            self._auto_last[key] = now
            duration = min(max(float(duration_s), 1.0), MAX_DURATION_S)
            spec = CaptureSpec(duration_s=duration, filter=f"host {key}", max_bytes=self.auto_max_bytes)
            trigger = auto_trigger(key, reason)
            return self.start(spec, trigger, kind="auto") is not None

    def start(self, spec: CaptureSpec, trigger: dict[str, Any], *, kind: str = "manual",
              replacing: Capture | None = None) -> Capture | None:
        """Start a capture now (the CLI and the triggers above); None when refused (event emitted)."""
        with self._lock:
            cid = self._new_id(kind)
            running = self._running_count() - (1 if replacing is not None and replacing.running else 0)
            if running >= self.max_concurrent:
                self._refuse(cid, trigger, f"limit of {self.max_concurrent} concurrent captures reached")
                return None
            cap = Capture(cid, spec, self.pcap_dir, trigger, self.emit, netns=self.netns,
                          prepare=lambda c, old=replacing: self._prepare(c, old),
                          on_done=self._done)
            cap.budget_bytes = self.disk_budget_bytes
            self._active[cid] = cap
        return cap.start()

    def _refuse(self, cid: str, trigger: dict[str, Any], error: str) -> None:
        CAPTURES_FAILED.inc()
        self.emit({"event_type": "pcap", "pcap": {
            "state": "failed", "id": cid, "dir": self.pcap_dir, "files": [], "packets": 0, "bytes": 0,
            "sha256": {}, "trigger": trigger, "error": error}})

    def _running_count(self) -> int:
        return sum(1 for c in self._active.values() if c.state in ("pending", "running"))

    def _done(self, cap: Capture) -> None:
        with self._lock:
            self._active.pop(cap.id, None)

    # -- disk budget (runs on the capture's thread)
    def _prepare(self, cap: Capture, replacing: Capture | None) -> int:
        if replacing is not None:
            replacing.join(5.0)  # its files become "finished" and count at their real size
        with self._budget_lock:
            with self._lock:
                # Captures that passed this point reserve their max-bytes; their files are
                # excluded from the listing (they may still grow). Finished ones count as files.
                live = [c for c in self._active.values()
                        if c is not cap and c.prepared and c.state in ("pending", "running")]
                reserved = sum(max(c.max_bytes, c.bytes) for c in live)
                active_files = {f for c in live for f in c.files}
            want = cap.spec.max_bytes
            room = make_room(self.pcap_dir, active_files, reserved, want, self.disk_budget_bytes)
            available = room.available
            for name, size in room.removed:
                PCAP_FILES_REMOVED.inc()
                self.emit({"event_type": "pcap", "pcap": {
                    "state": "removed", "id": id_of(name), "dir": self.pcap_dir, "files": [name],
                    "bytes": size, "reason": "disk budget",
                    "budget_bytes": self.disk_budget_bytes, "for_capture": cap.id}})
            if available < min(want, MIN_CAPTURE_BYTES):
                raise CaptureSpecError(f"disk budget of {self.disk_budget_bytes} bytes exhausted by "
                                       f"running captures")
            cap.max_bytes = min(want, available)
            cap.prepared = True
            return cap.max_bytes

    # -- control / inspection
    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            return [c.info() for c in self._active.values()]

    def captures(self) -> list[Capture]:
        with self._lock:
            return list(self._active.values())

    def stop_all(self, timeout: float = 5.0) -> None:
        with self._lock:
            caps = list(self._active.values())
        for c in caps:
            c.stop("stopped")
        deadline = time.monotonic() + timeout
        for c in caps:
            c.join(max(0.0, deadline - time.monotonic()))
