"""The fast path's L4 verdict cache (firewall/datapath/verdict_cache.py): a cached session is the
opened one, field for field, and every change a decision depends on reaches the very next
connection - a policy reload, a pod IP moving to another workload, a quarantine or mode
annotation, a learned or expired FQDN - while many distinct peers cannot grow it without bound.

Real engine, real policies, real Session: only the sockets are missing."""

from __future__ import annotations

from pathlib import Path

from firewall.datapath.session import Inspection, Session
from firewall.datapath.verdict_cache import OPEN_FIELDS, VerdictCache
from firewall.identity.fqdn import FqdnCache
from firewall.identity.identity import Identity, IdentityMap
from firewall.policy.engine import PolicySet

LOCAL = Identity.make("10.9.0.5", "shop", "svc", {"app": "svc"})
CLIENT, OTHER, API = "10.9.1.7", "10.9.1.8", "10.9.2.9"

POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: svc, namespace: shop}
spec:
  selector: {matchLabels: {app: svc}}
  mode: protect
  default: deny
  ingress:
    - name: clients-in
      from: [{namespace: clients}]
      ports: [{port: 8080}]
      action: allow
  egress:
    - name: api-out
      to: [{fqdn: api.example.com}]
      ports: [{port: 443}]
      action: allow
"""


def _ids(client_ns: str = "clients") -> IdentityMap:
    return IdentityMap([Identity.make(CLIENT, client_ns, "c1", {"app": "c"}),
                        Identity.make(OTHER, "clients", "c2", {"app": "c"})])


def _insp(tmp_path: Path, text: str = POLICY, ids: IdentityMap | None = None,
          fqdn: FqdnCache | None = None, name: str = "p.yaml") -> Inspection:
    f = tmp_path / name
    f.write_text(text)
    policy = PolicySet.load([str(f)], fqdn=fqdn)
    alerts: list[dict] = []
    insp = Inspection(policy=policy, identities=ids or _ids(), fqdn=fqdn, l7=False, local=LOCAL,
                      emit=alerts.append)
    insp.mode_override = None
    return insp


def _inbound(insp: Inspection, cache: VerdictCache, peer: str = CLIENT, port: int = 8080,
             sport: int = 40000) -> tuple[Session, bool]:
    s = Session(insp, "inbound", (peer, sport), (LOCAL.ip, port))
    return s, cache.open(s)


def _outbound(insp: Inspection, cache: VerdictCache, dst: str = API, port: int = 443) -> tuple[Session, bool]:
    s = Session(insp, "outbound", (LOCAL.ip, 41000), (dst, port))
    return s, cache.open(s)


PER_FLOW = {"flow_id", "src_port", "start", "insp"}


def test_cached_session_equals_an_opened_one_in_every_slot(tmp_path):
    insp = _insp(tmp_path)
    cache = VerdictCache()
    _inbound(insp, cache)  # miss: fills
    cached, ok = _inbound(insp, cache, sport=40001)
    assert ok and cache.hits == 1
    fresh = Session(insp, "inbound", (CLIENT, 40001), (LOCAL.ip, 8080))
    assert fresh.open()
    for name in Session.__slots__:
        if name in PER_FLOW:
            continue
        assert getattr(cached, name) == getattr(fresh, name), name
    assert cached.rule == "clients-in" and cached.passthrough
    # a field Session.open sets must be one the cache copies (a new one fails here)
    blank = Session(insp, "inbound", (CLIENT, 40001), (LOCAL.ip, 8080))
    changed = {n for n in Session.__slots__ if n not in PER_FLOW and getattr(blank, n) != getattr(fresh, n)}
    assert changed <= set(OPEN_FIELDS), changed - set(OPEN_FIELDS)
    # the per-session list is not shared between sessions
    assert cached._dlp_actions is not _inbound(insp, cache, sport=40002)[0]._dlp_actions


def test_denials_and_alerts_are_never_cached(tmp_path):
    insp = _insp(tmp_path)
    cache = VerdictCache()
    for sport in range(3):
        s, ok = _inbound(insp, cache, port=9999, sport=sport)  # default deny, with an alert
        assert not ok and s.verdict == "deny" and s._alerts == 1
    assert cache.hits == 0 and len(cache) == 0


def test_policy_reload_denies_a_cached_peer_for_the_next_connection(tmp_path):
    cache = VerdictCache()
    insp = _insp(tmp_path)
    assert _inbound(insp, cache)[1] and _inbound(insp, cache)[1] and cache.hits == 1
    denied = POLICY.replace("from: [{namespace: clients}]", "from: [{namespace: nobody}]")
    reloaded = _insp(tmp_path, denied, name="p2.yaml")  # app.py _swap: a new Inspection
    s, ok = _inbound(reloaded, cache)
    assert not ok and s.verdict == "deny" and s.rule == "default-deny"


def test_quarantine_and_mode_change_take_effect_for_the_next_connection(tmp_path):
    cache = VerdictCache()
    insp = _insp(tmp_path)
    assert _inbound(insp, cache)[1] and _inbound(insp, cache)[1]
    insp.quarantined = True  # even set live on the same Inspection object
    s, ok = _inbound(insp, cache)
    assert not ok and s.rule == "quarantine"
    insp.quarantined = False
    assert _inbound(insp, cache)[1]
    insp.mode_override = "learn"
    s, ok = _inbound(insp, cache, port=9999)
    assert ok and s.mode == "learn"
    insp.mode_override = "protect"
    s, ok = _inbound(insp, cache)
    assert ok and s.mode == "protect"


def test_identity_change_takes_effect_for_the_next_connection(tmp_path):
    """The pod IP CLIENT moves from namespace clients to namespace evil: same address, same
    port, same Inspection object (a watch source swaps its map before the proxy swaps)."""
    cache = VerdictCache()
    insp = _insp(tmp_path)
    assert _inbound(insp, cache)[1] and _inbound(insp, cache)[1] and cache.hits == 1
    insp.identities = _ids(client_ns="evil")
    s, ok = _inbound(insp, cache)
    assert not ok and s.verdict == "deny" and s.peer.namespace == "evil"


def test_fqdn_learning_and_expiry_take_effect_for_the_next_connection(tmp_path):
    now = [1000.0]
    fq = FqdnCache(min_ttl=1, max_ttl=60, clock=lambda: now[0])
    cache = VerdictCache()
    insp = _insp(tmp_path, fqdn=fq)
    assert not _outbound(insp, cache)[1]  # API is no known name yet: default deny
    fq.learn("api.example.com", [API], ttl=30)
    assert _outbound(insp, cache)[1] and _outbound(insp, cache)[1] and cache.hits == 1
    now[0] += 31  # the learned name expires: nothing else happens, no generation was announced
    s, ok = _outbound(insp, cache)
    assert not ok and s.verdict == "deny"
    fq.learn("api.example.com", [OTHER], ttl=30)  # the name moved to another address
    assert not _outbound(insp, cache)[1]
    assert _outbound(insp, cache, dst=OTHER)[1]


def test_many_distinct_peers_keep_the_cache_bounded(tmp_path):
    ids = IdentityMap([Identity.make(f"10.9.{i // 250}.{i % 250 + 1}", "clients", f"c{i}", {"app": "c"})
                       for i in range(600)])
    insp = _insp(tmp_path, ids=ids)
    cache = VerdictCache(max_entries=64)
    for i in range(600):
        assert _inbound(insp, cache, peer=f"10.9.{i // 250}.{i % 250 + 1}")[1]
        assert len(cache) <= 64
    assert cache.misses == 600


def test_an_identity_change_reaches_flows_already_open(tmp_path):
    """The pod IP CLIENT moves to namespace evil while its allowed flow is open: the reload's
    re-evaluation decides with the identity the address has now, and cuts the flow."""
    cache = VerdictCache()
    insp = _insp(tmp_path)
    s, ok = _inbound(insp, cache)
    other, ok2 = _inbound(insp, cache, peer=OTHER)
    assert ok and ok2
    moved = _insp(tmp_path, ids=_ids(client_ns="evil"), name="p2.yaml")
    assert s.reevaluate(moved, "reload") is True
    assert s.verdict == "deny" and s.close_reason == "reload"
    assert s.peer.namespace == "clients"  # the record keeps who connected
    assert other.reevaluate(moved, "reload") is False  # an address that did not move stays allowed
