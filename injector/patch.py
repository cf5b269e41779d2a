"""JSON Patch (RFC 6902) between the original and the mutated pod, readable by a human.

A generic list diff (``jsonpatch.make_patch``) turns "insert ``palisade`` before
``app``" into a field-by-field rewrite of ``containers/0`` into the sidecar plus a
re-add of ``app`` at index 1. Correct, but an auditor reading the patch (or an
API-server audit log) sees the app container being replaced. Lists of named
objects (containers, volumes, env ...) are therefore diffed by name: when the old
list is the new one with items inserted, the patch is one ``add`` per new item.
Anything else falls back to replacing the value, which is always correct.
"""

from __future__ import annotations

from typing import Any


def _token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _named(items: list) -> list[str] | None:
    names = [i.get("name") if isinstance(i, dict) else None for i in items]
    if any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    return names


def _list_ops(old: list, new: list, path: str, ops: list[dict]) -> None:
    if old == new:
        return
    old_names, new_names = _named(old), _named(new)
    if old_names is not None and new_names is not None and set(old_names) <= set(new_names):
        # Insertions only, old order kept, matching items diffed in place?
        kept = [n for n in new_names if n in old_names]
        if kept == old_names:
            by_name = dict(zip(old_names, old, strict=True))
            for index, (name, item) in enumerate(zip(new_names, new, strict=True)):
                if name in by_name:
                    _diff(by_name[name], item, f"{path}/{index}", ops)
                else:
                    ops.append({"op": "add", "path": f"{path}/{index}", "value": item})
            return
    if len(old) < len(new) and new[: len(old)] == old:
        for item in new[len(old):]:
            ops.append({"op": "add", "path": f"{path}/-", "value": item})
        return
    ops.append({"op": "replace", "path": path, "value": new})


def _diff(old: Any, new: Any, path: str, ops: list[dict]) -> None:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_token(key)}"})
        for key, value in new.items():
            sub = f"{path}/{_token(key)}"
            if key not in old:
                ops.append({"op": "add", "path": sub, "value": value})
            else:
                _diff(old[key], value, sub, ops)
        return
    if isinstance(old, list) and isinstance(new, list):
        _list_ops(old, new, path, ops)
        return
    ops.append({"op": "replace", "path": path, "value": new})


def make_patch(old: dict, new: dict) -> list[dict]:
    """Operations that turn ``old`` into ``new`` (both JSON-compatible dicts)."""
    ops: list[dict] = []
    _diff(old, new, "", ops)
    return ops
