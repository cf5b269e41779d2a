"""The auditor report from a known scenario: facts in report.json, masking, rendering."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zlib
from datetime import date
from pathlib import Path

import pytest

from firewall.audit.report import build_report, chromium_args, find_chromium, write_report
from firewall.audit.report_data import EventStats, aggregate_files, mask_pans
from firewall.audit.report_svg import render_diagram
from firewall.dlp.validators import luhn
from tests.report import scenario as sc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return sc.write_inputs(tmp_path_factory.mktemp("report-in"))


@pytest.fixture(scope="module")
def rep(inputs) -> dict:
    return build_report([str(inputs["policy"])], [str(inputs["events"])], str(inputs["identity"]),
                        as_of=date(2027, 6, 1), jobs=1)


def _rule(rep: dict, name: str) -> dict:
    (r,) = [r for r in rep["rules"] if r["name"] == name]
    return r


def test_scope_inventory(rep):
    wl = {w["id"]: w for w in rep["inventory"]["workloads"]}
    by_scope = {s: sorted(i for i, w in wl.items() if w["scope"] == s) for s in ("cde", "connected", "out-of-scope")}
    # payments-db is only an IP in the events and vault only in the identity file: both are in the CDE inventory
    assert by_scope == {"cde": ["payments/payment-api", "payments/payments-db", "payments/vault"],
                        "connected": ["shop/checkout"], "out-of-scope": ["marketing/blog"]}
    assert rep["inventory"]["scopes"]["cde"] == {"workloads": 3, "pods": 3, "namespaces": ["payments"]}
    assert wl["payments/vault"]["source"] == ["identity"]
    assert rep["inventory"]["external_addresses"] == 1  # the card network
    assert [n["name"] for n in rep["inventory"]["namespaces"]] == ["marketing", "payments", "shop"]


def test_rule_hits_and_never_hit(rep):
    r = _rule(rep, "checkout-to-payments")
    assert (r["allowed"], r["denied"], r["hits"], r["never_hit"]) == (5, 0, 5, False)
    assert r["touches_cde"] and r["description"].startswith("Checkout submits charges")
    assert r["last_hit"] == "2026-11-24T09:00:00Z"
    assert _rule(rep, "payments-to-db")["allowed"] == 3  # event named it "payment-api/payments-to-db"
    assert _rule(rep, "card-network")["allowed"] == 1
    assert _rule(rep, "no-clear-pan-out-of-cde")["dlp_findings"] == 1
    ssh = _rule(rep, "no-ssh-into-containers")
    assert ssh["never_hit"] and ssh["touches_cde"] and "never hit in the event window" in ssh["review_flags"]
    assert [r["name"] for r in rep["rules"] if r["never_hit"]] == ["no-ssh-into-containers"]
    assert all(r["touches_cde"] for r in rep["rules"])  # every rule of a CDE policy, plus the cluster baseline
    unmatched = {u["rule"]: u for u in rep["unmatched_rules_in_events"]}
    assert unmatched["default-deny"]["count"] == 4  # denied flows; their alerts apart
    assert unmatched["default-deny"]["alerts"] == 1
    assert unmatched["default-deny"]["builtin"] and "no rule matched" in unmatched["default-deny"]["meaning"]
    assert [u["builtin"] for r, u in unmatched.items() if r != "default-deny"] == [False]


def test_denied_into_cde(rep):
    d = {(x["src"], x["port"], x["rule"]): x for x in rep["denied_into_cde"]}
    blog = d[("marketing/blog", 9000, "default-deny")]
    assert (blog["count"], blog["first"], blog["last"]) == (3, "2026-11-24T03:00:00Z", "2026-11-25T03:00:00Z")
    assert blog["src_scope"] == "out-of-scope" and blog["enforced"] and blog["src_samples"] == [sc.BLOG["pod"]]
    assert d[("marketing/blog", 22, "default-deny")]["count"] == 1
    assert sum(x["count"] for x in rep["denied_into_cde"]) == 5
    assert rep["denied_out_of_cde"] == []


def test_review_dates(inputs, rep):
    pol = {p["name"]: p for p in rep["policies"]}
    assert pol["payment-api"]["last_reviewed"] == "2026-11-01"
    assert pol["payment-api"]["review_due"] == "2027-05-01"
    assert pol["payment-api"]["review_status"] == "overdue" and pol["payment-api"]["review_flagged"]
    assert pol["baseline"]["review_status"] == "missing"
    assert rep["review"]["flagged"] and rep["review"]["oldest_last_reviewed"] == "2026-11-01"
    assert any(f["requirement"] == "1.2.7" and "payment-api" in f["message"] for f in rep["findings"])
    fresh = build_report([str(inputs["policy"])], [str(inputs["events"])], as_of=date(2026, 12, 1), jobs=1)
    assert {p["name"]: p["review_status"] for p in fresh["policies"]} == {"payment-api": "current",
                                                                          "baseline": "missing"}


def test_time_range_hashes_and_counts(inputs, rep):
    tr = rep["time_range"]
    assert (tr["start"], tr["end"]) == ("2026-11-20T08:00:00Z", "2026-11-26T18:30:00Z")
    assert tr["bad_lines"] == 2 and tr["by_type"]["pcap"] == 1 and tr["lines"] == len(sc.events())
    assert rep["inputs"]["policies"][0]["sha256"] == hashlib.sha256(inputs["policy"].read_bytes()).hexdigest()
    assert rep["inputs"]["identity"]["entries"] == 2


def test_dlp_masked_and_encryption(rep):
    (f,) = rep["dlp_findings"]
    assert f["samples"] == [sc.MASKED_PAN]
    assert (f["rule"], f["direction"], f["action"], f["src"], f["dst"]) == (
        "no-clear-pan-out-of-cde", "toserver", "blocked", "payments/payment-api", "marketing/blog")
    assert rep["dlp_summary"]["by_rule_and_direction"] == {"no-clear-pan-out-of-cde": {"toserver": 1}}
    enc = rep["encryption"]
    assert (enc["into_cde"]["flows"], enc["into_cde"]["encrypted_flows"]) == (5, 0)
    # out of the CDE: 1 TLS flow to the card network; the db is in the CDE, so those 3 are "within"
    assert (enc["out_of_cde"]["flows"], enc["out_of_cde"]["encrypted_share_flows"]) == (1, 1.0)
    assert enc["within_cde"]["flows"] == 3


def test_parallel_fold_equals_serial(inputs, tmp_path):
    big = tmp_path / "big.jsonl"
    data = inputs["events"].read_bytes()
    big.write_bytes(data * 40)
    ident = {}
    one = aggregate_files([str(big)], ident, jobs=1)
    many = aggregate_files([str(big)], ident, jobs=2, chunk_bytes=777)  # cuts lines mid-way
    assert one.lines == many.lines == 40 * len(sc.events())
    assert one.edges.keys() == many.edges.keys()
    for k, v in one.edges.items():
        assert v[:7] == many.edges[k][:7]
    assert one.dlp.keys() == many.dlp.keys() and one.by_type == many.by_type
    assert (one.first, one.last) == (many.first, many.last)


def test_events_missing_fields_do_not_break():
    st = EventStats()
    for ev in [{}, {"event_type": "flow", "src_workload": "x", "dest_workload": None, "flow": 5, "dest_port": "x"},
               {"event_type": "alert", "alert": None, "dlp": "nope"}, {"event_type": "flow", "timestamp": "garbage"},
               {"event_type": 7}, {"event_type": "alert", "alert": {"category": "dlp"}, "dlp": {"masked": None}}]:
        st.feed_event(ev)
    assert st.lines == 6 and sum(st.by_type.values()) == 6 and st.first is None


def test_mask_pans():
    assert luhn(sc.FULL_PAN.encode()) and not luhn(b"4111111111111112")
    assert mask_pans(f"x {sc.FULL_PAN} y") == f"x {sc.MASKED_PAN} y"
    assert mask_pans("5555-5555-5555-4444") == "555555******4444"
    assert mask_pans("4111111111111112") == "4111111111111112"  # not Luhn: not a PAN
    assert mask_pans("6011000990139424000") != "6011000990139424000" or not luhn(b"6011000990139424000")
    assert mask_pans("2026-11-20T08:00:00Z 10.0.2.7") == "2026-11-20T08:00:00Z 10.0.2.7"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "firewall", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=180)


@pytest.fixture(scope="module")
def outdir(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-out")
    seg = out.parent / "seg.json"
    seg.write_text(json.dumps({"plan_sha256": "ab" * 32, "started": "2026-11-27T10:00:00.0+0000",
                               "finished": "2026-11-27T10:00:05.0+0000", "passed": True, "sources": ["marketing"],
                               "probes": [{"source": "marketing", "source_scope": "out-of-scope",
                                           "target": "payment-api", "target_scope": "cde", "address": sc.PAY_IP,
                                           "port": 9000, "proto": "TCP", "result": "refused", "rtt_ms": 0.4,
                                           "timestamp": "2026-11-27T10:00:01.0+0000", "violation": False}]}))
    r = _run_cli("report", "--policy", str(inputs["policy"]), "--events", str(inputs["events"]),
                 "--identity", str(inputs["identity"]), "--segtest", str(seg), "-o", str(out),
                 "--as-of", "2027-06-01", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    assert f"open {out}/report.html" in r.stdout
    return out


def test_cli_writes_pack_without_full_pans(outdir):
    names = sorted(p.name for p in outdir.iterdir())
    assert "report.html" in names and "report.json" in names
    if find_chromium():
        assert "report.pdf" in names and (outdir / "report.pdf").read_bytes()[:5] == b"%PDF-"
    pan_re = re.compile("|".join(re.escape(p) for p in (sc.FULL_PAN, sc.FULL_PAN_2)))
    spaced = re.compile(r"5555[ -]?5555[ -]?5555[ -]?4444|4111[ -]?1111[ -]?1111[ -]?1111")
    for p in outdir.rglob("*"):
        data = p.read_bytes().decode("latin-1")
        assert not pan_re.search(data) and not spaced.search(data), f"full PAN in {p.name}"
    rep = json.loads((outdir / "report.json").read_text())
    assert rep["schema"] == "palisade.dev/report/v1"
    assert rep["segtest"]["passed"] and rep["segtest"]["next_due"] == "2027-11-27"
    assert "555555******4444" in json.dumps(rep["unmatched_rules_in_events"])


def test_html_is_self_contained(outdir):
    html = (outdir / "report.html").read_text()
    assert "<svg" in html and "payment-api" in html and "checkout-to-payments" in html
    assert "<script" not in html.lower() and "<!DOCTYPE svg" not in html
    assert not re.search(r"""(?:src|href|xlink:href)\s*=\s*["']?(?:https?:|//|file:)""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(?:https?:|//)", html, re.I) and "@import" not in html
    assert sc.MASKED_PAN in html


def test_diagram_both_engines_are_valid_svg(rep):
    for use_dot in (True, False):
        svg, engine, _ = render_diagram(rep, use_dot=use_dot)
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg")
        text = "".join(root.itertext())
        assert "payment-api" in text and "checkout" in text and "DENIED" in text
        if not use_dot:
            assert engine == "builtin"
        elif shutil.which("dot"):
            assert engine == "graphviz"


def _png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the image data): enough to tell a blank page from a render."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (Debian package chromium)")
def test_html_renders_in_headless_chromium(outdir, tmp_path):
    png = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as prof:
        cmd = chromium_args(find_chromium(), prof) + ["--window-size=1280,3000", f"--screenshot={png}",
                                                      "--enable-logging=stderr", "--v=0",
                                                      (outdir / "report.html").as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "Refused to" not in r.stderr  # no script errors, no CSP violations
    w, h, distinct = _png_facts(png.read_bytes())
    assert (w, h) == (1280, 3000) and distinct > 50


def test_cli_bad_inputs_one_line_errors(inputs, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: FirewallPolicy\nspec: [unclosed\n")
    cases = [
        (["--policy", str(bad)], "bad.yaml:"),
        (["--policy", str(inputs["policy"]), "--events", str(tmp_path / "missing.jsonl")], "events file not found"),
        (["--policy", str(inputs["policy"]), "--as-of", "yesterday"], "not a date"),
        (["--policy", str(inputs["policy"]), "--identity", str(inputs["events"])], "identity"),
        (["--policy", str(inputs["policy"]), "--segtest", str(inputs["policy"])], "segtest"),
    ]
    for args, needle in cases:
        r = _run_cli("report", *args, "-o", str(tmp_path / "o"), "--no-pdf")
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_output_dir_unwritable_exits_1(inputs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _run_cli("report", "--policy", str(inputs["policy"]), "-o", str(blocker / "sub"), "--no-pdf")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_report_without_events(inputs, tmp_path):
    rep = build_report([str(inputs["policy"])], [], as_of=date(2026, 12, 1))
    written, notes = write_report(rep, str(tmp_path / "o"), pdf=False)
    assert len(written) == 2 and notes == ["no PDF: disabled with --no-pdf"]
    assert rep["time_range"]["start"] is None and all(r["never_hit"] for r in rep["rules"])
    assert any(f["requirement"] == "1.2.4" for f in rep["findings"])  # empty CDE inventory is flagged
    assert os.path.getsize(written[1]) > 1000


def test_fuzzed_events_never_raise(inputs, tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=8))
    value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                       max_size=3), max_leaves=6)
    keys = st.sampled_from(["timestamp", "src_workload", "dest_workload", "src_ip", "dest_ip", "dest_port",
                            "rule", "verdict", "mode", "flow", "alert", "dlp", "direction", "encrypted", "proto"])
    event = st.fixed_dictionaries({"event_type": st.sampled_from(["flow", "alert", "dns", 3])},
                                  optional={"x": value}).flatmap(
        lambda base: st.dictionaries(keys, value, max_size=8).map(lambda extra: {**extra, **base}))

    seen: list[dict] = []

    @settings(max_examples=120, deadline=None)
    @given(st.lists(event, max_size=5))
    def fold(evs):
        seen.extend(evs)
        stats = EventStats()
        for ev in evs:
            stats.feed_event(ev)
        assert stats.lines == len(evs)
        assert sum(stats.by_type.values()) == len(evs)

    fold()
    # and the whole pipeline (attribution, rendering) copes with what the fold kept
    eve = tmp_path / "fuzz.jsonl"
    eve.write_text("".join(json.dumps(e) + "\n" for e in seen))
    rep = build_report([str(inputs["policy"])], [str(eve)], as_of=date(2026, 12, 1), jobs=1)
    written, _ = write_report(rep, str(tmp_path / "o"), pdf=False)
    assert rep["time_range"]["events"] == len(seen) and len(written) == 2


def test_outside_addresses_fold_unless_next_to_the_cde():
    st = EventStats()
    for i in range(50):
        for src in (sc.BLOG, sc.PAY):
            st.feed_event({"event_type": "flow", "direction": "outbound", "dest_port": 443, "verdict": "allow",
                           "src_workload": src, "dest_workload": {"world": True, "ip": f"203.0.113.{i}"}})
    dsts = {k[1] for k in st.edges if k[0] == "marketing/blog"}
    assert dsts == {"world:*"}  # blog's 50 outside peers are one peer
    assert len({k[1] for k in st.edges if k[0] == "payments/payment-api"}) == 50  # the CDE's are kept apart


def test_rotated_gzip_events(inputs, tmp_path):
    import gzip

    gz = tmp_path / "eve.jsonl.gz"
    gz.write_bytes(gzip.compress(inputs["events"].read_bytes()))
    plain = aggregate_files([str(inputs["events"])], jobs=1)
    both = aggregate_files([str(inputs["events"]), str(gz)], jobs=2)
    assert both.lines == 2 * plain.lines
    assert {k: v[0] * 2 for k, v in plain.edges.items()} == {k: v[0] for k, v in both.edges.items()}
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"event_type": "flow"}\n' * 100)[:40])
    r = _run_cli("report", "--policy", str(inputs["policy"]), "--events", str(bad), "-o", str(tmp_path / "o"),
                 "--no-pdf")
    assert r.returncode == 2 and "cannot read compressed events" in r.stderr and "Traceback" not in r.stderr
