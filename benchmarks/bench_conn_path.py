"""Python CPU per new connection on the L4 fast path, stage by stage (issue 22, requirement 5).

Run: ``python benchmarks/bench_conn_path.py [--n 20000] [--profile]``

The same code the sidecar runs for one accepted, allowed, spliced connection, minus the
sockets (their system calls are counted with ``strace -c -f`` on a real churn run, see
benchmarks/RESULTS.md): the benchmark's 100-rule policy (policy100.yaml), the benchmark's
identities, a client peer that changes source port every connection (as churn does).

Stages timed separately (us per connection, best of 3 passes):

* ``session``   - ``Session(...)``: flow id, identity lookup of the peer, ~40 slots.
* ``decide``    - the L4 decision: ``Session.open`` (uncached) or the proxy's
                  ``VerdictCache`` hit (``Proxy.verdicts.open``) when ``--cache`` is on.
* ``record``    - the flow record: ``Session.record`` + the end timestamp, and the JSON
                  line the sink writes (built off the accept path, in batches).
* ``redact``    - ``redact_event`` of that record, which the sink runs on every event
                  before writing it (no DLP scanner: ``--no-dlp``, as the fast path runs).
* ``admit``     - session + decide together, as ``Proxy._admit`` runs them.

Why in-process: the churn scenario of benchmarks/run.py measures the whole sidecar (kernel,
libuv, relay thread, Python) and swings with the machine's load; this isolates the Python
part so a change to it can be judged in seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from firewall.datapath.session import Inspection, Session  # noqa: E402
from firewall.identity.identity import Identity, IdentityMap  # noqa: E402
from firewall.observe.events import ts_iso  # noqa: E402
from firewall.observe.redaction import redact_event  # noqa: E402
from firewall.policy.engine import PolicySet  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_IP, CLIENT_IP, PORT = "10.77.1.2", "10.77.2.2", 8080


def inspection() -> Inspection:
    ids = IdentityMap([Identity.make(SERVER_IP, "bench", "server", {"app": "bench-server"}),
                       Identity.make(CLIENT_IP, "bench-clients", "client", {"app": "loadgen"})])
    policy = PolicySet.load([os.path.join(HERE, "policy100.yaml")])
    return Inspection(policy=policy, dlp=None, identities=ids, l7=False,
                      local=Identity.make(SERVER_IP, "bench", "server", {"app": "bench-server"}))


def _proxy(insp: Inspection):
    """A Proxy with just enough configuration for ``_open`` (no sockets are made)."""
    from types import SimpleNamespace

    from firewall.datapath.proxy import Proxy

    cfg = SimpleNamespace(l7=False, splice=True, relay="python", idle_timeout=60.0)
    return Proxy(cfg, insp, lambda e: None)


def timed(fn, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--profile", action="store_true", help="cProfile of the admit stage, top 25")
    a = ap.parse_args()
    insp = inspection()
    proxy = _proxy(insp)
    dst = (SERVER_IP, PORT)
    cached = hasattr(proxy, "verdicts")

    def session(n: int) -> None:
        for i in range(n):
            Session(insp, "inbound", (CLIENT_IP, 20000 + i % 30000), dst)

    def decide(n: int) -> None:
        for i in range(n):
            s = Session(insp, "inbound", (CLIENT_IP, 20000 + i % 30000), dst)
            s.open()

    def admit(n: int) -> None:
        for i in range(n):
            if cached:
                s = Session(insp, "inbound", (CLIENT_IP, 20000 + i % 30000), dst)
                proxy.verdicts.open(s)
            else:
                s = Session(insp, "inbound", (CLIENT_IP, 20000 + i % 30000), dst)
                s.open()
            assert s.verdict == "allow" and s.passthrough

    sess = [Session(insp, "inbound", (CLIENT_IP, 20000 + i), dst) for i in range(1000)]
    for s in sess:
        s.open()

    def record(n: int) -> None:
        end = time.time()
        for i in range(n):
            rec = sess[i % 1000].record(end)
            rec["timestamp"] = ts_iso(end)
            json.dumps(rec, separators=(",", ":"))

    recs = [s.record(time.time()) for s in sess]

    def redact(n: int) -> None:
        for i in range(n):
            redact_event(recs[i % 1000], None)

    out = {"session_us": timed(session, a.n), "session_open_us": timed(decide, a.n),
           "admit_us": timed(admit, a.n), "record_us": timed(record, a.n), "redact_us": timed(redact, a.n),
           "verdict_cache": cached}
    out["open_only_us"] = out["session_open_us"] - out["session_us"]
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        admit(a.n)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
