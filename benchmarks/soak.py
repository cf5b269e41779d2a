"""Soak: mixed traffic through the real sidecar for a long time, sampling its RSS, open file
descriptors, threads and event-loop lag - all of which must stay flat.

Pods (network namespaces, tests/harness.py): ``payments`` (CDE, the sidecar in protect mode
with DLP blocking cards leaving the CDE), ``checkout`` and ``checkout2`` (allowed HTTP in),
``analytics`` (out of scope: denied in, HTTP and bulk out). Traffic, all at once, for the whole
run, each operation a new connection:

* checkout, checkout2 -> payments:9000  POST /v1/charge (allowed, L7-checked)
* analytics -> payments:9000            denied (CDE segmentation), refused by the sidecar
* payments -> analytics:9100            HTTP POSTs, every 4th carrying a card number (DLP 403)
* payments -> analytics:9500            bulk 1 MiB each way (blast, byte-checked)

Every ``--interval`` seconds: VmRSS, fd count, threads of the sidecar, and
``palisade_event_loop_lag_seconds`` from its /metrics. At the end: a table and a JSON document
(``--json FILE`` too) with the samples, the operation counts, and "growth" = mean of the last
third minus mean of the first third of the samples (after ``--warmup`` seconds).

Usage (root): python benchmarks/soak.py [--duration 600] [--interval 5] [--json out.json]
The test suite runs the same code for 60 s (tests/robustness/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.harness import PY, REPO, Cluster, wait_until  # noqa: E402
from tests.robustness.conftest import PAN, Env, fd_count, rss_kib, threads  # noqa: E402

# one traffic generator per pod: argv = JSON {ops: [...], duration}; prints counts as JSON
GENERATOR = r"""
import json, socket, struct, subprocess, sys, time
plan = json.loads(sys.argv[1])
counts = {}
def bump(k):
    counts[k] = counts.get(k, 0) + 1
def http(host, port, path, body):
    s = socket.create_connection((host, port), timeout=10)
    try:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        while True:
            b = s.recv(65536)
            if not b: break
            data += b
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                n = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if n and len(rest) >= n[0]:
                    break
        return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "none"
    except ConnectionResetError:
        return "reset"
    finally:
        s.close()
t0 = time.monotonic(); i = 0
while time.monotonic() - t0 < plan["duration"]:
    for op in plan["ops"]:
        i += 1
        kind = op["kind"]
        try:
            if kind == "http":
                op["n"] = op.get("n", 0) + 1
                card = op.get("card_every") and op["n"] % op["card_every"] == 0
                body = (b'{"card": "%s"}' % op["card"].encode()) if card else b'{"amount": 10}'
                code = http(op["host"], op["port"], op["path"], body)
                bump(f"{kind}:{'card' if card else 'clean'}:{code}")
            elif kind == "denied":
                try:
                    s = socket.create_connection((op["host"], op["port"]), timeout=5)
                    s.sendall(b"POST /v1/charge HTTP/1.1\r\nHost: x\r\n\r\n")
                    r = s.recv(10); s.close()
                    bump("denied:" + ("data" if r else "closed"))
                except OSError:
                    bump("denied:refused")
            elif kind == "bulk":
                r = subprocess.run([sys.executable, op["blast"], "client", "--host", op["host"], "--port",
                                    str(op["port"]), "--client-bytes", str(op["bytes"]), "--server-bytes",
                                    str(op["bytes"])], capture_output=True, text=True, timeout=60)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                bump("bulk:ok" if res["failed"] == 0 else "bulk:failed")
        except Exception as exc:
            bump(f"{kind}:error:{type(exc).__name__}")
        if op.get("pause"):
            time.sleep(op["pause"])
print(json.dumps(counts), flush=True)
"""


def _lag(sc) -> float | None:
    code, body = sc.http("/metrics")
    m = re.search(r"^palisade_event_loop_lag_seconds ([0-9.e+-]+)$", body, re.M)
    return float(m.group(1)) if code == 200 and m else None


def _growth(values: list[float]) -> float:
    k = max(1, len(values) // 3)
    return statistics.mean(values[-k:]) - statistics.mean(values[:k])


def run_soak(duration: float = 600, interval: float = 5, warmup: float = 5, octet: int = 223,
             log=print) -> dict:
    """Build the pods, run the traffic for ``duration`` s, return samples and counts."""
    c = Cluster("pr", octet)
    try:
        env = Env(c)
        env.recorder(env.payments, 9000)
        env.recorder(env.analytics, 9100)
        env.analytics.serve_blast(9500)
        sc = env.sidecar()
        pid = sc.pid()
        before = {"fds": fd_count(pid), "rss_kib": rss_kib(pid), "threads": threads(pid)}
        blast = str(REPO / "tests/tools/blast.py")
        plans = {
            env.checkout: [{"kind": "http", "host": env.payments.ip, "port": 9000, "path": "/v1/charge",
                            "pause": 0.01}],
            env.checkout2: [{"kind": "http", "host": env.payments.ip, "port": 9000, "path": "/v1/charge",
                             "pause": 0.02}],
            env.analytics: [{"kind": "denied", "host": env.payments.ip, "port": 9000, "pause": 0.05}],
            env.payments: [{"kind": "http", "host": env.analytics.ip, "port": 9100, "path": "/collect",
                            "card_every": 4, "card": PAN, "pause": 0.01},
                           {"kind": "bulk", "host": env.analytics.ip, "port": 9500, "bytes": 1 << 20,
                            "blast": blast}],
        }
        procs = [pod.popen([PY, "-c", GENERATOR, json.dumps({"ops": ops, "duration": duration})], cwd=str(REPO))
                 for pod, ops in plans.items()]
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration:
            time.sleep(interval)
            s = {"t": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(pid), "fds": fd_count(pid),
                 "threads": threads(pid), "loop_lag_s": _lag(sc),
                 "flows": sum(1 for _ in open(sc.events_path)) if sc.events_path.exists() else 0}
            samples.append(s)
            log(f"{s['t']:7.1f}s  rss {s['rss_kib'] / 1024:7.1f} MiB  fds {s['fds']:5d}  threads {s['threads']:3d}  "
                f"lag {s['loop_lag_s'] if s['loop_lag_s'] is not None else float('nan'):.4f}s  events {s['flows']}")
        counts: dict[str, int] = {}
        for p in procs:
            out, err = p.communicate(timeout=120)
            for k, v in json.loads(out.decode().strip().splitlines()[-1]).items():
                counts[k] = counts.get(k, 0) + v
        try:
            wait_until(lambda: fd_count(pid) <= before["fds"], 30, what="fds back to the pre-traffic count")
        except TimeoutError:
            log("fds did not come back: " + env.payments.run(["ss", "-tanp"], check=False).stdout[-3000:])
        after = {"fds": fd_count(pid), "rss_kib": rss_kib(pid), "threads": threads(pid)}
        flows = sc.events("flow")
        steady = [s for s in samples if s["t"] >= warmup] or samples
        result = {
            "duration_s": duration, "interval_s": interval, "before": before, "after": after,
            "samples": samples, "ops": counts, "flow_records": len(flows),
            "unique_flow_ids": len({f["flow_id"] for f in flows}),
            "growth": {k: round(_growth([s[k] for s in steady]), 1) for k in ("rss_kib", "fds", "threads")},
            "loop_lag_max_s": max((s["loop_lag_s"] or 0.0) for s in samples) if samples else None,
            "sidecar_alive": sc.proc.poll() is None, "sidecar_rc": sc.proc.poll(),
            "tmp": str(env.tmp),
        }
        sc.stop()
        return result
    finally:
        c.close()


def table(res: dict) -> str:
    rows = ["| t (s) | RSS (MiB) | fds | threads | loop lag (ms) |", "|---:|---:|---:|---:|---:|"]
    for s in res["samples"]:
        lag = "" if s["loop_lag_s"] is None else f"{s['loop_lag_s'] * 1000:.1f}"
        rows.append(f"| {s['t']} | {s['rss_kib'] / 1024:.1f} | {s['fds']} | {s['threads']} | {lag} |")
    g = res["growth"]
    rows.append("")
    rows.append(f"growth (last third - first third): RSS {g['rss_kib'] / 1024:+.1f} MiB, fds {g['fds']:+.1f}, "
                f"threads {g['threads']:+.1f}; max loop lag {res['loop_lag_max_s'] or 0:.4f} s; "
                f"flow records {res['flow_records']} (unique ids {res['unique_flow_ids']})")
    rows.append("operations: " + ", ".join(f"{k} {v}" for k, v in sorted(res["ops"].items())))
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--interval", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    res = run_soak(args.duration, args.interval, args.warmup, log=lambda m: print(m, file=sys.stderr))
    print(table(res))
    doc = json.dumps(res, indent=1)
    print(doc)
    if args.json:
        Path(args.json).write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
