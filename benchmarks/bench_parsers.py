"""In-process throughput of the L7 parsers (table + JSON), no sockets.

Run: ``python benchmarks/bench_parsers.py [--gib 1] [--repeat 200] [--json out.json]``

What it answers: does parsing turn bulk transfers into per-byte Python work?
The session calls ``feed()`` on every chunk it relays (up to 256 KiB), so:

* ``http-download-cl``  - one GET, a Content-Length body of ``--gib`` GiB fed in
  256 KiB chunks; compared with ``baseline`` (the same loop with no parser: what
  the session pays anyway). Parsing must cost almost nothing here.
* ``http-download-chunked`` - the same size with ``Transfer-Encoding: chunked``
  (64 KiB chunks, as nginx sends them): one size line per chunk is parsed.
* ``http-small-requests`` - keep-alive requests of the nginx/curl recording
  replayed: heads per second (the head-parsing cost).
* ``recording:<name>`` - each real recording in ``tests/protocols/data`` replayed
  ``--repeat`` times (fresh parser each time): MB/s and events/s.
* ``identify`` - ``Identifier`` decisions per second on recorded first segments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from firewall.protocols import TOCLIENT, TOSERVER, Identifier, make_parser  # noqa: E402
from tests.protocols.replay import load, recordings  # noqa: E402

CHUNK = 256 * 1024


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def download(total: int, chunked: bool, parse: bool) -> tuple[float, int]:
    """Seconds to push ``total`` body bytes through feed() (or through nothing)."""
    request = b"GET /big.iso HTTP/1.1\r\nHost: files\r\n\r\n"
    if chunked:
        size = 65536
        piece = (b"%x\r\n" % size) + b"x" * size + b"\r\n"
        reps = max(1, total // size)
        unit = piece * (CHUNK // len(piece) + 1)  # ~256 KiB of whole chunks
        per_unit = CHUNK // len(piece) + 1
        units = reps // per_unit
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        tail = b"0\r\n\r\n"
    else:
        unit = b"x" * CHUNK
        units = total // CHUNK
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (units * CHUNK)
        tail = b""
    parser = make_parser("http") if parse else None
    events = 0

    def loop() -> None:
        nonlocal events
        if parser is None:
            seen = 0
            for _ in range(units):
                seen += len(unit)  # what a relay does per chunk anyway
            return
        events += len(parser.feed(request, TOSERVER))
        events += len(parser.feed(head, TOCLIENT))
        feed = parser.feed
        for _ in range(units):
            feed(unit, TOCLIENT)
        events += len(parser.feed(tail, TOCLIENT))

    secs = timed(loop)
    if parser is not None:
        assert events == 2, events
    return secs, units * len(unit)


def small_requests(repeat: int) -> tuple[float, int, int]:
    segs = load("http_nginx_curl")["connections"][0]
    nbytes = sum(len(b) for _, b in segs)
    events = 0

    def loop() -> None:
        nonlocal events
        for _ in range(repeat):
            p = make_parser("http")
            for d, b in segs:
                events += len(p.feed(b, d))

    return timed(loop), nbytes * repeat, events


def replay(name: str, repeat: int) -> dict:
    doc = load(name)
    nbytes = sum(len(b) for conn in doc["connections"] for _, b in conn)
    events = 0
    if doc["transport"] != "tcp":
        return {}

    def loop() -> None:
        nonlocal events
        for _ in range(repeat):
            for conn in doc["connections"]:
                p = make_parser(doc["app_proto"])
                for d, b in conn:
                    events += len(p.feed(b, d))

    secs = timed(loop)
    return {"scenario": f"recording:{name}", "seconds": secs, "bytes": nbytes * repeat,
            "MB_per_s": nbytes * repeat / secs / 1e6, "events_per_s": events / secs}


def identify(repeat: int) -> dict:
    firsts = []
    for name in recordings():
        doc = load(name)
        if doc["transport"] == "tcp":
            for conn in doc["connections"]:
                firsts.append((doc["dest_port"], conn[0]))
    n = 0

    def loop() -> None:
        nonlocal n
        for _ in range(repeat):
            for port, (d, b) in firsts:
                Identifier(port).feed(b, d)
                n += 1

    secs = timed(loop)
    return {"scenario": "identify", "seconds": secs, "decisions_per_s": n / secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the simulated download (GiB)")
    ap.add_argument("--repeat", type=int, default=200, help="replays of each recording")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    total = int(args.gib * (1 << 30))
    rows: list[dict] = []

    base_s, nbytes = download(total, chunked=False, parse=False)
    rows.append({"scenario": "baseline (no parser)", "seconds": base_s, "bytes": nbytes,
                 "MB_per_s": nbytes / base_s / 1e6})
    for chunked in (False, True):
        secs, nbytes = download(total, chunked=chunked, parse=True)
        rows.append({"scenario": "http-download-" + ("chunked" if chunked else "cl"), "seconds": secs,
                     "bytes": nbytes, "MB_per_s": nbytes / secs / 1e6,
                     "overhead_s_per_GiB": max(0.0, secs - base_s * nbytes / max(1, total)) / (nbytes / (1 << 30))})
    secs, nbytes, events = small_requests(args.repeat)
    rows.append({"scenario": "http-small-requests", "seconds": secs, "bytes": nbytes,
                 "MB_per_s": nbytes / secs / 1e6, "events_per_s": events / secs})
    for name in recordings():
        row = replay(name, args.repeat)
        if row:
            rows.append(row)
    rows.append(identify(args.repeat))

    print(f"{'scenario':42} {'seconds':>9} {'MB/s':>12} {'events/s':>12} {'decisions/s':>12}")
    for r in rows:
        print(f"{r['scenario']:42} {r['seconds']:9.4f} {r.get('MB_per_s', 0):12.0f} "
              f"{r.get('events_per_s', 0):12.0f} {r.get('decisions_per_s', 0):12.0f}")
    result = {"benchmark": "parsers", "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "chunk": CHUNK, "results": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
