"""The one canonical form of an HTTP request path: what the policy matches, the flow
record shows and the report counts.

A path rule is only as good as the agreement between the path it matches and the
path the server resolves.  Servers disagree with each other (nginx decodes ``%2F``
and then resolves ``..``; Tomcat strips ``;params`` and honours ``/..;/``; IIS treats
``\\`` as ``/``), so the canonical path is the one every one of them would reach,
and a request that could reach *different* paths on different servers is refused
instead of guessed (``CanonError``; the session hands it to the exception policy).

The table (docs/threat-model.md, "HTTP canonicalisation", is the documented copy):

=========================  ==========================  ===================================
input                      nginx / Envoy / Tomcat ...   here (secure default)
=========================  ==========================  ===================================
``%41`` (unreserved)       decoded                     decoded
other ``%XX``              decoded (nginx ``$uri``)     decoded
``%2F`` ``%5C``            decoded / kept / rejected    **refused** (``escaped-slash``)
``\\`` (raw)                literal / separator (IIS)   **refused** (``backslash``)
``%25XX`` (double enc.)    decoded once                **refused** (``double-encoding``)
``%00``, NUL, controls     rejected / varies           **refused** (``control-char``)
``%3F`` ``%23`` in path    decoded (``?``/``#``)       **refused** (``escaped-delimiter``)
bad ``%`` (``%zz``)        400 / passed                **refused** (``bad-percent``)
non-UTF-8 after decoding   passed                      **refused** (``invalid-utf8``)
raw non-ASCII / controls   varies                      **refused** (``invalid-char``)
``.`` / ``..`` segments    resolved (after decoding)   resolved after decoding
``..`` above the root      400                         **refused** (``dot-above-root``)
``//`` merged slashes      merged (nginx default)      merged
``;`` path parameters      literal / stripped (Tomcat) **refused** (``path-parameter``)
``#`` fragment             not sent by clients          **refused** (``fragment``)
query string               not part of the path        kept raw, never decoded into the path
=========================  ==========================  ===================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# what may appear raw in an origin-form path (RFC 3986 pchar + "/"), plus the characters
# real clients send unescaped and every common server accepts
_RAW_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%\"<>\[\]^`{|}]*\Z")


class CanonError(ValueError):
    """The path cannot be given one meaning every server agrees on; ``str(exc)`` names why."""


@dataclass(frozen=True, slots=True)
class Canonical:
    path: str          # decoded, dot segments resolved, slashes merged
    query: str | None  # raw (undecoded) query string, without the "?"

    @property
    def target(self) -> str:
        """Path and raw query, the form the L7 event carries (``normalize_path`` keeps it)."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


def canonical_path(raw_path: str) -> str:
    """The canonical form of a path (no query); ``CanonError`` when it is ambiguous."""
    if not raw_path.startswith("/"):
        raise CanonError("not-origin-form")
    if "\\" in raw_path:
        raise CanonError("backslash")
    if not _RAW_OK.match(raw_path):
        raise CanonError("invalid-char")
    if ";" in raw_path:
        raise CanonError("path-parameter")
    if _BAD_PCT.search(raw_path):
        raise CanonError("bad-percent")

    def unescape(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        if code in (0x2F, 0x5C):
            raise CanonError("escaped-slash")
        if code == 0x25:
            raise CanonError("double-encoding")
        if code in (0x3F, 0x23):
            raise CanonError("escaped-delimiter")
        if code == 0x3B:
            raise CanonError("path-parameter")
        if code < 0x20 or code == 0x7F:
            raise CanonError("control-char")
        return chr(code)

    decoded = _PCT.sub(unescape, raw_path)
    try:
        decoded = decoded.encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise CanonError("invalid-utf8") from None
    out: list[str] = []
    segs = decoded.split("/")
    for seg in segs[1:]:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if not out:
                raise CanonError("dot-above-root")
            out.pop()
            continue
        out.append(seg)
    trailing = bool(out) and segs[-1] in ("", ".", "..")
    return "/" + "/".join(out) + ("/" if trailing else "")


def canonical_target(target: str) -> Canonical:
    """Split an origin-form target into its canonical path and raw query."""
    if "#" in target:
        raise CanonError("fragment")
    path, sep, query = target.partition("?")
    return Canonical(canonical_path(path), query if sep else None)
