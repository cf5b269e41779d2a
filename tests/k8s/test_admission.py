"""Admission end to end against a real kube-apiserver: the API server selects the webhooks by
namespace and object labels, calls them over HTTPS (caBundle, Service, path), applies the
JSON Patch to a defaulted pod, validates and stores it; refusals come back through kubectl.

The pods are the golden inputs of tests/injector (tests/injector/testdata): what is stored must
be what the golden tests expect, plus only what the API server defaults."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from injector.config import InjectorConfig
from injector.review import mutate, validate
from tests.injector.test_golden import apply_response, make_review

pytestmark = pytest.mark.k8s

GOLDEN = Path(__file__).resolve().parents[1] / "injector" / "testdata"
# Cases the default-config webhook can serve (a config.yaml case needs another server config).
CASES = sorted(p.name for p in GOLDEN.iterdir()
               if p.is_dir() and not (p / "config.yaml").exists())
OPT_IN = {"palisade.dev/injection": "enabled"}
CDE = {"pci.palisade.dev/scope": "cde"}
STRIP_META = ("managedFields", "uid", "resourceVersion", "creationTimestamp", "generation")


def _submittable(pod: dict, namespace: str, name: str | None = None) -> dict:
    """A golden input as a user would submit it: no server-owned metadata, no status."""
    pod = copy.deepcopy(pod)
    pod.pop("status", None)
    meta = pod["metadata"]
    for key in STRIP_META:
        meta.pop(key, None)
    meta["namespace"] = namespace
    if name:
        meta.pop("generateName", None)
        meta["name"] = name
    return pod


def _subset_problems(want, got, path: str = "") -> list[str]:
    """Every field of ``want`` is in ``got`` with the same value; ``got`` may hold more (defaults)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: want a mapping, stored {got!r}"]
        out = []
        for k, v in want.items():
            if k not in got:
                out.append(f"{path}.{k}: missing in the stored pod (want {v!r})")
            else:
                out += _subset_problems(v, got[k], f"{path}.{k}")
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: want {len(want)} items, stored {got!r}"]
        return [p for i, (w, g) in enumerate(zip(want, got, strict=True))
                for p in _subset_problems(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: want {want!r}, stored {got!r}"]


def _as_stored(want: dict) -> dict:
    """What the API server makes of a rendered container: an empty env value is not stored."""
    want = copy.deepcopy(want)
    for e in want.get("env") or []:
        if e.get("value") == "":
            del e["value"]
    return want


def _without_token_mount(got: dict) -> dict:
    """The ServiceAccount admission plugin mounts the token into every container, ours included."""
    got = copy.deepcopy(got)
    got["volumeMounts"] = [m for m in got.get("volumeMounts") or []
                           if not m["name"].startswith("kube-api-access-")]
    return got


def _names(items) -> list[str]:
    return [c["name"] for c in items or []]


def pod_message(kube, pod: dict) -> str:
    """Create ``pod``; the API server's error (stderr), or '' when it was stored."""
    proc = kube.create(pod, check=False)
    return "" if proc.returncode == 0 else proc.stderr.strip()


def test_generated_manifests_applied_and_in_step(kube):
    """Every generated object exists; `kubectl diff` finds nothing the server would change."""
    objs = [o for o in yaml.safe_load_all((kube.state / "palisade.yaml").read_text()) if o]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("MutatingWebhookConfiguration", "palisade-injector") in kinds
    for o in objs:
        args = [o["kind"].lower(), o["metadata"]["name"]]
        if o["metadata"].get("namespace"):
            args += ["-n", o["metadata"]["namespace"]]
        assert kube.get(*args)["metadata"]["name"] == o["metadata"]["name"]
    vwc = kube.get("validatingwebhookconfiguration", "palisade-cde-guard")
    assert [w["name"] for w in vwc["webhooks"]] == [
        "cde.palisade.dev", "cde-mode.palisade.dev", "cde-debug.palisade.dev", "cde-mode-debug.palisade.dev",
        "guard.palisade.dev", "exec.palisade.dev"]
    # the committed default manifest (docs: `kubectl apply -f palisade.yaml`) passes the API
    # server's validation too (dry run: the shared cluster keeps its caBundle)
    committed = Path(__file__).resolve().parents[2] / "deploy" / "palisade.yaml"
    kube.kubectl("apply", "--dry-run=server", "-f", str(committed))
    diff = kube.kubectl("diff", "--server-side", "--field-manager", "palisade-install",
                        "-f", str(kube.state / "palisade.yaml"), check=False)
    assert diff.returncode == 0, diff.stdout[-3000:] + diff.stderr


@pytest.fixture(scope="module")
def golden_namespaces(kube) -> dict[str, str]:
    """The golden inputs' namespaces, opted in (kube-system exists and stays out)."""
    out = {}
    for case in CASES:
        ns = yaml.safe_load((GOLDEN / case / "input.yaml").read_text())["metadata"].get("namespace", "default")
        if ns not in out:
            if ns in ("kube-system", "default"):
                kube.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"name": "default", "namespace": ns}})
                if ns == "default":
                    kube.kubectl("label", "namespace", "default", "palisade.dev/injection=enabled", "--overwrite")
            else:
                kube.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": OPT_IN}},
                            {"apiVersion": "v1", "kind": "ServiceAccount",
                             "metadata": {"name": "default", "namespace": ns}}])
            out[ns] = ns
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden_case_through_the_api_server(kube, golden_namespaces, case):
    """The stored pod holds exactly the golden expectation (plus API-server defaults), or the
    API server refuses it with the golden message."""
    d = GOLDEN / case
    pod = yaml.safe_load((d / "input.yaml").read_text())
    ns = pod["metadata"].get("namespace", "default")
    name = f"g-{case}-{uuid.uuid4().hex[:5]}"[:63]
    # Service accounts the golden pods name (no controller-manager creates them).
    sa = (pod.get("spec") or {}).get("serviceAccountName")
    if sa:
        kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
    submitted = _submittable(pod, ns, name)
    if (d / "rejected.txt").exists():
        want = (d / "rejected.txt").read_text().strip().replace(_pod_name_in(pod), name)
        err = pod_message(kube, submitted)
        assert "admission webhook \"inject.palisade.dev\" denied the request" in err, err
        assert want in err, err
        return
    proc = kube.create(submitted)
    stored = json.loads(proc.stdout)
    try:
        expected = _submittable(yaml.safe_load((d / "expected.yaml").read_text()), ns, name)
        spec, want_spec = stored["spec"], expected["spec"]
        # Order and names: the patch inserted our containers exactly where the golden pod has them.
        assert _names(spec.get("initContainers")) == _names(want_spec.get("initContainers"))
        assert _names(spec["containers"]) == _names(want_spec["containers"])
        assert [v for v in _names(spec.get("volumes")) if not v.startswith("kube-api-access-")] == \
            _names(want_spec.get("volumes"))
        problems = []
        for key in ("initContainers", "containers"):
            for want_c, got_c in zip(want_spec.get(key) or [], spec.get(key) or [], strict=True):
                if want_c["name"].startswith("palisade"):
                    problems += _subset_problems(_as_stored(want_c), _without_token_mount(got_c),
                                                 f"{key}/{want_c['name']}")
        for want_v in want_spec.get("volumes") or []:
            got_v = next(v for v in spec["volumes"] if v["name"] == want_v["name"])
            problems += _subset_problems(want_v, got_v, f"volumes/{want_v['name']}")
        for field in ("labels", "annotations"):
            want_m = expected["metadata"].get(field) or {}
            got_m = stored["metadata"].get(field) or {}
            assert got_m == want_m, (field, got_m, want_m)
        assert not problems, "\n".join(problems)
    finally:
        kube.kubectl("delete", "pod", "-n", ns, name, "--wait=false")


def _pod_name_in(pod: dict) -> str:
    meta = pod["metadata"]
    return meta.get("name") or meta.get("generateName") or "<unnamed>"


# --- opt-in, guard refusals ------------------------------------------------------------------

def _pod(name: str, labels: dict | None = None, annotations: dict | None = None, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": "example/app:1",
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}}], **spec}}


def _in(ns: str, pod: dict) -> dict:
    pod = copy.deepcopy(pod)
    pod["metadata"]["namespace"] = ns
    return pod


def test_injection_only_where_the_namespace_opted_in(kube):
    plain = kube.namespace("plain")
    opted = kube.namespace("optin", OPT_IN)
    out = json.loads(kube.create(_in(plain, _pod("web"))).stdout)
    assert _names(out["spec"]["containers"]) == ["app"] and not out["spec"].get("initContainers")
    out = json.loads(kube.create(_in(opted, _pod("web"))).stdout)
    assert _names(out["spec"]["initContainers"]) == ["palisade-init", "palisade"]
    assert out["metadata"]["labels"]["palisade.dev/injected"] == "true"
    # the opt-out label: the objectSelector keeps the webhook from even being called
    out = json.loads(kube.create(_in(opted, _pod("out", {"palisade.dev/inject": "false"}))).stdout)
    assert not out["spec"].get("initContainers")


def _guard_message(pod: dict, ns: str, grants: frozenset[str] = frozenset(), mutated: bool = False) -> str:
    """What the guard answers in process for ``pod`` (after the injector, when ``mutated``)."""
    pod = _in(ns, pod)
    if mutated:
        pod = apply_response(pod, mutate(make_review(pod), InjectorConfig()).review["response"])
    response = validate(make_review(pod), InjectorConfig(), grants).review["response"]
    assert not response["allowed"]
    return response["status"]["message"]


def test_cde_pod_without_sidecar_refused_outside_opted_in_namespaces(kube):
    ns = kube.namespace("cde-plain")
    pod = _pod("ledger", CDE)
    err = pod_message(kube, _in(ns, pod))
    assert 'admission webhook "cde.palisade.dev" denied the request' in err, err
    assert _guard_message(pod, ns) in err


def test_cde_pod_with_forged_sidecar_refused(kube):
    forged = _pod("ledger", CDE)
    forged["spec"]["initContainers"] = [
        {"name": "palisade-init", "image": "busybox:1.36", "command": ["true"]},
        {"name": "palisade", "image": "busybox:1.36", "restartPolicy": "Always", "command": ["sleep", "1d"]}]
    ns = kube.namespace("cde-forged")
    err = pod_message(kube, _in(ns, forged))
    assert 'admission webhook "cde.palisade.dev" denied the request' in err, err
    assert "image 'busybox:1.36' is not an allowed Palisade image" in err
    assert _guard_message(forged, ns) in err
    # In an opted-in namespace the injector itself refuses the look-alike first.
    ns = kube.namespace("cde-forged-in", OPT_IN)
    err = pod_message(kube, _in(ns, forged))
    assert 'admission webhook "inject.palisade.dev" denied the request' in err, err
    assert "image 'busybox:1.36' is not an allowed Palisade image" in err


@pytest.mark.parametrize("annotation,value", [
    ("palisade.dev/exclude-outbound-cidrs", "0.0.0.0/0"),
    ("palisade.dev/exclude-outbound-ports", "5432"),
    ("palisade.dev/exclude-inbound-ports", "22"),
    ("palisade.dev/mode", "monitor"),
])
def test_cde_exceptions_refused_after_injection(kube, annotation, value):
    ns = kube.namespace("cde-exc", OPT_IN)
    pod = _pod("ledger", CDE, {annotation: value})
    err = pod_message(kube, _in(ns, pod))
    assert 'admission webhook "cde.palisade.dev" denied the request' in err, err
    assert _guard_message(pod, ns, mutated=True) in err


def test_mode_grant_selects_the_granting_webhook(kube):
    ns = kube.namespace("cde-mode", {**OPT_IN, "palisade.dev/cde-allow-mode-override": "true"})
    out = json.loads(kube.create(_in(ns, _pod("ledger", CDE, {"palisade.dev/mode": "monitor"}))).stdout)
    assert _names(out["spec"]["initContainers"]) == ["palisade-init", "palisade"]


def test_dangerous_fields_refused_in_cde_warned_elsewhere(kube):
    ns = kube.namespace("cde-danger", OPT_IN)
    bad = _pod("ledger", CDE)
    bad["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
                                                      "allowPrivilegeEscalation": False}
    err = pod_message(kube, _in(ns, bad))
    assert _guard_message(bad, ns, mutated=True) in err, err
    other = copy.deepcopy(bad)
    other["metadata"]["labels"] = {}
    proc = kube.create(_in(ns, other))
    assert "Warning: palisade:" in proc.stderr and "NET_ADMIN" in proc.stderr, proc.stderr


def test_readmission_is_idempotent(kube):
    """The stored pod submitted again (what a controller or `kubectl replace --force` does) is
    admitted unchanged: no second sidecar, no patch."""
    ns = kube.namespace("readmit", OPT_IN)
    first = json.loads(kube.create(_in(ns, _pod("web", CDE))).stdout)
    again = _submittable(first, ns, "web-again")
    second = json.loads(kube.create(again).stdout)
    assert second["spec"]["initContainers"] == first["spec"]["initContainers"]
    assert second["spec"]["containers"] == first["spec"]["containers"]
    assert second["spec"]["volumes"] == [
        {**v, "name": second["spec"]["volumes"][i]["name"]} if v["name"].startswith("kube-api-access-") else v
        for i, v in enumerate(first["spec"]["volumes"])]
    # An UPDATE that touches nothing the guard judges passes the CDE webhook.
    kube.kubectl("label", "pod", "-n", ns, "web", "team=ledger")
    kube.kubectl("annotate", "pod", "-n", ns, "web", "note=fine")
    # Removing the CDE label from a running pod is refused.
    proc = kube.kubectl("label", "pod", "-n", ns, "web", "pci.palisade.dev/scope-", check=False)
    assert proc.returncode != 0 and "cannot be removed from a running pod" in proc.stderr, proc.stderr


def test_ephemeral_containers_refused_unless_granted(kube):
    ns = kube.namespace("cde-debug", OPT_IN)
    kube.create(_in(ns, _pod("ledger", CDE)))
    proc = kube.kubectl("debug", "-n", ns, "ledger", "--image", "busybox:1.36", "--profile", "restricted",
                        "--container", "dbg", check=False)
    assert proc.returncode != 0, proc.stdout
    assert 'admission webhook "cde.palisade.dev" denied the request' in proc.stderr, proc.stderr
    assert (f"palisade: pod ledger: ephemeral containers are refused in CDE pods unless namespace {ns} carries "
            "the label palisade.dev/cde-allow-debug=true (set by a cluster admin)") in proc.stderr, proc.stderr
    granted = kube.namespace("cde-debug-ok", {**OPT_IN, "palisade.dev/cde-allow-debug": "true"})
    kube.create(_in(granted, _pod("ledger", CDE)))
    proc = kube.kubectl("debug", "-n", granted, "ledger", "--image", "busybox:1.36", "--profile", "restricted",
                        "--container", "dbg")
    pod = kube.get("pod", "-n", granted, "ledger")
    assert _names(pod["spec"]["ephemeralContainers"]) == ["dbg"]
    # still never aimed at the sidecar
    proc = kube.kubectl("debug", "-n", granted, "ledger", "--image", "busybox:1.36", "--profile", "restricted",
                        "--container", "dbg2", "--target", "palisade", check=False)
    assert proc.returncode != 0, proc.stdout
    assert 'admission webhook "cde-debug.palisade.dev" denied the request' in proc.stderr, proc.stderr
    assert "ephemeral container dbg2: targetContainerName palisade is Palisade's own container" in proc.stderr
    # and without the restricted profile (NET_RAW not dropped) even the granted namespace refuses
    proc = kube.kubectl("debug", "-n", granted, "ledger", "--image", "busybox:1.36", "--container", "dbg3",
                        check=False)
    assert "ephemeral" in proc.stderr or "dbg3" in proc.stderr, proc.stderr
    assert "does not drop NET_RAW" in proc.stderr, proc.stderr


def test_exec_into_the_sidecar_refused(kube):
    ns = kube.namespace("exec", OPT_IN)
    kube.create(_in(ns, _pod("web")))
    proc = kube.kubectl("exec", "-n", ns, "web", "-c", "palisade", "--", "sh", check=False)
    assert 'admission webhook "exec.palisade.dev" denied the request' in proc.stderr, proc.stderr
    assert "exec into the Palisade container palisade is refused" in proc.stderr
    # into the app container the webhook allows it; the API server then finds no node to run it on
    proc = kube.kubectl("exec", "-n", ns, "web", "-c", "app", "--", "true", check=False)
    assert proc.returncode != 0 and "admission webhook" not in proc.stderr, proc.stderr


def test_failure_policy_with_the_webhook_down(kube):
    """Fail (default): pods in opted-in namespaces and CDE pods anywhere are refused while no
    webhook answers; Ignore: other pods go in unprotected, CDE pods are still refused."""
    opted = kube.namespace("down", OPT_IN)
    plain = kube.namespace("down-plain")
    manifests = kube.state / "palisade.yaml"
    kube.script("webhook-stop")
    try:
        err = pod_message(kube, _in(opted, _pod("web")))
        assert 'failed calling webhook "inject.palisade.dev"' in err, err
        err = pod_message(kube, _in(plain, _pod("ledger", CDE)))
        assert 'failed calling webhook "cde.palisade.dev"' in err, err
        assert pod_message(kube, _in(plain, _pod("web"))) == ""   # not our business: admitted
        # what a user does: regenerate with --failure-policy Ignore and apply
        gen = subprocess.run([sys.executable, "-m", "injector", "manifests", "--certs-dir",
                              str(kube.state / "webhook-certs"), "--failure-policy", "Ignore"],
                             capture_output=True, text=True, check=True)
        kube.kubectl("apply", "--server-side", "--field-manager", "palisade-install", "-f", "-", input=gen.stdout)
        out = json.loads(kube.create(_in(opted, _pod("web2"))).stdout)
        assert not out["spec"].get("initContainers")         # admitted, unprotected
        err = pod_message(kube, _in(opted, _pod("ledger", CDE)))
        assert 'failed calling webhook "cde.palisade.dev"' in err, err
    finally:
        kube.kubectl("apply", "--server-side", "--field-manager", "palisade-install", "-f", str(manifests))
        kube.script("webhook-start")
    assert _names(json.loads(kube.create(_in(opted, _pod("web3"))).stdout)["spec"]["initContainers"]) == \
        ["palisade-init", "palisade"]


# --- reinvocation: a later webhook changes the pod --------------------------------------------

class _AgentWebhook:
    """A second mutating webhook, as agent injectors are: it puts its init container in front and
    adds a container with a readiness probe. It runs after ours (configurations are called in
    name order), so the API server reinvokes ours (reinvocationPolicy: IfNeeded)."""

    def __init__(self, certs: Path) -> None:
        import base64
        import http.server
        import ssl
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                pod = review["request"]["object"]
                names = [c["name"] for c in pod["spec"].get("initContainers") or []]
                patch = []
                if "agent-init" not in names:
                    init = {"name": "agent-init", "image": "example/agent:1", "command": ["true"]}
                    patch.append({"op": "add", "path": "/spec/initContainers/0", "value": init} if names else
                                 {"op": "add", "path": "/spec/initContainers", "value": [init]})
                    patch.append({"op": "add", "path": "/spec/containers/-", "value": {
                        "name": "agent", "image": "example/agent:1",
                        "ports": [{"name": "agent-health", "containerPort": 9901}],
                        "readinessProbe": {"tcpSocket": {"port": "agent-health"}}}})
                response = {"uid": review["request"]["uid"], "allowed": True}
                if patch:
                    response |= {"patchType": "JSONPatch",
                                 "patch": base64.b64encode(json.dumps(patch).encode()).decode()}
                body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                   "response": response}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs / "tls.crt", certs / "tls.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_reinvoked_after_a_later_webhook_reorders_and_adds_probes(kube, tmp_path):
    import base64

    subprocess.run([sys.executable, "-m", "injector", "certs", "--service", "agent", "--namespace", "agent",
                    "--ip", "127.0.0.1", "-o", str(tmp_path)], check=True, capture_output=True)
    agent = _AgentWebhook(tmp_path)
    ns = kube.namespace("reinvoke", {**OPT_IN, "palisade-test/agent": "on"})
    config = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
              "metadata": {"name": f"zz-agent-{ns}"},
              "webhooks": [{"name": "agent.example.com", "sideEffects": "None", "admissionReviewVersions": ["v1"],
                            "clientConfig": {"url": f"https://127.0.0.1:{agent.port}/mutate",
                                             "caBundle": base64.b64encode((tmp_path / "ca.crt").read_bytes()).decode()},
                            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                       "resources": ["pods"]}],
                            "namespaceSelector": {"matchLabels": {"palisade-test/agent": "on"}},
                            "failurePolicy": "Fail", "reinvocationPolicy": "Never", "timeoutSeconds": 5}]}
    kube.apply(config)
    try:
        app = _pod("web", CDE)
        app["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080}]
        app["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}}
        # a CDE pod: the agent's containers do not drop NET_RAW, and the guard says so after all mutations
        err = pod_message(kube, _in(ns, app))
        assert 'admission webhook "cde.palisade.dev" denied' in err and "container agent-init" in err, err
        out = json.loads(kube.create(_in(ns, _pod("plain"))).stdout)
        names = _names(out["spec"]["initContainers"])
        assert names == ["palisade-init", "palisade", "agent-init"], names   # moved back in front
        sidecar = out["spec"]["initContainers"][1]
        ports = next(e.get("value", "") for e in sidecar["env"] if e["name"] == "PALISADE_PROBE_PORTS")
        assert ports == "9901", ports     # the agent's probe port, recomputed on reinvocation
    finally:
        kube.kubectl("delete", "mutatingwebhookconfiguration", f"zz-agent-{ns}")
        agent.close()


ALL_EXPECTED = sorted(p.name for p in GOLDEN.iterdir() if (p / "expected.yaml").exists())


@pytest.mark.parametrize("case", ALL_EXPECTED)
def test_every_golden_expectation_passes_api_server_validation(kube, case):
    """Every expected pod of the golden tests, config variants included (non-native sidecar with
    its postStart hook, other meshes), is a pod the API server validates: server-side dry run in
    the webhook's own namespace, which no Palisade webhook selects."""
    pod = _submittable(yaml.safe_load((GOLDEN / case / "expected.yaml").read_text()), "palisade-system",
                       f"dry-{case}"[:63])
    sa = pod["spec"].get("serviceAccountName")
    if sa:
        kube.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": sa, "namespace": "palisade-system"}})
    else:
        kube.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": "palisade-system"}})
    kube.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
