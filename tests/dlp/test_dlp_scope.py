"""Which flows the DLP reads: ``PolicySet.dlp_applies`` at accept, and re-evaluation on reload.

A flow no DLP action can apply to is never scanned (with L7 off or an unidentified protocol it
is spliced); a reload that makes a DLP rule apply to such a flow must not leave it silently
uninspected.  Sans-IO: real policy engine, real DLP engine, no sockets (the netns version is
tests/integration/test_dlp_splice.py).
"""

from __future__ import annotations

import pytest

from firewall.datapath.session import Inspection, Session
from firewall.dlp.engine import DlpEngine
from firewall.identity.identity import Identity
from firewall.policy.engine import FlowInfo, PolicySet
from firewall.protocols.base import TOSERVER

BASE = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  mode: MODE
  default: allow
  dlp:
    - name: no-pan-to-partners
      packs: [payment_cards]
      direction: egress
      to: [{namespace: partners}]
      action: block
"""
# what a reload adds: every egress flow to the analytics namespace is scanned too
ADDED = """
    - name: ADDED_NAME
      packs: [payment_cards]
      direction: egress
      to: [{namespace: analytics}]
      action: ACTION
"""

LOCAL = Identity.make("10.0.0.2", "payments", "api-0", {"app": "api"})
PEERS = {
    "10.0.0.3": Identity.make("10.0.0.3", "partners", "p-0", {"app": "upload"}),
    "10.0.0.4": Identity.make("10.0.0.4", "analytics", "an-0", {"app": "analytics"}),
}
PAN = b"4111 1111 1111 1111"


class Peers:
    def resolve(self, ip: str) -> Identity:
        return PEERS.get(ip, Identity(ip))


@pytest.fixture(scope="module")
def engine() -> DlpEngine:
    return DlpEngine.load()


def _policy(tmp_path, mode: str = "protect", added: str | None = None, action: str = "block") -> PolicySet:
    text = BASE.replace("MODE", mode)
    if added:
        text += ADDED.replace("ADDED_NAME", added).replace("ACTION", action)
    p = tmp_path / f"p-{mode}-{added}-{action}.yaml"
    p.write_text(text)
    return PolicySet.load([str(p)])


def _insp(policy: PolicySet, engine: DlpEngine) -> Inspection:
    events: list[dict] = []
    i = Inspection(policy=policy, dlp=engine, identities=Peers(), local=LOCAL, emit=events.append, l7=False)
    i.events = events  # type: ignore[attr-defined]
    return i


def _out(insp: Inspection, ip: str) -> Session:
    s = Session(insp, "outbound", ("10.0.0.2", 41000), (ip, 9000))
    assert s.open()
    return s


def test_dlp_applies_follows_direction_peers_and_the_empty_policy(tmp_path):
    ps = _policy(tmp_path)
    partner, analytics, world = PEERS["10.0.0.3"], PEERS["10.0.0.4"], Identity("192.0.2.9")
    assert ps.dlp_applies(FlowInfo("egress", LOCAL, partner, 9000))
    assert not ps.dlp_applies(FlowInfo("ingress", LOCAL, partner, 9000))  # the rule is egress only
    assert not ps.dlp_applies(FlowInfo("egress", LOCAL, analytics, 9000))
    assert not ps.dlp_applies(FlowInfo("egress", LOCAL, world, 443))
    # the answer agrees with dlp_for, cached or not (second call served from the table's memo)
    for peer in (partner, analytics, world):
        flow = FlowInfo("egress", LOCAL, peer, 9000)
        assert ps.dlp_applies(flow) == bool(ps.dlp_for(flow)) == bool(ps.dlp_for(flow))
    # a memoised answer is not shared: callers may change their list
    acts = ps.dlp_for(FlowInfo("egress", LOCAL, partner, 9000))
    acts.clear()
    assert ps.dlp_for(FlowInfo("egress", LOCAL, partner, 9000))
    # mode override is part of the answer (block downgraded to alert), not cached across it
    assert ps.dlp_for(FlowInfo("egress", LOCAL, partner, 9000), mode_override="monitor")[0].action == "alert"
    assert ps.dlp_for(FlowInfo("egress", LOCAL, partner, 9000))[0].action == "block"
    # no policy at all: the default alert applies to every flow (learn mode observes)
    assert PolicySet.empty().dlp_applies(FlowInfo("egress", LOCAL, world, 443))


def test_a_flow_no_dlp_action_applies_to_is_passthrough_and_one_that_applies_blocks_a_card(tmp_path, engine):
    insp = _insp(_policy(tmp_path), engine)
    free = _out(insp, "10.0.0.4")
    assert free.passthrough and not free.wants_scan()  # L4 final, nothing reads it: splice-able
    out, stop = free.feed(TOSERVER, b"card " + PAN + b"\n")
    assert stop is None and PAN in out  # not in any DLP scope: forwarded, not scanned
    scanned = _out(insp, "10.0.0.3")
    assert not scanned.passthrough and scanned.wants_scan()
    forwarded, stop = b"", None
    for i in range(0, 40, 3):  # split across segments
        part, stop = scanned.feed(TOSERVER, (b"card " + PAN + b" end\n")[i:i + 3])
        forwarded += part
        if stop is not None:
            break
    assert stop is not None and stop.reason == "dlp-block:no-pan-to-partners"
    assert PAN not in forwarded and PAN.replace(b" ", b"") not in forwarded


def test_reload_adding_a_block_rule_cuts_an_unscanned_flow_in_protect(tmp_path, engine):
    insp = _insp(_policy(tmp_path), engine)
    s = _out(insp, "10.0.0.4")
    assert s.passthrough
    s.feed(TOSERVER, b"hello")
    insp.policy = _policy(tmp_path, added="pan-to-analytics")  # what a reload swaps in
    assert s.dlp_reloaded() is True
    assert s.verdict == "deny" and s.rule == "pan-to-analytics"
    alert = [e for e in insp.events if e.get("alert", {}).get("category") == "dlp"][-1]
    assert alert["alert"]["action"] == "blocked" and "policy reload" in alert["reason"]
    # a reload that changes nothing for the pair leaves an unscanned flow alone
    other = _out(insp, "192.0.2.9")
    assert other.dlp_reloaded() is False and other.verdict == "allow"


@pytest.mark.parametrize("mode,action", [("protect", "alert"), ("monitor", "block"), ("learn", "block")])
def test_reload_adding_a_rule_that_cannot_block_alerts_instead_of_cutting(tmp_path, engine, mode, action):
    insp = _insp(_policy(tmp_path, mode=mode), engine)
    s = _out(insp, "10.0.0.4")
    insp.policy = _policy(tmp_path, mode=mode, added="watch-analytics", action=action)
    before = len(insp.events)
    assert s.dlp_reloaded() is False
    assert s.verdict == "allow"
    new = [e for e in insp.events[before:] if e.get("alert", {}).get("category") == "dlp"]
    assert len(new) == 1 and new[0]["alert"]["action"] == "allowed"
    assert "not scanned" in new[0]["reason"]  # not silent
    # said once: the next reload (identities change often) does not repeat it
    assert s.dlp_reloaded() is False
    assert len([e for e in insp.events if e.get("alert", {}).get("category") == "dlp"]) == len(
        [e for e in insp.events[:before] if e.get("alert", {}).get("category") == "dlp"]) + 1
    if mode == "protect":
        # and when a later reload makes the rule block, the still-unscanned flow is cut
        insp.policy = _policy(tmp_path, mode=mode, added="watch-analytics", action="block")
        assert s.dlp_reloaded() is True and s.verdict == "deny"


def test_reload_on_a_scanned_flow_takes_the_new_actions_and_keeps_the_stream(tmp_path, engine):
    """A flow scanned under an alert rule when a reload turns it into a block: the same stream
    goes on (a card split across the reload is still seen whole) and the block applies."""
    insp = _insp(_policy(tmp_path, added="watch-analytics", action="alert"), engine)
    s = _out(insp, "10.0.0.4")
    assert s.wants_scan()
    out, stop = s.feed(TOSERVER, b"card 4111 1111")
    assert stop is None
    insp.policy = _policy(tmp_path, added="watch-analytics", action="block")
    assert s.dlp_reloaded() is False  # re-evaluated, not cut
    forwarded = out
    out, stop = s.feed(TOSERVER, b" 1111 1111 thanks")
    forwarded += out
    assert stop is not None and stop.reason == "dlp-block:watch-analytics"
    assert PAN not in forwarded
    # and a reload that drops every DLP rule for the pair keeps scanning (the safe side)
    s2 = _out(insp, "10.0.0.4")
    insp.policy = _policy(tmp_path)
    assert s2.dlp_reloaded() is False and s2.wants_scan()


def test_encrypted_or_stopped_flows_are_left_alone_on_reload(tmp_path, engine):
    insp = _insp(_policy(tmp_path), engine)
    s = _out(insp, "10.0.0.4")
    s.encrypted = True  # DLP never scans a completed TLS session: nothing to cut for
    insp.policy = _policy(tmp_path, added="pan-to-analytics")
    assert s.dlp_reloaded() is False


SCOPED = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  mode: protect
  default: allow
  dlp:
    - name: no-clear-pan-out-of-cde
      packs: [payment_cards]
      direction: egress
      to: [{scope: out-of-scope}, {scope: connected}]
      action: block
"""


def test_scope_rules_decide_by_the_peers_pci_scope(tmp_path, engine):
    """DESIGN's example rule: egress to out-of-scope or connected peers is scanned (a card is
    blocked, also to an address no identity source knows: the world is out of scope); egress
    to another CDE workload is not scanned and stays splice-able."""
    p = tmp_path / "scoped.yaml"
    p.write_text(SCOPED)
    ps = PolicySet.load([str(p)])
    cde_db = Identity.make("10.0.0.5", "payments", "db-0", {"app": "db", "pci.palisade.dev/scope": "cde"})
    connected = Identity.make("10.0.0.6", "shop", "web-0", {"pci.palisade.dev/scope": "connected"})
    peers = {**PEERS, "10.0.0.5": cde_db, "10.0.0.6": connected}

    class ScopedPeers:
        def resolve(self, ip: str) -> Identity:
            return peers.get(ip, Identity(ip))

    local = Identity.make("10.0.0.2", "payments", "api-0", {"app": "api", "pci.palisade.dev/scope": "cde"})
    assert not ps.dlp_applies(FlowInfo("egress", local, cde_db, 5432))
    assert ps.dlp_applies(FlowInfo("egress", local, connected, 443))
    assert ps.dlp_applies(FlowInfo("egress", local, Identity("203.0.113.7"), 443))
    events: list[dict] = []
    insp = Inspection(policy=ps, dlp=engine, identities=ScopedPeers(), local=local, emit=events.append, l7=False)
    inside = _out(insp, "10.0.0.5")
    assert inside.passthrough and not inside.wants_scan()
    for ip in ("10.0.0.6", "203.0.113.7"):
        s = _out(insp, ip)
        assert not s.passthrough
        forwarded, stop = b"", None
        for piece in (b"pan=4111-1111-", b"1111-", b"1111&x=1"):  # a dashed spelling, split
            out, stop = s.feed(TOSERVER, piece)
            forwarded += out
            if stop is not None:
                break
        assert stop is not None and stop.reason == "dlp-block:no-clear-pan-out-of-cde", ip
        assert b"4111-1111-1111-1111" not in forwarded
