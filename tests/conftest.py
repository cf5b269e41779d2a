"""Shared fixtures. Tests marked ``netns`` need root (CI runs as root); elsewhere they skip
with the reason, never pass silently.

Every test runs somewhere (issue 18): with ``CI=true`` in the environment, a skip whose
reason is not on ``CI_ALLOWED_SKIPS`` fails the run - a test that silently stopped running
in CI (a missing binary, a file outside the repository) is a failure, not a footnote.
"""

from __future__ import annotations

import os
import shutil

import pytest

ROOT_REASON = "needs root and network namespaces (ip netns, nftables); CI runs these as root"

#: The only skips CI accepts (CI runs as root with every tool scripts/install.sh installs).
#: Each entry is a prefix of a skip reason and says why that skip is expected in CI.
CI_ALLOWED_SKIPS: dict[str, str] = {
    # the non-root user's message can only be checked by a non-root user
    "checks the message shown to a non-root user": "CI runs as root",
    # tests/injector/test_guard.py with PALISADE_REGEN_GOLDEN set: the stale-case check is moot
    "regenerating": "only while regenerating the guard golden file",
    # a parametrised case of tests/protocols/test_event_fields.py for a policy variant without it
    "the table policy has no minVersion rule": "that case does not apply to the shipped table policy",
}


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        text = str(longrepr)
    return text.removeprefix("Skipped: ")


def unexpected_skips(reasons: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(nodeid, reason) pairs whose reason starts with no allowed prefix."""
    return [(n, r) for n, r in reasons if not any(r.startswith(p) for p in CI_ALLOWED_SKIPS)]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


_SKIPS: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if _in_ci() and unexpected_skips(_SKIPS) and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = unexpected_skips(_SKIPS)
    if _in_ci() and bad:
        terminalreporter.section("skips not allowed in CI (tests/conftest.py CI_ALLOWED_SKIPS)", red=True)
        for nodeid, reason in bad:
            terminalreporter.line(f"{nodeid}: {reason}")


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
