"""Report throughput on a synthetic week of events from hundreds of sidecars.

Generates N million EVE lines (flows 85%, policy alerts 10%, DLP alerts 5%;
300 pods in 40 workloads over 3 scopes, 2,000 outside addresses, timestamps
spread over 7 days, ~650 bytes a line like the sidecar's), then runs
``python -m firewall report --no-pdf`` on them once per ``--jobs`` value in a
child process and measures wall time and that process tree's peak RSS.

    python benchmarks/bench_report.py --millions 1 --jobs 1,2 [--json out.json]

Prints a table and a JSON document.  Not a test: do not run it in CI loops
(the machine is shared); the figures go in docs/auditor.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCOPE = "pci.palisade.dev/scope"

POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: payment-api
  namespace: ns0
  annotations: {palisade.dev/last-reviewed: "2026-06-01"}
spec:
  selector: {matchLabels: {app: app0}}
  mode: protect
  default: deny
  ingress:
""" + "".join(f"""    - name: rule-{i}
      description: synthetic rule {i}
      from: [{{namespace: ns{i % 8}, labels: {{app: app{i}}}}}]
      ports: [{{port: {8000 + i}}}]
      action: allow
""" for i in range(1, 40))


def _workloads(rng: random.Random) -> list[dict]:
    pods = []
    for w in range(40):
        scope = "cde" if w < 6 else "connected" if w < 14 else "out-of-scope"
        labels = {"app": f"app{w}", SCOPE: scope, "pod-template-hash": "7d9f8b6c5"}
        for p in range(300 // 40 + (1 if w < 300 % 40 else 0)):
            pods.append({"ip": f"10.{w}.{p // 250}.{p % 250 + 1}", "w": {
                "namespace": f"ns{w % 8}", "pod": f"app{w}-7d9f8b6c5-{rng.randrange(36**5):05x}",
                "labels": labels, "scope": scope, "service_account": f"app{w}"}})
    return pods


def generate(path: Path, lines: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    pods = _workloads(rng)
    world = [{"world": True, "ip": f"203.0.{i // 250}.{i % 250 + 1}", "scope": "out-of-scope"} for i in range(2000)]
    t0 = datetime(2026, 11, 16, tzinfo=UTC).timestamp()
    week = 7 * 86400
    dumps = json.dumps
    with open(path, "w") as fh:
        buf = []
        for n in range(lines):
            ts = datetime.fromtimestamp(t0 + week * n / lines, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")
            src = rng.choice(pods)
            r = rng.random()
            if rng.random() < 0.15:
                dst_w, dst_ip = (w := rng.choice(world)), w["ip"]
                direction = "outbound"
            else:
                d = rng.choice(pods)
                dst_w, dst_ip, direction = d["w"], d["ip"], "inbound"
            port = 8000 + int(dst_w.get("labels", {}).get("app", "app0")[3:]) if "labels" in dst_w else 443
            base = {"timestamp": ts, "flow_id": n, "direction": direction, "src_ip": src["ip"],
                    "src_port": 30000 + n % 30000, "dest_ip": dst_ip, "dest_port": port, "proto": "TCP",
                    "app_proto": "http" if port != 443 else "tls", "src_workload": src["w"],
                    "dest_workload": dst_w}
            if r < 0.85:
                verdict = "allow" if rng.random() < 0.9 else "deny"
                base.update({"event_type": "flow", "verdict": verdict,
                             "rule": f"rule-{port - 8000}" if verdict == "allow" else "default",
                             "mode": "protect", "encrypted": port == 443, "close_reason": "fin",
                             "l7": {"method": "POST", "path": "/v1/charge", "status": 200},
                             "flow": {"bytes_toserver": rng.randrange(200, 5000),
                                      "bytes_toclient": rng.randrange(200, 50000), "start": ts, "end": ts}})
            elif r < 0.95:
                base.update({"event_type": "alert", "alert": {"action": "blocked", "signature": "default",
                                                              "signature_id": 1, "category": "policy",
                                                              "severity": 2}})
            else:
                base.update({"event_type": "alert", "alert": {"action": "blocked", "signature": "no-pan-out",
                                                              "signature_id": 9, "category": "dlp", "severity": 1},
                             "dlp": {"rule_id": "payment_cards.visa", "type": "credit_card",
                                     "pack": "payment_cards", "masked": "411111******1111", "offset": 10,
                                     "direction": "toserver", "context": "card=411111******1111",
                                     "confidence": "high"}})
            buf.append(dumps(base, separators=(",", ":")))
            if len(buf) >= 10000:
                fh.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            fh.write("\n".join(buf) + "\n")


def run_report(policy: Path, events: Path, out: Path, jobs: int) -> dict:
    cmd = [sys.executable, "-m", "firewall", "report", "--policy", str(policy), "--events", str(events),
           "-o", str(out), "--no-pdf", "--jobs", str(jobs), "--as-of", "2026-11-28"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"report failed: {err.strip()}")
    return {"jobs": jobs, "seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--millions", type=float, default=1.0, help="event lines, in millions (default 1)")
    ap.add_argument("--jobs", default="1,2", help="comma-separated --jobs values to measure (default 1,2)")
    ap.add_argument("--json", metavar="FILE", help="also write the results JSON here")
    args = ap.parse_args()
    lines = int(args.millions * 1_000_000)
    with tempfile.TemporaryDirectory(prefix="bench-report-") as d:
        dpath = Path(d)
        policy, events = dpath / "policy.yaml", dpath / "eve.jsonl"
        policy.write_text(POLICY)
        t0 = time.monotonic()
        generate(events, lines)
        gen = time.monotonic() - t0
        size = events.stat().st_size
        results = []
        for j in (int(x) for x in args.jobs.split(",")):
            r = run_report(policy, events, dpath / f"out{j}", j)
            r["lines_per_second"] = int(lines / r["seconds"])
            r["mb_per_second"] = round(size / 1e6 / r["seconds"], 1)
            results.append(r)
        report = json.loads((dpath / f"out{results[-1]['jobs']}" / "report.json").read_text())
    doc = {"benchmark": "report", "lines": lines, "bytes": size, "avg_line_bytes": round(size / lines),
           "generate_seconds": round(gen, 1), "cpus": os.cpu_count(), "results": results,
           "check": {"events": report["time_range"]["events"], "flows_aggregated": len(report["flows"]),
                     "workloads": len(report["inventory"]["workloads"])}}
    print(f"{lines:,} lines, {size / 1e6:.0f} MB ({doc['avg_line_bytes']} B/line), {os.cpu_count()} CPUs")
    print(f"{'jobs':>4} {'seconds':>8} {'lines/s':>10} {'MB/s':>6} {'peak RSS MiB':>13} {'CPU s':>7}")
    for r in results:
        print(f"{r['jobs']:>4} {r['seconds']:>8} {r['lines_per_second']:>10,} {r['mb_per_second']:>6} "
              f"{r['peak_rss_mib']:>13} {r['cpu_seconds']:>7}")
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
