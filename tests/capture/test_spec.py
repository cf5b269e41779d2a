"""Capture option strings, filter compilation and the `capture` CLI's offline commands."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from firewall.capture.bpf import compile_filter, exclude_ifindex
from firewall.capture.spec import (
    DEFAULT_MAX_BYTES,
    CaptureSpec,
    CaptureSpecError,
    parse_duration,
    parse_size,
    parse_spec,
)
from firewall.cli import main

MiB = 1024 * 1024


def test_defaults():
    spec = parse_spec("")
    assert spec == CaptureSpec()
    assert (spec.duration_s, spec.max_bytes, spec.snaplen, spec.iface) == (60.0, DEFAULT_MAX_BYTES, 65535, None)
    assert spec.max_bytes == 50 * MiB


def test_annotation_example_from_the_issue():
    spec = parse_spec("duration=60s,filter=tcp port 5432")
    assert spec.duration_s == 60 and spec.filter == "tcp port 5432" and spec.max_bytes == 50 * MiB


def test_all_keys():
    spec = parse_spec(" duration = 5m , filter = host 10.0.0.1 and (tcp port 80 or udp) , max-bytes=10MiB,"
                      "max-packets=1000,snaplen=128,rotate=1MiB,iface=eth0")
    assert spec == CaptureSpec(duration_s=300, filter="host 10.0.0.1 and (tcp port 80 or udp)",
                               max_bytes=10 * MiB, max_packets=1000, snaplen=128, rotate_bytes=MiB,
                               iface="eth0")


def test_comma_inside_filter_is_kept():
    # a comma not followed by key= belongs to the filter (libpcap accepts this expression)
    spec = parse_spec("filter=tcp[13] & 2 != 0,duration=5s")
    assert spec.filter == "tcp[13] & 2 != 0" and spec.duration_s == 5
    assert parse_spec("filter=ether[0:4]=0xffffffff").filter == "ether[0:4]=0xffffffff"


@pytest.mark.parametrize("text, seconds", [
    ("60", 60), ("60s", 60), ("500ms", 0.5), ("5m", 300), ("1h", 3600), ("1.5s", 1.5), ("2M", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [
    ("1024", 1024), ("64KiB", 64 * 1024), ("10MiB", 10 * MiB), ("1GiB", 1024 * MiB), ("10MB", 10_000_000),
    ("10M", 10 * MiB), ("512k", 512 * 1024), ("100b", 100), ("1.5MiB", int(1.5 * MiB))])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("value, message", [
    ("duration=2h", "at most 1h"),
    ("duration=0s", "must be > 0"),
    ("duration=soon", "is not a duration"),
    ("max-bytes=lots", "max-bytes: 'lots' is not a size"),
    ("max-bytes=100", "between 1KiB and 10GiB"),
    ("max-bytes=11GiB", "between 1KiB and 10GiB"),
    ("max-packets=0", "max-packets: must be a positive integer"),
    ("max-packets=-5", "max-packets"),
    ("snaplen=0", "snaplen"),
    ("snaplen=300000", "snaplen"),
    ("rotate=100", "rotate: must be at least 1KiB"),
    ("rotate=1KiB,max-bytes=10GiB", "more than 1000 files"),
    ("iface=eth0/../x", "iface"),
    ("iface=averyveryverylongname", "iface"),
    ("colour=blue", "unknown key 'colour'"),
    ("duration=5s,duration=6s", "duration given twice"),
    ("60s", "expected key=value"),
    ("filter=tcp prot 80", "filter 'tcp prot 80'"),
    ("filter=host 999.1.1.1", "filter"),
])
def test_bad_specs_have_clear_errors(value, message):
    with pytest.raises(CaptureSpecError) as exc:
        parse_spec(value)
    assert message in str(exc.value)


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump (Debian) not installed")
@pytest.mark.parametrize("expr", ["tcp port 5432", "host 10.77.0.2 and not udp", "icmp or arp", ""])
def test_compiled_filter_matches_tcpdump(expr):
    out = subprocess.run(["tcpdump", "-y", "EN10MB", "-s", "65535", "-dd", expr], capture_output=True,
                         text=True, check=True).stdout
    theirs = [tuple(int(x.strip(), 0) for x in line.strip().strip("{},").split(","))
              for line in out.splitlines() if line.strip()]
    assert compile_filter(expr, 65535) == theirs


@pytest.mark.parametrize("expr", ["host fd00:4d::2", "host 10.77.0.2", "ip6 and tcp port 443"])
def test_auto_capture_filters_compile_for_both_families(expr):
    assert len(compile_filter(expr)) > 2


def test_snaplen_is_the_filters_return_value():
    prog = compile_filter("tcp", 96)
    assert prog[-2] == (0x06, 0, 0, 96) and prog[-1] == (0x06, 0, 0, 0)


def test_exclude_ifindex_prefix_keeps_program_intact():
    prog = compile_filter("udp", 1000)
    out = exclude_ifindex(prog, 1)
    assert out[3:] == prog
    assert out[:3] == [(0x20, 0, 0, 0xFFFFF008), (0x15, 0, 1, 1), (0x06, 0, 0, 0)]


# --------------------------------------------------------------------------- CLI (offline commands)


def test_cli_parse_spec_prints_json(capsys):
    assert main(["capture", "parse-spec", "duration=10s,filter=tcp port 5432,max-packets=3"]) == 0
    out = capsys.readouterr().out
    assert '"duration": 10.0' in out and '"max-packets": 3' in out and '"filter": "tcp port 5432"' in out


def test_cli_parse_spec_bad_value_is_one_line_exit_2(capsys):
    assert main(["capture", "parse-spec", "duration=forever"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: duration:") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_compile_filter(capsys):
    assert main(["capture", "compile-filter", "arp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "{ 0x28, 0, 0, 0x0000000c }," and len(lines) == 4
    assert main(["capture", "compile-filter", "tcp port"]) == 2
    assert capsys.readouterr().err.startswith("error: filter 'tcp port':")


def test_cli_run_bad_spec_exit_2(capsys, tmp_path):
    assert main(["capture", "run", "--spec", "snaplen=-1", "--pcap-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: snaplen")
    assert main(["capture", "run", "--spec", "duration=1s", "--netns", "pc-does-not-exist",
                 "--pcap-dir", str(tmp_path)]) == 2
    assert "network namespace 'pc-does-not-exist' not found" in capsys.readouterr().err
