"""Least privilege: what the sidecar keeps after start-up with every feature on, what the
webhook's manifests ask for, and that no output holds a full card number."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.harness import REPO, Cluster

from .conftest import PAN, Env, assert_no_pan, http_request, sidecar_outputs

NET_ADMIN, NET_RAW = 12, 13


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def test_webhook_manifest_runs_non_root_without_capabilities():
    deployments = [d for d in _docs(REPO / "deploy" / "palisade.yaml") if d.get("kind") == "Deployment"]
    assert deployments, "deploy/palisade.yaml has no Deployment"
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, c["name"]
            assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], c["name"]
            assert not (sc.get("capabilities") or {}).get("add"), c["name"]
            assert sc.get("privileged") in (None, False)


@pytest.mark.netns
def test_full_featured_sidecar_keeps_only_its_two_capabilities_and_leaks_no_pan():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pr", 225)
    try:
        env = Env(c)
        rec = env.recorder(env.analytics, 9100)
        pcap = env.tmp / "pcap"
        pcap.mkdir(mode=0o777)
        os.chmod(pcap, 0o777)
        sc = env.sidecar("--pcap-dir", str(pcap), "--l7-events", "-v")
        with open(f"/proc/{sc.pid()}/status") as fh:
            status = fh.read()
        uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
        gid = re.search(r"^Gid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
        assert set(uid) == {"1337"} and set(gid) == {"1337"}, (uid, gid)
        groups = re.search(r"^Groups:[ \t]*(.*)$", status, re.M).group(1).split()
        assert set(groups) <= {"1337"}, groups
        caps = {k: int(re.search(rf"^{k}:\s+([0-9a-f]+)", status, re.M).group(1), 16)
                for k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")}
        assert caps["CapEff"] == caps["CapPrm"] == (1 << NET_ADMIN) | (1 << NET_RAW), caps
        assert re.search(r"^NoNewPrivs:\s+1", status, re.M)
        # every thread too (the capture, podinfo and reload threads)
        for task in os.listdir(f"/proc/{sc.pid()}/task"):
            with open(f"/proc/{sc.pid()}/task/{task}/status") as fh:
                assert re.search(r"^Uid:\s+1337\s", fh.read(), re.M), task
        # traffic with card numbers in many shapes, blocked and alerted; L7 events on
        for body in (json.dumps({"card": PAN}), f"card={PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}",
                     "amex 378282246310005", "mc 5555-5555-5555-4444"):
            res = env.client(env.payments, env.analytics.ip, 9100,
                             [{"send": http_request("POST", f"/c?note={PAN[:6]}", body.encode())}])
            assert res["response"].startswith("HTTP/1.1 403"), res
        sc.wait_flows(4, dest_port=9100)
        sc.stop()
        checked = assert_no_pan(sidecar_outputs(env.tmp))
        assert len(checked) >= 2, checked
        assert PAN not in (rec / "raw.bin").read_text(errors="replace") if (rec / "raw.bin").exists() else True
    finally:
        c.close()


@pytest.mark.netns
def test_sidecar_has_no_inheritable_or_ambient_capabilities():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pr", 226)
    try:
        sc = c.pod("solo").start_sidecar("--no-l7", "--no-dlp")
        with open(f"/proc/{sc.pid()}/status") as fh:
            status = fh.read()
        amb = int(re.search(r"^CapAmb:\s+([0-9a-f]+)", status, re.M).group(1), 16)
        inh = int(re.search(r"^CapInh:\s+([0-9a-f]+)", status, re.M).group(1), 16)
        assert amb == 0 and inh == 0, (hex(amb), hex(inh))
    finally:
        c.close()
