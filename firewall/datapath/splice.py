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


class PipePool:
    """Spare pipes shared by every flow of this process.

    A direction needs a pipe only while bytes sit in it, i.e. while its destination
    cannot take them; a wake-up that moves everything through returns the pipe at
    once.  So 10,000 idle (or lightly used) spliced flows hold two socket
    descriptors each, like nginx, instead of six, and only flows stalled on a slow
    receiver own a pipe.
    """

    def __init__(self, spare: int = 8) -> None:
        self.spare = spare
        self.free: list[tuple[int, int, int]] = []

    def get(self) -> tuple[int, int, int]:
        """A pipe ``(r, w, capacity)``; raises OSError (EMFILE/ENFILE) when none can be made."""
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            size = 65536
        return r, w, size

    def put(self, r: int, w: int, size: int) -> None:
        """Take back an empty pipe (a pipe that may hold bytes must be closed instead)."""
        if len(self.free) < self.spare:
            self.free.append((r, w, size))
            return
        close_pipe(r, w)


def close_pipe(r: int, w: int) -> None:
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


POOL = PipePool()


class Pump:
    """One direction: ``src`` fd -> pipe -> ``dst`` fd.

    Per wake-up it moves as much as both sockets allow (several splices) instead of
    one pipe-full, because the cost of this relay is the Python callback per readiness
    event, not the bytes.  While bytes wait in the pipe for a full destination, reading
    pauses (that is the backpressure) and the pipe stays with this direction.  When no pipe can be
    made (EMFILE/ENFILE) the direction degrades to a user-space copy instead of
    failing the flow: allowed bytes are never dropped for want of a descriptor.
    """

    __slots__ = ("splicer", "d", "src", "dst", "r", "w", "inpipe", "eof", "done", "reading", "writing",
                 "size", "copybuf")

    #: splice rounds per wake-up (bounded so one busy flow cannot starve the others)
    ROUNDS = 8

    def __init__(self, splicer: Splicer, d: int, src: int, dst: int) -> None:
        self.splicer, self.d, self.src, self.dst = splicer, d, src, dst
        self.r = self.w = -1  # the pipe is made on the first byte: idle flows cost no descriptors
        self.size = 65536
        self.inpipe = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.copybuf: bytes | None = None  # user-space fallback when no pipe could be made

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

    def _take_pipe(self) -> bool:
        try:
            self.r, self.w, self.size = POOL.get()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.copybuf = b""  # degrade this direction to read/write copies
                return False
            self.splicer.failed(exc)
            return False
        return True

    def _give_pipe(self) -> None:
        """Back to the pool once empty: idle flows hold no pipe descriptors."""
        if self.r >= 0 and not self.inpipe:
            POOL.put(self.r, self.w, self.size)
            self.r = self.w = -1
        if self.copybuf == b"":
            self.copybuf = None  # try a pipe again next time

    def on_readable(self) -> None:
        if self.done or self.inpipe:
            return
        if self.w < 0 and self.copybuf is None and not self._take_pipe():
            if self.copybuf is None:
                return  # failed() closed the flow
        if self.copybuf is not None:
            self._copy_read()
            return
        total = 0
        for _ in range(self.ROUNDS):
            want = self.size - self.inpipe
            try:
                n = os.splice(self.src, self.w, want, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                self.splicer.failed(exc)
                return
            if n == 0:
                self.eof = True
                self._want_read(False)
                break
            self.inpipe += n
            total += n
            if not self._push():
                break  # destination full: on_writable continues
            if n < want:
                # a short splice drained the socket's receive queue: another call would only
                # return EAGAIN (a raised BlockingIOError); level-triggered readiness wakes us
                # again if more arrived meanwhile
                break
        if total:
            self.splicer.count(self.d, total)
        self._settle()

    def _push(self) -> bool:
        """Move the pipe's bytes to the destination; False when it would block."""
        while self.inpipe:
            try:
                m = os.splice(self.r, self.dst, self.inpipe, flags=_FLAGS)
            except BlockingIOError:
                return False
            except OSError as exc:
                self.splicer.failed(exc)
                return False
            self.inpipe -= m
        return True

    def _settle(self) -> None:
        """Register for what comes next: writability while bytes wait, else readability."""
        if self.splicer.closed:
            return
        if self.inpipe:
            self._want_read(False)
            self._want_write(True)
            return
        self._give_pipe()
        self._want_write(False)
        if self.eof:
            self._finish_direction()
        elif not self.done:
            self._want_read(True)

    def on_writable(self) -> None:
        if self.copybuf is not None:
            self._copy_write()
            return
        self._push()
        self._settle()

    # -- user-space fallback (no pipe descriptor available)
    def _copy_read(self) -> None:
        try:
            data = os.read(self.src, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.splicer.failed(exc)
            return
        if not data:
            self.eof = True
            self._want_read(False)
            if not self.copybuf:
                self._finish_direction()
            return
        self.splicer.count(self.d, len(data))
        self.copybuf = data
        self.inpipe = len(data)
        self._copy_write()

    def _copy_write(self) -> None:
        buf = self.copybuf or b""
        while buf:
            try:
                m = os.write(self.dst, buf)
            except BlockingIOError:
                break
            except OSError as exc:
                self.splicer.failed(exc)
                return
            buf = buf[m:]
        self.copybuf = buf
        self.inpipe = len(buf)
        self._settle()

    def _finish_direction(self) -> None:
        if self.inpipe or self.done:
            return
        self.done = True
        try:  # pass the half-close on (FIN): one shutdown(2), no dup
            self.splicer.socks[1 - self.d].shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.splicer.direction_done(self.d)

    def stop(self) -> None:
        self._want_read(False)
        self._want_write(False)
        if self.r >= 0:
            if self.inpipe:
                close_pipe(self.r, self.w)  # bytes nobody will read: not reusable
            else:
                POOL.put(self.r, self.w, self.size)
        self.r = self.w = -1


class Splicer:
    """Both directions of one flow; reports bytes and the end to the flow."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client_fd: int, server_fd: int,
                 on_bytes: Callable[[int, int], None], on_end: Callable[[str], None],
                 family: int = socket.AF_INET) -> None:
        self.loop = loop
        self.fds = (client_fd, server_fd)
        # socket objects over the same descriptors, for shutdown/setsockopt without a dup;
        # family and type given, so making them costs no getsockopt calls
        self.socks = (socket.socket(family, socket.SOCK_STREAM, 0, client_fd),
                      socket.socket(family, socket.SOCK_STREAM, 0, server_fd))
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
        for sock in self.socks:
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                except OSError:
                    pass
            try:
                sock.close()
            except OSError:
                pass
        self.on_end(reason)


#: values of the ``relay`` setting (``--relay``): ``auto`` is the native relay when its extension
#: imports, else this module's pump
RELAYS = ("auto", "native", "python")


class RelayUnavailable(RuntimeError):
    """``relay: native`` was asked for but the extension did not import."""


def relay_class(mode: str = "auto", idle_timeout: float = 0.0) -> Callable[..., Splicer]:
    """The splicer the proxy makes for each handed-over flow, chosen once at start-up.

    Both take ``(loop, client_fd, server_fd, on_bytes, on_end, family)`` and own the two
    descriptors from then on; ``idle_timeout`` is the native relay's own idle timer (the Python
    pump leaves idle flows to the proxy's sweep).
    """
    if mode not in RELAYS:
        raise ValueError(f"relay: expected one of {', '.join(RELAYS)}, got {mode!r}")
    if mode == "python":
        return Splicer
    from firewall.datapath import native_relay

    if native_relay.AVAILABLE:
        native_relay.idle_timeout = idle_timeout
        return native_relay.NativeSplicer  # type: ignore[return-value]
    if mode == "native":
        raise RelayUnavailable(f"relay native: the extension did not import ({native_relay.IMPORT_ERROR}); "
                               "reinstall with a C compiler, or use --relay python")
    return Splicer
