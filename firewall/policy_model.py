"""The policy schema: FirewallPolicy and ClusterFirewallPolicy as pydantic models.

The models are the single source of truth: the loader validates with them, the
shipped JSON Schema (``firewall/schema/policy.schema.json``) is generated from
them (``python -m firewall policy schema``), and the engine compiles them.
Field names are camelCase like Kubernetes resources; every model forbids
unknown fields so a typo (``frm:``) is an error with its path instead of a
rule that silently matches everything.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

API_VERSION = "palisade.dev/v1"
KIND_POLICY = "FirewallPolicy"
KIND_CLUSTER = "ClusterFirewallPolicy"

Mode = Literal["learn", "monitor", "protect"]
MODES: tuple[str, ...] = ("learn", "monitor", "protect")
Scope = Literal["cde", "connected", "out-of-scope"]
Direction = Literal["ingress", "egress"]

# app_proto names as the protocol identifier reports them (Suricata's names).
APP_PROTOS: tuple[str, ...] = (
    "http", "http2", "grpc", "tls", "dns", "redis", "pgsql", "mysql", "ssh", "smtp",
    "ftp", "kafka", "mongodb", "memcached", "amqp", "mqtt", "ldap", "unknown",
)
# Friendly spellings accepted in files and on the CLI, normalised to the names above.
APP_PROTO_ALIASES = {"postgres": "pgsql", "postgresql": "pgsql", "mariadb": "mysql", "h2": "http2",
                     "https": "tls"}
AppProto = Literal[
    "http", "http2", "grpc", "tls", "dns", "redis", "pgsql", "mysql", "ssh", "smtp",
    "ftp", "kafka", "mongodb", "memcached", "amqp", "mqtt", "ldap", "unknown",
]

# Names the engine uses for its built-in decisions; a user rule may not take them.
RESERVED_RULE_NAMES = frozenset({"default-deny", "default-allow", "cde-segmentation", "kubelet-probes",
                                 "quarantine", "learn", "dlp-default-alert"})
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_NAME = re.compile(r"^(\*\.)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TOKEN = re.compile(r"^[A-Z][A-Z0-9_-]*$")


def normalize_app_proto(value: str) -> str:
    v = value.strip().lower()
    return APP_PROTO_ALIASES.get(v, v)


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for k, v in labels.items():
        if not _LABEL_KEY.match(k):
            raise ValueError(f"invalid label key {k!r}")
        if not _LABEL_VALUE.match(v):
            raise ValueError(f"invalid label value {v!r} for {k}")
    return labels


def _upper_tokens(values: list[str], what: str) -> list[str]:
    out = [v.strip().upper() for v in values]
    for v in out:
        if not _TOKEN.match(v):
            raise ValueError(f"invalid {what} {v!r}")
    if not out:
        raise ValueError(f"at least one {what} is required")
    return out


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class Metadata(_Model):
    name: str = Field(description="DNS-1123 name, unique per kind (and namespace).")
    namespace: str | None = Field(None, description="Required for FirewallPolicy, absent for ClusterFirewallPolicy.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Free-form; palisade.dev/last-reviewed is shown in the PCI report (DSS 1.2.7).")

    @field_validator("name", "namespace")
    @classmethod
    def _dns_name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"{v!r} is not a DNS-1123 name (lower case, digits, '-', '.')")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_labels(v)


class Selector(_Model):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels",
                                         description="Workloads whose labels include all of these; {} = every pod of the namespace.")

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_labels(v)


class PortSpec(_Model):
    port: int = Field(ge=1, le=65535)
    end_port: int | None = Field(None, alias="endPort", ge=1, le=65535,
                                 description="Inclusive end of a port range starting at port.")
    protocol: Literal["TCP", "UDP"] = "TCP"

    @model_validator(mode="after")
    def _range(self) -> PortSpec:
        if self.end_port is not None and self.end_port < self.port:
            raise ValueError(f"endPort {self.end_port} is below port {self.port}")
        return self


class Peer(_Model):
    """One peer selector; its fields are ANDed, a rule's peer entries are ORed."""

    namespace: str | None = None
    labels: dict[str, str] | None = None
    scope: Scope | None = Field(None, description="PCI scope; the world (unknown IPs) counts as out-of-scope.")
    cidr: str | None = Field(None, description="IPv4/IPv6 network, matched against the peer address.")
    fqdn: str | None = Field(None, description="Egress only: DNS name or *.suffix (one or more labels) "
                                               "learned from this pod's own DNS answers.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_labels(v) if v is not None else v

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"invalid CIDR {v!r}") from None

    @field_validator("fqdn")
    @classmethod
    def _fqdn(cls, v: str | None) -> str | None:
        if v is None:
            return v
        n = v.strip().lower().rstrip(".")
        if not _DNS_NAME.match(n):
            raise ValueError(f"invalid fqdn {v!r} (a DNS name, optionally starting with '*.')")
        return n

    @model_validator(mode="after")
    def _shape(self) -> Peer:
        fields = [f for f in ("namespace", "labels", "scope", "cidr", "fqdn") if getattr(self, f) is not None]
        if not fields:
            raise ValueError("empty peer matches everything: omit from/to instead")
        if self.fqdn is not None and len(fields) > 1:
            raise ValueError("fqdn cannot be combined with other peer fields")
        return self


class HttpMatch(_Model):
    """One allowed request shape; a rule's http entries are ORed, fields ANDed."""

    methods: list[str] | None = None
    path_prefix: str | None = Field(None, alias="pathPrefix",
                                    description="Segment-aware: /v1/charge matches /v1/charge and /v1/charge/x, not /v1/charges.")
    host: str | None = Field(None, description="Host header (port ignored); '*.' prefix = any subdomain.")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        return _upper_tokens(v, "method") if v is not None else v

    @field_validator("path_prefix")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("pathPrefix must start with '/'")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return v
        n = v.strip().lower().rstrip(".")
        if not _DNS_NAME.match(n):
            try:
                ipaddress.ip_address(n)
            except ValueError:
                raise ValueError(f"invalid host {v!r}") from None
        return n


TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]


class TlsMatch(_Model):
    sni: list[str] | None = Field(None, description="Allowed server names; '*.' prefix = any subdomain.")
    min_version: TlsVersion | None = Field(
        None, alias="minVersion",
        description="Checked against the highest version offered in the ClientHello and the negotiated one.")

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return f"{v:.1f}" if isinstance(v, float) else v  # minVersion: 1.2 unquoted is a float

    @field_validator("sni")
    @classmethod
    def _sni(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = [s.strip().lower().rstrip(".") for s in v]
        for s in out:
            if not _DNS_NAME.match(s):
                raise ValueError(f"invalid sni {s!r}")
        return out


class DnsMatch(_Model):
    qname_suffix: list[str] = Field(alias="qnameSuffix",
                                    description="Query name equals or ends with one of these domains.")

    @field_validator("qname_suffix")
    @classmethod
    def _suffix(cls, v: list[str]) -> list[str]:
        out = [s.strip().lower().strip(".") for s in v]
        for s in out:
            if not _DNS_NAME.match(s) or s.startswith("*"):
                raise ValueError(f"invalid domain {s!r}")
        if not out:
            raise ValueError("at least one suffix is required")
        return out


class RedisMatch(_Model):
    commands: list[str]

    @field_validator("commands")
    @classmethod
    def _cmds(cls, v: list[str]) -> list[str]:
        return _upper_tokens(v, "command")


class SqlMatch(_Model):
    verbs: list[str] = Field(description="Statement verbs, e.g. SELECT, INSERT (pgsql and mysql).")

    @field_validator("verbs")
    @classmethod
    def _verbs(cls, v: list[str]) -> list[str]:
        return _upper_tokens(v, "verb")


# Which app_protos an L7 match section belongs to (the first is implied when appProto is absent).
L7_SECTIONS: dict[str, tuple[str, ...]] = {
    "http": ("http", "http2", "grpc"),
    "tls": ("tls",),
    "dns": ("dns",),
    "redis": ("redis",),
    "sql": ("pgsql", "mysql"),
}


class _RuleBase(_Model):
    name: str = Field(description="Unique within the policy; shown as alert.signature and in reports.")
    description: str | None = Field(None, description="Business justification (PCI DSS 1.2.5).")
    ports: list[PortSpec] | None = Field(None, description="Absent = any port.")
    app_proto: AppProto | None = Field(None, alias="appProto")
    http: list[HttpMatch] | None = None
    tls: TlsMatch | None = None
    dns: DnsMatch | None = None
    redis: RedisMatch | None = None
    sql: SqlMatch | None = None
    action: Literal["allow", "deny", "alert"] = Field(description="alert = allow and emit an alert event.")
    capture: bool = Field(False, description="Start a bounded packet capture when this rule matches.")
    exception: bool = Field(False, description="Named exception to the built-in cde-segmentation rule "
                                               "(out-of-scope -> cde); needs a description.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a valid rule name (lower case, digits, '-', '.')")
        if v in RESERVED_RULE_NAMES:
            raise ValueError(f"{v!r} is reserved for a built-in rule")
        return v

    @field_validator("app_proto", mode="before")
    @classmethod
    def _proto(cls, v: Any) -> Any:
        return normalize_app_proto(v) if isinstance(v, str) else v

    @property
    def l7_section(self) -> str | None:
        for key in L7_SECTIONS:
            if getattr(self, key) is not None:
                return key
        return None

    @model_validator(mode="after")
    def _consistent(self) -> _RuleBase:
        sections = [k for k in L7_SECTIONS if getattr(self, k) is not None]
        if len(sections) > 1:
            raise ValueError(f"one L7 match per rule, got {', '.join(sections)}")
        if sections and self.app_proto is not None and self.app_proto not in L7_SECTIONS[sections[0]]:
            raise ValueError(f"{sections[0]} match needs appProto {'/'.join(L7_SECTIONS[sections[0]])}, "
                             f"not {self.app_proto}")
        if self.exception:
            if self.action == "deny":
                raise ValueError("exception: true only makes sense on allow/alert rules")
            if not (self.description or "").strip():
                raise ValueError("exception rules need a description (the business justification)")
        return self


class IngressRule(_RuleBase):
    from_: list[Peer] | None = Field(None, alias="from", description="Absent = any peer.")

    @model_validator(mode="after")
    def _no_fqdn(self) -> IngressRule:
        if any(p.fqdn for p in self.from_ or []):
            raise ValueError("fqdn peers are egress only")
        return self


class EgressRule(_RuleBase):
    to: list[Peer] | None = Field(None, description="Absent = any peer.")


class ClusterRule(_RuleBase):
    direction: Direction
    from_: list[Peer] | None = Field(None, alias="from", description="ingress only; absent = any peer.")
    to: list[Peer] | None = Field(None, description="egress only; absent = any peer.")

    @model_validator(mode="after")
    def _dir(self) -> ClusterRule:
        if self.direction == "ingress" and self.to is not None:
            raise ValueError("an ingress rule selects peers with 'from', not 'to'")
        if self.direction == "egress" and self.from_ is not None:
            raise ValueError("an egress rule selects peers with 'to', not 'from'")
        if any(p.fqdn for p in self.from_ or []):
            raise ValueError("fqdn peers are egress only")
        return self


class DlpRule(_Model):
    name: str
    description: str | None = None
    packs: list[str] = Field(description="DLP rule packs; '*' = every enabled pack.")
    direction: Direction | None = Field(None, description="Absent: egress if 'to' is given, ingress if "
                                                          "'from' is given, else both.")
    from_: list[Peer] | None = Field(None, alias="from")
    to: list[Peer] | None = None
    action: Literal["block", "alert"]
    capture: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a valid rule name (lower case, digits, '-', '.')")
        return v

    @field_validator("packs")
    @classmethod
    def _packs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one pack ('*' for all)")
        return v

    @model_validator(mode="after")
    def _dir(self) -> DlpRule:
        if self.from_ is not None and self.to is not None:
            raise ValueError("use 'to' (egress) or 'from' (ingress), not both")
        if self.direction == "ingress" and self.to is not None:
            raise ValueError("an ingress dlp rule selects peers with 'from'")
        if self.direction == "egress" and self.from_ is not None:
            raise ValueError("an egress dlp rule selects peers with 'to'")
        for p in (self.from_ or []):
            if p.fqdn is not None:
                raise ValueError("fqdn peers are egress only")
        return self

    @property
    def directions(self) -> tuple[str, ...]:
        if self.direction:
            return (self.direction,)
        if self.to is not None:
            return ("egress",)
        if self.from_ is not None:
            return ("ingress",)
        return ("ingress", "egress")


Verdict = Literal["deny", "allow"]


class FirewallPolicySpec(_Model):
    selector: Selector = Field(default_factory=Selector)
    mode: Mode = "protect"
    default: Verdict | None = Field(None, description="Unmatched traffic; absent = deny.")
    default_ingress: Verdict | None = Field(None, alias="defaultIngress", description="Overrides default for ingress.")
    default_egress: Verdict | None = Field(None, alias="defaultEgress", description="Overrides default for egress.")
    ingress: list[IngressRule] = Field(default_factory=list)
    egress: list[EgressRule] = Field(default_factory=list)
    dlp: list[DlpRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _checks(self) -> FirewallPolicySpec:
        names: set[str] = set()
        for rule in [*self.ingress, *self.egress, *self.dlp]:
            if rule.name in names:
                raise ValueError(f"duplicate rule name {rule.name!r}")
            names.add(rule.name)
        return self


class ClusterFirewallPolicySpec(_Model):
    mode: Mode = "protect"
    rules: list[ClusterRule] = Field(default_factory=list)
    dlp: list[DlpRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _checks(self) -> ClusterFirewallPolicySpec:
        names: set[str] = set()
        for rule in [*self.rules, *self.dlp]:
            if rule.name in names:
                raise ValueError(f"duplicate rule name {rule.name!r}")
            names.add(rule.name)
        return self


class FirewallPolicy(_Model):
    """Namespaced: rules for the workloads its selector picks."""

    api_version: Literal["palisade.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["FirewallPolicy"]
    metadata: Metadata
    spec: FirewallPolicySpec

    @model_validator(mode="after")
    def _ns(self) -> FirewallPolicy:
        if not self.metadata.namespace:
            raise ValueError("metadata.namespace is required for a FirewallPolicy")
        return self


class ClusterFirewallPolicy(_Model):
    """Global rules for every workload, evaluated before namespaced ones."""

    api_version: Literal["palisade.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["ClusterFirewallPolicy"]
    metadata: Metadata
    spec: ClusterFirewallPolicySpec

    @model_validator(mode="after")
    def _ns(self) -> ClusterFirewallPolicy:
        if self.metadata.namespace:
            raise ValueError("a ClusterFirewallPolicy is not namespaced: remove metadata.namespace")
        return self


PolicyDocument = Annotated[FirewallPolicy | ClusterFirewallPolicy, Field(discriminator="kind")]
MODELS: dict[str, type[FirewallPolicy] | type[ClusterFirewallPolicy]] = {
    KIND_POLICY: FirewallPolicy, KIND_CLUSTER: ClusterFirewallPolicy,
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one policy document (what ``policy schema`` prints)."""
    schema = TypeAdapter(PolicyDocument).json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://palisade.dev/schemas/v1/policy.schema.json"
    schema["title"] = "Palisade FirewallPolicy / ClusterFirewallPolicy (palisade.dev/v1)"
    return schema
