"""SSH: the identification banner of each side (RFC 4253 section 4.2).

Both sides send ``SSH-protoversion-softwareversion [comments]`` CRLF first;
everything after is the binary packet protocol, encrypted once keys are
exchanged, so each direction stops after its banner. A server may print other
lines before its banner (RFC 4253 allows it); up to 1 KiB of them is skipped.
Banner lines are at most 255 bytes; longer ones are ``oversized-banner``.
"""

from __future__ import annotations

from typing import Any

from firewall.protocols.base import TOCLIENT, TOSERVER, L7Event, ParseError, Probe
from firewall.protocols.stream import DirState, StreamParser

APP_PROTO = "ssh"
DEFAULT_PORTS = frozenset({22, 2222})

_PREFIXES = (b"SSH-2.0-", b"SSH-1.99-")
_MAX_LINE = 255
_MAX_PREAMBLE = 1024


def probe(buf: bytes) -> Probe:
    """``SSH-2.0-`` (or the compatibility ``SSH-1.99-``) at the start of a direction."""
    for prefix in _PREFIXES:
        if buf.startswith(prefix):
            return Probe.MATCH
        if prefix.startswith(buf[: len(prefix)]):
            return Probe.NEED_MORE
    return Probe.NO_MATCH


probe_toserver = probe
probe_toclient = probe


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
            fields = {
                "software": parts[2],
                "proto_version": parts[1],
                "comments": comments or None,
                "side": "client" if d == TOSERVER else "server",
            }
            self.software[d] = parts[2]
            start = st.pos
            st.advance(len(line))
            out.append(L7Event(APP_PROTO, "banner", d, start, fields, st.pos))
            st.stop()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client": self.software.get(TOSERVER), "server": self.software.get(TOCLIENT)}
        out.update(self._base_summary())
        return out
