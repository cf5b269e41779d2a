"""Protocol switches through the real sidecar: what follows an accepted CONNECT or Upgrade
is identified afresh and meets the same rules (or the exception policy), never passed on
uninspected.  A forward proxy in the payments pod relays CONNECT to nginx on loopback."""

from __future__ import annotations

import uuid

import pytest

from .conftest import refused

pytestmark = pytest.mark.netns


def _inner(path: str, rid: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: payments\r\nX-Req-Id: {rid}\r\nConnection: close\r\n\r\n".encode()


CONNECT = b"CONNECT 127.0.0.1:9000 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n\r\n"


@pytest.mark.parametrize("split", [None, 3])
def test_http_inside_a_connect_tunnel_meets_the_rules(env, split):
    ok, bad = f"t-ok-{uuid.uuid4().hex[:6]}", f"t-bad-{uuid.uuid4().hex[:6]}"
    plans = []
    for path, rid in (("/v1/charge", ok), ("/admin", bad), ("/v1/charge/..%2F..%2Fadmin", bad)):
        inner = {"hex": _inner(path, rid).hex(), "delay": 0.001}
        if split:
            inner["split"] = split
        plans.append([{"hex": CONNECT.hex(), "delay": 0.2}, inner])
    res = env.http(plans, port=9003)
    assert env.wait_served(ok)["uri"] == "/v1/charge"
    assert "HTTP/1.1 200 Connection established" in res[0]["response"]
    assert bad not in env.served_ids(), "a request inside the tunnel bypassed the rules"
    for r in res[1:]:
        assert "HTTP/1.1 200 Connection established" in r["response"]
        assert "HTTP/1.1 403" in r["response"] or "HTTP/1.1 400" in r["response"] or r["reset"], r


def test_uninspectable_stream_inside_a_tunnel_is_refused(env):
    (res,) = env.http([[{"hex": CONNECT.hex(), "delay": 0.2}, {"hex": (b"\x00\x01\x02\x03binary").hex()}]], port=9003)
    flow = env.flow(res["port"])
    assert flow["verdict"] == "deny", flow


def test_websocket_upgrade_on_a_governed_flow_is_not_passed_uninspected(env):
    up = (b"GET /v1/charge HTTP/1.1\r\nHost: payments\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # masked "Hello"
    (res,) = env.http([[{"hex": up.hex(), "delay": 0.2}, {"hex": frame.hex()}]], port=9003)
    assert "101 Switching Protocols" in res["response"]
    assert "Hello" not in res["response"]  # the echo never came back: the frame was not forwarded
    assert refused(res) or res["reset"] or res["closed"]
    assert env.flow(res["port"])["verdict"] == "deny"


def test_response_oddities_pass_with_an_alert_but_desynchronising_framing_is_refused(env):
    odd = b"GET /v1/charge/old-server HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n"
    bad = b"GET /v1/charge/desync HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n"
    res_odd, res_bad = env.http([odd, bad], port=9003)
    # obs-fold, space before a colon, a non-token name: a client reads them one way only
    assert res_odd["response"].startswith("HTTP/1.1 200") and res_odd["response"].endswith("ok\n"), res_odd
    flow = env.flow(res_odd["port"])
    assert flow["verdict"] == "allow"
    sigs = {e["alert"]["signature"] for e in env.sc.events("alert") if e.get("src_port") == res_odd["port"]}
    assert {"http:lenient:obs-fold", "http:lenient:space-before-colon", "http:lenient:bad-header-name"} <= sigs
    # Content-Length with Transfer-Encoding: refused (reset), nothing of it reaches the client
    assert "smuggled" not in res_bad["response"] and not res_bad["response"].startswith("HTTP/1.1 200"), res_bad
    assert env.flow(res_bad["port"])["verdict"] == "deny"
