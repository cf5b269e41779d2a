"""The per-flow inspection pipeline, sans-IO: bytes in, bytes-to-forward out.

``proxy.py`` turns socket reads into ``feed(direction, data)`` calls and executes
what comes back; nothing here touches a socket, so every decision (L4 verdict,
identification, L7 verdict, DLP block) is testable without a network.

Per direction the order is fixed: identify -> parse (L7 events -> policy) ->
DLP scan -> forward.  A deny cuts the stream exactly at the offending message's
first byte, so allowed bytes before it are delivered and nothing of it is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from firewall.datapath import exception_policy
from firewall.datapath.exception_policy import Stage
from firewall.identity.identity import Identity
from firewall.observe import metrics
from firewall.observe.events import ts_iso
from firewall.observe.signature import signature_id
from firewall.protocols.base import TOCLIENT, TOSERVER, L7Event
from firewall.protocols.httpdecode import BodyDecoder, decode_target, needs_decoding

_flow_ids = itertools.count(int(time.time() * 1000) % 10**9 * 1000)


def seed_flow_ids(worker: int, workers: int) -> None:
    """After fork: interleave the workers' flow ids so no two flows share one."""
    global _flow_ids
    base = int(time.time() * 1000) % 10**9 * 1000
    _flow_ids = itertools.count(base * max(1, workers) + worker, max(1, workers))
DIR_NAMES = ("toserver", "toclient")
#: event fields never copied into events or alerts (offsets, the raw un-normalised target)
_PRIVATE_FIELDS = frozenset({"head_end", "raw_target", "statement"})
# a trailing run that is a card number missing at most its check digit (12+ digits, single
# space/dash separators), or an IBAN prefix (country, check digits, 10+ more)
_CARD_TAIL = re.compile(rb"[2-6](?:[ -]?\d){11,}\Z")
_IBAN_TAIL = re.compile(rb"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,}\Z")


_children: dict[tuple, Any] = {}


def _counter(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, memoised: a labelled child is created once and never removed,
    and ``labels()`` (a lock and a tuple of str() per call) ran twice per DLP finding."""
    key = (id(metric), labels)
    child = _children.get(key)
    if child is None:
        if len(_children) >= 4096:
            _children.clear()  # rule ids come from the packs: bounded, but never let it grow
        child = _children[key] = metric.labels(*labels)
    return child


@dataclass(slots=True)
class Stop:
    """Terminate the flow: optionally answer the sender first (HTTP 403) and say why."""

    reason: str
    reply: bytes | None = None
    cut: int | None = None  # stream offset where forwarding stops (None: nothing more of this chunk)


class Inspection:
    """Everything a session needs that outlives one flow; swapped atomically on reload.

    The proxy holds one reference and replaces it whole; sessions keep the one they
    started with, except that ``quarantined``/``mode_override`` are read live so a
    quarantine reaches open flows.
    """

    def __init__(self, *, policy: Any = None, dlp: Any = None, identities: Any = None,
                 fqdn: Any = None, emit: Any = None, l7: bool = True, l7_events: bool = False,
                 local: Identity | None = None, captures: Any = None) -> None:
        self.policy = policy
        self.dlp = dlp
        self.identities = identities
        self.fqdn = fqdn
        self.emit = emit or (lambda e: None)
        self.l7 = l7
        self.l7_events = l7_events
        self.local = local or Identity.make("0.0.0.0", "default", "self")
        self.captures = captures
        self.mode_override: str | None = None
        self.quarantined = False
        self.worker = 0

    def resolve(self, ip: str) -> Identity:
        if self.identities is not None:
            try:
                return self.identities.resolve(ip)
            except Exception:  # noqa: BLE001 - identity is best effort; unknown = world
                pass
        return Identity(ip)




def _forbidden(rule: str, reason: str) -> bytes:
    body = json.dumps({"error": "forbidden by palisade policy", "rule": rule, "reason": reason}).encode()
    return (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _bad_request(status: str, reason: str) -> bytes:
    body = json.dumps({"error": reason}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _h2_refusal(stream_id: int, grpc: bool, rule: str, with_settings: bool) -> bytes:
    """An HTTP/2 answer for one denied stream, then GOAWAY: gRPC PERMISSION_DENIED (7) as a
    trailers-only response, plain HTTP/2 a 403.  Header values are encoded as never-indexed
    literals so the client's HPACK dynamic table is not touched (its state stays in step with
    the real server's encoder for frames already delivered)."""
    import struct

    from hpack import Encoder
    from hpack.struct import NeverIndexedHeaderTuple

    msg = f"denied by palisade rule {rule}"
    if grpc:
        headers = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "7"),
                   ("grpc-message", msg)]
    else:
        headers = [(":status", "403"), ("content-type", "text/plain")]
    enc = Encoder()
    block = enc.encode([NeverIndexedHeaderTuple(k, v) for k, v in headers], huffman=False)

    def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
        return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", sid) + payload

    out = frame(0x4, 0, 0, b"") if with_settings else b""
    out += frame(0x1, 0x5, stream_id, block)  # HEADERS, END_STREAM | END_HEADERS
    out += frame(0x7, 0, 0, struct.pack("!II", stream_id, 0))  # GOAWAY, last stream = this, NO_ERROR
    return out


class Session:
    """One TCP flow. ``direction`` is "inbound" (peer -> this pod) or "outbound"."""

    __slots__ = (
        "insp", "flow_id", "direction", "src_ip", "src_port", "dest_ip", "dest_port", "proto",
        "local", "peer", "flowinfo", "start", "bytes", "app_proto", "verdict", "rule", "mode",
        "close_reason", "encrypted", "passthrough", "_ident", "_ident_buf", "_parser", "_hold",
        "_pending", "_sent", "_seen", "_dlp", "_dlp_actions", "_enforced", "_stopped", "source_preserved",
        "_alerts", "_l7_summary", "_capture_done", "_bodies", "_governed", "_on_error",
        "_digit_hold", "_tail", "_shift", "_switch", "_dns_queries", "_dlp_unscanned", "_wl_json",
    )

    def __init__(self, insp: Inspection, direction: str, src: tuple, dst: tuple, proto: str = "TCP") -> None:
        self.insp = insp
        self.flow_id = next(_flow_ids)
        self.direction = direction
        self.src_ip, self.src_port = src[0], src[1]
        self.dest_ip, self.dest_port = dst[0], dst[1]
        self.proto = proto
        inbound = direction == "inbound"
        self.local = insp.local
        self.peer = insp.resolve(self.src_ip if inbound else self.dest_ip)
        self.flowinfo = None
        self.start = time.time()
        self.bytes = [0, 0]
        self.app_proto = "unknown"
        self.verdict = "allow"
        self.rule = "learn"
        self.mode = "learn"
        self.close_reason = "eof"
        self.encrypted = False
        self.passthrough = True
        self._ident = None
        self._ident_buf: list[list[bytes]] = [[], []]
        self._parser = None
        self._hold = False
        self._pending: list[bytes | None] = [None, None]
        self._sent = [0, 0]
        self._seen = [0, 0]
        self._dlp: list[Any] = [None, None]
        self._dlp_actions: list = []
        self._enforced = False
        self._stopped: Stop | None = None
        self.source_preserved = True
        self._alerts = 0
        self._l7_summary: dict | None = None
        self._capture_done = False
        self._bodies: list[list] = []  # decoded HTTP bodies under DLP: [next offset, decoder, stream]
        self._governed = False  # an L7/app rule or a DLP block rule needs this flow inspected
        self._on_error: str | None = None  # the policy's onInspectionError override, if any
        self._digit_hold = False  # DLP block rules: never release a card/IBAN prefix on a stall
        self._tail = [b"", b""]  # last bytes forwarded per direction (digit-run hold-back)
        self._shift: tuple[int, int] | None = None  # where a tunnel's inner stream starts
        self._switch: tuple[int, int, int] | None = None  # a protocol switch the parser accepted
        self._dns_queries: list[tuple] | None = None  # (id, qname, qtype) forwarded, not yet answered
        self._dlp_unscanned = False  # a reload's alert already said a DLP rule covers this unscanned flow
        self._wl_json: tuple[dict, dict] | None = None  # (src, dest) workload JSON, built once

    # ------------------------------------------------------------------ identities
    def _workloads(self) -> tuple[Identity, Identity]:
        """(src, dest) identities for events."""
        if self.direction == "inbound":
            local = Identity(self.dest_ip, self.local.namespace, self.local.pod, self.local.labels,
                             self.local.service_account)
            return self.peer, local
        local = Identity(self.src_ip, self.local.namespace, self.local.pod, self.local.labels,
                         self.local.service_account)
        return local, self.peer

    def _base_event(self, event_type: str) -> dict:
        # the workloads are fixed for the flow (peer and local are resolved at accept): built once,
        # a fresh top-level copy per event (a flow with a value every 64 KiB raises thousands)
        wl = self._wl_json
        if wl is None:
            src_id, dst_id = self._workloads()
            wl = self._wl_json = (src_id.to_json(), dst_id.to_json())
        src, dst = wl
        return {
            "event_type": event_type,
            "flow_id": self.flow_id,
            "direction": self.direction,
            "src_ip": self.src_ip,
            "src_port": self.src_port,
            "dest_ip": self.dest_ip,
            "dest_port": self.dest_port,
            "proto": self.proto,
            "app_proto": self.app_proto,
            "src_workload": dict(src),
            "dest_workload": dict(dst),
        }

    # ------------------------------------------------------------------ L4
    def open(self) -> bool:
        """Decide at accept time. False = refuse before any byte reaches the server."""
        insp = self.insp
        policy = insp.policy
        if policy is not None:
            from firewall.policy.engine import FlowInfo

            self.flowinfo = FlowInfo("ingress" if self.direction == "inbound" else "egress",
                                     self.local, self.peer, int(self.dest_port), self.proto)
            d = policy.decide(self.flowinfo, mode_override=insp.mode_override, quarantined=insp.quarantined)
            self.mode = d.mode
            self.rule = d.rule
            self._enforced = self.mode == "protect"
            if d.alert:
                self._alert("policy", d.rule, blocked=d.verdict == "deny" and d.enforced,
                            severity=2, extra={"reason": d.reason} if d.reason else None)
            if d.capture:
                self._auto_capture(d.rule)
            if d.verdict == "deny" and d.enforced:
                self.verdict = "deny"
                self.close_reason = "denied"
                return False
            needs = getattr(policy, "needs_app", policy.needs_l7)
            if not insp.quarantined:
                try:
                    self._dlp_actions = list(policy.dlp_for(self.flowinfo, mode_override=insp.mode_override))
                except Exception as exc:  # noqa: BLE001 - which DLP rules apply is unknown: fail closed
                    self._dlp_actions = []
                    self._governed = True  # a block rule may have applied
                    stop = self._inspection_error(Stage.INTERNAL, f"dlp-policy:{type(exc).__name__}", TOSERVER)
                    if stop is not None:
                        self.close_reason = "inspection-error"
                        return False
            # hold request heads until complete when a verdict depends on them: an L7/app rule,
            # or a DLP block (a percent-encoded value in the target is only seen decoded)
            blocks = insp.dlp is not None and any(a.action == "block" for a in self._dlp_actions)
            self._governed = blocks or bool(needs(self.flowinfo))
            self._hold = insp.l7 and self._enforced and self._governed
            self._digit_hold = blocks and self._enforced
            try:
                self._on_error = policy.on_inspection_error(self.local)
            except Exception:  # noqa: BLE001 - a policy object without the override: the default
                self._on_error = None
        else:
            self._dlp_actions = []
        if insp.l7:
            from firewall.protocols import Identifier

            self._ident = Identifier(int(self.dest_port))
            self.passthrough = False
        if insp.dlp is not None and self._dlp_actions:
            self.passthrough = False
        return True

    def reevaluate(self, insp: Inspection, reason: str) -> bool:
        """Quarantine/reload: decide this open flow again under ``insp``; True = cut it.

        An allowed flow keeps every byte it holds or has in flight: only the inspection
        reference changes (later L7 decisions use the new policy)."""
        if insp.quarantined:
            self.close_reason = reason
            self.verdict = "deny"
            self.rule = "quarantine"
            return True
        self.insp = insp
        pol = insp.policy
        if pol is None or self.flowinfo is None:
            return False
        # who the peer (and this pod) are *now*: an identity change (a pod IP taken over by
        # another workload, new labels) must reach flows already open, not only the next ones.
        # The flow record keeps the identity seen at accept; the decisions use the current one.
        fi = self.flowinfo
        peer = insp.resolve(self.src_ip if self.direction == "inbound" else self.dest_ip)
        if peer != fi.peer or insp.local != fi.local:
            from firewall.policy.engine import FlowInfo

            self.flowinfo = FlowInfo(fi.direction, insp.local, peer, fi.port, fi.transport)
        try:
            d = pol.decide(self.flowinfo, mode_override=insp.mode_override)
            if d.verdict != "deny" and self.app_proto not in ("unknown", ""):
                d = pol.decide_app(self.flowinfo, self.app_proto, mode_override=insp.mode_override) or d
        except Exception:  # noqa: BLE001 - a policy that cannot decide leaves the flow as it was
            return False
        if d.verdict == "deny" and d.enforced:
            self.close_reason = reason
            self.verdict = "deny"
            self.rule = d.rule
            return True
        try:  # a DLP rule that now applies to an unscanned (maybe spliced) flow
            cut = self.dlp_reloaded(insp.mode_override)
        except Exception:  # noqa: BLE001 - cannot tell whether DLP applies: fail closed in protect
            cut = self.mode == "protect"
        if cut:
            self.close_reason = reason
        return cut

    # ------------------------------------------------------------------ kernel relay
    def relayed(self, d: int, n: int) -> None:
        """Bytes the kernel relay (splice pump or native thread) delivered in direction ``d``."""
        self.bytes[d] += n

    def relay_ended(self, reason: str) -> None:
        """The kernel relay finished the flow: a reset/idle end is kept unless a verdict
        already named why the flow ended."""
        if reason != "eof" and self.close_reason == "eof":
            self.close_reason = reason

    # ------------------------------------------------------------------ data
    def feed(self, d: int, data: bytes) -> tuple[bytes, Stop | None]:
        """Inspect ``data`` travelling in direction ``d``; return (bytes to forward now, stop)."""
        if self._stopped is not None:
            return b"", self._stopped
        stop = self.inspect(d, data)
        if stop is None and self.insp.dlp is not None and self._dlp_actions and not self.encrypted:  # _dlp_on()
            stop = self._scan(d, data)
        return self.assemble(d, data, stop)

    # The proxy may split feed() in three to run the DLP scan (which releases the GIL) on a
    # worker thread for large chunks: inspect() and assemble() on the event loop, scan_async()
    # between them.  The order of bytes per direction is kept by the proxy (one scan in flight).
    def inspect(self, d: int, data: bytes) -> Stop | None:
        """Identification and parsing (L7 verdicts) of one chunk."""
        self._seen[d] += len(data)
        if self._ident is not None:
            return self._identify(d, data)  # the replay after identification covers bodies too
        if self._parser is None:
            return None
        return self._parse_chunk(d, data, self._seen[d] - len(data))

    def _parse_chunk(self, d: int, data: bytes, base: int) -> Stop | None:
        """Parse one chunk starting at stream offset ``base`` (and its decoded body views);
        a protocol switch the parser accepted hands the rest of the chunk to a fresh
        identification of the inner stream."""
        stop = self._parse(d, data)
        if stop is None and self._bodies and d == TOSERVER:
            stop = self._scan_bodies(data, base)
        if stop is None and self._switch is not None:
            stop = self._enter_tunnel(d, data, base)
        return stop

    # ------------------------------------------------------------------ decoded HTTP views
    def _decoded_request(self, ev: L7Event) -> Stop | None:
        """DLP on what the server will decode: the percent-decoded target now, and a decoded
        (de-chunked, decompressed, form-decoded) body as it streams (firewall/protocols/httpdecode.py)."""
        f = ev.fields
        target = decode_target(f.get("raw_target") or f.get("path") or "")
        if target is not None:
            try:
                findings = self.insp.dlp.scan_bytes(target)
            except Exception as exc:  # noqa: BLE001 - a scanner fault: the exception policy decides
                stop = self._inspection_error(Stage.SCAN, f"scanner-error:{type(exc).__name__}", TOSERVER,
                                              ev.offset)
                if stop is not None:
                    return stop
                findings = []
            stop = self._handle_findings(TOSERVER, findings, cut=ev.offset) if findings else None
            if stop is not None:
                return stop
        ctype = (f.get("content_type") or "").lower()
        chunked = bool(f.get("chunked"))
        form = ctype.startswith("application/x-www-form-urlencoded")
        if not needs_decoding(chunked, f.get("content_encoding"), form):
            return None  # the raw stream scan sees the body as the server will
        dec = BodyDecoder(chunked=chunked, encoding=f.get("content_encoding"), form=form,
                          length=f.get("content_length"))
        if dec.error and not dec.chunked and not f.get("content_length"):
            return None  # no body: nothing to decode
        if dec.needed and (f.get("chunked") or f.get("content_length")) and f.get("head_end") is not None:
            # [next raw offset, decoder, DLP stream, raw offset held back (a card-shaped run at the
            # end of the decoded view), the decoded view's last bytes]
            self._bodies.append([int(f["head_end"]), dec, self.insp.dlp.stream(), None, b""])
        return None

    def _scan_bodies(self, data: bytes, base: int) -> Stop | None:
        end = base + len(data)
        for b in list(self._bodies):
            pos, dec, stream = b[0], b[1], b[2]
            if pos >= end:
                continue
            rel = max(0, pos - base)
            out, used = dec.feed(data[rel:])
            b[0] = base + rel + used
            if self._digit_hold and out:
                # the decoded view ends in a card-shaped run: hold the raw (compressed, chunked)
                # bytes from the chunk it began in, so a receiver decoding what it got cannot
                # see the prefix either (the same hold-back as on the raw stream)
                tail = (b[4] + out)[-64:]
                b[4] = tail
                if _CARD_TAIL.search(tail) or _IBAN_TAIL.search(tail):
                    if b[3] is None:
                        b[3] = base + rel
                else:
                    b[3] = None
            scan_error = None
            try:
                findings = stream.scan(out) if out else []
                if dec.done:
                    findings += stream.close()
            except Exception as exc:  # noqa: BLE001 - a scanner fault: the exception policy decides
                findings, scan_error = [], f"scanner-error:{type(exc).__name__}"
            if dec.done or dec.error or scan_error:
                self._bodies.remove(b)
            if findings:
                stop = self._handle_findings(TOSERVER, findings)
                if stop is not None:
                    return stop
            if scan_error:
                stop = self._inspection_error(Stage.SCAN, scan_error, TOSERVER)
                if stop is not None:
                    return stop
            if dec.error:
                stop = self._inspection_error(Stage.DECODE, dec.error, TOSERVER, status="415 Unsupported Media Type",
                                              stop_reason="dlp-block:undecodable")
                if stop is not None:
                    return stop
        return None

    def _blocks(self) -> bool:
        return self._enforced and any(a.action == "block" for a in self._dlp_actions)

    def wants_scan(self) -> bool:
        return self._stopped is None and self._dlp_on()

    def scan_findings(self, d: int, data: bytes) -> list:
        """The DLP scan alone (thread-safe for one direction at a time: no session state but
        the direction's own stream)."""
        s = self._dlp[d]
        if s is None:
            s = self._dlp[d] = self.insp.dlp.stream()
        return s.scan(data)

    def scanned(self, d: int, findings: list | None, error: bool = False) -> Stop | None:
        if error:
            return self._inspection_error(Stage.SCAN, "scanner-error", d, stop_reason="dlp-error")
        return self._handle_findings(d, findings) if findings else None

    def assemble(self, d: int, data: bytes, stop: Stop | None) -> tuple[bytes, Stop | None]:
        """What of (held bytes + data) may be forwarded now."""
        if self._stopped is not None:
            return b"", self._stopped
        pend = self._pending[d]
        buf = pend + data if pend else data
        start = self._sent[d]
        if stop is not None:
            cut = stop.cut
            upto = start if cut is None else max(start, min(cut, self._seen[d]))
            out = buf[: upto - start]
            self._pending[d] = None
            self._sent[d] = upto
            self._stopped = stop
            return out, stop
        hold_at = self._hold_offset(d)
        if self._digit_hold:
            digits = self._digit_run_hold(d, buf, start)
            if d == TOSERVER:
                for b in self._bodies:
                    if b[3] is not None:
                        digits = b[3] if digits is None else min(digits, b[3])
            if digits is not None:
                hold_at = digits if hold_at is None else min(hold_at, digits)
        if hold_at is None:
            self._pending[d] = None
            self._sent[d] = self._seen[d]
            out = buf
        else:
            upto = max(start, min(hold_at, self._seen[d]))
            self._pending[d] = buf[upto - start:] or None
            self._sent[d] = upto
            out = buf[: upto - start]
        if self._digit_hold and out:
            self._tail[d] = (self._tail[d] + out[-64:])[-64:]
        return out, None

    def release(self, d: int) -> bytes:
        """Forward what is held (identification gave up on a silent peer, or EOF).

        Identification still undecided here is an inspection failure: on a governed flow in
        protect mode the exception policy refuses (``_stopped`` is set, nothing is released)."""
        if self._ident is not None and not self._stopped:
            stop = self._decide_proto("unknown")
            if stop is None and self._pending[d]:
                stop = self._inspection_error(Stage.IDENTIFY, "undecided", d, self._sent[d])
            if stop is not None:
                self._stopped = stop
                return b""
        pend = self._pending[d]
        if not pend or self._stopped:
            return b""
        self._pending[d] = None
        self._sent[d] = self._seen[d]
        return pend

    def holding(self, d: int) -> bool:
        return bool(self._pending[d])

    def eof(self, d: int) -> tuple[bytes, Stop | None]:
        """The sender in direction d closed its side: flush the DLP stream, release holds."""
        stop = None
        if self._dlp_on() and self._dlp[d] is not None:
            try:
                findings = self._dlp[d].close()
            except Exception as exc:  # noqa: BLE001 - a scanner fault: the exception policy decides
                findings = []
                stop = self._inspection_error(Stage.SCAN, f"scanner-error:{type(exc).__name__}", d,
                                              self._sent[d], stop_reason="dlp-error")
            self._dlp[d] = None
            stop = stop or self._handle_findings(d, findings)
        if stop is None and self._pending[d] and self._ident is None and self._parser is not None:
            try:
                head = self._parser.hold_from(d)
            except Exception:  # noqa: BLE001
                head = self._sent[d]
            if head is not None:
                # an incomplete message head when the sender closes: a server may still act on
                # it (HTTP/0.9-style "GET /admin" + FIN), so it is never forwarded unchecked
                stop = self._inspection_error(Stage.PARSE, "incomplete-head-at-eof", d, head)
        if stop is None and self._digit_hold and self._pending[d]:
            pend = self._pending[d]
            if self._digit_run_hold(d, pend, self._sent[d]) is not None:
                # a card / IBAN prefix held back when the sender stopped one digit short and
                # closed: releasing it now would hand over all but the check digit
                stop = self._inspection_error(Stage.SCAN, "card-prefix-at-eof", d, self._sent[d],
                                              stop_reason="dlp-block:card-prefix-at-eof")
        if stop is not None:
            self._stopped = stop
            return b"", stop
        out = self.release(d)
        if self._stopped is not None:
            return b"", self._stopped
        return out, None

    # ------------------------------------------------------------------ stages
    def _hold_offset(self, d: int) -> int | None:
        if not self._hold:
            return None
        if self._ident is not None:
            # hold client bytes while identifying (bounded by the identifier's depth); server
            # bytes pass, so a server-first banner reaches its client (Identifier.holds);
            # inside a tunnel only what follows the switch (the 200 / 101 must reach the client)
            if not self._ident.holds(d):
                return None
            return self._sent[d] if self._shift is None else max(self._sent[d], self._shift[d])
        if self._parser is not None:
            try:
                return self._parser.hold_from(d)
            except Exception:  # noqa: BLE001
                return None
        return None

    def _digit_run_hold(self, d: int, buf: bytes, start: int) -> int | None:
        """Where a trailing card- or IBAN-shaped run starts, if one ends ``buf``.

        The DLP scan reports a value once its last byte has been seen; a sender that stops
        one digit short would otherwise get 15 of 16 digits through, and Luhn restores the
        16th.  So under a DLP block rule a trailing run that is a card prefix missing at most
        its check digit (12+ digits) or an IBAN prefix stays held until more bytes arrive (the
        scan then settles it), the flow ends (the scan's close settles it), or the proxy's
        header timeout cuts a sender that stalls."""
        if not self._digit_hold or not self._dlp_on():
            return None
        tail = self._tail[d]
        window = tail + buf[-64:] if len(buf) < 64 else buf[-64:]
        base = start + len(buf) - len(window)
        starts = [m.start() for m in (_CARD_TAIL.search(window), _IBAN_TAIL.search(window)) if m is not None]
        if not starts:
            return None
        return max(start, base + min(starts))

    def _identify(self, d: int, data: bytes) -> Stop | None:
        self._ident_buf[d].append(data)
        try:
            proto = self._ident.feed(data, d)
            undecided = self._ident.undecided
        except Exception:  # noqa: BLE001 - an identifier bug must not kill the relay
            proto, undecided = "unknown", ("identifier-error",)
        if proto is None:
            return None
        if undecided:
            # a probe still wanted bytes at its depth (a ClientHello longer than 16 KiB, a
            # CONNECT line that never ends): not an ordinary unknown protocol
            stop = self._inspection_error(Stage.IDENTIFY, "undecided:" + "+".join(undecided), d, 0)
            if stop is not None:
                self._ident = None
                return stop
        return self._decide_proto(proto)

    def _decide_proto(self, proto: str) -> Stop | None:
        self._ident = None
        self.app_proto = proto
        bufs, self._ident_buf = self._ident_buf, [[], []]
        policy = self.insp.policy
        if policy is not None and self.flowinfo is not None:
            d = policy.decide_app(self.flowinfo, proto, mode_override=self.insp.mode_override,
                                  quarantined=self.insp.quarantined)
            stop = self._apply_decision(d, None)
            if stop is not None:
                return stop
        if proto != "unknown":
            from firewall.protocols import make_parser

            try:
                self._parser = make_parser(proto)
            except Exception as exc:  # noqa: BLE001
                self._parser = None
                stop = self._inspection_error(Stage.INTERNAL, f"parser-init:{type(exc).__name__}", TOSERVER)
                if stop is not None:
                    return stop
            if self._parser is not None and self._shift is not None:
                self._parser = _Shifted(self._parser, self._shift)
        elif self._shift is not None:
            # an accepted CONNECT / Upgrade whose inner protocol is not one we can read
            # (websocket frames, an unknown binary protocol): never passed on by accident
            stop = self._inspection_error(Stage.TUNNEL, "uninspectable-tunnel", TOSERVER, self._sent[TOSERVER])
            if stop is not None:
                return stop
        if self._parser is None:
            if not self._dlp_on():
                self.passthrough = True
            return None
        for d in (TOSERVER, TOCLIENT):
            base = self._shift[d] if self._shift is not None else 0
            for chunk in bufs[d]:
                stop = self._parse_chunk(d, chunk, base)
                base += len(chunk)
                if stop is not None:
                    return stop
        return None

    def _parse(self, d: int, data: bytes) -> Stop | None:
        try:
            events = self._parser.feed(data, d)
        except Exception as exc:  # noqa: BLE001 - parsers promise not to raise; belt and braces
            self._parser = None
            if not self._dlp_on():
                self.passthrough = True
            return self._inspection_error(Stage.INTERNAL, f"parser-error:{type(exc).__name__}", d,
                                          self._sent[d])
        if not events:
            return None
        for ev in events:
            stop = self._on_event(ev)
            if stop is not None:
                return stop
        return None

    def _on_event(self, ev: L7Event) -> Stop | None:
        insp = self.insp
        app, kind = ev.app_proto, ev.kind
        if app == "grpc" and self.app_proto != "grpc":
            self.app_proto = "grpc"
        if kind == "established":
            self.encrypted = True  # a TLS handshake completed in both directions (tls.TlsParser)
        if insp.l7_events and kind != "anomaly":
            e = self._base_event(app or self.app_proto)
            e[app or self.app_proto] = {"kind": kind, "direction": DIR_NAMES[ev.direction],
                                        **{k: v for k, v in ev.fields.items() if k not in _PRIVATE_FIELDS}}
            insp.emit(e)
        if app == "dns":
            stop = self._on_dns(ev)
            if stop is not None or (kind == "anomaly" and ev.direction == TOSERVER):
                return stop
        if kind == "anomaly" and (app == "tls" or (ev.anomaly or "").startswith("tls:")):
            # the flow claimed TLS (a complete ClientHello, or a switch) and broke the record layer
            return self._inspection_error(Stage.PARSE, f"{app}:{ev.anomaly}", ev.direction, ev.offset)
        if kind == "anomaly":
            return self._on_anomaly(ev)
        if kind == "response" and ev.fields.get("tunnel_at") is not None:
            # the server accepted CONNECT / Upgrade: what follows is another protocol
            self._switch = (self._seen[TOSERVER], int(ev.fields["tunnel_at"]), int(ev.fields.get("tunnel_port") or 0))
        if kind == "switch":
            stop = self._on_switch(ev)
            if stop is not None:
                return stop
        if kind == "request" and app == "http" and ev.direction == TOSERVER and self._dlp_on():
            stop = self._decoded_request(ev)
            if stop is not None:
                return stop
        policy = insp.policy
        if policy is None or self.flowinfo is None:
            return None
        d = policy.decide_l7(self.flowinfo, ev, mode_override=insp.mode_override,
                             quarantined=insp.quarantined)
        stop = self._apply_decision(d, ev) if d is not None else None
        if (stop is None and kind == "request" and app == "http" and ev.fields.get("method") == "CONNECT"
                and self.direction == "outbound"):
            stop = self._connect_target(ev)
        return stop

    def _connect_target(self, ev: L7Event) -> Stop | None:
        """An outbound CONNECT names where the tunnel really goes: that destination is
        evaluated by the policy as an egress flow of its own (an allowed proxy port must not
        open a way to a destination the policy denies)."""
        from firewall.policy.engine import FlowInfo

        authority = str(ev.fields.get("host") or "")
        host, _, port = authority.rpartition(":")
        host = host.strip("[]")
        if not port.isdigit() or not host:
            return self._inspection_error(Stage.TUNNEL, "bad-connect-target", TOSERVER, ev.offset)
        insp = self.insp
        try:
            import ipaddress

            ipaddress.ip_address(host)
            peer, fqdn = insp.resolve(host), None
        except ValueError:
            peer, fqdn = Identity("0.0.0.0"), _OneName(host.lower().rstrip("."))
        flow = FlowInfo("egress", self.local, peer, int(port), self.proto)
        try:
            d = insp.policy.decide(flow, mode_override=insp.mode_override, quarantined=insp.quarantined,
                                   fqdn=fqdn)
        except Exception as exc:  # noqa: BLE001
            return self._inspection_error(Stage.INTERNAL, f"connect-policy:{type(exc).__name__}", TOSERVER,
                                          ev.offset)
        if d.verdict == "deny":
            self._alert("policy", d.rule, blocked=d.enforced, severity=2,
                        extra={"reason": f"CONNECT target {host}:{port}: {d.reason or 'denied'}"})
            if d.enforced:
                self.rule = d.rule
                self.verdict = "deny"
                return Stop(f"denied:{d.rule}", _forbidden(d.rule, "CONNECT target denied"), cut=ev.offset)
        return None

    def _on_switch(self, ev: L7Event) -> Stop | None:
        """A protocol switch (PostgreSQL SSLRequest/GSSENCRequest, MySQL SSL): the inner stream
        is TLS (parsed on: hellos, record layer, ``established``) or GSSAPI (opaque).  Where an
        L7 rule of this flow reads the plaintext (SQL verbs), the switch hides what it needs:
        the exception policy decides (refuse in protect)."""
        policy = self.insp.policy
        if policy is None or self.flowinfo is None:
            return None
        try:
            needs_plaintext = bool(policy.needs_l7(self.flowinfo))
        except Exception:  # noqa: BLE001 - cannot tell: assume it does
            needs_plaintext = True
        if not needs_plaintext:
            return None
        f = ev.fields
        return self._inspection_error(Stage.TUNNEL, f"{ev.app_proto}:{f.get('via')}->{f.get('to')}",
                                      ev.direction, ev.offset)

    def _on_dns(self, ev: L7Event) -> Stop | None:
        """DNS under the exception policy (``dns.query_problem``: what is not one plain query
        is refused in protect mode on a governed flow); queries remembered per flow so only
        the answer to one of them may teach the FQDN cache."""
        from firewall.protocols import dns

        if ev.direction == TOSERVER:
            problem = dns.query_problem(ev)
            if problem is not None:
                return self._inspection_error(Stage.PARSE, problem, TOSERVER, ev.offset)
            q = self._dns_queries = (self._dns_queries or [])[-63:]  # bounded per flow
            q.append(dns.query_key(ev.fields))
        elif ev.kind == "answer" and self.insp.fqdn is not None:
            self._learn_dns(ev)
        return None

    def _learn_dns(self, ev: L7Event) -> None:
        """Learn only from an answer the pod asked for (docs/policy.md, "How FQDN peers are
        learned"): an outbound, not denied flow to a resolver (port 53, ``fqdn_resolvers``),
        server to client, ID and question of a query forwarded on this flow."""
        from firewall.protocols import dns

        key = dns.query_key(ev.fields)
        if (self.direction != "outbound" or ev.direction != TOCLIENT or self.verdict == "deny"
                or self._stopped is not None or key not in (self._dns_queries or ())
                or not self.insp.fqdn.trusts(self.dest_ip, self.dest_port)):
            return
        self._dns_queries.remove(key)  # type: ignore[union-attr]
        addrs, ttl = dns.answer_addresses(ev.fields)
        if addrs:
            try:
                self.insp.fqdn.learn(ev.fields["qname"], addrs, ttl)
            except Exception:  # noqa: BLE001
                pass

    def _on_anomaly(self, ev: L7Event) -> Stop | None:
        """Every parser anomaly goes through the exception policy (firewall/datapath/exception_policy.py),
        except response oddities a client reads one way only (``lenient:``), which alert."""
        anomaly = ev.anomaly or "anomaly"
        signature = f"{self.app_proto}:{anomaly}"
        if anomaly.startswith("lenient:"):
            self._alert("protocol", signature, blocked=False, severity=3,
                        extra={"inspection": {"stage": "parse", "reason": anomaly, "action": "forward",
                                              "direction": DIR_NAMES[ev.direction]}})
            return None
        if anomaly.startswith("parser-error:"):
            stage = Stage.INTERNAL
        elif anomaly.startswith("normalise:"):
            stage = Stage.NORMALISE
        else:
            stage = Stage.PARSE
        status = "400 Bad Request"
        if anomaly.startswith("oversized"):
            status = "431 Request Header Fields Too Large"
        return self._inspection_error(stage, anomaly, ev.direction, ev.offset, status=status,
                                      category="protocol", signature=signature,
                                      stop_reason=f"anomaly:{anomaly}",
                                      stream_id=int(ev.fields.get("stream_id") or 0))

    # ------------------------------------------------------------------ protocol switches
    def _enter_tunnel(self, d: int, data: bytes, base: int) -> Stop | None:
        """CONNECT / Upgrade accepted: the inner stream is identified afresh (the CONNECT
        target's port as the hint) and inspected with the same rules; an inner stream that
        cannot be identified falls under the exception policy (Stage.TUNNEL)."""
        from firewall.protocols import Identifier

        toserver, toclient, port = self._switch  # type: ignore[misc]
        self._switch = None
        self._shift = (toserver, toclient)
        self._parser = None
        self._bodies = []
        self._ident = Identifier(port or int(self.dest_port))
        self._ident_buf = [[], []]
        self.passthrough = False
        start = self._shift[d]
        rest = data[max(0, start - base):] if start < base + len(data) else b""
        if rest:
            return self._identify(d, rest)
        return None

    def _apply_decision(self, d: Any, ev: L7Event | None) -> Stop | None:
        if d is None:
            return None
        self.rule = d.rule
        self.mode = d.mode
        if d.alert:
            extra = None
            if ev is not None:
                extra = {"l7": {"kind": ev.kind, **{k: v for k, v in ev.fields.items()
                                                   if k not in _PRIVATE_FIELDS}}}
            self._alert("policy", d.rule, blocked=d.verdict == "deny" and d.enforced, severity=2,
                        extra=extra)
        if d.capture:
            self._auto_capture(d.rule)
        if d.verdict != "deny" or not d.enforced:
            return None
        self.verdict = "deny"
        reply = None
        cut = None
        if ev is not None:
            cut = ev.offset if ev.direction == TOSERVER else None
            if self.app_proto == "http" and ev.direction == TOSERVER and ev.kind == "request":
                reply = _forbidden(d.rule, d.reason or "denied by rule")
            elif (self.app_proto in ("http2", "grpc") and ev.direction == TOSERVER and ev.kind == "request"
                  and ev.fields.get("stream_id") and self._parser is not None
                  and self._parser.at_boundary(TOCLIENT)):
                # our frames go after the server's on the same byte stream: only between frames
                # (mid-frame the client would read them as the rest of the server's frame, so the
                # flow is reset instead)
                reply = _h2_refusal(int(ev.fields["stream_id"]), ev.app_proto == "grpc", d.rule,
                                    with_settings=self._seen[TOCLIENT] == 0)
        stop = Stop(f"denied:{d.rule}", reply, cut=cut)
        return stop

    # ------------------------------------------------------------------ DLP
    def dlp_reloaded(self, mode_override: str | None = None) -> bool:
        """A policy reload while this flow is open: which DLP actions apply now?  True = cut it.

        A flow that is scanned goes on with its streams under the new actions (a block rule
        added for the pair starts blocking, and holding card-shaped tails, from here on).  A flow
        no DLP action applied to was never scanned - it may be spliced, its bytes so far went out
        uninspected - so it cannot be inspected from here without a blind spot: when the new
        policy blocks (protect mode) it is cut like a newly denied flow; when it only alerts,
        an alert says the flow is not scanned, and it goes on (learn/monitor never cut)."""
        policy, dlp = self.insp.policy, self.insp.dlp
        if policy is None or dlp is None or self.flowinfo is None or self.encrypted or self._stopped is not None:
            return False
        new = policy.dlp_for(self.flowinfo, mode_override=mode_override)
        if not new:
            return False  # a flow already scanned keeps its scan (the safe side)
        blocks = [a for a in new if a.action == "block"]
        if self._dlp_actions:
            self._dlp_actions = new
            self._governed = self._governed or bool(blocks)
            self._digit_hold = self._digit_hold or (bool(blocks) and self._enforced)
            return False
        rule = (blocks or new)[0].rule
        cut = bool(blocks) and self._enforced
        if not cut and self._dlp_unscanned:
            return False  # said once: every identity or policy reload would repeat it
        self._dlp_unscanned = True
        self._alert("dlp", rule, blocked=cut, severity=2,
                    extra={"reason": "a DLP rule applies to this flow since a policy reload; it was not "
                                     "scanned before, so it is " + ("cut" if cut else "not scanned")})
        if cut:
            self.verdict, self.rule = "deny", rule
        return cut

    def _dlp_on(self) -> bool:
        return self.insp.dlp is not None and not self.encrypted and bool(self._dlp_actions)

    def _scan(self, d: int, data: bytes) -> Stop | None:
        s = self._dlp[d]
        if s is None:
            s = self._dlp[d] = self.insp.dlp.stream()
        try:
            findings = s.scan(data)
        except Exception as exc:  # noqa: BLE001 - a scanner fault: the exception policy decides
            return self._inspection_error(Stage.SCAN, f"scanner-error:{type(exc).__name__}", d,
                                          stop_reason="dlp-error")
        if not findings:
            return None
        return self._handle_findings(d, findings)

    def _handle_findings(self, d: int, findings: list, cut: int | None = None) -> Stop | None:
        block_rule = None
        for f in findings:
            action, rule = "alert", f"dlp:{f.rule_id}"
            for a in self._dlp_actions:
                if f.pack in a.packs or "*" in a.packs:
                    rule = a.rule
                    if a.action == "block":
                        action = "block"
                        break
            blocked = action == "block" and self._enforced
            _counter(metrics.DLP_FINDINGS, f.rule_id, "blocked" if blocked else "alert").inc()
            self._alert("dlp", rule, blocked=blocked, severity=1 if f.severity in ("critical", "high") else 2,
                        extra={"dlp": {"rule_id": f.rule_id, "rule_name": f.rule_name, "type": f.type,
                                       "pack": f.pack, "masked": f.masked, "offset": f.start,
                                       "direction": DIR_NAMES[d], "context": f.context,
                                       "confidence": f.confidence}})
            if blocked and block_rule is None:
                block_rule = rule
        if block_rule is None:
            return None
        self.verdict = "deny"
        reply = None
        if self.app_proto == "http" and d == TOSERVER:
            reply = _forbidden(block_rule, "sensitive data in clear text")
        stop = Stop(f"dlp-block:{block_rule}", reply, cut=cut)
        return stop

    # ------------------------------------------------------------------ inspection failures
    def _inspection_error(self, stage: Stage, reason: str, d: int, offset: int | None = None, *,
                          status: str = "400 Bad Request", category: str = "inspection",
                          signature: str | None = None, stop_reason: str | None = None,
                          stream_id: int = 0) -> Stop | None:
        """Ask the one exception policy (firewall/datapath/exception_policy.py) what a failed stage
        means for this flow; alert either way (stage, reason, action); refuse (HTTP 4xx where
        a request can still be answered, gRPC status for an HTTP/2 request at a frame
        boundary, else reset) or forward (None)."""
        out = exception_policy.decide(stage, reason, mode=self.mode if self.insp.policy is not None else "learn",
                                      governed=self._governed, override=self._on_error)
        self._alert(category, signature or f"inspection:{stage.value}:{reason}", blocked=out.refuse, severity=2,
                    extra={"inspection": {"stage": stage.value, "reason": reason,
                                          "action": out.action.value, "direction": DIR_NAMES[d]}})
        if not out.refuse:
            return None
        self.verdict = "deny"
        reply = None
        if self.app_proto == "http" and d == TOSERVER:
            reply = _bad_request(status, f"refused by palisade: {stage.value}: {reason}")
        elif (self.app_proto in ("http2", "grpc") and d == TOSERVER and stream_id
              and self._parser is not None and self._parser.at_boundary(TOCLIENT)):
            # an HTTP/2 request we could not read: answer its stream (gRPC status / 403) at a
            # frame boundary of the server's stream, else the flow is reset
            reply = _h2_refusal(stream_id, self.app_proto == "grpc", f"inspection:{stage.value}:{reason}",
                                with_settings=self._seen[TOCLIENT] == 0)
        return Stop(stop_reason or f"inspection-error:{stage.value}:{reason}", reply, cut=offset)

    # ------------------------------------------------------------------ outputs
    def _auto_capture(self, rule: str) -> None:
        caps = self.insp.captures
        if caps is None or self._capture_done:
            return
        self._capture_done = True
        try:
            caps.auto_capture(self.peer.ip, {"rule": rule, "flow_id": self.flow_id,
                                             "src_ip": self.src_ip, "dest_ip": self.dest_ip,
                                             "dest_port": self.dest_port})
        except Exception:  # noqa: BLE001
            pass

    def _alert(self, category: str, rule: str, *, blocked: bool, severity: int, extra: dict | None = None) -> None:
        self._alerts += 1
        e = self._base_event("alert")
        e["mode"] = self.mode
        e["alert"] = {"action": "blocked" if blocked else "allowed", "signature": rule,
                      "signature_id": signature_id(rule), "category": category, "severity": severity}
        if extra:
            e.update(extra)
        _counter(metrics.ALERTS_TOTAL, category, e["alert"]["action"]).inc()
        self.insp.emit(e)

    def summary(self) -> dict:
        if self._l7_summary is not None:
            return self._l7_summary
        if self._parser is not None:
            try:
                return self._parser.summary()
            except Exception:  # noqa: BLE001
                return {}
        return {}

    def record(self, end: float | None = None) -> dict:
        """The flow record (exactly one per flow; the proxy calls this once)."""
        end = end or time.time()
        e = self._base_event("flow")
        e.update({
            "verdict": self.verdict,
            "rule": self.rule,
            "mode": self.mode,
            "encrypted": self.encrypted,
            "close_reason": self.close_reason,
            "source_preserved": self.source_preserved,
            "worker": self.insp.worker,
            "l7": self.summary(),
            "flow": {"bytes_toserver": self.bytes[TOSERVER], "bytes_toclient": self.bytes[TOCLIENT],
                     "start": ts_iso(self.start), "end": ts_iso(end), "alerts": self._alerts},
        })
        return e


class _Shifted:
    """A parser for a tunnel's inner stream, seen at absolute stream offsets.

    The inner parser counts from the tunnel's first byte; the session cuts, holds and scans
    at offsets of the whole connection, so every offset it reports is moved by where the
    tunnel began in that direction."""

    __slots__ = ("inner", "shift", "app_proto")

    def __init__(self, inner: Any, shift: tuple[int, int]) -> None:
        self.inner = inner
        self.shift = shift
        self.app_proto = inner.app_proto

    def feed(self, data: bytes, d: int) -> list[L7Event]:
        out = []
        for ev in self.inner.feed(data, d):
            k = self.shift[ev.direction]
            fields = ev.fields
            if "head_end" in fields:
                fields = {**fields, "head_end": int(fields["head_end"]) + k}
            if "tunnel_at" in fields:
                fields = {**fields, "tunnel_at": int(fields["tunnel_at"]) + k}
            out.append(dataclasses.replace(ev, offset=ev.offset + k, end=ev.end + k if ev.end >= 0 else -1,
                                           fields=fields))
        self.app_proto = self.inner.app_proto
        return out

    def hold_from(self, d: int) -> int | None:
        h = self.inner.hold_from(d)
        return None if h is None else h + self.shift[d]

    def at_boundary(self, d: int) -> bool:
        return self.inner.at_boundary(d)

    def summary(self) -> dict[str, Any]:
        return self.inner.summary()


class _OneName:
    """An FQDN cache that knows one name: a CONNECT target given by host name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def names_for(self, ip: str) -> set[str]:
        return {self.name}
