"""Injector configuration: one YAML file, camelCase keys like the Kubernetes objects it shapes.

The same file is mounted into the webhook Deployment (``--config``) and read by
``python -m injector mutate --config`` offline, so a golden test and the cluster
render pods from identical settings. Unknown keys are errors that name their
path: a typo such as ``nativeSideCar`` must not silently fall back to a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_IMAGE = "palisade:0.1.0"
FAILURE_POLICIES = ("Fail", "Ignore")
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
    }

    @staticmethod
    def from_dict(data: Any, where: str = "config") -> InjectorConfig:
        data = _mapping(data if data is not None else {}, where)
        _only(data, set(InjectorConfig._KEYS), where)
        kw: dict[str, Any] = {}
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
            elif isinstance(value, tuple):
                value = list(value)
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
