"""Segmentation for every IP protocol (issue 16), through real namespaces and real peers.

``payments`` is a CDE pod in protect mode (default deny) with the real sidecar; ``checkout``
(connected) and ``analytics`` (out-of-scope) are peers without one.  Peers are real
programs: socat UDP receivers and senders, dnsmasq on a non-53 port and dig, ping, a raw
IP socket for an unassigned protocol number and for a hand-made SYN+FIN segment.

A denied packet is proved absent by a contrast: after it, an allowed packet on the same
path (or the same packet from a pod without the sidecar) is sent and awaited, so "nothing
arrived" is never just "we did not wait long enough".
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import yaml

from firewall.identity.podinfo import write_podinfo
from tests.harness import PY, REPO, Cluster, wait_until

pytestmark = pytest.mark.netns

POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: payments, namespace: payments}
spec:
  selector: {matchLabels: {app: payment-api}}
  mode: protect
  default: deny
  ingress:
    - name: checkout-udp
      from: [{namespace: shop, labels: {app: checkout}}]
      ports: [{port: 5001, protocol: UDP}, {protocol: ICMP, icmpTypes: [echo-request]},
              {protocol: ICMPv6, icmpTypes: [echo-request]}]
      action: allow
    - name: checkout-web
      from: [{namespace: shop}]
      ports: [{port: 9000}]
      action: allow
  egress:
    - name: resolver-on-5300
      to: [{namespace: shop, labels: {app: checkout}}]
      ports: [{port: 5300, protocol: UDP}]
      action: allow
"""

EXTRA_RULE = """\
    - name: checkout-udp-5002
      from: [{namespace: shop, labels: {app: checkout}}]
      ports: [{port: 5002, protocol: udp}]
      action: allow
"""

RAW_RECV = r"""
import socket, sys
proto, out = int(sys.argv[1]), sys.argv[2]
fam = socket.AF_INET6 if len(sys.argv) > 3 else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, proto)
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    with open(out, "ab") as fh:
        fh.write(addr[0].encode() + b" " + data.hex().encode() + b"\n")
"""

RAW_SEND = r"""
import socket, sys
proto, dst, payload = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, proto)
s.sendto(payload, (dst, 0))
"""

SYNFIN_SEND = r"""
import socket, struct, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
hdr = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x03, 65535, 0, 0)  # SYN|FIN
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr) + len(payload))
c = csum(pseudo + hdr + payload)
hdr = hdr[:16] + struct.pack("!H", c) + hdr[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.sendto(hdr + payload, (dst, 0))
"""


WEBHOOK = r"""
import http.server, sys
out = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with open(out, "ab") as fh:
            fh.write(body + b"\n")
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


class Env:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.tmp = Path(c.tmp)
        self.payments = c.pod("payments", namespace="payments")
        self.checkout = c.pod("checkout", namespace="shop")
        self.analytics = c.pod("analytics", namespace="analytics")
        self.policy = self.tmp / "policy.yaml"
        self.policy.write_text(POLICY)
        self.identity = self.tmp / "identity.yaml"
        self.write_identity()
        self.labels = {"app": "payment-api", "pci.palisade.dev/scope": "cde"}
        self.podinfo = self.tmp / "podinfo"
        self.podinfo.mkdir()
        write_podinfo(str(self.podinfo), {}, self.labels)
        os.chmod(self.podinfo, 0o755)
        self.redirect_done = False
        self.sc = None
        self.sinks: dict[tuple[str, int], Path] = {}
        # an alert webhook in a pod the policy does not let payments reach: the sidecar's own
        # connection to it carries its SO_MARK, so it is neither redirected nor denied
        self.webhook_log = self.tmp / "webhook.jsonl"
        self.analytics.popen([PY, "-c", WEBHOOK, "8088", str(self.webhook_log)])
        self.analytics.wait_listening(8088)

    def write_identity(self, checkout_scope: str = "connected", checkout_ip: str | None = None) -> None:
        ident = [
            {"ip": self.payments.ip, "namespace": "payments", "pod": "payments",
             "labels": {"app": "payment-api", "pci.palisade.dev/scope": "cde"}},
            {"ip": self.payments.ip6, "namespace": "payments", "pod": "payments",
             "labels": {"app": "payment-api", "pci.palisade.dev/scope": "cde"}},
            {"ip": self.analytics.ip, "namespace": "analytics", "pod": "analytics",
             "labels": {"app": "analytics", "pci.palisade.dev/scope": "out-of-scope"}},
            {"ip": self.analytics.ip6, "namespace": "analytics", "pod": "analytics",
             "labels": {"app": "analytics", "pci.palisade.dev/scope": "out-of-scope"}},
        ]
        if checkout_ip != "":
            for ip in ([checkout_ip] if checkout_ip else [self.checkout.ip, self.checkout.ip6]):
                ident.append({"ip": ip, "namespace": "shop", "pod": "checkout",
                              "labels": {"app": "checkout", "pci.palisade.dev/scope": checkout_scope}})
        tmp = self.identity.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(ident))
        tmp.replace(self.identity)

    def start(self, *extra: str):
        args = ["--no-l7", "--no-dlp", "--identity", str(self.identity), "--podinfo", str(self.podinfo),
                "--labels", json.dumps(self.labels), "--policy", str(self.policy),
                "--alert-webhook", f"http://{self.analytics.ip}:8088/", *extra]
        self.sc = self.payments.start_sidecar(*args, apply_redirect=not self.redirect_done,
                                              env={"POD_NAMESPACE": "payments"})
        self.redirect_done = True
        return self.sc

    # --- real peers ----------------------------------------------------------------------
    def udp_sink(self, pod, port: int, v6: bool = False) -> Path:
        """socat receiving UDP datagrams on ``port``, appending each to a file."""
        out = self.tmp / f"{pod.name}-udp{'6' if v6 else '4'}-{port}.bin"
        addr = f"UDP6-RECV:{port},ipv6only=1" if v6 else f"UDP4-RECV:{port}"
        pod.popen(["socat", "-u", addr, f"OPEN:{out},creat,append"])
        pod.wait_listening(port, udp=True)
        return out

    def sink(self, pod, port: int) -> Path:
        """The IPv4 UDP receiver on ``pod:port``, started once."""
        key = (pod.name, port)
        if key not in self.sinks:
            self.sinks[key] = self.udp_sink(pod, port)
        return self.sinks[key]

    def udp_send(self, pod, host: str, port: int, payload: str, uid: int | None = None) -> None:
        addr = f"UDP6-SENDTO:[{host}]:{port}" if ":" in host else f"UDP4-SENDTO:{host}:{port}"
        cmd = ["socat", "-u", "-", addr]
        if uid is not None:
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
        pod.run(cmd, input=payload, check=False, timeout=10)

    def raw_sink(self, pod, proto: int, v6: bool = False) -> Path:
        out = self.tmp / f"{pod.name}-raw{proto}{'-6' if v6 else ''}.txt"
        p = pod.popen([PY, "-c", RAW_RECV, str(proto), str(out), *(["6"] if v6 else [])])
        assert p.stdout.readline().strip() == b"ready"
        return out

    def raw_send(self, pod, proto: int, dst: str, payload: str) -> None:
        pod.run([PY, "-c", RAW_SEND, str(proto), dst, payload], timeout=10, check=False)  # EPERM when dropped

    def ping(self, pod, dst: str) -> bool:
        return pod.run(["ping", "-c", "1", "-W", "1", dst], check=False, timeout=10).returncode == 0


def _arrived(path: Path, marker: str) -> bool:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return marker.encode() in data or marker.encode().hex().encode() in data


def _tag(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def _l3_events(sc, event_type: str, **match) -> list[dict]:
    return [e for e in sc.events(event_type) if e.get("enforcement") == "kernel"
            and all(e.get(k) == v for k, v in match.items())]


def _metric(sc, name: str, **labels) -> float:
    body = sc.http("/metrics")[1]
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def env():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = Cluster("pg", 236)
    try:
        e = Env(c)
        e.start()
        yield e
    finally:
        c.close()


def test_cde_to_out_of_scope_udp_icmp_rawproto_synfin_denied_and_reported(env):
    pay, ana, chk = env.payments, env.analytics, env.checkout
    sink4, sink6 = env.udp_sink(ana, 7000), env.udp_sink(ana, 7000, v6=True)
    raw = env.raw_sink(ana, 253)
    tcp_raw = env.raw_sink(ana, 6)
    card = "4111111111111111"
    denied4, denied6, rawtag, synfin = _tag(card), _tag("v6" + card), _tag("proto253"), _tag("synfin")
    env.udp_send(pay, ana.ip, 7000, denied4)
    env.udp_send(pay, ana.ip6, 7000, denied6)
    env.raw_send(pay, 253, ana.ip, rawtag)
    pay.run([PY, "-c", SYNFIN_SEND, pay.ip, ana.ip, "7001", synfin], timeout=10, check=False)
    assert not env.ping(pay, ana.ip)
    assert not env.ping(pay, ana.ip6)
    # contrast: the same from a pod without the sidecar arrives (the receivers work)
    ok4, ok6, okraw, oksyn = _tag("ctl4"), _tag("ctl6"), _tag("ctlraw"), _tag("ctlsyn")
    env.udp_send(chk, ana.ip, 7000, ok4)
    env.udp_send(chk, ana.ip6, 7000, ok6)
    env.raw_send(chk, 253, ana.ip, okraw)
    chk.run([PY, "-c", SYNFIN_SEND, chk.ip, ana.ip, "7001", oksyn], timeout=10)
    wait_until(lambda: _arrived(sink4, ok4) and _arrived(sink6, ok6) and _arrived(raw, okraw)
               and _arrived(tcp_raw, oksyn), 10, what="control packets")
    assert env.ping(chk, ana.ip)
    assert not _arrived(sink4, denied4) and not _arrived(sink6, denied6)
    assert not _arrived(raw, rawtag)
    assert not _arrived(tcp_raw, synfin)
    # evidence: alerts per protocol with the workload identities, then aggregated flow records
    sc = env.sc
    a = sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("proto") == "UDP"
                      and e.get("dest_ip") == ana.ip and e.get("dest_port") == 7000, what="UDP alert")
    assert a["alert"]["action"] == "blocked" and a["alert"]["signature"] == "default-deny"
    assert a["src_workload"]["scope"] == "cde" and a["dest_workload"]["namespace"] == "analytics"
    assert a["direction"] == "outbound" and a["mode"] == "protect"
    for proto, dst in (("UDP", ana.ip6), ("253", ana.ip), ("ICMP", ana.ip), ("ICMPv6", ana.ip6)):
        sc.wait_event(lambda e, p=proto, d=dst: e.get("event_type") == "alert" and e.get("proto") == p
                      and e.get("dest_ip") == d, what=f"{proto} alert")
    sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("proto") == "TCP"
                  and e.get("dest_port") == 7001 and e["alert"]["signature"] in ("ct-invalid", "tcp-syn-fin"),
                  what="SYN+FIN alert")
    f = sc.wait_event(lambda e: e.get("event_type") == "flow" and e.get("proto") == "UDP"
                      and e.get("dest_ip") == ana.ip and e.get("enforcement") == "kernel", timeout=20,
                      what="UDP flow record")
    assert f["verdict"] == "deny" and f["flow"]["pkts_toserver"] >= 1 and f["rule"] == "default-deny"
    assert _metric(sc, "palisade_l3_packets_total", direction="egress", proto="UDP", verdict="deny") >= 2


def test_out_of_scope_and_connected_to_cde_by_port(env):
    pay, ana, chk = env.payments, env.analytics, env.checkout
    s1, s2 = env.sink(pay, 5001), env.sink(pay, 5002)
    s1v6 = env.udp_sink(pay, 5001, v6=True)
    from_ana, from_chk_denied, from_chk = _tag("ana"), _tag("chk-5002"), _tag("chk-5001")
    env.udp_send(ana, pay.ip, 5001, from_ana)        # out-of-scope -> cde: segmentation
    env.udp_send(chk, pay.ip, 5002, from_chk_denied)  # connected -> cde, port not allowed
    env.udp_send(chk, pay.ip, 5001, from_chk)         # connected -> cde, allowed
    v6 = _tag("chk6")
    env.udp_send(chk, pay.ip6, 5001, v6)
    wait_until(lambda: _arrived(s1, from_chk) and _arrived(s1v6, v6), 10, what="allowed UDP")
    assert not _arrived(s1, from_ana) and not _arrived(s2, from_chk_denied)
    assert env.ping(chk, pay.ip) and env.ping(chk, pay.ip6)   # echo allowed by policy
    assert not env.ping(ana, pay.ip) and not env.ping(ana, pay.ip6)
    sc = env.sc
    seg = sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_ip") == ana.ip
                        and e.get("proto") == "UDP", what="segmentation alert")
    assert seg["alert"]["signature"] == "cde-segmentation" and seg["direction"] == "inbound"
    assert seg["src_workload"]["scope"] == "out-of-scope" and seg["dest_workload"]["scope"] == "cde"
    d = sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_ip") == chk.ip
                      and e.get("dest_port") == 5002, what="default-deny alert")
    assert d["alert"]["signature"] == "default-deny"


def test_dns_server_on_another_port_by_policy(env):
    pay, ana, chk = env.payments, env.analytics, env.checkout
    for pod in (chk, ana):
        pod.popen(["dnsmasq", "-k", "-p", "5300", "--no-resolv", "--no-hosts", "--bind-interfaces",
                   f"--listen-address={pod.ip}", "--address=/pay.test/10.1.2.3", "--pid-file="])
        pod.wait_listening(5300, udp=True)
    ok = pay.run(["dig", "+short", "+tries=1", "+time=2", "-p", "5300", f"@{chk.ip}", "x.pay.test"],
                 check=False, timeout=15)
    assert ok.stdout.strip() == "10.1.2.3", ok
    bad = pay.run(["dig", "+short", "+tries=1", "+time=2", "-p", "5300", f"@{ana.ip}", "x.pay.test"],
                  check=False, timeout=15)
    assert "10.1.2.3" not in bad.stdout
    # analytics' dnsmasq answers anyone else (contrast)
    ctl = chk.run(["dig", "+short", "+tries=1", "+time=2", "-p", "5300", f"@{ana.ip}", "x.pay.test"],
                  check=False, timeout=15)
    assert ctl.stdout.strip() == "10.1.2.3"


def test_uid_1337_without_the_mark_is_redirected_and_denied(env):
    pay, ana = env.payments, env.analytics
    ana.popen(["socat", "TCP4-LISTEN:9100,fork,reuseaddr", "SYSTEM:echo hello"])
    ana.wait_listening(9100)
    r = pay.run(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "curl", "-s", "-m", "5",
                 f"telnet://{ana.ip}:9100"], check=False, timeout=20, input="")
    assert "hello" not in r.stdout
    f = env.sc.wait_event(lambda e: e.get("event_type") == "flow" and e.get("dest_port") == 9100
                          and e.get("proto") == "TCP", what="the sidecar saw the UID-1337 connection")
    assert f["verdict"] == "deny"
    # ... and it cannot put on the sidecar's mark: SO_MARK needs CAP_NET_ADMIN
    r = pay.run(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "--inh-caps=-all", PY, "-c",
                 "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, 36, 0x53c)"],
                check=False, timeout=20)
    assert r.returncode != 0 and "PermissionError" in r.stderr, r
    sink = env.udp_sink(ana, 7010)
    tag = _tag("uid1337")
    env.udp_send(pay, ana.ip, 7010, tag, uid=1337)
    env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("dest_port") == 7010,
                      what="UID-1337 UDP denied")
    ctl = _tag("ctl")
    env.udp_send(env.checkout, ana.ip, 7010, ctl)
    wait_until(lambda: _arrived(sink, ctl), 10, what="control")
    assert not _arrived(sink, tag)


def test_reload_and_identity_change_update_sets_while_traffic_runs(env):
    pay, chk = env.payments, env.checkout
    sink = env.sink(pay, 5003)
    env.sink(pay, 5004)
    # a sender that keeps running across the updates
    stream = chk.popen(["sh", "-c", f"while true; do echo stream-$(date +%s%N) | socat -u - UDP4-SENDTO:{pay.ip}:5004;"
                        " sleep 0.05; done"])
    assert stream.poll() is None
    tag = _tag("before")
    env.udp_send(chk, pay.ip, 5003, tag)
    env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("dest_port") == 5003,
                      what="5003 denied before the reload")
    text = env.policy.read_text().replace("  egress:\n", EXTRA_RULE.replace("5002", "5003") + "  egress:\n")
    env.policy.write_text(text)
    try:
        wait_until(lambda: _try(lambda: _send_and_see(env, chk, pay.ip, 5003)), 15,
                   what="5003 allowed after the policy reload")
        # identity change: checkout becomes out-of-scope -> cde-segmentation applies, sets only
        syncs = _metric(env.sc, "palisade_l3_syncs_total", kind="sets")
        env.write_identity(checkout_scope="out-of-scope")
        wait_until(lambda: _metric(env.sc, "palisade_l3_syncs_total", kind="sets") > syncs, 15,
                   what="an identity-only (sets) update")
        t = _tag("seg")
        env.udp_send(chk, pay.ip, 5003, t)
        env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_ip") == chk.ip
                          and e["alert"]["signature"] == "cde-segmentation", what="segmented after the change")
        assert not _arrived(sink, t)
    finally:
        env.policy.write_text(POLICY)
        env.write_identity()
    wait_until(lambda: _try(lambda: _send_and_see(env, chk, pay.ip, 5001)), 15, what="restored")
    stream.kill()


def _try(fn) -> bool:
    try:
        return bool(fn())
    except TimeoutError:
        return False


def _send_and_see(env, pod, host, port) -> bool:
    sink = env.sink(env.payments, port)
    t = _tag("probe")
    env.udp_send(pod, host, port, t)
    return bool(wait_until(lambda: _arrived(sink, t), 0.5))


def test_quarantine_drops_all_but_admin(env):
    pay, chk = env.payments, env.checkout
    assert _send_and_see(env, chk, pay.ip, 5001)
    write_podinfo(str(env.podinfo), {"palisade.dev/quarantine": "true"}, env.labels)
    try:
        env.sc.wait_event(lambda e: e.get("event_type") == "quarantine", what="quarantine on")
        wait_until(lambda: not env.ping(chk, pay.ip), 10, what="ICMP cut")
        t = _tag("q")
        env.udp_send(chk, pay.ip, 5001, t)
        env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e["alert"]["signature"] == "quarantine"
                          and e.get("src_ip") == chk.ip, what="quarantine alert")
        assert not _arrived(env.sink(pay, 5001), t)
        # the admin port stays reachable from outside the pod
        code = chk.run([PY, "-c", f"import urllib.request;print(urllib.request.urlopen("
                        f"'http://{pay.ip}:15020/healthz',timeout=5).status)"], check=False).stdout.strip()
        assert code == "200"
    finally:
        write_podinfo(str(env.podinfo), {}, env.labels)
    wait_until(lambda: env.ping(chk, pay.ip), 15, what="quarantine lifted")


def test_monitor_mode_allows_and_logs_what_protect_would_deny(env):
    pay, ana = env.payments, env.analytics
    sink = env.sink(pay, 5001)
    write_podinfo(str(env.podinfo), {"palisade.dev/mode": "monitor"}, env.labels)
    try:
        def through() -> bool:
            t = _tag("mon")
            env.udp_send(ana, pay.ip, 5001, t)
            return _try(lambda: wait_until(lambda: _arrived(sink, t), 0.5))

        wait_until(through, 15, what="monitor mode lets segmentation-denied UDP through")
        a = env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_ip") == ana.ip
                              and e.get("mode") == "monitor" and e["alert"]["action"] == "allowed",
                              what="would-deny alert")
        assert a["alert"]["signature"] == "cde-segmentation"
    finally:
        write_podinfo(str(env.podinfo), {}, env.labels)

    def denied_again() -> bool:
        t = _tag("prot")
        env.udp_send(ana, pay.ip, 5001, t)
        ctl = _tag("ctl")
        env.udp_send(env.checkout, pay.ip, 5001, ctl)
        wait_until(lambda: _arrived(sink, ctl), 5)
        return not _arrived(sink, t)

    wait_until(denied_again, 15, what="protect again")


def test_sidecar_killed_rules_keep_denying_restart_rebuilds_from_scratch(env):
    pay, ana, chk = env.payments, env.analytics, env.checkout
    env.sc.stop(signal.SIGKILL)
    table = pay.run(["nft", "list", "table", "inet", "palisade"]).stdout
    assert "l3_in_policy" in table and "cde-segmentation" in table
    t = _tag("dead")
    env.udp_send(ana, pay.ip, 5001, t)
    assert _send_and_see(env, chk, pay.ip, 5001)  # allowed flows still pass: rules, not the process
    assert not _arrived(env.sink(pay, 5001), t)
    # while the sidecar is down, checkout's address changes owner: now analytics' (out-of-scope)
    ident = yaml.safe_load(env.identity.read_text())
    for i in ident:
        if i["ip"] == chk.ip:
            i.update({"namespace": "analytics", "pod": "newcomer",
                      "labels": {"app": "newcomer", "pci.palisade.dev/scope": "out-of-scope"}})
    env.identity.write_text(yaml.safe_dump(ident))
    try:
        env.start()
        t2 = _tag("stale")
        env.udp_send(chk, pay.ip, 5001, t2)
        env.sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_ip") == chk.ip
                          and e.get("dest_port") == 5001, what="no stale allow after restart")
        assert not _arrived(env.sink(pay, 5001), t2)
    finally:
        env.write_identity()
    wait_until(lambda: _try(lambda: _send_and_see(env, chk, pay.ip, 5001)), 15, what="allowed again")


def test_segtest_records_udp_and_icmp_per_protocol(env):
    pay, ana, chk = env.payments, env.analytics, env.checkout
    plan = env.tmp / "segplan.yaml"
    plan.write_text(yaml.safe_dump([
        {"source": "analytics", "scope": "out-of-scope",
         "targets": [{"name": "payments", "address": pay.ip, "ports": [9000], "udp": [5001], "icmp": True},
                     {"name": "payments-v6", "address": pay.ip6, "icmp": True}]},
        {"source": "checkout", "scope": "connected",
         "targets": [{"name": "payments", "address": pay.ip, "icmp": True}]}]))
    plan.chmod(0o644)
    docs = {}
    for pod, src in ((ana, "analytics"), (chk, "checkout")):
        r = pod.run([PY, "-m", "firewall", "segtest", "--plan", str(plan), "--source", src, "--timeout", "1",
                     "-o", "-"], cwd=str(REPO), check=False, timeout=60)
        docs[src] = json.loads(r.stdout)
    a = docs["analytics"]
    assert a["passed"] is True
    assert set(a["summary"]["by_proto"]) == {"TCP", "UDP", "ICMP"}
    assert a["summary"]["by_proto"]["ICMP"]["reachable"] == 0 and a["summary"]["by_proto"]["ICMP"]["probes"] == 2
    assert a["summary"]["by_proto"]["UDP"]["reachable"] == 0
    # the contrast: the same ICMP probe from a peer the policy lets ping gets its echo reply
    c = docs["checkout"]
    assert c["summary"]["by_proto"]["ICMP"]["reachable"] == 1, c["probes"]


def test_the_sidecars_own_webhook_traffic_is_exempt_by_its_mark(env):
    # payments -> analytics TCP is denied for the pod's processes (previous tests); the
    # sidecar's alert deliveries to the webhook there get through
    wait_until(lambda: env.webhook_log.exists() and b'"alert"' in env.webhook_log.read_bytes(), 20,
               what="alerts delivered to the webhook")
    flows = [f for f in env.sc.events("flow") if f.get("dest_port") == 8088]
    assert not flows  # never looped through the sidecar's own outbound listener


def test_redirect_show_prints_the_l3_rules(env):
    out = env.payments.redirect("show").stdout
    assert "chain l3_in_policy" in out and "checkout-udp" in out and "set l3_known4" in out

