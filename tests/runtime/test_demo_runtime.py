"""``python -m firewall demo --runtime podman``: the eight steps with the init container and the
sidecar of the CDE pods in containers from the image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns  # root + namespaces; conftest also skips without podman

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_step_on_podman(image, tmp_path):
    out = tmp_path / "demo-out"
    r = subprocess.run([sys.executable, "-m", "firewall", "demo", "--runtime", "podman", "--image", image,
                        "--out", str(out), "--prefix", "rtdemo", "--subnet-octet", "167"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert (out / "report" / "report.html").is_file()
    text = " ".join(r.stdout.split())  # rich wraps lines
    assert text.count("palisade-init container installed the redirect rules") == 2, r.stdout[-3000:]
    # the containers are gone afterwards
    left = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True)
    assert not [n for n in left.stdout.split() if n.startswith("rtdemo-")], left.stdout


def test_demo_runtime_podman_refuses_a_missing_image(tmp_path):
    r = subprocess.run([sys.executable, "-m", "firewall", "demo", "--runtime", "podman", "--image",
                        "localhost/palisade-does-not-exist:none", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "scripts/image.sh" in r.stderr, r.stderr
