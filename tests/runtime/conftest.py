"""Fixtures for the container-runtime tests: the image (built once, cached), the test's workload
image, and a cluster of namespaces with a "node" that probes pods.

These tests are ``netns`` (root; skipped with the reason otherwise) and additionally skip with a
clear reason when podman is not installed. CI runs as root and installs podman (scripts/install.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("PALISADE_IMAGE", "localhost/palisade:dev")
WEB_IMAGE = "localhost/palisade-test-web:dev"
PODMAN_REASON = "podman not installed (scripts/install.sh installs it; CI runs these tests)"

# nginx from Debian on the same local base as the product image (no registry): answers every
# method on 8080 with "web ok" so a blocked request is told apart from the app's own answer.
# (apt-get reaches the Debian mirror once; podman's layer cache keeps the result.)
WEB_CONTAINERFILE = """\
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light \\
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/*
RUN printf 'server {{ listen 8080; location / {{ return 200 "web ok\\\\n"; }} }}\\n' \\
      > /etc/nginx/conf.d/web.conf && nginx -t
# SIGQUIT is nginx's graceful stop (finish in-flight requests); containerd and podman both send the
# image's STOPSIGNAL on pod termination.
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
"""


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    mine = [i for i in items if Path(str(i.fspath)).is_relative_to(here)]
    for item in mine:
        if os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (podman with runc, network namespaces); "
                                                    "CI runs these as root"))
        elif not shutil.which("podman"):
            item.add_marker(pytest.mark.skip(reason=PODMAN_REASON))


def _timed(what: str, cmd: list[str], timeout: float) -> str:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed rc={proc.returncode}:\n{proc.stderr[-4000:]}")
    print(f"\n{what}: {time.monotonic() - start:.1f}s")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def image() -> str:
    """localhost/palisade:dev from scripts/image.sh (cached base, cached wheels, layer cache)."""
    return _timed("scripts/image.sh", ["bash", "scripts/image.sh"], 1800)


@pytest.fixture(scope="session")
def web_image(image: str) -> str:
    from tests.runtime.podrunner import build_test_image

    base = _timed("scripts/base-image.sh", ["bash", "scripts/base-image.sh"], 1800)
    build_test_image(WEB_IMAGE, WEB_CONTAINERFILE.format(base=base))
    return WEB_IMAGE


@pytest.fixture
def rt_cluster(request):
    from tests.harness import Cluster

    c = Cluster("rt", 170 + abs(hash(request.node.nodeid)) % 20)
    c.node = c.pod("node")  # the kubelet's address: probes come from here, HOST_IP points here
    yield c
    c.close()
    shutil.rmtree(c.tmp, ignore_errors=True)
