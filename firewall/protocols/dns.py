"""DNS over UDP (one message per datagram) and TCP (2-byte length framing).

On TCP a malformed message is one ``anomaly`` event and parsing goes on with the
next message (the length prefix still frames the stream), so nothing after a bad
message is relayed unparsed; the session decides what the anomaly means.

``parse_message`` turns one message into a ``query`` or ``answer`` event with
the question, the response code and the answer records, so policy can match
query names and the FQDN cache can learn which addresses a name resolved to.
Names are decompressed with a bounded number of pointer jumps (a pointer loop
is ``malformed-dns``, never a hang).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from firewall.protocols.base import TOSERVER, L7Event, ParseError, Probe
from firewall.protocols.stream import DirState, StreamParser

APP_PROTO = "dns"
DEFAULT_PORTS = frozenset({53, 5353})

TYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY",
    64: "SVCB", 65: "HTTPS", 99: "SPF", 252: "AXFR", 251: "IXFR", 255: "ANY", 257: "CAA",
}
RCODES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE",
}
MAX_ANSWERS = 32
MAX_SUMMARY_QUERIES = 16


def _name(msg: bytes, i: int) -> tuple[str, int]:
    """Decode a (possibly compressed) name at ``i``; returns (name, offset after it)."""
    labels: list[str] = []
    end = -1
    jumps = 0
    total = 0
    while True:
        if i >= len(msg):
            raise ParseError("malformed-dns")
        n = msg[i]
        if n & 0xC0 == 0xC0:
            if i + 1 >= len(msg):
                raise ParseError("malformed-dns")
            if end < 0:
                end = i + 2
            jumps += 1
            if jumps > 16:
                raise ParseError("malformed-dns")
            i = ((n & 0x3F) << 8) | msg[i + 1]
            continue
        if n & 0xC0:
            raise ParseError("malformed-dns")
        if n == 0:
            i += 1
            break
        label = msg[i + 1 : i + 1 + n]
        if len(label) != n:
            raise ParseError("malformed-dns")
        total += n + 1
        if total > 255:
            raise ParseError("malformed-dns")
        labels.append(label.decode("ascii", "backslashreplace"))
        i += 1 + n
    # no trailing dot, as EVE's rrname and policy fqdn patterns write names
    return ".".join(labels) if labels else ".", (end if end >= 0 else i)


def _u16(msg: bytes, i: int) -> int:
    if i + 2 > len(msg):
        raise ParseError("malformed-dns")
    return (msg[i] << 8) | msg[i + 1]


def _rdata(msg: bytes, rtype: int, start: int, length: int) -> str:
    data = msg[start : start + length]
    if rtype == 1 and length == 4:
        return str(ipaddress.IPv4Address(data))
    if rtype == 28 and length == 16:
        return str(ipaddress.IPv6Address(data))
    if rtype in (2, 5, 12, 39):
        return _name(msg, start)[0]
    if rtype == 15 and length >= 3:
        return f"{_u16(msg, start)} {_name(msg, start + 2)[0]}"
    if rtype == 33 and length >= 7:
        prio, weight, port = _u16(msg, start), _u16(msg, start + 2), _u16(msg, start + 4)
        return f"{prio} {weight} {port} {_name(msg, start + 6)[0]}"
    if rtype == 16:
        parts, j = [], 0
        while j < len(data):
            n = data[j]
            parts.append(data[j + 1 : j + 1 + n].decode("utf-8", "replace"))
            j += 1 + n
        return " ".join(parts)[:256]
    if rtype == 6:
        mname, j = _name(msg, start)
        rname, j = _name(msg, j)
        return f"{mname} {rname}"
    return data[:32].hex()


def parse(msg: bytes) -> dict[str, Any]:
    """Fields of one DNS message; raises ``ParseError('malformed-dns')``."""
    if len(msg) < 12:
        raise ParseError("malformed-dns")
    ident, flags = _u16(msg, 0), _u16(msg, 2)
    qd, an = _u16(msg, 4), _u16(msg, 6)
    i = 12
    qname, qtype = None, None
    for k in range(qd):
        name, i = _name(msg, i)
        t = _u16(msg, i)
        _u16(msg, i + 2)
        i += 4
        if k == 0:
            qname, qtype = name, TYPES.get(t, f"TYPE{t}")
    answers: list[dict[str, Any]] = []
    for _ in range(an):
        name, i = _name(msg, i)
        rtype, ttl, rdlen = _u16(msg, i), int.from_bytes(msg[i + 4 : i + 8], "big"), _u16(msg, i + 8)
        i += 10
        if i + rdlen > len(msg):
            raise ParseError("malformed-dns")
        if len(answers) < MAX_ANSWERS:
            answers.append({"name": name, "type": TYPES.get(rtype, f"TYPE{rtype}"),
                            "data": _rdata(msg, rtype, i, rdlen), "ttl": ttl})
        i += rdlen
    rcode = flags & 0x0F
    return {
        "id": ident,
        "qname": qname,
        "qtype": qtype,
        "qdcount": qd,
        "ancount": an,
        "nscount": _u16(msg, 8),
        "arcount": _u16(msg, 10),
        "opcode": (flags >> 11) & 0x0F,
        "rcode": RCODES.get(rcode, str(rcode)),
        "answers": answers,
        "response": bool(flags & 0x8000),
    }


def query_key(f: dict[str, Any]) -> tuple:
    """What ties an answer to its query: ID and question (case-insensitive name, type)."""
    return (f.get("id"), str(f.get("qname") or "").lower().rstrip("."), f.get("qtype"))


def query_problem(ev: L7Event) -> str | None:
    """Why a client-to-server message is not one plain query (None: it is).

    Only a standard query (opcode QUERY) with one question and no answer/authority records is
    DNS as a ``qnameSuffix`` rule understands it; anything else - a reply-shaped message, an
    UPDATE or NOTIFY, garbage, several questions, names in other sections - could carry a
    name the check never read."""
    f = ev.fields
    if ev.kind == "anomaly":
        return ev.anomaly or "malformed-dns"
    if ev.kind != "query" or f.get("opcode") != 0:
        return "dns-not-a-query"
    if f.get("qdcount") != 1:
        return "dns-question-count"
    if f.get("ancount") or f.get("nscount"):
        return "dns-records-in-query"
    return None


def answer_addresses(f: dict[str, Any]) -> tuple[list[str], int]:
    """The addresses an answer gives for its own question, and their TTL (the smallest on the
    way): A/AAAA records of the asked name or of a CNAME chain starting at it inside this
    answer.  Records for any other name are ignored (they are how a cache gets poisoned)."""
    if f.get("qdcount") != 1 or f.get("rcode") != "NOERROR" or not f.get("qname"):
        return [], 0
    answers = [a for a in f.get("answers") or [] if isinstance(a, dict)]
    chain = {query_key(f)[1]}
    ttls: list[int] = []
    for _ in range(len(answers)):
        grew = False
        for a in answers:
            if a.get("type") == "CNAME" and str(a.get("name", "")).lower() in chain:
                target = str(a.get("data", "")).lower()
                if target not in chain:
                    chain.add(target)
                    ttls.append(int(a.get("ttl") or 0))
                    grew = True
        if not grew:
            break
    hits = [a for a in answers if a.get("type") in ("A", "AAAA") and str(a.get("name", "")).lower() in chain]
    if not hits:
        return [], 0
    return [str(a["data"]) for a in hits], min([int(a.get("ttl") or 0) for a in hits] + ttls)


def parse_message(datagram: bytes, direction: int, offset: int = 0) -> L7Event:
    """One DNS message (a UDP datagram) -> a ``query``/``answer`` or ``anomaly`` event. Never raises."""
    try:
        fields = parse(bytes(datagram))
    except ParseError as exc:
        return L7Event(APP_PROTO, "anomaly", direction, offset, {}, offset + len(datagram), str(exc))
    except Exception as exc:  # noqa: BLE001 - hostile datagrams must not escape as exceptions
        return L7Event(APP_PROTO, "anomaly", direction, offset, {}, offset + len(datagram),
                       f"parser-error:{type(exc).__name__}")
    kind = "answer" if fields["response"] else "query"
    return L7Event(APP_PROTO, kind, direction, offset, fields, offset + len(datagram))


def probe_toserver(buf: bytes) -> Probe:
    """A length-prefixed standard query: QR=0, one question, no answers, rcode 0."""
    if buf[:1] > b"\x10" or (len(buf) >= 2 and not 17 <= int.from_bytes(buf[:2], "big") <= 4096):
        return Probe.NO_MATCH
    if len(buf) >= 5:
        flags_hi = buf[4]
        if flags_hi & 0x80 or (flags_hi >> 3) & 0x0F not in (0, 4, 5):
            return Probe.NO_MATCH
    if len(buf) >= 6 and buf[5] & 0x0F:
        return Probe.NO_MATCH
    if len(buf) >= 8 and int.from_bytes(buf[6:8], "big") != 1:
        return Probe.NO_MATCH
    if len(buf) >= 10 and buf[8:10] != b"\0\0":
        return Probe.NO_MATCH
    if len(buf) >= 14 and int.from_bytes(buf[12:14], "big") > 8:
        return Probe.NO_MATCH
    if len(buf) >= 15 and buf[14] > 63:
        return Probe.NO_MATCH
    return Probe.MATCH if len(buf) >= 15 else Probe.NEED_MORE


class DnsTcpParser(StreamParser):
    """DNS over TCP: each message is prefixed by its 2-byte length."""

    app_proto = APP_PROTO
    max_buffer = 65537

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[str] = []
        self.answers = 0

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        while len(st.buf) >= 2:
            n = int.from_bytes(st.buf[:2], "big")
            if len(st.buf) < 2 + n:
                break
            ev = parse_message(bytes(st.buf[2 : 2 + n]), st.direction, st.pos)
            ev = L7Event(ev.app_proto, ev.kind, ev.direction, ev.offset, ev.fields, st.pos + 2 + n, ev.anomaly)
            # the length prefix still frames the stream after a malformed message: report it
            # and go on with the next one (never stop parsing and relay the rest unseen)
            if ev.anomaly:
                self.anomalies.append(ev.anomaly)
            else:
                self.note(ev)
            out.append(ev)
            st.advance(2 + n)
        st.hold = st.pos if st.direction == TOSERVER and st.buf else None

    def note(self, ev: L7Event) -> None:
        """Account one event in the summary (also used by the UDP path via ``DnsSummary``)."""
        if ev.kind == "query" and ev.fields.get("qname") and len(self.queries) < MAX_SUMMARY_QUERIES:
            self.queries.append(ev.fields["qname"])
        elif ev.kind == "answer":
            self.answers += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"queries": list(self.queries), "answers": self.answers}
        out.update(self._base_summary())
        return out


class DnsUdpParser(DnsTcpParser):
    """DNS over UDP: every ``feed`` call is one whole datagram (no framing)."""

    def feed(self, data: bytes, direction: int) -> list[L7Event]:
        st = self._dirs[direction]
        ev = parse_message(data, direction, st.pos)
        st.pos += len(data)
        if ev.anomaly:
            self.anomalies.append(ev.anomaly)
        else:
            self.note(ev)
        return [ev]

    def hold_from(self, direction: int) -> int | None:
        return None


__all__ = ["parse_message", "parse", "DnsTcpParser", "DnsUdpParser", "probe_toserver", "query_key",
           "query_problem", "answer_addresses"]
