"""HTTP/2 over cleartext (h2c, prior knowledge) and gRPC.

Frames are read with our own 9-byte header arithmetic so DATA payloads are
skipped by counting; header blocks (HEADERS + CONTINUATION, and PUSH_PROMISE,
which must be decoded to keep the HPACK state in step) are reassembled, bounded
by ``max_head`` (64 KiB), and decoded with the ``hpack`` library - one decoder
per direction, as HPACK compression state is per direction. SETTINGS frames
carrying ``HEADER_TABLE_SIZE`` resize the peer's decoder, as a real endpoint
would.

A request whose ``content-type`` starts with ``application/grpc`` is gRPC: its
events carry ``app_proto="grpc"`` and the parser's ``app_proto`` becomes
``grpc``. gRPC's status travels in trailers (a second header block on the
response stream), reported as a ``response`` event with ``trailers=True``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import hpack

from firewall.protocols.base import TOCLIENT, TOSERVER, L7Event, ParseError, Probe
from firewall.protocols.http import _summary_path
from firewall.protocols.http_canon import CanonError, canonical_target
from firewall.protocols.stream import DirState, StreamParser

APP_PROTO = "http2"
GRPC = "grpc"
DEFAULT_PORTS = frozenset({50051, 8081, 9090})
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_DATA, _HEADERS, _SETTINGS, _PUSH_PROMISE, _CONTINUATION = 0, 1, 4, 5, 9
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_SETTINGS_HEADER_TABLE_SIZE = 1
_MAX_TABLE = 1 << 20
MAX_SUMMARY_PAIRS = 32


def probe_toserver(buf: bytes) -> Probe:
    """The client connection preface (RFC 9113 section 3.4)."""
    n = min(len(buf), len(PREFACE))
    if buf[:n] != PREFACE[:n]:
        return Probe.NO_MATCH
    return Probe.MATCH if n == len(PREFACE) else Probe.NEED_MORE


def probe_toclient(buf: bytes) -> Probe:
    """A server may send its SETTINGS before the client's preface arrives.

    That is never enough to decide (9 bytes of frame header are too weak a
    signature), so a SETTINGS-shaped start keeps HTTP/2 possible until the
    client's preface settles it.
    """
    if buf[:1] != b"\0":
        return Probe.NO_MATCH
    checks = ((4, lambda: buf[3] == _SETTINGS), (5, lambda: buf[4] in (0, 1)),
              (9, lambda: buf[5:9] == b"\0\0\0\0" and int.from_bytes(buf[:3], "big") % 6 == 0))
    for need, check in checks:
        if len(buf) >= need and not check():
            return Probe.NO_MATCH
    return Probe.NEED_MORE


class Http2Parser(StreamParser):
    """Per-stream request/response heads of an h2c connection."""

    oversize_anomaly = "oversized-header"

    def __init__(self, max_head: int = 65536) -> None:
        super().__init__()
        self.app_proto = APP_PROTO
        self.max_head = max_head
        self.max_buffer = max_head + 9 + 256
        self._decoders = (hpack.Decoder(), hpack.Decoder())
        for dec in self._decoders:
            dec.max_header_list_size = max_head
        self._preface_done = False
        # a header block that fails to decode (HPACK error, ambiguous or uncanonical request) is
        # reported at its first frame, so the session cuts the stream before it, not after it
        self._failed_at: int | None = None
        self._failed_sid = 0
        # pending header block per direction: [stream_id, start, fragments, end_stream, is_push]
        self._block: list[list[Any] | None] = [None, None]
        self._streams: dict[int, dict[str, Any]] = {}
        self.requests = 0
        self.first_host: str | None = None
        self.first_path: str | None = None
        self.pairs: list[list[str]] = []
        self.statuses: dict[int, int] = {}
        self.grpc_statuses: dict[int, int] = {}

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        d = st.direction
        if d == TOSERVER and not self._preface_done:
            n = min(len(st.buf), len(PREFACE))
            if st.buf[:n] != PREFACE[:n]:
                raise ParseError("bad-preface")
            if n < len(PREFACE):
                return
            st.advance(len(PREFACE))
            self._preface_done = True
        while not st.skip and len(st.buf) >= 9:
            buf = st.buf
            length = int.from_bytes(buf[:3], "big")
            ftype, flags = buf[3], buf[4]
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            block = self._block[d]
            if block is not None and ftype != _CONTINUATION:
                raise ParseError("expected-continuation")
            if ftype not in (_HEADERS, _CONTINUATION, _PUSH_PROMISE, _SETTINGS):
                st.advance(9 + length)  # DATA and control frames: skipped by counting
                continue
            if length > self.max_head:
                raise ParseError("oversized-header")
            if len(buf) < 9 + length:
                break
            start = st.pos
            payload = bytes(buf[9 : 9 + length])
            st.advance(9 + length)
            if ftype == _SETTINGS:
                self._settings(d, flags, payload)
            elif ftype == _CONTINUATION:
                if block is None or sid != block[0]:
                    raise ParseError("unexpected-continuation")
                block[2].append(payload)
                if sum(len(f) for f in block[2]) > self.max_head:
                    raise ParseError("oversized-header")
                if flags & _END_HEADERS:
                    self._block[d] = None
                    self._failed_at = block[1]
                    self._failed_sid = sid
                    self._complete(st, block, out)
                    self._failed_at = None
            else:
                fragment = self._fragment(ftype, flags, payload)
                block = [sid, start, [fragment], bool(flags & _END_STREAM), ftype == _PUSH_PROMISE]
                if flags & _END_HEADERS:
                    self._failed_at = start
                    self._failed_sid = sid
                    self._complete(st, block, out)
                    self._failed_at = None
                else:
                    self._block[d] = block
        if d == TOSERVER:
            block = self._block[d]
            if block is not None:
                st.hold = block[1]
            elif st.buf and not st.skip and self._preface_done and (len(st.buf) < 4 or st.buf[3] == _HEADERS):
                st.hold = st.pos
            else:
                st.hold = None

    def _anomaly(self, st: DirState, name: str, **fields: Any) -> L7Event:
        ev = super()._anomaly(st, name, **fields)
        if self._failed_at is not None:
            # the stream whose request failed: the session may answer it (403 / gRPC status)
            fields = {"stream_id": self._failed_sid} if st.direction == TOSERVER else {}
            ev = dataclasses.replace(ev, offset=self._failed_at, fields=fields)
            self._failed_at = None
        return ev

    @staticmethod
    def _fragment(ftype: int, flags: int, payload: bytes) -> bytes:
        i, end = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                raise ParseError("bad-padding")
            end -= payload[0]
            i = 1
        if ftype == _PUSH_PROMISE:
            i += 4
        elif flags & _PRIORITY:
            i += 5
        if i > end:
            raise ParseError("bad-padding")
        return payload[i:end]

    def _settings(self, d: int, flags: int, payload: bytes) -> None:
        if flags & 0x1 or len(payload) % 6:
            return
        for i in range(0, len(payload), 6):
            ident = int.from_bytes(payload[i : i + 2], "big")
            if ident == _SETTINGS_HEADER_TABLE_SIZE:
                value = int.from_bytes(payload[i + 2 : i + 6], "big")
                # this side's decoder limit governs what the *other* side may encode
                peer = self._decoders[1 - d]
                peer.max_allowed_table_size = max(4096, min(value, _MAX_TABLE))

    def _complete(self, st: DirState, block: list[Any], out: list[L7Event]) -> None:
        d = st.direction
        sid, start, fragments, end_stream, is_push = block
        try:
            headers = self._decoders[d].decode(b"".join(fragments))
        except hpack.HPACKError as exc:
            raise ParseError("hpack-error") from exc
        if is_push:
            return
        h: dict[str, str] = {}
        for name, value in headers:
            key = str(name).lower()
            if d == TOSERVER and key in h and key in (":path", ":method", ":authority", ":scheme", "host"):
                raise ParseError("ambiguous:duplicate-" + key.lstrip(":"))
            h.setdefault(key, str(value))
        stream = self._streams.setdefault(sid, {})
        if d == TOSERVER:
            if "request" in stream:
                return  # request trailers
            raw_path = h.get(":path")
            if raw_path is not None and h.get(":method") != "CONNECT" and raw_path != "*":
                try:
                    h[":path"] = canonical_target(raw_path).target
                except CanonError as exc:
                    raise ParseError(f"normalise:{exc}") from None
            auth, host = h.get(":authority"), h.get("host")
            if auth and host and auth.lower() != host.lower():
                raise ParseError("ambiguous:host-mismatch")
            ctype = h.get("content-type")
            proto = GRPC if ctype and ctype.startswith("application/grpc") else APP_PROTO
            if proto == GRPC:
                self.app_proto = GRPC
            fields = {
                "method": h.get(":method"),
                "authority": h.get(":authority") or h.get("host"),
                "path": h.get(":path"),
                "scheme": h.get(":scheme"),
                "content_type": ctype,
                "stream_id": sid,
                "content_encoding": h.get("content-encoding") or h.get("grpc-encoding"),
                "end_stream": end_stream,
            }
            stream["request"] = proto
            self.requests += 1
            if self.first_host is None and self.first_path is None:
                self.first_host, self.first_path = fields["authority"], fields["path"]
            pair = [fields["method"] or "", fields["path"] or ""]
            if len(self.pairs) < MAX_SUMMARY_PAIRS and pair not in self.pairs:
                self.pairs.append(pair)
            out.append(L7Event(proto, "request", TOSERVER, start, fields, st.pos))
            return
        proto = stream.get("request", APP_PROTO)
        grpc_status = _int_or_none(h.get("grpc-status"))
        if grpc_status is not None:
            self.grpc_statuses[grpc_status] = self.grpc_statuses.get(grpc_status, 0) + 1
        trailers = ":status" not in h and "status" in stream
        if trailers:
            fields = {"status": stream["status"], "grpc_status": grpc_status,
                      "grpc_message": (h.get("grpc-message") or None) and h["grpc-message"][:128],
                      "stream_id": sid, "trailers": True}
        else:
            status = _int_or_none(h.get(":status"))
            if status is not None and status < 200:
                return  # interim (100 Continue)
            stream["status"] = status
            if status is not None:
                self.statuses[status] = self.statuses.get(status, 0) + 1
            fields = {"status": status, "grpc_status": grpc_status, "content_type": h.get("content-type"),
                      "stream_id": sid, "trailers": False, "end_stream": end_stream}
        out.append(L7Event(proto, "response", TOCLIENT, start, fields, st.pos))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "host": self.first_host,
            "path": _summary_path(self.first_path),
            "methods_paths": [[m, _summary_path(p)] for m, p in self.pairs],
            "statuses": dict(self.statuses),
            "grpc": self.app_proto == GRPC,
        }
        if self.grpc_statuses:
            out["grpc_statuses"] = dict(self.grpc_statuses)
        out.update(self._base_summary())
        return out


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
