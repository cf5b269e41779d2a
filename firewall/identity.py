"""Who is at the other end of a flow: IP -> workload identity.

Identity is plain data; resolvers (static YAML file, Kubernetes pod watch) keep
an IP -> Identity map that is swapped atomically, so the hot path does one dict
lookup and never I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firewall import LABEL_SCOPE


@dataclass(frozen=True, slots=True)
class Identity:
    """A peer. ``namespace is None`` means ``world``: an address no source knows."""

    ip: str
    namespace: str | None = None
    pod: str | None = None
    labels: tuple[tuple[str, str], ...] = field(default=())
    service_account: str | None = None

    @property
    def is_world(self) -> bool:
        return self.namespace is None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def scope(self) -> str:
        """PCI scope from the label; unlabelled workloads and the world are out of scope."""
        return self.label_map.get(LABEL_SCOPE, "out-of-scope")

    def to_json(self) -> dict:
        if self.is_world:
            return {"world": True, "ip": self.ip, "scope": "out-of-scope"}
        return {
            "namespace": self.namespace,
            "pod": self.pod,
            "labels": self.label_map,
            "scope": self.scope,
            "service_account": self.service_account,
        }

    @staticmethod
    def make(ip: str, namespace: str | None = None, pod: str | None = None,
             labels: dict[str, str] | None = None, service_account: str | None = None) -> Identity:
        return Identity(ip, namespace, pod, tuple(sorted((labels or {}).items())), service_account)
