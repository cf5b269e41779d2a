"""Identification that cannot be steered, protocol switches, self-connection (issue 15, items 3, 4, 6, 7).

Through the real sidecar in network namespaces, protect mode, with the README's cluster rule
``no-ssh-into-containers`` and a card DLP block rule, real ``sshd`` and ``openssl s_server``
behind it.  Each class is tried with several spellings, not just the issue's example:

* SSH idents from the client side (``SSH-2.00-x`` and friends, one that is also an HTTP
  request line) and from the server side (with RFC 4253 pre-banner lines);
* fake TLS record headers of several lengths followed by a plaintext card number on a DLP
  block port (must be scanned: not TLS), a real ClientHello followed by plaintext (claimed
  TLS, broke the record layer: exception policy), the SSLv2-compatible ClientHello;
* ``encrypted`` only after a completed handshake (real s_client);
* a connection to the sidecar's own listener port (learn mode) is refused once, no loop.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.harness import PY, Cluster, have_root, wait_until

pytestmark = pytest.mark.netns

DATA = Path(__file__).resolve().parent.parent / "protocols" / "data"
PAN = "4111111111111111"
SINK_PORT, SSH_PORT, TLS_PORT, PG_PORT = 9100, 2222, 8443, 5432
PG_USER, PG_PASSWORD, PG_DB = "app", "app-secret-pw", "payments"
FAKE_SSH_PORTS = (9101, 9102, 9103, 9104)

POLICY = f"""
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: srv
  namespace: default
spec:
  selector:
    matchLabels: {{app: srv}}
  mode: protect
  default: deny
  ingress:
    - name: raw-ports
      description: opened at L4 only; the cluster rule must still refuse SSH here
      ports: [{{port: {SINK_PORT}, endPort: {FAKE_SSH_PORTS[-1]}}}, {{port: {SSH_PORT}}}, {{port: {TLS_PORT}}}]
      action: allow
    - name: pg-read-only
      description: the verbs rule reads the statements, so an SSL switch hides what it needs
      ports: [{{port: {PG_PORT}}}]
      appProto: pgsql
      sql: {{verbs: [SELECT]}}
      action: allow
  dlp:
    - name: no-clear-pan
      packs: [payment_cards]
      direction: ingress
      action: block
---
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata:
  name: baseline
spec:
  rules:
    - name: no-ssh-into-containers
      direction: ingress
      appProto: ssh
      action: deny
"""

# a silent server that records what reaches it, one block per connection
SINK = """
import socket, sys, threading
out = sys.argv[2]
def handle(c):
    data = b""
    try:
        while True:
            b = c.recv(65536)
            if not b: break
            data += b
    except OSError:
        pass
    with open(out, "ab") as fh:
        fh.write(data.hex().encode() + b"\\n")
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# a server that speaks first: sends the given bytes (hex) and then waits for the client to go
SPEAKER = """
import socket, sys, threading
payload = bytes.fromhex(sys.argv[2])
def handle(c):
    try:
        c.sendall(payload)
        while c.recv(65536):
            pass
    except OSError:
        pass
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# a client: connect, send each hex chunk (reading what arrives in between), report what it got
CLIENT = """
import json, socket, sys, time
host, port, chunks = sys.argv[1], int(sys.argv[2]), [bytes.fromhex(c) for c in sys.argv[3:]]
got, err = b"", None
try:
    s = socket.create_connection((host, port), timeout=5)
    s.settimeout(1.5)
    for i, c in enumerate(chunks):
        s.sendall(c)
        if i + 1 < len(chunks):
            try:
                got += s.recv(65536)
            except socket.timeout:
                pass
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        try:
            b = s.recv(65536)
        except socket.timeout:
            break
        if not b:
            break
        got += b
except OSError as e:
    err = type(e).__name__
print(json.dumps({"got": got.hex(), "error": err}))
"""


def sslv2_hello(version: int = 0x0303) -> bytes:
    """An SSLv2-compatible ClientHello (RFC 5246 E.2), as old clients still send it."""
    ciphers = bytes.fromhex("00c02b00c02c00c00900c02f00c03000009c00002f000035")
    challenge = os.urandom(32)
    body = b"\x01" + struct.pack("!HHHH", version, len(ciphers), 0, len(challenge)) + ciphers + challenge
    return struct.pack("!H", 0x8000 | len(body)) + body


def real_client_hello() -> bytes:
    data = (DATA / "openssl_tls1_2_client.bin").read_bytes()
    return data[: 5 + int.from_bytes(data[3:5], "big")]


class Lab:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.tmp = Path(c.tmp)
        self.srv = c.pod("srv")
        self.cli = c.pod("cli")
        self.sink_file = self.tmp / "sink.hex"
        self.srv.popen([PY, "-c", SINK, str(SINK_PORT), str(self.sink_file)])
        self.speakers = {
            FAKE_SSH_PORTS[0]: b"SSH-2.0-fake\r\n",
            FAKE_SSH_PORTS[1]: b"SSH-1.99-fake\r\n",
            FAKE_SSH_PORTS[2]: b"Welcome to the jump host\r\nauthorised use only\r\nSSH-2.00-fake\r\n",
            FAKE_SSH_PORTS[3]: b"220 mail.example ESMTP ready\r\n",  # not SSH: must pass
        }
        for port, payload in self.speakers.items():
            self.srv.popen([PY, "-c", SPEAKER, str(port), payload.hex()])
        # real sshd and openssl s_server
        from tests.integration import peers

        self.sshd = peers.sshd(self.srv, self.tmp / "sshd", SSH_PORT)
        # an RSA certificate: the SSLv2-compatible hello has no extensions, so no ECDSA suite
        cert, key = self.tmp / "cert.pem", self.tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=srv.example", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        self.srv.popen(["openssl", "s_server", "-accept", str(TLS_PORT), "-cert", str(cert), "-key", str(key),
                        "-cipher", "DEFAULT:@SECLEVEL=0", "-quiet"], stdin=open(os.devnull, "rb"))
        for port in (SINK_PORT, SSH_PORT, TLS_PORT, *FAKE_SSH_PORTS):
            self.srv.wait_listening(port)
        self.postgres = self._postgres_with_ssl(peers)
        policy = self.tmp / "policy.yaml"
        policy.write_text(POLICY)
        self.sidecar = self.srv.start_sidecar("--policy", str(policy), labels={"app": "srv"})

    def _postgres_with_ssl(self, peers):
        """Real PostgreSQL, with TLS switched on after start (ALTER SYSTEM + reload)."""
        pg = peers.postgres(self.srv, self.tmp / "pg", PG_PORT, PG_USER, PG_PASSWORD, PG_DB)
        cert, key = self.tmp / "pg" / "server.crt", self.tmp / "pg" / "server.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=db.example", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        for f in (cert, key):
            os.chown(f, *_uid_gid("postgres"))
            os.chmod(f, 0o600)
        local = ["psql", "-X", "-q", "-h", str(pg.info["socket"]), "-p", str(PG_PORT), "-U", "postgres", "-d",
                 "postgres"]
        for stmt in (f"ALTER SYSTEM SET ssl_cert_file = '{cert}'", f"ALTER SYSTEM SET ssl_key_file = '{key}'",
                     "ALTER SYSTEM SET ssl = on", "SELECT pg_reload_conf()"):
            self.srv.run([*local, "-c", stmt])
        wait_until(lambda: self.srv.run([*local, "-At", "-c", "SHOW ssl"]).stdout.strip() == "on", 10,
                   what="postgres ssl on")
        return pg

    def psql(self, sslmode: str, sql: str) -> subprocess.CompletedProcess:
        conn = (f"host={self.srv.ip} port={PG_PORT} user={PG_USER} dbname={PG_DB} sslmode={sslmode} "
                "gssencmode=disable connect_timeout=10")
        return self.cli.run(["psql", conn, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql], check=False,
                            timeout=60, env={**os.environ, "PGPASSWORD": PG_PASSWORD})

    def client(self, port: int, *chunks: bytes) -> dict:
        r = self.cli.run([PY, "-c", CLIENT, self.srv.ip, str(port), *(c.hex() for c in chunks)], check=False,
                         timeout=30)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["got"] = bytes.fromhex(out["got"])
        return out

    def sink(self) -> list[bytes]:
        try:
            return [bytes.fromhex(line) for line in self.sink_file.read_text().split()]
        except FileNotFoundError:
            return []

    def flow(self, port: int, n: int) -> dict:
        """The n-th (1-based) flow record to ``port``."""
        return self.sidecar.wait_flows(n, dest_port=port)[n - 1]

    def alerts(self, flow_id: int) -> list[dict]:
        return [e for e in self.sidecar.events("alert") if e.get("flow_id") == flow_id]


@pytest.fixture(scope="module")
def lab():
    if not have_root():
        pytest.skip("needs root")
    with Cluster(prefix="pi", octet=237) as c:
        yield Lab(c)


def _uid_gid(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def _count(lab: Lab, port: int) -> int:
    return len(lab.sidecar.flows(dest_port=port))


# ------------------------------------------------------------------ SSH
def test_sshd_itself_accepts_the_odd_spellings(lab):
    """The reference: real sshd treats SSH-2.00-x and SSH-1.99-x as SSH 2 (and refuses SSH-3.0)."""
    script = (f"import socket,sys\ns=socket.create_connection(('127.0.0.1',{SSH_PORT}));s.settimeout(2)\n"
              "s.sendall(bytes.fromhex(sys.argv[1]))\nd=b''\ntry:\n while len(d)<4000:\n  b=s.recv(4096)\n"
              "  if not b: break\n  d+=b\nexcept OSError: pass\nprint(d.hex())\n")
    answers = {}
    for ident in (b"SSH-2.00-x\r\n", b"SSH-1.99-x\r\n", b"SSH-3.0-x\r\n"):
        # loopback inside the pod is not redirected: this talks to sshd directly
        r = lab.srv.run([PY, "-c", script, ident.hex()], check=False)
        answers[ident] = bytes.fromhex(r.stdout.strip())
    for ident in (b"SSH-2.00-x\r\n", b"SSH-1.99-x\r\n"):
        banner, _, rest = answers[ident].partition(b"\r\n")
        assert banner.startswith(b"SSH-2.0-OpenSSH") and len(rest) > 100  # its KEXINIT: key exchange goes on
    assert b"KEXINIT" not in answers[b"SSH-3.0-x\r\n"] and len(answers[b"SSH-3.0-x\r\n"].partition(b"\r\n")[2]) < 100


@pytest.mark.parametrize("ident", [
    b"SSH-2.00-x\r\n", b"SSH-1.99-x\r\n", b"SSH-2.0-OpenSSH_9.2p1\r\n", b"SSH-2.0-x / HTTP/1.1\r\n",
    b"SSH-2.0-x\n",
])
def test_client_side_ssh_idents_are_ssh_on_a_silent_l4_port(lab, ident):
    n = _count(lab, SINK_PORT) + 1
    before = len(lab.sink())
    lab.client(SINK_PORT, ident)
    f = lab.flow(SINK_PORT, n)
    assert f["app_proto"] == "ssh" and f["verdict"] == "deny" and f["rule"] == "no-ssh-into-containers"
    assert not any(b"SSH-" in blob for blob in lab.sink()[before:])  # nothing of it reached the server


@pytest.mark.parametrize("port", FAKE_SSH_PORTS[:3])
def test_server_side_ssh_idents_are_ssh_even_after_preamble_lines(lab, port):
    n = _count(lab, port) + 1
    r = lab.client(port)
    f = lab.flow(port, n)
    assert f["app_proto"] == "ssh" and f["verdict"] == "deny"
    assert b"SSH-" not in r["got"]  # the server's ident never reached the client


def test_a_server_first_text_protocol_is_not_held_and_still_works(lab):
    port = FAKE_SSH_PORTS[3]
    n = _count(lab, port) + 1
    r = lab.client(port, b"EHLO client\r\n")
    assert r["got"].startswith(b"220 mail.example")  # the banner reached the client before it spoke
    f = lab.flow(port, n)
    assert f["app_proto"] == "unknown" and f["verdict"] == "allow"


def test_real_ssh_client_to_real_sshd_is_refused(lab):
    from tests.integration import peers

    n = _count(lab, SSH_PORT) + 1
    r = lab.cli.run(peers.ssh(lab.srv.ip, SSH_PORT, lab.sshd.info["key"], "echo", "in"), check=False, timeout=60)
    assert r.returncode != 0 and "in" not in r.stdout.split()
    f = lab.flow(SSH_PORT, n)
    assert f["app_proto"] == "ssh" and f["verdict"] == "deny"


# ------------------------------------------------------------------ fake and real TLS
FAKE_HEADERS = [
    bytes.fromhex("1603010005"),              # 5: a record header
    bytes.fromhex("160301002a01"),            # 6: + the ClientHello type (the example)
    bytes.fromhex("1603010200010001fc"),      # 9: + a consistent handshake length
    bytes.fromhex("1603010200010001fc0303"),  # 11: + a legacy version
]


@pytest.mark.parametrize("header", FAKE_HEADERS, ids=lambda h: f"{len(h)}B")
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "header-first"])
def test_fake_tls_header_then_plaintext_card_is_scanned_and_blocked(lab, header, split):
    payload = f"card={PAN}&exp=12/29\r\n".encode()
    n = _count(lab, SINK_PORT) + 1
    before = len(lab.sink())
    chunks = (header, payload) if split else (header + payload,)
    lab.client(SINK_PORT, *chunks)
    f = lab.flow(SINK_PORT, n)
    assert f["app_proto"] != "tls" and f["encrypted"] is False
    assert f["verdict"] == "deny"
    assert not any(PAN.encode() in blob for blob in lab.sink()[before:])
    assert any(a["alert"]["category"] == "dlp" for a in lab.alerts(f["flow_id"]))


def test_length_consistent_fake_record_is_still_not_tls(lab):
    """A record whose lengths add up but whose 'hello' does not parse is not TLS either."""
    body = f"card {PAN} exp 12/29 cvv 123 ".encode()
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    record = b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
    n = _count(lab, SINK_PORT) + 1
    before = len(lab.sink())
    lab.client(SINK_PORT, record)
    f = lab.flow(SINK_PORT, n)
    assert f["app_proto"] != "tls" and f["verdict"] == "deny"
    assert not any(PAN.encode() in blob for blob in lab.sink()[before:])


@pytest.mark.parametrize("after", [
    f"GET /?card={PAN} HTTP/1.0\r\n\r\n".encode(),  # plaintext with a card
    b"hello, no card here\r\n",                      # plaintext without one: still not TLS
    b"\x17\x02\x00\x00\x05hello",                    # a record with a wrong version
    b"\x63\x03\x03\x00\x05hello",                    # a record type that does not exist
])
def test_real_hello_then_broken_record_layer_falls_under_the_exception_policy(lab, after):
    n = _count(lab, TLS_PORT) + 1
    r = lab.client(TLS_PORT, real_client_hello(), after)
    assert r["got"][:3] == b"\x16\x03\x03"  # the server's hello came back: the flow claimed TLS
    f = lab.flow(TLS_PORT, n)
    assert f["app_proto"] == "tls" and f["encrypted"] is False and f["verdict"] == "deny"
    sigs = [a["alert"]["signature"] for a in lab.alerts(f["flow_id"])]
    assert any(s.startswith("inspection:parse:tls:") for s in sigs), sigs


def test_real_hello_then_plaintext_card_on_the_sink_port_never_arrives(lab):
    n = _count(lab, SINK_PORT) + 1
    before = len(lab.sink())
    lab.client(SINK_PORT, real_client_hello() + f"card={PAN}\r\n".encode())
    f = lab.flow(SINK_PORT, n)
    assert f["app_proto"] == "tls" and f["verdict"] == "deny" and f["encrypted"] is False
    assert not any(PAN.encode() in blob for blob in lab.sink()[before:])


def test_sslv2_compatible_hello_is_tls(lab):
    n = _count(lab, TLS_PORT) + 1
    r = lab.client(TLS_PORT, sslv2_hello())
    assert r["got"][:3] == b"\x16\x03\x03"  # s_server answered with a TLS 1.2 ServerHello
    f = lab.flow(TLS_PORT, n)
    assert f["app_proto"] == "tls" and f["l7"]["hello_format"] == "sslv2"
    assert f["l7"]["offered_versions"] == ["1.2"] and f["encrypted"] is False  # no completed handshake


def test_encrypted_only_after_a_completed_handshake(lab):
    n = _count(lab, TLS_PORT) + 1
    r = lab.cli.run(["openssl", "s_client", "-connect", f"{lab.srv.ip}:{TLS_PORT}", "-servername", "srv.example",
                     "-tls1_3", "-brief"], input="ping\n", check=False, timeout=30)
    assert r.returncode == 0, r.stderr[-500:]
    f = lab.flow(TLS_PORT, n)
    assert f["app_proto"] == "tls" and f["encrypted"] is True and f["l7"]["established"] is True
    assert f["l7"]["sni"] == "srv.example" and f["l7"]["version"] == "1.3" and f["verdict"] == "allow"


# ------------------------------------------------------------------ protocol switches
def test_postgres_ssl_switch_under_a_verbs_rule_is_refused_and_plaintext_still_works(lab):
    n = _count(lab, PG_PORT) + 1
    r = lab.psql("disable", "SELECT 40 + 2")
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
    f = lab.flow(PG_PORT, n)
    assert f["app_proto"] == "pgsql" and f["verdict"] == "allow" and f["l7"]["verbs"] == {"SELECT": 1}
    # sslmode=require: SSLRequest, 'S', then TLS the verbs rule cannot read -> exception policy
    r = lab.psql("require", "SELECT 1")
    assert r.returncode != 0
    f = lab.flow(PG_PORT, n + 1)
    assert f["verdict"] == "deny" and f["l7"].get("switched_to") == "tls"
    sigs = [a["alert"]["signature"] for a in lab.alerts(f["flow_id"])]
    assert "inspection:tunnel:pgsql:sslrequest->tls" in sigs
    # a DELETE in plaintext is still refused by the rule itself
    r = lab.psql("disable", "DELETE FROM pg_class WHERE false")
    assert r.returncode != 0


# ------------------------------------------------------------------ self-connection
def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children_fds(pod_sidecar) -> int:
    pids = [pod_sidecar.pid()]
    try:
        pids += [int(p) for p in Path(f"/proc/{pod_sidecar.pid()}/task/{pod_sidecar.pid()}/children").read_text().split()]
    except OSError:
        pass
    return sum(_fds(p) for p in pids if Path(f"/proc/{p}").exists())


def test_connection_to_the_sidecars_own_port_is_refused_once_in_learn_mode():
    if not have_root():
        pytest.skip("needs root")
    with Cluster(prefix="ps", octet=238) as c:
        pod, cli = c.pod("learner"), c.pod("cli")
        sink = Path(c.tmp) / "sink.hex"
        pod.popen([PY, "-c", SINK, str(SINK_PORT), str(sink)])
        pod.wait_listening(SINK_PORT)
        sc = pod.start_sidecar()  # no policy: learn mode, everything allowed
        base_fds = _children_fds(sc)
        # inbound to <pod>:15001, outbound to loopback and to the pod's own address
        attempts = [(cli, pod.ip, 15001), (cli, pod.ip, 15006), (pod, "127.0.0.1", 15001), (pod, pod.ip, 15001)]
        for who, host, port in attempts:
            who.run([PY, "-c", CLIENT, host, str(port), b"GET / HTTP/1.0\r\n\r\n".hex()], check=False, timeout=30)
        refused = wait_until(lambda: (lambda f: f if len(f) >= len(attempts) else None)(
            sc.flows(rule="self-connection")), 15, what="self-connection flow records")
        assert all(f["verdict"] == "deny" and f["close_reason"] == "self-connection" for f in refused)
        assert {f["direction"] for f in refused} == {"inbound", "outbound"}
        alerts = [a for a in sc.events("alert") if a["alert"]["signature"] == "self-connection"]
        assert len(alerts) == len(attempts)  # one per attempt: no loop of flows
        # no descriptor storm, and the pod keeps serving through the sidecar
        assert len(sc.flows()) <= len(attempts) + 2
        assert _children_fds(sc) <= base_fds + 10
        r = cli.run([PY, "-c", CLIENT, pod.ip, str(SINK_PORT), b"still-serving".hex()], check=False, timeout=30)
        assert json.loads(r.stdout)["error"] is None
        wait_until(lambda: sink.exists() and b"still-serving".hex() in sink.read_text(), 10,
                   what="the sink got the bytes")
        assert sc.ready()
