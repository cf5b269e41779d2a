"""Run a document through both validators and say whether they agree.

The run-time validator (``firewall.policy.model.validate``) replaced pydantic in the
sidecar; the pydantic models (``firewall.policy.schema``) are the reference.  Agreement
means: both accept and build the same values (types included: ``port: "80"`` is the int
80 in both), or both reject with the same errors - type, location and message, in the
same order (the loader prints them sorted by line with a stable sort, so order within a
line is visible to users).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from firewall.policy import model as policy_model
from firewall.policy import schema as policy_schema


def canon(value: Any) -> Any:
    """A comparable form that keeps types apart (True is not 1, "1" is not 1)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {canon(f.name): canon(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {canon(k): canon(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canon(v) for v in value]
    return (type(value).__name__, value)


def reference(kind: str, value: Any) -> tuple[str, Any]:
    model = policy_schema.MODELS[kind]
    try:
        return "ok", canon(model.model_validate(value).model_dump())
    except ValidationError as exc:
        return "errors", [(e["type"], tuple(e["loc"]), e["msg"]) for e in exc.errors(include_url=False)]


def runtime(kind: str, value: Any) -> tuple[str, Any]:
    try:
        return "ok", canon(policy_model.validate(policy_model.MODELS[kind], value))
    except policy_model.PolicyValidationError as exc:
        return "errors", [(e["type"], tuple(e["loc"]), e["msg"]) for e in exc.errors()]


def assert_agree(kind: str, value: Any) -> tuple[str, Any]:
    ref, got = reference(kind, value), runtime(kind, value)
    assert got == ref, f"validators disagree on {value!r}:\n pydantic: {ref}\n runtime:  {got}"
    return got
