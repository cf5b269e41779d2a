"""The native relay's Python side: ``NativeSplicer`` stands in for ``splice.Splicer``.

The C extension (``_relay.c``) runs one thread per worker process that splices every flow handed
to it, so a spliced flow costs the event loop nothing while bytes move.  This module gives the
proxy the same interface the pure-Python pump has - ``start()``, ``close(reset, reason)``,
``on_bytes(direction, n)`` and ``on_end(reason)`` callbacks - so the flow record is written by
the same code on both relays:

- ``on_bytes`` is called with delivered bytes: once a second for a live flow that moved any (that
  keeps the flow's activity time, which the proxy's idle sweep reads, current) and with the rest
  at the end;
- ``on_end`` gets the reasons the Python pump uses: ``eof``, ``reset``, ``error:<errno>``, and
  ``idle-timeout`` when the relay's own idle timer cut the flow.

The relay thread reports through an eventfd the event loop watches; ``close`` from the loop
(reload cuts, quarantine, the end of a drain) is synchronous, so the record follows at once.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import struct
from collections.abc import Callable

try:
    from firewall.datapath import _relay
except ImportError as exc:  # no compiler at install time: the Python pump is the relay
    _relay = None  # type: ignore[assignment]
    IMPORT_ERROR = str(exc)
else:
    IMPORT_ERROR = ""

AVAILABLE = _relay is not None
PIPE_SIZE = 1 << 20
_LINGER0 = struct.pack("ii", 1, 0)
_ids = itertools.count(1)
#: the relay's own idle timeout for flows it carries (0: none); set from the config at start-up
idle_timeout = 0.0


class Hub:
    """The process's relay thread and the loop reader that receives its results.

    One per process and event loop: a worker made by ``fork`` gets its own (a thread does not
    survive ``fork``), and so does each test's event loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        assert _relay is not None
        self.loop = loop
        self.pid = os.getpid()
        self.relay = _relay.Relay(idle_timeout, PIPE_SIZE)
        self.flows: dict[int, NativeSplicer] = {}
        loop.add_reader(self.relay.fileno(), self.dispatch)

    def dispatch(self) -> None:
        """Hand the relay's results to their flows (progress counts and ends)."""
        for fid, ended, b0, b1, reason in self.relay.results():
            sp = self.flows.get(fid)
            if sp is None:
                continue
            if ended:
                del self.flows[fid]
            sp.report(b0, b1, reason if ended else None)

    def stop(self) -> None:
        """Stop the thread; flows still open are reset (used when the loop goes away)."""
        try:
            self.loop.remove_reader(self.relay.fileno())
        except (RuntimeError, ValueError, OSError):
            pass  # the loop is already closed
        self.relay.stop()


_HUB: Hub | None = None


def _forgotten_in_child() -> None:
    """A forked worker has no relay thread: it makes its own on its first spliced flow."""
    global _HUB
    _HUB = None


os.register_at_fork(after_in_child=_forgotten_in_child)


def hub(loop: asyncio.AbstractEventLoop) -> Hub:
    global _HUB
    h = _HUB
    if h is None or h.loop is not loop:  # (no getpid per flow: the fork hook clears _HUB)
        if h is not None and h.loop.is_closed():
            h.stop()
        h = _HUB = Hub(loop)
    return h


def stats() -> dict[str, int]:
    """The relay's counters in this process (empty before the first spliced flow)."""
    return _HUB.relay.stats() if _HUB is not None and _HUB.pid == os.getpid() else {}


class NativeSplicer:
    """Both directions of one flow, carried by the native relay thread.

    Takes ownership of both descriptors like ``splice.Splicer``; ``family`` is accepted for the
    same signature (the relay needs no socket objects).
    """

    native = True

    def __init__(self, loop: asyncio.AbstractEventLoop, client_fd: int, server_fd: int,
                 on_bytes: Callable[[int, int], None], on_end: Callable[[str], None],
                 family: int = socket.AF_INET) -> None:
        self.hub = hub(loop)
        self.fds = (client_fd, server_fd)
        self.on_bytes = on_bytes
        self.on_end = on_end
        self.id = next(_ids)
        self.handle: int | None = None
        self.closed = False

    def start(self) -> None:
        try:
            self.handle = self.hub.relay.add(self.id, *self.fds)
        except OSError as exc:  # e.g. ENOMEM in epoll: the flow fails visibly, the relay goes on
            self._fail(exc.errno or errno.EIO)
            return
        self.hub.flows[self.id] = self

    def _fail(self, err: int) -> None:
        for fd in self.fds:
            try:
                s = socket.socket(fileno=fd)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                s.close()
            except OSError:
                pass
        self.closed = True
        self.on_end(f"error:{err}")

    def report(self, b0: int, b1: int, reason: str | None) -> None:
        if b0:
            self.on_bytes(0, b0)
        if b1:
            self.on_bytes(1, b1)
        if reason is not None and not self.closed:
            self.closed = True
            self.on_end(reason)

    def close(self, reset: bool, reason: str) -> None:
        """Cut the flow now (RST when ``reset``); ``on_end(reason)`` runs before this returns."""
        if self.closed or self.handle is None:
            return
        got = self.hub.relay.close(self.handle, reset)
        if got is None:  # the relay ended it first: its end (and reason) is in the result queue
            self.hub.dispatch()
            return
        self.hub.flows.pop(self.id, None)
        self.report(got[0], got[1], reason)
