"""The relay: sockets in, sockets out, nothing else ("no await beyond this point").

One ``Flow`` joins two asyncio Protocols (client side, server side).  Bytes read
on one side go through ``Session.feed`` and are written to the other; flow
control is the transports' own: when one side's write buffer passes its high-water
mark, its protocol's ``pause_writing`` pauses *reading* on the other side, so a
slow receiver never makes memory grow.  Half-close is passed on with
``write_eof``; a reset on one side becomes a reset (SO_LINGER 0) on the other.

Inbound flows arrive on a transparent (TPROXY) listener whose accepted socket's
local address *is* the original destination; the upstream socket is bound to the
client's address with IP_TRANSPARENT and marked, so the application sees the true
client IP.  Outbound flows arrive through REDIRECT and SO_ORIGINAL_DST tells where
they were going.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from collections import defaultdict
from typing import Any

from prometheus_client import Counter

from firewall.datapath import splice
from firewall.datapath.redirect import mark_own as _own_mark
from firewall.datapath.session import Inspection, Session
from firewall.observe import metrics
from firewall.observe.events import ts_iso
from firewall.protocols.base import TOCLIENT, TOSERVER

log = logging.getLogger("palisade.proxy")

FAST_FLOWS = Counter("palisade_l4_fast_flows", "Flows relayed on the L4 fast path (verdict final at accept: "
                     "accept -> connect -> splice, no asyncio transports)")
#: connections taken per wake-up of a fast-path listener (bounded: one burst cannot starve the relay)
ACCEPT_BATCH = 32

SOL_IP = 0
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SO_MARK = 36
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
MARK = 0x539
HIGH_WATER = 1 << 20
#: source ports of ``upstream_ports`` tried (in turn) before a flow gives up the client's address
PORT_TRIES = 32
LOW_WATER = 256 << 10
#: flow records are written in batches: at most this long after the flow ends ...
RECORD_INTERVAL = 0.05
#: ... or as soon as this many flows have ended
RECORD_BATCH = 256
_LINGER0 = struct.pack("ii", 1, 0)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (conntrack's original tuple)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def _norm(addr: tuple) -> tuple[str, int]:
    ip = addr[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip, addr[1]


def listen_socket(host: str, port: int, *, transparent: bool, udp: bool = False,
                  reuseport: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        if family == socket.AF_INET6:
            s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    if udp and transparent:
        if family == socket.AF_INET6:
            s.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            s.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
    s.bind((host, port))
    if not udp:
        s.listen(4096)
    s.setblocking(False)
    return s


def is_local_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this network namespace (loopback, unspecified, or one
    a socket can bind without IP_TRANSPARENT).  Only asked for flows to a listener port."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(addr), 0))
        except OSError:
            return False
    return True


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with RST (SO_LINGER 0), which is how a refusal or a peer's reset is propagated."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
    transport.abort()


def _reset_sock(sock: socket.socket) -> None:
    """Refuse/abort a bare socket with RST (SO_LINGER 0), as ``_reset`` does for a transport."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


def _peer_gone(flow: Flow) -> bool:
    """A pending socket error (ECONNRESET ...) on either side of a flow."""
    for side in flow.sides:
        if side is None or side.transport is None:
            continue
        sock = side.transport.get_extra_info("socket")
        try:
            if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return True
        except OSError:
            return True
    return False


class _Side(asyncio.Protocol):
    __slots__ = ("flow", "d", "transport")

    def __init__(self, flow: Flow, d: int) -> None:
        self.flow = flow
        self.d = d  # direction of the bytes this side READS
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.flow.on_data(self.d, data)

    def eof_received(self) -> bool:
        self.flow.on_eof(self.d)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.on_lost(self.d, exc)

    def pause_writing(self) -> None:
        self.flow.pause_reading(1 - self.d)

    def resume_writing(self) -> None:
        self.flow.resume_reading(1 - self.d)


class Flow:
    """Both halves of one relayed TCP connection and their session."""

    __slots__ = ("proxy", "session", "sides", "early", "early_len", "eof", "lost", "closed",
                 "last", "paused", "done", "connected", "peer_key", "hold_timer",
                 "_fast", "splicer", "want_splice", "_splice_tries", "scanning", "queued", "eof_pending", "replaying", "hold_since")

    def __init__(self, proxy: Proxy, session: Session, client: _Side) -> None:
        self.proxy = proxy
        self.session = session
        self.sides: list[_Side | None] = [client, None]  # index = direction its reads travel
        self.early: list[bytes] = []
        self.early_len = 0
        self.eof = [False, False]
        self.lost = [False, False]
        self.closed = False
        self.done = False
        self.last = time.monotonic()
        self.paused = [False, False]
        self.connected = False
        self.peer_key = ""
        self.hold_timer: asyncio.TimerHandle | None = None
        self._fast = False
        self.splicer: splice.Splicer | None = None
        self.want_splice = False
        self._splice_tries = 0
        self.scanning = [False, False]  # a DLP scan of this direction is running on the worker thread
        self.queued: list[list[bytes]] = [[], []]
        self.eof_pending = [False, False]
        self.replaying = False
        self.hold_since = 0.0  # when the bytes now held started to be held (header deadline)

    # -- wiring
    def side_made(self, side: _Side) -> None:
        """The upstream connection is made: attach it now, before uvloop can deliver the
        server's first bytes (server-first protocols: MySQL greeting, HTTP/2 preface)."""
        if side.d == TOCLIENT and self.sides[TOCLIENT] is None:
            if self.closed:
                _reset(side.transport)
                return
            self.attach_server(side)

    def attach_server(self, server: _Side) -> None:
        if self.sides[TOCLIENT] is server:
            return
        self.sides[TOCLIENT] = server
        server.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[union-attr]
        self.connected = True
        self._fast = self.session.passthrough
        early, self.early = self.early, []
        self.early_len = 0
        self.replaying = True  # no splice hand-over in the middle of the replay
        try:
            for chunk in early:
                self.on_data(TOSERVER, chunk)
                if self.closed:
                    return
        finally:
            self.replaying = False
        if self.eof[TOSERVER] and not self.closed:
            self._pass_eof(TOSERVER)
        if self.paused[TOSERVER] and not self.closed:
            self.resume_reading(TOSERVER)
        if self._fast and not self.closed:
            # not from inside connection_made: uvloop attaches the socket object after it returns
            self.proxy.loop.call_soon(self.maybe_splice)

    # -- data
    def on_data(self, d: int, data: bytes) -> None:
        if self.closed:
            return
        self.last = time.monotonic()
        if not self.connected:
            self.early.append(data)
            self.early_len += len(data)
            if self.early_len > self.proxy.cfg.read_buffer_limit:
                self.pause_reading(TOSERVER)
            return
        self.session.bytes[d] += len(data)
        self._relay(d, data)

    def _relay(self, d: int, data: bytes) -> None:
        """Inspect (unless passthrough) and forward one chunk already counted in the session."""
        s = self.session
        dst = self.sides[1 - d]
        if self._fast and s.passthrough:
            dst.transport.write(data)  # type: ignore[union-attr]
            return
        if self.scanning[d]:
            self.queued[d].append(data)  # keep the order: one scan in flight per direction
            self.pause_reading(d)
            return
        if len(data) >= self.proxy.offload_bytes and s.wants_scan():
            stop = s.inspect(d, data)
            if stop is None and s.wants_scan():
                self._offload(d, data)
                return
            out, stop = s.assemble(d, data, stop)
        else:
            out, stop = s.feed(d, data)
        became_fast = s.passthrough and not self._fast
        self._fast = s.passthrough
        if out:
            dst.transport.write(out)  # type: ignore[union-attr]
        if stop is not None:
            self._stop(stop, d)
        elif s.holding(d):
            if not self.hold_since:
                self.hold_since = time.monotonic()
            self._arm_hold(d)
        else:
            self.hold_since = 0.0
            if became_fast:
                self.maybe_splice()  # nothing reads this flow any more: hand it to the kernel

    # -- DLP scans of large chunks on the worker thread (Hyperscan releases the GIL)
    def _offload(self, d: int, data: bytes) -> None:
        metrics.DLP_OFFLOADED.inc()
        self.scanning[d] = True
        self.pause_reading(d)
        loop = self.proxy.loop
        s = self.session
        fut = self.proxy.executor.submit(s.scan_findings, d, data)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._scanned, d, data, f))

    def _scanned(self, d: int, data: bytes, fut: Any) -> None:
        self.scanning[d] = False
        if self.closed:
            return
        s = self.session
        try:
            stop = s.scanned(d, fut.result())
        except Exception:  # noqa: BLE001 - a scanner fault: fail closed where policy blocks
            stop = s.scanned(d, None, error=True)
        out, stop = s.assemble(d, data, stop)
        dst = self.sides[1 - d]
        if out and dst is not None and dst.transport is not None and not dst.transport.is_closing():
            dst.transport.write(out)
        if stop is not None:
            self._stop(stop, d)
            return
        queued, self.queued[d] = self.queued[d], []
        for i, chunk in enumerate(queued):
            self._relay(d, chunk)
            if self.scanning[d] or self.closed:
                self.queued[d] = queued[i + 1:] + self.queued[d]
                return
        if self.eof_pending[d]:
            self.eof_pending[d] = False
            self._pass_eof(d)
        if not self.closed and (dst is None or dst.transport is None
                                or dst.transport.get_write_buffer_size() < HIGH_WATER):
            self.resume_reading(d)  # else resume_writing of the receiver resumes it

    # -- zero-copy hand-over (firewall/datapath/splice.py)
    def maybe_splice(self) -> None:
        """Hand a flow nothing inspects any more to the kernel (splice), once both write
        buffers are empty; until then reading stays paused so no byte overtakes another."""
        if (self.splicer is not None or not self.proxy.splice or self.closed or self.replaying
                or self._splice_tries >= 10**6):
            return
        if self.eof[0] or self.eof[1] or self.session.holding(0) or self.session.holding(1):
            self._cancel_splice()  # a half-closed or held flow stays on the Protocol path
            return
        c, s = self.sides
        if c is None or s is None or c.transport is None or s.transport is None:
            return
        ct, st = c.transport, s.transport
        if not self.want_splice:
            self.want_splice = True
            for d in (TOSERVER, TOCLIENT):
                self.pause_reading(d)
        if ct.get_write_buffer_size() or st.get_write_buffer_size():
            self._splice_tries += 1
            if self._splice_tries > 2000:  # a receiver that never reads: stay on the Protocol path
                self._cancel_splice()
                return
            self.proxy.loop.call_later(0.002, self.maybe_splice)
            return
        try:
            csock = ct.get_extra_info("socket")
            family = csock.family
            cfd = os.dup(csock.fileno())
            try:
                sfd = os.dup(st.get_extra_info("socket").fileno())
            except OSError:
                os.close(cfd)
                raise
        except (OSError, AttributeError):
            self._cancel_splice()
            return
        try:
            self.splicer = self.proxy.Splicer(self.proxy.loop, cfd, sfd, self._spliced_bytes, self._spliced_end,
                                              family)
        except OSError:
            os.close(cfd)
            os.close(sfd)
            self._cancel_splice()
            return
        ct.close()  # closes uvloop's descriptor only: our dups keep the connection
        st.close()
        self.splicer.start()
        metrics.SPLICED.inc()

    def _cancel_splice(self) -> None:
        if self.want_splice:
            self.want_splice = False
            self._splice_tries = 10**6  # do not try again for this flow
            for d in (TOSERVER, TOCLIENT):
                self.resume_reading(d)

    def _spliced_bytes(self, d: int, n: int) -> None:
        self.session.bytes[d] += n
        self.last = time.monotonic()

    def _spliced_end(self, reason: str) -> None:
        s = self.session
        if reason != "eof" and s.close_reason == "eof":
            s.close_reason = reason
        self.closed = True
        self.lost = [True, True]
        self._maybe_done()

    def _arm_hold(self, d: int) -> None:
        """Bytes are held while a protocol is identified or a request head completes;
        a peer that stops sending must not be stalled forever (identify_timeout)."""
        if self.hold_timer is not None:
            return
        loop = self.proxy.loop

        def fire() -> None:
            self.hold_timer = None
            if self.closed:
                return
            s = self.session
            if s._ident is not None:
                # identification undecided: the policy depends on the protocol (that is why
                # bytes are held), so wait for more bytes up to header_timeout, then decide
                # "unknown" (which such a policy normally denies) rather than guess early
                if time.time() - s.start < self.proxy.cfg.header_timeout:
                    self.hold_timer = loop.call_later(self.proxy.cfg.identify_timeout, fire)
                    return
                out = s.release(d)
                if out and not self.closed:
                    self.sides[1 - d].transport.write(out)  # type: ignore[union-attr]
                if s._stopped is not None:
                    self._stop(s._stopped, d)
                    return
                self._fast = s.passthrough
            elif s.holding(d):
                # an incomplete request head: wait up to header_timeout, then refuse
                if time.monotonic() - (self.hold_since or self.last) > self.proxy.cfg.header_timeout:
                    s.close_reason = "header-timeout"
                    self.close(reset=True)
                else:
                    self.hold_timer = loop.call_later(self.proxy.cfg.identify_timeout, fire)

        self.hold_timer = loop.call_later(self.proxy.cfg.identify_timeout, fire)

    def _stop(self, stop: Any, d: int) -> None:
        s = self.session
        s.close_reason = stop.reason.split(":")[0]
        if stop.reply:
            # answer the sender of the offending bytes (the client for requests)
            replier = self.sides[d]
            if replier is not None and replier.transport is not None and not replier.transport.is_closing():
                replier.transport.write(stop.reply)
                other = self.sides[1 - d]
                _reset(other.transport if other else None)
                replier.transport.close()  # graceful: the 403 is delivered, then FIN
                return
        self.close(reset=True)

    def on_eof(self, d: int) -> None:
        self.eof[d] = True
        if self.closed:
            return
        if not self.connected:
            return  # passed on after the upstream connects
        if self.scanning[d] or self.queued[d]:
            self.eof_pending[d] = True  # after the bytes still being scanned
            return
        self._pass_eof(d)

    def _pass_eof(self, d: int) -> None:
        if self.scanning[d] or self.queued[d]:
            self.eof_pending[d] = True  # the FIN follows the bytes still being scanned
            return
        s = self.session
        if not s.passthrough:
            out, stop = s.eof(d)
            dst = self.sides[1 - d]
            if out and dst is not None:
                dst.transport.write(out)  # type: ignore[union-attr]
            if stop is not None:
                self._stop(stop, d)
                return
        dst = self.sides[1 - d]
        if dst is not None and dst.transport is not None and not dst.transport.is_closing():
            try:
                if dst.transport.can_write_eof():
                    dst.transport.write_eof()
            except OSError:
                pass
        # both sides have finished - but a direction whose FIN waits behind a DLP scan has not
        # delivered its last bytes yet: closing now would cut them (that direction's
        # _scanned passes its FIN on and comes back here)
        if (self.eof[TOSERVER] and self.eof[TOCLIENT] and not self.eof_pending[TOSERVER]
                and not self.eof_pending[TOCLIENT]):
            self.close(reset=False)

    def on_lost(self, d: int, exc: Exception | None) -> None:
        if self.splicer is not None:
            return  # the transport was closed by the hand-over; the splicer owns the sockets now
        self.lost[d] = True
        if exc is not None and not self.closed:
            if self.session.close_reason == "eof":
                self.session.close_reason = "reset"
            metrics.RELAY_ERRORS.labels("reset").inc()
            other = self.sides[1 - d]
            _reset(other.transport if other else None)
            self.closed = True
        elif not self.closed:
            # closed without our close(): treat like EOF on that side, then close the other
            other = self.sides[1 - d]
            if other is not None and other.transport is not None:
                other.transport.close()
            self.closed = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.done:
            return
        need = [self.sides[0] is not None, self.sides[1] is not None]
        if all(self.lost[i] or not need[i] for i in (0, 1)):
            self.done = True
            if self.hold_timer is not None:
                self.hold_timer.cancel()
            self.proxy.flow_done(self)

    # -- flow control
    def pause_reading(self, d: int) -> None:
        side = self.sides[d]
        if side is not None and side.transport is not None and not self.paused[d]:
            self.paused[d] = True
            try:
                side.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def resume_reading(self, d: int) -> None:
        if self.want_splice and self.splicer is None:
            return  # waiting for write buffers to empty before the splice hand-over
        side = self.sides[d]
        if side is not None and side.transport is not None and self.paused[d]:
            self.paused[d] = False
            try:
                side.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def close(self, reset: bool) -> None:
        if self.splicer is not None:
            self.splicer.close(reset, self.session.close_reason)
            return
        if self.closed:
            return
        self.closed = True
        for side in self.sides:
            if side is None or side.transport is None:
                continue
            if reset:
                _reset(side.transport)
            else:
                side.transport.close()
        if self.sides[TOCLIENT] is None:
            self.lost[TOCLIENT] = True


class FastFlow:
    """A flow whose verdict was final at accept (L4-only policy, no DLP action for this peer
    pair, no L7 identification): no asyncio transports at all.

    The accepted socket is left alone (the client's early bytes wait in the kernel's receive
    queue), the upstream is connected with ``connect_ex`` and one writer callback, and both
    descriptors go straight to the splice relay.  It offers the proxy what ``Flow`` does for
    its bookkeeping: ``session``, ``closed``/``done``, ``last`` (idle sweep), ``paused``,
    ``splicer``, ``peer_key`` and ``close(reset)`` (quarantine/reload cuts, drain)."""

    __slots__ = ("proxy", "session", "csock", "ssock", "closed", "done", "last", "paused", "splicer",
                 "peer_key", "timer", "dst", "peer", "tries", "family", "wfd")

    def __init__(self, proxy: Proxy, session: Session, csock: socket.socket, dst: tuple[str, int],
                 peer: tuple[str, int]) -> None:
        self.proxy = proxy
        self.session = session
        self.csock = csock
        self.ssock: socket.socket | None = None
        self.closed = False
        self.done = False
        self.last = time.monotonic()
        self.paused = (False, False)
        self.splicer: splice.Splicer | None = None
        self.peer_key = ""
        self.timer: asyncio.TimerHandle | None = None
        self.dst, self.peer = dst, peer
        self.tries = 0
        self.family = csock.family
        self.wfd = -1  # the upstream descriptor while a writer callback waits for connect()

    def connect(self, keep_source: bool) -> None:
        try:
            self.ssock, self.session.source_preserved = self.proxy._upstream_socket(
                self.family, self.peer[0] if keep_source else None)
        except OSError as exc:  # EMFILE/ENFILE: this flow fails, visibly
            metrics.RELAY_ERRORS.labels("no-descriptor").inc()
            self.session.close_reason = f"error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            self.close(reset=True)
            return
        self._try()

    def _try(self) -> None:
        sock = self.ssock
        assert sock is not None
        err = sock.connect_ex(self.dst)  # a numeric address: no resolver
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            loop = self.proxy.loop
            self.wfd = sock.fileno()
            loop.add_writer(self.wfd, self._on_connect)
            if self.timer is None:
                self.timer = loop.call_later(self.proxy.cfg.connect_timeout, self._timeout)
        else:
            self._failed(err)

    def _unwatch(self) -> None:
        if self.wfd >= 0:
            self.proxy.loop.remove_writer(self.wfd)
            self.wfd = -1

    def _on_connect(self) -> None:
        if self.closed or self.ssock is None:
            self._unwatch()
            return
        err = self.ssock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._unwatch()
            self._failed(err)
        else:
            self._connected()

    def _timeout(self) -> None:
        self.timer = None
        if not self.closed and self.splicer is None:
            metrics.RELAY_ERRORS.labels("upstream-timeout").inc()
            self.session.close_reason = "upstream-timeout"
            self.close(reset=True)

    def _failed(self, err: int) -> None:
        s = self.session
        if err == errno.EADDRNOTAVAIL and s.source_preserved:
            # this source port's 4-tuple is taken towards this server: the next port (as Flow)
            self.tries += 1
            assert self.ssock is not None
            self.ssock.close()
            if self.tries >= PORT_TRIES:
                metrics.RELAY_ERRORS.labels("source-ports-exhausted").inc()
                self.ssock, _ = self.proxy._upstream_socket(self.family, None)
                s.source_preserved = False
            else:
                self.ssock, s.source_preserved = self.proxy._upstream_socket(self.family, self.peer[0])
            self._try()
            return
        reason = "upstream-refused" if err == errno.ECONNREFUSED else "upstream-unreachable"
        metrics.RELAY_ERRORS.labels(reason).inc()
        s.close_reason = reason
        self.close(reset=True)

    def _connected(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert self.ssock is not None
        cfd, sfd = self.csock.detach(), self.ssock.detach()
        self.csock = self.ssock = None  # type: ignore[assignment]
        self.splicer = self.proxy.Splicer(self.proxy.loop, cfd, sfd, self._bytes, self._end, self.family)
        self.splicer.start()
        # only now drop the connect watcher: the pump's reader keeps the loop's poll handle for
        # this descriptor (one epoll MOD instead of a DEL, a new handle, FIONBIO and an ADD)
        self._unwatch()
        metrics.SPLICED.inc()

    def _bytes(self, d: int, n: int) -> None:
        self.session.bytes[d] += n
        self.last = time.monotonic()

    def _end(self, reason: str) -> None:
        s = self.session
        if reason != "eof" and s.close_reason == "eof":
            s.close_reason = reason
        self.closed = True
        self._finish()

    def close(self, reset: bool) -> None:
        if self.splicer is not None:
            self.splicer.close(reset, self.session.close_reason)
            return
        if self.closed:
            return
        self.closed = True
        self._unwatch()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for sock in (self.csock, self.ssock):
            if sock is None:
                continue
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                sock.close()
            except OSError:
                pass
        self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.proxy.flow_done(self)  # type: ignore[arg-type]


class _PortsBusy(Exception):
    """Every source port tried for one upstream was taken (EADDRINUSE)."""


class Proxy:
    """Listeners + the set of open flows; the policy/DLP state lives in ``inspection``."""

    def __init__(self, cfg: Any, inspection: Inspection, emit: Any) -> None:
        self.cfg = cfg
        self.inspection = inspection
        self.emit = emit
        # the sink's batched writer when it has one (EventSink); tests may pass a plain function
        self.emit_many = getattr(getattr(emit, "__self__", None), "emit_many", None)
        self._ended: list[tuple[Session, float]] = []  # flows closed since the last record flush
        self._flush_timer: asyncio.TimerHandle | None = None
        self.record_interval = getattr(cfg, "flow_record_interval", RECORD_INTERVAL)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.flows: set[Flow] = set()
        self.servers: list[Any] = []
        self.sockets: list[socket.socket] = []
        self.udp: list[Any] = []
        self.ready = False
        self.per_peer: dict[str, int] = defaultdict(int)
        self._sweeper: asyncio.Task | None = None
        self.transparent_upstream = True
        self._port_cursor = 0
        self._skip_ports: frozenset[int] | None = None  # listener ports, known after bind()
        self.splice = splice.AVAILABLE and getattr(cfg, "splice", True)
        # the relay for spliced flows: native thread or the Python pump (--relay, chosen once)
        self.Splicer = splice.relay_class(getattr(cfg, "relay", "auto"), getattr(cfg, "idle_timeout", 0.0))
        # the L4 fast path needs the splice relay, and only flows without L7 identification can
        # be final at accept: with L7 on, the listeners stay asyncio servers (unchanged path)
        self.fast_path = (self.splice and getattr(cfg, "l4_fast_path", True)
                          and not getattr(cfg, "l7", True))
        self._listeners: list[socket.socket] = []
        self.offload_bytes = getattr(cfg, "dlp_offload_bytes", 65536) or (1 << 62)
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="palisade-dlp")

    # ---------------------------------------------------------------- listeners
    def bind(self, reuseport: bool = False) -> None:
        """Create listening sockets (as root, before dropping privileges)."""
        cfg = self.cfg
        specs: list[tuple[str, int, bool, bool, str]] = []
        if cfg.inbound:
            specs.append(("0.0.0.0", cfg.inbound_port, True, False, "inbound"))
            if cfg.ipv6 and socket.has_ipv6:
                specs.append(("::", cfg.inbound_port, True, False, "inbound"))
        if cfg.outbound:
            specs.append(("0.0.0.0", cfg.outbound_port, False, False, "outbound"))
            if cfg.ipv6 and socket.has_ipv6:
                specs.append(("::", cfg.outbound_port, False, False, "outbound"))
        if cfg.dns:
            specs.append(("0.0.0.0", cfg.dns_port, True, True, "dns"))
            if cfg.ipv6 and socket.has_ipv6:
                specs.append(("::", cfg.dns_port, True, True, "dns"))
        self._specs = []
        self._skip_ports = None
        for host, port, transparent, udp, kind in specs:
            try:
                s = listen_socket(host, port, transparent=transparent, udp=udp, reuseport=reuseport)
            except OSError as exc:
                if ":" in host and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue  # no IPv6 in this namespace
                raise OSError(exc.errno, f"cannot listen on [{host}]:{port} ({kind}): {exc.strerror}") from None
            self._specs.append((s, kind))

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for s, kind in self._specs:
            if kind == "dns":
                from firewall.datapath.dnsrelay import DnsRelay

                relay = DnsRelay(self, s)
                await relay.start()
                self.udp.append(relay)
                continue
            if self.fast_path:
                # our own accept loop: flows final at accept never get a transport
                s.setblocking(False)
                self.loop.add_reader(s.fileno(), self._on_listen, s, kind)
                self._listeners.append(s)
                continue
            srv = await self.loop.create_server(
                (lambda k=kind: _Accept(self, k)), sock=s, backlog=4096)
            self.servers.append(srv)
        self._sweeper = self.loop.create_task(self._sweep())
        self.ready = True

    async def stop_listening(self) -> None:
        self.ready = False
        for srv in self.servers:
            srv.close()
        for ls in self._listeners:
            try:
                self.loop.remove_reader(ls.fileno())
            except (OSError, ValueError):
                pass
            ls.close()
        self._listeners = []
        for u in self.udp:
            u.close()

    async def drain(self, timeout: float) -> int:
        """Wait for open flows to finish, up to ``timeout``; reset the rest. Returns how many were cut."""
        deadline = self.loop.time() + timeout
        while self.flows and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        cut = len(self.flows)
        for f in list(self.flows):
            f.session.close_reason = "shutdown"
            f.close(reset=True)
        await asyncio.sleep(0)
        self.flush_records()  # SIGTERM loses no flow record: the batch is written before exit
        return cut

    async def _sweep(self) -> None:
        """Idle timeouts and event-loop lag, once a second (no per-flow timers)."""
        idle = self.cfg.idle_timeout
        while True:
            t0 = self.loop.time()
            await asyncio.sleep(1.0)
            metrics.EVENT_LOOP_LAG.set(max(0.0, self.loop.time() - t0 - 1.0))
            now = time.monotonic()
            for f in list(self.flows):
                if f.closed:
                    continue
                if now - f.last > idle:
                    f.session.close_reason = "idle-timeout"
                    f.close(reset=True)
                elif (f.paused[0] or f.paused[1]) and f.splicer is None and _peer_gone(f):
                    # a paused side is not polled: a peer's RST would go unnoticed until idle_timeout
                    f.session.close_reason = "reset"
                    f.close(reset=True)

    def cut_all(self, reason: str) -> int:
        """Quarantine/reload: re-evaluate open flows; cut those the new state denies."""
        n = 0
        for f in list(self.flows):
            if f.closed:
                continue
            s = f.session
            if self.inspection.quarantined:
                s.close_reason = reason
                s.verdict = "deny"
                s.rule = "quarantine"
                f.close(reset=True)
                n += 1
                continue
            s.insp = self.inspection  # later L7 decisions of this flow use the new policy
            pol = self.inspection.policy
            if pol is not None and s.flowinfo is not None:
                try:
                    d = pol.decide(s.flowinfo, mode_override=self.inspection.mode_override)
                    if d.verdict != "deny" and s.app_proto not in ("unknown", ""):
                        d = pol.decide_app(s.flowinfo, s.app_proto,
                                           mode_override=self.inspection.mode_override) or d
                except Exception:  # noqa: BLE001
                    continue
                if d.verdict == "deny" and d.enforced:
                    s.close_reason = reason
                    s.verdict = "deny"
                    s.rule = d.rule
                    f.close(reset=True)
                    n += 1
        return n

    # ---------------------------------------------------------------- flows
    def accepted(self, kind: str, client: _Side, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        try:
            peer = _norm(transport.get_extra_info("peername"))
            if kind == "inbound":
                dst = _norm(transport.get_extra_info("sockname"))
            else:
                dst = original_dst(sock)
        except (OSError, TypeError) as exc:
            metrics.RELAY_ERRORS.labels("original-dst").inc()
            log.warning("cannot recover the original destination: %s", exc)
            _reset(transport)
            return
        direction = "inbound" if kind == "inbound" else "outbound"
        session = Session(self.inspection, direction, peer, dst)
        flow = Flow(self, session, client)
        client.flow = flow
        if self.self_connection(kind, dst):
            self._refuse_self(flow, transport, dst)
            return
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        # connection limits (per peer address; the pod itself for outbound)
        key = peer[0]
        if self.per_peer[key] >= self.cfg.max_connections_per_peer or len(self.flows) >= self.cfg.max_connections:
            metrics.PEER_LIMITED.inc()
            session.verdict, session.rule, session.close_reason = "deny", "connection-limit", "limit"
            self._refuse(flow, transport)
            return
        try:
            allowed = session.open()
        except Exception as exc:  # noqa: BLE001 - a policy bug fails closed for this flow only
            log.exception("policy evaluation failed")
            session.verdict, session.rule, session.close_reason = "deny", "error", f"policy-error:{exc}"
            allowed = False
        if not allowed:
            self._refuse(flow, transport)
            return
        flow.peer_key = key
        self.per_peer[key] += 1
        self.flows.add(flow)
        metrics.CONNECTIONS_ACTIVE.labels(direction).inc()
        self.loop.create_task(self._connect(flow, dst, peer, kind))

    # ---------------------------------------------------------------- the L4 fast path
    def _on_listen(self, ls: socket.socket, kind: str) -> None:
        """A fast-path listener is readable: take up to ACCEPT_BATCH connections."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # no descriptor for it: stop accepting for a moment (the backlog holds the
                    # clients) instead of spinning on a level-triggered readable listener
                    metrics.RELAY_ERRORS.labels("no-descriptor").inc()
                    fd = ls.fileno()
                    self.loop.remove_reader(fd)

                    def again(fd: int = fd) -> None:
                        if ls in self._listeners:
                            self.loop.add_reader(fd, self._on_listen, ls, kind)

                    self.loop.call_later(0.1, again)
                    return
                continue  # ECONNABORTED and the like: that client is gone, take the next
            try:
                self._admit(kind, conn, addr)
            except Exception:  # noqa: BLE001 - one bad connection must not stop the listener
                log.exception("accept failed")
                _reset_sock(conn)

    def _admit(self, kind: str, conn: socket.socket, addr: Any) -> None:
        """Decide a connection from the fast-path accept loop: refuse, splice at once (verdict
        final: no DLP action for this pair), or adopt it as an asyncio transport (DLP applies)."""
        conn.setblocking(False)
        try:
            peer = _norm(addr)
            dst = _norm(conn.getsockname()) if kind == "inbound" else original_dst(conn)
        except (OSError, TypeError) as exc:
            metrics.RELAY_ERRORS.labels("original-dst").inc()
            log.warning("cannot recover the original destination: %s", exc)
            _reset_sock(conn)
            return
        direction = "inbound" if kind == "inbound" else "outbound"
        session = Session(self.inspection, direction, peer, dst)
        if not self._decide(kind, session, dst):
            _reset_sock(conn)
            metrics.CONNECTIONS_TOTAL.labels(session.direction, "deny").inc()
            self.emit(session.record())
            return
        key = peer[0]
        if not session.passthrough:
            self.loop.create_task(self._adopt(kind, conn, session, peer, dst))
            return
        flow = FastFlow(self, session, conn, dst, peer)
        flow.peer_key = key
        self.per_peer[key] += 1
        self.flows.add(flow)  # type: ignore[arg-type]
        metrics.CONNECTIONS_ACTIVE.labels(direction).inc()
        FAST_FLOWS.inc()
        flow.connect(kind == "inbound" and self.transparent_upstream)

    def _decide(self, kind: str, session: Session, dst: tuple[str, int]) -> bool:
        """Self-connection, connection limits and the policy at accept (as ``accepted``)."""
        if self.self_connection(kind, dst):
            metrics.RELAY_ERRORS.labels("self-connection").inc()
            session.verdict, session.rule, session.close_reason = "deny", "self-connection", "self-connection"
            try:
                session._alert("policy", "self-connection", blocked=True, severity=1,
                               extra={"reason": f"destination {dst[0]}:{dst[1]} is the sidecar's own listener"})
            except Exception:  # noqa: BLE001
                log.exception("self-connection alert failed")
            return False
        key = session.src_ip  # the peer address (the pod itself for outbound), as in accepted()
        if self.per_peer[key] >= self.cfg.max_connections_per_peer or len(self.flows) >= self.cfg.max_connections:
            metrics.PEER_LIMITED.inc()
            session.verdict, session.rule, session.close_reason = "deny", "connection-limit", "limit"
            return False
        try:
            return session.open()
        except Exception as exc:  # noqa: BLE001 - a policy bug fails closed for this flow only
            log.exception("policy evaluation failed")
            session.verdict, session.rule, session.close_reason = "deny", "error", f"policy-error:{exc}"
            return False

    async def _adopt(self, kind: str, conn: socket.socket, session: Session, peer: tuple[str, int],
                     dst: tuple[str, int]) -> None:
        """A flow the DLP reads: give the accepted socket an asyncio transport and relay it on
        the Protocol path (``Flow``), exactly as a connection from an asyncio server."""
        client = _Side(None, TOSERVER)  # type: ignore[arg-type]
        flow = Flow(self, session, client)
        client.flow = flow
        try:
            await self.loop.connect_accepted_socket(lambda: client, conn)
        except OSError:
            _reset_sock(conn)
            session.close_reason = "reset"
            metrics.CONNECTIONS_TOTAL.labels(session.direction, session.verdict).inc()
            self.emit(session.record())
            return
        transport = client.transport
        assert transport is not None
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        key = peer[0]
        flow.peer_key = key
        self.per_peer[key] += 1
        self.flows.add(flow)
        metrics.CONNECTIONS_ACTIVE.labels(session.direction).inc()
        await self._connect(flow, dst, peer, kind)

    @property
    def own_ports(self) -> frozenset[int]:
        """The sidecar's own listener ports (inbound, outbound, DNS, admin), from config."""
        cfg = self.cfg
        return frozenset(p for p in (getattr(cfg, "inbound_port", 0), getattr(cfg, "outbound_port", 0),
                                     getattr(cfg, "dns_port", 0), getattr(cfg, "admin_port", 0)) if p)

    def self_connection(self, kind: str, dst: tuple[str, int]) -> bool:
        """A flow whose original destination is one of our own listeners on this pod.

        Relaying it would make the sidecar connect to itself: its upstream socket (UID 1337,
        not redirected) reaches the outbound listener, whose "original destination" is the
        same port again - a loop that used ~8,000 descriptors a second (issue 15, item 7).
        Inbound flows are addressed to this pod by construction (TPROXY); outbound ones are
        ours when the address is local (loopback or the pod's own)."""
        if dst[1] not in self.own_ports:
            return False
        return kind == "inbound" or is_local_address(dst[0])

    def _refuse_self(self, flow: Flow, transport: asyncio.Transport, dst: tuple[str, int]) -> None:
        s = flow.session
        metrics.RELAY_ERRORS.labels("self-connection").inc()
        s.verdict, s.rule, s.close_reason = "deny", "self-connection", "self-connection"
        try:
            s._alert("policy", "self-connection", blocked=True, severity=1,
                     extra={"reason": f"destination {dst[0]}:{dst[1]} is the sidecar's own listener"})
        except Exception:  # noqa: BLE001 - the refusal must happen even if the alert cannot be written
            log.exception("self-connection alert failed")
        self._refuse(flow, transport)

    def _refuse(self, flow: Flow, transport: asyncio.Transport) -> None:
        flow.closed = True
        flow.done = True
        _reset(transport)
        s = flow.session
        metrics.CONNECTIONS_TOTAL.labels(s.direction, "deny").inc()
        self.emit(s.record())

    async def _connect(self, flow: Flow, dst: tuple[str, int], peer: tuple[str, int], kind: str) -> None:
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        s = flow.session
        keep_source = kind == "inbound" and self.transparent_upstream
        try:
            sock, preserved = self._upstream_socket(family, peer[0] if keep_source else None)
        except OSError as exc:  # EMFILE/ENFILE: this flow fails, visibly; the process goes on
            metrics.RELAY_ERRORS.labels("no-descriptor").inc()
            s.close_reason = f"error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            flow.close(reset=True)
            flow.lost[TOCLIENT] = True
            return
        s.source_preserved = preserved  # false if the bind was refused or every port was taken
        try:
            tries = 0
            while True:
                try:
                    await self._sock_connect(sock, dst, self.cfg.connect_timeout)
                    break
                except OSError as exc:
                    # this source port's 4-tuple is taken (an open or TIME_WAIT upstream of the
                    # same client to the same server): another port
                    if exc.errno != errno.EADDRNOTAVAIL or not s.source_preserved:
                        raise
                tries += 1
                sock.close()
                if tries >= PORT_TRIES:
                    # upstream_ports is full towards this server.  Not the kernel's ephemeral range: its
                    # choice hashes the same (client, server, port) the client's own connect()
                    # hashed, so it would pick the very ports the client uses - collisions.
                    # This flow connects from the pod's address instead (source_preserved false).
                    metrics.RELAY_ERRORS.labels("source-ports-exhausted").inc()
                    s.source_preserved = False
                    sock, _ = self._upstream_socket(family, None)
                else:
                    sock, s.source_preserved = self._upstream_socket(family, peer[0])
            if flow.closed:
                sock.close()
                return
            server = _Side(flow, TOCLIENT)
            await self.loop.create_connection(lambda: server, sock=sock)
            if server.transport is None or server.transport.is_closing():
                # the flow was stopped inside connection_made, before uvloop adopted the socket
                # object: forget the fd so the object's finaliser cannot close a reused number
                sock.detach()
        except (OSError, TimeoutError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                reason = "upstream-timeout"
            elif getattr(exc, "errno", None) == errno.ECONNREFUSED:
                reason = "upstream-refused"
            else:
                reason = "upstream-unreachable"
            metrics.RELAY_ERRORS.labels(reason).inc()
            s.close_reason = reason
            flow.close(reset=True)
            flow.lost[TOCLIENT] = True
            return
        flow.attach_server(server)

    async def _sock_connect(self, sock: socket.socket, dst: tuple[str, int], timeout: float) -> None:
        """Non-blocking connect to a numeric address, with a timer for the timeout.

        ``loop.sock_connect`` resolves the address first (uvloop: ``getaddrinfo`` on libuv's
        thread pool for every connect, even for an IP literal) and ``wait_for`` adds a task per
        connect; ``connect_ex`` takes the literal as it is and one writer callback reports the
        result (issue 22)."""
        err = sock.connect_ex(dst)
        if err == 0:
            return
        if err != errno.EINPROGRESS:
            raise OSError(err, os.strerror(err))
        loop = self.loop
        fut = loop.create_future()
        fd = sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        def expired() -> None:
            if not fut.done():
                fut.set_exception(TimeoutError())

        loop.add_writer(fd, ready)
        timer = loop.call_later(timeout, expired)
        try:
            await fut
        finally:
            timer.cancel()
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    def _upstream_socket(self, family: int, client_addr: str | None) -> tuple[socket.socket, bool]:
        """A non-blocking socket for the upstream leg; with ``client_addr`` it is bound to the
        client's address (IP_TRANSPARENT) and a port of ``upstream_ports``, so the server sees
        the real client (the kernel's IP_LOCAL_PORT_RANGE cannot help: it only narrows the
        ephemeral range, and ours lies outside it on purpose).

        A port that is taken (EADDRINUSE: one of our own listeners, an application's listener
        in the pod, a leg still bound to it) only means "the next port": up to PORT_TRIES ports
        are tried, then this one flow connects from the pod's address.  Only a refusal of
        transparency itself (EPERM/EACCES: no CAP_NET_ADMIN) turns it off for the process -
        taking EADDRINUSE for that once made every later flow lose the client's address."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if client_addr is None:
            _own_mark(sock)
            return sock, False
        lo, hi = self.cfg.upstream_ports
        try:
            sock.setsockopt(SOL_IPV6 if family == socket.AF_INET6 else SOL_IP,
                            IPV6_TRANSPARENT if family == socket.AF_INET6 else IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
            # several upstreams may share a source port towards different servers; the kernel
            # still refuses a duplicate 4-tuple at connect() (EADDRNOTAVAIL: the next port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for _ in range(PORT_TRIES):
                try:
                    sock.bind((client_addr, self._source_port(lo, hi)))
                    return sock, True
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
            metrics.RELAY_ERRORS.labels("source-ports-exhausted").inc()
            raise _PortsBusy()
        except _PortsBusy:
            sock.close()
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise
            log.warning("cannot preserve the client address (%s); connecting from the pod", exc)
            self.transparent_upstream = False
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        _own_mark(sock)
        return sock, False

    def listening_ports(self) -> frozenset[int]:
        """Every TCP/UDP port this process listens on (config ports and the bound sockets)."""
        ports = set(self.own_ports)
        for s, _kind in getattr(self, "_specs", ()):
            try:
                ports.add(s.getsockname()[1])
            except OSError:
                pass
        return frozenset(ports)

    def _source_port(self, lo: int, hi: int) -> int:
        """The next port of ``upstream_ports``, round robin from a random start: the port a
        flow gets is the one used longest ago, so it has most likely left TIME_WAIT (random
        picks would keep hitting recent ones as the range fills).  The sidecar's own listener
        ports are never handed out (binding one fails, and the range contains them by default)."""
        skip = self._skip_ports
        if skip is None:
            skip = self._skip_ports = self.listening_ports()
        for _ in range(len(skip) + 1):
            if not lo <= self._port_cursor <= hi:
                self._port_cursor = random.randint(lo, hi)
            port = self._port_cursor
            self._port_cursor = lo if port >= hi else port + 1
            if port not in skip:
                return port
        return port

    def flow_done(self, flow: Flow) -> None:
        if flow in self.flows:
            self.flows.discard(flow)
            metrics.CONNECTIONS_ACTIVE.labels(flow.session.direction).dec()
            if flow.peer_key:
                n = self.per_peer[flow.peer_key] - 1
                if n <= 0:
                    self.per_peer.pop(flow.peer_key, None)
                else:
                    self.per_peer[flow.peer_key] = n
        s = flow.session
        end = time.time()
        metrics.CONNECTIONS_TOTAL.labels(s.direction, s.verdict).inc()
        metrics.BYTES_TOTAL.labels("toserver", s.direction).inc(s.bytes[TOSERVER])
        metrics.BYTES_TOTAL.labels("toclient", s.direction).inc(s.bytes[TOCLIENT])
        metrics.FLOW_DURATION.observe(end - s.start)
        self._ended.append((s, end))
        if len(self._ended) >= RECORD_BATCH or not self.record_interval:
            self.flush_records()
        elif self._flush_timer is None and self.loop is not None:
            self._flush_timer = self.loop.call_later(self.record_interval, self.flush_records)

    def flush_records(self) -> None:
        """Build and write the flow records of the flows that ended since the last flush.

        Off the connection path: closing a flow only queues its session; the records (JSON,
        redaction, timestamps) are made here, at most RECORD_INTERVAL later, and written in one
        write.  What can be lost: on SIGTERM nothing (run_cli flushes after the drain); if the
        worker process dies (SIGKILL, OOM) the records of flows that ended in its last
        RECORD_INTERVAL (at most RECORD_BATCH of them)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        ended, self._ended = self._ended, []
        records = []
        for s, end in ended:
            try:
                rec = s.record(end)
            except Exception:  # noqa: BLE001 - one broken session must not cost the others' records
                log.exception("flow record failed")
                continue
            rec["timestamp"] = ts_iso(end)  # when the flow ended, not when the batch was written
            records.append(rec)
        if self.emit_many is not None:
            self.emit_many(records)
        else:
            for rec in records:
                self.emit(rec)


class _Accept(_Side):
    """The client side of a new flow; it creates the Flow when the connection arrives."""

    __slots__ = ("kind", "proxy")

    def __init__(self, proxy: Proxy, kind: str) -> None:
        super().__init__(None, TOSERVER)  # type: ignore[arg-type]
        self.proxy = proxy
        self.kind = kind

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.accepted(self.kind, self, transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.flow is not None:
            self.flow.on_data(TOSERVER, data)

    def eof_received(self) -> bool:
        if self.flow is not None:
            self.flow.on_eof(TOSERVER)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.flow is not None and not self.flow.done:
            self.flow.on_lost(TOSERVER, exc)
