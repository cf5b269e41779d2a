"""HTTP/1.x body framing by offsets: the chunked walk and Content-Length skipping give the same
events at the same offsets however the stream is cut (every byte, every split point), and the
chunked walk accepts and refuses exactly what the line-by-line reading it replaced did.

The attacker's angle: request smuggling lives in framing disagreements, so a size line, a chunk
terminator or a body boundary that falls on a read boundary must not change where the parser
thinks the next message starts; a body that looks like a request is never parsed as one.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.protocols import TOCLIENT, TOSERVER
from firewall.protocols.http import HttpParser
from tests.protocols.replay import FUZZ_EXAMPLES

NEXT = b"GET /after HTTP/1.1\r\nHost: shop.example\r\n\r\n"
NEXT_RESP = b"HTTP/1.1 204 No Content\r\n\r\n"
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


def chunked_req_head() -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunked_resp_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def reference(tail: bytes, toserver: bool) -> tuple[str, int]:
    """The line-by-line reading of a chunked body (the parser before the offset walk), on
    the bytes after the head: ("end", offset past the trailers), (anomaly, its offset) or
    ("more", -1) when the body is not complete."""
    pre = "smuggling:" if toserver else ""
    i, mode = 0, "size"
    while True:
        if mode == "size":
            j = tail.find(b"\n", i, i + 4096)
            if j < 0:
                return ("oversized-line", i) if len(tail) - i >= 4096 else ("more", -1)
            field = tail[i:j + 1].rstrip(b"\r\n").split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.fullmatch(field):
                return (pre + "invalid-chunk-size", i)
            size, i = int(field, 16), j + 1
            if size == 0:
                mode = "trailers"
                continue
            i += size
            if i > len(tail):
                return ("more", -1)
            mode = "crlf"
        elif mode == "crlf":
            two = tail[i:i + 2]
            if two == b"\r\n":
                i += 2
            elif two[:1] == b"\n":
                i += 1
            elif two in (b"", b"\r") and i + len(two) == len(tail):
                return ("more", -1)
            else:
                return (pre + "bad-chunk-terminator", i)
            mode = "size"
        else:
            j = tail.find(b"\n", i)
            if j < 0:
                return ("more", -1)
            blank = not tail[i:j + 1].strip(b"\r\n")
            i = j + 1
            if blank:
                return ("end", i)


def feed_all(parser: HttpParser, d: int, pieces: list[bytes]) -> list:
    out = []
    for p in pieces:
        out += parser.feed(p, d)
    return out


class Recording(HttpParser):
    """The parser, remembering where each message of each direction ended."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[tuple[int, int]] = []

    def _end_of_message(self, st):  # noqa: ANN001, ANN202 - the parser's own hook
        self.ends.append((st.direction, st.pos))
        super()._end_of_message(st)


def outcome(parser: Recording, d: int, events: list, head_len: int) -> tuple[str, int]:
    """What the parser made of the chunked body after a head of ``head_len`` bytes: where the
    message ended, or the anomaly that stopped it, or that it waits for more."""
    ends = [pos for dd, pos in parser.ends if dd == d and pos > head_len]
    if ends:
        return ("end", ends[0] - head_len)
    bad = [e for e in events if e.kind == "anomaly"]
    if bad:
        return (bad[0].anomaly, bad[0].offset - head_len)
    return ("more", -1)


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    pts = sorted({p for p in points if 0 < p < len(data)})
    return [data[a:b] for a, b in zip([0, *pts], [*pts, len(data)], strict=True)]


def run_request(stream: bytes, pieces: list[bytes]) -> list:
    return feed_all(HttpParser(), TOSERVER, pieces)


def request_outcome(stream: bytes, pieces: list[bytes], head_len: int) -> tuple[str, int]:
    p = Recording()
    return outcome(p, TOSERVER, feed_all(p, TOSERVER, pieces), head_len)


_SMUGGLED = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
WELL_FORMED = (b"5\r\nhello\r\n"
               + b"%X;name=value\r\n" % len(_SMUGGLED) + _SMUGGLED + b"\r\n"
               + b"0000000000000003 \t;x\r\nabc\r\n"  # 16 hex digits, blanks before ';'
               + b"f\nGET /admin HTTP\n"  # bare LF line ending and terminator
               + b"0\r\nX-Trailer: 1\r\n\r\n")


def test_well_formed_body_matches_reference_whole_and_at_every_split():
    head = chunked_req_head()
    stream = head + WELL_FORMED + NEXT
    ref = reference(WELL_FORMED + NEXT, True)
    assert ref == ("end", len(WELL_FORMED))
    whole = run_request(stream, [stream])
    assert [e.kind for e in whole] == ["request", "request"]
    assert whole[1].offset == len(head) + len(WELL_FORMED) and whole[1].fields["path"] == "/after"
    for k in range(1, len(stream)):
        assert run_request(stream, [stream[:k], stream[k:]]) == whole, k
    assert run_request(stream, [stream[i:i + 1] for i in range(len(stream))]) == whole


def test_chunk_data_that_looks_like_a_request_is_never_parsed():
    """'0\\r\\n\\r\\nGET /smuggled' inside a chunk's data: skipped by its count, at any split."""
    head = chunked_req_head()
    data = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
    stream = head + body + NEXT
    for k in range(1, len(stream)):
        events = run_request(stream, [stream[:k], stream[k:]])
        assert [e.fields.get("path") for e in events] == ["/upload", "/after"], k
        assert events[1].offset == len(head) + len(body)


def test_every_offset_of_size_line_and_crlf_in_a_response():
    """A response body of chunks of 1..3 bytes (size lines and CRLFs dense), cut in three at
    every pair of offsets: the next response always starts at the same offset."""
    head = chunked_resp_head()
    body = b"".join(b"%x\r\n" % n + b"\r\n0"[:n] + b"\r\n" for n in (1, 2, 3, 2, 1)) + b"0\r\n\r\n"
    stream = head + body + NEXT_RESP
    p = HttpParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + NEXT, TOSERVER)
    whole = p.feed(stream, TOCLIENT)
    assert [e.fields["status"] for e in whole] == [200, 204]
    assert whole[1].offset == len(head) + len(body)
    for a in range(1, len(stream)):
        for b in range(a, len(stream)):
            q = HttpParser()
            q.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + NEXT, TOSERVER)
            assert feed_all(q, TOCLIENT, cuts(stream, [a, b])) == whole, (a, b)


BAD = [
    (b"3\r\nabcX\r\n0\r\n\r\n", "smuggling:bad-chunk-terminator", 6),
    (b"3\r\nabc\rX0\r\n\r\n", "smuggling:bad-chunk-terminator", 6),
    (b"3\r\nabc\rX", "smuggling:bad-chunk-terminator", 6),  # a CR and one wrong byte, at the end
    (b"3\r\nabcX", "smuggling:bad-chunk-terminator", 6),
    (b"zz\r\n", "smuggling:invalid-chunk-size", 0),
    (b"2\r\nab\r\n-1\r\n", "smuggling:invalid-chunk-size", 7),
    (b"00000000000000001\r\nx\r\n0\r\n\r\n", "smuggling:invalid-chunk-size", 0),  # 17 hex digits
    (b"0x5\r\nhello\r\n", "smuggling:invalid-chunk-size", 0),
    (b" 5\r\nhello\r\n", "smuggling:invalid-chunk-size", 0),
    (b"5\x00\r\nhello\r\n", "smuggling:invalid-chunk-size", 0),
    (b"1\r\nx\r\n" + b"1" * 4096, "oversized-line", 6),
]


def test_malformed_framing_is_refused_at_the_same_offset_at_every_split():
    head = chunked_req_head()
    for body, anomaly, at in BAD:
        assert reference(body, True) == (anomaly, at), body[:20]
        stream = head + body
        assert request_outcome(stream, [stream], len(head)) == (anomaly, at), body[:20]
        for k in range(1, len(stream)):
            got = request_outcome(stream, [stream[:k], stream[k:]], len(head))
            assert got == (anomaly, at), (body[:20], k)


def test_a_lone_cr_after_chunk_data_waits_for_the_next_byte():
    p = HttpParser()
    head = chunked_req_head()
    assert [e.kind for e in p.feed(head + b"3\r\nabc\r", TOSERVER)] == ["request"]
    assert p.feed(b"\n0\r\n\r\n" + NEXT, TOSERVER)[0].offset == len(head) + len(b"3\r\nabc\r\n0\r\n\r\n")


def test_content_length_body_split_at_every_byte_then_pipelined_request():
    body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"POST /u HTTP/1.1\r\nHost: shop.example\r\nContent-Length: %d\r\n\r\n" % len(body)
    stream = head + body + NEXT + NEXT
    whole = run_request(stream, [stream])
    assert [e.fields["path"] for e in whole] == ["/u", "/after", "/after"]
    assert whole[1].offset == len(head) + len(body)
    for k in range(1, len(stream)):
        assert run_request(stream, [stream[:k], stream[k:]]) == whole, k
    assert run_request(stream, [stream[i:i + 1] for i in range(len(stream))]) == whole


def test_many_small_chunks_in_one_read_are_walked_without_buffering():
    """1,000 one-byte chunks and a 1 MiB chunk in one feed: the next request is found at its
    exact offset and nothing of the bodies stays buffered."""
    head = chunked_req_head()
    body = b"1\r\nx\r\n" * 1000 + b"100000\r\n" + b"y" * (1 << 20) + b"\r\n0\r\n\r\n"
    p = HttpParser()
    events = p.feed(head + body[:-100], TOSERVER)
    assert len(p._dirs[TOSERVER].buf) < 100
    events += p.feed(body[-100:] + NEXT, TOSERVER)
    assert [e.fields["path"] for e in events] == ["/upload", "/after"]
    assert events[1].offset == len(head) + len(body)


_SIZE_CHARS = st.sampled_from([b"0", b"1", b"2", b"a", b"F", b"00", b" ", b"\t", b";", b"x", b"\r", b"-"])


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """Mostly well-formed chunked bodies with the framing's odd corners: leading zeros,
    extensions, blanks before ';', CR runs and bare LFs, wrong terminators, junk size lines."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        n = draw(st.integers(1, 20))
        if draw(st.integers(0, 9)) == 0:
            line = b"".join(draw(st.lists(_SIZE_CHARS, min_size=1, max_size=5)))
        else:
            digits = (b"%x" % n).upper() if draw(st.booleans()) else b"%x" % n
            line = b"0" * draw(st.integers(0, 16 - len(digits) + 1)) + digits
            line += draw(st.sampled_from([b"", b";ext=1", b" ;a", b"\t;b=\"q\"", b" "]))
        line += draw(st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]))
        data = draw(st.binary(min_size=n, max_size=n))
        term = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"X", b"\rX", b""]))
        parts.append(line + data + term)
    parts.append(draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nT: 1\r\n\r\n", b"0\n\n", b"0;e\r\n\r\n", b""])))
    return b"".join(parts)


@settings(max_examples=FUZZ_EXAMPLES * 4, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(1, 400), max_size=4), st.booleans())
def test_chunked_walk_agrees_with_the_line_by_line_reading(body: bytes, points: list[int], request: bool):
    tail = body + (NEXT if request else NEXT_RESP)
    want = reference(tail, request)
    if request:
        head = chunked_req_head()
        stream = head + tail
        got = request_outcome(stream, cuts(stream, points), len(head))
    else:
        head = chunked_resp_head()
        stream = head + tail
        p = Recording()
        p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + NEXT, TOSERVER)
        got = outcome(p, TOCLIENT, feed_all(p, TOCLIENT, cuts(stream, points)), len(head))
    assert got == want
