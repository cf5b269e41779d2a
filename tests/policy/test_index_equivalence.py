"""The indexed evaluator agrees with a naive reading of the documented order.

Random policies (cluster + namespaced rules with namespace/label/scope/cidr peers,
single ports, ranges and any-port rules, exceptions) and random flows; the engine's
port tables, peer buckets and caches must give the rule a plain top-to-bottom scan
of the documented order gives.
"""

from __future__ import annotations

import ipaddress
import random

import yaml

from firewall.identity.identity import Identity
from firewall.policy.engine import FlowInfo, PolicySet
from tests.policy.common import write

NAMESPACES = ["a", "b", "c"]
APPS = ["x", "y", "z"]
SCOPES = ["cde", "connected", "out-of-scope"]


def rand_peer(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        return {"namespace": rng.choice(NAMESPACES)}
    if kind == 1:
        return {"labels": {"app": rng.choice(APPS)}}
    if kind == 2:
        return {"namespace": rng.choice(NAMESPACES), "labels": {"app": rng.choice(APPS)}}
    if kind == 3:
        return {"scope": rng.choice(SCOPES)}
    if kind == 4:
        return {"cidr": f"10.{rng.randrange(3)}.0.0/16"}
    return {"labels": {}}


def rand_rule(rng: random.Random, i: int, cluster: bool) -> dict:
    r: dict = {"name": f"r{i}", "action": rng.choice(["allow", "deny", "alert"])}
    if cluster:
        r["direction"] = rng.choice(["ingress", "egress"])
    p = rng.random()
    if p < 0.6:
        r["ports"] = [{"port": rng.choice([80, 443, 5432])}]
    elif p < 0.8:
        r["ports"] = [{"port": 8000, "endPort": 8000 + rng.randrange(1, 3000)}]
    if rng.random() < 0.8:
        r["from" if (cluster and r["direction"] == "ingress") or not cluster else "to"] = [
            rand_peer(rng) for _ in range(rng.randrange(1, 3))]
    if r["action"] != "deny" and rng.random() < 0.2:
        r["exception"] = True
        r["description"] = "random exception"
    return r


def peer_ok(entry: dict, peer: Identity) -> bool:
    if "namespace" in entry and peer.namespace != entry["namespace"]:
        return False
    if "labels" in entry and (peer.is_world or any(peer.label_map.get(k) != v for k, v in entry["labels"].items())):
        return False
    if "scope" in entry and peer.scope != entry["scope"]:
        return False
    if "cidr" in entry and ipaddress.ip_address(peer.ip) not in ipaddress.ip_network(entry["cidr"]):
        return False
    return True


def port_ok(rule: dict, port: int) -> bool:
    return "ports" not in rule or any(p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])


def naive(cluster_rules: list[dict], ns_rules: dict[str, list[dict]], local: Identity, flow: FlowInfo) -> str:
    d = flow.direction
    cl = [r for r in cluster_rules if r["direction"] == d]
    order = [(r, True) for r in cl if r["action"] == "deny"] + [(r, False) for r in cl if r["action"] != "deny"]
    order += [(r, False) for r in ns_rules[d]]
    seg = (d == "ingress" and local.scope == "cde" and flow.peer.scope == "out-of-scope") or (
        d == "egress" and local.scope == "out-of-scope" and flow.peer.scope == "cde")
    key = "from" if d == "ingress" else "to"
    for rule, cluster_deny in order:
        if seg and not (cluster_deny or rule.get("exception")):
            continue
        if not port_ok(rule, flow.port):
            continue
        if key in rule and not any(peer_ok(e, flow.peer) for e in rule[key]):
            continue
        return rule["name"]
    if seg:
        return "cde-segmentation"
    return "default-deny"


def rand_identity(rng: random.Random) -> Identity:
    ip = f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if rng.random() < 0.2:
        return Identity(ip)
    labels = {"app": rng.choice(APPS)}
    scope = rng.choice(SCOPES + [None])
    if scope:
        labels["pci.palisade.dev/scope"] = scope
    return Identity.make(ip, rng.choice(NAMESPACES), "p", labels)


def test_index_matches_naive_order(tmp_path) -> None:
    rng = random.Random(20261128)
    for round_ in range(15):
        cluster = [rand_rule(rng, i, True) for i in range(rng.randrange(0, 6))]
        ns_rules = {"ingress": [rand_rule(rng, 100 + i, False) for i in range(rng.randrange(0, 25))],
                    "egress": [rand_rule(rng, 200 + i, False) for i in range(rng.randrange(0, 25))]}
        docs = [{"apiVersion": "palisade.dev/v1", "kind": "ClusterFirewallPolicy", "metadata": {"name": "c"},
                 "spec": {"rules": cluster}},
                {"apiVersion": "palisade.dev/v1", "kind": "FirewallPolicy",
                 "metadata": {"name": "p", "namespace": "a"},
                 "spec": {"selector": {"matchLabels": {"app": "me"}}, "ingress": ns_rules["ingress"],
                          "egress": ns_rules["egress"]}}]
        for r in ns_rules["egress"]:  # namespaced egress rules select with 'to'
            if "from" in r:
                r["to"] = r.pop("from")
        ps = PolicySet.load([write(tmp_path, yaml.safe_dump_all(docs), f"p{round_}.yaml")])
        for scope in SCOPES:
            local = Identity.make("10.9.9.9", "a", "me-0", {"app": "me", "pci.palisade.dev/scope": scope})
            for _ in range(150):
                flow = FlowInfo(rng.choice(["ingress", "egress"]), local, rand_identity(rng),
                                rng.choice([80, 443, 5432, 8000, 8001, 9000, 10999]))
                expected = naive(cluster, ns_rules, local, flow)
                got = ps.decide(flow)
                assert got.rule == expected, (flow, got.reason)
                assert ps.decide(flow) is got  # cached
