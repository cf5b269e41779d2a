"""Side-by-side performance of the data path, in one run, between the same two namespaces.

Paths compared (every scenario runs every path, so ratios are from one machine state):
  direct         client -> server port excluded from redirection
  nginx          client -> nginx stream proxy (C reference, L4 only, 1 worker) -> server
  palisade-l4    client -> sidecar with the same policy (L4 verdicts only), L7 parsing and DLP off -> server,
                 spliced flows on the pure-Python splice pump (--relay python)
  palisade-native  the same as palisade-l4 with the native relay thread (--relay native, the C extension)
  palisade-full  client -> sidecar with protocol parsing + the 100-rule policy (benchmarks/policy100.yaml,
                 --policy + --identity) + every default DLP pack scanning both directions -> server

Scenarios (--scenarios, comma list; default all):
  bulk        iperf3 binary payload and an HTTP text payload with PII sprinkled (one value per
              64 KiB, alerted on, never blocked), N bytes each way: MB/s, proxy CPU s/GB, peak RSS
  pingpong    1 KiB request/response on one connection, closed loop: p50/p99 in microseconds
  rps         HTTP/1.1 keep-alive, 1 KiB bodies both ways, open loop at a fixed 1,000 req/s
              (benchmarks/loadgen.py, coordinated-omission corrected): p50/p90/p99/p99.9 and the
              latency each proxy adds; proxy vCPU per 1,000 req/s (CPU time from /proc/PID/stat)
  saturation  wrk, 64 connections, 1 KiB POSTs: maximum req/s
  redis       redis-benchmark GET/SET/LPUSH/LRANGE_100: req/s and % overhead against direct
  churn       new TCP connections/s (connect, 1 byte each way, close)
  idle        RSS with many idle connections open: bytes per connection (sidecar and nginx)
  startup     sidecar process start -> /readyz 200, DLP database cache cold and warm
  workers     palisade-full with --workers 1 vs 2: parallel bulk and saturation, scaling ratio

Usage: python benchmarks/run.py [--quick] [--out DIR] [--scenarios bulk,rps,...]
Needs root (network namespaces). Prints a Markdown table; writes DIR/results.json,
DIR/results.md and DIR/latency.png.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_DIR = HERE.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from loadgen import json_body  # noqa: E402

PATHS = ("direct", "nginx", "palisade-l4", "palisade-native", "palisade-full")
ALL_SCENARIOS = ("bulk", "pingpong", "rps", "saturation", "redis", "churn", "idle", "startup", "workers")
# (proxied through the sidecar, direct = excluded from redirection, nginx stream -> direct)
PORTS = {
    "iperf": (5201, 5202, 5203),
    "echo": (7001, 7002, 7003),
    "http": (8080, 8082, 8083),
    "bulk": (8081, 8084, 8085),
    "redis": (6379, 6380, 6381),
}
PORT_PROXIED, PORT_DIRECT, PORT_NGINX = PORTS["iperf"]  # names kept for callers of the first version
ADMIN_PORT = 15020
PCT_KEYS = ("p50", "p90", "p99", "p99.9")
REDIS_TESTS = ("SET", "GET", "LPUSH", "LRANGE_100")
POLICY100 = HERE / "policy100.yaml"
SERVER_NS, CLIENT_NS = "bench", "bench-clients"
SERVER_LABELS = {"app": "bench-server"}
CLIENT_LABELS = {"app": "loadgen"}

NGINX_PROXY_CONF = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy-error.log;
events {{ worker_connections 30000; }}
stream {{
{servers}
}}
"""

NGINX_ORIGIN_CONF = """
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {tmp}/nginx-origin.pid;
error_log {tmp}/nginx-origin-error.log;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  client_body_buffer_size 64k;
  client_max_body_size 1m;
  client_body_temp_path {tmp}/ob;
  proxy_temp_path {tmp}/op;
  fastcgi_temp_path {tmp}/of;
  uwsgi_temp_path {tmp}/ou;
  scgi_temp_path {tmp}/os;
  default_type application/json;
  server {{
    listen {p1} reuseport;
    listen {p2} reuseport;
    location / {{ return 200 '{body}'; }}
  }}
}}
"""

# one thread, epoll: no per-connection thread (10,000 idle connections stay cheap)
ECHO_SERVER = """
import selectors, socket
sel = selectors.DefaultSelector()
def accept(ls):
    try:
        c, _ = ls.accept()
        c.setblocking(True)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # nothing to accept (non-blocking listener) or reset before accept
        return
    sel.register(c, selectors.EVENT_READ, echo)
def echo(c):
    try:
        b = c.recv(65536)
        if b:
            c.sendall(b)
            return
    except OSError:
        pass
    sel.unregister(c)
    c.close()
for p in PORTS:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p)); s.listen(65535); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, accept)
while True:
    for key, _ in sel.select():
        key.data(key.fileobj)
"""

PINGPONG = """
import socket, time, json, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 1024; lat = []
for i in range(n + 200):
    t = time.perf_counter_ns(); s.sendall(msg); got = 0
    while got < 1024: got += len(s.recv(65536))
    if i >= 200: lat.append((time.perf_counter_ns() - t) / 1000)
print(json.dumps(lat))
"""

CHURN = """
import socket, time, json, sys
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = 0; t0 = time.monotonic(); errors = 0
while time.monotonic() - t0 < secs:
    try:
        s = socket.create_connection((host, port), timeout=5); s.sendall(b"p"); s.recv(1); s.close(); n += 1
    except OSError: errors += 1
print(json.dumps({"conns": n, "secs": time.monotonic() - t0, "errors": errors}))
"""

IDLE = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=10); s.sendall(b"x")
        if s.recv(1) != b"x": sys.exit("no echo on connection %d" % i)
    except OSError as e:
        sys.exit("connection %d of %d: %r" % (i, n, e))
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
"""

# HTTP/1.1 bulk peer: the server answers POST /bulk/up (reads Content-Length bytes) and
# GET /bulk/down/N (sends N bytes of the text payload); the client runs K such requests in
# parallel and prints MB/s.  Plain blocking sockets: several GB/s here, never the bottleneck.
HTTPBULK = r"""
import json, socket, sys, threading, time
PAYLOAD = memoryview(open(sys.argv[2], "rb").read())
def send_n(s, n):
    L = len(PAYLOAD)
    while n > 0:
        k = min(n, L); s.sendall(PAYLOAD[:k]); n -= k
def recv_n(s, n, buf):
    mv = memoryview(buf)
    while n > 0:
        k = s.recv_into(mv, min(n, len(buf)))
        if not k: raise ConnectionError("short body: %d bytes missing" % n)
        n -= k
def read_head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        b = s.recv(65536)
        if not b: raise ConnectionError("closed in the head")
        data += b
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return lines[0], hdrs, rest
def handle(c):
    try:
        first, hdrs, rest = read_head(c)
        method, path, _ = first.split(" ", 2)
        buf = bytearray(1 << 20)
        if method == "POST":
            recv_n(c, int(hdrs.get("content-length", 0)) - len(rest), buf)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        else:
            n = int(path.rsplit("/", 1)[1])
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: "
                      + str(n).encode() + b"\r\n\r\n")
            send_n(c, n)
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536): pass
    except (OSError, ValueError) as e:
        print("server error", e, file=sys.stderr, flush=True)
    c.close()
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(1024)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def one(host, port, mode, n, out):
    s = socket.create_connection((host, port), timeout=120)
    buf = bytearray(1 << 20)
    if mode == "up":
        s.sendall(("POST /bulk/up HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                   % (host, n)).encode())
        send_n(s, n)
        first, hdrs, rest = read_head(s)
    else:
        s.sendall(("GET /bulk/down/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, host)).encode())
        first, hdrs, rest = read_head(s)
        recv_n(s, int(hdrs["content-length"]) - len(rest), buf)
    out.append(first.split(" ")[1])
    s.close()
if sys.argv[1] == "server":
    for p in sys.argv[3:]:
        threading.Thread(target=serve, args=(int(p),), daemon=True).start()
    threading.Event().wait()
else:
    host, port, mode, n, k = sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
    out = []
    t0 = time.perf_counter()
    ts = [threading.Thread(target=one, args=(host, port, mode, n // k, out)) for _ in range(k)]
    for t in ts: t.start()
    for t in ts: t.join()
    secs = time.perf_counter() - t0
    print(json.dumps({"MBps": (n // k) * k / secs / 1e6, "secs": secs, "statuses": out}))
"""

READY_POLL = """
import socket, sys, time
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
        s.sendall(b"GET /readyz HTTP/1.0\\r\\n\\r\\n"); r = s.recv(64); s.close()
        if r.split(b" ")[1:2] == [b"200"]:
            print(time.monotonic()); sys.exit(0)
    except (OSError, IndexError):
        pass
    time.sleep(0.002)
sys.exit(1)
"""

# ------------------------------------------------------------------------ measurement helpers


def proc_stats(pid: int) -> dict:
    """CPU seconds (user+system), RSS and its high-water mark of one process."""
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as fh:
        st = fh.read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", st).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", st).group(1))
    return {"cpu": (int(parts[11]) + int(parts[12])) / tick, "rss_kib": rss, "hwm_kib": hwm}


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_stats(pid: int) -> dict:
    """proc_stats summed over a process and its children (--workers forks; nginx master+worker)."""
    total = {"cpu": 0.0, "rss_kib": 0, "hwm_kib": 0}
    for p in [pid, *children(pid)]:
        try:
            s = proc_stats(p)
        except (OSError, AttributeError):
            continue
        for k in total:
            total[k] += s[k]
    return total


def count_dlp_alerts(events: Path) -> int:
    n = 0
    try:
        with open(events, "rb") as fh:
            for line in fh:
                if b'"alert"' in line and b'"dlp"' in line:
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue
                    n += e.get("event_type") == "alert" and e.get("alert", {}).get("category") == "dlp"
    except OSError:
        pass
    return n


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def iperf(cli, host: str, port: int, nbytes: int, reverse: bool) -> float:
    args = ["iperf3", "-c", host, "-p", str(port), "-n", str(nbytes), "-J", "-l", "256K"]
    if reverse:
        args.append("-R")
    r = cli.run(args, timeout=600)
    j = json.loads(r.stdout)
    return j["end"]["sum_received"]["bits_per_second"] / 8 / 1e6


def parse_wrk(text: str) -> dict:
    """Requests/sec, non-2xx and socket errors from wrk's report."""
    out: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(map(int, m.groups())) if m else 0
    return out


def parse_redis_csv(text: str) -> dict[str, float]:
    """redis-benchmark --csv: {"SET": rps, ...}; test names upper-cased, LRANGE_100 keeps its suffix."""
    out: dict[str, float] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or row[0] == "test":
            continue
        name = row[0].split(" ")[0].upper()
        try:
            out[name] = float(row[1])
        except ValueError:
            continue
    return out


# ------------------------------------------------------------------------ report

# (key, label) in table order; the table shows the rows some path has a value for.
METRICS: list[tuple[str, str]] = [
    ("bulk_up_MBps", "bulk binary (iperf3) upload MB/s"),
    ("bulk_down_MBps", "bulk binary (iperf3) download MB/s"),
    ("text_up_MBps", "bulk text+PII (HTTP) upload MB/s"),
    ("text_down_MBps", "bulk text+PII (HTTP) download MB/s"),
    ("cpu_s_per_GB", "proxy CPU s/GB, binary"),
    ("text_cpu_s_per_GB", "proxy CPU s/GB, text"),
    ("rss_peak_kib", "proxy peak RSS KiB (VmHWM after bulk)"),
    ("dlp_alerts", "DLP alerts raised during bulk (PII in the text)"),
    ("rps_p50_us", "1,000 req/s: p50 us"),
    ("rps_p90_us", "1,000 req/s: p90 us"),
    ("rps_p99_us", "1,000 req/s: p99 us"),
    ("rps_p99.9_us", "1,000 req/s: p99.9 us"),
    ("rps_added_p50_us", "1,000 req/s: added p50 us"),
    ("rps_added_p90_us", "1,000 req/s: added p90 us"),
    ("rps_added_p99_us", "1,000 req/s: added p99 us"),
    ("rps_added_p99.9_us", "1,000 req/s: added p99.9 us"),
    ("rps_svc_p50_us", "1,000 req/s: service time p50 us (send -> answer)"),
    ("rps_svc_p99_us", "1,000 req/s: service time p99 us (send -> answer)"),
    ("rps_achieved", "1,000 req/s: achieved req/s"),
    ("vcpu_per_1k_rps", "proxy vCPU per 1,000 req/s"),
    ("sat_rps", "saturation req/s (wrk, 64 conns)"),
    ("redis_SET_rps", "redis SET req/s"),
    ("redis_GET_rps", "redis GET req/s"),
    ("redis_LPUSH_rps", "redis LPUSH req/s"),
    ("redis_LRANGE_100_rps", "redis LRANGE_100 req/s"),
    ("redis_overhead_pct", "redis overhead % (mean of 4 tests)"),
    ("churn_conn_per_s", "new connections/s"),
    ("churn_cpu_us_per_conn", "proxy CPU us per new connection"),
    ("pingpong_p50_us", "ping-pong 1 KiB p50 us (closed loop)"),
    ("pingpong_p99_us", "ping-pong 1 KiB p99 us (closed loop)"),
    ("pingpong_cpu_us_per_rt", "proxy CPU us per ping-pong round trip"),
    ("rss_idle_kib", "proxy RSS idle KiB"),
    ("rss_fresh_kib", "proxy RSS idle KiB, restarted before the idle test"),
    ("idle_conns", "idle connections opened"),
    ("bytes_per_idle_conn", "proxy bytes per idle connection"),
    ("startup_cold_ms", "start -> /readyz ms, DLP cache cold"),
    ("startup_warm_ms", "start -> /readyz ms, DLP cache warm"),
    ("startup_ms", "start -> /readyz ms"),
    ("workers1_bulk_MBps", "--workers 1: 4 parallel text downloads MB/s"),
    ("workers2_bulk_MBps", "--workers 2: 4 parallel text downloads MB/s"),
    ("workers1_sat_rps", "--workers 1: saturation req/s"),
    ("workers2_sat_rps", "--workers 2: saturation req/s"),
]


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}".rstrip("0").rstrip(".") if v else "0"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def make_table(paths: dict[str, dict]) -> str:
    """Markdown table: one row per metric, one column per path (paths in PATHS order first)."""
    cols = [p for p in PATHS if p in paths] + [p for p in paths if p not in PATHS]
    known = {k for k, _ in METRICS}
    rows = [(k, label) for k, label in METRICS if any(k in paths[p] for p in cols)]
    extra = sorted({k for p in cols for k in paths[p] if not k.endswith("_spread")} - known)
    rows += [(k, k) for k in extra]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def cell(p: str, k: str) -> str:
        spread = paths[p].get(f"{k}_spread")
        v = _fmt(paths[p].get(k))
        return f"{v} ({_fmt(spread[0])}-{_fmt(spread[1])})" if spread else v

    for k, label in rows:
        lines.append(f"| {label} | " + " | ".join(cell(p, k) for p in cols) + " |")
    return "\n".join(lines)


def derive(paths: dict[str, dict]) -> dict:
    """Ratios and differences between paths (only those whose inputs exist)."""
    P = paths
    d: dict = {}

    def have(p: str, *keys: str) -> bool:
        return p in P and all(P[p].get(k) is not None for k in keys)

    def avg(p: str, a: str, b: str) -> float:
        return (P[p][a] + P[p][b]) / 2

    for kind, a, b in (("bulk", "bulk_up_MBps", "bulk_down_MBps"), ("text", "text_up_MBps", "text_down_MBps")):
        if have("palisade-l4", a, b) and have("nginx", a, b) and avg("nginx", a, b):
            d[f"l4_vs_nginx_{kind}"] = round(avg("palisade-l4", a, b) / avg("nginx", a, b), 2)
        if have("palisade-native", a, b) and have("nginx", a, b) and avg("nginx", a, b):
            d[f"native_vs_nginx_{kind}"] = round(avg("palisade-native", a, b) / avg("nginx", a, b), 2)
        if have("palisade-l4", a, b) and have("direct", a, b) and avg("direct", a, b):
            d[f"l4_vs_direct_{kind}"] = round(avg("palisade-l4", a, b) / avg("direct", a, b), 2)
        if have("palisade-full", a, b) and have("nginx", a, b) and avg("nginx", a, b):
            d[f"full_vs_nginx_{kind}"] = round(avg("palisade-full", a, b) / avg("nginx", a, b), 2)
        if have("palisade-full", a, b):
            d[f"full_{kind}_MBps"] = round(avg("palisade-full", a, b))
    if have("direct", "pingpong_p99_us"):
        dd = P["direct"]["pingpong_p99_us"]
        for p, name in (("nginx", "nginx"), ("palisade-l4", "l4"), ("palisade-native", "native"),
                        ("palisade-full", "full")):
            if have(p, "pingpong_p99_us"):
                d[f"{name}_added_p99_us"] = round(P[p]["pingpong_p99_us"] - dd, 1)
    for p, name in (("nginx", "nginx"), ("palisade-l4", "l4"), ("palisade-native", "native"),
                    ("palisade-full", "full")):
        if have(p, "rps_added_p99_us"):
            d[f"{name}_rps_added_p99_us"] = P[p]["rps_added_p99_us"]
        if have(p, "vcpu_per_1k_rps"):
            d[f"{name}_vcpu_per_1k_rps"] = P[p]["vcpu_per_1k_rps"]
        if have(p, "sat_rps") and have("direct", "sat_rps") and P["direct"]["sat_rps"]:
            d[f"{name}_sat_vs_direct"] = round(P[p]["sat_rps"] / P["direct"]["sat_rps"], 2)
        if have(p, "redis_overhead_pct"):
            d[f"{name}_redis_overhead_pct"] = P[p]["redis_overhead_pct"]
    # the relays side by side against nginx: latency and connection rate ratios (issue 22)
    for p, name in (("palisade-l4", "l4"), ("palisade-native", "native")):
        for key, short in (("pingpong_p50_us", "pingpong_p50"), ("pingpong_p99_us", "pingpong_p99"),
                           ("pingpong_cpu_us_per_rt", "pingpong_cpu"), ("churn_conn_per_s", "conn_per_s"),
                           ("churn_cpu_us_per_conn", "cpu_per_conn")):
            if have(p, key) and have("nginx", key) and P["nginx"][key]:
                d[f"{name}_{short}_vs_nginx"] = round(P[p][key] / P["nginx"][key], 2)
    if have("palisade-full", "workers1_bulk_MBps", "workers2_bulk_MBps") and P["palisade-full"]["workers1_bulk_MBps"]:
        d["workers2_bulk_scaling"] = round(P["palisade-full"]["workers2_bulk_MBps"]
                                           / P["palisade-full"]["workers1_bulk_MBps"], 2)
    if have("palisade-full", "workers1_sat_rps", "workers2_sat_rps") and P["palisade-full"]["workers1_sat_rps"]:
        d["workers2_rps_scaling"] = round(P["palisade-full"]["workers2_sat_rps"]
                                          / P["palisade-full"]["workers1_sat_rps"], 2)
    return d


# (name, derived/path key, comparison, target, unit)
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("Palisade L4 bulk (binary) vs nginx", "l4_vs_nginx_bulk", ">=", 0.9, "x"),
    ("Palisade L4 bulk (text) vs nginx", "l4_vs_nginx_text", ">=", 0.9, "x"),
    ("Palisade full bulk on text", "full_text_MBps", ">=", 400, "MB/s"),
    ("native relay bulk (binary) vs nginx", "native_vs_nginx_bulk", ">=", 1.0, "x"),
    ("native relay ping-pong p50 vs nginx", "native_pingpong_p50_vs_nginx", "<=", 1.0, "x"),
    ("native relay ping-pong p99 vs nginx", "native_pingpong_p99_vs_nginx", "<=", 1.0, "x"),
    ("native relay CPU per round trip vs nginx", "native_pingpong_cpu_vs_nginx", "<=", 1.0, "x"),
    ("native relay new connections/s vs nginx", "native_conn_per_s_vs_nginx", ">=", 0.8, "x"),
    ("native relay CPU per connection vs nginx", "native_cpu_per_conn_vs_nginx", "<=", 2.0, "x"),
    ("added p99 at 1,000 req/s, full inspection", "full_rps_added_p99_us", "<=", 500, "us"),
    ("vCPU per 1,000 req/s, full inspection", "full_vcpu_per_1k_rps", "<=", 0.05, "vCPU"),
    ("idle RSS (palisade-full)", "full_rss_idle_MiB", "<=", 40, "MiB"),
    ("bytes per idle connection (palisade-full)", "full_kib_per_idle_conn", "<=", 16, "KiB"),
    ("--workers 2 bulk scaling", "workers2_bulk_scaling", ">=", 1.6, "x"),
    ("--workers 2 req/s scaling", "workers2_rps_scaling", ">=", 1.6, "x"),
]


def targets(paths: dict[str, dict], derived: dict) -> list[dict]:
    """The issue's targets against this run: measured value, met or not, and by how much."""
    vals = dict(derived)
    full = paths.get("palisade-full", {})
    if full.get("rss_idle_kib") is not None:
        vals["full_rss_idle_MiB"] = round(full["rss_idle_kib"] / 1024, 1)
    if full.get("bytes_per_idle_conn") is not None:
        vals["full_kib_per_idle_conn"] = round(full["bytes_per_idle_conn"] / 1024, 1)
    out = []
    for name, key, op, target, unit in TARGETS:
        v = vals.get(key)
        if v is None:
            out.append({"target": name, "key": key, "goal": f"{op} {target:g} {unit}", "measured": None,
                        "met": None, "gap": "not measured"})
            continue
        met = v >= target if op == ">=" else v <= target
        if met:
            gap = ""
        elif op == ">=":
            gap = f"{v / target:.0%} of target" if target else ""
        else:
            gap = f"{v / target:.1f}x the limit" if target else ""
        out.append({"target": name, "key": key, "goal": f"{op} {target:g} {unit}", "measured": v, "met": met,
                    "gap": gap})
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | goal | measured | met |", "|---|---|---:|---|"]
    for r in rows:
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else f"**no** ({r['gap']})")
        lines.append(f"| {r['target']} | {r['goal']} | {_fmt(r['measured'])} | {met} |")
    return "\n".join(lines)


def chart(paths: dict[str, dict], png: Path) -> bool:
    """Latency percentiles per path at 1,000 req/s (and the added latency) as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    cols = [p for p in PATHS if p in paths and f"rps_{PCT_KEYS[0]}_us" in paths[p]]
    if not cols:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(cols)
    for ax, prefix, title in ((axes[0], "rps_", "latency at 1,000 req/s (open loop)"),
                              (axes[1], "rps_added_", "latency added vs direct")):
        for i, p in enumerate(cols):
            ys = [paths[p].get(f"{prefix}{k}_us") for k in PCT_KEYS]
            if any(y is None for y in ys):
                continue
            xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(PCT_KEYS))]
            ax.bar(xs, [y / 1000 for y in ys], width, label=p, color=f"C{PATHS.index(p) if p in PATHS else i}")
        ax.set_xticks(range(len(PCT_KEYS)), PCT_KEYS)
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].axhline(0.5, color="red", lw=0.8, ls="--")
    axes[1].text(0, 0.5, " p99 target 0.5 ms", color="red", fontsize=7, va="bottom")
    fig.suptitle("HTTP/1.1 keep-alive, 1 KiB bodies: direct vs nginx stream vs Palisade", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "mem_total": mem, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def git_rev() -> str:
    try:
        r = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "firewall"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("+dirty(firewall/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------ the run


class Bench:
    def __init__(self, a: argparse.Namespace, nbytes: int) -> None:
        from firewall.lab.netns import PY, Cluster

        self.PY = PY
        self.a = a
        self.quick = a.quick
        self.nbytes = nbytes
        self.scen = set(a.scenarios.split(","))
        self.c = Cluster(a.prefix, a.octet)
        self.tmp = Path(self.c.tmp)
        self.srv = self.c.pod("server", namespace=SERVER_NS)
        self.cli = self.c.pod("client", namespace=CLIENT_NS)
        self.nginx_proxy: subprocess.Popen | None = None
        self.log: dict = {}
        # other code to compare, interleaved in the same run: NAME -> a tree holding its firewall/
        # (figures from separate runs on a shared machine are not comparable)
        self.trees: dict[str, Path] = {}
        for name, ref in baselines(a.baseline):
            if Path(ref).is_dir():
                self.trees[name] = Path(ref).resolve()
                continue
            tree = self.tmp / f"baseline-{name}"
            tree.mkdir(exist_ok=True)
            # dlp_rules too: a baseline palisade-full sidecar finds its packs next to its package
            arch = subprocess.run(["git", "-C", str(REPO_DIR), "archive", ref, "firewall", "dlp_rules"],
                                  capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=arch, check=True)
            self.trees[name] = tree

    # -- setup
    def setup(self) -> None:
        srv, tmp, PY = self.srv, self.tmp, self.PY
        # the load generator's namespace reuses its own TIME_WAIT ports (timestamps make that
        # safe): churn leaves ~20,000 of them behind, and the idle scenario then needs 10,000
        # fresh connections from the same 28,000-port range
        self.cli.run(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], check=False)
        ident = [{"ip": srv.ip, "namespace": SERVER_NS, "pod": "server", "labels": SERVER_LABELS},
                 {"ip": self.cli.ip, "namespace": CLIENT_NS, "pod": "client", "labels": CLIENT_LABELS}]
        self.identity = tmp / "identity.yaml"
        self.identity.write_text(json.dumps(ident))  # JSON is YAML
        need = self.scen & {"bulk", "workers"}
        if need:
            sys.path.insert(0, str(HERE))
            from dlp_corpus import pii_text

            self.payload = tmp / "payload-text.bin"
            self.payload.write_bytes(pii_text(seed=2, size=8 << 20, every=65536))
            srv.popen([PY, "-c", HTTPBULK, "server", str(self.payload), str(PORTS["bulk"][0]), str(PORTS["bulk"][1])])
        srv.popen(["iperf3", "-s", "-p", str(PORTS["iperf"][0])])
        srv.popen(["iperf3", "-s", "-p", str(PORTS["iperf"][1])])
        srv.popen([PY, "-c", ECHO_SERVER.replace("PORTS", repr(list(PORTS["echo"][:2])))])
        origin = tmp / "nginx-origin.conf"
        origin.write_text(NGINX_ORIGIN_CONF.format(tmp=tmp, p1=PORTS["http"][0], p2=PORTS["http"][1],
                                                   body=json_body(1024).decode()))
        srv.popen(["nginx", "-c", str(origin)])
        if "redis" in self.scen:
            for p in PORTS["redis"][:2]:
                srv.popen(["redis-server", "--port", str(p), "--bind", "0.0.0.0", "--protected-mode", "no",
                           "--save", "", "--appendonly", "no", "--dir", str(tmp)])
        servers = "\n".join(f"  server {{ listen {n}; proxy_pass 127.0.0.1:{d}; proxy_buffer_size 256k; }}"
                            for _, d, n in PORTS.values())
        conf = tmp / "nginx-proxy.conf"
        conf.write_text(NGINX_PROXY_CONF.format(tmp=tmp, servers=servers))
        self.nginx_proxy = srv.popen(["nginx", "-c", str(conf)])
        waits = [PORTS["iperf"][0], PORTS["iperf"][1], *PORTS["echo"][:2], *PORTS["http"][:2]]
        waits += [n for _, _, n in PORTS.values()]
        if need:
            waits += list(PORTS["bulk"][:2])
        if "redis" in self.scen:
            waits += list(PORTS["redis"][:2])
        for p in waits:
            srv.wait_listening(p)
        excl = sorted({d for _, d, _ in PORTS.values()} | {n for _, _, n in PORTS.values()})
        srv.redirect("apply", "--exclude-inbound-ports", ",".join(map(str, excl)))
        self.wrk_lua = tmp / "post.lua"
        body = json_body(1024).decode()
        self.wrk_lua.write_text(f'wrk.method = "POST"\nwrk.body = \'{body}\'\n'
                                'wrk.headers["Content-Type"] = "application/json"\n')
        self.warm_cache = tmp / "dlp-cache-warm"

    def nginx_worker(self) -> int:
        kids = children(self.nginx_proxy.pid)
        return kids[0] if kids else self.nginx_proxy.pid

    # -- sidecar
    def sidecar_args(self, path: str, workers: int = 1, cache: Path | None = None) -> list[str]:
        full, path = path, path.split("@")[0]
        args = ["--labels", json.dumps(SERVER_LABELS)]
        args += ["--policy", str(POLICY100), "--identity", str(self.identity)]
        if path in ("palisade-l4", "palisade-native"):
            args += ["--no-l7", "--no-dlp"]
            if "@" not in full:  # a baseline tree may predate --relay: it runs its own relay
                args += ["--relay", "native" if path == "palisade-native" else "python"]
        args += ["--dlp-cache", str(cache or self.warm_cache)]
        if workers > 1:
            args += ["--workers", str(workers)]
        return args

    def start_sidecar(self, path: str, workers: int = 1, cache: Path | None = None):
        """Start and time process start -> /readyz 200 (polled every 2 ms from inside the pod)."""
        t0 = time.monotonic()
        env = {"POD_NAMESPACE": SERVER_NS}
        if "@" in path:
            # the baseline tree's package first; PYTHONSAFEPATH keeps the working directory (this
            # checkout) off sys.path, so `-m firewall` imports the baseline's code
            env.update({"PYTHONSAFEPATH": "1", "PYTHONPATH": str(self.trees[path.split("@", 1)[1]])})
        sc = self.srv.start_sidecar(*self.sidecar_args(path, workers, cache), apply_redirect=False, wait=False,
                                    env=env)
        r = self.srv.run([self.PY, "-c", READY_POLL, str(ADMIN_PORT), "90"], check=False, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"sidecar ({path}) not ready: {sc.stderr()[-3000:]}")
        ms = (float(r.stdout.strip()) - t0) * 1000
        return sc, round(ms)

    # -- scenarios
    def http_bulk(self, port: int, mode: str, nbytes: int, k: int = 1) -> float:
        r = self.cli.run([self.PY, "-c", HTTPBULK, "client", str(self.payload), self.srv.ip, str(port), mode,
                          str(nbytes), str(k)], check=False, timeout=900)
        try:
            j = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"text bulk {mode} on :{port} failed: {r.stderr[-2000:]}") from None
        if set(j["statuses"]) != {"200"}:
            raise RuntimeError(f"text bulk {mode} on :{port}: statuses {j['statuses']}")
        return j["MBps"]

    def wrk(self, port: int, secs: float, conns: int = 64) -> dict:
        r = self.cli.run(["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "-s", str(self.wrk_lua),
                          f"http://{self.srv.ip}:{port}/api/items"], check=False, timeout=secs + 60)
        return parse_wrk(r.stdout)

    def run_path(self, path: str, r: dict) -> None:
        scen, cli, srv, PY = self.scen, self.cli, self.srv, self.PY
        q = self.quick
        sc = None
        pid = None
        if path.startswith("palisade"):
            if path.startswith("palisade-full") and "startup" in scen:
                cold = self.tmp / "dlp-cache-cold"
                shutil.rmtree(cold, ignore_errors=True)
                sc, r["startup_cold_ms"] = self.start_sidecar(path, cache=cold)
                sc.stop()
                self.warm_cache = cold  # filled by the cold start
                sc, r["startup_warm_ms"] = self.start_sidecar(path)
            else:
                sc, ms = self.start_sidecar(path)
                if "startup" in scen:
                    r["startup_ms"] = ms
            pid = sc.pid()
            r["rss_idle_kib"] = tree_stats(pid)["rss_kib"]
        elif path == "nginx":
            pid = self.nginx_worker()
            r["rss_idle_kib"] = proc_stats(pid)["rss_kib"]
        col = {"direct": 1, "nginx": 2}.get(path, 0)  # palisade paths (and their @NAME) use column 0

        def port(kind: str) -> int:
            return PORTS[kind][col]

        def cpu() -> float:
            return tree_stats(pid)["cpu"] if pid else 0.0

        if "bulk" in scen:
            c0 = cpu()
            r["bulk_up_MBps"] = round(iperf(cli, srv.ip, port("iperf"), self.nbytes, reverse=False))
            r["bulk_down_MBps"] = round(iperf(cli, srv.ip, port("iperf"), self.nbytes, reverse=True))
            c1 = cpu()
            r["text_up_MBps"] = round(self.http_bulk(port("bulk"), "up", self.nbytes))
            r["text_down_MBps"] = round(self.http_bulk(port("bulk"), "down", self.nbytes))
            c2 = cpu()
            if pid:
                r["cpu_s_per_GB"] = round((c1 - c0) / (2 * self.nbytes / 1e9), 3)
                r["text_cpu_s_per_GB"] = round((c2 - c1) / (2 * self.nbytes / 1e9), 3)
                r["rss_peak_kib"] = tree_stats(pid)["hwm_kib"]
            if sc is not None:
                # proof that the full path really scanned: the sprinkled PII was reported (not blocked)
                r["dlp_alerts"] = count_dlp_alerts(sc.events_path)
        if "pingpong" in scen:
            c0 = cpu()
            res = cli.run([PY, "-c", PINGPONG, srv.ip, str(port("echo")), str(2000 if q else 10000)], timeout=300)
            lat = json.loads(res.stdout)
            if pid:
                r["pingpong_cpu_us_per_rt"] = round((cpu() - c0) / len(lat) * 1e6, 1)
            r["pingpong_p50_us"] = round(statistics.median(lat), 1)
            r["pingpong_p99_us"] = round(percentile(lat, 99), 1)
        if "rps" in scen:
            secs = self.a.rps_duration or (5 if q else 30)
            warm = 1.0
            c0 = cpu()
            res = cli.run([PY, str(HERE / "loadgen.py"), "--host", srv.ip, "--port", str(port("http")),
                           "--rate", "1000", "--duration", str(secs), "--warmup", str(warm), "--connections", "8",
                           "--body", "1024", "--path", "/api/items"], check=False, timeout=secs + 120)
            c1 = cpu()
            try:
                j = json.loads(res.stdout)
            except ValueError:
                raise RuntimeError(f"loadgen failed on {path}: {res.stderr[-2000:]}") from None
            for k in PCT_KEYS:
                r[f"rps_{k}_us"] = j["latency_us"][k]
            r["rps_svc_p50_us"], r["rps_svc_p99_us"] = j["service_us"]["p50"], j["service_us"]["p99"]
            r["rps_achieved"] = j["achieved_rps"]
            errs = sum(j["errors"].values()) + sum(v for s, v in j["statuses"].items() if s != "200")
            if errs:
                r["rps_errors"] = errs
            if j.get("overloaded"):
                r["rps_overloaded"] = True
            self.log.setdefault("loadgen", {})[path] = j
            if pid:
                sent = 1000 * (secs + warm)
                r["vcpu_per_1k_rps"] = round((c1 - c0) / sent * 1000, 4)
        if "saturation" in scen:
            w = self.wrk(port("http"), 3 if q else 10)
            r["sat_rps"] = round(w.get("rps", 0))
            if w["non2xx"] or w["socket_errors"]:
                r["sat_errors"] = w["non2xx"] + w["socket_errors"]
        if "redis" in scen:
            n = 10000 if q else 100000
            res = cli.run(["redis-benchmark", "-h", srv.ip, "-p", str(port("redis")), "-n", str(n), "-c", "50",
                           "-t", "set,get,lpush,lrange_100", "--csv"], check=False, timeout=600)
            got = parse_redis_csv(res.stdout)
            for t in REDIS_TESTS:
                if t in got:
                    r[f"redis_{t}_rps"] = round(got[t])
            if not got:
                r["redis_error"] = (res.stderr or res.stdout)[-300:]
        if "churn" in scen:
            c0 = cpu()
            res = cli.run([PY, "-c", CHURN, srv.ip, str(port("echo")), str(2 if q else 10)], timeout=120)
            j = json.loads(res.stdout)
            r["churn_conn_per_s"] = round(j["conns"] / j["secs"])
            if pid and j["conns"]:
                r["churn_cpu_us_per_conn"] = round((cpu() - c0) / j["conns"] * 1e6)
            if j["errors"]:
                r["churn_errors"] = j["errors"]
        if path.startswith("palisade-full") and "workers" in scen:
            self.workers_pass(r, 1, sc)
        if "idle" in scen and pid:
            if sc is not None:
                # a fresh process: memory freed by the earlier scenarios would hide the growth
                sc.stop()
                sc, _ = self.start_sidecar(path)
                pid = sc.pid()
                r["rss_fresh_kib"] = tree_stats(pid)["rss_kib"]
            n = self.a.idle_conns or (1000 if q else 10000)
            # a proxy holds two descriptors per connection: stay under RLIMIT_NOFILE (20,000 here,
            # and the hard limit cannot be raised without CAP_SYS_RESOURCE)
            n = min(n, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 256) // 2)
            before = tree_stats(pid)["rss_kib"]
            p = cli.popen([PY, "-c", IDLE, srv.ip, str(port("echo")), str(n)], stdin=subprocess.PIPE)
            line = p.stdout.readline().decode().strip()
            if line == "open":
                after = tree_stats(pid)["rss_kib"]
                r["idle_conns"] = n
                r["bytes_per_idle_conn"] = round((after - before) * 1024 / n)
            try:
                p.stdin.write(b"\n")
                p.stdin.flush()
            except OSError:
                pass
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
            if line != "open":
                r["idle_error"] = (p.stderr.read().decode(errors="replace").strip().splitlines() or ["?"])[-1][-200:]
                if os.environ.get("PALISADE_BENCH_DEBUG"):
                    dbg = self.tmp / "idle-debug.txt"
                    parts = [sc.stderr()[-4000:] if sc is not None else ""]
                    for ns in (srv, cli):
                        parts.append(ns.run(["ss", "-s"], check=False).stdout)
                        parts.append(ns.run(["nstat", "-az"], check=False).stdout)
                    dbg.write_text("\n".join(parts))
                    print("idle debug:", dbg, file=sys.stderr)
        if sc is not None:
            sc.stop()

    def workers_pass(self, r: dict, workers: int, sc=None) -> None:
        """Parallel load (4 text downloads, wrk 64 connections) through palisade-full with N workers."""
        own = sc is None
        if own:
            sc, _ = self.start_sidecar("palisade-full", workers=workers)
        n = max(64 << 20, self.nbytes // 2)
        r[f"workers{workers}_bulk_MBps"] = round(self.http_bulk(PORTS["bulk"][0], "down", n, k=4))
        w = self.wrk(PORTS["http"][0], 3 if self.quick else 10)
        r[f"workers{workers}_sat_rps"] = round(w.get("rps", 0))
        if own:
            sc.stop()


def redis_overheads(P: dict[str, dict]) -> None:
    """% fewer requests/s than direct, per test, and their mean (NeuVector publishes this table)."""
    base = P.get("direct", {})
    for p, r in P.items():
        if p == "direct":
            continue
        pct = []
        for t in REDIS_TESTS:
            b, v = base.get(f"redis_{t}_rps"), r.get(f"redis_{t}_rps")
            if b and v is not None:
                pct.append((b - v) / b * 100)
        if pct:
            r["redis_overhead_pct"] = round(sum(pct) / len(pct), 1)


def added_latency(P: dict[str, dict]) -> None:
    base = P.get("direct", {})
    for p, r in P.items():
        if p == "direct":
            continue
        for k in PCT_KEYS:
            b, v = base.get(f"rps_{k}_us"), r.get(f"rps_{k}_us")
            if b is not None and v is not None:
                r[f"rps_added_{k}_us"] = round(v - b, 1)


def write_outputs(results: dict, out: Path) -> str:
    P = results["paths"]
    table = make_table(P)
    tt = targets_table(results["targets"])
    m = results["machine"]
    md = (f"{table}\n\n### Targets (issue 9)\n\n{tt}\n\n"
          f"Machine: {m['cpus']} vCPU {m.get('cpu_model', '')}, {m.get('mem_total', '')}, kernel {m['kernel']}, "
          f"Python {m['python']}; load average at start {m['loadavg_start'][0]:.2f}, at end "
          f"{results.get('loadavg_end', [0])[0]:.2f}. Code {results.get('git', '')}. "
          f"Bytes each way (bulk): {results['bytes_each_way']:,}.\n\n```json\n"
          + json.dumps(results["derived"], indent=2) + "\n```\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(md)
    return md


def baselines(specs: list[str]) -> list[tuple[str, str]]:
    """``[NAME=]REF`` options as (name, ref); the name defaults to ``base``."""
    out = []
    for spec in specs:
        name, _, ref = spec.rpartition("=") if "=" in spec else ("base", "", spec)
        out.append((name or "base", ref))
    return out


def merge_rounds(rounds: list[dict]) -> dict:
    """Median of each numeric figure over interleaved rounds, with ``<key>_spread`` = [min, max]."""
    if len(rounds) == 1:
        return rounds[0]
    out: dict = {}
    for k in rounds[0]:
        vals = [r[k] for r in rounds if k in r]
        if vals and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            med = statistics.median(vals)
            out[k] = round(med, 1) if isinstance(med, float) else med
            out[f"{k}_spread"] = [min(vals), max(vals)]
        else:
            out[k] = vals[-1]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and short runs: under two minutes")
    ap.add_argument("--out", default="bench-out", help="folder for results.json, results.md, latency.png")
    ap.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help="comma list of " + ",".join(ALL_SCENARIOS))
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ",".join(PATHS))
    ap.add_argument("--bytes", type=int, default=None, help="bulk bytes each way (default 1 GiB, quick 256 MiB)")
    ap.add_argument("--rps-duration", type=float, default=None, help="seconds at 1,000 req/s (default 30, quick 5)")
    ap.add_argument("--idle-conns", type=int, default=None, help="idle connections (default 10,000, quick 1,000)")
    ap.add_argument("--prefix", default="bn", help="namespace name prefix (parallel runs need distinct ones)")
    ap.add_argument("--octet", type=int, default=250, help="10.<octet>.0.0/24 for the pods")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every path this many times, interleaved (round 1: all paths, round 2: ...); "
                         "each figure is the median over the rounds, its spread in <metric>_spread")
    ap.add_argument("--baseline", metavar="[NAME=]COMMIT", action="append", default=[],
                    help="also run palisade paths on COMMIT's code (or a directory holding a firewall/ "
                         "package), named PATH@NAME in --paths (NAME defaults to 'base'; repeatable), "
                         "e.g. --baseline main=0353a55 --paths palisade-l4,palisade-l4@main")
    a = ap.parse_args(argv)
    scen = [s for s in a.scenarios.split(",") if s]
    bad = [s for s in scen if s not in ALL_SCENARIOS]
    paths = [p for p in a.paths.split(",") if p]
    names = {n for n, _ in baselines(a.baseline)}
    bad += [p for p in paths if p.split("@")[0] not in PATHS
            or ("@" in p and (p.split("@", 1)[1] not in names or not p.startswith("palisade")))]
    if bad:
        print(f"benchmarks/run.py: unknown scenario/path {', '.join(bad)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("benchmarks/run.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    # 10,000 idle connections are 20,000 descriptors in each proxy; children inherit the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 65536), max(hard, 65536)))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: use the whole hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nbytes = a.bytes or ((256 << 20) if a.quick else (1 << 30))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict = {"machine": machine_info(), "git": git_rev(), "quick": a.quick, "scenarios": scen,
                     "bytes_each_way": nbytes, "paths": {}, "rounds": a.rounds}
    results["baselines"] = {
        n: (ref if Path(ref).is_dir() else subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", ref], capture_output=True, text=True).stdout.strip())
        for n, ref in baselines(a.baseline)}
    b = Bench(a, nbytes)
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        b.setup()
        per_round: dict[str, list[dict]] = {p: [] for p in paths}
        for rnd in range(max(1, a.rounds)):
            for path in paths:
                r: dict = {}
                t0 = time.monotonic()
                b.run_path(path, r)
                per_round[path].append(r)
                print(f"round {rnd + 1} {path} ({time.monotonic() - t0:.0f}s): {r}", file=sys.stderr, flush=True)
        for path in paths:
            results["paths"][path] = merge_rounds(per_round[path])
        if a.rounds > 1:
            results["per_round"] = per_round
        if "workers" in scen and "palisade-full" in paths:
            b.workers_pass(results["paths"]["palisade-full"], 2)
    finally:
        signal.signal(signal.SIGTERM, old)
        b.c.close()
    P = results["paths"]
    redis_overheads(P)
    added_latency(P)
    results["derived"] = derive(P)
    results["targets"] = targets(P, results["derived"])
    results["loadgen"] = b.log.get("loadgen", {})
    results["loadavg_end"] = list(os.getloadavg())
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if chart(P, out / "latency.png"):
        results["chart"] = "latency.png"
    md = write_outputs(results, out)
    print(md)
    print(f"wrote {out}/results.json, results.md{', latency.png' if 'chart' in results else ''} "
          f"in {results['elapsed_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
