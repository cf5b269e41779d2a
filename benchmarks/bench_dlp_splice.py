"""Bulk through the sidecar in its default configuration (L7 + every default DLP pack on), with
and without a DLP rule that covers the flow: what splicing the flows no DLP action applies to buys.

    sudo python benchmarks/bench_dlp_splice.py [--mib 256] [--rounds 3] [--json out.json]

One server pod (namespace ``payments``, ``app: api``, a protect-mode policy) and one client pod
(namespace ``shop``); ``iperf3`` moves ``--mib`` MiB up, then down (``-R``), as ``run.py``'s bulk
test does (a protocol the sidecar does not parse; byte-exactness is the data-path tests' job).  Variants, run
interleaved (round 1: every variant, round 2: ...), each on a fresh sidecar:

* ``out of DLP scope``: the policy's DLP rule covers another namespace only, so no DLP action
  applies to the pair: the flow is identified, found to be nothing the sidecar parses, spliced.
* ``in DLP scope``: the same policy plus a DLP ``alert`` rule for ``shop``: every byte is scanned
  (both directions) on the Python relay.

Reported per variant: median (min-max) of the receiver's MB/s per direction and of the sidecar's
CPU seconds per GB moved (``/proc/PID/stat``; on a shared machine CPU per GB moves much less
than MB/s), and whether the flow was spliced (``palisade_spliced_flows_total``).  Needs root
(network namespaces), like ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Cluster  # noqa: E402

POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector:
    matchLabels: {app: api}
  mode: protect
  default: deny
  ingress:
    - name: shop-bulk
      from: [{namespace: shop}]
      ports: [{port: 9000, protocol: TCP}]
      action: allow
  dlp:
    - name: no-pan-from-partners
      packs: [payment_cards]
      direction: ingress
      from: [{namespace: partners}]
      action: block
"""
IN_SCOPE = """
    - name: watch-shop
      packs: ['*']
      direction: ingress
      from: [{namespace: shop}]
      action: alert
"""
VARIANTS = {"out of DLP scope": POLICY, "in DLP scope": POLICY + IN_SCOPE}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def one_run(cluster: Cluster, variant: str, nbytes: int) -> dict:
    from firewall.identity.podinfo import write_podinfo

    srv, cli = cluster.pods["server"], cluster.pods["client"]
    tmp = Path(cluster.tmp) / f"run-{cluster.starts}"
    tmp.mkdir()
    os.chmod(tmp, 0o755)
    labels = {"app": "api"}
    ident = tmp / "identity.json"
    ident.write_text(json.dumps([
        {"ip": srv.ip, "namespace": "payments", "pod": "server", "labels": labels},
        {"ip": cli.ip, "namespace": "shop", "pod": "client", "labels": {"app": "loadgen"}}]))
    policy = tmp / "policy.yaml"
    policy.write_text(VARIANTS[variant])
    podinfo = tmp / "podinfo"
    podinfo.mkdir()
    write_podinfo(str(podinfo), {}, labels)
    os.chmod(podinfo, 0o755)
    sc = srv.start_sidecar("--identity", str(ident), "--policy", str(policy), "--podinfo", str(podinfo),
                           "--labels", json.dumps(labels),
                           env={"POD_NAMESPACE": "payments"})
    try:
        cpu0 = cpu_seconds(sc.pid())
        up = iperf(cli, srv.ip, nbytes, reverse=False)
        down = iperf(cli, srv.ip, nbytes, reverse=True)
        cpu = cpu_seconds(sc.pid()) - cpu0
        m = re.search(r"^palisade_spliced_flows_total (\S+)", sc.http("/metrics")[1], re.M)
        spliced = float(m.group(1)) if m else 0.0
    finally:
        sc.stop()
    # iperf3 opens a control and a data connection per test: 4 flows, all of them spliced or none
    return {"up_MB_s": up, "down_MB_s": down, "cpu_s_per_GB": cpu / (2 * nbytes / 1e9), "spliced": spliced}


def iperf(cli, host: str, nbytes: int, reverse: bool) -> float:
    args = ["iperf3", "-c", host, "-p", "9000", "-n", str(nbytes), "-J", "-l", "256K"]
    if reverse:
        args.append("-R")
    r = cli.run(args, timeout=600)
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 8 / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="MiB each way per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_dlp_splice: needs root (network namespaces)", file=sys.stderr)
        return 2
    nbytes = args.mib << 20
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with Cluster("bs", 238) as cluster:
        srv = cluster.pod("server", namespace="payments")
        cluster.pod("client", namespace="shop")
        srv.popen(["iperf3", "-s", "-p", "9000"])
        srv.wait_listening(9000)
        for rnd in range(args.rounds):
            for variant in VARIANTS:
                res = one_run(cluster, variant, nbytes)
                runs[variant].append(res)
                print(f"round {rnd + 1} {variant}: {res}", flush=True)
    def med(xs: list[float], nd: int = 0) -> str:
        return f"{round(statistics.median(xs), nd):g} ({round(min(xs), nd):g}-{round(max(xs), nd):g})"

    rows = []
    for variant, rs in runs.items():
        rows.append({"variant": variant, "upload_MB_s": med([r["up_MB_s"] for r in rs]),
                     "download_MB_s": med([r["down_MB_s"] for r in rs]),
                     "cpu_s_per_GB": med([r["cpu_s_per_GB"] for r in rs], 2),
                     "spliced_flows": sorted({r["spliced"] for r in rs})})
    print(f"{args.mib} MiB each way (iperf3), {args.rounds} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| variant | upload MB/s | download MB/s | proxy CPU s/GB | spliced flows per run |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['upload_MB_s']} | {r['download_MB_s']} | {r['cpu_s_per_GB']} | "
              f"{', '.join(f'{x:g}' for x in r['spliced_flows'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"mib": args.mib, "rounds": args.rounds, "rows": rows,
                                               "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
