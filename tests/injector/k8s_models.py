"""Strict check of Kubernetes objects against the ``kubernetes`` client's OpenAPI models.

The client's own deserialiser ignores unknown fields and coerces types, so a
typo such as ``restartpolicy`` or a string where an int belongs would pass. This
walks the object with each model's ``openapi_types``/``attribute_map``: unknown
fields and wrong JSON types are errors with their path; the client's
deserialiser then runs too, which enforces required fields.
"""

from __future__ import annotations

import json
import re

import kubernetes.client
from kubernetes.client import models

KINDS = {
    ("v1", "Pod"): "V1Pod",
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"): "V1MutatingWebhookConfiguration",
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"): "V1ValidatingWebhookConfiguration",
}

_DICT = re.compile(r"^(?:dict\(([^,]+), (.+)\)|Dict\[([^,]+), (.+)\])$")
_LIST = re.compile(r"^(?:list|List)\[(.+)\]$")


def _errors(value: object, type_name: str, path: str) -> list[str]:
    lm = _LIST.match(type_name)
    if lm:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        out: list[str] = []
        for i, item in enumerate(value):
            out += _errors(item, lm.group(1), f"{path}[{i}]")
        return out
    m = _DICT.match(type_name)
    if m:
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        out = []
        for k, v in value.items():
            out += _errors(v, m.group(2) or m.group(4), f"{path}.{k}")
        return out
    if type_name == "str" or type_name in ("datetime", "date"):
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r}"]
    if type_name in ("bytes", "bytearray"):  # base64 in JSON (Secret.data)
        import base64
        import binascii

        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError):
            return [f"{path}: expected base64 data"]
        return []
    if type_name == "int":
        return [] if isinstance(value, int) and not isinstance(value, bool) else [
            f"{path}: expected an integer, got {value!r}"]
    if type_name == "bool":
        return [] if isinstance(value, bool) else [f"{path}: expected a boolean, got {value!r}"]
    if type_name == "float":
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [
            f"{path}: expected a number, got {value!r}"]
    if type_name == "object":  # IntOrString, Quantity, RawExtension
        return [] if isinstance(value, (int, str, dict)) and not isinstance(value, bool) else [
            f"{path}: unexpected value {value!r}"]
    cls = getattr(models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_name}), got {type(value).__name__}"]
    reverse = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    out = []
    for key, item in value.items():
        if key not in reverse:
            out.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        out += _errors(item, cls.openapi_types[reverse[key]], f"{path}.{key}")
    return out


def check(obj: dict) -> list[str]:
    """Errors for one manifest (empty list when valid)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in KINDS:
        return [f"no model known for {key}"]
    type_name = KINDS[key]
    errors = _errors(obj, type_name, obj["kind"])
    if not errors:
        client = kubernetes.client.ApiClient()
        try:
            client.deserialize(json.dumps(obj), type_name, "application/json")
        except (ValueError, TypeError) as exc:
            errors.append(f"{obj['kind']}: {exc}")
    return errors
