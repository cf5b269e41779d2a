"""Loading: the reference example verbatim (README = examples/), precise file:line errors, directories, schema."""

from __future__ import annotations

import json
import re

import pytest

from firewall.policy.engine import PolicyError, PolicySet
from firewall.policy.schema import json_schema
from tests.policy.common import EXAMPLE, ROOT, write


def test_reference_example_is_shipped_verbatim() -> None:
    """The README's reference example is examples/payment-api.yaml, byte for byte (the design
    document that first carried it is not part of a clone: the test reads only the repository)."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"this is the reference example\n\(`examples/payment-api\.yaml`\), accepted as written:\n\n"
                  r"```yaml\n(.*?)```", readme, re.S)
    assert m, "README.md: the reference example block is gone"
    assert EXAMPLE.read_text() == m.group(1)


def test_design_example_loads() -> None:
    ps = PolicySet.load([str(EXAMPLE)])
    kinds = [d.kind for d in ps.documents]
    assert kinds == ["FirewallPolicy", "ClusterFirewallPolicy"]
    fp = ps.documents[0]
    assert fp.metadata.annotations["palisade.dev/last-reviewed"] == "2026-11-01"
    assert fp.spec.ingress[0].http[0].path_prefix == "/v1/charge"
    assert fp.spec.egress[1].tls.min_version == "1.2"
    assert ps.rule_count == 4
    assert list(ps.sha256) == [str(EXAMPLE)] and len(ps.sha256[str(EXAMPLE)]) == 64


def problems(tmp_path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as exc:
        PolicySet.load([path])
    return [p.replace(path, "policy.yaml") for p in exc.value.problems]


HEAD = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: x
  namespace: y
spec:
"""


def test_unknown_field_has_path_and_line(tmp_path) -> None:
    text = HEAD + """\
  ingress:
    - name: a
      action: allow
    - name: b
      frm:
        - labels: {app: c}
      action: allow
"""
    assert problems(tmp_path, text) == ["policy.yaml:11: spec.ingress[1].frm: unknown field"]


def test_several_problems_sorted_by_line(tmp_path) -> None:
    text = HEAD + """\
  mode: enforce
  egress:
    - name: Bad_Name
      to: [{fqdn: "*.ok.example", labels: {a: b}}]
      ports: [{port: 70000}]
      action: allow
"""
    out = problems(tmp_path, text)
    assert [p.split(":")[1] for p in out] == ["7", "9", "10", "11"]
    assert "spec.mode" in out[0] and "not a valid rule name" in out[1]
    assert "fqdn cannot be combined" in out[2] and "less than or equal to 65535" in out[3]


@pytest.mark.parametrize("body,needle,line", [
    ("  ingress:\n    - name: a\n      from: [{fqdn: x.example}]\n      action: allow\n", "egress only", 8),
    ("  ingress:\n    - name: a\n      action: allow\n      exception: true\n", "need a description", 8),
    ("  ingress:\n    - name: a\n      action: deny\n      exception: true\n      description: d\n",
     "allow/alert", 8),
    ("  ingress:\n    - name: a\n      action: allow\n    - name: a\n      action: deny\n", "duplicate rule name", 6),
    ("  ingress:\n    - name: a\n      from: [{}]\n      action: allow\n", "omit from/to", 9),
    ("  ingress:\n    - name: a\n      appProto: redis\n      http: [{pathPrefix: /x}]\n      action: allow\n",
     "needs appProto", 8),
    ("  ingress:\n    - name: a\n      http: [{pathPrefix: x}]\n      action: allow\n", "start with '/'", 9),
    ("  ingress:\n    - name: a\n", "required field missing", 8),
    ("  ingress:\n    - name: default-deny\n      action: deny\n", "reserved", 8),
    ("  egress:\n    - name: a\n      to: [{cidr: 10.0.0.0/33}]\n      action: allow\n", "invalid CIDR", 9),
    ("  egress:\n    - name: a\n      ports: [{port: 10, endPort: 5}]\n      action: allow\n", "below port", 9),
    ("  egress:\n    - name: a\n      tls: {minVersion: '1.4'}\n      action: allow\n", "minVersion", 9),
])
def test_validation_errors(tmp_path, body: str, needle: str, line: int) -> None:
    out = problems(tmp_path, HEAD + body)
    assert len(out) == 1 and needle in out[0], out
    assert out[0].startswith(f"policy.yaml:{line}:"), out


def test_bad_yaml_reports_line(tmp_path) -> None:
    out = problems(tmp_path, HEAD + "  ingress:\n    - name: a\n     action: [allow\n")
    assert len(out) == 1 and out[0].startswith("policy.yaml:") and "invalid YAML" in out[0]
    assert int(out[0].split(":")[1]) in (8, 9)


def test_duplicate_key_is_an_error(tmp_path) -> None:
    out = problems(tmp_path, HEAD + "  mode: protect\n  mode: learn\n")
    assert out == ["policy.yaml:8: spec.mode: duplicate key"]


def test_wrong_kind_and_api_version(tmp_path) -> None:
    assert problems(tmp_path, "apiVersion: v1\nkind: Pod\n") == [
        "policy.yaml:1: apiVersion: expected palisade.dev/v1, got 'v1'"]
    assert "kind: expected one of" in problems(tmp_path, "apiVersion: palisade.dev/v1\nkind: Pod\n")[0]
    assert "must be a mapping" in problems(tmp_path, "- a\n- b\n")[0]


def test_cluster_policy_namespace_rules(tmp_path) -> None:
    out = problems(tmp_path, """\
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata: {name: c, namespace: x}
spec:
  rules:
    - name: r
      direction: egress
      from: [{namespace: a}]
      action: deny
""")
    assert out == ["policy.yaml:6: spec.rules[0]: an egress rule selects peers with 'to', not 'from'"]
    out = problems(tmp_path, "apiVersion: palisade.dev/v1\nkind: ClusterFirewallPolicy\n"
                             "metadata: {name: c, namespace: x}\nspec: {}\n")
    assert out == ["policy.yaml:1: a ClusterFirewallPolicy is not namespaced: remove metadata.namespace"]
    assert "namespace is required" in problems(tmp_path, "apiVersion: palisade.dev/v1\nkind: FirewallPolicy\n"
                                                         "metadata: {name: a}\nspec: {}\n")[0]


def test_errors_from_every_file_are_collected(tmp_path) -> None:
    a = write(tmp_path, HEAD + "  bogus: 1\n", "a.yaml")
    b = write(tmp_path, "apiVersion: palisade.dev/v1\nkind: FirewallPolicy\nmetadata: {name: b, namespace: y}\n"
                        "spec: {default: maybe}\n", "b.yaml")
    with pytest.raises(PolicyError) as exc:
        PolicySet.load([a, b])
    assert [p.split(":")[0] for p in exc.value.problems] == [a, b]


def test_missing_file(tmp_path) -> None:
    with pytest.raises(PolicyError, match=r"nope.yaml:0: cannot read"):
        PolicySet.load([str(tmp_path / "nope.yaml")])


def test_directory_and_multidoc_order(tmp_path) -> None:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "b.yaml").write_text(EXAMPLE.read_text())
    (d / "a.yml").write_text("---\n" + HEAD.replace("name: x", "name: first") + "  ingress: []\n---\n")
    (d / "notes.txt").write_text("ignored")
    ps = PolicySet.load([str(d)])
    assert [p.metadata.name for p in ps.documents] == ["first", "payment-api", "baseline"]
    assert len(ps.sha256) == 2


def test_duplicate_policy_across_files(tmp_path) -> None:
    a = write(tmp_path, EXAMPLE.read_text(), "a.yaml")
    b = write(tmp_path, EXAMPLE.read_text(), "b.yaml")
    with pytest.raises(PolicyError, match="already defined"):
        PolicySet.load([a, b])


def test_shipped_schema_matches_model() -> None:
    shipped = json.loads((ROOT / "firewall" / "schema" / "policy.schema.json").read_text())
    assert shipped == json.loads(json.dumps(json_schema()))


def test_schema_validates_example_documents() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = json_schema()
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "palisade.dev/v1", "kind": "FirewallPolicy",
                             "metadata": {"name": "a", "namespace": "b"}, "spec": {"frm": 1}}, schema)


def test_all_examples_validate() -> None:
    ps = PolicySet.load([str(ROOT / "examples")])
    assert {d.metadata.name for d in ps.documents} >= {"payment-api", "baseline", "platform-baseline", "checkout"}


def test_example_identity_file() -> None:
    from firewall.identity.identity import load_identity_file

    m = load_identity_file(str(ROOT / "examples" / "identity" / "identities.yaml"))
    assert m.resolve("fd00::105").pod == "checkout-0" and m.resolve("10.0.0.5").scope == "cde"


def test_loaded_documents_keep_rule_lines_only() -> None:
    """A loaded policy remembers where each rule starts (decision reasons, explain), not the YAML."""
    ps = PolicySet.load([str(EXAMPLE)])
    lines = EXAMPLE.read_text().splitlines()
    fp, cluster = ps.loaded
    assert lines[fp.rule_line("egress", 1) - 1].strip() == "- name: card-network"
    assert lines[fp.rule_line("dlp", 0) - 1].strip() == "- name: no-clear-pan-out-of-cde"
    assert lines[cluster.rule_line("rules", 0) - 1].strip() == "- name: no-ssh-into-containers"
    assert fp.source.value is None and cluster.line == 44


def test_integer_longer_than_python_allows_is_a_problem_not_a_crash(tmp_path) -> None:
    out = problems(tmp_path, HEAD + "  egress:\n    - name: e\n      action: allow\n      ports: [{port: "
                   + "1" * 5000 + "}]\n")
    assert len(out) == 1 and out[0].startswith("policy.yaml:1: invalid YAML: Exceeds the limit"), out
    out = problems(tmp_path, HEAD + "  egress:\n    - name: e\n      action: allow\n      ports: [{port: '"
                   + "0" * 5000 + "99999'}]\n")
    assert out == ["policy.yaml:10: spec.egress[0].ports[0].port: Input should be less than or equal to 65535"]
