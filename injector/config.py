"""Injector configuration: one YAML file, camelCase keys like the Kubernetes objects it shapes.

The same file is mounted into the webhook Deployment (``--config``) and read by
``python -m injector mutate --config`` offline, so a golden test and the cluster
render pods from identical settings. Unknown keys are errors that name their
path: a typo such as ``nativeSideCar`` must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_IMAGE = "palisade:0.1.0"
FAILURE_POLICIES = ("Fail", "Ignore")
DANGEROUS_ACTIONS = ("warn", "refuse")
# Networks no exclusion may ever name, whatever the allow-list says: "everything" in each family,
# the IPv4-mapped range (an IPv6 socket reaching every IPv4 address) and the NAT64 well-known
# prefix (every IPv4 address, through a NAT64 gateway).
NEVER_EXCLUDED = tuple(ipaddress.ip_network(n) for n in ("0.0.0.0/0", "::/0", "::ffff:0:0/96", "64:ff9b::/96"))
# Shorter prefixes than these are "most of the internet" and are refused in an allow-list too.
MIN_PREFIX = {4: 8, 6: 16}
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

# Kubernetes resource.Quantity grammar (decimal SI, binary SI, or exponent suffix).
_QUANTITY = re.compile(
    r"^[+]?(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?$"
)


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


def check_quantity(value: Any, where: str) -> str:
    """Return ``value`` as a string if it is a Kubernetes quantity, else raise ``ConfigError``."""
    text = str(value).strip() if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    if not text or not _QUANTITY.match(text):
        raise ConfigError(f"{where}: {value!r} is not a Kubernetes quantity (e.g. 100m, 128Mi, 1)")
    return text


@dataclass(frozen=True, slots=True)
class Resources:
    """requests/limits for one container; ``None`` leaves the field unset."""

    cpu_request: str | None = None
    memory_request: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None

    def to_k8s(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        req = {k: v for k, v in (("cpu", self.cpu_request), ("memory", self.memory_request)) if v}
        lim = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v}
        if lim:
            out["limits"] = lim
        if req:
            out["requests"] = req
        return out

    @staticmethod
    def from_k8s(data: Any, where: str) -> Resources:
        data = _mapping(data, where)
        _only(data, {"requests", "limits"}, where)
        req = _mapping(data.get("requests", {}), f"{where}.requests")
        lim = _mapping(data.get("limits", {}), f"{where}.limits")
        _only(req, {"cpu", "memory"}, f"{where}.requests")
        _only(lim, {"cpu", "memory"}, f"{where}.limits")

        def q(m: dict, k: str, w: str) -> str | None:
            return check_quantity(m[k], f"{w}.{k}") if k in m and m[k] is not None else None

        return Resources(
            cpu_request=q(req, "cpu", f"{where}.requests"),
            memory_request=q(req, "memory", f"{where}.requests"),
            cpu_limit=q(lim, "cpu", f"{where}.limits"),
            memory_limit=q(lim, "memory", f"{where}.limits"),
        )


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _port_range(value: Any, where: str) -> tuple[int, int]:
    """``5432`` or ``"6000-6010"`` -> an inclusive (low, high) pair."""
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    low, _, high = text.partition("-")
    high = high or low
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
        raise ConfigError(f"{where}: {value!r} is not a port or port range (e.g. 5432 or 6000-6010)")
    return int(low), int(high)


def check_excludable(net: Network, cluster: tuple[Network, ...]) -> str | None:
    """Why ``net`` may never be excluded from the proxy (None when it may).

    Excluding a network sends that traffic around the firewall entirely. "Everything" (``/0``
    in either family, the IPv4-mapped IPv6 range) and any prefix that covers the cluster's own
    pod or service ranges would turn the firewall off for east-west traffic, so no allow-list
    may grant them."""
    for never in NEVER_EXCLUDED:
        if net.version == never.version and net.supernet_of(never):
            return f"{net} covers {never} (all traffic)"
    if net.prefixlen < MIN_PREFIX[net.version]:
        return f"{net} is shorter than /{MIN_PREFIX[net.version]} (most of the address space)"
    for c in cluster:
        if net.version == c.version and net.supernet_of(c):
            return f"{net} covers the cluster range {c}"
    return None


@dataclass(frozen=True, slots=True)
class ExclusionGrant:
    """One entry of ``cdeExclusions``: what CDE pods in these namespaces may exclude from the proxy.

    Owned by the platform team (it lives in the injector's ConfigMap, not on the pod); the pod's
    labels can only narrow an entry (``podLabels``), never widen it, because the pod writes them."""

    namespaces: tuple[str, ...]
    pod_labels: tuple[tuple[str, str], ...] = ()
    outbound_cidrs: tuple[Network, ...] = ()
    outbound_ports: tuple[tuple[int, int], ...] = ()
    inbound_ports: tuple[tuple[int, int], ...] = ()

    _KEYS = ("namespaces", "podLabels", "outboundCidrs", "outboundPorts", "inboundPorts")

    def applies(self, namespace: str, labels: dict[str, str]) -> bool:
        return namespace in self.namespaces and all(labels.get(k) == v for k, v in self.pod_labels)

    @staticmethod
    def from_dict(data: Any, where: str, cluster: tuple[Network, ...]) -> ExclusionGrant:
        data = _mapping(data, where)
        _only(data, set(ExclusionGrant._KEYS), where)
        ns = data.get("namespaces")
        if not isinstance(ns, list) or not ns:
            raise ConfigError(f"{where}.namespaces: expected a non-empty list of namespace names")
        labels = _mapping(data.get("podLabels") or {}, f"{where}.podLabels")
        cidrs: list[Network] = []
        for i, item in enumerate(_list(data.get("outboundCidrs"), f"{where}.outboundCidrs")):
            path = f"{where}.outboundCidrs[{i}]"
            try:
                net = ipaddress.ip_network(str(item), strict=True)
            except ValueError as exc:
                raise ConfigError(f"{path}: {item!r} is not an IP network: {exc}") from None
            why = check_excludable(net, cluster)
            if why:
                raise ConfigError(f"{path}: may not be excluded: {why}")
            cidrs.append(net)

        def ranges(key: str) -> tuple[tuple[int, int], ...]:
            return tuple(_port_range(v, f"{where}.{key}[{i}]")
                         for i, v in enumerate(_list(data.get(key), f"{where}.{key}")))

        return ExclusionGrant(
            namespaces=tuple(_string(v, f"{where}.namespaces[{i}]") for i, v in enumerate(ns)),
            pod_labels=tuple(sorted((_string(k, f"{where}.podLabels"), _string(v, f"{where}.podLabels.{k}"))
                                    for k, v in labels.items())),
            outbound_cidrs=tuple(cidrs),
            outbound_ports=ranges("outboundPorts"),
            inbound_ports=ranges("inboundPorts"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"namespaces": list(self.namespaces)}
        if self.pod_labels:
            out["podLabels"] = dict(self.pod_labels)
        if self.outbound_cidrs:
            out["outboundCidrs"] = [str(n) for n in self.outbound_cidrs]
        for key, value in (("outboundPorts", self.outbound_ports), ("inboundPorts", self.inbound_ports)):
            if value:
                out[key] = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in value]
        return out


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """Everything the injector renders from. Defaults are the documented production defaults."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    # Native sidecars (init container with restartPolicy: Always) need Kubernetes >= 1.29.
    native_sidecar: bool = True
    # Inject even when another mesh's proxy is present (two transparent proxies rarely mix).
    inject_alongside_other_meshes: bool = False
    # kube-system is always skipped; these are skipped in addition.
    ignored_namespaces: tuple[str, ...] = ("kube-public", "kube-node-lease")
    sidecar_resources: Resources = field(
        default_factory=lambda: Resources("100m", "128Mi", None, "512Mi"))
    init_resources: Resources = field(
        default_factory=lambda: Resources("10m", "32Mi", "100m", "64Mi"))
    pcap_size_limit: str = "256Mi"
    policy_config_map: str = "palisade-policy"
    dlp_config_map: str = "palisade-dlp-rules"
    # Seconds the sidecar may take to become ready before the kubelet restarts it.
    startup_timeout_seconds: int = 60
    # Sidecar images accepted in an already injected pod besides ``image`` (a rollout of a new
    # version keeps the previous one here until every pod is recreated). Exact strings.
    allowed_images: tuple[str, ...] = ()
    # The cluster's pod and service ranges: no exclusion may cover them.
    cluster_cidrs: tuple[Network, ...] = ()
    # The only exclusions CDE pods may carry (admin-owned allow-list).
    cde_exclusions: tuple[ExclusionGrant, ...] = ()
    # Containers that could dismantle the firewall, outside the CDE: warn (default) or refuse.
    # In the CDE they are always refused.
    dangerous_outside_cde: str = "warn"

    _KEYS = {
        "image": "image",
        "imagePullPolicy": "image_pull_policy",
        "nativeSidecar": "native_sidecar",
        "injectAlongsideOtherMeshes": "inject_alongside_other_meshes",
        "ignoredNamespaces": "ignored_namespaces",
        "sidecarResources": "sidecar_resources",
        "initResources": "init_resources",
        "pcapSizeLimit": "pcap_size_limit",
        "policyConfigMap": "policy_config_map",
        "dlpConfigMap": "dlp_config_map",
        "startupTimeoutSeconds": "startup_timeout_seconds",
        "allowedImages": "allowed_images",
        "clusterCidrs": "cluster_cidrs",
        "cdeExclusions": "cde_exclusions",
        "dangerousOutsideCde": "dangerous_outside_cde",
    }

    @property
    def images(self) -> tuple[str, ...]:
        """Every sidecar image a protected pod may run."""
        return (self.image, *(i for i in self.allowed_images if i != self.image))

    @staticmethod
    def from_dict(data: Any, where: str = "config") -> InjectorConfig:
        data = _mapping(data if data is not None else {}, where)
        _only(data, set(InjectorConfig._KEYS), where)
        kw: dict[str, Any] = {}
        cluster: tuple[Network, ...] = ()
        if "clusterCidrs" in data:
            path = f"{where}.clusterCidrs"
            nets = []
            for i, item in enumerate(_list(data["clusterCidrs"], path)):
                try:
                    nets.append(ipaddress.ip_network(str(item), strict=True))
                except ValueError as exc:
                    raise ConfigError(f"{path}[{i}]: {item!r} is not an IP network: {exc}") from None
            cluster = tuple(nets)
        for key, value in data.items():
            attr = InjectorConfig._KEYS[key]
            path = f"{where}.{key}"
            if attr in ("image", "policy_config_map", "dlp_config_map"):
                kw[attr] = _string(value, path)
            elif attr == "image_pull_policy":
                kw[attr] = _choice(value, PULL_POLICIES, path)
            elif attr in ("native_sidecar", "inject_alongside_other_meshes"):
                if not isinstance(value, bool):
                    raise ConfigError(f"{path}: expected true or false, got {value!r}")
                kw[attr] = value
            elif attr == "ignored_namespaces":
                if not isinstance(value, list):
                    raise ConfigError(f"{path}: expected a list of namespace names")
                kw[attr] = tuple(_string(v, f"{path}[{i}]") for i, v in enumerate(value))
            elif attr in ("sidecar_resources", "init_resources"):
                kw[attr] = Resources.from_k8s(value, path)
            elif attr == "pcap_size_limit":
                kw[attr] = check_quantity(value, path)
            elif attr == "allowed_images":
                kw[attr] = tuple(_string(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))
            elif attr == "cluster_cidrs":
                kw[attr] = cluster
            elif attr == "cde_exclusions":
                kw[attr] = tuple(ExclusionGrant.from_dict(v, f"{path}[{i}]", cluster)
                                 for i, v in enumerate(_list(value, path)))
            elif attr == "dangerous_outside_cde":
                kw[attr] = _choice(value, DANGEROUS_ACTIONS, path)
            elif attr == "startup_timeout_seconds":
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3600:
                    raise ConfigError(f"{path}: expected an integer between 1 and 3600, got {value!r}")
                kw[attr] = value
        return replace(InjectorConfig(), **kw)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (for the config ConfigMap the manifests ship)."""
        out: dict[str, Any] = {}
        for key, attr in self._KEYS.items():
            value = getattr(self, attr)
            if isinstance(value, Resources):
                value = value.to_k8s()
            elif attr == "cde_exclusions":
                value = [g.to_dict() for g in value]
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[key] = value
        return out

    @staticmethod
    def load(path: str | Path | None) -> InjectorConfig:
        """Read a config file; ``None`` means all defaults."""
        if path is None:
            return InjectorConfig()
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
        return InjectorConfig.from_dict(data, where=str(path))


# dataclasses with slots=True turn class attributes into descriptors only for fields; _KEYS is a
# plain class constant, which is what we want. Guard against drift between _KEYS and the fields.
assert set(InjectorConfig._KEYS.values()) == {f.name for f in fields(InjectorConfig)}


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _only(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return value
