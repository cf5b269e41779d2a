"""The JSON Schema of policy documents, generated from the run-time model's field tables.

``firewall/policy/model.py`` is the one description of a policy document: one table per
record (``_SPECS``) says each field's key, type, default, description and checks.  This
module turns those tables into the JSON Schema that ``python -m firewall policy schema``
prints, ``firewall/schema/policy.schema.json`` ships (a test keeps it up to date) and
``docs/policy-reference.md`` is rendered from - so an editor, the docs and the loader
can no longer drift apart through a second, hand-kept copy of the model.

A JSON Schema cannot say everything the loader's checks say.  Each ``check_*`` the tables
use is either stated here (``_CHECKS``: a pattern, a length, an if/then) or listed in
``LOADER_ONLY_CHECKS`` with the reason; ``tests/policy/test_schema_differential.py``
requires, for a few hundred generated documents, that the schema accepts exactly what the
loader accepts except where a listed check or one of the loader's lax coercions decides.
The schema states the canonical spelling of every value: the coercions the loader keeps
for YAML written by hand (``port: "80"``, ``capture: "yes"``, ``appProto: HTTP``) are
accepted by the loader and flagged by an editor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from firewall.policy import model as m

SCHEMA_ID = "https://palisade.dev/schemas/v1/policy.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
TITLE = "Palisade FirewallPolicy / ClusterFirewallPolicy (palisade.dev/v1)"

Schema = dict[str, Any]

_NULL: Schema = {"type": "null"}
_NOT_NULL: Schema = {"not": _NULL}


def _labels() -> Schema:
    return {"type": "object", "propertyNames": {"type": "string", "pattern": m._LABEL_KEY.pattern},
            "additionalProperties": {"type": "string", "pattern": m._LABEL_VALUE.pattern}}


def _set(*keys: str) -> Schema:
    """``keys`` present and not null (the loader reads an explicit null as absent)."""
    return {"required": list(keys), "properties": {k: _NOT_NULL for k in keys}}


def _absent(*keys: str) -> Schema:
    """``keys`` absent or null."""
    return {"properties": {k: _NULL for k in keys}}


_NO_FQDN_PEER: Schema = {"items": {"properties": {"fqdn": _NULL}}}
_PEER_FIELDS = ("namespace", "labels", "scope", "cidr", "fqdn")

#: Checks a JSON Schema states exactly: check -> the keywords it adds.  A field check's
#: keywords apply to the field's (non-null) value, a record check's to the record.
_CHECKS: dict[Callable[..., Any], Schema] = {
    m.check_dns_name: {"pattern": m._NAME.pattern},
    m.check_dlp_name: {"pattern": m._NAME.pattern},
    m.check_rule_name: {"pattern": m._NAME.pattern, "not": {"enum": sorted(m.RESERVED_RULE_NAMES)}},
    m.check_labels: _labels(),
    m.check_path_prefix: {"pattern": "^/"},
    m.check_packs: {"minItems": 1},
    m.check_policy_namespace: {"properties": {"metadata": {
        "required": ["namespace"], "properties": {"namespace": {"type": "string", "minLength": 1}}}}},
    m.check_cluster_namespace: {"properties": {"metadata": {"properties": {"namespace": {"enum": [None, ""]}}}}},
    m.check_peer_shape: {
        "anyOf": [_set(k) for k in _PEER_FIELDS],
        "if": _set("fqdn"), "then": _absent(*(k for k in _PEER_FIELDS if k != "fqdn")),
    },
    m.check_ingress_no_fqdn: {"properties": {"from": _NO_FQDN_PEER}},
    m.check_cluster_direction: {"allOf": [
        {"if": {"required": ["direction"], "properties": {"direction": {"const": "ingress"}}},
         "then": _absent("to")},
        {"if": {"required": ["direction"], "properties": {"direction": {"const": "egress"}}},
         "then": _absent("from")},
        {"properties": {"from": _NO_FQDN_PEER}},
    ]},
    m.check_dlp_direction: {"allOf": [
        {"not": _set("from", "to")},
        {"if": {"required": ["direction"], "properties": {"direction": {"const": "ingress"}}},
         "then": _absent("to")},
        {"if": {"required": ["direction"], "properties": {"direction": {"const": "egress"}}},
         "then": _absent("from")},
        {"properties": {"from": _NO_FQDN_PEER}},
    ]},
}

#: Checks only the loader makes, and why a JSON Schema cannot: the differential test
#: excludes a document the loader refuses only through these.
LOADER_ONLY_CHECKS: dict[str, str] = {
    "check_cidr": "parses the address (ipaddress): octet ranges, IPv6 compression, prefix lengths",
    "check_fqdn": "trims, lower-cases and drops a trailing dot before matching",
    "check_host": "a DNS name after normalising, or else any IP address ipaddress parses",
    "check_sni": "trims, lower-cases and drops a trailing dot before matching",
    "check_qname_suffix": "trims dots and lower-cases before matching; must not be empty",
    "check_methods": "trims and upper-cases (Unicode case mapping) before matching",
    "check_commands": "trims and upper-cases (Unicode case mapping) before matching",
    "check_verbs": "trims and upper-cases (Unicode case mapping) before matching",
    "check_protocol": "any case of a name, or a decimal number 1-254 given as text or number",
    "check_icmp_types": "names of either ICMP version or numbers 0-255, as text or number",
    "check_port_range": "depends on the protocol after normalising (tcp, 6 and TCP are one protocol)",
    "check_rule_consistent": "relates L7 sections, the normalised appProto, protocols and exception",
    "check_spec_names": "rule names unique across the ingress, egress and dlp lists",
    "check_cluster_spec_names": "rule names unique across the rules and dlp lists",
}


#: What a ``before`` hook lets through besides the field's own type (the canonical spellings;
#: any-case and padded variants stay the loader's lax coercions, and so does ``minVersion: 1.2``
#: unquoted: a YAML float, which the loader reads as "1.2" but also reads 1.25 as "1.2").
_BEFORE: dict[Callable[[Any], Any], Callable[[m._Field], Schema]] = {
    m.protocol_before: lambda f: {"type": ["string", "integer"]},
    m.icmp_types_before: lambda f: {"type": "array", "items": {"type": ["string", "integer"]}},
    m.app_proto_before: lambda f: {"enum": [*m.APP_PROTOS, *m.APP_PROTO_ALIASES]},
}


def _ref(cls: type) -> Schema:
    return {"$ref": f"#/$defs/{cls.__name__}"}


def type_schema(t: Any) -> Schema:
    """The schema of one validator type of model.py (``_Str``, ``_Int``, ``_List``, ...)."""
    if isinstance(t, m._Opt):
        return {"anyOf": [type_schema(t.inner), _NULL]}
    if isinstance(t, m._Str):
        return {"type": "string"}
    if isinstance(t, m._Int):
        return {"type": "integer", "minimum": t.ge, "maximum": t.le}
    if isinstance(t, m._Bool):
        return {"type": "boolean"}
    if isinstance(t, m._Lit):
        return {"const": t.ordered[0]} if len(t.ordered) == 1 else {"enum": list(t.ordered)}
    if isinstance(t, m._List):
        return {"type": "array", "items": type_schema(t.item)}
    if isinstance(t, m._StrMap):
        return {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {"type": "string"}}
    if isinstance(t, m._Rec):
        return _ref(t.cls)
    raise TypeError(f"no JSON Schema for validator type {type(t).__name__}")


def _default(f: m._Field) -> Any:
    value = f.factory() if f.factory is not None else f.default
    if dataclasses.is_dataclass(value):
        return {}  # a record default (selector) is the record with every field at its default
    return value


def field_schema(f: m._Field) -> Schema:
    nullable = isinstance(f.type, m._Opt)
    inner = f.type.inner if nullable else f.type
    widen = _BEFORE.get(f.before) if f.before is not None else None
    value = widen(f) if widen is not None else type_schema(inner)
    if f.after is not None and f.after in _CHECKS:
        value = {**value, **_CHECKS[f.after]}
    out = {"anyOf": [value, _NULL]} if nullable else dict(value)
    if f.default is not m._REQUIRED or f.factory is not None:
        out["default"] = _default(f)
    if f.doc:
        out["description"] = f.doc
    return out


def _description(cls: type) -> str | None:
    doc = cls.__doc__ or ""
    return None if doc.startswith(f"{cls.__name__}(") else doc.strip() or None  # dataclass's own text


def record_schema(cls: type) -> Schema:
    spec = m._SPECS[cls]
    out: Schema = {"type": "object", "title": cls.__name__}
    if desc := _description(cls):
        out["description"] = desc
    out["properties"] = {f.key: field_schema(f) for f in spec.fields}
    required = [f.key for f in spec.fields if f.default is m._REQUIRED and f.factory is None]
    if required:
        out["required"] = required
    out["additionalProperties"] = False
    stated = [_CHECKS[c] for c in spec.checks if c in _CHECKS]
    if stated:
        out["allOf"] = stated
    return out


def unclassified_checks() -> list[str]:
    """Checks the tables use that are neither stated in the schema nor listed as loader-only
    (a new check must be one or the other; a test keeps this empty)."""
    used = {f.after for s in m._SPECS.values() for f in s.fields if f.after} | {
        c for s in m._SPECS.values() for c in s.checks}
    return sorted(c.__name__ for c in used if c not in _CHECKS and c.__name__ not in LOADER_ONLY_CHECKS)


def json_schema() -> Schema:
    """The JSON Schema of one policy document (either kind), as ``policy schema`` prints it."""
    defs = {cls.__name__: record_schema(cls) for cls in m._SPECS}
    kinds = {kind: f"#/$defs/{cls.__name__}" for kind, cls in m.MODELS.items()}
    return {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        "title": TITLE,
        "oneOf": [{"$ref": ref} for ref in kinds.values()],
        "discriminator": {"propertyName": "kind", "mapping": kinds},
        "$defs": defs,
    }
