"""Shared fixtures. Tests marked ``netns`` need root (CI runs as root); elsewhere they skip
with the reason, never pass silently."""

from __future__ import annotations

import os
import shutil

import pytest

ROOT_REASON = "needs root and network namespaces (ip netns, nftables); CI runs these as root"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0 and shutil.which("nft") and shutil.which("ip"):
        # Tests that run real servers in namespaces depend on scheduling on a shared 2-core
        # machine; one rerun (shown as R in the output, listed in the summary) keeps a timing
        # flake from hiding the rest. A test that fails twice fails.
        if config.pluginmanager.hasplugin("rerunfailures"):
            for item in items:
                if "netns" in item.keywords and not item.get_closest_marker("flaky"):
                    item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=1))
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
