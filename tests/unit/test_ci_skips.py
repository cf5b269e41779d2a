"""CI fails on a skip that is not on the documented allow-list (issue 18: every test runs somewhere)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def _run(tmp_path: Path, body: str, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_probe.py").write_text("import pytest\n\n" + body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


UNLISTED = 'def test_a():\n    pytest.skip("kubectl not found")\n\n\ndef test_b():\n    assert True\n'
LISTED = ('@pytest.mark.skipif(True, reason="checks the message shown to a non-root user")\n'
          'def test_a():\n    pass\n')


def test_unlisted_skip_fails_the_run_in_ci(tmp_path):
    r = _run(tmp_path, UNLISTED, "true")
    assert r.returncode == 1, r.stdout
    assert "skips not allowed in CI" in r.stdout and "kubectl not found" in r.stdout


def test_unlisted_skip_is_only_a_skip_outside_ci(tmp_path):
    r = _run(tmp_path, UNLISTED, None)
    assert r.returncode == 0, r.stdout
    assert "1 skipped" in r.stdout


def test_listed_skip_passes_in_ci(tmp_path):
    r = _run(tmp_path, LISTED, "true")
    assert r.returncode == 0, r.stdout


def test_a_failure_is_still_a_failure(tmp_path):
    r = _run(tmp_path, UNLISTED + "\n\ndef test_c():\n    assert False\n", "true")
    assert r.returncode == 1
