"""No output of the product other than a capture file ever holds a full card number.

Test cards go through the real sidecar in every field the sidecar reads and
reports: HTTP path (plain, ``%20``- and ``/``-separated, percent-encoded
digits), Host, an allowed and a denied request, TLS SNI, DNS qnames over UDP and
TCP, PostgreSQL user/database/application_name, SSH software, HTTP/2 ``:path``
- once without and once with ``--l7-events``, with every event type also sent to
an alert webhook.  Then every output (events file, webhook bodies, the
sidecar's log, the auditor report and the learned policy built from the events)
is searched for each full number and each 15-digit prefix, raw and after
percent-decoding with separators removed.  The DLP alert keeps its masked form
(first six / last four), which also proves the cards were really seen.
"""

from __future__ import annotations

import json
import struct
import textwrap
import unicodedata
import urllib.parse
from pathlib import Path

import pytest

from tests.harness import PY, REPO, Cluster, wait_until

pytestmark = pytest.mark.netns

CARD = {  # field -> a test card of its own, so a leak names the field that leaked
    "path": "4111111111111111",
    "path-space": "4000056655665556",
    "path-slash": "378282246310005",
    "path-pct": "6011111111111117",
    "denied-path": "5555555555554444",
    "host": "2223003122003222",
    "sni": "4012888888881881",
    "dns-udp": "4242424242424242",
    "dns-tcp": "5200828282828210",
    "pg-user": "3530111333300000",
    "pg-db": "6011000990139424",
    "pg-app": "5105105105105100",
    "ssh": "4000002500003155",
    "h2-path": "371449635398431",
}

POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: leaky, namespace: default}
spec:
  selector: {matchLabels: {app: leaky}}
  mode: protect
  default: deny
  egress:
    - name: web-ok-only
      ports: [{port: 80}]
      appProto: http
      http: [{pathPrefix: /ok}]
      action: allow
    - name: others
      ports: [{port: 443}, {port: 5432}, {port: 2222}, {port: 8082}, {port: 53}, {port: 53, protocol: UDP}]
      action: allow
  dlp:
    - name: cards-seen
      packs: [payment_cards]
      direction: egress
      action: alert
"""

ECHO = textwrap.dedent("""
    import socket, sys, threading
    def serve(c):
        with c:
            try:
                while True:
                    d = c.recv(65536)
                    if not d:
                        return
                    c.sendall(d)
            except OSError:
                return
    def listen(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(64)
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    for p in sys.argv[1:]:
        threading.Thread(target=listen, args=(int(p),), daemon=True).start()
    threading.Event().wait()
""")

WEBHOOK = textwrap.dedent("""
    import http.server, sys
    out = sys.argv[2]
    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with open(out, "ab") as fh:
                fh.write(body + b"\\n")
            self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def groups(card: str, sep: str) -> str:
    return sep.join(card[i:i + 4] for i in range(0, len(card), 4))


def pg_startup(user: str, db: str, app: str) -> bytes:
    body = struct.pack("!I", 196608)
    for k, v in (("user", user), ("database", db), ("application_name", app)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def _traffic(pod, srv_ip: str, dns_ip: str, tmp: Path) -> None:
    """Every field, once; failures of the far end (echo servers) do not matter, the sidecar
    has parsed what was sent by then."""
    curl = ["curl", "-s", "-o", "/dev/null", "--max-time", "5"]
    pod.run([*curl, f"http://{srv_ip}/ok/{CARD['path']}"], check=False)
    pod.run([*curl, f"http://{srv_ip}/ok/{groups(CARD['path-space'], '%20')}"], check=False)
    pod.run([*curl, f"http://{srv_ip}/ok/{groups(CARD['path-slash'], '/')}"], check=False)
    pct = "".join(f"%{ord(c):02X}" for c in CARD["path-pct"])
    pod.run([*curl, "--path-as-is", f"http://{srv_ip}/ok/{pct}"], check=False)
    pod.run([*curl, f"http://{srv_ip}/deny/{CARD['denied-path']}"], check=False)
    pod.run([*curl, "-H", f"Host: {CARD['host']}.shop.example", f"http://{srv_ip}/ok/"], check=False)
    pod.run(["openssl", "s_client", "-connect", f"{srv_ip}:443", "-servername", f"{CARD['sni']}.tls.example"],
            check=False, input="", timeout=20)
    pod.run(["dig", f"@{dns_ip}", f"{CARD['dns-udp']}.dns.example", "A", "+time=1", "+tries=1"], check=False)
    pod.run(["dig", f"@{dns_ip}", f"{groups(CARD['dns-tcp'], '-')}.dns.example", "A", "+tcp", "+time=1",
             "+tries=1"], check=False)
    raw = tmp / "raw.py"
    raw.write_text("import socket,sys\ns=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\n"
                   "s.sendall(bytes.fromhex(sys.argv[3]))\ntry:\n s.recv(65536)\nexcept OSError:\n pass\n")
    start = pg_startup(CARD["pg-user"], CARD["pg-db"], CARD["pg-app"])
    pod.run([PY, str(raw), srv_ip, "5432", start.hex()], check=False)
    pod.run([PY, str(raw), srv_ip, "2222", f"SSH-2.0-Card_{CARD['ssh']}\r\n".encode().hex()], check=False)
    pod.run([*curl, "--http2-prior-knowledge", f"http://{srv_ip}:8082/h2/{CARD['h2-path']}"], check=False)


def _strings(v):
    if isinstance(v, dict):
        for k, x in v.items():
            yield str(k)
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)
    elif v is not None:
        yield str(v)


def _digits(text: str) -> str:
    text = urllib.parse.unquote(urllib.parse.unquote(text))
    # isdigit() also holds for superscripts and circled digits, which have no decimal value
    # (unicodedata.decimal raised on one in a hostile event): digit() has a value for all of them
    return "".join(str(unicodedata.digit(c)) for c in text if c.isdigit())


def find_leaks(name: str, text: str) -> list[str]:
    """Every card (or 15-digit prefix) in ``text``: raw, and per string value / line once
    percent-decoded with every non-digit removed."""
    found = []
    units: list[str] = []
    for line in text.splitlines():
        try:
            units.extend(_strings(json.loads(line)))
        except ValueError:
            units.append(line)
    for field, card in CARD.items():
        if card[:15] in text:
            found.append(f"{name}: {field} raw")
        for u in units:
            if card[:15] in _digits(u):
                found.append(f"{name}: {field} in {u[:120]!r}")
                break
    return found


@pytest.fixture(scope="module")
def lab():
    from tests.integration import peers

    c = Cluster("lk", 213)
    try:
        tmp = Path(c.tmp)
        srv = c.pod("srv")
        dns = c.pod("dns")
        plain = c.pod("plain")
        l7ev = c.pod("l7ev")
        (tmp / "echo.py").write_text(ECHO)
        (tmp / "webhook.py").write_text(WEBHOOK)
        ports = ["80", "443", "5432", "2222", "8082"]
        srv.popen([PY, str(tmp / "echo.py"), *ports])
        for p in ports:
            srv.wait_listening(int(p))
        peers.dnsmasq(dns, tmp / "dnsmasq", {"ok.dns.example": ["10.9.9.9"]})
        (tmp / "policy.yaml").write_text(POLICY)
        outputs = {}
        for pod, extra in ((plain, []), (l7ev, ["--l7-events"])):
            hook = tmp / f"{pod.name}-webhook.jsonl"
            pod.popen([PY, str(tmp / "webhook.py"), "9999", str(hook)])
            pod.wait_listening(9999)
            cfg = tmp / f"{pod.name}.yaml"
            cfg.write_text("webhook_flows: true\n")
            sc = pod.start_sidecar("--config", str(cfg), "--policy", str(tmp / "policy.yaml"),
                                   "--alert-webhook", "http://127.0.0.1:9999/", *extra, labels={"app": "leaky"})
            _traffic(pod, srv.ip, dns.ip, tmp)
            # every protocol was identified and parsed (else the test proves nothing)
            want = {"http", "tls", "dns", "pgsql", "ssh", "http2"}
            wait_until(lambda sc=sc, want=want: want <= {f["app_proto"] for f in sc.flows()}, 20,
                       what=f"flows of every protocol in {pod.name}: {want}")
            wait_until(lambda h=hook: h.exists() and "flow" in h.read_text(), 20, what="webhook deliveries")
            sc.stop()
            report = tmp / f"{pod.name}-report"
            r = pod.run([PY, "-m", "firewall", "report", "--policy", str(tmp / "policy.yaml"), "--events",
                         str(sc.events_path), "-o", str(report), "--no-pdf", "--jobs", "1"], check=False,
                        cwd=str(REPO))
            learned = tmp / f"{pod.name}-learned.yaml"
            r2 = pod.run([PY, "-m", "firewall", "policy", "learn", "--events", str(sc.events_path), "-o",
                          str(learned)], check=False, cwd=str(REPO))
            outputs[pod.name] = {"sidecar": sc, "events": sc.events_path, "webhook": hook, "log": sc.stderr_path,
                                 "report": report, "learned": learned, "rc": (r.returncode, r2.returncode,
                                                                               r.stderr + r2.stderr)}
        yield outputs
    finally:
        c.close()


@pytest.mark.parametrize("pod", ["plain", "l7ev"])
def test_no_output_holds_a_card_number(lab, pod):
    out = lab[pod]
    assert out["rc"][:2] == (0, 0), out["rc"][2][-2000:]
    files = [out["events"], out["webhook"], out["log"], out["learned"], *sorted(out["report"].rglob("*"))]
    leaks = []
    for f in files:
        if Path(f).is_file():
            leaks += find_leaks(str(Path(f).name), Path(f).read_text(errors="replace"))
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("pod", ["plain", "l7ev"])
def test_every_field_was_seen_masked(lab, pod):
    """The masked forms are there: the sidecar saw every card and kept first six / last four."""
    sc = lab[pod]["sidecar"]
    events = sc.events()
    text = json.dumps(events)
    dlp = [e["dlp"]["masked"] for e in events if e.get("alert", {}).get("category") == "dlp"]
    assert "411111******1111" in dlp
    denied = [e for e in events if e.get("alert", {}).get("signature") == "web-ok-only"
              or (e.get("alert", {}).get("action") == "blocked" and "l7" in e)]
    assert denied and any("555555" in json.dumps(e.get("l7")) for e in denied)
    for field in ("host", "sni", "dns-udp", "pg-user", "pg-db", "pg-app", "ssh"):
        card = CARD[field]
        assert card[:6] in text and card[-4:] in text, field
    flows = sc.flows()
    pg = [f for f in flows if f["app_proto"] == "pgsql"][0]["l7"]
    assert pg["user"].startswith(CARD["pg-user"][:6]) and "*" in pg["user"]
    ssh = [f for f in flows if f["app_proto"] == "ssh"][0]["l7"]
    assert "*" in json.dumps(ssh)
    if pod == "l7ev":
        h2 = [e for e in events if e["event_type"] in ("http2", "grpc")]
        paths = [str(e[e["event_type"]].get("path")) for e in h2]
        assert any(p.startswith("/h2/37144") and p.endswith("8431") and "*" in p for p in paths), paths


# ---------------------------------------------------------------------------- evidence loss
def test_events_lost_to_a_full_disk_are_counted_logged_and_alerted(tmp_path):
    """The events file on a 16 KiB tmpfs: once it is full, every lost record is counted in
    palisade_events_dropped_total{reason="no_space"} on /metrics, the sidecar logs it (rate
    limited: not one line per event), the alert webhook gets an ``events-dropped`` alert, and
    the data path keeps serving."""
    import subprocess

    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], check=True)
    c = Cluster("ev", 219)
    try:
        tmp = Path(c.tmp)
        app, srv = c.pod("app"), c.pod("srv")
        (tmp / "echo.py").write_text(ECHO)
        (tmp / "webhook.py").write_text(WEBHOOK)
        srv.popen([PY, str(tmp / "echo.py"), "7000"])
        srv.wait_listening(7000)
        hook = tmp / "webhook.jsonl"
        app.popen([PY, str(tmp / "webhook.py"), "9999", str(hook)])
        app.wait_listening(9999)
        sc = app.start_sidecar("--events", str(mnt / "eve.json"), "--alert-webhook", "http://127.0.0.1:9999/")
        code = ("import socket,sys\nok=0\nfor i in range(int(sys.argv[2])):\n"
                " s=socket.create_connection((sys.argv[1],7000),timeout=3);s.sendall(b'x'*64);s.shutdown(1)\n"
                " d=b''\n while True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\n ok+=d==b'x'*64\nprint(ok)")
        r = app.run([PY, "-c", code, srv.ip, "60"], check=False)
        assert r.stdout.strip() == "60"  # the data path kept serving while evidence was lost

        def dropped() -> float:
            status, body = sc.http("/metrics")
            for line in body.splitlines():
                if line.startswith('palisade_events_dropped_total{reason="no_space"}'):
                    return float(line.split()[-1])
            return 0.0

        n = wait_until(dropped, 10, what="palisade_events_dropped_total{reason=no_space}")
        assert n >= 10
        alert = wait_until(lambda: hook.exists() and [a for a in map(json.loads, hook.read_text().split("\n")[:-1])
                                                      for a in (a if isinstance(a, list) else [a])
                                                      if a.get("alert", {}).get("signature")
                                                      == "palisade:events-dropped"], 15, what="webhook alert")
        assert alert[0]["events_dropped"]["total"].get("no_space", 0) >= 1
        lines = [ln for ln in sc.stderr().splitlines() if "events dropped" in ln]
        assert 1 <= len(lines) <= 3, lines  # rate limited
        sc.stop()
    finally:
        c.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
