"""A client that reconnects from the same source port while the sidecar's side of its previous
connection is still in TIME_WAIT (the sidecar closed first).

The prerouting rule that accepts packets of flows the sidecar already owns (``socket transparent
1``) also matches a transparent TIME_WAIT socket; the kernel then answers a new SYN for that
4-tuple from the TIME_WAIT socket (TCP_TW_SYN) by looking up a *listener on the original
destination* - the application's own - unless the packet went through ``tproxy``.  That would
hand the new connection to the application with no proxy, no policy and no record.  The test
reconnects from the same port many times and asserts every connection went through the sidecar:
the application sees the upstream port the sidecar chose (never the client's own port) and every
connection has a flow record.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.harness import PY, Cluster

pytestmark = pytest.mark.netns

# the server writes the peer address it saw, then closes first (so the sidecar, which passes the
# server's FIN on, is the first to close towards the client: its socket ends in TIME_WAIT)
SERVER = textwrap.dedent(r"""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
    print("listening", flush=True)
    while True:
        c, peer = s.accept()
        c.recv(100)
        c.sendall(f"{peer[0]} {peer[1]}\n".encode())
        c.close()
""")

CLIENT = textwrap.dedent(r"""
    import json, socket, sys, time
    host, port, sport, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    seen, errors = [], []
    for i in range(n):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(10)
        try:
            s.bind(("0.0.0.0", sport))
            s.connect((host, port))
            s.sendall(b"hello\n")
            data = b""
            while True:
                b = s.recv(100)
                if not b:
                    break
                data += b
            seen.append(data.decode().strip())
        except OSError as exc:
            errors.append(repr(exc))
        finally:
            s.close()
    print(json.dumps({"seen": seen, "errors": errors}), flush=True)
""")


@pytest.mark.parametrize("relay", [("--no-l7", "--no-dlp"), ()], ids=["l4-fast-path", "l7"])
def test_reconnect_from_a_port_in_time_wait_still_goes_through_the_sidecar(relay):
    with Cluster("tw", 197 if relay else 198) as c:
        srv, cli = c.pod("app"), c.pod("client")
        p = srv.popen([PY, "-c", SERVER, "9000"])
        assert p.stdout.readline().strip() == b"listening"
        sc = srv.start_sidecar(*relay)
        n, sport = 20, 40404
        r = cli.run([PY, "-c", CLIENT, srv.ip, "9000", str(sport), str(n)], timeout=300)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        direct = [s for s in out["seen"] if s.endswith(f" {sport}")]
        assert not direct, f"{len(direct)} of {n} connections reached the application directly: {out}"
        flows = sc.wait_flows(len(out["seen"]), dest_port=9000)
        assert len(flows) == len(out["seen"]) and {f["src_port"] for f in flows} == {sport}
        # reconnecting from the same port works (a refused reconnect would be an outage, not a bypass)
        assert len(out["seen"]) == n, out["errors"]
