"""The parts of Palisade that traffic reaches besides the relay stay bounded under attack.

Admin port (slowloris, connection floods, huge or malformed requests), the alert
webhook queue (huge alerts behind a slow receiver), ``policy learn`` (traffic
crafted to widen or stall it) and the auditor report (a flood of outside
addresses next to the CDE). In-process tests use the real classes on
127.0.0.1; the ``netns`` tests attack the real sidecar from another pod while a
relayed flow is measured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from firewall.observe.metrics import AdminLimits, AdminServer
from tests.harness import PY, wait_until

# --------------------------------------------------------------------------- admin port, in process


class _Admin:
    """An AdminServer on its own event loop thread (as in the sidecar: one loop, shared)."""

    def __init__(self, limits: AdminLimits, node_ip: str | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.srv = AdminServer("127.0.0.1", 0, lambda: True, limits, node_ip=node_ip)
        self._t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._t.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)

    async def _start(self) -> None:
        self.srv.port = 0
        await self.srv.start()
        assert self.srv._server is not None
        self.port = self.srv._server.sockets[0].getsockname()[1]

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return s

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.srv.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._t.join(5)


def _exchange(admin: _Admin, data: bytes) -> bytes:
    s = admin.connect()
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything we send
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            out += b
        return out
    finally:
        s.close()


def _closed_within(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            b = s.recv(4096)
            if not b:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def admin_factory():
    made: list[_Admin] = []

    def make(**kw) -> _Admin:
        node_ip = kw.pop("node_ip", None)
        a = _Admin(AdminLimits(**kw), node_ip)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def test_admin_serves_health_and_metrics(admin_factory):
    a = admin_factory()
    assert _exchange(a, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 200")
    out = _exchange(a, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200") and b"palisade_admin_rejected" in out
    assert _exchange(a, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404")


@pytest.mark.parametrize("interval", [0.3, 0.9])
def test_admin_slowloris_cut_by_the_overall_deadline(admin_factory, interval):
    """Header lines trickling in faster than any per-line timeout: the whole request has a deadline."""
    deadline = 1.5
    a = admin_factory(request_timeout=deadline, max_connections=64)
    socks = [a.connect() for _ in range(20)]
    t0 = time.monotonic()
    for s in socks:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
    closed_at: dict[int, float] = {}
    while len(closed_at) < len(socks) and time.monotonic() - t0 < deadline + 3:
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed_at[i] = time.monotonic() - t0
                continue
            s.setblocking(False)
            try:
                if s.recv(4096) == b"":
                    closed_at[i] = time.monotonic() - t0
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed_at[i] = time.monotonic() - t0
            s.setblocking(True)
        time.sleep(interval)
    for s in socks:
        s.close()
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} slow connections still open"
    assert max(closed_at.values()) < deadline + interval + 1.0
    assert not a.loop_errors


def test_admin_connection_cap_and_recovery(admin_factory):
    a = admin_factory(max_connections=4, request_timeout=30)
    held = [a.connect() for _ in range(4)]
    for s in held:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")  # admitted, waiting for the end of headers
    wait_until(lambda: a.srv._open[True] == 4, 5, what="4 admitted connections")
    extra = a.connect()
    assert _closed_within(extra, 2.0), "a connection over the cap was not closed at once"
    extra.close()
    for s in held:
        s.sendall(b"\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 200")
        s.close()
    wait_until(lambda: a.srv._open[True] == 0, 5, what="slots freed")
    assert _exchange(a, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 200")


BAD_REQUESTS = {
    "64k-request-line": b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n\r\n",
    "1m-request-line-no-newline": b"G" * (1 << 20),
    "long-header": b"GET / HTTP/1.1\r\nX: " + b"b" * 10000 + b"\r\n\r\n",
    "many-headers": b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 100 + b"\r\n",
    "total-size": b"GET / HTTP/1.1\r\n" + (b"X: " + b"c" * 1000 + b"\r\n") * 20 + b"\r\n",
    "no-version": b"GET /healthz\r\n\r\n",
    "post": b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    "binary": bytes(range(256)) + b"\r\n\r\n",
    "tls-hello": bytes.fromhex("160301002a0100002603") + b"\x00" * 38 + b"\r\n\r\n",
    "empty-line": b"\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_admin_bad_request_is_400_without_traceback(admin_factory, caplog, name):
    a = admin_factory()
    caplog.set_level(logging.DEBUG)
    out = _exchange(a, BAD_REQUESTS[name])
    assert out.startswith(b"HTTP/1.0 400"), out[:100]
    assert b"Traceback" not in out and len(out) < 300
    assert not a.loop_errors, a.loop_errors
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    # and the port still answers
    assert _exchange(a, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 200")


def test_admin_allow_list_config_rejects_bad_entries(tmp_path):
    from firewall.sidecar.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("admin_allow: [node, 10.0.0.0/8, 'fd00::/8']\nadmin_request_timeout: 2\n")
    cfg = load_config(str(p))
    assert cfg.admin_allow == ["node", "10.0.0.0/8", "fd00::/8"] and cfg.admin_request_timeout == 2.0
    p.write_text("admin_allow: [kubelet]\n")
    with pytest.raises(ConfigError, match="admin_allow"):
        load_config(str(p))
    p.write_text("admin_max_connections: 0\n")
    with pytest.raises(ConfigError, match="admin_max_connections"):
        load_config(str(p))


# --------------------------------------------------------------------------- admin port, real sidecar

ATTACK = r"""
import json, socket, sys, threading, time
host, n, interval, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
big = sys.argv[5] == "big"
socks, opened, closed = [], {}, {}
t0 = time.monotonic()
for i in range(n):
    s = socket.create_connection((host, 15020), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\n")
    s.setblocking(False)
    socks.append(s)
results = {"bad": []}
def big_lines():
    # a stream of oversized request lines on fresh connections while the slow ones hang
    for _ in range(10 if big else 0):
        try:
            c = socket.create_connection((host, 15020), timeout=5)
            try:
                c.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
            except OSError:
                pass
            data = b""
            try:
                while True:
                    b = c.recv(4096)
                    if not b:
                        break
                    data += b
            except OSError:
                pass
            results["bad"].append(data[:12].decode("latin-1"))
            c.close()
        except OSError as e:
            results["bad"].append("err:" + type(e).__name__)
        time.sleep(0.2)
t = threading.Thread(target=big_lines)
t.start()
while len(closed) < n and time.monotonic() - t0 < duration:
    for i, s in enumerate(socks):
        if i in closed:
            continue
        try:
            if s.recv(4096) == b"":
                closed[i] = time.monotonic() - t0
                continue
        except BlockingIOError:
            pass
        except OSError:
            closed[i] = time.monotonic() - t0
            continue
        if int((time.monotonic() - t0) / interval) > opened.get(i, 0):
            opened[i] = int((time.monotonic() - t0) / interval)
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed[i] = time.monotonic() - t0
    time.sleep(0.05)
t.join()
print(json.dumps({"n": n, "closed": len(closed), "times": sorted(closed.values()), "bad": results["bad"]}))
"""

LATENCY = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for _ in range(n):
    t = time.monotonic()
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"ping\n")
    assert s.recv(100) == b"ping\n"
    s.close()
    lat.append(time.monotonic() - t)
lat.sort()
print(json.dumps({"p50": lat[len(lat) // 2], "max": lat[-1]}))
"""


def _measure(cli, srv, echo_port: int) -> dict:
    t = time.monotonic()
    r = cli.blast(srv.ip, client_bytes=40_000_000, server_bytes=40_000_000)
    secs = time.monotonic() - t
    assert r["failed"] == 0, r
    lat = json.loads(cli.run([PY, "-c", LATENCY, srv.ip, str(echo_port), "30"]).stdout)
    return {"mb_s": 80 / secs, **lat}


@pytest.mark.netns
def test_admin_attack_from_another_pod_is_cut_while_the_data_path_keeps_serving(cluster):
    srv, cli, attacker = cluster.pod("server"), cluster.pod("client"), cluster.pod("attacker")
    attacker2 = cluster.pod("attacker2")
    srv.serve_blast(9000)
    srv.popen(["socat", "TCP-LISTEN:9001,fork,reuseaddr", "EXEC:cat"])
    srv.wait_listening(9001)
    sc = srv.start_sidecar("--no-l7", "--no-dlp", "--no-splice")
    baseline = _measure(cli, srv, 9001)
    # 50 slowloris connections (one header line every 4 s) + oversized request lines
    atk = attacker.popen([PY, "-c", ATTACK, srv.ip, "50", "4", "12", "slow"], text=True)
    # from a second pod: oversized request lines (and 5 more slow connections)
    atk2 = attacker2.popen([PY, "-c", ATTACK, srv.ip, "5", "4", "12", "big"], text=True)
    wait_until(lambda: "palisade_admin_rejected_total" in sc.http("/metrics")[1]
               and 'reason="per-source-cap"' in sc.http("/metrics")[1], 10, what="attack under way")
    during = _measure(cli, srv, 9001)
    # the pod's own probes (loopback: trusted budget) keep answering during the attack
    assert sc.http("/healthz")[0] == 200
    out, _ = atk.communicate(timeout=30)
    res = json.loads(out.strip().splitlines()[-1])
    out2, _ = atk2.communicate(timeout=30)
    res2 = json.loads(out2.strip().splitlines()[-1])
    assert res["closed"] == 50 and res2["closed"] == 5, (res, res2)  # none left hanging
    # admitted ones were cut by the 5 s request deadline (+ one poll/scheduling slack)
    assert max(res["times"] + res2["times"]) < 5 + 2.0, (res["times"], res2["times"])
    # 8 admitted from the first pod, the other 42 refused at accept (per-source cap)
    assert sum(1 for t in res["times"] if t > 4) == 8, res["times"]
    # the second pod's 5 slow connections are within its own per-source budget; of its 10
    # oversized lines, those sent while 3 slots were free are answered 400
    assert len(res2["bad"]) == 10 and all(b in ("HTTP/1.0 400", "") for b in res2["bad"]), res2["bad"]
    assert res2["bad"].count("HTTP/1.0 400") >= 3, res2["bad"]
    metrics = sc.http("/metrics")[1]
    assert 'palisade_admin_rejected_total{reason="deadline"}' in metrics
    assert 'palisade_admin_rejected_total{reason="bad-request"}' in metrics
    assert "Traceback" not in sc.stderr()
    print(f"admin attack: baseline {baseline}, during attack {during}")
    assert during["mb_s"] > 0.3 * baseline["mb_s"], (baseline, during)
    assert during["p50"] < max(0.05, 5 * baseline["p50"]), (baseline, during)


@pytest.mark.netns
def test_admin_allow_list_serves_node_and_loopback_only(cluster, tmp_path):
    srv, node, other = cluster.pod("server"), cluster.pod("node"), cluster.pod("other")
    conf = tmp_path / "sidecar.yaml"
    conf.write_text("admin_allow: [node]\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(conf, 0o644)
    sc = srv.start_sidecar("--no-l7", "--no-dlp", "--config", str(conf), env={"HOST_IP": node.ip})
    probe = textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("{srv.ip}", 15020), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\\r\\n\\r\\n")
        try:
            print(s.recv(100)[:12].decode() or "closed")
        except OSError as e:
            print("closed")
    """)
    assert node.run([PY, "-c", probe]).stdout.strip() == "HTTP/1.0 200"
    assert other.run([PY, "-c", probe]).stdout.strip() == "closed"
    assert sc.http("/healthz")[0] == 200  # loopback
    assert 'palisade_admin_rejected_total{reason="not-allowed"} 1.0' in sc.http("/metrics")[1]


@pytest.mark.netns
def test_admin_flood_filling_the_cap_cannot_fail_the_kubelet_probe(cluster, tmp_path):
    """The total cap is full of another pod's connections: loopback and the node still get answers."""
    srv, node, attacker = cluster.pod("server"), cluster.pod("node"), cluster.pod("attacker")
    conf = tmp_path / "sidecar.yaml"
    conf.write_text("admin_max_connections: 4\nadmin_max_per_source: 10\nadmin_request_timeout: 30\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(conf, 0o644)
    sc = srv.start_sidecar("--no-l7", "--no-dlp", "--config", str(conf), env={"HOST_IP": node.ip})
    atk = attacker.popen([PY, "-c", ATTACK, srv.ip, "10", "1", "8", "slow"], text=True)
    wait_until(lambda: 'palisade_admin_rejected_total{reason="connection-cap"} 6.0' in sc.http("/metrics")[1],
               10, what="6 of 10 refused by the cap of 4")
    probe = textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("{srv.ip}", 15020), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\\r\\n\\r\\n")
        print(s.recv(100)[:12].decode() or "closed")
    """)
    assert node.run([PY, "-c", probe]).stdout.strip() == "HTTP/1.0 200"  # the kubelet's address
    assert sc.http("/healthz")[0] == 200  # loopback
    assert attacker.run([PY, "-c", probe], check=False).stdout.strip() != "HTTP/1.0 200"
    atk.kill()


# --------------------------------------------------------------------------- webhook queue in bytes


class _SlowReceiver:
    """A webhook endpoint that takes ``delay`` seconds per POST (a slow SIEM)."""

    def __init__(self, delay: float) -> None:
        self.bodies = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.bodies += 1
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("path_kb", [60, 1])
def test_webhook_queue_bounded_in_bytes_behind_a_slow_endpoint(path_kb):
    from prometheus_client import REGISTRY

    from firewall.observe.alertsink import WebhookSink

    rec = _SlowReceiver(0.5)
    budget = 4 << 20
    sink = WebhookSink(rec.url, queue_bytes=budget, queue_size=10000, batch=10).start()
    before_drop = REGISTRY.get_sample_value("palisade_alert_webhook_dropped_total", {"reason": "queue_full"}) or 0
    rss0 = _rss_mib()
    peak_q = 0
    try:
        for i in range(10000):
            sink({"event_type": "alert", "alert": {"signature": "deny"},
                  "http": {"url": f"/{i}/" + "p" * (path_kb * 1024)}})
            if i % 500 == 0:
                peak_q = max(peak_q, sink.queued_bytes)
        peak_q = max(peak_q, sink.queued_bytes)
        grown = _rss_mib() - rss0
        assert peak_q <= budget
        dropped = REGISTRY.get_sample_value("palisade_alert_webhook_dropped_total", {"reason": "queue_full"})
        if path_kb == 60:
            # 10,000 x 60 KB = 600 MB offered; at most the 4 MiB budget (+ one batch in flight) is held
            assert sink.dropped > 9000 and dropped - before_drop == sink.dropped
            assert grown < 64, f"RSS grew {grown:.0f} MiB"
        else:
            assert sink.queued <= 10000
        print(f"webhook {path_kb} KB paths: peak queue {peak_q / 2**20:.1f} MiB, RSS +{grown:.0f} MiB, "
              f"dropped {sink.dropped}")
    finally:
        sink.stop(flush_timeout=0.1)
        rec.close()


def test_webhook_single_event_bigger_than_the_budget_dropped_as_too_large():
    from firewall.observe.alertsink import WebhookSink

    rec = _SlowReceiver(0)
    sink = WebhookSink(rec.url, queue_bytes=10_000, batch=1)
    try:
        sink({"event_type": "alert", "x": "y" * 20_000})
        sink({"event_type": "alert", "x": "small"})
        assert sink.dropped == 1 and sink.queued == 1
        sink.start()
        wait_until(lambda: rec.bodies == 1 and sink.queued == 0, 5, what="the small one delivered")
        assert sink.queued_bytes == 0
    finally:
        sink.stop(flush_timeout=1)
        rec.close()


def test_webhook_queue_bytes_config(tmp_path):
    from firewall.sidecar.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("webhook_queue_bytes: 1048576\nwebhook_queue_size: 100\n")
    cfg = load_config(str(p))
    assert cfg.webhook_queue_bytes == 1 << 20 and cfg.webhook_queue_size == 100
    p.write_text("webhook_queue_bytes: 0\n")
    with pytest.raises(ConfigError, match="webhook_queue_bytes"):
        load_config(str(p))



# --------------------------------------------------------------------------- policy learn

SCOPE = "pci.palisade.dev/scope"
_API = {"namespace": "payments", "pod": "api-1", "labels": {"app": "api", SCOPE: "cde"}}
_WEB = {"namespace": "shop", "pod": "web-1", "labels": {"app": "web", SCOPE: "connected"}}


def _flow(paths=None, app="http", port=9000, bytes_toserver=None, direction="inbound", peer=None) -> dict:
    peer = peer or _WEB
    src, dst = (peer, _API) if direction == "inbound" else (_API, peer)
    ev = {"event_type": "flow", "direction": direction, "verdict": "allow", "mode": "learn", "proto": "TCP",
          "dest_port": port, "app_proto": app, "src_workload": src, "dest_workload": dst,
          "l7": {"methods_paths": paths} if paths else {}}
    if bytes_toserver is not None:
        ev["flow"] = {"bytes_toserver": bytes_toserver, "bytes_toclient": 0}
    if isinstance(peer, dict) and peer.get("world"):
        ev["dest_ip" if direction == "outbound" else "src_ip"] = peer["ip"]
    return ev


def _learn(events, tmp_path, **opts):
    from firewall.policy.engine import PolicySet
    from firewall.policy.learn import LearnOptions, learn_from_events, render_policies

    pols = learn_from_events(events, options=LearnOptions(**opts))
    text = render_policies(pols)
    path = tmp_path / "learned.yaml"
    path.write_text(text)
    return pols, text, PolicySet.load([str(path)])


def _http_allowed(ps, method: str, path: str, port: int = 9000) -> bool:
    from firewall.identity.identity import Identity
    from firewall.policy.engine import FlowInfo
    from firewall.protocols.base import L7Event

    api = Identity.make("10.0.0.5", "payments", "api-1", _API["labels"])
    web = Identity.make("10.0.1.5", "shop", "web-1", _WEB["labels"])
    flow = FlowInfo("ingress", api, web, port)
    if ps.decide(flow).verdict != "allow":
        return False
    d = ps.decide_app(flow, "http")
    if d is not None and d.verdict != "allow":
        return False
    d = ps.decide_l7(flow, L7Event("http", "request", 0, 0, {"method": method, "path": path}))
    return d is None or d.verdict == "allow"


@pytest.mark.parametrize("path", ["/1", "/123/x", "/%31", "//1", "/./1", "/a/../1", "/9f8e7d6c5b4a/z",
                                  "/" + "A1" * 15])
def test_learn_one_id_like_request_never_gives_a_root_prefix(tmp_path, path):
    pols, text, ps = _learn([_flow([["GET", path]])], tmp_path)
    assert "pathPrefix: /\n" not in text and "pathPrefix: /}" not in text, text
    assert not _http_allowed(ps, "GET", "/admin/users")
    assert not _http_allowed(ps, "GET", "/")


def test_learn_root_request_is_refused_and_reported(tmp_path):
    pols, text, ps = _learn([_flow([["GET", "/"]]), _flow([["GET", "/v1/status"]])], tmp_path)
    assert "not learned: 1 x request whose prefix would be shallower than 1" in text
    assert _http_allowed(ps, "GET", "/v1/status") and not _http_allowed(ps, "GET", "/admin")
    # only root requests: no rule at all (not an HTTP rule without path restriction)
    pols, text, ps = _learn([_flow([["GET", "/"]])], tmp_path)
    assert not pols[0].rules and not _http_allowed(ps, "GET", "/anything")
    assert "all of whose requests were refused" in text
    # --min-path-depth 0 restores the old behaviour for who wants it
    pols, text, ps = _learn([_flow([["GET", "/"]])], tmp_path, min_path_depth=0)
    assert _http_allowed(ps, "GET", "/anything")


def test_learn_min_path_depth_two(tmp_path):
    pols, text, ps = _learn([_flow([["POST", "/v1/charge/1"], ["GET", "/v1/7"]])], tmp_path, min_path_depth=2)
    assert _http_allowed(ps, "POST", "/v1/charge/99") and _http_allowed(ps, "GET", "/v1/7")
    assert not _http_allowed(ps, "GET", "/v1/8") and not _http_allowed(ps, "GET", "/v1")


@pytest.mark.parametrize("variant", ["empty-same-port", "empty-other-port", "garbage-same-port", "failed-same-port"])
def test_learn_empty_or_unidentified_connections_do_not_cancel_l7_narrowing(tmp_path, variant):
    extra = {
        "empty-same-port": _flow(app=None, bytes_toserver=0),
        "empty-other-port": _flow(app=None, port=9001, bytes_toserver=0),
        "garbage-same-port": _flow(app="unknown", bytes_toserver=100),
        "failed-same-port": _flow(app="failed", bytes_toserver=5000),
    }[variant]
    events = [_flow([["GET", "/v1/status"]]), extra, extra]
    pols, text, ps = _learn(events, tmp_path)
    assert _http_allowed(ps, "GET", "/v1/status")
    assert not _http_allowed(ps, "GET", "/admin"), text
    assert not _http_allowed(ps, "GET", "/v1/status", port=9001)
    assert [r.app for r in pols[0].rules] == ["http"], text
    assert "# not learned: 2 x" in text


def test_learn_unidentified_data_on_its_own_port_is_still_learned(tmp_path):
    pols, text, ps = _learn([_flow([["GET", "/v1/status"]]), _flow(app=None, port=7000, bytes_toserver=10)],
                            tmp_path)
    assert sorted((r.app or "", sorted(r.ports)) for r in pols[0].rules) == [("", [(7000, "TCP")]),
                                                                           ("http", [(9000, "TCP")])]


def test_learn_prefix_aggregation_is_linear(tmp_path):
    from firewall.policy.learn import learn_from_events, render_policies

    def run(n: int) -> float:
        evs = [_flow([["GET", f"/p{chr(97 + i % 26)}x{i}/q"]]) for i in range(n)]
        t = time.perf_counter()
        render_policies(learn_from_events(evs))
        return time.perf_counter() - t

    small, big = run(4000), run(16000)
    print(f"learn: 4k prefixes {small:.2f}s, 16k prefixes {big:.2f}s")
    assert big < 3.0
    assert big < 4 * small * 2.5  # linear (x4 input) with slack, quadratic would be x16


def test_learn_many_prefixes_are_bounded_widened_then_refused(tmp_path):
    evs = [_flow([["GET", f"/api/item{i}x"]]) for i in range(100)] + [_flow([["GET", "/v1/hot"]])] * 5
    pols, text, ps = _learn(evs, tmp_path, max_prefixes_per_rule=8)
    http = [h for r in ps.documents[0].spec.ingress for h in (r.http or [])]
    assert 1 <= len(http) <= 8
    assert _http_allowed(ps, "GET", "/v1/hot")  # the most used is kept
    assert "path prefix beyond the 8 most used" in text or "widened" in text


def test_learn_hostile_methods_and_huge_paths_are_refused_not_injected(tmp_path):
    evs = [_flow([["GET\nspec: {default: allow}", "/v1/a"], ["GET", "/" + "x" * 5000], ["GET", "/v1/ok"]])]
    pols, text, ps = _learn(evs, tmp_path)
    assert "default: allow" not in text.replace("# not learned", "")  # not as YAML, at most in a comment
    for line in text.splitlines():
        assert line.startswith("#") or "default: allow" not in line
    assert "method that is not an HTTP token" in text and "longer than 200" in text
    assert _http_allowed(ps, "GET", "/v1/ok") and not _http_allowed(ps, "GET", "/" + "x" * 5000)
    assert ps.documents[0].spec.default == "deny"


@pytest.mark.parametrize("family", [4, 6])
def test_learn_50k_outside_addresses_give_a_small_policy_that_validates_fast(tmp_path, family):
    from firewall.cli import main

    evs = []
    for i in range(50000):
        ip = (f"{11 + i // 65536}.{i // 256 % 256}.{i % 256}.7" if family == 4
              else f"2001:db8:{i % 4096:x}:{i // 4096:x}::7")
        evs.append(_flow(app="tls", port=443, direction="outbound", peer={"world": True, "ip": ip}))
    evs += [_flow([["GET", "/v1/status"]])]
    src = tmp_path / "eve.jsonl"
    src.write_text("\n".join(json.dumps(e) for e in evs) + "\n")
    out = tmp_path / "learned.yaml"
    t = time.perf_counter()
    assert main(["policy", "learn", "--events", str(src), "-o", str(out)]) == 0
    t_learn = time.perf_counter() - t
    size = out.stat().st_size
    t = time.perf_counter()
    assert main(["policy", "validate", str(out)]) == 0
    t_val = time.perf_counter() - t
    print(f"learn 50k IPv{family} peers: {t_learn:.1f}s, policy {size} bytes, validate {t_val:.2f}s")
    assert size < 10_000 and t_val < 5
    text = out.read_text()
    assert "aggregated: 50000 outside addresses" in text

    from firewall.identity.identity import Identity
    from firewall.policy.engine import FlowInfo, PolicySet

    ps = PolicySet.load([str(out)])
    api = Identity.make("10.0.0.5", "payments", "api-1", _API["labels"])
    seen = "11.0.3.7" if family == 4 else "2001:db8:3::7"
    assert ps.decide(FlowInfo("egress", api, Identity(seen), 443)).verdict == "allow"
    assert ps.decide(FlowInfo("egress", api, Identity(seen), 80)).verdict == "deny"


def test_learn_few_outside_addresses_stay_individual(tmp_path):
    evs = [_flow(app="tls", port=443, direction="outbound", peer={"world": True, "ip": f"198.51.100.{i}"})
           for i in range(1, 6)]
    pols, text, ps = _learn(evs, tmp_path)
    assert text.count("/32}") == 5 and "aggregated" not in text


def test_learn_http_connection_without_a_request_gives_no_unrestricted_rule(tmp_path):
    pols, text, ps = _learn([_flow(None, app="http", bytes_toserver=3)], tmp_path)
    assert not pols[0].rules and "without a complete request" in text
    assert not _http_allowed(ps, "GET", "/anything")
    # with a real request from the same peer the narrowing is kept
    pols, text, ps = _learn([_flow(None, app="http", bytes_toserver=3), _flow([["GET", "/v1/a"]])], tmp_path)
    assert _http_allowed(ps, "GET", "/v1/a") and not _http_allowed(ps, "GET", "/v2")
