"""IP -> DNS names, learned from the pod's own DNS answers, for ``fqdn`` egress peers.

Only answers the pod itself received are trusted: a name maps to the addresses
its resolver returned, so ``fqdn: "*.card-network.example"`` allows exactly the
addresses the application was told to use.  Entries expire with the answer's
TTL, but never sooner than ``min_ttl``: applications cache answers longer than
the TTL (JVM, connection pools) and a connection opened a moment after expiry
must not be denied.  The cache is bounded (oldest entries evicted first) so a
pod resolving millions of names cannot exhaust the sidecar's memory.
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

    def __init__(self, max_entries: int = 65536, min_ttl: int = 60, max_ttl: int = 86400,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._by_ip: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._size = 0
        self.generation = 0  # bumped on every change (callers may key caches on it)

    def __len__(self) -> int:
        return self._size

    def learn(self, qname: str, addresses: Iterable[str], ttl: int) -> None:
        """Record a DNS answer: ``qname`` resolved to ``addresses`` for ``ttl`` seconds."""
        name = normalize_name(qname)
        if not name:
            return
        expiry = self._clock() + min(max(int(ttl), self.min_ttl), self.max_ttl)
        with self._lock:
            for ip in addresses:
                names = self._by_ip.get(ip)
                if names is None:
                    names = self._by_ip[ip] = {}
                else:
                    self._by_ip.move_to_end(ip)
                if name not in names:
                    self._size += 1
                names[name] = max(expiry, names.get(name, 0.0))
            self.generation += 1
            while self._size > self.max_entries and self._by_ip:
                _, dropped = self._by_ip.popitem(last=False)
                self._size -= len(dropped)

    def names_for(self, ip: str) -> set[str]:
        """Names currently mapped to ``ip`` (expired ones are dropped on the way)."""
        with self._lock:
            names = self._by_ip.get(ip)
            if not names:
                return set()
            now = self._clock()
            expired = [n for n, exp in names.items() if exp <= now]
            for n in expired:
                del names[n]
            self._size -= len(expired)
            if expired:
                self.generation += 1
            if not names:
                del self._by_ip[ip]
                return set()
            return set(names)

    def matches(self, ip: str, pattern: str) -> bool:
        return any(fqdn_matches(pattern, n) for n in self.names_for(ip))
