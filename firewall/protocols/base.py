"""Contracts shared by every protocol parser (sans-IO, incremental, bounded).

A protocol module provides ``probe(buf, direction) -> Probe`` and a ``Parser``
class with ``feed(data, direction) -> list[L7Event]``.  Offsets are absolute
byte offsets in that direction's stream, counted from the first byte of the flow,
so the session can cut a stream exactly at a message boundary (deny the second
request of a pipelined connection without touching the first).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

TOSERVER = 0  # client -> server
TOCLIENT = 1  # server -> client


class Probe(enum.Enum):
    MATCH = "match"
    NO_MATCH = "no-match"
    NEED_MORE = "need-more"


#: (app_proto, kind) -> the field names events of that kind carry.  Filled by ``event_fields``
#: (typed parsers) and ``declare_fields`` (parsers that still build dicts); the policy matchers
#: resolve every field they read against it at import time (policy_match.field_name), so a
#: matcher cannot read a name no parser writes - the tls.minVersion bug of issue 15.
SCHEMAS: dict[tuple[str, str], frozenset[str]] = {}


@dataclass(frozen=True, slots=True)
class EventFields:
    """Base of the typed field sets: one frozen dataclass per (protocol, event kind)."""

    APP: ClassVar[tuple[str, ...]] = ()
    KIND: ClassVar[str] = ""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def event_fields(apps: str | Iterable[str], kind: str):  # noqa: ANN201 - class decorator
    """Register a frozen dataclass as the field set of ``kind`` events of ``apps``."""
    names = (apps,) if isinstance(apps, str) else tuple(apps)

    def wrap(cls: type[EventFields]) -> type[EventFields]:
        cls.APP, cls.KIND = names, kind
        declare_fields(names, kind, tuple(f.name for f in dataclasses.fields(cls)))
        return cls

    return wrap


def declare_fields(apps: str | Iterable[str], kind: str, names: Iterable[str]) -> None:
    """Declare (or extend) the field set of ``kind`` events of ``apps``."""
    names = frozenset(names)
    for app in (apps,) if isinstance(apps, str) else apps:
        SCHEMAS[(app, kind)] = SCHEMAS.get((app, kind), frozenset()) | names


@dataclass(frozen=True, slots=True)
class L7Event:
    """One protocol-level fact, e.g. an HTTP request head or a TLS ClientHello.

    ``kind`` is one of: request, response, hello, server_hello, established, alert (TLS),
    banner, query, answer, command, startup, greeting (MySQL), login (MySQL), statement,
    switch (a protocol switch: PostgreSQL SSLRequest/GSSENCRequest, MySQL SSL), stream,
    anomaly.  ``fields`` may be given as a typed ``EventFields`` instance (kept in
    ``typed``) or a dict; either way ``fields`` is then a plain dict, so consumers read one
    shape.  The names of each (protocol, kind) are declared in ``SCHEMAS``.  ``offset``
    is where the message starts in its direction's stream; ``end`` where it ends (or -1
    if the body is still streaming).
    """

    app_proto: str
    kind: str
    direction: int
    offset: int
    fields: dict[str, Any] = field(default_factory=dict)
    end: int = -1
    anomaly: str | None = None
    typed: EventFields | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.fields, EventFields):
            object.__setattr__(self, "typed", self.fields)
            object.__setattr__(self, "fields", self.fields.as_dict())


@event_fields(("pgsql", "mysql"), "switch")
@dataclass(frozen=True, slots=True)
class SwitchFields(EventFields):
    """A protocol switch inside a flow: ``to`` is what the stream becomes (``tls``,
    ``gssapi``), ``via`` the message that switched it (``sslrequest``, ``gssencrequest``,
    ``client_ssl``)."""

    to: str
    via: str


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
