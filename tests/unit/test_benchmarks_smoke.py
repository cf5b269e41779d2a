"""benchmarks/run.py's report helpers and benchmarks/loadgen.py, without network namespaces.

The full benchmark needs root and minutes; these check that what it prints and writes is
right (table, derived ratios, targets, parsers of wrk / redis-benchmark output) and that the
load generator keeps an open-loop schedule and charges a server stall to every request it
delayed (coordinated-omission correction), against a real HTTP server on loopback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


loadgen = _load("palisade_bench_loadgen", "loadgen.py")
bench = _load("palisade_bench_run", "run.py")

PATHS = {
    "direct": {"bulk_up_MBps": 2000, "bulk_down_MBps": 2000, "text_up_MBps": 1500, "text_down_MBps": 1500,
               "rps_p50_us": 100.0, "rps_p90_us": 150.0, "rps_p99_us": 300.0, "rps_p99.9_us": 900.0,
               "redis_SET_rps": 50000, "redis_GET_rps": 50000, "redis_LPUSH_rps": 40000,
               "redis_LRANGE_100_rps": 20000, "sat_rps": 30000, "pingpong_p99_us": 50.0},
    "nginx": {"bulk_up_MBps": 1000, "bulk_down_MBps": 1000, "text_up_MBps": 1000, "text_down_MBps": 1000,
              "rps_p50_us": 150.0, "rps_p90_us": 200.0, "rps_p99_us": 400.0, "rps_p99.9_us": 1000.0,
              "redis_SET_rps": 40000, "redis_GET_rps": 40000, "redis_LPUSH_rps": 32000,
              "redis_LRANGE_100_rps": 16000, "sat_rps": 20000, "pingpong_p99_us": 80.0,
              "vcpu_per_1k_rps": 0.04, "rss_idle_kib": 16000},
    "palisade-l4": {"bulk_up_MBps": 950, "bulk_down_MBps": 850, "text_up_MBps": 800, "text_down_MBps": 800,
                    "rps_p50_us": 160.0, "rps_p90_us": 220.0, "rps_p99_us": 450.0, "rps_p99.9_us": 1200.0,
                    "sat_rps": 15000, "pingpong_p99_us": 90.0, "vcpu_per_1k_rps": 0.05},
    "palisade-full": {"bulk_up_MBps": 300, "bulk_down_MBps": 200, "text_up_MBps": 100, "text_down_MBps": 300,
                      "rps_p50_us": 400.0, "rps_p90_us": 600.0, "rps_p99_us": 1000.0, "rps_p99.9_us": 5000.0,
                      "redis_SET_rps": 10000, "redis_GET_rps": 10000, "redis_LPUSH_rps": 8000,
                      "redis_LRANGE_100_rps": 4000, "sat_rps": 3000, "pingpong_p99_us": 120.0,
                      "vcpu_per_1k_rps": 0.2, "rss_idle_kib": 50 * 1024, "bytes_per_idle_conn": 4096,
                      "workers1_bulk_MBps": 100, "workers2_bulk_MBps": 170, "workers1_sat_rps": 3000,
                      "workers2_sat_rps": 4500},
}


def fresh() -> dict:
    return json.loads(json.dumps(PATHS))


def test_added_latency_and_redis_overhead():
    P = fresh()
    bench.added_latency(P)
    bench.redis_overheads(P)
    assert P["palisade-full"]["rps_added_p99_us"] == 700.0
    assert P["nginx"]["rps_added_p50_us"] == 50.0
    assert "rps_added_p50_us" not in P["direct"]
    assert P["nginx"]["redis_overhead_pct"] == 20.0
    assert P["palisade-full"]["redis_overhead_pct"] == 80.0
    assert "redis_overhead_pct" not in P["palisade-l4"]  # no redis figures for it: nothing invented


def test_derived_ratios_and_targets():
    P = fresh()
    bench.added_latency(P)
    d = bench.derive(P)
    assert d["l4_vs_nginx_bulk"] == 0.9
    assert d["l4_vs_nginx_text"] == 0.8
    assert d["full_text_MBps"] == 200
    assert d["full_rps_added_p99_us"] == 700.0
    assert d["workers2_bulk_scaling"] == 1.7
    assert d["workers2_rps_scaling"] == 1.5
    assert d["nginx_added_p99_us"] == 30.0
    rows = {r["key"]: r for r in bench.targets(P, d)}
    assert rows["l4_vs_nginx_bulk"]["met"] is True
    assert rows["l4_vs_nginx_text"]["met"] is False and rows["l4_vs_nginx_text"]["gap"] == "89% of target"
    assert rows["full_rps_added_p99_us"]["met"] is False and rows["full_rps_added_p99_us"]["gap"] == "1.4x the limit"
    assert rows["full_vcpu_per_1k_rps"]["met"] is False
    assert rows["full_rss_idle_MiB"]["measured"] == 50.0 and rows["full_rss_idle_MiB"]["met"] is False
    assert rows["full_kib_per_idle_conn"]["measured"] == 4.0 and rows["full_kib_per_idle_conn"]["met"] is True
    assert rows["workers2_bulk_scaling"]["met"] is True
    assert rows["workers2_rps_scaling"]["met"] is False
    md = bench.targets_table(bench.targets(P, d))
    assert "| Palisade full bulk on text | >= 400 MB/s | 200 | **no** (50% of target) |" in md


def test_targets_missing_inputs_are_not_measured():
    rows = bench.targets({}, {})
    assert rows and all(r["met"] is None and r["gap"] == "not measured" for r in rows)
    assert "n/a" in bench.targets_table(rows)


def test_table_rows_per_metric_columns_per_path():
    P = fresh()
    bench.added_latency(P)
    P["palisade-full"]["something_new"] = 7
    table = bench.make_table(P).splitlines()
    assert table[0] == "| metric | direct | nginx | palisade-l4 | palisade-full |"
    assert table[1] == "|---|---:|---:|---:|---:|"
    rows = {ln.split(" | ")[0][2:]: ln for ln in table[2:]}
    assert rows["1,000 req/s: added p99 us"].endswith("| - | 100 | 150 | 700 |")
    assert rows["bulk binary (iperf3) upload MB/s"] == ("| bulk binary (iperf3) upload MB/s | 2,000 | 1,000 | 950 "
                                                        "| 300 |")
    assert rows["proxy vCPU per 1,000 req/s"].endswith("| - | 0.04 | 0.05 | 0.2 |")
    assert "something_new" in rows  # unknown keys are shown, not dropped
    assert not any(r.startswith("| startup") for r in rows)  # no row for what nobody measured


def test_write_outputs_json_and_markdown(tmp_path):
    P = fresh()
    bench.added_latency(P)
    d = bench.derive(P)
    results = {"machine": {"cpus": 2, "kernel": "x", "python": "3.11", "loadavg_start": [0.5, 0, 0]},
               "loadavg_end": [0.7, 0, 0], "bytes_each_way": 1 << 20, "paths": P, "derived": d,
               "targets": bench.targets(P, d), "git": "abc"}
    md = bench.write_outputs(results, tmp_path / "out")
    back = json.loads((tmp_path / "out" / "results.json").read_text())
    assert back["paths"]["palisade-full"]["rps_added_p99_us"] == 700.0
    assert back["derived"] == d
    assert (tmp_path / "out" / "results.md").read_text() == md
    assert "### Targets (issue 9)" in md and "load average at start 0.50" in md


def test_chart_png(tmp_path):
    pytest.importorskip("matplotlib")
    P = fresh()
    bench.added_latency(P)
    png = tmp_path / "latency.png"
    assert bench.chart(P, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not bench.chart({"direct": {}}, tmp_path / "none.png")  # nothing to draw: no file
    assert not (tmp_path / "none.png").exists()


def test_parse_wrk_and_redis():
    wrk = """Running 3s test @ http://10.0.0.2:8080/api/items
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  500.00us  12.00ms   90.00%
  60000 requests in 3.00s, 70.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  20001.50
Transfer/sec:     23.33MB
"""
    assert bench.parse_wrk(wrk) == {"rps": 20001.5, "non2xx": 5, "socket_errors": 3}
    assert bench.parse_wrk("garbage") == {"non2xx": 0, "socket_errors": 0}
    csv_text = ('"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
                '"p99_latency_ms","max_latency_ms"\n'
                '"SET","44247.79","0.582","0.160","0.559","0.879","1.239","3.071"\n'
                '"GET","50000.00","0.5","0.1","0.5","0.8","1.2","3.0"\n'
                '"LRANGE_100 (first 100 elements)","18000.50","1.4","0.3","1.3","2.0","3.0","9.0"\n')
    assert bench.parse_redis_csv(csv_text) == {"SET": 44247.79, "GET": 50000.0, "LRANGE_100": 18000.5}


def test_percentiles_nearest_rank():
    p = loadgen.percentiles([float(x) for x in range(1, 1001)])
    assert (p["p50"], p["p90"], p["p99"], p["p99.9"], p["max"]) == (500, 900, 990, 999, 1000)
    assert loadgen.percentiles([]) == {}
    assert len(loadgen.json_body(1024)) == 1024
    json.loads(loadgen.json_body(1024))  # a real JSON document


class _StallingServer:
    """HTTP/1.1 keep-alive server on loopback; request number ``stall_at`` is answered late."""

    def __init__(self, stall_at: int, stall: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.n = 0
        self.stall_at, self.stall = stall_at, stall
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        body = b"x" * 1024
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                n = 0
                for ln in head.split(b"\r\n")[1:]:
                    k, _, v = ln.partition(b":")
                    if k.strip().lower() == b"content-length":
                        n = int(v)
                while len(buf) < n:
                    buf += c.recv(65536)
                buf = buf[n:]
                with self.lock:
                    self.n += 1
                    mine = self.n
                if mine == self.stall_at:
                    time.sleep(self.stall)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


def test_loadgen_open_loop_corrects_for_coordinated_omission():
    """One connection, 200 req/s, the server stalls 300 ms once: every request due during the
    stall is charged the wait (corrected p90 is large) while the service time stays small."""
    srv = _StallingServer(stall_at=60, stall=0.3)
    try:
        res = loadgen.run("127.0.0.1", srv.port, rate=200, duration=1.0, connections=1, warmup=0.2)
    finally:
        srv.close()
    assert res["errors"] == {} and res["statuses"] == {"200": res["completed"]}
    assert res["completed"] == 200  # the schedule is kept: requests are not dropped by the stall
    lat, svc = res["latency_us"], res["service_us"]
    assert lat["max"] >= 250_000  # the stalled request itself
    # ~60 requests were due during the stall: with correction more than 10% of them are slow
    assert lat["p90"] >= 50_000, lat
    # a closed-loop view (service time) hides it: only one slow request in 200
    assert svc["p90"] < 50_000, svc
    assert res["send_lateness_us"]["p90"] >= 50_000


def test_loadgen_cli_rate_and_json(tmp_path):
    srv = _StallingServer(stall_at=-1, stall=0)
    try:
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loadgen.py"), "--host", "127.0.0.1",
                            "--port", str(srv.port), "--rate", "400", "--duration", "0.5", "--warmup", "0.1",
                            "--connections", "2"], capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["completed"] == 200
    assert 300 <= j["achieved_rps"] <= 500
    assert set(j["latency_us"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loadgen.py"), "--host", "127.0.0.1",
                          "--port", "1", "--rate", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be > 0" in bad.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the message shown to a non-root user")
def test_run_refuses_without_root():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "needs root" in r.stderr


def test_run_rejects_unknown_scenario():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--scenarios", "bulk,nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown scenario/path nope" in r.stderr


@pytest.mark.netns
def test_quick_pingpong_run_end_to_end(tmp_path):
    """The real thing, smallest slice: 5 paths, ping-pong only, through real namespaces and sidecars."""
    out = tmp_path / "bench"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--scenarios", "pingpong",
                        "--out", str(out), "--prefix", "bq", "--octet", "251"], capture_output=True, text=True,
                       timeout=180, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["paths"]) == {"direct", "nginx", "palisade-l4", "palisade-native", "palisade-full"}
    for p, v in res["paths"].items():
        assert 0 < v["pingpong_p50_us"] <= v["pingpong_p99_us"], (p, v)
    for p in ("palisade-l4", "palisade-native", "palisade-full"):
        assert 1 << 20 < res["paths"][p]["rss_idle_kib"] * 1024 < 1 << 30
    assert "full_added_p99_us" in res["derived"]
    md = (out / "results.md").read_text()
    assert "ping-pong 1 KiB p50 us (closed loop)" in md and "### Targets (issue 9)" in md
    assert time.monotonic() - t0 < 90


CHURN_CLIENT = """
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok, errors = 0, []
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=2); s.sendall(b"p")
        if s.recv(1) == b"p": ok += 1
        s.close()
    except OSError as e:
        errors.append(repr(e))
        if len(errors) >= 3:
            break
print(json.dumps({"ok": ok, "errors": errors}))
"""


@pytest.mark.netns
@pytest.mark.parametrize("relay", ["native", "python"])
def test_l4_splice_relay_survives_connection_churn(relay):
    """The benchmark's churn scenario through palisade-l4: every short connection must work."""
    from tests.harness import PY, Cluster

    echo = ("import socket, threading\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 7001)); s.listen(1024)\n"
            "def h(c):\n"
            "    try:\n"
            "        while (b := c.recv(65536)): c.sendall(b)\n"
            "    except OSError: pass\n"
            "    c.close()\n"
            "while True:\n"
            "    c, _ = s.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()\n")
    with Cluster("bz", 251) as c:
        srv, cli = c.pod("server"), c.pod("client")
        srv.popen([PY, "-c", echo])
        srv.wait_listening(7001)
        sc = srv.start_sidecar("--no-l7", "--no-dlp", "--relay", relay)
        r = cli.run([PY, "-c", CHURN_CLIENT, srv.ip, "7001", "500"], timeout=120)
        res = json.loads(r.stdout)
        assert "Bad file descriptor" not in sc.stderr()
        assert res == {"ok": 500, "errors": []}
