"""The identifier: right name from the first bytes, ``unknown`` as early as possible."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.protocols import REGISTRY, TOCLIENT, TOSERVER, Identifier, Probe, make_parser
from firewall.protocols.http2 import PREFACE
from tests.protocols.replay import FUZZ_EXAMPLES, load

MYSQL_GREETING = load("mysql_mariadb")["connections"][0][0][1]


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
    (bytes.fromhex("16030100f4010000f00303"), 5432, "tls"),
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


def test_server_banner_of_unknown_protocol_is_unknown_at_once():
    assert Identifier(25).feed(b"220 mail.example ESMTP\r\n", TOCLIENT) == "unknown"


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

    dup = ProtocolSpec("http-alt", frozenset({18080}), REGISTRY[1].probe_toserver, None, 5, 2048,
                       REGISTRY[1].parser)
    ident = Identifier(18080)
    ident._alive = [REGISTRY[1], dup]  # two protocols matching the same bytes
    assert ident.feed(b"GET / HTTP/1.1\r\n", TOSERVER) == "http-alt"
    ident = Identifier(80)
    ident._alive = [REGISTRY[1], dup]
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
