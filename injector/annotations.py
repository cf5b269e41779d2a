"""The pod's own Palisade settings, read from its annotations and validated.

A bad value rejects the pod with a message naming the annotation: injecting a
sidecar whose init container then fails on ``--exclude-outbound-cidrs 10.0.0/8``
would leave a pod stuck in ``Init:CrashLoopBackOff`` with the cause buried in a
container log, whereas a rejection is shown by ``kubectl apply`` right away.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from injector import (
    ANN_EXCLUDE_INBOUND_PORTS,
    ANN_EXCLUDE_OUTBOUND_CIDRS,
    ANN_EXCLUDE_OUTBOUND_PORTS,
    ANN_INJECT,
    ANN_MODE,
    ANN_PROXY_CPU,
    ANN_PROXY_CPU_LIMIT,
    ANN_PROXY_MEMORY,
    ANN_PROXY_MEMORY_LIMIT,
)
from injector.config import ConfigError, Resources, check_quantity

MODES = ("learn", "monitor", "protect")


class AnnotationError(ValueError):
    """A Palisade annotation or label on the pod has a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class Exclusions:
    """Traffic never redirected through the proxy, as passed to ``firewall redirect apply``."""

    inbound_ports: tuple[int, ...] = ()
    outbound_ports: tuple[int, ...] = ()
    outbound_cidrs: tuple[str, ...] = ()

    def to_args(self) -> list[str]:
        args: list[str] = []
        if self.inbound_ports:
            args += ["--exclude-inbound-ports", ",".join(map(str, self.inbound_ports))]
        if self.outbound_ports:
            args += ["--exclude-outbound-ports", ",".join(map(str, self.outbound_ports))]
        if self.outbound_cidrs:
            args += ["--exclude-outbound-cidrs", ",".join(self.outbound_cidrs)]
        return args


def _items(value: str) -> list[str]:
    """Comma-separated list; blanks around items are forgiven, empty items are not."""
    if not value.strip():
        return []
    parts = [p.strip() for p in value.split(",")]
    if any(not p for p in parts):
        raise ValueError("empty item in the comma-separated list")
    return parts


def parse_ports(key: str, value: str) -> tuple[int, ...]:
    """``"8080, 9090"`` -> ``(8080, 9090)``; duplicates dropped, order kept."""
    try:
        items = _items(value)
    except ValueError as exc:
        raise AnnotationError(f'annotation {key}="{value}": {exc}') from None
    ports: list[int] = []
    for item in items:
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise AnnotationError(
                f'annotation {key}="{value}": "{item}" is not a port number (1-65535); '
                "use a comma-separated list such as 8080,9090")
        if int(item) not in ports:
            ports.append(int(item))
    return tuple(ports)


def parse_cidrs(key: str, value: str) -> tuple[str, ...]:
    """``"10.0.0.0/8, fd00::/8, 192.0.2.1"`` -> normalised networks (a bare address is a /32 or /128)."""
    try:
        items = _items(value)
    except ValueError as exc:
        raise AnnotationError(f'annotation {key}="{value}": {exc}') from None
    nets: list[str] = []
    for item in items:
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            hint = ""
            try:
                hint = f" (did you mean {ipaddress.ip_network(item, strict=False)}?)"
            except ValueError:
                pass
            raise AnnotationError(
                f'annotation {key}="{value}": "{item}" is not an IP network: {exc}{hint}') from None
        if str(net) not in nets:
            nets.append(str(net))
    return tuple(nets)


def exclusions(annotations: dict[str, str]) -> Exclusions:
    return Exclusions(
        inbound_ports=parse_ports(ANN_EXCLUDE_INBOUND_PORTS, annotations.get(ANN_EXCLUDE_INBOUND_PORTS, "")),
        outbound_ports=parse_ports(ANN_EXCLUDE_OUTBOUND_PORTS, annotations.get(ANN_EXCLUDE_OUTBOUND_PORTS, "")),
        outbound_cidrs=parse_cidrs(ANN_EXCLUDE_OUTBOUND_CIDRS, annotations.get(ANN_EXCLUDE_OUTBOUND_CIDRS, "")),
    )


def inject_flag(labels: dict[str, str], annotations: dict[str, str]) -> bool | None:
    """The pod's ``palisade.dev/inject`` setting: the label wins over the annotation.

    Only ``"true"``/``"false"`` are accepted: a pod saying ``inject: "no"`` clearly meant
    something, and guessing wrong either way (protecting or not) is worse than asking.
    """
    for where, source in (("label", labels), ("annotation", annotations)):
        if ANN_INJECT in source:
            value = str(source[ANN_INJECT])
            if value not in ("true", "false"):
                raise AnnotationError(f'{where} {ANN_INJECT}="{value}": expected "true" or "false"')
            return value == "true"
    return None


def check_mode(annotations: dict[str, str]) -> None:
    """Reject a ``palisade.dev/mode`` the sidecar would not understand."""
    if ANN_MODE in annotations and annotations[ANN_MODE] not in MODES:
        raise AnnotationError(
            f'annotation {ANN_MODE}="{annotations[ANN_MODE]}": expected one of {", ".join(MODES)}')


def sidecar_resources(base: Resources, annotations: dict[str, str]) -> Resources:
    """Config defaults, overridden per pod by the ``palisade.dev/proxy-*`` annotations."""
    values = {}
    for key, attr in ((ANN_PROXY_CPU, "cpu_request"), (ANN_PROXY_MEMORY, "memory_request"),
                      (ANN_PROXY_CPU_LIMIT, "cpu_limit"), (ANN_PROXY_MEMORY_LIMIT, "memory_limit")):
        if key in annotations:
            try:
                values[attr] = check_quantity(annotations[key], f"annotation {key}")
            except ConfigError as exc:
                raise AnnotationError(str(exc)) from None
    merged = Resources(
        cpu_request=values.get("cpu_request", base.cpu_request),
        memory_request=values.get("memory_request", base.memory_request),
        cpu_limit=values.get("cpu_limit", base.cpu_limit),
        memory_limit=values.get("memory_limit", base.memory_limit),
    )
    return merged
