"""The policy schema as pydantic models: the shipped JSON Schema, and a reference validator.

Offline only - the sidecar never imports this module (pydantic and the validators it
builds cost ~10 MiB per process; issue 9).  ``python -m firewall policy schema``
generates ``firewall/schema/policy.schema.json`` from these models (a test keeps the
shipped file in sync), and ``tests/policy/test_model_crosscheck.py`` validates every
policy in the repository plus generated documents with both these models and the
run-time validator in ``firewall/policy/model.py``, requiring the same records or the
same errors.  The checks themselves (``check_*``) live in ``policy_model`` and are
called from here, so every message is written once; what this module adds is the
schema text (descriptions) and pydantic's own type coercion as the reference.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from firewall.policy.model import (
    KIND_CLUSTER,
    KIND_POLICY,
    L7_SECTIONS,
    app_proto_before,
    check_cidr,
    check_cluster_direction,
    check_cluster_namespace,
    check_cluster_spec_names,
    check_commands,
    check_dlp_direction,
    check_dlp_name,
    check_dns_name,
    check_fqdn,
    check_host,
    check_icmp_types,
    check_ingress_no_fqdn,
    check_labels,
    check_methods,
    check_packs,
    check_path_prefix,
    check_peer_shape,
    check_policy_namespace,
    check_port_range,
    check_protocol,
    check_qname_suffix,
    check_rule_consistent,
    check_rule_name,
    check_sni,
    check_spec_names,
    check_verbs,
    icmp_types_before,
    protocol_before,
    tls_version_before,
)

Mode = Literal["learn", "monitor", "protect"]
Scope = Literal["cde", "connected", "out-of-scope"]
Direction = Literal["ingress", "egress"]
AppProto = Literal[
    "http", "http2", "grpc", "tls", "dns", "redis", "pgsql", "mysql", "ssh", "smtp",
    "ftp", "kafka", "mongodb", "memcached", "amqp", "mqtt", "ldap", "unknown",
]


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
        return check_dns_name(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)  # type: ignore[return-value]


class Selector(_Model):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels",
                                         description="Workloads whose labels include all of these; {} = every pod of the namespace.")

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)  # type: ignore[return-value]


class PortSpec(_Model):
    port: int | None = Field(None, ge=1, le=65535,
                             description="TCP/UDP/SCTP port; required for TCP, omitted = every port "
                                         "(UDP/SCTP); absent for ICMP and numbered protocols.")
    end_port: int | None = Field(None, alias="endPort", ge=1, le=65535,
                                 description="Inclusive end of a port range starting at port.")
    protocol: str = Field("TCP", description="TCP, UDP, SCTP, ICMP, ICMPv6 or an IP protocol number 1-254. "
                                             "TCP goes through the proxy; everything else is enforced by "
                                             "nftables rules compiled from the same policy.",
                          json_schema_extra={"type": ["string", "integer"]})
    icmp_types: list[str] | None = Field(
        None, alias="icmpTypes", description="ICMP/ICMPv6 only: type names (echo-request, ...) or numbers; "
        "omitted = every type. Neighbour discovery, packet-too-big and the error types always pass.",
        json_schema_extra={"items": {"type": ["string", "integer"]}})

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_before(cls, v: Any) -> Any:
        return protocol_before(v)

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        return check_protocol(v)

    @field_validator("icmp_types", mode="before")
    @classmethod
    def _icmp_before(cls, v: Any) -> Any:
        return icmp_types_before(v)

    @field_validator("icmp_types")
    @classmethod
    def _icmp(cls, v: list[str] | None) -> list[str] | None:
        return check_icmp_types(v)

    @model_validator(mode="after")
    def _range(self) -> PortSpec:
        check_port_range(self)
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
        return check_labels(v)

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        return check_cidr(v)

    @field_validator("fqdn")
    @classmethod
    def _fqdn(cls, v: str | None) -> str | None:
        return check_fqdn(v)

    @model_validator(mode="after")
    def _shape(self) -> Peer:
        check_peer_shape(self)
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
        return check_methods(v)

    @field_validator("path_prefix")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return check_path_prefix(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return check_host(v)


TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]


class TlsMatch(_Model):
    sni: list[str] | None = Field(None, description="Allowed server names; '*.' prefix = any subdomain.")
    min_version: TlsVersion | None = Field(
        None, alias="minVersion",
        description="Checked against the highest version offered in the ClientHello and the negotiated one.")

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return tls_version_before(v)

    @field_validator("sni")
    @classmethod
    def _sni(cls, v: list[str] | None) -> list[str] | None:
        return check_sni(v)


class DnsMatch(_Model):
    qname_suffix: list[str] = Field(alias="qnameSuffix",
                                    description="Query name equals or ends with one of these domains.")

    @field_validator("qname_suffix")
    @classmethod
    def _suffix(cls, v: list[str]) -> list[str]:
        return check_qname_suffix(v)


class RedisMatch(_Model):
    commands: list[str]

    @field_validator("commands")
    @classmethod
    def _cmds(cls, v: list[str]) -> list[str]:
        return check_commands(v)


class SqlMatch(_Model):
    verbs: list[str] = Field(description="Statement verbs, e.g. SELECT, INSERT (pgsql and mysql).")

    @field_validator("verbs")
    @classmethod
    def _verbs(cls, v: list[str]) -> list[str]:
        return check_verbs(v)


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
        return check_rule_name(v)

    @field_validator("app_proto", mode="before")
    @classmethod
    def _proto(cls, v: Any) -> Any:
        return app_proto_before(v)

    @property
    def l7_section(self) -> str | None:
        for key in L7_SECTIONS:
            if getattr(self, key) is not None:
                return key
        return None

    @model_validator(mode="after")
    def _consistent(self) -> _RuleBase:
        check_rule_consistent(self)
        return self


class IngressRule(_RuleBase):
    from_: list[Peer] | None = Field(None, alias="from", description="Absent = any peer.")

    @model_validator(mode="after")
    def _no_fqdn(self) -> IngressRule:
        check_ingress_no_fqdn(self)
        return self


class EgressRule(_RuleBase):
    to: list[Peer] | None = Field(None, description="Absent = any peer.")


class ClusterRule(_RuleBase):
    direction: Direction
    from_: list[Peer] | None = Field(None, alias="from", description="ingress only; absent = any peer.")
    to: list[Peer] | None = Field(None, description="egress only; absent = any peer.")

    @model_validator(mode="after")
    def _dir(self) -> ClusterRule:
        check_cluster_direction(self)
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
        return check_dlp_name(v)

    @field_validator("packs")
    @classmethod
    def _packs(cls, v: list[str]) -> list[str]:
        return check_packs(v)

    @model_validator(mode="after")
    def _dir(self) -> DlpRule:
        check_dlp_direction(self)
        return self


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
    on_inspection_error: Literal["deny", "allow"] | None = Field(
        None, alias="onInspectionError",
        description="Protect mode, a flow an L7 or DLP block rule governs whose inspection failed "
                    "(parser anomaly, decoder limit, scanner error...): deny (refuse; the default) or "
                    "allow (alert and forward). Learn/monitor always forward.")

    @model_validator(mode="after")
    def _checks(self) -> FirewallPolicySpec:
        check_spec_names(self)
        return self


class ClusterFirewallPolicySpec(_Model):
    mode: Mode = "protect"
    rules: list[ClusterRule] = Field(default_factory=list)
    dlp: list[DlpRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _checks(self) -> ClusterFirewallPolicySpec:
        check_cluster_spec_names(self)
        return self


class FirewallPolicy(_Model):
    """Namespaced: rules for the workloads its selector picks."""

    api_version: Literal["palisade.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["FirewallPolicy"]
    metadata: Metadata
    spec: FirewallPolicySpec

    @model_validator(mode="after")
    def _ns(self) -> FirewallPolicy:
        check_policy_namespace(self)
        return self


class ClusterFirewallPolicy(_Model):
    """Global rules for every workload, evaluated before namespaced ones."""

    api_version: Literal["palisade.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["ClusterFirewallPolicy"]
    metadata: Metadata
    spec: ClusterFirewallPolicySpec

    @model_validator(mode="after")
    def _ns(self) -> ClusterFirewallPolicy:
        check_cluster_namespace(self)
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
