"""Which ports the kubelet probes, so the sidecar can let the node reach exactly those.

Kubelet probes come from the node's IP, which no workload policy names. Rather
than exclude probe ports from redirection (the port would then bypass inspection
for every peer, not just the kubelet), the injector hands the sidecar the list in
``PALISADE_PROBE_PORTS`` and the sidecar's built-in ``kubelet-probes`` rule
allows ingress from ``HOST_IP`` to those ports only.

Named ports are resolved against the probed container's own ``ports`` (that is
how the kubelet resolves them). A probe with ``httpGet.host`` set targets some
other address, not this pod, so it needs no rule. Exec probes use no network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PROBE_KINDS = ("startupProbe", "livenessProbe", "readinessProbe")
_HANDLERS = ("httpGet", "tcpSocket", "grpc")


@dataclass(frozen=True, slots=True)
class ProbePorts:
    ports: tuple[int, ...]
    warnings: tuple[str, ...]

    def env_value(self) -> str:
        return ",".join(map(str, self.ports))


def _resolve(container: dict, port: object) -> int | None:
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port if 1 <= port <= 65535 else None
    if isinstance(port, str):
        if port.isdigit():
            return int(port) if 1 <= int(port) <= 65535 else None
        for decl in container.get("ports") or []:
            if isinstance(decl, dict) and decl.get("name") == port:
                number = decl.get("containerPort")
                if isinstance(number, int) and not isinstance(number, bool):
                    return number
    return None


def probe_ports(containers: Iterable[dict]) -> ProbePorts:
    """Sorted unique ports of the HTTP/TCP/gRPC probes of ``containers``, plus warnings."""
    found: set[int] = set()
    warnings: list[str] = []
    for container in containers:
        name = container.get("name", "?")
        for kind in PROBE_KINDS:
            probe = container.get(kind)
            if not isinstance(probe, dict):
                continue
            for handler in _HANDLERS:
                spec = probe.get(handler)
                if not isinstance(spec, dict):
                    continue
                if handler == "httpGet" and spec.get("host"):
                    continue
                port = _resolve(container, spec.get("port"))
                if port is None:
                    warnings.append(
                        f"palisade: container {name}: {kind} port {spec.get('port')!r} does not resolve to a "
                        "port of the container; the kubelet probe will fail, and Palisade cannot "
                        "allow it")
                else:
                    found.add(port)
    return ProbePorts(tuple(sorted(found)), tuple(warnings))
