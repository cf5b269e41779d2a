"""The splice relay on its own: socketpairs on both legs, a real event loop, real splice(2).

Checks the byte stream both ways (including the FIN), the shared pipe pool, and the
user-space copy the relay falls back to when no pipe descriptor can be made (EMFILE).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket

import pytest

from firewall.datapath import native_relay, splice

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="os.splice needs Linux and Python 3.10+")


RELAYS = ["python", pytest.param("native", marks=pytest.mark.skipif(
    not native_relay.AVAILABLE, reason=f"native relay not built: {native_relay.IMPORT_ERROR}"))]


async def _relay_both_ways(nbytes: int, relay: str = "python") -> dict:
    loop = asyncio.get_running_loop()
    client, c_in = socket.socketpair()  # client <-> relay's client leg
    s_out, server = socket.socketpair()  # relay's server leg <-> server
    for s in (client, server):
        s.setblocking(False)
    ended: list[str] = []
    counted = [0, 0]
    done = loop.create_future()

    def on_bytes(d: int, n: int) -> None:
        counted[d] += n

    def on_end(reason: str) -> None:
        ended.append(reason)
        done.set_result(None)

    sp = splice.relay_class(relay)(loop, os.dup(c_in.fileno()), os.dup(s_out.fileno()), on_bytes, on_end)
    c_in.close()
    s_out.close()
    sp.start()
    up = os.urandom(nbytes)
    down = os.urandom(nbytes // 2)

    async def send(sock: socket.socket, data: bytes) -> None:
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)

    async def recv_all(sock: socket.socket) -> bytes:
        parts = []
        while chunk := await loop.sock_recv(sock, 1 << 16):
            parts.append(chunk)
        return b"".join(parts)

    got_up, got_down, _, _ = await asyncio.wait_for(asyncio.gather(
        recv_all(server), recv_all(client), send(client, up), send(server, down)), 30)
    await asyncio.wait_for(done, 10)
    client.close()
    server.close()
    return {"up_ok": hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest(),
            "down_ok": got_down == down, "counted": counted, "ended": ended,
            "sizes": (len(up), len(down))}


@pytest.mark.parametrize("relay", RELAYS)
def test_splice_relay_is_byte_exact_both_ways_and_passes_the_fin(relay):
    r = asyncio.run(_relay_both_ways(8 << 20, relay))
    assert r["up_ok"] and r["down_ok"]
    assert r["counted"] == list(r["sizes"])
    assert r["ended"] == ["eof"]
    # the pipes went back to the pool: nothing is leaked per flow
    if relay == "python":
        assert len(splice.POOL.free) >= 1
    else:
        st = native_relay.stats()
        assert st["active"] == 0 and 1 <= st["spare_pipes"] <= 2


def test_no_pipe_descriptor_degrades_to_copies_without_losing_bytes(monkeypatch):
    def emfile() -> tuple[int, int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(splice.POOL, "get", emfile)
    r = asyncio.run(_relay_both_ways(3 << 20))
    assert r["up_ok"] and r["down_ok"]
    assert r["counted"] == list(r["sizes"])
    assert r["ended"] == ["eof"]
