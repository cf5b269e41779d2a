"""SSH: the identification banner of each side (RFC 4253 section 4.2).

Both sides send ``SSH-protoversion-softwareversion [comments]`` CRLF first;
everything after is the binary packet protocol, encrypted once keys are
exchanged, so each direction stops after its banner. A server may print other
lines before its banner (RFC 4253 allows it); up to 1 KiB of them is skipped.
Banner lines are at most 255 bytes; longer ones are ``oversized-banner``.

Identification is by the ``SSH-`` prefix alone, as the servers do it: OpenSSH
reads ``SSH-%d.%d-...`` so ``SSH-2.00-x``, ``SSH-1.99-x`` and ``SSH-2.0-x`` are all
SSH to it, and therefore to us.  From the server side, text lines before the
banner are tolerated (RFC 4253 4.2); the client must send its banner first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from firewall.protocols.base import TOCLIENT, TOSERVER, EventFields, L7Event, ParseError, Probe, event_fields
from firewall.protocols.stream import DirState, StreamParser

APP_PROTO = "ssh"
DEFAULT_PORTS = frozenset({22, 2222})

_PREFIX = b"SSH-"
_MAX_LINE = 255
_MAX_PREAMBLE = 1024
#: bytes a server's pre-banner line may hold: printable text, tab, CR and UTF-8
_TEXT = frozenset(range(0x20, 0x7F)) | frozenset(range(0x80, 0x100)) | {0x09, 0x0D, 0x0A}


def probe_toserver(buf: bytes) -> Probe:
    """The client's first bytes are ``SSH-`` (whatever version digits follow)."""
    if buf.startswith(_PREFIX):
        return Probe.MATCH
    return Probe.NEED_MORE if _PREFIX.startswith(buf) else Probe.NO_MATCH


def probe_toclient(buf: bytes) -> Probe:
    """A server's ``SSH-`` line, possibly after text lines (RFC 4253 4.2): NEED_MORE while
    the lines so far are text, so a server-first protocol stays open until its client
    speaks (a client that is not SSH rules SSH out at once).  Bounded: lines of at most
    255 bytes, 1 KiB of them, so the answer always comes well within the identifier's
    depth (a server streaming text is ``unknown``, never "undecided")."""
    i = 0
    while True:
        eol = buf.find(b"\n", i)
        line = buf[i:] if eol < 0 else buf[i : eol + 1]
        if line.startswith(_PREFIX):
            return Probe.MATCH
        if not set(line) <= _TEXT or len(line) > _MAX_LINE:
            return Probe.NO_MATCH
        if eol < 0:
            return Probe.NEED_MORE
        i = eol + 1
        if i > _MAX_PREAMBLE:
            return Probe.NO_MATCH


@event_fields(APP_PROTO, "banner")
@dataclass(frozen=True, slots=True)
class SshBanner(EventFields):
    software: str
    proto_version: str
    comments: str | None
    side: str


class SshParser(StreamParser):
    """Reads one banner per direction and then only counts."""

    app_proto = APP_PROTO
    max_buffer = _MAX_PREAMBLE + _MAX_LINE
    oversize_anomaly = "oversized-banner"

    def __init__(self) -> None:
        super().__init__()
        self.software: dict[int, str] = {}
        self._preamble = [0, 0]

    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        d = st.direction
        while not st.stopped:
            i = st.buf.find(b"\n", 0, _MAX_LINE + 1)
            if i < 0:
                if len(st.buf) > _MAX_LINE:
                    raise ParseError("oversized-banner")
                return
            line = bytes(st.buf[: i + 1])
            if not line.startswith(b"SSH-"):
                self._preamble[d] += len(line)
                if d == TOSERVER or self._preamble[d] > _MAX_PREAMBLE:
                    raise ParseError("bad-banner")
                st.advance(len(line))
                continue
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            ident, _, comments = text.partition(" ")
            parts = ident.split("-", 2)
            if len(parts) != 3 or not parts[2]:
                raise ParseError("bad-banner")
            fields = SshBanner(parts[2], parts[1], comments or None, "client" if d == TOSERVER else "server")
            self.software[d] = parts[2]
            start = st.pos
            st.advance(len(line))
            out.append(L7Event(APP_PROTO, "banner", d, start, fields, st.pos))
            st.stop()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client": self.software.get(TOSERVER), "server": self.software.get(TOCLIENT)}
        out.update(self._base_summary())
        return out
