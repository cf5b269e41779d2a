"""Render the Palisade containers and volumes into a pod: a pure function, pod in, pod out.

What is added and why (docs/injector.md explains each at length):

* ``palisade-init`` first of all init containers: installs the nftables redirect
  rules and exits. Root, capabilities exactly NET_ADMIN + NET_RAW, no privilege
  escalation - it is the only part that changes the pod's network.
* ``palisade`` the proxy. As a native sidecar (init container with
  ``restartPolicy: Always`` right after ``palisade-init``) the kubelet waits for its
  startupProbe before starting the user's init containers and app, so the first
  packet already has a proxy to go to, and Jobs complete because native sidecars
  do not keep a pod running. For clusters before 1.29 (``nativeSidecar: false``)
  it is the first regular container with a postStart hook that blocks until
  ``/readyz`` answers, which makes the kubelet hold back the next containers.
* Volumes: the downward-API podinfo (annotations, labels: mode, pcap and
  quarantine reach the sidecar without API credentials), an emptyDir for pcaps,
  one for /tmp (the root filesystem is read-only), and the policy and DLP rule
  ConfigMaps (optional, so a namespace without them still starts).
* ``palisade.dev/status: injected`` plus ``palisade.dev/injected-resources`` (JSON
  naming every container, volume, label and annotation added) so people and a
  later version can see exactly what an earlier one added. Informational only:
  whether a pod is protected is decided by ``protection.inspect``, never by these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from injector import (
    ADMIN_PORT,
    ANN_DEFAULT_CONTAINER,
    ANN_INJECTED_RESOURCES,
    ANN_STATUS,
    INBOUND_PORT,
    INIT_NAME,
    LABEL_INJECTED,
    OUTBOUND_PORT,
    PROBE_PORTS_ENV,
    PROXY_GID,
    PROXY_UID,
    RESERVED_PORTS,
    SIDECAR_NAME,
    STATUS_INJECTED,
    VOL_DLP,
    VOL_PCAP,
    VOL_PODINFO,
    VOL_POLICY,
    VOL_TMP,
    __version__,
)
from injector.annotations import AnnotationError, check_mode, exclusions, sidecar_resources
from injector.config import InjectorConfig
from injector.probes import probe_ports

PODINFO_DIR = "/etc/palisade/podinfo"
POLICY_DIR = "/etc/palisade/policy"
DLP_DIR = "/etc/palisade/dlp"
PCAP_DIR = "/var/run/palisade/pcap"
CONFIG_FILE = "/etc/palisade/config.yaml"

# postStart hook for non-native sidecars: block until the proxy is ready (the kubelet does not
# start the next container until the hook returns). Only the standard library: it runs in the
# sidecar image, and must not depend on a CLI command of the firewall package.
WAIT_READY = (
    "import sys,time,urllib.request\n"
    "port,limit=sys.argv[1],time.monotonic()+float(sys.argv[2])\n"
    "while True:\n"
    "    try:\n"
    "        urllib.request.urlopen('http://127.0.0.1:%s/readyz' % port, timeout=1).close()\n"
    "        break\n"
    "    except Exception:\n"
    "        if time.monotonic() > limit:\n"
    "            sys.exit('palisade sidecar not ready')\n"
    "        time.sleep(0.2)\n"
)


class InjectError(ValueError):
    """The pod cannot be injected as written (name clash, reserved port or UID)."""


@dataclass(frozen=True, slots=True)
class Rendered:
    pod: dict
    warnings: tuple[str, ...]


def _field_env(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _admin_probe(path: str, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": ADMIN_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def init_container(config: InjectorConfig, annotations: dict[str, str]) -> dict:
    args = [
        "--inbound-port", str(INBOUND_PORT),
        "--outbound-port", str(OUTBOUND_PORT),
        "--proxy-uid", str(PROXY_UID),
        "--proxy-gid", str(PROXY_GID),
        "--admin-port", str(ADMIN_PORT),
        *exclusions(annotations).to_args(),
    ]
    container = {
        "name": INIT_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python", "-m", "firewall", "redirect", "apply"],
        "args": args,
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }
    resources = config.init_resources.to_k8s()
    if resources:
        container["resources"] = resources
    return container


def sidecar_container(config: InjectorConfig, annotations: dict[str, str], probe_env: str) -> dict:
    container = {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python", "-m", "firewall", "run"],
        "args": [
            "--config", CONFIG_FILE,
            "--podinfo", PODINFO_DIR,
            "--policy", POLICY_DIR,
            "--dlp-rules", DLP_DIR,
            "--pcap-dir", PCAP_DIR,
        ],
        "ports": [{"name": "palisade-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("NODE_NAME", "spec.nodeName"),
            _field_env("HOST_IP", "status.hostIP"),
            {"name": PROBE_PORTS_ENV, "value": probe_env},
        ],
        "startupProbe": _admin_probe("/readyz", 1, config.startup_timeout_seconds),
        "readinessProbe": _admin_probe("/readyz", 5, 3),
        "livenessProbe": _admin_probe("/healthz", 10, 3),
        # UID/GID 1337: the redirect rules exempt this identity, so the proxy's own upstream
        # connections are not captured again. NET_ADMIN: IP_TRANSPARENT for the TPROXY listener
        # and the transparent upstream bind; NET_RAW: AF_PACKET captures. Kubernetes does not set
        # ambient capabilities for non-root users, so the image grants these two as file
        # capabilities on its interpreter; no_new_privs (allowPrivilegeEscalation: false) would
        # make the kernel ignore file capabilities, hence true here (docs/injector.md).
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_GID,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": True,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": VOL_PODINFO, "mountPath": PODINFO_DIR, "readOnly": True},
            {"name": VOL_POLICY, "mountPath": POLICY_DIR, "readOnly": True},
            {"name": VOL_DLP, "mountPath": DLP_DIR, "readOnly": True},
            {"name": VOL_PCAP, "mountPath": PCAP_DIR},
            {"name": VOL_TMP, "mountPath": "/tmp"},
        ],
    }
    resources = sidecar_resources(config.sidecar_resources, annotations).to_k8s()
    if resources:
        container["resources"] = resources
    if config.native_sidecar:
        container["restartPolicy"] = "Always"
    else:
        container["lifecycle"] = {"postStart": {"exec": {"command": [
            "python", "-c", WAIT_READY, str(ADMIN_PORT), str(config.startup_timeout_seconds)]}}}
    return container


def volumes(config: InjectorConfig) -> list[dict]:
    return [
        {"name": VOL_PODINFO, "downwardAPI": {"items": [
            {"path": "annotations", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.annotations"}},
            {"path": "labels", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.labels"}},
        ]}},
        {"name": VOL_POLICY, "configMap": {"name": config.policy_config_map, "optional": True}},
        {"name": VOL_DLP, "configMap": {"name": config.dlp_config_map, "optional": True}},
        {"name": VOL_PCAP, "emptyDir": {"sizeLimit": config.pcap_size_limit}},
        {"name": VOL_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]


def _check_conflicts(spec: dict, volume_names: list[str]) -> list[str]:
    """Reject what would break the sidecar or let the app bypass it; return softer warnings."""
    warnings: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            name = c.get("name")
            if name in (INIT_NAME, SIDECAR_NAME):
                raise InjectError(f"container name {name!r} is reserved for the Palisade sidecar; rename it")
            for decl in c.get("ports") or []:
                if decl.get("containerPort") in RESERVED_PORTS:
                    raise InjectError(
                        f"container {name}: port {decl['containerPort']} is reserved for the Palisade "
                        f"sidecar (ports {', '.join(map(str, RESERVED_PORTS))}); use another port")
            sc = c.get("securityContext") or {}
            for field, ident in (("runAsUser", PROXY_UID), ("runAsGroup", PROXY_GID)):
                if sc.get(field, pod_sc.get(field)) == ident:
                    raise InjectError(
                        f"container {name}: {field} {ident} is reserved for the Palisade proxy, whose "
                        "traffic is never redirected; this container would bypass the firewall")
    for vol in spec.get("volumes") or []:
        if vol.get("name") in volume_names:
            raise InjectError(f"volume name {vol['name']!r} is reserved for the Palisade sidecar; rename it")
    return warnings


UNPRIV_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"


def render(pod: dict, config: InjectorConfig) -> Rendered:
    """Return a copy of ``pod`` with Palisade injected. Raises ``AnnotationError``/``InjectError``.

    Only the pod, its metadata and spec are copied (shallowly): everything below them is
    read, never mutated, and every list or map that changes is built anew. A deep copy
    was 40% of the review time.
    """
    out = dict(pod)
    meta = out["metadata"] = dict(out.get("metadata") or {})
    spec = out["spec"] = dict(out.get("spec") or {})
    annotations = meta.get("annotations") or {}
    check_mode(annotations)
    vols = volumes(config)
    warnings = _check_conflicts(spec, [v["name"] for v in vols])

    app = list(spec.get("containers") or [])
    user_sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    probes = probe_ports(app + user_sidecars)
    warnings += probes.warnings

    init = init_container(config, annotations)
    sidecar = sidecar_container(config, annotations, probes.env_value())
    user_inits = list(spec.get("initContainers") or [])
    if config.native_sidecar:
        spec["initContainers"] = [init, sidecar, *user_inits]
        added = {"initContainers": [INIT_NAME, SIDECAR_NAME], "containers": []}
    else:
        spec["initContainers"] = [init, *user_inits]
        spec["containers"] = [sidecar, *app]
        added = {"initContainers": [INIT_NAME], "containers": [SIDECAR_NAME]}
    spec["volumes"] = [*(spec.get("volumes") or []), *vols]
    # The sidecar (UID 1337, no CAP_NET_BIND_SERVICE) answers DNS from the resolver's port 53;
    # a "safe" namespaced sysctl (Kubernetes >= 1.22), which containerd sets to 0 anyway.
    pod_sc = dict(spec.get("securityContext") or {})
    sysctls = list(pod_sc.get("sysctls") or [])
    mine = [x for x in sysctls if x.get("name") == UNPRIV_PORT_SYSCTL]
    if not mine:
        pod_sc["sysctls"] = [*sysctls, {"name": UNPRIV_PORT_SYSCTL, "value": "0"}]
        spec["securityContext"] = pod_sc
    elif str(mine[0].get("value")) not in ("0", "53"):
        warnings.append(f"{UNPRIV_PORT_SYSCTL}={mine[0].get('value')} set by the pod: the sidecar cannot "
                        "answer DNS from port 53; DNS capture will fail (exclude it or allow 53)")

    new_annotations = dict(annotations)
    new_annotations[ANN_STATUS] = STATUS_INJECTED
    added_annotations = [ANN_STATUS, ANN_INJECTED_RESOURCES]
    if app and ANN_DEFAULT_CONTAINER not in annotations:
        # kubectl logs/exec pick the first container; point them at the app, not the proxy.
        new_annotations[ANN_DEFAULT_CONTAINER] = app[0].get("name", "")
        added_annotations.append(ANN_DEFAULT_CONTAINER)
    new_labels = dict(meta.get("labels") or {})
    new_labels[LABEL_INJECTED] = "true"
    record = {
        "version": __version__,
        **added,
        "volumes": [v["name"] for v in vols],
        "annotations": sorted(added_annotations),
        "labels": [LABEL_INJECTED],
    }
    new_annotations[ANN_INJECTED_RESOURCES] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    meta["annotations"] = new_annotations
    meta["labels"] = new_labels
    return Rendered(out, tuple(warnings))


__all__ = ["AnnotationError", "InjectError", "Rendered", "render"]
