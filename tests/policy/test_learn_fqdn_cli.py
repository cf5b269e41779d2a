"""learn -> export -> protect round trip, the FQDN cache, and the policy CLI."""

from __future__ import annotations

import json

import pytest

from firewall.cli import main
from firewall.identity.fqdn import FqdnCache, fqdn_matches
from firewall.identity.identity import Identity
from firewall.policy.engine import FlowInfo, PolicySet
from firewall.policy.learn import learn_from_events, path_prefix, render_policies, selector_labels
from firewall.protocols.base import L7Event
from tests.policy.common import EXAMPLE, write

SCOPE = "pci.palisade.dev/scope"
PAY = Identity.make("10.0.0.5", "payments", "payment-api-5d8-x1", {"app": "payment-api", SCOPE: "cde",
                                                                      "pod-template-hash": "5d8"})
PAY2 = Identity.make("10.0.0.7", "payments", "payment-api-5d8-x2", {"app": "payment-api", SCOPE: "cde",
                                                                       "pod-template-hash": "5d8"})
CHK = Identity.make("10.0.1.5", "shop", "checkout-1", {"app": "checkout", SCOPE: "connected"})
DB = Identity.make("10.0.0.6", "payments", "db-0", {"app": "payments-db", SCOPE: "cde"})
KDNS = Identity.make("10.96.0.10", "kube-system", "coredns-0", {"k8s-app": "kube-dns"})
PARTNER = Identity("198.51.100.7")
WEB = Identity.make("10.0.1.20", "shop", "web-0", {"app": "web"})  # out-of-scope


def flow_event(direction: str, local: Identity, peer: Identity, port: int, app: str | None = None,
               methods_paths: list | None = None, proto: str = "TCP", ts: str = "2026-11-28T10:00:00.000000+0000"):
    src, dst = (peer, local) if direction == "inbound" else (local, peer)
    return {"timestamp": ts, "event_type": "flow", "direction": direction, "verdict": "allow", "mode": "learn",
            "proto": proto, "src_ip": src.ip, "dest_ip": dst.ip, "dest_port": port, "app_proto": app,
            "l7": {"methods_paths": methods_paths} if methods_paths else {},
            "src_workload": src.to_json() | ({"ip": src.ip} if not src.is_world else {}),
            "dest_workload": dst.to_json()}


LEARNED = [
    flow_event("inbound", PAY, CHK, 9000, "http", [["POST", "/v1/charge/123"], ["POST", "/v1/charge/9f8e7d6c5b4a"],
                                                   ["GET", "/v1/status"]]),
    flow_event("inbound", PAY2, CHK, 9000, "http", [["POST", "/v1/refund/77?x=1"]], ts="2026-11-28T12:00:00.000000+0000"),
    flow_event("outbound", PAY, DB, 5432, "pgsql"),
    flow_event("outbound", PAY2, DB, 5432, "pgsql"),
    flow_event("outbound", PAY, KDNS, 53, "dns", proto="UDP"),
    flow_event("inbound", PAY, PARTNER, 9443, "tls"),
    flow_event("inbound", PAY, WEB, 8080, None),  # out-of-scope -> cde: must become an exception rule
    {"event_type": "alert", "alert": {"signature": "x"}},  # ignored
    flow_event("inbound", PAY, CHK, 9999, None) | {"verdict": "deny", "mode": "protect"},  # refused: not learned
]


def test_learn_round_trip(tmp_path) -> None:
    policies = learn_from_events(LEARNED)
    assert len(policies) == 1 and policies[0].selector == {"app": "payment-api"}
    text = render_policies(policies)
    assert "# 2 flows from 1 pod, first seen 2026-11-28T10:00:00.000000+0000, last seen 2026-11-28T12:00" in text
    assert "10.0.1.5" not in text and "pod-template-hash" not in text  # peers by labels, not IP
    path = write(tmp_path, text, "learned.yaml")
    ps = PolicySet.load([path])
    rules = ps.documents[0].spec
    assert len(rules.ingress) == 3 and len(rules.egress) == 2
    assert [r.exception for r in rules.ingress].count(True) == 2  # partner (world) and web (out-of-scope)

    # every learned flow is allowed, at every stage, for both replicas
    for local in (PAY, PAY2):
        assert ps.decide(FlowInfo("ingress", local, CHK, 9000)).verdict == "allow"
        assert ps.decide_app(FlowInfo("ingress", local, CHK, 9000), "http").verdict == "allow"
        for method, p in [("POST", "/v1/charge/555"), ("GET", "/v1/status"), ("POST", "/v1/refund/1")]:
            d = ps.decide_l7(FlowInfo("ingress", local, CHK, 9000),
                             L7Event("http", "request", 0, 0, {"method": method, "path": p}))
            assert d is not None and d.verdict == "allow", (method, p, d)
        assert ps.decide(FlowInfo("egress", local, DB, 5432)).verdict == "allow"
        assert ps.decide_app(FlowInfo("egress", local, DB, 5432), "pgsql").verdict == "allow"
        assert ps.decide(FlowInfo("egress", local, KDNS, 53, "UDP")).verdict == "allow"
        assert ps.decide_app(FlowInfo("ingress", local, PARTNER, 9443), "tls").verdict == "allow"
        d = ps.decide(FlowInfo("ingress", local, WEB, 8080))
        assert (d.verdict, d.enforced) == ("allow", True)

    # ... and nothing else: a new peer, a new port, a new method, a new path, another protocol
    new_peer = Identity.make("10.0.1.66", "shop", "cart-0", {"app": "cart", SCOPE: "connected"})
    checks = [
        ps.decide(FlowInfo("ingress", PAY, new_peer, 9000)),
        ps.decide(FlowInfo("ingress", PAY, Identity("198.51.100.8"), 9443)),
        ps.decide(FlowInfo("ingress", PAY, CHK, 9001)),
        ps.decide(FlowInfo("egress", PAY, DB, 5433)),
        ps.decide(FlowInfo("egress", PAY, KDNS, 53, "TCP")),
        ps.decide_app(FlowInfo("egress", PAY, DB, 5432), "http"),
        ps.decide_l7(FlowInfo("ingress", PAY, CHK, 9000), L7Event("http", "request", 0, 0,
                                                                   {"method": "DELETE", "path": "/v1/charge/1"})),
        ps.decide_l7(FlowInfo("ingress", PAY, CHK, 9000), L7Event("http", "request", 0, 0,
                                                                   {"method": "GET", "path": "/admin"})),
        ps.decide(FlowInfo("ingress", PAY, CHK, 9999)),
    ]
    assert [(d.verdict, d.enforced) for d in checks] == [("deny", True)] * len(checks)


def test_learn_cli_multiple_files_and_namespace(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(e) for e in LEARNED[:3]) + "\nnot json\n")
    other = Identity.make("10.9.0.1", "shop", "web-0", {"app": "web"})
    b.write_text(json.dumps(flow_event("outbound", other, CHK, 80, "http", [["GET", "/"]])) + "\n")
    out = tmp_path / "policy.yaml"
    assert main(["policy", "learn", "--events", str(a), "--events", str(b), "-o", str(out)]) == 0
    ps = PolicySet.load([str(out)])
    assert sorted(p.metadata.namespace for p in ps.documents) == ["payments", "shop"]
    assert main(["policy", "learn", "--events", str(a), "--events", str(b), "--namespace", "shop"]) == 0
    text = capsys.readouterr().out
    assert "namespace: shop" in text and "namespace: payments\n" not in text.split("spec:")[0]
    assert main(["policy", "validate", str(out)]) == 0


def test_learn_errors(tmp_path, capsys) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"event_type": "alert"}\n')
    assert main(["policy", "learn", "--events", str(empty)]) == 2
    assert main(["policy", "learn", "--events", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no flow records" in err and "missing.jsonl" in err and "Traceback" not in err


@pytest.mark.parametrize("path,prefix", [
    ("/v1/charge/123", "/v1/charge"), ("/v1/items", "/v1/items"), ("/", "/"), ("/users/42/orders", "/users"),
    ("/a/b/c/d", "/a/b"), ("/x/550e8400-e29b-41d4-a716-446655440000", "/x"), ("/v2/../v1/ok?q=1", "/v1/ok"),
])
def test_path_prefix(path: str, prefix: str) -> None:
    assert path_prefix(path) == prefix


def test_selector_labels() -> None:
    assert selector_labels({"app": "a", "pod-template-hash": "1", "tier": "x"}) == {"app": "a"}
    assert selector_labels({"app.kubernetes.io/name": "n", "app.kubernetes.io/instance": "i", "app": "a"}) == {
        "app.kubernetes.io/name": "n", "app.kubernetes.io/instance": "i"}
    assert selector_labels({"tier": "x", "controller-revision-hash": "2", SCOPE: "cde"}) == {"tier": "x"}


# --- FQDN cache -------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_fqdn_cache_ttl_floor_and_expiry() -> None:
    clock = Clock()
    c = FqdnCache(min_ttl=30, max_ttl=3600, clock=clock)
    c.learn("API.Example.com.", ["192.0.2.1", "192.0.2.2"], ttl=5)  # below the floor: kept 30 s
    assert c.names_for("192.0.2.1") == {"api.example.com"} and len(c) == 2
    clock.t += 29
    assert c.matches("192.0.2.2", "*.example.com") and not c.matches("192.0.2.2", "*.api.example.com")
    clock.t += 2
    assert c.names_for("192.0.2.1") == set() and len(c) == 1
    c.learn("a.example", ["192.0.2.9"], ttl=10**9)  # capped at max_ttl
    clock.t += 3601
    assert c.names_for("192.0.2.9") == set()


def test_fqdn_cache_is_bounded() -> None:
    c = FqdnCache(max_entries=100)
    for i in range(1000):
        c.learn(f"h{i}.example", [f"10.0.{i // 256}.{i % 256}"], 300)
    assert len(c) <= 100
    assert c.names_for("10.0.3.231") == {"h999.example"} and c.names_for("10.0.0.0") == set()


def test_fqdn_cache_several_names_per_ip() -> None:
    c = FqdnCache()
    c.learn("a.example", ["192.0.2.1"], 60)
    c.learn("b.example", ["192.0.2.1"], 60)
    assert c.names_for("192.0.2.1") == {"a.example", "b.example"}


@pytest.mark.parametrize("pattern,name,ok", [
    ("*.card-network.example", "api.card-network.example", True),
    ("*.card-network.example", "a.b.card-network.example", True),
    ("*.card-network.example", "card-network.example", False),
    ("*.card-network.example", "evilcard-network.example", False),
    ("api.example", "API.example.", True),
    ("api.example", "x.api.example", False),
])
def test_fqdn_matches(pattern: str, name: str, ok: bool) -> None:
    assert fqdn_matches(pattern, name) is ok


# --- CLI --------------------------------------------------------------------------------------

def test_validate_cli(tmp_path, capsys) -> None:
    assert main(["policy", "validate", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 2 policies, 4 rules"
    bad = write(tmp_path, EXAMPLE.read_text().replace("      from:\n", "      frm:\n", 1), "bad.yaml")
    assert main(["policy", "validate", bad]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{bad}:16: spec.ingress[0].frm: unknown field"]


IDS = """\
- {ip: 10.0.0.5, namespace: payments, pod: payment-api-0, labels: {app: payment-api, pci.palisade.dev/scope: cde}}
- {ip: 10.0.1.5, namespace: shop, pod: checkout-0, labels: {app: checkout, pci.palisade.dev/scope: connected}}
"""


def test_explain_cli(tmp_path, capsys) -> None:
    ids = write(tmp_path, IDS, "ids.yaml")
    args = ["policy", "explain", "--policy", str(EXAMPLE), "--identity", ids, "--from", "shop/checkout-0",
            "--to", "10.0.0.5", "--port", "9000", "--app-proto", "http"]
    assert main(args + ["--expect", "allow"]) == 0
    out = capsys.readouterr().out
    assert "egress at shop/checkout-0" in out and "ingress at payments/payment-api-0" in out
    assert "checkout-to-payments" in out and "pending" in out and out.strip().endswith("verdict: allow")

    assert main(args[:-2] + ["--app-proto", "ssh", "--direction", "ingress"]) == 0
    out = capsys.readouterr().out
    assert "=> DENY by no-ssh-into-containers" in out and "egress at" not in out

    assert main(["policy", "explain", "--policy", str(EXAMPLE), "--from", "world:203.0.113.7",
                 "--to", "payments:app=payment-api,pci.palisade.dev/scope=cde", "--port", "9000",
                 "--expect", "allow"]) == 1
    out = capsys.readouterr().out
    assert "cde-segmentation: APPLIES" in out and "=> DENY by cde-segmentation" in out


@pytest.mark.parametrize("src", ["nope/pod", "garbage", "ns:novalue", "world:not-an-ip"])
def test_explain_bad_endpoint(src: str, capsys) -> None:
    rc = main(["policy", "explain", "--policy", str(EXAMPLE), "--from", src, "--to", "10.0.0.5", "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err


def test_explain_invalid_policy(tmp_path, capsys) -> None:
    bad = write(tmp_path, "apiVersion: x\n", "bad.yaml")
    assert main(["policy", "explain", "--policy", bad, "--from", "world", "--to", "ns:a=b", "--port", "1"]) == 1
    assert f"{bad}:1: apiVersion" in capsys.readouterr().err


def test_schema_cli(capsys) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["discriminator"]["propertyName"] == "kind"
    assert "FirewallPolicy" in json.dumps(schema) and "ClusterFirewallPolicy" in json.dumps(schema)
