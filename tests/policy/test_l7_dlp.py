"""L7 matches (http, tls, dns, redis, sql) and DLP actions."""

from __future__ import annotations

import pytest

from firewall.identity.identity import Identity
from firewall.policy.engine import FlowInfo, PolicySet
from firewall.policy.match import normalize_path, path_has_prefix, tls_rank
from firewall.protocols.base import L7Event
from tests.policy.common import CHK, DB, PAY, STRANGER, write

L7_POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: app, namespace: shop}
spec:
  selector: {matchLabels: {app: checkout}}
  ingress:
    - name: api
      ports: [{port: 80}]
      http:
        - {methods: [GET, HEAD], pathPrefix: /v1/items}
        - {methods: [POST], pathPrefix: /v1/orders, host: "*.shop.example"}
      action: allow
    - name: grpc-svc
      ports: [{port: 81}]
      appProto: grpc
      http: [{pathPrefix: /shop.Cart/}]
      action: allow
  egress:
    - name: tls-out
      to: [{cidr: 203.0.113.0/24}]
      ports: [{port: 443}]
      tls: {sni: ["*.bank.example", api.partner.example], minVersion: 1.2}
      action: allow
    - name: dns-internal
      ports: [{port: 53, protocol: UDP}]
      dns: {qnameSuffix: [svc.cluster.local, example.com]}
      action: allow
    - name: redis-readonly
      to: [{namespace: payments}]
      ports: [{port: 6379}]
      redis: {commands: [get, mget, PING]}
      action: allow
    - name: sql-no-ddl
      to: [{namespace: payments}]
      ports: [{port: 5432}]
      sql: {verbs: [DROP, TRUNCATE, ALTER]}
      action: deny
    - name: sql-rest
      to: [{namespace: payments}]
      ports: [{port: 5432}]
      appProto: pgsql
      action: allow
"""


@pytest.fixture
def ps(tmp_path) -> PolicySet:
    return PolicySet.load([write(tmp_path, L7_POLICY)])


def ev(app: str, kind: str, **fields) -> L7Event:
    return L7Event(app, kind, 0, 0, fields)


BANK = Identity("203.0.113.5")
IN = "ingress"
EG = "egress"
CASES = [
    # id, direction, peer, port, event, expected verdict (None = no L7 rule cares), rule
    ("http-get-prefix", IN, STRANGER, 80, ev("http", "request", method="GET", path="/v1/items/7?x=1"), "allow", "api"),
    ("http-exact-prefix", IN, STRANGER, 80, ev("http", "request", method="HEAD", path="/v1/items"), "allow", "api"),
    ("http-prefix-is-segment-aware", IN, STRANGER, 80, ev("http", "request", method="GET", path="/v1/itemsx"),
     "deny", "default-deny"),
    ("http-dot-segments-normalised", IN, STRANGER, 80,
     ev("http", "request", method="GET", path="/v1/items/../../admin"), "deny", "default-deny"),
    ("http-encoded-dots", IN, STRANGER, 80, ev("http", "request", method="GET", path="/v1/items/%2e%2e/%2E%2E/admin"),
     "deny", "default-deny"),
    ("http-method", IN, STRANGER, 80, ev("http", "request", method="DELETE", path="/v1/items/1"), "deny",
     "default-deny"),
    ("http-host-wildcard", IN, STRANGER, 80,
     ev("http", "request", method="POST", path="/v1/orders", host="eu.shop.example:8080"), "allow", "api"),
    ("http-host-mismatch", IN, STRANGER, 80, ev("http", "request", method="POST", path="/v1/orders", host="evil.example"),
     "deny", "default-deny"),
    ("http-host-missing", IN, STRANGER, 80, ev("http", "request", method="POST", path="/v1/orders"), "deny",
     "default-deny"),
    ("http-absolute-form", IN, STRANGER, 80, ev("http", "request", method="GET", path="http://x/v1/items/1"), "allow",
     "api"),
    ("http-response-ignored", IN, STRANGER, 80, ev("http", "response", status=200), None, None),
    ("grpc-path", IN, STRANGER, 81, ev("grpc", "request", method="POST", path="/shop.Cart/Add"), "allow", "grpc-svc"),
    ("grpc-other-service", IN, STRANGER, 81, ev("grpc", "request", method="POST", path="/shop.Admin/Drop"), "deny",
     "default-deny"),
    ("tls-sni-and-version", EG, BANK, 443, ev("tls", "hello", sni="www.bank.example", offered_versions=["1.3", "1.2"]),
     "allow", "tls-out"),
    ("tls-sni-exact", EG, BANK, 443, ev("tls", "hello", sni="api.partner.example", offered_versions=["1.2"]), "allow", "tls-out"),
    ("tls-sni-wrong", EG, BANK, 443, ev("tls", "hello", sni="bank.example", offered_versions=["1.2"]), "deny", "default-deny"),
    ("tls-no-sni", EG, BANK, 443, ev("tls", "hello", offered_versions=["1.2"]), "deny", "default-deny"),
    ("tls-offered-too-old", EG, BANK, 443, ev("tls", "hello", sni="a.bank.example", offered_versions=["1.1"]), "deny",
     "default-deny"),
    ("tls-negotiated-ok", EG, BANK, 443, ev("tls", "server_hello", version="1.3"), "allow", "tls-out"),
    ("tls-negotiated-downgrade", EG, BANK, 443, ev("tls", "server_hello", version="1.1"), "deny", "default-deny"),
    ("dns-suffix", EG, STRANGER, 53, ev("dns", "query", qname="db.payments.svc.cluster.local."), "allow",
     "dns-internal"),
    ("dns-apex", EG, STRANGER, 53, ev("dns", "query", qname="EXAMPLE.com"), "allow", "dns-internal"),
    ("dns-lookalike", EG, STRANGER, 53, ev("dns", "query", qname="evilexample.com"), "deny", "default-deny"),
    ("dns-answer-ignored", EG, STRANGER, 53, ev("dns", "answer", qname="x.example.com"), None, None),
    ("redis-allowed", EG, DB, 6379, ev("redis", "command", command="get"), "allow", "redis-readonly"),
    ("redis-denied", EG, DB, 6379, ev("redis", "command", command="FLUSHALL"), "deny", "default-deny"),
    ("sql-deny-verb", EG, DB, 5432, ev("pgsql", "statement", verb="drop"), "deny", "sql-no-ddl"),
    ("sql-other-verb", EG, DB, 5432, ev("pgsql", "statement", verb="SELECT"), "allow", "sql-rest"),
    ("sql-startup-ignored", EG, DB, 5432, ev("pgsql", "startup", user="app"), None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_l7_table(ps: PolicySet, case) -> None:
    _, direction, peer, port, event, verdict, rule = case
    transport = "UDP" if port == 53 else "TCP"
    flow = FlowInfo(direction, CHK, peer, port, transport)
    d = ps.decide_l7(flow, event)
    if verdict is None:
        assert d is None
    else:
        assert d is not None, "expected an L7 decision"
        assert (d.verdict, d.rule) == (verdict, rule), d.reason


def test_l7_flow_is_pending_at_l4(ps: PolicySet) -> None:
    flow = FlowInfo("ingress", CHK, STRANGER, 80)
    d = ps.decide(flow)
    assert (d.verdict, d.rule, d.alert) == ("allow", "api", False) and "pending" in d.reason
    assert ps.needs_l7(flow)


def test_l7_rule_for_other_app_proto_denies_at_app(ps: PolicySet) -> None:
    flow = FlowInfo("egress", CHK, BANK, 443)
    d = ps.decide_app(flow, "http")
    assert d is not None and (d.verdict, d.rule) == ("deny", "default-deny")


def test_monitor_mode_l7(ps: PolicySet) -> None:
    flow = FlowInfo("egress", CHK, DB, 6379)
    d = ps.decide_l7(flow, ev("redis", "command", command="DEL"), mode_override="monitor")
    assert (d.verdict, d.enforced, d.alert) == ("deny", False, True)


@pytest.mark.parametrize("raw,norm", [
    ("/a//b/./c/", "/a/b/c/"), ("/a/../../b", "/b"), ("", "/"), ("/x?y=/z", "/x"), ("/%61dmin", "/admin"),
    ("/a%2Fb", "/a%2Fb"), ("https://h:1/p/q#f", "/p/q"),
])
def test_normalize_path(raw: str, norm: str) -> None:
    assert normalize_path(raw) == norm


def test_path_prefix_rules() -> None:
    assert path_has_prefix("/v1/charge", "/v1/charge")
    assert path_has_prefix("/v1/charge/9", "/v1/charge")
    assert not path_has_prefix("/v1/charges", "/v1/charge")
    assert path_has_prefix("/anything", "/")
    assert path_has_prefix("/shop.Cart/Add", "/shop.Cart/")


@pytest.mark.parametrize("value,rank", [(0x0303, 3), ("TLSv1.3", 4), ("TLS 1.0", 1), ("1.2", 3), ("SSLv3", 0),
                                        ("0x0302", 2), ("bogus", None), (None, None)])
def test_tls_rank(value, rank) -> None:
    assert tls_rank(value) == rank


# --- DLP --------------------------------------------------------------------------------------

def test_dlp_reference_example(tmp_path) -> None:
    from tests.policy.common import EXAMPLE

    ps = PolicySet.load([str(EXAMPLE)])
    out_of_scope = Identity.make("10.2.0.1", "shop", "web-0", {"app": "web"})
    connected = CHK
    cde_db = Identity.make("10.0.0.6", "payments", "db-0", {"app": "payments-db", "pci.palisade.dev/scope": "cde"})
    pay = PAY
    for peer in (out_of_scope, connected, STRANGER):
        acts = ps.dlp_for(FlowInfo("egress", pay, peer, 443))
        assert [(a.rule, a.packs, a.action) for a in acts] == [
            ("no-clear-pan-out-of-cde", frozenset({"payment_cards"}), "block")]
    assert ps.dlp_for(FlowInfo("egress", pay, cde_db, 5432)) == []
    assert ps.dlp_for(FlowInfo("ingress", pay, out_of_scope, 9000)) == []  # the rule is egress only
    monitored = ps.dlp_for(FlowInfo("egress", pay, STRANGER, 443), mode_override="monitor")
    assert [a.action for a in monitored] == ["alert"]


def test_dlp_without_policy_alerts_on_everything() -> None:
    acts = PolicySet.empty().dlp_for(FlowInfo("egress", PAY, STRANGER, 443))
    assert len(acts) == 1 and acts[0].action == "alert" and acts[0].packs == frozenset({"*"})


def test_dlp_cluster_and_ingress_from(tmp_path) -> None:
    text = """\
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata: {name: dlp-everywhere}
spec:
  dlp:
    - name: secrets-from-world
      packs: [secrets, pii]
      from: [{scope: out-of-scope}]
      action: alert
      capture: true
"""
    ps = PolicySet.load([write(tmp_path, text)])
    acts = ps.dlp_for(FlowInfo("ingress", PAY, STRANGER, 443))
    assert [(a.rule, a.packs, a.action, a.capture) for a in acts] == [
        ("secrets-from-world", frozenset({"secrets", "pii"}), "alert", True)]
    assert ps.dlp_for(FlowInfo("egress", PAY, STRANGER, 443)) == []
    assert ps.dlp_for(FlowInfo("ingress", PAY, DB, 443)) == []
