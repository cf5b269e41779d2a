"""Redis (RESP2/RESP3): the command name and argument count of each command.

Clients send each command as an array of bulk strings; only the command name
(and, for container commands such as ``CONFIG SET``, the subcommand) is
buffered. Argument values - which may be large or secret (``AUTH``) - are
skipped by counting and never stored. The command event is emitted as soon as
the name is known, so the session can refuse a command before forwarding it;
its ``end`` is -1 because RESP does not announce a command's total length.
Inline commands (``PING\\r\\n``, as typed into telnet) are understood too.
Server replies are not parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from firewall.protocols.base import TOSERVER, EventFields, L7Event, ParseError, Probe, event_fields
from firewall.protocols.stream import DirState, StreamParser, find_line

APP_PROTO = "redis"
DEFAULT_PORTS = frozenset({6379, 6380, 26379})

#: commands whose first argument is a subcommand worth a policy rule
SUBCOMMANDS = frozenset({
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY",
    "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
})
_MAX_NAME = 64
_MAX_ARGS = 1 << 20
_MAX_BULK = 512 << 20
_MAX_INLINE = 65536


def probe_toserver(buf: bytes) -> Probe:
    """``*<n>\\r\\n$<len>\\r\\n``: the start of a RESP array of bulk strings."""
    if buf[:1] != b"*":
        return Probe.NO_MATCH
    i = 1
    while i < len(buf) and buf[i : i + 1].isdigit() and i <= 8:
        i += 1
    if i == len(buf):
        return Probe.NEED_MORE
    if i == 1 or buf[i : i + 1] != b"\r":
        return Probe.NO_MATCH
    rest = buf[i : i + 4]
    want = b"\r\n$"
    if rest[:3] != want[: len(rest[:3])]:
        return Probe.NO_MATCH
    if len(rest) < 4:
        return Probe.NEED_MORE
    return Probe.MATCH if rest[3:4].isdigit() else Probe.NO_MATCH


def _int_line(line: bytes, limit: int) -> int:
    text = line.rstrip(b"\r\n")
    if not text.lstrip(b"-").isdigit() or len(text) > 12:
        raise ParseError("bad-resp")
    n = int(text)
    if n > limit:
        raise ParseError("oversized-message")
    return n


@event_fields(APP_PROTO, "command")
@dataclass(frozen=True, slots=True)
class RedisCommand(EventFields):
    command: str
    keys: int  # argument count after the command name (values are never kept)
    subcommand: str | None


class RedisParser(StreamParser):
    """Command names from the client side; the server side is only counted."""

    app_proto = APP_PROTO
    max_buffer = _MAX_INLINE

    def __init__(self) -> None:
        super().__init__()
        self.commands: dict[str, int] = {}
        self._remaining = 0  # array elements left in the current command
        self._index = 0  # index of the next element
        self._start = 0  # offset of the current command
        self._name: str | None = None
        self._nargs = 0
        self._emitted = True

    def feed(self, data: bytes, direction: int) -> list[L7Event]:
        if direction != TOSERVER:
            self._dirs[direction].pos += len(data)
            return []
        return super().feed(data, direction)

    def _emit(self, st: DirState, out: list[L7Event], sub: str | None, nargs: int) -> None:
        name = self._name or ""
        fields = RedisCommand(name, nargs, sub)
        out.append(L7Event(APP_PROTO, "command", TOSERVER, self._start, fields, -1))
        key = f"{name} {sub}" if sub else name
        self.commands[key] = self.commands.get(key, 0) + 1
        self._emitted = True

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        while st.buf and not st.skip:
            if self._remaining == 0:
                # a new command
                self._start = st.pos
                if st.buf[:1] == b"*":
                    k = find_line(st.buf, 0, 32)
                    if k < 0:
                        break
                    n = _int_line(bytes(st.buf[1:k]), _MAX_ARGS)
                    st.advance(k)
                    if n <= 0:
                        continue
                    self._remaining, self._index, self._name, self._emitted = n, 0, None, False
                    self._nargs = n - 1
                    continue
                k = find_line(st.buf, 0, _MAX_INLINE)
                if k < 0:
                    break
                words = bytes(st.buf[:k]).split()
                st.advance(k)
                if words:
                    self._name = words[0].decode("latin-1").upper()
                    sub = words[1].decode("latin-1").upper() if self._name in SUBCOMMANDS and len(words) > 1 else None
                    self._emit(st, out, sub, len(words) - 1)
                continue
            # an element of the current array
            if st.buf[:1] != b"$":
                raise ParseError("bad-resp")
            k = find_line(st.buf, 0, 32)
            if k < 0:
                break
            size = _int_line(bytes(st.buf[1:k]), _MAX_BULK)
            if size < 0:
                raise ParseError("bad-resp")
            need_value = not self._emitted and (self._index == 0 or self._index == 1)
            if need_value and size <= _MAX_NAME:
                if len(st.buf) < k + size + 2:
                    break
                value = bytes(st.buf[k : k + size]).decode("latin-1").upper()
                st.advance(k + size + 2)
            else:
                value = None
                st.advance(k + size + 2)
            if self._index == 0:
                if value is None:
                    raise ParseError("oversized-command-name")
                self._name = value
                if value not in SUBCOMMANDS or self._remaining == 1:
                    self._emit(st, out, None, self._nargs)
            elif self._index == 1 and not self._emitted:
                self._emit(st, out, value, self._nargs)
            self._index += 1
            self._remaining -= 1
        st.hold = self._start if (st.buf and self._remaining == 0) or not self._emitted else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"commands": dict(self.commands)}
        out.update(self._base_summary())
        return out
