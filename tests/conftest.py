"""Shared fixtures. Tests marked ``netns`` need root (CI runs as root); elsewhere they skip
with the reason, never pass silently."""

from __future__ import annotations

import os
import shutil

import pytest

ROOT_REASON = "needs root and network namespaces (ip netns, nftables); CI runs these as root"


def pytest_collection_modifyitems(config, items):
    # No blanket rerun: a retry can hide a data-loss race.  pytest-rerunfailures reruns only
    # a test that carries ``@pytest.mark.flaky(reruns=N, reason="why")`` itself; a flaky
    # marker without a reason is a collection error, and data-path tests (netns) never get one.
    for item in items:
        m = item.get_closest_marker("flaky")
        if m is not None and not m.kwargs.get("reason"):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.flaky needs reason=\"...\"")
        if m is not None and "netns" in item.keywords:
            raise pytest.UsageError(f"{item.nodeid}: data-path (netns) tests are never rerun")
    if os.geteuid() == 0 and shutil.which("nft") and shutil.which("ip"):
        return
    skip = pytest.mark.skip(reason=ROOT_REASON if os.geteuid() != 0 else "nft or ip binary missing")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cluster(request):
    from tests.harness import Cluster

    octet = 200 + (abs(hash(request.node.nodeid)) % 50)
    c = Cluster("pl", octet)
    yield c
    c.close()
