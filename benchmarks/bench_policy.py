"""Policy engine decisions per second: 1-rule vs 1,000-rule policies (table + JSON).

Run: ``python benchmarks/bench_policy.py [--seconds 0.5] [--json out.json]``

Scenarios, each for a 1-rule and a 1,000-rule policy:

* ``warm``   - the steady state of a sidecar: the same peers and ports again and again
               (decision cache hits); this is the per-connection cost on the hot path.
* ``miss``   - every decision for a never-seen peer (cache miss: one pass over the rules
               indexed for that port).  Rules spread over 1,000 ports.
* ``miss-same-port`` - adversarial: all 1,000 rules on one port, every peer new.
* ``l7``     - ``decide_l7`` for an HTTP request head against http rules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from firewall.identity.identity import Identity  # noqa: E402
from firewall.policy.engine import FlowInfo, PolicySet  # noqa: E402
from firewall.protocols.base import L7Event  # noqa: E402

LOCAL = Identity.make("10.0.0.5", "bench", "svc-0", {"app": "svc"})


def policy_text(n_rules: int, same_port: bool) -> str:
    lines = [
        "apiVersion: palisade.dev/v1", "kind: FirewallPolicy",
        "metadata: {name: bench, namespace: bench}", "spec:",
        "  selector: {matchLabels: {app: svc}}", "  default: deny", "  ingress:",
    ]
    for i in range(n_rules):
        port = 9000 if same_port else 10000 + i
        peers = f"{{namespace: ns{i % 50}, labels: {{app: client{i}}}}}"
        if i % 10 == 9:  # every tenth rule also admits a CIDR (an unindexable, generic peer)
            peers += f", {{cidr: 10.{100 + i // 250}.{i % 250}.0/24}}"
        lines += [
            f"    - name: r{i}",
            f"      from: [{peers}]",
            f"      ports: [{{port: {port}}}]",
            "      action: allow",
        ]
    lines += [
        "  egress:",
        "    - name: http-api",
        "      ports: [{port: 80}]",
        "      http: [{methods: [GET], pathPrefix: /v1/items}, {methods: [POST], pathPrefix: /v1/orders}]",
        "      action: allow",
    ]
    return "\n".join(lines) + "\n"


def load(n_rules: int, same_port: bool = False) -> PolicySet:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(policy_text(n_rules, same_port))
        path = fh.name
    try:
        return PolicySet.load([path])
    finally:
        os.unlink(path)


def rate(fn, seconds: float, warmup: int = 2000) -> float:
    for _ in range(warmup):  # first touch of each port builds its lookup table
        fn()
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(1000):
            fn()
        n += 1000
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - t0)


def scenario(n_rules: int, name: str, seconds: float) -> float:
    ps = load(n_rules, same_port=(name == "miss-same-port"))
    if name == "warm":
        flows = [FlowInfo("ingress", LOCAL, Identity.make(f"10.1.{i // 250}.{i % 250}", f"ns{i % 50}", f"c{i}",
                                                          {"app": f"client{i % n_rules}"}),
                          10000 + (i % n_rules)) for i in range(1000)]
        it = iter(range(1 << 62))

        def fn() -> None:
            ps.decide(flows[next(it) % 1000])
        return rate(fn, seconds)
    if name in ("miss", "miss-same-port"):
        counter = iter(range(1 << 62))

        def fn() -> None:
            i = next(counter)
            peer = Identity(f"172.{16 + (i >> 16) % 16}.{(i >> 8) & 255}.{i & 255}", f"ns{i % 50}", None,
                            (("app", f"client{i % n_rules}"),))
            port = 9000 if name == "miss-same-port" else 10000 + (i % n_rules)
            ps.decide(FlowInfo("ingress", LOCAL, peer, port))
        return rate(fn, seconds)
    flow = FlowInfo("egress", LOCAL, Identity("192.0.2.1"), 80)
    events = [L7Event("http", "request", 0, 0, {"method": "GET", "path": f"/v1/items/{i}"}) for i in range(100)]
    it = iter(range(1 << 62))

    def fn() -> None:
        ps.decide_l7(flow, events[next(it) % 100])
    return rate(fn, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="measuring time per cell")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args(argv)
    results = []
    for name in ("warm", "miss", "miss-same-port", "l7"):
        row = {"scenario": name}
        for n in (1, 1000):
            row[f"rules_{n}"] = round(scenario(n, name, args.seconds))
        row["ratio_1000_vs_1"] = round(row["rules_1000"] / row["rules_1"], 3)
        results.append(row)
    print(f"{'scenario':<16}{'1 rule /s':>14}{'1000 rules /s':>16}{'ratio':>8}")
    for r in results:
        print(f"{r['scenario']:<16}{r['rules_1']:>14,}{r['rules_1000']:>16,}{r['ratio_1000_vs_1']:>8.2f}")
    doc = {"benchmark": "policy_decisions", "python": sys.version.split()[0], "results": results}
    print(json.dumps(doc))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
