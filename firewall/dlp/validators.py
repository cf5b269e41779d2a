"""Validators that turn a regex candidate into a finding (or reject it).

Hyperscan only says "something shaped like a card number ends here"; shape alone
flags order numbers, timestamps and tracking IDs.  The checks here run on the
exact matched bytes of each candidate (never on the whole stream), so they cost
nothing on data without candidates and keep false positives rare:

* ``luhn``      payment card check digit (ISO/IEC 7812), separators ignored.
* ``mod97``     IBAN: known country, the country's fixed length, ISO 7064 mod 97 == 1.
* ``ssn``       US SSN: area not 000/666/9xx, group not 00, serial not 0000, no famous samples.
* ``itin``      US ITIN: 9xx area, group 50-65, 70-88, 90-92, 94-99.
* ``entropy>=X`` Shannon entropy of the value in bits per character (random tokens vs words).
* ``digits:A|B`` the number of digits must be one of the listed counts (card brand lengths).
* ``not_placeholder`` rejects documentation values (``...EXAMPLE``, ``XXXX``, one repeated char).
* ``jwt``       the first segment decodes to a JSON object with an ``alg`` key.
* ``none``      accept every candidate.

A rule may list several validators; all must accept.  ``parse_validator`` turns
the YAML spelling into a callable and raises ``ValueError`` with a message for
unknown names, so a bad rule pack fails at load time, not on traffic.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import Counter
from collections.abc import Callable

Validator = Callable[[bytes], bool]

# ISO 13616 IBAN lengths (whole IBAN, country code included) for the SEPA area.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "VA": 22,
}

# Published as examples (Woolworth's wallet card, SSA advertising, docs); never real.
FAMOUS_SSNS = frozenset({"078051120", "219099999", "123456789", "457555462"})

_NON_ALNUM = re.compile(rb"[^A-Za-z0-9]")


_NON_DIGIT_BYTES = bytes(b for b in range(256) if not 48 <= b <= 57)


def digits_of(value: bytes) -> bytes:
    """The digits of a value with separators (space, dash, dot) removed."""
    value = bytes(value)
    # Fast paths first: translate() with a delete set rebuilds its 256-entry table per call,
    # which is most of the cost on the short values this runs on.
    if value.isdigit():
        return value
    stripped = value.replace(b" ", b"").replace(b"-", b"")
    if stripped.isdigit():
        return stripped
    return value.translate(None, _NON_DIGIT_BYTES)


# Luhn in C-level bytes operations (it runs on every card-shaped candidate): the doubled
# digits are mapped to their digit sums by one translate, then one sum() adds everything.
_LUHN_DOUBLED = bytes.maketrans(b"0123456789", bytes((48, 50, 52, 54, 56, 49, 51, 53, 55, 57)))


def luhn(value: bytes) -> bool:
    digits = digits_of(value)
    n = len(digits)
    if n < 12:
        return False
    return (sum(digits[-1::-2] + digits[-2::-2].translate(_LUHN_DOUBLED)) - 48 * n) % 10 == 0


# Byte -> its digits in the IBAN check (A=10 ... Z=35); anything else is not an IBAN character.
_IBAN_DIGITS = {**{c: str(c - 48) for c in range(48, 58)}, **{c: str(c - 55) for c in range(65, 91)}}


def mod97(value: bytes) -> bool:
    """IBAN check: known SEPA country, exact length, rearranged number mod 97 == 1."""
    iban = bytes(value).replace(b" ", b"").replace(b"+", b"")  # the usual separators, cheaply
    if not iban.isalnum():
        iban = _NON_ALNUM.sub(b"", iban)
    iban = iban.upper()
    if IBAN_LENGTHS.get(iban[:2].decode("ascii", "replace")) != len(iban) or not iban[2:4].isdigit():
        return False
    bban = iban[4:]
    if bban.isdigit():  # most countries: only the country code has letters (A=10 ... Z=35)
        a, b = iban[0] - 55, iban[1] - 55
        if not (10 <= a <= 35 and 10 <= b <= 35):
            return False
        return (int(bban) * 1_000_000 + a * 10_000 + b * 100 + int(iban[2:4])) % 97 == 1
    try:  # letters count as two digits; one int() instead of a loop per character
        number = "".join(map(_IBAN_DIGITS.__getitem__, bban + iban[:4]))
    except KeyError:  # a non-ASCII alphanumeric byte
        return False
    return int(number) % 97 == 1


def ssn(value: bytes) -> bool:
    d = digits_of(value)
    if len(d) != 9:
        return False
    area = d[:3]
    if area == b"000" or area == b"666" or d[0] == 57:  # 57: "9"
        return False
    if d[3:5] == b"00" or d[5:] == b"0000":
        return False
    return d not in _FAMOUS_SSNS_B


_FAMOUS_SSNS_B = frozenset(s.encode() for s in FAMOUS_SSNS)


def itin(value: bytes) -> bool:
    d = digits_of(value).decode()
    if len(d) != 9 or d[0] != "9":
        return False
    group = int(d[3:5])
    return 50 <= group <= 65 or 70 <= group <= 88 or 90 <= group <= 92 or 94 <= group <= 99


def shannon_entropy(value: bytes) -> float:
    """Bits per character; random base62 tokens score ~5, English words ~3."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def not_placeholder(value: bytes) -> bool:
    upper = value.upper()
    if upper.endswith(b"EXAMPLE") or b"XXXX" in upper or b"****" in value:
        return False
    body = _NON_ALNUM.sub(b"", value)
    return len(set(body)) > 3


def jwt(value: bytes) -> bool:
    head = value.split(b".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4))
        obj = json.loads(decoded)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "alg" in obj


def _always(value: bytes) -> bool:
    return True


_NAMED: dict[str, Validator] = {
    "luhn": luhn,
    "mod97": mod97,
    "ssn": ssn,
    "itin": itin,
    "not_placeholder": not_placeholder,
    "jwt": jwt,
    "none": _always,
}

_ENTROPY = re.compile(r"^entropy\s*>=\s*([0-9]+(?:\.[0-9]+)?)$")
_DIGITS = re.compile(r"^digits\s*:\s*([0-9]+(?:\s*\|\s*[0-9]+)*)$")


def parse_validator(spec: str) -> Validator:
    """YAML spelling -> callable on the matched bytes; ``ValueError`` names the bad spec."""
    spec = spec.strip()
    if spec in _NAMED:
        return _NAMED[spec]
    m = _ENTROPY.match(spec)
    if m:
        floor = float(m.group(1))
        if not 0.0 < floor <= 8.0:
            raise ValueError(f"entropy floor {floor} out of range (0, 8]")
        return lambda value: shannon_entropy(value) >= floor
    m = _DIGITS.match(spec)
    if m:
        counts = frozenset(int(x) for x in m.group(1).split("|"))

        def digit_count(value: bytes) -> bool:
            return len(digits_of(value)) in counts

        _DIGIT_COUNTS[digit_count] = counts
        return digit_count
    names = ", ".join(sorted(_NAMED))
    raise ValueError(f"unknown validator {spec!r} (known: {names}, entropy>=X, digits:N|M)")


#: ``digits:A|B`` validators -> their allowed counts, so ``combine`` can fuse them with Luhn.
_DIGIT_COUNTS: dict[Validator, frozenset[int]] = {}


def luhn_of_length(counts: frozenset[int]) -> Validator:
    """``[luhn, 'digits:A|B']`` in one call: every card rule has this pair, and it runs on every
    card-shaped candidate, so the digits are extracted once instead of twice and the length is
    checked before the sum.  Accepts exactly what the two validators accept together."""

    def check(value: bytes) -> bool:
        digits = digits_of(value)
        n = len(digits)
        if n not in counts or n < 12:
            return False
        return (sum(digits[-1::-2] + digits[-2::-2].translate(_LUHN_DOUBLED)) - 48 * n) % 10 == 0

    return check


def combine(validators: list[Validator]) -> Validator:
    if not validators:
        return _always
    if len(validators) == 1:
        return validators[0]
    if len(validators) == 2:
        first, second = validators
        if first is luhn and second in _DIGIT_COUNTS:
            return luhn_of_length(_DIGIT_COUNTS[second])
        if second is luhn and first in _DIGIT_COUNTS:
            return luhn_of_length(_DIGIT_COUNTS[first])
        return lambda value: first(value) and second(value)
    return lambda value: all(v(value) for v in validators)
