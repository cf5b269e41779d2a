"""``python -m firewall report``: build the auditor evidence pack.

Exit codes: 0 written, 2 bad input (unreadable/invalid policy, events, identity
or segtest file), 1 the output could not be written.
"""

from __future__ import annotations

import argparse
import sys
import time

from firewall.audit.report import ReportError, build_report, parse_date, write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="auditor evidence pack (HTML/JSON/PDF) from policies and events",
        description="Build report.html, report.json (and report.pdf) for a PCI DSS auditor: scope inventory, "
                    "data-flow diagram, rules touching the CDE with hit counts, denied attempts, DLP findings "
                    "(masked), encryption share, segmentation test results and rule review dates.")
    p.add_argument("--policy", nargs="+", action="extend", required=True, metavar="FILE",
                   help="policy YAML files (FirewallPolicy / ClusterFirewallPolicy)")
    p.add_argument("--events", nargs="+", action="extend", default=[], metavar="EVE.jsonl",
                   help="EVE JSON-lines event files from the sidecars")
    p.add_argument("--identity", metavar="FILE", help="YAML list of {ip, namespace, pod, labels}")
    p.add_argument("--segtest", nargs="+", action="extend", default=[], metavar="RESULTS.json",
                   help="results of python -m firewall segtest (one per source namespace)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--as-of", metavar="YYYY-MM-DD",
                   help="date the review ages are measured against (default: today, UTC)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes for reading events (default: CPU count)")
    p.add_argument("--no-pdf", action="store_true", help="skip report.pdf")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    as_of = None
    if args.as_of:
        as_of = parse_date(args.as_of)
        if as_of is None:
            print(f"report: --as-of {args.as_of!r} is not a date (YYYY-MM-DD)", file=sys.stderr)
            return 2
    if args.jobs is not None and args.jobs < 1:
        print("report: --jobs must be at least 1", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        rep = build_report(args.policy, args.events, args.identity, args.segtest, as_of=as_of, jobs=args.jobs)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    try:
        written, notes = write_report(rep, args.output, pdf=not args.no_pdf)
    except (ReportError, OSError) as exc:
        msg = getattr(exc, "strerror", None) or str(exc)
        print(f"report: cannot write the report: {msg}", file=sys.stderr)
        return 1
    tr = rep["time_range"]
    print(f"report: {tr['events']} events ({tr['start']} .. {tr['end']}) in {time.monotonic() - t0:.1f}s")
    for f in rep["findings"]:
        if f["severity"] == "high":
            print(f"  ! [{f['requirement']}] {f['message']}")
    for path in written:
        print(f"wrote {path}")
    for note in notes:
        print(note)
    html_path = next((p for p in written if p.endswith(".html")), None)
    if html_path:
        print(f"open {html_path} in a browser (it is self-contained)")
    return 0
