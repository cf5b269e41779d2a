"""The policy for what the proxy does not carry, compiled into the pod's nftables table.

TCP goes through the proxy and DNS through the relay; every other IP protocol (UDP, SCTP,
ICMP/ICMPv6, GRE, ...) is filtered by the kernel with rules this module compiles from the
*engine's* compiled policy (``PolicySet._table``: the same rules in the same evaluation
order, the same defaults, the same cde-segmentation) and the identity map.  There is no
second policy reader: what ``policy explain`` walks is what is compiled here.

Shape (inside ``table inet palisade``; the fixed base chains are in ``redirect.py``):

* ``l3_in_policy`` / ``l3_out_policy``: one nft rule per (policy rule x peer selector x
  protocol entry), in the engine's order, ending in the default verdict; segmented peers
  (out-of-scope -> cde) first jump to ``l3_*_seg``, which holds only cluster deny rules and
  ``exception: true`` rules and ends in the segmentation deny.
* peers are named sets: per selector the addresses of the known identities it matches
  (``l3_p<n>_4``/``_6``), and, for selectors that can match the world (cidr / scope
  out-of-scope / no selector), its networks minus every known identity (``@l3_known4``).
  An identity change (a pod IP coming or going) therefore only rewrites set elements: one
  ``nft -f`` transaction of ``flush set`` + ``add element``, no rule rebuilt.
* ``l3_*_pre``: the quarantine cut-off (everything but the admin port and kubelet probes).
* verdicts: protect mode drops and logs to NFLOG group ``L3_LOG_GROUP``; learn/monitor
  accept and log what would be denied (learn logs every new flow, so ``policy learn``
  sees it); ``alert`` rules accept and log.  The log prefix ``pl3|<verdict>|<enforced>|
  <direction>|<rule>`` is what ``firewall/datapath/nflog.py`` turns into EVE records.

Not compiled (documented in docs/policy.md): rules with ``appProto`` or an L7 match (the
kernel cannot identify an application protocol, so such rules never match non-TCP
traffic, exactly as ``decide_app(..., "unknown")`` would skip them) and ``fqdn`` peers
(their addresses are known per DNS answer, to the proxy only).

Every update is one atomic transaction applied in-process through libnftables (ctypes):
the sidecar runs as UID 1337 with CAP_NET_ADMIN, and capabilities do not survive an
``exec`` of the ``nft`` binary.  On start the sidecar rebuilds everything from scratch, so
an address that changed owner while it was down keeps no stale allow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from firewall.datapath.redirect import ADMIN_PORT, EXCLUDED_CT_MARK, L3_CHAINS, L3_LOG_GROUP, TABLE
from firewall.identity.identity import Identity
from firewall.policy.model import ICMP_PROTOCOLS, PORT_PROTOCOLS

log = logging.getLogger("palisade.l3")

PREFIX = "pl3"
_NFT_PROTO = {"UDP": "udp", "SCTP": "sctp", "ICMP": "icmp", "ICMPv6": "ipv6-icmp"}
_FAMILIES = ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr"))


L3_SYNCS = Counter("palisade_l3_syncs_total", "Kernel L3/L4 rule updates", ["kind", "result"])


class L3Error(RuntimeError):
    """The kernel refused a transaction (the message is nft's first error line)."""


# ---------------------------------------------------------------- applying
class Nft:
    """Runs nft command text as one transaction: libnftables in-process, else the binary.

    In-process because the sidecar holds CAP_NET_ADMIN only in its own process (no ambient
    capabilities): a child ``nft`` would run without it.  Load it before the privilege drop.
    """

    def __init__(self) -> None:
        self._lib: Any = None
        self._ctx: Any = None
        self._lock = threading.Lock()
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            ctx = lib.nft_ctx_new(0)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            self._lib, self._ctx = lib, ctx
        except (OSError, AttributeError) as exc:
            log.warning("libnftables unavailable (%s): using the nft binary", exc)

    def run(self, text: str) -> str:
        if self._lib is None:
            nft = shutil.which("nft") or "/usr/sbin/nft"
            proc = subprocess.run([nft, "-f", "-"], input=text, text=True, capture_output=True)
            if proc.returncode != 0:
                raise L3Error(_first_error(proc.stderr) or f"nft exit {proc.returncode}")
            return proc.stdout
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise L3Error(_first_error(err) or f"nft error {rc}")
        return out


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if line.strip() and "Error" in line:
            return line.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0].strip() if lines else ""


# ---------------------------------------------------------------- compiling
@dataclass
class PeerSel:
    """One peer selector of one rule, as sets: known identities it matches, plus (when it can
    match the world) networks minus every known identity."""

    name: str  # set name stem, l3_p<n>
    matcher: Any  # policy_match.PeerMatcher
    world: bool  # can match addresses no identity source knows
    nets: tuple[str, ...]  # networks for the world part ("" = any address)


@dataclass
class L3Plan:
    """Everything one sync writes.  ``structure`` (chains, rules, static sets) changes only
    with the policy, mode, quarantine or scope; ``elements`` (identity-derived sets) with
    identities too.  Equal structure -> an identity-only update."""

    structure: list[str] = field(default_factory=list)
    static_sets: dict[str, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)
    dynamic_sets: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    rules: int = 0

    def key(self) -> tuple:
        return (tuple(self.structure), tuple(sorted(self.static_sets.items())),
                tuple(sorted((n, t) for n, (t, _) in self.dynamic_sets.items())))


def _family(ip: str) -> int | None:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).version
    except ValueError:
        return None


def _proto_matches(entries: tuple[tuple[int, int, str], ...] | None) -> list[str] | None:
    """nft protocol expressions for a rule's non-TCP port entries; None = any protocol."""
    if entries is None:
        return None
    out: list[str] = []
    for lo, hi, proto in entries:
        if proto == "TCP":
            continue
        if proto in PORT_PROTOCOLS:
            p = _NFT_PROTO[proto]
            if (lo, hi) == (1, 65535):
                out.append(f"meta l4proto {p}")
            else:
                out.append(f"meta l4proto {p} th dport {lo}" + (f"-{hi}" if hi != lo else ""))
        elif proto in ICMP_PROTOCOLS:
            kw = "icmp" if proto == "ICMP" else "icmpv6"
            if (lo, hi) == (0, 255):
                out.append(f"meta l4proto {_NFT_PROTO[proto]}")
            else:
                out.append(f"meta l4proto {_NFT_PROTO[proto]} {kw} type {lo}" + (f"-{hi}" if hi != lo else ""))
        else:
            out.append(f"meta l4proto {int(proto)}")
    return sorted(set(out), key=out.index)


def _verdict(action: str, rule: str, direction: str, mode: str) -> str:
    """The nft statement ending a rule: protect enforces, learn/monitor accept and log."""
    g = L3_LOG_GROUP
    if action == "deny":
        enforced = mode == "protect"
        tail = "drop" if enforced else "accept"
        return f'log group {g} snaplen 128 prefix "{PREFIX}|deny|{int(enforced)}|{direction}|{rule}" {tail}'
    if action == "alert" or mode == "learn":
        what = "alert" if action == "alert" and mode != "learn" else "allow"
        return f'log group {g} snaplen 128 prefix "{PREFIX}|{what}|0|{direction}|{rule}" accept'
    return "accept"


class _Compiler:
    def __init__(self, policy: Any, identities: Iterable[Identity], local: Identity,
                 mode_override: str | None, quarantined: bool) -> None:
        self.policy = policy
        self.local = local
        self.override = mode_override if mode_override in ("learn", "monitor", "protect") else None
        self.quarantined = quarantined
        self.idents = [i for i in identities if not i.is_world and _family(i.ip)]
        self.plan = L3Plan()
        self.sel_by_key: dict[tuple, PeerSel] = {}

    def mode(self, rule_mode: str) -> str:
        if self.policy.is_empty:
            return "learn"
        return self.override or rule_mode

    def _peer_sel(self, matcher: Any) -> PeerSel | None:
        if matcher.fqdn is not None:
            return None  # DNS-learned addresses: known to the proxy only (docs/policy.md)
        key = (matcher.namespace, matcher.labels, matcher.scope, str(matcher.network))
        sel = self.sel_by_key.get(key)
        if sel is not None:
            return sel
        world = matcher.namespace is None and matcher.labels is None and matcher.scope in (None, "out-of-scope")
        nets = (str(matcher.network),) if matcher.network is not None else ("",)
        sel = PeerSel(f"l3_p{len(self.sel_by_key)}", matcher, world, nets)
        self.sel_by_key[key] = sel
        ips = {4: [], 6: []}
        labels_cache: dict[Identity, frozenset] = {}
        for ident in self.idents:
            labels = labels_cache.setdefault(ident, frozenset(ident.labels))
            if matcher.matches(ident, labels, None):
                ips[_family(ident.ip) or 4].append(ident.ip)
        for fam, _kw, typ in _FAMILIES:
            self.plan.dynamic_sets[f"{sel.name}_{fam}"] = (typ, sorted(set(ips[fam])))
            if world and nets != ("",):
                own = [n for n in nets if ipaddress.ip_network(n).version == fam]
                if own:
                    self.plan.static_sets[f"{sel.name}_n{fam}"] = (typ, "interval", tuple(own))
        return sel

    def _addr_conds(self, sel: PeerSel | None, direction: str) -> list[tuple[int, str]]:
        """(family, address condition) pairs, ORed, for one selector; (0, "") = any address."""
        if sel is None:
            return [(0, "")]
        field_ = "saddr" if direction == "ingress" else "daddr"
        out = []
        for fam, kw, _typ in _FAMILIES:
            out.append((fam, f"{kw} {field_} @{sel.name}_{fam}"))
            if sel.world:
                if sel.nets == ("",):
                    out.append((fam, f"meta nfproto ipv{fam} {kw} {field_} != @l3_known{fam}"))
                elif f"{sel.name}_n{fam}" in self.plan.static_sets:
                    out.append((fam, f"{kw} {field_} @{sel.name}_n{fam} {kw} {field_} != @l3_known{fam}"))
        return out

    def _emit_rule(self, chain: str, rule: Any, direction: str) -> None:
        if rule.app_protos is not None:
            return  # never matches traffic whose application protocol nobody identifies
        protos = _proto_matches(rule.ports)
        if protos is not None and not protos:
            return  # TCP only: the proxy's
        sels: list[PeerSel | None]
        if rule.peers is None:
            sels = [None]
        else:
            sels = [s for s in (self._peer_sel(p) for p in rule.peers) if s is not None]
        verdict = _verdict(rule.action, rule.name, direction, self.mode(rule.mode))
        for sel in sels:
            for fam, addr in self._addr_conds(sel, direction):
                for proto in protos if protos is not None else [""]:
                    if (fam == 6 and proto.startswith("meta l4proto icmp")) or \
                            (fam == 4 and proto.startswith("meta l4proto ipv6-icmp")):
                        continue  # ICMP is IPv4's, ICMPv6 IPv6's
                    expr = " ".join(x for x in (addr, proto, verdict, f'comment "{rule.name}"') if x)
                    self.plan.structure.append(f"add rule inet {TABLE} {chain} {expr}")
                    self.plan.rules += 1

    def _terminal(self, chain: str, term: Any, direction: str) -> None:
        v = _verdict(term.action, term.name, direction, self.mode(term.mode))
        self.plan.structure.append(f"add rule inet {TABLE} {chain} {v}")

    def compile(self) -> L3Plan:
        plan = self.plan
        known = {4: [], 6: []}
        for ident in self.idents:
            known[_family(ident.ip) or 4].append(ident.ip)
        for fam, _kw, typ in _FAMILIES:
            plan.dynamic_sets[f"l3_known{fam}"] = (typ, sorted(set(known[fam])))
        table = self.policy._table(self.local)  # the engine's compiled rules for this workload
        scope = "out-of-scope" if self.local.is_world else self.local.scope
        self._quarantine(table)
        for direction, d in (("ingress", "in"), ("egress", "out")):
            chain = f"l3_{d}_policy"
            seg_chain = f"l3_{d}_seg"
            rules = table.rules.get(direction, ())
            seg_scope = ("cde", "connected") if direction == "ingress" else ("cde",)
            if (direction == "ingress" and scope == "cde") or (direction == "egress" and scope == "out-of-scope"):
                # the peers segmentation applies to: ingress to cde from out-of-scope (known
                # out-of-scope pods and the world); egress from out-of-scope to cde pods
                field_ = "saddr" if direction == "ingress" else "daddr"
                for fam, kw, typ in _FAMILIES:
                    name = f"l3_seg_{d}{fam}"
                    if direction == "ingress":
                        ips = [i.ip for i in self.idents if i.scope in seg_scope and _family(i.ip) == fam]
                        cond = f"meta nfproto ipv{fam} {kw} {field_} != @{name}"
                    else:
                        ips = [i.ip for i in self.idents if i.scope == "cde" and _family(i.ip) == fam]
                        cond = f"{kw} {field_} @{name}"
                    plan.dynamic_sets[name] = (typ, sorted(set(ips)))
                    plan.structure.append(f"add rule inet {TABLE} {chain} {cond} goto {seg_chain}")
                plan.structure.append(f"add chain inet {TABLE} {seg_chain}")
                for r in rules:
                    if r.group == 0 or r.exception:
                        self._emit_rule(seg_chain, r, direction)
                self._terminal(seg_chain, table.segmentation, direction)
            for r in rules:
                self._emit_rule(chain, r, direction)
            self._terminal(chain, table.defaults[direction], direction)
        return plan

    def _quarantine(self, table: Any) -> None:
        if not self.quarantined:
            return
        mode = self.override or table.mode
        g = L3_LOG_GROUP
        xm = f"0x{EXCLUDED_CT_MARK:x}"
        node = self.policy.node_ip
        probes = sorted(self.policy.probe_ports)
        for d, direction, port_field, addr_field in (("in", "ingress", "dport", "saddr"),
                                                     ("out", "egress", "sport", "daddr")):
            chain = f"l3_{d}_pre"
            s = self.plan.structure
            # TCP the proxy carries is its business (it denies new flows and cuts open ones, with
            # a reset that must reach the peer); of the rest - non-TCP and TCP the redirect leaves
            # alone (ct mark 0x53d) - only the admin port and the kubelet probes stay
            s.append(f"add rule inet {TABLE} {chain} meta l4proto tcp ct mark != {xm} return")
            s.append(f"add rule inet {TABLE} {chain} meta l4proto tcp tcp {port_field} {ADMIN_PORT} return")
            if node and probes:
                kw = "ip" if _family(node) == 4 else "ip6"
                ports = ", ".join(str(p) for p in probes)
                s.append(f"add rule inet {TABLE} {chain} {kw} {addr_field} {node} tcp {port_field} {{ {ports} }} return")
            tail = "drop" if mode == "protect" else "accept"
            s.append(f'add rule inet {TABLE} {chain} log group {g} snaplen 128 '
                     f'prefix "{PREFIX}|deny|{int(mode == "protect")}|{direction}|quarantine" {tail}')


def compile_plan(policy: Any, identities: Iterable[Identity] | None, local: Identity, *,
                 mode_override: str | None = None, quarantined: bool = False) -> L3Plan:
    """The L3/L4 rules and sets for ``local`` (pure: no kernel access)."""
    return _Compiler(policy, list(identities or ()), local, mode_override, quarantined).compile()


# ---------------------------------------------------------------- rendering
_OWN_SET = re.compile(r"^\s*set (l3_[A-Za-z0-9_]+) \{", re.M)
_OWN_CHAIN = re.compile(r"^\s*chain (l3_(?:in|out)_seg) \{", re.M)


def _elements(name: str, values: list[str] | tuple[str, ...]) -> list[str]:
    out = []
    for i in range(0, len(values), 4096):  # bounded line length for large identity maps
        out.append(f"add element inet {TABLE} {name} {{ " + ", ".join(values[i:i + 4096]) + " }")
    return out


def render_full(plan: L3Plan, existing: str = "") -> str:
    """One transaction replacing every L3 chain, rule and set (``existing``: the current
    ``list table`` text, for the names of sets and chains to delete)."""
    L = [f"flush chain inet {TABLE} {c}" for c in L3_CHAINS]
    for c in sorted(set(_OWN_CHAIN.findall(existing))):
        L += [f"flush chain inet {TABLE} {c}", f"delete chain inet {TABLE} {c}"]
    for s in sorted(set(_OWN_SET.findall(existing))):
        L.append(f"delete set inet {TABLE} {s}")
    for name, (typ, flags, values) in sorted(plan.static_sets.items()):
        L.append(f"add set inet {TABLE} {name} {{ type {typ}; flags {flags}; auto-merge; }}")
        if values:
            L += _elements(name, values)
    for name, (typ, values) in sorted(plan.dynamic_sets.items()):
        L.append(f"add set inet {TABLE} {name} {{ type {typ}; }}")
        if values:
            L += _elements(name, values)
    chains = [ln for ln in plan.structure if ln.startswith("add chain")]
    rules = [ln for ln in plan.structure if not ln.startswith("add chain")]
    return "\n".join(L + chains + rules) + "\n"


def render_sets(plan: L3Plan) -> str:
    """One transaction rewriting only the identity-derived sets (rules untouched)."""
    L: list[str] = []
    for name, (_typ, values) in sorted(plan.dynamic_sets.items()):
        L.append(f"flush set inet {TABLE} {name}")
        if values:
            L += _elements(name, values)
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- syncing
@dataclass
class SyncResult:
    kind: str  # "full" | "sets" | "unchanged"
    rules: int
    elements: int
    seconds: float


class L3Sync:
    """Keeps the kernel's L3 rules equal to the compiled plan; thread-safe (reload, identity
    watch and annotation threads call it)."""

    def __init__(self, nft: Nft | None = None) -> None:
        self.nft = nft or Nft()
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._elements: dict[str, list[str]] | None = None
        self.last: SyncResult | None = None

    def table_present(self) -> bool:
        try:
            self.nft.run(f"list chain inet {TABLE} l3_in_policy")
            return True
        except L3Error:
            return False

    def sync(self, plan: L3Plan, *, full: bool = False) -> SyncResult:
        t0 = time.perf_counter()
        with self._lock:
            elements = {n: v for n, (_t, v) in plan.dynamic_sets.items()}
            count = sum(len(v) for v in elements.values())
            if not full and self._key == plan.key():
                if elements == self._elements:
                    kind = "unchanged"
                else:
                    self.nft.run(render_sets(plan))
                    kind = "sets"
            else:
                existing = self.nft.run(f"list table inet {TABLE}")
                self.nft.run(render_full(plan, existing))
                kind = "full"
            self._key, self._elements = plan.key(), elements
            self.last = SyncResult(kind, plan.rules, count, time.perf_counter() - t0)
            return self.last
