"""Policy, L7 and DLP enforcement on real traffic through the real sidecar.

Three "pods" in the shape of the DESIGN.md example: a CDE payment API (nginx behind
the sidecar), a connected checkout service and an out-of-scope analytics pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from firewall.identity.podinfo import write_podinfo
from tests.harness import PY, Cluster, nginx_template, wait_until

pytestmark = pytest.mark.netns

TEST_PAN = "4111111111111111"
PAN_MASKED = "411111******1111"

POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: payment-api
  namespace: payments
  annotations:
    palisade.dev/last-reviewed: "2026-11-01"
spec:
  selector:
    matchLabels: {app: payment-api}
  mode: protect
  default: deny
  ingress:
    - name: checkout-to-payments
      description: Checkout submits charges
      from:
        - namespace: shop
          labels: {app: checkout}
      ports: [{port: 9000, protocol: TCP}]
      appProto: http
      http:
        - methods: [POST]
          pathPrefix: /v1/charge
      action: allow
    - name: checkout-admin-port
      description: maintenance port (ssh must still be refused by the cluster rule)
      from:
        - namespace: shop
      ports: [{port: 2222}]
      action: allow
  egress:
    - name: payments-to-analytics
      description: usage statistics, no card data
      to:
        - labels: {app: analytics}
      ports: [{port: 9100}, {port: 9443}]
      action: allow
  dlp:
    - name: no-clear-pan-out-of-cde
      packs: [payment_cards]
      direction: egress
      to: [{scope: out-of-scope}, {scope: connected}]
      action: block
---
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata:
  name: baseline
spec:
  rules:
    - name: no-ssh-into-containers
      direction: ingress
      appProto: ssh
      action: deny
"""

NGINX = nginx_template()

RECORDER = """
import socket, sys, threading
out = sys.argv[2]
def handle(c):
    data = b""
    try:
        while True:
            b = c.recv(65536)
            if not b: break
            data += b
            if b"\\r\\n\\r\\n" in data and b"Content-Length" in data:
                head, _, body = data.partition(b"\\r\\n\\r\\n")
                n = int([l for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
                if len(body) >= n:
                    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n")
                    break
    except OSError:
        pass
    with open(out, "ab") as fh:
        fh.write(data + b"\\n--END--\\n")
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


class Env:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.tmp = Path(c.tmp)
        self.payments = c.pod("payments", namespace="payments")
        self.checkout = c.pod("checkout", namespace="shop")
        self.analytics = c.pod("analytics", namespace="analytics")
        self.policy = self.tmp / "policy.yaml"
        self.policy.write_text(POLICY)
        ident = [
            {"ip": self.payments.ip, "namespace": "payments", "pod": "payments",
             "labels": {"app": "payment-api", "pci.palisade.dev/scope": "cde"}},
            {"ip": self.checkout.ip, "namespace": "shop", "pod": "checkout",
             "labels": {"app": "checkout", "pci.palisade.dev/scope": "connected"}},
            {"ip": self.analytics.ip, "namespace": "analytics", "pod": "analytics",
             "labels": {"app": "analytics", "pci.palisade.dev/scope": "out-of-scope"}},
        ]
        self.identity = self.tmp / "identity.yaml"
        self.identity.write_text(yaml.safe_dump(ident))
        self.labels = {"app": "payment-api", "pci.palisade.dev/scope": "cde"}
        self.podinfo = self.tmp / "podinfo"
        self.podinfo.mkdir()
        write_podinfo(str(self.podinfo), {}, self.labels)
        os.chmod(self.podinfo, 0o755)
        ng = self.tmp / "nginx"
        ng.mkdir()
        (ng / "nginx.conf").write_text(NGINX.format(tmp=ng))
        self.access_log = ng / "access.log"
        self.payments.popen(["nginx", "-c", str(ng / "nginx.conf")])
        self.payments.wait_listening(9000)
        self.recorded = self.tmp / "analytics-received.bin"
        self.analytics.popen([PY, "-c", RECORDER, "9100", str(self.recorded)])
        self.analytics.wait_listening(9100)
        self.redirect_done = False

    def sidecar(self, *extra: str, policy: bool = True):
        args = ["--identity", str(self.identity), "--podinfo", str(self.podinfo),
                "--labels", json.dumps(self.labels), *extra]
        if policy:
            args += ["--policy", str(self.policy)]
        sc = self.payments.start_sidecar(*args, apply_redirect=not self.redirect_done,
                                         env={"POD_NAMESPACE": "payments"})
        self.redirect_done = True
        return sc

    def curl(self, pod, *args: str) -> subprocess.CompletedProcess:
        return pod.run(["curl", "-s", "-m", "10", *args], check=False)


@pytest.fixture(scope="module")
def env():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pe", 233)
    try:
        yield Env(c)
    finally:
        c.close()


@pytest.fixture
def sidecar_factory(env):
    started = []

    def make(*a, **kw):
        sc = env.sidecar(*a, **kw)
        started.append(sc)
        return sc

    yield make
    for sc in started:
        sc.stop()


def _flows(sc, **m):
    return [f for f in sc.events("flow") if all(f.get(k) == v for k, v in m.items())]


def test_protect_allows_checkout_and_denies_out_of_scope(env, sidecar_factory):
    sc = sidecar_factory()
    url = f"http://{env.payments.ip}:9000/v1/charge"
    r = env.curl(env.checkout, "-X", "POST", "-d", "amount=10", "-w", "%{http_code}", "-o", "/dev/null", url)
    assert r.stdout == "200"
    r = env.curl(env.analytics, "-X", "POST", "-d", "amount=10", url)
    assert r.returncode in (7, 52, 56), r  # refused/reset: not a single byte reached nginx
    flows = sc.wait_flows(2, dest_port=9000)
    by_src = {f["src_ip"]: f for f in flows}
    ok = by_src[env.checkout.ip]
    assert ok["verdict"] == "allow" and ok["rule"] == "checkout-to-payments" and ok["app_proto"] == "http"
    assert ok["src_workload"]["scope"] == "connected" and ok["dest_workload"]["scope"] == "cde"
    denied = by_src[env.analytics.ip]
    assert denied["verdict"] == "deny" and denied["rule"] == "cde-segmentation"
    alert = sc.wait_event(lambda e: e.get("event_type") == "alert" and e["src_ip"] == env.analytics.ip)
    assert alert["alert"]["action"] == "blocked" and alert["alert"]["category"] == "policy"
    assert alert["alert"]["signature"] == "cde-segmentation"
    log = env.access_log.read_text()
    assert env.analytics.ip not in log  # never reached the server


def test_l7_deny_second_request_on_keepalive_gets_403(env, sidecar_factory):
    sc = sidecar_factory()
    base = f"http://{env.payments.ip}:9000"
    before = env.access_log.read_text().count("/admin")
    r = env.curl(env.checkout, "-X", "POST", "-d", "a=1", "-o", "/dev/null", "-w", "%{http_code}\n",
                 f"{base}/v1/charge", "--next", "-s", "-m", "10", "-w", "\n%{http_code}\n",
                 f"{base}/admin/users")
    codes = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert codes[0] == "200"
    assert codes[-1] == "403"
    body = json.loads(codes[1])
    assert body["rule"] in ("default-deny", "checkout-to-payments")
    assert env.access_log.read_text().count("/admin") == before  # the denied request never arrived
    flow = sc.wait_flows(1, dest_port=9000)[0]
    assert ["GET", "/admin/users"] in flow["l7"]["methods_paths"]
    assert flow["verdict"] == "deny"


def test_monitor_mode_allows_but_alerts(env, sidecar_factory):
    sc = sidecar_factory("--mode", "monitor")
    r = env.curl(env.analytics, "-w", "%{http_code}", "-o", "/dev/null", f"http://{env.payments.ip}:9000/x")
    assert r.stdout == "200"
    alert = sc.wait_event(lambda e: e.get("event_type") == "alert" and e["src_ip"] == env.analytics.ip)
    assert alert["alert"]["action"] == "allowed"
    assert alert["alert"]["signature"] == "cde-segmentation"
    flow = sc.wait_flows(1, src_ip=env.analytics.ip)[0]
    assert flow["mode"] == "monitor" and flow["verdict"] == "allow"


def test_no_policy_means_learn_and_everything_flows(env, sidecar_factory):
    sc = sidecar_factory(policy=False)
    r = env.curl(env.analytics, "-w", "%{http_code}", "-o", "/dev/null", f"http://{env.payments.ip}:9000/x")
    assert r.stdout == "200"
    flow = sc.wait_flows(1, src_ip=env.analytics.ip)[0]
    assert flow["mode"] == "learn" and flow["verdict"] == "allow" and flow["app_proto"] == "http"
    assert flow["l7"]["methods_paths"] == [["GET", "/x"]]


def _post_pan(env, port: int = 9100) -> subprocess.CompletedProcess:
    body = json.dumps({"order": 42, "card": TEST_PAN, "exp": "12/29"})
    return env.curl(env.payments, "-X", "POST", "-H", "Content-Type: application/json", "-d", body,
                    "-w", "\n%{http_code}", f"http://{env.analytics.ip}:{port}/collect")


def test_dlp_blocks_clear_pan_leaving_the_cde(env, sidecar_factory):
    sc = sidecar_factory()
    before = env.recorded.read_bytes() if env.recorded.exists() else b""
    r = _post_pan(env)
    assert r.stdout.strip().endswith("403"), r.stdout
    alert = sc.wait_event(lambda e: e.get("event_type") == "alert" and e["alert"]["category"] == "dlp")
    assert alert["alert"]["action"] == "blocked"
    assert alert["alert"]["signature"] == "no-clear-pan-out-of-cde"
    assert alert["dlp"]["masked"] == PAN_MASKED
    assert alert["direction"] == "outbound" and alert["dest_workload"]["scope"] == "out-of-scope"
    # the server never received the complete number
    wait_until(lambda: env.recorded.exists() and len(env.recorded.read_bytes()) > len(before), 10,
               what="recorder wrote the connection")
    received = env.recorded.read_bytes()[len(before):]
    assert TEST_PAN.encode() not in received
    # and no event anywhere holds it
    assert TEST_PAN not in sc.events_path.read_text()
    assert TEST_PAN not in sc.stderr()
    flow = sc.wait_flows(1, dest_port=9100)[0]
    assert flow["verdict"] == "deny" and flow["close_reason"] == "dlp-block"


TLS_RECORDER = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
while True:
    c, _ = s.accept()
    try:
        t = ctx.wrap_socket(c, server_side=True)
        while True:
            b = t.recv(65536)
            if not b: break
            with open(sys.argv[4], "ab") as fh:
                fh.write(b)
    except (OSError, ssl.SSLError):
        pass
    c.close()
"""


def test_dlp_over_tls_passes_and_is_recorded_encrypted(env, sidecar_factory):
    tmp = env.tmp / "tls"
    tmp.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=analytics", "-keyout", str(tmp / "k.pem"), "-out", str(tmp / "c.pem")],
                   check=True, capture_output=True)
    got = tmp / "received.bin"
    env.analytics.popen([PY, "-c", TLS_RECORDER, "9443", str(tmp / "c.pem"), str(tmp / "k.pem"), str(got)])
    env.analytics.wait_listening(9443)
    sc = sidecar_factory()
    code = textwrap.dedent(f"""
        import socket, ssl
        ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        s = ctx.wrap_socket(socket.create_connection(("{env.analytics.ip}", 9443)), server_hostname="analytics")
        s.sendall(b"card={TEST_PAN}"); s.close()
    """)
    env.payments.run([PY, "-c", code], check=False)
    wait_until(lambda: got.exists() and TEST_PAN.encode() in got.read_bytes(), 10,
               what="TLS server received the data")  # encrypted traffic is not blocked
    flow = sc.wait_flows(1, dest_port=9443)[0]
    assert flow["app_proto"] == "tls" and flow["encrypted"] is True
    assert flow["l7"].get("sni") == "analytics"
    assert not [e for e in sc.events("alert") if e["alert"]["category"] == "dlp"]


def test_ssh_is_denied_even_on_an_allowed_port(env, sidecar_factory):
    tmp = env.tmp / "ssh"
    tmp.mkdir(exist_ok=True)
    if not (tmp / "hostkey").exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "hostkey")], check=True)
    (tmp / "sshd_config").write_text(f"Port 2222\nHostKey {tmp}/hostkey\nPidFile {tmp}/sshd.pid\n"
                                     "UsePAM no\nPasswordAuthentication no\n")
    os.makedirs("/run/sshd", exist_ok=True)
    env.payments.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")])
    env.payments.wait_listening(2222)
    sc = sidecar_factory()
    r = env.checkout.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                          "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-p", "2222",
                          f"nobody@{env.payments.ip}", "true"], check=False, timeout=30)
    assert r.returncode != 0
    flow = sc.wait_flows(1, dest_port=2222)[0]
    assert flow["app_proto"] == "ssh"
    assert flow["verdict"] == "deny" and flow["rule"] == "no-ssh-into-containers"


def test_quarantine_cuts_open_flows_and_refuses_new_ones(env, sidecar_factory):
    sc = sidecar_factory()
    # an open keep-alive-like connection from checkout that stays idle
    holder = env.checkout.popen([PY, "-c", textwrap.dedent(f"""
        import socket, sys, time
        s = socket.create_connection(("{env.payments.ip}", 9000))
        s.sendall(b"POST /v1/charge HTTP/1.1\\r\\nHost: p\\r\\nContent-Length: 0\\r\\n\\r\\n")
        print(s.recv(4096).split(b"\\r\\n")[0].decode(), flush=True)
        try:
            b = s.recv(100)
            print("closed" if not b else "data", flush=True)
        except ConnectionResetError:
            print("reset", flush=True)
    """)])
    assert holder.stdout.readline().decode().strip() == "HTTP/1.1 200 OK"
    t0 = time.monotonic()
    write_podinfo(str(env.podinfo), {"palisade.dev/quarantine": "true"}, env.labels)
    line = holder.stdout.readline().decode().strip()
    assert line in ("reset", "closed")
    assert time.monotonic() - t0 < 3.0
    url = f"http://{env.payments.ip}:9000/v1/charge"
    r = env.curl(env.checkout, "-X", "POST", "-d", "a", url)
    assert r.returncode in (7, 52, 56)
    assert sc.wait_event(lambda e: e.get("event_type") == "quarantine" and e["quarantine"]["state"] == "on")
    write_podinfo(str(env.podinfo), {}, env.labels)
    sc.wait_event(lambda e: e.get("event_type") == "quarantine" and e["quarantine"]["state"] == "off")
    wait_until(lambda: env.curl(env.checkout, "-X", "POST", "-d", "a", "-o", "/dev/null", "-w", "%{http_code}",
                                url).stdout == "200", 5, what="traffic restored after quarantine")


def test_reload_rejects_broken_policy_and_applies_valid_change(env, sidecar_factory):
    sc = sidecar_factory()
    url = f"http://{env.payments.ip}:9000/v1/charge"
    ok = ["-X", "POST", "-d", "a", "-o", "/dev/null", "-w", "%{http_code}", url]
    assert env.curl(env.checkout, *ok).stdout == "200"
    original = env.policy.read_text()
    try:
        env.policy.write_text(original.replace("spec:\n  selector", "spec:\n  selectorr", 1))
        sc.wait_event(lambda e: e.get("event_type") == "alert" and e["alert"]["signature"] == "policy-reload-rejected",
                      timeout=15)
        assert env.curl(env.checkout, *ok).stdout == "200"  # old policy still in force
        env.policy.write_text(original.replace("pathPrefix: /v1/charge", "pathPrefix: /v2/charge"))
        sc.wait_event(lambda e: e.get("event_type") == "policy" and e["policy"]["action"] == "reloaded",
                      timeout=15)
        assert env.curl(env.checkout, *ok).stdout == "403"
    finally:
        env.policy.write_text(original)


def test_reload_cuts_open_flows_the_new_policy_denies(env, sidecar_factory):
    sc = sidecar_factory()
    holder = env.checkout.popen([PY, "-c", textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("{env.payments.ip}", 9000))
        s.sendall(b"POST /v1/charge HTTP/1.1\\r\\nHost: p\\r\\nContent-Length: 0\\r\\n\\r\\n")
        print(s.recv(4096).split(b"\\r\\n")[0].decode(), flush=True)
        try:
            print("closed" if not s.recv(100) else "data", flush=True)
        except ConnectionResetError:
            print("reset", flush=True)
    """)])
    assert holder.stdout.readline().decode().strip() == "HTTP/1.1 200 OK"
    original = env.policy.read_text()
    try:
        env.policy.write_text(original.replace("- namespace: shop\n          labels: {app: checkout}",
                                               "- namespace: shop-v2\n          labels: {app: checkout}"))
        assert holder.stdout.readline().decode().strip() in ("reset", "closed")
        flow = sc.wait_flows(1, src_ip=env.checkout.ip)[0]
        assert flow["verdict"] == "deny" and flow["close_reason"] == "reload"
    finally:
        env.policy.write_text(original)
