"""``python -m firewall policy validate|explain|learn|schema``.

Exit codes: 0 success; 1 the input is wrong (invalid policy, explain --expect
mismatch); 2 bad usage (unknown pod, malformed peer spec, unreadable events).
"""

from __future__ import annotations

import argparse
import json
import sys

from firewall.identity.identity import Identity, IdentityError, IdentityMap, load_identity_file


def _protocol_arg(value: str) -> str:
    from firewall.policy.model import check_protocol

    try:
        return check_protocol(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

def register(subparsers) -> None:
    p = subparsers.add_parser("policy", help="validate, explain, learn and export firewall policies",
                              description="Policy as code: validate in CI, explain a verdict, turn learned "
                                          "flows into a policy, print the JSON schema.")
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")

    v = sub.add_parser("validate", help="check policy files (exit 1 with file:line: message per problem)")
    v.add_argument("files", nargs="+", metavar="FILE", help="policy files or directories")
    v.set_defaults(func=cmd_validate)

    e = sub.add_parser(
        "explain", help="which rule decides a flow, and why",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SRC/DST: an IP (resolved with --identity, unknown = world), ns/pod (from --identity),\n"
               "ns:key=value,key=value (a workload by labels), or world[:IP].\n"
               "Without --direction both ends' sidecars are explained (egress at SRC, ingress at DST).")
    e.add_argument("--policy", action="extend", nargs="+", required=True, metavar="FILE",
                   help="policy files or directories (repeatable)")
    e.add_argument("--from", dest="src", required=True, metavar="SRC")
    e.add_argument("--to", dest="dst", required=True, metavar="DST")
    e.add_argument("--port", type=int, required=True,
                   help="destination port; the ICMP type for ICMP/ICMPv6, 0 for other protocols")
    e.add_argument("--transport", type=_protocol_arg, default="TCP",
                   help="TCP, UDP, SCTP, ICMP, ICMPv6 or an IP protocol number")
    e.add_argument("--app-proto", metavar="P")
    e.add_argument("--identity", metavar="FILE", help="identity file (list of {ip, namespace, pod, labels})")
    e.add_argument("--direction", choices=["ingress", "egress"])
    e.add_argument("--mode", choices=["learn", "monitor", "protect"], help="as the palisade.dev/mode annotation")
    e.add_argument("--quarantined", action="store_true")
    e.add_argument("--node-ip", help="node IP for the kubelet-probes rule")
    e.add_argument("--probe-ports", default="", help="comma-separated probe ports")
    e.add_argument("--expect", choices=["allow", "deny"], help="exit 1 unless the final verdict is this")
    e.set_defaults(func=cmd_explain)

    learn = sub.add_parser("learn", help="turn flow events into a FirewallPolicy per workload")
    learn.add_argument("--events", action="extend", nargs="+", required=True, metavar="EVE.jsonl",
                       help="EVE JSON-lines files with flow records (repeatable)")
    learn.add_argument("--namespace", help="only workloads of this namespace")
    learn.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    learn.add_argument("--min-path-depth", type=int, default=1, metavar="N",
                       help="never learn an HTTP pathPrefix with fewer than N segments (default 1: "
                            "no 'pathPrefix: /' from a request like GET /1; 0 allows it)")
    learn.add_argument("--max-prefixes", type=int, default=32, metavar="N",
                       help="HTTP path prefixes per rule before they are widened, then the rarest refused")
    learn.add_argument("--max-world-peers", type=int, default=16, metavar="N",
                       help="outside addresses per workload before they are aggregated into CIDRs")
    learn.set_defaults(func=cmd_learn)

    s = sub.add_parser("schema", help="print the JSON Schema of policy documents")
    s.add_argument("-o", "--output", default="-")
    s.set_defaults(func=cmd_schema)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def cmd_validate(args) -> int:
    from firewall.policy.engine import PolicyError, PolicySet

    try:
        ps = PolicySet.load(args.files)
    except PolicyError as exc:
        for line in exc.problems:
            print(line)
        return 1
    print(f"ok: {len(ps.documents)} policies, {ps.rule_count} rules")
    return 0


class _SpecError(Exception):
    pass


def parse_endpoint(spec: str, idmap: IdentityMap) -> Identity:
    """SRC/DST syntax of ``policy explain`` -> Identity (see the subcommand's epilog)."""
    from firewall.policy.match import parse_ip

    s = spec.strip()
    if s == "world" or s.startswith("world:"):
        ip = s.split(":", 1)[1] if ":" in s else "203.0.113.1"
        if parse_ip(ip) is None:
            raise _SpecError(f"{spec}: invalid IP")
        return Identity(ip)
    if parse_ip(s) is not None:
        return idmap.resolve(s)
    if ":" in s:
        ns, _, sel = s.partition(":")
        labels: dict[str, str] = {}
        for part in filter(None, sel.split(",")):
            key, eq, value = part.partition("=")
            if not eq or not key:
                raise _SpecError(f"{spec}: expected ns:key=value[,key=value]")
            labels[key.strip()] = value.strip()
        if not ns:
            raise _SpecError(f"{spec}: namespace missing before ':'")
        return Identity.make("", ns, None, labels)
    if "/" in s:
        ns, _, pod = s.partition("/")
        found = idmap.by_pod(ns, pod)
        if found is None:
            raise _SpecError(f"{spec}: unknown pod (give --identity FILE, or use ns:key=value)")
        return found
    raise _SpecError(f"{spec}: expected an IP, ns/pod, ns:key=value or world[:IP]")


def cmd_explain(args) -> int:
    from firewall.policy.engine import FlowInfo, PolicyError, PolicySet

    try:
        idmap = load_identity_file(args.identity) if args.identity else IdentityMap()
        probe_ports = frozenset(int(p) for p in args.probe_ports.split(",") if p.strip())
        ps = PolicySet.load(args.policy, node_ip=args.node_ip, probe_ports=probe_ports)
        src = parse_endpoint(args.src, idmap)
        dst = parse_endpoint(args.dst, idmap)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except (IdentityError, _SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: --probe-ports: {exc}", file=sys.stderr)
        return 2
    from firewall.policy.model import PORT_PROTOCOLS

    if args.transport in PORT_PROTOCOLS and not 1 <= args.port <= 65535:
        print("error: --port must be 1-65535", file=sys.stderr)
        return 2
    if args.transport not in PORT_PROTOCOLS and not 0 <= args.port <= 255:
        print(f"error: --port for {args.transport} is the ICMP type (0-255), or 0", file=sys.stderr)
        return 2
    views = []
    if args.direction in (None, "egress") and not src.is_world:
        views.append(FlowInfo("egress", src, dst, args.port, args.transport))
    if args.direction in (None, "ingress") and not dst.is_world:
        views.append(FlowInfo("ingress", dst, src, args.port, args.transport))
    if not views:
        print("error: both ends are the world: no sidecar sees this flow", file=sys.stderr)
        return 2
    verdict = "allow"
    for i, flow in enumerate(views):
        if i:
            print()
        for line in ps.explain(flow, args.app_proto, mode_override=args.mode, quarantined=args.quarantined):
            print(line)
        d = ps.decide_app(flow, args.app_proto, mode_override=args.mode, quarantined=args.quarantined) \
            if args.app_proto else None
        d = d or ps.decide(flow, mode_override=args.mode, quarantined=args.quarantined)
        if d.verdict == "deny" and d.enforced:
            verdict = "deny"
    print(f"\nverdict: {verdict}")
    if args.expect and args.expect != verdict:
        print(f"expected {args.expect}", file=sys.stderr)
        return 1
    return 0


def cmd_learn(args) -> int:
    from firewall.policy.learn import LearnError, LearnOptions, learn_policies, render_policies

    if args.min_path_depth < 0 or args.max_prefixes < 1 or args.max_world_peers < 1:
        print("error: --min-path-depth must be >= 0, --max-prefixes and --max-world-peers >= 1", file=sys.stderr)
        return 2
    opts = LearnOptions(min_path_depth=args.min_path_depth, max_prefixes_per_rule=args.max_prefixes,
                        max_world_peers=args.max_world_peers)
    try:
        policies = learn_policies(args.events, namespace=args.namespace, options=opts)
    except LearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in policies:  # what traffic could not make the learner write, for the reviewer
        for line in p.summary.lines():
            print(f"{p.namespace}/{p.name}: {line}", file=sys.stderr)
    text = render_policies(policies)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            print(f"error: {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {len(policies)} policies to {args.output}", file=sys.stderr)
    return 0


def cmd_schema(args) -> int:
    from firewall.policy.schema import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0
