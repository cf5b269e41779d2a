"""CaptureManager decisions that need no packets (no root): bad values, state, rate-limit input."""

from __future__ import annotations

import json
import os
import stat
import tempfile

from firewall import ANN_PCAP
from firewall.capture.manager import CaptureManager
from firewall.capture.triggers import STATE_FILE


def test_bad_annotation_emits_one_failed_event_and_no_capture(tmp_path, events):
    mgr = CaptureManager(str(tmp_path), events)
    mgr.on_annotations({ANN_PCAP: "duration=forever,filter=tcp"})
    failed = events.pcap("failed")
    assert len(failed) == 1
    assert failed[0]["error"].startswith(f"{ANN_PCAP}: duration: 'forever' is not a duration")
    assert failed[0]["trigger"] == {"annotation": "duration=forever,filter=tcp"}
    assert failed[0]["files"] == [] and failed[0]["packets"] == 0
    assert mgr.active() == []
    assert [n for n in os.listdir(tmp_path) if n.endswith(".pcap")] == []

    # the same value again (reload, other annotation changed, restart): no second event
    mgr.on_annotations({ANN_PCAP: "duration=forever,filter=tcp", "other": "x"})
    CaptureManager(str(tmp_path), events).on_annotations({ANN_PCAP: "duration=forever,filter=tcp"})
    assert len(events.pcap("failed")) == 1

    mgr.on_annotations({ANN_PCAP: "filter=tcp prt 80"})
    assert "filter 'tcp prt 80'" in events.pcap("failed")[1]["error"]


def test_state_file_is_private_and_survives_corruption(tmp_path, events):
    mgr = CaptureManager(str(tmp_path), events)
    mgr.on_annotations({ANN_PCAP: "bogus"})
    path = tmp_path / STATE_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "bogus" not in path.read_text(), "only the value's hash is stored"
    assert len(json.loads(path.read_text())["annotation_sha256"]) == 64

    path.write_text("{not json")
    CaptureManager(str(tmp_path), events).on_annotations({ANN_PCAP: "bogus"})
    assert len(events.pcap("failed")) == 2, "a corrupt state file means a fresh start, not a crash"


def test_removed_annotation_makes_the_same_value_new_again(tmp_path, events):
    mgr = CaptureManager(str(tmp_path), events)
    mgr.on_annotations({ANN_PCAP: "bad=1"})
    mgr.on_annotations({})
    mgr.on_annotations({ANN_PCAP: "bad=1"})
    assert len(events.pcap("failed")) == 2
    mgr.on_annotations({ANN_PCAP: ""})
    assert len(events.pcap("failed")) == 2, "an empty value is no request"


def test_auto_capture_rejects_bad_peer_without_raising(tmp_path, events):
    mgr = CaptureManager(str(tmp_path), events)
    assert mgr.auto_capture("10.0.0.999", {"rule": "r"}) is False
    assert mgr.auto_capture("", {"rule": "r"}) is False
    assert events.items == []


def test_pcap_dir_is_created_private(tmp_path, events):
    d = tmp_path / "a" / "pcap"
    CaptureManager(str(d), events)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_auto_trigger_shapes():
    from firewall.capture.triggers import auto_trigger

    # what the session passes today: the flow's fields at top level
    t = auto_trigger("10.0.0.2", {"rule": "default-deny", "flow_id": 7, "src_ip": "10.0.0.1",
                                   "dest_ip": "10.0.0.2", "dest_port": 5432})
    assert t == {"rule": "default-deny", "peer": "10.0.0.2",
                 "flow": {"flow_id": 7, "src_ip": "10.0.0.1", "dest_ip": "10.0.0.2", "dest_port": 5432}}
    t = auto_trigger("10.0.0.2", {"rule": "r", "category": "dlp", "flow": {"flow_id": 1}})
    assert t == {"rule": "r", "peer": "10.0.0.2", "flow": {"flow_id": 1}, "category": "dlp"}


def test_unwritable_pcap_dir_is_a_clear_error(events):
    """As the unprivileged proxy user would see it (a forked child drops to nobody when root)."""
    d = tempfile.mkdtemp(prefix="pc-ro-")
    try:
        os.chmod(d, 0o555)

        def attempt() -> int:
            try:
                CaptureManager(d, events)
            except PermissionError as exc:
                return 0 if "not writable by uid" in str(exc) else 2
            return 1

        if os.geteuid() != 0:
            assert attempt() == 0
            return
        pid = os.fork()
        if pid == 0:  # child: no pytest machinery, just the answer as exit code
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                code = attempt()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.chmod(d, 0o700)
        os.rmdir(d)

