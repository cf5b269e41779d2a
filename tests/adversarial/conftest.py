"""The attacker's bench: the README's reference policy in protect mode in front of real
nginx, through the real sidecar in network namespaces.

``payments`` (CDE) runs nginx on 9000 (HTTP/1.1) and 9001 (h2c, prior knowledge) behind the
sidecar; nginx logs every request as one JSON line with the path it resolved (``$uri``) and
the request id header the test sent, so a test can say exactly which request reached the
application and as what.  ``checkout`` is the allowed client; ``analytics`` (out of scope)
runs a recorder that appends every byte it receives at once (a test can look while the
sender is still paused).  Cluster prefix ``pa``, octet 236.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from firewall.identity.podinfo import write_podinfo
from tests.harness import PY, Cluster, wait_until

PAN = "4111111111111111"

POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: payment-api
  namespace: payments
spec:
  selector:
    matchLabels: {app: payment-api}
  mode: protect
  default: deny
  ingress:
    - name: checkout-to-payments
      from:
        - namespace: shop
          labels: {app: checkout}
      ports: [{port: 9000}, {port: 9001}]
      http:
        - methods: [GET, POST]
          pathPrefix: /v1/charge
      action: allow
    - name: checkout-via-proxy
      from:
        - namespace: shop
          labels: {app: checkout}
      ports: [{port: 9003}]
      http:
        - methods: [CONNECT]
        - methods: [GET, POST]
          pathPrefix: /v1/charge
      action: allow
  egress:
    - name: payments-to-analytics
      to:
        - labels: {app: analytics}
      ports: [{port: 9100}]
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

NGINX = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  log_format canon escape=json '{{"id":"$http_x_req_id","uri":"$uri","status":"$status","request":"$request"}}';
  access_log {tmp}/access.log canon;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 9000;
    listen 9001 http2;
    location / {{ return 200 "served $uri\\n"; }}
  }}
}}
"""

# appends every received chunk to <dir>/<port>.bin at once (flushed), answers nothing
RECORDER = r"""
import socket, sys, threading
port, out = int(sys.argv[1]), sys.argv[2]
def handle(c, peer):
    with open(f"{out}/{peer[1]}.bin", "ab", buffering=0) as fh:
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                fh.write(b)
        except OSError:
            pass
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(128)
while True:
    c, peer = s.accept(); threading.Thread(target=handle, args=(c, peer), daemon=True).start()
"""

# A forward proxy on 9003: CONNECT 127.0.0.1:<port> -> 200 and a relay to nginx on loopback;
# a request with an Upgrade header -> 101 and an echo of whatever follows.
PROXY = r"""
import socket, threading
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    for x in (a, b):
        try:
            x.shutdown(socket.SHUT_WR)
        except OSError:
            pass
def handle(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d:
            c.close(); return
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    line = head.split(b"\r\n")[0].split(b" ")
    if line[0] == b"CONNECT":
        port = int(line[1].rsplit(b":", 1)[1])
        u = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            u.sendall(rest)
        threading.Thread(target=pipe, args=(u, c), daemon=True).start()
        pipe(c, u)
    elif b"upgrade:" in head.lower():
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + rest)
        pipe(c, c)
    elif b"/v1/charge/old-server" in line[1]:  # an old server's legal-but-odd response head
        c.sendall(b"HTTP/1.1 200 OK\r\nX-Old: a\r\n b\r\nServer : old\r\nX@y: 1\r\nContent-Length: 3\r\n\r\nok\n")
    elif b"/v1/charge/desync" in line[1]:  # framing a client could read two ways
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled\n")
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9003)); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# Runs a batch of scripted connections: argv[1] = JSON file [{id, host, port, steps: [{hex,
# split, delay, shutdown, pause_file}], read}], writes one JSON line per connection to argv[2]:
# {id, port, response, reset, closed}.  ``pause_file``: after this step, wait until that file
# exists (the test's signal to go on), so a sender can stall for exactly as long as the test looks.
CLIENT = r"""
import json, os, socket, sys, time
plans = json.load(open(sys.argv[1]))
with open(sys.argv[2], "a") as out:
    for plan in plans:
        s = socket.create_connection((plan["host"], plan["port"]), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        res = {"id": plan.get("id"), "port": s.getsockname()[1], "response": "", "reset": False, "closed": False}
        try:
            for step in plan["steps"]:
                data = bytes.fromhex(step.get("hex", ""))
                n = step.get("split") or len(data) or 1
                for i in range(0, len(data), n):
                    s.sendall(data[i:i + n])
                    if step.get("delay"):
                        time.sleep(step["delay"])
                if step.get("shutdown"):
                    s.shutdown(socket.SHUT_WR)
                if step.get("pause_file"):
                    print(json.dumps({"paused": plan.get("id"), "port": res["port"]}), file=out, flush=True)
                    deadline = time.time() + 20
                    while not os.path.exists(step["pause_file"]) and time.time() < deadline:
                        time.sleep(0.02)
        except OSError as exc:
            res["send_error"] = type(exc).__name__
        s.settimeout(plan.get("read", 5))
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    res["closed"] = True
                    break
                res["response"] += b.decode("latin-1")
        except ConnectionResetError:
            res["reset"] = True
        except OSError:
            pass
        s.close()
        print(json.dumps(res), file=out, flush=True)
"""


class Env:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.tmp = Path(c.tmp)
        self.payments = c.pod("payments", namespace="payments")
        self.checkout = c.pod("checkout", namespace="shop")
        self.analytics = c.pod("analytics", namespace="analytics")
        (self.tmp / "policy.yaml").write_text(POLICY)
        ident = [
            {"ip": self.payments.ip, "namespace": "payments", "pod": "payments",
             "labels": {"app": "payment-api", "pci.palisade.dev/scope": "cde"}},
            {"ip": self.checkout.ip, "namespace": "shop", "pod": "checkout",
             "labels": {"app": "checkout", "pci.palisade.dev/scope": "connected"}},
            {"ip": self.analytics.ip, "namespace": "analytics", "pod": "analytics",
             "labels": {"app": "analytics", "pci.palisade.dev/scope": "out-of-scope"}},
        ]
        (self.tmp / "identity.yaml").write_text(yaml.safe_dump(ident))
        labels = {"app": "payment-api", "pci.palisade.dev/scope": "cde"}
        podinfo = self.tmp / "podinfo"
        podinfo.mkdir()
        write_podinfo(str(podinfo), {}, labels)
        os.chmod(podinfo, 0o755)
        ng = self.tmp / "nginx"
        ng.mkdir()
        (ng / "nginx.conf").write_text(NGINX.format(tmp=ng))
        self.access_log = ng / "access.log"
        self.payments.popen(["nginx", "-c", str(ng / "nginx.conf")])
        self.payments.wait_listening(9000)
        self.payments.wait_listening(9001)
        self.payments.popen([PY, "-c", PROXY])
        self.payments.wait_listening(9003)
        self.rec = self.tmp / "rec"
        self.rec.mkdir()
        os.chmod(self.rec, 0o777)
        self.analytics.popen([PY, "-c", RECORDER, "9100", str(self.rec)])
        self.analytics.wait_listening(9100)
        self.sc = self.payments.start_sidecar(
            "--policy", str(self.tmp / "policy.yaml"), "--identity", str(self.tmp / "identity.yaml"),
            "--podinfo", str(podinfo), "--labels", json.dumps(labels), "--l7-events",
            "--header-timeout", "3", env={"POD_NAMESPACE": "payments"})
        self.runs = 0

    # -- clients -----------------------------------------------------------------------------
    def run(self, pod, plans: list[dict], wait: bool = True):
        """Run scripted connections from ``pod``; returns the results (or the Popen and the
        output file when ``wait`` is False)."""
        self.runs += 1
        plan_file = self.tmp / f"plans-{self.runs}.json"
        out_file = self.tmp / f"results-{self.runs}.jsonl"
        plan_file.write_text(json.dumps(plans))
        proc = pod.popen([PY, "-c", CLIENT, str(plan_file), str(out_file)])
        if not wait:
            return proc, out_file
        proc.wait(timeout=60 + 10 * len(plans))
        return [r for r in _jsonl(out_file) if "paused" not in r]

    def http(self, raw_requests: list[bytes | list[dict]], port: int = 9000, pod=None) -> list[dict]:
        plans = []
        for i, r in enumerate(raw_requests):
            steps = r if isinstance(r, list) else [{"hex": r.hex()}]
            plans.append({"id": i, "host": self.payments.ip, "port": port, "steps": steps, "read": 3})
        return self.run(pod or self.checkout, plans)

    # -- what reached the application ------------------------------------------------------
    def served(self) -> list[dict]:
        """Requests nginx read (a connection it closed before any request logs status 000)."""
        return [e for e in _jsonl(self.access_log) if e.get("status") != "000"]

    def served_ids(self) -> set[str]:
        return {e["id"] for e in self.served() if e.get("id")}

    def flow(self, src_port: int) -> dict:
        return self.sc.wait_event(lambda e: e.get("event_type") == "flow" and e.get("src_port") == src_port,
                                  what=f"flow record of port {src_port}")

    def wait_served(self, req_id: str) -> dict:
        return wait_until(lambda: next((e for e in self.served() if e.get("id") == req_id), None), 10,
                          what=f"nginx log line of {req_id}")  # type: ignore[return-value]


def _jsonl(path: Path) -> list[dict]:
    out = []
    try:
        for line in path.read_text(errors="surrogateescape").splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


def refused(res: dict) -> bool:
    """The sidecar answered (400/403/415/431 with its own body) or reset the connection."""
    r = res["response"]
    return (r.startswith(("HTTP/1.1 400", "HTTP/1.1 403", "HTTP/1.1 415", "HTTP/1.1 431")) and "palisade" in r) \
        or (res["reset"] and not r) or (not r and res["closed"])


@pytest.fixture(scope="module")
def env():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pa", 236)
    try:
        yield Env(c)
    finally:
        c.close()
