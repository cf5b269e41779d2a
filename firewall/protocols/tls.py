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

import dataclasses
from dataclasses import dataclass
from typing import Any

from firewall.protocols.base import TOCLIENT, TOSERVER, EventFields, L7Event, ParseError, Probe, event_fields
from firewall.protocols.stream import DirState, StreamParser

APP_PROTO = "tls"
DEFAULT_PORTS = frozenset({443, 8443, 993, 995, 465, 636, 6443})

_HANDSHAKE, _ALERT, _CCS, _APPDATA = 22, 21, 20, 23
_MAX_RECORD = (1 << 14) + 2048
_MAX_HANDSHAKE = 65536
_MAX_PLAINTEXT = 1 << 14  # a plaintext record (a hello) is at most 2^14 bytes (RFC 8446 5.1)
_MIN_CLIENT_HELLO = 41
#: records a ClientHello may be cut into before it stops looking like one (clients send 1-2; a
#: hello in hundreds of 1-byte records is an evasion, and would cost a re-walk per segment)
_MAX_HELLO_RECORDS = 64  # version, random, empty session id, one suite, one compression method
_HEARTBEAT = 24
#: bytes the identifier may buffer to see a whole ClientHello (one full record plus headers
#: of a few more); a hello still incomplete then is "undecided" (the exception policy)
PROBE_DEPTH = 5 + _MAX_PLAINTEXT + 1024
#: apps whose events can carry TLS hellos: TLS itself and the inner TLS after a switch
_APPS = ("tls", "pgsql", "mysql")
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
    """``0x0303`` -> ``"1.2"``; SSL 3.0 -> ``"ssl3"``; SSL 2.0 -> ``"ssl2"``; else hex."""
    if v == 0x0002:
        return "ssl2"
    if v == 0x0300:
        return "ssl3"
    if 0x0301 <= v <= 0x0304:
        return f"1.{v - 0x0301}"
    return f"0x{v:04x}"


def _grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


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




# -- typed event fields ---------------------------------------------------------------------------

@event_fields(_APPS, "hello")
@dataclass(frozen=True, slots=True)
class TlsHello(EventFields):
    """A ClientHello.  ``offered_versions`` comes from supported_versions (GREASE dropped),
    else the legacy version; ``format`` is ``tls`` or ``sslv2`` (the SSLv2-compatible form)."""

    sni: str | None
    alpn: list[str]
    offered_versions: list[str]
    legacy_version: str
    cipher_suites: int
    format: str = "tls"


@event_fields(_APPS, "server_hello")
@dataclass(frozen=True, slots=True)
class TlsServerHello(EventFields):
    """A ServerHello: ``version`` is the negotiated one (supported_versions for TLS 1.3)."""

    version: str
    legacy_version: str
    cipher: str
    alpn: str | None
    hello_retry: bool


@event_fields(_APPS, "alert")
@dataclass(frozen=True, slots=True)
class TlsAlert(EventFields):
    level: str
    description: str


@event_fields(_APPS, "established")
@dataclass(frozen=True, slots=True)
class TlsEstablished(EventFields):
    """The handshake completed in both directions (see ``TlsParser``): from here on the
    flow is ``encrypted``."""

    version: str | None


# -- hellos ---------------------------------------------------------------------------------------

def _extensions(r: _Reader) -> dict[int, bytes]:
    """The extensions block; it must fill the rest of the message exactly, and no type may
    repeat (RFC 8446 4.2): a duplicate SNI is how a hello says one name to us and another to
    a server that keeps the last one."""
    exts: dict[int, bytes] = {}
    if not r.more():
        return exts
    block = _Reader(r.vec(2))
    if r.more():
        raise ParseError("malformed-hello")
    while block.more():
        etype = block.u16()
        if etype in exts:
            raise ParseError("duplicate-extension")
        exts[etype] = block.vec(2)
    return exts


def _alpn_list(data: bytes) -> list[str]:
    r = _Reader(_Reader(data).vec(2))
    out = []
    while r.more():
        out.append(r.vec(1).decode("ascii", "replace"))
    return out


def parse_client_hello(body: bytes) -> TlsHello:
    """Fields of a ClientHello handshake body (after the 4-byte handshake header).

    Strict about lengths and versions: every vector must fit its parent exactly, the
    legacy version must be SSL 3.0 - TLS 1.2 (3.x), at least one suite and one compression
    method.  The identifier calls this too, so "TLS" means a hello a server would parse."""
    r = _Reader(body)
    legacy = r.u16()
    if legacy >> 8 != 3:
        raise ParseError("malformed-hello")
    r.take(32)
    if len(r.vec(1)) > 32:  # session id
        raise ParseError("malformed-hello")
    suites = r.vec(2)
    if not suites or len(suites) % 2:
        raise ParseError("malformed-hello")
    if not r.vec(1):  # compression methods
        raise ParseError("malformed-hello")
    exts = _extensions(r)
    sni = None
    if _EXT_SNI in exts:
        names = _Reader(_Reader(exts[_EXT_SNI]).vec(2))
        while names.more():
            kind, name = names.u8(), names.vec(2)
            if kind == 0 and sni is None:
                sni = name.decode("ascii", "replace").lower()
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
    return TlsHello(sni, alpn, versions, version_name(legacy), len(suites) // 2)


def sslv2_hello_length(buf: bytes) -> int | None:
    """Total length of the SSLv2-format ClientHello at ``buf[0]`` (2-byte header, high bit
    set), or None when the first bytes cannot start one."""
    if buf[:1] and not buf[0] & 0x80:
        return None
    if len(buf) < 2:
        return 0
    return 2 + (((buf[0] & 0x7F) << 8) | buf[1])


def parse_sslv2_hello(msg: bytes) -> TlsHello:
    """The SSLv2-compatible ClientHello (RFC 5246 E.2; SSL 2.0 itself as version 0x0002).

    Its lengths must add up exactly: 9 header bytes + cipher specs (3 bytes each) + session
    id (0 or 16) + challenge (16-32) == the record length."""
    if len(msg) < 11 or msg[2] != 1:
        raise ParseError("malformed-hello")
    n = len(msg) - 2
    version = int.from_bytes(msg[3:5], "big")
    cs, sid, ch = (int.from_bytes(msg[i : i + 2], "big") for i in (5, 7, 9))
    if version != 0x0002 and version >> 8 != 3:
        raise ParseError("malformed-hello")
    if not cs or cs % 3 or sid not in (0, 16) or not 16 <= ch <= 32 or 9 + cs + sid + ch != n:
        raise ParseError("malformed-hello")
    return TlsHello(None, [], [version_name(version)], version_name(version), cs // 3, "sslv2")


def parse_server_hello(body: bytes) -> TlsServerHello:
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
    return TlsServerHello(version_name(version), version_name(legacy), f"0x{cipher:04x}",
                          alpn[0] if alpn else None, random == _HRR_RANDOM)


def probe_toserver(buf: bytes) -> Probe:
    """TLS only once a complete, consistent ClientHello is here.

    Every record up to the end of the hello must be a handshake record (version 3.x, length
    1..2^14), the first handshake message a ClientHello whose length fits, and the hello must
    parse strictly (``parse_client_hello``).  The SSLv2-compatible form is accepted on the
    same terms.  A few bytes that merely look like a record header are not TLS: they stay
    NEED_MORE until the hello is complete, and NO_MATCH at the first inconsistency."""
    if not buf:
        return Probe.NEED_MORE
    if buf[0] & 0x80:
        if ((buf[0] & 0x7F) << 8) + 2 > PROBE_DEPTH:
            return Probe.NO_MATCH  # an SSLv2 record header announcing more than a hello needs
        total = sslv2_hello_length(buf)
        if not total:
            return Probe.NEED_MORE
        if len(buf) >= 3 and buf[2] != 1:
            return Probe.NO_MATCH
        if len(buf) < total:
            return Probe.NEED_MORE if total <= PROBE_DEPTH else Probe.NO_MATCH
        try:
            parse_sslv2_hello(buf[:total])
        except ParseError:
            return Probe.NO_MATCH
        return Probe.MATCH
    hs = bytearray()
    i = 0
    for _ in range(_MAX_HELLO_RECORDS):
        head = buf[i : i + 5]
        if head[:1] and head[0] != _HANDSHAKE:
            return Probe.NO_MATCH
        if len(head) >= 2 and head[1] != 3:
            return Probe.NO_MATCH
        if len(head) >= 3 and head[2] > 4:
            return Probe.NO_MATCH
        if len(head) < 5:
            return Probe.NEED_MORE
        length = int.from_bytes(head[3:5], "big")
        if not 0 < length <= _MAX_PLAINTEXT:
            return Probe.NO_MATCH
        complete = len(buf) >= i + 5 + length  # this record is all here
        # an incomplete record is only looked at as far as the checks below need: a hello
        # trickling in one byte per segment costs O(1) per segment, not a copy of the record
        hs += buf[i + 5 : i + 5 + (length if complete else max(0, 5 - len(hs)))]
        if not hs:
            return Probe.NEED_MORE
        if hs[0] != 1:
            return Probe.NO_MATCH
        if len(hs) >= 4:
            hlen = int.from_bytes(hs[1:4], "big")
            if not _MIN_CLIENT_HELLO <= hlen <= _MAX_HANDSHAKE:
                return Probe.NO_MATCH
            if len(hs) >= 5 and hs[4] != 3:  # legacy_version 3.x
                return Probe.NO_MATCH
        if not complete:
            return Probe.NEED_MORE
        if len(hs) >= 4:
            if len(hs) > 4 + hlen:
                return Probe.NO_MATCH  # the hello must end where its record ends (nothing else is sent)
            if len(hs) == 4 + hlen:
                try:
                    parse_client_hello(bytes(hs[4 : 4 + hlen]))
                except ParseError:
                    return Probe.NO_MATCH
                return Probe.MATCH
        i += 5 + length
    return Probe.NO_MATCH  # a hello cut into more records than any client sends


# -- the parser -----------------------------------------------------------------------------------

class TlsParser(StreamParser):
    """Each side's hello, then the record layer of the whole flow.

    * The ClientHello (TLS records or the SSLv2-compatible form) and the ServerHello are
      parsed; a HelloRetryRequest makes both parsed again (the second ClientHello may name
      another SNI, and is checked like the first).
    * After its hello a direction is walked record by record: only the 5-byte headers are
      read, bodies are skipped by counting.  A record that is not TLS (type outside 20-24,
      version not 3.x, length beyond 2^14 + 2048, application data before the hello, a
      ChangeCipherSpec that is not one byte) is the anomaly ``bad-record``: the flow claimed
      TLS and broke the record layer, and the session hands that to the exception policy.
    * **Completed** (the ``established`` event, and ``encrypted: true`` in the flow record)
      means: a ServerHello that is not a HelloRetryRequest, and from *each* side a protected
      record after its hello - an application-data record (TLS 1.3 sends its encrypted
      handshake that way) or a handshake record after that side's ChangeCipherSpec (the
      encrypted Finished of TLS <= 1.2).  A hello alone, or one side talking, is not.
    """

    app_proto = APP_PROTO
    max_buffer = 5 + _MAX_RECORD
    oversize_anomaly = "oversized-record"

    def __init__(self, app_proto: str = APP_PROTO) -> None:
        super().__init__()
        self.app_proto = app_proto
        self._hs = (bytearray(), bytearray())
        self._hs_start: list[int | None] = [None, None]
        self._hello_done = [False, False]
        self._ccs = [False, False]
        self._protected = [False, False]
        self.established = False
        self.client: TlsHello | None = None
        self.server: TlsServerHello | None = None
        self.alert: str | None = None

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        d = st.direction
        if d == TOSERVER and not self._hello_done[d] and st.pos == 0 and st.buf and st.buf[0] & 0x80:
            self._sslv2_hello(st, out)
        while not st.stopped and not st.skip and len(st.buf) >= 5:
            buf = st.buf
            ctype, major, length = buf[0], buf[1], int.from_bytes(buf[3:5], "big")
            if major != 3 or length > _MAX_RECORD or not _CCS <= ctype <= _HEARTBEAT:
                raise ParseError("bad-record")
            if ctype in (_CCS, _ALERT, _HANDSHAKE) and not length:
                raise ParseError("bad-record")
            record_start = st.pos
            if ctype == _HANDSHAKE and not self._hello_done[d]:
                if len(buf) < 5 + length:
                    break
                if self._hs_start[d] is None:
                    self._hs_start[d] = record_start
                self._hs[d].extend(buf[5 : 5 + length])
                st.advance(5 + length)
                self._handshake(st, out)
                continue
            if not self._hello_done[d] and ctype in (_APPDATA, _HEARTBEAT):
                raise ParseError("bad-record")  # protected data before this side's hello
            if ctype == _CCS:
                if length != 1:
                    raise ParseError("bad-record")
                self._ccs[d] = True
            elif ctype == _ALERT and length == 2 and not self._ccs[d] and not self._protected[d]:
                if len(buf) < 7:
                    break
                level = "fatal" if buf[5] == 2 else "warning"
                desc = ALERTS.get(buf[6], str(buf[6]))
                self.alert = desc
                out.append(L7Event(self.app_proto, "alert", d, record_start, TlsAlert(level, desc),
                                   record_start + 7))
            elif ctype == _APPDATA or (ctype == _HANDSHAKE and self._ccs[d]):
                self._protected[d] = True
            st.advance(5 + length)
            self._maybe_established(d, record_start, st.pos, out)
        if d == TOSERVER and not st.stopped and not self._hello_done[d] and (st.buf or self._hs[d]):
            st.hold = self._hs_start[d] if self._hs_start[d] is not None else st.pos
        else:
            st.hold = None

    def _sslv2_hello(self, st: DirState, out: list[L7Event]) -> None:
        total = sslv2_hello_length(bytes(st.buf[:2]))
        if not total or len(st.buf) < total:
            if total and total > PROBE_DEPTH:
                raise ParseError("malformed-hello")
            st.hold = 0
            return
        self.client = parse_sslv2_hello(bytes(st.buf[:total]))
        st.advance(total)
        self._hello_done[TOSERVER] = True
        out.append(L7Event(self.app_proto, "hello", TOSERVER, 0, self.client, total))

    def _handshake(self, st: DirState, out: list[L7Event]) -> None:
        d = st.direction
        hs = self._hs[d]
        if len(hs) < 4:
            return
        htype, hlen = hs[0], int.from_bytes(hs[1:4], "big")
        if hlen > _MAX_HANDSHAKE:
            raise ParseError("oversized-hello")
        if len(hs) < 4 + hlen:
            return
        body = bytes(hs[4 : 4 + hlen])
        hs.clear()
        start = self._hs_start[d] or 0
        self._hs_start[d] = None
        if d == TOSERVER and htype == 1:
            self.client = parse_client_hello(body)
            self._hello_done[d] = True
            out.append(L7Event(self.app_proto, "hello", TOSERVER, start, self.client, st.pos))
        elif d == TOCLIENT and htype == 2:
            self.server = parse_server_hello(body)
            out.append(L7Event(self.app_proto, "server_hello", TOCLIENT, start, self.server, st.pos))
            if self.server.hello_retry:
                # HelloRetryRequest: another ClientHello and ServerHello follow in the clear
                self._hello_done = [False, False]
                self._ccs = [False, False]
            else:
                self._hello_done[d] = True
        else:
            raise ParseError("unexpected-handshake")

    def _maybe_established(self, d: int, start: int, end: int, out: list[L7Event]) -> None:
        if (not self.established and self._protected[TOSERVER] and self._protected[TOCLIENT]
                and self.server is not None and self._hello_done[TOCLIENT]):
            self.established = True
            out.append(L7Event(self.app_proto, "established", d, start,
                               TlsEstablished(self.server.version), end))

    def summary(self) -> dict[str, Any]:
        c, s = self.client, self.server
        out: dict[str, Any] = {
            "sni": c.sni if c else None,
            "alpn": c.alpn if c else [],
            "offered_versions": c.offered_versions if c else [],
            "version": s.version if s else None,
            "alpn_selected": s.alpn if s else None,
            "established": self.established,
        }
        if c is not None and c.format != "tls":
            out["hello_format"] = c.format
        if self.alert:
            out["alert"] = self.alert
        out.update(self._base_summary())
        return out


class InnerTls:
    """The TLS stream inside another protocol after a switch (PostgreSQL SSLRequest, MySQL
    SSL): events carry the outer ``app_proto``, offsets of the outer streams, and anomalies
    are named ``tls:<anomaly>`` so the session knows the record layer broke."""

    def __init__(self, app_proto: str, bases: tuple[int, int]) -> None:
        self.parser = TlsParser(app_proto)
        self.bases = bases

    def feed(self, data: bytes, d: int) -> list[L7Event]:
        base = self.bases[d]
        return [dataclasses.replace(
            e, offset=e.offset + base, end=e.end + base if e.end >= 0 else -1,
            anomaly=f"tls:{e.anomaly}" if e.anomaly else None) for e in self.parser.feed(data, d)]

    def hold_from(self, d: int) -> int | None:
        h = self.parser.hold_from(d)
        return None if h is None else h + self.bases[d]

    @property
    def established(self) -> bool:
        return self.parser.established
