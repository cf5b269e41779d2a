"""DLP on (the default packs), L7 on: flows no DLP action can apply to are spliced, the others
are scanned and blocked, and a reload that makes DLP apply to a spliced flow cuts it.

Real sidecar, real nftables redirect, real sockets between network namespaces.  The server
pod (namespace ``payments``) has a policy whose only DLP rule blocks card numbers from the
``partners`` namespace; the ``shop`` client is out of every DLP scope.  The protocol is an
unidentified binary one, so with no DLP action the flow's verdict is final once identified
and the proxy hands it to the kernel (``palisade_spliced_flows_total``).
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from tests.harness import PY, wait_until

pytestmark = pytest.mark.netns

POLICY = """
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: api, namespace: payments}
spec:
  selector:
    matchLabels: {app: api}
  mode: protect
  default: deny
  ingress:
    - name: callers
      from: [{namespace: shop}, {namespace: partners}]
      ports: [{port: 9300, protocol: TCP}]
      action: allow
  dlp:
    - name: no-pan-from-partners
      packs: [payment_cards]
      direction: ingress
      from: [{namespace: partners}]
      action: block
"""
# what the reload adds: the shop namespace is in DLP scope too
SHOP_RULE = """
    - name: no-pan-from-shop
      packs: [payment_cards]
      direction: ingress
      from: [{namespace: shop}]
      action: block
"""

# Echo server: every connection's received bytes are echoed and saved as recv-<port>.bin, port
# being the client's own, which the client puts in its 8-byte binary header (the upstream
# connection's source port is the sidecar's choice).
ECHO_SERVER = """
import socket, sys, threading
out = sys.argv[1]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 9300)); ls.listen(64)
def serve(c, port):
    got = bytearray()
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += b
            c.sendall(b)
    except OSError:
        pass
    name = int.from_bytes(got[4:6], "big") if len(got) >= 6 else port
    with open("%s/recv-%d.bin" % (out, name), "wb") as f:
        f.write(got)
    c.close()
while True:
    c, (ip, port) = ls.accept()
    threading.Thread(target=serve, args=(c, port), daemon=True).start()
"""

# Client: a binary header, then PAYLOAD (argv) repeated to N bytes, reading the echo as it goes;
# prints JSON {port, sent, echoed, end} where end is eof / reset.
SEND_CLIENT = """
import json, os, socket, sys
host, payload, total = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, 9300), timeout=20)
port = s.getsockname()[1]
data = b"\\x00\\x01PL" + port.to_bytes(2, "big") + b"\\x02\\x03" + (payload * (total // len(payload) + 1))[:total]
sent = echoed = 0
end = "eof"
got = bytearray()
try:
    while sent < len(data):
        n = s.send(data[sent:sent + 65536])
        sent += n
        s.setblocking(False)
        try:
            while True:
                b = s.recv(1 << 20)
                if not b:
                    break
                got += b
        except BlockingIOError:
            pass
        s.setblocking(True)
    s.shutdown(socket.SHUT_WR)
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        got += b
except OSError:
    end = "reset"
print(json.dumps({"port": port, "sent": sent, "echoed": len(got), "exact": bytes(got) == data[:len(got)],
                  "end": end}))
"""

# Client that opens a flow, proves it relays, then waits for the sidecar to cut it.
HOLD_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 9300), timeout=60)
s.sendall(b"\\x00\\x01PLSD\\x02\\x03hello")
got = b""
while len(got) < 13:
    got += s.recv(64)
print("relayed", flush=True)
try:
    print("closed" if not s.recv(100) else "data", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""

PAN = "4111 1111 1111 1111"


def _metric(sc, name: str) -> float:
    m = re.search(rf"^{name} (\S+)", sc.http("/metrics")[1], re.M)
    return float(m.group(1)) if m else 0.0


def _card_reached_server(recv: Path, except_port: int | None) -> bool:
    """Whether the server received the whole card on any connection but ``except_port``'s
    (in any spelling: with the spaces or without)."""
    for f in recv.iterdir():
        if except_port is not None and f.name == f"recv-{except_port}.bin":
            continue
        data = f.read_bytes()
        if PAN.encode() in data or PAN.replace(" ", "").encode() in data:
            return True
    return False


def _env(cluster, *extra: str):
    from firewall.identity.podinfo import write_podinfo

    tmp = Path(cluster.tmp)
    srv = cluster.pod("server", namespace="payments")
    shop = cluster.pod("shop", namespace="shop")
    partner = cluster.pod("partner", namespace="partners")
    recv = tmp / "recv"
    recv.mkdir()
    os.chmod(recv, 0o777)
    srv.popen([PY, "-c", textwrap.dedent(ECHO_SERVER), str(recv)])
    srv.wait_listening(9300)
    labels = {"app": "api"}
    ident = tmp / "identity.json"
    ident.write_text(json.dumps([
        {"ip": srv.ip, "namespace": "payments", "pod": "server", "labels": labels},
        {"ip": shop.ip, "namespace": "shop", "pod": "shop", "labels": {"app": "shop"}},
        {"ip": partner.ip, "namespace": "partners", "pod": "partner", "labels": {"app": "upload"}}]))
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    podinfo = tmp / "podinfo"
    podinfo.mkdir()
    write_podinfo(str(podinfo), {}, labels)
    os.chmod(podinfo, 0o755)
    # the default configuration: L7 identification and every default DLP pack on
    sc = srv.start_sidecar("--identity", str(ident), "--policy", str(policy), "--podinfo", str(podinfo),
                           "--labels", json.dumps(labels), *extra, env={"POD_NAMESPACE": "payments"})
    return srv, shop, partner, sc, policy, recv


def _send(pod, srv, payload: bytes, total: int) -> dict:
    r = pod.run([PY, "-c", textwrap.dedent(SEND_CLIENT), srv.ip, payload.hex(), str(total)], check=False,
                timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_out_of_scope_flow_is_spliced_and_in_scope_flow_blocks_a_card(cluster):
    srv, shop, partner, sc, _, recv = _env(cluster)
    text = (b'{"order": 1234, "note": "card ' + PAN.encode() + b' thanks"}\n' + b"lorem ipsum " * 200)
    n = 8 << 20
    # out of every DLP scope: relayed byte-exact and handed to splice (the card is not this
    # policy's business on this pair: no DLP action applies, so nothing scans it)
    r = _send(shop, srv, text, n)
    assert r["end"] == "eof" and r["exact"] and r["echoed"] == n + 8, r
    shop_port = r["port"]
    wait_until(lambda: (recv / f"recv-{shop_port}.bin").exists(), 10, what="the shop flow's end at the server")
    assert PAN.encode() in (recv / f"recv-{shop_port}.bin").read_bytes()
    flow = sc.wait_flows(1, src_ip=shop.ip, dest_port=9300)[0]
    assert flow["verdict"] == "allow" and flow["flow"]["bytes_toserver"] == n + 8
    assert _metric(sc, "palisade_spliced_flows_total") == 1.0
    assert not [e for e in sc.events("alert") if e.get("src_ip") == shop.ip]
    # in scope (the partners rule): scanned and cut before the card's last byte reaches the
    # server, never spliced; the value is split across many segments by the send loop
    r = _send(partner, srv, text, n)
    assert r["end"] == "reset" or r["echoed"] < n, r
    flow = sc.wait_flows(1, src_ip=partner.ip, dest_port=9300)[0]
    assert flow["verdict"] == "deny" and flow["close_reason"].startswith("dlp-block"), flow
    # the server saw the upstream end (cut before its 6-byte header arrived: named by its port)
    wait_until(lambda: len(list(recv.iterdir())) == 2, 10, what="the server saw the partner connection end")
    assert not _card_reached_server(recv, shop_port)
    alert = [e for e in sc.events("alert") if e.get("src_ip") == partner.ip and e["alert"]["category"] == "dlp"]
    assert alert and alert[0]["alert"]["action"] == "blocked" and alert[0]["dlp"]["masked"] == "411111******1111"
    assert _metric(sc, "palisade_spliced_flows_total") == 1.0  # the scanned flow never was


@pytest.mark.parametrize("l7", ["l7", "no-l7"])
def test_reload_that_brings_a_spliced_flow_into_dlp_scope_cuts_it(cluster, l7):
    """With L7 on the open flow was spliced after identification; with --no-l7 it took the L4
    fast path at accept (FastFlow: no transport at all).  Either way the reload cuts it."""
    srv, shop, partner, sc, policy, recv = _env(cluster, *(["--no-l7"] if l7 == "no-l7" else []))
    holder = shop.popen([PY, "-c", textwrap.dedent(HOLD_CLIENT), srv.ip])
    assert holder.stdout.readline().decode().strip() == "relayed"
    wait_until(lambda: _metric(sc, "palisade_spliced_flows_total") == 1.0, 10, what="the open flow spliced")
    if l7 == "no-l7":
        assert _metric(sc, "palisade_l4_fast_flows_total") == 1.0
    policy.write_text(POLICY + SHOP_RULE)
    # the open flow was never scanned: it cannot be inspected from the middle, so it is cut
    assert holder.stdout.readline().decode().strip() in ("reset", "closed")
    flow = sc.wait_flows(1, src_ip=shop.ip, dest_port=9300)[0]
    assert flow["verdict"] == "deny" and flow["close_reason"] == "reload", flow
    assert flow["rule"] == "no-pan-from-shop"
    cut = [e for e in sc.events("alert") if e.get("src_ip") == shop.ip and e["alert"]["category"] == "dlp"]
    assert cut and cut[0]["alert"]["action"] == "blocked" and "policy reload" in cut[0]["reason"]
    # a new shop flow is scanned now: the card is blocked, and it is not spliced
    r = _send(shop, srv, b"card " + PAN.encode() + b" end\n" + b"x" * 4000, 1 << 20)
    assert r["end"] == "reset" or r["echoed"] < (1 << 20), r
    wait_until(lambda: len(sc.flows(src_ip=shop.ip, dest_port=9300)) == 2, 15, what="second flow record")
    second = [f for f in sc.flows(src_ip=shop.ip, dest_port=9300) if f["close_reason"] != "reload"][0]
    assert second["close_reason"].startswith("dlp-block"), second
    wait_until(lambda: len(list(recv.iterdir())) == 2, 10, what="the server saw both connections end")
    assert not _card_reached_server(recv, None)
    assert _metric(sc, "palisade_spliced_flows_total") == 1.0
