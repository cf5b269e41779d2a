"""``policy explain``: the evaluation of one flow, step by step, in words.

It walks the same compiled tables as the engine (never a second implementation
of the order) and then asks the engine for the decision, so what it prints is
what the sidecar would do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from firewall.identity.fqdn import FqdnCache
from firewall.identity.identity import Identity
from firewall.policy.model import normalize_app_proto

if TYPE_CHECKING:
    from firewall.policy.engine import CompiledRule, Decision, FlowInfo, PolicySet

_GROUPS = {0: "cluster deny", 1: "cluster allow", 2: "namespaced"}


def describe_identity(ident: Identity) -> str:
    if ident.is_world:
        return f"world {ident.ip} (scope out-of-scope)"
    labels = ",".join(f"{k}={v}" for k, v in ident.labels)
    pod = f"/{ident.pod}" if ident.pod else ""
    ip = f" {ident.ip}" if ident.ip else ""
    return f"{ident.namespace}{pod}{ip} {{{labels}}} (scope {ident.scope})"


def _rule_step(rule: CompiledRule, flow: FlowInfo, names: frozenset[str] | None, app: str | None) -> str:
    if not rule.port_matches(flow.port, flow.transport):
        ports = ", ".join(f"{proto}/{lo}" if lo == hi else f"{proto}/{lo}-{hi}" for lo, hi, proto in rule.ports or ())
        return f"skip: {_flow_port(flow)} not in ports [{ports}]"
    if not rule.peer_matches(flow.peer, frozenset(flow.peer.labels), names):
        peers = " or ".join(p.describe() for p in rule.peers or ())
        return f"skip: peer is not {peers}"
    if rule.app_protos is not None:
        need = "/".join(sorted(rule.app_protos))
        if flow.transport not in ("TCP", "UDP"):
            return f"skip: needs app_proto {need}, which {flow.transport} never has (enforced at L3/L4)"
        if app is None:
            return f"pending: needs app_proto {need}" + (f" and {rule.l7.describe()}" if rule.l7 else "")
        if app not in rule.app_protos:
            return f"skip: app_proto {app} is not {need}"
        if rule.l7 is not None:
            return f"pending: needs {rule.l7.describe()} (decided per request)"
    return f"MATCH -> {rule.action}"


def _flow_port(flow: FlowInfo) -> str:
    from firewall.policy.model import ICMP_PROTOCOLS, PORT_PROTOCOLS

    if flow.transport in PORT_PROTOCOLS:
        return f"{flow.transport}/{flow.port}"
    if flow.transport in ICMP_PROTOCOLS:
        return f"{flow.transport} type {flow.port}"
    return f"IP protocol {flow.transport}"


def explain_flow(ps: PolicySet, flow: FlowInfo, app_proto: str | None = None, *,
                 mode_override: str | None = None, quarantined: bool = False,
                 fqdn: FqdnCache | None = None) -> list[str]:
    app = normalize_app_proto(app_proto) if app_proto else None
    table = ps._table(flow.local)
    names = ps._names(table, flow, fqdn)
    lines = [
        f"{flow.direction} at {describe_identity(flow.local)}",
        f"  peer: {describe_identity(flow.peer)}; {_flow_port(flow)}"
        + (f"; app_proto {app}" if app else ""),
    ]
    if flow.transport != "TCP" and not (flow.transport == "UDP" and flow.port == 53 and flow.direction == "egress"):
        lines.append("  enforced in the kernel: nftables rules compiled from this policy (redirect show); "
                     "rules with appProto or L7 matches never match it; denied packets are logged (NFLOG)")
    if ps.is_empty:
        lines.append("  no policy loaded: learn mode, everything is allowed and recorded")
    else:
        sel = ", ".join(d.ref for d in table.selected) or "none (cluster rules and built-ins only)"
        lines.append(f"  selected by: {sel}; mode {table.mode}"
                     + (f" (overridden to {mode_override})" if mode_override else ""))
    n = 1
    probe = ps._probe(flow)
    lines.append(f"  {n}. kubelet-probes: " + ("MATCH (node IP to a probe port)" if probe else "no"))
    n += 1
    lines.append(f"  {n}. quarantine: " + ("YES, every flow is denied" if quarantined else "no"))
    seg = table.segmented(flow.direction, flow.peer)
    if not ps.is_empty:
        n += 1
        lines.append(f"  {n}. cde-segmentation: " + (
            "APPLIES (out-of-scope -> cde): only cluster deny rules and rules with exception: true count"
            if seg else "does not apply"))
        for rule in table.rules.get(flow.direction, ()):
            n += 1
            if seg and not (rule.group == 0 or rule.exception):
                step = "skip: not an exception to cde-segmentation"
            else:
                step = _rule_step(rule, flow, names, app)
            lines.append(f"  {n}. [{_GROUPS[rule.group]}] {rule.name} ({rule.origin}): {step}")
        n += 1
        term = table.segmentation if seg else table.defaults[flow.direction]
        lines.append(f"  {n}. {term.name}: {term.reason}")
    d: Decision | None = None
    if app is not None:
        d = ps.decide_app(flow, app, mode_override=mode_override, quarantined=quarantined, fqdn=fqdn)
    if d is None:
        d = ps.decide(flow, mode_override=mode_override, quarantined=quarantined, fqdn=fqdn)
    enforced = "enforced" if d.enforced else "not enforced"
    lines.append(f"  => {d.verdict.upper()} by {d.rule} (mode {d.mode}, {enforced}"
                 + (", alert" if d.alert else "") + (", capture" if d.capture else "") + ")")
    lines.append(f"     why: {d.reason}")
    return lines
