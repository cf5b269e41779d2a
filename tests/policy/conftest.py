from __future__ import annotations

import pathlib

import pytest

from firewall.policy.engine import PolicySet
from tests.policy.common import NODE, TABLE_POLICY, write


@pytest.fixture
def table_ps(tmp_path: pathlib.Path) -> PolicySet:
    return PolicySet.load([write(tmp_path, TABLE_POLICY)], node_ip=NODE.ip, probe_ports=frozenset({8080}))

