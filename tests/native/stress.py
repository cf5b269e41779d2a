"""Stress driver for the relays: thousands of short loopback TCP flows through one relay.

Each flow is a client and a server socket with the relay in between (two real loopback TCP
connections whose middle ends are handed to the relay).  The mix:

- ``exact``: both sides send a random amount (0 B to 256 KiB, some 2 MiB) and shut down writing;
  each must read exactly what the other sent, and the relay must report ``eof`` and counts equal
  to the sizes;
- ``half``: the client sends and shuts down; the server answers only after it read the EOF
  (the FIN must come after every byte, and the other direction must keep working);
- ``client-rst`` / ``server-rst``: one side sends a little, then closes with SO_LINGER 0; the other
  must see a reset (not a clean EOF) and the relay must report ``reset``;
- ``cut``: the event loop cuts the flow (``close(reset=True)``) while bytes are moving - the
  relay thread and the loop race for the same flow, which is what the generation tags are for.

Run in-process by tests/native/test_stress.py, and as a subprocess (``python -m
tests.native.stress --module PATH``) against the extension built with AddressSanitizer.  Prints
one JSON line; exits 1 when any flow went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import random
import socket
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field

LINGER0 = struct.pack("ii", 1, 0)
KINDS = ("exact", "exact", "half", "client-rst", "server-rst", "cut")


@dataclass
class Outcome:
    """What went wrong across the run (empty lists: every flow was byte-exact and ended right)."""

    kinds: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def load_extension(path: str) -> None:
    """Make ``firewall.datapath._relay`` the module built at ``path`` (e.g. the ASan build)."""
    spec = importlib.util.spec_from_file_location("firewall.datapath._relay", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["firewall.datapath._relay"] = mod


def _pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (sequential connect + accept: the accept is this connect)."""
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _recv_all(loop: asyncio.AbstractEventLoop, s: socket.socket) -> bytes:
    parts = []
    while chunk := await loop.sock_recv(s, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


async def _recv_until_reset(loop: asyncio.AbstractEventLoop, s: socket.socket) -> tuple[bytes, bool]:
    parts = []
    try:
        while chunk := await loop.sock_recv(s, 1 << 16):
            parts.append(chunk)
    except ConnectionResetError:
        return b"".join(parts), True
    return b"".join(parts), False


def _size(rng: random.Random) -> int:
    return rng.choice((0, 1, rng.randrange(1, 4096), rng.randrange(1, 256 << 10), 2 << 20 if rng.random() < 0.05 else 100))


async def one_flow(make, listener: socket.socket, rng: random.Random, out: Outcome, i: int) -> None:
    loop = asyncio.get_running_loop()
    kind = rng.choice(KINDS)
    out.kinds[kind] += 1
    client, c_in = _pair(listener)
    s_out, server = _pair(listener)
    counted = [0, 0]
    ended = loop.create_future()

    def on_bytes(d: int, n: int) -> None:
        counted[d] += n

    def on_end(reason: str) -> None:
        if ended.done():
            out.errors.append(f"{i} {kind}: on_end twice ({reason})")
            return
        ended.set_result(reason)

    sp = make(loop, c_in.detach(), s_out.detach(), on_bytes, on_end)
    sp.start()
    up, down = os.urandom(_size(rng)), os.urandom(_size(rng))

    async def send(s: socket.socket, data: bytes, shut: bool = True) -> None:
        await loop.sock_sendall(s, data)
        if shut:
            s.shutdown(socket.SHUT_WR)

    try:
        if kind == "exact":
            got_up, got_down, _, _ = await asyncio.gather(_recv_all(loop, server), _recv_all(loop, client),
                                                          send(client, up), send(server, down))
            reason = await asyncio.wait_for(ended, 20)
            if got_up != up or got_down != down:
                out.errors.append(f"{i} exact: bytes differ ({len(got_up)}/{len(up)}, {len(got_down)}/{len(down)})")
            if counted != [len(up), len(down)] or reason != "eof":
                out.errors.append(f"{i} exact: counted {counted} for {len(up)},{len(down)}; reason {reason}")
        elif kind == "half":
            await send(client, up)
            got_up = await _recv_all(loop, server)  # EOF only after every byte
            await send(server, down)
            got_down = await _recv_all(loop, client)
            reason = await asyncio.wait_for(ended, 20)
            if got_up != up or got_down != down or reason != "eof" or counted != [len(up), len(down)]:
                out.errors.append(f"{i} half: {len(got_up)}/{len(up)} {len(got_down)}/{len(down)} {reason} {counted}")
        elif kind in ("client-rst", "server-rst"):
            a, b = (client, server) if kind == "client-rst" else (server, client)
            first = up[:1000] or b"x"
            await send(a, first, shut=False)
            # the first bytes reach the far side before the reset (so the relay carried them)
            got = b""
            while len(got) < len(first):
                chunk = await loop.sock_recv(b, len(first) - len(got))
                if not chunk:
                    break
                got += chunk
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
            a.close()
            rest, was_reset = await asyncio.wait_for(_recv_until_reset(loop, b), 20)
            reason = await asyncio.wait_for(ended, 20)
            if got != first or rest or not was_reset or reason != "reset":
                out.errors.append(f"{i} {kind}: got {len(got)}/{len(first)} rest {len(rest)} "
                                  f"reset seen {was_reset} reason {reason}")
        else:  # cut: the loop resets the flow while a transfer runs
            big = os.urandom(1 << 20)
            sender = asyncio.ensure_future(send(client, big * 4))
            got = b""
            while len(got) < 4096:
                chunk = await loop.sock_recv(server, 1 << 16)
                if not chunk:
                    break
                got += chunk
            sp.close(True, "shutdown")
            if not ended.done():
                out.errors.append(f"{i} cut: close() returned before on_end")
            reason = await asyncio.wait_for(ended, 20)
            rest, was_reset = await asyncio.wait_for(_recv_until_reset(loop, server), 20)
            got += rest
            try:
                await asyncio.wait_for(sender, 20)
            except OSError:  # reset while sending, or ENOTCONN from the final shutdown
                pass
            if not was_reset or reason not in ("shutdown", "reset"):
                out.errors.append(f"{i} cut: reset seen {was_reset} reason {reason}")
            if got != (big * 4)[:len(got)] or counted[0] < len(got):
                out.errors.append(f"{i} cut: received {len(got)} not a prefix, or counted {counted[0]} < it")
        out.reasons[reason] += 1
    except (TimeoutError, OSError) as exc:
        out.errors.append(f"{i} {kind}: {type(exc).__name__}: {exc}")
    finally:
        for s in (client, server):
            s.close()


async def run(relay: str, flows: int, concurrency: int, seed: int) -> dict:
    from firewall.datapath import native_relay, splice

    make = splice.relay_class(relay)
    fds_before = len(os.listdir("/proc/self/fd"))
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    rng = random.Random(seed)
    out = Outcome()
    sem = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with sem:
            await one_flow(make, listener, rng, out, i)

    await asyncio.gather(*(bounded(i) for i in range(flows)))
    listener.close()
    stats = native_relay.stats() if relay == "native" else {}
    if stats and stats["active"]:
        out.errors.append(f"relay still holds {stats['active']} flows")
    spare = stats.get("spare_pipes", len(splice.POOL.free)) * 2
    leaked = len(os.listdir("/proc/self/fd")) - fds_before - spare - 2  # relay's eventfds
    if leaked > 4:
        out.errors.append(f"{leaked} descriptors leaked")
    digest = hashlib.sha256(json.dumps(sorted(out.kinds.items())).encode()).hexdigest()[:8]
    with open("/proc/self/maps") as fh:
        asan = "libasan" in fh.read()
    return {"asan": asan, "flows": flows, "kinds": dict(out.kinds), "reasons": dict(out.reasons),
            "errors": out.errors[:20], "nerrors": len(out.errors), "stats": stats, "mix": digest}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--relay", default="native", choices=("native", "python"))
    ap.add_argument("--flows", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--module", help="load firewall.datapath._relay from this file (e.g. the ASan build)")
    a = ap.parse_args()
    if a.module:
        load_extension(a.module)
    r = asyncio.run(run(a.relay, a.flows, a.concurrency, a.seed))
    print(json.dumps(r))
    return 1 if r["nerrors"] else 0


if __name__ == "__main__":
    sys.exit(main())
