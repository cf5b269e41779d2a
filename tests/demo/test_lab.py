"""The one network-namespace lab (``firewall/lab/netns.py``): its clean-up is what every netns test,
the demo and the benchmarks rely on, so these tests try to make it leave something behind.

Prefixes ``lt``/``lx`` and 10.24x.0.0/24 (nothing else uses them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from firewall import LABEL_SCOPE
from firewall.lab import netns as lab

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]


def _namespaces(prefix: str) -> list[str]:
    return lab.lab_namespaces(prefix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is not alive
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_pods_reach_each_other_and_close_removes_everything():
    c = lab.Cluster("lt", 241)
    try:
        a = c.pod("a", "shop", labels={"app": "a", LABEL_SCOPE: "connected"})
        b = c.pod("b", "payments", name="b-0")
        assert (a.ip, b.ip, b.name, b.namespace, a.scope) == ("10.241.0.2", "10.241.0.3", "b-0", "payments",
                                                               "connected")
        assert c.namespace_of == {"a": "shop", "b": "payments"}
        assert a.run(["ping", "-c1", "-W2", b.ip], check=False).returncode == 0
        assert a.run(["ping", "-6", "-c1", "-W2", b.ip6], check=False).returncode == 0
        assert sorted(_namespaces(c.prefix)) == sorted([c.sw, a.netns, b.netns])
        # a process the lab did not start (no Popen to kill): close must still get rid of it,
        # or deleting the namespace would leave it running
        stray = subprocess.Popen(["ip", "netns", "exec", b.netns, "sleep", "300"], start_new_session=True)
        srv = a.popen(["sleep", "300"])
        lab.wait_until(lambda: subprocess.run(["ip", "netns", "pids", b.netns], capture_output=True,
                                              text=True).stdout.strip(), 5, what="the stray to start")
    finally:
        c.close()
    assert _namespaces(c.prefix) == []
    stray.wait(5)
    assert stray.returncode is not None and srv.poll() is not None
    assert c.prefix not in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def test_close_leaves_another_cluster_with_a_longer_prefix_alone():
    # "lx12" + "-..." must not be taken for a namespace of prefix "lx1": the names are prefix + "-"
    a = lab.Cluster("lx1", 242, unique=False, ipv6=False)
    b = lab.Cluster("lx12", 243, unique=False, ipv6=False)
    try:
        a.pod("p")
        bp = b.pod("p")
        a.close()
        assert _namespaces("lx1") == [] and sorted(_namespaces("lx12")) == sorted([b.sw, bp.netns])
        assert bp.run(["ip", "link", "show", "eth0"], check=False).returncode == 0
    finally:
        a.close()
        b.close()
    assert _namespaces("lx12") == []


def test_a_failed_pod_creation_leaves_nothing_behind():
    c = lab.Cluster("lt", 244)
    try:
        c.pod("a")
        # the veth name the next pod needs is taken: its namespace exists, then creation fails
        subprocess.run(["ip", "link", "add", f"{c.prefix}2h", "type", "bridge"], check=True)
        with pytest.raises(subprocess.CalledProcessError):
            c.pod("b")
        assert f"{c.prefix}-b" in _namespaces(c.prefix)
    finally:
        c.close()
    assert _namespaces(c.prefix) == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert c.prefix not in links


def test_stray_veth_of_a_crash_in_the_root_namespace_is_removed():
    c = lab.Cluster("lt", 245)
    stray = f"{c.prefix}9h"
    subprocess.run(["ip", "link", "add", stray, "type", "veth", "peer", "name", f"{c.prefix}9p"], check=True)
    removed = c.close()
    assert stray in removed
    assert subprocess.run(["ip", "link", "show", stray], capture_output=True).returncode != 0


def test_a_cluster_nobody_closed_is_removed_at_exit(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys
        sys.path.insert(0, {str(REPO)!r})
        from firewall.lab import netns as lab
        c = lab.Cluster("lt", 246)
        p = c.pod("a")
        p.popen(["sleep", "300"])
        print(c.prefix, flush=True)
        raise SystemExit(3)  # no close(), no context manager
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    prefix = r.stdout.strip()
    assert prefix.startswith("lt")
    assert _namespaces(prefix) == []


def test_a_sidecar_that_dies_at_start_is_an_error_carrying_its_log():
    with lab.Cluster("lt", 247) as c:
        p = c.pod("a")
        with pytest.raises(lab.LabError, match="exited with") as exc:
            p.start_sidecar("--no-such-flag", apply_redirect=False, ready_timeout=30)
        assert "--no-such-flag" in str(exc.value)  # argparse's complaint, from the sidecar's log
        assert p.sidecar is not None and p.sidecar.proc.poll() is not None
    assert _namespaces(c.prefix) == []


def test_sidecar_lifecycle_events_and_waits():
    with lab.Cluster("lt", 248) as c:
        srv, cli = c.pod("srv", "payments"), c.pod("cli", "shop")
        http = srv.popen([lab.PY, "-m", "http.server", "9000", "--bind", "0.0.0.0"])
        srv.wait_listening(9000, proc=http)
        sc = srv.start_sidecar("--no-dlp")
        assert sc.ready() and sc.admin_get("/healthz")[0] == 200
        r = cli.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{srv.ip}:9000/"], check=False)
        assert r.stdout == "200"
        flows = sc.wait_flows(1, 15, dest_port=9000, where=lambda f: f.get("src_ip") == cli.ip)
        assert flows[0]["verdict"] == "allow"
        with pytest.raises(TimeoutError):
            sc.wait_flows(1, 0.3, dest_port=9999)  # the wait ends, it does not hang
        assert sc.stop() == 0
        shutdown = [e for e in sc.events() if e.get("event_type") == "shutdown"]
        assert shutdown, "SIGTERM drains and logs a shutdown event"
        # the server dies with the lab (its own process group is killed)
    assert http.poll() is not None


def test_wait_listening_fails_fast_when_the_server_exits():
    with lab.Cluster("lt", 249) as c:
        p = c.pod("a")
        dead = p.popen([lab.PY, "-c", "raise SystemExit(4)"])
        with pytest.raises(lab.LabError, match="exited with 4"):
            p.wait_listening(9000, timeout=30, proc=dead)
