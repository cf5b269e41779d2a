"""The L4 verdict cache end to end (issue 22, req. 5): the real sidecar on the fast path, real
nftables redirect, a client pod whose allowed connections are answered from the cache - and
then every change that must deny it takes effect for the very next connection: a policy reload,
the client's IP moving to another workload (identity file), a quarantine annotation.

"Very next": a reload or quarantine is known to be in force when a flow held open across it is
cut (``cut_all`` runs in the same loop callback that installs the new state); the first
connection after that must be refused.  The FQDN-learning case is covered in
tests/unit/test_verdict_cache.py (learned, expired and moved names)."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from tests.harness import PY, wait_until
from tests.integration.test_datapath import FAST_POLICY, RELAY_FLAGS, _fast_env, _hold

pytestmark = pytest.mark.netns

ONE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 9300), timeout=5)
    got = s.recv(64)
    print(got.decode().split()[0] if got else "closed")
except ConnectionResetError:
    print("reset")
except OSError as e:
    print("error", e)
"""


def _one(cli, srv) -> str:
    return cli.run([PY, "-c", textwrap.dedent(ONE), srv.ip], timeout=30).stdout.strip()


def _lookups(sc) -> dict[str, float]:
    text = sc.http("/metrics")[1]
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^palisade_l4_verdict_cache_lookups\{result="(\w+)"\} (\S+)', text, re.M)}


def _warm(cli, srv, sc) -> None:
    """Allowed again (the previous change undone), then answered from the cache."""
    wait_until(lambda: _one(cli, srv) == cli.ip, 20, what="the client allowed again")
    before = _lookups(sc).get("hit", 0.0)
    for _ in range(3):
        assert _one(cli, srv) == cli.ip
    assert _lookups(sc)["hit"] >= before + 3, "allowed connections were not answered from the cache"


def _refusals(sc) -> int:
    return len([f for f in sc.flows(dest_port=9300)
                if f["verdict"] == "deny" and f["close_reason"] == "denied"])


def _cut_then_refused(cli, srv, sc, holder, reason: str) -> None:
    cuts = len(sc.flows(dest_port=9300, close_reason=reason))
    refused = _refusals(sc)
    assert holder.stdout.readline().decode().strip() in ("reset", "closed")
    sc.wait_flows(cuts + 1, dest_port=9300, close_reason=reason)  # the new state is installed
    assert _one(cli, srv) in ("reset", "closed")  # the very next connection
    wait_until(lambda: _refusals(sc) == refused + 1, 15, what="the refusal's flow record")


def test_cached_allow_is_revoked_by_reload_identity_move_and_quarantine(cluster):
    from firewall.identity.podinfo import write_podinfo

    srv, cli, sc, policy, podinfo, labels = _fast_env(cluster, *RELAY_FLAGS["native"])
    ident = policy.parent / "identity.json"
    _warm(cli, srv, sc)

    # 1. a policy reload that no longer admits the client's namespace
    holder = _hold(cli, srv)
    policy.write_text(FAST_POLICY.replace("namespace: shop", "namespace: shop-v2"))
    _cut_then_refused(cli, srv, sc, holder, "reload")
    policy.write_text(FAST_POLICY)
    _warm(cli, srv, sc)

    # 2. the client's address now belongs to a workload in another namespace.  An open flow
    # keeps the identity it was decided with (Session.reevaluate re-decides its stored
    # flowinfo), so no cut marks the swap: the allowed connections go on until the file is
    # re-read (reload_interval), and from the first refusal on every connection is refused -
    # the cache cannot answer for the old identity (it is keyed by the identity resolved for
    # each connection; tests/unit/test_verdict_cache.py shows the very next one)
    original = ident.read_text()
    moved = [dict(e, namespace="evil") if e["ip"] == cli.ip else e for e in json.loads(original)]
    refused = _refusals(sc)
    ident.write_text(json.dumps(moved))
    wait_until(lambda: _one(cli, srv) in ("reset", "closed"), 20, what="the moved client refused")
    for _ in range(3):
        assert _one(cli, srv) in ("reset", "closed")
    wait_until(lambda: _refusals(sc) == refused + 4, 15, what="four refusals recorded")
    ident.write_text(original)
    _warm(cli, srv, sc)

    # 3. quarantine (podinfo annotation)
    holder = _hold(cli, srv)
    write_podinfo(str(podinfo), {"palisade.dev/quarantine": "true"}, labels)
    _cut_then_refused(cli, srv, sc, holder, "quarantine")
