"""Pod Security Admission: the injected pod needs the ``privileged`` level.

The sidecar and its init container add ``NET_ADMIN`` and ``NET_RAW`` (TPROXY, nftables, bounded
captures), which the ``baseline`` and ``restricted`` levels forbid; the init container also
runs as root and the sidecar needs ``allowPrivilegeEscalation: true`` for its file capabilities
(docs/injector.md). Measured against kube-apiserver (tests/k8s/test_psa.py): an injected pod
is rejected by ``enforce=baseline`` and ``enforce=restricted`` and admitted by ``privileged``.

Injecting into a namespace that enforces a stricter level would only trade our sidecar for
Pod Security's refusal, whose message names capabilities of containers the user never wrote.
So the injector refuses first, with the fix. AdmissionReview carries no namespace labels: the
mutating webhook configuration holds one extra webhook per stricter level, selected by the
namespace's ``pod-security.kubernetes.io/enforce`` label, whose path names the level
(``/mutate/psa-baseline``, ``/mutate/psa-restricted``); the main injection webhook excludes
those namespaces. Pods the injector would leave alone (opt-out, host network ...) pass.
"""

from __future__ import annotations

from typing import Any

from injector.config import InjectorConfig
from injector.review import Result, _pod_name, _request, _respond, mutate

ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
# Levels that reject the injected pod, in the order the webhooks are generated.
REJECTING_LEVELS = ("baseline", "restricted")
WEBHOOK_PATH = "/mutate/psa-{level}"


def webhook_name(level: str) -> str:
    return f"psa-{level}.palisade.dev"


def parse_level(segment: str | None) -> str | None:
    """``psa-baseline`` -> ``baseline``; anything else -> None (a 404 in the server)."""
    if segment and segment.startswith("psa-") and segment[4:] in REJECTING_LEVELS:
        return segment[4:]
    return None


def message(pod_name: str, namespace: str, level: str) -> str:
    return (f"palisade: pod {pod_name}: not injected: namespace {namespace} enforces Pod Security level "
            f"'{level}', which rejects the Palisade sidecar (it adds NET_ADMIN and NET_RAW; the init "
            "container runs as root). Label the namespace pod-security.kubernetes.io/enforce=privileged "
            "(or grant an equivalent exemption), or opt the pod out with the label palisade.dev/inject=false")


def mutate_under(review: Any, config: InjectorConfig, level: str) -> Result:
    """``/mutate/psa-LEVEL``: what ``/mutate`` would do, but a pod that would run with the sidecar
    is refused with the fix instead of being handed to Pod Security to reject."""
    result = mutate(review, config)
    protected_already = result.outcome == "skipped" and result.reason == "already protected"
    if result.outcome not in ("injected", "repaired") and not protected_already:
        return result  # skipped for another reason, or rejected on its own: as /mutate answers
    req = _request(review)
    pod = req.get("object") or {}
    namespace = req.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    text = message(_pod_name(pod), namespace, level)
    return Result(_respond(req["uid"], False, code=403, reason="Forbidden", message=text), "rejected",
                  reason=text)
