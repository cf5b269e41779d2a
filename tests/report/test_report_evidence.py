"""Report bounds and the evidence section: outside addresses aggregated above a bound (and the
result independent of how the input is split), capture files listed as cardholder-data
artefacts, CDE pods that ran unenforced, dropped events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firewall.audit.report import build_report, write_report
from firewall.audit.report_data import EventStats, aggregate_files, coarsen_world
from tests.report.scenario import POLICY

CDE = {"namespace": "payments", "pod": "payment-api-5d8-x1", "scope": "cde",
       "labels": {"app": "payment-api", "pci.palisade.dev/scope": "cde"}}
TS = "2026-11-28T10:00:00+00:00"


def _in(ip: str, ts: str = TS, mode: str = "protect", verdict: str = "deny") -> dict:
    return {"timestamp": ts, "event_type": "flow", "direction": "inbound", "verdict": verdict, "mode": mode,
            "rule": "cde-segmentation", "proto": "TCP", "dest_port": 9000, "app_proto": "unknown",
            "src_ip": ip, "dest_ip": "10.0.0.5", "src_workload": {"world": True, "ip": ip},
            "dest_workload": CDE, "flow": {"bytes_toserver": 10, "bytes_toclient": 0}}


def _alert(ip: str) -> dict:
    return {"timestamp": TS, "event_type": "alert", "direction": "inbound", "src_ip": ip, "dest_ip": "10.0.0.5",
            "src_workload": {"world": True, "ip": ip}, "dest_workload": CDE,
            "alert": {"signature": "policy deny", "action": "blocked", "category": "policy"}}


def _write(tmp_path: Path, events: list[dict], name: str = "eve.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(json.dumps(e) + "\n" for e in events))
    pol = tmp_path / "policy.yaml"
    pol.write_text(POLICY)
    return str(p)


def _ip(i: int, v6: bool = False) -> str:
    return f"2001:db8:{i % 65536:x}::{i // 65536 + 1:x}" if v6 else f"{11 + i // 65536}.{i // 256 % 256}.{i % 256}.9"


@pytest.mark.parametrize("v6", [False, True])
def test_many_outside_addresses_next_to_the_cde_are_aggregated(tmp_path, v6):
    n = 30_000
    evs = [_in(_ip(i, v6)) for i in range(n)] + [_alert(_ip(i, v6)) for i in range(0, n, 7)]
    path = _write(tmp_path, evs)
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    out = tmp_path / "out"
    write_report(rep, str(out), pdf=False)
    size = (out / "report.json").stat().st_size
    assert size < 2_000_000, size  # one entry per address: ~30 MB
    assert rep["inventory"]["external_addresses"] <= 1000
    assert rep["evidence"]["outside_addresses"]["aggregated"] is True
    assert sum(d["count"] for d in rep["denied_into_cde"]) == n  # nothing lost, only grouped
    assert any("outside addresses talked to the CDE" in f["message"] for f in rep["findings"])
    srcs = {d["src"] for d in rep["denied_into_cde"]}
    assert all("/" in s[len("world:"):] for s in srcs), sorted(srcs)[:3]


def test_few_outside_addresses_stay_individual(tmp_path):
    path = _write(tmp_path, [_in(f"198.51.100.{i}") for i in range(1, 51)])
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    assert {d["src"] for d in rep["denied_into_cde"]} == {f"world:198.51.100.{i}" for i in range(1, 51)}
    assert rep["evidence"]["outside_addresses"]["aggregated"] is False


def test_aggregation_does_not_depend_on_how_the_input_is_split(tmp_path):
    # 2500 addresses: one chunk alone stays under the bound, together they do not
    evs = []
    for i in range(2500):
        evs.append(_in(_ip(i)))
        if i % 3 == 0:
            evs.append(_alert(_ip(i)))
    path = _write(tmp_path, evs)
    one = aggregate_files([path], jobs=1)
    many = aggregate_files([path], jobs=2, chunk_bytes=40_000)
    assert one.world_level == many.world_level == 2
    assert {k: v[:7] for k, v in one.edges.items()} == {k: v[:7] for k, v in many.edges.items()}
    assert one.alerts == many.alerts
    assert sorted(w for w in one.workloads) == sorted(w for w in many.workloads)


def test_coarsen_world_levels():
    assert coarsen_world("world:11.2.3.4", 0) == "world:11.2.3.4"
    assert coarsen_world("world:11.2.3.4", 1) == "world:11.2.3.0/24"
    assert coarsen_world("world:11.2.3.0/24", 2) == "world:11.2.0.0/16"
    assert coarsen_world("world:2001:db8:1:2::9", 1) == "world:2001:db8:1::/48"
    assert coarsen_world("world:11.2.3.4", 3) == "world:*"
    assert coarsen_world("world:not-an-ip", 1) == "world:*"
    assert coarsen_world("world:?", 3) == "world:?"


def _pcap(state: str, cid: str, files: list[str], nbytes: int = 0, ts: str = TS, **extra) -> dict:
    body = {"state": state, "id": cid, "dir": "/var/run/palisade/pcap", "files": files, "bytes": nbytes,
            "sha256": {f: "ab" * 32 for f in files}, "budget_bytes": 500 << 20, **extra}
    return {"timestamp": ts, "event_type": "pcap", "pcap": body}


def test_capture_files_are_listed_as_cardholder_data(tmp_path):
    evs = [
        _pcap("started", "c1", ["c1.pcap"]), _pcap("finished", "c1", ["c1.pcap"], 1000),
        _pcap("started", "c2", ["c2.pcap"]), _pcap("finished", "c2", ["c2.pcap"], 2500,
                                                   ts="2026-11-28T11:00:00+00:00"),
        _pcap("failed", "c3", [], error="disk budget exhausted"),
        _pcap("removed", "c1", ["c1.pcap"], 1000, reason="disk budget"),
    ]
    path = _write(tmp_path, evs)
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    cap = rep["evidence"]["capture_files"]
    assert cap["cardholder_data"] is True and cap["count"] == 1 and cap["bytes"] == 2500
    assert [f["file"] for f in cap["files"]] == ["/var/run/palisade/pcap/c2.pcap"]
    assert cap["retention"]["disk_budget_bytes"] == 500 << 20 and cap["removed_by_budget"] == 1
    assert cap["captures_failed"] == 1 and cap["captures_started"] == 2
    assert any(f["requirement"] == "3.2.1" and f["severity"] == "high" and "1 packet capture file" in f["message"]
               for f in rep["findings"])
    write_report(rep, str(tmp_path / "out"), pdf=False)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "cardholder-data artefacts" in html and "c2.pcap" in html
    # the removal in another chunk than the finish: same answer
    split = aggregate_files([path], jobs=2, chunk_bytes=300)
    assert {k for k in split.pcap.files if k not in split.pcap.removed} == {"/var/run/palisade/pcap/c2.pcap"}


def test_no_captures_no_capture_finding(tmp_path):
    path = _write(tmp_path, [_in("198.51.100.1")])
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    assert rep["evidence"]["capture_files"]["count"] == 0
    assert not [f for f in rep["findings"] if f["requirement"] == "3.2.1"]


def test_cde_pods_in_learn_or_monitor_are_listed_with_duration(tmp_path):
    other = dict(CDE, pod="payment-api-5d8-x2")
    evs = [_in("10.0.1.5", ts="2026-11-28T10:00:00+00:00", mode="learn", verdict="allow"),
           _in("10.0.1.5", ts="2026-11-28T12:00:00+00:00", mode="learn", verdict="allow"),
           _in("10.0.1.6", ts="2026-11-28T13:00:00+00:00", mode="protect"),
           dict(_in("10.0.1.7", ts="2026-11-28T14:00:00+00:00", mode="monitor"), dest_workload=other),
           dict(_in("10.0.1.7", ts="2026-11-28T14:30:00+00:00", mode="monitor"), dest_workload=other)]
    path = _write(tmp_path, evs)
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    pods = {(p["pod"], p["mode"]): p for p in rep["evidence"]["unenforced_cde_pods"]}
    assert set(pods) == {("payment-api-5d8-x1", "learn"), ("payment-api-5d8-x2", "monitor")}
    assert pods[("payment-api-5d8-x1", "learn")]["seconds"] == 7200 and pods[("payment-api-5d8-x1", "learn")][
        "flows"] == 2
    assert pods[("payment-api-5d8-x2", "monitor")]["seconds"] == 1800
    msgs = [f["message"] for f in rep["findings"] if f["requirement"] == "1.3.1"]
    assert any("payments/payment-api-5d8-x1 ran in learn mode" in m for m in msgs)


def test_dropped_events_are_reported(tmp_path):
    drop = {"timestamp": TS, "event_type": "alert", "alert": {"action": "allowed", "signature": "events dropped",
                                                               "signature_id": 0, "category": "evidence",
                                                               "severity": 1},
            "events_dropped": {"since_last": 7, "total": {"no_space": 7}}}
    drop2 = dict(drop, events_dropped={"since_last": 3, "total": {"no_space": 9, "write_error": 1}})
    path = _write(tmp_path, [_in("198.51.100.1"), drop, drop2])
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    d = rep["evidence"]["events_dropped"]
    assert d["events"] == 10 and d["alerts"] == 2 and d["reasons"] == ["no_space", "write_error"]
    assert any(f["requirement"] == "10.2.1" and "10 events were dropped" in f["message"] for f in rep["findings"])
    write_report(rep, str(tmp_path / "out"), pdf=False)
    assert "Dropped events: <b>10</b>" in (tmp_path / "out" / "report.html").read_text()
    # none dropped: the report says 0, not nothing
    path = _write(tmp_path, [_in("198.51.100.1")], "clean.jsonl")
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    assert rep["evidence"]["events_dropped"]["events"] == 0


def test_state_survives_pickling_for_workers():
    import pickle

    s = EventStats()
    s.feed_event(_pcap("finished", "c1", ["c1.pcap"], 10))
    t = pickle.loads(pickle.dumps(s))
    assert t.pcap.files and t.world_units == s.world_units


def test_kernel_enforced_non_tcp_denials_reach_the_denied_tables(tmp_path):
    """Issue 16: UDP/ICMP/numbered-protocol attempts the nftables rules dropped (flow records from
    the NFLOG reader, ``enforcement: kernel``) are denied attempts like TCP ones, per protocol."""
    def kernel(ip: str, proto: str, port: int | None) -> dict:
        e = _in(ip)
        e.update({"proto": proto, "app_proto": "unknown", "enforcement": "kernel"})
        if port is None:
            e.pop("dest_port")
        else:
            e["dest_port"] = port
        return e

    evs = [kernel("10.9.0.7", "UDP", 5300), kernel("10.9.0.7", "UDP", 5300), kernel("10.9.0.8", "ICMP", None),
           kernel("10.9.0.9", "253", None), _in("10.9.0.10")]
    path = _write(tmp_path, evs)
    rep = build_report([str(tmp_path / "policy.yaml")], [path], jobs=1)
    by_proto: dict[str, int] = {}
    for d in rep["denied_into_cde"]:
        by_proto[d["proto"]] = by_proto.get(d["proto"], 0) + d["count"]
    assert by_proto == {"UDP": 2, "ICMP": 1, "253": 1, "TCP": 1}, rep["denied_into_cde"]
    udp = [d for d in rep["denied_into_cde"] if d["proto"] == "UDP"]
    assert udp[0]["port"] == 5300
