"""An L4 verdict cache for the fast path: one dict lookup instead of ``Session.open``'s four
policy-engine calls for a peer/port the sidecar has already decided (issue 22, requirement 5).

What is cached is not a verdict of its own but the outcome of a real ``Session.open``: the
session fields ``open`` sets (``OPEN_FIELDS``), captured after an uncached ``open`` and copied
onto the next session with the same key.  Only *silent allows* are kept - the flow was allowed,
``open`` raised no alert and started no capture, no L7 identifier (``insp.l7`` off) - so every
denial, alert and capture still runs the engine for every connection (their side effects are
per connection).

Key: (direction, the peer's resolved Identity, destination port, protocol, and for outbound
flows the FQDN names learned for the destination, read per connection: reading them is what
expires them).  The peer Identity
is resolved per connection by ``Session.__init__`` (not cached here), so a pod IP moving to
another workload changes the key at once.  Everything else a decision depends on is checked on
every lookup as a *state* tuple - the ``Inspection`` object itself (a policy, identity, DLP or
annotation reload builds a new one: app.py ``_swap``), its live ``quarantined`` and
``mode_override`` fields, and the FQDN cache's ``generation`` (bumped by every learned or
expired name) - and any change empties the cache before the lookup.  Nothing has to remember
to bump a generation: the state is read, not announced.

Bounded: at most ``max_entries`` keys; a full cache is emptied (distinct peers cost at most
that many small entries, and a scan of many addresses only makes it miss)."""

from __future__ import annotations

from typing import Any

from firewall.datapath.session import Session

#: the Session fields ``Session.open`` decides; tests/unit/test_verdict_cache.py checks that a
#: cached session equals an opened one in *every* slot, so a new field in ``open`` fails there
OPEN_FIELDS = ("flowinfo", "mode", "rule", "_enforced", "verdict", "close_reason", "_dlp_actions",
               "_governed", "_hold", "_digit_hold", "_on_error", "passthrough")
MAX_ENTRIES = 4096


def _fqdn(insp: Any) -> Any:
    """The FQDN cache the engine reads (the policy's own, else the inspection's)."""
    fqdn = getattr(insp.policy, "fqdn", None)
    return fqdn if fqdn is not None else insp.fqdn


class VerdictCache:
    """Per-proxy cache of silent-allow ``Session.open`` outcomes (see the module docstring)."""

    __slots__ = ("max_entries", "_entries", "_state", "hits", "misses")

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, tuple] = {}
        self._state: tuple = ()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def state(insp: Any) -> tuple:
        """What a decision depends on besides the key; compared by identity/value per lookup."""
        fqdn = _fqdn(insp)
        return (insp, insp.quarantined, insp.mode_override, fqdn.generation if fqdn is not None else -1)

    def open(self, session: Session) -> bool:
        """``session.open()``, answered from the cache when an identical silent allow was seen."""
        insp = session.insp
        if insp.l7 or insp.policy is None:
            return session.open()  # an L7 identifier is per flow; no policy: nothing to save
        names: frozenset[str] | None = None
        fqdn = _fqdn(insp)
        if session.direction == "outbound" and fqdn is not None:
            # read per connection: names_for drops expired names (and bumps the generation), so
            # an address whose learned name ran out of TTL is decided again, never kept allowed
            names = frozenset(fqdn.names_for(session.dest_ip))
        state = self.state(insp)
        if state != self._state:
            self._entries.clear()
            self._state = state
        key = (session.direction, session.peer, session.dest_port, session.proto, names)
        try:
            hit = self._entries.get(key)
        except TypeError:  # an unhashable identity (labels as a dict): decide uncached
            return session.open()
        if hit is not None:
            self.hits += 1
            for name, value in zip(OPEN_FIELDS, hit, strict=True):
                setattr(session, name, value)
            session._dlp_actions = list(session._dlp_actions)  # per-session list, as open() makes
            return True
        self.misses += 1
        allowed = session.open()
        if (allowed and session._alerts == 0 and not session._capture_done and session._ident is None
                and session.verdict == "allow"):
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = tuple(getattr(session, name) for name in OPEN_FIELDS)
        return allowed
