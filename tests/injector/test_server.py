"""``python -m injector serve`` over real HTTPS: golden cases, errors, metrics, rotation, concurrency.

The server runs as a subprocess on 127.0.0.1 with an ephemeral port and a CA made
by ``injector certs``; every client verifies that CA (and the hostname), as the
API server does. Nothing is mocked but the API server itself (our client).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import http.client
import json
import shutil
import ssl
import time
from pathlib import Path

import pytest
import yaml

from injector.certs import write_certs
from tests.injector.conftest import start_server, stop_server
from tests.injector.test_golden import CASES, apply_response, assert_matches_golden, load_case, make_review

TESTDATA = Path(__file__).parent / "testdata"


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Client:
    """Keep-alive HTTPS client that verifies the server against the test CA."""

    def __init__(self, port: int, ca: Path, host: str = "127.0.0.1") -> None:
        self.conn = http.client.HTTPSConnection(host, port, context=client_context(ca), timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, bytes, str]:
        headers = {"Content-Type": content_type} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")

    def review(self, path: str, review: dict) -> dict:
        status, body, ctype = self.request("POST", path, json.dumps(review).encode())
        assert status == 200, body
        assert ctype.startswith("application/json")
        return json.loads(body)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def servers(certs_dir, tmp_path_factory):
    """One server per distinct golden config, started lazily, all stopped at the end."""
    started: dict[str, object] = {}

    def get(config: Path | None):
        key = str(config)
        if key not in started:
            started[key] = start_server(certs_dir, *(["--config", str(config)] if config else []))
        return started[key]

    yield get
    for server in started.values():
        assert stop_server(server) == 0


@pytest.fixture(scope="module")
def server(servers):
    return servers(None)


@pytest.fixture
def client(server, certs_dir):
    c = Client(server.port, certs_dir / "ca.crt")
    yield c
    c.close()


@pytest.mark.parametrize("name", CASES)
def test_golden_over_https(name, servers, certs_dir):
    pod, _config, d = load_case(name)
    srv = servers(d / "config.yaml" if (d / "config.yaml").exists() else None)
    c = Client(srv.port, certs_dir / "ca.crt")
    try:
        review = make_review(copy.deepcopy(pod), uid=f"uid-{name}")
        answer = c.review("/mutate", review)
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == f"uid-{name}"
        patched = assert_matches_golden(name, d, pod, answer["response"])
        if patched is not None:
            again = c.review("/mutate", make_review(patched, uid="second"))["response"]
            assert again["uid"] == "second" and again["allowed"] is True
            assert "patch" not in again
    finally:
        c.close()


def test_hostname_verification_uses_service_dns_name(server, certs_dir):
    """The API server connects to <svc>.<ns>.svc; the cert must carry that SAN (and not others)."""
    ctx = client_context(certs_dir / "ca.crt")
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="palisade-injector.palisade-system.svc") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="evil.example.com")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_rejects_tls_1_1_accepts_1_2(server, certs_dir):
    """openssl s_client at security level 0 offers TLS 1.1 for real; the server must refuse it.

    The TLS 1.2 run with otherwise identical options is the control: it proves the refusal
    comes from the server's minimum version and not from the client's own settings.
    """
    import subprocess

    def handshake(version: str) -> str:
        proc = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", version,
             "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile", str(certs_dir / "ca.crt")],
            input=b"", capture_output=True, timeout=20)
        return proc.stdout.decode(errors="replace")

    ok = handshake("-tls1_2")
    assert "New, TLSv1.2, Cipher is" in ok and "Verify return code: 0 (ok)" in ok
    refused = handshake("-tls1_1")
    assert "Cipher is (NONE)" in refused and "no peer certificate available" in refused


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"", "application/json", 400, "bad AdmissionReview: empty body"),
    (b"{not json", "application/json", 400, "bad AdmissionReview: body is not valid JSON"),
    (b"[]", "application/json", 400, "expected a JSON object"),
    (b'{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}', "application/json",
     400, "apiVersion must be admission.k8s.io/v1"),
    (b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}', "application/json", 400,
     "request: missing"),
    (b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"","operation":"CREATE"}}',
     "application/json", 400, "request.uid"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u", "operation": "CREATE", "namespace": "x", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "object": {"metadata": {}, "spec": {"containers": "nope"}}}}).encode(), "application/json", 400,
     "request.object.spec.containers: not a list"),
    (b"\xff\xfe", "application/json", 400, "not UTF-8"),
    (b"{}", "text/plain", 415, "Content-Type must be application/json"),
    (b"{}", "application/x-www-form-urlencoded", 415, "Content-Type must be application/json"),
])
def test_bad_requests_get_one_line_and_the_server_survives(client, body, content_type, status, message):
    got, text, _ = client.request("POST", "/mutate", body, content_type)
    assert got == status
    line = text.decode()
    assert message in line
    assert line.count("\n") == 1 and line.endswith("\n")
    assert "Traceback" not in line
    assert client.request("GET", "/healthz")[0] == 200


def test_oversized_body_is_413(client):
    status, text, _ = client.request("POST", "/mutate", b"x" * (9 * 1024 * 1024))
    assert status == 413


def test_non_pod_and_non_create_are_allowed_without_patch(client):
    review = make_review({"metadata": {"name": "x", "namespace": "shop"}, "spec": {"containers": []}})
    review["request"]["operation"] = "DELETE"
    assert client.review("/mutate", review)["response"] == {"uid": "0f1e2d3c-golden", "allowed": True}
    review["request"]["operation"] = "CREATE"
    review["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    assert client.review("/mutate", review)["response"] == {"uid": "0f1e2d3c-golden", "allowed": True}


def test_validate_endpoint_denies_unprotected_cde_pod(client):
    pod = yaml.safe_load((TESTDATA / "deployment-pod" / "input.yaml").read_text())
    answer = client.review("/validate", make_review(copy.deepcopy(pod), uid="v1"))["response"]
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 403
    assert "pci.palisade.dev/scope=cde" in answer["status"]["message"]
    assert "palisade.dev/injection=enabled" in answer["status"]["message"]
    # The same pod after /mutate passes /validate: the webhooks agree with each other.
    mutated = apply_response(pod, client.review("/mutate", make_review(copy.deepcopy(pod)))["response"])
    assert client.review("/validate", make_review(mutated, uid="v2"))["response"] == {"uid": "v2", "allowed": True}


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_ready_and_metrics(client):
    assert client.request("GET", "/healthz")[:2] == (200, b"ok\n")
    assert client.request("GET", "/readyz")[:2] == (200, b"ok\n")
    before = client.request("GET", "/metrics")[1].decode()
    plain = yaml.safe_load((TESTDATA / "plain-pod" / "input.yaml").read_text())
    client.review("/mutate", make_review(plain))
    client.request("POST", "/mutate", b"junk")
    status, body, ctype = client.request("GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    after = body.decode()
    for outcome in ("injected", "invalid"):
        key = dict(endpoint="mutate", outcome=outcome)
        assert _metric(after, "palisade_injector_reviews_total", **key) == \
            _metric(before, "palisade_injector_reviews_total", **key) + 1
    assert _metric(after, "palisade_injector_review_duration_seconds_count", endpoint="mutate") >= 1
    assert _metric(after, "palisade_injector_cert_expiry_timestamp_seconds") > time.time()


def test_many_concurrent_reviews(server, certs_dir):
    """200 reviews over 20 keep-alive connections at once: every answer carries its own uid."""
    import aiohttp

    plain = yaml.safe_load((TESTDATA / "two-containers" / "input.yaml").read_text())
    expected = yaml.safe_load((TESTDATA / "two-containers" / "expected.yaml").read_text())

    async def run() -> list[tuple[str, dict]]:
        conn = aiohttp.TCPConnector(limit=20, ssl=client_context(certs_dir / "ca.crt"))
        async with aiohttp.ClientSession(connector=conn) as session:
            async def one(i: int) -> tuple[str, dict]:
                async with session.post(f"{server.url}/mutate", json=make_review(copy.deepcopy(plain),
                                                                                 uid=f"c-{i}")) as r:
                    assert r.status == 200
                    return f"c-{i}", (await r.json())["response"]
            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(run())
    assert len(results) == 200
    for uid, response in results:
        assert response["uid"] == uid
        assert apply_response(plain, response) == expected


def test_certificate_rotation_is_picked_up(tmp_path):
    """Renew the serving cert (same CA) while serving: new handshakes get the new certificate."""
    d = tmp_path / "certs"
    write_certs(d, "palisade-injector", "palisade-system", ips=["127.0.0.1"])
    srv = start_server(d, "--reload-interval", "0.2")
    try:
        first = _peer_serial(srv.port, d / "ca.crt")
        # A half-done rotation (new cert, old key) must not break serving.
        spare = tmp_path / "spare"
        shutil.copytree(d, spare)
        write_certs(spare, "palisade-injector", "palisade-system", ips=["127.0.0.1"])
        shutil.copy(spare / "tls.crt", d / "tls.crt")
        assert _wait_for(lambda: _failed_reloads(srv.port, d / "ca.crt") >= 1)
        assert _peer_serial(srv.port, d / "ca.crt") == first
        shutil.copy(spare / "tls.key", d / "tls.key")
        assert _wait_for(lambda: _peer_serial(srv.port, d / "ca.crt") != first)
        c = Client(srv.port, d / "ca.crt")
        try:
            assert c.request("GET", "/readyz")[0] == 200
            assert 'result="ok"' in c.request("GET", "/metrics")[1].decode()
        finally:
            c.close()
    finally:
        assert stop_server(srv) == 0


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll a readiness condition (the reload poll interval is 0.2 s) instead of sleeping blindly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _failed_reloads(port: int, ca: Path) -> float:
    c = Client(port, ca)
    try:
        return _metric(c.request("GET", "/metrics")[1].decode(), "palisade_injector_cert_reloads_total",
                       result="failed")
    finally:
        c.close()


def _peer_serial(port: int, ca: Path) -> int:
    import socket

    from cryptography import x509

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_sigterm_stops_cleanly(certs_dir):
    srv = start_server(certs_dir)
    c = Client(srv.port, certs_dir / "ca.crt")
    assert c.request("GET", "/healthz")[0] == 200
    c.close()
    assert stop_server(srv) == 0


def test_unreadable_certificate_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    from tests.injector.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "injector", "serve", "--cert", str(tmp_path / "nope.crt"),
                           "--key", str(tmp_path / "nope.key"), "--port", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.crt: cannot read" in proc.stderr
    (tmp_path / "bad.crt").write_text("garbage")
    (tmp_path / "bad.key").write_text("garbage")
    proc = subprocess.run([sys.executable, "-m", "injector", "serve", "--cert", str(tmp_path / "bad.crt"),
                           "--key", str(tmp_path / "bad.key"), "--port", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 2 and "cannot load the certificate pair" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_one_line_exit_1(server, certs_dir):
    import subprocess
    import sys

    from tests.injector.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "injector", "serve", "--cert", str(certs_dir / "tls.crt"),
                           "--key", str(certs_dir / "tls.key"), "--host", "127.0.0.1", "--port", str(server.port)],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in proc.stderr and "Traceback" not in proc.stderr


def test_patch_is_base64_json_patch(client):
    plain = yaml.safe_load((TESTDATA / "plain-pod" / "input.yaml").read_text())
    response = client.review("/mutate", make_review(plain))["response"]
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    assert {op["op"] for op in ops} == {"add"}
    assert [op["path"] for op in ops if op["path"].startswith("/spec/initContainers")] == ["/spec/initContainers"]
