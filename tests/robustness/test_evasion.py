"""Evasion: tricks that try to get a card number or a forbidden protocol past the sidecar.

One sidecar (protect mode, DLP block of payment cards leaving the CDE) in front of the
payments pod; the clients run in the payments pod (outbound, DLP applies) or in the
checkout pod (inbound). Servers record what they received in every form an application
could read it (raw, de-chunked, gunzipped, percent-decoded), and the tests assert that
the complete PAN never arrives in any of them.

Where the current code lets a trick through, the test is a strict xfail naming the bug
(see the module's report in the session notes); it starts failing once fixed.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess

import pytest

from tests.harness import PY, Cluster, wait_until

from .conftest import (
    PAN,
    PAN_MASKED,
    Env,
    assert_no_pan,
    http_request,
    received_everything,
    requests_seen,
    sidecar_outputs,
)

pytestmark = pytest.mark.netns

TLS_SERVER = r"""
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
def echo(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        while True:
            b = t.recv(65536)
            if not b: break
            t.sendall(b)
    except (OSError, ssl.SSLError):
        pass
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
"""

# A TLS client whose ClientHello goes out in small segments: argv = host port sni split delay slow_first
TLS_CLIENT = r"""
import json, socket, ssl, sys, time
host, port, sni, split, delay, slow_first = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname=sni)
s = socket.create_connection((host, port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
res = {"port": s.getsockname()[1], "handshake": False, "echo": None, "error": None, "hello_segments": 0}
first = True
try:
    while True:
        try:
            tls.do_handshake()
            res["handshake"] = True
            break
        except ssl.SSLWantReadError:
            pass
        data = out.read()
        if data:
            if first:
                first = False
                for i in range(0, len(data), split):
                    s.sendall(data[i:i + split]); res["hello_segments"] += 1
                    time.sleep(0.12 if i < slow_first else delay)
            else:
                s.sendall(data)
        got = s.recv(65536)
        if not got:
            raise ConnectionError("closed during the handshake")
        inc.write(got)
    tls.write(b"ping-over-tls")
    s.sendall(out.read())
    buf = b""
    while b"ping-over-tls" not in buf:
        got = s.recv(65536)
        if not got:
            break
        inc.write(got)
        try:
            buf += tls.read(65536)
        except ssl.SSLWantReadError:
            pass
    res["echo"] = buf.decode("latin-1")
except (OSError, ssl.SSLError) as exc:
    res["error"] = type(exc).__name__
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def env():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pr", 220)
    try:
        e = Env(c)
        e.rec = e.recorder(e.analytics, 9100)
        tls = e.tmp / "tls"
        tls.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=analytics", "-keyout", str(tls / "k.pem"), "-out", str(tls / "c.pem")],
                       check=True, capture_output=True)
        for port in (9443, 9444):
            e.analytics.popen([PY, "-c", TLS_SERVER, str(port), str(tls / "c.pem"), str(tls / "k.pem")])
            e.analytics.wait_listening(port)
        e.sc = e.sidecar()
        yield e
        for sc in e.sidecars:
            sc.stop()
        assert assert_no_pan(sidecar_outputs(e.tmp)), "no sidecar output was checked"
    finally:
        c.close()


@pytest.fixture(autouse=True)
def fresh_recorder(env):
    """Each test looks only at what the server received during that test."""
    for name in ("requests.jsonl", "raw.bin"):
        (env.rec / name).unlink(missing_ok=True)


def _flow(env, port: int) -> dict:
    return env.sc.wait_event(lambda e: e.get("event_type") == "flow" and e.get("src_port") == port,
                             timeout=15, what=f"flow record of client port {port}")


def _dlp_alert(env, port: int) -> dict:
    return env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_port") == port
                             and e["alert"]["category"] == "dlp", timeout=10, what="dlp alert")


def _post(env, steps: list[dict], read: float = 5) -> dict:
    return env.client(env.payments, env.analytics.ip, 9100, steps, read=read)


def _assert_blocked(env, res: dict) -> None:
    assert res["response"].startswith("HTTP/1.1 403"), res
    alert = _dlp_alert(env, res["port"])
    assert alert["alert"]["action"] == "blocked" and alert["dlp"]["masked"] == PAN_MASKED
    flow = _flow(env, res["port"])
    assert flow["verdict"] == "deny" and flow["close_reason"] == "dlp-block", flow
    assert PAN not in received_everything(env.rec)


def test_pan_in_one_byte_segments_with_delays_is_blocked(env):
    body = json.dumps({"order": 1, "card": PAN}).encode()
    head = http_request("POST", "/collect", headers={"Content-Length": str(len(body)),
                                                     "Content-Type": "application/json"})
    res = _post(env, [{"send": head}, {"send": body.decode(), "split": 1, "delay": 0.004}])
    _assert_blocked(env, res)
    # the digit run is held back once it could be a card missing only its check digit (12+
    # digits): the server saw at most an 11-digit prefix (it used to see 15 of 16, and Luhn
    # restores the 16th)
    seen = received_everything(env.rec)
    assert '"card": "4111' in seen and PAN[:12] not in seen


def test_pan_in_pipelined_second_request_is_blocked(env):
    first = http_request("POST", "/collect", b'{"order": 1}')
    second = http_request("POST", "/collect", json.dumps({"card": PAN}).encode())
    res = _post(env, [{"send": first + second}])
    _assert_blocked(env, res)


def test_pan_in_second_request_on_keepalive_is_blocked_first_delivered(env):
    first = http_request("POST", "/collect", b'{"order": "keepalive-first"}')
    second = http_request("POST", "/collect", json.dumps({"card": PAN}).encode())
    res = _post(env, [{"send": first, "wait_response": 5}, {"send": second}])
    assert res["response"].startswith("HTTP/1.1 200 OK"), res
    assert "HTTP/1.1 403" in res["response"]
    _dlp_alert(env, res["port"])
    assert any(r["body"] == '{"order": "keepalive-first"}' for r in requests_seen(env.rec))
    assert PAN not in received_everything(env.rec)


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def test_pan_split_across_chunked_encoding_boundaries_is_blocked(env):
    body = _chunked([b'{"card": "41111111', b"11111111", b'"}'])
    head = http_request("POST", "/collect", headers={"Transfer-Encoding": "chunked"})
    res = _post(env, [{"send": head + body.decode()}])
    assert PAN not in received_everything(env.rec), "the server received the complete PAN"
    assert res["response"].startswith("HTTP/1.1 403"), res


def test_pan_chunked_but_whole_inside_one_chunk_is_blocked(env):
    body = _chunked([b'{"card": "' + PAN.encode() + b'"}'])
    head = http_request("POST", "/collect", headers={"Transfer-Encoding": "chunked"})
    _assert_blocked(env, _post(env, [{"send": head + body.decode(), "split": 7}]))


def test_pan_in_gzip_body_is_blocked_or_refused(env):
    body = gzip.compress(json.dumps({"card": PAN}).encode())
    head = http_request("POST", "/collect", headers={"Content-Encoding": "gzip", "Content-Length": str(len(body))})
    res = _post(env, [{"send": head + body.decode("latin-1")}])
    assert PAN not in received_everything(env.rec), "the server gunzipped the complete PAN"
    assert res["response"].startswith(("HTTP/1.1 403", "HTTP/1.1 415")), res


def test_pan_percent_encoded_in_query_is_blocked(env):
    enc = "".join(f"%{ord(ch):02X}" for ch in PAN)
    res = _post(env, [{"send": http_request("GET", f"/collect?card={enc}")}])
    assert not any(PAN in r["target"] for r in requests_seen(env.rec)), "the server decoded the PAN"
    assert res["response"].startswith("HTTP/1.1 403"), res


def test_pan_plain_in_query_is_blocked(env):
    _assert_blocked(env, _post(env, [{"send": http_request("GET", f"/collect?card={PAN}&x=1")}]))


SMUGGLING = {
    "cl-te": {"Content-Length": "4", "Transfer-Encoding": "chunked"},
    "duplicate-content-length": [("Content-Length", "4"), ("Content-Length", "40")],
    "te-not-chunked-last": {"Transfer-Encoding": "chunked, identity"},
    "space-before-colon": [("Transfer-Encoding ", "chunked")],
    "obs-fold": [("Transfer-Encoding", "identity\r\n chunked")],
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shapes_are_refused_with_400(env, shape):
    hdrs = SMUGGLING[shape]
    items = hdrs.items() if isinstance(hdrs, dict) else hdrs
    head = "POST /collect HTTP/1.1\r\nHost: analytics\r\n" + "".join(f"{k}: {v}\r\n" for k, v in items) + "\r\n"
    smuggled = "0\r\n\r\nGET /smuggled-" + shape + " HTTP/1.1\r\nHost: analytics\r\n\r\n"
    res = _post(env, [{"send": head + smuggled}])
    assert res["response"].startswith("HTTP/1.1 400"), res
    assert "refused by palisade" in res["response"]
    flow = _flow(env, res["port"])
    assert flow["verdict"] == "deny" and flow["close_reason"] == "anomaly", flow
    alert = env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_port") == res["port"]
                              and e["alert"]["category"] == "protocol", what="smuggling alert")
    assert alert["alert"]["signature"].startswith("http:smuggling") and alert["alert"]["action"] == "blocked"
    assert requests_seen(env.rec) == [], "the server saw a request"
    assert "/smuggled-" + shape not in received_everything(env.rec)


def test_ssh_on_a_port_allowed_only_for_http_is_denied(env):
    tmp = env.tmp / "ssh"
    tmp.mkdir(exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "hostkey")], check=True)
    (tmp / "sshd_config").write_text(f"Port 9002\nHostKey {tmp}/hostkey\nPidFile {tmp}/sshd.pid\n"
                                     "UsePAM no\nPasswordAuthentication no\n")
    os.makedirs("/run/sshd", exist_ok=True)
    env.payments.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")])
    env.payments.wait_listening(9002)
    # the plain HTTP the port is for still works up to the app (sshd answers it with its banner/close)
    res = env.client(env.checkout, env.payments.ip, 9002, [{"send": "SSH-2.0-OpenSSH_9.2p1 evasion\r\n"}])
    assert "SSH-2.0" not in res["response"], "the server's SSH banner reached the client"
    flow = _flow(env, res["port"])
    assert flow["app_proto"] == "ssh" and flow["verdict"] == "deny", flow
    assert flow["rule"] != "checkout-http-only"
    r = env.checkout.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                          "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-p", "9002",
                          f"nobody@{env.payments.ip}", "true"], check=False, timeout=30)
    assert r.returncode == 255, r
    assert "banner exchange" in r.stderr or "Connection" in r.stderr, r.stderr


def _tls(env, port: int, sni: str, split: int, delay: float, slow_first: int = 0) -> dict:
    r = env.payments.run([PY, "-c", TLS_CLIENT, env.analytics.ip, str(port), sni, str(split), str(delay),
                          str(slow_first)], check=False, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tls_client_hello_in_one_byte_segments_still_yields_the_sni(env):
    res = _tls(env, 9443, "split.analytics.example", split=1, delay=0.001)
    assert res["hello_segments"] > 200, res
    assert res["handshake"] and res["echo"] == "ping-over-tls", res
    flow = _flow(env, res["port"])
    assert flow["app_proto"] == "tls" and flow["encrypted"] is True
    assert flow["l7"].get("sni") == "split.analytics.example", flow["l7"]


def test_tls_sni_deny_rule_refuses_the_handshake(env):
    res = _tls(env, 9444, "c2.evil.example", split=7, delay=0.0)
    assert not res["handshake"], res
    flow = _flow(env, res["port"])
    assert flow["verdict"] == "deny" and flow["rule"] == "no-evil-sni", flow
    ok = _tls(env, 9444, "fine.example", split=7, delay=0.0)
    assert ok["handshake"] and ok["echo"] == "ping-over-tls", ok


def test_tls_sni_deny_rule_holds_for_a_slow_client_hello(env):
    res = _tls(env, 9444, "c2.evil.example", split=1, delay=0.0, slow_first=6)
    flow = _flow(env, res["port"])
    assert not res["handshake"], f"handshake to a denied SNI completed: {res} {flow}"
    assert flow["verdict"] == "deny" and flow["rule"] == "no-evil-sni", flow


def test_no_event_or_log_holds_a_full_pan(env):
    wait_until(lambda: env.sc.events("flow"), 5)
    files = assert_no_pan(sidecar_outputs(env.tmp))
    assert any(f.endswith("-eve.json") for f in files) and any(f.endswith("-sidecar.log") for f in files)
