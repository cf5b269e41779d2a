"""Shared pieces of the robustness tests: a CDE payment pod behind the real sidecar, peers,
small servers/clients run inside the pods, and process probes (fds, RSS, threads).

Cluster prefix ``pr``, octets 220-229 (one per test module). Every sidecar output a
module produced (EVE file, sidecar log, webhook deliveries) is checked for the test PANs
when the module's cluster is torn down (``assert_no_pan``).
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import yaml

from firewall.identity.podinfo import write_podinfo
from tests.harness import PY, Cluster

# Luhn-valid test numbers (published test cards) and the forms they are sent in
TEST_PANS = ["4111111111111111", "5555555555554444", "378282246310005", "4012888888881881"]
PAN = TEST_PANS[0]
PAN_MASKED = "411111******1111"

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
      description: Checkout submits charges
      from:
        - namespace: shop
          labels: {app: checkout}
      ports: [{port: 9000, protocol: TCP}]
      appProto: http
      http:
        - methods: [GET, POST]
          pathPrefix: /v1/charge
      action: allow
    - name: checkout-http-only
      description: a port open to HTTP only
      from:
        - namespace: shop
      ports: [{port: 9002}]
      appProto: http
      action: allow
  egress:
    - name: no-evil-sni
      description: never talk TLS to this name
      to:
        - labels: {app: analytics}
      ports: [{port: 9444}]
      tls: {sni: ["*.evil.example"]}
      action: deny
    - name: payments-to-analytics
      description: usage statistics, no card data
      to:
        - labels: {app: analytics}
      ports: [{port: 9100}, {port: 9443}, {port: 9444}, {port: 9500}]
      action: allow
  dlp:
    - name: no-clear-pan-out-of-cde
      packs: [payment_cards]
      direction: egress
      to: [{scope: out-of-scope}, {scope: connected}]
      action: block
"""

# An HTTP/1.1 server that records what it received: raw bytes per connection (raw-<port>.bin)
# and, per request, the target and the body as the application sees them (de-chunked, gunzipped,
# percent-decoded) in requests.jsonl. It answers every complete request with 200.
RECORDER = r"""
import gzip, json, socket, sys, threading, urllib.parse, zlib
port, out = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()

def log(rec):
    with lock, open(out + "/requests.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")

def one(buf):
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    lines = buf[:i].decode("latin-1").split("\r\n")
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        hdrs.setdefault(k.strip().lower(), []).append(v.strip())
    rest = buf[i + 4:]
    if "chunked" in ",".join(hdrs.get("transfer-encoding", [])).lower():
        body, j = b"", 0
        while True:
            k = rest.find(b"\r\n", j)
            if k < 0:
                return None
            size = int(rest[j:k].split(b";")[0].strip() or b"0", 16)
            if size == 0:
                if rest[k + 2:k + 4] != b"\r\n":
                    return None
                used = k + 4
                break
            if len(rest) < k + 2 + size + 2:
                return None
            body += rest[k + 2:k + 2 + size]
            j = k + 2 + size + 2
    else:
        n = int((hdrs.get("content-length") or ["0"])[0] or 0)
        if len(rest) < n:
            return None
        body, used = rest[:n], n
    enc = ",".join(hdrs.get("content-encoding", [])).lower()
    try:
        if "gzip" in enc:
            body = gzip.decompress(body)
        elif "deflate" in enc:
            body = zlib.decompress(body)
    except Exception as exc:
        body = b"undecodable " + repr(exc).encode()
    target = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
    rec = {"request_line": lines[0], "target": urllib.parse.unquote_plus(target),
           "body": urllib.parse.unquote_plus(body.decode("latin-1"))}
    return rec, buf[i + 4 + used:]

def handle(c, peer):
    buf, raw = b"", b""
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            raw += b
            buf += b
            while True:
                r = one(buf)
                if r is None:
                    break
                rec, buf = r
                rec["peer_port"] = peer[1]
                log(rec)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    except OSError:
        pass
    with lock, open(out + "/raw.bin", "ab") as fh:
        fh.write(raw + b"\n--END--\n")
    c.close()

s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(512)
while True:
    c, peer = s.accept()
    threading.Thread(target=handle, args=(c, peer), daemon=True).start()
"""

# A scripted TCP client: argv[1] = JSON {host, port, steps: [{send: latin-1 text | hex: ..., split: n,
# delay: s}], read: seconds}; prints one JSON line {port, response, reset, closed}.
CLIENT = r"""
import json, socket, sys, time
plan = json.loads(sys.argv[1])
s = socket.create_connection((plan["host"], plan["port"]), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
port = s.getsockname()[1]
res = {"port": port, "response": "", "reset": False, "closed": False, "send_error": None}
try:
    for step in plan["steps"]:
        data = bytes.fromhex(step["hex"]) if "hex" in step else step["send"].encode("latin-1")
        n = step.get("split") or len(data) or 1
        for i in range(0, len(data), n):
            s.sendall(data[i:i + n])
            if step.get("delay"):
                time.sleep(step["delay"])
        if step.get("wait_response"):
            s.settimeout(step["wait_response"])
            got = s.recv(65536)
            res["response"] += got.decode("latin-1")
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
print(json.dumps(res))
"""


def http_request(method: str, target: str, body: bytes = b"", headers: dict | None = None,
                 host: str = "analytics") -> str:
    h = {"Host": host, **(headers or {})}
    if body and "Transfer-Encoding" not in h and "Content-Length" not in h:
        h["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head + body.decode("latin-1")


class Env:
    """payments (CDE, sidecar) - checkout/checkout2 (shop, connected) - analytics (out of scope)."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.tmp = Path(c.tmp)
        self.payments = c.pod("payments", namespace="payments")
        self.checkout = c.pod("checkout", namespace="shop")
        self.checkout2 = c.pod("checkout2", namespace="shop")
        self.analytics = c.pod("analytics", namespace="analytics")
        self.policy = self.tmp / "policy.yaml"
        self.policy.write_text(POLICY)
        shop = {"app": "checkout", "pci.palisade.dev/scope": "connected"}
        ident = [
            {"ip": self.payments.ip, "namespace": "payments", "pod": "payments",
             "labels": {"app": "payment-api", "pci.palisade.dev/scope": "cde"}},
            {"ip": self.checkout.ip, "namespace": "shop", "pod": "checkout", "labels": shop},
            {"ip": self.checkout2.ip, "namespace": "shop", "pod": "checkout2", "labels": shop},
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
        self.redirect_done = False
        self.sidecars: list = []

    def recorder(self, pod, port: int) -> Path:
        d = self.tmp / f"rec-{pod.name}-{port}"
        d.mkdir(exist_ok=True)
        pod.popen([PY, "-c", RECORDER, str(port), str(d)])
        pod.wait_listening(port)
        return d

    def sidecar(self, *extra: str, policy: bool = True, env: dict | None = None):
        args = ["--identity", str(self.identity), "--podinfo", str(self.podinfo),
                "--labels", json.dumps(self.labels), *extra]
        if policy:
            args += ["--policy", str(self.policy)]
        for old in self.sidecars:  # one sidecar per pod at a time (they share the listener ports)
            old.stop()
        sc = self.payments.start_sidecar(*args, apply_redirect=not self.redirect_done,
                                         env={"POD_NAMESPACE": "payments", **(env or {})})
        self.redirect_done = True
        self.sidecars.append(sc)
        return sc

    def client(self, pod, host: str, port: int, steps: list[dict], read: float = 5) -> dict:
        plan = {"host": host, "port": port, "steps": steps, "read": read}
        r = pod.run([PY, "-c", CLIENT, json.dumps(plan)], check=False, timeout=120)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        assert lines, f"client failed: {r.stderr[-2000:]}"
        return json.loads(lines[-1])


def requests_seen(rec_dir: Path) -> list[dict]:
    p = rec_dir / "requests.jsonl"
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def received_everything(rec_dir: Path) -> str:
    """Everything the server got, in every form the application could read it."""
    raw = (rec_dir / "raw.bin").read_bytes().decode("latin-1") if (rec_dir / "raw.bin").exists() else ""
    return raw + "\n" + json.dumps(requests_seen(rec_dir))


def _pan_forms(pan: str) -> list[str]:
    groups = " ".join(pan[i:i + 4] for i in range(0, len(pan), 4))
    return [pan, groups, groups.replace(" ", "-")]


def assert_no_pan(paths: list[Path]) -> list[str]:
    """No full test PAN (in any common form) in any of these files; returns the files checked."""
    checked = []
    for p in paths:
        if not p.exists() or not p.is_file():
            continue
        text = p.read_bytes().decode("latin-1")
        for pan in TEST_PANS:
            for form in _pan_forms(pan):
                assert form not in text, f"full PAN {pan[:6]}...{pan[-4:]} in {p}"
        checked.append(str(p))
    return checked


def sidecar_outputs(tmp: Path) -> list[Path]:
    """Every file a sidecar wrote in a cluster's temp dir: EVE files, its logs, webhook deliveries."""
    pats = ("*-eve.json", "*-sidecar.log", "*webhook*.jsonl", "*.eve.json")
    out: list[Path] = []
    for pat in pats:
        out += sorted(tmp.rglob(pat))
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        m = re.search(rf"^{field}:\s+(\d+)", fh.read(), re.M)
    return int(m.group(1)) if m else 0


def rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS")


def threads(pid: int) -> int:
    return proc_status(pid, "Threads")


def metric(sc, name: str, labels: str = "") -> float:
    code, body = sc.http("/metrics")
    assert code == 200
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def dedent(code: str) -> str:
    return textwrap.dedent(code)
