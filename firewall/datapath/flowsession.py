"""The sans-IO state of one relayed TCP flow: events in, typed commands out.

``session.Session`` inspects bytes (identification, parsing, policy, DLP); this module owns
everything else a flow remembers between socket callbacks - the early bytes before the
upstream connects, the one DLP scan in flight per direction and the chunks queued behind it,
a FIN waiting behind that scan, the hold timer of an incomplete head, why reading is paused,
and the wish to hand the flow to the kernel (splice).  ``proxy.Flow`` only turns socket
callbacks into events and executes the commands that come back, so every ordering rule here
(a FIN never overtakes the bytes before it, a queued chunk is never lost, a reload cannot
cut an allowed flow short) is testable without a socket: tests/unit/test_session_playbook.py.

Sides are numbered like directions: ``CLIENT == TOSERVER == 0`` (the side whose reads travel
to the server), ``SERVER == TOCLIENT == 1``.  Bytes read from side ``x`` are sent to ``1 - x``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from firewall.datapath.session import Inspection, Session, Stop
from firewall.observe import metrics
from firewall.protocols.base import TOCLIENT, TOSERVER

CLIENT = TOSERVER
SERVER = TOCLIENT
#: timer kinds (one timer of each kind at most per flow)
HOLD = "hold"
SPLICE = "splice"
#: ``splice_tries`` once a flow has given up on the hand-over (never asked again)
SPLICE_NEVER = 10**6
#: deferred hand-over attempts (write buffers not yet empty) before the flow stays in Python
SPLICE_MAX_TRIES = 2000
#: re-check interval while waiting for the write buffers to empty before the hand-over
SPLICE_RETRY = 0.002


# ---------------------------------------------------------------------------- commands
@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to ``side``."""

    side: int
    data: bytes


@dataclass(frozen=True, slots=True)
class HalfClose:
    """Pass a FIN on: ``write_eof`` on ``side``."""

    side: int


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``side`` (``None``: both sides), with RST when ``reset``."""

    side: int | None
    reset: bool


@dataclass(frozen=True, slots=True)
class PauseReading:
    side: int


@dataclass(frozen=True, slots=True)
class ResumeReading:
    side: int


@dataclass(frozen=True, slots=True)
class StartScan:
    """Run the DLP scan of ``data`` (read from ``side``) off the event loop; answer ``ScanDone``."""

    side: int
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Fire ``TimerFired(kind)`` after ``delay`` seconds (replaces a pending timer of that kind)."""

    kind: str
    delay: float


@dataclass(frozen=True, slots=True)
class Splice:
    """Hand both sockets to the kernel relay if both write buffers are empty; answer with
    ``SpliceDeferred`` (buffers not empty), ``SpliceFailed`` or ``Spliced``."""


Command = Send | HalfClose | Close | PauseReading | ResumeReading | StartScan | SetTimer | Splice


# ---------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class Connected:
    """The upstream connection is made (the server side exists from now on)."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    side: int
    data: bytes


@dataclass(frozen=True, slots=True)
class EofReceived:
    side: int


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    side: int
    error: bool = False


@dataclass(frozen=True, slots=True)
class ScanDone:
    side: int
    findings: list | None = None
    error: bool = False


@dataclass(frozen=True, slots=True)
class TimerFired:
    kind: str


@dataclass(frozen=True, slots=True)
class Reloaded:
    insp: Inspection
    reason: str = "reload"


@dataclass(frozen=True, slots=True)
class WriterPaused:
    """``side``'s write buffer passed its high-water mark."""

    side: int


@dataclass(frozen=True, slots=True)
class WriterResumed:
    side: int


@dataclass(frozen=True, slots=True)
class SpliceDeferred:
    pass


@dataclass(frozen=True, slots=True)
class SpliceFailed:
    pass


@dataclass(frozen=True, slots=True)
class Spliced:
    pass


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """The proxy ends the flow (idle sweep, drain, connect failure, quarantine)."""

    reset: bool = True


Event = (Connected | DataReceived | EofReceived | ConnectionLost | ScanDone | TimerFired | Reloaded
         | WriterPaused | WriterResumed | SpliceDeferred | SpliceFailed | Spliced | CloseRequested)


@dataclass(frozen=True, slots=True)
class Limits:
    """The configuration a flow's decisions read (from ``sidecar.config.Config``)."""

    read_buffer_limit: int = 1 << 20
    offload_bytes: int = 65536
    identify_timeout: float = 1.0
    header_timeout: float = 10.0
    splice: bool = False


class FlowSession:
    """All per-flow relay state of one TCP flow around its inspection ``Session``."""

    __slots__ = ("session", "limits", "clock", "connected", "closed", "early", "early_len", "eof",
                 "eof_pending", "gone", "fast", "scanning", "inflight", "queued", "replaying",
                 "hold_since", "hold_dir", "hold_armed", "want_splice", "splice_tries", "spliced", "lingering",
                 "pause_why", "born", "last_data")

    def __init__(self, session: Session, limits: Limits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.limits = limits
        self.clock = clock
        self.connected = False
        self.closed = False  # nothing more is relayed
        self.lingering = False  # ... but a refusal's answer is still being delivered
        self.early: list[bytes] = []
        self.early_len = 0
        self.eof = [False, False]  # a FIN was read from this side
        self.eof_pending = [False, False]  # ... and waits behind a scan / queued chunks
        self.gone = [False, False]  # the side's connection is lost
        self.fast = False  # passthrough: bytes go out unread
        self.scanning = [False, False]  # a DLP scan of this side's bytes runs off the loop
        self.inflight: list[bytes | None] = [None, None]  # the chunk that scan is about
        self.queued: list[list[bytes]] = [[], []]  # chunks read while it runs, in order
        self.replaying = False  # the early bytes are being replayed (no hand-over meanwhile)
        self.hold_since = 0.0  # when the bytes now held started to be held (header deadline)
        self.hold_dir = TOSERVER
        self.hold_armed = False
        self.want_splice = False
        self.splice_tries = 0
        self.spliced = False
        self.pause_why: list[set[str]] = [set(), set()]  # why reading of a side is paused
        self.born = clock()
        self.last_data = self.born

    # ------------------------------------------------------------------ dispatch
    def handle(self, ev: Event) -> list[Command]:
        """One event in, the commands it causes out (the proxy calls the methods directly)."""
        if isinstance(ev, DataReceived):
            return self.data(ev.side, ev.data)
        if isinstance(ev, EofReceived):
            return self.eof_received(ev.side)
        if isinstance(ev, ScanDone):
            return self.scan_done(ev.side, ev.findings, ev.error)
        if isinstance(ev, TimerFired):
            return self.timer_fired(ev.kind)
        if isinstance(ev, Connected):
            return self.connected_upstream()
        if isinstance(ev, ConnectionLost):
            return self.lost(ev.side, ev.error)
        if isinstance(ev, Reloaded):
            return self.reloaded(ev.insp, ev.reason)
        if isinstance(ev, WriterPaused):
            return self.pause(1 - ev.side, "backpressure")
        if isinstance(ev, WriterResumed):
            return self.unpause(1 - ev.side, "backpressure")
        if isinstance(ev, SpliceDeferred):
            return self.splice_deferred()
        if isinstance(ev, SpliceFailed):
            return self.cancel_splice()
        if isinstance(ev, Spliced):
            self.spliced = True
            return []
        if isinstance(ev, CloseRequested):
            return self.close(ev.reset)
        raise TypeError(f"not a flow event: {ev!r}")

    @property
    def paused(self) -> tuple[bool, bool]:
        return bool(self.pause_why[0]), bool(self.pause_why[1])

    def wants_reading(self, side: int) -> bool:
        """Whether ``side`` should be read now.  The proxy executes ``PauseReading`` and
        ``ResumeReading`` only when they still agree with this: a command list is computed
        before it runs, and a ``Send`` in it can re-enter the session (the receiver's
        ``pause_writing`` adds a reason) before a ``ResumeReading`` later in the same list."""
        return not self.pause_why[side]

    # ------------------------------------------------------------------ flow control
    def pause(self, side: int, why: str) -> list[Command]:
        reasons = self.pause_why[side]
        if why in reasons:
            return []
        reasons.add(why)
        return [PauseReading(side)] if len(reasons) == 1 else []

    def unpause(self, side: int, why: str) -> list[Command]:
        reasons = self.pause_why[side]
        if why not in reasons:
            return []
        reasons.discard(why)
        return [] if reasons or self.closed else [ResumeReading(side)]

    # ------------------------------------------------------------------ lifecycle
    def connected_upstream(self) -> list[Command]:
        """Replay the bytes read before the upstream existed, then a FIN read meanwhile."""
        if self.connected:
            return []
        self.connected = True
        s = self.session
        self.fast = s.passthrough
        out: list[Command] = []
        early, self.early = self.early, []
        self.early_len = 0
        self.replaying = True  # no splice hand-over in the middle of the replay
        try:
            for chunk in early:
                out += self.data(TOSERVER, chunk)
                if self.closed:
                    return out
        finally:
            self.replaying = False
        if self.eof[TOSERVER] and not self.closed:
            out += self._pass_eof(TOSERVER)
        if not self.closed:
            out += self.unpause(TOSERVER, "early")
        if self.fast and not self.closed:
            out.append(SetTimer(SPLICE, 0.0))  # not from inside connection_made (uvloop)
        return out

    @property
    def finished(self) -> bool:
        """Closed and not delivering an answer (the proxy's idle sweep and drain may still
        reset a flow whose refusal its client never reads)."""
        return self.closed and not self.lingering

    def close(self, reset: bool) -> list[Command]:
        if self.closed and not self.lingering:
            return []
        self.closed = True
        self.lingering = False
        return [Close(None, reset)]

    def lost(self, side: int, error: bool) -> list[Command]:
        """A side's connection ended without our close: a reset is passed on as a reset,
        a plain close closes the other side after its buffered bytes."""
        self.gone[side] = True
        self.lingering = False
        if self.closed:
            return []
        self.closed = True
        if error:
            if self.session.close_reason == "eof":
                self.session.close_reason = "reset"
            metrics.RELAY_ERRORS.labels("reset").inc()
            return [Close(1 - side, True)]
        return [Close(1 - side, False)]

    def reloaded(self, insp: Inspection, reason: str) -> list[Command]:
        """Quarantine/reload: the new state decides whether this open flow may go on.

        Only the inspection reference changes; held bytes, the scan in flight, queued chunks
        and a pending FIN stay as they are, so an allowed flow loses no byte."""
        if self.closed:
            return []
        if self.session.reevaluate(insp, reason):
            return self.close(True)
        return []

    # ------------------------------------------------------------------ data
    def data(self, side: int, data: bytes) -> list[Command]:
        if self.closed:
            return []
        self.last_data = self.clock()
        if not self.connected:
            self.early.append(data)
            self.early_len += len(data)
            if self.early_len > self.limits.read_buffer_limit:
                return self.pause(TOSERVER, "early")
            return []
        self.session.bytes[side] += len(data)
        return self._relay(side, data)

    def _relay(self, d: int, data: bytes) -> list[Command]:
        """Inspect (unless passthrough) and forward one chunk already counted in the session."""
        s = self.session
        if self.fast and s.passthrough:
            return [Send(1 - d, data)]
        if self.scanning[d]:
            self.queued[d].append(data)  # keep the order: one scan in flight per direction
            return self.pause(d, "scan")
        if len(data) >= self.limits.offload_bytes and s.wants_scan():
            stop = s.inspect(d, data)
            if stop is None and s.wants_scan():
                metrics.DLP_OFFLOADED.inc()
                self.scanning[d] = True
                self.inflight[d] = data
                return [StartScan(d, data), *self.pause(d, "scan")]
            out, stop = s.assemble(d, data, stop)
        else:
            out, stop = s.feed(d, data)
        return self._after(d, out, stop)

    def _after(self, d: int, out: bytes, stop: Stop | None) -> list[Command]:
        """Forward what inspection released; stop, hold or hand over as it says."""
        s = self.session
        became_fast = s.passthrough and not self.fast
        self.fast = s.passthrough
        cmds: list[Command] = [Send(1 - d, out)] if out else []
        if stop is not None:
            return cmds + self._stop(stop, d)
        if s.holding(d):
            if not self.hold_since:
                self.hold_since = self.clock()
            return cmds + self._arm_hold(d)
        self.hold_since = 0.0
        if became_fast:
            cmds += self.maybe_splice()  # nothing reads this flow any more: hand it to the kernel
        return cmds

    def scan_done(self, d: int, findings: list | None, error: bool = False) -> list[Command]:
        """The scan of side ``d``'s chunk is back: forward it, then the chunks queued behind
        it in order, then a FIN that waited for them."""
        self.scanning[d] = False
        data, self.inflight[d] = self.inflight[d], None
        if self.closed or data is None:
            return []
        s = self.session
        try:
            stop = s.scanned(d, findings, error=error)
        except Exception:  # noqa: BLE001 - a scanner fault: fail closed where policy blocks
            stop = s.scanned(d, None, error=True)
        out, stop = s.assemble(d, data, stop)
        cmds: list[Command] = [Send(1 - d, out)] if out else []
        if stop is not None:
            return cmds + self._stop(stop, d)
        queued, self.queued[d] = self.queued[d], []
        for i, chunk in enumerate(queued):
            cmds += self._relay(d, chunk)
            if self.scanning[d] or self.closed:
                self.queued[d] = queued[i + 1:] + self.queued[d]
                return cmds
        if self.eof_pending[d]:
            self.eof_pending[d] = False
            cmds += self._pass_eof(d)
        if not self.closed:
            cmds += self.unpause(d, "scan")
        return cmds

    # ------------------------------------------------------------------ FIN
    def eof_received(self, d: int) -> list[Command]:
        self.eof[d] = True
        if self.closed or not self.connected:
            return []  # before the upstream connects: passed on after the replay
        return self._pass_eof(d)

    def _pass_eof(self, d: int) -> list[Command]:
        if self.scanning[d] or self.queued[d]:
            self.eof_pending[d] = True  # the FIN follows the bytes still being scanned
            return []
        s = self.session
        cmds: list[Command] = []
        if not s.passthrough:
            out, stop = s.eof(d)
            if out:
                cmds.append(Send(1 - d, out))
            if stop is not None:
                return cmds + self._stop(stop, d)
        cmds.append(HalfClose(1 - d))
        # both sides have finished - but a direction whose FIN waits behind a DLP scan has not
        # delivered its last bytes yet: closing now would cut them (that direction's
        # scan_done passes its FIN on and comes back here)
        if (self.eof[TOSERVER] and self.eof[TOCLIENT] and not self.eof_pending[TOSERVER]
                and not self.eof_pending[TOCLIENT]):
            cmds += self.close(False)
        return cmds

    # ------------------------------------------------------------------ refusals
    def _stop(self, stop: Stop, d: int) -> list[Command]:
        """Refuse: answer the sender of the offending bytes (the client for requests) and
        close gracefully after it, resetting the other side; without an answer reset both."""
        s = self.session
        s.close_reason = stop.reason.split(":")[0]
        if self.closed:
            return []
        self.closed = True
        if stop.reply and not self.gone[d]:
            self.lingering = True
            return [Send(d, stop.reply), Close(1 - d, True), Close(d, False)]
        return [Close(None, True)]

    # ------------------------------------------------------------------ holds
    def _arm_hold(self, d: int) -> list[Command]:
        """Bytes are held while a protocol is identified or a request head completes;
        a peer that stops sending must not be stalled forever (identify_timeout)."""
        if self.hold_armed:
            return []
        self.hold_armed = True
        self.hold_dir = d
        return [SetTimer(HOLD, self.limits.identify_timeout)]

    def timer_fired(self, kind: str) -> list[Command]:
        if kind == SPLICE:
            return self.maybe_splice()
        if kind != HOLD:
            return []
        self.hold_armed = False
        if self.closed:
            return []
        s, d, lim = self.session, self.hold_dir, self.limits
        if s._ident is not None:
            # identification undecided: the policy depends on the protocol (that is why bytes
            # are held), so wait for more bytes up to header_timeout, then decide "unknown"
            # (which such a policy normally denies) rather than guess early
            if self.clock() - self.born < lim.header_timeout:
                return self._arm_hold(d)
            out = s.release(d)
            cmds: list[Command] = [Send(1 - d, out)] if out else []
            if s._stopped is not None:
                return cmds + self._stop(s._stopped, d)
            self.fast = s.passthrough
            return cmds
        if s.holding(d):
            # an incomplete request head: wait up to header_timeout, then refuse
            if self.clock() - (self.hold_since or self.last_data) > lim.header_timeout:
                s.close_reason = "header-timeout"
                return self.close(True)
            return self._arm_hold(d)
        return []

    # ------------------------------------------------------------------ splice hand-over
    def maybe_splice(self) -> list[Command]:
        """Hand a flow nothing inspects any more to the kernel (splice), once both write
        buffers are empty; until then reading stays paused so no byte overtakes another."""
        lim = self.limits
        if (self.spliced or not lim.splice or self.closed or self.replaying
                or self.splice_tries >= SPLICE_NEVER):
            return []
        s = self.session
        if self.eof[0] or self.eof[1] or s.holding(0) or s.holding(1):
            return self.cancel_splice()  # a half-closed or held flow stays on the Protocol path
        if not self.connected or not s.passthrough:
            return []
        if self.scanning[0] or self.scanning[1] or self.queued[0] or self.queued[1]:
            return []  # never while bytes are still on their way through Python
        cmds: list[Command] = []
        if not self.want_splice:
            self.want_splice = True
            cmds += self.pause(TOSERVER, "splice") + self.pause(TOCLIENT, "splice")
        cmds.append(Splice())
        return cmds

    def splice_deferred(self) -> list[Command]:
        """A write buffer still holds bytes: look again shortly (a receiver that never reads
        keeps the flow on the Protocol path)."""
        self.splice_tries += 1
        if self.splice_tries > SPLICE_MAX_TRIES:
            return self.cancel_splice()
        return [SetTimer(SPLICE, SPLICE_RETRY)]

    def cancel_splice(self) -> list[Command]:
        if not self.want_splice:
            return []
        self.want_splice = False
        self.splice_tries = SPLICE_NEVER  # do not try again for this flow
        return self.unpause(TOSERVER, "splice") + self.unpause(TOCLIENT, "splice")
