"""HTTP/1.0 and HTTP/1.1: request/response heads, bodies skipped by counting.

Only heads are parsed (bounded by ``max_head``, 64 KiB by default); bodies are
skipped with integer arithmetic once their length is known (Content-Length, or
chunk by chunk for ``Transfer-Encoding: chunked``), so a 1 GiB download costs a
handful of Python operations. Keep-alive and pipelining work because every
message's end is computed, and responses are matched to requests in order (a
response to HEAD has no body however it is framed).

Framing ambiguities that request smuggling relies on are refused rather than
resolved: both Content-Length and Transfer-Encoding, differing Content-Lengths,
a Transfer-Encoding that does not end in ``chunked``, obs-folded or
space-before-colon header lines, invalid chunk sizes. Each becomes
``anomaly="smuggling:<shape>"`` and parsing of that direction stops, so the
session can refuse the flow instead of guessing what the server will see.

``CONNECT`` and ``Upgrade`` (websocket, h2c) turn the connection into a tunnel
once the server accepts (2xx to CONNECT, 101): both directions then only count.
A declined switch leaves the connection HTTP, still parsed.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from firewall.protocols.base import TOCLIENT, TOSERVER, L7Event, ParseError, Probe, declare_fields
from firewall.protocols.http_canon import CanonError, canonical_target
from firewall.protocols.redact import redact_path
from firewall.protocols.stream import DirState, StreamParser, find_line

APP_PROTO = "http"
# fields this parser adds to those declared in firewall/protocols/__init__.py: the raw target
# (for the percent-decoded DLP scan; never copied into events) and, on a response accepting
# CONNECT / Upgrade, where the inner stream starts and the CONNECT port
declare_fields(APP_PROTO, "request", ("raw_target",))
declare_fields(APP_PROTO, "response", ("tunnel_at", "tunnel_port"))
DEFAULT_PORTS = frozenset({80, 8000, 8080, 8888, 3000, 5000, 9000})

#: longest method token the identifier waits for (any token is a method: RFC 9110 section 9.1)
_MAX_METHOD = 32
_TCHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_CONNECT_LINE = re.compile(rb" HTTP/1\.[01]\r?\Z")
#: a chunk-size line without extension or padding (what servers send); anything else is read by
#: ``_chunk_size``, which this accepts a subset of with the same size
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})\r?\n")
#: header fields whose reading decides where a message ends: never parsed leniently
_FRAMING = frozenset({"content-length", "transfer-encoding"})

def _chunk_size(buf: bytearray, i: int, d: int) -> tuple[int, int]:
    """(index past the chunk-size line starting at ``i``, the size), or (-1, 0) while the line
    is incomplete.  A size line ends at its LF, within 4096 bytes; its CRs, an extension after
    ``;`` and blanks before it are dropped; what is left must be 1-16 hex digits."""
    k = find_line(buf, i, 4096)
    if k < 0:
        return -1, 0
    size_field = bytes(buf[i:k]).rstrip(b"\r\n").split(b";", 1)[0].rstrip(b" \t")
    if not _HEX.match(size_field):
        raise ParseError(("smuggling:" if d == TOSERVER else "") + "invalid-chunk-size")
    return k, int(size_field, 16)


MAX_SUMMARY_PAIRS = 32
SUMMARY_PATH_CHARS = 512

# direction modes
_HEAD, _CHUNK_SIZE, _CHUNK_CRLF, _TRAILERS = range(4)


def probe_toserver(buf: bytes) -> Probe:
    """An HTTP/1.x request line by its grammar: a method token (any token starting with a
    letter, not a list: SUBSCRIBE and custom methods are HTTP too), a space, and a request
    target.  The price: a client whose first bytes are a bare word (``HELLO``) keeps the
    identifier waiting until a byte that no token holds (or the identify timeout).

    Decides after a few bytes (``GET /``) so a client is never kept waiting on the
    identifier; for targets that do not start with ``/``, ``*`` or ``http(s)://``
    (authority form, CONNECT's) it waits for the line to end in `` HTTP/1.x``.
    """
    sp = buf.find(b" ", 0, _MAX_METHOD + 1)
    if sp < 0:
        head = buf[: _MAX_METHOD + 1]
        if len(head) > _MAX_METHOD or any(c not in _TCHARS for c in head) or not head[:1].isalpha():
            return Probe.NO_MATCH
        return Probe.NEED_MORE
    if sp == 0 or not buf[:1].isalpha() or any(c not in _TCHARS for c in buf[:sp]) or buf[:sp] == b"PRI":
        return Probe.NO_MATCH  # (PRI * HTTP/2.0 is the HTTP/2 preface)
    target = buf[sp + 1 : sp + 9]
    if not target:
        return Probe.NEED_MORE
    if target[:1] in (b"/", b"*"):
        return Probe.MATCH
    lowered = target.lower()
    for scheme in (b"http://", b"https://"):
        if lowered.startswith(scheme):
            return Probe.MATCH
        if scheme.startswith(lowered):
            return Probe.NEED_MORE
    eol = buf.find(b"\n", sp)
    if eol < 0:
        return Probe.NEED_MORE  # the identifier's max depth bounds the wait
    return Probe.MATCH if _CONNECT_LINE.search(buf[:eol]) else Probe.NO_MATCH


#: the header fields the parser reads; the fast path materialises only these
USED_HEADERS = frozenset({"host", "transfer-encoding", "content-length", "content-encoding",
                          "content-type", "upgrade"})

# The fast path: one C-level match validates a whole, ordinary head (start line + ``name:value``
# lines with token names, no obs-fold, no space before the colon, no CR/NUL inside a value).
# Everything it accepts, ``_parse_head_strict`` accepts with the same result (differentially
# tested in tests/protocols/test_http.py); everything else - every anomaly and error included -
# goes through the strict line-by-line path, so the error names do not depend on the path taken.
_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_FIELD_LINES = rf"((?:{_TCHAR}+:[^\r\n\x00]*\r?\n)*)\r?\n\Z"
_FAST_REQUEST = re.compile(rf"({_TCHAR}+) ([^ \r\n]+) (HTTP/[0-9]\.[0-9])\r?\n{_FIELD_LINES}")
_FAST_RESPONSE = re.compile(rf"(HTTP/[0-9]\.[0-9]) ([0-9]{{3}})(?: ([^\r\n]*))?\r?\n{_FIELD_LINES}")


#: a parsed head: the start line's parts and the header fields (lower-cased name -> values)
Head = tuple[list[str], dict[str, list[str]]]


def _parse_head(text: str, request: bool) -> Head:
    """A message head (latin-1 text, up to and including the blank line).

    The headers hold the fields of ``USED_HEADERS`` (lower-cased names, values stripped of
    spaces and tabs, in order of appearance); the strict path keeps every field.
    """
    m = (_FAST_REQUEST if request else _FAST_RESPONSE).match(text)
    if m is None:
        return _parse_head_strict(text, request)
    a, b, c, block = m.groups()
    start = [a, b] if c is None else [a, b, c]  # a response's reason phrase may be absent
    headers: dict[str, list[str]] = {}
    used = USED_HEADERS
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        key = name.lower()
        if key in used:
            # validated: the only CR a line can hold is the one before its LF
            headers.setdefault(key, []).append(value.strip(" \t\r"))
    return start, headers


# Heads repeat: a kept-alive client sends the same request head again and again (the same
# path, headers and body length), a server the same answer head until its Date ticks.  What
# a head says (method, host, path, framing...) is a pure function of its text, so for
# ordinary-sized heads that passed every check it is memoised, one bounded table per kind
# shared by every flow (cleared when full: a stream of distinct heads costs a dict insert
# each).  A head that fails a check is never kept: it is refused again every time it comes.
_HEAD_CACHE_ENTRIES = 128
_HEAD_CACHE_CHARS = 1024
_facts_cache: tuple[dict[str, tuple], dict[str, tuple]] = ({}, {})  # responses, requests


def _request_facts(text: str) -> tuple:
    """(method, host, path, version, content_length, chunked, content_encoding, content_type,
    upgrade, raw_target) of a request head; ParseError for a request a server could read two
    ways (framing, Host, bare LF) or whose path has no one canonical form (firewall/protocols/http_canon.py).

    ``path`` is the canonical path plus the raw query: the one form the policy matches, the
    flow record shows and the report counts."""
    if text.count("\n") != text.count("\r\n"):
        raise ParseError("ambiguous:bare-lf")
    (method, target, version), h = _parse_head(text, True)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ParseError("bad-version")
    hosts = h.get("host")
    host = None
    if hosts:
        if len(hosts) > 1:
            raise ParseError("smuggling:duplicate-host")
        host = hosts[0]
    raw = target
    if method == "CONNECT":
        if target[:1] == "/" or "://" in target or "@" in target or "/" in target:
            raise ParseError("ambiguous:connect-target")
        path = None
        host = target
    elif target == "*":
        if method != "OPTIONS":
            raise ParseError("ambiguous:asterisk-target")
        path = "*"
    else:
        if target[:1] != "/":
            if not target.lower().startswith(("http://", "https://")):
                raise ParseError("ambiguous:target-form")
            rest = target.split("://", 1)[1]
            authority, slash, tail = rest.partition("/")
            if "?" in authority or "#" in authority or "@" in authority or not authority:
                raise ParseError("ambiguous:absolute-authority")
            if host is not None and host.lower() != authority.lower():
                raise ParseError("ambiguous:host-mismatch")
            host = authority
            target = slash + tail if slash else "/"
        try:
            path = canonical_target(target).target
        except CanonError as exc:
            raise ParseError(f"normalise:{exc}") from None
    te = _tokens(h["transfer-encoding"]) if "transfer-encoding" in h else None
    cl_values = h.get("content-length")
    chunked = False
    length: int | None
    if te is not None:
        if cl_values:
            raise ParseError("smuggling:cl-te")
        # a server that understands other codings (gzip, chunked) would decode them; one that
        # does not answers 501: refused rather than guessed (and DLP never sees them encoded)
        if te != ["chunked"]:
            raise ParseError("smuggling:bad-transfer-encoding")
        if version == "HTTP/1.0":
            raise ParseError("smuggling:te-in-http1.0")
        chunked = True
        length = None
    else:
        length = _content_length(cl_values, "smuggling:")
    enc = ",".join(_tokens(h["content-encoding"])) if "content-encoding" in h else None
    return (method, host, path, version[5:], length, chunked, enc or None,
            (h.get("content-type") or [None])[0], (h.get("upgrade") or [None])[0], raw)


def _response_facts(text: str) -> tuple:
    """(status, version, content_length, chunked, content_encoding, content_type, lenient) of
    a response head, before the request method (HEAD, CONNECT) is taken into account.
    ``lenient`` names the oddities tolerated because they cannot desynchronise the client."""
    start, h = _parse_head(text, False)
    lenient = tuple(h.pop("", ()))
    code = int(start[1])
    te = _tokens(h["transfer-encoding"]) if "transfer-encoding" in h else None
    if te is not None and "content-length" in h:
        # clients differ on which wins (RFC 9112 says TE; some read CL): desynchronising
        raise ParseError("smuggling:cl-te")
    chunked = bool(te) and te[-1] == "chunked"
    length = None if te else _content_length(h.get("content-length"), "")
    enc = ",".join(_tokens(h["content-encoding"])) if "content-encoding" in h else None
    return (code, start[0][5:], length, chunked, enc or None,
            (h.get("content-type") or [None])[0], lenient)


def _head_facts(text: str, request: bool) -> tuple:
    cache = _facts_cache[request]
    facts = cache.get(text)
    if facts is None:
        facts = _request_facts(text) if request else _response_facts(text)  # may raise: not kept
        if len(text) <= _HEAD_CACHE_CHARS:
            if len(cache) >= _HEAD_CACHE_ENTRIES:
                cache.clear()
            cache[text] = facts
    return facts


def _parse_head_strict(text: str, request: bool) -> Head:
    """Line by line, naming the first problem found (the reference the fast path follows)."""
    lines = text.split("\n")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    while lines and lines[-1] == "":
        lines.pop()
    first = lines[0]
    if request:
        parts = first.split(" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            raise ParseError("bad-request-line")
        if not _VERSION.match(parts[2]):
            raise ParseError("bad-version")
    else:
        parts = first.split(" ", 2)
        if len(parts) < 2 or not _VERSION.match(parts[0]) or not (len(parts[1]) == 3 and parts[1].isdigit()):
            raise ParseError("bad-status-line")
    headers: dict[str, list[str]] = {}
    lenient: list[str] = []
    last: str | None = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            # a request's obs-fold is refused; a response's is unfolded (what clients do), except
            # in a framing header, where clients differ
            if request or last is None or last in _FRAMING:
                raise ParseError("smuggling:obs-fold")
            headers[last][-1] = (headers[last][-1] + " " + line.strip(" \t")).strip()
            lenient.append("obs-fold")
            continue
        name, sep, value = line.partition(":")
        if not sep or not name:
            raise ParseError("bad-header-line")
        if not _TOKEN.match(name):
            stripped = name.rstrip(" \t")
            if stripped != name:
                if request or stripped.lower() in _FRAMING or not _TOKEN.match(stripped):
                    raise ParseError("smuggling:space-before-colon")
                name = stripped
                lenient.append("space-before-colon")
            elif request or name.strip(" \t").lower() in _FRAMING:
                raise ParseError("bad-header-name")
            else:
                lenient.append("bad-header-name")
        if "\r" in value or "\x00" in value:
            raise ParseError("bad-header-value")
        last = name.lower()
        headers.setdefault(last, []).append(value.strip(" \t"))
    if lenient:
        headers[""] = sorted(set(lenient))
    return parts, headers


def _authority_port(authority: str | None) -> int:
    """The port of a CONNECT target (``host:port``, ``[v6]:port``); 0 when absent or invalid."""
    port = (authority or "").rpartition(":")[2]
    return int(port) if port.isdigit() and 0 < int(port) < 65536 else 0


def _summary_path(path: str | None) -> str | None:
    """Paths in the flow record are logged: redacted and bounded."""
    red = redact_path(path)
    return red[:SUMMARY_PATH_CHARS] if red is not None else None


def _tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _content_length(values: list[str] | None, prefix: str) -> int | None:
    if not values:
        return None
    if len(values) == 1:
        v = values[0]
        if v.isdigit() and v.isascii() and len(v) <= 18:
            return int(v)  # the common case: one plain number
    lengths = set()
    for v in values:
        for t in v.split(","):
            t = t.strip()
            if not (t.isdigit() and t.isascii()) or len(t) > 18:
                raise ParseError(f"{prefix}invalid-content-length")
            lengths.add(int(t))
    if len(lengths) != 1:
        raise ParseError(f"{prefix}duplicate-content-length")
    return lengths.pop()


class HttpParser(StreamParser):
    """Incremental HTTP/1.x parser for both directions of one connection."""

    app_proto = APP_PROTO
    oversize_anomaly = "oversized-header"

    def __init__(self, max_head: int = 65536) -> None:
        super().__init__()
        self.max_head = max_head
        self.max_buffer = max_head
        self._mode = [_HEAD, _HEAD]
        self._scanned = [0, 0]  # head bytes already searched for the blank line
        self._trailer_bytes = [0, 0]
        self._pending: deque[str] = deque()  # request methods awaiting a response
        self.requests = 0
        self.responses = 0
        self.first_host: str | None = None
        self.first_path: str | None = None
        self.pairs: list[list[str]] = []
        self.statuses: dict[int, int] = {}

    # -- driver ---------------------------------------------------------------
    def _parse(self, st: DirState, out: list[L7Event]) -> None:
        d = st.direction
        while st.buf and not st.stopped and not st.skip:
            mode = self._mode[d]
            if mode == _HEAD:
                if not self._head(st, out):
                    break
            elif mode == _CHUNK_SIZE or mode == _CHUNK_CRLF:
                if not self._chunks(st, d):
                    break
            else:  # _TRAILERS
                k = find_line(st.buf, 0, self.max_head)
                if k < 0:
                    break
                self._trailer_bytes[d] += k
                if self._trailer_bytes[d] > self.max_head:
                    raise ParseError("oversized-header")
                blank = not bytes(st.buf[:k]).strip(b"\r\n")
                st.advance(k)
                if blank:
                    self._end_of_message(st)
        st.hold = st.pos if (d == TOSERVER and self._mode[d] == _HEAD and st.buf and not st.stopped) else None

    def _chunks(self, st: DirState, d: int) -> bool:
        """Walk a chunked body's framing in ``st.buf`` by offsets: per chunk one size line
        read and one integer step, no copy of the data and one ``advance`` for the whole walk
        (a body of many small chunks arrived in one read costs a few operations per chunk, not
        a buffer shift each).  True when the last chunk was reached (trailers follow); False
        when more bytes are needed.  Accepts exactly what the line-by-line reading did:
        ``_chunk_size`` is that reading, and the regex only short-cuts its commonest input."""
        buf = st.buf
        n = len(buf)
        i = 0
        mode = self._mode[d]
        done = False
        try:
            while True:
                if mode == _CHUNK_CRLF:
                    if i >= n:
                        break
                    c = buf[i]
                    if c == 10:
                        i += 1
                    elif c == 13 and i + 1 < n and buf[i + 1] == 10:
                        i += 2
                    elif c == 13 and i + 1 == n:
                        break  # "\r" alone: wait for what follows it
                    else:
                        raise ParseError(("smuggling:" if d == TOSERVER else "") + "bad-chunk-terminator")
                    mode = _CHUNK_SIZE
                if i >= n:
                    break
                m = _CHUNK_LINE.match(buf, i)
                if m is not None:
                    size = int(m.group(1), 16)
                    k = m.end()
                else:
                    k, size = _chunk_size(buf, i, d)
                    if k < 0:
                        break
                i = k
                if size == 0:
                    mode = _TRAILERS
                    self._trailer_bytes[d] = 0
                    done = True
                    break
                mode = _CHUNK_CRLF
                i += size
                if i > n:
                    break  # the chunk goes on past what is buffered: skipped by counting
        finally:
            # also on a ParseError: the anomaly's offset is the unit that failed, as before
            self._mode[d] = mode
            if i:
                st.advance(i)
        return done

    def _end_of_message(self, st: DirState) -> None:
        self._mode[st.direction] = _HEAD

    def _head(self, st: DirState, out: list[L7Event]) -> bool:
        buf = st.buf
        d = st.direction
        # tolerate empty lines between messages (RFC 9112 section 2.2); buf is not empty here
        if buf[0] == 13 or buf[0] == 10:
            while buf[:2] == b"\r\n" or buf[:1] == b"\n":
                st.advance(2 if buf[:1] == b"\r" else 1)
                self._scanned[d] = 0
            if not buf or buf == b"\r":
                return False
        start = max(0, self._scanned[d] - 3)
        end = buf.find(b"\n\r\n", start, self.max_head + 1)
        # only a bare-LF end before that one matters: do not scan the body behind the head
        end2 = buf.find(b"\n\n", start, end + 1 if end >= 0 else self.max_head + 1)
        if end2 >= 0 and (end < 0 or end2 < end):
            head_len = end2 + 2
        elif end >= 0:
            head_len = end + 3
        else:
            head_len = -1
        if head_len < 0 or head_len > self.max_head:
            if head_len > self.max_head or len(buf) >= self.max_head:
                st.hold = st.pos
                raise ParseError("oversized-header")
            self._scanned[d] = len(buf)
            st.hold = st.pos if d == TOSERVER else None
            return False
        self._scanned[d] = 0
        st.hold = st.pos if d == TOSERVER else None
        text = buf[:head_len].decode("latin-1")
        if d == TOSERVER:
            self._request(st, text, head_len, out)
        else:
            self._response(st, text, head_len, out)
        return True

    # -- requests ---------------------------------------------------------------
    def _request(self, st: DirState, text: str, head_len: int, out: list[L7Event]) -> None:
        method, host, path, version, length, chunked, encoding, ctype, upgrade, raw = _head_facts(text, True)
        body = length or 0
        head_end = st.pos + head_len
        end = -1 if chunked else head_end + body
        fields: dict[str, Any] = {
            "method": method,
            "host": host,
            "path": path,
            "version": version,
            "content_length": length,
            "chunked": chunked,
            "content_encoding": encoding,
            "content_type": ctype,
            "upgrade": upgrade,
            "raw_target": raw,
            "head_end": head_end,
        }
        out.append(L7Event(APP_PROTO, "request", TOSERVER, st.pos, fields, end))
        self.requests += 1
        if self.first_host is None and self.first_path is None:
            self.first_host, self.first_path = host, path
        pair = [method, path]
        if len(self.pairs) < MAX_SUMMARY_PAIRS and pair not in self.pairs:
            self.pairs.append(pair)
        self._pending.append((method, _authority_port(host) if method == "CONNECT" else 0))
        st.hold = None
        if chunked:
            st.advance(head_len)
            self._mode[TOSERVER] = _CHUNK_SIZE
        else:
            st.advance(head_len + body)  # the head and the body it announces, in one step
            self._end_of_message(st)

    # -- responses --------------------------------------------------------------
    def _response(self, st: DirState, text: str, head_len: int, out: list[L7Event]) -> None:
        code, version, length, chunked, encoding, ctype, lenient = _head_facts(text, False)
        for name in lenient:
            # tolerated (cannot desynchronise the client) but reported
            out.append(L7Event(APP_PROTO, "anomaly", TOCLIENT, st.pos, {}, -1, f"lenient:{name}"))
        interim = 100 <= code < 200 and code != 101
        method = None
        connect_port = 0
        if not interim and self._pending:
            method, connect_port = self._pending.popleft()
        no_body = interim or code in (101, 204, 304) or method == "HEAD"
        tunnel = code == 101 or (method == "CONNECT" and 200 <= code < 300)
        until_close = not no_body and not chunked and length is None and not tunnel
        if no_body:
            body, chunked, end = 0, False, st.pos + head_len
        elif chunked:
            body, end = 0, -1
        elif length is not None:
            body, end = length, st.pos + head_len + length
        else:
            body, end = 0, -1
        fields = {
            "status": code,
            "version": version,
            "content_length": length,
            "chunked": chunked,
            "content_encoding": encoding,
            "content_type": ctype,
        }
        if tunnel:
            # where the inner stream starts (the session re-identifies it) and its port hint
            fields["tunnel_at"] = st.pos + head_len
            fields["tunnel_port"] = connect_port
        out.append(L7Event(APP_PROTO, "response", TOCLIENT, st.pos, fields, end))
        if not interim:
            self.responses += 1
        self.statuses[code] = self.statuses.get(code, 0) + 1
        st.advance(head_len)
        if tunnel:
            # the switch is accepted: both directions now carry another protocol.
            # Until then the client's side stays parsed - a declined Upgrade must
            # not blind the parser to the requests that follow it.
            for other in self._dirs:
                other.stop()
            return
        if until_close:
            st.stop()
            return
        if chunked:
            self._mode[TOCLIENT] = _CHUNK_SIZE
        elif body:
            st.advance(body)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "responses": self.responses,
            "host": self.first_host,
            "path": _summary_path(self.first_path),
            "methods_paths": [[m, _summary_path(p)] for m, p in self.pairs],
            "statuses": dict(self.statuses),
        }
        out.update(self._base_summary())
        return out
