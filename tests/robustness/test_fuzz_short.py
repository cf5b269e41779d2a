"""The short, in-suite run of every fuzz harness in fuzz/ (the long run is in fuzz/README.md).

Per harness: the seed corpus and every saved regression input; then random and
seed-mutated inputs from hypothesis (``PALISADE_FUZZ_EXAMPLES``, 60 by default);
then, where atheris is installed, a deterministic coverage-guided libFuzzer run
(``-runs`` fixed, ``-seed=1``) in a subprocess, corpus in a temporary directory.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.common import REPO, have_atheris, regression_inputs, write_seeds
from fuzz.protocol_target import encode

HARNESSES = ["http", "http2", "tls", "ssh", "dns", "redis", "pgsql", "mysql", "identify",
             "dlp", "policy", "podinfo", "admission"]
EXAMPLES = int(os.environ.get("PALISADE_FUZZ_EXAMPLES", "60"))
ATHERIS_RUNS = int(os.environ.get("PALISADE_ATHERIS_RUNS", "250"))

# regression inputs for bugs not fixed yet (file: why); they must keep failing until fixed
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _harness(name: str):
    return importlib.import_module(f"fuzz.fuzz_{name}")


@pytest.mark.parametrize("name", HARNESSES)
def test_seeds_pass(name):
    mod = _harness(name)
    assert mod.SEEDS, f"{name}: no seeds"
    for seed in mod.SEEDS:
        mod.TestOneInput(seed)


REGRESSIONS = [(h, n) for h in HARNESSES for n, _ in regression_inputs(h)]


@pytest.mark.parametrize("name,case", [
    pytest.param(h, n, marks=pytest.mark.xfail(reason=KNOWN_BUGS[(h, n)], strict=True))
    if (h, n) in KNOWN_BUGS else (h, n) for h, n in REGRESSIONS] or [pytest.param("none", "none", marks=pytest.mark.skip)])
def test_regression_inputs(name, case):
    data = dict(regression_inputs(name))[case]
    _harness(name).TestOneInput(data)


def test_mysql_zero_length_packet_is_not_a_parser_error():
    """Plain form of the mysql regression input: the parser keeps going after an empty packet."""
    from firewall.protocols import make_parser

    g = b"\x0a5.5.5-x\x00" + b"\x01\x00\x00\x00" + b"a" * 20
    p = make_parser("mysql")
    assert p.feed(len(g).to_bytes(3, "little") + b"\x00" + g, 1)[0].kind == "greeting"
    assert p.feed(b"\x00\x00\x00\x02", 1) == []
    err = p.feed(b"\x05\x00\x00\x03\xff\x15\x04#2800", 1)
    assert [e.kind for e in err] == ["response"] and err[0].fields["error"] == 1045


@st.composite
def _mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 2))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data)


@pytest.mark.parametrize("name", HARNESSES)
def test_hypothesis_inputs(name):
    mod = _harness(name)
    strategy = st.one_of(st.binary(max_size=600), _mutated(mod.SEEDS))
    if name in ("http", "http2", "tls", "ssh", "dns", "redis", "pgsql", "mysql"):
        convs = st.lists(st.tuples(st.integers(0, 1), st.binary(max_size=300)), max_size=8)
        strategy = st.one_of(strategy, st.builds(encode, convs, st.binary(max_size=6)))

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(data):
        mod.TestOneInput(data)

    run()


@pytest.mark.skipif(not have_atheris(), reason="atheris not installed (pip install atheris); hypothesis runs above")
@pytest.mark.parametrize("name", HARNESSES)
def test_atheris_short_run(name, tmp_path):
    mod = _harness(name)
    seeds = write_seeds(name, mod.SEEDS, base=tmp_path / "seeds")
    work = tmp_path / "corpus"
    work.mkdir()
    cmd = [sys.executable, "-m", f"fuzz.fuzz_{name}", f"-runs={ATHERIS_RUNS}", "-seed=1", "-max_len=4096",
           f"-artifact_prefix={tmp_path}/", str(work), str(seeds)]
    if (REPO / "fuzz" / "dicts" / f"{name}.dict").exists():
        cmd.insert(3, f"-dict={REPO / 'fuzz' / 'dicts' / f'{name}.dict'}")
    r = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert r.returncode == 0 and not crashes, f"{name}: {crashes}\n{r.stderr[-3000:]}"
    assert f"Done {ATHERIS_RUNS} runs" in r.stderr
