"""The identifier: right name from the first bytes, ``unknown`` as early as possible."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.protocols import REGISTRY, TOCLIENT, TOSERVER, Identifier, Probe, make_parser
from firewall.protocols.http2 import PREFACE
from tests.protocols.replay import FUZZ_EXAMPLES, load

MYSQL_GREETING = load("mysql_mariadb")["connections"][0][0][1]
_TLS13_CLIENT = (Path(__file__).parent / "data" / "openssl_tls1_3_client.bin").read_bytes()
TLS13_HELLO = _TLS13_CLIENT[: 5 + int.from_bytes(_TLS13_CLIENT[3:5], "big")]  # openssl s_client -tls1_3
BY_NAME = {spec.name: spec for spec in REGISTRY}


def feed_all(ident: Identifier, segs) -> str | None:
    result = None
    for d, data in segs:
        result = ident.feed(data, d)
    return result


def test_registry_is_explicit_and_complete():
    names = [s.name for s in REGISTRY]
    assert names == sorted(set(names), key=names.index)  # no duplicates
    assert set(names) == {"http", "http2", "tls", "ssh", "dns", "redis", "pgsql", "mysql"}
    for spec in REGISTRY:
        assert spec.probe_toserver or spec.probe_toclient
        assert 0 < spec.min_depth <= spec.max_depth
        assert make_parser(spec.name) is not None
    assert make_parser("grpc") is not None and make_parser("unknown") is None
    # one configuration for every parser: options a parser does not take are ignored
    assert make_parser("redis", max_head=1024) is not None
    assert make_parser("http", max_head=1024).max_head == 1024


@pytest.mark.parametrize("data,port,expected", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", 80, "ssh"),  # SSH on the HTTP port is SSH
    (b"GET / HTTP/1.1\r\n", 22, "http"),
    (b"GET http://example.com/ HTTP/1.1\r\n", 3128, "http"),
    (b"CONNECT example.com:443 HTTP/1.1\r\n", 3128, "http"),
    (b"OPTIONS * HTTP/1.1\r\n", 1, "http"),
    (PREFACE, 80, "http2"),
    (TLS13_HELLO, 5432, "tls"),  # a complete ClientHello (openssl s_client -tls1_3)
    (b"*1\r\n$4\r\nPING\r\n", 80, "redis"),
    (bytes.fromhex("0000000804d2162f"), 80, "pgsql"),
    (bytes.fromhex("0000002900030000") + b"user\0postgres\0\0", 1, "pgsql"),
    (bytes.fromhex("001d1234012000010000000000000776657273696f6e0462696e640000100003"), 53, "dns"),
])
def test_client_first_protocols(data, port, expected):
    assert feed_all(Identifier(port), [(TOSERVER, data)]) == expected


def test_server_first_protocols():
    assert feed_all(Identifier(3306), [(TOCLIENT, MYSQL_GREETING)]) == "mysql"
    assert feed_all(Identifier(1234), [(TOCLIENT, MYSQL_GREETING)]) == "mysql"
    assert feed_all(Identifier(443), [(TOCLIENT, b"SSH-2.0-dropbear\r\n")]) == "ssh"
    # a client speaking first rules the server-first MySQL out
    assert feed_all(Identifier(3306), [(TOSERVER, b"\xfe\xfe")]) == "unknown"


# (a bare word such as b"HELLO" may still become an HTTP method: any token is one)
@pytest.mark.parametrize("first", [b"\x20\x02\x03", b"Q\r", b"HELLO\r\n", b"\xff", b"220 smtp ready\r\n", b"{"])
def test_unknown_as_soon_as_nothing_can_match(first):
    ident = Identifier(80)
    # decided at the first byte that rules everything out, never waiting for more
    decided_at = None
    for i in range(len(first)):
        if ident.feed(first[i : i + 1], TOSERVER) is not None:
            decided_at = i
            break
    assert ident.result == "unknown"
    # at once, or at the first byte no method token can hold
    assert decided_at is not None and (decided_at <= 3 or first[decided_at:decided_at + 1] == b"\r")


def test_server_banner_of_unknown_protocol_waits_for_the_client():
    # RFC 4253 4.2: an SSH server may send text lines before its banner, so a server-first
    # text banner leaves SSH possible until the client speaks (the session forwards server
    # bytes while identifying: Identifier.holds); a client that is not SSH decides at once.
    ident = Identifier(25)
    assert ident.feed(b"220 mail.example ESMTP\r\n", TOCLIENT) is None
    assert not Identifier.holds(TOCLIENT) and Identifier.holds(TOSERVER)
    assert ident.feed(b"EHLO x\r\n", TOSERVER) == "unknown" and ident.undecided == ()
    # a binary server banner cannot be an SSH preamble
    assert Identifier(25).feed(b"\x01\x02\x03\x04\x05\x06\x07\x08\x09", TOCLIENT) == "unknown"


def test_need_more_while_a_prefix_is_still_possible():
    ident = Identifier(80)
    assert ident.feed(b"GE", TOSERVER) is None
    assert ident.feed(b"T ", TOSERVER) is None
    assert ident.feed(b"/x", TOSERVER) == "http"
    assert ident.feed(b"anything", TOCLIENT) == "http"  # the answer is sticky


def test_h2_server_settings_before_client_preface():
    ident = Identifier(8080)
    settings_frame = bytes.fromhex("000006040000000000") + bytes.fromhex("000300000064")
    assert ident.feed(settings_frame, TOCLIENT) is None
    assert ident.feed(PREFACE, TOSERVER) == "http2"


def test_port_hint_breaks_ties():
    from firewall.protocols import ProtocolSpec

    http = BY_NAME["http"]
    dup = ProtocolSpec("http-alt", frozenset({18080}), http.probe_toserver, None, 5, 2048, http.parser)
    ident = Identifier(18080)
    ident._alive = [http, dup]  # two protocols matching the same bytes
    assert ident.feed(b"GET / HTTP/1.1\r\n", TOSERVER) == "http-alt"
    ident = Identifier(80)
    ident._alive = [http, dup]
    assert ident.feed(b"GET / HTTP/1.1\r\n", TOSERVER) == "http"


def test_max_depth_bounds_the_wait():
    ident = Identifier(80, max_depth=64)
    # a CONNECT line is HTTP only once " HTTP/1.x" arrives; a never-ending one is given up on
    assert ident.feed(b"CONNECT " + b"a" * 40, TOSERVER) is None
    assert ident.feed(b"a" * 40, TOSERVER) == "unknown"


def test_eof_decides():
    ident = Identifier(80)
    assert ident.feed(b"GE", TOSERVER) is None
    assert ident.eof(TOSERVER) == "unknown"


def test_probes_answer_need_more_on_empty_input_or_no_match():
    for spec in REGISTRY:
        for probe in (spec.probe_toserver, spec.probe_toclient):
            if probe is not None:
                assert probe(b"") in (Probe.NEED_MORE, Probe.NO_MATCH)


@settings(max_examples=FUZZ_EXAMPLES * 5, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([TOSERVER, TOCLIENT]), st.binary(min_size=1, max_size=300)),
                max_size=20),
       st.integers(0, 65535), st.integers(1, 600))
def test_identifier_never_raises_and_decides_within_max_depth(segs, port, max_depth):
    ident = Identifier(port, max_depth)
    sent = [0, 0]
    for d, data in segs:
        result = ident.feed(data, d)
        sent[d] += len(data)
        assert result is None or isinstance(result, str)
        if max(sent) >= max_depth:
            assert result is not None
    if ident.result is not None:
        assert ident.result == "unknown" or make_parser(ident.result) is not None


@pytest.mark.parametrize("line", [b"SUBSCRIBE /events HTTP/1.1\r\n", b"FOO-BAR_2 /x HTTP/1.1\r\n",
                                  b"purge /cache HTTP/1.1\r\n", b"CUSTOM example.org:443 HTTP/1.1\r\n"])
def test_http_by_request_line_grammar_not_a_method_list(line):
    ident = Identifier(9999)
    assert ident.feed(line, TOSERVER) == "http"


# -- issue 15, item 3: identification that cannot be steered ---------------------------------------
def _hello_records(hello_hs: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(hello_hs), size):
        frag = hello_hs[i : i + size]
        out += b"\x16\x03\x01" + len(frag).to_bytes(2, "big") + frag
    return out


@pytest.mark.parametrize("header", [
    b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x00", b"\x16\x03\x01\x00\x05",
    b"\x16\x03\x01\x00\x2a\x01", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    TLS13_HELLO[:40], TLS13_HELLO[:200],
])
def test_a_prefix_of_a_record_header_is_never_tls(header):
    # alone: undecided (a hello may follow); followed by plaintext: not TLS, at once
    assert Identifier(443).feed(header, TOSERVER) is None
    ident = Identifier(443)
    result = feed_all(ident, [(TOSERVER, header), (TOSERVER, b"card=4111111111111111\r\n" * 3)])
    assert result != "tls"


def test_every_prefix_of_a_real_hello_waits_and_the_whole_one_is_tls():
    for k in range(1, len(TLS13_HELLO)):
        assert Identifier(1234).feed(TLS13_HELLO[:k], TOSERVER) is None, k
    assert Identifier(1234).feed(TLS13_HELLO, TOSERVER) == "tls"
    # byte by byte and spread over several records (fragmented handshake) as well
    ident = Identifier(1234)
    assert feed_all(ident, [(TOSERVER, TLS13_HELLO[i : i + 1]) for i in range(len(TLS13_HELLO))]) == "tls"
    assert Identifier(1234).feed(_hello_records(TLS13_HELLO[5:], 50), TOSERVER) == "tls"


@pytest.mark.parametrize("offset,delta", [
    (3, 1), (3, -1),  # record length
    (6, 1), (8, -1),  # handshake length
    (9, 2),  # legacy version 3.3 -> 3.5 is fine for a record, not for a hello: still parsed
    (43, 40),  # session id length beyond 32
])
def test_inconsistent_hellos_are_not_tls(offset, delta):
    bad = bytearray(TLS13_HELLO)
    bad[offset] = (bad[offset] + delta) % 256
    if offset == 9:
        bad[offset] = 0x05
        bad[offset - 1] = 0x04  # legacy_version 0x0405: not 3.x
    result = feed_all(Identifier(443), [(TOSERVER, bytes(bad)), (TOSERVER, b"\0" * 64)])
    assert result != "tls"


def test_duplicate_sni_extension_is_not_tls():
    import struct

    name = b"allowed.example"
    sni = struct.pack("!HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    body = struct.pack("!H", 0x0303) + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    exts = sni + sni
    body += struct.pack("!H", len(exts)) + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    assert Identifier(443).feed(_hello_records(hs, 16384), TOSERVER) != "tls"
    exts = sni
    body = body[: -len(sni) * 2 - 2] + struct.pack("!H", len(exts)) + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    assert Identifier(443).feed(_hello_records(hs, 16384), TOSERVER) == "tls"


def _sslv2(version=0x0301, ciphers=b"\x00\x00\x2f\x00\x00\x35", sid=b"", challenge=b"c" * 16, fix=0) -> bytes:
    import struct

    body = b"\x01" + struct.pack("!HHHH", version, len(ciphers), len(sid), len(challenge)) + ciphers + sid + challenge
    return struct.pack("!H", 0x8000 | (len(body) + fix)) + body


def test_sslv2_compatible_hello_is_tls_and_inconsistent_ones_are_not():
    assert Identifier(443).feed(_sslv2(), TOSERVER) == "tls"
    assert Identifier(443).feed(_sslv2(0x0303, sid=b"s" * 16, challenge=b"c" * 32), TOSERVER) == "tls"
    assert Identifier(443).feed(_sslv2(0x0002), TOSERVER) == "tls"  # SSL 2.0: identified, ranks below any minVersion
    assert feed_all(Identifier(443), [(TOSERVER, _sslv2(fix=-1)), (TOSERVER, b"\0" * 8)]) != "tls"
    assert feed_all(Identifier(443), [(TOSERVER, _sslv2(ciphers=b"\x00\x2f")), (TOSERVER, b"\0" * 8)]) != "tls"
    assert feed_all(Identifier(443), [(TOSERVER, _sslv2(challenge=b"c" * 8))]) != "tls"
    assert Identifier(443).feed(b"\xff\xfe", TOSERVER) == "unknown"  # no hello is that long: decided at once
    (ev,) = make_parser("tls").feed(_sslv2(0x0303), TOSERVER)
    assert ev.kind == "hello" and ev.fields["format"] == "sslv2" and ev.fields["offered_versions"] == ["1.2"]


@pytest.mark.parametrize("ident", [b"SSH-2.00-x\r\n", b"SSH-1.99-x\r\n", b"SSH-2.0-x\n", b"SSH-1.5-old\r\n",
                                   b"SSH-2.0-x / HTTP/1.1\r\n", b"SSH-"])
@pytest.mark.parametrize("port", [22, 80, 443, 5432])
def test_ssh_by_prefix_from_either_side_on_any_port(ident, port):
    assert Identifier(port).feed(ident, TOSERVER) == "ssh"
    assert Identifier(port).feed(ident, TOCLIENT) == "ssh"
    # RFC 4253 4.2: text lines before the server's ident
    ident_ = Identifier(port)
    assert ident_.feed(b"Welcome\r\nto the jump host\r\n", TOCLIENT) is None
    assert ident_.feed(ident, TOCLIENT) == "ssh"


def test_ssh_parser_accepts_the_odd_spellings():
    p = make_parser("ssh")
    (c,) = p.feed(b"SSH-2.00-evil_client\r\n", TOSERVER)
    (s,) = p.feed(b"banner line\r\nSSH-1.99-srv x\r\n", TOCLIENT)
    assert (c.fields["proto_version"], c.fields["software"]) == ("2.00", "evil_client")
    assert (s.fields["proto_version"], s.fields["software"], s.fields["comments"]) == ("1.99", "srv", "x")


def test_strong_signatures_beat_port_hints():
    assert all(BY_NAME[n].strong for n in ("ssh", "tls", "http2"))
    assert Identifier(80).feed(b"SSH-2.0-x / HTTP/1.1\r\n", TOSERVER) == "ssh"
    assert Identifier(80).feed(TLS13_HELLO, TOSERVER) == "tls"


def test_undecided_at_max_depth_is_recorded():
    # a ClientHello announcing more than the identifier will buffer: undecided, not "unknown"
    big = b"\x01" + (60000).to_bytes(3, "big") + b"\x03\x03" + b"\0" * 59998
    ident = Identifier(443)
    result = feed_all(ident, [(TOSERVER, _hello_records(big, 16384))])
    assert result == "unknown" and ident.undecided == ("tls",)
    # an ordinary unknown protocol is not undecided
    ident = Identifier(443)
    assert ident.feed(b"\x00\x00garbage", TOSERVER) == "unknown" and ident.undecided == ()
    # and a smaller explicit bound applies to every probe
    ident = Identifier(443, max_depth=64)
    assert feed_all(ident, [(TOSERVER, TLS13_HELLO[:64])]) == "unknown" and ident.undecided == ("tls",)


@pytest.mark.parametrize("mode,refused", [("protect", True), ("learn", False)])
def test_session_hands_undecided_identification_to_the_exception_policy(tmp_path, mode, refused):
    from firewall.dlp.engine import DlpEngine
    from tests.protocols.test_tls import make_session

    s, events = make_session(tmp_path, DlpEngine.load(), 443, mode)
    big = b"\x01" + (60000).to_bytes(3, "big") + b"\x03\x03" + b"\0" * 59998
    stop = None
    for i in range(0, len(big), 16384):
        frag = big[i : i + 16384]
        _, stop = s.feed(TOSERVER, b"\x16\x03\x01" + len(frag).to_bytes(2, "big") + frag)
        if stop is not None or s.app_proto != "unknown" or s._ident is None:
            break
    (alert,) = [e for e in events if e.get("alert", {}).get("category") == "inspection"]
    assert alert["alert"]["signature"] == "inspection:identify:undecided:tls"
    assert (stop is not None) is refused and (s.verdict == "deny") is refused


def test_a_server_streaming_text_is_unknown_not_undecided():
    ident = Identifier(9100)
    assert ident.feed(b"ok " * 60000, TOCLIENT) == "unknown" and ident.undecided == ()
    ident = Identifier(9100)
    assert feed_all(ident, [(TOCLIENT, b"line of text\r\n" * 200)]) == "unknown" and ident.undecided == ()


def test_a_hello_in_too_many_records_is_not_tls():
    # clients send a ClientHello in one or two records; hundreds of 1-byte records is an evasion
    # (and would make every segment re-walk the records): not TLS, so DLP reads it as plaintext
    assert Identifier(443).feed(_hello_records(TLS13_HELLO[5:], 1), TOSERVER) != "tls"
    assert Identifier(443).feed(_hello_records(TLS13_HELLO[5:], 8), TOSERVER) == "tls"
