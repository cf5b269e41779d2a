"""A loopback TCP relay in front of the API server that a test can cut, and that counts what
passes: the identity resolver's API load (connections, bytes) and its reconnects are measured
on the wire, not guessed. TLS passes through untouched (the resolver still verifies the API
server's certificate)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Counters:
    connections: int = 0
    bytes_up: int = 0       # client -> API server (requests)
    bytes_down: int = 0     # API server -> client (lists, watch events)


@dataclass
class TcpProxy:
    target_port: int
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, name="tcpproxy", daemon=True).start()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until ``restore``."""
        self._cut.set()
        with self._lock:
            socks, self._open = set(self._open), set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
                self.counters.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream, "bytes_up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "bytes_down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    setattr(self.counters, counter, getattr(self.counters, counter) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
