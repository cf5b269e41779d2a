"""The auditor evidence pack: policies + events (+ segmentation test) -> report.json/html/pdf.

A PCI auditor asks four things: what is in the cardholder-data environment,
which flows into and out of it are allowed and why, can out-of-scope systems
reach it, and are the rules reviewed.  This module answers them as one plain
dict (``report.json``, schema in docs/auditor.md) from which the HTML page and
the PDF are rendered, so every number in the page is also machine-checkable.

Policies are loaded and compiled by the enforcement engine (``PolicySet``), and
every statement about a rule comes from the engine's own selectors and matchers:
there is no second policy reader that could read a peer differently from the
sidecar (issue 18).  Events are folded by :mod:`firewall.audit.report_data` in one streaming pass.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, date, datetime
from typing import Any

from firewall import LABEL_SCOPE, __version__
from firewall.audit.report_data import (
    E_BTC,
    E_BTS,
    E_COUNT,
    E_ENC,
    E_ENCB,
    E_FIRST,
    E_LAST,
    E_SAMPLES,
    OUT_OF_SCOPE,
    WORLD_ANY,
    WORLD_LEVEL_NAMES,
    EventStats,
    ReportError,
    Workload,
    aggregate_files,
    load_identity,
    scope_rank,
    scrub,
)
from firewall.identity.identity import Identity
from firewall.policy.engine import PolicySet, RuleEntry, peer_witness
from firewall.policy.loader import LoadedDocument, expand_paths, validate_document
from firewall.policy.match import PeerMatcher
from firewall.policy.model import L7_SECTIONS
from firewall.policy.yaml import YamlSourceError, load_file

SCHEMA = "palisade.dev/report/v1"
REVIEW_MONTHS = 6  # PCI DSS 1.2.7
SEGTEST_MONTHS = 12  # PCI DSS 11.4.5
CDE = "cde"
POLICY_KINDS = ("FirewallPolicy", "ClusterFirewallPolicy")
ANN_LAST_REVIEWED = "palisade.dev/last-reviewed"
MAX_EVIDENCE_ROWS = 1000

# Rule names the sidecar's policy engine uses for its built-in decisions (they are in no policy
# file); the report explains them instead of listing them as unknown.
BUILTIN_RULES = {
    "default-deny": "policy default (spec.default: deny, or a CDE workload no policy selects): no rule matched",
    "default-allow": "policy default allow: no rule matched",
    "cde-segmentation": "built-in CDE segmentation: out-of-scope sources (and the world) may not reach the CDE",
    "kubelet-probes": "health probes from the node's kubelet",
    "quarantine": "the pod was quarantined (palisade.dev/quarantine)",
    "learn": "learn mode: recorded, not decided",
    "dlp-default-alert": "DLP alert from a pack default (no policy DLP rule)",
}

__all__ = ["ReportError", "build_report", "write_report", "load_policies", "PolicyRule", "PolicyDoc"]


# --------------------------------------------------------------------------- policies
# Policies are loaded, validated and compiled by the engine (issue 18): every statement the
# report makes about a rule - which workloads it applies to, which peers it admits, whether it
# touches the CDE - is an answer of the engine's own selectors and peer matchers
# (``PolicySet.rule_entries``), so the evidence cannot contradict enforcement.


@dataclass(slots=True)
class PolicyRule:
    """One rule as an auditor reads it (ingress, egress, cluster or DLP); ``entry`` is the engine's."""

    id: str
    policy: str
    kind: str
    namespace: str | None
    file: str
    name: str
    direction: str
    description: str
    peers: list[dict[str, Any]]
    ports: list[str]
    app_proto: str | None
    l7: dict[str, Any]
    action: str
    packs: list[str] = field(default_factory=list)
    touches_cde: bool = False
    cde_reasons: list[str] = field(default_factory=list)
    applies_to_workloads: list[str] = field(default_factory=list)
    peer_workloads: list[str] = field(default_factory=list)
    entry: RuleEntry | None = None


@dataclass(slots=True)
class PolicyDoc:
    """One loaded policy resource (the engine's ``LoadedDocument``) with its report rows."""

    loaded: LoadedDocument
    rules: list[PolicyRule]

    @property
    def kind(self) -> str:
        return self.loaded.kind

    @property
    def name(self) -> str:
        return self.loaded.policy.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.loaded.policy.metadata.namespace if self.kind == "FirewallPolicy" else None

    @property
    def file(self) -> str:
        return self.loaded.file

    @property
    def last_reviewed(self) -> str | None:
        return self.loaded.policy.metadata.annotations.get(ANN_LAST_REVIEWED)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _policy_error(problems: list[str]) -> ReportError:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return ReportError(f"{problems[0]}{more}")


def load_policies(paths: list[str]) -> tuple[PolicySet, list[PolicyDoc], list[dict[str, Any]], list[str]]:
    """Policy files -> (the engine's PolicySet, report rows per document, file fingerprints, notes).

    Documents go through the engine's validator (``policy_loader.validate_document``): a
    policy the sidecar would reject is an input error here too (``file:line: ...``).  Other
    kinds in the same files (a Namespace, a ConfigMap) are noted and skipped.
    """
    loaded: list[LoadedDocument] = []
    files: list[dict[str, Any]] = []
    notes: list[str] = []
    problems: list[str] = []
    hashes: dict[str, str] = {}
    for path in expand_paths(paths):
        try:
            sources = load_file(path)
        except YamlSourceError as exc:
            raise _policy_error(str(exc).splitlines()) from None
        hashes[path] = sha256_file(path)
        files.append({"path": path, "sha256": hashes[path], "bytes": os.path.getsize(path),
                      "resources": len(sources)})
        for src in sources:
            kind = src.value.get("kind") if isinstance(src.value, dict) else None
            if isinstance(src.value, dict) and kind not in POLICY_KINDS:
                notes.append(f"{path}: document {src.index + 1}: kind {kind!r} is not a policy; ignored")
                continue
            model, errs = validate_document(src)
            problems.extend(errs)
            if model is not None:
                loaded.append(LoadedDocument(model, path, src.line, src))
    if problems:
        raise _policy_error(problems)
    policy = PolicySet(loaded, hashes)
    docs: dict[int, PolicyDoc] = {}
    for entry in policy.rule_entries():
        doc = docs.setdefault(id(entry.doc), PolicyDoc(entry.doc, []))
        doc.rules.append(_rule_row(entry))
    for d in loaded:  # policies without rules are still reviewed
        docs.setdefault(id(d), PolicyDoc(d, []))
    ordered = [docs[id(d)] for d in loaded]
    return policy, ordered, files, notes


def _camel(key: str) -> str:
    head, *rest = key.rstrip("_").split("_")
    return head + "".join(w.title() for w in rest)


def _plain(value: Any) -> Any:
    """A model record as the YAML spelled it (camelCase keys, no unset fields)."""
    if is_dataclass(value):
        return {_camel(f.name): _plain(getattr(value, f.name)) for f in fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _rule_row(entry: RuleEntry) -> PolicyRule:
    d = entry.doc
    md = d.policy.metadata
    kind = d.kind
    ns = md.namespace if kind == "FirewallPolicy" else None
    prefix = f"{ns}/{md.name}" if ns else f"cluster/{md.name}"
    r: Any = entry.rule
    if entry.is_dlp:
        direction = f"dlp {r.direction or '/'.join(entry.directions)}"
        peers_src = r.to if r.to is not None else r.from_
        l7: dict[str, Any] = {}
    else:
        direction = entry.directions[0]
        peers_src = r.from_ if direction == "ingress" else r.to
        l7 = {k: _plain(getattr(r, k)) for k in L7_SECTIONS if getattr(r, k) is not None}
    return PolicyRule(
        id=f"{prefix}/{r.name}", policy=md.name, kind=kind, namespace=ns, file=d.file, name=r.name,
        direction=direction, description=r.description or "",
        peers=[_plain(p) for p in peers_src or []],
        ports=[_port_text(p) for p in getattr(r, "ports", None) or []],
        app_proto=getattr(r, "app_proto", None), l7=l7, action=r.action,
        packs=list(getattr(r, "packs", []) or []), entry=entry,
    )


def _port_text(p: Any) -> str:
    if is_dataclass(p):
        p = _plain(p)
    if isinstance(p, int | str):
        return f"{p}/TCP"
    if not isinstance(p, dict):
        return str(p)
    proto = str(p.get("protocol") or "TCP")
    if p.get("port") is None and proto.upper() not in ("TCP", "UDP", "SCTP"):
        types = p.get("icmpTypes")  # ICMP/ICMPv6 or a numbered protocol: no ports (issue 16)
        return proto + (" " + ",".join(str(t) for t in types) if isinstance(types, list) else "")
    if p.get("endPort"):
        return f"{p.get('port')}-{p['endPort']}/{proto}"
    return f"{p.get('port', 'any')}/{proto}"


def peer_text(m: PeerMatcher) -> str:
    """A compiled peer entry in words, as the engine reads it (fields ANDed)."""
    if m.fqdn is not None:
        return f"fqdn {m.fqdn}"
    parts = []
    if m.namespace is not None:
        parts.append(f"namespace {m.namespace}")
    if m.labels is not None:
        parts.append("labels " + (",".join(f"{k}={v}" for k, v in sorted(m.labels)) or "(any)")
                     + ("" if m.namespace is not None else " in any namespace"))
    if m.scope is not None:
        parts.append(f"scope {m.scope}")
    if m.network is not None:
        parts.append(f"cidr {m.network}")
    return " & ".join(parts) or "any"


# --------------------------------------------------------------------------- CDE scoping


def workload_identities(stats: EventStats) -> list[tuple[str, Identity]]:
    """(workload id, identity) of every distinct pod the report knows (identity file entries and
    pods seen in events, with their own labels and address), for asking the engine's matchers."""
    out: list[tuple[str, Identity]] = []
    for wid, w in sorted(stats.workloads.items()):
        if w.is_world:
            continue
        for pod, labels, ip in sorted(w.members, key=repr):
            out.append((wid, Identity(ip or "192.0.2.1", w.namespace, pod, labels)))
    return out


def selected_witness(entry: RuleEntry) -> Identity:
    """A pod the rule's policy selects (cluster policies select every pod: a CDE one here)."""
    p = entry.doc.policy
    if entry.is_cluster:
        return Identity.make("192.0.2.2", "palisade-witness", "witness", {LABEL_SCOPE: CDE})
    return Identity.make("192.0.2.2", p.metadata.namespace, "witness", dict(p.spec.selector.match_labels))


def admits_anything(entry: RuleEntry) -> bool:
    """Whether some peer can match the rule at all (``to: []`` matches nothing)."""
    if entry.peers is None:
        return True
    return any(m.fqdn is not None or peer_witness(m) is not None for m in entry.peers)


def only_cde(m: PeerMatcher) -> bool:
    """Whether a peer entry can match CDE pods only (its least specific pod is a CDE pod)."""
    w = peer_witness(m)
    return w is not None and w.scope == CDE


def mark_cde_rules(policies: list[PolicyDoc], known: list[tuple[str, Identity]]) -> None:
    """Decide which rules touch the CDE, and record why (shown to the auditor).

    A rule touches the CDE when the engine would put it in a CDE pod's table (a known pod,
    or every pod its selector can pick is CDE) and some peer can match it; or when one of
    its peer entries admits a known CDE pod, or admits CDE pods only.  Every one of these
    questions is asked of the engine's compiled selectors and peer matchers.
    """
    # Pods that differ only in their address are one question unless a peer entry has a CIDR.
    by_shape: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], Identity] = {}
    for wid, ident in known:
        by_shape.setdefault((wid, ident.namespace, ident.labels), ident)
    shapes = [(k[0], ident) for k, ident in by_shape.items()]
    for doc in policies:
        for rule in doc.rules:
            e = rule.entry
            assert e is not None
            reasons: list[str] = []
            # applies_to never reads the address; admits does only through a CIDR
            local = [(wid, ident) for wid, ident in shapes if e.applies_to(ident)]
            cidr = any(m.network is not None for m in e.peers or ())
            peer = [(wid, ident) for wid, ident in (known if cidr else shapes) if e.admits(ident)]
            rule.applies_to_workloads = sorted({wid for wid, _ in local})
            rule.peer_workloads = sorted({wid for wid, _ in peer})
            can_match = admits_anything(e)
            cde_local = sorted({wid for wid, ident in local if ident.scope == CDE})
            if can_match and cde_local:
                reasons.append("applies to CDE workload " + ", ".join(cde_local))
            elif can_match and selected_witness(e).scope == CDE:
                reasons.append("applies to every pod, CDE included (cluster-wide)" if e.is_cluster
                               else "applies to CDE workloads (selector scope cde)")
            cde_peers = sorted({wid for wid, ident in peer if ident.scope == CDE})
            if cde_peers:
                reasons.append(("any peer, CDE workloads included: " if e.peers is None else "peer ")
                               + ", ".join(cde_peers) + " in the CDE")
            hyp = [peer_text(m) for m in e.peers or () if only_cde(m)]
            if hyp and not cde_peers:
                reasons.append("peer " + "; ".join(hyp) + " matches CDE workloads only")
            rule.touches_cde = bool(reasons)
            rule.cde_reasons = reasons


# --------------------------------------------------------------------------- helpers


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_months(d: date, months: int) -> date:
    y, m = divmod(d.month - 1 + months, 12)
    year, month = d.year + y, m + 1
    return date(year, month, min(d.day, calendar.monthrange(year, month)[1]))


def parse_date(value: str) -> date | None:
    value = value.strip()
    for fn in (date.fromisoformat, lambda v: datetime.fromisoformat(v.replace("Z", "+00:00")).date()):
        try:
            return fn(value)
        except ValueError:
            continue
    return None


def _share(enc: int, total: int) -> float | None:
    return round(enc / total, 4) if total else None


# --------------------------------------------------------------------------- the report


def build_report(policy_paths: list[str], event_paths: list[str], identity_path: str | None = None,
                 segtest_paths: list[str] | None = None, as_of: date | None = None,
                 jobs: int | None = None) -> dict[str, Any]:
    """Compute every fact of the evidence pack; the returned dict is what report.json holds."""
    if not policy_paths:
        raise ReportError("at least one --policy file is needed")
    as_of = as_of or datetime.now(UTC).date()
    _engine, policies, policy_files, notes = load_policies(policy_paths)
    identity = load_identity(identity_path) if identity_path else {}
    stats = aggregate_files(event_paths, identity, jobs=jobs)
    workloads = {k: w for k, w in stats.workloads.items()}
    known = workload_identities(stats)
    mark_cde_rules(policies, known)
    scope_of = {k: w.scope for k, w in workloads.items()}

    flows = _flows(stats, scope_of)
    rules, unmatched = _rule_hits(policies, stats, dict(known))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "generator": f"palisade {__version__}",
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "as_of": as_of.isoformat(),
        "inputs": {
            "policies": policy_files,
            "events": [{"path": p, "bytes": os.path.getsize(p)} for p in event_paths],
            "identity": ({"path": identity_path, "sha256": sha256_file(identity_path),
                          "entries": len(identity)} if identity_path else None),
            "segtest": list(segtest_paths or []),
        },
        "time_range": {
            "start": iso(stats.first), "end": iso(stats.last),
            "lines": stats.lines, "bad_lines": stats.bad_lines, "bad_events": stats.bad_events,
            "events": sum(stats.by_type.values()), "by_type": dict(sorted(stats.by_type.items())),
        },
        "inventory": _inventory(workloads),
        "policies": [_policy_summary(d, as_of) for d in policies],
        "rules": rules,
        "unmatched_rules_in_events": unmatched,
        "flows": flows,
        "denied_into_cde": _denied(flows, into=True),
        "denied_out_of_cde": _denied(flows, into=False),
        "dlp_findings": _dlp(stats, scope_of),
        "encryption": _encryption(flows),
        "review": {},
        "segtest": _segtest(segtest_paths or [], as_of),
        "evidence": _evidence(stats),
        "findings": [],
        "notes": notes,
    }
    report["dlp_summary"] = _dlp_summary(report["dlp_findings"])
    report["review"] = _review(report["policies"], as_of)
    report["findings"] = _findings(report)
    return scrub(report)


def _inventory(workloads: dict[str, Workload]) -> dict[str, Any]:
    wls = sorted((w for w in workloads.values() if not w.is_world),
                 key=lambda w: (scope_rank(w.scope), w.namespace or "", w.name))
    scopes: dict[str, dict[str, Any]] = {}
    namespaces: dict[str, dict[str, int]] = {}
    for w in wls:
        s = scopes.setdefault(w.scope, {"workloads": 0, "pods": 0, "namespaces": []})
        s["workloads"] += 1
        s["pods"] += len(w.pods)
        if w.namespace not in s["namespaces"]:
            s["namespaces"].append(w.namespace)
        ns = namespaces.setdefault(w.namespace or "", {})
        ns[w.scope] = ns.get(w.scope, 0) + 1
    for s in scopes.values():
        s["namespaces"].sort()
    # "world:?": an event without any address; "world:*": outside addresses folded together
    world = [w for w in workloads.values() if w.is_world and w.id not in ("world:?", WORLD_ANY)]
    return {
        "scopes": dict(sorted(scopes.items(), key=lambda kv: scope_rank(kv[0]))),
        "namespaces": [{"name": k, "workloads_by_scope": v} for k, v in sorted(namespaces.items())],
        "workloads": [{
            "id": w.id, "namespace": w.namespace, "name": w.name, "scope": w.scope,
            "scopes_seen": sorted(w.scopes_seen), "pods": sorted(w.pods), "pod_count": len(w.pods),
            "ips": sorted(w.ips)[:20], "labels": dict(sorted(w.labels.items())), "source": sorted(w.sources),
        } for w in wls],
        "external_addresses": len(world),
    }


def _evidence(stats: EventStats) -> dict[str, Any]:
    """What the auditor must know about the evidence itself: which artefacts hold cardholder data
    (capture files), which CDE pods were not enforcing, and what evidence is missing."""
    pc = stats.pcap
    retained = {k: v for k, v in pc.files.items() if k not in pc.removed}
    sizes = [v[0] for v in retained.values() if v[0] is not None]
    ends = [v[2] for v in retained.values() if v[2] is not None]
    files = [{"file": k, "capture": v[3], "bytes": v[0], "sha256": v[1], "written": iso(v[2])}
             for k, v in sorted(retained.items(), key=lambda kv: (kv[1][2] or 0, kv[0]))]
    pods = []
    for (wid, ns, pod, mode), (flows, first, last) in sorted(stats.modes.pods.items(),
                                                            key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        pods.append({"workload": wid, "namespace": ns, "pod": pod, "mode": mode, "flows": flows,
                     "first": iso(first), "last": iso(last),
                     "seconds": round(last - first, 3) if first is not None and last is not None else None})
    return {
        "capture_files": {
            "cardholder_data": True,
            "note": ("packet captures hold raw payloads, full card numbers included: they are cardholder "
                     "data (PCI DSS 3.2.1 retention, 3.5 protection) wherever they are kept or copied"),
            "count": len(retained), "bytes": sum(sizes), "dirs": sorted(pc.dirs),
            "captures_started": pc.started, "captures_failed": pc.failed,
            "removed_by_budget": len(pc.removed),
            "retention": {"disk_budget_bytes": pc.budget_bytes,
                          "policy": "oldest files deleted when a new capture needs room in the disk budget",
                          "oldest": iso(min(ends)) if ends else None, "newest": iso(max(ends)) if ends else None},
            "files": files[:MAX_EVIDENCE_ROWS],
            "files_not_listed": max(0, len(files) - MAX_EVIDENCE_ROWS) + pc.overflow,
        },
        "unenforced_cde_pods": pods[:MAX_EVIDENCE_ROWS],
        "unenforced_cde_pods_not_listed": max(0, len(pods) - MAX_EVIDENCE_ROWS),
        "events_dropped": {
            "events": stats.dropped["events"], "alerts": stats.dropped["alerts"],
            "reasons": list(stats.dropped["reasons"]),
            "source": "alert events with events_dropped (category evidence), palisade_events_dropped_total",
        },
        "outside_addresses": {
            "granularity": WORLD_LEVEL_NAMES[min(stats.world_level, len(WORLD_LEVEL_NAMES) - 1)],
            "aggregated": stats.world_level > 0, "max_listed": stats.max_world_units,
        },
    }


def _flows(stats: EventStats, scope_of: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for (src, dst, direction, port, proto, app, verdict, rule, mode), rec in stats.edges.items():
        out.append({
            "src": src, "src_scope": scope_of.get(src, OUT_OF_SCOPE),
            "dst": dst, "dst_scope": scope_of.get(dst, OUT_OF_SCOPE),
            "direction": direction, "port": port, "proto": proto, "app_proto": app,
            "verdict": verdict, "rule": rule, "mode": mode,
            "enforced": mode not in ("learn", "monitor"),
            "count": rec[E_COUNT], "bytes": rec[E_BTS] + rec[E_BTC],
            "bytes_toserver": rec[E_BTS], "bytes_toclient": rec[E_BTC],
            "encrypted_flows": rec[E_ENC], "encrypted_bytes": rec[E_ENCB],
            "first": iso(rec[E_FIRST]), "last": iso(rec[E_LAST]),
            "src_samples": sorted(rec[E_SAMPLES]) if rec[E_SAMPLES] else [],
        })
    out.sort(key=lambda f: (-f["count"], f["src"], f["dst"], f["port"]))
    return out


def _denied(flows: list[dict[str, Any]], into: bool) -> list[dict[str, Any]]:
    keep = ("src", "src_scope", "src_samples", "dst", "dst_scope", "port", "proto", "app_proto", "rule",
            "mode", "enforced", "count", "first", "last")
    out = []
    for f in flows:
        if f["verdict"] == "allow":
            continue
        if into and f["dst_scope"] == CDE or not into and f["src_scope"] == CDE and f["dst_scope"] != CDE:
            out.append({k: f[k] for k in keep})
    return out


def _rule_hits(policies: list[PolicyDoc], stats: EventStats,
               local_of: dict[str, Identity]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Attribute event rule names to policy rules.

    The sidecar names the rule bare (``checkout-to-payments``; older builds qualified it:
    ``payment-api/checkout-to-payments``, ``payments/payment-api/...``).  A name used by
    several policies is attributed to the rule the engine puts in the deciding workload's
    table (``RuleEntry.applies_to`` of the local end: the pod whose sidecar decided).
    """
    by_key: dict[str, list[PolicyRule]] = {}
    for doc in policies:
        for r in doc.rules:
            for k in {r.id, r.name, f"{r.policy}/{r.name}", f"{doc.kind}/{r.policy}/{r.name}"}:
                by_key.setdefault(k, []).append(r)
    hits: dict[str, dict[str, Any]] = {}
    unmatched: dict[str, dict[str, Any]] = {}

    def resolve(name: str, local: str | None) -> PolicyRule | None:
        cands = by_key.get(name) or by_key.get(name.rsplit("/", 1)[-1]) or []
        if len(cands) > 1:
            ident = local_of.get(local) if local else None
            if ident is not None:
                cands = [c for c in cands if c.entry is not None and c.entry.applies_to(ident)] or cands
        return cands[0] if cands else None

    def bump(name: str, local: str | None, field_: str, n: int, first: float | None,
             last: float | None) -> None:
        if not name:
            return
        rule = resolve(name, local)
        if rule is None:
            u = unmatched.get(name)
            if u is None:
                meaning = BUILTIN_RULES.get(name)
                if meaning is None and name.startswith("dlp:"):
                    meaning = f"DLP detector {name[4:]} fired where no policy DLP rule names its pack (alert only)"
                u = unmatched[name] = {"rule": name, "builtin": meaning is not None,
                                       "meaning": meaning or "not defined in these policy files",
                                       "count": 0, "alerts": 0, "last": None}
            if field_ in ("allowed", "denied"):
                u["count"] += n  # flows; their alerts are counted apart
            else:
                u["alerts"] += n
            if last is not None and (u["last"] is None or last > u["last"]):
                u["last"] = last
            return
        h = hits.setdefault(rule.id, {"allowed": 0, "denied": 0, "alerts": 0, "dlp_findings": 0,
                                      "first": None, "last": None})
        h[field_] += n
        if first is not None and (h["first"] is None or first < h["first"]):
            h["first"] = first
        if last is not None and (h["last"] is None or last > h["last"]):
            h["last"] = last

    for (src, dst, direction, _p, _pr, _a, verdict, rule, _m), rec in stats.edges.items():
        bump(rule, dst if direction == "inbound" else src, "allowed" if verdict == "allow" else "denied", rec[E_COUNT], rec[E_FIRST],
             rec[E_LAST])
    for (sig, src, dst, _action, direction), rec in stats.alerts.items():
        bump(sig, dst if direction == "inbound" else src, "alerts", rec[0], rec[1], rec[2])
    for (sig, _rid, _t, _pack, direction, _dd, _action, src, dst), rec in stats.dlp.items():
        bump(sig, dst if direction == "inbound" else src, "dlp_findings", rec[0], rec[1], rec[2])

    rows = []
    for doc in policies:
        for r in doc.rules:
            h = hits.get(r.id, {"allowed": 0, "denied": 0, "alerts": 0, "dlp_findings": 0,
                                "first": None, "last": None})
            flows_hit = h["allowed"] + h["denied"]
            total = flows_hit + h["dlp_findings"] + (h["alerts"] if flows_hit == 0 else 0)
            row = {f.name: getattr(r, f.name) for f in fields(r) if f.name != "entry"}  # not asdict: it
            # would deep-copy the engine's compiled rule only to drop it
            entry = r.entry
            row["peers_text"] = (["any"] if entry is None or entry.peers is None
                                 else [peer_text(m) for m in entry.peers] or ["none (no peer matches)"])
            row.update({"hits": total, "allowed": h["allowed"], "denied": h["denied"], "alerts": h["alerts"],
                        "dlp_findings": h["dlp_findings"], "first_hit": iso(h["first"]),
                        "last_hit": iso(h["last"]), "never_hit": total == 0,
                        "review_flags": (["never hit in the event window"] if total == 0 else [])
                        + ([] if r.description or r.action != "allow"
                           else ["no business justification (description)"])})
            rows.append(row)
    rows.sort(key=lambda r: (not r["touches_cde"], r["file"]))
    for u in unmatched.values():
        u["last"] = iso(u["last"])
    return rows, sorted(unmatched.values(), key=lambda u: -u["count"])


def _dlp(stats: EventStats, scope_of: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for (sig, rid, typ, pack, direction, ddir, action, src, dst), rec in stats.dlp.items():
        out.append({"rule": sig, "detector": rid, "type": typ, "pack": pack, "flow_direction": direction,
                    "direction": ddir, "action": action, "src": src, "src_scope": scope_of.get(src, OUT_OF_SCOPE),
                    "dst": dst, "dst_scope": scope_of.get(dst, OUT_OF_SCOPE), "count": rec[0],
                    "first": iso(rec[1]), "last": iso(rec[2]), "samples": sorted(rec[3])})
    out.sort(key=lambda d: (-d["count"], d["rule"]))
    return out


def _dlp_summary(findings: list[dict[str, Any]]) -> dict[str, Any]:
    by_rule: dict[str, dict[str, int]] = {}
    for f in findings:
        r = by_rule.setdefault(f["rule"] or "(unnamed)", {})
        d = f["direction"] or f["flow_direction"] or "unknown"
        r[d] = r.get(d, 0) + f["count"]
    return {"total": sum(f["count"] for f in findings), "by_rule_and_direction": by_rule,
            "blocked": sum(f["count"] for f in findings if f["action"] == "blocked")}


def _encryption(flows: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of encrypted traffic in and out of the CDE (PCI DSS 4.2.1), over flows that carried data."""
    buckets = {k: {"flows": 0, "encrypted_flows": 0, "bytes": 0, "encrypted_bytes": 0}
               for k in ("into_cde", "out_of_cde", "within_cde")}
    for f in flows:
        if f["verdict"] != "allow" and f["enforced"]:
            continue
        s, d = f["src_scope"] == CDE, f["dst_scope"] == CDE
        key = "within_cde" if s and d else "into_cde" if d else "out_of_cde" if s else None
        if key is None:
            continue
        b = buckets[key]
        b["flows"] += f["count"]
        b["encrypted_flows"] += f["encrypted_flows"]
        b["bytes"] += f["bytes"]
        b["encrypted_bytes"] += f["encrypted_bytes"]
    for b in buckets.values():
        b["plaintext_flows"] = b["flows"] - b["encrypted_flows"]
        b["plaintext_bytes"] = b["bytes"] - b["encrypted_bytes"]
        b["encrypted_share_flows"] = _share(b["encrypted_flows"], b["flows"])
        b["encrypted_share_bytes"] = _share(b["encrypted_bytes"], b["bytes"])
    return buckets


def _policy_summary(doc: PolicyDoc, as_of: date) -> dict[str, Any]:
    p = doc.loaded.policy
    spec = p.spec
    selector = dict(spec.selector.match_labels) if doc.kind == "FirewallPolicy" else {}
    raw = doc.last_reviewed
    reviewed = parse_date(raw) if raw else None
    due = add_months(reviewed, REVIEW_MONTHS) if reviewed else None
    if raw is None:
        status = "missing"
    elif reviewed is None:
        status = "unparseable"
    else:
        status = "overdue" if as_of > due else "current"
    return {"file": doc.file, "kind": doc.kind, "name": doc.name, "namespace": doc.namespace,
            "selector": selector, "mode": spec.mode, "default": getattr(spec, "default", None) or "deny",
            "last_reviewed": reviewed.isoformat() if reviewed else raw,
            "review_due": due.isoformat() if due else None, "review_status": status,
            "review_flagged": status != "current", "rules": len(doc.rules),
            "applies_to_cde": any(r.touches_cde and r.cde_reasons and r.cde_reasons[0].startswith("applies")
                                  for r in doc.rules)}


def _review(policies: list[dict[str, Any]], as_of: date) -> dict[str, Any]:
    dates = [p["last_reviewed"] for p in policies if p["review_status"] in ("current", "overdue")]
    return {"as_of": as_of.isoformat(), "interval_months": REVIEW_MONTHS,
            "oldest_last_reviewed": min(dates) if dates else None,
            "flagged": any(p["review_flagged"] for p in policies),
            "flagged_policies": [f"{p['kind']}/{p['name']}: {p['review_status']}"
                                 for p in policies if p["review_flagged"]]}


def _segtest(paths: list[str], as_of: date) -> dict[str, Any] | None:
    if not paths:
        return None
    runs, probes = [], []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as exc:
            raise ReportError(f"{path}: cannot read segtest results: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: segtest results are not JSON (line {exc.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("probes"), list) or "passed" not in data:
            raise ReportError(f"{path}: not a segtest results file (needs 'probes' and 'passed')")
        runs.append({"path": path, "plan_sha256": data.get("plan_sha256"), "started": data.get("started"),
                     "finished": data.get("finished"), "passed": bool(data["passed"]),
                     "sources": data.get("sources", []), "summary": data.get("summary", {})})
        probes.extend(p for p in data["probes"] if isinstance(p, dict))
    violations = [p for p in probes if p.get("violation")]
    counts: dict[str, int] = {}
    for p in probes:
        counts[str(p.get("result"))] = counts.get(str(p.get("result")), 0) + 1
    finished = max((r["finished"] for r in runs if r["finished"]), default=None)
    fdate = parse_date(finished[:10]) if finished else None
    return {"passed": all(r["passed"] for r in runs) and not violations, "runs": runs,
            "probes": probes, "violations": violations, "results": counts,
            "last_run": finished,
            "next_due": add_months(fdate, SEGTEST_MONTHS).isoformat() if fdate else None,
            "overdue": bool(fdate and as_of > add_months(fdate, SEGTEST_MONTHS))}


def _findings(rep: dict[str, Any]) -> list[dict[str, str]]:
    """The short list an auditor reads first; each names the PCI DSS requirement it concerns."""
    out: list[dict[str, str]] = []

    def add(sev: str, req: str, msg: str) -> None:
        out.append({"severity": sev, "requirement": req, "message": msg})

    if CDE not in rep["inventory"]["scopes"]:
        add("high", "1.2.4", f"no workload labelled {LABEL_SCOPE}=cde was seen; the CDE inventory is empty")
    for w in rep["inventory"]["workloads"]:
        if len(w["scopes_seen"]) > 1:
            add("medium", "1.2.4", f"workload {w['id']} was seen with several scopes: {', '.join(w['scopes_seen'])}")
    for p in rep["policies"]:
        if p["review_flagged"]:
            add("high", "1.2.7", f"{p['kind']} {p['name']}: last review {p['last_reviewed'] or 'missing'} "
                f"({p['review_status']}; due every {REVIEW_MONTHS} months)")
        if p["applies_to_cde"] and p["default"] != "deny":
            add("high", "1.3.1", f"{p['kind']} {p['name']} applies to the CDE but its default is {p['default']}")
        if p["applies_to_cde"] and p["mode"] != "protect":
            add("high", "1.3.1", f"{p['kind']} {p['name']} applies to the CDE in mode {p['mode']} (not enforced)")
    for r in rep["rules"]:
        if r["touches_cde"] and r["never_hit"]:
            add("medium", "1.2.7", f"rule {r['id']} touches the CDE and was never hit: review whether it is needed")
        if r["touches_cde"] and not r["description"] and r["action"] == "allow":
            add("medium", "1.2.5", f"rule {r['id']} allows CDE traffic without a business justification")
    denied = sum(d["count"] for d in rep["denied_into_cde"])
    if denied:
        add("info", "1.3.1", f"{denied} connection attempts into the CDE were denied")
    unenforced = [d for d in rep["denied_into_cde"] if not d["enforced"]]
    if unenforced:
        add("high", "1.3.1", f"{sum(d['count'] for d in unenforced)} flows into the CDE violated policy but "
            "were not blocked (learn/monitor mode)")
    enc = rep["encryption"]
    for key in ("into_cde", "out_of_cde"):
        if enc[key]["plaintext_flows"]:
            add("info", "4.2.1", f"{enc[key]['plaintext_flows']} of {enc[key]['flows']} flows {key.replace('_', ' ')} "
                "were not encrypted")
    if rep["dlp_summary"]["total"]:
        add("high", "3.4.1", f"{rep['dlp_summary']['total']} DLP findings ({rep['dlp_summary']['blocked']} blocked)")
    seg = rep["segtest"]
    if seg is None:
        add("medium", "11.4.5", "no segmentation test results supplied (--segtest)")
    elif not seg["passed"]:
        add("high", "11.4.5", f"segmentation test FAILED: {len(seg['violations'])} out-of-scope probes reached the CDE")
    elif seg["overdue"]:
        add("high", "11.4.5", f"last segmentation test {seg['last_run']} is older than {SEGTEST_MONTHS} months")
    ev = rep["evidence"]
    cap = ev["capture_files"]
    if cap["count"]:
        budget = cap["retention"]["disk_budget_bytes"]
        add("high", "3.2.1", f"{cap['count']} packet capture file(s) ({cap['bytes']} bytes) in "
            f"{', '.join(cap['dirs']) or 'the pcap directory'} hold raw traffic, full card numbers included: "
            "cardholder data to protect, retain only as long as needed and delete"
            + (f" (kept within a {budget}-byte disk budget)" if budget else ""))
    pods = ev["unenforced_cde_pods"]
    for p in pods[:10]:
        add("high", "1.3.1", f"CDE pod {p['namespace']}/{p['pod']} ran in {p['mode']} mode (not enforced) from "
            f"{p['first']} to {p['last']} ({p['seconds']} s, {p['flows']} flows)")
    if len(pods) > 10:
        add("high", "1.3.1", f"{len(pods) - 10 + ev['unenforced_cde_pods_not_listed']} more CDE pods ran in "
            "learn or monitor mode (see the evidence section)")
    if ev["events_dropped"]["events"] or ev["events_dropped"]["alerts"]:
        add("high", "10.2.1", f"{ev['events_dropped']['events']} events were dropped by the sidecars "
            f"({', '.join(ev['events_dropped']['reasons']) or 'reason not given'}): the evidence is incomplete")
    if ev["outside_addresses"]["aggregated"]:
        add("info", "1.2.4", f"more than {ev['outside_addresses']['max_listed']} outside addresses talked to "
            f"the CDE: they are listed per {ev['outside_addresses']['granularity']}")
    if rep["time_range"]["bad_lines"]:
        add("info", "10.2", f"{rep['time_range']['bad_lines']} event lines were not valid JSON and were skipped")
    order = {"high": 0, "medium": 1, "info": 2}
    out.sort(key=lambda f: order.get(f["severity"], 3))
    return out


# --------------------------------------------------------------------------- output


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_args(binary: str, profile_dir: str) -> list[str]:
    """Headless Chromium that cannot reach any network (the page is self-contained anyway)."""
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile_dir}"]


def html_to_pdf(html_path: str, pdf_path: str, timeout: float = 120.0) -> str | None:
    """Print the page with headless Chromium; returns None on success, else why it was skipped."""
    binary = find_chromium()
    if binary is None:
        return "no PDF: chromium not found (install Debian's chromium to get report.pdf)"
    with tempfile.TemporaryDirectory(prefix="palisade-pdf-") as prof:
        cmd = chromium_args(binary, prof) + ["--no-pdf-header-footer", f"--print-to-pdf={pdf_path}",
                                             "file://" + os.path.abspath(html_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"no PDF: chromium did not finish within {timeout:.0f}s"
        except OSError as exc:
            return f"no PDF: cannot run chromium: {exc.strerror}"
    if proc.returncode != 0 or not os.path.exists(pdf_path) or os.path.getsize(pdf_path) == 0:
        return f"no PDF: chromium exited with status {proc.returncode}"
    return None


def write_report(report: dict[str, Any], outdir: str, pdf: bool = True) -> tuple[list[str], list[str]]:
    """Write report.json, report.html (and report.pdf); returns (paths written, notes)."""
    from firewall.audit.report_html import (
        render_html,  # rendering pulls in graphviz handling; keep import lazy
    )

    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{outdir}: cannot create output directory: {exc.strerror}") from None
    written, notes = [], []
    html_text = render_html(report)
    jpath = os.path.join(outdir, "report.json")
    with open(jpath, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1, sort_keys=False)
        fh.write("\n")
    written.append(jpath)
    hpath = os.path.join(outdir, "report.html")
    with open(hpath, "w", encoding="utf-8") as fh:
        fh.write(html_text)
    written.append(hpath)
    if pdf:
        ppath = os.path.join(outdir, "report.pdf")
        why = html_to_pdf(hpath, ppath)
        if why is None:
            written.append(ppath)
        else:
            notes.append(why)
    else:
        notes.append("no PDF: disabled with --no-pdf")
    return written, notes
