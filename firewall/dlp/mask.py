"""Masking: the only representation of a sensitive value that leaves the engine.

PCI DSS 3.4.1 allows at most the BIN and the last four digits of a PAN to be
displayed, so cards keep their first six and last four digits.  Everything else
is fully masked except a short, non-secret type hint (``AKIA``, the IBAN country,
the PEM header).  Context snippets around a finding are sanitised a second time
with shape rules so a neighbouring value that no enabled rule reported - or only
half of one - never leaks through a log line: card-shaped runs by the event sink's
own rule (``observe.redaction.mask_text``: first six / last four, the same text the
sink would write), shorter numbers of six or more digits and long mixed tokens fully,
and a number the snippet's outer edge cuts fully (its visible part may be the middle
of a card).
"""

from __future__ import annotations

import re

from firewall.dlp.validators import digits_of
from firewall.observe.redaction import mask_text

STAR = "*"
_ALNUM = re.compile(r"[A-Za-z0-9]")
# At least 6 digits, each pair at most two punctuation characters apart: masked whole in context
# (what is left between the card-shaped runs ``mask_text`` masks).
_SHORT_RUN = re.compile(r"[0-9](?:[^A-Za-z0-9]{0,2}[0-9]){5,}")
# A number at the edge where the caller cut the snippet out of the stream.
_CUT_AT_START = re.compile(r"^[^A-Za-z0-9]{0,3}[0-9](?:[^A-Za-z0-9]{0,3}[0-9])*")
_CUT_AT_END = re.compile(r"[0-9](?:[^A-Za-z0-9]{0,3}[0-9])*[^A-Za-z0-9]{0,3}$")
# A long token mixing letters and digits (keys, tokens, base64): masked in context.
_TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{16,}")
_CONTROL = bytes(46 if i < 32 or i == 127 else i for i in range(256))  # control bytes -> "."
_HAS_DIGIT = re.compile(r"\d")  # Unicode decimal digits too: the one rule counts them


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


def _star_digits(m: re.Match[str]) -> str:
    return m.group(0).translate(_DIGITS_TO_STARS)


def _mask_short_runs(text: str) -> str:
    return _SHORT_RUN.sub(_star_digits, text)


_HAS_ALPHA = re.compile(r"[A-Za-z]")


def _mask_token(m: re.Match[str]) -> str:
    # a token is ASCII by construction (_TOKEN), so [0-9] / [A-Za-z] are isdigit / isalpha
    tok = m.group(0)
    if _HAS_DIGIT.search(tok) is None or _HAS_ALPHA.search(tok) is None:
        return tok
    return STAR * len(tok)


def sanitize(raw: bytes, cut_start: bool = False, cut_end: bool = False) -> str:
    """Defence in depth for context snippets: mask anything shaped like a value.
    ``cut_start``/``cut_end``: the bytes were cut out of a longer text at that side, so a
    number touching it may be a fragment whose visible digits are not a card's first six or
    last four - all of its digits are masked."""
    text = raw.translate(_CONTROL).decode("utf-8", "replace")
    if len(text) >= 16:  # no token under 16 characters: the pass cannot match
        text = _TOKEN.sub(_mask_token, text)
    if _HAS_DIGIT.search(text) is None:
        return text
    if cut_start:
        text = _CUT_AT_START.sub(_star_digits, text)
    if cut_end:
        text = _CUT_AT_END.sub(_star_digits, text)
    return mask_text(text, between=_mask_short_runs)


def context_snippet(left: bytes, masked: str, right: bytes) -> str:
    """``left`` and ``right`` are the raw bytes around the value, each cut by the caller
    from the stream on its outer side."""
    return f"{sanitize(left, cut_start=True)}{masked}{sanitize(right, cut_end=True)}"
