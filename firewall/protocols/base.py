"""Contracts shared by every protocol parser (sans-IO, incremental, bounded).

A protocol module provides ``probe(buf, direction) -> Probe`` and a ``Parser``
class with ``feed(data, direction) -> list[L7Event]``.  Offsets are absolute
byte offsets in that direction's stream, counted from the first byte of the flow,
so the session can cut a stream exactly at a message boundary (deny the second
request of a pipelined connection without touching the first).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

TOSERVER = 0  # client -> server
TOCLIENT = 1  # server -> client


class Probe(enum.Enum):
    MATCH = "match"
    NO_MATCH = "no-match"
    NEED_MORE = "need-more"


@dataclass(frozen=True, slots=True)
class L7Event:
    """One protocol-level fact, e.g. an HTTP request head or a TLS ClientHello.

    ``kind`` is one of: request, response, hello, server_hello, alert (TLS), banner,
    query, answer, command, startup, greeting (MySQL), login (MySQL), statement,
    stream, anomaly.  ``fields`` holds the protocol's
    names from the issue (method/host/path/status, sni/alpn/version, qname/qtype/rcode,
    command/keys, user/database/verb, software ...).  ``offset`` is where the message
    starts in its direction's stream; ``end`` where it ends (or -1 if the body is
    still streaming).
    """

    app_proto: str
    kind: str
    direction: int
    offset: int
    fields: dict[str, Any] = field(default_factory=dict)
    end: int = -1
    anomaly: str | None = None


class ParseError(Exception):
    """The one error type a parser may raise internally; it is turned into an anomaly event."""


class Parser(Protocol):
    """What ``make_parser`` returns; the session drives one per identified flow.

    ``feed`` never raises: malformed or oversized input becomes one
    ``L7Event(kind="anomaly")`` and that direction is then only counted.
    ``hold_from`` names the absolute offset of a message head still arriving
    (bytes the session should not forward before the parser has seen them).
    """

    app_proto: str

    def feed(self, data: bytes, direction: int) -> list[L7Event]: ...

    def hold_from(self, direction: int) -> int | None: ...

    def summary(self) -> dict[str, Any]: ...
