"""DLP engine throughput on one core, next to a naive Hyperscan baseline.

    python benchmarks/dlp_throughput.py [--mib 16] [--chunk 65536] [--repeat 3] [--json out.json]

Inputs (from ``dlp_corpus``, seeded): ``text+pii`` is ordinary application
traffic (JSON API objects, log lines, prose) with one sensitive value every 4 KiB
(``text+pii/64K``: every 64 KiB)
and one hard negative (card-shaped number, order ID, timestamp, phone ...) every
4 KiB; ``run.py text`` is exactly the text payload of ``run.py``'s bulk test (8 MiB of
``pii_text(seed=2, every=65536)`` repeated: see ``bench_dlp_text.py``, which measures it per
chunk size with medians); ``dense`` is adversarial - every line a labelled corpus document, three in
four of them hard negatives; ``binary`` is random bytes.  Rows:

* ``engine``: ``DlpStream.scan`` in ``--chunk`` pieces, default packs (contact off),
  everything included: trigger scan, candidate confirmation, validation, masking.
* ``engine+contact``: the same with the contact pack (email, phone) enabled.
* ``engine@COMMIT`` (with ``--baseline COMMIT``): the ``engine`` row of an earlier commit,
  its runs alternating with the current engine's.
* ``triggers only``: the engine's own Hyperscan database and the same list-appending match
  callback, no confirmation at all - the ceiling for everything the engine does in Python
  (``engine`` / ``triggers only`` is the share left to candidate confirmation and findings).
* ``naive SOM``: the usual approach - full-value regexes of the same rules (email
  and phone included), one stream database, ``HS_FLAG_SOM_LEFTMOST``, a Python
  callback per match, no validation at all.

Throughput is bytes / best-of-``--repeat`` **CPU time** of the scan loop in one thread
(``time.process_time``: on a shared 2-core machine wall time mostly measures the
neighbours; wall-time figures are in the JSON too).  Do not loop this in CI.
Prints a table and a JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import hyperscan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dlp_text import baseline_engine  # noqa: E402
from bench_dlp_text import payload as runpy_text  # noqa: E402
from dlp_corpus import binary, dense_text, pii_text  # noqa: E402

from firewall.dlp.engine import DlpEngine  # noqa: E402

# What a straightforward implementation compiles: one full regex per rule, \b boundaries,
# start of match tracked so the value can be cut out and validated.
NAIVE = [
    rb"\b4[0-9]{3}(?:[ -]?[0-9]{4}){2}[ -]?[0-9]{1,7}\b",
    rb"\b(?:5[1-5][0-9]{2}|222[1-9]|22[3-9][0-9]|2[3-6][0-9]{2}|27[01][0-9]|2720)(?:[ -]?[0-9]{4}){3}\b",
    rb"\b3[47][0-9]{2}[ -]?[0-9]{6}[ -]?[0-9]{5}\b",
    rb"\b6(?:011|4[4-9][0-9]|5[0-9]{2})(?:[ -]?[0-9]{4}){3}[0-9]{0,3}\b",
    rb"\b35(?:2[89]|[3-8][0-9])(?:[ -]?[0-9]{4}){3}[0-9]{0,3}\b",
    rb"\b3(?:0[0-59]|[689][0-9])[0-9][ -]?[0-9]{6}[ -]?[0-9]{4}\b",
    rb"\b62[0-9]{2}(?:[ -]?[0-9]{4}){3}[0-9]{0,3}\b",
    rb"\b(?:5[06-8]|6[0-9])[0-9]{10,17}\b",
    rb"\b[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}\b",
    rb"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
    rb"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}\b",
    rb"-----BEGIN [A-Z ]{0,24}PRIVATE KEY-----",
    rb"\bgh[pousr]_[A-Za-z0-9]{36}\b",
    rb"\bglpat-[A-Za-z0-9_-]{20}\b",
    rb"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    rb"\b[rs]k_live_[A-Za-z0-9]{24,99}\b",
    rb"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}",
    rb"(?i)(?:secret|password|api_?key|token)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+_=.-]{16,}",
    rb"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b",
    rb"\+?[0-9]{1,3}[ .-]?\(?[0-9]{3}\)?[ .-]?[0-9]{3}[ .-]?[0-9]{4}\b",
]


def bench_engine(engine: DlpEngine, data: bytes, chunk: int, repeat: int) -> tuple[float, float, int]:
    best = wall = float("inf")
    count = 0
    view = memoryview(data)
    for _ in range(repeat):
        s = engine.stream()
        n = 0
        t0, w0 = time.process_time(), time.perf_counter()
        for off in range(0, len(data), chunk):
            n += len(s.scan(view[off:off + chunk]))
        n += len(s.close())
        best = min(best, time.process_time() - t0)
        wall = min(wall, time.perf_counter() - w0)
        count = n
    return len(data) / best / 1e6, len(data) / wall / 1e6, count


def bench_pair(engine: DlpEngine, other: object, data: bytes, chunk: int, repeat: int
               ) -> tuple[tuple[float, float, int], tuple[float, float, int]]:
    """Both engines, runs alternating, so a change in the machine's load hits both alike."""
    a = [float("inf"), float("inf"), 0]
    b = [float("inf"), float("inf"), 0]
    for _ in range(repeat):
        for eng, acc in ((engine, a), (other, b)):
            mbs, wall, n = bench_engine(eng, data, chunk, 1)  # type: ignore[arg-type]
            acc[0], acc[1], acc[2] = min(acc[0], len(data) / mbs / 1e6), min(acc[1], len(data) / wall / 1e6), n
    return ((len(data) / a[0] / 1e6, len(data) / a[1] / 1e6, int(a[2])),
            (len(data) / b[0] / 1e6, len(data) / b[1] / 1e6, int(b[2])))


def bench_triggers(engine: DlpEngine, data: bytes, chunk: int, repeat: int) -> tuple[float, float, int]:
    """Hyperscan alone on the engine's trigger database, with a callback as cheap as the
    engine's (append one tuple per match): what a text MB costs before any confirmation."""
    db = engine._db
    scratch = engine._scratch()
    hits: list[tuple[int, int, int]] = []
    add = hits.append

    def on_match(i: int, frm: int, to: int, _f: int, _c: object) -> None:
        add((frm, to, i))

    ctx = (0,)
    best = wall = float("inf")
    view = memoryview(data)
    n = 0
    for _ in range(repeat):
        n = 0
        st = db.stream(match_event_handler=on_match, context=ctx)
        st.__enter__()
        t0, w0 = time.process_time(), time.perf_counter()
        for off in range(0, len(data), chunk):
            st.scan(view[off:off + chunk], scratch=scratch, match_event_handler=on_match, context=ctx)
            n += len(hits)
            hits.clear()
        st.close(match_event_handler=on_match, context=ctx)
        best = min(best, time.process_time() - t0)
        wall = min(wall, time.perf_counter() - w0)
    return len(data) / best / 1e6, len(data) / wall / 1e6, n + len(hits)


def bench_naive(data: bytes, chunk: int, repeat: int) -> tuple[float, float, int]:
    db = hyperscan.Database(mode=hyperscan.HS_MODE_STREAM | hyperscan.HS_MODE_SOM_HORIZON_LARGE)
    db.compile(expressions=NAIVE, ids=list(range(len(NAIVE))), elements=len(NAIVE),
               flags=[hyperscan.HS_FLAG_SOM_LEFTMOST] * len(NAIVE))
    hits: list[tuple[int, int, int]] = []

    def on_match(i: int, frm: int, to: int, _f: int, _c: object) -> None:
        hits.append((i, frm, to))

    ctx = (0,)
    best = wall = float("inf")
    view = memoryview(data)
    for _ in range(repeat):
        hits.clear()
        st = db.stream(match_event_handler=on_match, context=ctx)
        st.__enter__()
        t0, w0 = time.process_time(), time.perf_counter()
        for off in range(0, len(data), chunk):
            st.scan(view[off:off + chunk], match_event_handler=on_match, context=ctx)
        st.close(match_event_handler=on_match, context=ctx)
        best = min(best, time.process_time() - t0)
        wall = min(wall, time.perf_counter() - w0)
    return len(data) / best / 1e6, len(data) / wall / 1e6, len(hits)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=16, help="input size per data set (MiB)")
    ap.add_argument("--chunk", type=int, default=65536, help="bytes per scan() call")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", metavar="COMMIT",
                    help="also time the default-pack engine of this git commit, each of its runs right "
                         "after one of the current engine's (before/after in one sitting)")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args(argv)
    size = args.mib << 20
    inputs = {"run.py text": runpy_text(args.mib), "text+pii": pii_text(size=size),
              "text+pii/64K": pii_text(size=size, every=65536),
              "dense": dense_text(size=size), "binary": binary(size=size)}
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        default = DlpEngine.load(cache_dir=cache)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        DlpEngine.load(cache_dir=cache)
        warm = time.perf_counter() - t0
        everything = DlpEngine.load(enable=list(default.packs), cache_dir=cache)
        baseline = baseline_engine(args.baseline, cache) if args.baseline else None
    rows = []
    for name, data in inputs.items():
        if baseline is not None:
            (mbs, wall, n), (bmbs, bwall, bn) = bench_pair(default, baseline, data, args.chunk, args.repeat)
            rows.append({"input": name, "variant": f"engine@{args.baseline}", "MB_s": round(bmbs),
                         "wall_MB_s": round(bwall), "findings": bn})
        else:
            mbs, wall, n = bench_engine(default, data, args.chunk, args.repeat)
        rows.append({"input": name, "variant": "engine", "MB_s": round(mbs), "wall_MB_s": round(wall),
                     "findings": n})
        mbs, wall, n = bench_engine(everything, data, args.chunk, args.repeat)
        rows.append({"input": name, "variant": "engine+contact", "MB_s": round(mbs), "wall_MB_s": round(wall),
                     "findings": n})
        mbs, wall, n = bench_triggers(default, data, args.chunk, args.repeat)
        rows.append({"input": name, "variant": "triggers only", "MB_s": round(mbs), "wall_MB_s": round(wall),
                     "findings": n, "note": "trigger hits, no confirmation"})
        mbs, wall, n = bench_naive(data, args.chunk, args.repeat)
        rows.append({"input": name, "variant": "naive SOM", "MB_s": round(mbs), "wall_MB_s": round(wall),
                     "findings": n, "note": "raw matches, unvalidated"})
    print(f"DLP engine throughput, one thread, {args.mib} MiB per input, {args.chunk}-byte scan() calls, "
          f"best of {args.repeat}")
    print(f"start-up: compile {cold * 1000:.0f} ms, from cache {warm * 1000:.0f} ms; "
          f"{len(default.rules)} rules / {len(default.triggers)} triggers (default packs)")
    print(f"{'input':<13} {'variant':<16} {'MB/s cpu':>8} {'MB/s wall':>9} {'findings':>9}")
    for r in rows:
        print(f"{r['input']:<13} {r['variant']:<16} {r['MB_s']:>8} {r['wall_MB_s']:>9} {r['findings']:>9}")
    doc = {"mib": args.mib, "chunk": args.chunk, "repeat": args.repeat,
           "startup_ms": {"compile": round(cold * 1000), "cached": round(warm * 1000)}, "rows": rows}
    print(json.dumps(doc, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
