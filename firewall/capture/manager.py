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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from firewall import ANN_PCAP
from firewall.observe.events import ts_iso

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_DURATION_S = 60.0
MAX_DURATION_S = 3600.0
DEFAULT_MAX_BYTES = 50 * MiB
MAX_MAX_BYTES = 10 * GiB
DEFAULT_SNAPLEN = 65535
MAX_SNAPLEN = 262144
MIN_ROTATE_BYTES = 1 * KiB
MAX_ROTATE_FILES = 1000
MIN_CAPTURE_BYTES = 64 * KiB   # below this a budget-clamped capture is refused instead
AUTO_MAX_BYTES = 10 * MiB
STATE_FILE = ".palisade-capture-state.json"
STATE_MAX_BYTES = 4096
PCAP_SUFFIX = ".pcap"

CAPTURES_STARTED = Counter("palisade_pcap_captures_started", "Packet captures started")
CAPTURES_FINISHED = Counter("palisade_pcap_captures_finished", "Packet captures finished normally")
CAPTURES_FAILED = Counter("palisade_pcap_captures_failed",
                          "Packet captures that failed (bad spec, no permission, disk full, limits)")
PCAP_BYTES = Counter("palisade_pcap_bytes_written", "Bytes written to pcap files (headers included)")
PCAP_FILES_REMOVED = Counter("palisade_pcap_files_removed", "Pcap files removed to keep the disk budget")
AUTO_SKIPPED = Counter("palisade_pcap_auto_skipped", "Automatic captures not started", ["reason"])


class CaptureSpecError(ValueError):
    """A capture option string or filter that cannot be used (the message says why)."""


# --------------------------------------------------------------------------- spec

@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What to capture and when to stop. ``iface=None`` means every interface but ``lo``."""

    duration_s: float = DEFAULT_DURATION_S
    filter: str = ""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_packets: int | None = None
    snaplen: int = DEFAULT_SNAPLEN
    rotate_bytes: int | None = None
    iface: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "duration": self.duration_s, "filter": self.filter, "max-bytes": self.max_bytes,
            "max-packets": self.max_packets, "snaplen": self.snaplen, "rotate": self.rotate_bytes,
            "iface": self.iface or "all-but-lo",
        }


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_KEY_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*=(?!=)(.*)$", re.DOTALL)
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_KEYS = ("duration", "filter", "max-bytes", "max-packets", "snaplen", "rotate", "iface")


def parse_duration(text: str) -> float:
    """``60``/``60s``/``500ms``/``5m``/``1h`` -> seconds (a bare number is seconds)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise CaptureSpecError(f"duration: {text!r} is not a duration (e.g. 30s, 5m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]


def parse_size(text: str) -> int:
    """``1024``/``64KiB``/``10MiB``/``1GiB`` (binary), ``10MB`` (decimal), ``10M``/``10k`` (binary)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise CaptureSpecError(f"{text!r} is not a size (e.g. 50MiB, 512KiB, 1000000)")
    unit = (m.group(2) or "b").lower()
    if unit == "b":
        mult = 1
    else:
        power = "kmg".index(unit[0]) + 1
        decimal = unit.endswith("b") and not unit.endswith("ib")
        mult = (1000 if decimal else 1024) ** power
    return int(float(m.group(1)) * mult)


def parse_spec(value: str) -> CaptureSpec:
    """Parse ``key=value,key=value`` (the ``palisade.dev/pcap`` annotation).

    Keys: ``duration`` (default 60s, at most 1h), ``filter`` (tcpdump syntax,
    compiled here so a bad filter is refused up front), ``max-bytes`` (default
    50MiB), ``max-packets``, ``snaplen`` (default 65535), ``rotate`` (file size;
    numbered files), ``iface``. A comma inside the filter is kept when what
    follows it is not ``key=``. Raises :class:`CaptureSpecError`.
    """
    if not isinstance(value, str):
        raise CaptureSpecError("capture spec must be a string")
    pairs: list[list[str]] = []
    for part in value.split(","):
        m = _KEY_RE.match(part)
        if m:
            pairs.append([m.group(1).strip().lower(), m.group(2)])
        elif pairs and pairs[-1][0] == "filter":
            pairs[-1][1] += "," + part
        elif part.strip():
            raise CaptureSpecError(f"expected key=value, got {part.strip()!r}")
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for key, raw in pairs:
        raw = raw.strip()
        if key not in _KEYS:
            raise CaptureSpecError(f"unknown key {key!r} (known: {', '.join(_KEYS)})")
        if key in seen:
            raise CaptureSpecError(f"{key} given twice")
        seen.add(key)
        if key == "duration":
            d = parse_duration(raw)
            if not 0 < d <= MAX_DURATION_S:
                raise CaptureSpecError(f"duration: must be > 0 and at most 1h, got {raw!r}")
            fields["duration_s"] = d
        elif key == "filter":
            fields["filter"] = raw
        elif key == "max-bytes":
            n = _size_field(key, raw)
            if not 1 * KiB <= n <= MAX_MAX_BYTES:
                raise CaptureSpecError(f"max-bytes: must be between 1KiB and 10GiB, got {raw!r}")
            fields["max_bytes"] = n
        elif key == "max-packets":
            if not raw.isdigit() or int(raw) <= 0:
                raise CaptureSpecError(f"max-packets: must be a positive integer, got {raw!r}")
            fields["max_packets"] = int(raw)
        elif key == "snaplen":
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_SNAPLEN:
                raise CaptureSpecError(f"snaplen: must be an integer 1..{MAX_SNAPLEN}, got {raw!r}")
            fields["snaplen"] = int(raw)
        elif key == "rotate":
            n = _size_field(key, raw)
            if n < MIN_ROTATE_BYTES:
                raise CaptureSpecError(f"rotate: must be at least 1KiB, got {raw!r}")
            fields["rotate_bytes"] = n
        elif key == "iface":
            if raw.lower() in ("", "any", "all"):
                fields["iface"] = None
            elif not _IFACE_RE.match(raw):
                raise CaptureSpecError(f"iface: {raw!r} is not an interface name")
            else:
                fields["iface"] = raw
    spec = CaptureSpec(**fields)
    if spec.rotate_bytes and spec.max_bytes // spec.rotate_bytes > MAX_ROTATE_FILES:
        raise CaptureSpecError(f"rotate: {spec.rotate_bytes} bytes per file would make more than "
                               f"{MAX_ROTATE_FILES} files for max-bytes {spec.max_bytes}")
    if spec.filter:
        compile_filter(spec.filter, spec.snaplen)
    return spec


def _size_field(key: str, raw: str) -> int:
    try:
        return parse_size(raw)
    except CaptureSpecError as exc:
        raise CaptureSpecError(f"{key}: {exc}") from None


# --------------------------------------------------------------------------- BPF (libpcap via ctypes)

DLT_EN10MB = 1
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
BPF_MAXINSNS = 4096


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


_libpcap: ctypes.CDLL | None = None
_pcap_lock = threading.Lock()  # pcap_compile was not reentrant before libpcap 1.8; be safe


def _pcap() -> ctypes.CDLL:
    global _libpcap
    if _libpcap is None:
        # Known sonames first (Debian: libpcap.so.0.8): find_library() spawns ldconfig.
        lib = None
        last: OSError | None = None
        for cand in ("libpcap.so.0.8", "libpcap.so.1", None):
            try:
                lib = ctypes.CDLL(cand or ctypes.util.find_library("pcap") or "libpcap.so")
                break
            except OSError as exc:
                last = exc
        if lib is None:
            raise CaptureSpecError(f"filter: libpcap is not installed ({last})")
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_uint32]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        _libpcap = lib
    return _libpcap


Insn = tuple[int, int, int, int]  # (code, jt, jf, k), the `tcpdump -dd` layout


def compile_filter(expr: str, snaplen: int = DEFAULT_SNAPLEN) -> list[Insn]:
    """Compile a tcpdump filter for Ethernet frames to classic BPF instructions.

    An empty filter compiles to "accept ``snaplen`` bytes of everything".
    Raises :class:`CaptureSpecError` with libpcap's message for a bad filter.
    """
    if "\x00" in expr:
        raise CaptureSpecError("filter: contains a NUL byte")
    lib = _pcap()
    with _pcap_lock:
        handle = lib.pcap_open_dead(DLT_EN10MB, snaplen)
        if not handle:
            raise CaptureSpecError("filter: pcap_open_dead failed")
        try:
            prog = _BpfProgram()
            rc = lib.pcap_compile(handle, ctypes.byref(prog), expr.encode("utf-8"), 1,
                                  PCAP_NETMASK_UNKNOWN)
            if rc != 0:
                msg = (lib.pcap_geterr(handle) or b"syntax error").decode("utf-8", "replace")
                raise CaptureSpecError(f"filter {expr!r}: {msg}")
            try:
                insns = [(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf,
                          prog.bf_insns[i].k) for i in range(prog.bf_len)]
            finally:
                lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)
    if len(insns) + 3 > BPF_MAXINSNS:
        raise CaptureSpecError(f"filter: too complex ({len(insns)} BPF instructions)")
    return insns


_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SKF_AD_IFINDEX = 0xFFFFF000 + 8  # SKF_AD_OFF + SKF_AD_IFINDEX
REJECT_ALL: list[Insn] = [(_BPF_RET_K, 0, 0, 0)]


def exclude_ifindex(insns: list[Insn], ifindex: int) -> list[Insn]:
    """Prefix a program with "drop packets of interface ``ifindex``".

    Classic BPF jumps are relative, so the compiled program is valid unchanged
    after the prefix, and it starts with its own loads (no register state).
    """
    return [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_IFINDEX), (_BPF_JEQ_K, 0, 1, ifindex),
            (_BPF_RET_K, 0, 0, 0), *insns]


SO_ATTACH_FILTER = 26
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


def attach_filter(sock: socket.socket, insns: list[Insn]) -> None:
    arr = (_BpfInsn * len(insns))(*[_BpfInsn(c, jt, jf, k) for c, jt, jf, k in insns])
    fprog = struct.pack("HL", len(insns), ctypes.addressof(arr))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # kernel copies arr during the call


# --------------------------------------------------------------------------- pcap writer

class PcapWriter:
    """Nanosecond-resolution pcap (magic a1b23c4d), Ethernet link type.

    Own writer rather than dpkt's so byte counts and the SHA-256 are exact and
    computed while writing (the file is never re-read). Created mode 0600.
    """

    HEADER = struct.Struct("<IHHiIII")
    RECORD = struct.Struct("<IIII")

    def __init__(self, path: str, snaplen: int, linktype: int = DLT_EN10MB) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self._fh = os.fdopen(fd, "wb", buffering=256 * KiB)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self.packets = 0
        self.size = 0
        self._sha = hashlib.sha256()
        self._write(self.HEADER.pack(0xA1B23C4D, 2, 4, 0, 0, snaplen, linktype))

    def _write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self.size += len(data)

    def record_size(self, caplen: int) -> int:
        return self.RECORD.size + caplen

    def write(self, ts_ns: int, data: bytes | memoryview, orig_len: int) -> None:
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        self._write(self.RECORD.pack(sec & 0xFFFFFFFF, nsec, len(data), orig_len))
        self._write(data)
        self.packets += 1

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> str:
        """Flush and close (raises OSError, e.g. ENOSPC); returns the hex SHA-256 of the file."""
        self._fh.close()
        return self._sha.hexdigest()

    def abort(self) -> str:
        """Close after a write error without raising; hash of the bytes handed to write()."""
        try:
            self._fh.close()
        except OSError:
            pass
        return self._sha.hexdigest()


# --------------------------------------------------------------------------- one capture

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
        if self.spec.rotate_bytes:
            name = f"{self.id}.{len(self.files):03d}{PCAP_SUFFIX}"
        else:
            name = f"{self.id}{PCAP_SUFFIX}"
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


# --------------------------------------------------------------------------- manager

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
        self._last_annotation_hash = self._load_state().get("annotation_sha256")

    # -- state
    def _load_state(self) -> dict[str, Any]:
        """The persisted annotation hash. Opened with O_NOFOLLOW (a symlink planted in the pcap
        directory must not make the sidecar read another file) and only if it is a small regular file."""
        try:
            fd = os.open(self.state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as exc:  # ELOOP: a symlink
            log.warning("capture state %s not opened (%s); starting fresh", self.state_path,
                        "a symlink" if exc.errno == errno.ELOOP else exc.strerror)
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > STATE_MAX_BYTES:
                log.warning("capture state %s is not a small regular file; starting fresh", self.state_path)
                return {}
            with os.fdopen(os.dup(fd), encoding="utf-8") as fh:
                data = json.loads(fh.read(STATE_MAX_BYTES))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError) as exc:
            log.warning("capture state %s unreadable (%s); starting fresh", self.state_path, exc)
            return {}
        finally:
            os.close(fd)

    def _save_state(self) -> None:
        """Written to a fresh temporary (O_EXCL|O_NOFOLLOW, 0600) then renamed over the state file:
        rename replaces a planted symlink itself, never its target."""
        tmp = f"{self.state_path}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"annotation_sha256": self._last_annotation_hash}, fh)
            os.replace(tmp, self.state_path)
        except OSError as exc:  # a full disk must not stop the capture itself
            log.warning("cannot persist capture state %s: %s", self.state_path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

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
                    self._save_state()
            return
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            if digest == self._last_annotation_hash:
                return
            self._last_annotation_hash = digest
            self._save_state()
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
            trigger = _auto_trigger(key, reason)
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
            finished = []
            for name in os.listdir(self.pcap_dir):
                if not name.endswith(PCAP_SUFFIX) or name in active_files:
                    continue
                path = os.path.join(self.pcap_dir, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                finished.append((st.st_mtime, name, st.st_size))
            finished.sort()
            used = reserved + sum(size for _m, _n, size in finished)
            want = cap.spec.max_bytes
            removed: list[tuple[str, int]] = []
            while finished and used + want > self.disk_budget_bytes:
                _mtime, name, size = finished.pop(0)
                try:
                    os.unlink(os.path.join(self.pcap_dir, name))
                except FileNotFoundError:
                    pass
                used -= size
                removed.append((name, size))
            available = self.disk_budget_bytes - used
            for name, size in removed:
                PCAP_FILES_REMOVED.inc()
                self.emit({"event_type": "pcap", "pcap": {
                    "state": "removed", "id": _id_of(name), "dir": self.pcap_dir, "files": [name],
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


def _auto_trigger(peer: str, reason: dict[str, Any]) -> dict[str, Any]:
    """``{"rule", "flow", "peer"}`` (+ ``category``) from what the session passes."""
    flow = reason.get("flow")
    if flow is None:
        flow = {k: v for k, v in reason.items() if k not in ("rule", "category", "peer")}
    trigger: dict[str, Any] = {"rule": reason.get("rule"), "flow": flow, "peer": peer}
    if "category" in reason:
        trigger["category"] = reason["category"]
    return trigger


def _id_of(filename: str) -> str:
    base = filename[: -len(PCAP_SUFFIX)] if filename.endswith(PCAP_SUFFIX) else filename
    m = re.match(r"^(.*)\.\d{3}$", base)
    return m.group(1) if m else base

