"""Fail closed: what the sidecar cannot read, normalise or decode never reaches nginx under
the reference policy (protect mode, only GET/POST /v1/charge from checkout).

Every test sends through the real sidecar to real nginx and asserts on nginx's own access
log (the request id it logged, the path it resolved), not on what the sidecar says."""

from __future__ import annotations

import struct
import uuid

import pytest

from .conftest import refused

pytestmark = pytest.mark.netns


def _req(target: str, rid: str, method: str = "GET", extra: str = "", host: str = "Host: payments\r\n",
         version: str = "HTTP/1.1", eol: str = "\r\n") -> bytes:
    head = (f"{method} {target} {version}{eol}{host}X-Req-Id: {rid}{eol}{extra}"
            f"Content-Length: 0{eol}Connection: close{eol}{eol}")
    return head.encode("latin-1")


def _rid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# one anomaly per variant; each is sent on the allowed path (so only the anomaly can stop it)
# and on /admin (the shape: the anomaly used to switch parsing off)
ANOMALIES = {
    "invalid-name-at": "X@y: 1\r\n",
    "invalid-name-paren": "X(y): 1\r\n",
    "invalid-name-utf8": "X\xe9: 1\r\n",
    "space-in-name": "X y: 1\r\n",
    "space-before-colon": "X-A : 1\r\n",
    "tab-before-colon": "X-A\t: 1\r\n",
    "no-colon": "garbage\r\n",
    "empty-name": ": 1\r\n",
    "nul-in-value": "X-A: a\x00b\r\n",
    "cr-in-value": "X-A: a\rb\r\n",
    "obs-fold": "X-A: 1\r\n folded\r\n",
    "obs-fold-tab": "X-A: 1\r\n\tfolded\r\n",
    "leading-space-line": " X-A: 1\r\n",
    "te-gzip-chunked": "Transfer-Encoding: gzip, chunked\r\n",
    "te-identity": "Transfer-Encoding: identity\r\n",
    "cl-and-te": "Transfer-Encoding: chunked\r\n",
    "cl-plus": "Content-Length: +0\r\n",
    "second-host": "Host: other\r\n",
    "second-host-same": "Host: payments\r\n",
}


@pytest.mark.parametrize("path", ["/v1/charge", "/admin"])
@pytest.mark.parametrize("split", [None, 1, 7])
def test_header_anomalies_never_reach_nginx(env, path, split):
    reqs, rids = [], []
    for name, line in ANOMALIES.items():
        rid = _rid(name)
        raw = _req(path, rid, extra=line)
        step = {"hex": raw.hex()}
        if split:
            step.update(split=split, delay=0.001 if split == 1 else 0)
        reqs.append([step])
        rids.append(rid)
    results = env.http(reqs)
    assert len(results) == len(reqs)
    served = env.served_ids()
    for name, rid, res in zip(ANOMALIES, rids, results, strict=True):
        assert rid not in served, f"{name}: nginx served it"
        assert refused(res), (name, res)
        assert res["response"].startswith("HTTP/1.1 400"), (name, res["response"][:80])


def test_a_clean_allowed_request_is_served(env):
    """The control: without the anomaly the same request reaches nginx (the tests above
    would pass vacuously if nothing ever did)."""
    rid = _rid("control")
    (res,) = env.http([_req("/v1/charge", rid)])
    assert res["response"].startswith("HTTP/1.1 200") and "served /v1/charge" in res["response"]
    assert env.wait_served(rid)["uri"] == "/v1/charge"


def test_pipelined_request_after_an_anomaly_never_reaches_nginx(env):
    a, b = _rid("first"), _rid("second")
    first = _req("/v1/charge", a, extra="X@y: 1\r\n").replace(b"Connection: close\r\n", b"")
    second = _req("/admin", b)
    (res,) = env.http([first + second])
    assert refused(res)
    assert not ({a, b} & env.served_ids())


@pytest.mark.parametrize("partial", [
    b"GET /admin\r\n",                       # HTTP/0.9 style
    b"GET /admin",                           # no line end at all
    b"GET /admin HTTP/1.0\r\n",              # a request line, no blank line
    b"GET /admin HTTP/1.1\r\nHost: payments\r\n",
    b"POST /v1/charge/../../admin HTTP/1.0\r\n",
    b"SUBSCRIBE /admin\r\n",
])
@pytest.mark.parametrize("split", [None, 2])
def test_incomplete_head_then_half_close_never_reaches_nginx(env, partial, split):
    before = sum(1 for e in env.served() if "admin" in e.get("uri", "") or "admin" in e.get("request", ""))
    step = {"hex": partial.hex(), "shutdown": True}
    if split:
        step.update(split=split, delay=0.002)
    (res,) = env.http([[step]])
    assert refused(res), res
    after = sum(1 for e in env.served() if "admin" in e.get("uri", "") or "admin" in e.get("request", ""))
    assert after == before, "nginx served a held, incomplete head"


@pytest.mark.parametrize("line", [
    "POST /v1/charge HTTP/1.1\nHost: payments\r\n",                   # bare LF after the request line
    "POST /v1/charge HTTP/1.1\r\nHost: payments\nX-A: 1\r\n",         # bare LF inside
    "POST http://evil.example/v1/charge HTTP/1.1\r\nHost: payments\r\n",  # absolute form vs Host
    "POST /v1/charge HTTP/1.1\r\nHost: payments\r\nHost: payments\r\n",
    "PO(ST /v1/charge HTTP/1.1\r\nHost: payments\r\n",                # invalid token char in the method
    "POST /v1/charge HTTP/1.2\r\nHost: payments\r\n",
    "POST /v1/charge#x HTTP/1.1\r\nHost: payments\r\n",
    "POST /v1/charge/%2e%2e/%2e%2e/%2e%2e/admin HTTP/1.1\r\nHost: payments\r\n",
])
def test_ambiguous_requests_are_refused(env, line):
    rid = _rid("ambiguous")
    raw = (line + f"X-Req-Id: {rid}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode()
    (res,) = env.http([raw])
    assert rid not in env.served_ids()
    assert refused(res), res


@pytest.mark.parametrize("target", [
    "/v1/charge/..%2F..%2Fadmin", "/v1/charge/..%2f..%2fadmin", "/v1/charge/%2E%2E/%2E%2E/admin",
    "/v1/charge/..%5C..%5Cadmin", "/v1/charge/..\\..\\admin", "/v1/charge/%252e%252e/%252e%252e/admin",
    "/v1/charge;/../../admin", "/v1/charge/..;/..;/admin", "/v1/charge/%00/../../admin",
    "/v1/charge/.%2e/.%2e/admin", "/v1/charge/%2e./%2e./admin", "//v1/charge/../../admin",
    "/v1/charge/./../../admin/", "/v1/charge/%3f/../../admin", "/v1/charge%2F..%2F..%2Fadmin",
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_path_tricks_never_serve_anything_outside_the_allowed_prefix(env, target, method):
    rid = _rid("path")
    (res,) = env.http([_req(target, rid, method=method)])
    assert refused(res), res
    assert rid not in env.served_ids()


def test_any_token_method_is_http_and_meets_the_rules(env):
    rids = [_rid(m) for m in ("SUBSCRIBE", "X-CUSTOM", "purge")]
    res = env.http([_req("/admin", r, method=m) for r, m in zip(rids, ("SUBSCRIBE", "X-CUSTOM", "purge"),
                                                                  strict=True)])
    assert all(refused(r) for r in res), res
    assert not (set(rids) & env.served_ids())
    flows = [env.flow(r["port"]) for r in res]
    assert {f["app_proto"] for f in flows} == {"http"}


def _h2_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", sid) + payload


def _h2_request(block: bytes) -> bytes:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    return preface + _h2_frame(0x4, 0, 0, b"") + _h2_frame(0x1, 0x5, 1, block)


def _h2_block(path: str, rid: str) -> bytes:
    from hpack import Encoder

    return Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", path),
                             (":authority", "payments"), ("x-req-id", rid)])


@pytest.mark.parametrize("bad", [
    b"\xff\x50",                 # indexed field far beyond the tables
    b"\x80",                     # index 0
    b"\x40\x85abc",              # literal whose string runs past the block
    b"\x3f\xe1\xff\xff\xff\x0f",  # table size update beyond the limit
])
def test_hpack_errors_are_refused(env, bad):
    before = len(env.served())
    (res,) = env.http([_h2_request(bad)], port=9001)
    assert not res["response"] or res["reset"] or res["closed"]
    assert len(env.served()) == before, "nginx logged a request"
    flow = env.flow(res["port"])
    assert flow["verdict"] == "deny", flow


def test_h2_control_allowed_served_and_denied_path_refused(env):
    ok, bad = _rid("h2ok"), _rid("h2bad")
    res = env.http([_h2_request(_h2_block("/v1/charge", ok)), _h2_request(_h2_block("/v1/charge/..%2F..%2Fadmin", bad)),
                    _h2_request(_h2_block("/admin", bad))], port=9001)
    assert env.wait_served(ok)["uri"] == "/v1/charge"
    assert bad not in env.served_ids()
    assert env.flow(res[1]["port"])["verdict"] == "deny"
