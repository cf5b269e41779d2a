"""The fast path's shared connect watcher (``ConnectWatch``, native relay): upstream connects
that never complete are timed out and reset without leaking a descriptor or an epoll entry,
and the watcher keeps working for the flows after them (their descriptor numbers are reused).

The server pod's own nftables drop the sidecar's upstream SYNs (they arrive on ``lo``; the
clients' SYNs arrive on the pod's veth), so every connect stays in progress until
``connect_timeout``."""

from __future__ import annotations

import re
import textwrap
import time

import pytest

from tests.harness import PY, wait_until
from tests.integration.test_datapath import L4, PEER_SERVER, RELAY_FLAGS

pytestmark = pytest.mark.netns

DROP = ("table inet cwsyn {\n chain synin {\n  type filter hook input priority 0;\n"
        "  iifname \"lo\" tcp dport 9300 tcp flags & (syn | ack) == syn drop\n }\n}\n")

MANY = """
import socket, sys, threading
host, n = sys.argv[1], int(sys.argv[2])
out = []
def one():
    try:
        s = socket.create_connection((host, 9300), timeout=20)
        got = s.recv(64)
        out.append("closed" if not got else "data")
    except ConnectionResetError:
        out.append("reset")
    except OSError as e:
        out.append(type(e).__name__)
ts = [threading.Thread(target=one) for _ in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(" ".join(sorted(set(out))), len(out))
"""


def _active(sc) -> str:
    m = re.search(r'^palisade_connections_active\{direction="inbound"\} (\S+)', sc.http("/metrics")[1], re.M)
    return m.group(1) if m else "?"


def _fds(pod, pid: int) -> int:
    return int(pod.run(["sh", "-c", f"ls /proc/{pid}/fd | wc -l"]).stdout.strip())


def test_connects_that_never_complete_time_out_and_the_watcher_goes_on(cluster, tmp_path):
    srv, cli = cluster.pod("server"), cluster.pod("client")
    srv.popen([PY, "-c", textwrap.dedent(PEER_SERVER)])
    srv.wait_listening(9300)
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("connect_timeout: 1.0\n")
    sc = srv.start_sidecar(*L4, *RELAY_FLAGS["native"], "--config", str(cfg))
    base_fds = _fds(srv, sc.proc.pid)
    srv.run(["nft", "-f", "-"], input=DROP)
    n = 40
    t0 = time.monotonic()
    r = cli.run([PY, "-c", textwrap.dedent(MANY), srv.ip, str(n)], timeout=60)
    took = time.monotonic() - t0
    assert r.stdout.split() == ["reset", str(n)], r.stdout + r.stderr
    assert 0.9 < took < 10, took  # the timeout, not the client's 20 s
    flows = sc.wait_flows(n, dest_port=9300)
    assert {f["close_reason"] for f in flows} == {"upstream-timeout"}
    wait_until(lambda: _active(sc) == "0.0", 10, what="no flow left open")
    # every upstream socket is closed (its epoll entry goes with it): no descriptor grew
    assert _fds(srv, sc.proc.pid) <= base_fds + 2
    srv.run(["nft", "delete", "table", "inet", "cwsyn"])
    # the same descriptor numbers again, now completing: the watcher reports each exactly once
    for _ in range(3):
        r = cli.run([PY, "-c", "import socket,sys\ns=socket.create_connection((sys.argv[1], 9300), timeout=5)\n"
                                "print(s.recv(64).decode().split()[0])", srv.ip], timeout=30)
        assert r.stdout.strip() == cli.ip
    assert sc.proc.poll() is None
