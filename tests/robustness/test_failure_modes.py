"""Failure modes, each with the documented consequence (docs: fail closed for enforcement,
keep the last good configuration, never let an output problem touch the traffic).

Already covered elsewhere and not repeated: SIGKILL -> inbound refused and recovery
(tests/integration/test_datapath.py), corrupted policy -> old policy stays
(tests/integration/test_enforcement.py), a hanging alert webhook
(tests/capture/test_sidecar_e2e.py), ENOSPC in the capture CLI (tests/capture/test_capture_netns.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from firewall import ANN_PCAP
from firewall.identity.podinfo import write_podinfo
from tests.harness import PY, REPO, Cluster, wait_until

from .conftest import PAN, Env, assert_no_pan, http_request, received_everything, sidecar_outputs

DLP_RULES = REPO / "dlp_rules"


def test_invalid_dlp_rules_refuse_start_with_one_clear_line(tmp_path):
    bad = tmp_path / "rules"
    shutil.copytree(DLP_RULES, bad)
    (bad / "payment_cards.yaml").write_text("pack: payment_cards\nrules:\n  - id: x\n    regex: '(['\n")
    r = subprocess.run([sys.executable, "-m", "firewall", "run", "--dlp-rules", str(bad), "--no-drop-privileges",
                        "--no-inbound", "--no-outbound", "--no-dns", "--admin-port", "0",
                        "--events", str(tmp_path / "eve.json"), "--dlp-cache", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=60, cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("palisade run:") and "payment_cards.yaml" in lines[0], lines[0]
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def env():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pr", 224)
    try:
        e = Env(c)
        e.rec = e.recorder(e.analytics, 9100)
        e.analytics.serve_blast(9500)
        e.rules = e.tmp / "dlp_rules"
        shutil.copytree(DLP_RULES, e.rules)
        os.system(f"chmod -R a+rX {e.rules}")
        yield e
        for sc in e.sidecars:
            sc.stop()
        assert_no_pan(sidecar_outputs(e.tmp))
    finally:
        c.close()


def _pan_post(env) -> dict:
    body = json.dumps({"card": PAN}).encode()
    return env.client(env.payments, env.analytics.ip, 9100, [{"send": http_request("POST", "/c", body)}])


def _wait_reload_tick(env, sc, n: int) -> None:
    """A reload pass has run completely: touch the policy and wait for its 'reloaded' event, twice."""
    for i in range(2):
        env.policy.write_text(env.policy.read_text() + f"\n# tick {n}-{i}\n")
        want = n * 2 + i + 1
        wait_until(lambda w=want: len([e for e in sc.events("policy") if e["policy"]["action"] == "reloaded"]) >= w,
                   15, what="policy reload")


pytestmark = pytest.mark.netns


def test_invalid_dlp_rules_on_reload_keep_the_old_database(env):
    sc = env.sidecar("--dlp-rules", str(env.rules))
    _wait_reload_tick(env, sc, 0)
    original = (env.rules / "payment_cards.yaml").read_text()
    try:
        (env.rules / "payment_cards.yaml").write_text("pack: payment_cards\nrules: [{id: x, regex: '(['}]\n")
        sc.wait_event(lambda e: e.get("event_type") == "alert" and e["alert"]["signature"] == "dlp-reload-rejected",
                      timeout=15, what="dlp reload rejected")
        res = _pan_post(env)
        assert res["response"].startswith("HTTP/1.1 403"), res  # the old database still blocks
        assert PAN not in received_everything(env.rec)
        assert sc.ready()
    finally:
        (env.rules / "payment_cards.yaml").write_text(original)


def test_dlp_rules_change_right_after_start_is_not_missed(env):
    (env.tmp / "slow-reload.yaml").write_text("reload_interval: 4\n")
    sc = env.sidecar("--dlp-rules", str(env.rules), "--config", str(env.tmp / "slow-reload.yaml"))
    original = (env.rules / "payment_cards.yaml").read_text()
    try:
        (env.rules / "payment_cards.yaml").write_text("pack: payment_cards\nrules: [{id: x, regex: '(['}]\n")
        sc.wait_event(lambda e: e.get("event_type") == "alert" and e["alert"]["signature"] == "dlp-reload-rejected",
                      timeout=15, what="dlp reload rejected")
    finally:
        (env.rules / "payment_cards.yaml").write_text(original)


def test_alert_webhook_refusing_connections_does_not_touch_traffic(env):
    sc = env.sidecar("--alert-webhook", "http://127.0.0.1:9/hook")  # discard port: nothing listens
    r = env.payments.blast(env.analytics.ip, port=9500, client_bytes=3 << 20, server_bytes=3 << 20,
                           connections=8)
    assert r["failed"] == 0, r
    for _ in range(3):
        assert _pan_post(env)["response"].startswith("HTTP/1.1 403")
    assert len([e for e in sc.events("alert") if e["alert"]["category"] == "dlp"]) >= 3
    assert sc.ready()


def test_events_sink_on_a_full_disk_does_not_touch_traffic(env):
    full = env.tmp / "full-events"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(full)], check=True)
    try:
        (full / "filler").write_bytes(b"\0" * (60 << 10))
        for old in env.sidecars:
            old.stop()
        sc = env.payments.start_sidecar("--identity", str(env.identity), "--labels", json.dumps(env.labels),
                                        "--policy", str(env.policy), "--events", str(full / "eve.json"),
                                        apply_redirect=not env.redirect_done, env={"POD_NAMESPACE": "payments"})
        env.redirect_done = True
        env.sidecars.append(sc)
        r = env.payments.blast(env.analytics.ip, port=9500, client_bytes=2 << 20, server_bytes=2 << 20,
                               connections=50, concurrency=50)
        assert r["failed"] == 0 and r["connections"] == 50, r
        assert _pan_post(env)["response"].startswith("HTTP/1.1 403")  # enforcement unchanged
        assert sc.proc.poll() is None and sc.ready()
        sc.stop()
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_pcap_disk_full_stops_the_capture_with_an_event_and_traffic_flows(env):
    pcap = env.tmp / "pcap-full"
    pcap.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0777", "tmpfs", str(pcap)], check=True)
    try:
        sc = env.sidecar("--pcap-dir", str(pcap))
        write_podinfo(str(env.podinfo), {ANN_PCAP: "duration=60s,max-bytes=20MiB"}, env.labels)
        sc.wait_event(lambda e: e.get("event_type") == "pcap" and e["pcap"].get("state") == "started", 15,
                      what="capture started")
        r = env.payments.blast(env.analytics.ip, port=9500, client_bytes=4 << 20, server_bytes=4 << 20,
                               connections=4)
        assert r["failed"] == 0, r
        ev = sc.wait_event(lambda e: e.get("event_type") == "pcap" and e["pcap"].get("state") == "failed", 20,
                           what="capture failed event")
        assert "disk full" in ev["pcap"]["error"]
        # traffic keeps flowing after the capture died
        assert env.payments.blast(env.analytics.ip, port=9500, client_bytes=1 << 20, server_bytes=1 << 20,
                                  connections=4)["failed"] == 0
        assert sc.ready()
        files = [p for p in pcap.iterdir() if p.is_file()]
        assert files and all(not (p.stat().st_mode & stat.S_IROTH) for p in files), \
            [(p.name, oct(p.stat().st_mode)) for p in files]
    finally:
        write_podinfo(str(env.podinfo), {}, env.labels)
        for sc in env.sidecars:
            sc.stop()
        subprocess.run(["umount", "-l", str(pcap)], check=False)


def test_sidecar_killed_outbound_fails_closed_and_recovers(env):
    sc = env.sidecar()
    ok = env.payments.blast(env.analytics.ip, port=9500, client_bytes=1000, server_bytes=1000)
    assert ok["failed"] == 0
    sc.stop(signal.SIGKILL)
    probe = textwrap.dedent(f"""
        import socket
        try:
            s = socket.create_connection(("{env.analytics.ip}", 9500), timeout=3)
            s.sendall(b"x" * 24); print("open", s.recv(10))
        except ConnectionRefusedError: print("refused")
        except OSError as e: print("error", e)
    """)
    assert env.payments.run([PY, "-c", probe]).stdout.strip() == "refused"  # never bypassed to the peer
    sc2 = env.sidecar()
    assert env.payments.blast(env.analytics.ip, port=9500, client_bytes=1000, server_bytes=1000)["failed"] == 0
    sc2.wait_flows(1, dest_port=9500)


def test_event_files_are_not_world_readable(env):
    sc = env.sidecar()
    env.payments.blast(env.analytics.ip, port=9500, client_bytes=10, server_bytes=10)
    sc.wait_flows(1)
    mode = Path(sc.events_path).stat().st_mode
    assert not mode & stat.S_IROTH and not mode & stat.S_IWOTH, oct(mode)
