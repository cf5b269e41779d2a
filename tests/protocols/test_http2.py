"""HTTP/2 and gRPC: a conversation produced by two real ``h2`` endpoints.

grpcio is not installed here, so the gRPC peers are ``h2.connection`` client
and server objects exchanging bytes in memory - the same frames, HPACK state
and trailers a gRPC stack produces (``content-type: application/grpc``,
``grpc-status`` in trailers). nghttpd/nghttp cover plain h2c in
``test_recordings``.
"""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events

from firewall.protocols import TOCLIENT, TOSERVER, Identifier, make_parser
from tests.protocols.replay import bytewise, rechunk, run, split_at


def grpc_conversation(calls: int = 2, big_header: int = 0) -> list[tuple[int, bytes]]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    segs: list[tuple[int, bytes]] = []

    def pump():
        while True:
            c, s = client.data_to_send(), server.data_to_send()
            if not c and not s:
                return
            if c:
                segs.append((TOSERVER, c))
                for ev in server.receive_data(c):
                    if isinstance(ev, h2.events.RequestReceived):
                        sid = ev.stream_id
                        server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                        server.send_data(sid, b"\0\0\0\0\x05reply")
                        status = "0" if sid == 1 else "7"
                        server.send_headers(sid, [("grpc-status", status), ("grpc-message", "denied")],
                                            end_stream=True)
            if s:
                segs.append((TOCLIENT, s))
                client.receive_data(s)

    client.initiate_connection()
    pump()
    for i in range(calls):
        sid = client.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "payments:50051"),
                   (":path", f"/pay.Payments/Charge{i}"), ("content-type", "application/grpc"), ("te", "trailers")]
        if big_header:
            headers.append(("x-big", "v" * big_header))
        client.send_headers(sid, headers)
        client.send_data(sid, b"\0\0\0\0\x04card", end_stream=True)
        pump()
    return segs


def test_grpc_requests_statuses_and_trailers():
    segs = grpc_conversation()
    assert Identifier(50051).feed(segs[0][1], TOSERVER) == "http2"
    events, summary = run("http2", segs)
    reqs = [e for e in events if e.kind == "request"]
    assert [(e.app_proto, e.fields["method"], e.fields["path"], e.fields["stream_id"]) for e in reqs] == [
        ("grpc", "POST", "/pay.Payments/Charge0", 1), ("grpc", "POST", "/pay.Payments/Charge1", 3)]
    assert reqs[0].fields["authority"] == "payments:50051"
    assert reqs[0].fields["content_type"] == "application/grpc"
    trailers = [e for e in events if e.kind == "response" and e.fields["trailers"]]
    assert [(e.fields["stream_id"], e.fields["status"], e.fields["grpc_status"]) for e in trailers] == [
        (1, 200, 0), (3, 200, 7)]
    assert summary["grpc"] is True and summary["grpc_statuses"] == {0: 1, 7: 1}
    parser = make_parser("grpc")
    for d, data in segs:
        parser.feed(data, d)
    assert parser.app_proto == "grpc"


def test_any_segmentation_gives_the_same_events():
    segs = grpc_conversation(3)
    whole = run("http2", segs)
    assert run("http2", bytewise(segs)) == whole
    total = sum(len(b) for _, b in segs)
    for k in range(1, total):
        assert run("http2", split_at(segs, k)) == whole
    rng = random.Random(3)
    for _ in range(10):
        assert run("http2", rechunk(segs, rng, 13)) == whole


def test_header_block_split_into_continuation_frames():
    # 40 KB of header: h2 splits it into HEADERS + CONTINUATION frames (16 KiB max frame)
    segs = grpc_conversation(1, big_header=40_000)
    events, _ = run("http2", segs)
    (req,) = [e for e in events if e.kind == "request"]
    assert req.fields["path"] == "/pay.Payments/Charge0" and req.end - req.offset > 16_384 + 9  # more than one frame


def test_hold_from_covers_an_incomplete_headers_block():
    segs = grpc_conversation(1)
    parser = make_parser("http2")
    client = b"".join(b for d, b in segs if d == TOSERVER)
    server = b"".join(b for d, b in segs if d == TOCLIENT)
    parser.feed(server, TOCLIENT)
    full = []
    for i in range(len(client)):
        full += parser.feed(client[i : i + 1], TOSERVER)
        held = parser.hold_from(TOSERVER)
        if not any(e.kind == "request" for e in full) and held is not None:
            assert held <= i
    (req,) = [e for e in full if e.kind == "request"]
    assert parser.hold_from(TOSERVER) is None
    # while the request's HEADERS frame was arriving, its start was held
    p2 = make_parser("http2")
    p2.feed(client[: req.offset + 5], TOSERVER)
    assert p2.hold_from(TOSERVER) == req.offset


def test_oversized_header_block_is_an_anomaly():
    segs = grpc_conversation(1, big_header=40_000)
    events, summary = run("http2", segs, max_head=16_384)
    assert [e.anomaly for e in events if e.kind == "anomaly"] == ["oversized-header"]
    assert summary["anomalies"] == ["oversized-header"]


def test_bad_preface_and_garbage_frames():
    events, _ = run("http2", [(TOSERVER, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")])
    assert [e.anomaly for e in events] == ["bad-preface"]
    junk_headers = bytes.fromhex("000004010500000001") + b"\xff\xff\xff\xff"
    events, _ = run("http2", [(TOSERVER, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + junk_headers)])
    assert [e.anomaly for e in events] == ["hpack-error"]


def test_a_header_block_that_fails_is_reported_at_its_first_frame():
    """The session cuts at the anomaly's offset: after the frame would forward the frame."""
    from hpack import Encoder

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = bytes.fromhex("000000040000000000")
    junk = bytes.fromhex("000004010500000001") + b"\xff\xff\xff\xff"
    (ev,) = run("http2", [(TOSERVER, preface + settings + junk)])[0]
    assert ev.anomaly == "hpack-error" and ev.offset == len(preface) + len(settings)
    block = Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", "/a/..%2F..%2Fb"),
                              (":authority", "x")])
    frame = len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block
    (ev,) = run("http2", [(TOSERVER, preface + settings + frame)])[0]
    assert ev.anomaly == "normalise:escaped-slash" and ev.offset == len(preface) + len(settings)
