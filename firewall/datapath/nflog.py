"""Packets the kernel's L3/L4 filter logged, read over netlink and turned into EVE events.

The rules ``firewall/datapath/l3rules.py`` and ``redirect.py`` compile log to NFLOG group
``L3_LOG_GROUP`` with a prefix ``pl3|<verdict>|<enforced>|<direction>|<rule>`` and the first
128 bytes of the packet.  This module reads them with a small netlink reader
(``NETLINK_NETFILTER``, subsystem ``NFNL_SUBSYS_ULOG``): pyroute2 0.9 has no NFLOG
support and libnetfilter_log would be one more C dependency for ~100 lines of struct
parsing.  Only the message types we need are parsed: the config request (bind the group,
copy packets) and ``NFULNL_MSG_PACKET`` with its prefix, payload and interface attributes.

Events are per flow, not per packet: the first packet of a (direction, protocol,
addresses, port/type, rule, verdict) flow gives an ``alert`` (for denies and alert rules;
at most ``alerts_per_second``, the rest are counted in ``palisade_l3_events_suppressed_total``),
and the flow's ``flow`` record (packets and bytes) is written when it has been idle for
``flow_idle`` seconds, or when the reader stops.  Records carry the same workload identity
and verdict fields as the proxy's TCP records, with ``proto`` UDP/ICMP/SCTP/ICMPv6/<number>.
A flood therefore costs one dict entry per distinct flow (bounded by ``max_flows``; beyond
it new flows are counted, not tracked).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from firewall.datapath.redirect import L3_LOG_GROUP
from firewall.observe.events import ts_iso
from firewall.observe.signature import signature_id

log = logging.getLogger("palisade.nflog")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3
_PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}

L3_PACKETS = Counter("palisade_l3_packets_total", "Packets logged by the kernel L3/L4 filter",
                     ["direction", "proto", "verdict"])
L3_EVENTS_SUPPRESSED = Counter("palisade_l3_events_suppressed_total",
                               "L3 alerts not written (rate limit) or flows not tracked (table full)", ["reason"])


# ---------------------------------------------------------------- netlink
def _nlmsg(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), msg_type, flags, seq, 0) + payload


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * ((4 - length % 4) % 4)


def config_message(group: int, cmd: int | None, seq: int, copy_range: int = 0xFFFF) -> bytes:
    """NFULNL_MSG_CONFIG for ``group``: a command (bind/unbind) or the copy mode."""
    nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group))
    attrs = _attr(NFULA_CFG_CMD, struct.pack("=B", cmd)) if cmd is not None else \
        _attr(NFULA_CFG_MODE, struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0))
    return _nlmsg((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, nfgen + attrs)


def parse_attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, off)
        if length < 4 or off + length > len(buf):
            break
        out[kind & 0x7FFF] = buf[off + 4:off + length]
        off += (length + 3) & ~3
    return out


@dataclass(frozen=True, slots=True)
class Logged:
    """One logged packet, decoded."""

    verdict: str  # deny | alert | allow
    enforced: bool
    direction: str  # ingress | egress
    rule: str
    proto: str
    src_ip: str
    dest_ip: str
    src_port: int | None
    dest_port: int | None
    icmp_type: int | None
    length: int


def parse_prefix(prefix: str) -> tuple[str, bool, str, str] | None:
    parts = prefix.split("|")
    if len(parts) != 5 or parts[0] != "pl3" or parts[3] not in ("ingress", "egress"):
        return None
    return parts[1], parts[2] == "1", parts[3], parts[4]


def parse_packet(family: int, attrs: dict[int, bytes]) -> Logged | None:
    """A NFULNL_MSG_PACKET's attributes -> Logged; None for anything not ours or truncated."""
    raw_prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
    pre = parse_prefix(raw_prefix)
    pkt = attrs.get(NFULA_PAYLOAD)
    if pre is None or not pkt:
        return None
    version = pkt[0] >> 4
    try:
        if version == 4 and len(pkt) >= 20:
            ihl = (pkt[0] & 0x0F) * 4
            proto = pkt[9]
            length = struct.unpack_from("!H", pkt, 2)[0]
            src, dst = socket.inet_ntop(socket.AF_INET, pkt[12:16]), socket.inet_ntop(socket.AF_INET, pkt[16:20])
            l4 = pkt[ihl:]
        elif version == 6 and len(pkt) >= 40:
            proto = pkt[6]
            length = 40 + struct.unpack_from("!H", pkt, 4)[0]
            src, dst = socket.inet_ntop(socket.AF_INET6, pkt[8:24]), socket.inet_ntop(socket.AF_INET6, pkt[24:40])
            l4 = pkt[40:]
            off = 40
            while proto in (0, 43, 60) and len(pkt) >= off + 8:  # hop-by-hop, routing, dest options
                proto, hlen = pkt[off], (pkt[off + 1] + 1) * 8
                off += hlen
                l4 = pkt[off:]
        else:
            return None
    except (struct.error, ValueError, IndexError):
        return None
    sport = dport = itype = None
    if proto in (6, 17, 132) and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4, 0)
    elif proto in (1, 58) and len(l4) >= 1:
        itype = l4[0]
    name = _PROTO_NAMES.get(proto, str(proto))
    return Logged(pre[0], pre[1], pre[2], pre[3], name, src, dst, sport, dport, itype, length)


class NflogSocket:
    """The netlink socket bound to one NFLOG group (needs CAP_NET_ADMIN in the pod's netns)."""

    def __init__(self, group: int = L3_LOG_GROUP, rcvbuf: int = 1 << 20) -> None:
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self._request(config_message(group, NFULNL_CFG_CMD_BIND, 1))
            self._request(config_message(group, None, 2))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.5)

    def _request(self, msg: bytes) -> None:
        self.sock.send(msg)
        data = self.sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, off + 16)[0]
                if err:
                    raise OSError(err, f"NFLOG config: {os.strerror(err)}")
            off += (length + 3) & ~3

    def read(self) -> list[Logged]:
        """Every packet of one datagram (empty on timeout)."""
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return []
        except OSError as exc:
            if exc.errno == 105:  # ENOBUFS: the kernel dropped messages, we were too slow
                L3_EVENTS_SUPPRESSED.labels("netlink-overrun").inc()
                return []
            raise
        out = []
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET and length >= 20:
                family = data[off + 16]
                p = parse_packet(family, parse_attrs(data[off + 20:off + length]))
                if p is not None:
                    out.append(p)
            off += (length + 3) & ~3
        return out

    def close(self) -> None:
        try:
            self.sock.send(config_message(self.group, NFULNL_CFG_CMD_UNBIND, 3))
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------- aggregation
@dataclass
class _Flow:
    first: Logged
    start: float
    last: float
    pkts: int = 0
    bytes: int = 0
    extra: dict = field(default_factory=dict)


class L3Events:
    """Per-flow aggregation of logged packets into rate-limited EVE alerts and flow records.

    ``identify(ip)`` resolves a peer (the sidecar's identity map), ``local()`` is this pod's
    identity and ``mode()`` its current mode; ``emit`` is the event sink."""

    def __init__(self, emit: Callable[[dict], None], identify: Callable[[str], Any], local: Callable[[], Any],
                 mode: Callable[[], str], *, flow_idle: float = 5.0, alerts_per_second: float = 50.0,
                 max_flows: int = 10000) -> None:
        self.emit, self.identify, self.local, self.mode = emit, identify, local, mode
        self.flow_idle, self.rate, self.max_flows = flow_idle, alerts_per_second, max_flows
        self.flows: dict[tuple, _Flow] = {}
        self._tokens = alerts_per_second
        self._refill = time.monotonic()
        self._lock = threading.Lock()

    @staticmethod
    def _key(p: Logged) -> tuple:
        return (p.direction, p.proto, p.src_ip, p.dest_ip, p.dest_port, p.icmp_type, p.rule, p.verdict, p.enforced)

    def add(self, p: Logged, now: float | None = None) -> None:
        now = time.time() if now is None else now
        L3_PACKETS.labels(p.direction, p.proto, _metric_verdict(p)).inc()
        key = self._key(p)
        with self._lock:
            f = self.flows.get(key)
            if f is None:
                if len(self.flows) >= self.max_flows:
                    L3_EVENTS_SUPPRESSED.labels("flow-table-full").inc()
                    return
                f = self.flows[key] = _Flow(p, now, now)
                new = True
            else:
                new = False
            f.pkts += 1
            f.bytes += p.length
            f.last = now
        if new and p.verdict in ("deny", "alert"):
            if self._take():
                self.emit(self._alert(f))
            else:
                L3_EVENTS_SUPPRESSED.labels("alert-rate").inc()

    def _take(self) -> bool:
        mono = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (mono - self._refill) * self.rate)
        self._refill = mono
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def expire(self, now: float | None = None, everything: bool = False) -> int:
        """Write the flow records of flows idle for ``flow_idle`` (all with ``everything``)."""
        now = time.time() if now is None else now
        with self._lock:
            done = [k for k, f in self.flows.items() if everything or now - f.last >= self.flow_idle]
            flows = [self.flows.pop(k) for k in done]
        for f in flows:
            self.emit(self._flow(f))
        return len(flows)

    def _base(self, f: _Flow, event_type: str) -> dict:
        p = f.first
        local = self.local()
        if p.direction == "ingress":
            src, dst = self.identify(p.src_ip), local
        else:
            src, dst = local, self.identify(p.dest_ip)
        e = {
            "event_type": event_type,
            "timestamp": ts_iso(f.start if event_type == "alert" else f.last),
            # one id per aggregated flow, shared by its alert and its flow record
            "flow_id": zlib.crc32(repr((self._key(p), f.start)).encode()) | (1 << 40),
            "direction": "inbound" if p.direction == "ingress" else "outbound",
            "src_ip": p.src_ip, "src_port": p.src_port,
            "dest_ip": p.dest_ip, "dest_port": p.dest_port,
            "proto": p.proto, "app_proto": "unknown",
            "src_workload": _to_json(src, p.src_ip), "dest_workload": _to_json(dst, p.dest_ip),
            "enforcement": "kernel",
        }
        if p.icmp_type is not None:
            e["icmp_type"] = p.icmp_type
        return e

    def _mode_of(self, p: Logged) -> str:
        """The mode the packet was judged in: an enforced deny is protect whatever the mode is
        by the time the event is written (an annotation may have changed it meanwhile)."""
        mode = self.mode()
        if p.verdict == "deny" and p.enforced:
            return "protect"
        return "monitor" if mode == "protect" and p.verdict == "deny" else mode

    def _alert(self, f: _Flow) -> dict:
        p = f.first
        e = self._base(f, "alert")
        blocked = p.verdict == "deny" and p.enforced
        e["mode"] = self._mode_of(p)
        e["alert"] = {"action": "blocked" if blocked else "allowed", "signature": p.rule,
                      "signature_id": signature_id(p.rule), "category": "policy", "severity": 2}
        e["reason"] = (f"{p.proto} {p.direction} " + ("denied" if blocked else
                       "would be denied (not enforced)" if p.verdict == "deny" else "alert rule")
                       + f" by {p.rule} (kernel L3/L4 filter)")
        return e

    def _flow(self, f: _Flow) -> dict:
        p = f.first
        e = self._base(f, "flow")
        blocked = p.verdict == "deny" and p.enforced
        e.update({
            "verdict": "deny" if blocked else "allow",
            "rule": p.rule,
            "mode": self._mode_of(p),
            "close_reason": "denied" if blocked else "kernel",
            "flow": {"pkts_toserver": f.pkts, "bytes_toserver": f.bytes, "pkts_toclient": 0, "bytes_toclient": 0,
                     "start": ts_iso(f.start), "end": ts_iso(f.last), "alerts": 1 if p.verdict != "allow" else 0},
        })
        if p.verdict == "deny" and not p.enforced:
            e["would_verdict"] = "deny"
        return e


def _metric_verdict(p: Logged) -> str:
    if p.verdict == "deny":
        return "deny" if p.enforced else "would-deny"
    return p.verdict


def _to_json(ident: Any, ip: str) -> dict:
    if ident is None:
        return {"world": True, "ip": ip, "scope": "out-of-scope"}
    return ident.to_json()


class NflogReader:
    """The reader thread: netlink socket -> L3Events; expiry every second."""

    def __init__(self, events: L3Events, group: int = L3_LOG_GROUP) -> None:
        self.events = events
        self.sock = NflogSocket(group)  # opened by the caller's thread (before the privilege drop)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="palisade-nflog", daemon=True)

    def start(self) -> NflogReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                for p in self.sock.read():
                    self.events.add(p)
            except Exception:  # noqa: BLE001 - a bad message must not end the evidence
                log.exception("nflog read failed")
                time.sleep(0.1)
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                try:
                    self.events.expire()
                except Exception:  # noqa: BLE001
                    log.exception("nflog expiry failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.events.expire(everything=True)
        self.sock.close()
