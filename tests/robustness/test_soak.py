"""The 60-second soak (benchmarks/soak.py runs the same for 10 minutes): mixed allowed, denied,
DLP-blocked and bulk traffic; the sidecar's RSS, fds and threads stay flat, every operation
got the answer policy says, and every flow has one record."""

from __future__ import annotations

import os

import pytest

from .conftest import assert_no_pan, sidecar_outputs

pytestmark = [pytest.mark.netns, pytest.mark.slow]

DURATION = float(os.environ.get("PALISADE_SOAK_SECONDS", "60"))


def test_soak_mixed_traffic_stays_flat():
    from pathlib import Path

    from benchmarks.soak import run_soak, table

    res = run_soak(duration=DURATION, interval=3, warmup=9, octet=223)
    print(table(res))
    ops = res["ops"]
    assert res["sidecar_alive"]
    # every operation got the answer policy says
    assert not [k for k in ops if ":error:" in k or k == "bulk:failed"], ops
    assert ops.get("http:clean:200", 0) > 100 and ops.get("bulk:ok", 0) >= 5, ops
    assert ops.get("http:card:403", 0) > 10 and not ops.get("http:card:200"), ops
    assert ops.get("denied:refused", 0) + ops.get("denied:closed", 0) > 50 and not ops.get("denied:data"), ops
    # flat: no growth between the first and last third of the run, fds back after it
    g = res["growth"]
    assert g["rss_kib"] < 16 * 1024, g
    assert g["fds"] < 20 and g["threads"] <= 1, g
    assert res["after"]["fds"] <= res["before"]["fds"]
    # one record per flow
    assert res["flow_records"] == res["unique_flow_ids"]
    assert res["flow_records"] >= sum(ops.values()) - ops.get("bulk:ok", 0)
    assert_no_pan(sidecar_outputs(Path(res["tmp"])))
