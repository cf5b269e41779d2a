"""One capture on its own thread: open the packet socket, write pcap files until a bound is reached,
report each state as a ``pcap`` event. Never raises into the sidecar (see ``firewall.capture.manager``)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from firewall.capture.bpf import REJECT_ALL, Insn, attach_filter, compile_filter, exclude_ifindex
from firewall.capture.pcapfile import PcapWriter, file_name
from firewall.capture.spec import CaptureSpec, CaptureSpecError, MiB
from firewall.observe.events import ts_iso

log = logging.getLogger(__name__)

# the packet socket (AF_PACKET/SOCK_RAW) and what the kernel attaches to each packet
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = 33
# Kernel queue per capture socket: absorbs bursts while Python writes. Full-payload capture of
# a fast bulk transfer still outruns one Python thread; such losses are reported as kernel_drops.
RCVBUF_BYTES = 8 * MiB
ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
_AUXDATA = struct.Struct("IIIHHHH")
_TIMESPEC = struct.Struct("qq")

CAPTURES_STARTED = Counter("palisade_pcap_captures_started", "Packet captures started")
CAPTURES_FINISHED = Counter("palisade_pcap_captures_finished", "Packet captures finished normally")
CAPTURES_FAILED = Counter("palisade_pcap_captures_failed",
                          "Packet captures that failed (bad spec, no permission, disk full, limits)")
PCAP_BYTES = Counter("palisade_pcap_bytes_written", "Bytes written to pcap files (headers included)")


CLONE_NEWNET = 0x40000000


def _enter_netns(path: str) -> None:
    """Move the *calling thread* into a network namespace (tests, ``capture run --netns``)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class _Stop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Capture:
    """One capture on its own thread. Created and started by :class:`CaptureManager`."""

    def __init__(self, capture_id: str, spec: CaptureSpec, pcap_dir: str, trigger: dict[str, Any],
                 emit: Callable[[dict], None], *, netns: str | None = None,
                 prepare: Callable[[Capture], int] | None = None,
                 on_done: Callable[[Capture], None] | None = None) -> None:
        self.id = capture_id
        self.spec = spec
        self.pcap_dir = pcap_dir
        self.trigger = trigger
        self.netns = netns
        self._emit = emit
        self._prepare = prepare
        self._on_done = on_done
        self.max_bytes = spec.max_bytes
        self.budget_bytes: int | None = None  # the directory's disk budget (= the retention bound)
        self.prepared = prepare is None  # True once the disk budget has reserved max_bytes
        self.files: list[str] = []
        self.sha256: dict[str, str] = {}
        self.packets = 0
        self.bytes = 0
        self.kernel_drops = 0
        self.state = "pending"
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.started = threading.Event()   # set once packets are being captured (or it failed)
        self._stop = threading.Event()
        self._stop_reason = "stopped"
        self._thread = threading.Thread(target=self._run, name=f"pcap-{capture_id}", daemon=True)

    # -- control
    def start(self) -> Capture:
        self._thread.start()
        return self

    def stop(self, reason: str = "stopped") -> None:
        self._stop_reason = reason
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "trigger": self.trigger, "files": list(self.files),
                "packets": self.packets, "bytes": self.bytes,
                "start": ts_iso(self.started_at) if self.started_at else None}

    # -- events
    def _event(self, state: str, **extra: Any) -> None:
        body: dict[str, Any] = {
            "state": state, "id": self.id, "dir": self.pcap_dir, "files": list(self.files),
            "packets": self.packets, "bytes": self.bytes, "sha256": dict(self.sha256),
            "trigger": self.trigger,
            # pcaps hold raw payloads - full card numbers by nature: the report lists them as
            # cardholder-data artefacts, with the budget that bounds how long they are kept
            "cardholder_data": True,
        }
        if self.budget_bytes is not None:
            body["budget_bytes"] = self.budget_bytes
        body.update(extra)
        try:
            self._emit({"event_type": "pcap", "pcap": body})
        except Exception:  # noqa: BLE001 - the event sink must not kill a capture
            log.exception("pcap event emit failed")

    # -- the thread
    def _run(self) -> None:
        sock: socket.socket | None = None
        writer: PcapWriter | None = None
        try:
            try:
                if self._prepare is not None:
                    self.max_bytes = self._prepare(self)
                if self.netns:
                    _enter_netns(self.netns)
                insns = compile_filter(self.spec.filter, self.spec.snaplen)
                sock, accept_lo = self._open_socket(insns)
                writer = self._next_file(None)
            except (OSError, CaptureSpecError) as exc:
                self._fail(_describe(exc), writer)
                return
            self.state = "running"
            self.started_at = time.time()
            CAPTURES_STARTED.inc()
            self._event("started", spec=self.spec.to_json(), max_bytes=self.max_bytes,
                        start=ts_iso(self.started_at))
            self.started.set()
            try:
                writer = self._loop(sock, writer, accept_lo)
            except OSError as exc:
                self._fail(_describe(exc), writer)
                return
            self._finish(writer)
        except Exception as exc:  # noqa: BLE001 - last resort: a capture never takes the sidecar down
            log.exception("capture %s crashed", self.id)
            self._fail(f"internal error: {exc!r}", writer)
        finally:
            if sock is not None:
                self.kernel_drops += _kernel_drops(sock)
                sock.close()
            self.started.set()
            if self._on_done is not None:
                try:
                    self._on_done(self)
                except Exception:  # noqa: BLE001
                    log.exception("capture on_done failed")

    def _open_socket(self, insns: list[Insn]) -> tuple[socket.socket, bool]:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            attach_filter(sock, REJECT_ALL)
            iface = self.spec.iface
            if iface:
                try:
                    socket.if_nametoindex(iface)
                except OSError:
                    raise CaptureSpecError(f"iface: no interface {iface!r} in the pod") from None
                sock.bind((iface, ETH_P_ALL))
                accept_lo = True
            else:
                try:
                    insns = exclude_ifindex(insns, socket.if_nametoindex("lo"))
                except OSError:
                    pass  # no lo in this namespace: nothing to exclude
                accept_lo = False
            try:  # beyond net.core.rmem_max when allowed (CAP_NET_ADMIN): fewer drops in bursts
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
            while True:  # drain whatever arrived before the reject-all filter
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
            attach_filter(sock, insns)
            _kernel_drops(sock)  # reset the counters
            return sock, accept_lo
        except BaseException:
            sock.close()
            raise

    def _next_file(self, current: PcapWriter | None) -> PcapWriter:
        if self.bytes + PcapWriter.HEADER.size > self.max_bytes:
            raise _Stop("max-bytes")
        if current is not None:
            self._close_file(current)
        name = file_name(self.id, len(self.files), bool(self.spec.rotate_bytes))
        writer = PcapWriter(os.path.join(self.pcap_dir, name), self.spec.snaplen)
        self.files.append(name)
        self._count(PcapWriter.HEADER.size)
        return writer

    def _close_file(self, writer: PcapWriter) -> None:
        self.sha256[os.path.basename(writer.path)] = writer.close()

    def _count(self, n: int) -> None:
        self.bytes += n
        PCAP_BYTES.inc(n)

    def _loop(self, sock: socket.socket, writer: PcapWriter, accept_lo: bool) -> PcapWriter:
        spec = self.spec
        buf = bytearray(spec.snaplen)
        view = memoryview(buf)
        anc = socket.CMSG_SPACE(_AUXDATA.size) + socket.CMSG_SPACE(_TIMESPEC.size) + 64
        deadline = time.monotonic() + spec.duration_s
        reason = "duration"
        sock.settimeout(0.2)
        try:
            while True:
                if self._stop.is_set():
                    reason = self._stop_reason
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(min(0.2, remaining))
                try:
                    n, ancdata, _flags, addr = sock.recvmsg_into([buf], anc)
                except TimeoutError:
                    continue
                except InterruptedError:
                    continue
                hatype = addr[3]
                if hatype != ARPHRD_ETHER and not (accept_lo and hatype == ARPHRD_LOOPBACK):
                    continue
                caplen = min(n, spec.snaplen)
                orig_len = caplen
                ts_ns = 0
                for level, kind, data in ancdata:
                    if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUXDATA.size:
                        orig_len = _AUXDATA.unpack_from(data)[1]
                    elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                        sec, nsec = _TIMESPEC.unpack_from(data)
                        ts_ns = sec * 1_000_000_000 + nsec
                if not ts_ns:
                    ts_ns = time.time_ns()
                rec = writer.record_size(caplen)
                if self.bytes + rec > self.max_bytes:
                    reason = "max-bytes"
                    break
                if spec.rotate_bytes and writer.packets and writer.size + rec > spec.rotate_bytes:
                    if self.bytes + PcapWriter.HEADER.size + rec > self.max_bytes:
                        reason = "max-bytes"
                        break
                    writer = self._next_file(writer)
                writer.write(ts_ns, view[:caplen], max(orig_len, caplen))
                self.packets += 1
                self._count(rec)
                if spec.max_packets and self.packets >= spec.max_packets:
                    reason = "max-packets"
                    break
        except _Stop as stop:  # pragma: no cover - guarded above; kept for safety
            reason = stop.reason
        self.stop_reason = reason
        self.kernel_drops += _kernel_drops(sock)  # before the finished event reports it
        return writer

    def _finish(self, writer: PcapWriter) -> None:
        try:
            self._close_file(writer)
        except OSError as exc:
            self._fail(_describe(exc), None)
            return
        self.state = "finished"
        self.ended_at = time.time()
        CAPTURES_FINISHED.inc()
        self._event("finished", reason=self.stop_reason, kernel_drops=self.kernel_drops,
                    start=ts_iso(self.started_at or self.ended_at), end=ts_iso(self.ended_at),
                    duration_s=round(self.ended_at - (self.started_at or self.ended_at), 3))

    def _fail(self, error: str, writer: PcapWriter | None) -> None:
        if writer is not None and os.path.basename(writer.path) not in self.sha256:
            self.sha256[os.path.basename(writer.path)] = writer.abort()
        self.state = "failed"
        self.error = error
        self.ended_at = time.time()
        CAPTURES_FAILED.inc()
        self._event("failed", error=error, end=ts_iso(self.ended_at))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CaptureSpecError):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "disk full (ENOSPC) while writing the pcap file"
        if exc.errno in (errno.EPERM, errno.EACCES) and not getattr(exc, "filename", None):
            return f"no permission to capture (needs CAP_NET_RAW): {exc.strerror}"
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc)


def _kernel_drops(sock: socket.socket) -> int:
    """Packets the kernel dropped for this socket since the last call (counters reset on read)."""
    try:
        _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        return drops
    except OSError:
        return 0
