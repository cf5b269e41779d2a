"""MySQL/MariaDB client/server protocol: greeting, login and statement verbs.

The server speaks first (a protocol-10 greeting naming its version), so this
protocol is identified from server-to-client bytes. The client's handshake
response names the user and the database; afterwards every command starts a
new packet sequence (sequence id 0), which is how commands are told apart from
authentication round-trips and ``LOAD DATA LOCAL`` file packets without
needing the other direction. Packets are length-prefixed: only a bounded
prefix of a query is buffered, result rows are skipped by counting.
``CLIENT_COMPRESS`` switches the stream to a format we do not read: parsing
stops there.  ``CLIENT_SSL`` (the 32-byte SSL request) switches both streams to
TLS right after that packet: a ``switch`` event, then the TLS is parsed
(``tls.InnerTls``: hellos, record layer, ``established``) - a client that keeps
talking plaintext breaks the record layer and is not passed unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from firewall.protocols.base import (
    TOCLIENT,
    TOSERVER,
    EventFields,
    L7Event,
    ParseError,
    Probe,
    SwitchFields,
    declare_fields,
    event_fields,
)
from firewall.protocols.pgsql import STATEMENT_CHARS, statement_verbs
from firewall.protocols.redact import redact_sql
from firewall.protocols.stream import DirState, StreamParser, sql_verb
from firewall.protocols.tls import InnerTls

APP_PROTO = "mysql"
DEFAULT_PORTS = frozenset({3306, 3307, 33060})

CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_COMPRESS = 0x20
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_MULTI_STATEMENTS = 0x10000
CLIENT_PLUGIN_AUTH_LENENC = 0x200000
CLIENT_QUERY_ATTRIBUTES = 1 << 27

_COM_INIT_DB, _COM_QUERY, _COM_STMT_PREPARE = 0x02, 0x03, 0x16
_PREFIX = 2048
_MAX_LOGIN = 65536


def probe_toclient(buf: bytes) -> Probe:
    """Server greeting: sequence 0, protocol version 10, a printable version string."""
    if len(buf) >= 3 and not 20 <= int.from_bytes(buf[:3], "little") <= 1024:
        return Probe.NO_MATCH
    if len(buf) >= 4 and buf[3] != 0:
        return Probe.NO_MATCH
    if len(buf) >= 5 and buf[4] != 0x0A:
        return Probe.NO_MATCH
    version = buf[5:69]
    nul = version.find(b"\0")
    text = version if nul < 0 else version[:nul]
    if any(c < 0x20 or c > 0x7E for c in text):
        return Probe.NO_MATCH
    if nul < 0:
        return Probe.NO_MATCH if len(version) >= 64 else Probe.NEED_MORE
    return Probe.MATCH if nul > 0 else Probe.NO_MATCH


@event_fields(APP_PROTO, "greeting")
@dataclass(frozen=True, slots=True)
class MysqlGreeting(EventFields):
    server_version: str
    connection_id: int


@event_fields(APP_PROTO, "login")
@dataclass(frozen=True, slots=True)
class MysqlLogin(EventFields):
    user: str
    database: str | None


@event_fields(APP_PROTO, "statement")
@dataclass(frozen=True, slots=True)
class MysqlStatement(EventFields):
    """``verbs_complete``: see ``pgsql.PgStatement`` (several statements per COM_QUERY only
    with CLIENT_MULTI_STATEMENTS; query attributes hide the text: incomplete)."""

    verb: str
    verbs: list[str]
    statement: str
    command: str
    truncated: bool
    verbs_complete: bool = True


declare_fields(APP_PROTO, "response", ("error", "sqlstate"))


def _lenenc(data: bytes, i: int) -> tuple[int, int]:
    if i >= len(data):
        raise ParseError("malformed-packet")
    first = data[i]
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if width is None:
        if first == 0xFF or first == 0xFB:
            raise ParseError("malformed-packet")
        return first, i + 1
    if i + 1 + width > len(data):
        raise ParseError("malformed-packet")
    return int.from_bytes(data[i + 1 : i + 1 + width], "little"), i + 1 + width


def _cstring(data: bytes, i: int) -> tuple[str, int]:
    j = data.find(b"\0", i)
    if j < 0:
        raise ParseError("malformed-packet")
    return data[i:j].decode("utf-8", "replace"), j + 1


class MysqlParser(StreamParser):
    """Greeting and errors (server), login and statements (client)."""

    app_proto = APP_PROTO
    max_buffer = _MAX_LOGIN + 4

    def __init__(self) -> None:
        super().__init__()
        self._greeted = False
        self._logged_in = False
        self.caps = 0
        self.encrypted = False
        self._inner: InnerTls | None = None
        self.compressed = False
        self.server_version: str | None = None
        self.user: str | None = None
        self.database: str | None = None
        self.verbs: dict[str, int] = {}
        self.errors = 0

    def hold_from(self, direction: int) -> int | None:
        if self._inner is not None:
            return self._inner.hold_from(direction)
        return super().hold_from(direction)

    def _to_inner(self, st: DirState, out: list[L7Event]) -> None:
        data = bytes(st.buf)
        st.pos += len(data)
        st.buf.clear()
        st.hold = None
        if data and self._inner is not None:
            events = self._inner.feed(data, st.direction)
            self.anomalies.extend(e.anomaly for e in events if e.anomaly)
            out.extend(events)

    def _switch(self, st: DirState, start: int, out: list[L7Event]) -> None:
        """The client's SSL request: both streams are TLS from the next byte."""
        self.encrypted = True
        out.append(L7Event(APP_PROTO, "switch", TOSERVER, start, SwitchFields("tls", "client_ssl"), st.pos))
        self._inner = InnerTls(APP_PROTO, (self._dirs[TOSERVER].pos, self._dirs[TOCLIENT].pos))
        for d in self._dirs:
            self._to_inner(d, out)

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        if self._inner is not None:
            self._to_inner(st, out)
            return
        while not st.stopped and not st.skip and len(st.buf) >= 4:
            if self.encrypted or (self.compressed and (st.direction == TOSERVER or self._greeted)):
                st.stop()
                break
            n = int.from_bytes(st.buf[:3], "little")
            seq = st.buf[3]
            if st.direction == TOSERVER:
                done = self._client_packet(st, n, seq, out)
            else:
                done = self._server_packet(st, n, seq, out)
            if not done:
                break
        st.hold = st.pos if st.direction == TOSERVER and st.buf and not st.stopped and not st.skip else None

    # -- server ---------------------------------------------------------------
    def _server_packet(self, st: DirState, n: int, seq: int, out: list[L7Event]) -> bool:
        if not self._greeted:
            if len(st.buf) < 4 + n:
                return False
            payload = bytes(st.buf[4 : 4 + n])
            start = st.pos
            st.advance(4 + n)
            self._greeted = True
            if payload[:1] == b"\xff":
                out.append(L7Event(APP_PROTO, "response", TOCLIENT, start, self._error(payload), st.pos))
                st.stop()
                return True
            if payload[:1] != b"\x0a":
                raise ParseError("bad-greeting")
            version, i = _cstring(payload, 1)
            conn_id = int.from_bytes(payload[i : i + 4], "little")
            self.server_version = version
            fields = MysqlGreeting(version, conn_id)
            out.append(L7Event(APP_PROTO, "greeting", TOCLIENT, start, fields, st.pos))
            return True
        want = min(n, 16)
        if len(st.buf) < 4 + want:
            return False
        if want >= 3 and st.buf[4] == 0xFF:
            out.append(L7Event(APP_PROTO, "response", TOCLIENT, st.pos,
                               self._error(bytes(st.buf[4 : 4 + want])), st.pos + 4 + n))
        st.advance(4 + n)
        return True

    def _error(self, payload: bytes) -> dict[str, Any]:
        self.errors += 1
        code = int.from_bytes(payload[1:3], "little")
        state = payload[4:9].decode("ascii", "replace") if payload[3:4] == b"#" else None
        return {"error": code, "sqlstate": state}

    # -- client ---------------------------------------------------------------
    def _client_packet(self, st: DirState, n: int, seq: int, out: list[L7Event]) -> bool:
        if seq != 0 and not self._logged_in:
            if n > _MAX_LOGIN:
                raise ParseError("oversized-login")
            if len(st.buf) < 4 + n:
                return False
            payload = bytes(st.buf[4 : 4 + n])
            start = st.pos
            st.advance(4 + n)
            self._login(payload, start, st.pos, out)
            if self._inner is not None:
                self._to_inner(st, out)
                return False
            return True
        if seq != 0 or n == 0:
            st.advance(4 + n)
            return True
        want = min(n, _PREFIX)
        if len(st.buf) < 4 + want:
            return False
        payload = bytes(st.buf[4 : 4 + want])
        fields = self._command(payload, n)
        if fields is not None:
            out.append(L7Event(APP_PROTO, "statement", TOSERVER, st.pos, fields, st.pos + 4 + n))
            for v in fields.verbs or [fields.verb]:
                self.verbs[v] = self.verbs.get(v, 0) + 1
        st.advance(4 + n)
        return True

    def _login(self, payload: bytes, start: int, end: int, out: list[L7Event]) -> None:
        if len(payload) < 4:
            raise ParseError("malformed-login")
        caps = int.from_bytes(payload[:4], "little")
        if caps & CLIENT_PROTOCOL_41:
            if caps & CLIENT_SSL and len(payload) == 32:
                self._switch(self._dirs[TOSERVER], start, out)
                return
            user, i = _cstring(payload, 32)
            if caps & CLIENT_PLUGIN_AUTH_LENENC:
                alen, i = _lenenc(payload, i)
                i += alen
            elif caps & CLIENT_SECURE_CONNECTION:
                i += 1 + (payload[i] if i < len(payload) else 0)
            else:
                _, i = _cstring(payload, i)
            database = None
            if caps & CLIENT_CONNECT_WITH_DB and i < len(payload):
                database, i = _cstring(payload, i)
        else:  # HandshakeResponse320
            caps = int.from_bytes(payload[:2], "little")
            if caps & CLIENT_SSL and len(payload) == 5:
                self._switch(self._dirs[TOSERVER], start, out)
                return
            user, i = _cstring(payload, 5)
            database = None
        self.caps = caps
        self._logged_in = True
        self.user = user
        self.database = database or None
        if caps & CLIENT_COMPRESS:
            self.compressed = True
        out.append(L7Event(APP_PROTO, "login", TOSERVER, start, MysqlLogin(user, self.database), end))

    def _command(self, payload: bytes, total: int) -> MysqlStatement | None:
        cmd = payload[0]
        if cmd == _COM_INIT_DB:
            db = payload[1:].decode("utf-8", "replace")
            self.database = db
            return MysqlStatement("USE", ["USE"], f"USE {db}"[:STATEMENT_CHARS], "init_db", total > _PREFIX)
        if cmd not in (_COM_QUERY, _COM_STMT_PREPARE):
            return None
        body = payload[1:]
        if cmd == _COM_QUERY and self.caps & CLIENT_QUERY_ATTRIBUTES:
            count, i = _lenenc(body, 0)
            if count:
                return MysqlStatement("", [], "", "query", True, False)
            _, i = _lenenc(body, i)
            body = body[i:]
        text = body.decode("utf-8", "replace")
        multi = cmd == _COM_QUERY and bool(self.caps & CLIENT_MULTI_STATEMENTS)
        verbs, complete = statement_verbs(text, truncated=total > _PREFIX, multi=multi)
        return MysqlStatement(verbs[0] if verbs else sql_verb(text), verbs,
                              redact_sql(text.strip())[:STATEMENT_CHARS],
                              "query" if cmd == _COM_QUERY else "prepare", total > _PREFIX, complete)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user": self.user,
            "database": self.database,
            "server_version": self.server_version,
            "verbs": dict(self.verbs),
            "encrypted": self._inner.established if self._inner is not None else False,
            "switched_to": "tls" if self._inner is not None else None,
            "errors": self.errors,
        }
        out.update(self._base_summary())
        return out
