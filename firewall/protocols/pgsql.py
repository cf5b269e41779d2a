"""PostgreSQL frontend/backend protocol v3: login and the verb of each statement.

The client's StartupMessage names the user and database; each simple Query
(``Q``) and extended-protocol Parse (``P``) carries SQL whose first keyword is
the verb policy rules match (``SELECT``, ``INSERT``, ``DROP`` ...). Messages are
length-prefixed, so only a bounded prefix of a statement (2 KiB) is buffered and
the rest - bulk ``INSERT``s, ``COPY`` data, result rows - is skipped by
counting. Passwords (``p`` messages) are skipped unread.

Protocol switches: an ``SSLRequest`` answered ``S`` turns both streams into TLS
from the byte after the answer; a ``switch`` event says so (the session hands it to
the exception policy when a rule needed the plaintext statements) and the rest is
parsed as TLS (``tls.InnerTls``): hellos, record layer, ``established`` - a client
that sends plaintext after ``S`` breaks the record layer, it is not passed unread.
A ``GSSENCRequest`` answered ``G`` switches to GSSAPI encryption, which is not
parsed: the ``switch`` event (``to: gssapi``) is all the session gets, and both
directions then only count.  An ``N`` answer keeps the connection plaintext.
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
from firewall.protocols.redact import redact_sql
from firewall.protocols.stream import DirState, StreamParser, sql_verb
from firewall.protocols.tls import InnerTls

APP_PROTO = "pgsql"
DEFAULT_PORTS = frozenset({5432, 5433, 6432})

_SSL, _GSS, _CANCEL = 80877103, 80877104, 80877102
_MAX_STARTUP = 10000
_MAX_MESSAGE = 1 << 30
_PREFIX = 2048
STATEMENT_CHARS = 256


def probe_toserver(buf: bytes) -> Probe:
    """A StartupMessage (protocol 3.x) or an SSL/GSSENC/Cancel request."""
    if len(buf) >= 4:
        n = int.from_bytes(buf[:4], "big")
        if not 8 <= n <= _MAX_STARTUP:
            return Probe.NO_MATCH
    elif buf[:2].strip(b"\0"):
        return Probe.NO_MATCH  # lengths above 64 KiB cannot be a startup packet
    if len(buf) < 8:
        return Probe.NEED_MORE
    n, code = int.from_bytes(buf[:4], "big"), int.from_bytes(buf[4:8], "big")
    if code in (_SSL, _GSS):
        return Probe.MATCH if n == 8 else Probe.NO_MATCH
    if code == _CANCEL:
        return Probe.MATCH if n >= 16 else Probe.NO_MATCH
    return Probe.MATCH if code >> 16 == 3 and n > 8 else Probe.NO_MATCH


@event_fields(APP_PROTO, "startup")
@dataclass(frozen=True, slots=True)
class PgStartup(EventFields):
    user: str | None
    database: str | None
    application_name: str | None
    protocol: str


@event_fields(APP_PROTO, "statement")
@dataclass(frozen=True, slots=True)
class PgStatement(EventFields):
    """``verbs``: every statement's verb in a simple Query (``SELECT 1; DELETE ...``).
    ``verbs_complete`` is false when statements may exist that ``verbs`` does not name: a
    simple Query longer than the 2 KiB prefix, or more than ``MAX_VERBS`` statements - a
    verbs rule then cannot allow it (policy_match)."""

    verb: str
    verbs: list[str]
    statement: str
    message: str
    truncated: bool
    verbs_complete: bool = True


# server responses come in three shapes (auth ok, command complete, error)
declare_fields(APP_PROTO, "response", ("auth", "tag", "command_tag", "error", "severity"))


def split_verbs(text: str, limit: int = 16) -> list[str]:
    """Verbs of the ``;``-separated statements in ``text`` (quotes and comments respected).

    A simple Query may carry several statements; a rule against ``DELETE`` must
    see the second one of ``SELECT 1; DELETE FROM t``.
    """
    verbs: list[str] = []
    start, i, n = 0, 0, len(text)
    quote = ""
    while i < n and len(verbs) < limit:
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 1
        elif c == ";":
            v = sql_verb(text[start:i])
            if v:
                verbs.append(v)
            start = i + 1
        i += 1
    if len(verbs) < limit and not quote:
        v = sql_verb(text[start:])
        if v:
            verbs.append(v)
    return verbs


MAX_VERBS = 16


def statement_verbs(text: str, *, truncated: bool, multi: bool) -> tuple[list[str], bool]:
    """(verbs, complete): the verbs of ``text`` (at most ``MAX_VERBS``) and whether they are
    all the statements the server will run.  A message that may carry several statements
    (``multi``) and was cut at the prefix, or holds more statements than listed, is incomplete:
    ``SELECT ...2 KiB...; DROP TABLE t`` must not pass a SELECT-only rule."""
    verbs = split_verbs(text, MAX_VERBS + 1)
    complete = len(verbs) <= MAX_VERBS and not (truncated and multi)
    return verbs[:MAX_VERBS], complete


def _statement_fields(raw: bytes, message: str, total: int) -> PgStatement:
    if message == "parse":
        _name, _, raw = raw.partition(b"\0")
    query = raw.split(b"\0", 1)[0]
    text = query.decode("utf-8", "replace")
    verbs, complete = statement_verbs(text, truncated=total > _PREFIX, multi=message == "query")
    return PgStatement(verbs[0] if verbs else sql_verb(text), verbs,
                       redact_sql(text.strip())[:STATEMENT_CHARS], message, total > _PREFIX, complete)


class PgsqlParser(StreamParser):
    """Startup, statements (client) and auth/error/completion (server)."""

    app_proto = APP_PROTO
    max_buffer = _MAX_STARTUP + _PREFIX

    def __init__(self) -> None:
        super().__init__()
        self._startup = True  # client side still before its StartupMessage
        self._answers_due: list[int] = []  # SSL/GSS request codes the server has not answered yet
        self._inner: InnerTls | None = None  # the TLS stream after an accepted SSLRequest
        self.encrypted = False
        self.user: str | None = None
        self.database: str | None = None
        self.application: str | None = None
        self.verbs: dict[str, int] = {}
        self.errors = 0

    def _switch(self, code: int, out: list[L7Event]) -> None:
        """The server accepted an encryption request: from here both streams are TLS (or
        GSSAPI).  Bytes already buffered after the switch point belong to the new stream."""
        client, server = self._dirs
        to, via = ("tls", "sslrequest") if code == _SSL else ("gssapi", "gssencrequest")
        out.append(L7Event(APP_PROTO, "switch", TOCLIENT, server.pos, SwitchFields(to, via), server.pos + 1))
        server.advance(1)
        self.encrypted = True
        if code != _SSL:
            for st in self._dirs:
                st.stop()
            return
        self._inner = InnerTls(APP_PROTO, (client.pos, server.pos))
        for st in self._dirs:
            self._to_inner(st, out)

    def _to_inner(self, st: DirState, out: list[L7Event]) -> None:
        data = bytes(st.buf)
        st.pos += len(data)
        st.buf.clear()
        st.hold = None
        if data and self._inner is not None:
            events = self._inner.feed(data, st.direction)
            self.anomalies.extend(e.anomaly for e in events if e.anomaly)
            out.extend(events)

    def hold_from(self, direction: int) -> int | None:
        if self._inner is not None:
            return self._inner.hold_from(direction)
        return super().hold_from(direction)

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        if self._inner is not None:
            self._to_inner(st, out)
            return
        if self.encrypted:
            st.stop()
            return
        if st.direction == TOSERVER:
            self._client(st, out)
        else:
            self._server(st, out)

    # -- client ---------------------------------------------------------------
    def _client(self, st: DirState, out: list[L7Event]) -> None:
        while st.buf and not st.stopped and not st.skip:
            st.hold = st.pos
            if self._startup:
                if self._answers_due:
                    return  # the client must wait for the answer; held until it comes
                if len(st.buf) < 8:
                    return
                n, code = int.from_bytes(st.buf[:4], "big"), int.from_bytes(st.buf[4:8], "big")
                if not 8 <= n <= _MAX_STARTUP:
                    raise ParseError("bad-startup")
                if len(st.buf) < n:
                    return
                body = bytes(st.buf[8:n])
                start = st.pos
                st.advance(n)
                if code in (_SSL, _GSS):
                    if n != 8:
                        raise ParseError("bad-startup")
                    self._answers_due.append(code)
                elif code == _CANCEL:
                    st.stop()
                elif code >> 16 == 3:
                    self._startup = False
                    self._login(body, code, start, out)
                else:
                    raise ParseError("bad-startup")
                continue
            if len(st.buf) < 5:
                return
            mtype = st.buf[0]
            n = int.from_bytes(st.buf[1:5], "big")
            if not 4 <= n <= _MAX_MESSAGE:
                raise ParseError("bad-message-length")
            if mtype in (0x51, 0x50):  # 'Q', 'P'
                want = min(n - 4, _PREFIX)
                if len(st.buf) < 5 + want:
                    return
                message = "query" if mtype == 0x51 else "parse"
                fields = _statement_fields(bytes(st.buf[5 : 5 + want]), message, n - 4)
                out.append(L7Event(APP_PROTO, "statement", TOSERVER, st.pos, fields, st.pos + 1 + n))
                for v in fields.verbs or [fields.verb]:
                    self.verbs[v] = self.verbs.get(v, 0) + 1
            st.advance(1 + n)
        st.hold = None

    def _drain_client(self, out: list[L7Event]) -> None:
        """The client's bytes held while it waited for an answer are parsed now."""
        st = self._dirs[TOSERVER]
        if st.buf and not st.stopped:
            try:
                self._client(st, out)
            except ParseError as exc:
                out.append(self._anomaly(st, str(exc)))
                st.stop()

    def _login(self, body: bytes, code: int, start: int, out: list[L7Event]) -> None:
        parts = body.split(b"\0")
        params: dict[str, str] = {}
        for k, v in zip(parts[0::2], parts[1::2], strict=False):
            if not k:
                break
            params[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        self.user = params.get("user")
        self.database = params.get("database") or self.user
        self.application = params.get("application_name")
        fields = PgStartup(self.user, self.database, self.application, f"{code >> 16}.{code & 0xFFFF}")
        out.append(L7Event(APP_PROTO, "startup", TOSERVER, start, fields, start + 8 + len(body)))

    # -- server ---------------------------------------------------------------
    def _server(self, st: DirState, out: list[L7Event]) -> None:
        while st.buf and not st.stopped and not st.skip:
            if self._answers_due:
                answer = st.buf[0]
                code = self._answers_due.pop(0)
                if answer == (0x53 if code == _SSL else 0x47):  # 'S' / 'G': encryption accepted
                    self._switch(code, out)
                    return
                if answer == 0x4E:  # 'N'
                    st.advance(1)
                    self._drain_client(out)
                    continue
                if answer in (0x53, 0x47):
                    raise ParseError("bad-encryption-answer")  # 'G' to an SSLRequest or vice versa
                self._answers_due.clear()  # an old server answering with an error message
            if len(st.buf) < 5:
                return
            mtype = st.buf[0]
            n = int.from_bytes(st.buf[1:5], "big")
            if not 4 <= n <= _MAX_MESSAGE:
                raise ParseError("bad-message-length")
            if mtype in (0x52, 0x45, 0x43):  # 'R', 'E', 'C'
                want = min(n - 4, _PREFIX)
                if len(st.buf) < 5 + want:
                    return
                body = bytes(st.buf[5 : 5 + want])
                fields = self._server_fields(mtype, body)
                if fields is not None:
                    out.append(L7Event(APP_PROTO, "response", TOCLIENT, st.pos, fields, st.pos + 1 + n))
            st.advance(1 + n)

    def _server_fields(self, mtype: int, body: bytes) -> dict[str, Any] | None:
        if mtype == 0x52:
            code = int.from_bytes(body[:4], "big") if len(body) >= 4 else -1
            return {"auth": "ok"} if code == 0 else None
        if mtype == 0x43:
            tag = body.split(b"\0", 1)[0].decode("ascii", "replace")
            return {"tag": tag.split(" ", 1)[0], "command_tag": tag}
        # ErrorResponse: severity and SQLSTATE only; the message may quote data
        items = {}
        for item in body.split(b"\0"):
            if item:
                items[chr(item[0])] = item[1:].decode("utf-8", "replace")
        self.errors += 1
        return {"error": items.get("C"), "severity": items.get("V") or items.get("S")}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user": self.user,
            "database": self.database,
            "verbs": dict(self.verbs),
            "encrypted": self._inner.established if self._inner is not None else False,
            "switched_to": ("tls" if self._inner is not None else "gssapi") if self.encrypted else None,
            "errors": self.errors,
        }
        if self.application:
            out["application_name"] = self.application
        out.update(self._base_summary())
        return out
