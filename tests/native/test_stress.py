"""Thousands of short flows, resets, half-closes and loop-side cuts through the relays, byte-exact
(tests/native/stress.py) - on the native relay as built, on the Python pump (the fallback passes
the same mix), and on the native relay built with AddressSanitizer (what CI runs).

Loopback TCP inside the test's own process: no root needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from firewall.datapath import native_relay
from tests.native import stress

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "firewall" / "datapath" / "_relay.c"
needs_native = pytest.mark.skipif(not native_relay.AVAILABLE,
                                  reason=f"native relay not built: {native_relay.IMPORT_ERROR}")


def _check(r: dict, flows: int) -> None:
    assert r["nerrors"] == 0, r["errors"]
    assert sum(r["kinds"].values()) == flows
    # every kind of ending happened, and each flow ended exactly once with the right reason
    assert set(r["kinds"]) == {"exact", "half", "client-rst", "server-rst", "cut"}
    assert sum(r["reasons"].values()) == flows
    assert r["reasons"]["eof"] == r["kinds"]["exact"] + r["kinds"]["half"]


@needs_native
def test_native_relay_stress_is_byte_exact():
    import asyncio

    r = asyncio.run(stress.run("native", 2000, 200, seed=1))
    _check(r, 2000)
    assert r["stats"]["active"] == 0 and r["stats"]["total"] >= 2000


def test_python_relay_passes_the_same_stress():
    import asyncio

    r = asyncio.run(stress.run("python", 1000, 200, seed=2))
    _check(r, 1000)


def _asan_build(tmp: Path) -> tuple[Path, str]:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is installed by scripts/install.sh"
    lib = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(lib) and os.path.exists(lib), "libasan (gcc's sanitizer runtime) is missing"
    out = tmp / "_relay_asan.so"
    subprocess.run([gcc, "-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1", "-Wall", "-Werror",
                    "-Wno-unused-parameter", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                    str(SOURCE), "-o", str(out)], check=True, timeout=120)
    return out, lib


def test_native_relay_stress_under_address_sanitizer(tmp_path):
    """The same mix against the extension compiled with -fsanitize=address: any use after free,
    double free or overflow in the relay aborts the run with a report."""
    mod, lib = _asan_build(tmp_path)
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0:exitcode=99:abort_on_error=0")
    p = subprocess.run([sys.executable, "-m", "tests.native.stress", "--flows", "2000", "--seed", "3",
                        "--module", str(mod)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "AddressSanitizer" not in p.stderr, p.stderr[-4000:]
    assert p.returncode == 0, p.stderr[-4000:] + p.stdout[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["asan"] is True  # the sanitizer runtime really was loaded
    _check(r, 2000)
