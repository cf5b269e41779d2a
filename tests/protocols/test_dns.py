"""DNS messages: UDP datagrams, TCP framing, hostile compression."""

from __future__ import annotations

import struct

from firewall.protocols import TOCLIENT, TOSERVER
from firewall.protocols.dns import parse_message
from tests.protocols.replay import bytewise, load, run


def header(qd=1, an=0, flags=0x0100, ident=0x1234) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, 0, 0)


def qname(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def test_recorded_udp_datagrams():
    segs = load("dns_udp_dnsmasq_dig")["connections"][0]
    q = parse_message(segs[0][1], TOSERVER)
    a = parse_message(segs[1][1], TOCLIENT)
    assert q.kind == "query" and q.fields["qname"] == "api.card-network.example" and q.fields["qtype"] == "AAAA"
    assert a.kind == "answer" and a.fields["answers"][0]["type"] == "AAAA"


def test_compressed_answer_names():
    msg = header(an=2, flags=0x8180) + qname("svc.example") + struct.pack("!HH", 1, 1)
    msg += b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 30, 6) + b"\x03www\xc0\x10"  # CNAME www.example
    msg += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + bytes([10, 0, 0, 7])
    ev = parse_message(msg, TOCLIENT)
    assert ev.fields["rcode"] == "NOERROR"
    assert ev.fields["answers"] == [
        {"name": "svc.example", "type": "CNAME", "data": "www.example", "ttl": 30},
        {"name": "svc.example", "type": "A", "data": "10.0.0.7", "ttl": 30},
    ]


def test_pointer_loop_and_truncation_are_anomalies():
    loop = header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    assert parse_message(loop, TOSERVER).anomaly == "malformed-dns"
    assert parse_message(header()[:7], TOSERVER).anomaly == "malformed-dns"
    truncated = header(an=1, flags=0x8180) + qname("a.example") + struct.pack("!HH", 1, 1) + b"\xc0\x0c\x00"
    assert parse_message(truncated, TOCLIENT).kind == "anomaly"


def test_nxdomain_rcode_name():
    msg = header(flags=0x8183) + qname("nope.example") + struct.pack("!HH", 28, 1)
    ev = parse_message(msg, TOCLIENT)
    assert ev.fields["rcode"] == "NXDOMAIN" and ev.fields["qtype"] == "AAAA" and ev.fields["answers"] == []


def test_tcp_framing_several_messages_per_segment():
    msgs = [header(ident=i) + qname(f"h{i}.example") + struct.pack("!HH", 1, 1) for i in range(3)]
    stream = b"".join(struct.pack("!H", len(m)) + m for m in msgs)
    events, summary = run("dns", [(TOSERVER, stream)])
    assert [e.fields["qname"] for e in events] == ["h0.example", "h1.example", "h2.example"]
    assert events[1].offset == events[0].end and events[2].end == len(stream)
    assert run("dns", bytewise([(TOSERVER, stream)])) == (events, summary)
    assert summary["queries"] == ["h0.example", "h1.example", "h2.example"]


def test_tcp_bad_message_is_an_anomaly():
    stream = struct.pack("!H", 5) + b"\0" * 5
    events, _ = run("dns", [(TOSERVER, stream)])
    assert [e.anomaly for e in events] == ["malformed-dns"]
