"""The auditor report cannot contradict enforcement (issue 18).

Every statement the report makes about a rule - does it touch the CDE, which workloads it
applies to, which peers it admits, how often it was hit - is checked against what the
policy engine decides (``PolicySet.decide`` / ``decide_app`` / ``dlp_for``) on the same
identities.  The issue's examples are pinned first; then hypothesis draws a few hundred
random policy sets (labels-only, namespace-only, scope, CIDR and FQDN peers; cluster and
namespaced policies; ingress, egress and DLP rules) and identity sets.

"Can the rule match this pair" is asked of the engine with a one-rule copy of the policy in
which the rule is an ``alert`` rule with ``exception: true`` (same selector, same peers,
same ports): then nothing but the rule's own matchers decides whether the engine names it
(no earlier rule shadows it, the built-in CDE segmentation does not pre-empt it).
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firewall import LABEL_SCOPE
from firewall.audit.report import build_report
from firewall.audit.report_data import workload_name
from firewall.identity.fqdn import FqdnCache
from firewall.identity.identity import Identity
from firewall.policy.engine import FlowInfo, PolicySet
from firewall.policy.loader import LoadedDocument, validate_document
from firewall.policy.yaml import load_documents

API = "palisade.dev/v1"
WORLD_IP = "203.0.113.5"
FQDN_NAME = "api.ext.example"


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Pod:
    ns: str
    name: str
    ip: str
    labels: tuple[tuple[str, str], ...]

    @property
    def identity(self) -> Identity:
        return Identity(self.ip, self.ns, self.name, self.labels)

    @property
    def wid(self) -> str:
        return f"{self.ns}/{workload_name(self.ns, self.name, dict(self.labels))}"


def _engine(docs: list[dict[str, Any]], fqdn: FqdnCache | None = None) -> PolicySet:
    loaded = []
    text = yaml.safe_dump_all(docs, sort_keys=False)
    for src in load_documents(text, "mem.yaml"):
        model, errs = validate_document(src)
        assert not errs, errs
        loaded.append(LoadedDocument(model, "mem.yaml", src.line, src))
    return PolicySet(loaded, fqdn=fqdn)


def _fqdn() -> FqdnCache:
    cache = FqdnCache()
    cache.learn(FQDN_NAME, [WORLD_IP], 3600)
    return cache


def _rules_of(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = doc["spec"]
    return [(sec, r) for sec in ("ingress", "egress", "rules", "dlp") for r in spec.get(sec, [])]


def _variant(doc: dict[str, Any], section: str, rule: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with only ``rule``, made an exception alert rule (DLP rules kept as they are)."""
    out = copy.deepcopy(doc)
    for sec in ("ingress", "egress", "rules", "dlp"):
        out["spec"].pop(sec, None)
    r = copy.deepcopy(rule)
    if section != "dlp":
        r.update(action="alert", exception=True, description="differential test")
    out["spec"][section] = [r]
    return out


def _direction(section: str, rule: dict[str, Any]) -> list[str]:
    if section == "dlp":
        if rule.get("direction"):
            return [rule["direction"]]
        return ["egress"] if "to" in rule else ["ingress"] if "from" in rule else ["ingress", "egress"]
    return [rule["direction"]] if section == "rules" else [section]


def _port(rule: dict[str, Any]) -> int:
    ports = rule.get("ports")
    return ports[0]["port"] if ports else 8080


def _named(engine: PolicySet, section: str, rule: dict[str, Any], local: Identity, peer: Identity,
           fqdn: FqdnCache) -> bool:
    """Does the engine put ``rule`` on a flow between ``local`` and ``peer`` (either direction it governs)?"""
    for direction in _direction(section, rule):
        flow = FlowInfo(direction, local, peer, _port(rule))  # type: ignore[arg-type]
        if section == "dlp":
            if any(a.rule == rule["name"] for a in engine.dlp_for(flow)):
                return True
            continue
        if rule.get("appProto"):
            d = engine.decide_app(flow, rule["appProto"], fqdn=fqdn)
        else:
            d = engine.decide(flow, fqdn=fqdn)
        if d is not None and d.rule == rule["name"]:
            return True
    return False


def _selected_witness(doc: dict[str, Any]) -> Identity:
    if doc["kind"] == "ClusterFirewallPolicy":
        return Identity.make("192.0.2.2", "wit", "w", {LABEL_SCOPE: "cde"})
    sel = doc["spec"].get("selector", {}).get("matchLabels", {})
    return Identity.make("192.0.2.2", doc["metadata"]["namespace"], "w", dict(sel))


def _peer_witnesses(rule: dict[str, Any]) -> list[Identity]:
    """The least specific identity each peer entry names (written apart from the report's)."""
    out = [Identity(WORLD_IP)]
    for p in rule.get("to", []) + rule.get("from", []):
        if "fqdn" in p:
            continue
        labels = dict(p.get("labels", {}))
        scope = p.get("scope")
        if scope in ("cde", "connected"):
            if labels.get(LABEL_SCOPE, scope) != scope:
                continue
            labels[LABEL_SCOPE] = scope
        ip = "192.0.2.10"
        if "cidr" in p:
            base, bits = p["cidr"].split("/")
            a, b, c, d = (int(x) for x in base.split("."))
            ip = f"{a}.{b}.{c}.{d + (1 if int(bits) < 31 else 0)}"
        out.append(Identity.make(ip, p.get("namespace", "wit"), "w", labels))
    return out


def _write(tmp: Path, docs: list[dict[str, Any]], pods: list[Pod], events: list[dict[str, Any]]) -> dict[str, str]:
    (tmp / "policy.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (tmp / "identity.yaml").write_text(yaml.safe_dump(
        [{"ip": p.ip, "namespace": p.ns, "pod": p.name, "labels": dict(p.labels)} for p in pods]))
    (tmp / "eve.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return {k: str(tmp / f) for k, f in (("policy", "policy.yaml"), ("identity", "identity.yaml"),
                                          ("events", "eve.jsonl"))}


def _flow_event(direction: str, local: Identity, peer: Identity, port: int, verdict: str, rule: str,
                n: int) -> dict[str, Any]:
    inbound = direction == "ingress"
    src, dst = (peer, local) if inbound else (local, peer)
    wl = {id(local): local.to_json(), id(peer): peer.to_json()}
    return {"timestamp": f"2026-11-20T08:00:{n % 60:02d}.000000+0000", "event_type": "flow", "flow_id": n,
            "direction": "inbound" if inbound else "outbound", "src_ip": src.ip, "src_port": 40000,
            "dest_ip": dst.ip, "dest_port": port, "proto": "TCP", "app_proto": "unknown", "verdict": verdict,
            "rule": rule, "mode": "protect", "src_workload": wl[id(src)], "dest_workload": wl[id(dst)],
            "flow": {"bytes_toserver": 1, "bytes_toclient": 1}}


def check_report_against_engine(docs: list[dict[str, Any]], pods: list[Pod]) -> dict[str, Any]:
    """Build the report and assert every per-rule statement against engine decisions; returns it."""
    fqdn = _fqdn()
    full = _engine(docs, fqdn)
    known = [p.identity for p in pods]
    wid = {p.identity: p.wid for p in pods}
    # generated flow records: every pod pair (and the world) on every port a rule names, both ways
    ports = sorted({_port(r) for d in docs for _s, r in _rules_of(d)} | {8080})
    events, expected_hits = [], {}
    n = 0
    for local in known:
        for peer in [*known, Identity(WORLD_IP)]:
            for direction in ("ingress", "egress"):
                for port in ports:
                    dec = full.decide(FlowInfo(direction, local, peer, port), fqdn=fqdn)  # type: ignore[arg-type]
                    n += 1
                    events.append(_flow_event(direction, local, peer, port, dec.verdict, dec.rule, n))
                    expected_hits[dec.rule] = expected_hits.get(dec.rule, 0) + 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(Path(tmp), docs, pods, events)
        rep = build_report([paths["policy"]], [paths["events"]], paths["identity"], as_of=date(2026, 12, 1),
                           jobs=1)
    rows = {r["name"]: r for r in rep["rules"]}
    for doc in docs:
        for section, rule in _rules_of(doc):
            row = rows[rule["name"]]
            one = _engine([_variant(doc, section, rule)], fqdn)
            star = _selected_witness(doc)
            locals_ = [*known, star]
            peers = [*known, *_peer_witnesses(rule)]
            named = {(a, b) for a in locals_ for b in peers if _named(one, section, rule, a, b, fqdn)}
            touches = any(a.scope == "cde" or b.scope == "cde" for a, b in named)
            where = f"{rule['name']} of {doc['kind']} {doc['metadata']}: {row['cde_reasons']}"
            assert row["touches_cde"] == touches, where
            admitted = {wid[b] for b in known if (star, b) in named}
            assert set(row["peer_workloads"]) == admitted, where
            if named:
                applies = {wid[a] for a in known if any((a, b) in named for b in peers)}
                assert set(row["applies_to_workloads"]) == applies, where
            if section != "dlp":
                assert row["hits"] == row["allowed"] + row["denied"] == expected_hits.get(rule["name"], 0), where
                assert row["never_hit"] == (row["hits"] == 0)
    return rep


# --------------------------------------------------------------------------- the examples

PODS = [
    Pod("shop", "web-0", "10.1.0.1", (("app", "web"), (LABEL_SCOPE, "connected"))),
    Pod("payments", "payment-api-0", "10.2.0.1", (("app", "payment-api"), (LABEL_SCOPE, "cde"))),
    Pod("ops", "backup-0", "10.3.0.1", (("app", "backup"),)),
]


def _shop_policy(peer: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FirewallPolicy", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "egress": [
                {"name": "web-out", "to": [peer], "ports": [{"port": 9000}], "action": "allow"}]}}


def test_labels_only_peer_in_another_namespace_touches_the_cde():
    """The issue's example: shop's ``to: [{labels: {app: payment-api}}]`` opens payments/payment-api."""
    pol = _shop_policy({"labels": {"app": "payment-api"}})
    web, pay = PODS[0].identity, PODS[1].identity
    assert _engine([pol]).decide(FlowInfo("egress", web, pay, 9000)).rule == "web-out"
    rep = check_report_against_engine([pol], PODS)
    (row,) = rep["rules"]
    assert row["touches_cde"] and row["peer_workloads"] == ["payments/payment-api"]
    assert row["peers_text"] == ["labels app=payment-api in any namespace"]
    assert row["hits"] == 1 and not row["never_hit"]


def test_scope_cidr_and_cidr_plus_labels_peers_touch_the_cde():
    for peer in ({"labels": {LABEL_SCOPE: "cde"}}, {"cidr": "10.2.0.0/16"},
                 {"cidr": "10.2.0.0/16", "labels": {"app": "payment-api"}}, {"scope": "cde"}):
        rep = check_report_against_engine([_shop_policy(peer)], PODS)
        (row,) = rep["rules"]
        assert row["touches_cde"] and row["peer_workloads"] == ["payments/payment-api"], peer


def test_a_rule_that_cannot_reach_the_cde_is_not_listed_as_touching_it():
    for peer in ({"labels": {"app": "backup"}}, {"cidr": "10.3.0.0/16"}, {"namespace": "payments",
                                                                           "labels": {"app": "nothing"}}):
        rep = check_report_against_engine([_shop_policy(peer)], PODS)
        (row,) = rep["rules"]
        assert not row["touches_cde"], (peer, row["cde_reasons"])


def test_never_hit_cde_rule_is_a_finding():
    """A CDE-opening rule nobody used is flagged (it used to be hidden: touches_cde false)."""
    pol = _shop_policy({"labels": {"app": "payment-api"}})
    pol["spec"]["egress"][0]["ports"] = [{"port": 9999}]  # the generated flows use 9999 too...
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(Path(tmp), [pol], PODS, [])
        rep = build_report([paths["policy"]], [paths["events"]], paths["identity"], as_of=date(2026, 12, 1),
                           jobs=1)
    (row,) = rep["rules"]
    assert row["touches_cde"] and row["never_hit"]
    assert any("web-out" in f["message"] or "never" in f["message"].lower() for f in rep["findings"]), \
        rep["findings"]


def test_cde_pod_stays_in_the_inventory_beside_an_out_of_scope_sibling():
    pods = [Pod("payments", "payment-api-0", "10.2.0.9", (("app", "payment-api"),)),  # no scope label, first
            Pod("payments", "payment-api-1", "10.2.0.1", (("app", "payment-api"), (LABEL_SCOPE, "cde")))]
    pol = _shop_policy({"labels": {"app": "payment-api"}})
    rep = check_report_against_engine([pol], pods)
    (wl,) = [w for w in rep["inventory"]["workloads"] if w["id"] == "payments/payment-api"]
    assert wl["scope"] == "cde" and set(wl["scopes_seen"]) == {"cde", "out-of-scope"}
    assert wl["pods"] == ["payment-api-0", "payment-api-1"]
    assert rep["inventory"]["scopes"]["cde"]["pods"] == 2


def test_policy_the_engine_rejects_is_an_input_error(tmp_path):
    """No lenient second reader: what the sidecar would refuse, the report refuses (file:line)."""
    from firewall.audit.report import ReportError

    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(_shop_policy({})))  # an empty peer: rejected by the engine
    try:
        build_report([str(bad)], [], None, jobs=1)
    except ReportError as exc:
        assert str(exc).startswith(f"{bad}:") and "empty peer" in str(exc)
    else:
        raise AssertionError("accepted a policy the engine rejects")


# --------------------------------------------------------------------------- random policies

NAMESPACES = ("shop", "payments", "ops")
APPS = ("web", "pay", "db")
SCOPE_VALUES = ("cde", "connected", "out-of-scope")
CIDRS = ("10.1.0.0/16", "10.2.0.0/16", "10.2.0.1/32", "10.0.0.0/8", "0.0.0.0/0")


@st.composite
def pods_st(draw) -> list[Pod]:
    pods = []
    for i in range(draw(st.integers(2, 6))):
        ns_i = draw(st.integers(0, len(NAMESPACES) - 1))
        labels = {"app": draw(st.sampled_from(APPS))}
        scope = draw(st.sampled_from((None, *SCOPE_VALUES)))
        if scope:
            labels[LABEL_SCOPE] = scope
        if draw(st.booleans()):
            labels["tier"] = draw(st.sampled_from(("a", "b")))
        pods.append(Pod(NAMESPACES[ns_i], f"{labels['app']}-{i}", f"10.{ns_i + 1}.0.{i + 1}",
                        tuple(sorted(labels.items()))))
    return pods


def _labels_st():
    return st.dictionaries(st.sampled_from(("app", LABEL_SCOPE, "tier")), st.just(""), min_size=1, max_size=2)


@st.composite
def peer_st(draw, fqdn_ok: bool) -> dict[str, Any]:
    if fqdn_ok and draw(st.integers(0, 7)) == 0:
        return {"fqdn": "*.ext.example"}
    peer: dict[str, Any] = {}
    while not peer:
        if draw(st.booleans()):
            peer["namespace"] = draw(st.sampled_from(NAMESPACES))
        if draw(st.booleans()):
            keys = draw(_labels_st())
            labels = {}
            for k in keys:
                labels[k] = draw(st.sampled_from(APPS if k == "app" else SCOPE_VALUES if k == LABEL_SCOPE
                                                 else ("a", "b")))
            peer["labels"] = labels
        if draw(st.integers(0, 3)) == 0:
            peer["scope"] = draw(st.sampled_from(SCOPE_VALUES))
        if draw(st.integers(0, 3)) == 0:
            peer["cidr"] = draw(st.sampled_from(CIDRS))
    return peer


@st.composite
def rule_st(draw, name: str, direction: str, dlp: bool) -> dict[str, Any]:
    key = "to" if direction == "egress" else "from"
    rule: dict[str, Any] = {"name": name}
    if draw(st.integers(0, 3)):
        rule[key] = draw(st.lists(peer_st(direction == "egress"), min_size=1, max_size=2))
    if dlp:
        rule.update(packs=["payment_cards"], action=draw(st.sampled_from(("block", "alert"))))
        if draw(st.booleans()):
            rule["direction"] = direction
        return rule
    if draw(st.booleans()):
        rule["ports"] = [{"port": draw(st.sampled_from((443, 5432, 9000)))}]
    if draw(st.integers(0, 3)) == 0:
        rule["appProto"] = draw(st.sampled_from(("http", "tls", "pgsql")))
    rule["action"] = draw(st.sampled_from(("allow", "deny", "alert")))
    if rule["action"] != "deny" and draw(st.integers(0, 3)) == 0:
        rule.update(exception=True, description="justified")
    return rule


@st.composite
def policies_st(draw) -> list[dict[str, Any]]:
    docs = []
    for i in range(draw(st.integers(1, 3))):
        rules = []
        cluster = draw(st.integers(0, 3)) == 0
        for j in range(draw(st.integers(1, 3))):
            direction = draw(st.sampled_from(("ingress", "egress")))
            dlp = draw(st.integers(0, 4)) == 0
            r = draw(rule_st(f"p{i}-r{j}", direction, dlp))
            section = "dlp" if dlp else "rules" if cluster else direction
            if section == "rules":
                r["direction"] = direction
            rules.append((section, r))
        spec: dict[str, Any] = {"mode": draw(st.sampled_from(("protect", "monitor")))}
        for section, r in rules:
            spec.setdefault(section, []).append(r)
        if cluster:
            docs.append({"apiVersion": API, "kind": "ClusterFirewallPolicy", "metadata": {"name": f"p{i}"},
                         "spec": spec})
            continue
        sel = {"app": draw(st.sampled_from(APPS))} if draw(st.integers(0, 3)) else {}
        if draw(st.integers(0, 3)) == 0:
            sel[LABEL_SCOPE] = draw(st.sampled_from(SCOPE_VALUES))
        spec["selector"] = {"matchLabels": sel}
        spec["default"] = draw(st.sampled_from(("allow", "deny")))
        docs.append({"apiVersion": API, "kind": "FirewallPolicy",
                     "metadata": {"name": f"p{i}", "namespace": draw(st.sampled_from(NAMESPACES))}, "spec": spec})
    return docs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=policies_st(), pods=pods_st())
def test_report_statements_equal_engine_decisions(docs, pods):
    check_report_against_engine(docs, pods)


# --------------------------------------------------------------------------- one identity loader


def test_report_reads_identity_files_with_the_sidecars_loader(tmp_path):
    """Same file, same meaning, same errors for the sidecar and the report (issue 18)."""
    from firewall.audit.report import ReportError
    from firewall.audit.report_data import load_identity
    from firewall.identity.identity import IdentityError, load_identity_file

    good = tmp_path / "ids.yaml"
    good.write_text(yaml.safe_dump({"identities": [
        {"ips": ["10.2.0.1", "fd00::2:1"], "namespace": "payments", "pod": "payment-api-0",
         "labels": {"app": "payment-api", LABEL_SCOPE: "cde"}, "serviceAccount": "pay"}]}))
    sidecar = {i.ip: i for i in load_identity_file(str(good))}
    report = load_identity(str(good))
    assert set(report) == set(sidecar) == {"10.2.0.1", "fd00::2:1"}
    for ip, ident in sidecar.items():
        assert report[ip]["scope"] == ident.scope == "cde" and report[ip]["labels"] == ident.label_map
    for body in ([{"ip": "10.0.0.1", "namespace": "a", "service_account": "x"}],  # unknown field
                 [{"ip": "10.0.0.300", "namespace": "a"}],  # not an address
                 [{"ip": "10.0.0.1"}],  # no namespace: the sidecar refuses it
                 [{"ip": "10.0.0.1", "namespace": "a", "labels": {"tier": 1}}]):  # label not a string
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(body))
        try:
            load_identity_file(str(bad))
        except IdentityError:
            pass
        else:
            raise AssertionError(f"sidecar accepted {body}")
        try:
            load_identity(str(bad))
        except ReportError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc), exc
        else:
            raise AssertionError(f"report accepted {body}")
