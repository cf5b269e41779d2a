"""Per-direction byte bookkeeping shared by the incremental parsers.

Every parser has the same three needs, solved once here so each protocol module
only describes its message grammar:

* **absolute offsets** - ``pos`` is the stream offset of ``buf[0]``, so events
  can say exactly where a message starts and ends whatever the segmentation;
* **skipping by counting** - once a body length is known, ``advance(n)`` drops
  what is buffered and turns the rest into a ``skip`` counter, so a 1 GiB body
  costs a few integer subtractions instead of per-byte Python work;
* **never raising** - ``StreamParser.feed`` catches the parser's own
  ``ParseError`` (and, as a last resort, any bug) and turns it into one anomaly
  event; that direction is then only counted (``stopped``), never re-parsed.

The buffer is bounded: a parser that cannot make progress with ``max_buffer``
bytes buffered gets an ``oversized-...`` anomaly instead of buffering forever.
"""

from __future__ import annotations

from typing import Any

from firewall.protocols.base import TOCLIENT, TOSERVER, L7Event, ParseError


class DirState:
    """Parsing state of one direction of one flow."""

    __slots__ = ("buf", "pos", "skip", "stopped", "hold", "direction")

    def __init__(self, direction: int) -> None:
        self.direction = direction
        self.buf = bytearray()
        self.pos = 0  # absolute offset of buf[0] (== bytes consumed so far)
        self.skip = 0  # bytes still to drop unseen after buf is exhausted
        self.stopped = False  # opaque or failed: only count from now on
        self.hold: int | None = None  # offset of an incomplete message head

    def advance(self, n: int) -> None:
        """Consume ``n`` bytes: from the buffer first, the rest by counting."""
        have = len(self.buf)
        self.pos += n
        if n <= have:
            del self.buf[:n]
        else:
            self.buf.clear()
            self.skip += n - have

    def stop(self) -> None:
        """Stop parsing this direction; later bytes are only counted."""
        self.pos += len(self.buf)
        self.buf.clear()
        self.stopped = True
        self.hold = None


class StreamParser:
    """Base for parsers of length-delimited or line-delimited TCP protocols.

    Subclasses implement ``_parse(st, out)``: consume complete messages from
    ``st.buf`` with ``st.advance``, append events to ``out``, set ``st.hold`` to
    the start of an incomplete request head, and return when more bytes are
    needed. Raising ``ParseError("name")`` yields ``anomaly="name"``.
    """

    app_proto = "unknown"
    #: largest incomplete message prefix a direction may buffer
    max_buffer = 65536
    #: anomaly name when ``max_buffer`` is exceeded
    oversize_anomaly = "oversized-message"

    def __init__(self) -> None:
        self._dirs = (DirState(TOSERVER), DirState(TOCLIENT))
        self.anomalies: list[str] = []

    def feed(self, data: bytes, direction: int) -> list[L7Event]:
        st = self._dirs[direction]
        n = len(data)
        if st.stopped:
            st.pos += n
            return []
        if st.skip:
            if st.skip >= n:
                st.skip -= n
                return []
            data = data[st.skip:]
            st.skip = 0
        if not data:
            return []
        st.buf += data
        out: list[L7Event] = []
        try:
            self._parse(st, out)
            if not st.stopped and not st.skip and len(st.buf) > self.max_buffer:
                raise ParseError(self.oversize_anomaly)
        except ParseError as exc:
            out.append(self._anomaly(st, str(exc) or "parse-error"))
            st.stop()
        except Exception as exc:  # noqa: BLE001 - a parser bug must not kill the relay
            out.append(self._anomaly(st, f"parser-error:{type(exc).__name__}"))
            st.stop()
        return out

    def at_boundary(self, direction: int) -> bool:
        """Whether everything seen in ``direction`` ended on a whole unit (frame, message):
        only then may the session append bytes of its own (an HTTP/2 refusal) to that stream."""
        st = self._dirs[direction]
        return not st.stopped and not st.buf and not st.skip

    def hold_from(self, direction: int) -> int | None:
        st = self._dirs[direction]
        return None if st.stopped else st.hold

    def _anomaly(self, st: DirState, name: str, **fields: Any) -> L7Event:
        # st.pos is where the unparseable unit starts: parsers consume whole units
        # only, so this offset does not depend on how the stream was segmented
        self.anomalies.append(name)
        return L7Event(self.app_proto, "anomaly", st.direction, st.pos, dict(fields), -1, name)

    def _parse(self, st: DirState, out: list[L7Event]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _base_summary(self) -> dict[str, Any]:
        return {"anomalies": sorted(set(self.anomalies))} if self.anomalies else {}


def find_line(buf: bytearray, start: int, limit: int) -> int:
    """Index just past the next ``\\n`` at or after ``start``, or -1.

    Raises ``ParseError("oversized-line")`` when no newline appears within
    ``limit`` bytes of ``start`` - the bound that keeps line buffering finite.
    """
    i = buf.find(b"\n", start, start + limit)
    if i < 0:
        if len(buf) - start >= limit:
            raise ParseError("oversized-line")
        return -1
    return i + 1


def sql_verb(text: str) -> str:
    """First SQL keyword of a statement, upper-cased (``SELECT``, ``INSERT`` ...).

    Leading whitespace, ``--``/``#`` line comments, ``/* */`` block comments and
    opening parentheses are skipped, because clients and ORMs put them there.
    Returns ``""`` when no keyword is found in the text given.
    """
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace() or c in "(;":
            i += 1
        elif text.startswith("--", i) or c == "#":
            j = text.find("\n", i)
            if j < 0:
                return ""
            i = j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                return ""
            i = j + 2
        else:
            break
    j = i
    while j < n and (text[j].isalpha() or text[j] == "_"):
        j += 1
    return text[i:j].upper()
