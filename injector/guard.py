"""The admission guard's rules beyond "is the sidecar there": what else could switch the firewall off.

Three families, each a pure function from the pod (plus config and the namespace's
admin grants) to a list of one-line findings:

* ``dangerous_fields``: containers and pod settings that could dismantle the
  firewall from inside the pod - delete the nft table (NET_ADMIN, SYS_ADMIN,
  BPF, privileged), sniff or forge around it (NET_RAW), take over the sidecar
  (SYS_PTRACE, hostPID, an unmasked /proc), or borrow the proxy's identity
  (UID/GID 1337, which the redirect rules exempt). Refused in the CDE, a
  warning elsewhere (``dangerousOutsideCde: refuse`` makes it a refusal).
* ``undropped_net_raw``: CDE containers must drop NET_RAW (runtimes grant it
  by default; AF_PACKET frames bypass nftables, and it may set SO_MARK).
* ``reserved_mounts``: an application, init or ephemeral container mounting
  the sidecar's capture or scratch volume (pcaps hold full card numbers by
  nature). Refused everywhere.
* ``cde_exceptions``: what a CDE pod may not decide for itself - opting out,
  excluding traffic from the proxy beyond the admin allow-list
  (``cdeExclusions``), a mode other than ``protect`` without the namespace's
  admin grant.

Namespace grants come from namespace labels (``GRANT_LABELS``). An
AdmissionReview does not carry them, so the shipped webhook configuration
registers one CDE webhook per combination of labels, each with a
``namespaceSelector`` and its own path (``/validate``, ``/validate/mode``,
``/validate/debug``, ``/validate/mode-debug``): the API server, not the pod,
decides which grants a request carries. (A webhook path may not hold a query
string: each path segment must be a DNS-1123 subdomain.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from injector import (
    ANN_EXCLUDE_INBOUND_PORTS,
    ANN_EXCLUDE_OUTBOUND_CIDRS,
    ANN_EXCLUDE_OUTBOUND_PORTS,
    ANN_INJECT,
    ANN_MODE,
    INIT_NAME,
    PROXY_GID,
    PROXY_UID,
    SIDECAR_NAME,
    VOL_PCAP,
    VOL_TMP,
)
from injector.annotations import AnnotationError, parse_cidrs, parse_ports
from injector.config import InjectorConfig, check_excludable
from injector.inject import PCAP_DIR

GRANT_MODE = "mode"
GRANT_DEBUG = "debug"
GRANTS = (GRANT_MODE, GRANT_DEBUG)
# Namespace label (value "true") -> grant. Only cluster admins can label namespaces.
GRANT_LABELS = {
    GRANT_MODE: "palisade.dev/cde-allow-mode-override",
    GRANT_DEBUG: "palisade.dev/cde-allow-debug",
}
DANGEROUS_CAPS = ("NET_ADMIN", "SYS_ADMIN", "NET_RAW", "SYS_PTRACE", "BPF", "ALL")
RESERVED_VOLUMES = (VOL_PCAP, VOL_TMP)
CONTAINER_KINDS = (("initContainers", "init container"), ("containers", "container"),
                   ("ephemeralContainers", "ephemeral container"))
OURS = (INIT_NAME, SIDECAR_NAME)


# ``kubectl exec`` into the sidecar is refused except for these read-only commands, matched on the
# exact argv (exec runs argv directly, no shell): the SRE runbook's (docs/sre.md).
SIDECAR_EXEC_ALLOWED = (("python", "-m", "firewall", "redirect", "show"),)


def sidecar_exec_allowed(command: Any) -> bool:
    """``command`` is a read-only look into the sidecar: an allowed argv, or ``cat`` of one capture file."""
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        return False
    if tuple(command) in SIDECAR_EXEC_ALLOWED:
        return True
    if len(command) == 2 and command[0] == "cat":
        path = command[1]
        name = path.removeprefix(PCAP_DIR + "/")
        return name != path and name not in ("", ".", "..") and "/" not in name and "\0" not in name
    return False


def parse_grants(text: str | None) -> frozenset[str]:
    """``"mode-debug"`` (a path segment) or ``"mode,debug"`` -> the grants; unknown names are ignored."""
    return frozenset(g.strip() for g in (text or "").replace("-", ",").split(",") if g.strip() in GRANTS)


def grants_path(grants: Iterable[str]) -> str:
    """The webhook path that conveys ``grants`` (inverse of ``parse_grants``)."""
    names = [g for g in GRANTS if g in set(grants)]
    return "/validate" + (f"/{'-'.join(names)}" if names else "")


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _containers(spec: dict, only: Iterable[str] | None = None) -> list[tuple[str, dict]]:
    wanted = set(only) if only is not None else None
    out = []
    for key, kind in CONTAINER_KINDS:
        items = spec.get(key)
        for c in items if isinstance(items, list) else []:
            if not isinstance(c, dict) or (wanted is not None and c.get("name") not in wanted):
                continue
            out.append((kind, c))
    return out


def _caps(sc: dict) -> list[str]:
    """Added capabilities, normalised: ``cap_net_admin`` and ``CAP_NET_ADMIN`` are ``NET_ADMIN``."""
    add = _dict(sc.get("capabilities")).get("add")
    names = []
    for cap in add if isinstance(add, list) else []:
        text = str(cap).strip().upper()
        names.append(text[4:] if text.startswith("CAP_") else text)
    return names


def _has_proxy_id(values: Any) -> bool:
    return isinstance(values, list) and any(v == PROXY_GID for v in values)


def dangerous_fields(pod: dict, only: Iterable[str] | None = None, pod_level: bool = True) -> list[str]:
    """Findings for every field that could dismantle the firewall (Palisade's own containers aside).

    ``only`` limits the container checks to these names (new ephemeral containers);
    ``pod_level`` False skips the pod-wide fields (they cannot change on that path)."""
    spec = _dict(pod.get("spec"))
    found: list[str] = []
    psc = _dict(spec.get("securityContext"))
    if pod_level:
        for key in ("hostNetwork", "hostPID"):
            if spec.get(key) is True:
                found.append(f"{key}: true (the pod would share the node's "
                             f"{'network' if key == 'hostNetwork' else 'processes'})")
        for key, ident in (("runAsUser", PROXY_UID), ("runAsGroup", PROXY_GID)):
            if psc.get(key) == ident:
                found.append(f"securityContext.{key}: {ident} (reserved for the Palisade proxy, whose traffic "
                             "is never redirected)")
        for key in ("supplementalGroups", "fsGroup"):
            value = psc.get(key)
            if _has_proxy_id(value) or value == PROXY_GID:
                found.append(f"securityContext.{key} contains {PROXY_GID} (reserved for the Palisade proxy)")
    for kind, c in _containers(spec, only):
        name = c.get("name")
        if name in OURS and kind != "ephemeral container":
            continue  # judged by protection.inspect against the rendered sidecar
        sc = _dict(c.get("securityContext"))
        where = f"{kind} {name}"
        if sc.get("privileged") is True:
            found.append(f"{where}: privileged: true")
        caps = _caps(sc)
        bad = sorted({cap for cap in caps if cap in DANGEROUS_CAPS})
        if bad:
            found.append(f"{where}: adds capabilities {', '.join(bad)}")
        if sc.get("procMount") == "Unmasked":
            found.append(f"{where}: procMount: Unmasked")
        for key, ident in (("runAsUser", PROXY_UID), ("runAsGroup", PROXY_GID)):
            if sc.get(key) == ident:
                found.append(f"{where}: securityContext.{key}: {ident} (reserved for the Palisade proxy, "
                             "whose traffic is never redirected)")
        if caps and sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: adds capabilities without allowPrivilegeEscalation: false")
    return found


def undropped_net_raw(pod: dict, only: Iterable[str] | None = None) -> list[str]:
    """CDE containers that keep NET_RAW, which container runtimes grant by default.

    With NET_RAW a process can send frames on an AF_PACKET socket, which never pass through
    nftables (so around the redirect), and since Linux 5.17 it may set SO_MARK (the sidecar's
    exemption mark). Kubernetes does not drop it unless the container says so."""
    found = []
    for kind, c in _containers(_dict(pod.get("spec")), only):
        if c.get("name") in OURS and kind != "ephemeral container":
            continue
        sc = _dict(c.get("securityContext"))
        if sc.get("privileged") is True:
            continue  # reported as privileged already
        drop = _dict(sc.get("capabilities")).get("drop")
        names = {str(x).strip().upper().removeprefix("CAP_") for x in drop} if isinstance(drop, list) else set()
        if not names & {"NET_RAW", "ALL"}:
            found.append(f"{kind} {c.get('name')}: does not drop NET_RAW (add securityContext.capabilities.drop: "
                         "[ALL]; the runtime grants NET_RAW by default and it sends packets around the firewall)")
    return found


def reserved_mounts(pod: dict, only: Iterable[str] | None = None) -> list[str]:
    """Containers other than the sidecar mounting its capture or scratch volume."""
    spec = _dict(pod.get("spec"))
    found = []
    for kind, c in _containers(spec, only):
        if c.get("name") == SIDECAR_NAME and kind != "ephemeral container":
            continue
        mounts = c.get("volumeMounts")
        for m in mounts if isinstance(mounts, list) else []:
            if isinstance(m, dict) and m.get("name") in RESERVED_VOLUMES:
                what = "capture files hold full card numbers" if m["name"] == VOL_PCAP else "the sidecar's scratch space"
                found.append(f"{kind} {c.get('name')}: mounts volume {m['name']}, reserved for the Palisade "
                             f"sidecar ({what})")
    return found


def _in_ranges(port: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def cde_exceptions(pod: dict, namespace: str, config: InjectorConfig, grants: frozenset[str]) -> list[str]:
    """What a CDE pod asks for that only the platform team may grant."""
    meta = _dict(pod.get("metadata"))
    labels = _dict(meta.get("labels"))
    annotations = _dict(meta.get("annotations"))
    found = []
    for where, source in (("label", labels), ("annotation", annotations)):
        if ANN_INJECT in source and source[ANN_INJECT] != "true":
            found.append(f'{where} {ANN_INJECT}="{source[ANN_INJECT]}": CDE pods may not opt out of the sidecar')
    mode = annotations.get(ANN_MODE)
    if mode is not None and mode != "protect" and GRANT_MODE not in grants:
        found.append(f'annotation {ANN_MODE}="{mode}": CDE pods run in protect mode unless namespace '
                     f'{namespace} carries the label {GRANT_LABELS[GRANT_MODE]}=true (set by a cluster admin)')
    grants_here = [g for g in config.cde_exclusions if g.applies(namespace, labels)]
    hint = ("add it to cdeExclusions in the injector config (platform team)" if not grants_here
            else "it is not in the cdeExclusions entries for this namespace")
    try:
        for net_text in parse_cidrs(ANN_EXCLUDE_OUTBOUND_CIDRS, annotations.get(ANN_EXCLUDE_OUTBOUND_CIDRS, "")):
            net = ipaddress.ip_network(net_text)
            why = check_excludable(net, config.cluster_cidrs)
            if why:
                found.append(f"annotation {ANN_EXCLUDE_OUTBOUND_CIDRS}: {why}; never allowed")
            elif not any(net.version == a.version and net.subnet_of(a) for g in grants_here for a in g.outbound_cidrs):
                found.append(f"annotation {ANN_EXCLUDE_OUTBOUND_CIDRS}: {net} may not bypass the proxy in "
                             f"the CDE; {hint}")
        for key, attr in ((ANN_EXCLUDE_OUTBOUND_PORTS, "outbound_ports"), (ANN_EXCLUDE_INBOUND_PORTS, "inbound_ports")):
            for port in parse_ports(key, annotations.get(key, "")):
                if not any(_in_ranges(port, getattr(g, attr)) for g in grants_here):
                    found.append(f"annotation {key}: port {port} may not bypass the proxy in the CDE; {hint}")
    except AnnotationError as exc:
        found.append(str(exc))
    return found
