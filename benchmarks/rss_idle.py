"""Idle RSS of the sidecar, measured the way ``run.py`` measures "proxy RSS idle" (issue 9).

``run.py`` needs the whole bench cluster (nginx, iperf3, redis...) to read one number; this
starts only the server pod, runs ``python -m firewall run`` with the palisade-full (or -l4)
arguments of ``run.py`` (100-rule policy, identity file, default DLP packs, warm DLP cache),
waits for ``/readyz`` and reads VmRSS summed over the process tree, ``--runs`` times on fresh
sidecars, and prints min / median / max in KiB. Needs root (network namespaces).

    sudo .venv/bin/python benchmarks/rss_idle.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import (  # noqa: E402
    ADMIN_PORT,
    POLICY100,
    READY_POLL,
    SERVER_LABELS,
    SERVER_NS,
    tree_stats,
)
from tests.harness import PY, Cluster  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--path", choices=("palisade-full", "palisade-l4"), default="palisade-full")
    ap.add_argument("--octet", type=int, default=177)
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds after /readyz before reading (run.py reads at once)")
    a = ap.parse_args()
    samples: list[int] = []
    with Cluster("rs", a.octet) as c:
        srv = c.pod("server", namespace=SERVER_NS)
        tmp = Path(c.tmp)
        ident = tmp / "identity.yaml"
        ident.write_text(json.dumps([{"ip": srv.ip, "namespace": SERVER_NS, "pod": "server",
                                      "labels": SERVER_LABELS}]))
        cache = tmp / "dlp-cache-warm"
        args = ["--labels", json.dumps(SERVER_LABELS), "--policy", str(POLICY100), "--identity", str(ident)]
        if a.path == "palisade-l4":
            args += ["--no-l7", "--no-dlp"]
        args += ["--dlp-cache", str(cache)]
        for i in range(a.runs + 1):  # the first run fills the DLP cache and is not counted
            sc = srv.start_sidecar(*args, apply_redirect=False, wait=False, env={"POD_NAMESPACE": SERVER_NS})
            r = srv.run([PY, "-c", READY_POLL, str(ADMIN_PORT), "90"], check=False, timeout=120)
            if r.returncode != 0:
                print(sc.stderr()[-3000:], file=sys.stderr)
                return 1
            time.sleep(a.settle)
            rss = tree_stats(sc.pid())["rss_kib"]
            sc.stop()
            if i:
                samples.append(rss)
                print(f"run {i}: {rss} KiB", flush=True)
    print(json.dumps({"path": a.path, "runs": len(samples), "min_kib": min(samples),
                      "median_kib": statistics.median(samples), "max_kib": max(samples),
                      "median_mib": round(statistics.median(samples) / 1024, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
