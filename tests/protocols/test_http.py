"""HTTP/1.x parser: framing, keep-alive, pipelining, tunnels, bounds and smuggling shapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.protocols import TOCLIENT, TOSERVER, ParseError, make_parser
from firewall.protocols.http import (
    _FAST_REQUEST,
    _FAST_RESPONSE,
    USED_HEADERS,
    HttpParser,
    _parse_head,
    _parse_head_strict,
)
from tests.protocols.replay import FUZZ_EXAMPLES, bytewise, run


def req(method="GET", path="/", headers=(), body=b"", version="1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: shop.example", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def resp(status=200, headers=(), body=b"") -> bytes:
    lines = [f"HTTP/1.1 {status} X", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def events_both_ways(segs, **options):
    whole = run("http", segs, **options)
    assert run("http", bytewise(segs), **options) == whole
    return whole


def test_pipelined_requests_with_bodies_have_exact_boundaries():
    r1 = req("POST", "/v1/charge", ["Content-Length: 5"], b"hello")
    r2 = req("POST", "/v1/refund", ["Transfer-Encoding: chunked"], b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    r3 = req("DELETE", "/v1/card/9")
    events, summary = events_both_ways([(TOSERVER, r1 + r2 + r3)])
    assert [(e.fields["method"], e.fields["path"], e.offset) for e in events] == [
        ("POST", "/v1/charge", 0), ("POST", "/v1/refund", len(r1)), ("DELETE", "/v1/card/9", len(r1 + r2))]
    assert events[0].end == len(r1) and events[0].fields["content_length"] == 5
    assert events[1].fields["chunked"] is True and events[1].end == -1
    assert events[2].end == len(r1 + r2 + r3)
    assert summary["requests"] == 3 and summary["host"] == "shop.example" and summary["path"] == "/v1/charge"


def test_responses_matched_to_requests_in_order():
    segs = [
        (TOSERVER, req("HEAD", "/a") + req("GET", "/b") + req("GET", "/c")),
        (TOCLIENT, resp(200, ["Content-Length: 1000"])  # HEAD: no body despite the length
         + resp(100) + resp(304, ["Content-Length: 7"])  # interim 100, then a 304 without body
         + resp(200, ["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n")),
    ]
    events, summary = events_both_ways(segs)
    statuses = [e.fields["status"] for e in events if e.kind == "response"]
    assert statuses == [200, 100, 304, 200]
    assert summary["responses"] == 3 and summary["statuses"] == {200: 2, 100: 1, 304: 1}


def test_response_until_close_stops_parsing():
    p = HttpParser()
    p.feed(req(), TOSERVER)
    (ev,) = p.feed(resp(200, ["Connection: close"], b"body"), TOCLIENT)
    assert ev.end == -1 and ev.fields["content_length"] is None
    assert p.feed(b"HTTP/1.1 200 looks like a head but is body\r\n\r\n", TOCLIENT) == []


def test_body_skipped_by_counting_not_buffered():
    """A 1 GiB body: a few thousand feed calls, nothing buffered, exact next offset."""
    p = HttpParser()
    size = 1 << 30
    head = req("PUT", "/upload", [f"Content-Length: {size}"])
    (ev,) = p.feed(head, TOSERVER)
    chunk = b"\0" * (256 * 1024)
    for _ in range(size // len(chunk)):
        assert p.feed(chunk, TOSERVER) == []
        assert len(p._dirs[TOSERVER].buf) == 0
    (nxt,) = p.feed(req("GET", "/after"), TOSERVER)
    assert ev.end == len(head) + size == nxt.offset and nxt.fields["path"] == "/after"


def test_large_chunked_download_is_skipped_chunk_by_chunk():
    body = b"".join(b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n" for _ in range(64)) + b"0\r\n\r\n"
    p = HttpParser()
    p.feed(req() + req("GET", "/next"), TOSERVER)
    out = p.feed(resp(200, ["Transfer-Encoding: chunked"], body) + resp(204), TOCLIENT)
    assert [e.fields["status"] for e in out] == [200, 204]
    assert out[1].offset == len(resp(200, ["Transfer-Encoding: chunked"], body))


def test_hold_from_points_at_an_incomplete_request_head():
    p = HttpParser()
    first = req("GET", "/one")
    p.feed(first + b"GET /two HTTP/1.1\r\nHost: x", TOSERVER)
    assert p.hold_from(TOSERVER) == len(first)
    p.feed(b"\r\n\r\n", TOSERVER)
    assert p.hold_from(TOSERVER) is None
    assert p.hold_from(TOCLIENT) is None


@pytest.mark.parametrize("headers,body,anomaly", [
    (["Content-Length: 4", "Transfer-Encoding: chunked"], b"", "smuggling:cl-te"),
    (["Content-Length: 4", "Content-Length: 5"], b"", "smuggling:duplicate-content-length"),
    (["Content-Length: 4, 5"], b"", "smuggling:duplicate-content-length"),
    (["Content-Length: +4"], b"", "smuggling:invalid-content-length"),
    (["Transfer-Encoding: chunked, gzip"], b"", "smuggling:bad-transfer-encoding"),
    (["Transfer-Encoding: xchunked"], b"", "smuggling:bad-transfer-encoding"),
    (["Transfer-Encoding : chunked"], b"", "smuggling:space-before-colon"),
    (["X-A: 1", " folded"], b"", "smuggling:obs-fold"),
    (["Transfer-Encoding: chunked"], b"zz\r\n", "smuggling:invalid-chunk-size"),
    (["Transfer-Encoding: chunked"], b"3\r\nabcX\r\n", "smuggling:bad-chunk-terminator"),
    (["Host: other.example"], b"", "smuggling:duplicate-host"),
])
def test_smuggling_shapes_are_anomalies(headers, body, anomaly):
    data = req("POST", "/", headers, body)
    events, summary = events_both_ways([(TOSERVER, data)])
    assert events[-1].kind == "anomaly" and events[-1].anomaly == anomaly
    assert events[-1].app_proto == "http" and events[-1].direction == TOSERVER
    assert anomaly in summary["anomalies"]


def test_duplicate_equal_content_length_is_tolerated():
    events, _ = run("http", [(TOSERVER, req("POST", "/", ["Content-Length: 3", "Content-Length: 3"], b"abc"))])
    assert [e.kind for e in events] == ["request"]


def test_oversized_head_is_an_anomaly_and_bounded():
    p = make_parser("http", max_head=1024)
    out = []
    for _ in range(100):
        out += p.feed(b"X-Filler: " + b"a" * 100 + b"\r\n" if out or _ else b"GET / HTTP/1.1\r\n", TOSERVER)
    assert [e.anomaly for e in out] == ["oversized-header"]
    assert out[0].offset == 0
    assert len(p._dirs[TOSERVER].buf) == 0  # nothing kept after the anomaly
    assert p.feed(b"more", TOSERVER) == []


def test_head_exactly_at_the_limit_is_accepted():
    head = req("GET", "/", ["X-Pad: " + "p" * 50])
    events, _ = run("http", [(TOSERVER, head)], max_head=len(head))
    assert events[0].kind == "request"
    events, _ = run("http", [(TOSERVER, head)], max_head=len(head) - 1)
    assert events[0].anomaly == "oversized-header"


def test_connect_and_upgrade_become_tunnels_once_accepted():
    p = HttpParser()
    (ev,) = p.feed(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n", TOSERVER)
    assert ev.fields["method"] == "CONNECT" and ev.fields["host"] == "db.example:5432"
    (ok,) = p.feed(resp(200), TOCLIENT)
    assert ok.fields["status"] == 200
    assert p.feed(b"\x16\x03\x01 tunnelled bytes GET / HTTP/1.1\r\n\r\n", TOSERVER) == []
    assert p.feed(b"HTTP/1.1 500 tunnel\r\n\r\n", TOCLIENT) == []

    p = HttpParser()
    (ev,) = p.feed(req("GET", "/ws", ["Upgrade: websocket", "Connection: Upgrade"]), TOSERVER)
    assert ev.fields["upgrade"] == "websocket"
    (sw,) = p.feed(resp(101, ["Upgrade: websocket"]), TOCLIENT)
    assert sw.fields["status"] == 101
    assert p.feed(b"\x81\x05hello", TOCLIENT) == [] and p.feed(b"\x81\x85abcdxxxxx", TOSERVER) == []


def test_declined_upgrade_keeps_parsing_the_requests_that_follow():
    """An Upgrade header must not be a way to hide the next requests from policy."""
    p = HttpParser()
    p.feed(req("GET", "/", ["Upgrade: h2c", "Connection: Upgrade"]), TOSERVER)
    (no,) = p.feed(resp(200, ["Content-Length: 2"], b"ok"), TOCLIENT)
    assert no.fields["status"] == 200
    (second,) = p.feed(req("DELETE", "/admin"), TOSERVER)
    assert second.fields["method"] == "DELETE" and second.fields["path"] == "/admin"


def test_absolute_form_and_content_encoding():
    data = (b"POST http://api.example:8080/v1/x?y=1 HTTP/1.1\r\nHost: API.example:8080\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: 0\r\n\r\n")
    (ev,), _ = run("http", [(TOSERVER, data)])
    assert ev.fields["host"] == "api.example:8080" and ev.fields["path"] == "/v1/x?y=1"
    assert ev.fields["content_encoding"] == "gzip"
    # a Host header that names another server than the absolute-form target: ambiguous
    # (the old parser silently preferred the target; servers differ), refused
    (ev,), _ = run("http", [(TOSERVER, data.replace(b"API.example:8080", b"ignored"))])
    assert ev.kind == "anomaly" and ev.anomaly == "ambiguous:host-mismatch"


def test_bad_lines_are_anomalies_not_exceptions():
    for data in (b"GET /\r\n\r\n", b"GET / HTTP/9\r\n\r\n", b"GET / HTTP/1.1\r\nnocolon\r\n\r\n"):
        events, _ = run("http", [(TOSERVER, data)])
        assert [e.kind for e in events] == ["anomaly"]


def test_leading_empty_lines_between_requests_are_tolerated():
    events, _ = run("http", [(TOSERVER, req("GET", "/a") + b"\r\n" + req("GET", "/b"))])
    assert [e.fields["path"] for e in events] == ["/a", "/b"]
    assert events[1].offset == len(req("GET", "/a")) + 2


def test_methods_paths_summary_is_bounded():
    data = b"".join(req("GET", f"/p{i}") for i in range(50)) + req("GET", "/p0")
    _, summary = run("http", [(TOSERVER, data)])
    assert summary["requests"] == 51 and len(summary["methods_paths"]) == 32
    assert summary["methods_paths"][0] == ["GET", "/p0"]


# -- the fast head path must agree with the strict line-by-line one --------------------------

_NAMES = ["Host", "HOST", "host", "Content-Length", "content-length", "Transfer-Encoding", "Content-Type",
          "Content-Encoding", "Upgrade", "X-A", "User-Agent", "Bad Name", "Host ", "Host\t", "", "X\x00",
          "Caf\xe9", "Content-Length\r"]
_SEPS = [":", ": ", ":\t", " :", ":  "]
_VALUES = st.lists(st.sampled_from(list("ab1 ,\t\r\x00\xe9\xb2/:-") + ["chunked", "gzip", "12"]),
                   max_size=8).map("".join)
_EOLS = ["\r\n", "\n", "\r\r\n"]


@st.composite
def _heads(draw) -> tuple[str, bool]:
    request = draw(st.booleans())
    if request:
        first = draw(st.sampled_from(["GET / HTTP/1.1", "POST /api/items HTTP/1.0", "GET  / HTTP/1.1",
                                      "G(T / HTTP/1.1", "GET /a\rb HTTP/1.1", "GET / HTTP/1.1 x",
                                      "GET http://h/x HTTP/1.1", "GET / HTTP/\xb2.1", "GET / http/1.1",
                                      "CONNECT db:5432 HTTP/1.1", "GET /\x00 HTTP/1.1"]))
    else:
        first = draw(st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.1 200", "HTTP/1.1 200 ", "HTTP/1.0 404  Not found",
                                      "HTTP/1.1 20", "HTTP/1.1 2000 OK", "HTTP/1.1 \xb200 OK", "HTTP/1.1 200 O\rK",
                                      "HTTP/2 200 OK"]))
    lines = [first]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from([" folded", "\tfolded", "nocolon", ":empty-name"])))
        else:
            lines.append(draw(st.sampled_from(_NAMES)) + draw(st.sampled_from(_SEPS)) + draw(_VALUES))
    eol = draw(st.sampled_from(_EOLS))
    text = "".join(ln + (eol if draw(st.integers(0, 4)) else draw(st.sampled_from(_EOLS))) for ln in lines)
    return text + draw(st.sampled_from(["\r\n", "\n"])), request


def _outcome(fn, text: str, request: bool):
    try:
        start, headers = fn(text, request)
    except ParseError as exc:
        return "error", str(exc)
    return start, {k: v for k, v in headers.items() if k in USED_HEADERS}


@settings(max_examples=max(400, FUZZ_EXAMPLES * 20), deadline=None)
@given(_heads())
def test_fast_head_path_agrees_with_the_strict_one(case):
    text, request = case
    assert _outcome(_parse_head, text, request) == _outcome(_parse_head_strict, text, request)


def test_fast_head_path_takes_ordinary_heads():
    """The ordinary shapes (curl, nginx, loadgen) go through the single-match path."""
    for text, request in ((req("POST", "/api/items", ["Content-Length: 3"]).decode(), True),
                          ("GET / HTTP/1.1\nHost: a\n\n", True),
                          (resp(200, ["Content-Length: 3", "Server: nginx"]).decode(), False)):
        assert (_FAST_REQUEST if request else _FAST_RESPONSE).match(text) is not None
        assert _outcome(_parse_head, text, request) == _outcome(_parse_head_strict, text, request)


def test_memoised_heads_give_the_same_events_as_fresh_parsing():
    """A head seen before (kept-alive repeats) yields the same events, and a bad head is
    refused every time it comes (errors are never memoised)."""
    from firewall.protocols import http as http_mod

    segs = [(TOSERVER, req("POST", "/v1/charge", ["Content-Length: 2"], b"ok") * 3),
            (TOCLIENT, resp(200, ["Content-Length: 2"], b"ok") * 3)]
    first, _ = run("http", segs)
    assert run("http", segs)[0] == first and len(first) == 6
    for bad, anomaly in ((req("POST", "/", ["Content-Length: 4", "Transfer-Encoding: chunked"]), "smuggling:cl-te"),
                         (req("GET", "/", ["X-A: 1", " folded"]), "smuggling:obs-fold")):
        for _ in range(2):
            events, _ = run("http", [(TOSERVER, bad)])
            assert events[-1].anomaly == anomaly
    for _ in range(3 * http_mod._HEAD_CACHE_ENTRIES):  # bounded
        run("http", [(TOSERVER, req("GET", f"/p{_}"))])
    assert all(len(c) <= http_mod._HEAD_CACHE_ENTRIES for c in http_mod._facts_cache)


# -- the canonical path (firewall/protocols/http_canon.py) -----------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from firewall.policy.match import normalize_path  # noqa: E402
from firewall.protocols.http_canon import CanonError, canonical_target  # noqa: E402

_PIECES = st.sampled_from(["/", "//", ".", "..", "%2e", "%2E", "%2f", "%5c", "%25", "%00", ";", "%20", "a",
                           "%41", "~", "%c3%a9", "%ff", "%", "%z", "?", "?q=%2F/../x", "#", "\\", "+", "admin"])


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(_PIECES, max_size=10))
def test_canonical_path_is_a_fixed_point_of_the_matchers_normalisation(pieces):
    """The matcher's normalize_path leaves a canonical target's path as it is: the path the
    policy compares is exactly the canonical one the flow record and the report show."""
    target = "/" + "".join(pieces)
    try:
        canon = canonical_target(target)
    except CanonError:
        return
    assert normalize_path(canon.target) == canon.path
    assert "//" not in canon.path and "/./" not in canon.path + "/" and "/../" not in canon.path + "/"
    if canon.path.isascii() and "%" not in canon.path and " " not in canon.path:
        assert canonical_target(canon.path).path == canon.path  # idempotent


@pytest.mark.parametrize("target,reason", [
    ("/a/..%2Fb", "escaped-slash"), ("/a%5cb", "escaped-slash"), ("/a\\b", "backslash"),
    ("/a%252e", "double-encoding"), ("/a%00", "control-char"), ("/a%3Fb", "escaped-delimiter"),
    ("/a%2", "bad-percent"), ("/a%ff", "invalid-utf8"), ("/a;b", "path-parameter"), ("/..", "dot-above-root"),
    ("/a#b", "fragment"), ("/a b", "invalid-char"),
])
def test_uncanonical_paths_are_named(target, reason):
    with pytest.raises(CanonError, match=reason):
        canonical_target(target)


def test_response_with_content_length_and_transfer_encoding_is_an_anomaly():
    p = make_parser("http")
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", TOSERVER)
    (ev,) = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", TOCLIENT)
    assert ev.kind == "anomaly" and ev.anomaly == "smuggling:cl-te"
