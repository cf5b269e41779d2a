"""The L3/L4 compiler, the protocol schema and the NFLOG decoding, without a kernel.

What the kernel does with these rules is proved in tests/integration/test_l3_segmentation.py;
here: that the compiler follows the engine (order, defaults, segmentation, modes, quarantine),
that an identity change touches only sets, and that what validate accepts can be enforced.
"""

from __future__ import annotations

import socket
import struct

import pytest

from firewall.datapath.l3rules import compile_plan, render_full, render_sets
from firewall.datapath.nflog import (
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    L3Events,
    config_message,
    parse_attrs,
    parse_packet,
    parse_prefix,
)
from firewall.identity.identity import Identity
from firewall.policy.engine import PolicySet
from firewall.policy.loader import PolicyError, load_policy_files

SCOPE = "pci.palisade.dev/scope"
POLICY = """\
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata: {name: base}
spec:
  rules:
    - name: no-gre-anywhere
      direction: egress
      ports: [{protocol: 47}]
      action: deny
---
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: pay, namespace: pay}
spec:
  selector: {matchLabels: {app: api}}
  mode: protect
  default: deny
  ingress:
    - name: shop-udp
      from: [{namespace: shop}]
      ports: [{port: 5001, endPort: 5003, protocol: UDP}, {protocol: ICMP, icmpTypes: [echo-request, 13]}]
      action: allow
    - name: web-only
      from: [{namespace: shop}]
      ports: [{port: 443}]
      action: allow
    - name: http-any
      appProto: http
      action: allow
    - name: partner
      from: [{cidr: 192.0.2.0/24}]
      ports: [{protocol: SCTP}]
      exception: true
      description: card network link
      action: allow
  egress:
    - name: syslog
      to: [{scope: out-of-scope}]
      ports: [{port: 514, protocol: UDP}]
      action: alert
"""


@pytest.fixture
def policy(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY)
    return PolicySet.load([str(p)])


LOCAL = Identity.make("10.0.0.1", "pay", "api-0", {"app": "api", SCOPE: "cde"})
SHOP = Identity.make("10.0.0.2", "shop", "web-0", {"app": "web", SCOPE: "connected"})
SHOP6 = Identity.make("fd00::2", "shop", "web-0", {"app": "web", SCOPE: "connected"})
OOS = Identity.make("10.0.0.3", "analytics", "a-0", {"app": "a"})


def _rules(plan, chain):
    return [ln.split(f" {chain} ", 1)[1] for ln in plan.structure if f" {chain} " in ln and "add rule" in ln]


def test_compiles_engine_order_segmentation_and_protocols(policy):
    plan = compile_plan(policy, [SHOP, SHOP6, OOS], LOCAL)
    inp = _rules(plan, "l3_in_policy")
    # segmented peers (everything not known as cde/connected) go to the segmentation chain first
    assert inp[0].startswith("meta nfproto ipv4 ip saddr != @l3_seg_in4 goto l3_in_seg")
    assert plan.dynamic_sets["l3_seg_in4"][1] == ["10.0.0.2"]
    # shop-udp: a UDP range and ICMP types, IPv4 and IPv6 (ICMP only on v4), then the default
    body = "\n".join(inp)
    assert 'meta l4proto udp th dport 5001-5003 accept comment "shop-udp"' in body
    assert "meta l4proto icmp icmp type 8 accept" in body and "icmp type 13" in body
    assert "ip6 saddr" in body and not any("ip6" in r and "icmp type" in r for r in inp)
    # TCP-only and appProto rules are the proxy's: never compiled
    assert "web-only" not in body and "http-any" not in body
    assert inp[-1].endswith('prefix "pl3|deny|1|ingress|default-deny" drop')
    # the segmentation chain: only the exception rule, then the segmentation deny
    seg = _rules(plan, "l3_in_seg")
    assert all("partner" in r for r in seg[:-1]) and seg[-1].endswith("cde-segmentation\" drop")
    assert any("@l3_p" in r and "!= @l3_known4" in r and "sctp" in r for r in seg)
    assert plan.static_sets and any(v[2] == ("192.0.2.0/24",) for v in plan.static_sets.values())
    out = _rules(plan, "l3_out_policy")
    # cluster deny first; the alert rule logs and accepts; an out-of-scope peer selector also
    # matches the world (addresses no identity source knows)
    assert out[0].startswith("meta l4proto 47 log") and "no-gre-anywhere" in out[0] and out[0].endswith(
        'comment "no-gre-anywhere"')
    alert = [r for r in out if "syslog" in r]
    assert alert and all('prefix "pl3|alert|0|egress|syslog" accept' in r for r in alert)
    assert any("!= @l3_known4" in r for r in alert)


def test_modes_learn_and_monitor_log_instead_of_drop(policy):
    mon = compile_plan(policy, [SHOP], LOCAL, mode_override="monitor")
    assert not any(r.endswith("drop") for r in _rules(mon, "l3_in_policy"))
    assert any('"pl3|deny|0|ingress|default-deny" accept' in r for r in _rules(mon, "l3_in_policy"))
    learn = compile_plan(PolicySet.empty(), [SHOP], LOCAL)
    rules = _rules(learn, "l3_in_policy") + _rules(learn, "l3_in_seg")
    assert 'log group 1337 snaplen 128 prefix "pl3|allow|0|ingress|default-allow" accept' in rules
    # no policy: learn mode, every new flow is logged (policy learn reads it), nothing dropped
    assert all(r.endswith("accept") or "goto" in r for r in rules)
    assert any('"pl3|deny|0|ingress|cde-segmentation" accept' in r for r in rules)


def test_quarantine_cuts_everything_but_admin_and_probes(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY)
    ps = PolicySet.load([str(p)], node_ip="10.0.0.254", probe_ports=frozenset({8080}))
    plan = compile_plan(ps, [SHOP], LOCAL, quarantined=True)
    pre = _rules(plan, "l3_in_pre")
    assert pre[0].startswith("meta l4proto tcp ct mark != 0x53d return")  # the proxy's (it cuts them)
    assert "tcp dport 15020 return" in pre[1]
    assert "ip saddr 10.0.0.254 tcp dport { 8080 } return" in pre[2]
    assert pre[-1].endswith('"pl3|deny|1|ingress|quarantine" drop')
    assert not _rules(compile_plan(ps, [SHOP], LOCAL), "l3_in_pre")


def test_identity_change_is_a_sets_only_update(policy):
    a = compile_plan(policy, [SHOP, OOS], LOCAL)
    b = compile_plan(policy, [SHOP, OOS, Identity.make("10.0.0.9", "shop", "w1", {"app": "w"})], LOCAL)
    assert a.key() == b.key() and a.dynamic_sets != b.dynamic_sets
    text = render_sets(b)
    assert "add rule" not in text and "flush set inet palisade l3_known4" in text
    assert "10.0.0.9" in text
    # a departed peer leaves every set it was in
    c = compile_plan(policy, [OOS], LOCAL)
    assert "10.0.0.2" not in render_sets(c)
    # a scope change moves the peer behind the segmentation: still sets only
    d = compile_plan(policy, [Identity.make("10.0.0.2", "shop", "web-0", {"app": "web"}), OOS], LOCAL)
    assert d.key() == a.key() and d.dynamic_sets["l3_seg_in4"][1] == []


def test_full_render_replaces_what_exists(policy):
    plan = compile_plan(policy, [SHOP], LOCAL)
    existing = "table inet palisade {\n\tset l3_p9_4 {\n\t}\n\tchain l3_in_seg {\n\t}\n}"
    text = render_full(plan, existing)
    lines = text.splitlines()
    assert lines.index("delete set inet palisade l3_p9_4") < lines.index(
        "add set inet palisade l3_known4 { type ipv4_addr; }")
    assert "delete chain inet palisade l3_in_seg" in lines
    assert text.count("flush chain inet palisade l3_in_policy") == 1


@pytest.mark.parametrize("ports,needle", [
    ("[{port: 53, protocol: UDP}]\n      appProto: http", "cannot be enforced on a UDP rule"),
    ("[{port: 53, protocol: UDP}]\n      http: [{pathPrefix: /}]", "cannot be enforced on a UDP rule"),
    ("[{protocol: ICMP}]\n      appProto: dns", "need TCP"),
    ("[{protocol: ICMP, port: 3}]", "has no ports"),
    ("[{protocol: UDP, icmpTypes: [8]}]", "only apply to ICMP"),
    ("[{protocol: 47, icmpTypes: [8]}]", "only apply to ICMP"),
    ("[{protocol: ICMPv6, icmpTypes: [timestamp-request]}]", "is not an ICMPv6 type"),
    ("[{protocol: ICMP, icmpTypes: [bogus]}]", "invalid ICMP type"),
    ("[{protocol: 0}]", "invalid protocol"),
    ("[{protocol: 256}]", "invalid protocol"),
    ("[{protocol: GRE}]", "invalid protocol"),
    ("[{protocol: true}]", "valid string"),
    ("[{protocol: TCP}]", "port is required for TCP"),
    ("[{endPort: 9, protocol: UDP}]", "endPort needs port"),
])
def test_validate_rejects_what_cannot_be_enforced(tmp_path, ports, needle):
    p = tmp_path / "bad.yaml"
    p.write_text("apiVersion: palisade.dev/v1\nkind: FirewallPolicy\nmetadata: {name: x, namespace: n}\n"
                 f"spec:\n  ingress:\n    - name: r\n      ports: {ports}\n      action: allow\n")
    with pytest.raises(PolicyError, match=needle):
        load_policy_files([str(p)])


def test_protocol_spellings_are_canonical(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(
        "apiVersion: palisade.dev/v1\nkind: FirewallPolicy\nmetadata: {name: x, namespace: n}\n"
        "spec:\n  egress:\n    - name: r\n      ports: [{port: 53, protocol: udp}, {protocol: 17}, "
        "{protocol: icmpv6, icmpTypes: [echo-request, 2]}, {protocol: '47'}, {protocol: 132}]\n"
        "      action: allow\n    - name: dns\n      ports: [{port: 53, protocol: UDP}]\n"
        "      dns: {qnameSuffix: [a.example]}\n      action: allow\n")
    doc = load_policy_files([str(p)])[0][0].policy
    ports = doc.spec.egress[0].ports
    assert [x.protocol for x in ports] == ["UDP", "UDP", "ICMPv6", "47", "SCTP"]
    assert ports[2].ranges() == ((2, 2), (128, 128))
    assert ports[1].ranges() == ((1, 65535),) and ports[3].ranges() == ((0, 0),)


# ---------------------------------------------------------------- NFLOG decoding
def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + udp


def _attrs(prefix: str, pkt: bytes) -> dict[int, bytes]:
    return {NFULA_PREFIX: prefix.encode() + b"\0", NFULA_PAYLOAD: pkt}


def test_parse_packet_and_prefix():
    p = parse_packet(2, _attrs("pl3|deny|1|egress|default-deny", _ipv4_udp("10.0.0.1", "10.0.0.3", 4000, 7000)))
    assert p is not None and (p.proto, p.src_ip, p.dest_ip, p.src_port, p.dest_port) == (
        "UDP", "10.0.0.1", "10.0.0.3", 4000, 7000)
    assert p.verdict == "deny" and p.enforced and p.rule == "default-deny"
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 8, 58, 64, socket.inet_pton(socket.AF_INET6, "fd00::1"),
                      socket.inet_pton(socket.AF_INET6, "fd00::3")) + bytes([128, 0, 0, 0, 0, 0, 0, 0])
    q = parse_packet(10, _attrs("pl3|deny|0|ingress|x", ip6))
    assert q is not None and q.proto == "ICMPv6" and q.icmp_type == 128 and not q.enforced
    # not ours, malformed, truncated: ignored, never an exception
    assert parse_prefix("other|deny|1|egress|x") is None
    assert parse_packet(2, _attrs("pl3|deny|1|sideways|x", _ipv4_udp("1.1.1.1", "2.2.2.2", 1, 2))) is None
    for junk in (b"", b"\x45", b"\x60" + b"\0" * 10, b"\xff" * 64):
        assert parse_packet(2, _attrs("pl3|deny|1|egress|x", junk)) is None
    assert parse_attrs(b"\x03\x00") == {} and parse_attrs(b"\xff\xff\x01\x00abcd") == {}


def test_config_message_shape():
    msg = config_message(1337, 1, 7)
    length, kind, flags, seq = struct.unpack_from("=IHHI", msg)
    assert length == len(msg) and kind == (4 << 8) | 1 and seq == 7 and flags & 1
    assert struct.unpack_from("!H", msg, 18)[0] == 1337


def test_events_are_aggregated_per_flow_and_rate_limited():
    out: list[dict] = []
    ev = L3Events(out.append, lambda ip: Identity(ip), lambda: LOCAL, lambda: "protect",
                  flow_idle=5, alerts_per_second=3, max_flows=100)
    pkt = parse_packet(2, _attrs("pl3|deny|1|egress|default-deny", _ipv4_udp("10.0.0.1", "10.0.0.3", 4000, 7000)))
    for _ in range(50):
        ev.add(pkt, now=100.0)
    assert [e["event_type"] for e in out] == ["alert"]
    assert out[0]["alert"]["action"] == "blocked" and out[0]["proto"] == "UDP"
    assert out[0]["src_workload"]["namespace"] == "pay" and out[0]["dest_workload"]["world"] is True
    for port in range(7001, 7021):  # 20 more flows: at most the bucket's worth of alerts
        ev.add(parse_packet(2, _attrs("pl3|deny|1|egress|default-deny",
                                      _ipv4_udp("10.0.0.1", "10.0.0.3", 4000, port))), now=100.0)
    assert 2 <= len(out) <= 5
    assert ev.expire(now=101.0) == 0
    n = len(out)
    assert ev.expire(now=106.0) == 21
    flows = [e for e in out[n:] if e["dest_port"] == 7000]
    assert flows[0]["flow"]["pkts_toserver"] == 50 and flows[0]["verdict"] == "deny"
    assert flows[0]["flow_id"] == out[0]["flow_id"]  # the alert and the record of one flow


def test_policy_learn_learns_kernel_records_and_validate_accepts_them(tmp_path):
    from firewall.policy.learn import learn_from_events, render_policies

    local = {"namespace": "pay", "pod": "api-0", "labels": {"app": "api", SCOPE: "cde"}, "scope": "cde"}
    peer = {"namespace": "shop", "pod": "web-0", "labels": {"app": "web", SCOPE: "connected"}, "scope": "connected"}
    base = {"event_type": "flow", "verdict": "allow", "mode": "learn", "enforcement": "kernel",
            "direction": "inbound", "src_workload": peer, "dest_workload": local, "app_proto": "unknown"}
    events = [{**base, "proto": "UDP", "dest_port": 5001},
              {**base, "proto": "ICMP", "dest_port": None, "icmp_type": 8},
              {**base, "proto": "47", "dest_port": None},
              {**base, "proto": "TCP", "dest_port": 9000}]
    learned = learn_from_events(events)
    text = render_policies(learned)
    p = tmp_path / "learned.yaml"
    p.write_text(text)
    doc = load_policy_files([str(p)])[0][0].policy
    ports = {(x.protocol, x.port, tuple(x.icmp_types or ())) for r in doc.spec.ingress for x in r.ports or ()}
    assert {("UDP", 5001, ()), ("ICMP", None, ("8",)), ("47", None, ()), ("TCP", 9000, ())} <= ports


def test_report_names_portless_protocols():
    from firewall.audit.report import _port_text

    assert _port_text({"protocol": "ICMP", "icmpTypes": ["echo-request"]}) == "ICMP echo-request"
    assert _port_text({"protocol": "47"}) == "47"
    assert _port_text({"protocol": "UDP"}) == "any/UDP"
    assert _port_text({"port": 53, "protocol": "UDP"}) == "53/UDP"
