"""Fuzz the policy loader and, for what loads, the engine.

Input: the bytes of one policy file. Loading either succeeds or raises
``PolicyError`` (whose lines all look like ``file:line: ...``) - never another
exception. A policy that loads is then asked for L4, app, L7 and DLP decisions
for a handful of flows; none of those may raise, and every decision's verdict
is ``allow`` or ``deny``.

Run: python -m fuzz.fuzz_policy -max_total_time=600 -dict=fuzz/dicts/policy.dict
"""

from __future__ import annotations

import os
import tempfile

from fuzz.common import REPO, check, instrumented, main

with instrumented(__name__ == "__main__"):
    from firewall.identity.identity import Identity
    from firewall.policy.engine import FlowInfo, PolicyError, PolicySet
    from firewall.protocols.base import TOSERVER, L7Event

_DIR = tempfile.mkdtemp(prefix="palisade-fuzz-policy-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
_PATH = os.path.join(_DIR, "policy.yaml")

LOCAL = Identity.make("10.0.0.2", "payments", "payment-api-0",
                      {"app": "payment-api", "pci.palisade.dev/scope": "cde"})
PEERS = [
    Identity.make("10.0.0.3", "shop", "checkout-1", {"app": "checkout", "pci.palisade.dev/scope": "connected"}),
    Identity.make("10.0.0.4", "analytics", "a-1", {"app": "analytics"}),
    Identity("203.0.113.9"),
]
EVENTS = [
    L7Event("http", "request", TOSERVER, 0, {"method": "POST", "path": "/v1/charge/x", "host": "payments"}),
    L7Event("tls", "hello", TOSERVER, 0, {"sni": "api.card-network.example", "version": 0x0303,
                                          "supported_versions": [0x0304, 0x0303]}),
    L7Event("dns", "query", TOSERVER, 0, {"qname": "x.card-network.example"}),
    L7Event("redis", "command", TOSERVER, 0, {"command": "FLUSHALL"}),
    L7Event("pgsql", "statement", TOSERVER, 0, {"verb": "DROP"}),
]


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    with open(_PATH, "wb") as fh:
        fh.write(data)
    try:
        ps = PolicySet.load([_PATH])
    except PolicyError as exc:
        check(exc.problems and all(p.startswith(_PATH + ":") for p in exc.problems),
              f"PolicyError lines must start with file:line: {exc.problems[:3]}")
        return
    for peer in PEERS:
        for direction in ("ingress", "egress"):
            for port in (9000, 443, 5432, 22):
                flow = FlowInfo(direction, LOCAL, peer, port)
                for mode in (None, "monitor"):
                    d = ps.decide(flow, mode_override=mode)
                    check(d.verdict in ("allow", "deny"), f"bad verdict {d}")
                    for app in ("http", "tls", "ssh", "unknown"):
                        ps.decide_app(flow, app, mode_override=mode)
                    for ev in EVENTS:
                        ps.decide_l7(flow, ev, mode_override=mode)
                    ps.dlp_for(flow, mode_override=mode)
                ps.decide(flow, quarantined=True)
                ps.explain(flow, "http")
    ps.mode_for(LOCAL)


SEEDS = [p.read_bytes() for p in sorted((REPO / "examples").glob("*.yaml"))]

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "policy")
