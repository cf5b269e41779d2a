"""Deterministic bulk/concurrency peer for relay tests (runs inside a test netns).

server: for each connection read a 24-byte header (client_bytes, server_bytes, seed),
        send server_bytes of gen(seed+1) then half-close, read client_bytes, and print
        one JSON line {"recv": n, "recv_ok": bool, "sent": m, "peer": ip}.
client: open N connections (concurrently), each sends gen(seed) and verifies what it
        gets back equals gen(seed+1); prints one JSON summary line.
Both sides verify independently, so a single corrupted or lost byte fails the test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import socket
import struct
import sys
import time

CHUNK = 1 << 16
_cache: dict[int, bytes] = {}


def gen(seed: int, n: int):
    """n bytes in CHUNK pieces; chunk i = Random(seed*1000003 + i) so any side can regenerate it."""
    i = 0
    while n > 0:
        k = min(CHUNK, n)
        block = _cache.get((seed << 20) + i)
        if block is None:
            block = random.Random(seed * 1000003 + i).randbytes(CHUNK)
            if len(_cache) < 256:
                _cache[(seed << 20) + i] = block
        yield block[:k]
        n -= k
        i += 1


def digest(seed: int, n: int) -> str:
    h = hashlib.sha256()
    for c in gen(seed, n):
        h.update(c)
    return h.hexdigest()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    try:
        hdr = await reader.readexactly(24)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return
    cn, sn, seed = struct.unpack("!QQQ", hdr)

    async def send() -> None:
        for c in gen(seed + 1, sn):
            writer.write(c)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def recv() -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        while True:
            b = await reader.read(1 << 18)
            if not b:
                break
            h.update(b)
            n += len(b)
        return n, h.hexdigest()

    try:
        _, (n, d) = await asyncio.gather(send(), recv())
        ok = n == cn and d == digest(seed, cn)
        print(json.dumps({"recv": n, "recv_ok": ok, "sent": sn, "peer": peer[0], "peer_port": peer[1],
                          "expected": cn}), flush=True)
    except (ConnectionError, OSError) as exc:
        print(json.dumps({"error": str(exc), "peer": peer[0]}), flush=True)
    finally:
        writer.close()


async def server(host: str, port: int) -> None:
    srv = await asyncio.start_server(_handle, host, port, backlog=4096, limit=1 << 20)
    print(json.dumps({"listening": port}), flush=True)
    async with srv:
        await srv.serve_forever()


async def one(host: str, port: int, cn: int, sn: int, seed: int, slow: float = 0.0) -> dict:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.write(struct.pack("!QQQ", cn, sn, seed))

    async def send() -> None:
        for c in gen(seed, cn):
            writer.write(c)
            await writer.drain()
        writer.write_eof()

    async def recv() -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        if slow:
            await asyncio.sleep(slow)
        while True:
            b = await reader.read(1 << 18)
            if not b:
                break
            h.update(b)
            n += len(b)
        return n, h.hexdigest()

    _, (n, d) = await asyncio.gather(send(), recv())
    # "sent" means handed to the kernel, not sitting in asyncio's buffer: drain() returns below
    # the high-water mark, and the server's FIN can end recv() first, so without waiting here
    # the process could exit with the tail unsent and the server would see a short, orderly
    # stream (a client-side truncation that once looked like the proxy's)
    writer.close()
    await writer.wait_closed()
    return {"ok": n == sn and d == digest(seed + 1, sn), "recv": n, "secs": time.monotonic() - t0}


async def client(args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    sizes = []
    for i in range(args.connections):
        if args.random_sizes:
            sizes.append((rnd.randint(0, args.client_bytes), rnd.randint(0, args.server_bytes), args.seed + 2 * i))
        else:
            sizes.append((args.client_bytes, args.server_bytes, args.seed + 2 * i))
    sem = asyncio.Semaphore(args.concurrency)

    async def run(c: tuple[int, int, int]) -> dict:
        async with sem:
            try:
                return await one(args.host, args.port, c[0], c[1], c[2], args.slow_reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                return {"ok": False, "error": repr(exc)}

    res = await asyncio.gather(*(run(c) for c in sizes))
    bad = [r for r in res if not r["ok"]]
    out = {"connections": len(res), "failed": len(bad), "errors": [r.get("error") for r in bad[:5]],
           "client_bytes": sum(c[0] for c in sizes), "server_bytes": sum(c[1] for c in sizes)}
    print(json.dumps(out), flush=True)
    return 0 if not bad else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--client-bytes", type=int, default=0)
    p.add_argument("--server-bytes", type=int, default=0)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--random-sizes", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slow-reader", type=float, default=0.0)
    a = p.parse_args()
    if a.mode == "server":
        try:
            asyncio.run(server(a.host, a.port))
        except KeyboardInterrupt:
            pass
        return 0
    return asyncio.run(client(a))


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
