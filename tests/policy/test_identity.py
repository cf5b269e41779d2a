"""Identity resolvers: the static file, and the Kubernetes pod watch against a fake API server.

The API server is the one part we fake (no cluster here): a tiny HTTP server on
127.0.0.1 speaking the list/watch JSON of ``/api/v1/pods``, including 410 Gone.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from firewall.identity.identity import (
    Identity,
    IdentityError,
    IdentityMap,
    KubernetesIdentitySource,
    identities_from_pod,
    load_identity_file,
)
from tests.policy.common import write

IDS = """\
# test identities
- ip: 10.0.0.5
  namespace: payments
  pod: payment-api-0
  labels: {app: payment-api, pci.palisade.dev/scope: cde}
  serviceAccount: payments
- {ips: [10.0.1.5, "fd00::5"], namespace: shop, pod: checkout-0, labels: {app: checkout}}
"""


def test_identity_file(tmp_path) -> None:
    m = load_identity_file(write(tmp_path, IDS, "ids.yaml"))
    pay = m.resolve("10.0.0.5")
    assert (pay.namespace, pay.pod, pay.scope, pay.service_account) == ("payments", "payment-api-0", "cde", "payments")
    assert m.resolve("fd00::5").pod == "checkout-0" and m.resolve("fd00:0::5").pod == "checkout-0"
    assert m.resolve("::ffff:10.0.1.5").pod == "checkout-0"
    assert m.resolve("10.0.1.5").scope == "out-of-scope"
    unknown = m.resolve("192.0.2.1")
    assert unknown.is_world and unknown.ip == "192.0.2.1" and unknown.to_json()["world"] is True
    assert m.by_pod("shop", "checkout-0").ip == "10.0.1.5"
    assert len(m) == 3


@pytest.mark.parametrize("text,needle,line", [
    ("- {ip: 10.0.0.1, namespace: a, labes: {}}\n", "[0].labes: unknown field", 1),
    ("- {namespace: a}\n", "ip is required", 1),
    ("- {ip: 10.0.0.1, namespace: a}\n- {ip: 10.0.0.999, namespace: a}\n", "invalid address", 2),
    ("- {ip: 10.0.0.1}\n", "namespace is required", 1),
    ("- {ip: 10.0.0.1, namespace: a, labels: {v: 1}}\n", "quote numbers", 1),
    ("ip: 10.0.0.1\n", "expected a list", 1),
    ("- [unclosed\n", "invalid YAML", 2),
])
def test_identity_file_errors(tmp_path, text: str, needle: str, line: int) -> None:
    path = write(tmp_path, text, "ids.yaml")
    with pytest.raises(IdentityError) as exc:
        load_identity_file(path)
    msg = str(exc.value)
    assert needle in msg and msg.startswith(f"{path}:{line}:"), msg


def test_identity_map_is_read_only() -> None:
    m = IdentityMap([Identity.make("10.0.0.1", "a", "p")])
    with pytest.raises(TypeError):
        m._by_ip["10.0.0.2"] = Identity("10.0.0.2")  # type: ignore[index]


def pod(name: str, ip: str | None, ns: str = "default", uid: str | None = None, rv: str = "1",
        labels: dict | None = None, host_network: bool = False, phase: str = "Running") -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}", "resourceVersion": rv,
                     "labels": labels or {"app": name}},
        "spec": {"serviceAccountName": "sa-" + name, "hostNetwork": host_network, "containers": []},
        "status": {"phase": phase, **({"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {})},
    }


def test_identities_from_pod() -> None:
    assert identities_from_pod(pod("a", "10.0.0.1"))[0].service_account == "sa-a"
    assert identities_from_pod(pod("a", "10.0.0.1", host_network=True)) == []
    assert identities_from_pod(pod("a", "10.0.0.1", phase="Succeeded")) == []
    assert identities_from_pod(pod("a", None)) == []


class FakeApiServer:
    """Pods list + watch with resourceVersions, 410 Gone after compaction, forced disconnects."""

    def __init__(self) -> None:
        self.rv = 1
        self.pods: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.compacted = 0
        self.cond = threading.Condition()
        self.disconnect_gen = 0
        self.requests: list[str] = []
        self.fail_lists = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                outer.requests.append(self.path)
                if url.path != "/api/v1/pods":
                    self.send_error(404)
                    return
                if q.get("watch") in ("true", "1", "True"):
                    outer.serve_watch(self, int(q.get("resourceVersion") or 0), float(q.get("timeoutSeconds") or 5))
                else:
                    outer.serve_list(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        with self.cond:
            self.disconnect_gen += 1
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # state changes
    def change(self, kind: str, p: dict) -> None:
        with self.cond:
            self.rv += 1
            p["metadata"]["resourceVersion"] = str(self.rv)
            if kind == "DELETED":
                self.pods.pop(p["metadata"]["uid"], None)
            else:
                self.pods[p["metadata"]["uid"]] = p
            self.events.append((self.rv, kind, json.loads(json.dumps(p))))
            self.cond.notify_all()

    def compact_and_disconnect(self) -> None:
        with self.cond:
            self.compacted = self.rv + 1000  # every resourceVersion seen so far is too old
            self.rv = self.compacted
            self.events.clear()
            self.disconnect_gen += 1
            self.cond.notify_all()

    def _send(self, h, status: int, body: bytes | None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Connection", "close")
        if body is not None:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body is not None:
            h.wfile.write(body)

    def serve_list(self, h) -> None:
        with self.cond:
            if self.fail_lists > 0:
                self.fail_lists -= 1
                self._send(h, 500, json.dumps({"kind": "Status", "code": 500, "message": "boom"}).encode())
                return
            body = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                    "items": list(self.pods.values())}
        self._send(h, 200, json.dumps(body).encode())

    def serve_watch(self, h, since: int, timeout: float) -> None:
        # Chunked like the real API server, so each event reaches the client as it happens.
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            self._watch_body(h, since, timeout)
        finally:
            h.wfile.write(b"0\r\n\r\n")
            h.close_connection = True

    @staticmethod
    def _chunk(h, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()

    def _watch_body(self, h, since: int, timeout: float) -> None:
        deadline = time.monotonic() + min(timeout, 5)
        with self.cond:
            gen = self.disconnect_gen
            if since < self.compacted:
                self._chunk(h, {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                            "message": "too old resource version"}})
                return
            sent = since
            while time.monotonic() < deadline and gen == self.disconnect_gen:
                for rv, kind, obj in self.events:
                    if rv > sent:
                        self._chunk(h, {"type": kind, "object": obj})
                        sent = rv
                self.cond.wait(0.2)


@pytest.fixture
def api():
    server = FakeApiServer()
    yield server
    server.close()


class Watcher:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.map = IdentityMap()

    def __call__(self, m: IdentityMap) -> None:
        with self.cond:
            self.map = m
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.map), timeout)


def make_source(api: FakeApiServer, watcher: Watcher) -> KubernetesIdentitySource:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = api.url
    return KubernetesIdentitySource(client.ApiClient(cfg), on_change=watcher, watch_timeout=2,
                                    min_backoff=0.05, max_backoff=0.2)


def test_kubernetes_source_list_watch_relist(api: FakeApiServer) -> None:
    api.change("ADDED", pod("a", "10.0.0.1", ns="shop", labels={"app": "a", "pci.palisade.dev/scope": "cde"}))
    api.fail_lists = 1  # first list fails: the source backs off and retries
    watcher = Watcher()
    src = make_source(api, watcher).start()
    try:
        assert src.wait_ready(10)
        a = src.resolve("10.0.0.1")
        assert (a.namespace, a.pod, a.scope, a.service_account) == ("shop", "a", "cde", "sa-a")
        assert src.errors >= 1

        api.change("ADDED", pod("b", "10.0.0.2"))
        assert watcher.wait_for(lambda m: m.resolve("10.0.0.2").pod == "b")
        api.change("DELETED", pod("a", "10.0.0.1", ns="shop"))
        assert watcher.wait_for(lambda m: m.resolve("10.0.0.1").is_world)
        assert src.current().resolve("10.0.0.2").pod == "b"

        # history compacted while disconnected: the watch gets 410 Gone and must relist
        relists = src.relists
        with api.cond:
            api.pods["uid-c"] = pod("c", "10.0.0.3")
        api.compact_and_disconnect()
        assert watcher.wait_for(lambda m: m.resolve("10.0.0.3").pod == "c")
        assert src.relists == relists + 1
        assert src.resolve("10.0.0.2").pod == "b"

        # and watching resumes from the new resourceVersion
        api.change("MODIFIED", pod("b", "10.0.0.22", uid="uid-b"))
        assert watcher.wait_for(lambda m: m.resolve("10.0.0.22").pod == "b" and m.resolve("10.0.0.2").is_world)
        assert any("resourceVersion=" in r and "watch=" in r for r in api.requests)
    finally:
        t0 = time.monotonic()
        src.stop(timeout=5)
        assert time.monotonic() - t0 < 5.5
