"""Capture files and the capture state file cannot be redirected by a planted symlink, FIFO or
oversized file in the pcap directory, and are private (0600) whatever the umask."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat

import pytest

from firewall import ANN_PCAP
from firewall.capture.manager import CaptureManager
from firewall.capture.pcapfile import PcapWriter
from firewall.capture.triggers import STATE_FILE


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_state_file_symlink_is_not_followed_on_read(tmp_path, events, caplog):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"annotation_sha256": _hash("bad=1")}))
    d = tmp_path / "pcap"
    d.mkdir(mode=0o700)
    (d / STATE_FILE).symlink_to(outside)
    caplog.set_level(logging.WARNING)
    mgr = CaptureManager(str(d), events)
    assert mgr._last_annotation_hash is None  # the planted hash was not read
    assert "symlink" in caplog.text
    mgr.on_annotations({ANN_PCAP: "bad=1"})  # so this value is handled (one failed event)
    assert events.pcap("failed")


def test_state_file_symlink_is_replaced_not_written_through(tmp_path, events):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    d = tmp_path / "pcap"
    d.mkdir(mode=0o700)
    (d / STATE_FILE).symlink_to(victim)
    CaptureManager(str(d), events).on_annotations({ANN_PCAP: "bad=2"})
    assert victim.read_text() == "precious\n"
    st = os.lstat(d / STATE_FILE)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert json.loads((d / STATE_FILE).read_text())["annotation_sha256"] == _hash("bad=2")
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["fifo", "dir", "huge"])
def test_state_file_that_is_not_a_small_regular_file_is_ignored(tmp_path, events, kind):
    d = tmp_path / "pcap"
    d.mkdir(mode=0o700)
    p = d / STATE_FILE
    if kind == "fifo":
        os.mkfifo(p)  # a blocking open would hang the sidecar at start
    elif kind == "dir":
        p.mkdir()
    else:
        p.write_text(json.dumps({"annotation_sha256": _hash("x=1"), "pad": "x" * 100_000}))
    mgr = CaptureManager(str(d), events)
    assert mgr._last_annotation_hash is None


def test_pcap_file_creation_refuses_a_planted_symlink_and_is_private(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "c1.pcap"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        PcapWriter(str(link), 65535)
    assert victim.read_text() == "precious\n"
    dangling = tmp_path / "c2.pcap"
    dangling.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(OSError):
        PcapWriter(str(dangling), 65535)
    assert not (tmp_path / "would-be-created").exists()
    old = os.umask(0)
    try:
        w = PcapWriter(str(tmp_path / "c3.pcap"), 65535)
        w.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c3.pcap").st_mode) == 0o600


def test_pcap_events_mark_cardholder_data_and_budget(tmp_path, events):
    from firewall.capture.spec import parse_spec

    mgr = CaptureManager(str(tmp_path / "pcap"), events, disk_budget_bytes=10 << 20,
                         netns=str(tmp_path / "no-such-netns"))  # fails at once, before any packet
    cap = mgr.start(parse_spec("duration=1s,filter=tcp port 80"), {"manual": "test"})
    assert cap is not None and cap.join(10)
    failed = events.wait("failed")[0]
    assert failed["cardholder_data"] is True and failed["budget_bytes"] == 10 << 20
