"""Streaming aggregation of EVE events for the auditor report.

A week of events from hundreds of sidecars is millions of lines, so the report
never holds events in memory: one pass folds every line into a few dicts whose
size depends on how many distinct *things* exist (workload pairs, ports, rules,
DLP detectors), not on how many lines were read.  Large inputs are cut into
byte ranges on line boundaries and folded by worker processes; partial
aggregates merge exactly (counts add, first/last take min/max), so the result
does not depend on how the input was split.

Events may lack optional fields (older sidecars, alerts without a flow record,
world peers without a workload object); everything here uses ``.get`` with a
fallback and counts what it could not use instead of failing.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from firewall import LABEL_SCOPE, SCOPES
from firewall.dlp.validators import luhn
from firewall.identity.identity import IdentityError, load_identity_file

WORLD = "world"
WORLD_PREFIX = "world:"
WORLD_ANY = "world:*"  # every outside address, for flows that do not touch the CDE
OUT_OF_SCOPE = "out-of-scope"

# Deployment pods are "<name>-<replicaset hash>-<5 chars>"; jobs/daemonsets "<name>-<5 chars>".
# Outside addresses next to the CDE are kept individually ("who" is the auditor's question) up
# to MAX_WORLD_UNITS distinct ones; above that they are counted per network, coarser and coarser
# (level 1: IPv4 /24 + IPv6 /48, level 2: /16 + /32, level 3: one "world:*"), so 100k scanning
# addresses cannot make the report hundreds of MB. The level is the smallest one at which the
# *whole input* fits, whatever way it was split between workers (re-keying to a coarser level
# is exact: counts add), so the result stays independent of the split.
MAX_WORLD_UNITS = 1000
MAX_MEMBERS = 256  # distinct pods kept per workload for the engine's matchers (see Workload.members)
WORLD_LEVELS = ((32, 128), (24, 48), (16, 32))  # prefix lengths per level (IPv4, IPv6); then "*"
WORLD_LEVEL_NAMES = ("address", "IPv4 /24 and IPv6 /48 network", "IPv4 /16 and IPv6 /32 network",
                     "all outside addresses together")

_POD_SUFFIX = re.compile(r"-[a-z0-9]{6,10}-[a-z0-9]{5}$|-[a-z0-9]{5}$")


class ReportError(Exception):
    """Bad report input; the message is one line naming the file."""


# --------------------------------------------------------------------------- PAN masking

_PAN_CANDIDATE = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){11,18}(?![0-9])")


def _mask_match(m: re.Match[str]) -> str:
    digits = m.group(0).replace(" ", "").replace("-", "")
    if not 12 <= len(digits) <= 19 or not luhn(digits.encode()):
        return m.group(0)
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def mask_pans(text: str) -> str:
    """Mask anything that looks like a card number (Luhn-valid 12-19 digits) to first 6 / last 4.

    Defence in depth: the sidecar already masks findings, but an auditor report
    must never carry a full PAN even if an upstream field (a URL path, a DLP
    context from an older build) slipped one through.
    """
    if len(text) < 12:
        return text
    return _PAN_CANDIDATE.sub(_mask_match, text)


def scrub(obj: Any) -> Any:
    """Return ``obj`` with :func:`mask_pans` applied to every string (keys too)."""
    if isinstance(obj, str):
        return mask_pans(obj)
    if isinstance(obj, dict):
        return {scrub(k): scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- identity file


def load_identity(path: str) -> dict[str, dict[str, Any]]:
    """Read ``--identity FILE`` with the sidecar's own loader (``identity.load_identity_file``).

    Returns ip -> workload object shaped like ``Identity.to_json()`` (plus ``ip``) so event
    workloads and identity entries go through the same code.  One loader for the sidecar and
    the report (issue 18): a file the sidecar accepts means the same thing to the auditor.
    """
    try:
        idmap = load_identity_file(path)
    except IdentityError as exc:
        problems = str(exc).splitlines() or ["invalid"]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ReportError(f"identity file {problems[0]}{more}") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read identity file: {exc.strerror}") from None
    out: dict[str, dict[str, Any]] = {}
    for ident in idmap:
        obj = ident.to_json()
        obj["ip"] = ident.ip
        out[ident.ip] = obj
    return out


# --------------------------------------------------------------------------- workloads


def workload_name(namespace: str, pod: str | None, labels: dict[str, str]) -> str:
    """Stable name of the workload a pod belongs to (pods churn; workloads are what auditors see)."""
    name = labels.get("app") or labels.get("app.kubernetes.io/name")
    if name:
        return str(name)
    if pod:
        return _POD_SUFFIX.sub("", pod) or pod
    return "unknown"


@dataclass(slots=True)
class Workload:
    """One inventory entry: a workload (or a world address) seen in events or the identity file."""

    id: str
    namespace: str | None
    name: str
    scope: str
    labels: dict[str, str] = field(default_factory=dict)
    pods: set[str] = field(default_factory=set)
    ips: set[str] = field(default_factory=set)
    scopes_seen: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    #: distinct pods as seen (pod, labels, ip), at most MAX_MEMBERS: what the report asks the
    #: policy engine's matchers about (a workload's pods may differ in labels and addresses)
    members: set[tuple[str | None, tuple[tuple[str, str], ...], str | None]] = field(default_factory=set)

    @property
    def is_world(self) -> bool:
        return self.namespace is None

    def add_member(self, pod: str | None, labels: tuple[tuple[str, str], ...], ip: str | None) -> None:
        if len(self.members) < MAX_MEMBERS:
            self.members.add((pod, labels, ip))

    def merge(self, other: Workload) -> None:
        if scope_rank(other.scope) < scope_rank(self.scope):
            self.scope = other.scope  # the strictest scope of its pods (see EventStats._register)
        self.pods |= other.pods
        self.ips |= other.ips
        self.scopes_seen |= other.scopes_seen
        self.sources |= other.sources
        for m in sorted(other.members - self.members, key=repr):
            self.add_member(*m)
        for k, v in other.labels.items():
            self.labels.setdefault(k, v)


class PcapStats:
    """Capture files from ``pcap`` events: cardholder-data artefacts (raw payloads hold full PANs).

    Mergeable in any order: a file is retained when a ``finished`` (or ``failed``) event names it
    and no ``removed`` event does, whichever chunk of the input each came from.
    """

    MAX_FILES = 100_000  # detail kept per file; beyond, only counted

    def __init__(self) -> None:
        self.files: dict[str, list[Any]] = {}  # "dir/name" -> [bytes, sha256, end, capture id]
        self.removed: set[str] = set()
        self.dirs: set[str] = set()
        self.started = 0
        self.failed = 0
        self.budget_bytes: int | None = None
        self.overflow = 0

    def feed(self, body: dict[str, Any], t: float | None) -> None:
        state = body.get("state")
        d = str(body.get("dir") or "")
        files = body.get("files") if isinstance(body.get("files"), list) else []
        budget = body.get("budget_bytes")
        if isinstance(budget, int) and not isinstance(budget, bool):
            self.budget_bytes = max(self.budget_bytes or 0, budget)
        if d:
            self.dirs.add(d)
        if state == "started":
            self.started += 1
        elif state == "removed":
            self.removed.update(f"{d}/{f}" for f in files)
        elif state in ("finished", "failed"):
            if state == "failed":
                self.failed += 1
            sha = body.get("sha256") if isinstance(body.get("sha256"), dict) else {}
            total = _int(body.get("bytes"))
            for f in files:
                key = f"{d}/{f}"
                if key not in self.files and len(self.files) >= self.MAX_FILES:
                    self.overflow += 1
                    continue
                # per-file sizes are not in the event: a capture's bytes go to its (first) file
                size = total if len(files) == 1 else None
                self.files[key] = [size, str(sha.get(f) or ""), t, str(body.get("id") or "")]

    def merge(self, other: PcapStats) -> None:
        for k, v in other.files.items():
            self.files.setdefault(k, v)
        self.removed |= other.removed
        self.dirs |= other.dirs
        self.started += other.started
        self.failed += other.failed
        self.overflow += other.overflow
        if other.budget_bytes is not None:
            self.budget_bytes = max(self.budget_bytes or 0, other.budget_bytes)


class ModeStats:
    """CDE pods seen deciding in learn or monitor mode (not enforced), and for how long."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str, str, str], list[Any]] = {}  # (wid, ns, pod, mode) -> [flows, first, last]

    def feed(self, wid: str, ns: str, pod: str, mode: str, t: float | None) -> None:
        key = (wid, ns, pod, mode)
        rec = self.pods.get(key)
        if rec is None:
            rec = self.pods[key] = [0, t, t]
        rec[0] += 1
        rec[1] = _min(rec[1], t)
        rec[2] = _max(rec[2], t)

    def merge(self, other: ModeStats) -> None:
        for k, rec in other.pods.items():
            mine = self.pods.get(k)
            if mine is None:
                self.pods[k] = rec
            else:
                mine[0] += rec[0]
                mine[1] = _min(mine[1], rec[1])
                mine[2] = _max(mine[2], rec[2])


def _merge_dropped(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"alerts": a["alerts"] + b["alerts"], "events": a["events"] + b["events"],
            "reasons": sorted(set(a["reasons"]) | set(b["reasons"]))}


_DECODER = json.JSONDecoder()

# Per-edge counters (a list, mutated in place on the hot path):
# count, bytes_toserver, bytes_toclient, encrypted_flows, encrypted_bytes, first, last
E_COUNT, E_BTS, E_BTC, E_ENC, E_ENCB, E_FIRST, E_LAST, E_SAMPLES = range(8)
MAX_SAMPLES = 5

# Edge key: (src id, dst id, direction, dest_port, proto, app_proto, verdict, rule, mode)
EdgeKey = tuple[str, str, str, int, str, str, str, str, str]
# DLP key: (signature, detector rule_id, type, pack, flow direction, data direction, action, src id, dst id)
DlpKey = tuple[str, str, str, str, str, str, str, str, str]
# Policy alert key: (signature, src id, dst id, action, direction)
AlertKey = tuple[str, str, str, str, str]


def _ts(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class EventStats:
    """The fold of any number of EVE lines; mergeable and picklable."""

    def __init__(self, identity: dict[str, dict[str, Any]] | None = None) -> None:
        self.identity = identity or {}
        self.workloads: dict[str, Workload] = {}
        self.edges: dict[EdgeKey, list[Any]] = {}
        self.dlp: dict[DlpKey, list[Any]] = {}
        self.alerts: dict[AlertKey, list[Any]] = {}
        self.by_type: dict[str, int] = {}
        self.lines = 0
        self.bad_lines = 0
        self.bad_events = 0
        self.first: float | None = None
        self.last: float | None = None
        self._cache: dict[tuple[Any, ...], str] = {}
        self._cde: set[str] = set()
        self.pcap = PcapStats()
        self.modes = ModeStats()
        # "events dropped" evidence alerts (the sink could not write events): what is missing
        self.dropped: dict[str, Any] = {"alerts": 0, "events": 0, "reasons": []}
        self.world_level = 0
        self.world_units: set[str] = set()  # distinct outside ids at world_level (bounded)
        self.max_world_units = MAX_WORLD_UNITS

    # ---- workload resolution (cached: the same few pods appear millions of times)

    def workload_id(self, w: Any, ip: Any) -> str:
        if w.__class__ is dict:
            ns = w.get("namespace")
            if ns and not w.get("world"):
                # hot path: a pod seen before (cache key includes scope so a relabel is noticed)
                pod = w.get("pod")
                scope = w.get("scope")
                key: tuple[Any, ...] = (ns, pod, scope, ip)
                wid = self._cache.get(key)
                if wid is not None:
                    return wid
                return self._pod_workload(key, w, ns, pod, scope, ip)
        else:
            w = {}
        addr = str(w.get("ip") or ip or "?")
        ident = self.identity.get(addr)
        if ident is None or not ident.get("namespace"):
            # Not registered here: most outside peers fold into world:* (see _use_world).
            return f"{WORLD}:{addr}"
        key = (ident["namespace"], ident.get("pod"), ident["scope"], addr)
        wid = self._cache.get(key)
        if wid is not None:
            return wid
        return self._pod_workload(key, ident, ident["namespace"], ident.get("pod"), ident["scope"], addr)

    def _pod_workload(self, key: tuple[Any, ...], w: dict[str, Any], ns: Any, pod: Any, scope: Any,
                      ip: Any) -> str:
        labels = w.get("labels")
        if not isinstance(labels, dict):
            labels = {}
        scope = scope or labels.get(LABEL_SCOPE) or OUT_OF_SCOPE
        name = workload_name(str(ns), pod if isinstance(pod, str) else None, labels)
        wid = f"{ns}/{name}"
        wl = self._register(wid, str(ns), name, str(scope), labels, pod, "events")
        if ip:
            wl.ips.add(str(ip))
        wl.add_member(pod if isinstance(pod, str) else None,
                      tuple(sorted((str(k), str(v)) for k, v in labels.items())), str(ip) if ip else None)
        self._cache[key] = wid
        return wid

    def _register(self, wid: str, ns: str | None, name: str, scope: str, labels: dict[str, str],
                  pod: str | None, source: str) -> Workload:
        wl = self.workloads.get(wid)
        if wl is None:
            wl = self.workloads[wid] = Workload(wid, ns, name, scope,
                                                labels={str(k): str(v) for k, v in labels.items()})
        wl.scopes_seen.add(scope)
        if scope_rank(scope) < scope_rank(wl.scope):
            # pods of one app disagree on the scope label: the workload is as in-scope as its most
            # in-scope pod, so a CDE pod never hides behind an out-of-scope sibling (issue 18)
            wl.scope = scope
        wl.sources.add(source)
        if scope == "cde":
            self._cde.add(wid)
        if pod:
            wl.pods.add(str(pod))
        return wl

    def _world_any(self) -> str:
        if WORLD_ANY not in self.workloads:
            self._register(WORLD_ANY, None, WORLD, OUT_OF_SCOPE, {}, None, "events")
        return WORLD_ANY

    # ---- outside addresses: bounded (see MAX_WORLD_UNITS)

    def _use_world(self, wid: str) -> str:
        """The id an outside peer is recorded under at the current level (registered, counted)."""
        if wid == WORLD_ANY:
            return self._world_any()
        key = (WORLD, wid)
        unit = self._cache.get(key)
        if unit is None:
            unit = coarsen_world(wid, self.world_level)
            self._cache[key] = unit
        if unit not in self.world_units:
            if unit == WORLD_ANY:
                return self._world_any()
            self.world_units.add(unit)
            wl = self._register(unit, None, WORLD, OUT_OF_SCOPE, {}, None, "events")
            wl.ips.add(unit[len(WORLD_PREFIX):])
            if len(self.world_units) > self.max_world_units:
                self._escalate(self.world_level + 1)
                return self._use_world(wid)
        return unit

    def _escalate(self, level: int) -> None:
        """Re-key every outside id to ``level`` (and further while over the bound); exact."""
        while True:
            if level <= self.world_level:
                return
            self.world_level = level
            mapping = {u: coarsen_world(u, level) for u in self.world_units}
            self.world_units = {v for v in mapping.values() if v != WORLD_ANY}
            self._cache = {k: v for k, v in self._cache.items() if k[0] != WORLD}
            self._rekey(mapping)
            if len(self.world_units) <= self.max_world_units:
                return
            level += 1

    def _rekey(self, mapping: dict[str, str]) -> None:
        if not mapping:
            return
        if any(v == WORLD_ANY for v in mapping.values()):
            self._world_any()
        for old, new in mapping.items():
            wl = self.workloads.pop(old, None)
            if wl is None or old == new:
                if wl is not None:
                    self.workloads[old] = wl
                continue
            target = self.workloads.get(new)
            if target is None:
                target = self.workloads[new] = Workload(new, None, WORLD, OUT_OF_SCOPE)
                target.scopes_seen.add(OUT_OF_SCOPE)
                target.sources.add("events")
            target.merge(wl)
            target.ips = {new[len(WORLD_PREFIX):]}

        def m(x: str) -> str:
            return mapping.get(x, x)

        edges, self.edges = self.edges, {}
        for k, rec in edges.items():
            nk = (m(k[0]), m(k[1]), *k[2:])
            mine = self.edges.get(nk)  # type: ignore[arg-type]
            if mine is None:
                self.edges[nk] = rec  # type: ignore[index]
            else:
                _merge_edge(mine, rec)
        dlp, self.dlp = self.dlp, {}
        for k, rec in dlp.items():
            nk = (*k[:7], m(k[7]), m(k[8]))
            mine = self.dlp.get(nk)  # type: ignore[arg-type]
            if mine is None:
                self.dlp[nk] = rec  # type: ignore[index]
            else:
                _merge_dlp(mine, rec)
        alerts, self.alerts = self.alerts, {}
        for k, rec in alerts.items():
            nk = (k[0], m(k[1]), m(k[2]), k[3], k[4])
            mine = self.alerts.get(nk)
            if mine is None:
                self.alerts[nk] = rec
            else:
                _merge_alert(mine, rec)

    def add_identity_inventory(self) -> None:
        """Workloads known only from ``--identity`` still belong in the scope inventory."""
        for ip, ident in self.identity.items():
            if not ident.get("namespace"):
                continue
            name = workload_name(ident["namespace"], ident.get("pod"), ident["labels"])
            wl = self._register(f"{ident['namespace']}/{name}", ident["namespace"], name, ident["scope"],
                                ident["labels"], ident.get("pod"), "identity")
            wl.ips.add(ip)
            wl.add_member(ident.get("pod"), tuple(sorted(ident["labels"].items())), ip)

    # ---- the fold

    def feed_lines(self, lines: Iterable[bytes | str]) -> None:
        loads = _DECODER.decode
        by_type = self.by_type
        for line in lines:
            self.lines += 1
            if not line or line[0] not in (123, "{"):  # b"{"[0] == 123
                if line.strip():
                    self.bad_lines += 1
                continue
            try:
                ev = loads(line if line.__class__ is str else line.decode("utf-8", "replace"))
            except ValueError:
                self.bad_lines += 1
                continue
            if not isinstance(ev, dict):
                self.bad_lines += 1
                continue
            et = ev.get("event_type")
            et = et if isinstance(et, str) else "unknown"
            by_type[et] = by_type.get(et, 0) + 1
            t = _ts(ev.get("timestamp"))
            if t is not None:
                if self.first is None or t < self.first:
                    self.first = t
                if self.last is None or t > self.last:
                    self.last = t
            try:
                if et == "flow":
                    self._flow(ev, t)
                elif et == "alert":
                    self._alert(ev, t)
                elif et == "pcap" and isinstance(ev.get("pcap"), dict):
                    self.pcap.feed(ev["pcap"], t)
            except (TypeError, AttributeError, ValueError):
                self.bad_events += 1  # a field of an impossible type (e.g. a list as a rule name)

    def feed_event(self, ev: dict[str, Any]) -> None:
        self.feed_lines([json.dumps(ev)])

    def _flow(self, ev: dict[str, Any], t: float | None) -> None:
        get = ev.get
        src = self.workload_id(get("src_workload"), get("src_ip"))
        dst = self.workload_id(get("dest_workload"), get("dest_ip"))
        # Outside addresses stay individual only next to the CDE (the auditor asks "who"); elsewhere
        # they fold into one peer, so memory does not grow with every CDN address a pod talks to.
        if src.startswith(WORLD_PREFIX):
            src = self._world_any() if dst not in self._cde else self._use_world(src)
        if dst.startswith(WORLD_PREFIX):
            dst = self._world_any() if src not in self._cde else self._use_world(dst)
        mode = get("mode")
        if mode in ("learn", "monitor"):
            local_id, local_w = (dst, get("dest_workload")) if get("direction") == "inbound" \
                else (src, get("src_workload"))
            if local_id in self._cde and isinstance(local_w, dict):
                self.modes.feed(local_id, str(local_w.get("namespace") or ""), str(local_w.get("pod") or ""),
                                mode, t)
        verdict = get("verdict") or "allow"
        port = get("dest_port")
        key = (src, dst, get("direction") or "", port if port.__class__ is int else _int(port),
               get("proto") or "TCP", get("app_proto") or "unknown", verdict, get("rule") or "",
               get("mode") or "")
        rec = self.edges.get(key)
        if rec is None:
            if not all(k.__class__ is str for i, k in enumerate(key) if i != 3):  # odd types: normalise once
                key = tuple(k if i == 3 else str(k) for i, k in enumerate(key))  # type: ignore[assignment]
            rec = self.edges.setdefault(key, [0, 0, 0, 0, 0, t, t, set() if verdict != "allow" else None])
        fl = get("flow")
        bts = btc = 0
        if fl.__class__ is dict:
            bts = fl.get("bytes_toserver", 0)
            btc = fl.get("bytes_toclient", 0)
            if bts.__class__ is not int:
                bts = _int(bts)
            if btc.__class__ is not int:
                btc = _int(btc)
        rec[E_COUNT] += 1
        rec[E_BTS] += bts
        rec[E_BTC] += btc
        if get("encrypted"):
            rec[E_ENC] += 1
            rec[E_ENCB] += bts + btc
        if t is not None:
            if rec[E_FIRST] is None or t < rec[E_FIRST]:
                rec[E_FIRST] = t
            if rec[E_LAST] is None or t > rec[E_LAST]:
                rec[E_LAST] = t
        samples = rec[E_SAMPLES]
        if samples is not None and len(samples) < MAX_SAMPLES:
            sw = get("src_workload")
            who = (sw.get("pod") if isinstance(sw, dict) else None) or get("src_ip")
            if who:
                samples.add(str(who))

    def _alert(self, ev: dict[str, Any], t: float | None) -> None:
        al = ev.get("alert")
        if not isinstance(al, dict):
            al = {}
        lost = ev.get("events_dropped")
        if isinstance(lost, dict):  # the sink's "events dropped" evidence alert
            self.dropped["alerts"] += 1
            self.dropped["events"] += _int(lost.get("since_last"))
            reasons = lost.get("total") if isinstance(lost.get("total"), dict) else {}
            self.dropped["reasons"] = sorted(set(self.dropped["reasons"]) | {str(r) for r in reasons})
        src = self.workload_id(ev.get("src_workload"), ev.get("src_ip"))
        dst = self.workload_id(ev.get("dest_workload"), ev.get("dest_ip"))
        if src.startswith(WORLD_PREFIX):
            src = self._use_world(src)
        if dst.startswith(WORLD_PREFIX):
            dst = self._use_world(dst)
        sig = str(al.get("signature") or "")
        action = str(al.get("action") or "")
        direction = str(ev.get("direction") or "")
        dlp = ev.get("dlp")
        if al.get("category") == "dlp" or isinstance(dlp, dict):
            d = dlp if isinstance(dlp, dict) else {}
            key = (sig, str(d.get("rule_id") or ""), str(d.get("type") or ""), str(d.get("pack") or ""),
                   direction, str(d.get("direction") or ""), action, src, dst)
            rec = self.dlp.get(key)
            if rec is None:
                rec = self.dlp[key] = [0, t, t, set()]
            rec[0] += 1
            if t is not None:
                if rec[1] is None or t < rec[1]:
                    rec[1] = t
                if rec[2] is None or t > rec[2]:
                    rec[2] = t
            masked = d.get("masked")
            if masked and len(rec[3]) < MAX_SAMPLES:
                rec[3].add(mask_pans(str(masked)))
            return
        akey = (sig, src, dst, action, direction)
        rec = self.alerts.get(akey)
        if rec is None:
            rec = self.alerts[akey] = [0, t, t]
        rec[0] += 1
        if t is not None:
            if rec[1] is None or t < rec[1]:
                rec[1] = t
            if rec[2] is None or t > rec[2]:
                rec[2] = t

    # ---- merge (exact, order independent)

    def merge(self, other: EventStats) -> None:
        level = max(self.world_level, other.world_level)
        self._escalate(level)
        other._escalate(level)
        self.lines += other.lines
        self.bad_lines += other.bad_lines
        self.bad_events += other.bad_events
        for k, v in other.by_type.items():
            self.by_type[k] = self.by_type.get(k, 0) + v
        self.first = _min(self.first, other.first)
        self.last = _max(self.last, other.last)
        _merge_maps(self.workloads, other.workloads, lambda mine, wl: mine.merge(wl))
        _merge_maps(self.edges, other.edges, _merge_edge)
        _merge_maps(self.dlp, other.dlp, _merge_dlp)
        _merge_maps(self.alerts, other.alerts, _merge_alert)
        self.pcap.merge(other.pcap)
        self.modes.merge(other.modes)
        self.dropped = _merge_dropped(self.dropped, other.dropped)
        self.world_units |= other.world_units
        if len(self.world_units) > self.max_world_units:
            self._escalate(self.world_level + 1)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        state["_cde"] = set()
        state["identity"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def coarsen_world(wid: str, level: int) -> str:
    """``world:<address or network>`` at ``level`` (0: as is; see WORLD_LEVELS; beyond: world:*)."""
    if level <= 0 or wid in (WORLD_ANY, f"{WORLD}:?"):
        return wid
    if level >= len(WORLD_LEVELS):
        return WORLD_ANY
    try:
        net = ipaddress.ip_network(wid[len(WORLD_PREFIX):], strict=False)
    except ValueError:
        return WORLD_ANY  # not an address: cannot be placed in a network
    plen = WORLD_LEVELS[level][0 if net.version == 4 else 1]
    if net.prefixlen <= plen:
        return wid
    return f"{WORLD_PREFIX}{net.supernet(new_prefix=plen)}"


def _merge_maps(mine: dict, other: dict, merge: Any) -> None:
    """Fold one worker's keyed records into another's: new keys taken over, shared keys merged."""
    for key, rec in other.items():
        have = mine.get(key)
        if have is None:
            mine[key] = rec
        else:
            merge(have, rec)


def _merge_edge(mine: list[Any], rec: list[Any]) -> None:
    for i in (E_COUNT, E_BTS, E_BTC, E_ENC, E_ENCB):
        mine[i] += rec[i]
    mine[E_FIRST] = _min(mine[E_FIRST], rec[E_FIRST])
    mine[E_LAST] = _max(mine[E_LAST], rec[E_LAST])
    if mine[E_SAMPLES] is not None and rec[E_SAMPLES]:
        mine[E_SAMPLES] |= set(sorted(rec[E_SAMPLES])[: max(0, MAX_SAMPLES - len(mine[E_SAMPLES]))])


def _merge_dlp(mine: list[Any], rec: list[Any]) -> None:
    mine[0] += rec[0]
    mine[1] = _min(mine[1], rec[1])
    mine[2] = _max(mine[2], rec[2])
    mine[3] |= set(sorted(rec[3])[: max(0, MAX_SAMPLES - len(mine[3]))])


def _merge_alert(mine: list[Any], rec: list[Any]) -> None:
    mine[0] += rec[0]
    mine[1] = _min(mine[1], rec[1])
    mine[2] = _max(mine[2], rec[2])


def _stamp(rec: list[Any], t: float | None) -> None:
    if t is None:
        return
    if rec[E_FIRST] is None or t < rec[E_FIRST]:
        rec[E_FIRST] = t
    if rec[E_LAST] is None or t > rec[E_LAST]:
        rec[E_LAST] = t


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


# --------------------------------------------------------------------------- reading files

CHUNK_BYTES = 32 * 1024 * 1024


def _ranges(paths: list[str], chunk: int) -> Iterator[tuple[str, int, int]]:
    for path in paths:
        if path.endswith(".gz"):
            yield path, 0, -1  # rotated logs: compressed streams cannot be split, one worker reads it
            continue
        size = os.path.getsize(path)
        start = 0
        while start < size:
            yield path, start, min(size, start + chunk)
            start += chunk


def _iter_range(path: str, start: int, end: int) -> Iterator[bytes]:
    """Lines whose first byte lies in [start, end): each line belongs to exactly one range."""
    if end < 0:
        try:
            with gzip.open(path, "rb") as gz:
                yield from gz
        except (OSError, EOFError, zlib.error) as exc:
            raise ReportError(f"{path}: cannot read compressed events: {exc}") from None
        return
    with open(path, "rb") as fh:
        if start:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line that straddles ``start`` belongs to the previous range
        while fh.tell() < end:
            line = fh.readline()
            if not line:
                break
            yield line


_WORKER_IDENTITY: dict[str, dict[str, Any]] = {}


def _init_worker(identity: dict[str, dict[str, Any]]) -> None:
    global _WORKER_IDENTITY
    _WORKER_IDENTITY = identity


def _fold_range(job: tuple[str, int, int]) -> EventStats:
    stats = EventStats(_WORKER_IDENTITY)
    stats.feed_lines(_iter_range(*job))
    return stats


def aggregate_files(paths: list[str], identity: dict[str, dict[str, Any]] | None = None,
                    jobs: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> EventStats:
    """Fold every line of ``paths`` (EVE JSON lines) into one :class:`EventStats`.

    ``jobs`` worker processes share the byte ranges (default: the CPU count, at
    most 8); ``jobs=1`` or a small input folds in this process.
    """
    identity = identity or {}
    for p in paths:
        if not os.path.isfile(p):
            raise ReportError(f"{p}: events file not found")
        if not os.access(p, os.R_OK):
            raise ReportError(f"{p}: events file not readable")
    ranges = list(_ranges(paths, chunk_bytes))
    total = EventStats(identity)
    if jobs is None:
        jobs = min(8, os.cpu_count() or 1)
    if jobs <= 1 or len(ranges) <= 1:
        for r in ranges:
            total.feed_lines(_iter_range(*r))
    else:
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(identity,)) as pool:
            for part in pool.map(_fold_range, ranges):
                total.merge(part)
        total.identity = identity
    total.add_identity_inventory()
    return total


def scope_rank(scope: str) -> int:
    """Order for display: CDE first (what the auditor asks about), then connected, then the rest."""
    try:
        return SCOPES.index(scope)
    except ValueError:
        return len(SCOPES)
