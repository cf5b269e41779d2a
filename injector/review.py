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

from injector import ANN_STATUS, INIT_NAME, LABEL_SCOPE, SIDECAR_NAME
from injector.annotations import AnnotationError, inject_flag
from injector.config import InjectorConfig
from injector.decision import decide
from injector.inject import InjectError, render, repair_order
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
    for key in ("containers", "initContainers", "volumes"):
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


def mutate(review: Any, config: InjectorConfig) -> Result:
    """The ``/mutate`` endpoint: inject the sidecar when the truth table says so."""
    req = _request(review)
    uid = req["uid"]
    if not _is_pod(req) or req["operation"] != "CREATE":
        return Result(_respond(uid, True), "skipped", reason="not a pod CREATE")
    pod = _without_managed_fields(_check_pod(req.get("object"), "request.object"))
    namespace = _namespace(req, pod)
    try:
        decision = decide(pod, namespace, config)
        if not decision.inject:
            if ANN_STATUS in ((pod.get("metadata") or {}).get("annotations") or {}):
                fixed = repair_order(pod)
                if fixed is not None:
                    patch = make_patch(pod, fixed)
                    return Result(_respond(uid, True, patch=patch), "repaired", patch, "init order repaired")
            return Result(_respond(uid, True, warnings=decision.warnings), "skipped", reason=decision.reason)
        rendered = render(pod, config)
    except (AnnotationError, InjectError) as exc:
        message = f"palisade: pod {_pod_name(pod)}: {exc}"
        return Result(_respond(uid, False, message=message), "rejected", reason=str(exc))
    patch = make_patch(pod, rendered.pod)
    return Result(_respond(uid, True, patch=patch, warnings=decision.warnings + rendered.warnings),
                  "injected", patch, decision.reason)


def is_protected(pod: dict) -> bool:
    """The sidecar is really there: status annotation *and* both containers in place."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if ANN_STATUS not in (meta.get("annotations") or {}):
        return False
    inits = {c.get("name"): c for c in spec.get("initContainers") or []}
    apps = {c.get("name") for c in spec.get("containers") or []}
    sidecar_ok = (inits.get(SIDECAR_NAME, {}).get("restartPolicy") == "Always") or SIDECAR_NAME in apps
    return INIT_NAME in inits and sidecar_ok and spec.get("hostNetwork") is not True


def _why_unprotected(pod: dict, namespace: str) -> str:
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
    if ANN_STATUS in (meta.get("annotations") or {}):
        return (f"carries the {ANN_STATUS} annotation but the {INIT_NAME} and {SIDECAR_NAME} containers "
                "are not both present; remove the annotation so the injector adds them")
    return (f"was not injected: label namespace {namespace} with palisade.dev/injection=enabled "
            "and check that the palisade-injector webhook is running")


def validate(review: Any) -> Result:
    """The ``/validate`` endpoint: no pod labelled ``pci.palisade.dev/scope: cde`` runs unprotected."""
    req = _request(review)
    uid = req["uid"]
    if not _is_pod(req) or req["operation"] not in ("CREATE", "UPDATE"):
        return Result(_respond(uid, True), "allowed", reason="not a pod CREATE/UPDATE")
    pod = _check_pod(req.get("object"), "request.object")
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(LABEL_SCOPE) != "cde" or is_protected(pod):
        return Result(_respond(uid, True), "allowed", reason="protected or not in the CDE")
    namespace = _namespace(req, pod)
    if req["operation"] == "UPDATE":
        old = req.get("oldObject")
        old_labels = ((old or {}).get("metadata") or {}).get("labels") or {} if isinstance(old, dict) else {}
        if old_labels.get(LABEL_SCOPE) == "cde":
            # Already running (created before the webhook existed, say): refusing its updates
            # would only block finalizers and graceful deletion. Warn instead.
            warning = (f"palisade: CDE pod {_pod_name(pod)} runs without the Palisade sidecar "
                       f"({_why_unprotected(pod, namespace)}); recreate it")
            return Result(_respond(uid, True, warnings=[warning]), "allowed", reason="existing CDE pod")
    message = (f"palisade: pod {_pod_name(pod)} in namespace {namespace} is labelled "
               f"{LABEL_SCOPE}=cde but {_why_unprotected(pod, namespace)}. CDE workloads must run "
               "behind the Palisade firewall (PCI DSS 1.3)")
    return Result(_respond(uid, False, code=403, reason="Forbidden", message=message), "denied",
                  reason=message)


def handle(endpoint: str, body: bytes | str, config: InjectorConfig) -> Result:
    """Decode and answer one review for ``endpoint`` ("mutate" or "validate")."""
    review = decode(body)
    if endpoint == "mutate":
        return mutate(review, config)
    if endpoint == "validate":
        return validate(review)
    raise ValueError(f"unknown endpoint {endpoint!r}")
