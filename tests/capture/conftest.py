"""Fixtures for capture tests: two pods of a lab cluster (``firewall/lab/netns.py``).

``pc<tag>-a`` plays the pod (``eth0`` 10.77.0.1/24, ``lo`` up), ``pc<tag>-b`` its
peers (``eth0`` 10.77.0.2/24 and 10.77.0.3/24). IPv6 is off in every namespace of the
cluster so captures hold only the traffic a test makes. Traffic never leaves these namespaces.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from firewall.lab import netns as lab

PY = sys.executable
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
NEEDS_TOOLS = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("ip", "tcpdump", "tshark")),
    reason="needs iproute2, tcpdump and tshark (Debian packages)")

SERVER = r"""
import socket, socketserver, sys, threading
class H(socketserver.BaseRequestHandler):
    def handle(self):
        while self.request.recv(65536):
            pass
        self.request.sendall(b"ok")
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    srv = S((host, int(port)), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import socket, sys
for spec in sys.argv[1:]:
    kind, host, port, size = spec.split(":")
    data = (f"MARK-{port}-".encode() * (int(size) // 10 + 1))[: int(size)]
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(0, len(data), 1000):
            s.sendto(data[i:i + 1000], (host, int(port)))
        s.close()
        continue
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(10) == b"ok", "server did not answer"
    s.close()
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


@dataclass
class NsPair:
    """The pod and its peers, two pods of one lab cluster; ``pod``/``peer`` are namespace names."""

    cluster: lab.Cluster
    pod_pod: lab.Pod
    peer_pod: lab.Pod

    @property
    def pod(self) -> str:
        return self.pod_pod.netns

    @property
    def peer(self) -> str:
        return self.peer_pod.netns

    @property
    def pod_path(self) -> str:
        return f"/run/netns/{self.pod}"

    def serve(self, *addrs: str, ns: str | None = None) -> None:
        """TCP sink servers (``host:port``) in the peer namespace (or ``ns``); returns once listening."""
        where = self.pod_pod if ns == self.pod else self.peer_pod
        proc = where.popen([PY, "-c", SERVER, *addrs], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "test servers did not start"

    def traffic(self, *flows: str) -> None:
        """Run client flows from the pod namespace: ``tcp:host:port:bytes`` / ``udp:...``."""
        res = self.pod_pod.run([PY, "-c", CLIENT, *flows], check=False)
        assert res.returncode == 0, f"traffic {flows} failed: {res.stderr.strip()[-500:]}"

    def close(self) -> None:
        self.cluster.close()


@pytest.fixture
def nspair() -> Iterator[NsPair]:
    c = lab.Cluster("pc", 77)
    try:
        pod = c.pod("a", host=1)
        peer = c.pod("b", host=2)
        peer.run(["ip", "addr", "add", "10.77.0.3/24", "dev", "eth0"])
        c.disable_ipv6()
        yield NsPair(c, pod, peer)
    finally:
        c.close()


class Events:
    """Thread-safe event collector with readiness waits (the ``emit`` callable)."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._cv = threading.Condition()

    def __call__(self, event: dict) -> None:
        with self._cv:
            self.items.append(event)
            self._cv.notify_all()

    def pcap(self, state: str | None = None, cid: str | None = None) -> list[dict]:
        with self._cv:
            return [e["pcap"] for e in self.items if e.get("event_type") == "pcap"
                    and (state is None or e["pcap"]["state"] == state)
                    and (cid is None or e["pcap"]["id"] == cid)]

    def wait(self, state: str, cid: str | None = None, n: int = 1, timeout: float = 15.0) -> list[dict]:
        with self._cv:
            ok = self._cv.wait_for(lambda: len(self.pcap(state, cid)) >= n, timeout)
        assert ok, f"no {state!r} pcap event (have {self.items})"
        return self.pcap(state, cid)


@pytest.fixture
def events() -> Events:
    return Events()


def sha256_file(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def tshark_fields(path: str, *fields: str, display_filter: str | None = None) -> list[list[str]]:
    cmd = ["tshark", "-n", "-r", path, "-T", "fields", "-E", "separator=|"]
    for f in fields:
        cmd += ["-e", f]
    if display_filter:
        cmd += ["-Y", display_filter]
    out = sh(*cmd).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def tcpdump_lines(path: str) -> list[str]:
    res = sh("tcpdump", "-nn", "-r", path)
    return [line for line in res.stdout.splitlines() if line.strip()]
