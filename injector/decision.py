"""Whether a pod gets the sidecar: the truth table of docs/injector.md, in code, in that order.

The namespace's opt-in (``palisade.dev/injection=enabled``) is not visible here:
AdmissionReview does not carry namespace labels, so the webhook's
``namespaceSelector`` filters on the API server and this function trusts it.
The first matching row wins:

====  ============================================  ========  ===========================
row   condition                                     result    note
====  ============================================  ========  ===========================
1     namespace is kube-system or ignored           skip      never inject system pods
2     (removed) ``palisade.dev/status`` is            -         informational only; whether the
      never trusted: review.py asks                             sidecar is there is decided by
      ``protection.inspect`` before this table                  re-rendering (protection.py)
3     ``hostNetwork: true``                         skip      + warning; rules would hit the node
3b    ``spec.os.name: windows``                     skip      + warning; no nftables on Windows
4     ``palisade.dev/inject`` label/annotation      reject    only "true"/"false" are valid
      has another value
5     ``palisade.dev/inject: "false"``              skip      label beats annotation
6     another mesh's proxy container present        skip      + warning, unless the config
                                                              allows injecting alongside
7     otherwise                                     inject    (bad settings then reject)
====  ============================================  ========  ===========================
"""

from __future__ import annotations

from dataclasses import dataclass

from injector import OTHER_MESH_PROXIES
from injector.annotations import inject_flag
from injector.config import InjectorConfig

ALWAYS_IGNORED_NAMESPACES = ("kube-system",)


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: str
    warnings: tuple[str, ...] = ()


def _names(pod_spec: dict) -> list[str]:
    return [c.get("name", "") for key in ("initContainers", "containers")
            for c in (pod_spec.get(key) or []) if isinstance(c, dict)]


def decide(pod: dict, namespace: str, config: InjectorConfig) -> Decision:
    """Apply the truth table. Raises ``AnnotationError`` for row 4."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = meta.get("annotations") or {}  # palisade.dev/status deliberately not consulted
    labels = meta.get("labels") or {}

    if namespace in ALWAYS_IGNORED_NAMESPACES or namespace in config.ignored_namespaces:
        return Decision(False, f"namespace {namespace} is never injected")
    if spec.get("hostNetwork") is True:
        return Decision(False, "hostNetwork pod", (
            "palisade: hostNetwork pods are not injected (the redirect rules would apply to the "
            "node's network); this pod runs without the Palisade firewall",))
    if isinstance(spec.get("os"), dict) and spec["os"].get("name") == "windows":
        return Decision(False, "windows pod", (
            "palisade: Windows pods are not injected (the redirect rules need Linux nftables); "
            "this pod runs without the Palisade firewall",))
    flag = inject_flag(labels, annotations)
    if flag is False:
        return Decision(False, "opted out (palisade.dev/inject=false)")
    meshes = sorted({n for n in _names(spec) if n in OTHER_MESH_PROXIES})
    if meshes:
        if not config.inject_alongside_other_meshes:
            return Decision(False, "another mesh's proxy is present", (
                f"palisade: pod already runs {', '.join(meshes)}; not injecting the Palisade sidecar "
                "(set injectAlongsideOtherMeshes in the injector config to override)",))
        return Decision(True, "inject", (
            f"palisade: injecting alongside {', '.join(meshes)} as configured; both proxies "
            "intercept traffic",))
    return Decision(True, "inject")
