"""Fixtures for the DLP tests: one engine per module, compiled into a private cache dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from firewall.dlp.engine import DlpEngine

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

# Standard public test PANs (never real cards).
TEST_PANS = {
    "card.visa": "4111111111111111",
    "card.mastercard": "5555555555554444",
    "card.amex": "378282246310005",
    "card.discover": "6011111111111117",
    "card.jcb": "3530111333300000",
    "card.diners": "30569309025904",
    "card.unionpay": "6200000000000005",
}
MC_2SERIES = "2223003122003222"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dlp-cache"))


@pytest.fixture(scope="session")
def engine(cache_dir) -> DlpEngine:
    return DlpEngine.load(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def engine_all(cache_dir) -> DlpEngine:
    return DlpEngine.load(enable=["payment_cards", "us_pii", "eu_pii", "contact", "secrets"], cache_dir=cache_dir)


def spans(findings) -> list[tuple[str, int, int]]:
    return sorted((f.rule_id, f.start, f.end) for f in findings)
