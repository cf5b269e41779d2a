"""The one ``alert.signature_id`` formula: a stable number per signature string.

Every alert (policy, DLP, kernel/NFLOG, evidence) derives its ``signature_id`` from
its ``alert.signature`` here, so a SIEM rule keyed on the number matches the same
signature whichever part of the sidecar raised it (issue 18: ``session.py`` and
``dlp.py`` had two formulas, so one DLP rule had two numbers).  Kept in a module of
its own, importing nothing, so every emitter can use it without an import cycle.
"""

from __future__ import annotations

import zlib


def signature_id(signature: str) -> int:
    """CRC-32 of the UTF-8 signature, masked to 31 bits (a positive int32, as EVE readers expect)."""
    return zlib.crc32(signature.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF
