"""TLS: the cleartext ClientHello and ServerHello, then nothing.

What policy needs from TLS is in the two hellos: the SNI (egress by FQDN), the
ALPN list, and the versions (PCI DSS 4.2.1: refuse TLS below 1.2). The
ClientHello may span several records and any number of segments, so handshake
bytes are reassembled (bounded: 64 KiB, more is ``oversized-hello``) before
parsing. After the ClientHello (client side) and the ServerHello (server side)
the stream is encrypted and ``feed`` only counts bytes.

A server alert before its ServerHello (e.g. ``protocol_version`` when the client
offers only old versions) is reported as an ``alert`` event.
"""

from __future__ import annotations

from typing import Any

from firewall.protocols.base import TOCLIENT, TOSERVER, L7Event, ParseError, Probe
from firewall.protocols.stream import DirState, StreamParser

APP_PROTO = "tls"
DEFAULT_PORTS = frozenset({443, 8443, 993, 995, 465, 636, 6443})

_HANDSHAKE, _ALERT, _CCS, _APPDATA = 22, 21, 20, 23
_MAX_RECORD = (1 << 14) + 2048
_MAX_HANDSHAKE = 65536
_EXT_SNI, _EXT_ALPN, _EXT_VERSIONS = 0, 16, 43
# SHA-256("HelloRetryRequest"), the ServerHello random that marks an HRR (RFC 8446 4.1.3)
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

ALERTS = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 40: "handshake_failure",
    42: "bad_certificate", 47: "illegal_parameter", 48: "unknown_ca", 50: "decode_error",
    51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
    86: "inappropriate_fallback", 109: "missing_extension", 110: "unsupported_extension",
    112: "unrecognized_name", 116: "certificate_required", 120: "no_application_protocol",
}


def version_name(v: int) -> str:
    """``0x0303`` -> ``"1.2"``; SSL 3.0 -> ``"ssl3"``; anything else as hex."""
    if v == 0x0300:
        return "ssl3"
    if 0x0301 <= v <= 0x0304:
        return f"1.{v - 0x0301}"
    return f"0x{v:04x}"


def _grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def probe_toserver(buf: bytes) -> Probe:
    """A handshake record (22, version 3.x) whose first message is a ClientHello."""
    checks = (
        lambda: buf[0] == _HANDSHAKE,
        lambda: buf[1] == 3,
        lambda: buf[2] <= 4,
        lambda: True,
        lambda: 4 <= int.from_bytes(buf[3:5], "big") <= _MAX_RECORD,
        lambda: buf[5] == 1,
    )
    for i, check in enumerate(checks):
        if len(buf) <= i:
            return Probe.NEED_MORE
        if not check():
            return Probe.NO_MATCH
    return Probe.MATCH


class _Reader:
    """Bounds-checked reads over one handshake message body."""

    __slots__ = ("data", "i")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.data):
            raise ParseError("malformed-hello")
        out = self.data[self.i : self.i + n]
        self.i += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec(self, len_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(len_bytes), "big"))

    def more(self) -> bool:
        return self.i < len(self.data)


def _extensions(r: _Reader) -> dict[int, bytes]:
    exts: dict[int, bytes] = {}
    if not r.more():
        return exts
    block = _Reader(r.vec(2))
    while block.more():
        etype = block.u16()
        exts.setdefault(etype, block.vec(2))
    return exts


def _alpn_list(data: bytes) -> list[str]:
    r = _Reader(_Reader(data).vec(2))
    out = []
    while r.more():
        out.append(r.vec(1).decode("ascii", "replace"))
    return out


def parse_client_hello(body: bytes) -> dict[str, Any]:
    """Fields of a ClientHello handshake body (after the 4-byte handshake header)."""
    r = _Reader(body)
    legacy = r.u16()
    r.take(32)
    r.vec(1)  # session id
    suites = r.vec(2)
    r.vec(1)  # compression methods
    exts = _extensions(r)
    sni = None
    if _EXT_SNI in exts:
        names = _Reader(_Reader(exts[_EXT_SNI]).vec(2))
        while names.more():
            kind, name = names.u8(), names.vec(2)
            if kind == 0:
                sni = name.decode("ascii", "replace").lower()
                break
    alpn = _alpn_list(exts[_EXT_ALPN]) if _EXT_ALPN in exts else []
    if _EXT_VERSIONS in exts:
        vr = _Reader(_Reader(exts[_EXT_VERSIONS]).vec(1))
        versions = []
        while vr.more():
            v = vr.u16()
            if not _grease(v):
                versions.append(version_name(v))
    else:
        versions = [version_name(legacy)]
    return {
        "sni": sni,
        "alpn": alpn,
        "offered_versions": versions,
        "legacy_version": version_name(legacy),
        "cipher_suites": len(suites) // 2,
    }


def parse_server_hello(body: bytes) -> dict[str, Any]:
    """Fields of a ServerHello body: the negotiated version, cipher and ALPN."""
    r = _Reader(body)
    legacy = r.u16()
    random = r.take(32)
    r.vec(1)
    cipher = r.u16()
    r.u8()
    exts = _extensions(r)
    version = legacy
    if _EXT_VERSIONS in exts and len(exts[_EXT_VERSIONS]) == 2:
        version = int.from_bytes(exts[_EXT_VERSIONS], "big")
    alpn = _alpn_list(exts[_EXT_ALPN]) if _EXT_ALPN in exts else []
    return {
        "version": version_name(version),
        "legacy_version": version_name(legacy),
        "cipher": f"0x{cipher:04x}",
        "alpn": alpn[0] if alpn else None,
        "hello_retry": random == _HRR_RANDOM,
    }


class TlsParser(StreamParser):
    """Reassembles handshake records until each side's hello, then counts only."""

    app_proto = APP_PROTO
    max_buffer = 5 + _MAX_RECORD
    oversize_anomaly = "oversized-record"

    def __init__(self) -> None:
        super().__init__()
        self._hs = (bytearray(), bytearray())
        self._hs_start: list[int | None] = [None, None]
        self.client: dict[str, Any] = {}
        self.server: dict[str, Any] = {}
        self.alert: str | None = None

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        d = st.direction
        hs = self._hs[d]
        while not st.stopped and len(st.buf) >= 5:
            buf = st.buf
            ctype, major, length = buf[0], buf[1], int.from_bytes(buf[3:5], "big")
            if major != 3 or length > _MAX_RECORD:
                raise ParseError("bad-record")
            if len(buf) < 5 + length:
                break
            record_start = st.pos
            payload = bytes(buf[5 : 5 + length])
            st.advance(5 + length)
            if ctype == _HANDSHAKE:
                if self._hs_start[d] is None:
                    self._hs_start[d] = record_start
                hs += payload
                self._handshake(st, out)
            elif ctype == _ALERT and len(payload) >= 2:
                level = "fatal" if payload[0] == 2 else "warning"
                desc = ALERTS.get(payload[1], str(payload[1]))
                self.alert = desc
                out.append(L7Event(APP_PROTO, "alert", d, record_start,
                                   {"level": level, "description": desc}, st.pos))
                st.stop()
            elif ctype == _CCS:
                continue
            elif ctype in (_APPDATA, _ALERT):
                st.stop()
            else:
                raise ParseError("bad-record-type")
        if d == TOSERVER and not st.stopped and (st.buf or hs):
            st.hold = self._hs_start[d] if self._hs_start[d] is not None else st.pos
        else:
            st.hold = None

    def _handshake(self, st: DirState, out: list[L7Event]) -> None:
        d = st.direction
        hs = self._hs[d]
        while len(hs) >= 4 and not st.stopped:
            htype, hlen = hs[0], int.from_bytes(hs[1:4], "big")
            if hlen > _MAX_HANDSHAKE:
                raise ParseError("oversized-hello")
            if len(hs) < 4 + hlen:
                if len(hs) > _MAX_HANDSHAKE:
                    raise ParseError("oversized-hello")
                return
            body = bytes(hs[4 : 4 + hlen])
            del hs[: 4 + hlen]
            start = self._hs_start[d] or 0
            if d == TOSERVER and htype == 1:
                self.client = parse_client_hello(body)
                out.append(L7Event(APP_PROTO, "hello", TOSERVER, start, dict(self.client), st.pos))
            elif d == TOCLIENT and htype == 2:
                self.server = parse_server_hello(body)
                out.append(L7Event(APP_PROTO, "server_hello", TOCLIENT, start, dict(self.server), st.pos))
            else:
                raise ParseError("unexpected-handshake")
            hs.clear()
            st.stop()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sni": self.client.get("sni"),
            "alpn": self.client.get("alpn", []),
            "offered_versions": self.client.get("offered_versions", []),
            "version": self.server.get("version"),
            "alpn_selected": self.server.get("alpn"),
        }
        if self.alert:
            out["alert"] = self.alert
        out.update(self._base_summary())
        return out
