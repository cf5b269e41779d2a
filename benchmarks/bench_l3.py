"""Cost of the kernel L3/L4 filter (issue 16): UDP throughput and identity-change latency.

Run as root: ``python benchmarks/bench_l3.py [--seconds 5] [--identities 10000] [--json out.json]``

* ``udp``  - ``iperf3 -u`` (1400-byte datagrams, unlimited rate) from a client pod to a server
  pod: ``direct`` (no rules in the client pod) vs ``through-rules`` (redirect + the L3 rules the
  real sidecar compiled, with ``--identities`` peers in its identity map, the iperf3 UDP flow
  allowed by a rule whose peer set holds every one of them).  Received throughput and loss.
* ``identity-change`` - inside a pod's namespace with the same table: compile the plan for
  ``--identities`` peers, apply it from scratch (sidecar start), then change one identity and
  apply the sets-only transaction (what the sidecar does when a pod IP comes or goes).
  Median of ``--repeat`` runs.

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {{name: bench, namespace: bench}}
spec:
  selector: {{matchLabels: {{app: client}}}}
  default: deny
  egress:
    - name: to-iperf
      to: [{{namespace: bench}}]
      ports: [{{port: 5201}}, {{port: 5201, protocol: UDP}}]
      action: allow
    - name: cidr-peers
      to: [{{cidr: {cidr}}}]
      ports: [{{port: 7000, endPort: 7100, protocol: UDP}}]
      action: allow
"""


def identities(n: int, server_ip: str | None = None) -> list[dict]:
    out = [{"ip": f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}", "namespace": "bench" if i % 2 else "other",
            "pod": f"p{i}", "labels": {"app": f"a{i % 100}"}} for i in range(n)]
    if server_ip:
        out.append({"ip": server_ip, "namespace": "bench", "pod": "server", "labels": {"app": "server"}})
    return out


def _inner_sync(n: int, repeat: int) -> dict:
    """Runs inside the pod's namespace (after ``redirect apply``)."""
    from firewall.datapath.l3rules import L3Sync, compile_plan
    from firewall.identity.identity import Identity
    from firewall.policy.engine import PolicySet

    tmp = Path(os.environ.get("BENCH_TMP", "/tmp"))
    pol = tmp / "bench-l3-policy.yaml"
    pol.write_text(POLICY.format(cidr="10.100.0.0/16"))
    ps = PolicySet.load([str(pol)])
    local = Identity.make("10.99.0.1", "bench", "client", {"app": "client"})
    base = [Identity.make(d["ip"], d["namespace"], d["pod"], d["labels"]) for d in identities(n)]
    sync = L3Sync()
    compile_s, full_s, sets_s, elements = [], [], [], 0
    for r in range(repeat):
        t0 = time.perf_counter()
        plan = compile_plan(ps, base, local)
        compile_s.append(time.perf_counter() - t0)
        full_s.append(sync.sync(plan, full=True).seconds)
        changed = list(base)
        changed[r] = Identity.make(f"10.200.0.{r + 1}", "bench", f"new{r}", {"app": "new"})  # a pod IP came, one went
        t0 = time.perf_counter()
        plan2 = compile_plan(ps, changed, local)
        res = sync.sync(plan2)
        sets_s.append(time.perf_counter() - t0)
        assert res.kind == "sets", res
        elements = res.elements
    return {"identities": n, "set_elements": elements, "compile_ms": statistics.median(compile_s) * 1000,
            "full_apply_ms": statistics.median(full_s) * 1000,
            "identity_change_ms": statistics.median(sets_s) * 1000, "repeat": repeat}


def _iperf(client, server_ip: str, seconds: float) -> dict:
    r = client.run(["iperf3", "-c", server_ip, "-u", "-b", "0", "-l", "1400", "-t", str(seconds), "-J"],
                   check=False, timeout=seconds + 30)
    try:
        d = json.loads(r.stdout)
        s = d["end"]["sum"]
        lost = s.get("lost_percent", 0.0)
        # end.sum is the sender's rate: what arrived is that minus the loss the receiver reported
        return {"mbit_s": s["bits_per_second"] / 1e6 * (1 - lost / 100), "sent_mbit_s": s["bits_per_second"] / 1e6,
                "lost_percent": lost, "packets": s.get("packets", 0)}
    except (ValueError, KeyError) as exc:
        return {"error": f"{exc}: {r.stdout[-300:]} {r.stderr[-300:]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--identities", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--inner-sync", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner_sync:
        print(json.dumps(_inner_sync(args.identities, args.repeat)))
        return 0
    if os.geteuid() != 0:
        print("bench_l3: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    import yaml

    from tests.harness import PY, REPO, Cluster

    results: dict = {"seconds": args.seconds, "identities": args.identities}
    with Cluster("bl", 241) as c:
        server, client = c.pod("server", namespace="bench"), c.pod("client", namespace="bench")
        server.popen(["iperf3", "-s", "-p", "5201"])
        server.wait_listening(5201)
        results["udp_direct"] = _iperf(client, server.ip, args.seconds)
        tmp = Path(c.tmp)
        (tmp / "policy.yaml").write_text(POLICY.format(cidr="10.100.0.0/16"))
        (tmp / "identity.yaml").write_text(yaml.safe_dump(identities(args.identities, server.ip)))
        sc = client.start_sidecar("--no-l7", "--no-dlp", "--policy", str(tmp / "policy.yaml"),
                                  "--identity", str(tmp / "identity.yaml"),
                                  "--labels", json.dumps({"app": "client"}), env={"POD_NAMESPACE": "bench"})
        results["udp_through_rules"] = _iperf(client, server.ip, args.seconds)
        sc.stop()
        inner = c.pod("sync", namespace="bench")
        inner.redirect("apply")
        r = inner.run([PY, str(REPO / "benchmarks/bench_l3.py"), "--inner-sync", "--identities",
                       str(args.identities), "--repeat", str(args.repeat)], cwd=str(REPO),
                      env={**os.environ, "PYTHONPATH": str(REPO), "BENCH_TMP": c.tmp}, check=False, timeout=600)
        try:
            results["identity_change"] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            results["identity_change"] = {"error": r.stderr[-500:]}
    d, t, ic = results["udp_direct"], results["udp_through_rules"], results["identity_change"]
    print(f"{'measure':<44} {'value':>14}")
    for name, v in (("UDP direct, received Mbit/s (loss %)", d), ("UDP through L3 rules, received Mbit/s (loss %)", t)):
        val = f"{v['mbit_s']:.0f} ({v['lost_percent']:.1f})" if "mbit_s" in v else v.get("error", "?")[:40]
        print(f"{name:<44} {val:>14}")
    if "mbit_s" in d and "mbit_s" in t and d["mbit_s"]:
        results["udp_ratio"] = t["mbit_s"] / d["mbit_s"]
        print(f"{'through-rules / direct':<44} {results['udp_ratio']:>14.2f}")
    if "identity_change_ms" in ic:
        print(f"{'set elements (' + str(ic['identities']) + ' identities)':<44} {ic['set_elements']:>14}")
        print(f"{'compile plan, ms':<44} {ic['compile_ms']:>14.1f}")
        print(f"{'full apply (sidecar start), ms':<44} {ic['full_apply_ms']:>14.1f}")
        print(f"{'identity change (compile + sets txn), ms':<44} {ic['identity_change_ms']:>14.1f}")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
