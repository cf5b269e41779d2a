"""The admission guard (issue 17): every class of attempt to run a CDE pod without an effective sidecar.

The cases (``guard_cases.py``) run three ways, as the golden injector tests do:

1. in process through ``review.mutate`` / ``review.validate``,
2. through ``python -m injector mutate|validate`` (one subprocess per config and
   endpoint, fed a JSON list of reviews through ``--batch``? no: the CLI answers one
   review, so a representative case per class goes through it),
3. over real HTTPS against ``python -m injector serve``, grants in the webhook path.

Each answer must satisfy the case's own expectations (allowed or not, message and
warning fragments) and equal the recorded golden answer in ``guard_golden.json``.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonpatch
import pytest
import yaml

from injector import protection
from injector.guard import grants_path
from injector.review import mutate, validate
from tests.injector.conftest import start_server, stop_server
from tests.injector.guard_cases import CONFIGS, Case, all_cases, config
from tests.injector.test_server import Client

GOLDEN = Path(__file__).parent / "guard_golden.json"
REGEN = os.environ.get("PALISADE_REGEN_GOLDEN") == "1"
REPO = Path(__file__).resolve().parents[2]
CASES = all_cases()
BY_NAME = {c.name: c for c in CASES}


def summary(response: dict) -> dict:
    """The parts of an answer the golden file records (the uid is the case's own)."""
    out: dict = {"allowed": response["allowed"]}
    if not response["allowed"]:
        out["code"] = response["status"]["code"]
        out["message"] = response["status"]["message"]
    if response.get("warnings"):
        out["warnings"] = response["warnings"]
    if "patch" in response:
        # Only what the patch touches: the rendered values belong to the injection goldens
        # (testdata/), so a change of the sidecar's arguments does not churn this file.
        out["patch_paths"] = [op["path"] for op in json.loads(base64.b64decode(response["patch"]))]
    return out


def check(case: Case, response: dict) -> None:
    assert response["uid"] == case.review["request"]["uid"]
    got = summary(response)
    assert got["allowed"] is case.allowed, f"{case.name}: {got}"
    for fragment in case.fragments:
        assert fragment in got.get("message", ""), f"{case.name}: {fragment!r} not in {got.get('message')!r}"
    for fragment in case.warnings:
        assert any(fragment in w for w in got.get("warnings", [])), f"{case.name}: no warning with {fragment!r}"
    if not case.allowed:
        assert "\n" not in got["message"] and got["message"].startswith("palisade: pod web")
        assert got["code"] == (400 if case.endpoint == "mutate" else 403)
    if case.extra.get("injects"):
        assert got.get("patch_paths"), f"{case.name}: expected an injection patch"


def run_in_process(case: Case) -> dict:
    review = copy.deepcopy(case.review)
    if case.endpoint == "mutate":
        return mutate(review, config(case.config)).review["response"]
    return validate(review, config(case.config), frozenset(case.grants)).review["response"]


_golden: dict = {}


def golden() -> dict:
    """The recorded answers; when regenerating, a fresh file (run all in-process cases to rebuild it)."""
    if not _golden and GOLDEN.exists() and not REGEN:
        _golden.update(json.loads(GOLDEN.read_text()))
    return _golden


def test_cases_cover_every_class_with_variants():
    prefixes = {}
    for c in CASES:
        prefix = c.name.split("-")[0]
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
    for cls in ("lookalike", "exclusion", "opt", "mode", "dangerous", "pcap", "update", "ephemeral", "protected", "netraw", "connect"):
        assert prefixes.get(cls, 0) >= 2, (cls, prefixes)
    ops = {(c.review["request"]["operation"], c.review["request"].get("subResource")) for c in CASES}
    assert {("CREATE", None), ("UPDATE", None), ("UPDATE", "ephemeralcontainers"), ("CONNECT", "exec"),
            ("CONNECT", "attach")} <= ops


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_guard_in_process(name):
    case = BY_NAME[name]
    response = run_in_process(case)
    check(case, response)
    if REGEN:
        golden()[name] = summary(response)
        GOLDEN.write_text(json.dumps(dict(sorted(golden().items())), indent=1) + "\n")
        return
    assert summary(response) == golden()[name], f"{name}: answer differs from guard_golden.json"


def test_golden_file_has_no_stale_cases():
    if REGEN:
        pytest.skip("regenerating")
    assert set(golden()) == set(BY_NAME)


# One representative per class and operation through the CLI (a subprocess each).
CLI_CASES = ["lookalike-issue-17-fake-status-mutate", "lookalike-image-busybox-validate",
             "lookalike-args-one-pair-dropped-validate", "exclusion-all-v4-v6", "exclusion-covers-pod-cidr",
             "exclusion-granted-cidr", "opt-out-labels", "mode-learn-refused", "mode-learn-granted",
             "dangerous-container-cap-net-admin-cde", "dangerous-pod-supplemental-groups-1337-elsewhere-warns",
             "dangerous-init-privileged-elsewhere-refused", "pcap-mount-container-elsewhere-mutate",
             "update-label-into-cde-without-sidecar", "ephemeral-cde-refused", "ephemeral-cde-debug-granted",
             "protected-with-api-server-defaults"]


@pytest.fixture(scope="module")
def config_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard-configs")
    paths = {}
    for name, data in CONFIGS.items():
        paths[name] = d / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(data))
    return paths


@pytest.mark.parametrize("name", CLI_CASES)
def test_guard_through_cli(name, config_files):
    case = BY_NAME[name]
    cmd = [sys.executable, "-m", "injector", case.endpoint, "--config", str(config_files[case.config])]
    for grant in case.grants:
        cmd += ["--grant", grant]
    proc = subprocess.run(cmd, input=json.dumps(case.review).encode(), capture_output=True, cwd=REPO, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr.decode()
    response = json.loads(proc.stdout)["response"]
    check(case, response)
    if not REGEN:
        assert summary(response) == golden()[name]


@pytest.fixture(scope="module")
def guard_servers(certs_dir, config_files):
    started = {name: start_server(certs_dir, "--config", str(path)) for name, path in config_files.items()}
    yield started
    for server in started.values():
        assert stop_server(server) == 0


def test_guard_over_https(guard_servers):
    """Every case against the real server; the grants travel in the webhook path as configured."""
    clients = {name: Client(s.port, s.certs / "ca.crt") for name, s in guard_servers.items()}
    try:
        for case in CASES:
            path = "/mutate" if case.endpoint == "mutate" else grants_path(case.grants)
            response = clients[case.config].review(path, case.review)["response"]
            check(case, response)
            if not REGEN:
                assert summary(response) == golden()[case.name], case.name
    finally:
        for c in clients.values():
            c.close()


def test_grant_paths_round_trip_and_unknown_segments_grant_nothing(guard_servers):
    case = BY_NAME["mode-learn-granted"]
    client = Client(guard_servers["default"].port, guard_servers["default"].certs / "ca.crt")
    try:
        assert client.review("/validate/mode", case.review)["response"]["allowed"] is True
        assert client.review("/validate/mode-debug", case.review)["response"]["allowed"] is True
        for path in ("/validate", "/validate/debug", "/validate/everything", "/validate/Mode"):
            assert client.review(path, case.review)["response"]["allowed"] is False, path
        status, body, _ = client.request("POST", "/validate/mode/debug", json.dumps(case.review).encode())
        assert status == 404
    finally:
        client.close()


@pytest.mark.parametrize("body, fragment", [
    (b"{", "body is not valid JSON"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u", "operation": "UPDATE", "subResource": "ephemeralcontainers", "namespace": NS_ if (NS_ := "x") else "",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "object": {"metadata": {}, "spec": {"containers": [], "ephemeralContainers": "debug"}}}}).encode(),
     "ephemeralContainers: not a list"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u", "operation": "UPDATE", "subResource": "ephemeralcontainers", "namespace": "x",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "object": {"metadata": {}, "spec": {"containers": [], "ephemeralContainers": [{"image": "x"}]}}}}).encode(),
     "ephemeralContainers[0]: not an object with a name"),
])
def test_malformed_guard_reviews_get_one_line(body, fragment, guard_servers, config_files):
    client = Client(guard_servers["default"].port, guard_servers["default"].certs / "ca.crt")
    try:
        status, answer, _ = client.request("POST", "/validate/debug", body)
    finally:
        client.close()
    assert status == 400 and fragment in answer.decode() and answer.decode().count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "injector", "validate"], input=body, capture_output=True,
                          cwd=REPO, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_mutate_output_is_judged_protected_by_the_same_function():
    """One function decides for both endpoints: what /mutate renders, inspect() accepts."""
    for case in CASES:
        if case.extra.get("injects"):
            pod = case.review["request"]["object"]
            response = run_in_process(case)
            patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
            assert protection.inspect(patched, config(case.config)).protected


def test_api_server_canonical_quantities_do_not_unprotect():
    """The API server may rewrite ``sizeLimit: 0.5Gi`` as ``512Mi``; the pod is still protected."""
    from injector.config import InjectorConfig
    from tests.injector.guard_cases import injected, pod

    cfg = InjectorConfig.from_dict({"pcapSizeLimit": "0.5Gi"})
    p = injected(pod())
    for v in p["spec"]["volumes"]:
        if v["name"] == "palisade-pcap":
            v["emptyDir"]["sizeLimit"] = "512Mi"
    assert protection.inspect(p, cfg).protected
    for v in p["spec"]["volumes"]:
        if v["name"] == "palisade-pcap":
            v["emptyDir"]["sizeLimit"] = "513Mi"
    verdict = protection.inspect(p, cfg)
    assert not verdict.protected and "volume palisade-pcap: differs: emptyDir" in verdict.summary()


def test_every_webhook_path_the_manifests_register_is_served(guard_servers):
    """The generated ValidatingWebhookConfiguration's paths all reach /validate with their grants."""
    from injector.manifests import ManifestOptions, validating_webhook

    case = BY_NAME["ephemeral-cde-debug-granted"]
    client = Client(guard_servers["default"].port, guard_servers["default"].certs / "ca.crt")
    try:
        for hook in validating_webhook(ManifestOptions())["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            allowed = client.review(path, case.review)["response"]["allowed"]
            debug = next((e for e in hook["namespaceSelector"]["matchExpressions"]
                          if e["key"] == "palisade.dev/cde-allow-debug"), None)
            granted = debug is not None and debug["operator"] == "In"
            if hook["name"] == "guard.palisade.dev":
                continue  # never selects CDE pods
            assert allowed is granted, (hook["name"], path)
    finally:
        client.close()


def test_shipped_webhooks_cover_every_operation_and_never_filter_connect_by_labels():
    from injector.manifests import ManifestOptions, validating_webhook

    hooks = {h["name"]: h for h in validating_webhook(ManifestOptions())["webhooks"]}
    cde = [h for n, h in hooks.items() if n.startswith("cde")]
    assert len(cde) == 4 and all(h["failurePolicy"] == "Fail" for h in cde)
    for h in cde:
        rule = h["rules"][0]
        assert set(rule["operations"]) == {"CREATE", "UPDATE"}
        assert set(rule["resources"]) == {"pods", "pods/ephemeralcontainers"}
    # Mutually exclusive grant selectors: every namespace matches exactly one CDE webhook.
    for labels in ({}, {"palisade.dev/cde-allow-debug": "true"}, {"palisade.dev/cde-allow-mode-override": "true"},
                   {"palisade.dev/cde-allow-debug": "true", "palisade.dev/cde-allow-mode-override": "true"},
                   {"palisade.dev/cde-allow-debug": "yes"}):
        def matches(h, labels=labels):
            for e in h["namespaceSelector"]["matchExpressions"]:
                if e["key"].startswith("palisade.dev/cde-allow"):
                    inside = labels.get(e["key"]) in e["values"]
                    if inside != (e["operator"] == "In"):
                        return False
            return True
        assert sum(matches(h) for h in cde) == 1, labels
    connect = [h for h in hooks.values() if any("CONNECT" in r["operations"] for r in h["rules"])]
    assert [h["name"] for h in connect] == ["exec.palisade.dev"]
    assert "objectSelector" not in connect[0]


def test_cde_pod_skipped_for_another_mesh_is_denied_with_the_reason():
    from tests.injector.guard_cases import pod, review

    p = pod(containers=[{"name": "web", "image": "x"}, {"name": "istio-proxy", "image": "istio/proxyv2"}])
    assert mutate(review(copy.deepcopy(p)), config("default")).outcome == "skipped"
    response = validate(review(p), config("default")).review["response"]
    assert response["allowed"] is False
    assert "runs istio-proxy and was therefore not injected" in response["status"]["message"]
