"""What the demo puts in its pods and writes for them: the servers' scripts, the policies, the review.

Kept apart from the steps (``demo_steps``) so that each reads as the story it tells.
"""

from __future__ import annotations

import textwrap

import yaml

# A well-known test card number (Luhn-valid, issued to no one). It is never printed in full.
TEST_PAN = "4111111111111111"
TEST_PAN_MASKED = "411111******1111"

API_PORT, SSH_PORT, REDIS_PORT, COLLECT_PORT = 9000, 22, 6379, 9100
CAPTURE_SPEC = "duration=30s,filter=tcp port 9000,max-packets=20"

NEEDED_TOOLS = ("ip", "nft", "curl", "redis-server", "redis-cli", "tcpdump", "ssh", "ssh-keygen")

# The analytics collector: answers every HTTP request with 200 and appends what it
# received to a file - with digit runs that look like card numbers masked, so the
# file proves whether a card number arrived without ever storing one.
COLLECTOR = r"""
import re, socket, sys, threading
out = sys.argv[2]
lock = threading.Lock()
def mask(b):
    return re.sub(rb"\d{13,19}", lambda m: b"[PAN-RECEIVED " + m.group()[:6] + b"..." + m.group()[-4:] + b"]", b)
def handle(c):
    data = b""
    try:
        c.settimeout(10)
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                n = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        n = int(v.strip() or 0)
                if len(body) >= n:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\ncollected")
                    break
            b = c.recv(65536)
            if not b:
                break
            data += b
    except OSError:
        pass
    with lock, open(out, "ab") as fh:
        fh.write(mask(data) + b"\n--END--\n")
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# Fallback payment API when nginx is not installed: the same answers as the nginx config below.
PY_API = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
log = open(sys.argv[2], "a", buffering=1)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = b'{"status":"charged"}\n' if self.path.startswith("/v1/charge") else b"payments ok\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
        log.write(f"{self.client_address[0]} {self.command} {self.path}\n")
    do_GET = do_POST = _answer
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {port};
    location /v1/charge {{ default_type application/json; return 200 '{{"status":"charged"}}\\n'; }}
    location / {{ return 200 "payments ok\\n"; }}
  }}
}}
"""

# A client that holds one keep-alive connection open and reports how it ended.
HOLDER = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    s.sendall(b"POST /v1/charge HTTP/1.1\\r\\nHost: payments\\r\\nContent-Length: 0\\r\\n\\r\\n")
    print(s.recv(4096).split(b"\\r\\n")[0].decode(), flush=True)
    try:
        b = s.recv(100)
        print("closed" if not b else "data", flush=True)
    except (ConnectionResetError, TimeoutError, OSError) as exc:
        print("reset" if isinstance(exc, ConnectionResetError) else f"error {exc}", flush=True)
""")


GUARDRAILS = """\
# Hand-written guard rails that no learned policy replaces (the platform team owns these).
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata:
  name: baseline
  annotations:
    palisade.dev/last-reviewed: "{today}"
spec:
  rules:
    - name: no-ssh-into-containers
      description: Nobody logs into a container; debugging goes through kubectl debug
      direction: ingress
      appProto: ssh
      action: deny
---
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: payment-api-dlp
  namespace: payments
  annotations:
    palisade.dev/last-reviewed: "{today}"
spec:
  selector:
    matchLabels: {{app: payment-api}}
  mode: protect
  default: deny
  dlp:
    - name: no-clear-pan-out-of-cde
      description: Card numbers never leave the CDE in clear text (PCI DSS 4.2.1)
      packs: [payment_cards]
      direction: egress
      to: [{{scope: out-of-scope}}, {{scope: connected}}]
      action: block
"""

# What a reviewer writes over "learned from traffic: replace with the business justification".
JUSTIFICATIONS = {
    ("ingress", "checkout"): "Checkout submits charges (business justification, shown to auditors)",
    ("ingress", "payment-api"): "The payment API stores orders in its database",
    ("egress", "payments-db"): "Orders are stored in the CDE database",
    ("egress", "analytics"): "Usage statistics, never card data (the DLP guard rail enforces it)",
    ("ingress", "ssh"): "Left in by the reviewer on purpose: the cluster baseline denies SSH anyway",
}


def review_learned(text: str, today: str) -> tuple[str, int]:
    """What the application team does with the learned file: justify every rule, date the review."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    n = 0
    for doc in docs:
        doc.setdefault("metadata", {}).setdefault("annotations", {})["palisade.dev/last-reviewed"] = today
        spec = doc.get("spec", {})
        for direction in ("ingress", "egress"):
            for rule in spec.get(direction, []) or []:
                peers = rule.get("from") or rule.get("to") or []
                app = next((p.get("labels", {}).get("app") for p in peers if p.get("labels")), None)
                key = (direction, "ssh") if rule.get("appProto") == "ssh" else (direction, app)
                if key in JUSTIFICATIONS:
                    rule["description"] = JUSTIFICATIONS[key]
                    n += 1
    head = (f"# Learned by `python -m firewall policy learn`, reviewed {today}: every rule carries its\n"
            "# business justification (PCI DSS 1.2.5) and the review date (1.2.7).\n")
    return head + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=None, width=100), n
