"""The sans-IO session: bytes in, bytes-to-forward out, no sockets (STYLE.md's playbook idea)."""

from __future__ import annotations

import dataclasses

import pytest

from firewall.datapath.session import Inspection, Session
from firewall.dlp.engine import DlpEngine
from firewall.identity.identity import Identity
from firewall.policy.engine import PolicySet
from firewall.protocols.base import TOCLIENT, TOSERVER

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
    from firewall.protocols.httpdecode import BodyDecoder, needs_decoding

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


# -- fail closed: every inspection failure goes through the exception policy -----------------

def _feed_all(s, d, data, step=None):
    out, stop = b"", None
    step = step or len(data)
    for i in range(0, len(data), step):
        o, stop = s.feed(d, data[i:i + step])
        out += o
        if stop:
            break
    return out, stop


def _inspection_alerts(insp):
    return [e for e in insp.events if e.get("event_type") == "alert" and "inspection" in e]


@pytest.mark.parametrize("head", [
    # each one is an allowed request (POST /v1/charge) but for its anomaly
    b"POST /v1/charge HTTP/1.1\r\nX@y: 1\r\n\r\n",                # invalid header name (the shape)
    b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nX y: 1\r\n\r\n",    # space inside a name
    b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nnocolon\r\n\r\n",   # no colon
    b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",  # NUL in a value
    b"POST /v1/charge HTTP/1.1\nHost: a\r\n\r\n",                 # bare LF
    b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",    # two Host headers, even equal
    b"POST /v1/charge HTTP/7.1\r\nHost: a\r\n\r\n",               # bad version
    b"POST /v1/charge HTTP/1.1\r\nHost: a\r\n X: folded\r\n\r\n",
    b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST http://other/v1/charge HTTP/1.1\r\nHost: a\r\n\r\n",  # absolute form vs Host
    b"POST /v1/charge#frag HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/charge%zz HTTP/1.1\r\nHost: a\r\n\r\n",
])
@pytest.mark.parametrize("step", [None, 1, 5])
def test_any_request_anomaly_is_refused_in_protect_and_nothing_forwarded(insp, head, step):
    s, _ = inbound(insp)
    out, stop = _feed_all(s, TOSERVER, head + b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n", step)
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 400"), stop
    assert out == b"" and s.verdict == "deny"
    (alert,) = [e for e in insp.events if e.get("event_type") == "alert" and e["alert"]["category"] == "protocol"]
    assert alert["alert"]["action"] == "blocked" and alert["inspection"]["action"] == "refuse"


@pytest.mark.parametrize("mode", ["learn", "monitor"])
def test_request_anomaly_in_learn_and_monitor_alerts_and_forwards(insp, mode):
    insp.mode_override = mode
    s, _ = inbound(insp)
    req = b"GET /admin HTTP/1.1\r\nX@y: 1\r\n\r\n"
    out, stop = _feed_all(s, TOSERVER, req)
    assert stop is None and out == req
    (alert,) = [e for e in insp.events if e.get("inspection")]
    assert alert["alert"]["action"] == "allowed" and alert["inspection"]["stage"] == "parse"


def test_on_inspection_error_allow_forwards_with_an_alert(tmp_path, engine):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY.replace("  mode: protect\n", "  mode: protect\n  onInspectionError: allow\n"))
    events: list = []
    insp = Inspection(policy=PolicySet.load([str(p)]), dlp=engine, identities=Peers(), local=LOCAL,
                      emit=events.append)
    s = Session(insp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", 80))
    assert s.open()
    req = b"POST /v1/charge HTTP/1.1\r\nX@y: 1\r\n\r\n"
    out, stop = _feed_all(s, TOSERVER, req)
    assert stop is None and out == req
    assert [e["inspection"]["action"] for e in events if e.get("inspection")] == ["forward"]


def test_exception_metric_counts_the_decision(insp):
    from firewall.datapath.exception_policy import INSPECTION_EXCEPTIONS

    before = INSPECTION_EXCEPTIONS.labels("normalise", "refuse")._value.get()
    s, _ = inbound(insp)
    _feed_all(s, TOSERVER, b"POST /v1/charge/..%2F..%2Fadmin HTTP/1.1\r\nHost: a\r\n\r\n")
    assert INSPECTION_EXCEPTIONS.labels("normalise", "refuse")._value.get() == before + 1


@pytest.mark.parametrize("partial", [b"GET /admin", b"GET /admin HTTP/1.1\r\nHost: a\r\n", b"POST /v1/charge HTTP/1.1"])
def test_incomplete_head_at_client_eof_is_refused_not_forwarded(insp, partial):
    s, _ = inbound(insp)
    out, stop = s.feed(TOSERVER, partial)
    assert out == b"" and stop is None
    out, stop = s.eof(TOSERVER)
    assert out == b"" and stop is not None and stop.reply.startswith(b"HTTP/1.1 400")
    assert any(e["inspection"]["reason"] == "incomplete-head-at-eof" for e in _inspection_alerts(insp))


def test_undecided_identification_on_release_is_refused(insp):
    s, _ = inbound(insp)
    out, stop = s.feed(TOSERVER, b"SUBSCRIB")  # still a possible method token
    assert out == b"" and stop is None
    assert s.release(TOSERVER) == b""
    assert s._stopped is not None


@pytest.mark.parametrize("target,expect", [
    (b"/v1/charge/..%2F..%2Fadmin", b"400"),   # the example: escaped slash
    (b"/v1/charge/%2e%2e/%2e%2e/admin", b"403"),  # decoded dots resolve to /admin: denied
    (b"/v1/charge/../../admin", b"403"),
    (b"/v1/charge%5c..%5c..%5cadmin", b"400"),
    (b"/v1/charge\\..\\admin", b"400"),
    (b"/v1/charge/%252e%252e/admin", b"400"),   # double encoding
    (b"/v1/charge;/../../admin", b"400"),       # Tomcat path parameter
    (b"/v1/charge/%00/../../admin", b"400"),
    (b"/v1/charge/../../../admin", b"400"),     # above the root
    (b"/v1/%63harge", b"200"),                  # unreserved escape: decoded, allowed
    (b"//v1//charge/", b"200"),                 # merged slashes
    (b"/v1/charge/./x/..", b"200"),
])
def test_path_canonicalisation_matrix(insp, target, expect):
    s, _ = inbound(insp)
    req = b"POST " + target + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    out, stop = _feed_all(s, TOSERVER, req)
    if expect == b"200":
        assert stop is None and out == req
        assert s.summary()["methods_paths"][0][1].startswith("/v1/charge")  # the canonical path is recorded
    else:
        assert stop is not None and stop.reply.startswith(b"HTTP/1.1 " + expect) and out == b""


def test_response_obs_fold_passes_with_an_alert_but_framing_fold_is_refused(insp):
    s, _ = inbound(insp)
    s.feed(TOSERVER, b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    resp = b"HTTP/1.1 200 OK\r\nX-Old: a\r\n b\r\nServer : old\r\nContent-Length: 2\r\n\r\nok"
    out, stop = s.feed(TOCLIENT, resp)
    assert stop is None and out == resp
    sigs = {e["alert"]["signature"] for e in insp.events if e.get("event_type") == "alert"}
    assert {"http:lenient:obs-fold", "http:lenient:space-before-colon"} <= sigs
    s2, _ = inbound(insp)
    s2.feed(TOSERVER, b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    bad = b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"
    out, stop = s2.feed(TOCLIENT, bad)
    assert stop is not None and stop.reply is None and out == b""  # reset: nothing of it reaches the client


@pytest.mark.parametrize("layers,members", [(2, 1), (3, 1), (1, 2), (2, 3)])
def test_stacked_encodings_and_gzip_members_are_decoded(insp, layers, members):
    import gzip

    pan = b"4111111111111111"
    parts = [b'{"x": "' + pan[:7], pan[7:] + b'"}'] if members > 1 else [b'{"card": "' + pan + b'"}']
    parts += [b" pad"] * (members - len(parts))
    body = b"".join(gzip.compress(p) for p in parts)
    for _ in range(layers - 1):
        body = gzip.compress(body)
    head = (b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Encoding: " + b", ".join([b"gzip"] * layers)
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    fwd, stop = _post_out(insp, head, body, 11)
    assert stop is not None and stop.reason.startswith("dlp-block"), stop


def test_more_encoding_layers_than_the_bound_is_refused(insp):
    import gzip

    body = b"x"
    for _ in range(4):
        body = gzip.compress(body)
    head = (b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip, gzip, gzip, gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    fwd, stop = _post_out(insp, head, body, 64)
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 415")


@pytest.mark.parametrize("card", [b"4111111111111111", b"4111 1111 1111 1111", b"4111-1111-1111-1111",
                                  b"378282246310005", b"DE89370400440532013000"])
def test_digit_run_held_back_until_the_check_digit_arrives(insp, card):
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open()
    out, stop = s.feed(TOSERVER, b"\x00\x01raw card=" + card[:-1])  # a raw (unknown) protocol
    assert stop is None
    assert card[:12] not in out and out.endswith(b"card=")  # the prefix is held, not released
    out2, stop = s.feed(TOSERVER, card[-1:])
    if card.isdigit() or b" " in card or b"-" in card:  # the block rule's pack: payment cards
        assert stop is not None and stop.reason.startswith("dlp-block") and out2 == b""


def test_held_digit_run_is_released_when_it_ends_without_a_card(insp):
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open()
    out, _ = s.feed(TOSERVER, b"\x00\x01order 4111111111111")
    assert out == b"\x00\x01order "
    out, stop = s.feed(TOSERVER, b" done")
    assert stop is None and out == b"4111111111111 done"
    s2 = Session(insp, "outbound", ("10.0.0.2", 5001), ("10.0.0.4", 9100))
    assert s2.open()
    out, _ = s2.feed(TOSERVER, b"\x00\x01id 5555555555554")
    out, stop = s2.eof(TOSERVER)
    # the sender closed one digit short of a possible card: the prefix is never released
    assert stop is not None and out == b""
    s3 = Session(insp, "outbound", ("10.0.0.2", 5002), ("10.0.0.4", 9100))
    assert s3.open()
    out, _ = s3.feed(TOSERVER, b"\x00\x01id 5555555555554;")
    assert out.endswith(b";")
    out, stop = s3.eof(TOSERVER)
    assert stop is None


def test_dlp_scanner_exception_refuses_where_dlp_blocks(insp, monkeypatch):
    from firewall.dlp.engine import DlpStream

    def boom(self, data):
        raise RuntimeError("scanner fault")

    monkeypatch.setattr(DlpStream, "scan", boom)
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open()
    out, stop = s.feed(TOSERVER, b"\x00\x01anything")
    assert stop is not None and out == b""
    assert [e["inspection"]["stage"] for e in _inspection_alerts(insp)] == ["scan"]


CONNECT_POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  mode: protect
  default: deny
  ingress:
    - name: shop-proxy
      from: [{namespace: shop}]
      ports: [{port: 80}]
      appProto: http
      http: [{methods: [CONNECT]}, {methods: [POST], pathPrefix: /v1/charge}]
      action: allow
  egress:
    - name: proxy-to-analytics
      to: [{labels: {app: analytics}}]
      ports: [{port: 3128}]
      appProto: http
      http: [{methods: [CONNECT]}]
      action: allow
    - name: analytics-9100
      to: [{cidr: 10.0.0.4/32}]
      ports: [{port: 9100}]
      action: allow
"""


@pytest.fixture
def cinsp(tmp_path, engine):
    p = tmp_path / "p.yaml"
    p.write_text(CONNECT_POLICY)
    events: list = []
    i = Inspection(policy=PolicySet.load([str(p)]), dlp=engine, identities=Peers(), local=LOCAL,
                   emit=events.append)
    i.events = events  # type: ignore[attr-defined]
    return i


def test_connect_tunnel_inner_http_is_reidentified_and_inspected(cinsp):
    s = Session(cinsp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", 80))
    assert s.open()
    connect = b"CONNECT inner.example:80 HTTP/1.1\r\nHost: inner.example:80\r\n\r\n"
    out, stop = s.feed(TOSERVER, connect)
    assert stop is None and out == connect
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"
    out, stop = s.feed(TOCLIENT, established)
    assert stop is None and out == established
    inner = b"GET /admin HTTP/1.1\r\nHost: inner\r\n\r\n"
    out, stop = _feed_all(s, TOSERVER, inner, 4)
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 403") and out == b""


def test_connect_tunnel_with_uninspectable_inner_stream_is_refused(cinsp):
    s = Session(cinsp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", 80))
    assert s.open()
    s.feed(TOSERVER, b"CONNECT inner.example:9999 HTTP/1.1\r\nHost: inner.example:9999\r\n\r\n")
    s.feed(TOCLIENT, b"HTTP/1.1 200 OK\r\n\r\n")
    out, stop = s.feed(TOSERVER, b"\x00\x01\x02binary")
    assert stop is not None and out == b""
    stages = [e["inspection"]["stage"] for e in cinsp.events if e.get("inspection")]
    assert "tunnel" in stages or s.verdict == "deny"


def test_websocket_upgrade_on_a_governed_flow_is_not_passed_uninspected(insp):
    s, _ = inbound(insp)
    up = (b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Content-Length: 0\r\n\r\n")
    out, stop = s.feed(TOSERVER, up)
    assert stop is None and out == up
    out, stop = s.feed(TOCLIENT, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert stop is None
    out, stop = s.feed(TOSERVER, b"\x81\x85\x00\x00\x00\x00hello")
    assert stop is not None and out == b""


def test_outbound_connect_target_is_evaluated_as_an_egress_destination(cinsp):
    s = Session(cinsp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 3128))
    assert s.open()
    denied = b"CONNECT 10.0.0.9:22 HTTP/1.1\r\nHost: 10.0.0.9:22\r\n\r\n"
    out, stop = s.feed(TOSERVER, denied)
    assert stop is not None and stop.reply.startswith(b"HTTP/1.1 403") and out == b""
    s2 = Session(cinsp, "outbound", ("10.0.0.2", 5001), ("10.0.0.4", 3128))
    assert s2.open()
    ok = b"CONNECT 10.0.0.4:9100 HTTP/1.1\r\nHost: 10.0.0.4:9100\r\n\r\n"
    out, stop = s2.feed(TOSERVER, ok)
    assert stop is None and out == ok


def test_compressed_body_paused_one_digit_short_releases_no_decodable_prefix(insp):
    import zlib

    z = zlib.compressobj(wbits=31)
    head_body = b'{"card": "411111111111111'
    first = z.compress(head_body) + z.flush(zlib.Z_SYNC_FLUSH)  # a receiver can decode this much
    rest = z.compress(b'1"}') + z.flush()
    total = len(first) + len(rest)
    head = (b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % total)
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open()
    out, stop = s.feed(TOSERVER, head + first)
    assert stop is None
    got = zlib.decompressobj(wbits=31).decompress(out[len(head):]) if len(out) > len(head) else b""
    assert b"411111111111" not in got, got
    out, stop = s.feed(TOSERVER, rest)
    assert stop is not None and stop.reason.startswith("dlp-block")


def test_identification_undecided_at_max_depth_is_refused_on_a_governed_flow(insp):
    s, _ = inbound(insp)
    # a method token and an authority-form target whose line never ends: HTTP stays possible
    out, stop = _feed_all(s, TOSERVER, b"GET " + b"x" * 4000, 512)
    assert stop is not None and out == b""
    assert [e["inspection"]["reason"] for e in _inspection_alerts(insp)] == ["undecided:http"]


@pytest.mark.parametrize("first", [bytes(range(256)) * 64, b"\x00\x01" * 40000, b"A" * 100 + b"\x00" * 9000])
def test_binary_bulk_is_unknown_not_undecided(insp, first):
    """Random or binary first bytes rule every protocol out: 'unknown', no inspection failure
    (the policy's answer for unknown applies)."""
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open()
    out, stop = s.feed(TOSERVER, first)
    assert stop is None and out == first and s.app_proto == "unknown"
    assert _inspection_alerts(insp) == []


def test_h2_request_with_an_uncanonical_path_is_answered_on_its_stream(tmp_path, engine):
    import h2.config
    import h2.connection

    p = tmp_path / "g.yaml"
    p.write_text(GRPC_POLICY.replace("appProto: grpc", "appProto: http2"))
    insp = Inspection(policy=PolicySet.load([str(p)]), dlp=engine, identities=Peers(), local=LOCAL,
                      emit=lambda e: None)
    s = Session(insp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", 50051))
    assert s.open()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "api"),
                            (":path", "/quotes.Quotes/..%2F..%2Fadmin")], end_stream=True)
    out, stop = s.feed(TOSERVER, client.data_to_send())
    assert stop is not None and stop.reply and b"admin" not in out
    got = {type(e).__name__: e for e in client.receive_data(stop.reply)}
    headers = dict(got["ResponseReceived"].headers)
    assert headers[b":status"] == b"403"


def test_dlp_policy_lookup_failure_refuses_in_protect(insp, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("policy bug")

    monkeypatch.setattr(insp.policy, "dlp_for", boom)
    s = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
    assert s.open() is False and s.verdict == "deny"
    assert [e["inspection"]["stage"] for e in _inspection_alerts(insp)] == ["internal"]


def test_h2c_upgrade_inner_requests_are_reidentified_and_meet_the_rules(tmp_path, engine):
    import h2.config
    import h2.connection

    p = tmp_path / "p.yaml"
    p.write_text(POLICY.replace("      appProto: http\n", ""))  # the http match covers HTTP/2 too
    insp = Inspection(policy=PolicySet.load([str(p)]), dlp=engine, identities=Peers(), local=LOCAL,
                      emit=lambda e: None)
    s = Session(insp, "inbound", ("10.0.0.3", 40000), ("10.0.0.2", 80))
    assert s.open()
    up = (b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
          b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 0\r\n\r\n")
    out, stop = s.feed(TOSERVER, up)
    assert stop is None and out == up
    switched = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    out, stop = s.feed(TOCLIENT, switched)
    assert stop is None and out == switched
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(3, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/admin")],
                        end_stream=True)
    data = client.data_to_send()
    out, stop = _feed_all(s, TOSERVER, data, 7)
    assert stop is not None and b"/admin" not in out and s.app_proto == "http2"
    assert s.summary()["methods_paths"] == [["GET", "/admin"]]
