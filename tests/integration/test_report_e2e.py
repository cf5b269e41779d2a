"""The auditor evidence pack built from real sidecar events and a real segmentation test.

A CDE payment API (nginx behind the sidecar, protect mode, the DESIGN.md-like policy), a connected
checkout pod and an out-of-scope analytics pod exchange real traffic: allowed charges, denied
attempts from the out-of-scope pod, an L7 deny, and a card number posted in clear from the CDE to
the out-of-scope pod (blocked by DLP).  ``python -m firewall segtest`` then runs from the
out-of-scope namespace: it passes with the policy as written and fails once a named
``exception: true`` rule opens a hole.  ``python -m firewall report`` turns the events, the policy,
the identity file and each segtest result into report.json/html, whose facts are checked here; the
HTML is rendered with headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
import yaml

from firewall.audit.report import chromium_args, find_chromium
from firewall.identity.podinfo import write_podinfo
from tests.harness import PY, REPO, Cluster, nginx_template, wait_until

pytestmark = pytest.mark.netns

TEST_PAN = "4111111111111111"
PAN_MASKED = "411111******1111"
PAN_ANY_FORM = re.compile(r"4111[ -]?1111[ -]?1111[ -]?1111")

POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: payment-api
  namespace: payments
  annotations:
    palisade.dev/last-reviewed: "{reviewed}"
spec:
  selector:
    matchLabels: {{app: payment-api}}
  mode: protect
  default: deny
  ingress:
    - name: checkout-to-payments
      description: Checkout submits charges
      from:
        - namespace: shop
          labels: {{app: checkout}}
      ports: [{{port: 9000, protocol: TCP}}]
      appProto: http
      http:
        - methods: [POST]
          pathPrefix: /v1/charge
      action: allow
{hole}  egress:
    - name: payments-to-db
      description: the card vault database
      to:
        - labels: {{app: payments-db}}
      ports: [{{port: 5432}}]
      action: allow
    - name: payments-to-analytics
      description: usage statistics, no card data
      to:
        - namespace: analytics
          labels: {{app: analytics}}
      ports: [{{port: 9100}}]
      action: allow
  dlp:
    - name: no-clear-pan-out-of-cde
      packs: [payment_cards]
      direction: egress
      to: [{{scope: out-of-scope}}, {{scope: connected}}]
      action: block
---
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata:
  name: baseline
  annotations:
    palisade.dev/last-reviewed: "{reviewed}"
spec:
  rules:
    - name: no-ssh-into-containers
      direction: ingress
      appProto: ssh
      action: deny
"""

HOLE = """\
    - name: analytics-debug-hole
      description: TEMPORARY - analytics debugging access, must be removed
      exception: true
      from:
        - namespace: analytics
          labels: {app: analytics}
      ports: [{port: 9000}]
      action: allow
"""

NGINX = nginx_template(conns=256)

SINK = """
import socket, sys, threading
def handle(c):
    data = b""
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
            head, sep, body = data.partition(b"\\r\\n\\r\\n")
            if sep:
                n = [ln for ln in head.split(b"\\r\\n") if ln.lower().startswith(b"content-length")]
                if len(body) >= (int(n[0].split(b":")[1]) if n else 0):
                    break
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n")
    except OSError:
        pass
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


def _cli(*args: str, pod=None) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "firewall", *args]
    if pod is not None:
        return pod.run(cmd, check=False, cwd=str(REPO), timeout=180)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the image data): tells a rendered page from a blank one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


class World:
    """Builds the pods, runs the traffic and both segtests once; the tests read the results."""

    def __init__(self, c: Cluster) -> None:
        from datetime import date, timedelta

        self.c = c
        self.tmp = Path(c.tmp)
        self.payments = c.pod("payments", namespace="payments")
        self.checkout = c.pod("checkout", namespace="shop")
        self.analytics = c.pod("analytics", namespace="analytics")
        self.reviewed = (date.today() - timedelta(days=30)).isoformat()
        self.policy = self.tmp / "policy.yaml"
        _write_atomic(self.policy, POLICY.format(reviewed=self.reviewed, hole=""))
        self.identity = self.tmp / "identity.yaml"
        self.identity.write_text(yaml.safe_dump([
            {"ip": self.payments.ip, "namespace": "payments", "pod": "payments",
             "labels": {"app": "payment-api", "pci.palisade.dev/scope": "cde"}},
            {"ip": self.checkout.ip, "namespace": "shop", "pod": "checkout",
             "labels": {"app": "checkout", "pci.palisade.dev/scope": "connected"}},
            {"ip": self.analytics.ip, "namespace": "analytics", "pod": "analytics",
             "labels": {"app": "analytics", "pci.palisade.dev/scope": "out-of-scope"}},
        ]))
        labels = {"app": "payment-api", "pci.palisade.dev/scope": "cde"}
        podinfo = self.tmp / "podinfo"
        write_podinfo(str(podinfo), {}, labels)
        os.chmod(podinfo, 0o755)
        ng = self.tmp / "nginx"
        ng.mkdir()
        (ng / "nginx.conf").write_text(NGINX.format(tmp=ng))
        self.access_log = ng / "access.log"
        self.payments.popen(["nginx", "-c", str(ng / "nginx.conf")])
        self.analytics.popen([PY, "-c", SINK, "9100"])
        self.payments.wait_listening(9000)
        self.analytics.wait_listening(9100)
        cfg = self.tmp / "sidecar.yaml"
        cfg.write_text("reload_interval: 0.3\n")
        self.sc = self.payments.start_sidecar(
            "--config", str(cfg), "--policy", str(self.policy), "--identity", str(self.identity),
            "--podinfo", str(podinfo), "--labels", json.dumps(labels), env={"POD_NAMESPACE": "payments"})
        self.events = self.sc.events_path
        self.traffic()
        self.plan = self.tmp / "segtest-plan.yaml"
        self.plan.write_text(yaml.safe_dump([{
            "source": "analytics", "scope": "out-of-scope",
            "targets": [{"name": "payments/payment-api", "address": self.payments.ip, "ports": [9000, 5432, 22],
                         "scope": "cde"}]}]))
        # segtest with the policy as written: the out-of-scope namespace cannot reach the CDE
        self.seg_ok = self.tmp / "segtest-ok.json"
        self.seg_ok_run = _cli("segtest", "--plan", str(self.plan), "-o", str(self.seg_ok), "--source", "analytics",
                               pod=self.analytics)
        self.report_ok = self.tmp / "report-ok"
        self.report_ok_run = _cli("report", "--policy", str(self.policy), "--events", str(self.events),
                                  "--identity", str(self.identity), "--segtest", str(self.seg_ok),
                                  "-o", str(self.report_ok))
        # open a hole with a named exception rule, wait for the sidecar to apply it, test again
        self.policy_hole = self.tmp / "policy-hole.yaml"
        self.policy_hole.write_text(POLICY.format(reviewed=self.reviewed, hole=HOLE))
        n = len([e for e in self.sc.events("policy") if e["policy"]["action"] == "reloaded"])
        _write_atomic(self.policy, self.policy_hole.read_text())
        self.sc.wait_event(lambda e: e.get("event_type") == "policy" and e["policy"]["action"] == "reloaded"
                           and len([x for x in self.sc.events("policy") if x["policy"]["action"] == "reloaded"]) > n,
                           timeout=15, what="hole policy loaded")
        self.seg_bad = self.tmp / "segtest-hole.json"
        self.seg_bad_run = _cli("segtest", "--plan", str(self.plan), "-o", str(self.seg_bad), "--source",
                                "analytics", pod=self.analytics)
        self.report_bad = self.tmp / "report-hole"
        self.report_bad_run = _cli("report", "--policy", str(self.policy_hole), "--events", str(self.events),
                                   "--identity", str(self.identity), "--segtest", str(self.seg_ok), str(self.seg_bad),
                                   "-o", str(self.report_bad), "--no-pdf")
        self.sc.stop()

    def curl(self, pod, url: str, *args: str) -> subprocess.CompletedProcess:
        return pod.run(["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", *args, url], check=False)

    def late_request(self, pod, request_line: str) -> str:
        """One HTTP request sent only once the sidecar's upstream connection is up.

        A request that arrives while the sidecar is still connecting upstream and is denied at L7 is
        stopped inside the upstream's connection_made, before uvloop attaches the Python socket to its
        transport: the socket object keeps the fd number and closes it again when garbage-collected,
        resetting whichever later flow reuses that fd (reported; proxy._connect).  Returns the status."""
        go = self.tmp / f"go-{pod.name}"
        go.unlink(missing_ok=True)
        code = (
            "import os, socket, sys, time\n"
            f"s = socket.create_connection(({self.payments.ip!r}, 9000))\n"
            "print('connected', flush=True)\n"
            f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\n"
            f"s.sendall(b'{request_line}\\r\\nHost: payments\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "data = b''\n"
            "while True:\n    b = s.recv(65536)\n    if not b: break\n    data += b\n"
            "print(data.split(b' ')[1].decode() if data else '000', flush=True)\n")
        p = pod.popen([PY, "-c", code])
        assert p.stdout.readline().strip() == b"connected"
        # the upstream is up when the pod holds two established sockets for this client on :9000: the
        # sidecar's accepted one and nginx's (the sidecar connects upstream from the client's address)
        def both_up() -> bool:
            out = self.payments.run(["ss", "-Htn", "state", "established", "( sport = :9000 )"]).stdout
            return len([ln for ln in out.splitlines() if f"{pod.ip}:" in ln]) >= 2

        wait_until(both_up, 10, what="sidecar connected upstream")
        go.write_text("")
        out, _ = p.communicate(timeout=30)
        return out.decode().strip()

    def traffic(self) -> None:
        base = f"http://{self.payments.ip}:9000"
        self.results: dict[str, list] = {"charge": [], "oos": [], "admin": [], "stats": [], "pan": []}
        for i in range(3):
            self.results["charge"].append(self.curl(self.checkout, f"{base}/v1/charge", "-X", "POST",
                                                    "-d", f"amount={i + 1}").stdout)
        for _ in range(2):
            self.results["oos"].append(self.curl(self.analytics, f"{base}/v1/charge", "-X", "POST",
                                                 "-d", "amount=1").returncode)
        self.results["admin"].append(self.late_request(self.checkout, "GET /admin/users HTTP/1.1"))
        stats = f"http://{self.analytics.ip}:9100/collect"
        r = self.curl(self.payments, stats, "-X", "POST", "-d", '{"charges": 3}')
        self.stats_rc = (r.returncode, r.stderr)
        self.results["stats"].append(r.stdout)
        body = json.dumps({"order": 42, "card": TEST_PAN, "exp": "12/29"})
        self.results["pan"].append(self.curl(self.payments, stats, "-X", "POST", "-H",
                                             "Content-Type: application/json", "-d", body).stdout)
        self.sc.wait_flows(8)


@pytest.fixture(scope="module")
def world():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pw", 197)
    try:
        yield World(c)
    finally:
        c.close()


def _report(d: Path) -> dict:
    return json.loads((d / "report.json").read_text())


def _rule(rep: dict, name: str) -> dict:
    rows = [r for r in rep["rules"] if r["name"] == name]
    assert len(rows) == 1, [r["name"] for r in rep["rules"]]
    return rows[0]


def test_real_traffic_was_what_the_report_is_about(world):
    r = world.results
    assert r["charge"] == ["200"] * 3
    assert all(rc in (7, 52, 56) for rc in r["oos"]), r["oos"]  # refused by the sidecar
    assert r["admin"] == ["403"]
    assert r["stats"] == ["200"], (world.stats_rc, [(f["verdict"], f["rule"], f["close_reason"], f["flow"], f["l7"])
                                                    for f in world.sc.flows(dest_port=9100)], world.sc.stderr()[-3000:])
    assert r["pan"] == ["403"]  # DLP block answered the CDE client
    dlp = [a for a in world.sc.events("alert") if a["alert"]["category"] == "dlp"]
    assert len(dlp) == 1 and dlp[0]["alert"]["action"] == "blocked" and dlp[0]["dlp"]["masked"] == PAN_MASKED
    assert TEST_PAN not in world.events.read_text()


def test_segtest_passes_with_the_policy_and_fails_through_a_named_exception(world):
    ok, bad = world.seg_ok_run, world.seg_bad_run
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASSED" in ok.stdout
    res = json.loads(world.seg_ok.read_text())
    assert res["passed"] is True and res["summary"]["probes"] == 3
    assert res["summary"]["reachable"] == 0 and res["summary"]["refused"] == 3
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"FAIL analytics -> payments/payment-api {world.payments.ip}:9000/TCP reachable" in bad.stdout
    res = json.loads(world.seg_bad.read_text())
    assert res["passed"] is False and res["summary"]["violations"] == 1
    by_port = {p["port"]: p for p in res["probes"]}
    assert by_port[9000]["result"] == "reachable" and by_port[9000]["violation"] is True
    assert by_port[5432]["result"] == "refused" and by_port[22]["result"] == "refused"
    # the sidecar saw the probes: denied by segmentation first, then allowed by the named exception
    flows = [f for f in world.sc.flows(src_ip=world.analytics.ip) if f["dest_port"] in (9000, 5432, 22)]
    assert {(f["dest_port"], f["rule"], f["verdict"]) for f in flows} >= {
        (9000, "cde-segmentation", "deny"), (5432, "cde-segmentation", "deny"), (22, "cde-segmentation", "deny"),
        (9000, "analytics-debug-hole", "allow")}


def test_report_scopes_rule_counts_and_never_hit_rules(world):
    run = world.report_ok_run
    assert run.returncode == 0, run.stderr
    rep = _report(world.report_ok)
    scopes = rep["inventory"]["scopes"]
    assert set(scopes) == {"cde", "connected", "out-of-scope"}
    assert scopes["cde"]["workloads"] == 1 and scopes["cde"]["namespaces"] == ["payments"]
    assert scopes["cde"]["pods"] == 1  # the sidecar's own identity and the identity file agree
    by_id = {w["id"]: w for w in rep["inventory"]["workloads"]}
    cde = [w for w in by_id.values() if w["scope"] == "cde"]
    assert len(cde) == 1 and cde[0]["namespace"] == "payments" and world.payments.ip in cde[0]["ips"]

    charge = _rule(rep, "checkout-to-payments")
    assert charge["allowed"] == 3 and charge["touches_cde"] and not charge["never_hit"]
    stats = _rule(rep, "payments-to-analytics")
    assert stats["allowed"] == 1 and stats["touches_cde"]
    # the flow DLP blocked counts as denied for the rule that let it start; its finding is on the DLP rule
    assert stats["denied"] == 1
    assert _rule(rep, "no-clear-pan-out-of-cde")["dlp_findings"] == 1
    for never in ("payments-to-db", "no-ssh-into-containers"):
        row = _rule(rep, never)
        assert row["never_hit"] and row["hits"] == 0 and "never hit in the event window" in row["review_flags"]
    assert any("payments-to-db" in f["message"] and f["requirement"] == "1.2.7" for f in rep["findings"])

    builtin = {u["rule"]: u for u in rep["unmatched_rules_in_events"]}
    assert builtin["cde-segmentation"]["builtin"] and "out-of-scope" in builtin["cde-segmentation"]["meaning"]
    # 2 curl attempts + 3 segtest probes from the out-of-scope pod
    denied_in = [d for d in rep["denied_into_cde"] if d["rule"] == "cde-segmentation"]
    assert sum(d["count"] for d in denied_in) == 5
    assert all(d["src_scope"] == "out-of-scope" and d["dst_scope"] == "cde" for d in denied_in)
    assert {d["port"] for d in denied_in} == {9000, 5432, 22}
    # the L7 deny of /admin/users from checkout is a denied attempt into the CDE too
    assert any(d["src_scope"] == "connected" and d["rule"] in ("default-deny", "checkout-to-payments")
               for d in rep["denied_into_cde"])
    assert rep["segtest"]["passed"] is True and rep["segtest"]["violations"] == []
    assert not [f for f in rep["findings"] if f["requirement"] == "11.4.5"]


def test_report_builtin_rule_count_is_the_number_of_flows(world):
    rep = _report(world.report_ok)
    builtin = {u["rule"]: u for u in rep["unmatched_rules_in_events"]}
    denied_in = sum(d["count"] for d in rep["denied_into_cde"] if d["rule"] == "cde-segmentation")
    assert denied_in == 5
    assert builtin["cde-segmentation"]["count"] == denied_in


def test_report_dlp_finding_is_masked_and_no_full_pan_anywhere(world):
    rep = _report(world.report_ok)
    dlp = rep["dlp_findings"]
    assert len(dlp) == 1
    f = dlp[0]
    assert f["rule"] == "no-clear-pan-out-of-cde" and f["action"] == "blocked" and f["pack"] == "payment_cards"
    assert f["src_scope"] == "cde" and f["dst_scope"] == "out-of-scope" and f["count"] == 1
    assert f["samples"] and all(s == PAN_MASKED for s in f["samples"])
    assert rep["dlp_summary"]["blocked"] == 1
    assert any(x["requirement"] == "3.4.1" and x["severity"] == "high" for x in rep["findings"])
    html = (world.report_ok / "report.html").read_text()
    assert PAN_MASKED in html
    for d in (world.report_ok, world.report_bad):
        for p in d.rglob("*"):
            if p.is_file():
                text = p.read_bytes().decode("latin-1")
                assert not PAN_ANY_FORM.search(text), f"full PAN in {p}"


def test_report_with_the_hole_flags_the_failed_segtest_and_the_exception_rule(world):
    run = world.report_bad_run
    assert run.returncode == 0, run.stderr
    assert "segmentation test FAILED" in run.stdout  # high findings are printed
    rep = _report(world.report_bad)
    seg = rep["segtest"]
    assert seg["passed"] is False and len(seg["runs"]) == 2
    assert [r["passed"] for r in seg["runs"]] == [True, False]
    assert len(seg["violations"]) == 1
    v = seg["violations"][0]
    assert v["port"] == 9000 and v["source_scope"] == "out-of-scope" and v["target_scope"] == "cde"
    assert any(f["requirement"] == "11.4.5" and f["severity"] == "high" for f in rep["findings"])
    hole = _rule(rep, "analytics-debug-hole")
    assert hole["touches_cde"] and hole["allowed"] >= 1 and not hole["never_hit"]


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (Debian package chromium)")
def test_report_html_renders_in_headless_chromium(world):
    png = world.tmp / "report-hole.png"
    with tempfile.TemporaryDirectory() as prof:
        cmd = chromium_args(find_chromium(), prof) + ["--window-size=1280,4000", f"--screenshot={png}",
                                                      "--enable-logging=stderr", "--v=0",
                                                      (world.report_bad / "report.html").as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "Refused to" not in r.stderr
    w, h, distinct = _png_facts(png.read_bytes())
    assert (w, h) == (1280, 4000) and distinct > 50
    keep = os.environ.get("PALISADE_KEEP_PNG")
    if keep:  # for a human look: PALISADE_KEEP_PNG=/tmp/report.png
        Path(keep).write_bytes(png.read_bytes())
    html = (world.report_bad / "report.html").read_text()
    for needle in ("analytics-debug-hole", "checkout-to-payments", "cde-segmentation", PAN_MASKED):
        assert needle in html
