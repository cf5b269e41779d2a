"""Flow records -> a minimal, readable FirewallPolicy per workload (``policy learn``).

What a reviewer needs from a learned policy: peers named by what they are
(namespace + app labels, never pod IPs), one rule per peer and direction with
the ports and protocol seen, HTTP narrowed to the method and path prefixes
actually used, and a comment with how often and when the traffic was seen.
The output must validate and, in protect mode, allow exactly the learned
traffic - so the same path normalisation as the engine is used, and a learned
out-of-scope -> cde flow becomes an explicit ``exception: true`` rule rather
than silently being denied by the built-in segmentation rule.

The traffic learned from is not trusted: a peer chooses its paths, can open
empty connections and can be one of millions of outside addresses. So learning
never widens a path below ``min_path_depth`` segments (``GET /1`` is not
``pathPrefix: /``), does not turn empty or unidentified connections into L4
rules that would cancel a learned L7 narrowing, bounds the prefixes per rule and
the outside peers per workload (aggregated into CIDRs, then ``0.0.0.0/0``), runs
in time linear in the input, and lists everything it refused in the output
(:class:`LearnSummary`) so a reviewer sees what the policy will deny.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import yaml

from firewall import LABEL_SCOPE
from firewall.observe.events import read_events
from firewall.policy.match import normalize_path
from firewall.policy.model import PORT_PROTOCOLS, check_protocol

# Labels that differ between replicas or revisions of one workload.
VOLATILE_LABELS = frozenset({
    "pod-template-hash", "controller-revision-hash", "statefulset.kubernetes.io/pod-name",
    "pod-template-generation", "apps.kubernetes.io/pod-index", "batch.kubernetes.io/controller-uid",
    "controller-uid", "security.istio.io/tlsMode", "service.istio.io/canonical-revision",
})
# The labels that name a workload, in order of preference.
NAME_LABELS = (("app.kubernetes.io/name", "app.kubernetes.io/instance"), ("app",), ("k8s-app",), ("name",))
_ID_SEGMENT = re.compile(r"^(\d+|[0-9a-fA-F-]{8,}|[A-Za-z0-9_-]{20,})$")
_MAX_PREFIX_SEGMENTS = 2
_METHOD = re.compile(r"[A-Z][A-Z-]{0,19}")
L7_HTTP = ("http", "http2", "grpc")
_NO_APP = ("", "unknown", "failed", None)


class LearnError(Exception):
    """Unusable input (unreadable file, no flow records)."""


@dataclass(frozen=True)
class LearnOptions:
    """Bounds on what traffic can make ``policy learn`` write."""

    min_path_depth: int = 1          # never a pathPrefix with fewer segments (0 allows "/")
    max_prefixes_per_rule: int = 32  # above: widen towards min_path_depth, then refuse the rarest
    max_prefix_length: int = 200     # longer learned prefixes are refused (attacker-chosen paths)
    max_world_peers: int = 16        # outside addresses per workload before they become CIDRs


@dataclass
class LearnSummary:
    """What the learner refused or widened, for the reviewer (printed and written as comments)."""

    refused: Counter = field(default_factory=Counter)   # reason -> flows/requests
    examples: dict[str, list[str]] = field(default_factory=dict)
    aggregated: list[str] = field(default_factory=list)

    def refuse(self, reason: str, example: str = "", n: int = 1) -> None:
        self.refused[reason] += n
        ex = self.examples.setdefault(reason, [])
        example = "".join(c if c.isprintable() else "?" for c in example[:120])  # written as a comment
        if example and len(ex) < 3 and example not in ex:
            ex.append(example)

    def lines(self) -> list[str]:
        out = []
        for reason, n in sorted(self.refused.items()):
            ex = self.examples.get(reason) or []
            out.append(f"not learned: {n} x {reason}" + (f" (e.g. {', '.join(ex)})" if ex else ""))
        out.extend(self.aggregated)
        return out


def selector_labels(labels: dict[str, str]) -> dict[str, str]:
    """The stable labels that identify a workload (app name if present, else all stable ones)."""
    for keys in NAME_LABELS:
        if keys[0] in labels:
            return {k: labels[k] for k in keys if k in labels}
    return {k: v for k, v in labels.items() if k not in VOLATILE_LABELS and k != LABEL_SCOPE}


def path_prefix(path: str, min_depth: int = 0) -> str:
    """Common prefix worth allowing: up to two segments, stopping before an ID-like segment,
    but never fewer than ``min_depth`` segments of the path (fewer if the path has fewer)."""
    segs = [s for s in normalize_path(path).split("/") if s]
    keep: list[str] = []
    for s in segs[:max(_MAX_PREFIX_SEGMENTS, min_depth)]:
        if len(keep) >= min_depth and _ID_SEGMENT.match(s) and any(c.isdigit() for c in s):
            break
        keep.append(s)
    return "/" + "/".join(keep)


def _depth(prefix: str) -> int:
    return prefix.count("/") if prefix != "/" else 0


def _parent(prefix: str) -> str:
    return prefix.rsplit("/", 1)[0] or "/"


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", s)[:40].strip("-") or "peer"


@dataclass
class _Agg:
    direction: str
    peer: tuple  # hashable peer key
    peer_doc: dict[str, Any]
    peer_name: str
    app: str | None
    exception: bool
    ports: set[tuple[int, str]] = field(default_factory=set)
    flows: int = 0
    pods: set[str] = field(default_factory=set)
    first: str = ""
    last: str = ""
    http: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # prefix -> methods
    http_seen: dict[str, int] = field(default_factory=dict)  # prefix -> requests (keeps the frequent ones)
    extra_peers: list[dict[str, Any]] = field(default_factory=list)  # aggregated outside networks
    requests: int = 0  # HTTP requests seen (learned or refused)

    def absorb(self, other: _Agg) -> None:
        self.ports |= other.ports
        self.flows += other.flows
        self.pods |= other.pods
        if other.first:
            self.first = min(self.first, other.first) if self.first else other.first
            self.last = max(self.last, other.last)
        for p, m in other.http.items():
            self.http[p] |= m
        for p, n in other.http_seen.items():
            self.http_seen[p] = self.http_seen.get(p, 0) + n
        self.requests += other.requests


@dataclass
class LearnedPolicy:
    namespace: str
    name: str
    selector: dict[str, str]
    local_scope: str
    rules: list[_Agg]
    flows: int = 0
    summary: LearnSummary = field(default_factory=LearnSummary)

    def document(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"selector": {"matchLabels": dict(self.selector)}, "mode": "protect",
                                "default": "deny"}
        for direction in ("ingress", "egress"):
            rules = [_rule_doc(r) for r in self.rules if r.direction == direction]
            if rules:
                spec[direction] = rules
        return {"apiVersion": "palisade.dev/v1", "kind": "FirewallPolicy",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}


def _workload(obj: Any) -> dict[str, Any] | None:
    return obj if isinstance(obj, dict) else None


def _peer_key(w: dict[str, Any], local_ns: str) -> tuple[tuple, dict[str, Any], str]:
    if w.get("world") or not w.get("namespace"):
        ip = str(w.get("ip") or "")
        cidr = f"{ip}/128" if ":" in ip else f"{ip}/32"
        return ("world", cidr), {"cidr": cidr}, "world-" + _slug(ip.replace(".", "-").replace(":", "-"))
    labels = {str(k): str(v) for k, v in (w.get("labels") or {}).items()}
    sel = selector_labels(labels)
    doc: dict[str, Any] = {"namespace": w["namespace"]}
    if sel:
        doc["labels"] = sel
    main = next((sel[k[0]] for k in NAME_LABELS if k[0] in sel), None)
    name = main or (w.get("pod") or w["namespace"])
    if w["namespace"] != local_ns:
        name = f"{w['namespace']}-{name}"
    return ("pod", w["namespace"], tuple(sorted(sel.items()))), doc, _slug(name)


def _transport_port(ev: dict[str, Any]) -> tuple[str, int | None]:
    """(protocol, port) of a flow record: the port for TCP/UDP/SCTP, the ICMP type for ICMP
    (the kernel L3 filter's records, issue 16), 0 for other IP protocols."""
    try:
        transport = check_protocol(str(ev.get("proto") or "TCP"))
    except ValueError:
        transport = "TCP"
    if transport in PORT_PROTOCOLS:
        value = ev.get("dest_port")
    else:
        value = ev.get("icmp_type", 0) if transport in ("ICMP", "ICMPv6") else 0
    try:
        return transport, int(value)
    except (TypeError, ValueError):
        return transport, None


def _port_docs(ports: set[tuple[int, str]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    icmp: dict[str, list[int]] = defaultdict(list)
    for p, t in sorted(ports, key=lambda x: (x[1], x[0])):
        if t in PORT_PROTOCOLS:
            if p >= 1:
                out.append({"port": p, "protocol": t})
        elif t in ("ICMP", "ICMPv6"):
            icmp[t].append(p)
        else:
            out.append({"protocol": t})
    for t, types in sorted(icmp.items()):
        out.append({"protocol": t, "icmpTypes": [str(x) for x in sorted(set(types))]})
    return out


def _scope(w: dict[str, Any]) -> str:
    if w.get("world"):
        return "out-of-scope"
    return (w.get("labels") or {}).get(LABEL_SCOPE) or w.get("scope") or "out-of-scope"


def _empty(ev: dict[str, Any]) -> bool:
    """A connection that carried no client byte (only known when the flow record says so)."""
    fl = ev.get("flow")
    return isinstance(fl, dict) and fl.get("bytes_toserver") in (0, "0")


def learn_from_events(events: list[dict[str, Any]], *, namespace: str | None = None,
                      options: LearnOptions | None = None) -> list[LearnedPolicy]:
    """Aggregate flow records into one LearnedPolicy per local workload (sorted, deterministic)."""
    opts = options or LearnOptions()
    groups: dict[tuple, dict[tuple, _Agg]] = defaultdict(dict)
    meta: dict[tuple, tuple[str, dict[str, str], str]] = {}
    counts: dict[tuple, int] = defaultdict(int)
    summaries: dict[tuple, LearnSummary] = defaultdict(LearnSummary)
    for ev in events:
        if ev.get("event_type") != "flow":
            continue
        if ev.get("verdict") == "deny" and ev.get("mode") == "protect":
            continue  # traffic that policy actually refused is not traffic to allow
        raw_dir = ev.get("direction")
        direction = {"inbound": "ingress", "outbound": "egress"}.get(raw_dir, raw_dir)
        if direction not in ("ingress", "egress"):
            continue
        src, dst = _workload(ev.get("src_workload")), _workload(ev.get("dest_workload"))
        local, peer = (dst, src) if direction == "ingress" else (src, dst)
        if not local or not peer or not local.get("namespace") or local.get("world"):
            continue
        if namespace and local["namespace"] != namespace:
            continue
        transport, port = _transport_port(ev)
        if port is None:
            continue
        local_labels = {str(k): str(v) for k, v in (local.get("labels") or {}).items()}
        lsel = selector_labels(local_labels)
        lkey = (local["namespace"], tuple(sorted(lsel.items())))
        local_scope = _scope(local)
        meta[lkey] = (local["namespace"], lsel, local_scope)
        counts[lkey] += 1
        pkey, pdoc, pname = _peer_key(peer, local["namespace"])
        app = ev.get("app_proto")
        app = None if app in _NO_APP else str(app).lower()
        if app is None and _empty(ev):
            summaries[lkey].refuse("empty connection (no client data: nothing to allow)",
                                   f"{direction} port {port}")
            continue
        peer_scope = _scope(peer)
        exception = (direction == "ingress" and local_scope == "cde" and peer_scope == "out-of-scope") or (
            direction == "egress" and local_scope == "out-of-scope" and peer_scope == "cde")
        akey = (direction, pkey, app)
        agg = groups[lkey].get(akey)
        if agg is None:
            agg = groups[lkey][akey] = _Agg(direction, pkey, pdoc, pname, app, exception)
        agg.ports.add((port, transport))
        agg.flows += 1
        if (peer.get("pod")):
            agg.pods.add(f"{peer.get('namespace')}/{peer['pod']}")
        ts = str(ev.get("timestamp") or (ev.get("flow") or {}).get("start") or "")
        if ts:
            agg.first = min(agg.first, ts) if agg.first else ts
            agg.last = max(agg.last, ts)
        if app in L7_HTTP:
            l7 = ev.get("l7")
            mps = l7.get("methods_paths") if isinstance(l7, dict) else None
            for mp in (mps if isinstance(mps, list) else []):
                if isinstance(mp, list | tuple) and len(mp) == 2:
                    agg.requests += 1
                    method = str(mp[0]).upper()
                    prefix = path_prefix(str(mp[1])[:4096], opts.min_path_depth)
                    if not _METHOD.fullmatch(method):
                        summaries[lkey].refuse("request with a method that is not an HTTP token", method)
                    elif _depth(prefix) < opts.min_path_depth:
                        summaries[lkey].refuse(
                            f"request whose prefix would be shallower than {opts.min_path_depth} "
                            "segment(s) (would allow every path)", f"{method} {prefix}")
                    elif len(prefix) > opts.max_prefix_length:
                        summaries[lkey].refuse(f"path prefix longer than {opts.max_prefix_length} characters",
                                               f"{method} {prefix[:40]}...")
                    else:
                        agg.http[prefix].add(method)
                        agg.http_seen[prefix] = agg.http_seen.get(prefix, 0) + 1
    out = []
    # a workload whose traffic was all refused still gets its (empty, deny-all) policy and summary
    for lkey in sorted(set(groups) | (set(summaries) & set(meta))):
        ns, lsel, scope = meta[lkey]
        summary = summaries[lkey]
        aggs = _bound(list(groups[lkey].values()) if lkey in groups else [], opts, summary)
        main = next((lsel[k[0]] for k in NAME_LABELS if k[0] in lsel), None) or ns
        rules = sorted(aggs, key=lambda a: (a.direction != "ingress", a.peer_name, a.app or ""))
        _name_rules(rules)
        out.append(LearnedPolicy(ns, _slug(f"learned-{main}"), lsel, scope, rules, counts[lkey], summary))
    return out


def _bound(aggs: list[_Agg], opts: LearnOptions, summary: LearnSummary) -> list[_Agg]:
    """Apply the output bounds to one workload's rules (all steps linear in the rules)."""
    # 1. L4 rules (no identified protocol) must not cancel an L7 rule for the same peer and port.
    l7_ports = {(a.direction, a.peer, p) for a in aggs if a.app for p in a.ports}
    kept: list[_Agg] = []
    for a in aggs:
        if a.app is None:
            clash = {p for p in a.ports if (a.direction, a.peer, p) in l7_ports}
            if clash:
                summary.refuse("unidentified connection on a port with a learned L7 rule for the same peer "
                               "(an L4 rule would cancel the L7 narrowing)",
                               ", ".join(f"{a.direction} port {p}" for p, _t in sorted(clash)), a.flows)
                a.ports -= clash
                if not a.ports:
                    continue
        if a.app in L7_HTTP and not a.http:
            summary.refuse("HTTP rule all of whose requests were refused (the rule would allow any request)"
                           if a.requests else
                           "HTTP connection without a complete request (the rule would allow any request)",
                           a.peer_name, a.flows)
            continue
        kept.append(a)
    # 2. Outside addresses: one rule per address up to max_world_peers, then CIDRs.
    world = [a for a in kept if a.peer[0] == "world"]
    if len({a.peer for a in world}) > opts.max_world_peers:
        kept = [a for a in kept if a.peer[0] != "world"] + _aggregate_world(world, opts, summary)
    # 3. HTTP prefixes per rule
    for a in kept:
        if a.http:
            _bound_prefixes(a, opts, summary)
    return kept


def _aggregate_world(world: list[_Agg], opts: LearnOptions, summary: LearnSummary) -> list[_Agg]:
    addrs: set[tuple[int, int]] = set()  # (version, address as int): integer maths, not 50k objects
    for a in world:
        try:
            ip = ipaddress.ip_address(str(a.peer[1]).split("/")[0])
        except ValueError:
            continue
        addrs.add((ip.version, int(ip)))
    nets: list[Any] = []
    label = ""
    for v4, v6 in ((24, 64), (16, 48), (8, 32)):
        blocks = {(ver, i >> ((32 - v4) if ver == 4 else (128 - v6))) for ver, i in addrs}
        if len(blocks) > 64 * opts.max_world_peers:
            continue  # collapsing adjacent blocks will not get this many under the bound
        cand = []
        for ver, plen, cls in ((4, v4, ipaddress.IPv4Network), (6, v6, ipaddress.IPv6Network)):
            bits = 32 if ver == 4 else 128
            mine = [cls(((b << (bits - plen)), plen)) for v, b in blocks if v == ver]
            cand += list(ipaddress.collapse_addresses(mine))
        if len(cand) <= opts.max_world_peers:
            fams = sorted({n.version for n in cand})
            label = " and ".join(f"/{v4} (IPv4)" if f == 4 else f"/{v6} (IPv6)" for f in fams) + " networks"
            nets = cand
            break
    if not nets:
        nets = [n for n in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
                if any(ver == n.version for ver, _i in addrs)]
        label = "the whole internet (0.0.0.0/0, ::/0)"
    n_peers = len({a.peer for a in world})
    summary.aggregated.append(f"aggregated: {n_peers} outside addresses (more than {opts.max_world_peers}) "
                              f"into {len(nets)} CIDR(s): {label}; ports and protocols merged per protocol")
    docs = [{"cidr": str(n)} for n in sorted(nets, key=lambda n: (n.version, n))]
    merged: dict[tuple, _Agg] = {}
    for a in world:
        key = (a.direction, a.app, a.exception)
        m = merged.get(key)
        if m is None:
            m = merged[key] = _Agg(a.direction, ("world-aggregate", a.app), docs[0], "world", a.app, a.exception)
            m.extra_peers = docs[1:]
        m.absorb(a)
    return list(merged.values())


def _bound_prefixes(a: _Agg, opts: LearnOptions, summary: LearnSummary) -> None:
    """Dedupe (linear), widen towards min_path_depth while there are too many, then keep the
    most used ones."""
    http = {p: set(m) for p, m in a.http.items()}
    seen = Counter(a.http_seen)
    while len(http) > opts.max_prefixes_per_rule:
        deep = [p for p in http if _depth(p) > max(opts.min_path_depth, 1)]
        if not deep:
            break
        maxd = max(_depth(p) for p in deep)
        for p in deep:
            if _depth(p) == maxd:  # widen the deepest level by one segment, then re-check
                parent = _parent(p)
                http.setdefault(parent, set()).update(http.pop(p))
                seen[parent] += seen.pop(p, 0)
        summary.aggregated.append(f"widened: rule {a.peer_name}: more than {opts.max_prefixes_per_rule} path "
                                  f"prefixes, depth-{maxd} prefixes merged into their parent")
    if len(http) > opts.max_prefixes_per_rule:
        ranked = sorted(http, key=lambda p: (-seen.get(p, 0), p))
        for p in ranked[opts.max_prefixes_per_rule:]:
            summary.refuse(f"path prefix beyond the {opts.max_prefixes_per_rule} most used of a rule",
                           f"{'/'.join(sorted(http[p]))} {p}", seen.get(p, 1))
            del http[p]
    a.http = defaultdict(set, http)


def _name_rules(rules: list[_Agg]) -> None:
    used: set[str] = set()
    for r in rules:
        base = ("from-" if r.direction == "ingress" else "to-") + r.peer_name
        if r.app:
            base += f"-{r.app}"
        base = _slug(base)
        name, n = base, 2
        while name in used:
            name, n = f"{base}-{n}", n + 1
        used.add(name)
        r.peer_name = name  # reused as the rule name from here on


def _http_entries(http: dict[str, set[str]]) -> list[dict[str, Any]]:
    # Drop a prefix when a shorter segment-prefix already allows the same methods. Only the
    # prefix's own ancestors are looked up (O(depth) each): comparing every pair was quadratic.
    kept: dict[str, set[str]] = {}
    for p in sorted(http, key=lambda p: (_depth(p), p)):
        methods = set(http[p])
        anc, covered = p, False
        while anc != "/":
            anc = _parent(anc)
            if anc in kept and methods <= kept[anc]:
                covered = True
                break
        if not covered:
            kept[p] = methods
    by_methods: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for p, m in kept.items():
        by_methods[tuple(sorted(m))].append(p)
    entries = []
    for methods, paths in sorted(by_methods.items()):
        for p in sorted(paths):
            entries.append({"methods": list(methods), "pathPrefix": p})
    return entries


def _rule_doc(r: _Agg) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": r.peer_name}
    if r.exception:
        doc["description"] = ("EXCEPTION to cde-segmentation (out-of-scope <-> cde) learned from traffic: "
                              "replace with the business justification or delete")
    else:
        doc["description"] = "learned from traffic: replace with the business justification"
    doc["from" if r.direction == "ingress" else "to"] = [dict(r.peer_doc)] + [dict(p) for p in r.extra_peers]
    doc["ports"] = _port_docs(r.ports)
    if r.app:
        doc["appProto"] = r.app
    if r.app in L7_HTTP and r.http:
        doc["http"] = _http_entries(r.http)
    doc["action"] = "allow"
    if r.exception:
        doc["exception"] = True
    return doc


def _comment(r: _Agg) -> str:
    pods = f" from {len(r.pods)} pod{'s' if len(r.pods) != 1 else ''}" if r.pods else ""
    seen = f", first seen {r.first}, last seen {r.last}" if r.first else ""
    return f"# {r.flows} flow{'s' if r.flows != 1 else ''}{pods}{seen}"


class _Dumper(yaml.SafeDumper):
    """Block style for structure, flow style for leaves (``labels: {app: x}``, ``methods: [GET]``)."""


def _is_leaf(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return all(not isinstance(v, dict | list) for v in items)


def _repr_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=bool(data) and _is_leaf(data))


def _repr_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=bool(data) and _is_leaf(data))


_Dumper.add_representer(dict, _repr_dict)
_Dumper.add_representer(list, _repr_list)


def _dump(value: Any) -> str:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, width=100)


def render_policy(p: LearnedPolicy) -> str:
    doc = p.document()
    spec = doc.pop("spec")
    rules = {d: spec.pop(d, []) for d in ("ingress", "egress")}
    head = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    body = _dump({"spec": spec})
    lines = [f"# Learned from {p.flows} flow records by `python -m firewall policy learn`.",
             f"# Workload scope: {p.local_scope}. Review every rule before deploying in protect mode."]
    lines += [f"# {ln}" for ln in p.summary.lines()]
    lines += [head.rstrip("\n"), body.rstrip("\n")]
    by_name = {r.peer_name: r for r in p.rules}
    for direction in ("ingress", "egress"):
        if not rules[direction]:
            continue
        lines.append(f"  {direction}:")
        for rd in rules[direction]:
            lines.append("    " + _comment(by_name[rd["name"]]))
            dumped = _dump([rd]).rstrip("\n")
            lines.extend("    " + ln for ln in dumped.splitlines())
    return "\n".join(lines) + "\n"


def render_policies(policies: list[LearnedPolicy]) -> str:
    if not policies:
        return "# no flows learned\n"
    return "---\n".join(render_policy(p) for p in policies)


def learn_policies(paths: list[str], *, namespace: str | None = None,
                   options: LearnOptions | None = None) -> list[LearnedPolicy]:
    events: list[dict[str, Any]] = []
    for path in paths:
        try:
            events.extend(read_events(path))
        except OSError as exc:
            raise LearnError(f"{path}: {exc.strerror or exc}") from None
    if not any(e.get("event_type") == "flow" for e in events):
        raise LearnError(f"no flow records in {', '.join(paths)}")
    return learn_from_events(events, namespace=namespace, options=options)
