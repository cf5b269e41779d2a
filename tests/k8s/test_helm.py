"""The Helm chart with a real helm: lint, template (diffed against `python -m injector manifests`
so the two install paths cannot drift), and install into a second real API server, where the
release then injects pods through the webhook served from this checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.k8s.conftest import REPO, build_binaries, start_cluster

pytestmark = pytest.mark.k8s

CHART = REPO / "deploy" / "helm" / "palisade"
# Labels only Helm sets (release bookkeeping); everything else must match the generator.
HELM_ONLY_LABELS = ("app.kubernetes.io/managed-by", "helm.sh/chart")
# Helm's rollout trigger on config changes (`kubectl apply` users restart the Deployment).
HELM_ONLY_ANNOTATIONS = ("checksum/config",)


def helm(bin_dir: Path, *args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/palisade-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/palisade-helm/config", "HELM_DATA_HOME": "/tmp/palisade-helm/data"}
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run([str(bin_dir / "helm"), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    from tests.k8s.conftest import _why_not

    if _why_not():
        pytest.skip(_why_not())
    return build_binaries()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("helm-certs")
    subprocess.run([sys.executable, "-m", "injector", "certs", "-o", str(out)], check=True, capture_output=True)
    return out


def _tls_args(certs: Path) -> list[str]:
    return ["--set-file", f"tls.caBundle={certs / 'ca.crt'}", "--set-file", f"tls.cert={certs / 'tls.crt'}",
            "--set-file", f"tls.key={certs / 'tls.key'}"]


def test_helm_lint(bin_dir):
    proc = helm(bin_dir, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


def _by_key(docs) -> dict[tuple[str, str, str], dict]:
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs if d}


def _drop_helm_labels(obj):
    if isinstance(obj, dict):
        for field, keys in (("labels", HELM_ONLY_LABELS), ("annotations", HELM_ONLY_ANNOTATIONS)):
            if isinstance(obj.get(field), dict):
                for key in keys:
                    obj[field].pop(key, None)
                if not obj[field] and field == "annotations":
                    del obj[field]
        return {k: _drop_helm_labels(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_drop_helm_labels(v) for v in obj]
    return obj


def _parsed(obj):
    """ConfigMap values that are YAML documents compare as data, not as text (key order)."""
    if obj.get("kind") == "ConfigMap":
        obj = {**obj, "data": {k: yaml.safe_load(v) if k.endswith(".yaml") else v
                               for k, v in (obj.get("data") or {}).items()}}
    return obj


def _diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b), key=str)
                for p in (_diff(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b
                          else [f"{path}.{k}: only in {'chart' if k in a else 'generator'}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: chart {a!r} != generator {b!r}"]


def test_chart_renders_what_the_generator_generates(bin_dir, certs):
    """`helm template` with the same certificate equals `python -m injector manifests`, object for
    object and field for field, but for Helm's own labels and the Namespace (helm creates it)."""
    rendered = helm(bin_dir, "template", "palisade", str(CHART), "--namespace", "palisade-system",
                    *_tls_args(certs)).stdout
    generated = subprocess.run([sys.executable, "-m", "injector", "manifests", "--certs-dir", str(certs)],
                               capture_output=True, text=True, check=True).stdout
    chart = _by_key(_parsed(_drop_helm_labels(d)) for d in yaml.safe_load_all(rendered) if d)
    gen = _by_key(_parsed(d) for d in yaml.safe_load_all(generated) if d)
    gen.pop(("Namespace", "", "palisade-system"))
    assert sorted(chart) == sorted(gen)
    problems = [f"{key[0]}/{key[2]}{p}" for key in sorted(gen) for p in _diff(chart[key], gen[key])]
    assert not problems, "\n".join(problems)


def test_helm_install_into_a_real_api_server(bin_dir):
    """install as the README says (the chart makes the CA and certificate), then a pod in an
    opted-in namespace is injected through the release's webhooks by a webhook server serving
    the chart's certificate; upgrade reuses it (`lookup` against the live Secret: same caBundle);
    uninstall removes the webhooks."""
    import base64

    tmp = Path(f"/tmp/palisade-k8s-helm-{os.getpid()}")
    kube = start_cluster(tmp, 16643, 23990, "127.0.98.0/24", install="none")
    try:
        helm(bin_dir, "install", "palisade", str(CHART), "--namespace", "palisade-system", "--create-namespace",
             kubeconfig=kube.kubeconfig)
        status = json.loads(helm(bin_dir, "status", "palisade", "-n", "palisade-system", "-o", "json",
                                 kubeconfig=kube.kubeconfig).stdout)
        assert status["info"]["status"] == "deployed"
        secret = kube.get("secret", "-n", "palisade-system", "palisade-injector-tls")["data"]
        ca_bundle = kube.get("mutatingwebhookconfiguration", "palisade-injector")["webhooks"][0]["clientConfig"]["caBundle"]
        assert base64.b64decode(ca_bundle) == base64.b64decode(secret["ca.crt"])
        # the webhook server `cluster.sh webhook-start` runs serves the chart's certificate
        (tmp / "webhook-certs").mkdir()
        for name in ("ca.crt", "tls.crt", "tls.key"):
            (tmp / "webhook-certs" / name).write_bytes(base64.b64decode(secret[name]))
        kube.script("webhook-start")
        ns = kube.namespace("helm-app", {"palisade.dev/injection": "enabled"})
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": ns},
               "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}
        out = json.loads(kube.create(pod).stdout)
        assert [c["name"] for c in out["spec"]["initContainers"]] == ["palisade-init", "palisade"]
        helm(bin_dir, "upgrade", "palisade", str(CHART), "--namespace", "palisade-system",
             kubeconfig=kube.kubeconfig)
        after = kube.get("mutatingwebhookconfiguration", "palisade-injector")["webhooks"][0]["clientConfig"]
        assert after["caBundle"] == ca_bundle, "helm upgrade made a new CA: running webhooks would be untrusted"
        pod["metadata"]["name"] = "web2"
        out = json.loads(kube.create(pod).stdout)
        assert [c["name"] for c in out["spec"]["initContainers"]] == ["palisade-init", "palisade"]
        helm(bin_dir, "uninstall", "palisade", "--namespace", "palisade-system", kubeconfig=kube.kubeconfig)
        assert kube.kubectl("get", "mutatingwebhookconfiguration", "palisade-injector", check=False).returncode != 0
        pod["metadata"]["name"] = "web3"
        assert "initContainers" not in json.loads(kube.create(pod).stdout)["spec"]
    finally:
        kube.script("down")
