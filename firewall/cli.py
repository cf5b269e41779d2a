"""``python -m firewall``: one entry point, one module per command family.

Each command family lives beside the code it drives and exposes
``register(subparsers)``; this file only lists them, so ``--help`` explains every
subcommand and adding a family is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, is_optional): optional families are skipped if their module is absent.
COMMAND_MODULES = [
    "firewall.run_cli",
    "firewall.redirect",
    "firewall.policy_cli",
    "firewall.dlp_cli",
    "firewall.capture_cli",
    "firewall.report_cli",
    "firewall.segtest",
    "firewall.demo",
]

EPILOG = """\
examples:
  python -m firewall redirect show --dry-run          print the nftables rules for a pod
  python -m firewall redirect apply                   install them (palisade-init does this)
  python -m firewall run --policy policy.yaml         run the sidecar
  python -m firewall policy validate policy.yaml      check a policy file in CI
  python -m firewall dlp scan --enable payment_cards payload.txt
  python -m firewall report --policy p.yaml --events eve.json -o report/
  python -m firewall demo                             the guided tour in network namespaces
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m firewall",
        description="Palisade: inline firewall and DLP sidecar for Kubernetes pods.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
