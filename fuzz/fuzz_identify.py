"""Fuzz protocol identification (``firewall.protocols.Identifier``).

Checked: ``feed`` never raises; the answer is ``None`` or a registered name /
``unknown``; once decided it never changes; it is decided within ``max_depth``
bytes of one direction; and the result does not depend on segmentation when the
same bytes arrive in the same order.

Run: python -m fuzz.fuzz_identify -max_total_time=600
"""

from __future__ import annotations

from fuzz.common import Bytes, check, instrumented, main, segments

with instrumented(__name__ == "__main__"):
    from firewall.protocols import REGISTRY, UNKNOWN, Identifier
    from fuzz.protocol_target import SEED_FILES, decode, encode, recorded_conversations

NAMES = {s.name for s in REGISTRY} | {UNKNOWN}
PORTS = [0, 80, 443, 22, 53, 6379, 5432, 3306, 9000, 8443]


def _identify(port: int, conv, spec: bytes | None, depth: int) -> str | None:
    ident = Identifier(port, depth)
    result = None
    fed = [0, 0]
    for d, chunk in conv:
        for piece in ([chunk] if spec is None else segments(chunk, spec)):
            r = ident.feed(piece, d)
            fed[d] += len(piece)
            check(r is None or r in NAMES, f"unknown answer {r!r}")
            if result is not None:
                check(r == result, f"decision changed from {result} to {r}")
            result = r
            if r is None and piece:
                check(fed[d] < depth, f"undecided after {fed[d]} bytes in direction {d} (max_depth {depth})")
    return result


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    b = Bytes(data)
    port = PORTS[b.byte() % len(PORTS)]
    depth = 16 + b.byte() * 8
    spec, conv = decode(b.rest())
    whole = _identify(port, conv, None, depth)
    split = _identify(port, conv, spec, depth)
    check(whole == split, f"identification depends on segmentation: {whole} vs {split}")


SEEDS = [bytes([i % len(PORTS), 255]) + encode(c[:2]) for i, names in enumerate(SEED_FILES.values())
         for n in names for c in recorded_conversations(n)[:1]]

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "identify")
