"""``python -m firewall dlp`` end to end in a subprocess: exit codes, output shape,
chunk-size invariance, and no full value on stdout or stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.dlp.conftest import REPO
from tests.dlp.test_engine import FULL_VALUES, SAMPLE


def run(*args: str, stdin: bytes | None = None, cache: str | None = None) -> subprocess.CompletedProcess:
    env_args = ["--cache-dir", cache] if cache and args[:1] == ("scan",) else []
    return subprocess.run([sys.executable, "-m", "firewall", "dlp", *args[:1], *env_args, *args[1:]],
                          cwd=REPO, input=stdin, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "payload.txt"
    p.write_bytes(SAMPLE * 3)
    return p


def test_scan_prints_one_json_line_per_finding(sample_file, cache_dir):
    res = run("scan", str(sample_file), cache=cache_dir)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert len(rows) == 21
    assert set(rows[0]) == {"rule", "type", "start", "end", "masked", "confidence"}
    visa = [r for r in rows if r["rule"] == "card.visa"]
    assert visa[0]["masked"] == "411111******1111" and visa[0]["type"] == "credit_card"
    data = sample_file.read_bytes()
    assert data[visa[0]["start"]:visa[0]["end"]] == b"4111111111111111"
    out = res.stdout + res.stderr
    for v in FULL_VALUES:
        assert v not in out


def test_scan_output_is_independent_of_chunk_size(sample_file, cache_dir):
    outputs = {n: run("scan", "--chunk-size", str(n), str(sample_file), cache=cache_dir).stdout
               for n in (1, 7, 4096, 65536)}
    assert len(set(outputs.values())) == 1
    assert outputs[1].count(b"\n") == 21


def test_scan_stdin_enable_and_context(cache_dir):
    res = run("scan", "--enable", "us_pii", "--context", "-", stdin=SAMPLE, cache=cache_dir)
    rows = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert [r["rule"] for r in rows] == ["us.ssn"]
    assert "***-**-****" in rows[0]["context"] and "536" not in rows[0]["context"]


def test_scan_usage_errors(sample_file, cache_dir):
    bad = run("scan", "--chunk-size", "0", str(sample_file), cache=cache_dir)
    assert bad.returncode == 2 and b"--chunk-size" in bad.stderr and b"Traceback" not in bad.stderr
    missing = run("scan", "/nonexistent/file", cache=cache_dir)
    assert missing.returncode == 2 and missing.stderr.startswith(b"/nonexistent/file:")
    unknown = run("scan", "--enable", "nope", str(sample_file), cache=cache_dir)
    assert unknown.returncode == 1 and b"unknown pack 'nope'" in unknown.stderr


def test_validate_ok_and_errors(tmp_path):
    ok = run("validate", str(REPO / "dlp_rules"))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(b"ok: 5 pack(s)")
    (tmp_path / "a.yaml").write_text("pack: a\nrules:\n  - {id: a.x, name: n, type: t, patterns: ['a(']}\n")
    (tmp_path / "b.yaml").write_text("pack: b\nrules: nope\n")
    bad = run("validate", str(tmp_path))
    assert bad.returncode == 1
    lines = bad.stderr.decode().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / "a.yaml") + ": ")
    assert lines[1].startswith(str(tmp_path / "b.yaml") + ": ")
    assert b"Traceback" not in bad.stderr


def test_packs_listing():
    res = run("packs", "--json")
    packs = {p["name"]: p for p in json.loads(res.stdout)}
    assert packs["contact"]["enabled_by_default"] is False
    assert packs["payment_cards"]["enabled_by_default"] is True
    table = run("packs").stdout.decode()
    assert "payment_cards" in table and "default off" in table
