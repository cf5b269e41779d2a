"""Traffic steering inside the pod's network namespace: nftables + policy routing.

``python -m firewall redirect apply`` is what the ``palisade-init`` container runs.
Everything lives in one nftables table, ``inet palisade`` (IPv4 and IPv6 at once),
written as ONE ``nft -f -`` transaction ("add table; flush table; table {...}") so a
half-applied ruleset never exists and applying twice gives the same ruleset.

How each kind of traffic is steered (marks and ports are configurable):

* inbound TCP to the pod (arriving on any interface but ``lo``, destined to a local
  address) is diverted with ``tproxy`` to the inbound listener (15006) and marked
  ``0x539``; policy routing (``fwmark 0x539 lookup 133``, ``local default dev lo
  table 133``) delivers it to the transparent socket.  The sidecar then connects to
  the application *from the client's address* (IP_TRANSPARENT + SO_MARK 0x539);
  the ``ct mark`` saved from that socket brings the application's replies back
  through ``lo`` to the sidecar, so the application logs the true client IP.
* outbound TCP from the pod's processes is REDIRECTed (nat output) to the outbound
  listener (15001); the sidecar reads the original destination with
  SO_ORIGINAL_DST.  REDIRECT was chosen over mark-and-reroute for TCP because it
  needs no transparent socket per outbound flow and fails closed by itself (no
  listener -> RST).
* outbound DNS (UDP/53) is marked ``0x53a`` in the output route chain, rerouted
  through ``lo`` by the same table, and ``tproxy``-ed to the DNS listener (15053);
  the sidecar reads the original destination with IP_RECVORIGDSTADDR.
* the proxy's own traffic is recognised by its socket mark, never by its user: the
  sidecar sets ``SO_MARK`` ``0x53c`` on its upstream and DNS-relay sockets (and
  ``0x539`` on the transparent ones), which needs CAP_NET_ADMIN - a capability no
  application container gets (the admission guard refuses it).  A process that merely
  runs as UID/GID 1337 (an image's ``USER 1337``, a root process calling
  ``setuid(1337)``) is redirected like any other.  Loopback traffic (including the pod
  talking to its own address), the exclusions and the admin port (15020) are not captured.
* fail closed: inbound TCP that should have reached the sidecar but found no
  listener (sidecar down) is marked ``0x53b`` and rejected with a TCP reset in the
  input chain instead of falling through to the application.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from firewall import ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_UID

TABLE = "palisade"
DNS_PORT = 15053
MARK = 0x539          # transparent flows (inbound tproxy, proxy->app upstream)
DNS_MARK = 0x53A      # outbound DNS rerouted through lo
FAILCLOSED_MARK = 0x53B
#: the sidecar's own non-transparent sockets (proxy upstreams, DNS relay upstreams): SO_MARK
#: needs CAP_NET_ADMIN, so an application process cannot wear it.  Not in the policy-routing
#: rules: marked packets are routed normally.
OWN_MARK = 0x53C
#: conntrack mark of connections the redirect deliberately leaves alone (excluded ports and
#: CIDRs, the admin port): the L3 filter (firewall/datapath/l3rules.py) lets exactly these through.
EXCLUDED_CT_MARK = 0x53D
ROUTE_TABLE = 133
#: NFLOG group the L3 filter logs denied (and, outside protect mode, would-be-denied) packets to
L3_LOG_GROUP = 1337
RULE_PRIORITY = 32000


SO_MARK = 36
log = logging.getLogger("palisade.redirect")
_mark_refused = False


def mark_own(sock: socket.socket) -> None:
    """Mark one of the sidecar's own sockets with ``OWN_MARK``.

    The redirect exempts this mark, not a user: SO_MARK needs CAP_NET_ADMIN, which only the
    sidecar holds, so no application process can opt out of the firewall by running as
    UID 1337.  Without the capability (a developer's unprivileged run, where no redirect can
    exist either) the socket stays unmarked and one warning says so."""
    global _mark_refused
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, OWN_MARK)
    except OSError as exc:
        if not _mark_refused:
            _mark_refused = True
            log.warning("cannot mark the sidecar's sockets (SO_MARK: %s); redirect rules would capture them",
                        exc)


class RedirectError(ValueError):
    """Bad redirect arguments; raised before anything touches the kernel."""


@dataclass(frozen=True)
class RedirectConfig:
    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    dns_port: int = DNS_PORT
    admin_port: int = ADMIN_PORT
    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    mark: int = MARK
    dns_mark: int = DNS_MARK
    route_table: int = ROUTE_TABLE
    capture_inbound: bool = True
    capture_outbound: bool = True
    capture_dns: bool = True
    exclude_inbound_ports: tuple[int, ...] = field(default=())
    exclude_outbound_ports: tuple[int, ...] = field(default=())
    exclude_outbound_cidrs: tuple[str, ...] = field(default=())
    #: the L3/L4 filter for what the proxy does not carry (issue 16); off only for diagnosis
    l3: bool = True

    def __post_init__(self) -> None:
        for name in ("inbound_port", "outbound_port", "dns_port", "admin_port"):
            _check_port(getattr(self, name), name.replace("_", "-"))
        for p in self.exclude_inbound_ports + self.exclude_outbound_ports:
            _check_port(p, "excluded port")
        for c in self.exclude_outbound_cidrs:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as exc:
                raise RedirectError(f"malformed CIDR {c!r}: {exc}") from None
        for name in ("proxy_uid", "proxy_gid"):
            v = getattr(self, name)
            if not 0 <= v < 2**32:
                raise RedirectError(f"{name.replace('_', '-')} {v} out of range")
        if not 0 < self.route_table < 2**31:
            raise RedirectError(f"route-table {self.route_table} out of range")


def _check_port(p: int, what: str) -> None:
    if not isinstance(p, int) or not 1 <= p <= 65535:
        raise RedirectError(f"{what} {p!r} out of range 1-65535")


def parse_ports(value: str | None) -> tuple[int, ...]:
    """Comma-separated ports or ranges ("8080,9000-9010") as annotations carry them."""
    if not value:
        return ()
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if hi else a
        except ValueError:
            raise RedirectError(f"malformed port {part!r}") from None
        _check_port(a, "port")
        _check_port(b, "port")
        if b < a:
            raise RedirectError(f"malformed port range {part!r}")
        if b - a > 4096:
            raise RedirectError(f"port range {part!r} too large")
        out.extend(range(a, b + 1))
    return tuple(sorted(set(out)))


def parse_cidrs(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise RedirectError(f"malformed CIDR {part!r}") from None
    return tuple(out)


def _set(values: list[str]) -> str:
    return "{ " + ", ".join(values) + " }"


def render(cfg: RedirectConfig) -> str:
    """The complete nft -f transaction text (pure; `show --dry-run` prints it)."""
    m, dm, fm = f"0x{cfg.mark:x}", f"0x{cfg.dns_mark:x}", f"0x{FAILCLOSED_MARK:x}"
    own, xm = f"0x{OWN_MARK:x}", f"0x{EXCLUDED_CT_MARK:x}"
    in_excl = sorted({cfg.admin_port, *cfg.exclude_inbound_ports})
    out_excl = sorted(set(cfg.exclude_outbound_ports))
    v4 = [c for c in cfg.exclude_outbound_cidrs if ipaddress.ip_network(c).version == 4]
    v6 = [c for c in cfg.exclude_outbound_cidrs if ipaddress.ip_network(c).version == 6]
    L: list[str] = []
    a = L.append
    a(f"add table inet {TABLE}")
    a(f"flush table inet {TABLE}")
    a(f"table inet {TABLE} {{")
    # --- prerouting: inbound tproxy and the DNS reroute target
    a("  chain prerouting {")
    a("    type filter hook prerouting priority mangle; policy accept;")
    # packets of flows the sidecar already owns skip the rest - but never a pure SYN: this match
    # also finds a transparent socket in TIME_WAIT, and a SYN delivered to it without tproxy makes
    # the kernel look up a listener on the *original* destination (the application's), so a
    # client reusing its port would be refused (or handed to the app); through tproxy the
    # TIME_WAIT socket is retired and the SYN reaches the sidecar (tests/adversarial/test_tuple_reuse.py)
    a(f"    meta l4proto udp socket transparent 1 meta mark set {m} accept")
    a(f"    tcp flags & (fin | syn | rst | ack) != syn socket transparent 1 meta mark set {m} accept")
    if cfg.capture_dns:
        a(f'    iifname "lo" meta mark {dm} meta l4proto udp udp dport 53 '
          f"tproxy to :{cfg.dns_port} meta mark set {dm} accept")
    a('    iifname "lo" return')
    if cfg.capture_inbound:
        a("    fib daddr type != local return")
        # replies to the pod's own outbound connections (the sidecar's upstreams included)
        a("    ct direction reply return")
        a(f"    tcp dport {_set([str(p) for p in in_excl])} ct mark set {xm} return")
        a(f"    meta l4proto tcp tproxy to :{cfg.inbound_port} meta mark set {m} accept")
        a(f"    meta l4proto tcp meta mark set {fm}")
    a("  }")
    # --- input: fail closed when the tproxy found no listener (sidecar down)
    a("  chain input {")
    a("    type filter hook input priority filter; policy accept;")
    a(f"    meta mark {fm} reject with tcp reset")
    a("  }")
    if cfg.l3:
        L.extend(render_l3_base(cfg))
    # --- output route chain: replies of transparent flows, DNS reroute
    a("  chain output_route {")
    a("    type route hook output priority mangle; policy accept;")
    a(f"    meta mark {m} ct mark set mark accept")
    a(f"    ct mark {m} meta mark set ct mark accept")
    a(f"    meta mark {own} accept")
    if cfg.capture_dns:
        a('    oifname "lo" accept')
        if v4:
            a(f"    ip daddr {_set(v4)} accept")
        if v6:
            a(f"    ip6 daddr {_set(v6)} accept")
        a(f"    meta l4proto udp udp dport 53 meta mark set {dm} accept")
    a("  }")
    # --- output nat: outbound TCP redirect
    if cfg.capture_outbound:
        a("  chain output_nat {")
        a("    type nat hook output priority -100; policy accept;")
        a(f"    meta mark {{ {m}, {own} }} return")
        a('    oifname "lo" return')
        if v4:
            a(f"    ip daddr {_set(v4)} meta l4proto tcp ct mark set {xm}")
            a(f"    ip daddr {_set(v4)} return")
        if v6:
            a(f"    ip6 daddr {_set(v6)} meta l4proto tcp ct mark set {xm}")
            a(f"    ip6 daddr {_set(v6)} return")
        if out_excl:
            a(f"    tcp dport {_set([str(p) for p in out_excl])} ct mark set {xm} return")
        a(f"    meta l4proto tcp redirect to :{cfg.outbound_port}")
        a("  }")
    a("}")
    return "\n".join(L) + "\n"


#: chains the sidecar fills (firewall/datapath/l3rules.py); empty until it first syncs
L3_CHAINS = ("l3_in_pre", "l3_out_pre", "l3_in_policy", "l3_out_policy")
_ICMP_ALWAYS = "destination-unreachable, time-exceeded, parameter-problem"
_ICMPV6_ALWAYS = ("destination-unreachable, packet-too-big, time-exceeded, parameter-problem, "
                  "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, "
                  "mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report")


def render_l3_base(cfg: RedirectConfig) -> list[str]:
    """The fixed part of the L3/L4 filter: every packet that is not the proxy's business.

    Order (each chain, per direction):

    1. loopback passes; conntrack-invalid packets and SYN+FIN are dropped and logged - TCP the
       redirect cannot take never goes around the proxy;
    2. the sidecar's marked traffic (its own sockets, the transparent legs, the DNS reroute)
       and redirected TCP (``ct status dnat``: the proxy has it) pass;
    3. the ICMP a stack needs (errors incl. fragmentation-needed / packet-too-big, neighbour
       discovery, MLD) always passes;
    4. ``l3_*_pre`` (the sidecar's quarantine cut-off; empty otherwise);
    5. established/related packets pass (replies of allowed flows);
    6. TCP deliberately left alone by the redirect (ct mark ``0x53d``: excluded ports/CIDRs,
       the admin port) passes; any other TCP is dropped and logged;
    7. ``l3_*_policy``: the policy compiled by the sidecar (firewall/datapath/l3rules.py), which ends
       in a verdict; until the sidecar has filled it, the rule after it drops - fail closed,
       and the rules stay in the kernel if the sidecar dies.
    """
    m, dm, own, xm = (f"0x{v:x}" for v in (cfg.mark, cfg.dns_mark, OWN_MARK, EXCLUDED_CT_MARK))
    g = L3_LOG_GROUP
    out: list[str] = []
    for name in L3_CHAINS:
        out.append(f"  chain {name} {{")
        out.append("  }")
    for direction, hook, dev in (("in", "input", "iifname"), ("out", "output", "oifname")):
        out.append(f"  chain l3_{hook} {{")
        out.append(f"    type filter hook {hook} priority filter + 10; policy accept;")
        out.append(f'    {dev} "lo" accept')
        # conntrack marks a SYN that reuses a tuple still in FIN_WAIT/CLOSE_WAIT/LAST_ACK invalid
        # and relies on it passing (the SYN/ACK then reopens the entry): dropping it made
        # connects from a reused port time out. A pure SYN is therefore not dropped here; one the
        # redirect did not take is still dropped below ("tcp-not-redirected").
        for sel in ("meta l4proto != tcp", "tcp flags & (fin | syn | rst | ack) != syn"):
            out.append(f'    ct state invalid {sel} log group {g} snaplen 128 '
                       f'prefix "pl3|deny|1|{_DIR[direction]}|ct-invalid" drop')
        out.append(f'    tcp flags & (syn | fin) == syn | fin log group {g} snaplen 128 '
                   f'prefix "pl3|deny|1|{_DIR[direction]}|tcp-syn-fin" drop')
        out.append(f"    meta mark {{ {m}, {dm}, {own} }} accept")
        if direction == "out":
            out.append("    meta l4proto tcp ct status dnat accept")
        out.append(f"    icmp type {{ {_ICMP_ALWAYS} }} accept")
        out.append(f"    icmpv6 type {{ {_ICMPV6_ALWAYS} }} accept")
        out.append(f"    jump l3_{direction}_pre")
        out.append("    ct state established,related accept")
        out.append(f"    meta l4proto tcp ct mark {xm} accept")
        out.append(f'    meta l4proto tcp log group {g} snaplen 128 prefix "pl3|deny|1|{_DIR[direction]}|tcp-not-redirected" drop')
        out.append(f"    jump l3_{direction}_policy")
        out.append(f'    log group {g} snaplen 128 prefix "pl3|deny|1|{_DIR[direction]}|no-policy-yet" drop')
        out.append("  }")
    return out


_DIR = {"in": "ingress", "out": "egress"}


def render_remove() -> str:
    # "add" first makes delete idempotent: removing twice is not an error.
    return f"add table inet {TABLE}\ndelete table inet {TABLE}\n"


def _nft(text: str) -> None:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    proc = subprocess.run([nft, "-f", "-"], input=text, text=True, capture_output=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()
        raise RuntimeError("nft failed: " + (msg[0] if msg else f"exit {proc.returncode}"))


def _routing(cfg: RedirectConfig, add: bool) -> None:
    """Policy routing via netlink (pyroute2): fwmark rules + local default routes."""
    import errno

    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        if add:
            ipr.link("set", index=lo, state="up")  # IPv6 local routes need lo up
        for family, dst in ((2, "0.0.0.0/0"), (10, "::/0")):
            for i, mark in enumerate((cfg.mark, cfg.dns_mark)):
                kw = dict(family=family, fwmark=mark, fwmask=0xFFFFFFFF, table=cfg.route_table,
                          priority=RULE_PRIORITY + i)
                try:
                    ipr.rule("add" if add else "del", **kw)
                except NetlinkError as e:
                    if e.code not in (errno.EEXIST, errno.ENOENT, errno.EAFNOSUPPORT):
                        raise
            try:
                ipr.route("replace" if add else "del", dst=dst, type="local", oif=lo,
                          table=cfg.route_table, family=family, scope=254 if family == 2 else 0)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT, errno.EEXIST):
                    raise


def _sysctls(cfg: RedirectConfig) -> None:
    """Per-namespace sysctls of the pod.

    * loose reverse-path filtering: the transparent upstream SYN arrives on lo from the
      client's address, which strict rp_filter would drop as a martian;
    * with DNS capture, ``ip_unprivileged_port_start=0`` (what containerd and Docker set in
      containers anyway): the sidecar (UID 1337, no CAP_NET_BIND_SERVICE) answers the
      application from the resolver's address, port 53, through a transparent socket;
    * ``tcp_tw_reuse=1``: the sidecar's upstream legs keep the client's address and take
      their ports from ``upstream_ports``; the sidecar closes them first when the client
      does, so they end in TIME_WAIT, and a busy client would exhaust the range within the
      60 s TIME_WAIT lasts.  With timestamps on, reusing a TIME_WAIT 4-tuple older than 1 s
      is safe (it is also what the application's own outbound connections then get).
    Best effort: where /proc/sys is read-only (Kubernetes containers) the node defaults stay.
    """
    values = [("/proc/sys/net/ipv4/conf/all/rp_filter", "0"), ("/proc/sys/net/ipv4/conf/lo/rp_filter", "0"),
              ("/proc/sys/net/ipv4/tcp_tw_reuse", "1")]
    if cfg.capture_dns:
        values.append(("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"))
    for path, value in values:
        try:
            with open(path, "w") as fh:
                fh.write(value)
        except OSError:
            pass


def apply(cfg: RedirectConfig) -> None:
    _sysctls(cfg)
    _routing(cfg, add=True)
    _nft(render(cfg))


def remove(cfg: RedirectConfig) -> None:
    _nft(render_remove())
    _routing(cfg, add=False)


def show_kernel() -> str:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    proc = subprocess.run([nft, "list", "table", "inet", TABLE], capture_output=True, text=True)
    if proc.returncode != 0:
        return "(no palisade table installed)\n"
    return proc.stdout


# ---------------------------------------------------------------- CLI
def _config_from_args(args: argparse.Namespace) -> RedirectConfig:
    return RedirectConfig(
        inbound_port=args.inbound_port,
        outbound_port=args.outbound_port,
        dns_port=args.dns_port,
        admin_port=args.admin_port,
        proxy_uid=args.proxy_uid,
        proxy_gid=args.proxy_gid,
        route_table=args.route_table,
        capture_inbound=not args.no_inbound,
        capture_outbound=not args.no_outbound,
        capture_dns=not args.no_dns,
        exclude_inbound_ports=parse_ports(args.exclude_inbound_ports),
        exclude_outbound_ports=parse_ports(args.exclude_outbound_ports),
        exclude_outbound_cidrs=parse_cidrs(args.exclude_outbound_cidrs),
        l3=not args.no_l3,
    )


def _cmd(args: argparse.Namespace) -> int:
    try:
        cfg = _config_from_args(args)
    except RedirectError as exc:
        print(f"palisade redirect: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "show":
            sys.stdout.write(render(cfg) if args.dry_run else show_kernel())
        elif args.action == "apply":
            if args.dry_run:
                sys.stdout.write(render(cfg))
            else:
                apply(cfg)
                print(f"palisade redirect: applied table inet {TABLE} "
                      f"(inbound :{cfg.inbound_port}, outbound :{cfg.outbound_port}, dns :{cfg.dns_port})")
        elif args.action == "remove":
            if args.dry_run:
                sys.stdout.write(render_remove())
            else:
                remove(cfg)
                print(f"palisade redirect: removed table inet {TABLE}")
    except Exception as exc:  # noqa: BLE001 - one line for the init container's log, no traceback
        print(f"palisade redirect: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "redirect",
        help="install, remove or show the pod's nftables steering rules",
        description="Steer the pod's TCP (and DNS) through the sidecar with nftables TPROXY/REDIRECT "
        "and policy routing. Run by the palisade-init container (needs NET_ADMIN).",
        epilog="examples:\n  python -m firewall redirect show --dry-run\n"
        "  python -m firewall redirect apply --exclude-inbound-ports 8080 --exclude-outbound-cidrs 169.254.169.254/32\n"
        "  python -m firewall redirect remove",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["apply", "remove", "show"])
    p.add_argument("--dry-run", action="store_true", help="print the nft transaction; change nothing")
    p.add_argument("--inbound-port", type=int, default=INBOUND_PORT)
    p.add_argument("--outbound-port", type=int, default=OUTBOUND_PORT)
    p.add_argument("--dns-port", type=int, default=DNS_PORT)
    p.add_argument("--admin-port", type=int, default=ADMIN_PORT, help="never redirected (metrics/health)")
    p.add_argument("--proxy-uid", type=int, default=PROXY_UID,
                   help="accepted for compatibility; the proxy's traffic is exempt by its SO_MARK, not its user")
    p.add_argument("--proxy-gid", type=int, default=PROXY_GID,
                   help="accepted for compatibility (see --proxy-uid)")
    p.add_argument("--route-table", type=int, default=ROUTE_TABLE)
    p.add_argument("--exclude-inbound-ports", default="", help="comma list of ports/ranges")
    p.add_argument("--exclude-outbound-ports", default="", help="comma list of ports/ranges")
    p.add_argument("--exclude-outbound-cidrs", default="", help="comma list of CIDRs")
    p.add_argument("--no-inbound", action="store_true", help="do not capture inbound TCP")
    p.add_argument("--no-outbound", action="store_true", help="do not capture outbound TCP")
    p.add_argument("--no-dns", action="store_true", help="do not capture outbound DNS over UDP")
    p.add_argument("--no-l3", action="store_true",
                   help="diagnosis only: no L3/L4 filter for non-TCP traffic (the pod is then NOT segmented "
                   "for UDP, ICMP and other protocols)")
    p.set_defaults(func=_cmd)
