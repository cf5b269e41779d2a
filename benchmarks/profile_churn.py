"""cProfile of the sidecar's event loop over a churn run on the L4 fast path (issue 22, req. 5).

Run as root: ``python benchmarks/profile_churn.py [--secs 4] [--relay native] [--top 30] [--strace]``

A lab cluster (two network namespaces, real nftables redirect), an echo server in the server
pod, the real sidecar (``--no-l7 --no-dlp``, the benchmark's 100-rule policy) started under
``python -m cProfile``, the churn client of benchmarks/run.py (connect, 1 byte each way,
close) for ``--secs``; then SIGTERM (the sidecar drains and exits, cProfile writes) and the
top functions by own time, scaled to microseconds per connection.  Only the main thread
(the event loop) is profiled: the relay thread's work is C and shows in ``strace -c -f``.
``--strace`` attaches ``strace -f -c`` to the ready sidecar instead (every thread, detached
after the churn) and prints system calls per connection.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.run import CHURN, ECHO_SERVER, POLICY100  # noqa: E402
from firewall.lab.netns import PKG_ROOT, PY, Cluster, Sidecar, python_env  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secs", type=float, default=4.0)
    ap.add_argument("--relay", default="native", choices=("native", "python"))
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--strace", action="store_true", help="strace -f -c instead of cProfile")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="palisade-prof-"))
    os.chmod(tmp, 0o777)  # the sidecar drops privileges before cProfile writes
    out = tmp / "sidecar.prof"
    with Cluster("pf", 236) as c:
        srv = c.pod("server", namespace="bench", labels={"app": "bench-server"})
        cli = c.pod("client", namespace="bench-clients", labels={"app": "loadgen"})
        srv.popen([PY, "-c", ECHO_SERVER.replace("PORTS", "[7001]")])
        srv.wait_listening(7001)
        ident = [{"ip": srv.ip, "namespace": "bench", "pod": "server", "labels": {"app": "bench-server"}},
                 {"ip": cli.ip, "namespace": "bench-clients", "pod": "client", "labels": {"app": "loadgen"}}]
        (tmp / "identity.yaml").write_text(json.dumps(ident))
        srv.redirect("apply")
        events, log = tmp / "eve.json", tmp / "sidecar.log"
        env = python_env({"POD_NAMESPACE": "bench", "POD_NAME": "server", "POD_IP": srv.ip})
        trace = tmp / "strace.txt"
        run = [PY, "-m"] if a.strace else [PY, "-m", "cProfile", "-o", str(out), "-m"]
        cmd = [*run, "firewall", "run", "--events", str(events),
               "--pod-ip", srv.ip, "--dlp-cache", str(tmp / "dlp-cache"), "--no-l7", "--no-dlp",
               "--relay", a.relay, "--policy", str(POLICY100), "--identity", str(tmp / "identity.yaml"),
               "--labels", json.dumps({"app": "bench-server"})]
        proc = srv.popen(cmd, log=log, env=env, cwd=str(PKG_ROOT))
        sc = Sidecar(srv, proc, events, log)
        sc.wait_ready(60)
        tracer = None
        if a.strace:  # attached once ready: start-up is not counted; SIGINT detaches and summarises
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(trace), "-p", str(proc.pid)],
                                      stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # strace attaches every thread: no readiness signal to wait for
        res = cli.run([PY, "-c", CHURN, srv.ip, "7001", str(a.secs)], timeout=a.secs + 60)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
        j = json.loads(res.stdout)
        sc.stop()
        print(f"churn: {j['conns']} connections in {j['secs']:.1f} s, {j['errors']} errors "
              f"({j['conns'] / j['secs']:.0f}/s); profile {trace if a.strace else out}")
        if a.strace:
            return _syscalls(trace, j["conns"])
        if not out.exists():
            print("no profile written:", log.read_text()[-2000:])
            return 1
        st = pstats.Stats(str(out))
        n = max(1, j["conns"])
        rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:a.top]  # type: ignore[attr-defined]
        print(f"{'own us/conn':>11} {'cum us/conn':>11} {'calls/conn':>10}  function")
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows:
            print(f"{tt / n * 1e6:11.2f} {ct / n * 1e6:11.2f} {nc / n:10.2f}  {Path(file).name}:{line}({fn})")
    return 0


def _syscalls(trace: Path, conns: int) -> int:
    """strace -c's table as calls (and errors) per connection."""
    total = 0.0
    print(f"{'calls/conn':>10} {'errors/conn':>11}  syscall")
    for line in trace.read_text().splitlines():
        f = line.split()
        if len(f) < 5 or not f[3].isdigit() or f[-1] == "total":
            continue
        calls = int(f[3])
        errors = int(f[4]) if len(f) == 6 and f[4].isdigit() else 0
        if calls / max(1, conns) >= 0.05:
            print(f"{calls / conns:10.2f} {errors / conns:11.2f}  {f[-1]}")
        total += calls
    print(f"{total / max(1, conns):10.2f} {'':11}  total per connection")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
