"""``python -m firewall dlp``: check rule packs, list them, scan files offline.

``dlp scan`` feeds the input through the same stream engine the sidecar uses, in
chunks of ``--chunk-size`` bytes, so it doubles as a reproducible test harness:
its output must not depend on the chunk size.  Only masked values are printed.

Exit codes: 0 success; 1 invalid rule packs (one ``path: message`` line each);
2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import IO

from firewall.dlp.engine import DlpEngine, Finding
from firewall.dlp.rules import DlpRuleError, default_rules_dir, pack_files, parse_pack

DEFAULT_CHUNK = 64 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dlp", help="DLP rule packs: validate, list, scan files offline",
                              description="Data loss prevention rule packs and offline scanning.")
    sub = p.add_subparsers(dest="dlp_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    v = sub.add_parser("validate", help="check and compile the rule packs of a directory")
    v.add_argument("dirs", nargs="+", metavar="DIR", help="rule directory (or single pack file)")
    v.set_defaults(func=cmd_validate)

    ls = sub.add_parser("packs", help="list the rule packs and whether they are on by default")
    ls.add_argument("--rules", action="append", metavar="DIR", help="rule directory (repeatable)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=cmd_packs)

    s = sub.add_parser("scan", help="scan a file (or - for stdin) and print one JSON line per finding")
    s.add_argument("--rules", action="append", metavar="DIR", help="rule directory (repeatable)")
    s.add_argument("--enable", action="append", metavar="PACK",
                   help="enable only these packs (repeatable or comma-separated; default: packs on by default)")
    s.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, metavar="N",
                   help=f"feed the engine N bytes at a time (default {DEFAULT_CHUNK})")
    s.add_argument("--cache-dir", metavar="DIR", help="compiled database cache directory")
    s.add_argument("--context", action="store_true", help="add the masked context to each line")
    s.add_argument("input", metavar="FILE|-")
    s.set_defaults(func=cmd_scan)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    errors: list[str] = []
    names: list[str] = []
    files: list[Path] = []
    for d in args.dirs:
        try:
            found = pack_files([d])
        except DlpRuleError as exc:
            errors.append(str(exc))
            continue
        if not found:
            errors.append(f"{d}: no rule packs (*.yaml)")
        files.extend(found)
    for f in files:
        try:
            pack, _ = parse_pack(f)
            names.append(pack.name)
        except DlpRuleError as exc:
            errors.append(str(exc))
    if not errors:
        try:
            with tempfile.TemporaryDirectory(prefix="palisade-dlp-validate-") as tmp:
                engine = DlpEngine.load(args.dirs, enable=sorted(set(names)), cache_dir=tmp)
        except DlpRuleError as exc:
            errors.append(str(exc))
    if errors:
        for e in errors:
            _err(e)
        return 1
    print(f"ok: {len(engine.packs)} pack(s), {len(engine.rules)} rule(s), {len(engine.triggers)} "
          f"trigger(s) compiled into one stream database; holdback {engine.holdback} bytes")
    for name, info in engine.packs.items():
        default = "on" if info["enabled_by_default"] else "off"
        print(f"  {name:<16} {len(info['rules']):>3} rules  default {default:<3}  {info['path']}")
    return 0


def cmd_packs(args: argparse.Namespace) -> int:
    dirs = args.rules or [default_rules_dir_or_none()]
    if dirs == [None]:
        _err("dlp_rules: no rule directory found (pass --rules)")
        return 2
    rows = []
    try:
        for f in pack_files(dirs):
            pack, _ = parse_pack(f)
            rows.append(pack.info())
    except DlpRuleError as exc:
        _err(str(exc))
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        default = "on" if r["enabled_by_default"] else "off"
        print(f"{r['name']:<16} default {default:<3} {len(r['rules']):>3} rules  {r['description']}")
    return 0


def default_rules_dir_or_none() -> str | None:
    try:
        return default_rules_dir()
    except DlpRuleError:
        return None


def _open_input(name: str) -> IO[bytes]:
    if name == "-":
        return sys.stdin.buffer
    return open(name, "rb")


def cmd_scan(args: argparse.Namespace) -> int:
    if args.chunk_size < 1:
        _err(f"--chunk-size must be a positive number of bytes, not {args.chunk_size}")
        return 2
    enable = None
    if args.enable:
        enable = [p.strip() for item in args.enable for p in item.split(",") if p.strip()]
    try:
        engine = DlpEngine.load(args.rules, enable=enable, cache_dir=args.cache_dir)
    except DlpRuleError as exc:
        _err(str(exc))
        return 1
    try:
        fh = _open_input(args.input)
    except OSError as exc:
        _err(f"{args.input}: {exc.strerror}")
        return 2
    stream = engine.stream(track_retractions=True)
    found: list[Finding] = []
    try:
        with fh if fh is not sys.stdin.buffer else _nullctx():
            while True:
                chunk = fh.read(args.chunk_size)
                if not chunk:
                    break
                found.extend(stream.scan(chunk))
    except OSError as exc:
        _err(f"{args.input}: {exc.strerror}")
        return 2
    found.extend(stream.close())
    gone = {(f.rule_id, f.start, f.end) for f in stream.retracted}
    final = sorted((f for f in found if (f.rule_id, f.start, f.end) not in gone),
                   key=lambda f: (f.start, f.end, f.rule_id))
    out = sys.stdout
    for f in final:
        row = f.to_json()
        if args.context:
            row["context"] = f.context
        out.write(json.dumps(row, separators=(",", ":")) + "\n")
    out.flush()
    return 0


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
