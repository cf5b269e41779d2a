"""Golden tests: input pod -> expected patched pod (or rejection), through every code path.

Each ``testdata/<case>/`` holds ``input.yaml`` (the pod as the API server sends it),
optionally ``config.yaml`` (injector config), and exactly one of ``expected.yaml``
(the pod after applying the returned JSON Patch; equal to the input when nothing
is injected) or ``rejected.txt`` (the message of an ``allowed: false`` answer),
plus ``warnings.txt`` when the response carries warnings. Every case runs

1. in process through ``review.mutate`` (the pure path),
2. through ``python -m injector mutate`` (the CLI, same code as the server),
3. over real HTTPS against ``python -m injector serve`` (test_server.py),

then again on its own output, which must produce no patch (idempotency). The
patched pods are checked against the Kubernetes OpenAPI models. Regenerate with
``PALISADE_REGEN_GOLDEN=1 pytest tests/injector/test_golden.py`` and review the diff.
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

from injector.config import InjectorConfig
from injector.review import mutate
from tests.injector.k8s_models import check

TESTDATA = Path(__file__).parent / "testdata"
REGEN = os.environ.get("PALISADE_REGEN_GOLDEN") == "1"
KNOWN_FILES = {"input.yaml", "config.yaml", "expected.yaml", "rejected.txt", "warnings.txt"}
CASES = sorted(p.name for p in TESTDATA.iterdir() if p.is_dir())
REPO = Path(__file__).resolve().parents[2]


def load_case(name: str) -> tuple[dict, InjectorConfig, Path]:
    d = TESTDATA / name
    pod = yaml.safe_load((d / "input.yaml").read_text())
    config = InjectorConfig.load(d / "config.yaml") if (d / "config.yaml").exists() else InjectorConfig()
    return pod, config, d


def make_review(pod: dict, uid: str = "0f1e2d3c-golden") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "name": pod["metadata"].get("name", ""),
            "namespace": pod["metadata"].get("namespace", "default"),
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def apply_response(pod: dict, response: dict) -> dict:
    """What the API server does with the answer: apply the base64 JSON Patch, if any."""
    if "patch" not in response:
        return copy.deepcopy(pod)
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, ops)


def assert_matches_golden(name: str, d: Path, pod: dict, response: dict) -> dict | None:
    """Compare one response with the case's golden files; return the patched pod (None if rejected)."""
    warnings = response.get("warnings", [])
    if REGEN:
        for f in ("expected.yaml", "rejected.txt", "warnings.txt"):
            (d / f).unlink(missing_ok=True)
        if warnings:
            (d / "warnings.txt").write_text("\n".join(warnings) + "\n")
        if response["allowed"]:
            (d / "expected.yaml").write_text(yaml.safe_dump(apply_response(pod, response), sort_keys=False, width=100))
        else:
            (d / "rejected.txt").write_text(response["status"]["message"] + "\n")
    expected_warnings = (d / "warnings.txt").read_text().splitlines() if (d / "warnings.txt").exists() else []
    assert warnings == expected_warnings, f"{name}: warnings differ"
    if (d / "rejected.txt").exists():
        assert response["allowed"] is False, f"{name}: expected a rejection, got {response}"
        assert response["status"]["message"] == (d / "rejected.txt").read_text().strip()
        assert response["status"]["code"] == 400
        assert "patch" not in response
        return None
    assert response["allowed"] is True, f"{name}: rejected: {response.get('status')}"
    patched = apply_response(pod, response)
    expected = yaml.safe_load((d / "expected.yaml").read_text())
    if patched != expected:
        got = yaml.safe_dump(patched, sort_keys=False)
        want = yaml.safe_dump(expected, sort_keys=False)
        import difflib
        diff = "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), "expected", "got", lineterm=""))
        pytest.fail(f"{name}: patched pod differs from golden:\n{diff}")
    return patched


def test_every_case_is_complete_and_nothing_is_unused():
    assert len(CASES) >= 14
    for name in CASES:
        files = {p.name for p in (TESTDATA / name).iterdir()}
        assert files <= KNOWN_FILES, f"{name}: unexpected files {files - KNOWN_FILES}"
        assert "input.yaml" in files, name
        if not REGEN:
            assert ("expected.yaml" in files) != ("rejected.txt" in files), (
                f"{name}: needs exactly one of expected.yaml / rejected.txt")


@pytest.mark.parametrize("name", CASES)
def test_golden_in_process(name):
    pod, config, d = load_case(name)
    result = mutate(make_review(copy.deepcopy(pod)), config)
    response = result.review["response"]
    assert response["uid"] == "0f1e2d3c-golden"
    assert result.review["apiVersion"] == "admission.k8s.io/v1"
    assert result.review["kind"] == "AdmissionReview"
    patched = assert_matches_golden(name, d, pod, response)
    if patched is None:
        return
    assert check(patched) == [], f"{name}: patched pod is not a valid v1 Pod"
    # Idempotency: the API server re-invokes us (reinvocationPolicy: IfNeeded) with our own output.
    again = mutate(make_review(copy.deepcopy(patched)), config).review["response"]
    assert again["allowed"] is True
    assert "patch" not in again, f"{name}: second pass patched again: {again}"


@pytest.mark.parametrize("name", CASES)
def test_golden_through_cli(name, tmp_path):
    pod, _config, d = load_case(name)
    review_file = tmp_path / "review.json"
    review_file.write_text(json.dumps(make_review(pod)))
    cmd = [sys.executable, "-m", "injector", "mutate"]
    if (d / "config.yaml").exists():
        cmd += ["--config", str(d / "config.yaml")]
    with review_file.open("rb") as stdin:
        proc = subprocess.run(cmd, stdin=stdin, capture_output=True, cwd=REPO, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr.decode()
    response = json.loads(proc.stdout)["response"]
    if not REGEN:
        assert_matches_golden(name, d, pod, response)


def test_cases_cover_the_required_scenarios():
    """The issue's list, by case name, so a rename cannot silently drop one."""
    required = {"plain-pod", "two-containers", "existing-init-containers", "already-injected",
                "opt-out-annotation", "opt-out-label", "host-network", "kube-system",
                "exclusion-annotations", "bad-exclusion-port", "bad-exclusion-cidr",
                "named-ports-and-probes", "job", "other-mesh-proxy", "non-native-sidecar"}
    assert required <= set(CASES)


def _sidecar(pod: dict) -> dict:
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        if c["name"] == "palisade":
            return c
    raise AssertionError("no palisade container")


def _env(container: dict, name: str) -> str:
    return next(e["value"] for e in container["env"] if e["name"] == name)


@pytest.mark.parametrize("name, ports", [
    ("plain-pod", ""),
    ("named-ports-and-probes", "6379,8080,9901,50051"),
    ("non-native-sidecar", "8080"),
    ("deployment-pod", "4317,9000"),
])
def test_probe_ports_env(name, ports):
    """PALISADE_PROBE_PORTS: named ports resolved, exec and foreign-host probes left out."""
    expected = yaml.safe_load((TESTDATA / name / "expected.yaml").read_text())
    assert _env(_sidecar(expected), "PALISADE_PROBE_PORTS") == ports


def test_native_and_non_native_placement():
    native = yaml.safe_load((TESTDATA / "existing-init-containers" / "expected.yaml").read_text())
    names = [c["name"] for c in native["spec"]["initContainers"]]
    assert names == ["palisade-init", "palisade", "wait-for-db", "migrate"]
    assert native["spec"]["initContainers"][1]["restartPolicy"] == "Always"
    assert "startupProbe" in native["spec"]["initContainers"][1]

    legacy = yaml.safe_load((TESTDATA / "non-native-sidecar" / "expected.yaml").read_text())
    assert [c["name"] for c in legacy["spec"]["initContainers"]] == ["palisade-init", "setup"]
    assert [c["name"] for c in legacy["spec"]["containers"]] == ["palisade", "app"]
    sidecar = legacy["spec"]["containers"][0]
    assert "restartPolicy" not in sidecar
    assert sidecar["lifecycle"]["postStart"]["exec"]["command"][:2] == ["python", "-c"]
    assert legacy["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"


def test_security_contexts():
    pod = yaml.safe_load((TESTDATA / "plain-pod" / "expected.yaml").read_text())
    init, sidecar = pod["spec"]["initContainers"]
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    sc = sidecar["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["readOnlyRootFilesystem"]) == (1337, 1337, True)
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["args"][:10] == ["--inbound-port", "15006", "--outbound-port", "15001", "--proxy-uid", "1337",
                                 "--proxy-gid", "1337", "--admin-port", "15020"]


def test_injected_status_names_what_was_added():
    pod = yaml.safe_load((TESTDATA / "plain-pod" / "expected.yaml").read_text())
    ann = pod["metadata"]["annotations"]
    assert ann["palisade.dev/status"] == "injected"
    record = json.loads(ann["palisade.dev/injected-resources"])
    assert record["initContainers"] == ["palisade-init", "palisade"]
    assert set(record["volumes"]) == {v["name"] for v in pod["spec"]["volumes"]}
    assert pod["metadata"]["labels"]["palisade.dev/injected"] == "true"


def test_reinvocation_moves_our_init_containers_back_to_the_front():
    patched = yaml.safe_load((TESTDATA / "plain-pod" / "expected.yaml").read_text())
    patched["spec"]["initContainers"].insert(0, {"name": "vault-agent-init", "image": "vault:1"})
    result = mutate(make_review(copy.deepcopy(patched)), InjectorConfig())
    assert result.outcome == "repaired"
    fixed = apply_response(patched, result.review["response"])
    assert [c["name"] for c in fixed["spec"]["initContainers"]] == ["palisade-init", "palisade", "vault-agent-init"]
    again = mutate(make_review(fixed), InjectorConfig()).review["response"]
    assert "patch" not in again
