"""The shared body of the per-protocol harnesses (``fuzz_http.py`` ... ``fuzz_mysql.py``).

Input layout: a one-byte split-spec length ``k``, ``k`` bytes of segment sizes,
then a conversation of records ``[flags][len_hi][len_lo][bytes]``; bit 0 of
``flags`` is the direction (0 client->server, 1 server->client).

Checked for every input (the parser contract in docs/internals.md):

* ``feed`` never raises and returns ``L7Event``s; ``summary()`` is a dict;
* buffers stay bounded (``max_buffer`` plus one segment);
* ``hold_from`` points into bytes already seen;
* offsets are sane (``0 <= offset``, ``end == -1 or end >= offset``);
* the events do not depend on where segment boundaries fall (TCP's freedom):
  the conversation fed as recorded and fed re-split by the split spec give the
  same events.
"""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

from fuzz.common import REPO, Bytes, check, segments

RECORDINGS = REPO / "tests" / "protocols" / "data"

# recordings whose connections seed each protocol's corpus
SEED_FILES = {
    "http": ["http_nginx_curl"], "http2": ["h2c_nghttpd_nghttp"], "tls": ["tls12_openssl", "tls13_openssl",
                                                                          "tls10_refused_openssl"],
    "ssh": ["ssh_openssh"], "dns": ["dns_tcp_dnsmasq_dig"], "redis": ["redis_cli"],
    "pgsql": ["pgsql_psql", "pgsql_sslrequest_refused"], "mysql": ["mysql_mariadb"],
}

Conversation = list[tuple[int, bytes]]


def decode(data: bytes) -> tuple[bytes, Conversation]:
    b = Bytes(data)
    spec = b.take(b.byte() % 16)
    conv: Conversation = []
    while b.i < len(b.data):
        flags = b.byte()
        n = (b.byte() << 8) | b.byte()
        conv.append((flags & 1, b.take(n)))
    return spec, conv


def encode(conv: Conversation, spec: bytes = b"") -> bytes:
    out = bytearray([len(spec)]) + spec
    for d, chunk in conv:
        for i in range(0, max(len(chunk), 1), 0xFFFF):
            piece = chunk[i:i + 0xFFFF]
            out += bytes([d & 1]) + len(piece).to_bytes(2, "big") + piece
    return bytes(out)


def recorded_conversations(name: str, limit_bytes: int = 4096) -> list[Conversation]:
    path = RECORDINGS / f"{name}.json.gz"
    if not path.exists():
        return []
    with gzip.open(path, "rt") as fh:
        doc = json.load(fh)
    out = []
    for conn in doc["connections"]:
        conv, total = [], 0
        for d, b in conn:  # long conversations are cut: the first messages are what the seeds need
            if total >= limit_bytes:
                break
            raw = base64.b64decode(b)[: limit_bytes - total]
            conv.append((int(d), raw))
            total += len(raw)
        out.append(conv)
    return out


def seeds(proto: str, extra: list[bytes] | None = None) -> list[bytes]:
    out = [encode(c, spec) for name in SEED_FILES.get(proto, [])
           for c in recorded_conversations(name)[:4] for spec in (b"", b"\x00\x02\x07")]
    for raw in extra or []:
        out.append(encode([(0, raw)]))
    return out


def _events(proto: str, conv: Conversation, spec: bytes | None):
    from firewall.protocols import L7Event, make_parser

    parser = make_parser(proto)
    check(parser is not None, f"no parser for {proto}")
    events = []
    seen = [0, 0]
    for d, chunk in conv:
        pieces = [chunk] if spec is None else list(segments(chunk, spec))
        for piece in pieces:
            out = parser.feed(piece, d)
            seen[d] += len(piece)
            check(isinstance(out, list) and all(isinstance(e, L7Event) for e in out), "feed must return events")
            events.extend(out)
            for st in getattr(parser, "_dirs", ()):
                check(len(st.buf) <= max(getattr(parser, "max_buffer", 0), 1) + len(piece),
                      f"{proto}: buffer grew to {len(st.buf)}")
            held = parser.hold_from(d)
            check(held is None or 0 <= held <= seen[d], f"{proto}: hold_from {held} outside 0..{seen[d]}")
    summary = parser.summary()
    check(isinstance(summary, dict), "summary must be a dict")
    json.dumps(summary, default=str)
    for e in events:
        check(e.offset >= 0 and (e.end == -1 or e.end >= e.offset), f"bad offsets in {e}")
        check(e.kind == "anomaly" or e.anomaly is None, f"anomaly name on a non-anomaly event {e}")
    return events


def parser_target(proto: str):
    def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
        spec, conv = decode(data)
        whole = _events(proto, conv, None)
        split = _events(proto, conv, spec)
        check(whole == split, f"{proto}: events depend on segmentation")

    TestOneInput.__name__ = f"TestOneInput_{proto}"
    return TestOneInput


def recording_path(name: str) -> Path:
    return RECORDINGS / f"{name}.json.gz"
