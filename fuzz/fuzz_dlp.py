"""Fuzz the DLP engine's stream (chunked) scanner against the blocking contract.

Input: a one-byte split-spec length ``k``, ``k`` bytes of segment sizes (1..64),
then the payload. The payload is scanned once whole (the reference) and once as a
stream cut by the split spec. Checked:

* ``scan``/``close`` never raise;
* **the blocking contract** (firewall/dlp/engine.py): every value of the reference is
  reported by the stream no later than the ``scan()`` call that passed its last
  byte - otherwise the session would have forwarded a complete value;
* after retractions, the stream's findings equal the reference (segmentation
  does not change results);
* ``masked`` and ``context`` never contain the value as sent nor its digits run together.

Run: python -m fuzz.fuzz_dlp -max_total_time=600 -dict=fuzz/dicts/dlp.dict
"""

from __future__ import annotations

import os
import re
import tempfile

from fuzz.common import Bytes, check, instrumented, main, segments

with instrumented(__name__ == "__main__"):
    from firewall.dlp.engine import DlpEngine

_CACHE = os.environ.get("PALISADE_DLP_CACHE") or os.path.join(tempfile.gettempdir(), "palisade-fuzz-dlp-cache")
ENGINE = DlpEngine.load(cache_dir=_CACHE)
_DIGITS = re.compile(r"\d")


def _key(f) -> tuple[str, int, int]:
    return (f.rule_id, f.start, f.end)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    b = Bytes(data)
    spec = b.take(b.byte() % 16)
    payload = b.rest()
    reference = {_key(f): f for f in ENGINE.scan_bytes(payload, chunk_size=max(1, len(payload)))}
    stream = ENGINE.stream(track_retractions=True)
    reported: dict[tuple[str, int, int], int] = {}  # finding -> stream offset after the reporting call
    seen = 0
    found = []
    for piece in segments(payload, spec):
        out = stream.scan(piece)
        seen += len(piece)
        for f in out:
            reported.setdefault(_key(f), seen)
        found += out
    for f in stream.close():
        reported.setdefault(_key(f), seen + 1)  # at close: later than any scan()
        found.append(f)
    for key, f in reference.items():
        check(key in reported, f"value {f.rule_id} {f.start}..{f.end} ({f.masked}) never reported by the stream")
        at = reported[key]
        # the call that passed byte end-1 ended at the first segment boundary >= end
        check(at <= _first_boundary_at_or_after(payload, spec, f.end),
              f"{f.rule_id} {f.start}..{f.end} reported only at offset {at}: too late to block")
    retracted = {_key(f) for f in stream.retracted}
    final = {_key(f) for f in found} - retracted
    check(final == set(reference), f"segmentation changed findings: {sorted(final ^ set(reference))}")
    for f in found:
        value = payload[f.start:f.end].decode("latin-1")
        digits = "".join(_DIGITS.findall(value))
        check(0 <= f.start < f.end <= len(payload), f"finding outside the payload: {f}")
        if len(digits) >= 8:
            for text in (f.masked, f.context):
                # the value as sent, or its digits run together (other bytes between digits in the
                # context are other data, not this value)
                check(value not in text and digits not in text, f"{f.rule_id}: full value in masked/context")


def _first_boundary_at_or_after(payload: bytes, spec: bytes, end: int) -> int:
    off = 0
    for piece in segments(payload, spec):
        off += len(piece)
        if off >= end:
            return off
    return off


SEEDS = [
    b"\x03\x01\x05\x0fcard 4111111111111111 exp 12/29",
    b"\x00pay with 4111 1111 1111 1111, or 5555-5555-5555-4444 or 378282246310005",
    b"\x02\x00\x00IBAN DE89 3704 0044 0532 0130 00 / GB82WEST12345698765432",
    b"\x01\x07ssn 536-22-1234 key AKIAZ7QJ3XKDLQ2MVB5R ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5",
    b"\x01\x00{\"card\":\"41111111111111111\",\"n\":\"4111111111111111\"}",
    b"\x00-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA" + b"A" * 80 + b"\n-----END RSA PRIVATE KEY-----",
]

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "dlp")
