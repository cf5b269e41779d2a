"""Segmentation test: plan validation, probe classification on loopback, and real isolation
(and a real hole) between network namespaces with nftables in the target."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import pytest

from firewall.audit.report import build_report
from firewall.audit.segtest import PlanError, load_plan, parse_plan, run_plan
from firewall.lab import netns as lab_netns

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cli(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "firewall", "segtest", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=60)


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("plan, needle", [
    ([], "non-empty list"),
    ([{"source": "a"}], "[0].targets: required"),
    ([{"source": "a", "targets": [{"name": "t", "address": "10.0.0.1", "ports": [0]}]}], "ports[0]: port"),
    ([{"source": "a", "targets": [{"name": "t", "address": "10.0.0.1", "ports": ["80"]}]}], "ports[0]: port"),
    ([{"source": "a", "targets": [{"name": "t", "address": "10.0.0.1"}]}], "needs 'ports'"),
    ([{"source": "a", "targets": [{"name": "t", "ports": [1]}]}], "targets[0].address: required"),
    ([{"source": "a", "scope": "dmz", "targets": [{"name": "t", "address": "x", "ports": [1]}]}], "scope must be"),
    ([{"source": "a", "targets": [{"name": "t", "address": "x", "ports": [1], "prot": 1}]}], "unknown field 'prot'"),
    ([{"source": "a", "targets": [{"name": "t", "address": "x", "ports": [1]}]}] * 2, "duplicate source"),
])
def test_plan_errors_name_the_field(plan, needle):
    with pytest.raises(PlanError) as err:
        parse_plan(plan, "plan.yaml")
    assert needle in str(err.value) and str(err.value).startswith("plan.yaml: ")


def test_bad_plan_exits_2_with_one_line(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("- source: a\n  targets: [{name: t, address: 10.0.0.1, ports: [99999]}]\n")
    r = _cli("--plan", str(p), "-o", str(tmp_path / "r.json"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "port must be" in r.stderr
    p.write_text("- source: a\n  targets: [unclosed\n")
    r = _cli("--plan", str(p), "-o", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "invalid YAML" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--plan", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "cannot read plan" in r.stderr
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- loopback classification


class _Servers:
    """Loopback listeners: one that keeps connections open, one that closes right after accept
    (what a transparent proxy does with a denied flow), and a UDP echo."""

    def __init__(self) -> None:
        self.hold = self._listen()
        self.close = self._listen()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.kept: list[socket.socket] = []
        self.stop = False
        for target in (self._accept_hold, self._accept_close, self._echo):
            threading.Thread(target=target, daemon=True).start()
        closed = socket.socket()  # a port nobody listens on: bind, note the port, close
        closed.bind(("127.0.0.1", 0))
        self.closed_port = closed.getsockname()[1]
        closed.close()

    @staticmethod
    def _listen() -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)  # listening before the test runs: no readiness race
        return s

    def _accept_hold(self) -> None:
        while not self.stop:
            try:
                self.kept.append(self.hold.accept()[0])
            except OSError:
                return

    def _accept_close(self) -> None:
        while not self.stop:
            try:
                self.close.accept()[0].close()
            except OSError:
                return

    def _echo(self) -> None:
        while not self.stop:
            try:
                data, addr = self.udp.recvfrom(2048)
                self.udp.sendto(data, addr)
            except OSError:
                return

    def shutdown(self) -> None:
        self.stop = True
        for s in [self.hold, self.close, self.udp, *self.kept]:
            s.close()


def test_probe_classification_on_loopback(tmp_path):
    srv = _Servers()
    try:
        plan = tmp_path / "plan.yaml"
        port = lambda s: s.getsockname()[1]  # noqa: E731
        plan.write_text(json.dumps([
            {"source": "oos", "targets": [
                {"name": "held", "address": "127.0.0.1", "ports": [port(srv.hold)], "scope": "connected"},
                {"name": "proxy-denied", "address": "127.0.0.1", "ports": [port(srv.close)]},
                {"name": "nothing", "address": "127.0.0.1", "ports": [srv.closed_port], "udp": [port(srv.udp)]},
            ]},
        ]))
        doc = run_plan(load_plan(str(plan)), timeout=2.0, hold=0.2)
    finally:
        srv.shutdown()
    res = {(p["target"], p["proto"]): p for p in doc["probes"]}
    assert res[("held", "TCP")]["result"] == "reachable" and res[("held", "TCP")]["rtt_ms"] > 0
    assert res[("proxy-denied", "TCP")]["result"] == "refused"
    assert "after the handshake" in res[("proxy-denied", "TCP")]["detail"]
    assert res[("nothing", "TCP")]["result"] == "refused"
    assert res[("nothing", "UDP")]["result"] == "reachable"  # the echo answered
    # the reachable target is "connected", and the reachable UDP one is CDE: that one is a violation
    assert [(p["target"], p["proto"]) for p in doc["probes"] if p["violation"]] == [("nothing", "UDP")]
    assert doc["passed"] is False and doc["summary"]["violations"] == 1
    assert doc["plan_sha256"] == __import__("hashlib").sha256(plan.read_bytes()).hexdigest()


def test_unknown_source_is_a_plan_error(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("- {source: a, targets: [{name: t, address: 127.0.0.1, ports: [1]}]}\n")
    r = _cli("--plan", str(plan), "--source", "b", "-o", "-")
    assert r.returncode == 2 and "no plan entry for source 'b' (known: a)" in r.stderr and r.stdout == ""


# --------------------------------------------------------------------------- network namespaces

PREFIX = f"pr{os.getpid() % 100000}"  # the lab's namespaces: <prefix>-cde, <prefix>-con, <prefix>-oos
NS = {k: f"{PREFIX}-{k}" for k in ("cde", "con", "oos")}
ADDR = {"cde": "10.78.0.10", "con": "10.78.0.20", "oos": "10.78.0.30"}
DB_PORT, CACHE_PORT = 5432, 6379


def _sh(*cmd: str, input: str | None = None) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, text=True, input=input, timeout=30)


def _rules(hole: bool) -> str:
    hole_rule = f"ip saddr {ADDR['oos']} tcp dport {DB_PORT} accept" if hole else ""
    return f"""
table inet pr_seg {{}}
delete table inet pr_seg
table inet pr_seg {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iif "lo" accept
    ct state established,related accept
    ip saddr {ADDR['con']} tcp dport {DB_PORT} accept
    {hole_rule}
    tcp dport {DB_PORT} reject with tcp reset
    tcp dport {CACHE_PORT} drop
    udp dport 53 drop
  }}
}}
"""


SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {DB_PORT}))
s.listen(64)
print("ready", flush=True)
kept = []
while True:
    kept.append(s.accept()[0])
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Three pods of a lab cluster (``firewall/lab/netns.py``) on 10.78.0.0/24: cde (server +
    nftables), con and oos."""
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
        pytest.skip("needs root, ip and nft to build network namespaces")
    cluster = lab_netns.Cluster(PREFIX, 78, unique=False, ipv6=False)
    try:
        for key, addr in ADDR.items():
            cluster.pod(key, host=int(addr.rsplit(".", 1)[1]))
        _sh("ip", "netns", "exec", NS["cde"], "nft", "-f", "-", input=_rules(hole=False))
        server = cluster.pods["cde"].popen([sys.executable, "-c", SERVER], text=True)
        assert server.stdout.readline().strip() == "ready"
        d = tmp_path_factory.mktemp("segtest")
        plan = d / "plan.yaml"
        plan.write_text(f"""\
- source: oos
  scope: out-of-scope
  targets:
    - {{name: payments-db, address: {ADDR['cde']}, ports: [{DB_PORT}, {CACHE_PORT}], udp: [53], scope: cde}}
- source: con
  scope: connected
  targets:
    - {{name: payments-db, address: {ADDR['cde']}, ports: [{DB_PORT}], scope: cde}}
""")
        yield d, plan
    finally:
        cluster.close()


def _run_from(source: str, plan: Path, out: Path) -> tuple[int, dict, str]:
    r = _cli("--plan", str(plan), "--source", source, "-o", str(out), "--timeout", "0.5", "--hold", "0.2",
             netns=NS[source])
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(out.read_text()), r.stdout


@pytest.mark.netns
def test_isolated_cde_passes(lab):
    d, plan = lab
    _sh("ip", "netns", "exec", NS["cde"], "nft", "-f", "-", input=_rules(hole=False))
    rc, doc, out = _run_from("oos", plan, d / "oos.json")
    res = {(p["port"], p["proto"]): p["result"] for p in doc["probes"]}
    assert res == {(DB_PORT, "TCP"): "refused", (CACHE_PORT, "TCP"): "timeout", (53, "UDP"): "timeout"}
    assert rc == 0 and doc["passed"] is True and "PASSED" in out and doc["sources"] == ["oos"]
    rc, doc, _ = _run_from("con", plan, d / "con.json")
    (probe,) = doc["probes"]
    assert probe["result"] == "reachable" and not probe["violation"]  # connected may reach the CDE
    assert rc == 0 and doc["passed"] is True


@pytest.mark.netns
def test_opened_hole_fails_and_report_shows_it(lab):
    d, plan = lab
    _sh("ip", "netns", "exec", NS["cde"], "nft", "-f", "-", input=_rules(hole=True))
    try:
        rc, doc, out = _run_from("oos", plan, d / "oos-hole.json")
    finally:
        _sh("ip", "netns", "exec", NS["cde"], "nft", "-f", "-", input=_rules(hole=False))
    assert rc == 1 and doc["passed"] is False
    assert [(p["address"], p["port"], p["result"]) for p in doc["probes"] if p["violation"]] == [
        (ADDR["cde"], DB_PORT, "reachable")]
    assert f"FAIL oos -> payments-db {ADDR['cde']}:{DB_PORT}/TCP reachable" in out
    from tests.report.scenario import POLICY

    pol = d / "policy.yaml"
    pol.write_text(POLICY)
    rep = build_report([str(pol)], [], segtest_paths=[str(d / "oos-hole.json")], as_of=date(2026, 11, 28))
    assert rep["segtest"]["passed"] is False and len(rep["segtest"]["violations"]) == 1
    assert any(f["requirement"] == "11.4.5" and f["severity"] == "high" for f in rep["findings"])


def test_stdout_output_is_json_only(tmp_path):
    """In the Job, `kubectl logs` is the results file: nothing but the JSON may reach stdout."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"- {{source: a, targets: [{{name: t, address: 127.0.0.1, ports: [{port}]}}]}}\n")
    r = _cli("--plan", str(plan), "--source", "a", "-o", "-")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["passed"] is True and doc["probes"][0]["result"] == "refused"


def test_job_manifest_runs_a_valid_segtest_command():
    """The Job's command line must parse with the real CLI, print JSON only and pick its own namespace."""
    import argparse

    import yaml

    from firewall.audit import segtest
    (job,) = [d for d in yaml.safe_load_all((REPO / "deploy" / "segtest-job.yaml").read_text()) if d]
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]
    assert pod["metadata"]["annotations"]["palisade.dev/inject"] == "false"
    assert pod["metadata"]["labels"]["pci.palisade.dev/scope"] == "out-of-scope"
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["python", "-m", "firewall", "segtest"]
    assert {"name": "SOURCE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c["env"]
    parser = argparse.ArgumentParser()
    segtest.register(parser.add_subparsers())
    args = parser.parse_args(["segtest", *c["args"]])
    assert args.output == "-" and args.source == "$(SOURCE_NAMESPACE)"
    assert args.plan.startswith(c["volumeMounts"][0]["mountPath"] + "/")
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"] and c["securityContext"]["readOnlyRootFilesystem"]
