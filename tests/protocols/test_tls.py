"""TLS hellos: reassembly across records and segments, GREASE, bounds, opacity."""

from __future__ import annotations

import struct

import pytest

from firewall.protocols import TOCLIENT, TOSERVER, make_parser
from firewall.protocols.tls import TlsParser
from tests.protocols.replay import bytewise, load, run, split_at


def ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!HH", etype, len(body)) + body


def client_hello(sni="pay.example", alpn=(b"h2",), versions=(0x0304, 0x0303), pad=0) -> bytes:
    exts = b""
    name = sni.encode()
    exts += ext(0, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name)
    protos = b"".join(bytes([len(p)]) + p for p in alpn)
    exts += ext(16, struct.pack("!H", len(protos)) + protos)
    if versions is not None:
        vs = b"".join(struct.pack("!H", v) for v in versions)
        exts += ext(43, bytes([len(vs)]) + vs)
    if pad:
        exts += ext(21, b"\0" * pad)
    body = struct.pack("!H", 0x0303) + b"r" * 32 + b"\x00" + struct.pack("!H", 4) + b"\x13\x01\x13\x02" + b"\x01\x00"
    body += struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(handshake), size):
        frag = handshake[i : i + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(frag)) + frag
    return out


def test_client_hello_spanning_several_records():
    hello = client_hello(pad=3000)
    stream = records(hello, 700)
    assert stream.count(b"\x16\x03\x01") >= 5
    events, summary = run("tls", [(TOSERVER, stream)])
    (ev,) = events
    assert ev.fields["sni"] == "pay.example" and ev.fields["alpn"] == ["h2"]
    assert ev.fields["offered_versions"] == ["1.3", "1.2"] and ev.offset == 0 and ev.end == len(stream)
    assert run("tls", bytewise([(TOSERVER, stream)])) == (events, summary)
    for k in range(1, len(stream), 37):
        assert run("tls", split_at([(TOSERVER, stream)], k)) == (events, summary)


def test_grease_versions_are_ignored():
    (ev,), _ = run("tls", [(TOSERVER, records(client_hello(versions=(0x7A7A, 0x0304, 0x0303)), 16384))])
    assert ev.fields["offered_versions"] == ["1.3", "1.2"]


def test_old_client_offers_only_legacy_version():
    hello = client_hello(versions=None)  # no supported_versions extension: TLS <= 1.2 client
    (ev,), _ = run("tls", [(TOSERVER, records(hello, 16384))])
    assert ev.fields["offered_versions"] == ["1.2"] and ev.fields["legacy_version"] == "1.2"


def test_hold_until_the_hello_is_complete_then_opaque():
    stream = records(client_hello(pad=2000), 500)
    p = TlsParser()
    p.feed(stream[:-1], TOSERVER)
    assert p.hold_from(TOSERVER) == 0
    (ev,) = p.feed(stream[-1:], TOSERVER)
    assert ev.kind == "hello" and p.hold_from(TOSERVER) is None
    assert p.feed(b"\x17\x03\x03\x00\x05hello" * 1000, TOSERVER) == []


def test_after_server_hello_everything_is_counted_only():
    segs = load("tls13_openssl")["connections"][0]
    p = make_parser("tls")
    events = [e for d, b in segs for e in p.feed(b, d)]
    assert [e.kind for e in events] == ["hello", "server_hello", "established"]
    assert p.feed(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00", TOCLIENT) == []  # not parsed again
    assert p.summary()["alpn_selected"] is None  # TLS 1.3 sends ALPN encrypted


def test_oversized_and_malformed_hellos_are_anomalies():
    huge = b"\x01" + (70_000).to_bytes(3, "big")
    events, _ = run("tls", [(TOSERVER, records(huge + b"\0" * 20, 16384))])
    assert [e.anomaly for e in events] == ["oversized-hello"]
    events, _ = run("tls", [(TOSERVER, records(b"\x01\x00\x00\x05\x03\x03abc", 16384))])
    assert [e.anomaly for e in events] == ["malformed-hello"]
    events, _ = run("tls", [(TOSERVER, b"\x16\x03\x01\xff\xff")])
    assert [e.anomaly for e in events] == ["bad-record"]
    events, _ = run("tls", [(TOSERVER, records(b"\x0b\x00\x00\x00", 100))])
    assert [e.anomaly for e in events] == ["unexpected-handshake"]


# -- through the session: what a broken record layer, a completed handshake and a switch mean ------
SESSION_POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: srv, namespace: default}
spec:
  selector: {matchLabels: {app: srv}}
  mode: MODE
  default: deny
  ingress:
    - name: raw
      ports: [{port: 443}, {port: 5432}]
      action: allow
    - name: pg-read-only
      ports: [{port: 5433}]
      appProto: pgsql
      sql: {verbs: [SELECT]}
      action: allow
  dlp:
    - name: no-pan-in
      packs: [payment_cards]
      direction: ingress
      action: block
"""


def _golden(name: str) -> bytes:
    from pathlib import Path

    return (Path(__file__).parent / "data" / name).read_bytes()


@pytest.fixture(scope="module")
def dlp_engine():
    from firewall.dlp.engine import DlpEngine

    return DlpEngine.load()


def make_session(tmp_path, dlp_engine, port: int, mode: str = "protect"):
    from firewall.datapath.session import Inspection, Session
    from firewall.identity.identity import Identity
    from firewall.policy.engine import PolicySet

    p = tmp_path / f"p-{mode}.yaml"
    p.write_text(SESSION_POLICY.replace("MODE", mode))
    events: list = []
    local = Identity.make("10.0.0.2", "default", "srv-0", {"app": "srv"})
    insp = Inspection(policy=PolicySet.load([str(p)]), dlp=dlp_engine, local=local, emit=events.append)
    s = Session(insp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", port))
    assert s.open()
    return s, events


def test_session_encrypted_only_after_the_handshake_completes(tmp_path, dlp_engine):
    s, _ = make_session(tmp_path, dlp_engine, 443)
    client, server = _golden("openssl_tls1_2_client.bin"), _golden("openssl_tls1_2_server.bin")
    hello_len = 5 + int.from_bytes(client[3:5], "big")
    out, stop = s.feed(TOSERVER, client[:hello_len])
    assert stop is None and out == client[:hello_len] and s.app_proto == "tls" and not s.encrypted
    s.feed(TOCLIENT, server[:100])
    assert not s.encrypted  # a ServerHello is not a completed handshake
    s.feed(TOSERVER, client[hello_len:])
    s.feed(TOCLIENT, server[100:])
    assert s.encrypted and s.record()["encrypted"] is True and s.record()["l7"]["established"] is True


@pytest.mark.parametrize("mode,refused", [("protect", True), ("monitor", False), ("learn", False)])
def test_session_broken_record_layer_goes_to_the_exception_policy(tmp_path, dlp_engine, mode, refused):
    s, events = make_session(tmp_path, dlp_engine, 443, mode)
    hello = _golden("openssl_tls1_3_client.bin")
    hello = hello[: 5 + int.from_bytes(hello[3:5], "big")]
    s.feed(TOSERVER, hello)
    out, stop = s.feed(TOSERVER, b"plain text, no record\r\n")
    alerts = [e for e in events if e["event_type"] == "alert" and e["alert"]["category"] == "inspection"]
    assert [a["alert"]["signature"] for a in alerts] == ["inspection:parse:tls:bad-record"]
    assert alerts[0]["inspection"]["action"] == ("refuse" if refused else "forward")
    if refused:
        assert stop is not None and out == b"" and s.verdict == "deny"
    else:
        assert stop is None and out == b"plain text, no record\r\n"


def server_hello(random: bytes, version: int = 0x0304) -> bytes:
    exts = ext(43, struct.pack("!H", version))
    body = struct.pack("!H", 0x0303) + random + b"\x00" + b"\x13\x01" + b"\x00"
    body += struct.pack("!H", len(exts)) + exts
    return b"\x02" + len(body).to_bytes(3, "big") + body


def test_hello_retry_request_makes_both_hellos_parsed_again():
    """After a HelloRetryRequest the second ClientHello is a new hello (its SNI is checked too)."""
    from firewall.protocols.tls import _HRR_RANDOM

    p = TlsParser()
    events = p.feed(records(client_hello(sni="allowed.example"), 16384), TOSERVER)
    events += p.feed(records(server_hello(_HRR_RANDOM), 16384) + b"\x14\x03\x03\x00\x01\x01", TOCLIENT)
    events += p.feed(b"\x14\x03\x03\x00\x01\x01" + records(client_hello(sni="other.example"), 16384), TOSERVER)
    events += p.feed(records(server_hello(b"s" * 32), 16384) + b"\x17\x03\x03\x00\x05fin..", TOCLIENT)
    assert not p.established  # the client has not sent a protected record yet
    events += p.feed(b"\x17\x03\x03\x00\x05fin..", TOSERVER)
    assert [(e.kind, e.fields.get("sni"), e.fields.get("hello_retry")) for e in events] == [
        ("hello", "allowed.example", None), ("server_hello", None, True), ("hello", "other.example", None),
        ("server_hello", None, False), ("established", None, None)]


def test_record_layer_checks_after_the_hellos():
    hello = records(client_hello(), 16384)
    for bad in (b"\x63\x03\x03\x00\x01x", b"\x17\x02\x00\x00\x01x", b"\x17\x03\x03\x50\x00", b"\x14\x03\x03\x00\x02\x01\x01"):
        p = TlsParser()
        p.feed(hello, TOSERVER)
        (ev,) = p.feed(bad, TOSERVER)
        assert ev.anomaly == "bad-record" and ev.offset == len(hello), bad
    # the server may not send application data before its hello
    p = TlsParser()
    p.feed(hello, TOSERVER)
    (ev,) = p.feed(b"\x17\x03\x03\x00\x05hello", TOCLIENT)
    assert ev.anomaly == "bad-record" and ev.offset == 0
    # big application-data records are skipped by counting, whatever the segmentation
    p = TlsParser()
    p.feed(hello, TOSERVER)
    data = (b"\x17\x03\x03\x40\x00" + b"\xaa" * 0x4000) * 4
    assert [e for k in range(0, len(data), 777) for e in p.feed(data[k : k + 777], TOSERVER)] == []
