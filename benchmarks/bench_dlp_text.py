"""DLP engine throughput on exactly the text payload of ``benchmarks/run.py``'s bulk test.

    python benchmarks/bench_dlp_text.py [--mib 32] [--chunks 65536,131072,262144] [--runs 5]
                                        [--binary] [--rules DIR [--rules DIR2]] [--profile]
                                        [--json out.json]

``run.py`` serves ``pii_text(seed=2, size=8 MiB, every=65536)`` (a hard negative every
4 KiB, a real value every 64 KiB) repeated back to back for the whole download; the
sidecar scans it in one ``DlpStream`` per direction, in the chunk sizes the proxy reads
(64 KiB - 256 KiB).  This does the same: ``--mib`` of the repeated payload through one
stream of the default packs, per chunk size, ``--runs`` times, and reports MB/s of
**CPU time** (``time.process_time``; the machine is shared, wall time measures the
neighbours) as the median and the best run, plus findings (alerts) per MiB.

``--baseline COMMIT`` times the engine and rule packs of that commit too, interleaved with
the current ones (before/after in one process; either source layout, flat ``firewall/dlp*.py``
or the ``firewall/dlp/`` package).  ``--rules`` given twice compares two rule
directories, runs interleaved (the machine's
load changes by 2x within minutes, so only same-sitting, interleaved figures compare).
``--binary`` adds random bytes of the same size.  ``--profile`` prints a cProfile of one
64 KiB-chunk run instead of timing.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import importlib
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlp_corpus import binary, pii_text  # noqa: E402

from firewall.dlp.engine import DlpEngine  # noqa: E402

PAYLOAD_SIZE = 8 << 20  # what run.py writes to payload-text.bin


def payload(mib: int) -> bytes:
    """``mib`` MiB of run.py's text payload, repeated as the bulk server sends it."""
    one = pii_text(seed=2, size=PAYLOAD_SIZE, every=65536)
    size = mib << 20
    return (one * (size // len(one) + 1))[:size]


def baseline_engine(commit: str, cache: str) -> Any:
    """The DLP engine and default rule packs of an earlier commit, loaded under another
    package name next to the current one.

    Works for both layouts: the packaged one (``firewall/dlp/engine.py``, issue 18) and the
    flat pre-package modules (``firewall/dlp.py`` + ``firewall/dlp_*.py``).  The commit's whole
    ``firewall/`` tree is extracted (the engine imports helpers such as the signature module
    from elsewhere in the package) and renamed, so no import reaches the current code."""
    root = Path(tempfile.mkdtemp(prefix="dlp-baseline-"))
    atexit.register(shutil.rmtree, root, True)
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "firewall", "dlp_rules"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    pkg_name = "dlpbaseline_" + "".join(c for c in commit if c.isalnum())[:12]
    pkg = root / pkg_name
    (root / "firewall").rename(pkg)
    for f in pkg.rglob("*.py"):
        src = f.read_text()
        f.write_text(src.replace("from firewall.", f"from {pkg_name}.")
                     .replace("import firewall.", f"import {pkg_name}."))
    sys.path.insert(0, str(root))
    packaged = (pkg / "dlp" / "engine.py").is_file()
    module = importlib.import_module(f"{pkg_name}.dlp.engine" if packaged else f"{pkg_name}.dlp")
    return module.DlpEngine.load(str(root / "dlp_rules"), cache_dir=cache)


def one_run(engine: Any, data: bytes, chunk: int) -> tuple[float, int]:
    view = memoryview(data)
    s = engine.stream()
    n = 0
    t0 = time.process_time()
    for off in range(0, len(data), chunk):
        n += len(s.scan(view[off:off + chunk]))
    n += len(s.close())
    return time.process_time() - t0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=32, help="MiB of payload per run")
    ap.add_argument("--chunks", default="65536,131072,262144", help="scan() sizes, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--binary", action="store_true", help="also time random bytes")
    ap.add_argument("--profile", action="store_true", help="cProfile one 64 KiB run and exit")
    ap.add_argument("--rules", action="append",
                    help="rule directory (repeat to compare variants, runs interleaved; default: the repo's)")
    ap.add_argument("--baseline", metavar="COMMIT",
                    help="also time the DLP engine and rules of this git commit, interleaved with the "
                         "current ones in this process (a before/after in one sitting)")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args(argv)
    data = payload(args.mib)
    inputs = {"run.py text": data}
    if args.binary:
        inputs["binary"] = binary(size=len(data))
    variants: list[str | None] = list(args.rules or [None])
    with tempfile.TemporaryDirectory() as cache:
        engines: list[Any] = [DlpEngine.load(r, cache_dir=cache) for r in variants]
        if args.baseline:
            engines.insert(0, baseline_engine(args.baseline, cache))
            variants.insert(0, f"@{args.baseline}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        one_run(engines[0], data, 65536)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return 0
    rows = []
    for name, buf in inputs.items():
        for chunk in (int(c) for c in args.chunks.split(",")):
            times: list[list[float]] = [[] for _ in engines]
            found = [0] * len(engines)
            for _ in range(args.runs):  # interleaved, so variants share the machine's mood
                for i, engine in enumerate(engines):
                    cpu, found[i] = one_run(engine, buf, chunk)
                    times[i].append(cpu)
            mb = len(buf) / 1e6
            for i, variant in enumerate(variants):
                # speed-up against the first variant: median of the per-round ratios (each round
                # runs every variant back to back, so a load swing hits them alike)
                ratio = statistics.median(a / b for a, b in zip(times[0], times[i], strict=True))
                rows.append({"input": name, "rules": variant or "default", "chunk": chunk,
                             "MB_s_median": round(mb / statistics.median(times[i])),
                             "MB_s_best": round(mb / min(times[i])), "vs_first": round(ratio, 2),
                             "findings": found[i],
                             "findings_per_MiB": round(found[i] / (len(buf) / (1 << 20)), 2)})
    print(f"DLP engine, default packs, one thread, {args.mib} MiB per run, CPU time, {args.runs} runs")
    print(f"{'input':<12} {'rules':<24} {'chunk':>7} {'MB/s med':>9} {'MB/s best':>10} {'x first':>8} "
          f"{'findings':>9}")
    for r in rows:
        print(f"{r['input']:<12} {r['rules'][-24:]:<24} {r['chunk']:>7} {r['MB_s_median']:>9} "
              f"{r['MB_s_best']:>10} {r['vs_first']:>8} {r['findings']:>9}")
    doc = {"mib": args.mib, "runs": args.runs, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
