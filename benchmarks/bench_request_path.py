"""CPU per request of full inspection on a kept-alive HTTP/1.1 flow, sans-IO (no sockets).

Run: ``python benchmarks/bench_request_path.py [--requests 2000] [--runs 7] [--profile] [--json out.json]``

What it answers: how many microseconds of CPU does ``firewall.datapath.session.Session`` spend on one
request + answer of ``benchmarks/run.py``'s 1,000 req/s scenario (palisade-full)?  That is the
inspection share of the "vCPU per 1,000 req/s" target; the relay around it (uvloop, the
transports) is not measured here.

The session is driven exactly as ``firewall/datapath/proxy.py``'s ``Flow`` drives it for chunks below the
DLP offload size: ``open()`` at accept, then per chunk ``session.bytes[d] += n``,
``feed(d, chunk)`` (inspect -> DLP scan -> assemble), ``passthrough``/``holding(d)`` checks.
State is what ``run_cli.py`` builds for the benchmark's sidecar: ``PolicySet.load`` of
``benchmarks/policy100.yaml`` with an ``FqdnCache``, the identity file ``run.py`` writes (server
``bench/server`` app=bench-server, client ``bench-clients/client`` app=loadgen), the default DLP
packs (``DlpEngine.load()``), ``l7=True``, ``l7_events=False``.

Traffic is ``loadgen.py``'s: ``POST /api/items`` with a 1 KiB JSON body (``json_body(1024)``)
and nginx's 1 KiB ``return 200`` answer, one chunk per message (each fits one TCP segment).
``--split`` feeds each message in two chunks (head, body) instead.  Every request of the
scenario is the same bytes and answers differ only in nginx's ``Date`` (once a second), so
repeats are the rule; ``--vary`` makes every request and answer head of a run distinct
(``/api/items/<n>``, a different ``Date``), the worst case for anything cached per head or per
path.

Figures: CPU (``time.process_time``) per request after a warm-up on one kept-alive flow, the
median and minimum of ``--runs`` runs, for three configurations so the cost can be attributed:
``parse`` (identification + HTTP parsing, no policy, no DLP), ``parse+policy`` (+ the 100-rule
policy's L4/app/L7 decisions) and ``full`` (+ DLP on both directions: palisade-full).
``--profile`` prints a cProfile top-20 (by internal time) of ``full``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from loadgen import build_request, json_body  # noqa: E402

from firewall.protocols.base import TOCLIENT, TOSERVER  # noqa: E402

SERVER_IP, CLIENT_IP = "10.250.0.2", "10.250.0.3"
SERVER_NS, CLIENT_NS = "bench", "bench-clients"
SERVER_LABELS = {"app": "bench-server"}
CLIENT_LABELS = {"app": "loadgen"}
HTTP_PORT = 8080
POLICY100 = HERE / "policy100.yaml"
CONFIGS = ("parse", "parse+policy", "full")


def request_bytes(path: str = "/api/items") -> bytes:
    """What loadgen.py sends in the rps scenario (Host is the address it connects to)."""
    return build_request("POST", path, SERVER_IP, json_body(1024))


def response_bytes(second: int = 0) -> bytes:
    """nginx 1.22's answer to ``location / { return 200 '<1 KiB JSON>'; }`` with
    ``default_type application/json`` on a kept-alive connection."""
    body = json_body(1024)
    date = f"Sat, 28 Nov 2026 {21 + second // 3600 % 3:02d}:{second // 60 % 60:02d}:{second % 60:02d} GMT"
    head = (f"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: {date}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n")
    return head.encode() + body


class State:
    """The sidecar's loaded state, built the way run_cli.py builds it."""

    def __init__(self, dlp_cache: str | None) -> None:
        from firewall.dlp.engine import DlpEngine
        from firewall.identity.fqdn import FqdnCache
        from firewall.identity.identity import Identity, load_identity_file
        from firewall.policy.engine import PolicySet

        self.tmp = tempfile.mkdtemp(prefix="bench-reqpath-")
        ident = [{"ip": SERVER_IP, "namespace": SERVER_NS, "pod": "server", "labels": SERVER_LABELS},
                 {"ip": CLIENT_IP, "namespace": CLIENT_NS, "pod": "client", "labels": CLIENT_LABELS}]
        path = os.path.join(self.tmp, "identity.yaml")
        with open(path, "w") as fh:
            json.dump(ident, fh)  # JSON is YAML
        self.fqdn = FqdnCache()
        self.policy = PolicySet.load([str(POLICY100)], node_ip=None, probe_ports=frozenset(), fqdn=self.fqdn)
        self.identities = load_identity_file(path)
        self.dlp = DlpEngine.load(None, enable=None, cache_dir=dlp_cache or os.path.join(self.tmp, "dlp"))
        self.local = Identity.make(SERVER_IP, SERVER_NS, "server", SERVER_LABELS)
        self.events: list[dict] = []

    def inspection(self, config: str) -> Any:
        from firewall.datapath.session import Inspection

        policy = self.policy if config in ("parse+policy", "full") else None
        dlp = self.dlp if config == "full" else None
        return Inspection(policy=policy, dlp=dlp, identities=self.identities, fqdn=self.fqdn,
                          emit=self.events.append, l7=True, l7_events=False, local=self.local)


class FlowDriver:
    """One kept-alive flow: the calls proxy.py's Flow makes on its session, minus the sockets."""

    def __init__(self, insp: Any, exchanges: list[list[tuple[int, bytes]]]) -> None:
        from firewall.datapath.session import Session

        self.session = Session(insp, "inbound", (CLIENT_IP, 40682), (SERVER_IP, HTTP_PORT))
        if not self.session.open():
            raise SystemExit(f"the benchmark flow was refused at L4: rule {self.session.rule}")
        self.exchanges = exchanges
        self.n = 0
        self.forwarded = [0, 0]
        self.sent = [0, 0]

    def exchange(self) -> None:
        """One request and its answer (Flow.on_data -> Flow._relay for small chunks)."""
        s = self.session
        fwd = self.forwarded
        chunks = self.exchanges[self.n % len(self.exchanges)]
        self.n += 1
        for d, data in chunks:
            self.sent[d] += len(data)
            s.bytes[d] += len(data)
            if s.passthrough:  # Flow._fast: written as is
                fwd[d] += len(data)
                continue
            out, stop = s.feed(d, data)
            if stop is not None:
                raise SystemExit(f"the benchmark flow was stopped: {stop.reason}")
            fwd[d] += len(out)
            s.holding(d)


def chunks_for(split: bool, req: bytes, resp: bytes) -> list[tuple[int, bytes]]:
    if not split:
        return [(TOSERVER, req), (TOCLIENT, resp)]
    rh, rb = req.split(b"\r\n\r\n", 1)
    ah, ab = resp.split(b"\r\n\r\n", 1)
    return [(TOSERVER, rh + b"\r\n\r\n"), (TOSERVER, rb), (TOCLIENT, ah + b"\r\n\r\n"), (TOCLIENT, ab)]


def exchanges_for(split: bool, vary: bool) -> list[list[tuple[int, bytes]]]:
    """The request/answer pairs a flow cycles through: one, or 8,192 distinct ones."""
    if not vary:
        return [chunks_for(split, request_bytes(), response_bytes())]
    return [chunks_for(split, request_bytes(f"/api/items/{i}"), response_bytes(i)) for i in range(8192)]


def measure(state: State, config: str, requests: int, runs: int, split: bool, vary: bool) -> dict[str, Any]:
    """CPU us per request: a fresh flow per run, warmed up, then ``requests`` exchanges."""
    exchanges = exchanges_for(split, vary)
    per_req: list[float] = []
    for _ in range(runs):
        flow = FlowDriver(state.inspection(config), exchanges)
        for _ in range(50):  # identification, first decisions, caches
            flow.exchange()
        exchange = flow.exchange
        t0 = time.process_time()
        for _ in range(requests):
            exchange()
        per_req.append((time.process_time() - t0) / requests * 1e6)
        if flow.forwarded != flow.sent:
            raise SystemExit(f"{config}: forwarded {flow.forwarded} bytes, expected {flow.sent}")
        if config == "full" and flow.session.passthrough:
            raise SystemExit("full: the flow went passthrough (nothing inspected)")
    return {"config": config, "median_us": round(statistics.median(per_req), 1),
            "min_us": round(min(per_req), 1), "runs_us": [round(x, 1) for x in per_req]}


def profile(state: State, requests: int, split: bool, vary: bool, top: int = 20) -> str:
    flow = FlowDriver(state.inspection("full"), exchanges_for(split, vary))
    for _ in range(50):
        flow.exchange()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(requests):
        flow.exchange()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per run (after 50 warm-up)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--split", action="store_true", help="feed heads and bodies as separate chunks")
    ap.add_argument("--vary", action="store_true", help="every request and answer head distinct")
    ap.add_argument("--profile", action="store_true", help="cProfile top-20 of the full configuration")
    ap.add_argument("--dlp-cache", help="Hyperscan database cache directory (default: a temporary one)")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    configs = [c for c in a.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r}")
    state = State(a.dlp_cache)
    results = [measure(state, c, a.requests, a.runs, a.split, a.vary) for c in configs]
    alerts = [e for e in state.events if e.get("event_type") == "alert"]
    print(f"CPU per request (process_time), {a.requests} requests x {a.runs} runs, "
          f"{'split' if a.split else 'one chunk per message'}, "
          f"{'distinct heads' if a.vary else 'repeated heads'}; Python {platform.python_version()}")
    print(f"{'configuration':<14} {'median us':>10} {'min us':>8}   runs")
    for r in results:
        print(f"{r['config']:<14} {r['median_us']:>10.1f} {r['min_us']:>8.1f}   {r['runs_us']}")
    print(f"events emitted: {len(state.events)} ({len(alerts)} alerts)")
    if a.profile:
        print()
        print(profile(state, a.requests, a.split, a.vary))
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "requests": a.requests, "runs": a.runs,
                                            "split": a.split, "vary": a.vary, "alerts": len(alerts)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
