"""Generated, labelled DLP corpus (seeded): positives in many embeddings, hard negatives.

Positives are synthetic but *valid* values (Luhn-valid PANs in every brand's IIN
range and length, SSNs and ITINs that pass the SSA rules, IBANs with correct
mod-97 check digits for every SEPA country, secrets in the vendors' formats), each
embedded in one of: JSON, form-encoded, CSV, free text, multipart, log line.
Hard negatives are what trips naive detectors: card-shaped numbers failing Luhn,
order and tracking IDs, timestamps, UUIDs, phone numbers, IBANs with a wrong check,
SSNs with area 000/666/9xx.  (9xx negatives use groups outside the ITIN ranges,
since 9xx-7x-xxxx *is* a valid ITIN shape.)

``corpus(seed, n)`` returns a list of ``Doc(text, labels)``; labels are
``(rule_id, start, end)`` byte spans.  ``pii_text(seed, size)`` and
``binary(seed, size)`` produce throughput inputs.  Used by
``dlp_accuracy.py``, ``dlp_throughput.py`` and the unit tests.
"""

from __future__ import annotations

import base64
import json
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote_plus

from firewall.dlp.validators import luhn

IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "VA": 22,
}
# Countries whose BBAN holds letters (bank code); the rest are digits only.
IBAN_ALPHA_BANK = {"GB": 4, "IE": 4, "NL": 4, "MT": 4, "GI": 4, "BG": 4, "RO": 4, "CY": 0}

# (rule id, IIN prefixes, lengths)
CARD_BRANDS: list[tuple[str, list[str], list[int]]] = [
    ("card.visa", ["4"], [13, 16, 19]),
    ("card.mastercard", ["51", "52", "53", "54", "55", "2221", "2500", "2699", "2720"], [16]),
    ("card.amex", ["34", "37"], [15]),
    ("card.discover", ["6011", "644", "649", "65"], [16, 19]),
    ("card.jcb", ["3528", "3550", "3589"], [16, 19]),
    ("card.diners", ["300", "305", "36", "38"], [14]),
    ("card.unionpay", ["62"], [16, 17, 18, 19]),
    ("card.maestro", ["50", "56", "57", "58", "63", "67"], [12, 13, 15, 16, 19]),
]
STANDARD_TEST_PANS = ["4111111111111111", "5555555555554444", "378282246310005", "2223003122003222",
                      "6011111111111117", "3530111333300000", "30569309025904", "6200000000000005"]


@dataclass
class Doc:
    text: bytes
    labels: list[tuple[str, int, int]] = field(default_factory=list)
    kind: str = ""


def luhn_complete(partial: str) -> str:
    """Append the Luhn check digit: the one digit ``dlp_validators.luhn`` accepts (one Luhn in the
    code base, issue 18; card numbers here are 12 digits or more, as the validator requires)."""
    for d in "0123456789":
        if luhn((partial + d).encode()):
            return partial + d
    raise ValueError(f"no Luhn check digit for a {len(partial)}-digit prefix (12 digits at least)")


def make_card(rng: random.Random, prefixes: list[str], lengths: list[int]) -> str:
    prefix = rng.choice(prefixes)
    n = rng.choice(lengths)
    body = prefix + "".join(rng.choice(string.digits) for _ in range(n - len(prefix) - 1))
    return luhn_complete(body)


def format_card(rng: random.Random, pan: str) -> str:
    style = rng.random()
    n = len(pan)
    sep = rng.choice([" ", "-"])
    if style < 0.5 or n in (12, 13, 17, 18):
        return pan
    if n == 15 and pan[:2] in ("34", "37"):
        return sep.join([pan[:4], pan[4:10], pan[10:]])
    if n == 14:
        return sep.join([pan[:4], pan[4:10], pan[10:]])
    return sep.join(pan[i:i + 4] for i in range(0, n, 4))


def make_ssn(rng: random.Random) -> str:
    while True:
        area = rng.randint(1, 899)
        if area == 666:
            continue
        s = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if s not in ("078-05-1120", "219-09-9999", "123-45-6789", "457-55-5462"):
            return s


def make_itin(rng: random.Random) -> str:
    group = rng.choice(list(range(50, 66)) + list(range(70, 89)) + [90, 91, 92] + list(range(94, 100)))
    return f"9{rng.randint(0, 99):02d}-{group:02d}-{rng.randint(0, 9999):04d}"


def iban_check(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    num = int("".join(str(int(c, 36)) for c in rearranged))
    return f"{98 - num % 97:02d}"


def make_iban(rng: random.Random, country: str | None = None, valid: bool = True) -> str:
    country = country or rng.choice(sorted(IBAN_LENGTHS))
    n = IBAN_LENGTHS[country] - 4
    letters = IBAN_ALPHA_BANK.get(country, 0)
    bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(letters))
    bban += "".join(rng.choice(string.digits) for _ in range(n - letters))
    check = iban_check(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 96)) % 97 + 2:02d}"[-2:]
        if check == iban_check(country, bban):
            check = f"{(int(check) + 1) % 100:02d}"
    return country + check + bban


def format_iban(rng: random.Random, iban: str) -> str:
    if rng.random() < 0.5:
        return iban
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits


def _b64url(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def make_secret(rng: random.Random, rule: str) -> str:
    if rule == "secret.aws_access_key_id":
        return rng.choice(["AKIA", "ASIA"]) + _rand(rng, string.ascii_uppercase + "234567", 16)
    if rule == "secret.github_token":
        return "gh" + rng.choice("pousr") + "_" + _rand(rng, ALNUM, 36)
    if rule == "secret.gitlab_token":
        return "glpat-" + _rand(rng, ALNUM + "_-", 20)
    if rule == "secret.slack_token":
        return f"xoxb-{_rand(rng, string.digits, 12)}-{_rand(rng, string.digits, 13)}-{_rand(rng, ALNUM, 24)}"
    if rule == "secret.stripe_key":
        return "sk_live_" + _rand(rng, ALNUM, 24)
    if rule == "secret.jwt":
        head = _b64url({"alg": "HS256", "typ": "JWT"})
        body = _b64url({"sub": str(rng.randint(1, 10**9)), "name": "user", "iat": 1700000000})
        return f"{head}.{body}.{_rand(rng, ALNUM + '_-', 43)}"
    if rule == "secret.private_key":
        body = base64.b64encode(rng.randbytes(180)).decode()
        lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        kind = rng.choice(["RSA ", "EC ", "", "OPENSSH "])
        return f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----"
    raise ValueError(rule)


SECRET_RULES = ["secret.aws_access_key_id", "secret.github_token", "secret.gitlab_token",
                "secret.slack_token", "secret.stripe_key", "secret.jwt", "secret.private_key"]

WORDS = ("the order was placed by customer for delivery to address please confirm payment "
         "invoice total amount due shipping status updated request received thanks regards "
         "account holder reference note service ticket support team update record").split()
FIELDS = {"credit_card": ["card", "cc_number", "pan", "cardNumber", "payment_card"],
          "ssn": ["ssn", "social", "tax_id"], "itin": ["itin", "tax_id"],
          "iban": ["iban", "account", "bank_account"], "secret": ["key", "token", "credential", "value"],
          "none": ["order_id", "tracking", "ref", "id", "ts", "phone", "request_id"]}


def _sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(4, 12)))


# An embedding returns (text, offset of the value inside it).
Embed = Callable[[random.Random, str, str], tuple[str, int]]


def emb_json(rng: random.Random, name: str, value: str) -> tuple[str, int]:
    pre = f'{{"id": {rng.randint(1, 10**6)}, "note": "{_sentence(rng, 3)}", "{name}": "'
    return pre + value.replace("\n", "\\n") + '", "ok": true}', len(pre)


def emb_form(rng: random.Random, name: str, value: str) -> tuple[str, int]:
    pre = f"user={rng.choice(WORDS)}&{name}="
    return pre + quote_plus(value, safe="") + f"&amount={rng.randint(1, 999)}.{rng.randint(0, 99):02d}", len(pre)


def emb_csv(rng: random.Random, name: str, value: str) -> tuple[str, int]:
    pre = f"id,name,{name},city\n{rng.randint(1, 9999)},{rng.choice(WORDS).title()},"
    return pre + value + f",{rng.choice(WORDS)}\n", len(pre)


def emb_text(rng: random.Random, name: str, value: str) -> tuple[str, int]:
    pre = f"{_sentence(rng)} {name.replace('_', ' ')}: "
    return pre + value + f". {_sentence(rng)}.", len(pre)


def emb_multipart(rng: random.Random, name: str, value: str) -> tuple[str, int]:
    b = f"----form{rng.randint(10**5, 10**6)}"
    pre = (f"--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n{_sentence(rng)}\r\n"
           f"--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
    return pre + value + f"\r\n--{b}--\r\n", len(pre)


def emb_log(rng: random.Random, name: str, value: str) -> tuple[str, int]:
    pre = (f"2024-0{rng.randint(1, 9)}-{rng.randint(10, 28)}T{rng.randint(10, 23)}:{rng.randint(10, 59)}:"
           f"{rng.randint(10, 59)}.{rng.randint(100, 999)}Z INFO [req {uuid.UUID(int=rng.getrandbits(128))}] "
           f"{rng.choice(WORDS)} {name}=")
    return pre + value + f" took={rng.randint(1, 900)}ms", len(pre)


EMBEDDINGS: dict[str, Embed] = {"json": emb_json, "form": emb_form, "csv": emb_csv, "text": emb_text,
                                "multipart": emb_multipart, "log": emb_log}


def _positive(rng: random.Random, rule: str, value: str, field_kind: str, emb: str) -> Doc:
    name = rng.choice(FIELDS[field_kind])
    text, off = EMBEDDINGS[emb](rng, name, value)
    if emb == "form":
        encoded = quote_plus(value, safe="")
        end = off + len(encoded)
    elif emb == "json":
        end = off + len(value.replace("\n", "\\n"))
    else:
        end = off + len(value)
    return Doc(text.encode(), [(rule, off, end)], kind=f"{rule}/{emb}")


def _negatives(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, value) hard negatives."""
    out = []
    # Card-shaped numbers with a wrong check digit.
    _, prefixes, lengths = rng.choice(CARD_BRANDS)
    pan = make_card(rng, prefixes, lengths)
    bad = pan[:-1] + str((int(pan[-1]) + rng.randint(1, 9)) % 10)
    out.append(("luhn_invalid", format_card(rng, bad)))
    out.append(("order_id", rng.choice([
        f"ORD-{rng.randint(2019, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}-{rng.randint(0, 999999):06d}",
        f"{rng.randint(100, 999)}-{rng.randint(10**6, 10**7 - 1)}-{rng.randint(10**6, 10**7 - 1)}",
        f"#{rng.randint(10**9, 10**10 - 1)}",
        f"INV{rng.randint(10**7, 10**8 - 1)}"])))
    out.append(("tracking", rng.choice([
        "1Z" + _rand(rng, string.ascii_uppercase + string.digits, 16),
        "94" + _rand(rng, string.digits, 20),
        "7" + _rand(rng, string.digits, 11),
        _rand(rng, string.ascii_uppercase, 2) + _rand(rng, string.digits, 9) + "US"])))
    out.append(("timestamp", rng.choice([
        str(rng.randint(1_500_000_000, 1_800_000_000)),
        str(rng.randint(1_500_000_000_000, 1_800_000_000_000)),
        f"20{rng.randint(10, 30)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
        f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999999):06d}Z",
        f"20{rng.randint(10, 30)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 235959):06d}"])))
    out.append(("uuid", str(uuid.UUID(int=rng.getrandbits(128)))))
    out.append(("phone", rng.choice([
        f"+1 {rng.randint(201, 989)} {rng.randint(200, 999)} {rng.randint(1000, 9999)}",
        f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
        f"+49 {rng.randint(30, 89)} {rng.randint(1000000, 9999999)}",
        f"+44 20 {rng.randint(7000, 7999)} {rng.randint(1000, 9999)}",
        f"{rng.randint(201, 989)}-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}"])))
    out.append(("iban_bad_check", format_iban(rng, make_iban(rng, valid=False))))
    area = rng.choice(["000", "666", f"9{rng.randint(0, 99):02d}"])
    group = rng.randint(1, 99) if area != "9" else 0
    if area.startswith("9"):
        group = rng.choice(list(range(0, 50)) + [66, 67, 68, 69, 89, 93])
    out.append(("ssn_bad_area", f"{area}-{group:02d}-{rng.randint(1, 9999):04d}"))
    out.append(("aws_example", "AKIAIOSFODNN7EXAMPLE"))
    return out


def corpus(seed: int = 1, per_rule: int = 300) -> list[Doc]:
    """``per_rule`` positives for every rule of the default packs plus hard negatives."""
    rng = random.Random(seed)
    docs: list[Doc] = []
    embs = list(EMBEDDINGS)
    for rule, prefixes, lengths in CARD_BRANDS:
        for i in range(per_rule):
            value = format_card(rng, make_card(rng, prefixes, lengths))
            docs.append(_positive(rng, rule, value, "credit_card", embs[i % len(embs)]))
    for i in range(per_rule):
        docs.append(_positive(rng, "us.ssn", make_ssn(rng), "ssn", embs[i % len(embs)]))
        docs.append(_positive(rng, "us.itin", make_itin(rng), "itin", embs[i % len(embs)]))
        docs.append(_positive(rng, "eu.iban", format_iban(rng, make_iban(rng)), "iban", embs[i % len(embs)]))
    for rule in SECRET_RULES:
        for i in range(per_rule // 3):
            value = make_secret(rng, rule)
            emb = embs[i % len(embs)]
            if rule == "secret.private_key" and emb == "form":
                emb = "json"
            doc = _positive(rng, rule, value, "secret", emb)
            if rule == "secret.private_key":  # reported once 64 body characters are seen
                start = doc.labels[0][1]
                span_end = _pem_report_end(doc.text, start)
                doc.labels = [(rule, start, span_end)]
            docs.append(doc)
    for _ in range(per_rule * 3):
        for kind, value in _negatives(rng):
            emb = rng.choice(embs)
            text, _ = EMBEDDINGS[emb](rng, rng.choice(FIELDS["none"]), value)
            docs.append(Doc(text.encode(), [], kind=f"negative/{kind}"))
    rng.shuffle(docs)
    return docs


def _pem_report_end(text: bytes, start: int) -> int:
    """End of the reported PEM span: the header plus 64 base64 characters (JSON escapes count)."""
    i = text.index(b"KEY-----", start) + len(b"KEY-----")
    seen = 0
    while seen < 64:
        if text[i:i + 2] in (b"\\n", b"\\r"):
            i += 2
            continue
        c = text[i:i + 1]
        if c.isalnum() or c in b"+/=":
            seen += 1
        i += 1
    return i


def _traffic_line(rng: random.Random) -> str:
    """One piece of ordinary application traffic: JSON API object, log line or prose."""
    r = rng.random()
    if r < 0.4:
        return json.dumps({
            "id": rng.randint(1, 10**6), "created_at": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
            "status": rng.choice(["shipped", "pending", "paid", "refunded"]),
            "amount": round(rng.uniform(1, 999), 2), "currency": rng.choice(["EUR", "USD", "GBP"]),
            "customer": {"name": rng.choice(WORDS).title() + " " + rng.choice(WORDS).title(),
                         "city": rng.choice(["Berlin", "Paris", "Austin", "Leeds"])},
            "items": [{"sku": f"SKU-{rng.randint(1000, 99999)}", "qty": rng.randint(1, 5)}
                      for _ in range(rng.randint(1, 3))],
            "request_id": str(uuid.UUID(int=rng.getrandbits(128)))})
    if r < 0.75:
        return (f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d},{rng.randint(0, 999):03d} "
                f"{rng.choice(['INFO', 'DEBUG', 'WARN'])} [{rng.choice(WORDS)}] {_sentence(rng)} "
                f"ip=10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} "
                f"duration_ms={rng.randint(1, 5000)} status={rng.choice([200, 201, 204, 404, 500])}")
    return _sentence(rng, rng.randint(10, 40)).capitalize() + "."


def pii_text(seed: int = 2, size: int = 16 << 20, every: int = 4096, negatives_every: int = 4096) -> bytes:
    """Ordinary traffic (JSON, logs, prose) with a sensitive value every ``every`` bytes and a
    hard negative (card-shaped number, order ID, timestamp ...) every ``negatives_every`` bytes."""
    rng = random.Random(seed)
    docs = corpus(seed, per_rule=40)
    pos = [d.text for d in docs if d.labels]
    neg = [d.text for d in docs if not d.labels]
    parts: list[bytes] = []
    n = since_pos = since_neg = 0
    while n < size:
        if since_pos >= every:
            chunk = rng.choice(pos)
            since_pos = 0
        elif since_neg >= negatives_every:
            chunk = rng.choice(neg)
            since_neg = 0
        else:
            chunk = _traffic_line(rng).encode()
        parts.append(chunk + b"\n")
        n += len(chunk) + 1
        since_pos += len(chunk) + 1
        since_neg += len(chunk) + 1
    return b"".join(parts)[:size]


def dense_text(seed: int = 4, size: int = 16 << 20) -> bytes:
    """Adversarial: every line a labelled document, three of four of them hard negatives."""
    rng = random.Random(seed)
    docs = corpus(seed, per_rule=40)
    parts: list[bytes] = []
    n = 0
    while n < size:
        t = rng.choice(docs).text
        parts.append(t + b"\n")
        n += len(t) + 1
    return b"".join(parts)[:size]


def binary(seed: int = 3, size: int = 16 << 20) -> bytes:
    return random.Random(seed).randbytes(size)
