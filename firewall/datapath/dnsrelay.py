"""DNS over UDP through the sidecar (outbound queries to port 53).

The redirect rules reroute the pod's UDP/53 through ``lo`` and ``tproxy`` it to
this transparent socket; IP_RECVORIGDSTADDR tells which server the application
asked.  The query is forwarded to that server from an ordinary socket marked with
the sidecar's SO_MARK (never recaptured) and the answer is sent back from a transparent socket bound to
the server's address, so the application's resolver accepts it.  Each exchange is
one flow record; answers feed the FQDN cache that ``fqdn`` policy peers use, but
only an answer whose ID and question match the query (``Session._learn_dns``),
received on the socket connected to the server the query went to.

The reply socket for a server address is kept open and read like the listener.
While a transparent socket is bound to ``server:53``, the application's next query
to that server is delivered to *it* rather than to the listener (the prerouting
rule ``socket transparent 1 ... accept`` and the kernel's UDP lookup find it
before ``tproxy``), so the old per-answer socket, closed right after sending, lost
every query that arrived meanwhile (~25 % with 6 clients x 30 queries in flight).
A long-lived socket that also reads queries closes that window; at most
``MAX_REPLY_SOCKETS`` are kept (least recently used closed first).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections import OrderedDict
from typing import Any

from firewall.datapath.redirect import mark_own as _own_mark
from firewall.datapath.session import Session
from firewall.observe import metrics
from firewall.protocols.base import TOCLIENT, TOSERVER

log = logging.getLogger("palisade.dns")

SOL_IP, SOL_IPV6 = 0, 41
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
IP_ORIGDSTADDR, IPV6_ORIGDSTADDR = 20, 74
MAX_PENDING = 1024
QUERY_TIMEOUT = 5.0
MAX_REPLY_SOCKETS = 64
MAX_STRAY_ANSWERS = 8  # datagrams that do not answer the query, per query, before giving up
RCVBUF = 4 << 20  # a burst of queries waits in the kernel, not dropped, while one is relayed
SO_RCVBUFFORCE = 33


def _big_rcvbuf(sock: socket.socket) -> None:
    """Beyond net.core.rmem_max when CAP_NET_ADMIN allows (the sidecar keeps it)."""
    for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
            return
        except OSError:
            continue


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
    __slots__ = ("session", "client", "server", "sock", "deadline", "query", "key", "strays")

    def __init__(self, session: Session, client: tuple, server: tuple, sock: socket.socket, query: bytes,
                 key: tuple | None = None):
        self.session, self.client, self.server, self.sock, self.query = session, client, server, sock, query
        self.key = key  # (id, qname, qtype) of the query, when it parsed
        self.strays = 0
        self.deadline = time.monotonic() + QUERY_TIMEOUT


def _answer_key(ev: Any) -> tuple | None:
    from firewall.protocols.dns import query_key

    return None if ev is None or ev.kind not in ("query", "answer") else query_key(ev.fields)


class DnsRelay:
    def __init__(self, proxy: Any, sock: socket.socket) -> None:
        self.proxy = proxy
        self.sock = sock
        self.family = sock.family
        self.pending: dict[int, _Pending] = {}
        self._timer = None
        self._reply: OrderedDict[tuple, socket.socket] = OrderedDict()
        _big_rcvbuf(sock)

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
        while self._reply:
            self._drop_reply(next(iter(self._reply)), drain=False)

    def _on_query(self, sock: socket.socket | None = None, bound: tuple | None = None) -> None:
        """Queries from the tproxy listener, or from a reply socket bound to ``bound``."""
        sock = sock or self.sock
        for _ in range(64):
            try:
                data, anc, _flags, client = sock.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                metrics.RELAY_ERRORS.labels("dns-recv").inc()
                log.debug("dns recv: %s", exc)
                return
            orig = bound or _parse_origdst(anc, self.family)
            if orig is None:
                metrics.RELAY_ERRORS.labels("dns-origdst").inc()
                continue
            self._relay(data, client[:2], orig)

    def _reply_socket(self, server: tuple) -> socket.socket:
        """The transparent socket bound to ``server`` that answers come from (kept open, read
        for queries: see the module docstring)."""
        out = self._reply.get(server)
        if out is not None:
            self._reply.move_to_end(server)
            return out
        out = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            if self.family == socket.AF_INET6:
                out.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                out.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            out.setblocking(False)
            _big_rcvbuf(out)
            out.bind(server)
        except OSError:
            out.close()
            raise
        self._reply[server] = out
        self.proxy.loop.add_reader(out.fileno(), self._on_query, out, server)
        while len(self._reply) > MAX_REPLY_SOCKETS:
            self._drop_reply(next(iter(self._reply)))
        return out

    def _drop_reply(self, server: tuple, drain: bool = True) -> None:
        out = self._reply.pop(server, None)
        if out is None:
            return
        try:
            self.proxy.loop.remove_reader(out.fileno())
        except (ValueError, OSError):
            pass
        if drain:
            self._on_query(out, server)  # queries already queued on it are relayed, not lost
        out.close()

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
        p = _Pending(s, client, server, up, query, _answer_key(ev))
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
            answer, src = p.sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            p.session.close_reason = "upstream-refused"
            self._finish(p)
            return
        s = p.session
        s.bytes[TOCLIENT] += len(answer)
        ev = self._parse(answer, TOCLIENT)
        # the upstream socket is connected, so the kernel only hands us the server's datagrams;
        # checked again here because the FQDN cache must never learn from anyone else
        from_server = tuple(src[:2]) == tuple(p.server[:2])
        matches = from_server and ev is not None and ev.kind == "answer" and p.key is not None and (
            _answer_key(ev) == p.key  # the answer; or an error without a question (FORMERR) for it
            or (ev.fields.get("id") == p.key[0] and not ev.fields.get("qname")))
        if ev is not None and from_server:
            s._on_event(ev)  # learns only from an answer to this query (Session._learn_dns)
            s._l7_summary = {"queries": [ev.fields.get("qname")], "qtype": ev.fields.get("qtype"),
                             "rcode": ev.fields.get("rcode"), "answers": len(ev.fields.get("answers") or [])}
        try:
            self._reply_socket(p.server).sendto(answer, p.client)
            if matches or p.key is None:
                metrics.DNS_QUERIES.labels("allow").inc()
        except OSError as exc:
            metrics.RELAY_ERRORS.labels("dns-reply").inc()
            log.warning("dns reply to %s from %s:%d failed: %s", p.client[0], p.server[0], p.server[1], exc)
            s.close_reason = "reply-failed"
            self._finish(p)
            return
        if matches or p.key is None:
            self._finish(p)
            return
        # not the answer to this query (wrong ID or question): passed on for the client to
        # discard, never learned; keep waiting for the real one (bounded)
        p.strays += 1
        metrics.RELAY_ERRORS.labels("dns-stray-answer").inc()
        if p.strays >= MAX_STRAY_ANSWERS:
            s.close_reason = "stray-answers"
            self._finish(p)

    def _expire(self) -> None:
        now = time.monotonic()
        for p in list(self.pending.values()):
            if p.deadline < now:
                p.session.close_reason = "upstream-timeout"
                self._finish(p)
        self._timer = self.proxy.loop.call_later(1.0, self._expire)
