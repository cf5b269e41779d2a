"""``python -m firewall capture ...``: the capture engine by hand, outside the sidecar.

For SREs on a node or in a debug container, and for checking an annotation
value before applying it::

    python -m firewall capture parse-spec "duration=60s,filter=tcp port 5432"
    python -m firewall capture compile-filter "tcp port 5432"
    python -m firewall capture run --spec "duration=10s,filter=icmp" --pcap-dir /tmp/pcap \\
        [--iface eth0] [--netns NAME]
    python -m firewall capture watch --podinfo /etc/podinfo --pcap-dir /tmp/pcap

Events go to stdout as EVE JSON lines (the same ``pcap`` events the sidecar
emits). Exit codes: 0 done, 1 the capture failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from firewall.capture.bpf import compile_filter
from firewall.capture.manager import CaptureManager
from firewall.capture.spec import CaptureSpecError, parse_size, parse_spec
from firewall.observe.events import EventSink


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "capture", help="packet captures: check a spec, compile a filter, capture by hand",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="capture_command", metavar="SUBCOMMAND")

    ps = sub.add_parser("parse-spec", help="validate a palisade.dev/pcap value and print it as JSON")
    ps.add_argument("spec", help='e.g. "duration=60s,filter=tcp port 5432,max-bytes=50MiB"')
    ps.set_defaults(func=cmd_parse_spec)

    cf = sub.add_parser("compile-filter", help="print the classic BPF program for a tcpdump filter "
                                               "(same layout as tcpdump -dd)")
    cf.add_argument("filter")
    cf.add_argument("--snaplen", type=int, default=65535)
    cf.set_defaults(func=cmd_compile_filter)

    run = sub.add_parser("run", help="run one capture in the foreground (Ctrl-C stops it cleanly)")
    run.add_argument("--spec", default="", help="capture options, as in the annotation")
    run.add_argument("--iface", help="interface (overrides iface= in the spec); default: all but lo")
    run.add_argument("--pcap-dir", required=True, help="where pcap files are written (mode 0600)")
    _common(run)
    run.set_defaults(func=cmd_run)

    w = sub.add_parser("watch", help="watch a downward-API directory and capture on palisade.dev/pcap "
                                     "changes, as the sidecar does (Ctrl-C stops)")
    w.add_argument("--podinfo", required=True, help="downward-API volume directory")
    w.add_argument("--pcap-dir", required=True)
    w.add_argument("--max-concurrent", type=int, default=2)
    w.add_argument("--poll", action="store_true", help="poll instead of inotify")
    _common(w)
    w.set_defaults(func=cmd_watch)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netns", help="network namespace name (/run/netns/NAME) or path to capture in")
    p.add_argument("--disk-budget", default="500MiB", help="total size kept in --pcap-dir (default 500MiB)")
    p.add_argument("--events", help="append events to this file instead of stdout")


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def cmd_parse_spec(args: argparse.Namespace) -> int:
    try:
        spec = parse_spec(args.spec)
    except CaptureSpecError as exc:
        _err(str(exc))
        return 2
    print(json.dumps(spec.to_json(), indent=2))
    return 0


def cmd_compile_filter(args: argparse.Namespace) -> int:
    try:
        insns = compile_filter(args.filter, args.snaplen)
    except CaptureSpecError as exc:
        _err(str(exc))
        return 2
    for code, jt, jf, k in insns:
        print(f"{{ 0x{code:x}, {jt}, {jf}, 0x{k:08x} }},")
    return 0


def _manager(args: argparse.Namespace, sink: EventSink, max_concurrent: int = 1) -> CaptureManager | None:
    netns = args.netns
    if netns and os.sep not in netns:
        netns = os.path.join("/run/netns", netns)
    if netns and not os.path.exists(netns):
        _err(f"network namespace {args.netns!r} not found")
        return None
    try:
        budget = parse_size(args.disk_budget)
    except CaptureSpecError as exc:
        _err(f"--disk-budget: {exc}")
        return None
    try:
        return CaptureManager(args.pcap_dir, sink.emit, max_concurrent=max_concurrent,
                              disk_budget_bytes=budget, netns=netns)
    except OSError as exc:
        _err(f"--pcap-dir {args.pcap_dir}: {exc.strerror or exc}")
        return None


def _sink(args: argparse.Namespace) -> EventSink | None:
    try:
        return EventSink(path=args.events) if args.events else EventSink()
    except OSError as exc:
        _err(f"--events {args.events}: {exc.strerror or exc}")
        return None


def _on_term(stop: threading.Event) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop.set())


def cmd_run(args: argparse.Namespace) -> int:
    try:
        spec = parse_spec(args.spec)
        if args.iface:
            spec = parse_spec(f"{args.spec},iface={args.iface}" if args.spec.strip() else f"iface={args.iface}")
    except CaptureSpecError as exc:
        _err(str(exc))
        return 2
    sink = _sink(args)
    if sink is None:
        return 2
    mgr = _manager(args, sink)
    if mgr is None:
        return 2
    cap = mgr.start(spec, {"manual": args.spec})
    if cap is None:
        return 1
    stop = threading.Event()
    _on_term(stop)
    try:
        while not cap.join(0.2):
            if stop.is_set():
                cap.stop("stopped")
    except KeyboardInterrupt:
        cap.stop("stopped")
        cap.join(5)
    sink.close()
    return 0 if cap.state == "finished" else 1


def cmd_watch(args: argparse.Namespace) -> int:
    from firewall.identity.podinfo import PodinfoWatcher

    if not os.path.isdir(args.podinfo):
        _err(f"--podinfo {args.podinfo}: not a directory")
        return 2
    sink = _sink(args)
    if sink is None:
        return 2
    mgr = _manager(args, sink, max_concurrent=args.max_concurrent)
    if mgr is None:
        return 2
    watcher = PodinfoWatcher(args.podinfo, lambda info: mgr.on_annotations(info.annotations),
                             on_error=lambda msg: _err(msg), use_inotify=False if args.poll else None)
    stop = threading.Event()
    _on_term(stop)
    watcher.start()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    watcher.stop()
    mgr.stop_all()
    sink.close()
    return 0
