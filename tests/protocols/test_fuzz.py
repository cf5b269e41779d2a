"""Property tests: hostile bytes never raise out of a parser, buffers stay bounded,
and segmentation never changes the events - even for garbage.

``PALISADE_FUZZ=deep`` raises the number of examples for long local runs.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firewall.protocols import REGISTRY, TOCLIENT, TOSERVER, L7Event, make_parser
from firewall.protocols.dns import parse_message
from tests.protocols.replay import FUZZ_EXAMPLES, load, rechunk, recordings

PROTOS = [s.name for s in REGISTRY]
SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# small recorded conversations to mutate (whole bytes of every connection)
SEEDS = [(load(n)["app_proto"], conn) for n in recordings() if load(n)["transport"] == "tcp"
         for conn in load(n)["connections"] if sum(len(b) for _, b in conn) < 20_000]

segments = st.lists(st.tuples(st.sampled_from([TOSERVER, TOCLIENT]), st.binary(min_size=0, max_size=400)),
                    max_size=25)


def feed_checked(proto: str, segs) -> list[L7Event]:
    parser = make_parser(proto)
    events: list[L7Event] = []
    fed = [0, 0]
    for d, data in segs:
        out = parser.feed(data, d)
        fed[d] += len(data)
        assert isinstance(out, list) and all(isinstance(e, L7Event) for e in out)
        events += out
        for state in getattr(parser, "_dirs", ()):
            assert len(state.buf) <= max(parser.max_buffer, 1) + 400, "buffer must stay bounded"
        held = parser.hold_from(d)
        assert held is None or 0 <= held <= fed[d], "a hold points into bytes already seen"
    assert isinstance(parser.summary(), dict)
    for e in events:
        assert e.kind == "anomaly" or e.anomaly is None
        assert e.offset >= 0 and (e.end == -1 or e.end >= e.offset)
    return events


@SETTINGS
@given(st.sampled_from(PROTOS), segments)
def test_random_bytes_never_raise(proto, segs):
    feed_checked(proto, segs)


@SETTINGS
@given(st.sampled_from(PROTOS), segments, st.randoms(use_true_random=False))
def test_random_bytes_events_do_not_depend_on_segmentation(proto, segs, rng):
    whole = feed_checked(proto, segs)
    assert feed_checked(proto, rechunk(segs, rng, rng.choice([1, 3, 50]))) == whole


@SETTINGS
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255),
                                                                st.sampled_from(["flip", "insert", "delete"])),
                                                      min_size=1, max_size=8),
       st.randoms(use_true_random=False))
def test_mutated_recordings_never_raise_and_stay_deterministic(seed, mutations, rng):
    proto, conn = SEEDS[seed]
    segs = [(d, bytearray(b)) for d, b in conn]
    for pos, value, op in mutations:
        d, data = segs[pos % len(segs)]
        i = pos % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= value or 1
        elif op == "insert":
            data[i:i] = bytes([value])
        elif op == "delete" and i < len(data):
            del data[i]
    segs = [(d, bytes(b)) for d, b in segs]
    whole = feed_checked(proto, segs)
    assert feed_checked(proto, rechunk(segs, rng, rng.choice([1, 7, 200]))) == whole


@SETTINGS
@given(st.binary(max_size=600), st.sampled_from([TOSERVER, TOCLIENT]))
def test_dns_datagrams_never_raise(data, direction):
    ev = parse_message(data, direction)
    assert isinstance(ev, L7Event) and ev.kind in ("query", "answer", "anomaly")


def test_anomaly_then_only_counting():
    parser = make_parser("http")
    (ev,) = parser.feed(b"\x00\x01 not http\r\n\r\n", TOSERVER)
    assert ev.anomaly == "bad-request-line"
    rng = random.Random(1)
    for _ in range(50):
        assert parser.feed(rng.randbytes(1000), TOSERVER) == []
