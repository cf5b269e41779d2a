"""DNS as an attacker uses it: poisoning the FQDN cache, evading name rules, losing queries.

Sans-IO tests drive ``Session`` with hand-built DNS messages (fast, every variant);
the ``netns`` tests run the real sidecar in a pod with dnsmasq as the resolver,
a scriptable fake resolver (wrong ID, wrong question, extra records, CNAME games,
answers from another address, huge TTLs) and real TCP echo servers standing for
the card network, so "allowed" and "denied" are what a connection really gets.
"""

from __future__ import annotations

import json
import socket
import struct
import textwrap
from pathlib import Path

import pytest

from firewall.datapath.session import Inspection, Session
from firewall.identity.fqdn import FqdnCache
from firewall.identity.identity import Identity
from firewall.policy.engine import PolicySet
from firewall.protocols.base import TOCLIENT, TOSERVER
from firewall.protocols.dns import DnsTcpParser

TYPES = {"A": 1, "CNAME": 5, "AAAA": 28}


# ----------------------------------------------------------------------------- DNS messages
def qname_bytes(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def dns_msg(ident: int, questions: list[tuple[str, str]], answers: list[tuple[str, str, str, int]] = (),
            qr: bool = False) -> bytes:
    """A DNS message: ``questions`` (name, type), ``answers`` (name, type, data, ttl)."""
    flags = 0x0100 | (0x8180 if qr else 0)
    out = struct.pack("!HHHHHH", ident, flags, len(questions), len(answers), 0, 0)
    for name, t in questions:
        out += qname_bytes(name) + struct.pack("!HH", TYPES[t], 1)
    for name, t, data, ttl in answers:
        if t == "A":
            rdata = socket.inet_aton(data)
        elif t == "AAAA":
            rdata = socket.inet_pton(socket.AF_INET6, data)
        else:
            rdata = qname_bytes(data)
        out += qname_bytes(name) + struct.pack("!HHIH", TYPES[t], 1, ttl, len(rdata)) + rdata
    return out


def tcp(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


# ----------------------------------------------------------------------------- sans-IO
POD, RESOLVER, EVIL_IP = "10.0.0.2", "10.0.0.53", "6.6.6.7"
EVIL = "evil.card-network.example"
SANS_POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: cde, namespace: default}
spec:
  selector: {matchLabels: {app: cde}}
  mode: protect
  default: deny
  ingress:
    - name: raw
      ports: [{port: 9000}]
      action: allow
  egress:
    - name: no-exfil-names
      ports: [{port: 53, protocol: UDP}, {port: 53}]
      dns: {qnameSuffix: [attacker.example]}
      action: deny
    - name: resolver
      to: [{cidr: 10.0.0.53/32}, {cidr: 10.0.0.54/32}]
      ports: [{port: 53, protocol: UDP}, {port: 53}, {port: 5353}]
      action: allow
    - name: web
      ports: [{port: 80}]
      action: allow
    - name: card-network
      to: [{fqdn: "*.card-network.example"}]
      ports: [{port: 443}]
      action: allow
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def insp(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(SANS_POLICY)
    cache = FqdnCache(min_ttl=1, max_ttl=300, clock=Clock())
    events: list[dict] = []
    i = Inspection(policy=PolicySet.load([str(p)], fqdn=cache), fqdn=cache, emit=events.append,
                   local=Identity.make(POD, "default", "cde-0", {"app": "cde"}))
    i.events = events  # type: ignore[attr-defined]
    return i


def outbound_tcp(insp, frames_up: list[bytes], frames_down: list[bytes], dst=(RESOLVER, 53)) -> Session:
    s = Session(insp, "outbound", (POD, 40000), dst)
    assert s.open()
    for f in frames_up:
        s.feed(TOSERVER, tcp(f))
    for f in frames_down:
        s.feed(TOCLIENT, tcp(f))
    return s


def allowed_443(insp, ip: str) -> bool:
    return Session(insp, "outbound", (POD, 40001), (ip, 443)).open()


def test_the_answer_to_a_forwarded_query_is_learned(insp):
    q = dns_msg(7, [(EVIL, "A")])
    a = dns_msg(7, [(EVIL, "A")], [(EVIL, "A", EVIL_IP, 60)], qr=True)
    assert not allowed_443(insp, EVIL_IP)
    outbound_tcp(insp, [q], [a])
    assert insp.fqdn.addresses_for(EVIL) == {EVIL_IP}
    assert allowed_443(insp, EVIL_IP)  # the control: the same answer, asked for, does allow


@pytest.mark.parametrize("case", ["no-query", "wrong-id", "wrong-name", "wrong-type", "extra-record",
                                  "cname-outside-chain", "answer-toserver", "inbound", "not-noerror"])
def test_answers_nobody_asked_for_teach_nothing(insp, case):
    ans = [(EVIL, "A", EVIL_IP, 86400)]
    q = dns_msg(7, [("benign.example", "A")])
    if case == "no-query":
        outbound_tcp(insp, [], [dns_msg(7, [(EVIL, "A")], ans, qr=True)])
    elif case == "wrong-id":
        outbound_tcp(insp, [dns_msg(7, [(EVIL, "A")])], [dns_msg(8, [(EVIL, "A")], ans, qr=True)])
    elif case == "wrong-name":
        outbound_tcp(insp, [q], [dns_msg(7, [(EVIL, "A")], ans, qr=True)])
    elif case == "wrong-type":
        outbound_tcp(insp, [dns_msg(7, [(EVIL, "AAAA")])], [dns_msg(7, [(EVIL, "A")], ans, qr=True)])
    elif case == "extra-record":
        outbound_tcp(insp, [q], [dns_msg(7, [("benign.example", "A")],
                                         [("benign.example", "A", "192.0.2.1", 60), *ans], qr=True)])
    elif case == "cname-outside-chain":
        outbound_tcp(insp, [q], [dns_msg(7, [("benign.example", "A")],
                                         [("other.example", "CNAME", EVIL, 60), *ans], qr=True)])
    elif case == "answer-toserver":
        outbound_tcp(insp, [dns_msg(7, [(EVIL, "A")]), dns_msg(7, [(EVIL, "A")], ans, qr=True)], [])
    elif case == "inbound":
        # a peer sends a query and its "answer" into the pod; an echo server sends them back
        s = Session(insp, "inbound", ("10.0.0.9", 40000), (POD, 9000))
        assert s.open()
        s.feed(TOSERVER, tcp(dns_msg(7, [(EVIL, "A")])))
        s.feed(TOCLIENT, tcp(dns_msg(7, [(EVIL, "A")])) + tcp(dns_msg(7, [(EVIL, "A")], ans, qr=True)))
    elif case == "not-noerror":
        bad = bytearray(dns_msg(7, [(EVIL, "A")], ans, qr=True))
        bad[3] |= 3  # NXDOMAIN with an address in it
        outbound_tcp(insp, [dns_msg(7, [(EVIL, "A")])], [bytes(bad)])
    assert insp.fqdn.addresses_for(EVIL) == set()
    assert not allowed_443(insp, EVIL_IP)


@pytest.mark.parametrize("dst", [(RESOLVER, 5353), (EVIL_IP, 80), ("10.0.0.54", 53)])
def test_dns_shaped_bytes_off_the_resolver_teach_nothing(insp, dst):
    """The app and an accomplice server on an allowed port (not 53), or a server that is not
    one of the configured resolvers, exchange a perfectly matching query and answer."""
    insp.fqdn.set_resolvers([RESOLVER])
    q = dns_msg(7, [(EVIL, "A")])
    a = dns_msg(7, [(EVIL, "A")], [(EVIL, "A", EVIL_IP, 60)], qr=True)
    s = Session(insp, "outbound", (POD, 40000), dst)
    assert s.open()  # the policy allows each of these flows: only the learning rules stand
    s.feed(TOSERVER, tcp(q))
    s.feed(TOCLIENT, tcp(a))
    assert insp.fqdn.addresses_for(EVIL) == set()
    outbound_tcp(insp, [q], [a])  # the control: the same exchange with the resolver teaches
    assert insp.fqdn.addresses_for(EVIL) == {EVIL_IP}


def test_cname_chain_is_learned_under_the_asked_name_only(insp):
    q = dns_msg(9, [("api.card-network.example", "A")])
    a = dns_msg(9, [("api.card-network.example", "A")],
                [("api.card-network.example", "CNAME", "edge.cdn.example", 60),
                 ("edge.cdn.example", "CNAME", "node7.cdn.example", 60),
                 ("node7.cdn.example", "A", "198.51.100.7", 60)], qr=True)
    outbound_tcp(insp, [q], [a])
    assert insp.fqdn.names_for("198.51.100.7") == {"api.card-network.example"}
    assert allowed_443(insp, "198.51.100.7")


def test_ttl_is_clamped_and_a_name_is_bounded(insp):
    cache: FqdnCache = insp.fqdn
    q = dns_msg(3, [(EVIL, "A")])
    a = dns_msg(3, [(EVIL, "A")], [(EVIL, "A", EVIL_IP, 2**31 - 1)], qr=True)
    outbound_tcp(insp, [q], [a])
    assert allowed_443(insp, EVIL_IP)
    cache._clock.t += 301  # max_ttl 300
    assert not allowed_443(insp, EVIL_IP)
    many = [f"10.9.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    cache.learn("flood.example", many, 60)
    assert len(cache.addresses_for("flood.example")) <= cache.max_per_name
    assert len(cache) <= cache.max_per_name


def test_denied_query_teaches_nothing(insp):
    name = "x.attacker.example"
    s = outbound_tcp(insp, [dns_msg(4, [(name, "A")])], [])
    assert s.verdict == "deny"
    s.feed(TOCLIENT, tcp(dns_msg(4, [(name, "A")], [(name, "A", EVIL_IP, 60)], qr=True)))
    assert insp.fqdn.addresses_for(name) == set()


def _update(name: str) -> bytes:
    """An UPDATE (opcode 5) for zone ok.example adding a record named ``name``."""
    m = bytearray(dns_msg(5, [("ok.example", "A")]))
    m[2] = (m[2] & 0x87) | (5 << 3)
    m[8:10] = b"\x00\x01"  # one update record, in the authority section
    return bytes(m) + qname_bytes(name) + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04"


@pytest.mark.parametrize("bad", ["reply-shaped", "garbage", "two-questions", "update", "answer-in-query"])
def test_protect_mode_refuses_dns_that_is_not_one_query(insp, bad):
    exfil = "exfil.attacker.example"
    answer_in_query = bytearray(dns_msg(5, [("ok.example", "A")], [(exfil, "A", "1.2.3.4", 1)]))
    msg = {"reply-shaped": dns_msg(5, [(exfil, "A")], [(exfil, "A", "1.2.3.4", 1)], qr=True),
           "garbage": b"\x00\x05\xff\xff" + qname_bytes(exfil) * 2,
           "two-questions": dns_msg(5, [("ok.example", "A"), (exfil, "A")]),
           "update": _update(exfil),
           "answer-in-query": bytes(answer_in_query)}[bad]
    ok = tcp(dns_msg(1, [("ok.example", "A")]))
    s = Session(insp, "outbound", (POD, 40000), (RESOLVER, 53))
    assert s.open()
    out, stop = s.feed(TOSERVER, ok + tcp(msg) + ok)
    assert out == ok  # the query before it is forwarded, nothing from the bad message on
    assert stop is not None and stop.reason.startswith("inspection-error:parse")
    alerts = [e for e in insp.events if e.get("alert", {}).get("category") == "inspection"]
    assert alerts and alerts[-1]["alert"]["action"] == "blocked"


def test_tcp_parser_goes_on_after_a_malformed_message():
    p = DnsTcpParser()
    evs = p.feed(tcp(b"\x01\x02garbage") + tcp(dns_msg(2, [("exfil.attacker.example", "A")])), TOSERVER)
    assert [e.kind for e in evs] == ["anomaly", "query"]
    assert evs[1].fields["qname"] == "exfil.attacker.example" and evs[1].offset == 2 + 9


def test_monitor_mode_alerts_and_still_parses_every_message(insp):
    insp.mode_override = "monitor"
    s = Session(insp, "outbound", (POD, 40000), (RESOLVER, 53))
    assert s.open()
    data = tcp(dns_msg(1, [("ok.example", "A")])) + tcp(b"junkjunkjunkjunk") + tcp(
        dns_msg(2, [("x.attacker.example", "A")]))
    out, stop = s.feed(TOSERVER, data)
    assert stop is None and out == data
    sigs = [e["alert"]["signature"] for e in insp.events if e["event_type"] == "alert"]
    assert any(s.startswith("inspection:parse:malformed-dns") for s in sigs)
    assert "no-exfil-names" in sigs  # the query after the garbage was still checked


# ----------------------------------------------------------------------------- through the sidecar
from tests.harness import PY, REPO, Cluster, wait_until  # noqa: E402

ECHO = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(512)
    def serve(c):
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

# A resolver that lies on request: the first label of the question picks the lie.
FAKE = textwrap.dedent("""
    import socket, struct, sys, threading
    sys.path.insert(0, sys.argv[4])
    from tests.adversarial.test_dns import dns_msg, tcp
    from firewall.protocols.dns import parse
    ip, alt, evil, ttl_ip, log = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5], sys.argv[6]
    EVIL = "evil.card-network.example"
    lock = threading.Lock()
    def record(data):
        with lock, open(log, "ab") as fh:
            fh.write(data + b"\\n--\\n")
    def answer(data):
        try:
            f = parse(data)
        except Exception:
            return None, False
        q, i = f["qname"] or "", f["id"]
        mode = q.split(".")[0]
        lie = [(EVIL, "A", evil, 86400)]
        if mode == "wrongid":
            return dns_msg((i + 1) & 0xFFFF, [(q, "A")], [(q, "A", evil, 86400), *lie], qr=True), False
        if mode == "wrongq":
            return dns_msg(i, [(EVIL, "A")], lie, qr=True), False
        if mode == "extra":
            return dns_msg(i, [(q, "A")], [(q, "A", "192.0.2.1", 60), *lie], qr=True), False
        if mode == "cname":
            return dns_msg(i, [(q, "A")], [("x.example", "CNAME", EVIL, 60), *lie], qr=True), False
        if mode == "other":
            return dns_msg(i, [(q, "A")], [(q, "A", evil, 86400)], qr=True), True
        if mode == "evil":
            return dns_msg(i, [(q, "A")], lie, qr=True), False
        if mode == "hugettl":
            return dns_msg(i, [(q, "A")], [(q, "A", ttl_ip, 2**31 - 1)], qr=True), False
        return dns_msg(i, [(q, "A")], [(q, "A", "192.0.2.1", 60)], qr=True), False
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: a burst is not lost here
    u.bind((ip, 53))
    ualt = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); ualt.bind((alt, 53))
    def udp():
        while True:
            data, peer = u.recvfrom(65535)
            record(data)
            out, from_alt = answer(data)
            if out:
                (ualt if from_alt else u).sendto(out, peer)
    def serve(c):
        buf = b""
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                record(d)
                buf += d
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    out, _ = answer(buf[2:2 + n])
                    buf = buf[2 + n:]
                    if out:
                        c.sendall(tcp(out))
    threading.Thread(target=udp, daemon=True).start()
    def listen(port):
        t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((ip, port)); t.listen(64)
        while True:
            c, _ = t.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=listen, args=(5353,), daemon=True).start()
    listen(53)
""")

# Send DNS bytes the way the app (or an attacker in it) would, print what came back.
CLIENT = textwrap.dedent("""
    import json, socket, sys
    server, proto, hexmsgs = sys.argv[1], sys.argv[2], sys.argv[3:]
    got = []
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
        s.connect((server, 53))
        for h in hexmsgs:
            s.send(bytes.fromhex(h))
            try:
                got.append(s.recv(65535).hex())
            except OSError:
                got.append(None)
    else:
        s = socket.create_connection((server, 5353 if proto == "tcp5353" else 53), timeout=2)
        try:
            for h in hexmsgs:
                s.sendall(bytes.fromhex(h))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
            got.append(data.hex())
        except OSError as e:
            got.append("error:" + type(e).__name__)
    print(json.dumps(got))
""")

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        s.sendall(b"ping-palisade")
        s.shutdown(socket.SHUT_WR)
        d = s.recv(100)
        print("allowed" if d == b"ping-palisade" else "denied")
    except OSError:
        print("denied")
""")

EVIL_NAME = "evil.card-network.example"
GOOD_NAME = "good.card-network.example"


def _policy(subnet: str, dns_ip: str, fake_ip: str) -> str:
    return textwrap.dedent(f"""
        apiVersion: palisade.dev/v1
        kind: FirewallPolicy
        metadata: {{name: cde, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: cde}}}}
          mode: protect
          default: deny
          ingress:
            - name: peer-raw-tcp
              ports: [{{port: 9000}}]
              action: allow
          egress:
            - name: no-exfil-names
              ports: [{{port: 53, protocol: UDP}}, {{port: 53}}]
              dns: {{qnameSuffix: [attacker.example]}}
              action: deny
            - name: resolvers
              to: [{{cidr: {dns_ip}/32}}, {{cidr: {fake_ip}/32}}]
              ports: [{{port: 53, protocol: UDP}}, {{port: 53}}, {{port: 5353}}]
              action: allow
            - name: card-network
              to: [{{fqdn: "*.card-network.example"}}]
              ports: [{{port: 443}}]
              action: allow
        """)


class Lab:
    def __init__(self, c: Cluster) -> None:
        from tests.integration import peers

        self.c = c
        tmp = Path(c.tmp)
        self.app = c.pod("app")
        self.dns = c.pod("dns")
        self.fake = c.pod("fake")
        self.good = c.pod("good")
        self.evil = c.pod("evil")
        self.ttl = c.pod("ttl")
        self.peer = c.pod("peer")
        self.alt_ip = f"{c.subnet}.200"
        self.fake.run(["ip", "addr", "add", f"{self.alt_ip}/24", "dev", "eth0"])
        for name, text in (("echo.py", ECHO), ("fake.py", FAKE), ("client.py", CLIENT), ("connect.py", CONNECT)):
            (tmp / name).write_text(text)
        self.tmp = tmp
        for pod, port in ((self.good, 443), (self.evil, 443), (self.ttl, 443), (self.app, 9000)):
            pod.popen([PY, str(tmp / "echo.py"), str(port)])
            pod.wait_listening(port)
        self.dnsmasq = peers.dnsmasq(self.dns, tmp / "dnsmasq", {GOOD_NAME: [self.good.ip]})
        self.fake_log = tmp / "fake.log"
        self.fake.popen([PY, str(tmp / "fake.py"), self.fake.ip, self.alt_ip, self.evil.ip, str(REPO),
                         self.ttl.ip, str(self.fake_log)], cwd=str(REPO))
        self.fake.wait_listening(53)
        self.fake.wait_listening(53, udp=True)
        pol = tmp / "policy.yaml"
        pol.write_text(_policy(c.subnet, self.dns.ip, self.fake.ip))
        cfg = tmp / "sidecar.yaml"
        cfg.write_text("fqdn_min_ttl: 1\nfqdn_max_ttl: 8\n")
        self.sc = self.app.start_sidecar("--config", str(cfg), "--policy", str(pol), labels={"app": "cde"})

    def connect(self, ip: str, port: int = 443) -> str:
        return self.app.run([PY, str(self.tmp / "connect.py"), ip, str(port)], check=False).stdout.strip()

    def send(self, server: str, proto: str, *msgs: bytes) -> list:
        r = self.app.run([PY, str(self.tmp / "client.py"), server, proto, *(m.hex() for m in msgs)],
                         check=False)
        return json.loads(r.stdout or "[]")

    def fake_saw(self) -> bytes:
        try:
            return self.fake_log.read_bytes()
        except FileNotFoundError:
            return b""


@pytest.fixture(scope="module")
def lab():
    c = Cluster("dn", 207)
    try:
        yield Lab(c)
    finally:
        c.close()


def _evil_stays_denied(lab: Lab) -> None:
    assert lab.connect(lab.evil.ip) == "denied"
    flows = wait_until(lambda: [f for f in lab.sc.flows(dest_ip=lab.evil.ip, dest_port=443)], 5,
                       what="flow record to the denied address")
    assert flows and all(f["verdict"] == "deny" for f in flows)


@pytest.mark.netns
def test_sidecar_learns_the_pods_own_answer(lab):
    """The control: a real dig answer from dnsmasq allows the card network's address."""
    assert lab.connect(lab.good.ip) == "denied"
    r = lab.app.run(["dig", f"@{lab.dns.ip}", GOOD_NAME, "A", "+short", "+time=2", "+tries=1"], check=False)
    assert r.stdout.strip() == lab.good.ip
    assert lab.connect(lab.good.ip) == "allowed"


def _q(name: str, ident: int = 0x4242) -> bytes:
    return dns_msg(ident, [(name, "A")])


POISON = {
    # the pod's own app sends a reply-shaped message (UDP through the relay, and TCP)
    "app-udp-reply": lambda lab: lab.send(lab.dns.ip, "udp", dns_msg(
        9, [(EVIL_NAME, "A")], [(EVIL_NAME, "A", lab.evil.ip, 86400)], qr=True)),
    "app-tcp-reply": lambda lab: lab.send(lab.fake.ip, "tcp", tcp(_q("plain.example")), tcp(dns_msg(
        0x4242, [(EVIL_NAME, "A")], [(EVIL_NAME, "A", lab.evil.ip, 86400)], qr=True))),
    # DNS on another port: the app and an accomplice "server" exchange a matching answer
    "tcp-port-5353": lambda lab: lab.send(lab.fake.ip, "tcp5353", tcp(_q(EVIL_NAME))),
    # the resolver answers with another ID, another question, extra records, a CNAME trick,
    # or from another address
    "wrong-id": lambda lab: lab.send(lab.fake.ip, "udp", _q("wrongid.card-network.example")),
    "wrong-id-tcp": lambda lab: lab.send(lab.fake.ip, "tcp", tcp(_q("wrongid.card-network.example"))),
    "wrong-question": lambda lab: lab.send(lab.fake.ip, "udp", _q("wrongq.example")),
    "extra-record": lambda lab: lab.send(lab.fake.ip, "udp", _q("extra.example")),
    "cname-outside-chain": lambda lab: lab.send(lab.fake.ip, "tcp", tcp(_q("cname.example"))),
    "answer-from-other-address": lambda lab: lab.send(lab.fake.ip, "udp", _q("other.card-network.example")),
}


@pytest.mark.netns
@pytest.mark.parametrize("variant", list(POISON))
def test_dns_poisoning_never_opens_the_denied_address(lab, variant):
    got = POISON[variant](lab)
    if variant == "answer-from-other-address":
        assert got == [None]  # the relay's connected socket never takes the stray datagram
    if variant in ("wrong-id", "tcp-port-5353"):
        assert got and got[0] and not str(got[0]).startswith("error")  # the lie reached the app ...
    _evil_stays_denied(lab)  # ... and taught the sidecar nothing


@pytest.mark.netns
def test_peer_sending_dns_into_the_pod_over_a_raw_port_teaches_nothing(lab):
    # query + "answer" into the pod's echo server: the echo carries both back, server to client,
    # with a matching ID and question -- on an inbound flow, which is never learned from
    msgs = tcp(_q(EVIL_NAME, 77)) + tcp(dns_msg(77, [(EVIL_NAME, "A")],
                                                 [(EVIL_NAME, "A", lab.evil.ip, 86400)], qr=True))
    code = ("import socket,sys;s=socket.create_connection((sys.argv[1],9000),timeout=3);"
            "s.sendall(bytes.fromhex(sys.argv[2]));s.shutdown(1);d=b''\n"
            "while True:\n c=s.recv(65536)\n if not c: break\n d+=c\nprint(len(d))")
    r = lab.peer.run([PY, "-c", code, lab.app.ip, msgs.hex()], check=False)
    assert r.stdout.strip() == str(len(msgs))  # the raw port is really allowed and echoing
    _evil_stays_denied(lab)


@pytest.mark.netns
def test_huge_ttl_is_clamped_to_the_configured_maximum(lab):
    got = lab.send(lab.fake.ip, "udp", _q("hugettl.card-network.example"))
    assert got and got[0]
    assert lab.connect(lab.ttl.ip) == "allowed"  # learned: an answer to the pod's own query
    # fqdn_max_ttl: 8 -- the 68-year TTL does not keep the address open
    wait_until(lambda: lab.connect(lab.ttl.ip) == "denied", 30, interval=0.5, what="clamped TTL expiry")


@pytest.mark.netns
def test_dns_that_is_not_one_query_never_reaches_the_resolver(lab):
    exfil = "exfil.attacker.example"
    reply = dns_msg(5, [(exfil, "A")], [(exfil, "A", "1.2.3.4", 1)], qr=True)
    # a query header, then a label length with the reserved 0x40 bit: malformed, name inside
    garbage = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x45" + exfil.encode() * 3
    two = dns_msg(6, [("fine.example", "A"), (exfil, "A")])
    smuggled = dns_msg(8, [("fine.example", "A")], [(exfil, "A", "1.2.3.4", 1)])  # QR=0, an answer inside
    for m in (reply, garbage, two, _update(exfil), smuggled):
        lab.send(lab.fake.ip, "udp", m)
    # TCP: a good query, then garbage, a reply-shaped message and a query for the name: the
    # flow is cut at the garbage, nothing after it is relayed
    got = lab.send(lab.fake.ip, "tcp", tcp(_q("first.example")), tcp(garbage), tcp(reply), tcp(_q(exfil)))
    assert got
    # a later allowed query is in the resolver's log, so the log is not just lagging
    assert lab.send(lab.fake.ip, "udp", _q("marker.example"))[0]
    wait_until(lambda: b"marker" in lab.fake_saw(), 5, what="fake resolver log")
    seen = lab.fake_saw()
    assert b"first" in seen and b"exfil" not in seen
    alerts = [e for e in lab.sc.events("alert") if e["alert"]["category"] == "inspection"]
    reasons = {e["inspection"]["reason"] for e in alerts if e["alert"]["action"] == "blocked"}
    assert {"dns-not-a-query", "malformed-dns", "dns-question-count", "dns-records-in-query"} <= reasons


BURST = textwrap.dedent("""
    import json, os, selectors, socket, sys, time
    sys.path.insert(0, sys.argv[3])
    from tests.adversarial.test_dns import dns_msg
    from firewall.protocols.dns import parse
    server, total, window, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[5]), sys.argv[4]
    sel = selectors.DefaultSelector()
    want, sent, ok, lost = {}, 0, 0, 0

    def send_one():
        global sent
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect((server, 53))
        name = f"q{sent}-{tag}.card-network.example"
        ident = (sent * 7919 + os.getpid()) & 0xFFFF
        want[s] = (ident, name, time.monotonic())
        sel.register(s, selectors.EVENT_READ)
        s.send(dns_msg(ident, [(name, "A")]))
        sent += 1

    while sent < min(window, total):
        send_one()
    while want:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            f = parse(s.recv(65535))
            if (f["id"], f["qname"]) == want[s][:2]:
                ok += 1
                sel.unregister(s)
                del want[s]
                s.close()
                if sent < total:
                    send_one()
        now = time.monotonic()
        for s, (_, _, t0) in list(want.items()):
            if now - t0 > 3:  # a stub resolver's timeout: this query is lost
                lost += 1
                sel.unregister(s)
                del want[s]
                s.close()
                if sent < total:
                    send_one()
    print(json.dumps({"ok": ok, "lost": lost}))
""")


@pytest.mark.netns
def test_relay_answers_hundreds_of_concurrent_queries_from_several_clients(lab):
    """Several clients, each keeping many queries in flight from their own sockets (as stub
    resolvers do): every query gets its own answer (ID and question).  The old relay bound a
    socket to the resolver's address for each answer; a query arriving meanwhile went to that
    socket and was lost."""
    script = lab.tmp / "burst.py"
    script.write_text(BURST)
    clients, total, window = 6, 150, 30
    procs = [lab.app.popen([PY, str(script), lab.dns.ip, str(total), str(REPO), f"c{k}", str(window)])
             for k in range(clients)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert out.strip(), err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert sum(r["lost"] for r in results) == 0, results
    assert sum(r["ok"] for r in results) == clients * total, results


@pytest.mark.netns
def test_relay_with_two_workers_answers_every_query(tmp_path):
    """Each worker keeps its own reply socket bound to the resolver's address (SO_REUSEADDR):
    a query reaching either worker's socket is relayed, none is lost."""
    from tests.integration import peers

    c = Cluster("dw", 209)
    try:
        app, dns = c.pod("app"), c.pod("dns")
        peers.dnsmasq(dns, Path(c.tmp) / "dnsmasq", {GOOD_NAME: ["10.9.9.9"]})
        app.start_sidecar("--workers", "2")
        script = tmp_path / "burst.py"
        script.write_text(BURST)
        procs = [app.popen([PY, str(script), dns.ip, "120", str(REPO), f"w{k}", "30"]) for k in range(4)]
        results = [json.loads(p.communicate(timeout=120)[0].decode().strip().splitlines()[-1]) for p in procs]
        assert sum(r["lost"] for r in results) == 0 and sum(r["ok"] for r in results) == 480, results
    finally:
        c.close()
