"""Palisade's injector: a mutating admission webhook that adds the sidecar to opted-in pods.

The design follows one rule: **a pure function from pod to pod, and thin shells
around it**.

* ``decision.py`` answers *whether* to inject (the truth table in
  ``docs/injector.md``), ``inject.py`` renders *what* is added, and
  ``annotations.py`` / ``probes.py`` turn the pod's own fields into the values
  the sidecar needs. None of them do I/O, so the golden tests exercise them
  directly.
* ``review.py`` turns an ``admission.k8s.io/v1`` AdmissionReview into a response
  (a JSON Patch computed as the diff of original and mutated pod). The HTTPS
  server (``server.py``) and the offline ``python -m injector mutate`` both call
  it, so what the tests see offline is what the API server gets.
* ``protection.py`` decides whether a pod is protected (re-render the sidecar
  and compare; the pod's own annotations are never trusted), for both
  endpoints; ``guard.py`` holds the admission guard's other rules (CDE
  exceptions, fields that could dismantle the firewall, the capture volume,
  namespace grants). ``review.validate`` is the validating side.
* ``certs.py`` and ``manifests.py`` produce what a platform team installs.
"""

from __future__ import annotations

from firewall import (
    ADMIN_PORT,
    ANN_EXCLUDE_INBOUND_PORTS,
    ANN_EXCLUDE_OUTBOUND_CIDRS,
    ANN_EXCLUDE_OUTBOUND_PORTS,
    ANN_INJECT,
    ANN_MODE,
    ANN_STATUS,
    INBOUND_PORT,
    LABEL_INJECTION,
    LABEL_SCOPE,
    OUTBOUND_PORT,
    PROXY_GID,
    PROXY_UID,
)

__version__ = "0.1.0"

__all__ = [
    "ADMIN_PORT",
    "ANN_EXCLUDE_INBOUND_PORTS",
    "ANN_EXCLUDE_OUTBOUND_CIDRS",
    "ANN_EXCLUDE_OUTBOUND_PORTS",
    "ANN_INJECT",
    "ANN_MODE",
    "ANN_STATUS",
    "INBOUND_PORT",
    "LABEL_INJECTION",
    "LABEL_SCOPE",
    "OUTBOUND_PORT",
    "PROXY_GID",
    "PROXY_UID",
]

# Names this package adds to pods. Kept together so stripping/validation and docs agree.
INIT_NAME = "palisade-init"
SIDECAR_NAME = "palisade"
STATUS_INJECTED = "injected"
ANN_INJECTED_RESOURCES = "palisade.dev/injected-resources"
LABEL_INJECTED = "palisade.dev/injected"
ANN_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
ANN_PROXY_CPU = "palisade.dev/proxy-cpu"
ANN_PROXY_MEMORY = "palisade.dev/proxy-memory"
ANN_PROXY_CPU_LIMIT = "palisade.dev/proxy-cpu-limit"
ANN_PROXY_MEMORY_LIMIT = "palisade.dev/proxy-memory-limit"
VOL_PODINFO = "palisade-podinfo"
VOL_PCAP = "palisade-pcap"
VOL_POLICY = "palisade-policy"
VOL_DLP = "palisade-dlp"
VOL_TMP = "palisade-tmp"
PROBE_PORTS_ENV = "PALISADE_PROBE_PORTS"
RESERVED_PORTS = (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)
# Proxies of other meshes: running two transparent proxies in one pod fights over the same
# packets, so by default such pods are left alone with a warning.
OTHER_MESH_PROXIES = ("istio-proxy", "istio-init", "istio-validation", "linkerd-proxy", "linkerd-init")
