"""Zero-copy relay for flows that need no further inspection.

Once a flow's verdict is final and nothing will read its bytes again (L4-only
flows, TLS after the handshake when no DLP applies, unknown protocols with no DLP
action), the bytes no longer need to enter Python.  The flow's two sockets are
taken over from their asyncio transports (``dup`` the fd, close the transport,
which does not shut the connection down) and each direction is moved with
``splice(2)`` through a kernel pipe: socket -> pipe -> socket, never copied to
user space.  Backpressure is the pipe: while it holds bytes the destination
could not take, the source is not read.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import time
from collections.abc import Callable

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
_LINGER0 = struct.pack("ii", 1, 0)
AVAILABLE = hasattr(os, "splice")
_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH)


class Pump:
    """One direction: ``src`` fd -> pipe -> ``dst`` fd."""

    __slots__ = ("splicer", "d", "src", "dst", "r", "w", "inpipe", "eof", "done", "reading", "writing",
                 "size")

    def __init__(self, splicer: Splicer, d: int, src: int, dst: int) -> None:
        self.splicer, self.d, self.src, self.dst = splicer, d, src, dst
        self.r = self.w = -1  # the pipe is made on the first byte: idle flows cost no descriptors
        self.size = 65536
        self.inpipe = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self._want_read(True)

    def _want_read(self, on: bool) -> None:
        loop = self.splicer.loop
        if on and not self.reading:
            loop.add_reader(self.src, self.on_readable)
            self.reading = True
        elif not on and self.reading:
            loop.remove_reader(self.src)
            self.reading = False

    def _want_write(self, on: bool) -> None:
        loop = self.splicer.loop
        if on and not self.writing:
            loop.add_writer(self.dst, self.on_writable)
            self.writing = True
        elif not on and self.writing:
            loop.remove_writer(self.dst)
            self.writing = False

    def on_readable(self) -> None:
        if self.done or self.inpipe:
            return
        if self.w < 0:
            try:
                self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:  # EMFILE: fail this flow, not the process
                self.splicer.failed(exc)
                return
            try:
                self.size = fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                self.size = 65536
        try:
            n = os.splice(self.src, self.w, self.size, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.splicer.failed(exc)
            return
        if n == 0:
            self.eof = True
            self._want_read(False)
            self._finish_direction()
            return
        self.inpipe += n
        self.splicer.count(self.d, n)
        self.drain()

    def on_writable(self) -> None:
        self.drain()

    def drain(self) -> None:
        while self.inpipe:
            try:
                m = os.splice(self.r, self.dst, self.inpipe, flags=_FLAGS)
            except BlockingIOError:
                self._want_read(False)
                self._want_write(True)
                return
            except OSError as exc:
                self.splicer.failed(exc)
                return
            self.inpipe -= m
        self._want_write(False)
        if self.eof:
            self._finish_direction()
        elif not self.done:
            self._want_read(True)

    def _finish_direction(self) -> None:
        if self.inpipe or self.done:
            return
        self.done = True
        try:  # pass the half-close on (FIN) without closing our descriptor
            s = socket.socket(fileno=os.dup(self.dst))
            s.shutdown(socket.SHUT_WR)
            s.close()
        except OSError:
            pass
        self.splicer.direction_done(self.d)

    def stop(self) -> None:
        self._want_read(False)
        self._want_write(False)
        for fd in (self.r, self.w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.r = self.w = -1


class Splicer:
    """Both directions of one flow; reports bytes and the end to the flow."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client_fd: int, server_fd: int,
                 on_bytes: Callable[[int, int], None], on_end: Callable[[str], None]) -> None:
        self.loop = loop
        self.fds = (client_fd, server_fd)
        self.on_bytes = on_bytes
        self.on_end = on_end
        self.pumps = (Pump(self, 0, client_fd, server_fd), Pump(self, 1, server_fd, client_fd))
        self.closed = False
        self.last = time.monotonic()

    def start(self) -> None:
        for p in self.pumps:
            p.start()

    def count(self, d: int, n: int) -> None:
        self.last = time.monotonic()
        self.on_bytes(d, n)

    def direction_done(self, d: int) -> None:
        if all(p.done for p in self.pumps):
            self.close(reset=False, reason="eof")

    def failed(self, exc: OSError) -> None:
        reason = "reset" if exc.errno in _RESET_ERRNOS else f"error:{exc.errno}"
        self.close(reset=True, reason=reason)

    def close(self, reset: bool, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        for p in self.pumps:
            p.stop()
        for fd in self.fds:
            if reset:
                try:
                    s = socket.socket(fileno=os.dup(fd))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                    s.close()
                except OSError:
                    pass
            try:
                os.close(fd)
            except OSError:
                pass
        self.on_end(reason)
