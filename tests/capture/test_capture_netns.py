"""Real captures in network namespaces, read back with tcpdump and tshark."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from firewall import ANN_PCAP
from firewall.capture.manager import CaptureManager
from firewall.capture.spec import parse_spec
from firewall.identity.podinfo import PodinfoWatcher, write_podinfo

from .conftest import NEEDS_ROOT, NEEDS_TOOLS, sha256_file, tcpdump_lines, tshark_fields

pytestmark = [pytest.mark.netns, NEEDS_ROOT, NEEDS_TOOLS]

KiB = 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": REPO}


def _manager(tmp_path, nspair, events, **kw) -> CaptureManager:
    return CaptureManager(str(tmp_path / "pcap"), events, netns=nspair.pod_path, **kw)


def _path(mgr: CaptureManager, name: str) -> str:
    return os.path.join(mgr.pcap_dir, name)


def _check_files(mgr: CaptureManager, ev: dict) -> None:
    """Every file of a finished capture: mode 0600, SHA-256 and sizes as the event says."""
    assert ev["files"], ev
    total = 0
    for name in ev["files"]:
        st = os.stat(_path(mgr, name))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert ev["sha256"][name] == sha256_file(_path(mgr, name))
        total += st.st_size
    assert ev["bytes"] == total


def test_filtered_capture_holds_matching_packets_only(tmp_path, nspair, events):
    nspair.serve("10.77.0.2:5432", "10.77.0.2:8080")
    mgr = _manager(tmp_path, nspair, events)
    cap = mgr.start(parse_spec("duration=60s,filter=tcp port 5432"), {"manual": "test"})
    assert cap is not None
    events.wait("started", cap.id)
    # 5432 and 8080 over eth0, and 5432 over lo (the proxy<->app leg in a real pod)
    nspair.serve("127.0.0.1:5432", ns=nspair.pod)
    nspair.traffic("tcp:10.77.0.2:5432:30000", "tcp:10.77.0.2:8080:30000", "tcp:127.0.0.1:5432:30000")
    cap.stop()
    assert cap.join(10)
    fin = events.wait("finished", cap.id)[0]
    assert fin["reason"] == "stopped" and fin["trigger"] == {"manual": "test"}
    _check_files(mgr, fin)
    path = _path(mgr, fin["files"][0])

    lines = tcpdump_lines(path)
    assert len(lines) == fin["packets"] > 5
    assert all(".5432" in line for line in lines), lines
    assert not any(".8080" in line or "127.0.0.1" in line for line in lines)

    rows = tshark_fields(path, "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport", "tcp.seq_raw", "tcp.len",
                         "tcp.ack_raw", "tcp.flags")
    assert len(rows) == fin["packets"]
    assert {r[0] for r in rows} | {r[1] for r in rows} == {"10.77.0.1", "10.77.0.2"}
    assert all("5432" in (r[2], r[3]) for r in rows)
    # both directions, each segment once (no duplicates from binding to all interfaces)
    assert {r[0] for r in rows} == {"10.77.0.1", "10.77.0.2"}
    assert len({tuple(r) for r in rows}) == len(rows)
    assert sum(int(r[5]) for r in rows if r[0] == "10.77.0.1") == 30000, "every payload byte captured"
    payload = tshark_fields(path, "tcp.payload", display_filter="tcp.len > 0 and ip.src == 10.77.0.1")
    assert bytes.fromhex(payload[0][0].replace(":", "")).startswith(b"MARK-5432-")


def test_capture_stops_at_duration(tmp_path, nspair, events):
    mgr = _manager(tmp_path, nspair, events)
    cap = mgr.start(parse_spec("duration=1s,filter=tcp"), {"manual": "d"})
    assert cap is not None and cap.join(15)
    fin = events.wait("finished", cap.id)[0]
    assert fin["reason"] == "duration" and fin["duration_s"] >= 1.0
    assert fin["packets"] == 0 and fin["bytes"] == 24  # only the pcap header: no tcp traffic
    assert fin["kernel_drops"] == 0
    _check_files(mgr, fin)
    assert tcpdump_lines(_path(mgr, fin["files"][0])) == []
    assert mgr.active() == []


def test_capture_stops_at_max_bytes(tmp_path, nspair, events):
    nspair.serve("10.77.0.2:5432")
    mgr = _manager(tmp_path, nspair, events)
    cap = mgr.start(parse_spec("duration=60s,max-bytes=8KiB,snaplen=1500,filter=tcp port 5432"), {"m": 1})
    assert cap is not None
    events.wait("started", cap.id)
    nspair.traffic("tcp:10.77.0.2:5432:400000")
    assert cap.join(20), "max-bytes must end the capture long before its duration"
    fin = events.wait("finished", cap.id)[0]
    assert fin["reason"] == "max-bytes"
    _check_files(mgr, fin)
    assert 4 * KiB < fin["bytes"] <= 8 * KiB
    assert len(tshark_fields(_path(mgr, fin["files"][0]), "frame.number")) == fin["packets"]


def test_max_packets_and_snaplen(tmp_path, nspair, events):
    nspair.serve("10.77.0.2:5432")
    mgr = _manager(tmp_path, nspair, events)
    cap = mgr.start(parse_spec("max-packets=6,snaplen=80,filter=tcp port 5432"), {"m": 1})
    assert cap is not None
    events.wait("started", cap.id)
    nspair.traffic("tcp:10.77.0.2:5432:20000")
    assert cap.join(15)
    fin = events.wait("finished", cap.id)[0]
    assert fin["reason"] == "max-packets" and fin["packets"] == 6
    rows = tshark_fields(_path(mgr, fin["files"][0]), "frame.len", "frame.cap_len")
    assert len(rows) == 6
    assert all(int(cap_len) == min(int(length), 80) for length, cap_len in rows)
    assert max(int(length) for length, _ in rows) > 80, "original length must be kept when truncated"


def test_rotation_into_numbered_files(tmp_path, nspair, events):
    nspair.serve("10.77.0.2:5432")
    mgr = _manager(tmp_path, nspair, events)
    cap = mgr.start(parse_spec("rotate=2KiB,max-bytes=10KiB,snaplen=500,filter=tcp port 5432"), {"m": 1})
    assert cap is not None
    events.wait("started", cap.id)
    nspair.traffic(*["tcp:10.77.0.2:5432:100000"] * 5)
    assert cap.join(20)
    fin = events.wait("finished", cap.id)[0]
    assert fin["reason"] == "max-bytes"
    names = fin["files"]
    assert len(names) >= 4
    assert names == [f"{cap.id}.{i:03d}.pcap" for i in range(len(names))]
    _check_files(mgr, fin)
    assert fin["bytes"] <= 10 * KiB
    counted = 0
    for name in names:
        assert os.path.getsize(_path(mgr, name)) <= 2 * KiB
        counted += len(tcpdump_lines(_path(mgr, name)))
    assert counted == fin["packets"]


def test_annotation_starts_one_capture_and_restart_does_not_repeat(tmp_path, nspair, events):
    nspair.serve("10.77.0.2:5432")
    podinfo = str(tmp_path / "podinfo")
    value = "duration=30s,filter=tcp port 5432,max-packets=8"
    write_podinfo(podinfo, {ANN_PCAP: value}, {"app": "api"})
    mgr = _manager(tmp_path, nspair, events)
    with PodinfoWatcher(podinfo, lambda info: mgr.on_annotations(info.annotations), poll_interval=0.1):
        started = events.wait("started")[0]
        assert started["trigger"] == {"annotation": value}
        nspair.traffic(*["tcp:10.77.0.2:5432:20000"] * 3)  # well over 8 packets
        fin = events.wait("finished", started["id"])[0]
        assert fin["packets"] == 8 and fin["trigger"] == {"annotation": value}
        _check_files(mgr, fin)
        assert len(tcpdump_lines(_path(mgr, fin["files"][0]))) == 8

        # another annotation changes (kubelet rewrites the file): same pcap value, no capture
        write_podinfo(podinfo, {ANN_PCAP: value, "palisade.dev/mode": "monitor"}, {"app": "api"})
    assert len(events.pcap("started")) == 1

    # sidecar restart: a new manager on the same directory sees the same value
    restarted = _manager(tmp_path, nspair, events)
    restarted.on_annotations({ANN_PCAP: value})
    assert restarted.active() == [] and len(events.pcap("started")) == 1

    # a changed value is a new request
    restarted.on_annotations({ANN_PCAP: "duration=1s,filter=udp"})
    second = events.wait("started", n=2)[1]
    assert second["trigger"] == {"annotation": "duration=1s,filter=udp"} and second["id"] != started["id"]
    restarted.stop_all()
    assert events.wait("finished", second["id"])


def test_new_annotation_value_supersedes_running_capture(tmp_path, nspair, events):
    mgr = _manager(tmp_path, nspair, events, max_concurrent=1)
    mgr.on_annotations({ANN_PCAP: "duration=60s,filter=tcp"})
    first = events.wait("started")[0]
    mgr.on_annotations({ANN_PCAP: "duration=60s,filter=udp"})
    fin = events.wait("finished", first["id"])[0]
    assert fin["reason"] == "superseded"
    second = events.wait("started", n=2)[1]
    assert second["trigger"] == {"annotation": "duration=60s,filter=udp"}
    assert events.pcap("failed") == [], "replacing must not count against max_concurrent"
    mgr.stop_all()


def test_auto_capture_filters_to_the_peer_and_is_rate_limited(tmp_path, nspair, events):
    nspair.serve("10.77.0.2:5432", "10.77.0.3:5432")
    mgr = _manager(tmp_path, nspair, events, max_concurrent=2, auto_window_s=300)
    flow = {"src_ip": "10.77.0.1", "dest_ip": "10.77.0.2", "dest_port": 5432, "proto": "TCP"}
    assert mgr.auto_capture("10.77.0.2", {"rule": "default-deny", "flow": flow}, duration_s=30)
    assert not mgr.auto_capture("10.77.0.2", {"rule": "default-deny", "flow": flow}), \
        "a second capture of the same peer inside the window must be refused"
    assert not mgr.auto_capture("::ffff:10.77.0.2", {"rule": "default-deny", "flow": flow}), \
        "an IPv4-mapped address is the same peer"
    assert mgr.auto_capture("10.77.0.3", {"rule": "dlp:no-clear-pan", "flow": {}}, duration_s=30)
    assert not mgr.auto_capture("10.77.0.4", {"rule": "x", "flow": {}}), "max_concurrent=2 reached"
    assert not mgr.auto_capture("not-an-ip", {"rule": "x", "flow": {}})
    started = {e["trigger"]["peer"]: e for e in events.wait("started", n=2)}
    assert started["10.77.0.2"]["trigger"]["rule"] == "default-deny"
    assert started["10.77.0.2"]["trigger"]["flow"] == flow
    assert started["10.77.0.2"]["spec"]["filter"] == "host 10.77.0.2"

    nspair.traffic("tcp:10.77.0.2:5432:5000", "tcp:10.77.0.3:5432:7000")
    mgr.stop_all()
    for peer, other in (("10.77.0.2", "10.77.0.3"), ("10.77.0.3", "10.77.0.2")):
        fin = events.wait("finished", started[peer]["id"])[0]
        _check_files(mgr, fin)
        # `host X` matches ARP for X too, as in tcpdump
        rows = tshark_fields(_path(mgr, fin["files"][0]), "ip.src", "ip.dst", "arp.src.proto_ipv4",
                             "arp.dst.proto_ipv4")
        assert any(r[0] == "10.77.0.1" and r[1] == peer for r in rows)
        assert rows and all(peer in r for r in rows) and not any(other in r for r in rows)
    # still inside the window after the capture ended: refused
    assert not mgr.auto_capture("10.77.0.2", {"rule": "default-deny", "flow": flow})


def test_auto_capture_window_expires(tmp_path, nspair, events):
    mgr = _manager(tmp_path, nspair, events, auto_window_s=0.2)
    assert mgr.auto_capture("10.77.0.2", {"rule": "r", "flow": {}}, duration_s=1)
    first = events.wait("started")[0]
    mgr.stop_all()
    events.wait("finished", first["id"])
    deadline = time.monotonic() + 5
    while not mgr.auto_capture("10.77.0.2", {"rule": "r", "flow": {}}, duration_s=1):
        assert time.monotonic() < deadline, "window never expired"
        time.sleep(0.05)
    events.wait("started", n=2)
    mgr.stop_all()


def test_concurrency_limit_refuses_with_event(tmp_path, nspair, events):
    mgr = _manager(tmp_path, nspair, events, max_concurrent=1)
    first = mgr.start(parse_spec("duration=60s"), {"manual": 1})
    assert first is not None
    assert mgr.start(parse_spec("duration=60s"), {"manual": 2}) is None
    failed = events.wait("failed")[0]
    assert "limit of 1 concurrent captures" in failed["error"] and failed["trigger"] == {"manual": 2}
    assert [a["id"] for a in mgr.active()] == [first.id]
    mgr.stop_all()
    assert mgr.active() == []


def test_disk_budget_removes_oldest_files_first(tmp_path, nspair, events):
    pcap_dir = tmp_path / "pcap"
    pcap_dir.mkdir()
    now = time.time()
    for i, name in enumerate(["old-1.pcap", "old-2.pcap", "old-3.pcap"]):
        p = pcap_dir / name
        p.write_bytes(b"\0" * 100 * KiB)
        os.utime(p, (now - 1000 + i, now - 1000 + i))
    (pcap_dir / "notes.txt").write_bytes(b"\0" * 500 * KiB)  # not a pcap: never touched
    mgr = _manager(tmp_path, nspair, events, disk_budget_bytes=300 * KiB)
    cap = mgr.start(parse_spec("duration=60s,max-bytes=150KiB"), {"manual": 1})
    started = events.wait("started", cap.id)[0]
    removed = events.pcap("removed")
    assert [r["files"] for r in removed] == [["old-1.pcap"], ["old-2.pcap"]]
    assert all(r["reason"] == "disk budget" and r["for_capture"] == cap.id for r in removed)
    assert sorted(os.listdir(pcap_dir)) == sorted(["old-3.pcap", "notes.txt", started["files"][0]])
    assert started["max_bytes"] == 150 * KiB

    # a second capture gets only what is left of the budget (and removes the last old file)
    second = mgr.start(parse_spec("duration=60s,max-bytes=200KiB"), {"manual": 2})
    s2 = events.wait("started", second.id)[0]
    assert [r["files"] for r in events.pcap("removed")][-1] == ["old-3.pcap"]
    assert s2["max_bytes"] == 300 * KiB - 150 * KiB
    mgr.stop_all()


def test_cli_run_in_netns(tmp_path, nspair):
    out = subprocess.run([sys.executable, "-m", "firewall", "capture", "run", "--netns", nspair.pod,
                          "--spec", "duration=1s,filter=tcp", "--pcap-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30, env=ENV)
    assert out.returncode == 0, out.stderr
    evs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["pcap"]["state"] for e in evs] == ["started", "finished"]
    name = evs[1]["pcap"]["files"][0]
    assert evs[1]["pcap"]["sha256"][name] == sha256_file(str(tmp_path / name))


def test_disk_full_ends_capture_with_failed_event(tmp_path, nspair):
    """ENOSPC: a 16 KiB tmpfs mounted in the capture's own mount namespace (ip netns exec)."""
    nspair.serve("10.77.0.2:5432")
    pcap_dir = tmp_path / "small"
    pcap_dir.mkdir()
    script = (f"mount -t tmpfs -o size=16k tmpfs {pcap_dir} && exec {sys.executable} -m firewall capture "
              f"run --spec 'duration=30s,filter=tcp port 5432' --pcap-dir {pcap_dir}")
    proc = subprocess.Popen(["ip", "netns", "exec", nspair.pod, "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["pcap"]["state"] == "started"
        nspair.traffic("tcp:10.77.0.2:5432:2000000")
        rest, err = proc.communicate(timeout=40)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    last = json.loads(rest.splitlines()[-1])["pcap"]
    assert last["state"] == "failed" and "disk full" in last["error"]
    assert "Traceback" not in err
    assert os.listdir(pcap_dir) == [], "the tmpfs lived only in the capture's mount namespace"
