"""The sans-IO session: bytes in, bytes-to-forward out, no sockets (STYLE.md's playbook idea)."""

from __future__ import annotations

import dataclasses

import pytest

from firewall.dlp import DlpEngine
from firewall.identity import Identity
from firewall.policy import PolicySet
from firewall.protocols.base import TOCLIENT, TOSERVER
from firewall.session import Inspection, Session

POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  mode: protect
  default: deny
  ingress:
    - name: shop-posts-charges
      from: [{namespace: shop}]
      ports: [{port: 80}]
      appProto: http
      http: [{methods: [POST], pathPrefix: /v1/charge}]
      action: allow
  egress:
    - name: to-analytics
      to: [{labels: {app: analytics}}]
      ports: [{port: 9100}]
      action: allow
  dlp:
    - name: no-pan-out
      packs: [payment_cards]
      direction: egress
      to: [{scope: out-of-scope}]
      action: block
"""

LOCAL = Identity.make("10.0.0.2", "payments", "api-0", {"app": "api", "pci.palisade.dev/scope": "cde"})
PEERS = {
    "10.0.0.3": Identity.make("10.0.0.3", "shop", "web-0", {"app": "web", "pci.palisade.dev/scope": "connected"}),
    "10.0.0.4": Identity.make("10.0.0.4", "analytics", "an-0", {"app": "analytics"}),
}


class Peers:
    def resolve(self, ip):
        return PEERS.get(ip, Identity(ip))


@pytest.fixture(scope="module")
def engine():
    return DlpEngine.load()


@pytest.fixture
def insp(tmp_path, engine):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY)
    events = []
    i = Inspection(policy=PolicySet.load([str(p)]), dlp=engine, identities=Peers(), local=LOCAL,
                   emit=events.append)
    i.events = events  # type: ignore[attr-defined]
    return i


def inbound(insp, src="10.0.0.3", port=80):
    s = Session(insp, "inbound", (src, 40000), ("10.0.0.2", port))
    return s, s.open()


def test_l4_deny_before_any_byte(insp):
    s, ok = inbound(insp, src="10.0.0.9")  # unknown peer: world, out of scope -> cde
    assert ok is False
    assert s.verdict == "deny" and s.rule == "cde-segmentation"
    alert = [e for e in insp.events if e["event_type"] == "alert"][0]
    assert alert["alert"]["action"] == "blocked"


def test_request_head_is_held_until_complete_then_forwarded(insp):
    s, ok = inbound(insp)
    assert ok
    req = b"POST /v1/charge HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\nok"
    out, stop = s.feed(TOSERVER, req[:10])
    assert out == b"" and stop is None  # identification / incomplete head: nothing forwarded yet
    out2, stop = s.feed(TOSERVER, req[10:])
    assert stop is None
    assert out + out2 == req


def test_second_pipelined_request_is_cut_exactly_and_answered_403(insp):
    s, _ = inbound(insp)
    ok = b"POST /v1/charge HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n"
    bad = b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n"
    out, stop = s.feed(TOSERVER, ok + bad)
    assert out == ok  # the allowed request is delivered, not one byte of the denied one
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 403")
    assert b"default-deny" in stop.reply


def test_byte_by_byte_feeding_forwards_the_same_bytes(insp):
    s, _ = inbound(insp)
    req = b"POST /v1/charge HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
    got = b""
    for i in range(len(req)):
        out, stop = s.feed(TOSERVER, req[i:i + 1])
        assert stop is None
        got += out
    assert got == req
    assert s.app_proto == "http"


def test_dlp_block_outbound_pan_never_forwarded_whole(insp):
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open()
    body = b'{"card": "4111 1111 1111 1111"}'
    req = b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    forwarded = b""
    stop = None
    for i in range(0, len(req), 7):
        out, stop = s.feed(TOSERVER, req[i:i + 7])
        forwarded += out
        if stop:
            break
    assert stop is not None and stop.reason.startswith("dlp-block")
    assert b"4111 1111 1111 1111" not in forwarded
    alert = [e for e in insp.events if e.get("alert", {}).get("category") == "dlp"][0]
    assert alert["dlp"]["masked"] == "411111******1111"
    assert "4111 1111 1111 1111" not in repr(insp.events)


def test_response_direction_passes(insp):
    s, _ = inbound(insp)
    s.feed(TOSERVER, b"POST /v1/charge HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n")
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    out, stop = s.feed(TOCLIENT, resp)
    assert out == resp and stop is None
    rec = s.record()
    assert rec["app_proto"] == "http" and rec["rule"] == "shop-posts-charges"
    assert rec["flow"]["bytes_toserver"] == 0  # the proxy counts bytes, not the session


def test_quarantine_denies_everything(insp):
    insp.quarantined = True
    s, ok = inbound(insp)
    assert ok is False and s.rule == "quarantine"


def test_monitor_override_allows_but_alerts(insp):
    insp.mode_override = "monitor"
    s, ok = inbound(insp, src="10.0.0.9")
    assert ok is True and s.mode == "monitor"
    alert = [e for e in insp.events if e["event_type"] == "alert"][0]
    assert alert["alert"]["action"] == "allowed"


GRPC_POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  mode: protect
  default: deny
  ingress:
    - name: shop-calls-quotes
      from: [{namespace: shop}]
      ports: [{port: 50051}]
      appProto: grpc
      http: [{pathPrefix: /quotes.Quotes/}]
      action: allow
"""


def test_grpc_call_denied_with_permission_denied_status(tmp_path, engine):
    import h2.config
    import h2.connection
    import h2.events

    p = tmp_path / "g.yaml"
    p.write_text(GRPC_POLICY)
    insp = Inspection(policy=PolicySet.load([str(p)]), dlp=engine, identities=Peers(), local=LOCAL,
                      emit=lambda e: None)
    s = Session(insp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", 50051))
    assert s.open()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    hdrs = [(":method", "POST"), (":scheme", "http"), (":authority", "api"),
            (":path", "/admin.Admin/DropTables"), ("content-type", "application/grpc"), ("te", "trailers")]
    client.send_headers(1, hdrs, end_stream=True)
    out, stop = s.feed(TOSERVER, client.data_to_send())
    assert stop is not None and stop.reply
    assert b"/admin.Admin/DropTables" not in out  # the denied call never reaches the server
    events = client.receive_data(stop.reply)
    got = {type(e).__name__: e for e in events}
    assert "ResponseReceived" in got and "StreamEnded" in got
    headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
               for k, v in got["ResponseReceived"].headers}
    assert headers["grpc-status"] == "7"
    assert "ConnectionTerminated" in got


def test_grpc_refusal_is_not_injected_in_the_middle_of_a_server_frame(tmp_path, engine):
    """Mid-frame on the server's side the refusal would corrupt the client's framing: reset instead."""
    import h2.config
    import h2.connection

    p = tmp_path / "g.yaml"
    p.write_text(GRPC_POLICY)
    insp = Inspection(policy=PolicySet.load([str(p)]), dlp=engine, identities=Peers(), local=LOCAL,
                      emit=lambda e: None)
    s = Session(insp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", 50051))
    assert s.open()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    hdrs = [(":method", "POST"), (":scheme", "http"), (":authority", "api"),
            (":path", "/quotes.Quotes/Get"), ("content-type", "application/grpc"), ("te", "trailers")]
    client.send_headers(1, hdrs)
    first = client.data_to_send()
    out, stop = s.feed(TOSERVER, first)
    assert stop is None and out == first
    server.initiate_connection()
    server.receive_data(first)
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_data(1, b"x" * 5000)
    answer = server.data_to_send()
    out, stop = s.feed(TOCLIENT, answer[:-100])  # the last DATA frame is cut short
    assert stop is None
    client.send_headers(3, [*hdrs[:3], (":path", "/admin.Admin/DropTables"), *hdrs[4:]], end_stream=True)
    out, stop = s.feed(TOSERVER, client.data_to_send())
    assert stop is not None and stop.reason.startswith("denied")
    assert stop.reply is None  # reset, no frames of ours inside the server's DATA frame


def _post_out(insp, head: bytes, body: bytes, step: int = 5):
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open()
    req = head + body
    fwd, stop = b"", None
    for i in range(0, len(req), step):
        out, stop = s.feed(TOSERVER, req[i:i + step])
        fwd += out
        if stop:
            break
    return fwd, stop


@pytest.mark.parametrize("step", [1, 5, 4096])
def test_pan_split_by_chunked_encoding_is_blocked(insp, step):
    parts = [b'{"card": "4', b"11111111", b'1111111"}']
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    head = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    fwd, stop = _post_out(insp, head, body, step)
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 403"), stop
    assert b"1111111\"}" not in fwd  # the chunk completing the number was not forwarded


def test_pan_in_gzip_body_is_blocked(insp):
    import gzip

    body = gzip.compress(b'{"card": "4111111111111111"}')
    head = b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body)
    fwd, stop = _post_out(insp, head, body, 7)
    assert stop is not None and stop.reason.startswith("dlp-block")


def test_percent_encoded_pan_in_target_is_blocked_before_the_head_is_forwarded(insp):
    enc = "".join(f"%{ord(c):02X}" for c in "4111111111111111").encode()
    head = b"GET /c?card=" + enc + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    fwd, stop = _post_out(insp, head, b"", 3)
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 403")
    assert fwd == b""  # the held head never left


def test_gzip_bomb_is_refused_where_dlp_blocks(insp):
    import zlib

    bomb = zlib.compress(b"0" * (20 << 20), 9)
    head = b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % len(bomb)
    fwd, stop = _post_out(insp, head, bomb, 65536)
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 415")


def test_needs_decoding_matches_the_decoder():
    """The session skips building a BodyDecoder exactly when it would not be needed."""
    from firewall.httpdecode import BodyDecoder, needs_decoding

    for chunked in (False, True):
        for form in (False, True):
            for enc in (None, "", "identity", "IDENTITY", "gzip", "x-gzip", "Deflate", "br", "zstd", "bogus"):
                dec = BodyDecoder(chunked=chunked, encoding=enc, form=form, length=10)
                assert needs_decoding(chunked, enc, form) == dec.needed, (chunked, form, enc)


# -- the per-flow L7 decision cache -----------------------------------------------------------

def _get(path: str, method: str = "GET", host: str = "api") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode()


def _policy_alerts(insp) -> list[dict]:
    return [e for e in insp.events if e.get("alert", {}).get("category") == "policy"]


def test_cached_l7_decisions_still_alert_on_every_request(insp):
    insp.mode_override = "monitor"  # denied requests pass with an alert, the flow stays open
    s, ok = inbound(insp)
    assert ok
    for _ in range(3):
        out, stop = s.feed(TOSERVER, _get("/admin"))
        assert stop is None and out == _get("/admin")
        s.feed(TOCLIENT, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert len(_policy_alerts(insp)) == 3


def test_l7_cache_follows_a_policy_reload_on_an_open_flow(insp, tmp_path):
    s, _ = inbound(insp)
    out, stop = s.feed(TOSERVER, _get("/v1/charge", "POST"))
    assert stop is None and s.rule == "shop-posts-charges"
    p = tmp_path / "stricter.yaml"
    p.write_text(POLICY.replace("pathPrefix: /v1/charge", "pathPrefix: /v2/charge"))
    insp.policy = PolicySet.load([str(p)])  # what a reload does: a new policy object
    out, stop = s.feed(TOSERVER, _get("/v1/charge", "POST"))
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 403") and out == b""


def test_l7_cache_follows_live_mode_override_and_quarantine(insp):
    insp.mode_override = "monitor"
    s, _ = inbound(insp)
    assert s.feed(TOSERVER, _get("/admin"))[1] is None
    s.feed(TOCLIENT, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    insp.mode_override = None  # back to the policy's protect mode
    out, stop = s.feed(TOSERVER, _get("/admin"))
    assert stop is not None and b"default-deny" in stop.reply

    insp.mode_override = "monitor"
    s, _ = inbound(insp)
    assert s.feed(TOSERVER, _get("/v1/charge", "POST"))[1] is None
    insp.quarantined = True
    out, stop = s.feed(TOSERVER, _get("/v1/charge", "POST"))
    assert stop is not None and stop.reason == "denied:quarantine"


def _same_decision(a, b) -> bool:
    """Equal decisions of two loads of one policy text (their reasons name different files)."""
    if a is None or b is None:
        return a is b
    return (dataclasses.replace(a, reason=a.reason.replace("p.yaml", "ref.yaml"))
            == dataclasses.replace(b, reason=b.reason))


def test_l7_cache_gives_the_policy_engine_answers(insp, tmp_path):
    """The same decision as an uncached walk for every (method, path, host, kind) tried."""
    from firewall.protocols.base import L7Event

    s, _ = inbound(insp)
    policy = insp.policy
    ref_file = tmp_path / "ref.yaml"
    ref_file.write_text(POLICY)
    ref = PolicySet.load([str(ref_file)])
    for mode in (None, "monitor", "learn", "protect"):
        insp.mode_override = mode
        for method in ("GET", "POST", "post"):
            for path in ("/v1/charge", "/v1/charge/x", "/v1/charges", "/v1/./charge", "/a/../v1/charge", None):
                for host in ("api", None):
                    for kind in ("request", "response"):
                        ev = L7Event("http", kind, TOSERVER, 0, {"method": method, "path": path, "host": host})
                        ref._table(s.flowinfo.local).cache.clear()
                        want = ref.decide_l7(s.flowinfo, ev, mode_override=mode, quarantined=False)
                        for _ in range(2):  # miss, then hit
                            got = policy.decide_l7(s.flowinfo, ev, mode_override=mode, quarantined=False)
                            assert _same_decision(got, want)


def test_l7_cache_keeps_no_long_targets(insp):
    s, _ = inbound(insp)
    cache = insp.policy._table(s.flowinfo.local).cache
    s.feed(TOSERVER, _get("/v1/charge/1", "POST"))
    assert any("/v1/charge/1" in k[-1] for k in cache if len(k) == 7)  # a repeated request is a hit
    long_path = "/v1/charge/" + "x" * 600
    out, stop = s.feed(TOSERVER, _get(long_path, "POST"))
    assert stop is None and s.rule == "shop-posts-charges"
    assert not any(long_path in k[-1] for k in cache if len(k) == 7)  # decided, not kept
