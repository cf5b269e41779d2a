"""IP -> DNS names, learned from the pod's own DNS answers, for ``fqdn`` egress peers.

Only answers the pod itself asked for are trusted (``Session._learn_dns`` decides,
docs/policy.md "How FQDN peers are learned"): an outbound flow that is not
denied, the server-to-client direction, the ID and question of a query that flow
forwarded, addresses only for the asked name or a CNAME chain from it inside the
same answer.  So ``fqdn: "*.card-network.example"`` allows exactly the addresses
the application's resolver returned for names it looked up.

Entries expire with the answer's TTL, clamped to ``[min_ttl, max_ttl]``: never
sooner than ``min_ttl`` (applications cache answers longer than the TTL - JVM,
connection pools - and a connection opened a moment after expiry must not be
denied), never later than ``max_ttl`` (a huge TTL must not keep an address
allowed for days).  The cache is bounded three ways, oldest first: total entries,
addresses per name (a name answering with thousands of addresses cannot flood
it) and names per address.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable


def fqdn_matches(pattern: str, name: str) -> bool:
    """``*.example`` matches one or more labels under example (not example itself); else exact."""
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example"
        return name.endswith(suffix) and len(name) > len(suffix)
    return name == pattern


def normalize_name(qname: str) -> str:
    return qname.strip().lower().rstrip(".")


class FqdnCache:
    """Thread-safe, bounded ``ip -> {name: expiry}`` map with a TTL floor and ceiling."""

    def __init__(self, max_entries: int = 65536, min_ttl: int = 60, max_ttl: int = 3600,
                 clock: Callable[[], float] = time.monotonic, max_per_name: int = 64,
                 max_per_ip: int = 64) -> None:
        self.max_entries = max_entries
        self.max_ttl = max(1, max_ttl)
        self.min_ttl = min(min_ttl, self.max_ttl)
        self.max_per_name = max_per_name
        self.max_per_ip = max_per_ip
        self._clock = clock
        self._lock = threading.Lock()
        self._by_ip: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._by_name: dict[str, OrderedDict[str, None]] = {}
        self._size = 0
        self._resolvers: tuple = ()
        self.generation = 0  # bumped on every change (callers may key caches on it)

    #: server ports whose answers may teach the cache: DNS, not DNS-shaped bytes on any port
    dns_ports: frozenset[int] = frozenset({53})

    def __len__(self) -> int:
        return self._size

    def set_resolvers(self, resolvers: Iterable[str]) -> None:
        """Only answers from these servers (addresses or CIDRs) teach the cache; empty: any
        server on port 53 the policy lets the pod query."""
        import ipaddress

        self._resolvers = tuple(ipaddress.ip_network(r, strict=False) for r in resolvers)

    def trusts(self, server_ip: str, server_port: int) -> bool:
        """Whether an answer from ``server_ip:server_port`` may teach the cache."""
        if int(server_port) not in self.dns_ports:
            return False
        nets = self._resolvers
        if not nets:
            return True
        import ipaddress

        try:
            ip = ipaddress.ip_address(server_ip)
        except ValueError:
            return False
        return any(ip in n for n in nets)

    def learn(self, qname: str, addresses: Iterable[str], ttl: int) -> None:
        """Record a DNS answer: ``qname`` resolved to ``addresses`` for ``ttl`` seconds."""
        name = normalize_name(qname)
        if not name:
            return
        expiry = self._clock() + min(max(int(ttl), self.min_ttl), self.max_ttl)
        with self._lock:
            ips = self._by_name.setdefault(name, OrderedDict())
            for ip in list(addresses)[: self.max_per_name]:
                names = self._by_ip.get(ip)
                if names is None:
                    names = self._by_ip[ip] = {}
                else:
                    self._by_ip.move_to_end(ip)
                if name not in names:
                    self._size += 1
                    if len(names) >= self.max_per_ip:  # drop the entry expiring first
                        self._forget(ip, min(names, key=names.__getitem__))
                names[name] = max(expiry, names.get(name, 0.0))
                ips[ip] = None
                ips.move_to_end(ip)
            while len(ips) > self.max_per_name:
                self._forget(next(iter(ips)), name)
            self.generation += 1
            while self._size > self.max_entries and self._by_ip:
                ip, dropped = next(iter(self._by_ip.items()))
                for n in list(dropped):
                    self._forget(ip, n)

    def _forget(self, ip: str, name: str) -> None:
        """Remove one (ip, name) entry from both indexes (lock held)."""
        names = self._by_ip.get(ip)
        if names is not None and name in names:
            del names[name]
            self._size -= 1
            if not names:
                del self._by_ip[ip]
        ips = self._by_name.get(name)
        if ips is not None:
            ips.pop(ip, None)
            if not ips:
                del self._by_name[name]

    def names_for(self, ip: str) -> set[str]:
        """Names currently mapped to ``ip`` (expired ones are dropped on the way)."""
        with self._lock:
            names = self._by_ip.get(ip)
            if not names:
                return set()
            now = self._clock()
            expired = [n for n, exp in names.items() if exp <= now]
            for n in expired:
                self._forget(ip, n)
            if expired:
                self.generation += 1
            names = self._by_ip.get(ip)
            return set(names) if names else set()

    def addresses_for(self, name: str) -> set[str]:
        """Addresses currently learned for ``name`` (tests, ``policy explain``)."""
        with self._lock:
            return set(self._by_name.get(normalize_name(name), ()))

    def matches(self, ip: str, pattern: str) -> bool:
        return any(fqdn_matches(pattern, n) for n in self.names_for(ip))
