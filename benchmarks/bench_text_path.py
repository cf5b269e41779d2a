"""CPU per GB of full inspection of bulk HTTP text, in process (no sockets): where a text MB goes.

Run: ``python benchmarks/bench_text_path.py [--mib 64] [--read 262144] [--runs 3] [--profile]
[--baseline REF] [--json out.json]``

What it answers: of the ~5 CPU s/GB ``benchmarks/run.py``'s ``palisade-full`` path spends on its bulk
text (an HTTP/1.1 POST upload and a GET download of Content-Length bodies of run.py's exact text with
PII sprinkled, one value per 64 KiB), how much is the inspection pipeline in Python (relay
bookkeeping, HTTP body parsing, identification, the DLP scan, assemble/hold-back, event emission) and
how much is left for the sockets, uvloop and the scan thread hand-over that this driver does not have?

The flow is driven exactly as ``firewall/datapath/proxy.py``'s ``Flow`` drives its ``FlowSession``:
``connected_upstream()``, then per read ``fs.data(side, chunk)`` and the commands it returns are
executed - ``Send`` counts the forwarded bytes, ``StartScan`` (chunks >= ``dlp_offload_bytes``) runs
``session.scan_findings`` (which the proxy runs on its executor thread) and answers ``fs.scan_done``,
pause/resume/timers are no-ops (nothing waits here).  State is the benchmark sidecar's
(``bench_request_path.State``: policy100.yaml, the identity file run.py writes, every default DLP
pack) on run.py's bulk port 8081, so the policy applies a DLP rule to the flow as it does there.

Figures: CPU (``time.process_time``) s/GB and MB/s over both directions (upload + download of
``--mib`` MiB each), best and median of ``--runs``; with ``--profile`` a per-stage breakdown from
cProfile (the inclusive time of each stage's entry point, scaled to the unprofiled total so the
profiler's own overhead is spread pro rata).  ``--baseline REF`` runs the same measurement on
``git archive`` copy of REF's package (its ``firewall/``, ``benchmarks/`` and ``dlp_rules/``) in a child process,
interleaved round by round, and prints both.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BULK_PORT = 8081  # run.py's PORTS["bulk"][0]: the port policy100.yaml gives a DLP rule
CLIENT_PORT = 40682

#: stage -> the functions whose time is that stage: (file suffix, name, inclusive?) - inclusive
#: time for an entry point, own time for a function that also calls the other stages
STAGES: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "read (a bytes object per read, as recv makes)": (("bench_text_path.py", "feed", False),),
    "DLP scan": (("datapath/session.py", "scan_findings", True), ("datapath/session.py", "_scan", True)),
    "HTTP parsing": (("protocols/stream.py", "feed", True),),
    "identification": (("datapath/session.py", "_identify", True),),
    "assemble / hold-back": (("datapath/session.py", "assemble", True),),
    "findings -> alerts (build, redact, JSON, write)": (("datapath/session.py", "_handle_findings", True),),
}


def bulk_messages(payload: bytes, nbytes: int, chunked: bool = False) -> tuple[bytes, bytes, bytes, bytes]:
    """run.py's HTTPBULK exchange heads: (upload request head, its answer, download request,
    download answer head); bodies are ``nbytes`` of ``payload`` repeated (``chunked``: framed
    with ``Transfer-Encoding: chunked`` instead of Content-Length)."""
    host = "10.250.0.2"
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {nbytes}"
    up = (f"POST /bulk/up HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
          f"{framing}\r\n\r\n").encode()
    up_ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
    down = f"GET /bulk/down/{nbytes} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    down_ok = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
               + framing.encode() + b"\r\n\r\n")
    return up, up_ok, down, down_ok


class Driver:
    """One flow through ``FlowSession`` + ``Session`` with the proxy's command loop, minus sockets."""

    def __init__(self, state: Any, offload: int, sink: Any = None) -> None:
        from firewall.datapath.flowsession import FlowSession, Limits
        from firewall.datapath.session import Session

        insp = state.inspection("full")
        if sink is not None:
            insp.emit = sink.emit
        self.session = Session(insp, "inbound", ("10.250.0.3", CLIENT_PORT),
                               ("10.250.0.2", BULK_PORT))
        if not self.session.open():
            raise SystemExit(f"the benchmark flow was refused at L4: rule {self.session.rule}")
        self.fs = FlowSession(self.session, Limits(offload_bytes=offload))
        self.forwarded = [0, 0]
        self.execute(self.fs.connected_upstream())

    def execute(self, cmds: list) -> None:
        from firewall.datapath.flowsession import Close, Send, StartScan

        for c in cmds:
            kind = type(c)
            if kind is Send:
                self.forwarded[1 - c.side] += len(c.data)
            elif kind is StartScan:
                s = self.session
                try:
                    findings, error = s.scan_findings(c.side, c.data), False
                except Exception:  # noqa: BLE001 - as proxy.Flow._scanned
                    findings, error = None, True
                self.execute(self.fs.scan_done(c.side, findings, error))
            elif kind is Close and self.session.close_reason != "eof":
                raise SystemExit(f"the benchmark flow was closed: {self.session.close_reason} ({self.session._stopped})")

    def feed(self, side: int, data: bytes, read: int) -> None:
        fs = self.fs
        mv = memoryview(data)
        for i in range(0, len(data), read):
            # the proxy's reads are bytes objects: one copy per read, as recv() makes
            self.execute(fs.data(side, bytes(mv[i:i + read])))


def chunk_body(body: bytes, size: int) -> bytes:
    """``body`` in ``Transfer-Encoding: chunked`` framing, ``size`` bytes a chunk, and the last chunk."""
    mv = memoryview(body)
    parts = []
    for i in range(0, len(body), size):
        piece = mv[i:i + size]
        parts += (b"%x\r\n" % len(piece), piece, b"\r\n")
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def run_once(state: Any, payload: bytes, nbytes: int, read: int, offload: int,
             prof: cProfile.Profile | None = None, sink: Any = None, chunk: int = 0) -> tuple[float, int]:
    """Upload then download ``nbytes`` each on one flow per direction; CPU seconds.  ``chunk``:
    only the download, its body chunked, ``chunk`` bytes a chunk (an upload's chunked body is
    also de-chunked for the decoded-view scan, up to httpdecode.MAX_DECODED, then refused)."""
    from firewall.protocols.base import TOCLIENT, TOSERVER

    up, up_ok, down, down_ok = bulk_messages(payload, nbytes, chunked=bool(chunk))
    # the body as the socket delivers it: the head, then payload repeats cut into reads
    reps = -(-nbytes // len(payload))
    body = (payload * reps)[:nbytes]
    if chunk:
        body = chunk_body(body, chunk)
    cpu = 0.0
    legs = [(up, up_ok, TOSERVER), (down, down_ok, TOCLIENT)]
    for req, answer, body_side in legs[1:] if chunk else legs:
        drv = Driver(state, offload, sink)
        t0 = time.process_time()
        if prof is not None:
            prof.enable()
        drv.execute(drv.fs.data(TOSERVER, req))
        if body_side == TOSERVER:
            drv.feed(TOSERVER, body, read)
            drv.execute(drv.fs.data(TOCLIENT, answer))
        else:
            drv.execute(drv.fs.data(TOCLIENT, answer))
            drv.feed(TOCLIENT, body, read)
        drv.execute(drv.fs.eof_received(TOSERVER))
        drv.execute(drv.fs.eof_received(TOCLIENT))
        if prof is not None:
            prof.disable()
        cpu += time.process_time() - t0
        want = [len(req) + (len(body) if body_side == TOSERVER else 0),
                len(answer) + (len(body) if body_side == TOCLIENT else 0)]
        if drv.forwarded != want:
            raise SystemExit(f"forwarded {drv.forwarded} bytes, expected {want}")
        if drv.session.passthrough:
            raise SystemExit("the flow went passthrough: nothing was inspected")
    return cpu, len(legs[1:] if chunk else legs) * len(body)


def stage_breakdown(prof: cProfile.Profile, total_cpu: float, gb: float) -> list[tuple[str, float]]:
    """s/GB per stage: each stage's inclusive profiled time, scaled to the unprofiled total."""
    st = pstats.Stats(prof)
    stats = st.stats  # type: ignore[attr-defined]
    prof_total = sum(v[2] for v in stats.values())  # every function's own time
    rows: list[tuple[str, float]] = []
    accounted = 0.0
    for stage, funcs in STAGES.items():
        t = 0.0
        for (fname, _line, name), v in stats.items():
            for suffix, fn, inclusive in funcs:
                if fname.endswith(suffix) and name == fn:
                    t += v[3] if inclusive else v[2]
        rows.append((stage, t))
        accounted += t
    rows.append(("relay bookkeeping (flowsession, commands, the rest)", max(0.0, prof_total - accounted)))
    scale = total_cpu / prof_total if prof_total else 0.0
    return [(name, t * scale / gb) for name, t in rows]


def measure(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from bench_request_path import State
    from dlp_corpus import pii_text

    state = State(a.dlp_cache)
    sink = None
    if not a.no_sink:
        from firewall.observe.events import EventSink

        # the sidecar's sink: redaction + the DLP re-scan of the strings, JSON, one write per event
        sink = EventSink(path=os.path.join(state.tmp, "events.jsonl"))
        sink.set_scanner(state.dlp)
    payload = pii_text(seed=2, size=8 << 20, every=65536)
    nbytes = a.mib << 20
    run_once(state, payload, min(nbytes, 4 << 20), a.read, a.offload, sink=sink, chunk=a.chunked)  # warm-up (caches, Hyperscan scratch)
    cpus = []
    total = 0
    for _ in range(a.runs):
        cpu, total = run_once(state, payload, nbytes, a.read, a.offload, sink=sink, chunk=a.chunked)
        cpus.append(cpu)
    gb = total / 1e9
    out: dict[str, Any] = {
        "s_per_GB_best": round(min(cpus) / gb, 3), "s_per_GB_median": round(statistics.median(cpus) / gb, 3),
        "MBps_best": round(gb * 1000 / min(cpus)), "MBps_median": round(gb * 1000 / statistics.median(cpus)),
        "alerts": sink.count if sink is not None else sum(1 for e in state.events if e.get("event_type") == "alert"),
    }
    if a.profile:
        prof = cProfile.Profile()
        run_once(state, payload, nbytes, a.read, a.offload, prof, sink=sink, chunk=a.chunked)
        out["stages_s_per_GB"] = [(n, round(v, 3)) for n, v in
                                  stage_breakdown(prof, statistics.median(cpus), gb)]
        if a.top:
            import io

            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(a.top)
            out["top"] = buf.getvalue()
    return out


def baseline_tree(ref: str) -> Path:
    """REF's firewall/, benchmarks/ and dlp_rules/ in a temporary directory (``git archive``)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-textpath-"))
    tar = tmp / "t.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(tar), ref, "firewall", "benchmarks", "dlp_rules"],
                   check=True)
    with tarfile.open(tar) as t:
        t.extractall(tmp, filter="data")
    # REF's benchmarks may predate this script: run this one against REF's package
    (tmp / "benchmarks" / "bench_text_path.py").write_bytes(Path(__file__).read_bytes())
    # native extensions built in place are not in the archive: link this checkout's
    for so in (REPO / "firewall").rglob("*.so"):
        dst = tmp / so.relative_to(REPO)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(so, dst)
    return tmp


def rounds(a: argparse.Namespace, args: list[str], base: Path, results: dict[str, list]) -> None:
    """Interleaved rounds: this checkout, then the baseline tree, each in a child process."""
    for _ in range(a.rounds):
        for name, tree in (("this", REPO), (a.baseline, base)):
            env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(tree)}
            r = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_text_path.py"), *args],
                               env=env, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise SystemExit(f"{name}: {r.stderr[-2000:]}")
            results[name].append(json.loads(r.stdout.strip().splitlines()[-1]))


def report(a: argparse.Namespace, results: dict[str, list]) -> None:
    print(f"in-process text path, {a.mib} MiB each way, reads of {a.read} B, {a.rounds} interleaved rounds "
          f"x {a.runs} runs; load average {os.getloadavg()[0]:.1f}")
    for name, rs in results.items():
        best = min(r["s_per_GB_best"] for r in rs)
        med = statistics.median(r["s_per_GB_median"] for r in rs)
        print(f"  {name:<12} CPU s/GB best {best:.3f} median {med:.3f}  "
              f"(MB/s best {1 / best * 1000:.0f} median {1 / med * 1000:.0f})")
        if a.profile:
            for stage, v in rs[-1].get("stages_s_per_GB", []):
                print(f"      {stage:<52} {v:.3f} s/GB")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB each way per run (default 64)")
    ap.add_argument("--read", type=int, default=262144, help="bytes per socket read (uvloop's buffer: 256 KiB)")
    ap.add_argument("--offload", type=int, default=65536, help="dlp_offload_bytes (the sidecar's default)")
    ap.add_argument("--chunked", type=int, default=0, metavar="N",
                    help="bodies in Transfer-Encoding: chunked framing, N bytes a chunk (default: Content-Length)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="per-stage breakdown (one more, profiled run)")
    ap.add_argument("--top", type=int, default=0, help="with --profile: print the cProfile top N by own time")
    ap.add_argument("--no-sink", action="store_true",
                    help="alerts appended to a list instead of the sidecar's EventSink (redaction, JSON, write)")
    ap.add_argument("--dlp-cache", help="Hyperscan database cache directory (default: a temporary one)")
    ap.add_argument("--baseline", help="also measure this git ref's package, rounds interleaved")
    ap.add_argument("--rounds", type=int, default=1, help="with --baseline: interleaved rounds")
    ap.add_argument("--json", help="write the results here too (machine-readable)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a)))
        return 0
    if a.baseline:
        base = baseline_tree(a.baseline)
        args = ["--mib", str(a.mib), "--read", str(a.read), "--chunked", str(a.chunked), "--offload", str(a.offload), "--runs", str(a.runs),
                "--child"] + (["--profile"] if a.profile else []) + (["--no-sink"] if a.no_sink else []) + (["--dlp-cache", a.dlp_cache] if a.dlp_cache else [])
        results: dict[str, list] = {"this": [], a.baseline: []}
        try:
            rounds(a, args, base, results)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        report(a, results)
        return 0
    out = measure(a)
    print(f"in-process text path, {a.mib} MiB each way, reads of {a.read} B, {a.runs} runs; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"CPU s/GB best {out['s_per_GB_best']} median {out['s_per_GB_median']} "
          f"(MB/s best {out['MBps_best']} median {out['MBps_median']}); alerts {out['alerts']}")
    for stage, v in out.get("stages_s_per_GB", []):
        print(f"  {stage:<52} {v:.3f} s/GB")
    if "top" in out:
        print(out["top"])
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
