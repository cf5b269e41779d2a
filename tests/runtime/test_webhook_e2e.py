"""The webhook Deployment of deploy/palisade.yaml, run from the same image with podman.

The pod template, its securityContext (non-root 65532, drop ALL, no privilege escalation,
read-only rootfs, RuntimeDefault seccomp) and the injector ConfigMap are taken from the
manifest users apply; only the image name is overridden, as a kustomize image tag would.
The serving certificate comes from ``python -m injector certs``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import jsonpatch
import pytest
import yaml

from tests.runtime.podrunner import PodRunner

pytestmark = pytest.mark.netns  # root + namespaces; conftest also skips without podman

REPO = Path(__file__).resolve().parents[2]
SERVICE = "palisade-injector.palisade-system.svc"


def _manifest(kind: str, name: str) -> dict:
    for doc in yaml.safe_load_all((REPO / "deploy/palisade.yaml").read_text()):
        if doc and doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"deploy/palisade.yaml has no {kind}/{name}")


def test_webhook_container_serves_mutate_over_https(rt_cluster, image, tmp_path):
    deployment = _manifest("Deployment", "palisade-injector")
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**template["metadata"], "name": "palisade-injector", "namespace": "palisade-system"},
           "spec": json.loads(json.dumps(template["spec"]))}
    for c in pod["spec"]["containers"]:
        c["image"], c["imagePullPolicy"] = image, "Never"
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "injector", "certs", "-o", str(certs)], check=True, cwd=REPO,
                   capture_output=True)
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("tls.crt", "tls.key"):
        (tls / name).write_bytes((certs / name).read_bytes())
        (tls / name).chmod(0o644)  # the kubelet's secret files: 0644 by default (defaultMode)
    config = tmp_path / "config"
    config.mkdir()
    for key, value in _manifest("ConfigMap", "palisade-injector-config")["data"].items():
        (config / key).write_text(value)
    runner = PodRunner(pod, rt_cluster.pod("injector", "palisade-system"), rt_cluster.node,
                       volumes_from={"palisade-injector-tls": tls, "palisade-injector-config": config})
    try:
        runner.start()  # readiness probe over HTTPS from the node passed
        st = runner.exec("injector", ["cat", "/proc/1/status"], check=True).stdout
        caps = {k: v.strip() for k, _, v in (ln.partition(":") for ln in st.splitlines()) if k.startswith("Cap")}
        assert caps["CapEff"] == "0000000000000000" and caps["CapPrm"] == "0000000000000000", caps
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "e2e-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
            "namespace": "shop", "object": {"apiVersion": "v1", "kind": "Pod",
                                            "metadata": {"name": "checkout", "labels": {"app": "checkout"}},
                                            "spec": {"containers": [{"name": "app", "image": "shop:1"}]}}}}
        r = rt_cluster.node.run(["curl", "-sS", "--fail", "--max-time", "10", "--cacert", str(certs / "ca.crt"),
                                 "--resolve", f"{SERVICE}:8443:{runner.net.ip}", "-H",
                                 "Content-Type: application/json", "--data-binary", json.dumps(review),
                                 f"https://{SERVICE}:8443/mutate"], check=False)
        assert r.returncode == 0, (r.stderr, runner.logs("injector")[-2000:])
        response = json.loads(r.stdout)["response"]
        assert response["uid"] == "e2e-1" and response["allowed"] is True, response
        patch = json.loads(base64.b64decode(response["patch"]))
        mutated = jsonpatch.apply_patch(review["request"]["object"], patch)
        names = [c["name"] for c in mutated["spec"]["initContainers"] + mutated["spec"]["containers"]]
        assert names == ["palisade-init", "palisade", "app"], names
        assert {c["image"] for c in mutated["spec"]["initContainers"]} == {"palisade:0.1.0"}  # its ConfigMap
        # a client that does not trust the CA is refused: the certificate is really checked
        bad = rt_cluster.node.run(["curl", "-sS", "--max-time", "5", "--resolve", f"{SERVICE}:8443:{runner.net.ip}",
                                   f"https://{SERVICE}:8443/healthz"], check=False)
        assert bad.returncode == 60, bad  # CURLE_PEER_FAILED_VERIFICATION
    finally:
        runner.close()
