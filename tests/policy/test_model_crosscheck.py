"""The run-time validator and the pydantic reference agree (see tests/policy/crosscheck.py).

Inputs: every policy document in the repository (YAML files, ```yaml blocks in the docs,
policy texts inside Python sources, the policy fuzzer's corpus), the same documents
mutated, and documents generated from the schema with hypothesis - valid values, values
pydantic coerces (``"80"``, ``"yes"``, ``1.2``), and values of every type YAML can
produce in every place.  The loader's error cases run through both validators as well
(``conftest.py`` wraps every validation the tests in this directory do).
"""

from __future__ import annotations

import ast
import copy
import datetime
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firewall.policy import model as pm
from firewall.policy.yaml import YamlSourceError, load_documents
from tests.policy.common import ROOT
from tests.policy.crosscheck import assert_agree

_SKIP_DIRS = {".venv", ".git", "node_modules", "__pycache__", ".hypothesis", ".pytest_cache"}


def _texts() -> list[tuple[str, str]]:
    """(where, text) of everything in the repository that may hold a policy document."""
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(ROOT))
            try:
                if name.endswith((".yaml", ".yml")) or rel.startswith("fuzz/corpus/policy"):
                    out.append((rel, path.read_bytes().decode("utf-8", "replace")))
                elif name.endswith(".md"):
                    for i, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", path.read_text(), re.S)):
                        out.append((f"{rel} block {i}", block))
                elif name.endswith(".py") and rel.split("/")[0] in ("firewall", "tests", "benchmarks", "fuzz"):
                    for node in ast.walk(ast.parse(path.read_text())):
                        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                                and "FirewallPolicy" in node.value and "kind" in node.value:
                            out.append((f"{rel}:{node.lineno}", node.value))
            except (OSError, UnicodeDecodeError, SyntaxError):
                continue
    return out


def _documents() -> list[tuple[str, str, Any]]:
    docs = []
    for where, text in _texts():
        try:
            sources = list(load_documents(text, where))
        except YamlSourceError:
            continue
        for src in sources:
            v = src.value
            if isinstance(v, dict) and v.get("kind") in pm.MODELS:
                docs.append((f"{where} doc {src.index}", v["kind"], v))
    return docs


DOCUMENTS = _documents()


def test_the_corpus_is_the_repository() -> None:
    where = {w.split(" doc ")[0].split(":")[0].split(" block ")[0] for w, _, _ in DOCUMENTS}
    assert {"examples/payment-api.yaml", "benchmarks/policy100.yaml", "docs/policy.md",
            "tests/policy/common.py"} <= where, sorted(where)
    if (Path(ROOT) / "fuzz" / "corpus" / "policy").is_dir():  # made by running the fuzzer; not committed
        assert any(w.startswith("fuzz/corpus/policy") for w in where)
    assert len(DOCUMENTS) >= 30


@pytest.mark.parametrize("where,kind,doc", DOCUMENTS, ids=[d[0] for d in DOCUMENTS])
def test_repository_documents(where: str, kind: str, doc: Any) -> None:
    assert_agree(kind, doc)


# --- generated documents --------------------------------------------------------------------

# Values of every type YAML gives, in any place.
JUNK: list[Any] = [None, True, False, 0, 1, -3, 2.5, float("nan"), float("inf"), "", "x", "Bad Value!",
                   [], ["x"], [1], {}, {"a": "b"}, {1: 2}, datetime.date(2026, 11, 1),
                   datetime.datetime(2026, 11, 1, 12, 0), b"x", b"\xff"]
STRINGS = ["a", "web", "payments", "x.y", "Bad_Name", "-bad", "a" * 64, "default-deny", "learn",
           "10.0.0.0/8", "10.0.0.1/24", "fd00::/64", "10.0.0.0/33", "bogus-cidr", "*.example.com",
           "API.Example.COM.", "x..y", "*.", "/v1/charge", "/", "v1", "GET", " post ", "get-x", "1GET",
           "1.2.3.4", "::1", "[::1]", "payment_cards", "*", " ", "", "pci.palisade.dev/scope",
           "app", "k8s-app", "A_b.c", "bad key", "é", b"bytes-ok", b"\xfe", "lone\ud800"]
INTS = [1, 80, 443, 5432, 65535, 0, -1, 65536, 70000, 2 ** 70, True, False, 80.0, 80.5, 1.0e20,
        float("inf"), "80", " 80 ", "+80", "8_0", "80.0", "80.00", "1_0.0", "80.", "0x50", "8__0", "_80",
        "-5", "٨٠", "", "abc", "8\udc00", b"443", b"\xff", None, [80], {"port": 80}]
BOOLS = [True, False, 0, 1, 2, -1, 1.0, 0.0, 2.0, 0.5, "yes", "no", "on", "off", "true", "FALSE", "T",
         "y", "1", "0", "maybe", " yes", "", "y\ud800", b"true", None, []]
LITERAL_EXTRAS = ["Postgres", " HTTP ", "h2", "https", "mariadb", "TCP ", "tcp", "Protect", "1.4", 1.2, 1.0,
                  1.3, 1.25, 1, 1.5, "\ud800"]
KEYS_EXTRA = ["frm", "bogus", "match_labels", "from_", "end_port", "Name", 5, None, True, 1.5, "k\ud800"]

# Values that pass each field's checks (or are coerced to such), for documents that get as far
# as the record checks (L7 sections vs appProto, peer shapes, directions, duplicate names).
VALID: dict[str, list[Any]] = {
    "name": ["a", "web", "x.y", "r1", "r2", "r3"], "namespace": ["a", "payments"],
    "cidr": ["10.0.0.0/8", "fd00::/64", "10.0.0.1/24"], "fqdn": ["*.example.com", "API.Example.COM."],
    "pathPrefix": ["/v1/charge", "/"], "host": ["1.2.3.4", "api.example.com", "*.example.com"],
    "methods": ["GET", " post "], "sni": ["api.example.com", "*.example.com"],
    "qnameSuffix": ["example.com", ".corp."], "commands": ["GET", "flushall"], "verbs": ["select", "INSERT"],
    "packs": ["payment_cards", "*"], "description": ["why", " "],
}
VALID_INTS = [1, 80, 443, 65535, "80", " 8_0 ", 80.0, True, b"443"]
VALID_BOOLS = [True, False, "yes", "off", 0, 1.0]
LABEL_KEYS = ["app", "pci.palisade.dev/scope", "k8s-app"]
LABEL_VALUES = ["web", "cde", "", "a.b_c"]


def _pick(draw, pool: list[Any]) -> Any:
    """A fresh copy: the pools hold lists and dicts that later mutations must not change."""
    return copy.deepcopy(draw(st.sampled_from(pool)))


def _value(draw, t: Any, depth: int, key: str, noisy: bool) -> Any:
    if noisy and draw(st.integers(0, 99)) < 8:
        return _pick(draw, JUNK)
    if isinstance(t, pm._Opt):
        return None if draw(st.integers(0, 9)) == 0 else _value(draw, t.inner, depth, key, noisy)
    if isinstance(t, pm._Str):
        return _pick(draw, STRINGS if noisy or key not in VALID else VALID[key])
    if isinstance(t, pm._Int):
        return _pick(draw, INTS if noisy else VALID_INTS)
    if isinstance(t, pm._Bool):
        return _pick(draw, BOOLS if noisy else VALID_BOOLS)
    if isinstance(t, pm._Lit):
        return draw(st.sampled_from(sorted(t.values) + (LITERAL_EXTRAS if noisy else [])))
    if isinstance(t, pm._List):
        n = draw(st.integers(0 if noisy else 1, 3 if depth < 3 else 1))
        return [_value(draw, t.item, depth + 1, key, noisy) for _ in range(n)]
    if isinstance(t, pm._StrMap):
        n = draw(st.integers(0, 3))
        if not noisy:
            return {k: _pick(draw, LABEL_VALUES) for k in draw(st.lists(st.sampled_from(LABEL_KEYS), max_size=n))}
        keys = draw(st.lists(st.sampled_from(STRINGS[:12] + ["app", "tier", 1, None, 1.5, True]),
                             min_size=n, max_size=n))
        return {k: _pick(draw, STRINGS + [1, None, True]) for k in keys}
    if isinstance(t, pm._Rec):
        return _record(draw, t.cls, depth + 1, noisy)
    raise AssertionError(t)


def _record(draw, cls: type, depth: int = 0, noisy: bool = True) -> dict:
    """A mapping for ``cls``, built from its field table (the reference is pydantic, not the table)."""
    spec = pm._SPECS[cls]
    items: list[tuple[Any, Any]] = []
    for f in spec.fields:
        required = f.default is pm._REQUIRED and f.factory is None
        if draw(st.integers(0, 99)) < ((92 if noisy else 99) if required else (45 if noisy else 30)):
            items.append((f.key, _value(draw, f.type, depth, f.key, noisy)))
    if noisy and draw(st.integers(0, 99)) < 8:
        items.append((draw(st.sampled_from(KEYS_EXTRA)), _pick(draw, ["x", 1, None])))
    items = draw(st.permutations(items))
    return dict(items)


@st.composite
def documents(draw) -> tuple[str, dict]:
    kind = draw(st.sampled_from(sorted(pm.MODELS)))
    doc = _record(draw, pm.MODELS[kind], noisy=draw(st.integers(0, 9)) < 6)
    if draw(st.integers(0, 9)) < 8:  # mostly the right header, so the interesting parts get checked
        doc["apiVersion"], doc["kind"] = pm.API_VERSION, kind
        if draw(st.booleans()):
            md = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {"name": "p"}
            md["name"] = "p"
            if kind == pm.KIND_POLICY:
                md["namespace"] = "ns"
            else:
                md.pop("namespace", None)
            doc["metadata"] = md
    return kind, doc


_EXAMPLES = int(os.environ.get("PALISADE_CROSSCHECK_EXAMPLES", "400"))


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_generated_documents(case: tuple[str, dict]) -> None:
    assert_agree(*case)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value in a document, depth first."""
    out: list[tuple[Any, Any]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in list(items):
        out.append((node, k))
        out.extend(_slots(v))
    return out


@st.composite
def mutated(draw) -> tuple[str, Any]:
    """A repository document with one value somewhere replaced, deleted or added to."""
    _, kind, doc = draw(st.sampled_from(DOCUMENTS))
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = _slots(doc)
        if not paths:
            break
        parent, key = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        pool = JUNK + STRINGS + INTS + BOOLS + LITERAL_EXTRAS
        if op == "replace":
            parent[key] = _pick(draw, pool)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS_EXTRA))] = _pick(draw, pool)
        else:
            parent.append(_pick(draw, pool))
    return kind, doc


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_repository_documents(case: tuple[str, Any]) -> None:
    assert_agree(*case)


@pytest.mark.parametrize("value", INTS + BOOLS + JUNK + LITERAL_EXTRAS + STRINGS, ids=repr)
def test_every_scalar_in_every_scalar_field(value: Any) -> None:
    """Each pool value in an int, bool, literal, nullable-literal and string field."""
    base = {"name": "r", "action": "allow", "direction": "egress"}
    for key in ("capture", "exception", "action", "appProto", "direction", "name", "description"):
        assert_agree(pm.KIND_CLUSTER, {"apiVersion": pm.API_VERSION, "kind": pm.KIND_CLUSTER,
                                       "metadata": {"name": "c"}, "spec": {"rules": [{**base, key: value}]}})
    for key in ("port", "endPort", "protocol"):
        assert_agree(pm.KIND_POLICY, {"apiVersion": pm.API_VERSION, "kind": pm.KIND_POLICY,
                                      "metadata": {"name": "p", "namespace": "n"},
                                      "spec": {"egress": [{"name": "e", "action": "allow",
                                                           "ports": [{"port": 1, key: value}]}],
                                               "default": value, "mode": value}})
    assert_agree(pm.KIND_POLICY, {"apiVersion": pm.API_VERSION, "kind": pm.KIND_POLICY,
                                  "metadata": {"name": "p", "namespace": "n"},
                                  "spec": {"egress": [{"name": "e", "action": "allow",
                                                       "tls": {"minVersion": value}}]}})
