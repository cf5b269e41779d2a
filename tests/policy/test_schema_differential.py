"""The generated JSON Schema and the loader give the same verdict on the same document.

The schema is generated from the model's field tables (``firewall/policy/schema.py``), so it
cannot drift by hand - but a generator can be wrong.  Every document here is judged twice, by
``jsonschema`` against the shipped schema and by the run-time validator the loader uses, and
the two verdicts must be equal.  The only differences allowed are named:

- the loader refuses, the schema accepts: every loader error comes from a check listed in
  ``schema.LOADER_ONLY_CHECKS`` (a check no JSON Schema can state, e.g. CIDR parsing);
- the loader accepts, the schema refuses: every schema error points at a value the loader
  accepted only by coercing it (``port: "80"``, ``capture: "yes"``, ``appProto: HTTP``) - the
  schema states the canonical spelling.

Inputs: every policy document in the repository (YAML files, ```yaml blocks in the docs, policy
texts inside Python sources), those documents mutated, and documents generated from the field
tables: valid values, coercible values and values of every type YAML produces, in every place.
"""

from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import datetime
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firewall.policy import model as pm
from firewall.policy import schema as ps
from firewall.policy.yaml import YamlSourceError, load_documents
from tests.policy.common import ROOT

SCHEMA = ps.json_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
BY_KIND = {kind: jsonschema.Draft202012Validator({"$ref": f"#/$defs/{cls.__name__}", "$defs": SCHEMA["$defs"]})
           for kind, cls in pm.MODELS.items()}


# --- the two verdicts --------------------------------------------------------------------------

def loader_verdict(doc: Any) -> tuple[Any, list[dict[str, Any]]]:
    """(record or None, errors) as ``loader.validate_document`` decides: header first, then
    the record validator."""
    if not isinstance(doc, dict) or doc.get("apiVersion") != pm.API_VERSION:
        return None, [{"type": "header"}]
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in pm.MODELS:
        return None, [{"type": "header"}]
    try:
        return pm.validate(pm.MODELS[kind], doc), []
    except pm.PolicyValidationError as exc:
        return None, exc.errors()


def canon(value: Any) -> Any:
    """A comparable form that keeps types apart (True is not 1, "1" is not 1, b"x" is not "x")."""
    if isinstance(value, dict):
        return sorted((repr(canon(k)), canon(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [canon(v) for v in value]
    return (type(value).__name__, repr(value))


def as_document(built: Any, raw: Any) -> Any:
    """A record in document form (camelCase keys), with only the keys ``raw`` has."""
    if dataclasses.is_dataclass(built) and isinstance(raw, dict):
        return {f.key: as_document(getattr(built, f.attr), raw[f.key])
                for f in pm._SPECS[type(built)].fields if f.key in raw}
    if isinstance(built, list) and isinstance(raw, list) and len(built) == len(raw):
        return [as_document(b, r) for b, r in zip(built, raw, strict=True)]
    return built


def _step(node: Any, key: Any) -> Any:
    if dataclasses.is_dataclass(node):
        return getattr(node, next(f.attr for f in pm._SPECS[type(node)].fields if f.key == key))
    return node[key]


def coerced(raw: Any, built: Any, path: Sequence[Any]) -> bool:
    """The loader changed the value at ``path`` while accepting it (so it was not canonical)."""
    for key in path:
        raw, built = raw[key], _step(built, key)
    return canon(raw) != canon(as_document(built, raw))


def judge(doc: Any) -> str:
    """'accept' or 'reject' when both agree, 'loader-only' or 'coercion' for the allowed
    differences; anything else fails the test with both verdicts."""
    schema_ok = VALIDATOR.is_valid(doc)
    record, errors = loader_verdict(doc)
    if schema_ok == (record is not None):
        return "accept" if schema_ok else "reject"
    if schema_ok:
        unlisted = [e for e in errors if e.get("check") not in ps.LOADER_ONLY_CHECKS]
        assert not unlisted, f"schema accepts, loader refuses {doc!r}:\n {unlisted}"
        return "loader-only"
    schema_errors = list(BY_KIND[doc["kind"]].iter_errors(doc))
    assert schema_errors, f"the whole schema refuses {doc!r} but its {doc['kind']} part accepts it"
    bad = [f"{list(e.absolute_path)}: {e.message}" for e in schema_errors
           if not coerced(doc, record, list(e.absolute_path))]
    assert not bad, f"loader accepts, schema refuses {doc!r}:\n " + "\n ".join(bad)
    return "coercion"


# --- every policy document in the repository ----------------------------------------------------

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


def _documents() -> list[tuple[str, Any]]:
    docs = []
    for where, text in _texts():
        try:
            sources = list(load_documents(text, where))
        except (YamlSourceError, ValueError):
            continue
        for src in sources:
            if isinstance(src.value, dict) and src.value.get("kind") in pm.MODELS:
                docs.append((f"{where} doc {src.index}", src.value))
    return docs


DOCUMENTS = _documents()


def test_the_corpus_is_the_repository() -> None:
    where = {w.split(" doc ")[0].split(":")[0].split(" block ")[0] for w, _ in DOCUMENTS}
    assert {"examples/payment-api.yaml", "benchmarks/policy100.yaml", "docs/policy.md",
            "tests/policy/common.py"} <= where, sorted(where)
    assert len(DOCUMENTS) >= 30


@pytest.mark.parametrize("where,doc", DOCUMENTS, ids=[d[0] for d in DOCUMENTS])
def test_repository_documents(where: str, doc: Any) -> None:
    judge(doc)


def test_shipped_examples_are_canonical() -> None:
    """What the project ships as examples passes the schema too (an editor shows no error)."""
    shipped = [(w, d) for w, d in DOCUMENTS if w.startswith(("examples/", "benchmarks/", "deploy/"))
               and w.split(" doc ")[0].endswith((".yaml", ".yml"))]
    assert len(shipped) >= 5
    for where, doc in shipped:
        assert VALIDATOR.is_valid(doc), (where, [e.message for e in VALIDATOR.iter_errors(doc)])


# --- generated documents -----------------------------------------------------------------------

class Pick(Protocol):
    """The random choices a generator makes: hypothesis (shrinks) or a seeded Random (counts)."""

    def int(self, lo: int, hi: int) -> int: ...

    def choice(self, pool: Sequence[Any]) -> Any: ...


@dataclasses.dataclass
class RandomPick:
    rng: random.Random

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, pool: Sequence[Any]) -> Any:
        return self.rng.choice(list(pool))


@dataclasses.dataclass
class DataPick:
    data: Any  # hypothesis st.data()

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, pool: Sequence[Any]) -> Any:
        return self.data.draw(st.sampled_from(list(pool)))


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
        float("inf"), "80", " 80 ", "+80", "8_0", "80.0", "0x50", "-5", "٨٠", "", "abc", b"443", None, [80]]
BOOLS = [True, False, 0, 1, 2, -1, 1.0, 0.5, "yes", "no", "on", "off", "true", "FALSE", "maybe", "", None, []]
LITERAL_EXTRAS = ["Postgres", " HTTP ", "h2", "https", "mariadb", "TCP ", "tcp", "6", 6, 6.0, 47, 0, 300,
                  "Protect", "1.4", 1.2, 1.0, 1.25, 1, "\ud800"]
KEYS_EXTRA = ["frm", "bogus", "match_labels", "from_", "end_port", "Name", 5, None, True, 1.5, "k\ud800"]

# Values that pass each field's checks (or are coerced to such), for documents that get as far
# as the record checks (L7 sections vs appProto, peer shapes, directions, duplicate names).
VALID: dict[str, list[Any]] = {
    "name": ["a", "web", "x.y", "r1", "r2", "r3"], "namespace": ["a", "payments"],
    "cidr": ["10.0.0.0/8", "fd00::/64", "10.0.0.1/24"], "fqdn": ["*.example.com", "API.Example.COM."],
    "pathPrefix": ["/v1/charge", "/"], "host": ["1.2.3.4", "api.example.com", "*.example.com"],
    "methods": ["GET", " post "], "sni": ["api.example.com", "*.example.com"],
    "qnameSuffix": ["example.com", ".corp."], "commands": ["GET", "flushall"], "verbs": ["select", "INSERT"],
    "packs": ["payment_cards", "*"], "description": ["why", " "], "protocol": ["TCP", "UDP", "icmp", 6, "47"],
    "icmpTypes": ["echo-request", 8, "0"],
}
VALID_INTS = [1, 80, 443, 65535, 80.0, "80", True]
VALID_BOOLS = [True, False, "yes", 0]
LABEL_KEYS = ["app", "pci.palisade.dev/scope", "k8s-app"]
LABEL_VALUES = ["web", "cde", "", "a.b_c"]


def _pick(p: Pick, pool: list[Any]) -> Any:
    """A fresh copy: the pools hold lists and dicts that later mutations must not change."""
    return copy.deepcopy(p.choice(pool))


def _value(p: Pick, t: Any, depth: int, key: str, noisy: bool) -> Any:
    if noisy and p.int(0, 99) < 8:
        return _pick(p, JUNK)
    if isinstance(t, pm._Opt):
        return None if p.int(0, 9) == 0 else _value(p, t.inner, depth, key, noisy)
    if isinstance(t, pm._Str):
        return _pick(p, STRINGS if noisy or key not in VALID else VALID[key])
    if isinstance(t, pm._Int):
        return _pick(p, INTS if noisy else VALID_INTS)
    if isinstance(t, pm._Bool):
        return _pick(p, BOOLS if noisy else VALID_BOOLS)
    if isinstance(t, pm._Lit):
        return p.choice(list(t.ordered) + (LITERAL_EXTRAS if noisy else []))
    if isinstance(t, pm._List):
        n = p.int(0 if noisy else 1, 3 if depth < 3 else 1)
        return [_value(p, t.item, depth + 1, key, noisy) for _ in range(n)]
    if isinstance(t, pm._StrMap):
        n = p.int(0, 3)
        if not noisy:
            return {p.choice(LABEL_KEYS): _pick(p, LABEL_VALUES) for _ in range(n)}
        return {p.choice(STRINGS[:12] + ["app", "tier", 1, None, 1.5, True]): _pick(p, STRINGS + [1, None, True])
                for _ in range(n)}
    if isinstance(t, pm._Rec):
        return record(p, t.cls, depth + 1, noisy)
    raise AssertionError(t)


def record(p: Pick, cls: type, depth: int = 0, noisy: bool = True) -> dict:
    """A mapping for ``cls``, built from its field table (the oracle is jsonschema, not the table)."""
    items: list[tuple[Any, Any]] = []
    for f in pm._SPECS[cls].fields:
        required = f.default is pm._REQUIRED and f.factory is None
        if p.int(0, 99) < ((92 if noisy else 99) if required else (45 if noisy else 30)):
            if f.key in ("protocol", "icmpTypes") and not noisy:
                value = _pick(p, VALID[f.key])
                items.append((f.key, [value] if f.key == "icmpTypes" else value))
            else:
                items.append((f.key, _value(p, f.type, depth, f.key, noisy)))
    if noisy and p.int(0, 99) < 8:
        items.append((p.choice(KEYS_EXTRA), _pick(p, ["x", 1, None])))
    order = sorted(range(len(items)), key=lambda _: p.int(0, 1000))
    return dict(items[i] for i in order)


def document(p: Pick) -> dict:
    kind = p.choice(sorted(pm.MODELS))
    doc = record(p, pm.MODELS[kind], noisy=p.int(0, 9) < 5)
    if p.int(0, 9) < 8:  # mostly the right header, so the interesting parts get checked
        doc["apiVersion"], doc["kind"] = pm.API_VERSION, kind
        if p.int(0, 1):
            md = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {"name": "p"}
            md["name"] = "p"
            if kind == pm.KIND_POLICY:
                md["namespace"] = "ns"
            else:
                md.pop("namespace", None)
            doc["metadata"] = md
    return doc


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value in a document, depth first."""
    out: list[tuple[Any, Any]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in list(items):
        out.append((node, k))
        out.extend(_slots(v))
    return out


def valid_document(p: Pick) -> dict:
    """A generated document the loader accepts (a base for one-flaw mutations)."""
    while True:
        kind = p.choice(sorted(pm.MODELS))
        doc = record(p, pm.MODELS[kind], noisy=False)
        doc["apiVersion"], doc["kind"] = pm.API_VERSION, kind
        doc["metadata"] = {"name": "p", "namespace": "ns"} if kind == pm.KIND_POLICY else {"name": "c"}
        if loader_verdict(doc)[0] is not None:
            return doc


def mutated(p: Pick) -> Any:
    """A repository or generated valid document with one to three values replaced, deleted,
    added or renamed - documents one mistake away from valid, where a missing schema keyword shows."""
    doc = copy.deepcopy(p.choice(DOCUMENTS)[1]) if p.int(0, 1) else valid_document(p)
    pool = JUNK + STRINGS + INTS + BOOLS + LITERAL_EXTRAS
    for _ in range(1 if p.int(0, 3) else p.int(2, 3)):
        slots = _slots(doc)
        if not slots:
            break
        parent, key = p.choice(slots)
        op = p.choice(["replace", "delete", "add", "rename"])
        if op == "replace":  # mostly a value of the same type: the flaws the type alone does not catch
            same = {str: STRINGS, bool: BOOLS, int: INTS}.get(type(parent[key]), pool)
            parent[key] = _pick(p, same if p.int(0, 4) else pool)
        elif op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[p.choice(KEYS_EXTRA + STRINGS[:12])] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[p.choice(KEYS_EXTRA)] = _pick(p, pool)
        else:
            parent.append(_pick(p, pool))
    return doc


_EXAMPLES = int(os.environ.get("PALISADE_SCHEMA_EXAMPLES", "600"))


def test_a_few_hundred_random_documents_get_one_verdict() -> None:
    """Seeded, so the tally is stable: every outcome must occur often enough that the test
    could fail (a schema that accepts everything would show no 'reject')."""
    rng = RandomPick(random.Random(18))
    tally: collections.Counter[str] = collections.Counter()
    for i in range(_EXAMPLES):
        doc = mutated(rng) if i % 3 else document(rng)
        tally[judge(doc)] += 1
    assert tally["accept"] >= _EXAMPLES // 20, tally
    assert tally["reject"] >= _EXAMPLES // 4, tally
    assert tally["loader-only"] >= 1 and tally["coercion"] >= 1, tally


_HYPOTHESIS = settings(max_examples=_EXAMPLES // 2, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large])


@_HYPOTHESIS
@given(st.data())
def test_generated_documents(data: Any) -> None:
    judge(document(DataPick(data)))


@_HYPOTHESIS
@given(st.data())
def test_mutated_repository_documents(data: Any) -> None:
    judge(mutated(DataPick(data)))


# --- the schema says what the loader says, for the common mistakes --------------------------------

def _policy(**spec: Any) -> dict:
    return {"apiVersion": pm.API_VERSION, "kind": pm.KIND_POLICY, "metadata": {"name": "p", "namespace": "n"},
            "spec": spec}


def _egress(**rule: Any) -> dict:
    return _policy(egress=[{"name": "e", "action": "allow", **rule}])


COMMON_MISTAKES = [
    _policy(frm=1),                                                       # unknown field
    _egress(too=[{"namespace": "a"}]),                                    # unknown field in a rule
    _egress(ports=[{"port": 80, "end_port": 90}]),                       # snake_case spelling
    _egress(action="permit"),                                             # enum
    _policy(mode="enforce"),                                              # enum
    _egress(ports=[{"port": 70000}]),                                     # range
    _egress(ports=[{"port": [80]}]),                                      # wrong type
    _egress(capture="maybe"),                                             # wrong type
    _egress(to=[{}]),                                                     # empty peer
    _egress(to=[{"fqdn": "a.example.com", "namespace": "x"}]),           # fqdn combined
    _policy(ingress=[{"name": "i", "action": "allow", "from": [{"fqdn": "a.example.com"}]}]),
    _egress(name="default-deny"),                                         # reserved name
    _egress(name="Bad_Name"),                                             # not DNS-1123
    _egress(http=[{"pathPrefix": "v1"}]),                                 # path without /
    _policy(dlp=[{"name": "d", "action": "block", "packs": []}]),         # no pack
    _policy(dlp=[{"name": "d", "action": "block", "packs": ["*"], "from": [], "to": []}]),
    {"apiVersion": pm.API_VERSION, "kind": pm.KIND_CLUSTER, "metadata": {"name": "c", "namespace": "n"},
     "spec": {}},                                                         # namespaced cluster policy
    {"apiVersion": pm.API_VERSION, "kind": pm.KIND_POLICY, "metadata": {"name": "p"}, "spec": {}},
    {"apiVersion": pm.API_VERSION, "kind": pm.KIND_CLUSTER, "metadata": {"name": "c"},
     "spec": {"rules": [{"name": "r", "action": "allow", "direction": "ingress", "to": []}]}},
    {"apiVersion": "palisade.dev/v2", "kind": pm.KIND_POLICY, "metadata": {"name": "p", "namespace": "n"},
     "spec": {}},
    {"apiVersion": pm.API_VERSION, "kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": {}},
    _egress(metadata=1),
    _policy(selector={"matchLabels": {"bad key": "x"}}),
    _policy(selector={"matchLabels": {"app": "-x"}}),
    {"apiVersion": pm.API_VERSION, "kind": pm.KIND_POLICY, "metadata": {"name": "P", "namespace": "n"},
     "spec": {}},
    _policy(dlp=[{"name": "D", "action": "block", "packs": ["*"]}]),
    # a trailing newline: Python's "$" matches before it, ECMA's does not (the loader used
    # .match with "$" and let "web\n" through as a name and a label; fqdn peers are trimmed)
    _egress(name="web\n"),
    _policy(selector={"matchLabels": {"app\n": "x"}}),
    _policy(selector={"matchLabels": {"app": "x\n"}}),
    {"apiVersion": pm.API_VERSION, "kind": pm.KIND_POLICY, "metadata": {"name": "p\n", "namespace": "n"},
     "spec": {}},
]


@pytest.mark.parametrize("doc", COMMON_MISTAKES, ids=repr)
def test_common_mistakes_are_refused_by_both(doc: dict) -> None:
    assert loader_verdict(doc)[0] is None
    assert not VALIDATOR.is_valid(doc), "the schema lets through what the loader refuses"


@pytest.mark.parametrize("check", list(ps._CHECKS), ids=lambda c: c.__name__)
def test_each_stated_check_is_needed_by_a_common_mistake(check: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the keywords a check adds, some mistake above passes the schema: every stated check
    is exercised, and the mistakes list would notice a generator that dropped one."""
    monkeypatch.delitem(ps._CHECKS, check)
    weaker = jsonschema.Draft202012Validator(ps.json_schema())
    assert any(weaker.is_valid(doc) for doc in COMMON_MISTAKES)


def test_every_check_is_stated_or_listed() -> None:
    """A new check_* in the model is either stated in the schema or listed as loader-only, with
    the reason; a listed name that no table uses is a stale entry."""
    assert ps.unclassified_checks() == []
    used = {f.after.__name__ for s in pm._SPECS.values() for f in s.fields if f.after} | {
        c.__name__ for s in pm._SPECS.values() for c in s.checks}
    assert set(ps.LOADER_ONLY_CHECKS) <= used


def test_the_loader_only_exclusion_is_needed() -> None:
    """Each kind of allowed difference really occurs (else the exclusion hides nothing and should go)."""
    assert judge(_egress(to=[{"cidr": "10.0.0.0/33"}])) == "loader-only"
    assert judge(_egress(ports=[{"port": "80"}])) == "coercion"
    assert judge(_egress(appProto=" HTTP ")) == "coercion"


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    """(That the shipped file equals the generated one: tests/policy/test_loader.py.)"""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
