"""The decoded view of an HTTP request that DLP scans besides the raw stream.

A server de-chunks, gunzips and percent-decodes what it receives, so a card number
can travel split by chunk-size lines, compressed, or as ``%34%31...``: invisible to a
scan of the raw bytes.  ``BodyDecoder`` undoes the same encodings incrementally
(any split of the input gives the same output) and bounded: at most ``limit``
decoded bytes per body (a decompression bomb stops there and is reported as
``undecodable``, which the session treats like a finding where policy blocks).
"""

from __future__ import annotations

import urllib.parse
import zlib
from typing import Any

MAX_DECODED = 8 << 20
#: stacked content codings decoded (``Content-Encoding: gzip, gzip``); more is an error
MAX_LAYERS = 3

_SIZE, _DATA, _CRLF, _DONE = range(4)


def decode_target(target: str) -> bytes | None:
    """The percent-decoded request target, or None when decoding changes nothing."""
    if "%" not in target and "+" not in target:
        return None
    return urllib.parse.unquote_plus(target).encode("utf-8", "replace")


def needs_decoding(chunked: bool, encoding: str | None, form: bool) -> bool:
    """Whether ``BodyDecoder(...).needed`` would be true, without building one: a plain body
    (no chunking, no content coding, not a form) reads the same raw and decoded."""
    return chunked or form or (encoding or "").lower() not in ("", "identity")


class BodyDecoder:
    """De-chunk -> decompress -> percent-decode, in that order, incrementally."""

    def __init__(self, *, chunked: bool, encoding: str | None, form: bool, length: int | None,
                 limit: int = MAX_DECODED) -> None:
        self.chunked = chunked
        self.remaining = length  # for Content-Length bodies
        self.state = _SIZE
        self.chunk_left = 0
        self.line = b""
        self.limit = limit
        self.out_total = 0
        self.done = False
        self.error: str | None = None
        codings = [c.strip() for c in (encoding or "").lower().split(",") if c.strip() not in ("", "identity")]
        self.layers: list[_Inflate] = []
        if len(codings) > MAX_LAYERS:
            self.error = f"more than {MAX_LAYERS} content-encoding layers"
        for c in reversed(codings):  # the last coding listed was applied last: undone first
            if c in ("gzip", "x-gzip", "deflate"):
                self.layers.append(_Inflate(c != "deflate"))
            else:
                self.error = self.error or f"unsupported content-encoding {c}"
        self.z = self.layers or None
        self.form = form
        self.pct_tail = b""

    @property
    def needed(self) -> bool:
        return self.chunked or self.z is not None or self.form or self.error is not None

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Decoded bytes of ``data`` and how many input bytes belonged to this body."""
        if self.done:
            return b"", 0
        used = len(data)
        if not self.chunked and self.remaining is not None:
            used = min(used, self.remaining)
            self.remaining -= used
            payload = data[:used]
            if self.remaining == 0:
                self.done = True
        elif self.chunked:
            payload, used = self._dechunk(data)
        else:
            payload = data
        out = self._decompress(payload)
        if self.form:
            out = self._percent(out, final=self.done)
        self.out_total += len(out)
        if self.out_total > self.limit:
            self.error = "decoded body over the limit"
            self.done = True
        return out, used

    def _dechunk(self, data: bytes) -> tuple[bytes, int]:
        out = bytearray()
        i, n = 0, len(data)
        while i < n and not self.done:
            if self.state == _SIZE:
                j = data.find(b"\n", i)
                if j < 0:
                    self.line += data[i:]
                    if len(self.line) > 4096:
                        self.error, self.done = "bad chunk size line", True
                    return bytes(out), n
                line = (self.line + data[i:j]).split(b";", 1)[0].strip()
                self.line = b""
                i = j + 1
                try:
                    size = int(line, 16)
                except ValueError:
                    self.error, self.done = "bad chunk size", True
                    return bytes(out), i
                if size == 0:
                    self.done = True  # trailers are headers, scanned with the raw stream
                    return bytes(out), i
                self.chunk_left, self.state = size, _DATA
            elif self.state == _DATA:
                k = min(self.chunk_left, n - i)
                out += data[i:i + k]
                i += k
                self.chunk_left -= k
                if self.chunk_left == 0:
                    self.state = _CRLF
            else:  # _CRLF after the chunk data
                j = data.find(b"\n", i)
                if j < 0:
                    return bytes(out), n
                i = j + 1
                self.state = _SIZE
        return bytes(out), i

    def _decompress(self, payload: bytes) -> bytes:
        if not self.layers or not payload or self.error:
            return b"" if self.error and self.layers else payload
        room = max(0, self.limit - self.out_total) + 1
        try:
            for layer in self.layers:
                payload = layer.feed(payload, room)
                if not payload:
                    break
        except _DecodeError as exc:
            self.error, self.done = str(exc), True
            return b""
        return payload

    def _percent(self, data: bytes, final: bool) -> bytes:
        data = self.pct_tail + data
        self.pct_tail = b""
        if not final:
            k = data.rfind(b"%", max(0, len(data) - 2))
            if k >= 0:
                data, self.pct_tail = data[:k], data[k:]
        return urllib.parse.unquote_to_bytes(data.replace(b"+", b" "))


class _DecodeError(Exception):
    pass


class _Inflate:
    """One content-coding layer: every gzip member (a body may be several, RFC 1952 section 2.2:
    a server gunzips them all), or one deflate stream; bounded output per call."""

    def __init__(self, gzip: bool) -> None:
        self.gzip = gzip
        self.z = self._new()
        self.ended = False

    def _new(self) -> Any:
        return zlib.decompressobj(16 + zlib.MAX_WBITS if self.gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes, room: int) -> bytes:
        out = bytearray()
        while data:
            if self.ended:
                if not self.gzip or not data.strip(b"\0"):
                    return bytes(out)  # trailing padding after the last member: ignored
                self.z, self.ended = self._new(), False  # the next gzip member
            try:
                chunk = self.z.decompress(data, room - len(out))
            except zlib.error as exc:
                raise _DecodeError(f"undecodable body ({exc})") from None
            out += chunk
            if self.z.unconsumed_tail or len(out) >= room:
                raise _DecodeError("decoded body over the limit")
            if self.z.eof:
                self.ended = True
                data = self.z.unused_data
            else:
                data = b""
        return bytes(out)
