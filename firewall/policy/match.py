"""Compiled matchers: peers and L7 conditions turned into small, allocation-free checks.

The engine (``engine.py``) never looks at the policy records (``model.py``) on the hot path;
it works on these frozen, slotted records built once per policy load.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import firewall.protocols  # noqa: F401 - registers every parser's field set in SCHEMAS
from firewall.identity.fqdn import fqdn_matches
from firewall.identity.identity import Identity
from firewall.policy.model import DnsMatch, HttpMatch, Peer, RedisMatch, SqlMatch, TlsMatch
from firewall.protocols.base import SCHEMAS, L7Event

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=65536)
def parse_ip(ip: str) -> IPAddr | None:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class PeerMatcher:
    namespace: str | None
    labels: frozenset[tuple[str, str]] | None
    scope: str | None
    network: IPNet | None
    fqdn: str | None

    @staticmethod
    def build(peer: Peer) -> PeerMatcher:
        return PeerMatcher(
            peer.namespace,
            frozenset(peer.labels.items()) if peer.labels is not None else None,
            peer.scope,
            ipaddress.ip_network(peer.cidr, strict=False) if peer.cidr else None,
            peer.fqdn,
        )

    def matches(self, peer: Identity, labels: frozenset[tuple[str, str]],
                names: frozenset[str] | None) -> bool:
        if self.fqdn is not None:
            return bool(names) and any(fqdn_matches(self.fqdn, n) for n in names)  # type: ignore[union-attr]
        if self.namespace is not None and peer.namespace != self.namespace:
            return False  # world has no namespace
        if self.labels is not None and (peer.is_world or not self.labels <= labels):
            return False
        if self.scope is not None and peer.scope != self.scope:
            return False  # world.scope is "out-of-scope"
        if self.network is not None:
            addr = parse_ip(peer.ip)
            if addr is None or addr.version != self.network.version or addr not in self.network:
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self.namespace is not None:
            parts.append(f"namespace={self.namespace}")
        if self.labels is not None:
            parts.append("labels={" + ",".join(f"{k}={v}" for k, v in sorted(self.labels)) + "}")
        if self.scope is not None:
            parts.append(f"scope={self.scope}")
        if self.network is not None:
            parts.append(f"cidr={self.network}")
        if self.fqdn is not None:
            parts.append(f"fqdn={self.fqdn}")
        return " ".join(parts)


# --- L7 -------------------------------------------------------------------------------------

#: every (apps, kind, field) a matcher reads; checked against the parsers' declared field sets
READS: list[tuple[tuple[str, ...], str, str]] = []


def field_name(apps: tuple[str, ...], kind: str, name: str) -> str:
    """The name of a field the matchers read, checked at import against ``SCHEMAS``: a matcher
    cannot read a field no parser of ``apps`` writes for ``kind`` (issue 15: tls.minVersion
    read ``supported_versions``/``versions``, the parser writes ``offered_versions``, so the
    README's ``minVersion: "1.2"`` rule denied TLS 1.3 too)."""
    for app in apps:
        if name not in SCHEMAS.get((app, kind), frozenset()):
            raise RuntimeError(f"matcher reads {app}/{kind}.{name}, which no parser writes")
    READS.append((apps, kind, name))
    return name


_HTTP_FAMILY = ("http", "http2", "grpc")
_TLS_CARRIERS = ("tls", "pgsql", "mysql")  # TLS hellos also arrive inside a pgsql/mysql switch
F_METHOD = field_name(_HTTP_FAMILY, "request", "method")
F_PATH = field_name(_HTTP_FAMILY, "request", "path")
F_HOST = field_name(("http",), "request", "host")
F_AUTHORITY = field_name(("http2", "grpc"), "request", "authority")
F_SNI = field_name(_TLS_CARRIERS, "hello", "sni")
F_OFFERED = field_name(_TLS_CARRIERS, "hello", "offered_versions")
F_NEGOTIATED = field_name(_TLS_CARRIERS, "server_hello", "version")
F_QNAME = field_name(("dns",), "query", "qname")
F_REDIS_COMMAND = field_name(("redis",), "command", "command")
F_VERB = field_name(("pgsql", "mysql"), "statement", "verb")
F_VERBS = field_name(("pgsql", "mysql"), "statement", "verbs")
F_VERBS_COMPLETE = field_name(("pgsql", "mysql"), "statement", "verbs_complete")

_UNRESERVED_PCT = re.compile(r"%(2[DdEe]|3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|5[Ff]|7[Ee])")


def normalize_path(raw: Any) -> str:
    """Request target -> normalised path, so ``/v1/charge/../admin`` cannot dodge a prefix.

    Drops scheme/authority (absolute-form), query and fragment, decodes percent-escaped
    unreserved characters, collapses ``//`` and resolves ``.``/``..`` segments.
    """
    path = str(raw or "/")
    if "://" in path.split("?", 1)[0]:
        rest = path.split("://", 1)[1]
        path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    path = path.split("?", 1)[0].split("#", 1)[0]
    path = _UNRESERVED_PCT.sub(lambda m: chr(int(m.group(1), 16)), path)
    out: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = path.endswith("/") and out
    return "/" + "/".join(out) + ("/" if trailing else "")


def path_has_prefix(path: str, prefix: str) -> bool:
    """Segment-aware: /v1/charge matches /v1/charge and /v1/charge/x but not /v1/charges."""
    if prefix == "/" or prefix.endswith("/"):
        return path.startswith(prefix) or path + "/" == prefix
    return path == prefix or path.startswith(prefix + "/")


def host_matches(pattern: str, host: Any) -> bool:
    if not host:
        return False
    h = str(host).strip().lower()
    if h.startswith("["):
        h = h[1:].split("]", 1)[0]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return fqdn_matches(pattern, h)


_TLS_RANK = {"0.3": 0, "1.0": 1, "1.1": 2, "1.2": 3, "1.3": 4}
#: what the TLS parser writes (tls.version_name) -> rank; SSL 2.0 ranks below everything
_TLS_NAMES = {"ssl2": -1, "ssl3": 0, **_TLS_RANK}
_TLS_NUM = {0x0300: 0, 0x0301: 1, 0x0302: 2, 0x0303: 3, 0x0304: 4}


def tls_rank(value: Any) -> int | None:
    """0x0303, "TLSv1.2", "TLS 1.2", "1.2" -> 3; SSLv3 -> 0; unknown -> None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return _TLS_NUM.get(value)
    if value in _TLS_NAMES:
        return _TLS_NAMES[value]
    s = str(value).strip().lower().replace("tlsv", "").replace("tls", "").replace("_", ".").strip(" v")
    if s in ("ssl3", "sslv3", "ssl 3", "ssl3.0"):
        return 0
    if s.startswith("0x"):
        try:
            return _TLS_NUM.get(int(s, 16))
        except ValueError:
            return None
    return _TLS_RANK.get(s)


def _offered_max(fields: dict[str, Any]) -> int | None:
    """The best version a ClientHello offers (``offered_versions``: supported_versions
    without GREASE, else the legacy version); None when it names none we know."""
    vals = fields.get(F_OFFERED)
    if not isinstance(vals, list | tuple):
        return None
    ranks = [r for r in (tls_rank(v) for v in vals) if r is not None]
    return max(ranks) if ranks else None


@dataclass(frozen=True, slots=True)
class L7Matcher:
    """One rule's L7 condition.  ``check`` -> True/False, or None when the event says nothing about it."""

    section: str
    http: tuple[tuple[frozenset[str] | None, str | None, str | None], ...] = ()
    sni: tuple[str, ...] | None = None
    min_rank: int | None = None
    suffixes: tuple[str, ...] = ()
    tokens: frozenset[str] = frozenset()

    @staticmethod
    def build(section: str, spec: Any) -> L7Matcher:
        if section == "http":
            entries: list[HttpMatch] = spec
            return L7Matcher("http", http=tuple(
                (frozenset(e.methods) if e.methods else None,
                 normalize_path(e.path_prefix) if e.path_prefix else None, e.host) for e in entries))
        if section == "tls":
            t: TlsMatch = spec
            return L7Matcher("tls", sni=tuple(t.sni) if t.sni else None,
                             min_rank=_TLS_RANK[t.min_version] if t.min_version else None)
        if section == "dns":
            d: DnsMatch = spec
            return L7Matcher("dns", suffixes=tuple(d.qname_suffix))
        if section == "redis":
            r: RedisMatch = spec
            return L7Matcher("redis", tokens=frozenset(r.commands))
        s: SqlMatch = spec
        return L7Matcher("sql", tokens=frozenset(s.verbs))

    def check(self, event: L7Event) -> bool | None:
        f = event.fields
        sec = self.section
        if sec == "http":
            if event.kind != "request":
                return None
            method = str(f.get(F_METHOD) or "").upper()
            path = normalize_path(f.get(F_PATH))
            host = f.get(F_HOST) or f.get(F_AUTHORITY)
            for methods, prefix, hpat in self.http:
                if methods is not None and method not in methods:
                    continue
                if prefix is not None and not path_has_prefix(path, prefix):
                    continue
                if hpat is not None and not host_matches(hpat, host):
                    continue
                return True
            return False
        if sec == "tls":
            if event.kind == "hello":
                if self.sni is not None:
                    sni = str(f.get(F_SNI) or "").lower().rstrip(".")
                    if not sni or not any(fqdn_matches(p, sni) for p in self.sni):
                        return False
                if self.min_rank is not None:
                    offered = _offered_max(f)
                    if offered is None or offered < self.min_rank:
                        return False
                return True
            if event.kind == "server_hello":
                if self.min_rank is None:
                    return None
                negotiated = tls_rank(f.get(F_NEGOTIATED))
                return negotiated is not None and negotiated >= self.min_rank
            return None
        if sec == "dns":
            if event.kind != "query":
                return None
            q = str(f.get(F_QNAME) or "").lower().rstrip(".")
            return any(q == s or q.endswith("." + s) for s in self.suffixes)
        if sec == "redis":
            if event.kind != "command":
                return None
            return str(f.get(F_REDIS_COMMAND) or "").upper() in self.tokens
        if event.kind != "statement":
            return None
        if f.get(F_VERBS_COMPLETE) is False:
            return False  # statements the parser could not list: no verbs rule can allow them
        verb = f.get(F_VERB)
        if not verb:
            return None
        # every statement of a simple Query must be allowed: "SELECT 1; DELETE FROM t"
        verbs = f.get(F_VERBS) or [verb]
        return all(str(v).upper() in self.tokens for v in verbs)

    def describe(self) -> str:
        if self.section == "http":
            parts = []
            for methods, prefix, host in self.http:
                bits = []
                if methods:
                    bits.append("|".join(sorted(methods)))
                if prefix:
                    bits.append(prefix + "*")
                if host:
                    bits.append(f"host={host}")
                parts.append(" ".join(bits) or "any request")
            return "http " + " or ".join(parts)
        if self.section == "tls":
            bits = []
            if self.sni:
                bits.append("sni=" + ",".join(self.sni))
            if self.min_rank is not None:
                bits.append("minVersion=" + next(k for k, v in _TLS_RANK.items() if v == self.min_rank))
            return "tls " + " ".join(bits)
        if self.section == "dns":
            return "dns qname suffix " + ",".join(self.suffixes)
        return f"{self.section} " + ",".join(sorted(self.tokens))
