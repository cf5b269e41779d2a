"""Open-loop HTTP/1.1 keep-alive load generator with coordinated-omission correction.

Requests are scheduled at a fixed rate: request ``i`` is *due* at ``t0 + i / rate``, whether or
not earlier requests have been answered (open loop).  Its latency is measured from that due
time to the last byte of the response, so a stall that delays later requests is charged to
every request it delayed (the correction wrk2 makes for "coordinated omission"; a closed-loop
client that waits for one answer before sending the next would quietly send fewer requests
during the stall and report only the one slow answer).  The service time (actual send -> last
byte) is reported next to it.

Each of ``--connections`` threads owns one keep-alive connection and takes the next due request
when it is free; blocking sockets and ``time.sleep`` keep the send-time error around 0.1 ms
(asyncio timers on epoll have millisecond resolution).  With at most one request in flight per
connection (no pipelining), the connections must outnumber rate x latency: a run whose send
lateness grows reports ``"overloaded": true`` rather than a rate it did not achieve.

  python benchmarks/loadgen.py --host 10.0.0.2 --port 8080 --rate 1000 --duration 30 \\
         --connections 8 --body 1024 --path /api/items

Prints one JSON object: achieved rate, errors, and percentiles (microseconds) of the corrected
latency (``latency_us``) and of the service time (``service_us``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import socket
import sys
import threading
import time

PCTS = (50.0, 90.0, 99.0, 99.9)


def percentiles(xs: list[float], pcts: tuple[float, ...] = PCTS) -> dict[str, float]:
    """Nearest-rank percentiles (p50, p90, p99, p99.9 -> keys p50, p90, p99, p99.9), max and mean."""
    if not xs:
        return {}
    s = sorted(xs)
    n = len(s)
    out: dict[str, float] = {}
    for p in pcts:
        k = max(0, min(n - 1, math.ceil(p * n / 100 - 1e-9) - 1))  # nearest rank
        out[f"p{p:g}"] = round(s[k], 1)
    out["max"] = round(s[-1], 1)
    out["mean"] = round(sum(s) / n, 1)
    return out


def build_request(method: str, path: str, host: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: palisade-loadgen\r\nAccept: */*\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def json_body(size: int) -> bytes:
    """A JSON document of exactly ``size`` bytes (ordinary text, no sensitive values)."""
    pre, post = b'{"order":"A-1042","note":"', b'"}'
    filler = b"please confirm the shipping address for this order "
    room = max(0, size - len(pre) - len(post))
    return pre + (filler * (room // len(filler) + 1))[:room] + post


class Conn:
    """One keep-alive connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.addr = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.reconnects = -1

    def _connect(self) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = s, b""
        self.reconnects += 1
        return s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, req: bytes) -> int:
        """Send one request, read one response; returns the status code."""
        s = self.sock or self._connect()
        s.sendall(req)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response head")
            buf += chunk
        head = buf[:end].decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        close = False
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and v.strip().lower() == "close":
                close = True
            elif k == "transfer-encoding":
                raise ConnectionError("chunked responses are not supported by this load generator")
        need = end + 4 + length
        while len(buf) < need:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the response body")
            buf += chunk
        self.buf = buf[need:]
        if close:
            self.close()
        return status


def run(host: str, port: int, rate: float, duration: float, connections: int = 8, *,
        method: str = "POST", path: str = "/api/items", body_size: int = 1024, warmup: float = 1.0,
        timeout: float = 10.0) -> dict:
    body = json_body(body_size) if method in ("POST", "PUT") else b""
    req = build_request(method, path, host, body)
    total = int(rate * (warmup + duration))
    skip = int(rate * warmup)
    counter = itertools.count()
    lat: list[float] = []
    svc: list[float] = []
    late: list[float] = []
    errors: dict[str, int] = {}
    statuses: dict[int, int] = {}
    conns = [Conn(host, port, timeout) for _ in range(connections)]
    for c in conns:  # connect before the clock starts: the run measures requests, not handshakes
        c._connect()
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.05
    interval = 1.0 / rate

    def worker(c: Conn) -> None:
        my_lat, my_svc, my_late = [], [], []
        while True:
            i = next(counter)
            if i >= total:
                break
            due = t0 + i * interval
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            sent = time.perf_counter()
            try:
                st = c.request(req)
            except (OSError, ValueError, IndexError) as exc:
                c.close()
                with lock:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            done = time.perf_counter()
            if i >= skip:
                my_lat.append((done - due) * 1e6)
                my_svc.append((done - sent) * 1e6)
                my_late.append((sent - due) * 1e6)
                with lock:
                    statuses[st] = statuses.get(st, 0) + 1
        with lock:
            lat.extend(my_lat)
            svc.extend(my_svc)
            late.extend(my_late)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0 - warmup
    for c in conns:
        c.close()
    lateness = percentiles(late)
    return {
        "target_rps": rate,
        "duration_s": duration,
        "connections": connections,
        "completed": len(lat),
        "achieved_rps": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "errors": errors,
        "statuses": {str(k): v for k, v in statuses.items()},
        "reconnects": sum(max(0, c.reconnects) for c in conns),
        "latency_us": percentiles(lat),
        "service_us": percentiles(svc),
        "send_lateness_us": lateness,
        # a schedule the connections could not keep: the corrected latency is then mostly queueing
        "overloaded": bool(lateness) and lateness.get("p99", 0) > 50_000,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds (default 30)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds at the same rate, not recorded")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--method", default="POST")
    ap.add_argument("--path", default="/api/items")
    ap.add_argument("--body", type=int, default=1024, help="request body bytes for POST/PUT (default 1024)")
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args(argv)
    if a.rate <= 0 or a.duration <= 0 or a.connections < 1:
        print("loadgen: --rate and --duration must be > 0, --connections >= 1", file=sys.stderr)
        return 2
    try:
        res = run(a.host, a.port, a.rate, a.duration, a.connections, method=a.method.upper(), path=a.path,
                  body_size=a.body, warmup=a.warmup, timeout=a.timeout)
    except OSError as exc:
        print(f"loadgen: cannot connect to {a.host}:{a.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(json.dumps(res))
    return 0 if res["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
