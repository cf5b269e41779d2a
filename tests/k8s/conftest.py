"""A real control plane for the k8s tests: etcd + kube-apiserver from scripts/cluster.sh, with
Palisade installed from the generated manifests and the webhook served from this checkout.

Tests here carry the ``k8s`` marker. They need root (the webhook listens on port 443 of a
loopback ClusterIP) and the binaries from scripts/build-k8s.sh (kube-apiserver, kubectl, helm;
Go and the module proxy to build them) plus Debian's etcd. As root (CI) a missing build is built
(cached under /var/cache/palisade-k8s); otherwise the tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "scripts" / "cluster.sh"
BUILD_SH = REPO / "scripts" / "build-k8s.sh"


def pytest_configure(config):
    config.addinivalue_line("markers", "k8s: needs a local kube-apiserver + etcd (scripts/cluster.sh); "
                                       "skipped with the reason when it cannot run")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return ("needs root (the webhook listens on port 443 of a loopback ClusterIP) and the binaries of "
                "scripts/build-k8s.sh; CI runs these as root")
    if not shutil.which("etcd"):
        return "etcd missing (apt-get install etcd-server; scripts/install.sh does it)"
    if not shutil.which("go") and not os.environ.get("PALISADE_K8S_BIN"):
        return "go missing: cannot build kube-apiserver/kubectl/helm (scripts/build-k8s.sh)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _why_not()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("k8s") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Kube:
    """One control plane: its kubeconfig, binaries and kubectl."""

    state: Path
    kubeconfig: Path
    bin: Path
    env: dict

    @property
    def api_port(self) -> int:
        return int(self.env["PALISADE_K8S_PORT"])

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def apply(self, obj: dict | list, *extra: str) -> subprocess.CompletedProcess:
        docs = obj if isinstance(obj, list) else [obj]
        return self.kubectl("apply", *extra, "-f", "-", input=yaml.safe_dump_all(docs))

    def create(self, obj: dict, check: bool = True) -> subprocess.CompletedProcess:
        return self.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(obj), check=check)

    def namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        """A fresh namespace with its ``default`` ServiceAccount (no controller-manager makes it)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.apply([{"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": name, "labels": labels or {}}},
                    {"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": "default", "namespace": name}}])
        return name

    def script(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(["bash", str(CLUSTER_SH), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"cluster.sh {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout.strip()


def build_binaries() -> Path:
    if os.environ.get("PALISADE_K8S_BIN"):
        return Path(os.environ["PALISADE_K8S_BIN"])
    proc = subprocess.run(["bash", str(BUILD_SH)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-k8s.sh failed: {proc.stderr.strip()[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def start_cluster(tmp: Path, port: int, etcd_port: int, service_cidr: str, install: str = "manifests",
                  failure_policy: str = "Fail") -> Kube:
    bin_dir = build_binaries()
    env = {**os.environ, "PALISADE_K8S_DIR": str(tmp), "PALISADE_K8S_PORT": str(port),
           "PALISADE_K8S_ETCD_PORT": str(etcd_port), "PALISADE_K8S_SERVICE_CIDR": service_cidr,
           "PALISADE_K8S_BIN": str(bin_dir), "PALISADE_K8S_INSTALL": install,
           "PALISADE_K8S_FAILURE_POLICY": failure_policy}
    kube = Kube(tmp, tmp / "kubeconfig", bin_dir, env)
    try:
        out = kube.script("up")
    except BaseException:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=120)
        raise
    assert out.splitlines()[-1] == str(tmp / "kubeconfig"), out
    return kube


@pytest.fixture(scope="session")
def kube(tmp_path_factory) -> Kube:
    """The shared control plane with Palisade installed from `python -m injector manifests`."""
    if _why_not():
        pytest.skip(_why_not())
    tmp = Path(f"/tmp/palisade-k8s-test-{os.getpid()}")
    k = start_cluster(tmp, 16543, 23890, "127.0.97.0/24")
    try:
        yield k
    finally:
        k.script("down")
