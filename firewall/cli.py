"""``python -m firewall``: one entry point, one module per command family.

Each command family lives beside the code it drives and exposes
``register(subparsers)``; this file only lists them, so ``--help`` explains every
subcommand and adding a family is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> the module that registers it; a family whose module is absent is skipped.
COMMANDS = {
    "run": "firewall.sidecar.app",
    "redirect": "firewall.datapath.redirect",
    "policy": "firewall.policy.cli",
    "dlp": "firewall.dlp.cli",
    "capture": "firewall.capture.cli",
    "report": "firewall.audit.cli",
    "segtest": "firewall.audit.segtest",
    "demo": "firewall.lab.demo",
}
COMMAND_MODULES = list(COMMANDS.values())

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


# Examples for subcommands whose module does not carry its own epilog: "--help" always shows one.
EXAMPLES: dict[tuple[str, ...], str] = {
    ("policy", "validate"): "python -m firewall policy validate examples/\n"
                            "  python -m firewall policy validate policy.yaml cluster.yaml   # in CI: exit 1 on problems",
    ("policy", "explain"): "python -m firewall policy explain --policy examples/ --identity "
                           "examples/identity/identities.yaml \\\n      --from shop/web-0 --to payments/payment-api-0 --port 9000",
    ("policy", "learn"): "python -m firewall policy learn --events eve-qa-1.json --events eve-qa-2.json -o learned.yaml",
    ("policy", "schema"): "python -m firewall policy schema > policy.schema.json",
    ("dlp", "validate"): "python -m firewall dlp validate dlp_rules/\n"
                         "  python -m firewall dlp validate my_packs/       # after dropping a pack file there",
    ("dlp", "packs"): "python -m firewall dlp packs\n  python -m firewall dlp packs --json",
    ("dlp", "scan"): "python -m firewall dlp scan payload.txt\n"
                     "  python -m firewall dlp scan --enable payment_cards --chunk-size 7 - < request.bin",
    ("capture", "parse-spec"): 'python -m firewall capture parse-spec "duration=60s,filter=tcp port 5432,max-bytes=50MiB"',
    ("capture", "compile-filter"): 'python -m firewall capture compile-filter "tcp port 443"',
    ("capture", "run"): 'python -m firewall capture run --spec "duration=10s,filter=tcp port 80" --pcap-dir /tmp/pcap',
    ("capture", "watch"): "python -m firewall capture watch --podinfo /etc/palisade/podinfo --pcap-dir /var/run/palisade/pcap",
    ("report",): "python -m firewall report --policy examples/ --events eve.json -o report/\n"
                 "  python -m firewall report --policy p/ --events eve1.json --events eve2.json.gz "
                 "--identity ids.yaml --segtest seg.json -o report/",
    ("segtest",): "python -m firewall segtest --plan plan.yaml -o results.json\n"
                  "  python -m firewall segtest --plan plan.yaml --source analytics -o -",
}


def _add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
    ex = EXAMPLES.get(path)
    if ex and not (parser.epilog and "example" in parser.epilog.lower()):
        parser.epilog = ((parser.epilog + "\n\n") if parser.epilog else "") + "examples:\n  " + ex
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _add_examples(child, (*path, name))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or with ``only`` just that command's family: the sidecar (``run``)
    then does not import the report, demo and capture tooling it never uses (~1.7 MiB of
    resident memory in every pod)."""
    parser = argparse.ArgumentParser(
        prog="python -m firewall",
        description="Palisade: inline firewall and DLP sidecar for Kubernetes pods.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ([COMMANDS[only]] if only in COMMANDS else COMMAND_MODULES):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(sub)
    for name, child in sub.choices.items():
        _add_examples(child, (name,))
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = build_parser(args_list[0] if args_list else None)
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
