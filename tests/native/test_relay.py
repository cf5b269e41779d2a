"""The native relay's behaviours one at a time, over real loopback TCP: backpressure, a reset on
a half-closed flow, the relay's own idle timer, progress counts for live flows, and how the relay
is chosen (``relay: auto|native|python``)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from firewall.datapath import native_relay, splice
from firewall.sidecar.config import Config, ConfigError

needs_native = pytest.mark.skipif(not native_relay.AVAILABLE,
                                  reason=f"native relay not built: {native_relay.IMPORT_ERROR}")
LINGER0 = struct.pack("ii", 1, 0)


class Legs:
    """client <-> [relay] <-> server over two loopback TCP connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float = 0.0) -> None:
        lst = socket.create_server(("127.0.0.1", 0))
        self.client, c_in = self._pair(lst)
        s_out, self.server = self._pair(lst)
        lst.close()
        self.counted = [0, 0]
        self.progress_seen = False
        self.ended: asyncio.Future[str] = loop.create_future()
        self.sp = splice.relay_class("native", idle)(loop, c_in.detach(), s_out.detach(), self._bytes,
                                                     self.ended.set_result)
        self.sp.start()

    @staticmethod
    def _pair(lst: socket.socket) -> tuple[socket.socket, socket.socket]:
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
        a.setblocking(False)
        b.setblocking(False)
        return a, b

    def _bytes(self, d: int, n: int) -> None:
        self.counted[d] += n
        if not self.ended.done():
            self.progress_seen = True

    def close(self) -> None:
        self.client.close()
        self.server.close()


async def _read_until_reset(loop: asyncio.AbstractEventLoop, s: socket.socket, timeout: float) -> str:
    try:
        while await asyncio.wait_for(loop.sock_recv(s, 65536), timeout):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


TCP_CLOSE = 7


def _tcp_state(s: socket.socket) -> int:
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


@needs_native
def test_backpressure_a_receiver_that_never_reads_stops_the_sender_and_nothing_is_lost():
    async def go() -> tuple[int, bytes, bytes, list[int], str]:
        loop = asyncio.get_running_loop()
        legs = Legs(loop)
        sent = bytearray()
        chunk = bytes(range(256)) * 256
        deadline = time.monotonic() + 10
        # push without the server reading: the send must hit EAGAIN after a bounded amount
        stalled = 0
        while time.monotonic() < deadline and stalled < 20:
            try:
                n = legs.client.send(chunk)
                sent += chunk[:n]
                stalled = 0
            except BlockingIOError:
                stalled += 1
                await asyncio.sleep(0.01)  # the relay thread gets a chance to move more
        accepted = len(sent)
        legs.client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while b := await asyncio.wait_for(loop.sock_recv(legs.server, 1 << 16), 10):
            got += b
        legs.server.shutdown(socket.SHUT_WR)
        reason = await asyncio.wait_for(legs.ended, 10)
        legs.close()
        return accepted, bytes(sent), bytes(got), legs.counted, reason

    accepted, sent, got, counted, reason = asyncio.run(go())
    # buffers on the way: two socket buffer pairs (a few MiB with autotuning) and one 1 MiB pipe
    assert 0 < accepted < 48 << 20, accepted
    assert got == sent
    assert counted == [len(sent), 0] and reason == "eof"


@needs_native
def test_reset_after_half_close_reaches_the_other_side():
    """The client half-closes (its direction is finished, nobody reads its socket any more) and
    then resets: the relay must notice the error on a socket it no longer reads and reset the
    server's side too, instead of holding the flow open until the idle timeout."""
    async def go() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        legs = Legs(loop)
        await loop.sock_sendall(legs.client, b"request")
        legs.client.shutdown(socket.SHUT_WR)
        got = b""
        while b := await asyncio.wait_for(loop.sock_recv(legs.server, 100), 10):
            got += b
        assert got == b"request"
        legs.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        legs.client.close()
        # the server sends nothing: only the relay's own watch for errors can pass the reset on
        # the server already read the FIN, so recv() would say EOF even after a reset: look at
        # the TCP state instead (CLOSE_WAIT while the flow is held open, CLOSE once reset)
        deadline = time.monotonic() + 5
        while _tcp_state(legs.server) != TCP_CLOSE and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        seen = "reset" if _tcp_state(legs.server) == TCP_CLOSE else f"state {_tcp_state(legs.server)}"
        reason = await asyncio.wait_for(legs.ended, 5)
        legs.server.close()
        return seen, reason

    assert asyncio.run(go()) == ("reset", "reset")


@needs_native
def test_idle_timer_cuts_a_silent_flow_but_not_a_trickling_one_and_reports_progress():
    async def go() -> tuple:
        loop = asyncio.get_running_loop()
        silent, busy = Legs(loop, idle=1.0), Legs(loop, idle=1.0)
        t0 = time.monotonic()
        ended_at: list[float] = []
        silent.ended.add_done_callback(lambda _: ended_at.append(time.monotonic() - t0))
        for _ in range(14):  # 3.5 s of a byte every 0.25 s: never idle for 1 s
            await loop.sock_sendall(busy.client, b"x")
            assert await asyncio.wait_for(loop.sock_recv(busy.server, 10), 5) == b"x"
            await asyncio.sleep(0.25)
        silent_reason = await asyncio.wait_for(silent.ended, 5)
        took = ended_at[0]  # while the busy flow was still trickling
        client_saw = await _read_until_reset(loop, silent.client, 5)
        busy_open = not busy.ended.done()
        progress = busy.progress_seen  # counts reached the loop while the flow was open
        busy.sp.close(False, "eof")
        counted = busy.counted
        for legs in (silent, busy):
            legs.close()
        return silent_reason, took, client_saw, busy_open, progress, counted

    reason, took, client_saw, busy_open, progress, counted = asyncio.run(go())
    assert reason == "idle-timeout" and client_saw == "reset"
    assert 0.9 < took < 3.2  # idle 1 s, checked once a second
    assert busy_open and progress
    assert counted == [14, 0]


def test_relay_choice(monkeypatch):
    assert splice.relay_class("python") is splice.Splicer
    if native_relay.AVAILABLE:
        assert splice.relay_class("auto") is native_relay.NativeSplicer
        assert splice.relay_class("native") is native_relay.NativeSplicer
    monkeypatch.setattr(native_relay, "AVAILABLE", False)
    assert splice.relay_class("auto") is splice.Splicer  # the fallback
    with pytest.raises(splice.RelayUnavailable, match="--relay python"):
        splice.relay_class("native")
    with pytest.raises(ValueError):
        splice.relay_class("fast")
    cfg = Config()
    assert cfg.relay == "auto"
    cfg.relay = "fast"
    with pytest.raises(ConfigError, match="relay: expected one of auto, native, python"):
        cfg.validate()


def test_relay_flag_reaches_the_config():
    from firewall.cli import build_parser
    from firewall.sidecar import app

    args = build_parser().parse_args(["run", "--relay", "python"])
    assert app._apply_flags(Config(), args).relay == "python"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--relay", "fast"])


EMFILE_SCRIPT = r"""
import asyncio, hashlib, json, os, resource, socket, sys
from firewall.datapath import native_relay, splice

async def main():
    loop = asyncio.get_running_loop()
    lst = socket.create_server(("127.0.0.1", 0))
    def pair():
        a = socket.create_connection(lst.getsockname()); b, _ = lst.accept()
        a.setblocking(False); b.setblocking(False); return a, b
    client, c_in = pair()
    s_out, server = pair()
    ended = loop.create_future(); counted = [0, 0]
    def on_bytes(d, n): counted[d] += n
    sp = splice.relay_class("native")(loop, c_in.detach(), s_out.detach(), on_bytes, ended.set_result)
    sp.start()
    # every descriptor the process may have is now taken: the relay cannot make a pipe
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)
    async def send(s, data):
        await loop.sock_sendall(s, data); s.shutdown(socket.SHUT_WR)
    async def recv_all(s):
        parts = []
        while chunk := await loop.sock_recv(s, 1 << 16):
            parts.append(chunk)
        return b"".join(parts)
    got_up, got_down, _, _ = await asyncio.wait_for(asyncio.gather(
        recv_all(server), recv_all(client), send(client, up), send(server, down)), 30)
    reason = await asyncio.wait_for(ended, 10)
    for fd in hog:
        os.close(fd)
    print(json.dumps({"exact": got_up == up and got_down == down, "counted": counted,
                      "sizes": [len(up), len(down)], "reason": reason, "stats": native_relay.stats()}))

asyncio.run(main())
"""


@needs_native
def test_no_pipe_descriptor_degrades_to_copies_without_losing_bytes():
    """At the descriptor limit (EMFILE) the relay cannot make a pipe: a direction copies through
    user space instead, and allowed bytes are never dropped for want of a descriptor."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT], cwd=repo, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["exact"] and r["counted"] == r["sizes"] and r["reason"] == "eof", r
    assert r["stats"]["copy_fallbacks"] >= 2  # both directions really copied


NO_EXTENSION_RUN = r"""
import sys
sys.modules["firewall.datapath._relay"] = None  # as if the build had no C compiler
from firewall.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.netns
def test_relay_native_without_the_extension_refuses_to_start_and_auto_falls_back(cluster):
    """``--relay native`` on a build without the extension is a one-line start-up error (exit 1),
    not a silent fallback; ``auto`` (the default) runs the Python pump: spliced, byte-exact."""
    import re
    from pathlib import Path

    from tests.harness import PY, REPO

    srv, cli = cluster.pod("server"), cluster.pod("client")
    args = ["run", "--no-l7", "--no-dlp", "--events", "/dev/null", "--pod-ip", srv.ip, "--relay", "native"]
    r = srv.run([PY, "-c", NO_EXTENSION_RUN, *args], check=False, timeout=60, cwd=str(REPO))
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("palisade run:")]
    assert len(err) == 1 and "relay native: the extension did not import" in err[0], r.stderr
    assert "--relay python" in err[0] and "Traceback" not in r.stderr
    # the same build with the default (auto): the sidecar starts and splices with the Python pump
    shim = Path(cluster.tmp) / "no-native"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text('import sys\nsys.modules["firewall.datapath._relay"] = None\n')
    srv.serve_blast(9000)
    sc = srv.start_sidecar("--no-l7", "--no-dlp", env={"PYTHONPATH": f"{shim}:{REPO}"})
    n = 8 * 1024 * 1024
    res = cli.blast(srv.ip, client_bytes=n, server_bytes=n)
    assert res["failed"] == 0, res
    flow = sc.wait_flows(1, dest_port=9000)[0]
    assert flow["flow"]["bytes_toclient"] == n and flow["flow"]["bytes_toserver"] == n + 24
    spliced = re.search(r"^palisade_spliced_flows_total (\S+)", sc.http("/metrics")[1], re.M)
    assert float(spliced.group(1)) == 1.0
    maps = Path(f"/proc/{sc.pid()}/maps").read_text()
    assert "_relay" not in maps  # the extension really was not loaded
