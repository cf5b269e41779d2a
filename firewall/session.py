"""The per-flow inspection pipeline, sans-IO: bytes in, bytes-to-forward out.

``proxy.py`` turns socket reads into ``feed(direction, data)`` calls and executes
what comes back; nothing here touches a socket, so every decision (L4 verdict,
identification, L7 verdict, DLP block) is testable without a network.

Per direction the order is fixed: identify -> parse (L7 events -> policy) ->
DLP scan -> forward.  A deny cuts the stream exactly at the offending message's
first byte, so allowed bytes before it are delivered and nothing of it is.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from dataclasses import dataclass
from typing import Any

from firewall import exception_policy, metrics
from firewall.events import ts_iso
from firewall.exception_policy import Stage
from firewall.httpdecode import BodyDecoder, decode_target, needs_decoding
from firewall.identity import Identity
from firewall.protocols.base import TOCLIENT, TOSERVER, L7Event

_flow_ids = itertools.count(int(time.time() * 1000) % 10**9 * 1000)


def seed_flow_ids(worker: int, workers: int) -> None:
    """After fork: interleave the workers' flow ids so no two flows share one."""
    global _flow_ids
    base = int(time.time() * 1000) % 10**9 * 1000
    _flow_ids = itertools.count(base * max(1, workers) + worker, max(1, workers))
DIR_NAMES = ("toserver", "toclient")


def signature_id(name: str) -> int:
    """Stable numeric id for a rule name (EVE's signature_id)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


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
        "_dns_queries",
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
        self._dns_queries: list[tuple] | None = None  # (id, qname, qtype) forwarded, not yet answered

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
        src, dst = self._workloads()
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
            "src_workload": src.to_json(),
            "dest_workload": dst.to_json(),
        }

    # ------------------------------------------------------------------ L4
    def open(self) -> bool:
        """Decide at accept time. False = refuse before any byte reaches the server."""
        insp = self.insp
        policy = insp.policy
        if policy is not None:
            from firewall.policy import FlowInfo

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
                except Exception:  # noqa: BLE001
                    self._dlp_actions = []
            # hold request heads until complete when a verdict depends on them: an L7/app rule,
            # or a DLP block (a percent-encoded value in the target is only seen decoded)
            blocks = insp.dlp is not None and any(a.action == "block" for a in self._dlp_actions)
            self._governed = blocks or bool(needs(self.flowinfo))
            self._hold = insp.l7 and self._enforced and self._governed
        else:
            self._dlp_actions = []
        if insp.l7:
            from firewall.protocols import Identifier

            self._ident = Identifier(int(self.dest_port))
            self.passthrough = False
        if insp.dlp is not None and self._dlp_actions:
            self.passthrough = False
        return True

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
        stop = self._parse(d, data)
        if stop is None and self._bodies and d == TOSERVER:
            stop = self._scan_bodies(data, self._seen[d] - len(data))
        return stop

    # ------------------------------------------------------------------ decoded HTTP views
    def _decoded_request(self, ev: L7Event) -> Stop | None:
        """DLP on what the server will decode: the percent-decoded target now, and a decoded
        (de-chunked, decompressed, form-decoded) body as it streams (firewall/httpdecode.py)."""
        f = ev.fields
        target = decode_target(f.get("path") or "")
        if target is not None:
            try:
                findings = self.insp.dlp.scan_bytes(target)
            except Exception:  # noqa: BLE001
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
        if dec.needed and (f.get("chunked") or f.get("content_length")) and f.get("head_end") is not None:
            self._bodies.append([int(f["head_end"]), dec, self.insp.dlp.stream()])
        return None

    def _scan_bodies(self, data: bytes, base: int) -> Stop | None:
        end = base + len(data)
        for b in list(self._bodies):
            pos, dec, stream = b
            if pos >= end:
                continue
            rel = max(0, pos - base)
            out, used = dec.feed(data[rel:])
            b[0] = base + rel + used
            try:
                findings = stream.scan(out) if out else []
                if dec.done:
                    findings += stream.close()
            except Exception:  # noqa: BLE001
                findings = []
            if dec.done:
                self._bodies.remove(b)
            if findings:
                stop = self._handle_findings(TOSERVER, findings)
                if stop is not None:
                    return stop
            if dec.error:
                self._alert("dlp", "dlp:undecodable-body", blocked=self._blocks(), severity=2,
                            extra={"dlp": {"error": dec.error, "direction": "toserver"}})
                if self._blocks():
                    self.verdict = "deny"
                    return Stop("dlp-block:undecodable", _bad_request(
                        "415 Unsupported Media Type", f"refused by palisade: {dec.error}"))
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
            if self._enforced and any(a.action == "block" for a in self._dlp_actions):
                self.verdict = "deny"
                return Stop("dlp-error")
            return None
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
        if hold_at is None:
            self._pending[d] = None
            self._sent[d] = self._seen[d]
            return buf, None
        upto = max(start, min(hold_at, self._seen[d]))
        self._pending[d] = buf[upto - start:] or None
        self._sent[d] = upto
        return buf[: upto - start], None

    def release(self, d: int) -> bytes:
        """Forward what is held (identification gave up on a silent peer, or EOF)."""
        if self._ident is not None and not self._stopped:
            self._decide_proto("unknown")
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
            except Exception:  # noqa: BLE001
                findings = []
            self._dlp[d] = None
            stop = self._handle_findings(d, findings)
        if stop is not None:
            self._stopped = stop
            return b"", stop
        return self.release(d), None

    # ------------------------------------------------------------------ stages
    def _hold_offset(self, d: int) -> int | None:
        if not self._hold:
            return None
        if self._ident is not None:
            # hold client bytes while identifying (bounded by the identifier's depth); server
            # bytes pass, so a server-first banner reaches its client (Identifier.holds)
            return self._sent[d] if self._ident.holds(d) else None
        if self._parser is not None:
            try:
                return self._parser.hold_from(d)
            except Exception:  # noqa: BLE001
                return None
        return None

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
            except Exception:  # noqa: BLE001
                self._parser = None
        if self._parser is None:
            if not self._dlp_on():
                self.passthrough = True
            return None
        for d in (TOSERVER, TOCLIENT):
            base = 0
            for chunk in bufs[d]:
                stop = self._parse(d, chunk)
                if stop is None and self._bodies and d == TOSERVER:
                    stop = self._scan_bodies(chunk, base)
                base += len(chunk)
                if stop is not None:
                    return stop
        return None

    def _parse(self, d: int, data: bytes) -> Stop | None:
        try:
            events = self._parser.feed(data, d)
        except Exception:  # noqa: BLE001 - parsers promise not to raise; belt and braces
            self._parser = None
            return None
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
                                        **{k: v for k, v in ev.fields.items() if k != "head_end"}}
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
        if d is None:
            return None
        return self._apply_decision(d, ev)

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
        anomaly = ev.anomaly or "anomaly"
        blocked = self._enforced and (anomaly.startswith("smuggling") or anomaly.startswith("oversized"))
        self._alert("protocol", f"{self.app_proto}:{anomaly}", blocked=blocked, severity=2)
        if not blocked:
            return None
        if self.app_proto == "http" and ev.direction == TOSERVER:
            status = "431 Request Header Fields Too Large" if anomaly.startswith("oversized") else "400 Bad Request"
            stop = Stop(f"anomaly:{anomaly}", _bad_request(status, f"refused by palisade: {anomaly}"),
                        cut=ev.offset)
        else:
            stop = Stop(f"anomaly:{anomaly}", cut=ev.offset)
        self.verdict = "deny"
        return stop

    def _apply_decision(self, d: Any, ev: L7Event | None) -> Stop | None:
        if d is None:
            return None
        self.rule = d.rule
        self.mode = d.mode
        if d.alert:
            extra = None
            if ev is not None:
                extra = {"l7": {"kind": ev.kind, **{k: v for k, v in ev.fields.items()
                                                   if k not in ("statement", "head_end")}}}
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
    def _dlp_on(self) -> bool:
        return self.insp.dlp is not None and not self.encrypted and bool(self._dlp_actions)

    def _scan(self, d: int, data: bytes) -> Stop | None:
        s = self._dlp[d]
        if s is None:
            s = self._dlp[d] = self.insp.dlp.stream()
        try:
            findings = s.scan(data)
        except Exception:  # noqa: BLE001 - a scanner fault fails closed where policy blocks
            if self._enforced and any(a.action == "block" for a in self._dlp_actions):
                self.verdict = "deny"
                return Stop("dlp-error")
            return None
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
            metrics.DLP_FINDINGS.labels(f.rule_id, "blocked" if blocked else "alert").inc()
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
    def _inspection_error(self, stage: Stage, reason: str, d: int, offset: int | None = None) -> Stop | None:
        """Ask the one exception policy (firewall/exception_policy.py) what a failed stage
        means for this flow; alert either way; refuse (HTTP 400 where a request can still be
        answered, else reset) or forward."""
        out = exception_policy.decide(stage, reason, mode=self.mode if self.insp.policy is not None else "learn",
                                      governed=self._governed, override=self._on_error)
        self._alert("inspection", f"inspection:{stage.value}:{reason}", blocked=out.refuse, severity=2,
                    extra={"inspection": {"stage": stage.value, "reason": reason,
                                          "action": out.action.value, "direction": DIR_NAMES[d]}})
        if not out.refuse:
            return None
        self.verdict = "deny"
        reply = None
        if self.app_proto == "http" and d == TOSERVER:
            reply = _bad_request("400 Bad Request", f"refused by palisade: {stage.value}: {reason}")
        return Stop(f"inspection-error:{stage.value}:{reason}", reply, cut=offset)

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
        metrics.ALERTS_TOTAL.labels(category, e["alert"]["action"]).inc()
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
