"""The data path end to end: real nftables rules in real namespaces, the real sidecar.

Each test builds a server pod (with the sidecar) and client pods joined by a
bridge, pushes real traffic and checks bytes, addresses and flow records.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness import PY, REPO, wait_until

pytestmark = pytest.mark.netns

L4 = ("--no-l7", "--no-dlp")
#: the data-path tests run on every relay: the native relay thread, the Python splice pump and
#: the asyncio Protocol path (no splice at all)
RELAY_FLAGS = {"native": ("--relay", "native"), "splice": ("--relay", "python"), "protocol": ("--no-splice",)}
RELAYS = list(RELAY_FLAGS)


def _py(pod, code: str, check: bool = True, timeout: float = 60):
    return pod.run([PY, "-c", textwrap.dedent(code)], check=check, timeout=timeout)


@pytest.mark.parametrize("relay", RELAYS)
def test_bulk_200mb_each_way_byte_exact_and_recorded(cluster, relay):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    blast = srv.serve_blast(9000)
    sc = srv.start_sidecar(*L4, *RELAY_FLAGS[relay])
    n = 200 * 1024 * 1024
    r = cli.blast(srv.ip, client_bytes=n, server_bytes=n)
    assert r["failed"] == 0, r
    flow = sc.wait_flows(1, dest_port=9000)[0]
    assert flow["direction"] == "inbound"
    assert flow["verdict"] == "allow"
    # the 24-byte header is part of what the client sent
    assert flow["flow"]["bytes_toserver"] == n + 24
    assert flow["flow"]["bytes_toclient"] == n
    assert flow["src_ip"] == cli.ip and flow["dest_ip"] == srv.ip
    rec = blast.wait_results(1)
    assert rec[0]["recv_ok"] is True and rec[0]["recv"] == n
    # the application saw the real client address (transparent upstream)
    assert rec[0]["peer"] == cli.ip
    assert flow["source_preserved"] is True
    spliced = re.search(r"^palisade_spliced_flows_total (\S+)", sc.http("/metrics")[1], re.M)
    assert float(spliced.group(1)) == (0.0 if relay == "protocol" else 1.0)


def test_outbound_connection_is_captured_relayed_and_recorded(cluster):
    app, other = cluster.pod("app"), cluster.pod("other")
    other.serve_blast(9100)
    sc = app.start_sidecar(*L4)
    r = app.blast(other.ip, port=9100, client_bytes=3_000_000, server_bytes=5_000_000)
    assert r["failed"] == 0
    flow = sc.wait_flows(1, direction="outbound")[0]
    assert flow["dest_ip"] == other.ip and flow["dest_port"] == 9100
    assert flow["flow"]["bytes_toclient"] == 5_000_000
    assert flow["flow"]["bytes_toserver"] == 3_000_024


def test_thousand_concurrent_connections_random_sizes(cluster):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.serve_blast(9000)
    sc = srv.start_sidecar(*L4)
    r = cli.blast(srv.ip, connections=1000, concurrency=1000, random_sizes=True,
                  client_bytes=200_000, server_bytes=200_000, seed=7)
    assert r["connections"] == 1000 and r["failed"] == 0, r
    flows = sc.wait_flows(1000, timeout=60, dest_port=9000)
    assert len(flows) == 1000
    total = sum(f["flow"]["bytes_toserver"] for f in flows)
    assert total == r["client_bytes"] + 24 * 1000
    assert sum(f["flow"]["bytes_toclient"] for f in flows) == r["server_bytes"]


SERVER_HALF_CLOSE = """
import socket, hashlib
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9200)); s.listen(8)
while True:
    c, _ = s.accept()
    h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(65536)
        if not b: break
        h.update(b); n += len(b)
    # only after the client's FIN arrived: answer, proving the half-close was passed on
    c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
"""


@pytest.mark.parametrize("relay", RELAYS)
def test_half_close_is_propagated_both_ways(cluster, relay):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.popen([PY, "-c", SERVER_HALF_CLOSE])
    srv.wait_listening(9200)
    sc = srv.start_sidecar(*L4, *RELAY_FLAGS[relay])
    r = _py(cli, f"""
        import socket, hashlib
        s = socket.create_connection(("{srv.ip}", 9200), timeout=10)
        data = b"x" * 1_000_000
        s.sendall(data); s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            b = s.recv(65536)
            if not b: break
            got += b
        print(got.decode()); print(hashlib.sha256(data).hexdigest())
    """)
    answer, expected = r.stdout.split("\n")[:2]
    assert answer == f"1000000 {expected}"
    flow = sc.wait_flows(1, dest_port=9200)[0]
    assert flow["close_reason"] == "eof"


SERVER_RST = """
import socket, struct
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9300)); s.listen(8)
while True:
    c, _ = s.accept()
    c.recv(10)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
"""


@pytest.mark.parametrize("relay", RELAYS)
def test_server_reset_reaches_client_as_reset(cluster, relay):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.popen([PY, "-c", SERVER_RST])
    srv.wait_listening(9300)
    sc = srv.start_sidecar(*L4, *RELAY_FLAGS[relay])
    r = _py(cli, f"""
        import socket, time
        s = socket.create_connection(("{srv.ip}", 9300), timeout=10)
        s.sendall(b"hello")
        try:
            while s.recv(100): pass
            print("eof")
        except ConnectionResetError:
            print("reset")
    """)
    assert r.stdout.strip() == "reset"
    flow = sc.wait_flows(1, dest_port=9300)[0]
    assert flow["close_reason"] == "reset"


def test_refused_upstream_resets_client_and_flow_says_why(cluster):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    sc = srv.start_sidecar(*L4)
    r = _py(cli, f"""
        import socket
        try:  # the reset may arrive before connect() returns: that is a reset too
            s = socket.create_connection(("{srv.ip}", 9999), timeout=10)
            s.sendall(b"x")
            print("data", s.recv(10))
        except (ConnectionResetError, BrokenPipeError):
            print("reset")
    """, check=False)
    assert r.stdout.strip() == "reset", r.stderr
    flow = sc.wait_flows(1, dest_port=9999)[0]
    assert flow["close_reason"] == "upstream-refused"


def _rss_kib(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as fh:
        m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("relay", RELAYS)
def test_slow_receiver_keeps_sidecar_memory_bounded(cluster, relay):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.serve_blast(9000)
    sc = srv.start_sidecar(*L4, *RELAY_FLAGS[relay])
    base = _rss_kib(sc.pid(), "VmRSS")
    n = 300 * 1024 * 1024
    # the client reads nothing for 4 seconds while the server pushes 300 MB
    r = cli.blast(srv.ip, client_bytes=0, server_bytes=n, slow_reader=4)
    assert r["failed"] == 0
    peak = _rss_kib(sc.pid(), "VmHWM")
    assert peak - base < 64 * 1024, f"sidecar RSS grew {peak - base} KiB for a slow receiver"
    flow = sc.wait_flows(1, dest_port=9000)[0]
    assert flow["flow"]["bytes_toclient"] == n


@pytest.mark.parametrize("relay", ["native", "splice"])
def test_sigterm_drains_open_flows_then_exits_zero(cluster, relay):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.serve_blast(9000)
    sc = srv.start_sidecar(*L4, "--drain-timeout", "20", *RELAY_FLAGS[relay])
    # a transfer that lasts ~3 s because the receiver starts reading late
    client = cli.popen([PY, "tests/tools/blast.py", "client", "--host", srv.ip, "--server-bytes",
                        str(50 * 1024 * 1024), "--slow-reader", "3"], cwd=str(REPO))
    wait_until(lambda: 'palisade_connections_active{direction="inbound"} 1.0' in sc.http("/metrics")[1],
               10, what="client connected through the sidecar")
    t0 = time.monotonic()
    sc.proc.send_signal(signal.SIGTERM)
    # while draining, new connections are refused (listener closed, fail-closed rule)
    wait_until(lambda: _py(cli, f"""
        import socket
        try:
            socket.create_connection(("{srv.ip}", 9000), timeout=3).recv(1); print("open")
        except OSError: print("refused")
    """, check=False).stdout.strip() == "refused", 10, what="new connections refused")
    out, _ = client.communicate(timeout=60)
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert res["failed"] == 0, res  # the open flow finished intact
    assert sc.proc.wait(30) == 0
    assert time.monotonic() - t0 < 25
    flows = sc.flows(dest_port=9000)
    assert any(f["flow"]["bytes_toclient"] == 50 * 1024 * 1024 for f in flows)


def test_excluded_ports_are_not_captured_but_uid_1337_is(cluster):
    app, other = cluster.pod("app"), cluster.pod("other")
    other.serve_blast(9100)
    app.serve_blast(9400)  # inbound port excluded below
    sc = app.start_sidecar(*L4, redirect_args=["--exclude-inbound-ports", "9400",
                                               "--exclude-outbound-ports", "9100"])
    # excluded outbound port: works, not recorded
    assert app.blast(other.ip, port=9100, client_bytes=1000, server_bytes=1000)["failed"] == 0
    # excluded inbound port: works, not recorded
    assert other.blast(app.ip, port=9400, client_bytes=1000, server_bytes=1000)["failed"] == 0
    # a process running as the proxy's UID/GID 1337 is captured like any other (the proxy's
    # own traffic is exempt by its SO_MARK, which needs CAP_NET_ADMIN; issue 16)
    other.serve_blast(9101)
    r = app.run(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", PY,
                 "tests/tools/blast.py", "client", "--host", other.ip, "--port", "9101",
                 "--client-bytes", "1000", "--server-bytes", "1000"],
                cwd=str(REPO))
    assert json.loads(r.stdout.strip().splitlines()[-1])["failed"] == 0
    sc.wait_flows(1, dest_port=9101)
    # admin port from outside the pod: reachable, never redirected
    code = _py(other, f"""
        import urllib.request
        print(urllib.request.urlopen("http://{app.ip}:15020/healthz", timeout=5).status)
    """).stdout.strip()
    assert code == "200"
    # a captured connection for contrast: proves the recorder works in this test
    other.serve_blast(9102)
    assert app.blast(other.ip, port=9102, client_bytes=10, server_bytes=10)["failed"] == 0
    sc.wait_flows(1, dest_port=9102)
    ports = {f["dest_port"] for f in sc.events("flow")}
    assert ports == {9101, 9102}, ports


def test_sidecar_down_fails_closed_and_recovers(cluster):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.serve_blast(9000)
    sc = srv.start_sidecar(*L4)
    assert cli.blast(srv.ip, client_bytes=100, server_bytes=100)["failed"] == 0
    sc.stop(signal.SIGKILL)
    probe = f"""
        import socket
        try:
            s = socket.create_connection(("{srv.ip}", 9000), timeout=3)
            s.sendall(b"x" * 24); print("open", s.recv(10))
        except ConnectionRefusedError: print("refused")
        except OSError as e: print("error", e)
    """
    assert _py(cli, probe).stdout.strip() == "refused"  # not bypassed to the app
    sc2 = srv.start_sidecar(*L4, apply_redirect=False)
    assert cli.blast(srv.ip, client_bytes=100, server_bytes=100)["failed"] == 0
    sc2.wait_flows(1, dest_port=9000)


def test_ipv6_inbound_is_relayed(cluster):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.serve_blast(9000, host="::")
    sc = srv.start_sidecar(*L4)
    wait_until(lambda: "tentative" not in cli.run(["ip", "-6", "addr"]).stdout, 10, what="ipv6 dad")
    r = cli.blast(srv.ip6, client_bytes=2_000_000, server_bytes=2_000_000)
    assert r["failed"] == 0
    flow = sc.wait_flows(1, dest_port=9000)[0]
    assert flow["src_ip"] == cli.ip6 and flow["dest_ip"] == srv.ip6


def test_sidecar_runs_as_1337_with_only_net_admin_and_net_raw(cluster):
    srv = cluster.pod("server")
    sc = srv.start_sidecar(*L4)
    with open(f"/proc/{sc.pid()}/status") as fh:
        status = fh.read()
    uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
    gid = re.search(r"^Gid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
    assert set(uid) == {"1337"} and set(gid) == {"1337"}
    cap_eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16)
    cap_prm = int(re.search(r"^CapPrm:\s+([0-9a-f]+)", status, re.M).group(1), 16)
    assert cap_eff == cap_prm == (1 << 12) | (1 << 13)
    assert re.search(r"^NoNewPrivs:\s+1", status, re.M)


def test_metrics_and_health_endpoints(cluster):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.serve_blast(9000)
    sc = srv.start_sidecar(*L4)
    assert sc.http("/healthz")[0] == 200
    assert sc.http("/readyz")[0] == 200
    assert cli.blast(srv.ip, client_bytes=1000, server_bytes=2000)["failed"] == 0
    sc.wait_flows(1)
    code, body = sc.http("/metrics")
    assert code == 200
    assert re.search(r'palisade_connections_total\{direction="inbound",verdict="allow"\} 1\.0', body)
    assert re.search(r'palisade_bytes_total\{direction="toclient",flow_direction="inbound"\} 2000\.0', body)


def test_workers_share_the_listeners(cluster):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.serve_blast(9000)
    sc = srv.start_sidecar(*L4, "--workers", "2")
    procs = subprocess.run(["pgrep", "-s", str(sc.pid())], capture_output=True, text=True).stdout.split()
    assert len(procs) == 2
    r = cli.blast(srv.ip, connections=400, concurrency=100, client_bytes=50_000, server_bytes=50_000)
    assert r["failed"] == 0
    flows = sc.wait_flows(400, timeout=30)
    workers = {f["worker"] for f in flows}
    assert workers == {0, 1}, workers  # SO_REUSEPORT spread the connections over both processes
    assert sc.stop() == 0
    assert subprocess.run(["pgrep", "-s", str(sc.pid())], capture_output=True).returncode == 1


@pytest.mark.parametrize("offload", [True, False])
def test_bulk_with_full_inspection_is_byte_exact(cluster, offload):
    """L7 identification + DLP on every byte (learn mode: alert-only), with the DLP scan of large
    chunks on the worker thread or inline: the relay must stay byte-exact and ordered."""
    srv, cli = cluster.pod("server"), cluster.pod("client")
    blast = srv.serve_blast(9000)
    cfg = Path(cluster.tmp) / "sidecar.yaml"
    cfg.write_text(f"dlp_offload_bytes: {65536 if offload else 0}\n")
    sc = srv.start_sidecar("--config", str(cfg))
    n = 40 * 1024 * 1024
    r = cli.blast(srv.ip, client_bytes=n, server_bytes=n, connections=3, concurrency=3)
    assert r["failed"] == 0, r
    assert all(x["recv_ok"] for x in blast.wait_results(3))
    flows = sc.wait_flows(3, dest_port=9000)
    assert all(f["flow"]["bytes_toserver"] == n + 24 and f["flow"]["bytes_toclient"] == n for f in flows)
    m = re.search(r"^palisade_dlp_offloaded_chunks_total (\S+)", sc.http("/metrics")[1], re.M)
    assert (float(m.group(1)) > 0) is offload


PEER_SERVER = """
import selectors, socket
sel = selectors.DefaultSelector()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 9300)); ls.listen(4096)
held = []
while True:
    c, (ip, port) = ls.accept()
    c.sendall(("%s %d\\n" % (ip, port)).encode())
    held.append(c)  # kept open: every upstream's 4-tuple stays in use
"""

PEER_CLIENT = """
import json, socket, sys
host, n = sys.argv[1], int(sys.argv[2])
out, socks = [], []
for i in range(n):
    s = socket.create_connection((host, 9300), timeout=10)
    line = b""
    while not line.endswith(b"\\n"):
        chunk = s.recv(64)
        if not chunk:
            sys.exit("connection %d closed before the server's line" % i)
        line += chunk
    ip, port = line.decode().split()
    out.append([s.getsockname()[1], ip, int(port)])
    socks.append(s)
print(json.dumps(out))
"""


def test_upstream_source_ports_avoid_client_ports_and_survive_a_full_range(cluster, tmp_path):
    """The upstream keeps the client's address, so its 4-tuple must never equal a client
    connection's (same address, port and server): such a SYN would be delivered to the other
    flow's socket.  Upstream ports come from ``upstream_ports`` (outside the clients' ephemeral
    range); when that range is exhausted towards one server, further flows connect from the
    pod's own address rather than from a port a client may be using."""
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.popen([PY, "-c", textwrap.dedent(PEER_SERVER)])
    srv.wait_listening(9300)
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("upstream_ports: [20000, 21023]\n")  # 1,024 ports: the test exhausts them
    sc = srv.start_sidecar(*L4, "--config", str(cfg))
    n = 1100
    r = _py(cli, PEER_CLIENT.replace("sys.argv[1]", repr(srv.ip)).replace("int(sys.argv[2])", str(n)),
            timeout=180, check=False)
    assert r.returncode == 0, r.stderr[-2000:]  # every connection answered: no collision
    rows = json.loads(r.stdout)
    assert len(rows) == n
    client_ports = {c for c, _, _ in rows}
    preserved = [p for _, ip, p in rows if ip == cli.ip]
    from_pod = [p for _, ip, p in rows if ip != cli.ip]
    assert len(set(preserved)) == len(preserved)  # one 4-tuple each
    assert all(20000 <= p <= 21023 for p in preserved)
    assert 1000 <= len(preserved) <= 1024  # (nearly) the whole range before the fallback
    assert all(ip in (cli.ip, srv.ip) for _, ip, _ in rows)
    assert len(from_pod) == n - len(preserved)
    assert not client_ports & set(preserved)
    exhausted = re.search(r'^palisade_relay_errors_total\{kind="source-ports-exhausted"\} (\S+)',
                          sc.http("/metrics")[1], re.M)
    assert exhausted and float(exhausted.group(1)) == len(from_pod)
    assert sc.proc.poll() is None
    # every flow carried bytes through a splice pipe, yet an idle spliced flow holds only its
    # two sockets: pipes go back to a shared pool once empty (2 descriptors per flow, like nginx)
    spliced = re.search(r"^palisade_spliced_flows_total (\S+)", sc.http("/metrics")[1], re.M)
    assert float(spliced.group(1)) >= n
    fds = len(list(Path(f"/proc/{sc.pid()}/fd").iterdir()))
    assert fds < 2 * n + 100, fds


CHURN_SERVER = """
import socket
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 9301)); ls.listen(4096)
while True:
    c, (ip, port) = ls.accept()
    try:  # a client that reset at once may be gone already: the server must outlive it
        c.sendall(("%s %d\\n" % (ip, port)).encode())
    except OSError:
        pass
    c.close()
"""

CHURN_CLIENT = """
import json, socket, sys
out = []
for i in range(N):
    s = socket.create_connection((HOST, 9301), timeout=10)
    data = b""
    while True:
        chunk = s.recv(64)
        if not chunk:
            break
        data += chunk
    s.close()
    ip, port = data.decode().split()
    out.append([ip, int(port)])
print(json.dumps(out))
"""


def test_churn_keeps_the_client_address_on_every_flow(cluster, tmp_path):
    """Issue 22: ``upstream_ports`` contained the sidecar's own listener ports; binding one
    failed with EADDRINUSE, which was taken for "no CAP_NET_ADMIN" and turned the transparent
    upstream off for the life of the process.  Here the range holds the outbound (15001),
    inbound (15006), admin (15020) and DNS (15053) listener ports and an application's own
    listener (15500); a churn of short flows walks through all of them and every flow must
    still reach the application from the client's own address."""
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.popen([PY, "-c", textwrap.dedent(CHURN_SERVER)])
    srv.wait_listening(9301)
    srv.popen([PY, "-c", "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',15500)); s.listen(); "
                         "time.sleep(3600)"])
    srv.wait_listening(15500)
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("upstream_ports: [15000, 16023]\n")
    sc = srv.start_sidecar(*L4, "--config", str(cfg))
    n = 900  # < the range: the round robin passes every listener port in it
    code = textwrap.dedent(CHURN_CLIENT).replace("N)", f"{n})").replace("HOST", repr(srv.ip))
    r = _py(cli, code, timeout=180, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert len(rows) == n
    assert all(ip == cli.ip for ip, _ in rows), [row for row in rows if row[0] != cli.ip][:5]
    ports = {p for _, p in rows}
    assert not ports & {15001, 15006, 15020, 15053, 15500}
    assert all(15000 <= p <= 16023 for p in ports)
    flows = sc.wait_flows(n, dest_port=9301, timeout=60)
    assert len(flows) == n
    assert all(f["source_preserved"] is True for f in flows), \
        sum(1 for f in flows if f["source_preserved"] is not True)
    assert sc.proc.poll() is None


def test_sigterm_writes_every_batched_flow_record(cluster, tmp_path):
    """Flow records are written in batches (``flow_record_interval``); here the interval is
    far longer than the test, so every record is still queued when SIGTERM arrives: the
    shutdown must write them all, each redacted like any other event."""
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.popen([PY, "-c", textwrap.dedent(CHURN_SERVER)])
    srv.wait_listening(9301)
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("flow_record_interval: 60\n")
    sc = srv.start_sidecar(*L4, "--config", str(cfg))
    n = 50
    code = textwrap.dedent(CHURN_CLIENT).replace("N)", f"{n})").replace("HOST", repr(srv.ip))
    r = _py(cli, code, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sc.flows(dest_port=9301) == []  # still in the batch
    sc.proc.send_signal(signal.SIGTERM)
    assert sc.proc.wait(30) == 0
    flows = sc.flows(dest_port=9301)
    assert len(flows) == n
    assert len({f["flow_id"] for f in flows}) == n
    assert all(f["timestamp"] == f["flow"]["end"] for f in flows)


FAST_POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector:
    matchLabels: {app: api}
  mode: protect
  default: deny
  ingress:
    - name: shop-to-api
      from:
        - namespace: shop
      ports: [{port: 9300, protocol: TCP}]
      action: allow
"""

HOLD_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 9300), timeout=30)
print(s.recv(100).decode().split()[0], flush=True)
try:
    print("closed" if not s.recv(100) else "data", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""


def _fast_flows(sc) -> float:
    m = re.search(r"^palisade_l4_fast_flows_total (\S+)", sc.http("/metrics")[1], re.M)
    return float(m.group(1)) if m else 0.0


def _fast_env(cluster, *extra: str):
    from firewall.identity.podinfo import write_podinfo

    tmp_path = Path(cluster.tmp)  # readable by the sidecar's UID (it re-reads these on reload)
    srv, cli = cluster.pod("server", namespace="payments"), cluster.pod("client", namespace="shop")
    srv.popen([PY, "-c", textwrap.dedent(PEER_SERVER)])
    srv.wait_listening(9300)
    labels = {"app": "api"}
    ident = tmp_path / "identity.json"
    ident.write_text(json.dumps([
        {"ip": srv.ip, "namespace": "payments", "pod": "server", "labels": labels},
        {"ip": cli.ip, "namespace": "shop", "pod": "client", "labels": {"app": "shop"}}]))
    policy = tmp_path / "policy.yaml"
    policy.write_text(FAST_POLICY)
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    write_podinfo(str(podinfo), {}, labels)
    os.chmod(podinfo, 0o755)
    sc = srv.start_sidecar(*L4, "--identity", str(ident), "--policy", str(policy), "--podinfo", str(podinfo),
                           "--labels", json.dumps(labels), *extra, env={"POD_NAMESPACE": "payments"})
    return srv, cli, sc, policy, podinfo, labels


def _hold(cli, srv):
    p = cli.popen([PY, "-c", textwrap.dedent(HOLD_CLIENT), srv.ip])
    assert p.stdout.readline().decode().strip() == cli.ip  # relayed, client address kept
    return p


@pytest.mark.parametrize("relay", ["native", "splice"])
def test_l4_fast_path_flows_are_cut_by_reload_and_quarantine(cluster, relay):
    """Flows final at accept skip asyncio transports (accept -> connect -> splice), yet a
    policy reload still re-evaluates them (the new policy denies: cut, recorded as such) and
    quarantine still cuts every open one."""
    from firewall.identity.podinfo import write_podinfo

    srv, cli, sc, policy, podinfo, labels = _fast_env(cluster, *RELAY_FLAGS[relay])
    holder = _hold(cli, srv)
    assert _fast_flows(sc) == 1.0
    policy.write_text(FAST_POLICY.replace("namespace: shop", "namespace: shop-v2"))
    assert holder.stdout.readline().decode().strip() in ("reset", "closed")
    flow = sc.wait_flows(1, dest_port=9300)[0]
    assert flow["verdict"] == "deny" and flow["close_reason"] == "reload"
    assert flow["source_preserved"] is True
    policy.write_text(FAST_POLICY)
    sc.wait_event(lambda e: e.get("event_type") == "policy" and e["policy"]["action"] == "reloaded"
                  and len(sc.flows(dest_port=9300)) == 1, timeout=15)
    wait_until(lambda: _py(cli, f"""
        import socket
        s = socket.create_connection(("{srv.ip}", 9300), timeout=3); print(s.recv(64).decode().split()[0])
    """, check=False).stdout.strip() == cli.ip, 15, what="allowed again after the second reload")
    holder = _hold(cli, srv)
    write_podinfo(str(podinfo), {"palisade.dev/quarantine": "true"}, labels)
    assert holder.stdout.readline().decode().strip() in ("reset", "closed")
    cut = sc.wait_flows(1, dest_port=9300, close_reason="quarantine")[0]
    assert cut["verdict"] == "deny"
    assert _fast_flows(sc) >= 3.0


@pytest.mark.parametrize("relay", ["native", "splice"])
def test_l4_fast_path_idle_timeout_and_drain(cluster, relay):
    """A spliced fast-path flow with no bytes is reset after idle_timeout; another open one is
    cut at the end of the SIGTERM drain, and both have their flow record."""
    srv, cli, sc, *_ = _fast_env(cluster, "--idle-timeout", "2", "--drain-timeout", "1", *RELAY_FLAGS[relay])
    holder = _hold(cli, srv)
    assert _fast_flows(sc) == 1.0
    t0 = time.monotonic()
    assert holder.stdout.readline().decode().strip() in ("reset", "closed")
    assert 1.5 < time.monotonic() - t0 < 6
    assert sc.wait_flows(1, dest_port=9300, close_reason="idle-timeout")
    holder = _hold(cli, srv)
    sc.proc.send_signal(signal.SIGTERM)
    assert holder.stdout.readline().decode().strip() in ("reset", "closed")
    assert sc.proc.wait(30) == 0
    assert len(sc.flows(dest_port=9300, close_reason="shutdown")) == 1


def test_l4_fast_path_only_for_flows_no_dlp_reads_and_both_paths_byte_exact(cluster):
    """With DLP on (L7 off) a flow the DLP reads is not final at accept: it is adopted as a
    transport (Protocol path) and stays byte-exact; with DLP off the same flow takes the fast
    path (the client's header, sent at once, waits in the kernel until the upstream is up)."""
    srv, cli = cluster.pod("server"), cluster.pod("client")
    blast = srv.serve_blast(9000)
    sc = srv.start_sidecar("--no-l7")  # DLP packs on: not final at accept
    n = 8 * 1024 * 1024
    r = cli.blast(srv.ip, client_bytes=n, server_bytes=n)
    assert r["failed"] == 0, r
    assert blast.wait_results(1)[0]["recv_ok"] is True
    flow = sc.wait_flows(1, dest_port=9000)[0]
    assert flow["flow"]["bytes_toserver"] == n + 24 and flow["flow"]["bytes_toclient"] == n
    assert _fast_flows(sc) == 0.0
    sc.stop()
    sc = srv.start_sidecar(*L4)
    r = cli.blast(srv.ip, client_bytes=n, server_bytes=n)
    assert r["failed"] == 0, r
    assert _fast_flows(sc) == 1.0


RST_BURST = """
import socket, struct, sys
host, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.connect((host, int(sys.argv[3])))
    if i % 2:
        s.sendall(b"x" * 1000)  # early bytes, then the reset
    s.close()  # RST at once: usually before the sidecar's upstream is connected
print("ok")
"""


@pytest.mark.parametrize("relay", ["native", "splice"])
def test_l4_fast_path_resets_and_refusals_leak_nothing(cluster, relay):
    """Clients that reset at once (with and without early bytes) and connections to a port
    nobody listens on: every one ends with a flow record, none stays open, the process lives."""
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.popen([PY, "-c", textwrap.dedent(CHURN_SERVER)])
    srv.wait_listening(9301)
    sc = srv.start_sidecar(*L4, *RELAY_FLAGS[relay])
    n = 300
    r = cli.run([PY, "-c", RST_BURST, srv.ip, str(n), "9301"], check=False, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
    refused = cli.run([PY, "-c", "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], 9399), timeout=5)"
                                 ".recv(1)\nexcept OSError as e: print(type(e).__name__)", srv.ip],
                      check=False, timeout=30)
    assert refused.stdout.strip() in ("ConnectionResetError", "ConnectionRefusedError"), refused
    flows = sc.wait_flows(n, dest_port=9301, timeout=30)
    assert len(flows) == n
    assert sc.wait_flows(1, dest_port=9399)[0]["close_reason"] == "upstream-refused"
    wait_until(lambda: re.search(r'^palisade_connections_active\{direction="inbound"\} 0\.0',
                                 sc.http("/metrics")[1], re.M), 10, what="no flow left open")
    assert _fast_flows(sc) == n + 1
    assert sc.proc.poll() is None
