"""Each validator on known-good and known-bad values, and the masking helpers."""

from __future__ import annotations

import pytest

from firewall.dlp.mask import mask_card, mask_hint, mask_shape, sanitize
from firewall.dlp.validators import (
    itin,
    jwt,
    luhn,
    mod97,
    not_placeholder,
    parse_validator,
    shannon_entropy,
    ssn,
)
from tests.dlp.conftest import MC_2SERIES, TEST_PANS


@pytest.mark.parametrize("pan", [*TEST_PANS.values(), MC_2SERIES, "4111 1111 1111 1111", "3782-822463-10005"])
def test_luhn_accepts_standard_test_pans(pan):
    assert luhn(pan.encode())


@pytest.mark.parametrize("bad", ["4111111111111112", "5555555555554445", "378282246310006", "1234567812345678",
                                 "41111111111", ""])
def test_luhn_rejects_wrong_check_digit_and_short_numbers(bad):
    assert not luhn(bad.encode())


@pytest.mark.parametrize("iban", ["DE89370400440532013000", "GB82 WEST 1234 5698 7654 32", "FR1420041010050500013M02606",
                                  "NL91ABNA0417164300", "BE68539007547034", "NO9386011117947",
                                  "MT84MALT011000012345MTLCAST001S", "CH9300762011623852957"])
def test_mod97_accepts_valid_ibans(iban):
    assert mod97(iban.encode())


@pytest.mark.parametrize("bad", ["DE89370400440532013001",   # wrong check
                                 "DE8937040044053201300",    # one character short for DE
                                 "DE893704004405320130000",  # one too long
                                 "US89370400440532013000",   # not a SEPA country
                                 "DEXX370400440532013000"])  # check digits not digits
def test_mod97_rejects_wrong_check_length_and_country(bad):
    assert not mod97(bad.encode())


@pytest.mark.parametrize("good", ["536-22-1234", "001-01-0001", "899-99-9999", "665 12 3456"])
def test_ssn_accepts_valid_numbers(good):
    assert ssn(good.encode())


@pytest.mark.parametrize("bad", ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "536-00-1234",
                                 "536-22-0000", "078-05-1120", "219-09-9999", "123-45-6789", "536-22-123"])
def test_ssn_rejects_invalid_area_group_serial_and_famous_samples(bad):
    assert not ssn(bad.encode())


def test_itin_groups():
    assert itin(b"912-70-1234") and itin(b"900-50-0000") and itin(b"999-94-9999")
    assert not itin(b"912-93-1234") and not itin(b"912-49-1234") and not itin(b"812-70-1234")


def test_entropy_separates_random_tokens_from_words():
    assert shannon_entropy(b"aaaaaaaa") == 0
    assert shannon_entropy(b"Zx9kQ2mVb7LpW4rT8yN1") > 4.0
    check = parse_validator("entropy>=3.5")
    assert check(b"Zx9kQ2mVb7LpW4rT8yN1")
    assert not check(b"passwordpassword")


def test_placeholders_and_jwt():
    assert not not_placeholder(b"AKIAIOSFODNN7EXAMPLE")
    assert not not_placeholder(b"AKIAXXXXXXXXXXXXXXXX")
    assert not_placeholder(b"AKIAZ7QJ3XKDLQ2MVB5R")
    assert jwt(b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig")
    assert not jwt(b"eyJub3RoaW5nIjoxfQ.eyJzdWIiOiIxIn0.sig")  # JSON without "alg"
    assert not jwt(b"eyJ!!!.x.y")


def test_digits_validator_and_unknown_names():
    assert parse_validator("digits:15|16")(b"3782-822463-10005")
    assert not parse_validator("digits:16")(b"378282246310005")
    with pytest.raises(ValueError, match="unknown validator 'lunh'"):
        parse_validator("lunh")
    with pytest.raises(ValueError, match="out of range"):
        parse_validator("entropy>=9")


def test_card_mask_keeps_first_six_last_four_only():
    assert mask_card(b"4111 1111 1111 1111") == "411111******1111"
    assert mask_card(b"378282246310005") == "378282*****0005"
    assert mask_shape(b"536-22-1234") == "***-**-****"
    assert mask_hint(b"AKIAZ7QJ3XKDLQ2MVB5R", b"AKIA", True) == "AKIA" + "*" * 16
    assert mask_hint(b"Zx9kQ2mVb7LpW4rT8yN1", b"password", False) == "password:" + "*" * 20


def test_context_sanitizer_masks_anything_value_shaped():
    out = sanitize(b'pan 4111+1111+1111+1111, ssn 536-22-1234, key ghp_abcdefghij1234567890xyz\x00')
    # a card: first six / last four, the event sink's rule (observe/redaction.py), the same text it writes
    assert "4111+11**+****+1111" in out and "536" not in out and "ghp_" not in out
    assert out.startswith("pan ") and out.endswith(".")
    assert sanitize(b"order 12-34 ok") == "order 12-34 ok"  # short numbers stay readable


def test_fused_luhn_and_digit_count_accepts_exactly_what_the_pair_accepts():
    """Card rules list ``[luhn, 'digits:...']``; ``combine`` fuses the pair into one call (digits
    extracted once).  It must accept exactly what the two accept together, in either order, on
    valid PANs of every length, wrong check digits, wrong lengths and odd separators."""
    import random

    from firewall.dlp.validators import combine

    rng = random.Random(22)
    values = [p.encode() for p in (*TEST_PANS.values(), MC_2SERIES, "4111 1111 1111 1111", "3782-822463-10005")]
    for _ in range(3000):
        n = rng.randint(8, 21)
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        seps = "".join(c + (rng.choice(" -.+/") if rng.random() < 0.2 else "") for c in digits)
        values += [digits.encode(), seps.encode()]
    for spec in ("digits:16", "digits:13|16|19", "digits:12|13|14|15|16|17|18|19", "digits:11|15"):
        count = parse_validator(spec)
        for fused in (combine([luhn, count]), combine([count, luhn])):
            assert "luhn_of_length" in fused.__qualname__  # the fused path, not the generic pair
            for v in values:
                assert fused(v) == (luhn(v) and count(v)), (spec, v)
    assert sum(combine([luhn, parse_validator("digits:16")])(v) for v in values) > 5  # some accepted
