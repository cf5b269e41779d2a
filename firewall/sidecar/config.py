"""Sidecar configuration: a YAML file (``--config``) with CLI flags overriding it.

Unknown keys and bad values are rejected at start with the key's path
(``config.yaml: proxy.idle_timeout: expected a number > 0, got 'x'``), because a
sidecar that silently ignores a typo in ``mode`` is a firewall that is not there.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from firewall import ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_UID

MODES = ("learn", "monitor", "protect")


class ConfigError(ValueError):
    """One line: where and what."""


@dataclass
class Config:
    # listeners
    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    dns_port: int = 15053
    admin_port: int = ADMIN_PORT
    admin_address: str = "0.0.0.0"
    # admin port bounds (it is outside the policy, so these are what protects the event loop)
    admin_allow: list[str] = field(default_factory=list)  # CIDRs or "node"; empty: any source
    admin_max_connections: int = 64
    admin_max_per_source: int = 8
    admin_request_timeout: float = 5.0
    admin_max_request_line: int = 2048
    admin_max_headers: int = 32
    admin_max_request_bytes: int = 8192
    inbound: bool = True
    outbound: bool = True
    dns: bool = True
    ipv6: bool = True
    # process
    uid: int = PROXY_UID
    gid: int = PROXY_GID
    drop_privileges: bool = True
    workers: int = 1
    # relay
    idle_timeout: float = 3600.0
    connect_timeout: float = 10.0
    drain_timeout: float = 20.0
    header_timeout: float = 30.0
    identify_timeout: float = 0.2
    read_buffer_limit: int = 1 << 20
    splice: bool = True
    # who moves spliced flows' bytes: "native" (the C relay thread), "python" (the asyncio splice
    # pump) or "auto" (native when its extension imports)
    relay: str = "auto"
    # flow records are written in batches, at most this many seconds after a flow ends (a worker
    # killed outright loses the records of the flows that ended in its last interval; SIGTERM
    # loses none); and L4-only flows skip asyncio transports (accept -> connect -> splice)
    flow_record_interval: float = 0.05
    l4_fast_path: bool = True
    dlp_offload_bytes: int = 65536  # chunks this large are scanned on a worker thread (0: never)
    max_connections: int = 100_000
    max_connections_per_peer: int = 10_000
    # source ports for upstream connections that keep the client's address (inbound TPROXY):
    # outside Linux's default ephemeral range (32768-60999) that clients pick theirs from, so an
    # upstream 4-tuple cannot equal a client connection's (same address, port and destination)
    upstream_ports: list[int] = field(default_factory=lambda: [10000, 32767])
    # policy and identity
    policy: list[str] = field(default_factory=list)
    identity: str | None = None
    kubernetes_identity: bool = False
    podinfo: str | None = None
    mode: str | None = None
    pod_namespace: str | None = None
    pod_name: str | None = None
    pod_ip: str | None = None
    host_ip: str | None = None
    probe_ports: list[int] = field(default_factory=list)
    reload_interval: float = 2.0
    # FQDN cache (fqdn egress peers): TTL clamp and bounds (firewall/identity/fqdn.py)
    fqdn_min_ttl: int = 60
    fqdn_max_ttl: int = 3600
    fqdn_max_entries: int = 65536
    fqdn_max_per_name: int = 64
    fqdn_resolvers: list[str] = field(default_factory=list)  # empty: any port-53 server policy allows
    # inspection
    l7: bool = True
    l7_events: bool = False
    dlp: bool = True
    dlp_rules: list[str] = field(default_factory=list)
    dlp_enable: list[str] | None = None
    dlp_cache: str | None = None
    # outputs
    events: str | None = None
    alert_webhook: str | None = None
    webhook_flows: bool = False
    pcap_dir: str | None = None
    pcap_max_concurrent: int = 2
    pcap_disk_budget: int = 500 << 20
    # alert webhook queue: bounded by count and by the bytes of the queued events
    webhook_queue_size: int = 10000
    webhook_queue_bytes: int = 16 << 20

    def validate(self, where: str = "config") -> None:
        for name in ("inbound_port", "outbound_port", "dns_port", "admin_port"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
                raise ConfigError(f"{where}: {name}: expected a port 0-65535, got {v!r}")
        for name in ("idle_timeout", "connect_timeout", "drain_timeout", "header_timeout",
                     "identify_timeout", "reload_interval", "admin_request_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ConfigError(f"{where}: {name}: expected a number > 0, got {v!r}")
        v = self.flow_record_interval
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 60:
            raise ConfigError(f"{where}: flow_record_interval: expected seconds 0-60, got {v!r}")
        if self.dlp_offload_bytes < 0:
            raise ConfigError(f"{where}: dlp_offload_bytes: expected an integer >= 0")
        for name in ("workers", "read_buffer_limit", "max_connections", "max_connections_per_peer",
                     "pcap_max_concurrent", "pcap_disk_budget", "admin_max_connections",
                     "admin_max_per_source", "admin_max_request_line", "admin_max_headers",
                     "admin_max_request_bytes", "webhook_queue_size", "webhook_queue_bytes",
                     "fqdn_min_ttl", "fqdn_max_ttl", "fqdn_max_entries", "fqdn_max_per_name"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{where}: {name}: expected an integer >= 1, got {v!r}")
        if self.workers > 64:
            raise ConfigError(f"{where}: workers: at most 64, got {self.workers}")
        if self.relay not in ("auto", "native", "python"):
            raise ConfigError(f"{where}: relay: expected one of auto, native, python, got {self.relay!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"{where}: mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        up = self.upstream_ports
        if (len(up) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in up)
                or not 1024 <= up[0] <= up[1] <= 65535 or up[1] - up[0] < 1023):
            raise ConfigError(f"{where}: upstream_ports: expected [low, high] within 1024-65535 "
                              f"spanning at least 1024 ports, got {up!r}")
        for item in self.admin_allow:
            if item == "node":
                continue
            try:
                ipaddress.ip_network(str(item), strict=False)
            except ValueError:
                raise ConfigError(f"{where}: admin_allow: expected CIDRs or 'node', got {item!r}") from None
        for r in self.fqdn_resolvers:
            try:
                ipaddress.ip_network(str(r), strict=False)
            except ValueError:
                raise ConfigError(f"{where}: fqdn_resolvers: not an address or CIDR: {r!r}") from None
        for p in self.probe_ports:
            if not isinstance(p, int) or not 1 <= p <= 65535:
                raise ConfigError(f"{where}: probe_ports: bad port {p!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any, where: str) -> Any:
    f = _FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    t = str(f.type)
    if value is None:
        return None if "None" in t else default
    if t.startswith("list"):
        if isinstance(value, str | int):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {name}: expected a list, got {type(value).__name__}")
        return value
    if t == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name}: expected true or false, got {value!r}")
        return value
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name}: expected an integer, got {value!r}")
        return value
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {name}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name}: expected a string, got {value!r}")
    return value


def load_config(path: str | None) -> Config:
    cfg = Config()
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for key, value in data.items():
            k = str(key).replace("-", "_")
            if k not in _FIELDS:
                raise ConfigError(f"{path}: {key}: unknown key")
            setattr(cfg, k, _coerce(k, value, path))
        cfg.validate(path)
    return cfg


def from_environment(cfg: Config) -> None:
    """Values the injector passes through the downward API (env), used when not set."""
    env = os.environ
    cfg.pod_namespace = cfg.pod_namespace or env.get("POD_NAMESPACE")
    cfg.pod_name = cfg.pod_name or env.get("POD_NAME")
    cfg.pod_ip = cfg.pod_ip or env.get("POD_IP")
    cfg.host_ip = cfg.host_ip or env.get("HOST_IP")
    if not cfg.probe_ports and env.get("PALISADE_PROBE_PORTS"):
        try:
            cfg.probe_ports = [int(p) for p in env["PALISADE_PROBE_PORTS"].split(",") if p.strip()]
        except ValueError:
            raise ConfigError("env PALISADE_PROBE_PORTS: expected a comma list of ports") from None
