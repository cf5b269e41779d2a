"""DLP evasions through the real sidecar (egress from the CDE pod to an out-of-scope
recorder that writes every byte the moment it arrives): a sender that pauses one digit
short, stacked content codings, several gzip members, transfer codings."""

from __future__ import annotations

import gzip
import json
import re
import time

import pytest

from tests.harness import wait_until

from .conftest import PAN, _jsonl

pytestmark = pytest.mark.netns


def _received(env, token: bytes) -> bytes:
    """What the recorder got on the connection whose bytes carry ``token`` (the sidecar
    connects from its own source port, so files are found by content)."""
    for p in env.rec.iterdir():
        data = p.read_bytes()
        if token in data:
            return data
    return b""


def _digits(data: bytes) -> str:
    return re.sub(rb"[^0-9]", b"", data).decode()


SHAPES = {
    "raw-plain": (b"\x00\x01card=", PAN.encode()),
    "raw-spaced": (b"\x00\x01card=", b"4111 1111 1111 1111"),
    "raw-dashed": (b"\x00\x01card=", b"4111-1111-1111-1111"),
    "amex": (b"\x00\x01card=", b"378282246310005"),
    "http-body": (b'POST /collect HTTP/1.1\r\nHost: analytics\r\nContent-Length: 200\r\n\r\n{"order": 1, "card": "', PAN.encode()),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("ending", ["last-digit", "close"])
def test_sender_pausing_before_the_last_digit_gets_no_restorable_prefix(env, shape, ending):
    head, card = SHAPES[shape]
    token = f"tok{time.monotonic_ns()}".encode()
    head = head.replace(b"card", token + b"card")
    flag = env.tmp / f"go-{token.decode()}"
    steps = [{"hex": (head + card[:-1]).hex(), "pause_file": str(flag)}]
    steps.append({"hex": card[-1:].hex()} if ending == "last-digit" else {"hex": "", "shutdown": True})
    proc, out = env.run(env.payments, [{"id": shape, "host": env.analytics.ip, "port": 9100, "steps": steps,
                                        "read": 3}], wait=False)
    paused = wait_until(lambda: next((r for r in _jsonl(out) if "paused" in r), None), 20, what="sender paused")
    assert paused["port"]
    # what is not a candidate went through (the head, "card="): the flow is live, not stalled
    wait_until(lambda: head[-6:] in _received(env, token), 10, what="the bytes before the digits")
    got = _received(env, token)
    digits = _digits(got[got.index(token) + len(token):])
    assert len(digits) < 12, f"{shape}: {len(digits)} digits delivered during the pause"
    flag.write_text("go")
    proc.wait(timeout=30)
    (res,) = [r for r in _jsonl(out) if "paused" not in r]
    got = _received(env, token)
    assert card[:12] not in got and _digits(card)[:12] not in _digits(got), f"{shape}: prefix released"
    assert res["reset"] or res["closed"] or "403" in res["response"]


def _gzip_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(p) for p in parts)


BODIES = {
    "gzip-gzip": ("gzip, gzip", gzip.compress(gzip.compress(json.dumps({"card": PAN}).encode()))),
    "gzip-x3": ("gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(json.dumps({"card": PAN}).encode())))),
    "two-members": ("gzip", _gzip_members(b'{"card": "4111111', b'111111111"}')),
    "three-members": ("gzip", _gzip_members(b"pad ", b'{"card": "' + PAN.encode(), b'"}')),
    "deflate-gzip": ("gzip, deflate", __import__("zlib").compress(gzip.compress(PAN.encode()))),
    "four-layers": ("gzip, gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(gzip.compress(PAN.encode()))))),
    "unknown-coding": ("br", b"\x8b\x07\x80" + PAN.encode()[::-1]),
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_encoded_bodies_are_decoded_or_refused(env, name):
    enc, body = BODIES[name]
    token = f"tok{time.monotonic_ns()}"
    head = (f"POST /{token} HTTP/1.1\r\nHost: analytics\r\nContent-Encoding: {enc}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    (res,) = env.run(env.payments, [{"id": name, "host": env.analytics.ip, "port": 9100,
                                     "steps": [{"hex": (head + body).hex()}], "read": 3}])
    assert res["response"].startswith(("HTTP/1.1 403", "HTTP/1.1 415")), res
    assert body not in _received(env, token.encode())


@pytest.mark.parametrize("te", ["gzip, chunked", "deflate, chunked", "chunked, chunked", "identity, chunked"])
def test_transfer_codings_other_than_chunked_are_refused(env, te):
    body = gzip.compress(PAN.encode())
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    token = f"tok{time.monotonic_ns()}"
    head = f"POST /{token} HTTP/1.1\r\nHost: analytics\r\nTransfer-Encoding: {te}\r\n\r\n".encode()
    (res,) = env.run(env.payments, [{"id": te, "host": env.analytics.ip, "port": 9100,
                                     "steps": [{"hex": (head + chunked).hex()}], "read": 3}])
    assert res["response"].startswith("HTTP/1.1 400"), res
    assert _received(env, token.encode()) == b""
