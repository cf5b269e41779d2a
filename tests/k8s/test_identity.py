"""The sidecar's Kubernetes identity resolver against the real API server, with a real
service-account token limited by the shipped ClusterRole/Binding.

The resolver is configured by the same in-cluster loader the sidecar uses (token file, CA
file, KUBERNETES_SERVICE_HOST/PORT), pointed at a loopback relay (tests/k8s/tcpproxy.py) in
front of the API server that the tests cut to force reconnects. Pods get their IPs the way
the kubelet sets them: a status patch (there is no kubelet here)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from firewall.identity.identity import KubernetesIdentitySource
from tests.harness import wait_until
from tests.k8s.tcpproxy import TcpProxy

pytestmark = pytest.mark.k8s

# The shipped binding covers the service accounts of `policy_namespaces` (default: "default").
SIDECAR_NS = "default"
SIDECAR_SA = "palisade-test-app"
# Measured on the shared 2-core machine (docs/platform.md); generous against CI scheduling.
VISIBLE_WITHIN = 3.0


def pod(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}


def create_with_ip(kube, ns: str, name: str, ip: str, labels: dict | None = None) -> None:
    p = pod(name, labels)
    p["metadata"]["namespace"] = ns
    kube.create(p)
    kube.kubectl("patch", "pod", "-n", ns, name, "--subresource", "status", "--type", "merge",
                 "-p", json.dumps({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}))


@pytest.fixture(scope="module")
def sa_token(kube, tmp_path_factory) -> Path:
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": SIDECAR_SA, "namespace": SIDECAR_NS}})
    token = kube.kubectl("create", "token", SIDECAR_SA, "-n", SIDECAR_NS, "--duration", "2h").stdout.strip()
    path = tmp_path_factory.mktemp("sa") / "token"
    path.write_text(token)
    return path


def sa_kubectl(kube, token: Path, *args: str, check: bool = False):
    return kube.kubectl("--kubeconfig", "/dev/null", "--server", kube.server, "--certificate-authority",
                        str(kube.state / "pki" / "ca.crt"), "--token", token.read_text(), *args, check=check)


def test_rbac_grants_the_sidecar_exactly_pod_reads(kube, sa_token):
    yes = [("list", "pods", "-A"), ("watch", "pods", "-A"), ("get", "pods", "-n", "kube-system")]
    no = [("create", "pods", "-n", SIDECAR_NS), ("delete", "pods", "-n", SIDECAR_NS),
          ("patch", "pods", "-n", SIDECAR_NS), ("update", "pods/status", "-n", SIDECAR_NS),
          ("create", "pods/exec", "-n", SIDECAR_NS), ("create", "pods/ephemeralcontainers", "-n", SIDECAR_NS),
          ("get", "secrets", "-n", SIDECAR_NS), ("list", "configmaps", "-A"), ("list", "nodes"),
          ("list", "services", "-A"), ("create", "serviceaccounts/token", "-n", SIDECAR_NS),
          ("list", "mutatingwebhookconfigurations")]
    for check in yes:
        proc = sa_kubectl(kube, sa_token, "auth", "can-i", *check)
        assert proc.stdout.strip() == "yes", (check, proc.stdout, proc.stderr)
    for check in no:
        proc = sa_kubectl(kube, sa_token, "auth", "can-i", *check)
        assert proc.stdout.strip() == "no", (check, proc.stdout, proc.stderr)
    # the whole list: pods get/list/watch plus what every authenticated user may do, nothing else
    listing = sa_kubectl(kube, sa_token, "auth", "can-i", "--list", "-n", SIDECAR_NS, check=True).stdout
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    granted = {r[0] for r in rows}
    assert "pods" in granted
    assert granted <= {"pods", "selfsubjectreviews.authentication.k8s.io",
                       "selfsubjectaccessreviews.authorization.k8s.io",
                       "selfsubjectrulesreviews.authorization.k8s.io"} | {r[0] for r in rows if r[0].startswith("[")}
    # a service account of a namespace that did not opt in gets nothing
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x", "namespace": "kube-public"}})
    other = sa_token.parent / "other"
    other.write_text(kube.kubectl("create", "token", "x", "-n", "kube-public").stdout.strip())
    assert sa_kubectl(kube, other, "auth", "can-i", "list", "pods", "-A").stdout.strip() == "no"


@pytest.fixture
def proxy(kube):
    p = TcpProxy(kube.api_port)
    yield p
    p.close()


def make_source(kube, sa_token: Path, proxy: TcpProxy, **kw) -> KubernetesIdentitySource:
    """The sidecar's resolver, configured like in a pod (InClusterConfigLoader) but via the relay."""
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    cfg = client.Configuration()
    InClusterConfigLoader(token_filename=str(sa_token), cert_filename=str(kube.state / "pki" / "ca.crt"),
                          environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                   "KUBERNETES_SERVICE_PORT": str(proxy.port)}).load_and_set(cfg)
    return KubernetesIdentitySource(client.ApiClient(cfg), min_backoff=0.1, max_backoff=1.0, **kw)


def _seen(src: KubernetesIdentitySource, ip: str, pred=lambda i: not i.is_world):
    ident = src.resolve(ip)
    return ident if pred(ident) else None


def test_pods_added_relabelled_deleted_visible_within_bound(kube, sa_token, proxy):
    ns = kube.namespace("peers")
    src = make_source(kube, sa_token, proxy).start()
    try:
        assert src.wait_ready(10)
        latencies = {}
        t0 = time.monotonic()
        create_with_ip(kube, ns, "ledger", "10.244.7.10", {"app": "ledger", "tier": "db"})
        ident = wait_until(lambda: _seen(src, "10.244.7.10"), VISIBLE_WITHIN, what="added pod")
        latencies["added"] = time.monotonic() - t0
        assert (ident.namespace, ident.pod, ident.label_map["tier"]) == (ns, "ledger", "db")

        t0 = time.monotonic()
        kube.kubectl("label", "pod", "-n", ns, "ledger", "app=ledger-v2", "--overwrite")
        wait_until(lambda: _seen(src, "10.244.7.10", lambda i: i.label_map.get("app") == "ledger-v2"),
                   VISIBLE_WITHIN, what="relabelled pod")
        latencies["relabelled"] = time.monotonic() - t0

        t0 = time.monotonic()
        kube.kubectl("delete", "pod", "-n", ns, "ledger", "--wait=false")
        wait_until(lambda: _seen(src, "10.244.7.10", lambda i: i.is_world), VISIBLE_WITHIN, what="deleted pod")
        latencies["deleted"] = time.monotonic() - t0
        print(f"identity visible after (s, incl. kubectl): {latencies}")
        assert src.relists == 1 and src.errors == 0
    finally:
        src.stop()


def test_api_server_restart_and_410_relist(kube, sa_token, proxy):
    """API server restart: the new watch cache starts at the current revision, which the API
    server's own start-up writes have moved past the resolver's resourceVersion, so resuming
    gets 410 Gone and the resolver relists (measured: one relist per restart - with N sidecars,
    N lists). Then cut off while pods change and the API server restarts again: the relist
    must also drop the pod deleted meanwhile (no DELETED event ever reaches the resolver)."""
    ns = kube.namespace("churn")
    create_with_ip(kube, ns, "stays", "10.244.8.1")
    create_with_ip(kube, ns, "goes", "10.244.8.2")
    src = make_source(kube, sa_token, proxy)
    src.list_page_size = 2   # every (re)list takes several pages: continue tokens, one snapshot
    src.start()
    try:
        assert src.wait_ready(10)
        assert _seen(src, "10.244.8.1") and _seen(src, "10.244.8.2")
        # 1. API server restart while connected
        kube.script("restart-apiserver")
        create_with_ip(kube, ns, "after-restart", "10.244.8.3")
        wait_until(lambda: _seen(src, "10.244.8.3"), 20, what="pod created after the restart")
        # 2. cut off, history moves on, the API server restarts: the old resourceVersion is gone
        proxy.cut()
        relists = src.relists
        kube.kubectl("delete", "pod", "-n", ns, "goes", "--wait=false")
        create_with_ip(kube, ns, "new", "10.244.8.4")
        kube.script("restart-apiserver")
        proxy.restore()
        wait_until(lambda: src.relists > relists, 30, what="relist after 410")
        wait_until(lambda: _seen(src, "10.244.8.4"), 10, what="pod created while cut off")
        assert src.resolve("10.244.8.2").is_world, "a pod deleted while cut off is still in the map"
        assert _seen(src, "10.244.8.1") and _seen(src, "10.244.8.3")
    finally:
        src.stop()


def test_bookmarks_advance_the_resource_version(kube, sa_token, proxy):
    """A namespace-scoped resolver sees no events from other namespaces, but the API server's
    bookmarks (2 s before each watch times out) carry the newer resourceVersion, so the next
    watch resumes near the head instead of far behind (where it would risk a 410)."""
    quiet = kube.namespace("quiet")
    busy = kube.namespace("busy")
    src = make_source(kube, sa_token, proxy, namespace=quiet, watch_timeout=4).start()
    try:
        assert src.wait_ready(10)
        start_rv = int(src.resource_version)
        create_with_ip(kube, busy, "elsewhere", "10.244.9.1")
        head = int(kube.get("pod", "-n", busy, "elsewhere")["metadata"]["resourceVersion"])
        assert head > start_rv
        wait_until(lambda: int(src.resource_version) >= head, 15, what="a bookmark past the busy namespace's change")
        assert src.resolve("10.244.9.1").is_world   # out of its namespace: not in its map
        assert src.relists == 1
    finally:
        src.stop()


def test_updates_that_change_no_identity_publish_nothing(kube, sa_token, proxy):
    """Each published map makes the sidecar rebuild its inspection and cut its open flows
    (run_cli._swap), so status and annotation updates - most pod events in a cluster - must not
    publish; a label change must, once."""
    import threading

    ns = kube.namespace("quietupd")
    create_with_ip(kube, ns, "web", "10.244.10.1", {"app": "web"})
    published = []
    lock = threading.Lock()

    def on_change(m) -> None:
        with lock:
            published.append(m.resolve("10.244.10.1").label_map.get("app"))

    src = make_source(kube, sa_token, proxy, on_change=on_change).start()
    try:
        assert src.wait_ready(10)
        start = len(published)
        kube.kubectl("annotate", "pod", "-n", ns, "web", "note=1")
        kube.kubectl("patch", "pod", "-n", ns, "web", "--subresource", "status", "--type", "merge", "-p",
                     json.dumps({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
        # a marker change elsewhere, seen after the two updates above (one watch, in order)
        create_with_ip(kube, ns, "marker", "10.244.10.2")
        wait_until(lambda: _seen(src, "10.244.10.2"), VISIBLE_WITHIN, what="marker pod")
        with lock:
            between = published[start:]
        # the marker's create (no IP yet: nothing) and its status patch (IP: one map), no more
        assert len(between) == 1, between
        kube.kubectl("label", "pod", "-n", ns, "web", "app=web2", "--overwrite")
        wait_until(lambda: published[-1] == "web2", VISIBLE_WITHIN, what="relabel published")
        assert len(published) == start + 2
    finally:
        src.stop()
