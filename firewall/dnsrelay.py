"""DNS over UDP through the sidecar (outbound queries to port 53).

The redirect rules reroute the pod's UDP/53 through ``lo`` and ``tproxy`` it to
this transparent socket; IP_RECVORIGDSTADDR tells which server the application
asked.  The query is forwarded to that server from an ordinary socket marked with
the sidecar's SO_MARK (never recaptured) and the answer is sent back from a
transparent socket bound to the server's address, so the application's resolver accepts it.  Each exchange is
one flow record; answers feed the FQDN cache that ``fqdn`` policy peers use.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Any

from firewall import metrics
from firewall.protocols.base import TOCLIENT, TOSERVER
from firewall.redirect import mark_own as _own_mark
from firewall.session import Session

log = logging.getLogger("palisade.dns")

SOL_IP, SOL_IPV6 = 0, 41
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
IP_ORIGDSTADDR, IPV6_ORIGDSTADDR = 20, 74
MAX_PENDING = 1024
QUERY_TIMEOUT = 5.0


def _parse_origdst(ancdata: list, family: int) -> tuple[str, int] | None:
    for level, typ, data in ancdata:
        if family == socket.AF_INET and level == SOL_IP and typ == IP_ORIGDSTADDR:
            port = struct.unpack_from("!H", data, 2)[0]
            return socket.inet_ntoa(data[4:8]), port
        if family == socket.AF_INET6 and level == SOL_IPV6 and typ == IPV6_ORIGDSTADDR:
            port = struct.unpack_from("!H", data, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


class _Pending:
    __slots__ = ("session", "client", "server", "sock", "deadline", "query")

    def __init__(self, session: Session, client: tuple, server: tuple, sock: socket.socket, query: bytes):
        self.session, self.client, self.server, self.sock, self.query = session, client, server, sock, query
        self.deadline = time.monotonic() + QUERY_TIMEOUT


class DnsRelay:
    def __init__(self, proxy: Any, sock: socket.socket) -> None:
        self.proxy = proxy
        self.sock = sock
        self.family = sock.family
        self.pending: dict[int, _Pending] = {}
        self._timer = None

    async def start(self) -> None:
        self.proxy.loop.add_reader(self.sock.fileno(), self._on_query)
        self._timer = self.proxy.loop.call_later(1.0, self._expire)

    def close(self) -> None:
        try:
            self.proxy.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        if self._timer:
            self._timer.cancel()

    def _on_query(self) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, client = self.sock.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                metrics.RELAY_ERRORS.labels("dns-recv").inc()
                log.debug("dns recv: %s", exc)
                return
            orig = _parse_origdst(anc, self.family)
            if orig is None:
                metrics.RELAY_ERRORS.labels("dns-origdst").inc()
                continue
            self._relay(data, client[:2], orig)

    def _relay(self, query: bytes, client: tuple, server: tuple) -> None:
        insp = self.proxy.inspection
        s = Session(insp, "outbound", client, server, proto="UDP")
        s.app_proto = "dns"
        s.bytes[TOSERVER] += len(query)
        if not s.open():
            metrics.DNS_QUERIES.labels("deny").inc()
            self.proxy.emit(s.record())
            return
        ev = self._parse(query, TOSERVER)
        if ev is not None:
            stop = s._on_event(ev)
            if stop is not None:
                s.close_reason = "denied"
                metrics.DNS_QUERIES.labels("deny").inc()
                self.proxy.emit(s.record())
                return
        if len(self.pending) >= MAX_PENDING:
            metrics.RELAY_ERRORS.labels("dns-overload").inc()
            return
        try:
            up = socket.socket(self.family, socket.SOCK_DGRAM)
            up.setblocking(False)
            _own_mark(up)  # the redirect exempts the sidecar's mark, not its user
            up.connect(server)
            up.send(query)
        except OSError as exc:
            s.close_reason = "upstream-unreachable"
            log.debug("dns forward: %s", exc)
            self.proxy.emit(s.record())
            return
        p = _Pending(s, client, server, up, query)
        self.pending[up.fileno()] = p
        self.proxy.loop.add_reader(up.fileno(), self._on_answer, p)

    def _parse(self, data: bytes, d: int) -> Any:
        try:
            from firewall.protocols.dns import parse_message

            return parse_message(data, d)
        except Exception:  # noqa: BLE001 - garbage in a datagram is not a reason to stop
            return None

    def _finish(self, p: _Pending) -> None:
        try:
            self.proxy.loop.remove_reader(p.sock.fileno())
        except (ValueError, OSError):
            pass
        self.pending.pop(p.sock.fileno(), None)
        p.sock.close()
        self.proxy.emit(p.session.record())

    def _on_answer(self, p: _Pending) -> None:
        try:
            answer = p.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            p.session.close_reason = "upstream-refused"
            self._finish(p)
            return
        s = p.session
        s.bytes[TOCLIENT] += len(answer)
        ev = self._parse(answer, TOCLIENT)
        if ev is not None:
            s._on_event(ev)
            s._l7_summary = {"queries": [ev.fields.get("qname")], "qtype": ev.fields.get("qtype"),
                             "rcode": ev.fields.get("rcode"), "answers": len(ev.fields.get("answers") or [])}
        try:
            out = socket.socket(self.family, socket.SOCK_DGRAM)
            if self.family == socket.AF_INET6:
                out.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                out.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            out.bind(p.server)
            out.sendto(answer, p.client)
            out.close()
            metrics.DNS_QUERIES.labels("allow").inc()
        except OSError as exc:
            metrics.RELAY_ERRORS.labels("dns-reply").inc()
            log.warning("dns reply to %s from %s:%d failed: %s", p.client[0], p.server[0], p.server[1], exc)
            s.close_reason = "reply-failed"
        self._finish(p)

    def _expire(self) -> None:
        now = time.monotonic()
        for p in list(self.pending.values()):
            if p.deadline < now:
                p.session.close_reason = "upstream-timeout"
                self._finish(p)
        self._timer = self.proxy.loop.call_later(1.0, self._expire)
