"""The policy engine: loaded policies compiled into per-workload lookup tables.

Evaluation order (documented in docs/internals.md and the README), first hit wins:

1. ``kubelet-probes`` - ingress from the node IP to a configured probe port (load argument),
   so liveness checks survive even quarantine (a restarted container keeps no evidence and
   stays quarantined anyway).
2. ``quarantine`` - when the caller says the pod is quarantined: deny, enforced in every mode.
3. cluster ``deny`` rules (ClusterFirewallPolicy, in file order).
4. ``cde-segmentation`` - out-of-scope (including the world) -> cde is denied; only rules
   with ``exception: true`` (cluster or namespaced, in their normal order) can open it.
5. cluster ``allow``/``alert`` rules.
6. namespaced rules of every FirewallPolicy selecting the workload, concatenated in load
   order (files sorted within a directory, documents in file order), first match wins.
7. the default: the selecting policies' ``default`` (absent = deny; ``deny`` wins if they
   disagree); workloads no FirewallPolicy selects: ``deny`` when their scope is cde,
   else ``allow``.

A rule with ``appProto`` or an L7 match cannot decide at L4.  ``decide`` then answers
"allow, pending L7" when some outcome could still allow (and ``needs_l7`` is true), or
deny when every outcome denies; ``decide_app`` and ``decide_l7`` finish the walk.

Speed: rules are compiled once per workload (``local`` identity) and indexed by
(direction, transport, port); L4 and app-level outcomes are cached per
(direction, transport, port, peer), so a decision on the hot path is a few dict
lookups whatever the number of rules.  A cache miss costs one pass over the rules
for that port.  A ``PolicySet`` is immutable once loaded: reload builds a new one
and the caller swaps the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from firewall import LABEL_SCOPE
from firewall.identity.fqdn import FqdnCache
from firewall.identity.identity import Identity
from firewall.policy.loader import LoadedDocument, PolicyError, load_policy_files
from firewall.policy.match import F_AUTHORITY, F_HOST, F_METHOD, F_PATH, L7Matcher, PeerMatcher
from firewall.policy.model import (
    L7_SECTIONS,
    MODES,
    ClusterFirewallPolicy,
    DlpRule,
    FirewallPolicy,
    normalize_app_proto,
)
from firewall.protocols.base import L7Event

__all__ = [
    "BUILTIN_RULES", "Decision", "DlpAction", "FlowInfo", "PolicyError", "PolicySet", "RuleEntry",
    "peer_witness",
]

RULE_DEFAULT_DENY = "default-deny"
RULE_DEFAULT_ALLOW = "default-allow"
RULE_SEGMENTATION = "cde-segmentation"
RULE_PROBES = "kubelet-probes"
RULE_QUARANTINE = "quarantine"
RULE_LEARN = "learn"
RULE_DLP_DEFAULT = "dlp-default-alert"
BUILTIN_RULES = (RULE_DEFAULT_DENY, RULE_DEFAULT_ALLOW, RULE_SEGMENTATION, RULE_PROBES,
                 RULE_QUARANTINE, RULE_LEARN)
_MODE_RANK = {m: i for i, m in enumerate(MODES)}  # learn < monitor < protect
_CACHE_MAX = 65536
#: L7 events whose walk outcome is cached: the HTTP family, where the matchers read only the
#: kind, method, path, host and :authority (policy_match.L7Matcher.check)
_CACHED_L7 = frozenset({"http", "http2", "grpc"})
_CACHED_PATH_MAX = 512  # longer targets are walked uncached (bounded cache memory)


def _l7_key(event: L7Event) -> tuple | None:
    """What of ``event`` the L7 matchers can read, as a cache key; None when not cacheable."""
    if event.app_proto not in _CACHED_L7:
        return None
    f = event.fields
    path = f.get(F_PATH)
    if path is not None and (type(path) is not str or len(path) > _CACHED_PATH_MAX):
        return None
    return (event.app_proto, event.kind, f.get(F_METHOD), path, f.get(F_HOST), f.get(F_AUTHORITY))
_WIDE_RANGE = 1024  # port ranges wider than this are checked per port instead of tabulated


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """One flow as the sidecar of ``local`` sees it; ``peer`` is the other end."""

    direction: Literal["ingress", "egress"]
    local: Identity
    peer: Identity
    port: int
    transport: str = "TCP"


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict and everything the session needs to act on and report it."""

    verdict: Literal["allow", "deny"]
    rule: str
    alert: bool
    enforced: bool
    capture: bool
    mode: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DlpAction:
    """``packs`` holds pack names; ``"*"`` means every enabled pack."""

    rule: str
    packs: frozenset[str]
    action: Literal["block", "alert"]
    capture: bool


_DLP_DEFAULT_ACTIONS = (DlpAction(RULE_DLP_DEFAULT, frozenset({"*"}), "alert", False),)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    name: str
    direction: str
    group: int  # 0 cluster deny, 1 cluster allow/alert, 2 namespaced
    ports: tuple[tuple[int, int, str], ...] | None
    peers: tuple[PeerMatcher, ...] | None
    app_protos: frozenset[str] | None
    l7: L7Matcher | None
    action: str
    capture: bool
    exception: bool
    mode: str
    origin: str  # "FirewallPolicy ns/name (file:line)"
    has_fqdn: bool

    def port_matches(self, port: int, transport: str) -> bool:
        if self.ports is None:
            return True
        return any(lo <= port <= hi and proto == transport for lo, hi, proto in self.ports)

    def peer_matches(self, peer: Identity, labels: frozenset[tuple[str, str]],
                     names: frozenset[str] | None) -> bool:
        if self.peers is None:
            return True
        return any(p.matches(peer, labels, names) for p in self.peers)

    @property
    def verdict(self) -> str:
        return "deny" if self.action == "deny" else "allow"


@dataclass(frozen=True, slots=True, eq=False)
class _Terminal:
    """A built-in end of the walk (default or segmentation)."""

    name: str
    action: str
    mode: str
    reason: str
    capture: bool = False
    origin: str = "built-in"

    @property
    def verdict(self) -> str:
        return "deny" if self.action == "deny" else "allow"


@dataclass(slots=True, eq=False)
class _Outcome:
    """Mode-independent result of a walk; Decisions per mode are memoised on it."""

    verdict: str
    rule: str
    action: str  # allow | deny | alert
    capture: bool
    mode: str
    reason: str
    pending: bool = False
    pending_l7: bool = False  # a pending rule has an L7 match (not only an appProto)
    cared: bool = False  # an app-conditioned rule was considered (decide_app returns the outcome)
    l7_cared: bool = False  # an L7 match had something to say about the event (decide_l7 returns it)
    decisions: dict[tuple[str, bool], Decision] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, eq=False)
class _DlpCompiled:
    rule: DlpRule
    directions: tuple[str, ...]
    peers: tuple[PeerMatcher, ...] | None
    mode: str
    packs: frozenset[str]


class _Table:
    """Everything about one local workload: its rules in evaluation order and caches."""

    def __init__(self, mode: str, rules: dict[str, tuple[CompiledRule, ...]],
                 defaults: dict[str, _Terminal], segmentation: _Terminal, local_scope: str,
                 dlp: tuple[_DlpCompiled, ...], selected: tuple[LoadedDocument, ...]) -> None:
        self.mode = mode
        self.rules = rules
        self.defaults = defaults
        self.segmentation = segmentation
        self.local_scope = local_scope
        self.dlp = dlp
        self.selected = selected
        self.has_fqdn = {d: any(r.has_fqdn for r in rs) for d, rs in rules.items()}
        self.index: dict[tuple[str, str, int, bool], tuple[CompiledRule, ...]] = {}
        self.peer_index: dict[tuple[str, str, int, bool], _PeerIndex] = {}
        self.cache: dict[tuple, _Outcome] = {}
        self.dlp_cache: dict[tuple, tuple[DlpAction, ...]] = {}  # PolicySet._dlp_actions
        self.dlp_fqdn = any(p.fqdn for d in dlp for p in d.peers or ())
        self._build_port_tables()
        self.probe_outcome = _Outcome("allow", RULE_PROBES, "allow", False, mode,
                                      "ingress from the node IP to a probe port (kubelet health checks)")
        self._quarantine: dict[str, Decision] = {}

    def quarantine(self, mode: str) -> Decision:
        d = self._quarantine.get(mode)
        if d is None:
            d = self._quarantine[mode] = Decision(
                "deny", RULE_QUARANTINE, True, True, False, mode,
                "pod is quarantined (palisade.dev/quarantine): every flow is denied")
        return d

    def segmented(self, direction: str, peer: Identity) -> bool:
        if direction == "ingress":
            return self.local_scope == "cde" and peer.scope == "out-of-scope"
        return self.local_scope == "out-of-scope" and peer.scope == "cde"

    def candidates(self, direction: str, transport: str, port: int, seg: bool) -> tuple[CompiledRule, ...]:
        """Rules of this direction that can match this port, in evaluation order (memoised).

        Built from the port table (rules naming the port) plus the few "any port"/wide-range
        rules, never from a scan of every rule.
        """
        key = (direction, transport, port, seg)
        found = self.index.get(key)
        if found is None:
            positions = sorted({*self._by_port.get((direction, transport, port), ()),
                                *(i for i in self._wide.get(direction, ())
                                  if self._order[direction][i].port_matches(port, transport))})
            ordered = self._order[direction]
            found = tuple(ordered[i] for i in positions
                          if not seg or ordered[i].group == 0 or ordered[i].exception)
            self.index[key] = found
        return found

    def peer_candidates(self, direction: str, transport: str, port: int, seg: bool,
                        peer: Identity) -> tuple[CompiledRule, ...]:
        """The port's candidates narrowed to rules whose peer selector could match ``peer``."""
        key = (direction, transport, port, seg)
        pidx = self.peer_index.get(key)
        if pidx is None:
            pidx = self.peer_index[key] = _PeerIndex(self.candidates(direction, transport, port, seg))
        return pidx.lookup(peer)

    def _build_port_tables(self) -> None:
        self._order: dict[str, tuple[CompiledRule, ...]] = dict(self.rules)
        self._by_port: dict[tuple[str, str, int], list[int]] = {}
        self._wide: dict[str, list[int]] = {}
        for direction, rules in self.rules.items():
            for i, r in enumerate(rules):
                if r.ports is None or any(hi - lo >= _WIDE_RANGE for lo, hi, _ in r.ports):
                    self._wide.setdefault(direction, []).append(i)
                    continue
                for lo, hi, proto in r.ports:
                    for port in range(lo, hi + 1):
                        self._by_port.setdefault((direction, proto, port), []).append(i)


class _PeerIndex:
    """Rules of one port bucketed by an anchor of each peer entry (namespace and/or one label).

    A peer is looked up by its namespace and labels, so only rules that name them (plus
    rules with "any"/scope/cidr/fqdn peers) are walked.  The world never matches
    namespace or label selectors, so it only sees the generic rules.
    """

    __slots__ = ("rules", "generic", "buckets", "_cache")

    def __init__(self, rules: tuple[CompiledRule, ...]) -> None:
        self.rules = rules
        self.generic: list[int] = []
        self.buckets: dict[tuple, list[int]] = {}
        for pos, r in enumerate(rules):
            anchors = []
            for p in r.peers or ():
                if p.namespace is None and not p.labels:
                    anchors = []
                    break
                label = min(p.labels) if p.labels else None
                anchors.append((p.namespace, label))
            if not anchors:
                self.generic.append(pos)
            for a in anchors:
                self.buckets.setdefault(a, []).append(pos)

    def lookup(self, peer: Identity) -> tuple[CompiledRule, ...]:
        if not self.buckets:
            return self.rules
        if peer.is_world:
            keys: list[tuple] = []
        else:
            keys = [(peer.namespace, None)]
            for kv in peer.labels:
                keys.append((peer.namespace, kv))
                keys.append((None, kv))
        hits = [self.generic] + [b for k in keys if (b := self.buckets.get(k))]
        if len(hits) == 1:
            return tuple(self.rules[i] for i in self.generic)
        return tuple(self.rules[i] for i in sorted({i for h in hits for i in h}))


def _peers(entries: list | None) -> tuple[PeerMatcher, ...] | None:
    return None if entries is None else tuple(PeerMatcher.build(p) for p in entries)


def _compile_rule(rule, direction: str, group: int, mode: str, origin: str) -> CompiledRule:
    peers_src = rule.from_ if direction == "ingress" else rule.to
    section = rule.l7_section
    if rule.app_proto is not None:
        app = rule.app_proto
        protos = frozenset({"http", "http2", "grpc"}) if app == "http" else (
            frozenset({"http2", "grpc"}) if app == "http2" else frozenset({app}))
        if section is not None:
            protos = protos & frozenset(L7_SECTIONS[section])
    elif section is not None:
        protos = frozenset(L7_SECTIONS[section])
    else:
        protos = None
    ports = None if rule.ports is None else tuple(
        (lo, hi, p.protocol) for p in rule.ports for lo, hi in p.ranges())
    peers = _peers(peers_src)
    return CompiledRule(
        name=rule.name, direction=direction, group=group, ports=ports, peers=peers,
        app_protos=protos, l7=L7Matcher.build(section, getattr(rule, section)) if section else None,
        action=rule.action, capture=rule.capture, exception=rule.exception, mode=mode, origin=origin,
        has_fqdn=any(p.fqdn for p in peers or ()),
    )


def _selects(policy: FirewallPolicy, local: Identity) -> bool:
    if local.is_world or policy.metadata.namespace != local.namespace:
        return False
    labels = local.label_map
    return all(labels.get(k) == v for k, v in policy.spec.selector.match_labels.items())


@dataclass(frozen=True, slots=True, eq=False)
class RuleEntry:
    """One rule of a loaded document, compiled exactly as the engine compiles it.

    What readers outside the hot path (the auditor report, its differential test) ask the
    engine instead of reading the YAML again (issue 18: the report's own reader took a
    labels-only peer for "same namespace" while the engine reads "any namespace", and so
    hid a CDE-opening rule).  ``applies_to`` and ``admits`` run the very selectors and
    ``PeerMatcher``s the tables are built from.
    """

    doc: LoadedDocument
    section: str  # ingress | egress | rules | dlp
    index: int
    rule: object  # the model record (IngressRule, EgressRule, ClusterRule, DlpRule)
    directions: tuple[str, ...]  # traffic directions the rule governs
    peers: tuple[PeerMatcher, ...] | None  # None: any peer
    compiled: CompiledRule | None  # None for DLP rules

    @property
    def name(self) -> str:
        return self.rule.name  # type: ignore[attr-defined]

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.doc.policy, ClusterFirewallPolicy)

    @property
    def is_dlp(self) -> bool:
        return self.section == "dlp"

    def applies_to(self, local: Identity) -> bool:
        """Whether the rule is in ``local``'s table (cluster rules: every pod)."""
        if local.is_world:
            return False
        if self.is_cluster:
            return True
        return _selects(self.doc.policy, local)  # type: ignore[arg-type]

    def admits(self, peer: Identity, names: frozenset[str] | None = None) -> bool:
        """Whether the rule's peer selector matches ``peer`` (``names``: its DNS names, for FQDN peers)."""
        if self.peers is None:
            return True
        labels = frozenset(peer.labels)
        return any(p.matches(peer, labels, names) for p in self.peers)

    def port_matches(self, port: int, transport: str = "TCP") -> bool:
        return self.compiled is None or self.compiled.port_matches(port, transport)


_WITNESS_IP = {4: "192.0.2.10", 6: "2001:db8::10"}


def peer_witness(m: PeerMatcher, scope: str | None = None) -> Identity | None:
    """A pod identity ``m`` admits, in ``scope`` when given; None when there is none.

    Answers "can this peer entry match a CDE workload at all?" for workloads not in any
    inventory yet, by building the least specific pod the entry's fields allow and asking
    the matcher itself.  FQDN entries match names, never a pod: None.
    """
    if m.fqdn is not None:
        return None
    want = m.scope if m.scope is not None else scope
    if scope is not None and want != scope:
        return None
    labels = dict(m.labels or ())
    if want is not None and want != "out-of-scope":
        if labels.setdefault(LABEL_SCOPE, want) != want:
            return None
    if m.network is not None:
        net = m.network
        ip = str(net.network_address if net.num_addresses <= 2 else net.network_address + 1)
    else:
        ip = _WITNESS_IP[4]
    cand = Identity.make(ip, m.namespace or "palisade-witness", "witness", labels)
    return cand if m.matches(cand, frozenset(cand.labels), None) else None


def _strictest(modes: list[str]) -> str:
    return max(modes, key=_MODE_RANK.__getitem__)


class PolicySet:
    """Immutable set of loaded policies; thread-safe for concurrent decisions."""

    def __init__(self, loaded: list[LoadedDocument], sha256: dict[str, str] | None = None, *,
                 node_ip: str | None = None, probe_ports: frozenset[int] = frozenset(),
                 fqdn: FqdnCache | None = None, empty: bool = False) -> None:
        self.loaded = list(loaded)
        self.documents = [d.policy for d in self.loaded]
        self.sha256 = dict(sha256 or {})
        self.node_ip = node_ip
        self.probe_ports = frozenset(probe_ports)
        self.fqdn = fqdn
        self.is_empty = empty
        self.cluster = [d for d in self.loaded if isinstance(d.policy, ClusterFirewallPolicy)]
        self.namespaced = [d for d in self.loaded if isinstance(d.policy, FirewallPolicy)]
        self._cluster_rules = self._compile_cluster()
        self._tables: dict[tuple, _Table] = {}

    # --- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, paths: list[str], *, node_ip: str | None = None,
             probe_ports: frozenset[int] = frozenset(), fqdn: FqdnCache | None = None) -> PolicySet:
        """Load files/directories (multi-document YAML); raises PolicyError (file:line lines)."""
        loaded, hashes = load_policy_files(list(paths))
        return cls(loaded, hashes, node_ip=node_ip, probe_ports=probe_ports, fqdn=fqdn)

    @classmethod
    def empty(cls, *, node_ip: str | None = None, probe_ports: frozenset[int] = frozenset(),
              fqdn: FqdnCache | None = None) -> PolicySet:
        """No policy at all: every workload in learn mode (installing never breaks traffic)."""
        return cls([], {}, node_ip=node_ip, probe_ports=probe_ports, fqdn=fqdn, empty=True)

    @property
    def rule_count(self) -> int:
        n = 0
        for d in self.loaded:
            p = d.policy
            n += len(p.spec.rules) if isinstance(p, ClusterFirewallPolicy) else len(p.spec.ingress) + len(p.spec.egress)
        return n

    def rule_entries(self) -> tuple[RuleEntry, ...]:
        """Every rule of every loaded document, in load order, compiled as the tables compile it."""
        out: list[RuleEntry] = []
        for d in self.loaded:
            p = d.policy
            if isinstance(p, ClusterFirewallPolicy):
                sections = [("rules", r, r.direction) for r in p.spec.rules]
            else:
                sections = [(sec, r, sec) for sec in ("ingress", "egress") for r in getattr(p.spec, sec)]
            counts: dict[str, int] = {}
            for sec, r, direction in sections:
                i = counts[sec] = counts.get(sec, -1) + 1
                origin = f"{d.ref} ({d.file}:{d.rule_line(sec, i)})"
                c = _compile_rule(r, direction, 2, p.spec.mode, origin)
                out.append(RuleEntry(d, sec, i, r, (direction,), c.peers, c))
            for i, r in enumerate(p.spec.dlp):
                out.append(RuleEntry(d, "dlp", i, r, r.directions,
                                     _peers(r.to if r.to is not None else r.from_), None))
        return tuple(out)

    def _compile_cluster(self) -> dict[str, list[CompiledRule]]:
        out: dict[str, list[CompiledRule]] = {"ingress": [], "egress": []}
        allows: dict[str, list[CompiledRule]] = {"ingress": [], "egress": []}
        for d in self.cluster:
            p = d.policy
            assert isinstance(p, ClusterFirewallPolicy)
            for i, rule in enumerate(p.spec.rules):
                origin = f"{d.ref} ({d.file}:{d.rule_line('rules', i)})"
                deny = rule.action == "deny"
                c = _compile_rule(rule, rule.direction, 0 if deny else 1, p.spec.mode, origin)
                (out if deny else allows)[rule.direction].append(c)
        return {k: out[k] + allows[k] for k in out}

    def _table(self, local: Identity) -> _Table:
        key = (local.namespace, local.labels)
        table = self._tables.get(key)
        if table is None:
            table = self._build_table(local)
            if len(self._tables) > 4096:
                self._tables.clear()
            self._tables[key] = table
        return table

    def _build_table(self, local: Identity) -> _Table:
        selected = tuple(d for d in self.namespaced if _selects(d.policy, local))  # type: ignore[arg-type]
        cde = not local.is_world and local.scope == "cde"
        if self.is_empty:
            mode = "learn"
        elif selected:
            mode = _strictest([d.policy.spec.mode for d in selected])
        elif self.cluster:
            mode = _strictest([d.policy.spec.mode for d in self.cluster])
        else:
            mode = "protect"
        rules: dict[str, list[CompiledRule]] = {k: list(v) for k, v in self._cluster_rules.items()}
        for d in selected:
            p = d.policy
            assert isinstance(p, FirewallPolicy)
            for section in ("ingress", "egress"):
                for i, rule in enumerate(getattr(p.spec, section)):
                    origin = f"{d.ref} ({d.file}:{d.rule_line(section, i)})"
                    rules[section].append(_compile_rule(rule, section, 2, mode, origin))
        defaults: dict[str, _Terminal] = {}
        for direction in ("ingress", "egress"):
            if selected:
                verdicts = []
                for d in selected:
                    s = d.policy.spec
                    own = s.default_ingress if direction == "ingress" else s.default_egress  # type: ignore[union-attr]
                    verdicts.append(own or s.default or "deny")  # type: ignore[union-attr]
                verdict = "deny" if "deny" in verdicts else "allow"
                why = "no rule matched; default of " + ", ".join(d.ref for d in selected)
            elif self.is_empty:
                verdict, why = "allow", "no policy loaded"
            else:
                verdict = "deny" if cde else "allow"
                why = ("no FirewallPolicy selects this workload; cde workloads default to deny"
                       if cde else "no FirewallPolicy selects this workload")
            defaults[direction] = _Terminal(RULE_DEFAULT_DENY if verdict == "deny" else RULE_DEFAULT_ALLOW,
                                            verdict, mode, why)
        seg = _Terminal(RULE_SEGMENTATION, "deny", mode,
                        "out-of-scope -> cde is denied unless a rule with exception: true allows it")
        dlp: list[_DlpCompiled] = []
        for d in [*self.cluster, *selected]:
            p = d.policy
            for r in p.spec.dlp:
                dlp.append(_DlpCompiled(r, r.directions, _peers(r.to if r.to is not None else r.from_),
                                        p.spec.mode if isinstance(p, ClusterFirewallPolicy) else mode,
                                        frozenset(r.packs)))
        table = _Table(mode, {k: tuple(v) for k, v in rules.items()}, defaults, seg,
                       "out-of-scope" if local.is_world else local.scope, tuple(dlp), selected)
        # onInspectionError: "allow" only when every selecting policy says so (strictest wins)
        overrides = [getattr(d.policy.spec, "on_inspection_error", None) for d in selected]
        table.on_error = "allow" if overrides and all(o == "allow" for o in overrides) else None
        return table

    # --- evaluation ---------------------------------------------------------------------
    def on_inspection_error(self, local: Identity) -> str | None:
        """The workload's ``spec.onInspectionError`` override (None: the default, deny)."""
        return getattr(self._table(local), "on_error", None)

    def mode_for(self, local: Identity) -> str:
        """The workload's mode from its policies (before any per-pod annotation override)."""
        return self._table(local).mode

    def _names(self, table: _Table, flow: FlowInfo, fqdn: FqdnCache | None) -> frozenset[str] | None:
        cache = fqdn if fqdn is not None else self.fqdn
        if flow.direction != "egress" or cache is None or not table.has_fqdn.get("egress"):
            return None
        return frozenset(cache.names_for(flow.peer.ip))

    def _walk(self, table: _Table, flow: FlowInfo, names: frozenset[str] | None,
              app: str | None, event: L7Event | None) -> _Outcome:
        peer = flow.peer
        seg = table.segmented(flow.direction, peer)
        cands = table.peer_candidates(flow.direction, flow.transport, flow.port, seg, peer)
        labels = frozenset(peer.labels)
        pending: list[CompiledRule] = []
        cared = l7_cared = False
        final: CompiledRule | _Terminal | None = None
        for r in cands:
            if not r.peer_matches(peer, labels, names):
                continue
            if r.app_protos is not None:
                if app is None:
                    pending.append(r)
                    continue
                cared = True
                if app not in r.app_protos:
                    if app == "http2" and "grpc" in r.app_protos and event is None:
                        # an h2c connection may carry gRPC: known per stream, from each request
                        pending.append(r)
                    continue
                if r.l7 is not None:
                    if event is None:
                        pending.append(r)
                        continue
                    hit = r.l7.check(event)
                    if hit is None:
                        pending.append(r)
                        continue
                    l7_cared = True
                    if not hit:
                        continue
            final = r
            break
        if final is None:
            final = table.segmentation if seg else table.defaults[flow.direction]
        reason = self._reason(final)
        if not pending:
            return _Outcome(final.verdict, final.name, final.action, final.capture, final.mode, reason,
                            cared=cared, l7_cared=l7_cared)
        if final.verdict == "deny" and all(p.verdict == "deny" for p in pending):
            return _Outcome("deny", final.name, "deny", final.capture, final.mode,
                            reason + "; no application-level outcome could allow it", cared=cared,
                            l7_cared=l7_cared)
        # Name the rule the provisional allow rests on: the first pending allow, else the final allow.
        first = next((p for p in pending if p.verdict == "allow"), None)
        basis = first if first is not None else final
        need = "app_proto" if app is None else "L7"
        waits = ", ".join(
            f"{p.name} ({p.action}, needs {'/'.join(sorted(p.app_protos or ()))}"
            + (f" {p.l7.describe()}" if p.l7 else "") + ")" for p in pending)
        return _Outcome("allow", basis.name, "allow", basis.capture, basis.mode,
                        f"pending {need}: {waits}; otherwise {final.name}",
                        pending=True, pending_l7=any(p.l7 is not None for p in pending),
                        cared=cared, l7_cared=l7_cared)

    @staticmethod
    def _reason(final: CompiledRule | _Terminal) -> str:
        if isinstance(final, _Terminal):
            return final.reason
        return f"{final.action} by {final.direction} rule {final.name} of {final.origin}"

    def _decision(self, out: _Outcome, table: _Table, mode_override: str | None,
                  quarantined: bool) -> Decision:
        if quarantined and out is not table.probe_outcome:
            return table.quarantine(self._mode(table.mode, mode_override))
        mode = "learn" if self.is_empty else self._mode(out.mode, mode_override)
        key = (mode, False)
        d = out.decisions.get(key)
        if d is not None:
            return d
        if mode == "learn":
            why = "no policy loaded" if self.is_empty else f"learn mode; would {out.verdict}: {out.reason}"
            d = Decision("allow", RULE_LEARN, False, False, False, mode, why)
        else:
            enforced = mode == "protect"
            alert = not out.pending and (out.verdict == "deny" or out.action == "alert")
            d = Decision(out.verdict, out.rule, alert, enforced, out.capture, mode, out.reason)
        out.decisions[key] = d
        return d

    @staticmethod
    def _mode(mode: str, override: str | None) -> str:
        return override if override in _MODE_RANK else mode

    def _probe(self, flow: FlowInfo) -> bool:
        return (flow.direction == "ingress" and self.node_ip is not None and flow.port in self.probe_ports
                and flow.peer.ip == self.node_ip)

    def _outcome(self, flow: FlowInfo, fqdn: FqdnCache | None, app: str | None) -> tuple[_Table, _Outcome]:
        table = self._table(flow.local)
        if self._probe(flow):
            return table, table.probe_outcome
        names = self._names(table, flow, fqdn)
        key = (flow.direction, flow.transport, flow.port, flow.peer, names, app)
        out = table.cache.get(key)
        if out is None:
            out = self._walk(table, flow, names, app, None)
            if len(table.cache) >= _CACHE_MAX:
                table.cache.clear()
            table.cache[key] = out
        return table, out

    def decide(self, flow: FlowInfo, *, mode_override: str | None = None, quarantined: bool = False,
               fqdn: FqdnCache | None = None) -> Decision:
        """L4 verdict before any byte is forwarded."""
        table, out = self._outcome(flow, fqdn, None)
        return self._decision(out, table, mode_override, quarantined)

    def needs_l7(self, flow: FlowInfo, *, fqdn: FqdnCache | None = None) -> bool:
        """Whether an L7 match (http/tls/dns/redis/sql) could still change this flow's verdict,
        i.e. whether the session must hold request heads until ``decide_l7`` has seen them."""
        if self.is_empty:
            return False
        return self._outcome(flow, fqdn, None)[1].pending_l7

    def needs_app(self, flow: FlowInfo, *, fqdn: FqdnCache | None = None) -> bool:
        """Whether the verdict still depends on the identified app_proto (or on L7)."""
        if self.is_empty:
            return False
        return self._outcome(flow, fqdn, None)[1].pending

    def decide_app(self, flow: FlowInfo, app_proto: str, *, mode_override: str | None = None,
                   quarantined: bool = False, fqdn: FqdnCache | None = None) -> Decision | None:
        """Verdict once the protocol is identified; None when no rule cares about app_proto."""
        table, out = self._outcome(flow, fqdn, normalize_app_proto(app_proto or "unknown"))
        if not out.cared and not quarantined:
            return None
        return self._decision(out, table, mode_override, quarantined)

    def decide_l7(self, flow: FlowInfo, event: L7Event, *, mode_override: str | None = None,
                  quarantined: bool = False, fqdn: FqdnCache | None = None) -> Decision | None:
        """Verdict for one L7 event (request head, hello, query...); None when no L7 rule cares."""
        if self.is_empty or self._probe(flow):
            return None
        table = self._table(flow.local)
        if quarantined:
            return table.quarantine(self._mode(table.mode, mode_override))
        app = normalize_app_proto(event.app_proto or "unknown")
        names = self._names(table, flow, fqdn)
        l7key = _l7_key(event)
        if l7key is None:
            out = self._walk(table, flow, names, app, event)
        else:
            # a kept-alive connection repeats its requests: the outcome of the walk depends on
            # what the L4 outcome does plus the few event fields the matchers read
            key = (flow.direction, flow.transport, flow.port, flow.peer, names, app, l7key)
            try:
                out = table.cache.get(key)
            except TypeError:  # an unhashable field value: walk, do not keep
                out = key = None
            if out is None:
                out = self._walk(table, flow, names, app, event)
                if key is not None:
                    if len(table.cache) >= _CACHE_MAX:
                        table.cache.clear()
                    table.cache[key] = out
        if out.pending or not out.l7_cared:
            return None
        return self._decision(out, table, mode_override, False)

    def dlp_applies(self, flow: FlowInfo, *, mode_override: str | None = None) -> bool:
        """Can any DLP action apply to this flow (local workload, peer, direction, port)?

        Answered from the compiled policy (and memoised per workload, like the L4 outcome):
        False means no DLP rule's direction and peers cover the pair, so nothing the scanner
        could find would be acted on or reported - the flow needs no scan at all, and when
        its L4 verdict is final too, the proxy may hand it to the kernel (splice).  With no
        policy loaded every flow gets the default alert (True)."""
        return bool(self._dlp_actions(flow, mode_override))

    def dlp_for(self, flow: FlowInfo, *, mode_override: str | None = None) -> list[DlpAction]:
        """DLP actions for this flow; outside protect mode a block is downgraded to alert."""
        return list(self._dlp_actions(flow, mode_override))

    def _dlp_actions(self, flow: FlowInfo, mode_override: str | None) -> tuple[DlpAction, ...]:
        """``dlp_for`` memoised per workload table: the actions depend only on the direction,
        the peer (and its FQDN names), the mode override and the compiled DLP rules."""
        if self.is_empty:
            return _DLP_DEFAULT_ACTIONS
        table = self._table(flow.local)
        names = self._dlp_names(table, flow)
        key = (flow.direction, flow.peer, names, mode_override)
        try:
            found = table.dlp_cache.get(key)
        except TypeError:  # an unhashable peer (labels given as a dict): evaluate, do not keep
            return self._dlp_walk(table, flow, names, mode_override)
        if found is None:
            found = self._dlp_walk(table, flow, names, mode_override)
            if len(table.dlp_cache) >= _CACHE_MAX:
                table.dlp_cache.clear()
            table.dlp_cache[key] = found
        return found

    def _dlp_names(self, table: _Table, flow: FlowInfo) -> frozenset[str] | None:
        if flow.direction == "egress" and self.fqdn is not None and table.dlp_fqdn:
            # not self._names: that one skips the lookup when no *firewall* rule has an FQDN peer,
            # which made a DLP rule's ``to: [{fqdn: ...}]`` match nothing (found by the report's
            # differential test, issue 18)
            return frozenset(self.fqdn.names_for(flow.peer.ip))
        return None

    def _dlp_walk(self, table: _Table, flow: FlowInfo, names: frozenset[str] | None,
                  mode_override: str | None) -> tuple[DlpAction, ...]:
        labels = frozenset(flow.peer.labels)
        out: list[DlpAction] = []
        for d in table.dlp:
            if flow.direction not in d.directions:
                continue
            if d.peers is not None and not any(p.matches(flow.peer, labels, names) for p in d.peers):
                continue
            mode = self._mode(d.mode, mode_override)
            action = d.rule.action if mode == "protect" else "alert"
            if mode == "learn":
                action = "alert"
            out.append(DlpAction(d.rule.name, d.packs, action, d.rule.capture and mode != "learn"))
        return tuple(out)

    def explain(self, flow: FlowInfo, app_proto: str | None = None, *, mode_override: str | None = None,
                quarantined: bool = False, fqdn: FqdnCache | None = None) -> list[str]:
        """Human-readable evaluation trace (``policy explain``)."""
        from firewall.policy.explain import explain_flow

        return explain_flow(self, flow, app_proto, mode_override=mode_override,
                            quarantined=quarantined, fqdn=fqdn)
