"""Generated manifests: valid against the Kubernetes OpenAPI models, in step with deploy/ and the chart.

``kubectl apply --dry-run=client --validate=false`` is run too (kubectl from scripts/build-k8s.sh,
see ``find_kubectl``). kubectl insists on API discovery even for a client-side dry run, so
the test serves the discovery documents (and 404 for every object) from a tiny
HTTP server on 127.0.0.1: the API server is the one thing these tests mock.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from injector.certs import write_certs
from injector.config import InjectorConfig
from injector.manifests import ManifestOptions, build, to_yaml
from tests.injector.conftest import REPO
from tests.injector.k8s_models import check

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "palisade"


def by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("manifest-certs")
    write_certs(d, "palisade-injector", "palisade-system")
    return d


def full_options(certs: Path, **kw) -> ManifestOptions:
    return ManifestOptions(ca_bundle=(certs / "ca.crt").read_bytes(), tls_cert=(certs / "tls.crt").read_bytes(),
                           tls_key=(certs / "tls.key").read_bytes(), **kw)


def test_every_object_validates_against_the_openapi_models(certs):
    objs = build(full_options(certs))
    kinds = by_kind(objs)
    assert set(kinds) == {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Deployment",
                          "PodDisruptionBudget", "Service", "MutatingWebhookConfiguration",
                          "ValidatingWebhookConfiguration", "ClusterRole", "ClusterRoleBinding"}
    for obj in objs:
        assert check(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_model_check_catches_a_typo():
    """The validator is strict: it must reject what the API server would reject."""
    objs = build(ManifestOptions())
    hook = by_kind(objs)["MutatingWebhookConfiguration"][0]
    hook["webhooks"][0]["reinvocationpolicy"] = "IfNeeded"
    assert any("reinvocationpolicy: unknown field" in e for e in check(hook))
    dep = by_kind(objs)["Deployment"][0]
    dep["spec"]["replicas"] = "2"
    assert any("replicas: expected an integer" in e for e in check(dep))


def test_webhook_configuration_essentials(certs):
    opts = full_options(certs, failure_policy="Ignore", timeout_seconds=5)
    kinds = by_kind(build(opts))
    hook = kinds["MutatingWebhookConfiguration"][0]["webhooks"][0]
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Ignore", 5)
    assert hook["clientConfig"]["service"] == {"name": "palisade-injector", "namespace": "palisade-system",
                                               "path": "/mutate", "port": 443}
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == (certs / "ca.crt").read_bytes()
    exprs = hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "palisade.dev/injection", "operator": "In", "values": ["enabled"]} in exprs
    system = next(e for e in exprs if e["key"] == "kubernetes.io/metadata.name")
    assert system["operator"] == "NotIn" and {"kube-system", "palisade-system"} <= set(system["values"])
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "palisade.dev/inject", "operator": "NotIn", "values": ["false"]}]
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["resources"] == ["pods"]

    guard = kinds["ValidatingWebhookConfiguration"][0]["webhooks"][0]
    assert guard["clientConfig"]["service"]["path"] == "/validate"
    assert guard["failurePolicy"] == "Fail"  # the CDE guard fails closed whatever the injector does
    assert guard["objectSelector"]["matchExpressions"][0] == {
        "key": "pci.palisade.dev/scope", "operator": "In", "values": ["cde"]}
    assert set(guard["rules"][0]["operations"]) == {"CREATE", "UPDATE"}


def test_deployment_service_pdb_fit_together(certs):
    kinds = by_kind(build(full_options(certs)))
    dep = kinds["Deployment"][0]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["palisade.dev/inject"] == "false"
    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    svc = kinds["Service"][0]
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    pdb = kinds["PodDisruptionBudget"][0]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    secret = kinds["Secret"][0]
    assert secret["type"] == "kubernetes.io/tls"
    mounted = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounted["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    args = container["args"]
    assert args[args.index("--cert") + 1].endswith("/tls.crt")
    config_map = next(c for c in kinds["ConfigMap"] if c["metadata"]["name"] == "palisade-injector-config")
    assert InjectorConfig.from_dict(yaml.safe_load(config_map["data"]["config.yaml"])) == InjectorConfig()
    policy = next(c for c in kinds["ConfigMap"] if c["metadata"]["name"] == "palisade-policy")
    assert policy["metadata"]["namespace"] == "default"
    assert yaml.safe_load(policy["data"]["baseline.yaml"])["kind"] == "ClusterFirewallPolicy"


def test_sidecar_pod_reader_role_is_bound_to_the_opted_in_namespaces_only():
    """kubernetes_identity needs get/list/watch on pods; nothing more, and only for the
    service accounts of the namespaces Palisade is deployed to."""
    kinds = by_kind(build(ManifestOptions(policy_namespaces=("shop", "payments"))))
    role = kinds["ClusterRole"][0]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = kinds["ClusterRoleBinding"][0]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "palisade-sidecar-pod-reader"
    assert [s["name"] for s in binding["subjects"]] == ["system:serviceaccounts:shop",
                                                        "system:serviceaccounts:payments"]
    assert all(s["kind"] == "Group" for s in binding["subjects"])


def test_committed_deploy_manifest_is_up_to_date():
    """deploy/palisade.yaml is `python -m injector manifests` output; regenerate it when this fails."""
    assert (DEPLOY / "palisade.yaml").read_text() == to_yaml(build(ManifestOptions()))
    for obj in yaml.safe_load_all((DEPLOY / "palisade.yaml").read_text()):
        assert check(obj) == []


# --- Helm chart (no helm binary here: static consistency with the generator) -------------------

def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_chart_values_match_generator_defaults():
    values = _values()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    from injector import __version__
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == __version__
    cfg = InjectorConfig.from_dict({**values["config"], "image": f"{values['image']['repository']}:"
                                    f"{values['image']['tag']}", "imagePullPolicy": values["image"]["pullPolicy"]})
    assert cfg == InjectorConfig()
    defaults = ManifestOptions()
    assert values["injector"]["replicas"] == defaults.replicas
    assert values["injector"]["failurePolicy"] == defaults.failure_policy
    assert values["injector"]["timeoutSeconds"] == defaults.timeout_seconds
    assert values["policyNamespaces"] == list(defaults.policy_namespaces)


def test_chart_templates_only_use_defined_values():
    values = _values()
    used: set[str] = set()
    for tpl in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", tpl.read_text()))
    assert used, "no .Values references found"
    for path in used:
        node = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f".Values.{path} is not in values.yaml"
            node = node[part]


def test_chart_webhooks_match_generator():
    """Same webhook names, paths, selectors keys and essentials as the generated manifest."""
    text = (CHART / "templates" / "webhooks.yaml").read_text()
    for needle in ("name: inject.palisade.dev", "cde.palisade.dev", "name: guard.palisade.dev",
                   "cde-{{ join \"-\" $combo }}.palisade.dev", "path: /mutate", "path: /validate",
                   "resources: [pods, pods/ephemeralcontainers]", "key: palisade.dev/cde-allow-mode-override",
                   "key: palisade.dev/cde-allow-debug", "key: pci.palisade.dev/scope, operator: NotIn, values: [cde]",
                   "failurePolicy: Fail", "name: exec.palisade.dev", "resources: [pods/exec, pods/attach]",
                   "sideEffects: None", "admissionReviewVersions: [v1]", "reinvocationPolicy: IfNeeded",
                   "key: palisade.dev/injection, operator: In, values: [enabled]",
                   'key: palisade.dev/inject, operator: NotIn, values: ["false"]',
                   "key: pci.palisade.dev/scope, operator: In, values: [cde]", "genCA", "genSignedCert"):
        assert needle in text, needle
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert 'palisade.dev/inject: "false"' in deployment
    assert "command: [python, -m, injector, serve]" in deployment


# --- kubectl client-side dry run against a discovery-only fake API server -----------------------

_RESOURCES = {
    "/api/v1": ("v1", [("namespaces", "Namespace", False), ("serviceaccounts", "ServiceAccount", True),
                       ("configmaps", "ConfigMap", True), ("secrets", "Secret", True),
                       ("services", "Service", True), ("pods", "Pod", True)]),
    "/apis/apps/v1": ("apps/v1", [("deployments", "Deployment", True)]),
    "/apis/policy/v1": ("policy/v1", [("poddisruptionbudgets", "PodDisruptionBudget", True)]),
    "/apis/rbac.authorization.k8s.io/v1": ("rbac.authorization.k8s.io/v1", [
        ("clusterroles", "ClusterRole", False), ("clusterrolebindings", "ClusterRoleBinding", False)]),
    "/apis/admissionregistration.k8s.io/v1": ("admissionregistration.k8s.io/v1", [
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False),
        ("validatingwebhookconfigurations", "ValidatingWebhookConfiguration", False)]),
}


class _Discovery(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?")[0]
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            groups = []
            for gv, _ in _RESOURCES.values():
                if "/" in gv:
                    group, version = gv.split("/")
                    ver = {"groupVersion": gv, "version": version}
                    groups.append({"name": group, "versions": [ver], "preferredVersion": ver})
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        if path in _RESOURCES:
            gv, resources = _RESOURCES[path]
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                {"name": n, "singularName": n[:-1], "namespaced": ns, "kind": k,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                for n, k, ns in resources]})
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                "code": 404, "message": "not found"})


def find_kubectl() -> str | None:
    """kubectl from ``PALISADE_KUBECTL`` (a binary), ``PALISADE_K8S_BIN`` (scripts/build-k8s.sh's
    bin directory), the build cache (``PALISADE_K8S_CACHE``, default /var/cache/palisade-k8s), or PATH."""
    explicit = os.environ.get("PALISADE_KUBECTL")
    if explicit:
        return explicit  # named on purpose: a wrong path fails the test instead of skipping it
    bin_dir = os.environ.get("PALISADE_K8S_BIN")
    if bin_dir and os.access(os.path.join(bin_dir, "kubectl"), os.X_OK):
        return os.path.join(bin_dir, "kubectl")
    cache = Path(os.environ.get("PALISADE_K8S_CACHE", "/var/cache/palisade-k8s"))
    built = sorted(cache.glob("*/bin/kubectl"), key=lambda p: p.stat().st_mtime) if cache.is_dir() else []
    if built:  # the pinned build first: a kubectl on PATH may be any version
        return str(built[-1])
    return shutil.which("kubectl")


KUBECTL = find_kubectl()
KUBECTL_MISSING = ("kubectl not found (Debian has no package): run scripts/build-k8s.sh, or set "
                   "PALISADE_KUBECTL / PALISADE_K8S_BIN, or put kubectl on PATH")


@pytest.mark.skipif(KUBECTL is None, reason=KUBECTL_MISSING)
def test_kubectl_dry_run_accepts_the_manifests(tmp_path, certs):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kubeconfig = tmp_path / "kubeconfig"  # empty: everything comes from --server
        kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
        manifest = tmp_path / "palisade.yaml"
        manifest.write_text(to_yaml(build(full_options(certs))))
        proc = subprocess.run(
            [str(KUBECTL), "--server", f"http://127.0.0.1:{server.server_address[1]}", "--kubeconfig",
             str(kubeconfig), "apply", "--dry-run=client", "--validate=false", "-f", str(manifest)],
            capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    created = [line for line in proc.stdout.splitlines() if line.endswith("created (dry run)")]
    assert len(created) == len(build(full_options(certs))), proc.stdout
