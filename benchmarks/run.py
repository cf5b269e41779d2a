"""Side-by-side performance of the data path, in one run, between the same two namespaces.

Paths compared (every scenario runs every path, so ratios are from one machine state):
  direct         client -> server port excluded from redirection
  nginx          client -> nginx stream proxy (C reference, L4 only) -> server
  palisade-l4    client -> sidecar with L7 parsing and DLP off -> server
  palisade-full  client -> sidecar with protocol parsing + policy + default DLP packs -> server

Scenarios: bulk (iperf3, N bytes each way: MB/s, sidecar CPU s/GB, RSS), pingpong (1 KiB
request/response on one connection: p50/p99 in microseconds), churn (new connections/s),
idle (RSS with many idle connections: bytes per connection).

Usage: python benchmarks/run.py [--quick] [--out DIR] [--scenarios bulk,pingpong,churn,idle]
Needs root (network namespaces). Prints a Markdown table and writes DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import PY, Cluster  # noqa: E402

PORT_PROXIED, PORT_DIRECT, PORT_NGINX = 5201, 5202, 5203
ECHO_PROXIED, ECHO_DIRECT, ECHO_NGINX = 7001, 7002, 7003
PATHS = ("direct", "nginx", "palisade-l4", "palisade-full")

NGINX_CONF = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 20000; }}
stream {{
  server {{ listen {p1}; proxy_pass 127.0.0.1:{t1}; proxy_buffer_size 256k; }}
  server {{ listen {p2}; proxy_pass 127.0.0.1:{t2}; proxy_buffer_size 256k; }}
}}
"""

ECHO_SERVER = """
import socket, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(65535)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def handle(c):
    try:
        while True:
            b = c.recv(65536)
            if not b: break
            c.sendall(b)
    except OSError: pass
    c.close()
for p in PORTS: threading.Thread(target=serve, args=(p,), daemon=True).start()
threading.Event().wait()
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
    s = socket.create_connection((host, port)); s.sendall(b"x"); s.recv(1); socks.append(s)
print("open", flush=True)
sys.stdin.readline()
"""


def proc_stats(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as fh:
        st = fh.read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", st).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", st).group(1))
    return {"cpu": (int(parts[11]) + int(parts[12])) / tick, "rss_kib": rss, "hwm_kib": hwm}


def iperf(cli, host: str, port: int, nbytes: int, reverse: bool) -> float:
    args = ["iperf3", "-c", host, "-p", str(port), "-n", str(nbytes), "-J", "-l", "256K"]
    if reverse:
        args.append("-R")
    r = cli.run(args, timeout=600)
    j = json.loads(r.stdout)
    return j["end"]["sum_received"]["bits_per_second"] / 8 / 1e6


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: finishes in about a minute")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--scenarios", default="bulk,pingpong,churn,idle")
    ap.add_argument("--bytes", type=int, default=None, help="bulk bytes each way (default 1 GiB, quick 256 MiB)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/run.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    nbytes = a.bytes or ((256 << 20) if a.quick else (1 << 30))
    pp_n = 2000 if a.quick else 10000
    churn_s = 3 if a.quick else 10
    idle_n = 1000 if a.quick else 10000
    scen = set(a.scenarios.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                 "python": platform.python_version()},
                     "bytes_each_way": nbytes, "paths": {}}
    with Cluster("bn", 250) as c:
        srv, cli = c.pod("server"), c.pod("client")
        srv.popen(["iperf3", "-s", "-p", str(PORT_PROXIED)])
        srv.popen(["iperf3", "-s", "-p", str(PORT_DIRECT)])
        srv.popen([PY, "-c", ECHO_SERVER.replace("PORTS", repr([ECHO_PROXIED, ECHO_DIRECT]))])
        tmp = tempfile.mkdtemp()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, p1=PORT_NGINX, t1=PORT_DIRECT, p2=ECHO_NGINX, t2=ECHO_DIRECT))
        nginx = srv.popen(["nginx", "-c", str(conf)])
        for p in (PORT_PROXIED, PORT_DIRECT, PORT_NGINX, ECHO_PROXIED, ECHO_DIRECT, ECHO_NGINX):
            srv.wait_listening(p)
        excl = ",".join(map(str, (PORT_DIRECT, PORT_NGINX, ECHO_DIRECT, ECHO_NGINX)))
        srv.redirect("apply", "--exclude-inbound-ports", excl)
        for path in PATHS:
            r: dict = {}
            sc = None
            if path.startswith("palisade"):
                args = ["--no-l7", "--no-dlp"] if path == "palisade-l4" else []
                sc = srv.start_sidecar(*args, apply_redirect=False)
                r["rss_idle_kib"] = proc_stats(sc.pid())["rss_kib"]
            port = {"direct": PORT_DIRECT, "nginx": PORT_NGINX}.get(path, PORT_PROXIED)
            eport = {"direct": ECHO_DIRECT, "nginx": ECHO_NGINX}.get(path, ECHO_PROXIED)
            pid = sc.pid() if sc else (nginx.pid if path == "nginx" else None)
            if path == "nginx":
                # the worker does the relaying; find it (child of the master)
                kids = Path(f"/proc/{nginx.pid}/task/{nginx.pid}/children").read_text().split()
                pid = int(kids[0]) if kids else nginx.pid
            if "bulk" in scen:
                s0 = proc_stats(pid) if pid else None
                up = iperf(cli, srv.ip, port, nbytes, reverse=False)
                down = iperf(cli, srv.ip, port, nbytes, reverse=True)
                r["bulk_up_MBps"], r["bulk_down_MBps"] = round(up), round(down)
                if s0:
                    s1 = proc_stats(pid)
                    r["cpu_s_per_GB"] = round((s1["cpu"] - s0["cpu"]) / (2 * nbytes / 1e9), 3)
                    r["rss_peak_kib"] = s1["hwm_kib"]
            if "pingpong" in scen:
                res = cli.run([PY, "-c", PINGPONG, srv.ip, str(eport), str(pp_n)], timeout=300)
                lat = json.loads(res.stdout)
                r["pingpong_p50_us"] = round(statistics.median(lat), 1)
                r["pingpong_p99_us"] = round(percentile(lat, 99), 1)
            if "churn" in scen:
                res = cli.run([PY, "-c", CHURN, srv.ip, str(eport), str(churn_s)], timeout=120)
                j = json.loads(res.stdout)
                r["churn_conn_per_s"] = round(j["conns"] / j["secs"])
            if "idle" in scen and sc is not None:
                before = proc_stats(sc.pid())["rss_kib"]
                p = cli.popen([PY, "-c", IDLE, srv.ip, str(eport), str(idle_n)], stdin=__import__("subprocess").PIPE)
                line = p.stdout.readline().decode().strip()
                if line == "open":
                    after = proc_stats(sc.pid())["rss_kib"]
                    r["idle_conns"] = idle_n
                    r["bytes_per_idle_conn"] = round((after - before) * 1024 / idle_n)
                p.stdin.write(b"\n")
                p.stdin.flush()
                p.wait(30)
            if sc is not None:
                sc.stop()
            results["paths"][path] = r
            print(f"{path}: {r}", file=sys.stderr, flush=True)
    # derived ratios
    P = results["paths"]
    derived = {}
    if "bulk" in scen:
        def bulk(p):
            return (P[p]["bulk_up_MBps"] + P[p]["bulk_down_MBps"]) / 2
        derived["l4_vs_nginx_bulk"] = round(bulk("palisade-l4") / bulk("nginx"), 2)
        derived["l4_vs_direct_bulk"] = round(bulk("palisade-l4") / bulk("direct"), 2)
        derived["full_vs_nginx_bulk"] = round(bulk("palisade-full") / bulk("nginx"), 2)
    if "pingpong" in scen:
        d = P["direct"]["pingpong_p99_us"]
        derived["nginx_added_p99_us"] = round(P["nginx"]["pingpong_p99_us"] - d, 1)
        derived["l4_added_p99_us"] = round(P["palisade-l4"]["pingpong_p99_us"] - d, 1)
        derived["full_added_p99_us"] = round(P["palisade-full"]["pingpong_p99_us"] - d, 1)
    results["derived"] = derived
    cols = sorted({k for r in P.values() for k in r})
    lines = ["| path | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for p in PATHS:
        lines.append(f"| {p} | " + " | ".join(str(P[p].get(k, "")) for k in cols) + " |")
    table = "\n".join(lines)
    print(table)
    print()
    print(json.dumps(derived))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n\n```json\n" + json.dumps(derived, indent=2) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
