"""benchmarks/bench_text_path.py: the in-process text-path driver stays in step with the proxy.

The driver feeds run.py's bulk exchange through FlowSession + Session and refuses a run that
forwarded a byte more or less than it was given, or whose flow went passthrough; these runs
check that it still completes, byte-exact, with the DLP scan really applied (alerts raised) and a
stage breakdown that adds up to the measured total."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("palisade_bench_text_path", REPO / "benchmarks" / "bench_text_path.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load()


def test_content_length_run_is_byte_exact_and_inspected(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert bench.main(["--mib", "1", "--runs", "1", "--profile", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["alerts"] > 0  # the sprinkled PII was found: the flow was scanned, not spliced
    stages = dict(r["stages_s_per_GB"])
    assert stages["DLP scan"] > 0
    total = sum(stages.values())
    assert abs(total - r["s_per_GB_median"]) <= 0.05 * r["s_per_GB_median"] + 0.01


def test_chunked_download_is_byte_exact(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert bench.main(["--mib", "1", "--runs", "1", "--chunked", "700", "--no-sink", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["alerts"] > 0


def test_chunk_body_framing_round_trips() -> None:
    from firewall.protocols.httpdecode import BodyDecoder

    body = bytes(range(256)) * 40
    framed = bench.chunk_body(body, 333)
    dec = BodyDecoder(chunked=True, encoding=None, form=False, length=None)
    out, _used = dec.feed(framed)
    assert out == body and dec.done and framed.endswith(b"\r\n0\r\n\r\n")
