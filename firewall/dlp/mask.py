"""Masking: the only representation of a sensitive value that leaves the engine.

PCI DSS 3.4.1 allows at most the BIN and the last four digits of a PAN to be
displayed, so cards keep their first six and last four digits.  Everything else
is fully masked except a short, non-secret type hint (``AKIA``, the IBAN country,
the PEM header).  Context snippets around a finding are sanitised a second time
with shape rules (long digit runs, long mixed tokens) so a neighbouring value that
no enabled rule reported - or only half of one - never leaks through a log line.
"""

from __future__ import annotations

import re

from firewall.dlp.validators import digits_of

STAR = "*"
_ALNUM = re.compile(r"[A-Za-z0-9]")
# At least 6 digits, each pair at most two punctuation characters apart: masked in context.
_DIGIT_RUN = re.compile(r"[0-9](?:[^A-Za-z0-9]{0,2}[0-9]){5,}")
# A long token mixing letters and digits (keys, tokens, base64): masked in context.
_TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{16,}")
_CONTROL = bytes(46 if i < 32 or i == 127 else i for i in range(256))  # control bytes -> "."
_HAS_DIGIT = re.compile(r"[0-9]")


def mask_card(value: bytes) -> str:
    digits = digits_of(value).decode()
    if len(digits) < 11:
        return STAR * len(digits)
    return digits[:6] + STAR * (len(digits) - 10) + digits[-4:]


def mask_shape(value: bytes) -> str:
    """Keep punctuation, hide every letter and digit: ``123-45-6789`` -> ``***-**-****``."""
    return _ALNUM.sub(STAR, value.decode("ascii", "replace"))


MAX_STARS = 24  # long secrets (PEM, JWT) are not worth a line of stars; length is no secret either way


def mask_hint(value: bytes, hint: bytes | None, hint_inside: bool) -> str:
    """Keep the non-secret type hint (``AKIA``, ``DE``, the PEM header), star the rest."""
    if hint and hint_inside and value.startswith(hint):
        return hint.decode("ascii", "replace") + STAR * min(MAX_STARS, len(value) - len(hint))
    if hint:
        return hint.decode("ascii", "replace") + ":" + STAR * min(MAX_STARS, len(value))
    return STAR * min(MAX_STARS, len(value))


_DIGITS_TO_STARS = str.maketrans("0123456789", STAR * 10)


def _mask_digit_run(m: re.Match[str]) -> str:
    return m.group(0).translate(_DIGITS_TO_STARS)


_HAS_ALPHA = re.compile(r"[A-Za-z]")


def _mask_token(m: re.Match[str]) -> str:
    # a token is ASCII by construction (_TOKEN), so [0-9] / [A-Za-z] are isdigit / isalpha
    tok = m.group(0)
    if _HAS_DIGIT.search(tok) is None or _HAS_ALPHA.search(tok) is None:
        return tok
    return STAR * len(tok)


def sanitize(raw: bytes) -> str:
    """Defence in depth for context snippets: mask anything shaped like a value.

    Runs twice per finding (the bytes before and after it), so each pass is skipped when it
    cannot match: no token under 16 characters, no digit run without a digit."""
    text = raw.translate(_CONTROL).decode("utf-8", "replace")
    if len(text) >= 16:
        text = _TOKEN.sub(_mask_token, text)
    if _HAS_DIGIT.search(text) is None:
        return text
    return _DIGIT_RUN.sub(_mask_digit_run, text)


def context_snippet(left: bytes, masked: str, right: bytes) -> str:
    """``left`` and ``right`` are the raw bytes around the value (each bounded by the caller)."""
    return f"{sanitize(left)}{masked}{sanitize(right)}"
