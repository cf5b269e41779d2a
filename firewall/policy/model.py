"""The policy schema at run time: plain slotted records and the validator that builds them.

FirewallPolicy and ClusterFirewallPolicy documents are checked here, field by field,
from one declarative table per record (``_SPECS``), and turned into frozen slotted
dataclasses the engine compiles.  Field names are camelCase like Kubernetes resources;
every record forbids unknown fields so a typo (``frm:``) is an error with its path
instead of a rule that silently matches everything.

These tables are the single description of a policy document: the shipped JSON Schema
(``python -m firewall policy schema``, ``firewall/schema/policy.schema.json``) is generated
from them by ``firewall/policy/schema.py`` - field names, types, defaults, descriptions
(``_Field.doc``) and the checks a JSON Schema can state - and
``tests/policy/test_schema_differential.py`` requires the schema's verdict on generated
documents to equal this validator's, except for the listed checks only code can make.

Why no pydantic: the sidecar must stay small (issue 9: idle RSS <= 40 MiB) and pydantic
plus the validators it builds per model cost ~10 MiB in every sidecar, for work done
once at load.  The coercions below keep pydantic's lax mode for the values a YAML
document can hold (``port: "80"`` is 80, ``capture: "yes"`` is true, ``port: 80.5`` is
an error), as policies written for earlier releases rely on them, and the errors keep
pydantic's types and messages, which ``policy/loader.py`` turns into
``file:line: path: message`` lines.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

API_VERSION = "palisade.dev/v1"
KIND_POLICY = "FirewallPolicy"
KIND_CLUSTER = "ClusterFirewallPolicy"

MODES: tuple[str, ...] = ("learn", "monitor", "protect")
SCOPES: tuple[str, ...] = ("cde", "connected", "out-of-scope")
DIRECTIONS: tuple[str, ...] = ("ingress", "egress")
VERDICTS: tuple[str, ...] = ("deny", "allow")
RULE_ACTIONS: tuple[str, ...] = ("allow", "deny", "alert")
DLP_ACTIONS: tuple[str, ...] = ("block", "alert")
PROTOCOLS: tuple[str, ...] = ("TCP", "UDP", "SCTP", "ICMP", "ICMPv6")
#: IANA protocol numbers of the named protocols; any other number (1-254) is written as such
PROTOCOL_NUMBERS: dict[str, int] = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPv6": 58}
_PROTOCOL_BY_NUMBER = {n: name for name, n in PROTOCOL_NUMBERS.items()}
_PROTOCOL_SPELLINGS = {name.lower(): name for name in PROTOCOLS} | {"ipv6-icmp": "ICMPv6", "icmp6": "ICMPv6"}
#: protocols with ports (``port``/``endPort``); the others are matched by protocol (and ICMP type)
PORT_PROTOCOLS = frozenset({"TCP", "UDP", "SCTP"})
ICMP_PROTOCOLS = frozenset({"ICMP", "ICMPv6"})
#: ICMP type names (nft's spellings) -> numbers, per protocol
ICMP_TYPES: dict[str, dict[str, int]] = {
    "ICMP": {"echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5,
             "echo-request": 8, "router-advertisement": 9, "router-solicitation": 10, "time-exceeded": 11,
             "parameter-problem": 12, "timestamp-request": 13, "timestamp-reply": 14,
             "info-request": 15, "info-reply": 16, "address-mask-request": 17, "address-mask-reply": 18},
    "ICMPv6": {"destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
               "echo-request": 128, "echo-reply": 129, "mld-listener-query": 130, "mld-listener-report": 131,
               "mld-listener-done": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
               "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137,
               "router-renumbering": 138, "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142,
               "mld2-listener-report": 143},
}
TLS_VERSIONS: tuple[str, ...] = ("1.0", "1.1", "1.2", "1.3")

# app_proto names as the protocol identifier reports them (Suricata's names).
APP_PROTOS: tuple[str, ...] = (
    "http", "http2", "grpc", "tls", "dns", "redis", "pgsql", "mysql", "ssh", "smtp",
    "ftp", "kafka", "mongodb", "memcached", "amqp", "mqtt", "ldap", "unknown",
)
# Friendly spellings accepted in files and on the CLI, normalised to the names above.
APP_PROTO_ALIASES = {"postgres": "pgsql", "postgresql": "pgsql", "mariadb": "mysql", "h2": "http2",
                     "https": "tls"}

# Names the engine uses for its built-in decisions; a user rule may not take them.
RESERVED_RULE_NAMES = frozenset({"default-deny", "default-allow", "cde-segmentation", "kubelet-probes",
                                 "quarantine", "learn", "dlp-default-alert"})
# "(?!\n)$": the end of the string in Python's re (whose "$" also matches before a final
# newline) and in ECMA-262 alike - these patterns are also the JSON Schema's (policy/schema.py)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?(?!\n)$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?(?!\n)$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?(?!\n)$")
_DNS_NAME = re.compile(r"^(\*\.)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(?!\n)$")
_TOKEN = re.compile(r"^[A-Z][A-Z0-9_-]*(?!\n)$")

# Which app_protos an L7 match section belongs to (the first is implied when appProto is absent).
L7_SECTIONS: dict[str, tuple[str, ...]] = {
    "http": ("http", "http2", "grpc"),
    "tls": ("tls",),
    "dns": ("dns",),
    "redis": ("redis",),
    "sql": ("pgsql", "mysql"),
}


def normalize_app_proto(value: str) -> str:
    v = value.strip().lower()
    return APP_PROTO_ALIASES.get(v, v)


# --- field checks (firewall/policy/schema.py states the ones it can); ValueError = a problem -----

def check_labels(labels: dict[str, str] | None) -> dict[str, str] | None:
    for k, v in (labels or {}).items():
        if not _LABEL_KEY.fullmatch(k):
            raise ValueError(f"invalid label key {k!r}")
        if not _LABEL_VALUE.fullmatch(v):
            raise ValueError(f"invalid label value {v!r} for {k}")
    return labels


def _upper_tokens(values: list[str], what: str) -> list[str]:
    out = [v.strip().upper() for v in values]
    for v in out:
        if not _TOKEN.fullmatch(v):
            raise ValueError(f"invalid {what} {v!r}")
    if not out:
        raise ValueError(f"at least one {what} is required")
    return out


def check_dns_name(v: str | None) -> str | None:
    if v is not None and not _NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a DNS-1123 name (lower case, digits, '-', '.')")
    return v


def check_cidr(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        return str(ipaddress.ip_network(v, strict=False))
    except ValueError:
        raise ValueError(f"invalid CIDR {v!r}") from None


def check_fqdn(v: str | None) -> str | None:
    if v is None:
        return v
    n = v.strip().lower().rstrip(".")
    if not _DNS_NAME.fullmatch(n):
        raise ValueError(f"invalid fqdn {v!r} (a DNS name, optionally starting with '*.')")
    return n


def check_methods(v: list[str] | None) -> list[str] | None:
    return _upper_tokens(v, "method") if v is not None else v


def check_path_prefix(v: str | None) -> str | None:
    if v is not None and not v.startswith("/"):
        raise ValueError("pathPrefix must start with '/'")
    return v


def check_host(v: str | None) -> str | None:
    if v is None:
        return v
    n = v.strip().lower().rstrip(".")
    if not _DNS_NAME.fullmatch(n):
        try:
            ipaddress.ip_address(n)
        except ValueError:
            raise ValueError(f"invalid host {v!r}") from None
    return n


def tls_version_before(v: Any) -> Any:
    return f"{v:.1f}" if isinstance(v, float) else v  # minVersion: 1.2 unquoted is a float


def check_sni(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    out = [s.strip().lower().rstrip(".") for s in v]
    for s in out:
        if not _DNS_NAME.fullmatch(s):
            raise ValueError(f"invalid sni {s!r}")
    return out


def check_qname_suffix(v: list[str]) -> list[str]:
    out = [s.strip().lower().strip(".") for s in v]
    for s in out:
        if not _DNS_NAME.fullmatch(s) or s.startswith("*"):
            raise ValueError(f"invalid domain {s!r}")
    if not out:
        raise ValueError("at least one suffix is required")
    return out


def check_commands(v: list[str]) -> list[str]:
    return _upper_tokens(v, "command")


def check_verbs(v: list[str]) -> list[str]:
    return _upper_tokens(v, "verb")


def check_rule_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a valid rule name (lower case, digits, '-', '.')")
    if v in RESERVED_RULE_NAMES:
        raise ValueError(f"{v!r} is reserved for a built-in rule")
    return v


def check_dlp_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a valid rule name (lower case, digits, '-', '.')")
    return v


def app_proto_before(v: Any) -> Any:
    return normalize_app_proto(v) if isinstance(v, str) else v


def protocol_before(v: Any) -> Any:
    """``protocol: 47`` (a YAML int) is the string "47", and so is ``47.0`` - JSON, and so the
    JSON Schema, cannot tell 47.0 from 47; booleans stay what they are (an error)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2.0 ** 63:
        v = int(v)
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def check_protocol(v: str) -> str:
    """TCP | UDP | SCTP | ICMP | ICMPv6 (any case) or an IP protocol number 1-254; numbers of the
    named protocols become the names, so one protocol has one spelling in every record."""
    s = v.strip()
    name = _PROTOCOL_SPELLINGS.get(s.lower())
    if name is not None:
        return name
    if s.isdigit() and s.isascii():
        n = int(s)
        if 1 <= n <= 254:
            return _PROTOCOL_BY_NUMBER.get(n, str(n))
    raise ValueError(f"invalid protocol {v!r}: TCP, UDP, SCTP, ICMP, ICMPv6 or an IP protocol number 1-254")


def icmp_types_before(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [protocol_before(x) for x in v]
    return v


def check_icmp_types(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    known = set(ICMP_TYPES["ICMP"]) | set(ICMP_TYPES["ICMPv6"])
    out = []
    for t in v:
        s = t.strip().lower()
        if not (s in known or (s.isdigit() and s.isascii() and int(s) <= 255)):
            raise ValueError(f"invalid ICMP type {t!r} (a name like echo-request, or 0-255)")
        out.append(str(int(s)) if s.isdigit() else s)
    if not out:
        raise ValueError("at least one ICMP type (omit icmpTypes for every type)")
    return out


def icmp_type_number(protocol: str, name: str) -> int | None:
    """``echo-request`` -> 8 for ICMP, 128 for ICMPv6; a number stays a number; None if unknown."""
    if name.isdigit():
        return int(name)
    return ICMP_TYPES.get(protocol, {}).get(name)


def check_packs(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("at least one pack ('*' for all)")
    return v


# --- record checks (after every field is valid; stated in the schema where JSON Schema can) -----

def check_port_range(p: Any) -> None:
    if p.protocol in PORT_PROTOCOLS:
        if p.icmp_types is not None:
            raise ValueError(f"icmpTypes only apply to ICMP/ICMPv6, not {p.protocol}")
        if p.port is None:
            if p.end_port is not None:
                raise ValueError("endPort needs port")
            if p.protocol == "TCP":
                raise ValueError("port is required for TCP")
        elif p.end_port is not None and p.end_port < p.port:
            raise ValueError(f"endPort {p.end_port} is below port {p.port}")
        return
    if p.port is not None or p.end_port is not None:
        raise ValueError(f"{p.protocol} has no ports: omit port/endPort")
    if p.icmp_types is not None:
        if p.protocol not in ICMP_PROTOCOLS:
            raise ValueError(f"icmpTypes only apply to ICMP/ICMPv6, not protocol {p.protocol}")
        for t in p.icmp_types:
            if icmp_type_number(p.protocol, t) is None:
                raise ValueError(f"{t!r} is not an {p.protocol} type")


def check_peer_shape(p: Any) -> None:
    fields = [f for f in ("namespace", "labels", "scope", "cidr", "fqdn") if getattr(p, f) is not None]
    if not fields:
        raise ValueError("empty peer matches everything: omit from/to instead")
    if p.fqdn is not None and len(fields) > 1:
        raise ValueError("fqdn cannot be combined with other peer fields")


def check_rule_consistent(r: Any) -> None:
    sections = [k for k in L7_SECTIONS if getattr(r, k) is not None]
    if len(sections) > 1:
        raise ValueError(f"one L7 match per rule, got {', '.join(sections)}")
    if sections and r.app_proto is not None and r.app_proto not in L7_SECTIONS[sections[0]]:
        raise ValueError(f"{sections[0]} match needs appProto {'/'.join(L7_SECTIONS[sections[0]])}, "
                         f"not {r.app_proto}")
    if r.ports is not None:
        protos = {p.protocol for p in r.ports}
        if protos - {"TCP", "UDP"} and (r.app_proto is not None or sections):
            raise ValueError("appProto and L7 matches need TCP (or DNS over UDP): the kernel enforces "
                             f"{', '.join(sorted(protos - {'TCP', 'UDP'}))} at L3/L4 only")
        if "UDP" in protos:
            app = r.app_proto or (L7_SECTIONS[sections[0]][0] if sections else None)
            if app is not None and app != "dns":
                raise ValueError(f"UDP is enforced at L3/L4 (DNS through the relay): appProto {app} "
                                 "cannot be enforced on a UDP rule")
    if r.exception:
        if r.action == "deny":
            raise ValueError("exception: true only makes sense on allow/alert rules")
        if not (r.description or "").strip():
            raise ValueError("exception rules need a description (the business justification)")


def check_ingress_no_fqdn(r: Any) -> None:
    if any(p.fqdn for p in r.from_ or []):
        raise ValueError("fqdn peers are egress only")


def check_cluster_direction(r: Any) -> None:
    if r.direction == "ingress" and r.to is not None:
        raise ValueError("an ingress rule selects peers with 'from', not 'to'")
    if r.direction == "egress" and r.from_ is not None:
        raise ValueError("an egress rule selects peers with 'to', not 'from'")
    if any(p.fqdn for p in r.from_ or []):
        raise ValueError("fqdn peers are egress only")


def check_dlp_direction(r: Any) -> None:
    if r.from_ is not None and r.to is not None:
        raise ValueError("use 'to' (egress) or 'from' (ingress), not both")
    if r.direction == "ingress" and r.to is not None:
        raise ValueError("an ingress dlp rule selects peers with 'from'")
    if r.direction == "egress" and r.from_ is not None:
        raise ValueError("an egress dlp rule selects peers with 'to'")
    for p in (r.from_ or []):
        if p.fqdn is not None:
            raise ValueError("fqdn peers are egress only")


def _check_unique_names(rules: list[Any]) -> None:
    names: set[str] = set()
    for rule in rules:
        if rule.name in names:
            raise ValueError(f"duplicate rule name {rule.name!r}")
        names.add(rule.name)


def check_spec_names(s: Any) -> None:
    _check_unique_names([*s.ingress, *s.egress, *s.dlp])


def check_cluster_spec_names(s: Any) -> None:
    _check_unique_names([*s.rules, *s.dlp])


def check_policy_namespace(p: Any) -> None:
    if not p.metadata.namespace:
        raise ValueError("metadata.namespace is required for a FirewallPolicy")


def check_cluster_namespace(p: Any) -> None:
    if p.metadata.namespace:
        raise ValueError("a ClusterFirewallPolicy is not namespaced: remove metadata.namespace")


# --- the records -------------------------------------------------------------------------------
# kw_only: built by the validator with every field named; slots: a 100-rule policy stays small.

_record = dataclass(frozen=True, slots=True, kw_only=True)


@_record
class Metadata:
    name: str
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@_record
class Selector:
    match_labels: dict[str, str] = field(default_factory=dict)


@_record
class PortSpec:
    """A port range of TCP/UDP/SCTP (no port = every port; UDP/SCTP only), or a port-less
    protocol: ICMP/ICMPv6 (optionally some types) or any other IP protocol by number."""

    port: int | None = None
    end_port: int | None = None
    protocol: str = "TCP"
    icmp_types: list[str] | None = None

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """What the engine indexes: port ranges; ICMP types as one-value ranges; 0 for a
        port-less protocol (the engine's FlowInfo carries the ICMP type or 0 as its port)."""
        if self.protocol in PORT_PROTOCOLS:
            if self.port is None:
                return ((1, 65535),)
            return ((self.port, self.end_port or self.port),)
        if self.protocol in ICMP_PROTOCOLS:
            if self.icmp_types is None:
                return ((0, 255),)
            nums = sorted({icmp_type_number(self.protocol, t) or 0 for t in self.icmp_types})
            return tuple((n, n) for n in nums)
        return ((0, 0),)


@_record
class Peer:
    """One peer selector; its fields are ANDed, a rule's peer entries are ORed."""

    namespace: str | None = None
    labels: dict[str, str] | None = None
    scope: str | None = None
    cidr: str | None = None
    fqdn: str | None = None


@_record
class HttpMatch:
    """One allowed request shape; a rule's http entries are ORed, fields ANDed."""

    methods: list[str] | None = None
    path_prefix: str | None = None
    host: str | None = None


@_record
class TlsMatch:
    sni: list[str] | None = None
    min_version: str | None = None


@_record
class DnsMatch:
    qname_suffix: list[str]


@_record
class RedisMatch:
    commands: list[str]


@_record
class SqlMatch:
    verbs: list[str]


@_record
class _RuleBase:
    name: str
    description: str | None = None
    ports: list[PortSpec] | None = None
    app_proto: str | None = None
    http: list[HttpMatch] | None = None
    tls: TlsMatch | None = None
    dns: DnsMatch | None = None
    redis: RedisMatch | None = None
    sql: SqlMatch | None = None
    action: str
    capture: bool = False
    exception: bool = False

    @property
    def l7_section(self) -> str | None:
        for key in L7_SECTIONS:
            if getattr(self, key) is not None:
                return key
        return None


@_record
class IngressRule(_RuleBase):
    from_: list[Peer] | None = None


@_record
class EgressRule(_RuleBase):
    to: list[Peer] | None = None


@_record
class ClusterRule(_RuleBase):
    direction: str
    from_: list[Peer] | None = None
    to: list[Peer] | None = None


@_record
class DlpRule:
    name: str
    description: str | None = None
    packs: list[str]
    direction: str | None = None
    from_: list[Peer] | None = None
    to: list[Peer] | None = None
    action: str
    capture: bool = False

    @property
    def directions(self) -> tuple[str, ...]:
        if self.direction:
            return (self.direction,)
        if self.to is not None:
            return ("egress",)
        if self.from_ is not None:
            return ("ingress",)
        return ("ingress", "egress")


@_record
class FirewallPolicySpec:
    selector: Selector = field(default_factory=Selector)
    mode: str = "protect"
    default: str | None = None
    default_ingress: str | None = None
    default_egress: str | None = None
    ingress: list[IngressRule] = field(default_factory=list)
    egress: list[EgressRule] = field(default_factory=list)
    dlp: list[DlpRule] = field(default_factory=list)
    #: protect mode, a governed flow whose inspection failed: refuse (deny) or forward (allow)
    on_inspection_error: str | None = None


@_record
class ClusterFirewallPolicySpec:
    mode: str = "protect"
    rules: list[ClusterRule] = field(default_factory=list)
    dlp: list[DlpRule] = field(default_factory=list)


@_record
class FirewallPolicy:
    """Namespaced: rules for the workloads its selector picks."""

    api_version: str
    kind: str
    metadata: Metadata
    spec: FirewallPolicySpec


@_record
class ClusterFirewallPolicy:
    """Global rules for every workload, evaluated before namespaced ones."""

    api_version: str
    kind: str
    metadata: Metadata
    spec: ClusterFirewallPolicySpec


MODELS: dict[str, type[FirewallPolicy] | type[ClusterFirewallPolicy]] = {
    KIND_POLICY: FirewallPolicy, KIND_CLUSTER: ClusterFirewallPolicy,
}


# --- the validator ---------------------------------------------------------------------------
# Errors are dicts shaped like pydantic's ``ValidationError.errors()`` entries: ``type``,
# ``loc`` (path of keys and list indexes) and ``msg``, plus ``check`` (the ``check_*`` that
# raised a ``value_error``); the loader formats them.

Loc = tuple[str | int, ...]
Errors = list[dict[str, Any]]


class PolicyValidationError(ValueError):
    """A document that does not fit the schema; ``errors()`` lists every problem found."""

    def __init__(self, errors: Errors) -> None:
        self._errors = errors
        super().__init__(f"{len(errors)} validation error(s)")

    def errors(self) -> Errors:
        return list(self._errors)


class _Bad:
    """Sentinel: this value failed (its errors are recorded)."""


_BAD = _Bad()
_REQUIRED: Any = _Bad()
# What Rust's str::trim strips (Unicode White_Space); Python's str.strip() also strips \x1c-\x1f.
_TRIM = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
        "\u2028\u2029\u202f\u205f\u3000"
_DIGITS = re.compile(r"[+-]?[0-9]+")
_TRUE = frozenset({"1", "t", "y", "on", "yes", "true"})
_FALSE = frozenset({"0", "f", "n", "no", "off", "false"})
_I64 = 2.0 ** 63


def _err(errs: Errors, kind: str, loc: Loc, msg: str, check: Callable[..., Any] | None = None) -> _Bad:
    """Record one problem; ``check`` names the ``check_*`` that raised it, so the schema's
    differential test can tell the checks a JSON Schema cannot express from the ones it does."""
    errs.append({"type": kind, "loc": loc, "msg": msg} | ({"check": check.__name__} if check else {}))
    return _BAD


def _loc_item(key: Any) -> str | int:
    """A mapping key as a path element (ints stay ints, as pydantic reports them; a key with a
    lone surrogate is shown the way pydantic shows it: each unencodable code unit as U+FFFD)."""
    if isinstance(key, str):
        if _unpaired(key):
            return key.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return key
    return int(key) if isinstance(key, int) else str(key)


_UNICODE = ("string_unicode", "Input should be a valid string, unable to parse raw data as a unicode string")


def _unpaired(s: str) -> bool:
    """A string YAML made from a lone surrogate escape ("\\ud800"): not UTF-8.  String fields keep
    it, but pydantic refuses it where it needs the text itself (numbers, booleans, literals, keys)."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text(v: bytes | bytearray) -> str | None:
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Str:
    __slots__ = ()

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, bytes | bytearray):
            s = _text(v)
            if s is None:
                return _err(errs, "string_unicode", loc,
                            "Input should be a valid string, unable to parse raw data as a unicode string")
            return s
        return _err(errs, "string_type", loc, "Input should be a valid string")


_TOO_LONG = ("int_parsing_size", "Unable to parse input string as an integer, exceeded maximum size")
_NOT_INT = ("int_parsing", "Input should be a valid integer, unable to parse string as an integer")


def _signed(s: str) -> int | tuple[str, str]:
    """``[+-]digits`` -> int without Python's own 4300-digit guard ever raising (leading zeros
    do not count, as in pydantic-core)."""
    body = s.lstrip("+-").lstrip("0") or "0"
    if len(body) > 4300:
        return _TOO_LONG
    return -int(body) if s.startswith("-") else int(body)


def _str_int(s: str) -> int | tuple[str, str]:
    """'80', ' 80 ', '+80', '8_0', '80.00' -> 80; what else a YAML string may say is an error.

    More than 4300 significant digits are refused as pydantic-core refuses them; for such
    strings (absurd in a port field) the error *type* can differ from pydantic's when a sign
    or underscores come with them - both reject."""
    s = s.strip(_TRIM)
    if _DIGITS.fullmatch(s):
        return _signed(s)
    dot = s.find(".")
    if dot >= 0 and dot + 1 < len(s) and not s[dot + 1:].strip("0"):
        s = s[:dot]
        if _DIGITS.fullmatch(s):
            return _signed(s)
    if "_" in s and "__" not in s and not s.startswith("_") and not s.endswith("_"):
        t = s.replace("_", "")
        if _DIGITS.fullmatch(t):
            n = _signed(t)
            return _NOT_INT if isinstance(n, tuple) else n
    return _NOT_INT


class _Int:
    __slots__ = ("ge", "le")

    def __init__(self, ge: int, le: int) -> None:
        self.ge, self.le = ge, le

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        if isinstance(v, int):
            n: int | tuple[str, str] = int(v)
        elif isinstance(v, float):
            if math.isinf(v) or math.isnan(v):
                return _err(errs, "finite_number", loc, "Input should be a finite number")
            if v % 1:
                return _err(errs, "int_from_float", loc,
                            "Input should be a valid integer, got a number with a fractional part")
            if not -_I64 < v < _I64:
                return _err(errs, "int_parsing_size", loc,
                            "Unable to parse input string as an integer, exceeded maximum size")
            n = int(v)
        elif isinstance(v, str):
            n = _UNICODE if _unpaired(v) else _str_int(v)
        elif isinstance(v, bytes | bytearray):
            s = _text(v)
            n = _str_int(s) if s is not None else (
                "int_parsing", "Input should be a valid integer, unable to parse string as an integer")
        else:
            return _err(errs, "int_type", loc, "Input should be a valid integer")
        if isinstance(n, tuple):
            return _err(errs, n[0], loc, n[1])
        if n < self.ge:
            return _err(errs, "greater_than_equal", loc, f"Input should be greater than or equal to {self.ge}")
        if n > self.le:
            return _err(errs, "less_than_equal", loc, f"Input should be less than or equal to {self.le}")
        return n


class _Bool:
    __slots__ = ()

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        if isinstance(v, bool):
            return v
        if isinstance(v, float) and not (math.isinf(v) or math.isnan(v) or v % 1):
            v = int(v)
        if isinstance(v, int) and -_I64 <= v < _I64:  # int64 only, like pydantic-core
            if v in (0, 1):
                return v == 1
        elif isinstance(v, str | bytes | bytearray):
            s = v if isinstance(v, str) else _text(v)
            if isinstance(v, str) and _unpaired(v):
                return _err(errs, _UNICODE[0], loc, _UNICODE[1])
            if s is not None:
                low = s.lower() if s.isascii() else s
                if low in _TRUE:
                    return True
                if low in _FALSE:
                    return False
        else:
            return _err(errs, "bool_type", loc, "Input should be a valid boolean")
        return _err(errs, "bool_parsing", loc, "Input should be a valid boolean, unable to interpret input")


class _Lit:
    __slots__ = ("values", "ordered", "msg")

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = frozenset(values)
        self.ordered = tuple(values)  # as declared: the schema and the docs list them so
        quoted = [f"'{v}'" for v in values]
        self.msg = "Input should be " + (quoted[0] if len(quoted) == 1 else
                                         ", ".join(quoted[:-1]) + " or " + quoted[-1])

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        if isinstance(v, str) and v in self.values:
            return v
        if isinstance(v, str) and _unpaired(v):
            return _err(errs, _UNICODE[0], loc, _UNICODE[1])
        return _err(errs, "literal_error", loc, self.msg)


class _Opt:
    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        return None if v is None else self.inner.check(v, loc, errs)


class _List:
    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        if not isinstance(v, list | tuple):
            return _err(errs, "list_type", loc, "Input should be a valid list")
        out = [self.item.check(x, (*loc, i), errs) for i, x in enumerate(v)]
        return _BAD if any(x is _BAD for x in out) else out


class _StrMap:
    __slots__ = ()

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        if not isinstance(v, dict):
            return _err(errs, "dict_type", loc, "Input should be a valid dictionary")
        out: dict[str, str] = {}
        bad = False
        for k, x in v.items():
            where = (*loc, _loc_item(k))
            key = _STR.check(k, (*where, "[key]"), errs)
            val = _STR.check(x, where, errs)
            if key is _BAD or val is _BAD:
                bad = True
            else:
                out[key] = val
        return _BAD if bad else out


class _Rec:
    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def check(self, v: Any, loc: Loc, errs: Errors) -> Any:
        return _parse(self.cls, v, loc, errs)


_STR = _Str()


@dataclass(frozen=True, slots=True)
class _Field:
    attr: str
    key: str
    type: Any
    default: Any = _REQUIRED
    factory: Callable[[], Any] | None = None
    before: Callable[[Any], Any] | None = None
    after: Callable[[Any], Any] | None = None
    #: the field's description in the generated JSON Schema (firewall/policy/schema.py)
    doc: str = ""


@dataclass(frozen=True, slots=True)
class _Spec:
    fields: tuple[_Field, ...]
    checks: tuple[Callable[[Any], None], ...]
    keys: frozenset[str]


def _spec(fields: list[_Field], *checks: Callable[[Any], None]) -> _Spec:
    return _Spec(tuple(fields), checks, frozenset(f.key for f in fields))


def _parse(cls: type, value: Any, loc: Loc, errs: Errors) -> Any:
    """One record: every field in table order, then unknown keys, then the record checks
    (only when every field is valid) - the order pydantic reports problems in."""
    if not isinstance(value, dict):
        return _err(errs, "model_type", loc, f"Input should be a valid dictionary or instance of {cls.__name__}")
    if any(isinstance(k, str) and _unpaired(k) for k in value):  # pydantic gives up on the record
        return _err(errs, _UNICODE[0], loc, _UNICODE[1])
    spec = _SPECS[cls]
    before = len(errs)
    kw: dict[str, Any] = {}
    for f in spec.fields:
        if f.key in value:
            where = (*loc, f.key)
            raw = value[f.key]
            if f.before is not None:
                raw = f.before(raw)
            v = f.type.check(raw, where, errs)
            if v is _BAD:
                continue
            if f.after is not None:
                try:
                    v = f.after(v)
                except ValueError as exc:
                    _err(errs, "value_error", where, f"Value error, {exc}", f.after)
                    continue
            kw[f.attr] = v
        elif f.factory is not None:
            kw[f.attr] = f.factory()
        elif f.default is _REQUIRED:
            _err(errs, "missing", (*loc, f.key), "Field required")
        else:
            kw[f.attr] = f.default
    for k in value:
        if not isinstance(k, str):
            _err(errs, "invalid_key", (*loc, _loc_item(k)), "Keys should be strings")
        elif k not in spec.keys:
            _err(errs, "extra_forbidden", (*loc, k), "Extra inputs are not permitted")
    if len(errs) > before:
        return _BAD
    obj = cls(**kw)
    for check in spec.checks:
        try:
            check(obj)
        except ValueError as exc:
            return _err(errs, "value_error", loc, f"Value error, {exc}", check)
    return obj


def validate(cls: type, value: Any) -> Any:
    """``value`` (a parsed YAML document) as a ``cls`` record; raises PolicyValidationError."""
    errs: Errors = []
    obj = _parse(cls, value, (), errs)
    if errs:
        raise PolicyValidationError(errs)
    return obj


def _o(t: Any) -> _Opt:
    return _Opt(t)


_PORT = _Int(1, 65535)
_PEERS = _o(_List(_Rec(Peer)))
_RULE_FIELDS = [
    _Field("name", "name", _STR, after=check_rule_name,
           doc="Unique within the policy; shown as alert.signature and in reports."),
    _Field("description", "description", _o(_STR), None, doc="Business justification (PCI DSS 1.2.5)."),
    _Field("ports", "ports", _o(_List(_Rec(PortSpec))), None, doc="Absent = any port."),
    _Field("app_proto", "appProto", _o(_Lit(APP_PROTOS)), None, before=app_proto_before),
    _Field("http", "http", _o(_List(_Rec(HttpMatch))), None),
    _Field("tls", "tls", _o(_Rec(TlsMatch)), None),
    _Field("dns", "dns", _o(_Rec(DnsMatch)), None),
    _Field("redis", "redis", _o(_Rec(RedisMatch)), None),
    _Field("sql", "sql", _o(_Rec(SqlMatch)), None),
    _Field("action", "action", _Lit(RULE_ACTIONS), doc="alert = allow and emit an alert event."),
    _Field("capture", "capture", _Bool(), False, doc="Start a bounded packet capture when this rule matches."),
    _Field("exception", "exception", _Bool(), False,
           doc="Named exception to the built-in cde-segmentation rule (out-of-scope -> cde); needs a description."),
]
_MODE = _Lit(MODES)
_VERDICT = _o(_Lit(VERDICTS))

# The schema, one table per record, fields in the order they are checked and reported.
_SPECS: dict[type, _Spec] = {
    Metadata: _spec([
        _Field("name", "name", _STR, after=check_dns_name, doc="DNS-1123 name, unique per kind (and namespace)."),
        _Field("namespace", "namespace", _o(_STR), None, after=check_dns_name,
               doc="Required for FirewallPolicy, absent for ClusterFirewallPolicy."),
        _Field("labels", "labels", _StrMap(), factory=dict, after=check_labels),
        _Field("annotations", "annotations", _StrMap(), factory=dict,
               doc="Free-form; palisade.dev/last-reviewed is shown in the PCI report (DSS 1.2.7)."),
    ]),
    Selector: _spec([_Field("match_labels", "matchLabels", _StrMap(), factory=dict, after=check_labels,
                             doc="Workloads whose labels include all of these; {} = every pod of the namespace.")]),
    PortSpec: _spec([
        _Field("port", "port", _o(_PORT), None,
               doc="TCP/UDP/SCTP port; required for TCP, omitted = every port (UDP/SCTP); absent for ICMP "
                   "and numbered protocols."),
        _Field("end_port", "endPort", _o(_PORT), None, doc="Inclusive end of a port range starting at port."),
        _Field("protocol", "protocol", _STR, "TCP", before=protocol_before, after=check_protocol,
               doc="TCP, UDP, SCTP, ICMP, ICMPv6 or an IP protocol number 1-254. TCP goes through the proxy; "
                   "everything else is enforced by nftables rules compiled from the same policy."),
        _Field("icmp_types", "icmpTypes", _o(_List(_STR)), None, before=icmp_types_before,
               after=check_icmp_types,
               doc="ICMP/ICMPv6 only: type names (echo-request, ...) or numbers; omitted = every type. "
                   "Neighbour discovery, packet-too-big and the error types always pass."),
    ], check_port_range),
    Peer: _spec([
        _Field("namespace", "namespace", _o(_STR), None),
        _Field("labels", "labels", _o(_StrMap()), None, after=check_labels),
        _Field("scope", "scope", _o(_Lit(SCOPES)), None,
               doc="PCI scope; the world (unknown IPs) counts as out-of-scope."),
        _Field("cidr", "cidr", _o(_STR), None, after=check_cidr,
               doc="IPv4/IPv6 network, matched against the peer address."),
        _Field("fqdn", "fqdn", _o(_STR), None, after=check_fqdn,
               doc="Egress only: DNS name or *.suffix (one or more labels) learned from this pod's own DNS "
                   "answers."),
    ], check_peer_shape),
    HttpMatch: _spec([
        _Field("methods", "methods", _o(_List(_STR)), None, after=check_methods),
        _Field("path_prefix", "pathPrefix", _o(_STR), None, after=check_path_prefix,
               doc="Segment-aware: /v1/charge matches /v1/charge and /v1/charge/x, not /v1/charges."),
        _Field("host", "host", _o(_STR), None, after=check_host,
               doc="Host header (port ignored); '*.' prefix = any subdomain."),
    ]),
    TlsMatch: _spec([
        _Field("sni", "sni", _o(_List(_STR)), None, after=check_sni,
               doc="Allowed server names; '*.' prefix = any subdomain."),
        _Field("min_version", "minVersion", _o(_Lit(TLS_VERSIONS)), None, before=tls_version_before,
               doc="Checked against the highest version offered in the ClientHello and the negotiated one."),
    ]),
    DnsMatch: _spec([_Field("qname_suffix", "qnameSuffix", _List(_STR), after=check_qname_suffix,
                             doc="Query name equals or ends with one of these domains.")]),
    RedisMatch: _spec([_Field("commands", "commands", _List(_STR), after=check_commands)]),
    SqlMatch: _spec([_Field("verbs", "verbs", _List(_STR), after=check_verbs,
                             doc="Statement verbs, e.g. SELECT, INSERT (pgsql and mysql).")]),
    IngressRule: _spec([*_RULE_FIELDS, _Field("from_", "from", _PEERS, None, doc="Absent = any peer.")],
                       check_rule_consistent, check_ingress_no_fqdn),
    EgressRule: _spec([*_RULE_FIELDS, _Field("to", "to", _PEERS, None, doc="Absent = any peer.")],
                      check_rule_consistent),
    ClusterRule: _spec([*_RULE_FIELDS, _Field("direction", "direction", _Lit(DIRECTIONS)),
                        _Field("from_", "from", _PEERS, None, doc="ingress only; absent = any peer."),
                        _Field("to", "to", _PEERS, None, doc="egress only; absent = any peer.")],
                       check_rule_consistent, check_cluster_direction),
    DlpRule: _spec([
        _Field("name", "name", _STR, after=check_dlp_name),
        _Field("description", "description", _o(_STR), None),
        _Field("packs", "packs", _List(_STR), after=check_packs, doc="DLP rule packs; '*' = every enabled pack."),
        _Field("direction", "direction", _o(_Lit(DIRECTIONS)), None,
               doc="Absent: egress if 'to' is given, ingress if 'from' is given, else both."),
        _Field("from_", "from", _PEERS, None),
        _Field("to", "to", _PEERS, None),
        _Field("action", "action", _Lit(DLP_ACTIONS)),
        _Field("capture", "capture", _Bool(), False),
    ], check_dlp_direction),
    FirewallPolicySpec: _spec([
        _Field("selector", "selector", _Rec(Selector), factory=Selector),
        _Field("mode", "mode", _MODE, "protect"),
        _Field("default", "default", _VERDICT, None, doc="Unmatched traffic; absent = deny."),
        _Field("default_ingress", "defaultIngress", _VERDICT, None, doc="Overrides default for ingress."),
        _Field("default_egress", "defaultEgress", _VERDICT, None, doc="Overrides default for egress."),
        _Field("ingress", "ingress", _List(_Rec(IngressRule)), factory=list),
        _Field("egress", "egress", _List(_Rec(EgressRule)), factory=list),
        _Field("dlp", "dlp", _List(_Rec(DlpRule)), factory=list),
        _Field("on_inspection_error", "onInspectionError", _o(_Lit(("deny", "allow"))), None,
               doc="Protect mode, a flow an L7 or DLP block rule governs whose inspection failed (parser "
                   "anomaly, decoder limit, scanner error...): deny (refuse; the default) or allow (alert "
                   "and forward). Learn/monitor always forward."),
    ], check_spec_names),
    ClusterFirewallPolicySpec: _spec([
        _Field("mode", "mode", _MODE, "protect"),
        _Field("rules", "rules", _List(_Rec(ClusterRule)), factory=list),
        _Field("dlp", "dlp", _List(_Rec(DlpRule)), factory=list),
    ], check_cluster_spec_names),
    FirewallPolicy: _spec([
        _Field("api_version", "apiVersion", _Lit((API_VERSION,))),
        _Field("kind", "kind", _Lit((KIND_POLICY,))),
        _Field("metadata", "metadata", _Rec(Metadata)),
        _Field("spec", "spec", _Rec(FirewallPolicySpec)),
    ], check_policy_namespace),
    ClusterFirewallPolicy: _spec([
        _Field("api_version", "apiVersion", _Lit((API_VERSION,))),
        _Field("kind", "kind", _Lit((KIND_CLUSTER,))),
        _Field("metadata", "metadata", _Rec(Metadata)),
        _Field("spec", "spec", _Rec(ClusterFirewallPolicySpec)),
    ], check_cluster_namespace),
}

