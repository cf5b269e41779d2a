"""The pure parts on their own: annotation parsing, config, truth table, CDE validation, patches."""

from __future__ import annotations

import copy

import jsonpatch
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from injector.annotations import AnnotationError, inject_flag, parse_cidrs, parse_ports
from injector.config import ConfigError, InjectorConfig
from injector.decision import decide
from injector.patch import make_patch
from injector.probes import probe_ports
from injector.review import ReviewError, mutate, validate
from tests.injector.guard_cases import hardened
from tests.injector.test_golden import TESTDATA, apply_response, make_review

# --- annotations ------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("", ()), ("  ", ()), ("80", (80,)), ("8080, 9090", (8080, 9090)), ("25,587,25", (25, 587)),
    ("65535", (65535,)),
])
def test_parse_ports_ok(value, expected):
    assert parse_ports("k", value) == expected


@pytest.mark.parametrize("value, fragment", [
    ("0", '"0" is not a port number'), ("65536", '"65536" is not a port number'),
    ("80,,90", "empty item"), ("http", '"http" is not a port'), ("8000-8010", '"8000-8010"'),
    ("-1", '"-1"'), ("80;90", '"80;90"'),
])
def test_parse_ports_rejects(value, fragment):
    with pytest.raises(AnnotationError) as exc:
        parse_ports("palisade.dev/exclude-inbound-ports", value)
    assert fragment in str(exc.value)
    assert str(exc.value).startswith('annotation palisade.dev/exclude-inbound-ports="')


def test_parse_cidrs_normalises_and_hints():
    assert parse_cidrs("k", "10.0.0.0/8, 192.0.2.7, fd00::/8, 10.0.0.0/8") == (
        "10.0.0.0/8", "192.0.2.7/32", "fd00::/8")
    with pytest.raises(AnnotationError, match=r"did you mean 10\.0\.0\.0/8"):
        parse_cidrs("k", "10.1.2.3/8")
    with pytest.raises(AnnotationError, match='"10.0.0/8" is not an IP network'):
        parse_cidrs("k", "10.0.0/8")


def test_inject_flag_label_beats_annotation_and_only_true_false_count():
    assert inject_flag({}, {}) is None
    assert inject_flag({"palisade.dev/inject": "false"}, {"palisade.dev/inject": "true"}) is False
    assert inject_flag({}, {"palisade.dev/inject": "true"}) is True
    with pytest.raises(AnnotationError, match='label palisade.dev/inject="False"'):
        inject_flag({"palisade.dev/inject": "False"}, {})


# --- config -----------------------------------------------------------------------------------


def test_config_round_trip_and_defaults(tmp_path):
    cfg = InjectorConfig()
    assert cfg.image == "palisade:0.1.0" and cfg.native_sidecar is True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert InjectorConfig.load(path) == cfg


@pytest.mark.parametrize("text, fragment", [
    ("nativeSideCar: false\n", "config.yaml.nativeSideCar: unknown key"),
    ("nativeSidecar: 'no'\n", "nativeSidecar: expected true or false"),
    ("imagePullPolicy: Sometimes\n", "imagePullPolicy: expected one of"),
    ("sidecarResources: {requests: {cpu: lots}}\n", "sidecarResources.requests.cpu: 'lots' is not a Kubernetes quantity"),
    ("sidecarResources: {requests: {gpu: 1}}\n", "sidecarResources.requests.gpu: unknown key"),
    ("startupTimeoutSeconds: 0\n", "startupTimeoutSeconds: expected an integer"),
    ("- a\n", "expected a mapping"),
    ("image: [\n", "invalid YAML"),
])
def test_config_errors_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        InjectorConfig.load(path)
    assert fragment in str(exc.value)


def test_config_missing_file():
    with pytest.raises(ConfigError, match="cannot read"):
        InjectorConfig.load("/nonexistent/config.yaml")


# --- truth table ------------------------------------------------------------------------------

POD = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}}


def _pod(annotations=None, labels=None, host_network=None, containers=("app",)):
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"] = annotations or {}
    pod["metadata"]["labels"] = labels or {}
    pod["spec"]["containers"] = [{"name": n} for n in containers]
    if host_network is not None:
        pod["spec"]["hostNetwork"] = host_network
    return pod


@pytest.mark.parametrize("pod, namespace, inject, reason_fragment", [
    (_pod(), "shop", True, "inject"),
    (_pod(), "kube-system", False, "never injected"),
    (_pod(), "kube-public", False, "never injected"),
    # The status annotation is informational only (issue 17): it no longer skips injection.
    (_pod(annotations={"palisade.dev/status": "injected"}), "shop", True, "inject"),
    (_pod(host_network=True), "shop", False, "hostNetwork"),
    (_pod(host_network=True, annotations={"palisade.dev/inject": "true"}), "shop", False, "hostNetwork"),
    (_pod(host_network=False), "shop", True, "inject"),
    (_pod(annotations={"palisade.dev/inject": "false"}), "shop", False, "opted out"),
    (_pod(labels={"palisade.dev/inject": "false"}), "shop", False, "opted out"),
    (_pod(annotations={"palisade.dev/inject": "true"}), "shop", True, "inject"),
    (_pod(containers=("app", "istio-proxy")), "shop", False, "another mesh"),
    (_pod(containers=("app", "linkerd-proxy")), "shop", False, "another mesh"),
])
def test_truth_table(pod, namespace, inject, reason_fragment):
    d = decide(pod, namespace, InjectorConfig())
    assert d.inject is inject
    assert reason_fragment in d.reason


def test_truth_table_status_annotation_is_not_trusted():
    pod = _pod(annotations={"palisade.dev/status": "injected", "palisade.dev/inject": "bogus"}, host_network=True)
    assert decide(pod, "shop", InjectorConfig()).reason == "hostNetwork pod"
    assert "never injected" in decide(pod, "kube-system", InjectorConfig()).reason
    with pytest.raises(AnnotationError):
        decide(_pod(annotations={"palisade.dev/status": "injected", "palisade.dev/inject": "bogus"}), "shop",
               InjectorConfig())


def test_ignored_namespaces_from_config_but_kube_system_always():
    cfg = InjectorConfig.from_dict({"ignoredNamespaces": ["legacy"]})
    assert decide(_pod(), "legacy", cfg).inject is False
    assert decide(_pod(), "kube-system", cfg).inject is False
    assert decide(_pod(), "kube-public", cfg).inject is True


# --- probes -----------------------------------------------------------------------------------


def test_probe_ports_numeric_string_and_out_of_range():
    got = probe_ports([{"name": "a", "livenessProbe": {"httpGet": {"port": "8081"}},
                        "readinessProbe": {"tcpSocket": {"port": 70000}}}])
    assert got.ports == (8081,)
    assert len(got.warnings) == 1 and "70000" in got.warnings[0]


# --- CDE validation ---------------------------------------------------------------------------


def _cde(**kw):
    pod = _pod(labels={"pci.palisade.dev/scope": "cde", **kw.pop("labels", {})}, **kw)
    pod["metadata"]["namespace"] = "payments"
    return pod


@pytest.mark.parametrize("pod, fragment", [
    (_cde(), "was not injected: label namespace payments with palisade.dev/injection=enabled"),
    (_cde(host_network=True), "uses hostNetwork: true"),
    ({**_cde(), "spec": {"os": {"name": "windows"}, "containers": [{"name": "app"}]}}, "is a Windows pod"),
    (_cde(annotations={"palisade.dev/inject": "false"}), "opts out of the sidecar"),
    (_cde(labels={"palisade.dev/inject": "false"}), "opts out of the sidecar"),
    (_cde(annotations={"palisade.dev/status": "injected"}), "are not both present"),
])
def test_validate_denies_unprotected_cde_pods_with_the_reason(pod, fragment):
    r = validate(make_review(pod))
    response = r.review["response"]
    assert response["allowed"] is False and r.outcome == "denied"
    assert fragment in response["status"]["message"]
    assert response["status"]["code"] == 403


def test_validate_allows_protected_and_non_cde_pods():
    injected = yaml.safe_load((TESTDATA / "deployment-pod" / "expected.yaml").read_text())
    assert validate(make_review(injected)).review["response"]["allowed"] is True
    legacy = yaml.safe_load((TESTDATA / "non-native-sidecar" / "expected.yaml").read_text())
    legacy["metadata"]["labels"]["pci.palisade.dev/scope"] = "cde"
    for key in ("containers", "initContainers"):
        legacy["spec"][key] = [c if c["name"].startswith("palisade") else hardened(c) for c in legacy["spec"][key]]
    # Protected means "as rendered under the current config": the non-native layout passes under
    # nativeSidecar: false and not under the default (native) config.
    legacy_cfg = InjectorConfig.load(TESTDATA / "non-native-sidecar" / "config.yaml")
    assert validate(make_review(legacy), legacy_cfg).review["response"]["allowed"] is True
    assert validate(make_review(legacy)).review["response"]["allowed"] is False
    assert validate(make_review(_pod(labels={"pci.palisade.dev/scope": "connected"}))).review[
        "response"]["allowed"] is True


def test_validate_update_existing_cde_pod_warns_but_labelling_in_is_denied():
    old, new = _cde(), _cde()
    review = make_review(new)
    review["request"]["operation"] = "UPDATE"
    review["request"]["oldObject"] = old
    response = validate(review).review["response"]
    assert response["allowed"] is True and "runs without the Palisade sidecar" in response["warnings"][0]
    review["request"]["oldObject"] = _pod()
    assert validate(review).review["response"]["allowed"] is False


def test_mutate_then_validate_agree_for_every_injected_golden():
    """A CDE label on any pod the injector injects must pass /validate."""
    for case in sorted(p for p in TESTDATA.iterdir() if (p / "expected.yaml").exists()):
        if (case / "config.yaml").exists():
            continue
        pod = yaml.safe_load((case / "input.yaml").read_text())
        pod["metadata"].setdefault("labels", {})["pci.palisade.dev/scope"] = "cde"
        # CDE containers must drop NET_RAW (issue 17): harden the golden inputs as a CDE team would.
        for key in ("containers", "initContainers"):
            pod["spec"][key] = [hardened(c) for c in pod["spec"].get(key) or []]
        result = mutate(make_review(copy.deepcopy(pod)), InjectorConfig())
        if result.outcome != "injected":
            continue
        patched = apply_response(pod, result.review["response"])
        response = validate(make_review(patched)).review["response"]
        if case.name == "exclusion-annotations":
            # Exclusions on a CDE pod need the platform team's allow-list (issue 17).
            assert response["allowed"] is False and "cdeExclusions" in response["status"]["message"]
            continue
        assert response["allowed"] is True, case.name


def test_review_errors():
    with pytest.raises(ReviewError, match="request.namespace"):
        mutate({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u", "operation": "CREATE", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "object": {"metadata": {}, "spec": {}}}}, InjectorConfig())
    with pytest.raises(ReviewError, match="metadata.annotations: must map strings to strings"):
        mutate(make_review({"metadata": {"namespace": "x", "annotations": {"a": 1}}, "spec": {}}),
               InjectorConfig())


# --- patch ------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(alphabet="ab/~c", max_size=3), inner, max_size=4),
        st.lists(st.fixed_dictionaries({"name": st.sampled_from("abcdef"), "v": inner}), max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(alphabet="ab/~", max_size=3), json_values, max_size=4),
       st.dictionaries(st.text(alphabet="ab/~", max_size=3), json_values, max_size=4))
def test_patch_applies_to_exactly_the_new_document(old, new):
    assert jsonpatch.apply_patch(old, make_patch(old, new)) == new


def test_patch_inserts_named_items_without_touching_others():
    old = {"c": [{"name": "app", "x": 1}, {"name": "log"}]}
    new = {"c": [{"name": "p"}, {"name": "app", "x": 2}, {"name": "q"}, {"name": "log"}]}
    ops = make_patch(old, new)
    assert ops == [{"op": "add", "path": "/c/0", "value": {"name": "p"}},
                   {"op": "replace", "path": "/c/1/x", "value": 2},
                   {"op": "add", "path": "/c/2", "value": {"name": "q"}}]
    assert jsonpatch.apply_patch(old, ops) == new


def test_mutate_never_modifies_the_request_object():
    """render() copies only pod/metadata/spec shallowly; nothing below may be changed in place."""
    for case in sorted(p for p in TESTDATA.iterdir() if p.is_dir()):
        pod = yaml.safe_load((case / "input.yaml").read_text())
        cfg = InjectorConfig.load(case / "config.yaml") if (case / "config.yaml").exists() else InjectorConfig()
        review = make_review(pod)
        snapshot = copy.deepcopy(review)
        mutate(review, cfg)
        assert review == snapshot, case.name


# --- fuzz: whatever the body, the answer is a Result or a ReviewError (never another exception) -----

_GOLDEN_PODS = [yaml.safe_load((p / "input.yaml").read_text()) for p in sorted(TESTDATA.iterdir()) if p.is_dir()]


def _mutate_at(doc, choices, value):
    """Replace one node of ``doc`` (picked by walking ``choices``) with ``value``."""
    node = doc
    for pick in choices:
        if isinstance(node, dict) and node:
            key = sorted(node)[pick % len(node)]
            if not isinstance(node[key], (dict, list)) or pick % 3 == 0:
                node[key] = value
                return doc
            node = node[key]
        elif isinstance(node, list) and node:
            index = pick % len(node)
            if not isinstance(node[index], (dict, list)) or pick % 3 == 0:
                node[index] = value
                return doc
            node = node[index]
        else:
            return doc
    return doc


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(range(len(_GOLDEN_PODS))), st.lists(st.integers(0, 50), min_size=1, max_size=8),
       json_values, st.sampled_from(["mutate", "validate"]))
def test_malformed_reviews_only_raise_review_error(case, choices, value, endpoint):
    import json as _json

    from injector.review import handle

    review = _mutate_at(make_review(copy.deepcopy(_GOLDEN_PODS[case])), choices, value)
    try:
        result = handle(endpoint, _json.dumps(review), InjectorConfig())
    except ReviewError:
        return
    assert result.review["kind"] == "AdmissionReview"
    assert isinstance(result.review["response"]["allowed"], bool)


def test_tls_context_needs_no_temporary_files(monkeypatch, certs_dir):
    """The webhook's root filesystem is read-only: loading (and reloading) TLS must not write files."""
    import ssl
    import tempfile

    from injector.server import ServeError, build_context

    def refuse(*_a, **_k):
        raise AssertionError("temporary file used")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "mkstemp", "mkdtemp", "TemporaryFile"):
        monkeypatch.setattr(tempfile, name, refuse)
    cert, key = (certs_dir / "tls.crt").read_bytes(), (certs_dir / "tls.key").read_bytes()
    ctx = build_context(cert, key, "tls.crt", "tls.key")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ServeError, match="cannot load the certificate pair"):
        build_context(cert, (certs_dir / "ca.key").read_bytes(), "tls.crt", "ca.key")
