"""Helpers to replay recorded conversations through the identifier and parsers.

A recording is a list of connections; a connection is the ordered list of
``(direction, bytes)`` segments a real relay received. Re-chunking keeps that
global order (a response never overtakes its request) and only changes where
segment boundaries fall - exactly the freedom TCP gives the network.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
from pathlib import Path
from typing import Any

from firewall.protocols import Identifier, L7Event, make_parser, make_udp_parser

DATA = Path(__file__).parent / "data"
Segment = tuple[int, bytes]

#: hypothesis effort: PALISADE_FUZZ=deep for long local runs, fast by default (CI)
FUZZ_EXAMPLES = 1500 if os.environ.get("PALISADE_FUZZ") == "deep" else 60


def load(name: str) -> dict[str, Any]:
    with gzip.open(DATA / f"{name}.json.gz", "rt") as fh:
        doc = json.load(fh)
    doc["connections"] = [[(d, base64.b64decode(b)) for d, b in conn] for conn in doc["connections"]]
    return doc


def recordings() -> list[str]:
    return sorted(p.name[: -len(".json.gz")] for p in DATA.glob("*.json.gz"))


def identify(segs: list[Segment], port: int, max_depth: int = 2048) -> str | None:
    ident = Identifier(port, max_depth)
    for d, data in segs:
        name = ident.feed(data, d)
        if name is not None:
            return name
    return None


def run(app_proto: str, segs: list[Segment], **options: Any) -> tuple[list[L7Event], dict[str, Any]]:
    parser = make_parser(app_proto, **options)
    assert parser is not None, app_proto
    events: list[L7Event] = []
    for d, data in segs:
        events.extend(parser.feed(data, d))
    return events, parser.summary()


def run_udp(segs: list[Segment]) -> tuple[list[L7Event], dict[str, Any]]:
    parser = make_udp_parser("dns")
    assert parser is not None
    events = [e for d, data in segs for e in parser.feed(data, d)]
    return events, parser.summary()


def bytewise(segs: list[Segment]) -> list[Segment]:
    return [(d, data[i : i + 1]) for d, data in segs for i in range(len(data))]


def split_at(segs: list[Segment], offset: int) -> list[Segment]:
    """Cut the conversation at global byte ``offset`` (one extra boundary)."""
    out: list[Segment] = []
    seen = 0
    for d, data in segs:
        if seen < offset < seen + len(data):
            k = offset - seen
            out += [(d, data[:k]), (d, data[k:])]
        else:
            out.append((d, data))
        seen += len(data)
    return out


def rechunk(segs: list[Segment], rng: random.Random, max_chunk: int = 64) -> list[Segment]:
    """Merge same-direction neighbours, then cut into random 1..max_chunk pieces."""
    merged: list[tuple[int, bytearray]] = []
    for d, data in segs:
        if merged and merged[-1][0] == d:
            merged[-1][1].extend(data)
        else:
            merged.append((d, bytearray(data)))
    out: list[Segment] = []
    for d, data in merged:
        i = 0
        while i < len(data):
            k = rng.randint(1, max_chunk)
            out.append((d, bytes(data[i : i + k])))
            i += k
    return out
