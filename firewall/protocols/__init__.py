"""L7 protocol identification and parsers (sans-IO: bytes in, ``L7Event``s out).

Two steps per flow, both driven by the session with the bytes it relays:

1. ``Identifier(dest_port).feed(data, direction)`` looks at the first bytes of
   each direction and names the protocol (``http``, ``http2``, ``tls``, ``ssh``,
   ``dns``, ``redis``, ``pgsql``, ``mysql``) or ``unknown``. Every protocol in
   ``REGISTRY`` has a probe per direction it may speak first in; a probe answers
   match / no match / need more. The answer is ``unknown`` as soon as every
   candidate said no (usually on the first byte), so a client is never kept
   waiting for bytes it will not send. Server-first protocols (MySQL's greeting,
   an SSH server banner) are recognised from server-to-client bytes. Ports only
   break ties, and never against a protocol with an unambiguous signature
   (``strong``: SSH's ``SSH-``, a complete TLS ClientHello, the HTTP/2 preface): an
   SSH ident that is also a valid HTTP request line is SSH on port 80 too.

   Identification cannot be steered by a prefix: TLS needs a complete, consistent
   ClientHello (six bytes of a record header are not TLS), SSH is any ``SSH-``
   line (``SSH-2.00-x`` is SSH to OpenSSH), HTTP is request-line grammar.  Each
   protocol has its own depth (a ClientHello may need 16 KiB); a probe still
   undecided at its depth is recorded in ``undecided`` and the answer is
   ``unknown`` - the session hands such a flow to the exception policy
   (``Stage.IDENTIFY``) instead of treating it as an ordinary unknown protocol.
2. ``make_parser(app_proto)`` returns the protocol's incremental parser, fed the
   stream again from offset 0. Parsers never raise (bad input is an ``anomaly``
   event), buffer only bounded message heads, and skip bodies by counting.

The registry is one explicit list - no import side effects, no plugin magic -
in the order that breaks ties when no port hint applies.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firewall.protocols import dns, http, http2, mysql, pgsql, redis, ssh, tls
from firewall.protocols.base import (
    SCHEMAS,
    TOCLIENT,
    TOSERVER,
    EventFields,
    L7Event,
    ParseError,
    Parser,
    Probe,
    declare_fields,
)

ProbeFn = Callable[[bytes], Probe]

# Field sets of the parsers that still build dicts (the typed ones register their dataclasses
# where they are defined).  tests/protocols/test_event_fields.py runs every parser and checks
# that what it emits is declared here, and policy_match resolves what it reads against these.
declare_fields("http", "request", ("method", "host", "path", "version", "content_length", "chunked",
                                   "content_encoding", "content_type", "upgrade", "head_end"))
declare_fields("http", "response", ("status", "version", "content_length", "chunked", "content_encoding",
                                    "content_type"))
declare_fields(("http2", "grpc"), "request", ("method", "authority", "path", "scheme", "content_type",
                                              "stream_id", "content_encoding", "end_stream"))
declare_fields(("http2", "grpc"), "response", ("status", "grpc_status", "grpc_message", "content_type",
                                               "stream_id", "trailers", "end_stream"))
declare_fields("dns", ("query"), ("id", "qname", "qtype", "opcode", "rcode", "answers", "response",
                                   "qdcount", "ancount", "nscount", "arcount"))
declare_fields("dns", ("answer"), ("id", "qname", "qtype", "opcode", "rcode", "answers", "response",
                                    "qdcount", "ancount", "nscount", "arcount"))


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """One protocol: how to recognise it and how to parse it."""

    name: str
    ports: frozenset[int]
    probe_toserver: ProbeFn | None  # None: never speaks first client-to-server
    probe_toclient: ProbeFn | None  # None: never speaks first server-to-client
    min_depth: int  # bytes a probe needs before it can say MATCH (it may say NO_MATCH sooner)
    max_depth: int  # bytes after which NEED_MORE counts as undecided
    parser: Callable[..., Parser]
    strong: bool = False  # a match is unambiguous: port hints cannot override it

    def probe(self, direction: int) -> ProbeFn | None:
        return self.probe_toserver if direction == TOSERVER else self.probe_toclient


REGISTRY: list[ProtocolSpec] = [
    ProtocolSpec("http2", http2.DEFAULT_PORTS, http2.probe_toserver, http2.probe_toclient,
                 len(http2.PREFACE), 2048, http2.Http2Parser, strong=True),
    ProtocolSpec("ssh", ssh.DEFAULT_PORTS, ssh.probe_toserver, ssh.probe_toclient, 4, 2048, ssh.SshParser,
                 strong=True),
    ProtocolSpec("tls", tls.DEFAULT_PORTS, tls.probe_toserver, None, 46, tls.PROBE_DEPTH, tls.TlsParser,
                 strong=True),
    ProtocolSpec("http", http.DEFAULT_PORTS, http.probe_toserver, None, 5, 2048, http.HttpParser),
    ProtocolSpec("dns", dns.DEFAULT_PORTS, dns.probe_toserver, None, 15, 15, dns.DnsTcpParser),
    ProtocolSpec("redis", redis.DEFAULT_PORTS, redis.probe_toserver, None, 5, 16, redis.RedisParser),
    ProtocolSpec("pgsql", pgsql.DEFAULT_PORTS, pgsql.probe_toserver, None, 8, 8, pgsql.PgsqlParser),
    ProtocolSpec("mysql", mysql.DEFAULT_PORTS, None, mysql.probe_toclient, 6, 70, mysql.MysqlParser),
]

#: the identifier's default per-direction bound: the deepest protocol's depth
MAX_DEPTH = max(spec.max_depth for spec in REGISTRY)

_BY_NAME: dict[str, ProtocolSpec] = {spec.name: spec for spec in REGISTRY}
_ALIASES = {"grpc": "http2"}
UNKNOWN = "unknown"


class Identifier:
    """Decides a flow's ``app_proto`` from the first bytes of either direction.

    ``feed`` returns the name once decided (and keeps returning it), ``None``
    while some protocol still needs more bytes. At most ``max_depth`` bytes per
    direction are kept (by default the deepest protocol's depth); a probe still
    undecided at its own depth (or ``max_depth``) is ruled out and named in
    ``undecided``, so a decision always comes within ``max_depth`` bytes and the
    caller can tell "nothing matched" (``unknown``) from "could not decide"
    (``unknown`` with ``undecided`` set). Never raises.
    """

    __slots__ = ("dest_port", "max_depth", "result", "undecided", "_bufs", "_alive")

    def __init__(self, dest_port: int, max_depth: int | None = None) -> None:
        self.dest_port = dest_port
        self.max_depth = max(1, max_depth if max_depth is not None else MAX_DEPTH)
        self.result: str | None = None
        self.undecided: tuple[str, ...] = ()
        self._bufs = (bytearray(), bytearray())
        self._alive: list[ProtocolSpec] = list(REGISTRY)

    @staticmethod
    def holds(direction: int) -> bool:
        """Whether the session must hold ``direction``'s bytes while identifying.

        Client bytes: yes (the first request must meet its rules before it leaves).
        Server bytes: no - a server-first protocol's banner must reach its client so the
        client speaks (an SMTP banner stays SSH-possible until then, RFC 4253 4.2), and
        the chunk that identifies a server-first protocol is decided before it is
        forwarded anyway."""
        return direction == TOSERVER

    def feed(self, data: bytes, direction: int) -> str | None:
        if self.result is not None or not data:
            return self.result
        buf = self._bufs[direction]
        room = self.max_depth - len(buf)
        if room > 0:
            buf += data[:room]
        view = bytes(buf)
        matched: list[ProtocolSpec] = []
        alive: list[ProtocolSpec] = []
        cut: list[str] = list(self.undecided)
        for spec in self._alive:
            probe = spec.probe(direction)
            if probe is None:
                continue
            depth = min(spec.max_depth, self.max_depth)
            try:
                answer = probe(view[:depth])
            except Exception:  # noqa: BLE001 - a probe bug must not break the flow
                answer = Probe.NO_MATCH
            if answer is Probe.MATCH:
                matched.append(spec)
            elif answer is Probe.NEED_MORE:
                if len(view) < depth:
                    alive.append(spec)
                else:
                    cut.append(spec.name)
        self.undecided = tuple(dict.fromkeys(cut))
        if matched:
            self.undecided = ()
            strong = [s for s in matched if s.strong]
            hinted = [s for s in matched if self.dest_port in s.ports]
            self.result = (strong or hinted or matched)[0].name
        elif not alive:
            self.result = UNKNOWN
        self._alive = alive
        return self.result

    def eof(self, direction: int) -> str | None:
        """The peer half-closed ``direction``: protocols still waiting on it are ruled out."""
        if self.result is None and self._bufs[direction]:
            self._alive = [s for s in self._alive if s.probe(direction) is None]
            if not self._alive:
                self.result = UNKNOWN
        return self.result


def make_parser(app_proto: str, **options: Any) -> Parser | None:
    """A fresh parser for an identified flow; ``None`` for ``unknown``.

    ``options`` reach the constructors that take them (``max_head=8192`` bounds
    HTTP/1.x and HTTP/2 heads); others ignore them, so the session can pass one
    configuration to every parser.
    """
    spec = _BY_NAME.get(_ALIASES.get(app_proto, app_proto))
    if spec is None:
        return None
    accepted = inspect.signature(spec.parser).parameters
    return spec.parser(**{k: v for k, v in options.items() if k in accepted})


def make_udp_parser(app_proto: str) -> Parser | None:
    """Parser for a UDP flow: each ``feed`` is one datagram (only DNS today)."""
    return dns.DnsUdpParser() if app_proto == "dns" else None


__all__ = [
    "REGISTRY", "ProtocolSpec", "Identifier", "make_parser", "make_udp_parser", "UNKNOWN", "MAX_DEPTH",
    "SCHEMAS", "EventFields", "L7Event", "ParseError", "Parser", "Probe", "TOSERVER", "TOCLIENT",
]
