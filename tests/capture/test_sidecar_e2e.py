"""Forensics through the real sidecar: annotation capture, automatic capture on a deny, webhook.

Two pods from ``tests.harness`` (prefix ``pc``, 10.77.0.0/24): ``app`` runs the
sidecar with ``--podinfo``, ``--pcap-dir`` and ``--alert-webhook``; ``db`` runs TCP
sinks on 5432 (allowed) and 5433 (denied by a rule with ``capture: true``). The
webhook receiver listens on 127.0.0.1 inside the app pod (the sidecar's own
traffic is never redirected).
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest

from firewall import ANN_PCAP
from firewall.identity.podinfo import write_podinfo
from tests.harness import PY, Cluster, wait_until

from .conftest import CLIENT, NEEDS_TOOLS, SERVER, sha256_file, tcpdump_lines, tshark_fields

pytestmark = [pytest.mark.netns, NEEDS_TOOLS]

POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: app
  namespace: default
spec:
  selector:
    matchLabels: {app: app}
  mode: protect
  default: allow
  egress:
    - name: no-db-admin-port
      description: the admin port is never used by the app; capture whoever tries
      to: [{cidr: 10.77.0.0/24}]
      ports: [{port: 5433}]
      action: deny
      capture: true
"""

RECEIVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
out = open(sys.argv[2], "a", buffering=1)
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        for e in (body if isinstance(body, list) else [body]):
            out.write(json.dumps(e) + "\n")
        self.send_response(204); self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

TRY_CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        print("reply", s.recv(10))
    except OSError as exc:
        print("refused", exc)
""")


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


@pytest.fixture
def env():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pc", 77)
    try:
        yield c
    finally:
        c.close()


def test_annotation_and_deny_captures_through_the_sidecar(env):
    app, db = env.pod("app"), env.pod("db")
    tmp = Path(env.tmp)
    db.popen([PY, "-c", SERVER, "0.0.0.0:5432", "0.0.0.0:5433"], stdin=-1)
    db.wait_listening(5432)
    db.wait_listening(5433)
    hooks = tmp / "webhook.jsonl"
    app.popen([PY, "-c", RECEIVER, "18080", str(hooks)])
    app.wait_listening(18080)

    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    podinfo = tmp / "podinfo"
    labels = {"app": "app"}
    write_podinfo(str(podinfo), {}, labels)
    pcap_dir = tmp / "pcap"
    pcap_dir.mkdir()
    os.chown(pcap_dir, 1337, 1337)  # the sidecar drops to UID/GID 1337

    sc = app.start_sidecar("--policy", str(policy), "--podinfo", str(podinfo), "--pcap-dir", str(pcap_dir),
                           "--alert-webhook", "http://127.0.0.1:18080/hook", "--labels", json.dumps(labels),
                           "--no-dlp")

    def pcap_events(state: str) -> list[dict]:
        return [e["pcap"] for e in sc.events("pcap") if e["pcap"]["state"] == state]

    # 1. the SRE annotates the pod; the kubelet swaps the downward-API files
    value = "duration=30s,filter=tcp port 5432,max-packets=12"
    write_podinfo(str(podinfo), {ANN_PCAP: value}, labels)
    started = wait_until(lambda: pcap_events("started"), 10, what="annotation capture started")[0]
    assert started["trigger"] == {"annotation": value}
    app.run([PY, "-c", CLIENT, *[f"tcp:{db.ip}:5432:50000"] * 3])  # well over 12 packets
    fin = wait_until(lambda: pcap_events("finished"), 15, what="annotation capture finished")[0]
    assert fin["packets"] == 12 and fin["reason"] == "max-packets"
    path = pcap_dir / fin["files"][0]
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 1337
    assert fin["sha256"][path.name] == sha256_file(str(path))
    lines = tcpdump_lines(str(path))
    assert len(lines) == 12 and all(".5432" in line for line in lines)

    # 2. a flow denied by a rule with capture: true starts a capture of that peer
    out = app.run([PY, "-c", TRY_CONNECT, db.ip, "5433"]).stdout
    assert "reply b'ok'" not in out, "the denied flow must not reach the server"
    auto = wait_until(lambda: [p for p in pcap_events("started") if "rule" in p["trigger"]], 10,
                      what="automatic capture started")[0]
    assert auto["trigger"]["rule"] == "no-db-admin-port"
    assert auto["trigger"]["peer"] == db.ip
    assert auto["spec"]["filter"] == f"host {db.ip}"
    # rate limit: a second denied attempt does not start another capture
    app.run([PY, "-c", TRY_CONNECT, db.ip, "5433"])
    app.run([PY, "-c", CLIENT, f"tcp:{db.ip}:5432:20000"])  # allowed traffic to that peer: captured
    wait_until(lambda: len([a for a in sc.events("alert")
                            if a["alert"]["signature"] == "no-db-admin-port"]) >= 2, 10, what="two deny alerts")
    assert len([p for p in pcap_events("started") if "rule" in p["trigger"]]) == 1

    # 3. shutting the sidecar down finishes the running capture cleanly
    sc.stop()
    auto_fin = [p for p in pcap_events("finished") if p["id"] == auto["id"]]
    assert auto_fin, "stop must finish running captures with an event"
    apath = pcap_dir / auto_fin[0]["files"][0]
    assert auto_fin[0]["sha256"][apath.name] == sha256_file(str(apath))
    rows = tshark_fields(str(apath), "ip.src", "ip.dst", "tcp.dstport", display_filter="ip")
    assert rows and all(db.ip in (r[0], r[1]) for r in rows)
    assert any(r[2] == "5432" for r in rows)

    # 4. the webhook got the pcap lifecycle and the deny alerts
    def delivered():
        got = _read_jsonl(hooks)
        kinds = {(e["event_type"], (e.get("pcap") or {}).get("state")) for e in got}
        return got if {("pcap", "started"), ("pcap", "finished"), ("alert", None)} <= kinds else None

    got = wait_until(delivered, 10, what="webhook deliveries")
    assert all(e["event_type"] != "flow" for e in got), "flows are not delivered by default"
    assert any(e["event_type"] == "alert" and e["alert"]["signature"] == "no-db-admin-port" for e in got)


HUNG = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1)
time.sleep(3600)  # never accepts: connections hang, then time out
"""

DENY_MANY = textwrap.dedent("""
    import socket, sys
    refused = 0
    for _ in range(int(sys.argv[3])):
        try:
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
            s.sendall(b"x"); s.shutdown(socket.SHUT_WR)
            if s.recv(10) != b"ok":
                refused += 1
            s.close()
        except OSError:
            refused += 1
    print(refused)
""")


def test_data_path_unaffected_while_the_webhook_hangs(env):
    app, db = env.pod("app"), env.pod("db")
    tmp = Path(env.tmp)
    db.popen([PY, "-c", SERVER, "0.0.0.0:5433"], stdin=-1)
    db.wait_listening(5433)
    db.serve_blast(9000)
    app.popen([PY, "-c", HUNG, "18081"])
    app.wait_listening(18081)
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    labels = {"app": "app"}
    sc = app.start_sidecar("--policy", str(policy), "--alert-webhook", "http://127.0.0.1:18081/hook",
                           "--labels", json.dumps(labels), "--no-dlp")

    refused = int(app.run([PY, "-c", DENY_MANY, db.ip, "5433", "200"]).stdout)
    assert refused == 200
    res = app.blast(db.ip, 9000, client_bytes=2 << 20, server_bytes=2 << 20, connections=16)
    assert res["failed"] == 0 and res["connections"] == 16, res
    alerts = wait_until(lambda: (lambda a: a if len(a) >= 200 else None)(
        [e for e in sc.events("alert") if e["alert"]["signature"] == "no-db-admin-port"]), 10,
        what="every deny alerted on the event stream")
    assert len(alerts) == 200
    assert sc.ready(), "the sidecar stays ready while its webhook hangs"
    status, metrics = sc.http("/metrics")
    assert status == 200 and "palisade_alert_webhook_sent_total 0.0" in metrics
