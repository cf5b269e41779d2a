from __future__ import annotations

import pathlib

import pytest

from firewall.policy.engine import PolicySet
from tests.policy.common import NODE, TABLE_POLICY, write


@pytest.fixture
def table_ps(tmp_path: pathlib.Path) -> PolicySet:
    return PolicySet.load([write(tmp_path, TABLE_POLICY)], node_ip=NODE.ip, probe_ports=frozenset({8080}))


@pytest.fixture(autouse=True)
def _pydantic_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every document the tests here load (valid ones and every error case) is validated by the
    pydantic reference too, and both must give the same records or the same errors."""
    from firewall.policy import loader as policy_loader
    from firewall.policy.model import MODELS
    from tests.policy.crosscheck import assert_agree

    real = policy_loader.validate
    kinds = {cls: kind for kind, cls in MODELS.items()}

    def both(cls: type, value: object) -> object:
        assert_agree(kinds[cls], value)
        return real(cls, value)

    monkeypatch.setattr(policy_loader, "validate", both)
