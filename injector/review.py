"""AdmissionReview in, AdmissionReview out: the one code path the server and the CLI share.

A request the API server would never send (not JSON, wrong apiVersion, a pod
whose ``containers`` is not a list ...) raises ``ReviewError`` with one line
saying what is wrong; the server answers it with HTTP 400, the CLI with exit 2.
Anything the webhook decides is a *response*: allowed with or without a JSON
Patch (the diff of original and mutated pod, ``managedFields`` left out), or
``allowed: false`` with a message the user sees in ``kubectl``'s error.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from injector import ANN_STATUS, INIT_NAME, LABEL_SCOPE, OTHER_MESH_PROXIES, SIDECAR_NAME, guard, protection
from injector.annotations import AnnotationError, inject_flag
from injector.config import InjectorConfig
from injector.decision import ALWAYS_IGNORED_NAMESPACES, decide
from injector.inject import InjectError, render
from injector.patch import make_patch

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"


class ReviewError(ValueError):
    """The body is not a usable AdmissionReview (HTTP 400 / exit 2)."""


@dataclass(slots=True)
class Result:
    """A finished review: the response document, a metrics outcome, and the patch (for tests)."""

    review: dict
    outcome: str
    patch: list[dict] = field(default_factory=list)
    reason: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(self.review, separators=(",", ":")).encode()


def decode(body: bytes | str) -> dict:
    """Parse a request body into a review dict, or raise ``ReviewError``."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ReviewError(f"body is not UTF-8 (byte {exc.start})") from None
    if not body.strip():
        raise ReviewError("empty body: expected an admission.k8s.io/v1 AdmissionReview")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ReviewError(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return data


def _request(review: Any) -> dict:
    if not isinstance(review, dict):
        raise ReviewError(f"expected a JSON object (AdmissionReview), got {type(review).__name__}")
    if review.get("apiVersion") != API_VERSION:
        raise ReviewError(f"apiVersion must be {API_VERSION}, got {review.get('apiVersion')!r}")
    if review.get("kind") != KIND:
        raise ReviewError(f"kind must be {KIND}, got {review.get('kind')!r}")
    req = review.get("request")
    if not isinstance(req, dict):
        raise ReviewError("request: missing or not an object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid: missing or not a non-empty string")
    for key in ("kind", "resource"):
        if key in req and not isinstance(req[key], dict):
            raise ReviewError(f"request.{key}: not an object")
    if not isinstance(req.get("operation"), str):
        raise ReviewError("request.operation: missing or not a string")
    return req


def _is_pod(req: dict) -> bool:
    kind = req.get("kind") or {}
    return kind.get("group", "") == "" and kind.get("kind") == "Pod" and not req.get("subResource")


def _check_pod(pod: Any, where: str) -> dict:
    """Shape checks so rendering can index without guarding every access."""
    if not isinstance(pod, dict):
        raise ReviewError(f"{where}: missing or not an object")
    meta = pod.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ReviewError(f"{where}.metadata: not an object")
    for key in ("annotations", "labels"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise ReviewError(f"{where}.metadata.{key}: must map strings to strings")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise ReviewError(f"{where}.spec: missing or not an object")
    for key in ("containers", "initContainers", "ephemeralContainers", "volumes"):
        items = spec.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ReviewError(f"{where}.spec.{key}: not a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ReviewError(f"{where}.spec.{key}[{i}]: not an object with a name")
            if key == "volumes":
                continue
            for sub in ("ports", "env", "volumeMounts"):
                if item.get(sub) is not None and not (
                        isinstance(item[sub], list) and all(isinstance(x, dict) for x in item[sub])):
                    raise ReviewError(f"{where}.spec.{key}[{i}].{sub}: not a list of objects")
            for sub in ("securityContext", "startupProbe", "livenessProbe", "readinessProbe"):
                if item.get(sub) is not None and not isinstance(item[sub], dict):
                    raise ReviewError(f"{where}.spec.{key}[{i}].{sub}: not an object")
    if spec.get("securityContext") is not None and not isinstance(spec["securityContext"], dict):
        raise ReviewError(f"{where}.spec.securityContext: not an object")
    return pod


def _namespace(req: dict, pod: dict) -> str:
    ns = req.get("namespace") or (pod.get("metadata") or {}).get("namespace")
    if not isinstance(ns, str) or not ns:
        raise ReviewError("request.namespace: missing (pods are namespaced)")
    return ns


def _pod_name(pod: dict) -> str:
    meta = pod.get("metadata") or {}
    return meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "<unnamed>")


def _respond(uid: str, allowed: bool, *, patch: list[dict] | None = None,
             warnings: tuple[str, ...] | list[str] = (), code: int = 400, reason: str = "BadRequest",
             message: str = "") -> dict:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if not allowed:
        response["status"] = {"status": "Failure", "code": code, "reason": reason, "message": message}
    if warnings:
        response["warnings"] = list(warnings)
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _without_managed_fields(pod: dict) -> dict:
    meta = pod.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        pod = copy.copy(pod)
        pod["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return pod


def _reject(uid: str, pod: dict, problems: list[str], *, code: int = 400, reason: str = "BadRequest",
            outcome: str = "rejected", lead: str = "") -> Result:
    message = f"palisade: pod {_pod_name(pod)}: {lead}{'; '.join(problems)}"
    return Result(_respond(uid, False, code=code, reason=reason, message=message), outcome, reason=message)


def _ignored(namespace: str, config: InjectorConfig) -> bool:
    return namespace in ALWAYS_IGNORED_NAMESPACES or namespace in config.ignored_namespaces


def mutate(review: Any, config: InjectorConfig) -> Result:
    """The ``/mutate`` endpoint: inject the sidecar into every pod that is not already protected.

    Whether a pod is protected is decided by ``protection.inspect`` (re-render and compare),
    never by the ``palisade.dev/status`` annotation. Containers under the reserved names that
    are not exactly what the injector renders are refused, naming the differing field.
    """
    req = _request(review)
    uid = req["uid"]
    if not _is_pod(req) or req["operation"] != "CREATE":
        return Result(_respond(uid, True), "skipped", reason="not a pod CREATE")
    pod = _without_managed_fields(_check_pod(req.get("object"), "request.object"))
    namespace = _namespace(req, pod)
    if _ignored(namespace, config):
        return Result(_respond(uid, True), "skipped", reason=f"namespace {namespace} is never injected")
    mounts = guard.reserved_mounts(pod)
    if mounts:
        return _reject(uid, pod, mounts)
    try:
        if protection.reserved_present(pod["spec"]):
            fixed = protection.repair(pod, config)
            verdict = protection.inspect(fixed if fixed is not None else pod, config)
            if not verdict.protected:
                return _reject(uid, pod, [verdict.summary()], lead=(
                    f"containers named {INIT_NAME}/{SIDECAR_NAME} are reserved for the Palisade sidecar and "
                    "these are not what the injector renders (remove them and let the injector add its own): "))
            if fixed is None:
                return Result(_respond(uid, True), "skipped", reason="already protected")
            patch = make_patch(pod, fixed)
            return Result(_respond(uid, True, patch=patch), "repaired", patch, "repaired order/probe ports")
        decision = decide(pod, namespace, config)
        if not decision.inject:
            return Result(_respond(uid, True, warnings=decision.warnings), "skipped", reason=decision.reason)
        rendered = render(pod, config)
    except (AnnotationError, InjectError) as exc:
        message = f"palisade: pod {_pod_name(pod)}: {exc}"
        return Result(_respond(uid, False, message=message), "rejected", reason=str(exc))
    patch = make_patch(pod, rendered.pod)
    return Result(_respond(uid, True, patch=patch, warnings=decision.warnings + rendered.warnings),
                  "injected", patch, decision.reason)


def is_protected(pod: dict, config: InjectorConfig | None = None) -> bool:
    """The exact sidecar is there (``protection.inspect``); the status annotation is not consulted."""
    return protection.inspect(pod, config or InjectorConfig()).protected


def _why_unprotected(pod: dict, namespace: str, verdict: protection.Protection) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork") is True:
        return ("uses hostNetwork: true, which Palisade cannot protect; CDE workloads must not "
                "share the node's network")
    if isinstance(spec.get("os"), dict) and spec["os"].get("name") == "windows":
        return "is a Windows pod, which Palisade cannot protect (the redirect rules need Linux nftables)"
    try:
        flag = inject_flag(meta.get("labels") or {}, meta.get("annotations") or {})
    except AnnotationError as exc:
        return f"has an invalid opt-out setting ({exc})"
    if flag is False:
        return 'opts out of the sidecar (palisade.dev/inject: "false"); remove the opt-out'
    if verdict.present:
        return ("carries containers under the reserved names that are not the sidecar the injector renders: "
                f"{verdict.summary()}; remove them and let the injector add its own")
    meshes = sorted({c.get("name") for key in ("initContainers", "containers") for c in spec.get(key) or []
                     if isinstance(c, dict) and c.get("name") in OTHER_MESH_PROXIES})
    if meshes:
        return (f"runs {', '.join(meshes)} and was therefore not injected; set injectAlongsideOtherMeshes in the "
                "injector config or remove the other mesh's proxy")
    if ANN_STATUS in (meta.get("annotations") or {}):
        return (f"carries the {ANN_STATUS} annotation but the {INIT_NAME} and {SIDECAR_NAME} containers "
                "are not both present; remove the annotation so the injector adds them")
    return (f"was not injected: label namespace {namespace} with palisade.dev/injection=enabled "
            "and check that the palisade-injector webhook is running")


def _guarded_view(pod: Any) -> Any:
    """What the guard judges: the spec, Palisade's annotations and labels, the CDE label."""
    if not isinstance(pod, dict):
        return None
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    pick = {}
    for key in ("annotations", "labels"):
        values = meta.get(key) if isinstance(meta.get(key), dict) else {}
        pick[key] = {k: v for k, v in values.items() if "palisade.dev/" in k}
    return pod.get("spec"), pick


def _is_cde(pod: Any) -> bool:
    if not isinstance(pod, dict) or not isinstance(pod.get("metadata"), dict):
        return False
    labels = pod["metadata"].get("labels")
    return isinstance(labels, dict) and labels.get(LABEL_SCOPE) == "cde"


def _ephemeral(uid: str, req: dict, config: InjectorConfig, grants: frozenset[str]) -> Result:
    """``pods/ephemeralcontainers``: ``kubectl debug`` into a running pod."""
    pod = _check_pod(req.get("object"), "request.object")
    old = req.get("oldObject")
    old_spec = old.get("spec") if isinstance(old, dict) and isinstance(old.get("spec"), dict) else {}
    old_names = {c.get("name") for c in old_spec.get("ephemeralContainers") or [] if isinstance(c, dict)}
    new = [c for c in pod["spec"].get("ephemeralContainers") or [] if c["name"] not in old_names]
    names = [c["name"] for c in new]
    refusals = guard.reserved_mounts(pod, only=names)
    refusals += [f"ephemeral container {c['name']}: the name is reserved for Palisade"
                 for c in new if c["name"] in guard.OURS]
    dangerous = guard.dangerous_fields(pod, only=names, pod_level=False)
    cde = _is_cde(pod) or _is_cde(old)
    warnings: list[str] = []
    if cde:
        namespace = _namespace(req, pod)
        if guard.GRANT_DEBUG not in grants and new:
            refusals.insert(0, f"ephemeral containers are refused in CDE pods unless namespace {namespace} "
                               f"carries the label {guard.GRANT_LABELS[guard.GRANT_DEBUG]}=true (set by a "
                               "cluster admin)")
        refusals += dangerous + guard.undropped_net_raw(pod, only=names)
        refusals += [f"ephemeral container {c['name']}: targetContainerName {c['targetContainerName']} is "
                     "Palisade's own container" for c in new if c.get("targetContainerName") in guard.OURS]
    elif config.dangerous_outside_cde == "refuse":
        refusals += dangerous
    else:
        warnings += [f"palisade: {d}" for d in dangerous]
    if refusals:
        return _reject(uid, pod, refusals, code=403, reason="Forbidden", outcome="denied")
    return Result(_respond(uid, True, warnings=warnings), "allowed", reason="ephemeral containers allowed")


def _connect(uid: str, req: dict) -> Result:
    """``kubectl exec``/``attach`` (CONNECT): never into Palisade's own containers.

    The sidecar's interpreter carries NET_ADMIN as a file capability (docs/injector.md), so a
    shell exec'd into it could flush the pod's nft table. The request names the container in
    its PodExecOptions/PodAttachOptions object; the pod itself is not part of the request.
    The runbook's read-only commands (``guard.SIDECAR_EXEC_ALLOWED``, ``cat`` of a capture
    file) stay allowed, matched on the exact argv."""
    options = req.get("object")
    container = options.get("container") if isinstance(options, dict) else None
    read_only = (req["subResource"] == "exec" and container == SIDECAR_NAME
                 and guard.sidecar_exec_allowed(options.get("command")))
    if container in guard.OURS and not read_only:
        message = (f"palisade: pod {req.get('name') or '<unnamed>'}: {req['subResource']} into the Palisade "
                   f"container {container} is refused (it holds NET_ADMIN and could dismantle the firewall); "
                   "use its logs and admin port (15020), or a read-only command: python -m firewall redirect "
                   "show, cat /var/run/palisade/pcap/FILE")
        return Result(_respond(uid, False, code=403, reason="Forbidden", message=message), "denied",
                      reason=message)
    return Result(_respond(uid, True), "allowed", reason=f"{req['subResource']} into an app container")


def validate(review: Any, config: InjectorConfig | None = None, grants: frozenset[str] = frozenset()) -> Result:
    """The ``/validate`` endpoint: the admission guard.

    CDE pods (``pci.palisade.dev/scope: cde``) must be protected (``protection.inspect``),
    carry no exception the platform team did not grant, and no field that could dismantle
    the firewall; every pod is refused a mount of the sidecar's capture volume; outside the
    CDE dangerous fields are warnings (or refusals, by config). ``grants`` are the namespace's
    admin grants, which the API server conveys through the webhook path (see guard.py).
    """
    config = config or InjectorConfig()
    req = _request(review)
    uid = req["uid"]
    resource = req.get("resource") or {}
    if resource.get("group", "") == "" and resource.get("resource") == "pods" and \
            req.get("subResource") in ("exec", "attach"):
        return _connect(uid, req)
    kind = req.get("kind") or {}
    if kind.get("group", "") != "" or kind.get("kind") != "Pod":
        return Result(_respond(uid, True), "allowed", reason="not a pod")
    if req.get("subResource") == "ephemeralcontainers":
        return _ephemeral(uid, req, config, grants)

    if req.get("subResource") or req["operation"] not in ("CREATE", "UPDATE"):
        return Result(_respond(uid, True), "allowed", reason="not a pod CREATE/UPDATE")
    pod = _check_pod(req.get("object"), "request.object")
    namespace = _namespace(req, pod)
    old = req.get("oldObject") if req["operation"] == "UPDATE" else None
    cde = _is_cde(pod)
    if old is not None and _is_cde(old) and not cde:
        return _reject(uid, pod, [f"the label {LABEL_SCOPE}=cde cannot be removed from a running pod; delete "
                                  "the pod and create it without the label"],
                       code=403, reason="Forbidden", outcome="denied")
    verdict = protection.inspect(pod, config) if cde else None
    if old is not None and _is_cde(old) and _guarded_view(old) == _guarded_view(pod):
        # Nothing the guard judges changed (finalizers, status-ish metadata, graceful deletion):
        # refusing would only leave the pod stuck. It cannot have become less protected.
        warnings = []
        if verdict is not None and not verdict.protected:
            warnings.append(f"palisade: CDE pod {_pod_name(pod)} runs without the Palisade sidecar "
                            f"({_why_unprotected(pod, namespace, verdict)}); recreate it")
        return Result(_respond(uid, True, warnings=warnings), "allowed", reason="existing CDE pod unchanged")
    refusals = guard.reserved_mounts(pod)
    dangerous = guard.dangerous_fields(pod)
    warnings = []
    if cde:
        assert verdict is not None
        if not verdict.protected:
            refusals.insert(0, f"it is labelled {LABEL_SCOPE}=cde but {_why_unprotected(pod, namespace, verdict)}")
        refusals += guard.cde_exceptions(pod, namespace, config, grants)
        refusals += dangerous + guard.undropped_net_raw(pod)
        if old is not None and not _is_cde(old) and not verdict.protected:
            refusals.append("the sidecar cannot be added to a running pod: delete it and create it with the label")
    elif config.dangerous_outside_cde == "refuse":
        refusals += dangerous
    else:
        warnings = [f"palisade: {d}" for d in dangerous]
    if refusals:
        lead = f"refused in namespace {namespace}: " if cde else ""
        result = _reject(uid, pod, refusals, code=403, reason="Forbidden", outcome="denied", lead=lead)
        if cde:
            message = result.review["response"]["status"]["message"] + (
                ". CDE workloads must run behind the Palisade firewall (PCI DSS 1.3)")
            result.review["response"]["status"]["message"] = message
            result.reason = message
        return result
    return Result(_respond(uid, True, warnings=warnings), "allowed",
                  reason="protected CDE pod" if cde else "not in the CDE")


def handle(endpoint: str, body: bytes | str, config: InjectorConfig,
           grants: frozenset[str] = frozenset()) -> Result:
    """Decode and answer one review for ``endpoint`` ("mutate" or "validate")."""
    review = decode(body)
    if endpoint == "mutate":
        return mutate(review, config)
    if endpoint == "validate":
        return validate(review, config, grants)
    raise ValueError(f"unknown endpoint {endpoint!r}")
