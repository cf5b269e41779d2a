"""The blast tool's client must not call a transfer done while its tail is still in asyncio's
buffer.

Its ``drain()`` returns below the high-water mark (64 KiB) and the server's FIN can end the
read side first, so a client that closed and exited there lost what asyncio still held: the
server saw a short, orderly stream while the client reported success.  Under load that looked
exactly like a proxy truncating a flow (test_learn_e2e's reload-under-load test on the python
relay: a server received 94,120 of 99,117 bytes, the flow record showed the sidecar had read
exactly what it forwarded, and the client said "ok"); it was the test client.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

BLAST = Path(__file__).resolve().parents[1] / "tools" / "blast.py"
TAIL = 32 << 10  # left in asyncio's buffer: under the 64 KiB high-water mark, so drain() returns


def _listener() -> socket.socket:
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # inherited: a small window
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    return lsock


def _kernel_capacity() -> int:
    """How many bytes a sender's kernel takes before a receiver that never reads blocks it."""
    lsock = _listener()
    c = socket.create_connection(lsock.getsockname())
    conn, _ = lsock.accept()
    c.setblocking(False)
    n, block = 0, b"x" * 65536
    try:
        while True:
            n += c.send(block)
    except BlockingIOError:
        pass
    for s in (c, conn, lsock):
        s.close()
    return n


def test_client_reports_success_only_after_every_byte_left_its_buffer() -> None:
    cn = _kernel_capacity() + TAIL
    lsock = _listener()
    p = subprocess.Popen([sys.executable, str(BLAST), "client", "--host", "127.0.0.1", "--port",
                          str(lsock.getsockname()[1]), "--client-bytes", str(cn), "--server-bytes", "0"],
                         stdout=subprocess.PIPE, text=True)
    conn, _ = lsock.accept()
    hdr = b""
    while len(hdr) < 24:
        hdr += conn.recv(24 - len(hdr))
    assert struct.unpack("!QQQ", hdr)[0] == cn
    conn.shutdown(socket.SHUT_WR)  # no server bytes: the client's read side ends at once
    # a receiver that stalls: it reads only once the client has exited (or after 2 s, when a
    # correct client is still waiting for its tail to leave the buffer)
    try:
        p.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    n = 0
    while b := conn.recv(65536):
        n += len(b)
    out, _ = p.communicate(timeout=60)
    conn.close()
    lsock.close()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["failed"] == 0, res
    assert n == cn, f"the server received {n} of {cn} bytes the client called sent"
