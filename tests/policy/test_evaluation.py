"""Rule evaluation as a table: precedence, scopes, modes, quarantine, probes, app_proto."""

from __future__ import annotations

import pytest

from firewall.identity.fqdn import FqdnCache
from firewall.policy.engine import FlowInfo, PolicySet
from tests.policy.common import (
    BATCH,
    CARDNET,
    CHK,
    DB,
    KDNS,
    METADATA,
    NODE,
    OTHER,
    PARTNER,
    PAY,
    PROM,
    PROM_C,
    STRANGER,
    VAULT,
    WEB,
)

# (id, direction, local, peer, port, transport, expected verdict, expected rule, alert, enforced)
L4_CASES = [
    ("l7-rule-pending", "ingress", PAY, CHK, 9000, "TCP", "allow", "checkout-to-payments", False, True),
    ("namespaced-order-deny-first", "ingress", PAY, BATCH, 9000, "TCP", "deny", "deny-batch", True, True),
    ("cluster-deny-beats-namespaced", "ingress", PAY, CHK, 23, "TCP", "deny", "deny-telnet", True, True),
    ("cluster-allow-beats-namespaced-deny", "ingress", PAY, PROM_C, 9090, "TCP", "allow", "allow-monitoring",
     False, True),
    ("cluster-allow-cannot-open-segmentation", "ingress", PAY, PROM, 9090, "TCP", "deny", "cde-segmentation",
     True, True),
    ("named-exception-opens-segmentation", "ingress", PAY, PARTNER, 9443, "TCP", "allow", "partner", False, True),
    ("world-is-out-of-scope", "ingress", PAY, STRANGER, 9443, "TCP", "deny", "cde-segmentation", True, True),
    ("port-range-inside", "ingress", PAY, CHK, 8005, "TCP", "allow", "connected-range", False, True),
    ("port-range-end-inclusive", "ingress", PAY, CHK, 8010, "TCP", "allow", "connected-range", False, True),
    ("port-range-outside", "ingress", PAY, CHK, 8011, "TCP", "deny", "default-deny", True, True),
    ("transport-must-match", "ingress", PAY, CHK, 8005, "UDP", "deny", "default-deny", True, True),
    ("no-outcome-allows-refused-at-l4", "ingress", PAY, CHK, 22, "TCP", "deny", "default-deny", True, True),
    ("egress-label-peer", "egress", PAY, DB, 5432, "TCP", "allow", "payments-to-db", False, True),
    ("egress-label-peer-wrong-port", "egress", PAY, DB, 5433, "TCP", "deny", "default-deny", True, True),
    ("cluster-egress-deny-cidr", "egress", PAY, METADATA, 80, "TCP", "deny", "block-metadata", True, True),
    ("cluster-egress-allow-udp", "egress", PAY, KDNS, 53, "UDP", "allow", "cluster-dns", False, True),
    ("fqdn-unknown-ip-denied", "egress", PAY, CARDNET, 443, "TCP", "deny", "default-deny", True, True),
    ("world-never-matches-labels", "egress", PAY, STRANGER, 5432, "TCP", "deny", "default-deny", True, True),
    ("cde-unselected-default-deny-egress", "egress", VAULT, STRANGER, 443, "TCP", "deny", "default-deny",
     True, True),
    ("cde-unselected-default-deny-ingress", "ingress", VAULT, CHK, 80, "TCP", "deny", "default-deny", True, True),
    ("unselected-default-allow", "egress", OTHER, CHK, 80, "TCP", "allow", "default-allow", False, True),
    ("segmentation-at-the-out-of-scope-end", "egress", OTHER, PAY, 9000, "TCP", "deny", "cde-segmentation",
     True, True),
    ("monitor-allow", "egress", WEB, CHK, 80, "TCP", "allow", "web-to-checkout", False, False),
    ("monitor-would-deny", "egress", WEB, CHK, 81, "TCP", "deny", "default-deny", True, False),
    ("probe-from-node", "ingress", PAY, NODE, 8080, "TCP", "allow", "kubelet-probes", False, True),
    ("probe-port-only", "ingress", PAY, NODE, 8081, "TCP", "deny", "cde-segmentation", True, True),
]


@pytest.mark.parametrize("case", L4_CASES, ids=[c[0] for c in L4_CASES])
def test_l4_table(table_ps: PolicySet, case) -> None:
    _, direction, local, peer, port, transport, verdict, rule, alert, enforced = case
    d = table_ps.decide(FlowInfo(direction, local, peer, port, transport))
    assert (d.verdict, d.rule, d.alert, d.enforced) == (verdict, rule, alert, enforced), d.reason


def test_decision_is_cached_and_stable(table_ps: PolicySet) -> None:
    flow = FlowInfo("ingress", PAY, BATCH, 9000)
    assert table_ps.decide(flow) is table_ps.decide(flow)


def test_capture_flag(table_ps: PolicySet) -> None:
    assert table_ps.decide(FlowInfo("ingress", PAY, CHK, 8005)).capture is True
    assert table_ps.decide(FlowInfo("ingress", PAY, CHK, 8005), mode_override="learn").capture is False


def test_needs_l7(table_ps: PolicySet) -> None:
    assert table_ps.needs_l7(FlowInfo("ingress", PAY, CHK, 9000)) is True
    assert table_ps.needs_l7(FlowInfo("ingress", PAY, CHK, 8005)) is False
    assert table_ps.needs_app(FlowInfo("ingress", PAY, CHK, 8005)) is True  # cluster no-ssh rule
    assert table_ps.needs_app(FlowInfo("egress", PAY, DB, 5432)) is False
    assert table_ps.needs_l7(FlowInfo("ingress", PAY, CHK, 22)) is False  # refused at L4 anyway
    assert PolicySet.empty().needs_l7(FlowInfo("ingress", PAY, CHK, 9000)) is False


APP_CASES = [
    ("ssh-denied-by-cluster", PAY, CHK, 9000, "ssh", "deny", "no-ssh-into-containers"),
    ("http-still-pending-l7", PAY, CHK, 9000, "http", "allow", "checkout-to-payments"),
    ("not-http-falls-to-next-rule", PAY, CHK, 9000, "redis", "allow", "shop-alert"),
    ("grpc-only-allows-grpc", PAY, CHK, 7000, "grpc", "allow", "grpc-only"),
    ("grpc-only-denies-http", PAY, CHK, 7000, "http", "deny", "default-deny"),
    ("ssh-on-a-plain-l4-port", PAY, CHK, 8005, "ssh", "deny", "no-ssh-into-containers"),
]


@pytest.mark.parametrize("case", APP_CASES, ids=[c[0] for c in APP_CASES])
def test_app_table(table_ps: PolicySet, case) -> None:
    _, local, peer, port, app, verdict, rule = case
    d = table_ps.decide_app(FlowInfo("ingress", local, peer, port), app)
    assert d is not None
    assert (d.verdict, d.rule) == (verdict, rule), d.reason


def test_decide_app_none_when_no_rule_cares(table_ps: PolicySet) -> None:
    assert table_ps.decide_app(FlowInfo("egress", PAY, DB, 5432), "pgsql") is None


def test_app_proto_aliases(table_ps: PolicySet) -> None:
    d = table_ps.decide_app(FlowInfo("ingress", PAY, CHK, 7000), "GRPC")
    assert d is not None and d.verdict == "allow"


# --- modes ---------------------------------------------------------------------------------

def test_empty_policyset_is_learn() -> None:
    ps = PolicySet.empty()
    d = ps.decide(FlowInfo("ingress", PAY, STRANGER, 22))
    assert (d.verdict, d.rule, d.mode, d.enforced, d.alert) == ("allow", "learn", "learn", False, False)
    assert ps.mode_for(PAY) == "learn"
    assert ps.decide_l7(FlowInfo("ingress", PAY, STRANGER, 22), _http("GET", "/")) is None


def test_learn_override_records_would_be_decision(table_ps: PolicySet) -> None:
    d = table_ps.decide(FlowInfo("ingress", PAY, STRANGER, 9443), mode_override="learn")
    assert (d.verdict, d.rule, d.enforced, d.alert, d.mode) == ("allow", "learn", False, False, "learn")
    assert "would deny" in d.reason and "cde-segmentation" not in d.rule


def test_monitor_override_reports_but_does_not_enforce(table_ps: PolicySet) -> None:
    d = table_ps.decide(FlowInfo("ingress", PAY, STRANGER, 9443), mode_override="monitor")
    assert (d.verdict, d.rule, d.enforced, d.alert, d.mode) == ("deny", "cde-segmentation", False, True, "monitor")


def test_protect_override_enforces_monitor_policy(table_ps: PolicySet) -> None:
    d = table_ps.decide(FlowInfo("egress", WEB, CHK, 81), mode_override="protect")
    assert (d.verdict, d.enforced) == ("deny", True)


def test_invalid_override_is_ignored(table_ps: PolicySet) -> None:
    d = table_ps.decide(FlowInfo("egress", WEB, CHK, 81), mode_override="bogus")
    assert d.mode == "monitor"


def test_mode_for(table_ps: PolicySet) -> None:
    assert table_ps.mode_for(PAY) == "protect"
    assert table_ps.mode_for(WEB) == "monitor"
    assert table_ps.mode_for(OTHER) == "protect"  # unselected: the cluster policy's mode


def test_cluster_rule_keeps_cluster_mode_on_monitor_workload(table_ps: PolicySet) -> None:
    # WEB is in a monitor policy, but the cluster baseline is protect: ssh stays blocked.
    d = table_ps.decide_app(FlowInfo("ingress", WEB, CHK, 22), "ssh")
    assert d is not None and (d.verdict, d.rule, d.enforced) == ("deny", "no-ssh-into-containers", True)


# --- quarantine ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [None, "learn", "monitor", "protect"])
def test_quarantine_denies_everything_in_every_mode(table_ps: PolicySet, mode) -> None:
    for flow in (FlowInfo("egress", OTHER, CHK, 80), FlowInfo("ingress", PAY, CHK, 8005)):
        d = table_ps.decide(flow, mode_override=mode, quarantined=True)
        assert (d.verdict, d.rule, d.enforced, d.alert) == ("deny", "quarantine", True, True)
    assert table_ps.decide_l7(FlowInfo("ingress", PAY, CHK, 9000), _http("POST", "/v1/charge"),
                              quarantined=True).rule == "quarantine"
    assert table_ps.decide_app(FlowInfo("egress", PAY, DB, 5432), "pgsql", quarantined=True).rule == "quarantine"


def test_quarantine_off_restores_policy(table_ps: PolicySet) -> None:
    flow = FlowInfo("egress", OTHER, CHK, 80)
    assert table_ps.decide(flow, quarantined=True).verdict == "deny"
    assert table_ps.decide(flow, quarantined=False).verdict == "allow"


def test_quarantine_keeps_configured_kubelet_probes(table_ps: PolicySet) -> None:
    d = table_ps.decide(FlowInfo("ingress", PAY, NODE, 8080), quarantined=True)
    assert (d.verdict, d.rule) == ("allow", "kubelet-probes")


def test_quarantine_on_empty_policyset() -> None:
    d = PolicySet.empty().decide(FlowInfo("egress", OTHER, CHK, 80), quarantined=True)
    assert (d.verdict, d.rule, d.enforced) == ("deny", "quarantine", True)


# --- fqdn -------------------------------------------------------------------------------------

def test_fqdn_peer_from_dns_answers(table_ps: PolicySet) -> None:
    cache = FqdnCache()
    flow = FlowInfo("egress", PAY, CARDNET, 443)
    assert table_ps.decide(flow, fqdn=cache).verdict == "deny"
    cache.learn("api.eu.card-network.example.", [CARDNET.ip], 30)
    d = table_ps.decide(flow, fqdn=cache)
    assert (d.verdict, d.rule) == ("allow", "card-network") and table_ps.needs_l7(flow, fqdn=cache)
    ok = table_ps.decide_l7(flow, _tls("hello", sni="api.eu.card-network.example", offered_versions=["1.3", "1.2"]),
                            fqdn=cache)
    assert ok is not None and (ok.verdict, ok.rule) == ("allow", "card-network")
    old = table_ps.decide_l7(flow, _tls("hello", sni="api.eu.card-network.example", offered_versions=["1.1"]), fqdn=cache)
    assert old is not None and (old.verdict, old.rule) == ("deny", "default-deny")


def test_fqdn_held_by_policyset(tmp_path) -> None:
    from firewall.identity.identity import Identity
    from tests.policy.common import TABLE_POLICY, write

    cache = FqdnCache()
    ps = PolicySet.load([write(tmp_path, TABLE_POLICY)], fqdn=cache)
    cache.learn("x.card-network.example", [CARDNET.ip], 300)
    assert ps.decide(FlowInfo("egress", PAY, CARDNET, 443)).rule == "card-network"
    # the apex is not covered by the wildcard "*.card-network.example"
    cache.learn("card-network.example", ["192.0.2.45"], 300)
    assert ps.decide(FlowInfo("egress", PAY, Identity("192.0.2.45"), 443)).verdict == "deny"


# --- helpers --------------------------------------------------------------------------------

def _http(method: str, path: str, host: str = "payments"):
    from firewall.protocols.base import L7Event

    return L7Event("http", "request", 0, 0, {"method": method, "path": path, "host": host})


def _tls(kind: str, **fields):
    from firewall.protocols.base import L7Event

    return L7Event("tls", kind, 0, 0, fields)
