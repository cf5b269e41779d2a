"""``python -m injector`` (console script ``palisade-injector``): serve, mutate, validate, certs, manifests.

Exit codes: 0 success, 1 runtime failure (cannot listen, cannot write), 2 bad
input (usage, unreadable config, a body that is not an AdmissionReview). Errors
are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
examples:
  # make a CA and a serving certificate for the in-cluster Service
  python -m injector certs --service palisade-injector --namespace palisade-system -o certs/

  # everything to install, with the CA bundle and the TLS Secret filled in
  python -m injector manifests --certs-dir certs/ > palisade.yaml && kubectl apply -f palisade.yaml
  kubectl label namespace shop palisade.dev/injection=enabled

  # run the webhook (what the Deployment does)
  python -m injector serve --cert certs/tls.crt --key certs/tls.key --port 8443

  # see what the webhook would answer for a pod, without a cluster
  python -m injector mutate < review.json
  python -m injector mutate --pod pod.yaml --print-pod
  python -m injector validate < review.json
"""


class UsageError(Exception):
    """Bad input from the user: exit 2."""


def _config(path: str | None):
    from injector.config import ConfigError, InjectorConfig

    try:
        return InjectorConfig.load(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


# --- serve -----------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from injector.server import ServeError, run

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = _config(args.config)
    try:
        run(config, args.cert, args.key, args.host, args.port, args.reload_interval)
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


# --- mutate / validate -----------------------------------------------------------------------

def _pod_review(path: str, namespace: str | None) -> dict:
    """Wrap a bare Pod manifest (YAML or JSON) in a CREATE AdmissionReview."""
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        pod = yaml.safe_load(text)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(pod, dict) or pod.get("kind") != "Pod":
        raise UsageError(f"{path}: expected a Pod manifest (kind: Pod)")
    ns = namespace or (pod.get("metadata") or {}).get("namespace") or "default"
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "offline", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE", "namespace": ns, "object": pod}}


def _run_review(args: argparse.Namespace, endpoint: str) -> int:
    import jsonpatch

    from injector import review

    config = _config(getattr(args, "config", None))
    if args.pod:
        body = json.dumps(_pod_review(args.pod, args.namespace))
    else:
        body = sys.stdin.buffer.read()
    try:
        result = review.handle(endpoint, body, config, frozenset(getattr(args, "grant", None) or ()))
    except review.ReviewError as exc:
        raise UsageError(f"bad AdmissionReview: {exc}") from None
    if getattr(args, "print_pod", False):
        request = json.loads(body)["request"]
        if not result.review["response"]["allowed"]:
            print(f"rejected: {result.review['response']['status']['message']}", file=sys.stderr)
            return 1
        pod = request["object"]
        pod.get("metadata", {}).pop("managedFields", None)
        print(json.dumps(jsonpatch.apply_patch(pod, result.patch), indent=2))
        return 0
    print(json.dumps(result.review, indent=2))
    return 0


def cmd_mutate(args: argparse.Namespace) -> int:
    return _run_review(args, "mutate")


def cmd_validate(args: argparse.Namespace) -> int:
    return _run_review(args, "validate")


# --- certs -----------------------------------------------------------------------------------

def cmd_certs(args: argparse.Namespace) -> int:
    from injector.certs import CertError, write_certs

    try:
        paths = write_certs(args.output, args.service, args.namespace, ips=args.ip or [],
                            extra_dns=args.dns or [], days=args.days, new_ca=args.new_ca)
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    what = "reused CA" if paths.reused_ca else "new CA"
    print(f"wrote {paths.cert} and {paths.key} ({what} {paths.ca_cert})")
    return 0


# --- manifests -------------------------------------------------------------------------------

def cmd_manifests(args: argparse.Namespace) -> int:
    from injector.certs import CA_CERT, TLS_CERT, TLS_KEY
    from injector.manifests import ManifestOptions, build, to_yaml

    def read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{path}: cannot read: {exc.strerror}") from None

    ca = cert = key = None
    if args.certs_dir:
        d = Path(args.certs_dir)
        ca, cert, key = read(d / CA_CERT), read(d / TLS_CERT), read(d / TLS_KEY)
    if args.ca_bundle:
        ca = read(Path(args.ca_bundle))
    opts = ManifestOptions(
        namespace=args.namespace, ca_bundle=ca, tls_cert=cert, tls_key=key,
        failure_policy=args.failure_policy, timeout_seconds=args.timeout_seconds, replicas=args.replicas,
        policy_namespaces=tuple(args.policy_namespace or ["default"]), config=_config(args.config))
    try:
        text = to_yaml(build(opts))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.output and args.output != "-":
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"error: {args.output}: cannot write: {exc.strerror}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


# --- parser ----------------------------------------------------------------------------------

def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return int(value)


def _ip(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m injector",
        description="Palisade injector: the admission webhook that adds the Palisade sidecar to pods "
                    "of opted-in namespaces and keeps CDE pods from running unprotected.",
        epilog=EPILOG, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the HTTPS webhook (/mutate, /validate[/GRANTS], /healthz, /readyz, /metrics)",
                       formatter_class=fmt, epilog="example:\n  python -m injector serve --cert tls.crt "
                       "--key tls.key --port 8443 --config config.yaml\n\nThe certificate files are re-read "
                       "every --reload-interval seconds; a changed pair is used for new connections.")
    p.add_argument("--cert", required=True, help="PEM serving certificate (chain)")
    p.add_argument("--key", required=True, help="PEM private key of the certificate")
    p.add_argument("--port", type=_port, default=8443, help="listening port (default 8443; 0 = any free port)")
    p.add_argument("--host", default="0.0.0.0", help="listening address (default 0.0.0.0)")
    p.add_argument("--config", help="injector config YAML (image, nativeSidecar, resources ...)")
    p.add_argument("--reload-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often to check the certificate files for rotation (default 5)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_serve)

    for name, func, help_text in (
        ("mutate", cmd_mutate, "answer one AdmissionReview from stdin offline (same code as /mutate)"),
        ("validate", cmd_validate, "answer one AdmissionReview from stdin offline (same code as /validate): "
                                   "the admission guard for CDE pods, dangerous fields and ephemeral containers"),
    ):
        p = sub.add_parser(name, help=help_text, formatter_class=fmt, epilog=(
            f"examples:\n  python -m injector {name} < review.json > response.json\n"
            f"  python -m injector {name} --pod pod.yaml --namespace shop"
            + ("\n  python -m injector mutate --pod pod.yaml --print-pod   # the pod as it would run"
               if name == "mutate" else "")
            + "\n\nBad input exits 2 with one line on stderr."))
        p.add_argument("--config", help="injector config YAML")
        p.add_argument("--pod", metavar="FILE", help="read a bare Pod manifest (YAML/JSON, '-' = stdin) "
                       "instead of an AdmissionReview and wrap it in a CREATE review")
        p.add_argument("--namespace", help="namespace for --pod (default: the pod's, else 'default')")
        if name == "validate":
            p.add_argument("--grant", action="append", choices=["mode", "debug"],
                           help="act as if the namespace carried the admin label granting this to CDE pods: "
                                "mode = palisade.dev/cde-allow-mode-override=true (learn/monitor allowed), "
                                "debug = palisade.dev/cde-allow-debug=true (ephemeral containers allowed); "
                                "repeatable. In the cluster the webhook path carries them (/validate/mode-debug)")
        if name == "mutate":
            p.add_argument("--print-pod", action="store_true",
                           help="print the patched pod instead of the AdmissionReview response")
        p.set_defaults(func=func)

    p = sub.add_parser("certs", help="make a CA and the webhook serving certificate",
                       formatter_class=fmt, epilog="example:\n  python -m injector certs --service "
                       "palisade-injector --namespace palisade-system -o certs/\n\nWrites ca.crt, ca.key, "
                       "tls.crt, tls.key. An existing ca.crt/ca.key in the directory is reused (rotation "
                       "keeps the caBundle valid) unless --new-ca is given.")
    p.add_argument("--service", default="palisade-injector", help="Service name (default palisade-injector)")
    p.add_argument("--namespace", default="palisade-system", help="Service namespace (default palisade-system)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--ip", action="append", type=_ip, metavar="ADDR", help="extra IP SAN (repeatable), e.g. 127.0.0.1")
    p.add_argument("--dns", action="append", metavar="NAME", help="extra DNS SAN (repeatable)")
    p.add_argument("--days", type=int, default=365, help="serving certificate validity (default 365)")
    p.add_argument("--new-ca", action="store_true", help="make a new CA even if DIR holds one")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("manifests", help="print the Kubernetes manifests to install the webhook",
                       formatter_class=fmt, epilog="examples:\n  python -m injector manifests --ca-bundle "
                       "certs/ca.crt > palisade.yaml\n  python -m injector manifests --certs-dir certs/ "
                       "--failure-policy Ignore -o palisade.yaml\n\nfailurePolicy Fail (default): no pod "
                       "starts unprotected, but an injector outage blocks pod creation in opted-in "
                       "namespaces.\nIgnore: deployments go on during an outage, without the sidecar (the "
                       "CDE validating webhook still refuses unprotected CDE pods).")
    p.add_argument("--ca-bundle", metavar="FILE", help="PEM CA certificate for the webhooks' caBundle")
    p.add_argument("--certs-dir", metavar="DIR", help="directory from `certs`: caBundle from ca.crt and a "
                   "TLS Secret from tls.crt/tls.key")
    p.add_argument("--namespace", default="palisade-system", help="namespace of the webhook (default palisade-system)")
    p.add_argument("--failure-policy", choices=["Fail", "Ignore"], default="Fail",
                   help="mutating webhook failurePolicy (default Fail; see below)")
    p.add_argument("--timeout-seconds", type=int, default=10, help="webhook timeoutSeconds, 1-30 (default 10)")
    p.add_argument("--replicas", type=int, default=2, help="webhook replicas (default 2)")
    p.add_argument("--policy-namespace", action="append", metavar="NS",
                   help="namespace that gets a baseline palisade-policy ConfigMap (repeatable; default 'default')")
    p.add_argument("--config", help="injector config YAML to ship in the ConfigMap")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_manifests)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
