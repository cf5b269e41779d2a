"""The stream engine: detection, offsets, chunk-size invariance, the blocking contract,
retractions, masking in every output, caching and rule-pack errors."""

from __future__ import annotations

import json
import logging
import random
import threading
from pathlib import Path

import pytest

from firewall.dlp.engine import DlpEngine, DlpRuleError, Finding
from firewall.observe.signature import signature_id
from tests.dlp.conftest import MC_2SERIES, REPO, TEST_PANS, spans

SAMPLE = (
    b'POST /v1/charge HTTP/1.1\r\nContent-Type: application/json\r\n\r\n'
    b'{"card": "4111111111111111", "cvv": "123", "backup": "5555-5555-5555-4444",'
    b' "amex": "3782 822463 10005", "mc2": "2223003122003222", "ssn": "536-22-1234",'
    b' "iban": "DE89 3704 0044 0532 0130 00", "order": "ORD-20240101-000123",'
    b' "ts": 1700000000123, "uuid": "550e8400-e29b-41d4-a716-446655440000",'
    b' "aws": "AKIAZ7QJ3XKDLQ2MVB5R", "doc_key": "AKIAIOSFODNN7EXAMPLE", "bad": "4111111111111112"}\n'
)
FULL_VALUES = [b"4111111111111111", b"5555555555554444", b"378282246310005", b"2223003122003222",
               b"536-22-1234", b"DE89370400440532013000", b"AKIAZ7QJ3XKDLQ2MVB5R"]


def _no_full_value(findings: list[Finding], values=FULL_VALUES) -> None:
    text = json.dumps([f.to_json() | f.eve() for f in findings]) + repr(findings)
    compact = text.replace(" ", "").replace("-", "")
    for v in values:
        plain = v.decode().replace(" ", "").replace("-", "")
        assert plain not in compact, "a full sensitive value leaked into a finding"


def test_finds_each_value_with_exact_offsets_and_masks(engine):
    found = engine.scan_bytes(SAMPLE)
    got = {(f.rule_id, SAMPLE[f.start:f.end]) for f in found}
    assert got == {
        ("card.visa", b"4111111111111111"),
        ("card.mastercard", b"5555-5555-5555-4444"),
        ("card.amex", b"3782 822463 10005"),
        ("card.mastercard", b"2223003122003222"),
        ("us.ssn", b"536-22-1234"),
        ("eu.iban", b"DE89 3704 0044 0532 0130 00"),
        ("secret.aws_access_key_id", b"AKIAZ7QJ3XKDLQ2MVB5R"),
    }
    by_rule = {f.rule_id + str(f.start): f for f in found}
    visa = next(f for f in found if f.rule_id == "card.visa")
    assert visa.masked == "411111******1111"
    assert visa.default_action == "block" and visa.severity == "critical" and visa.pack == "payment_cards"
    assert visa.confidence == 0.99  # base 0.85 + the "card" keyword right before it
    assert "411111******1111" in visa.context and '"card": ' in visa.context
    assert next(f for f in found if f.rule_id == "us.ssn").masked == "***-**-****"
    assert next(f for f in found if f.rule_id == "eu.iban").masked.startswith("DE**")
    assert next(f for f in found if f.rule_id == "secret.aws_access_key_id").masked == "AKIA" + "*" * 16
    assert len(by_rule) == len(found)
    _no_full_value(found)


def test_standard_test_pans_of_every_brand(engine):
    for rule_id, pan in {**TEST_PANS, "card.mastercard": MC_2SERIES}.items():
        data = f"pay with {pan} today".encode()
        found = engine.scan_bytes(data)
        assert spans(found) == [(rule_id, 9, 9 + len(pan))], rule_id
    maestro = b"x 6759649826438453 y"  # Maestro (67xx), Luhn-valid
    assert [f.rule_id for f in engine.scan_bytes(maestro)] == ["card.maestro"]


def test_hard_negatives_are_not_reported(engine):
    negatives = [b"order 4111111111111112 (Luhn-invalid)", b"ts 1700000000123 and 20240115123456",
                 b"id 550e8400-e29b-41d4-a716-446655440000", b"call +1 415 555 2671 or (415) 555-2671",
                 b"iban DE89370400440532013001", b"ssn 000-12-3456 666-12-3456 912-34-5678",
                 b"key AKIAIOSFODNN7EXAMPLE", b"tracking 1Z999AA10123456784 9400111899223344556677",
                 b"digits 41111111111111111111111 too long", b"glued card4111111111111111"]
    for data in negatives:
        assert engine.scan_bytes(data) == [], data


@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536])
def test_results_do_not_depend_on_chunk_size(engine, chunk):
    from dlp_corpus import corpus

    docs = corpus(seed=11, per_rule=4)
    data = b"\n".join(d.text for d in docs) + SAMPLE
    reference = [f.to_json() for f in engine.scan_bytes(data, chunk_size=len(data))]
    assert len(reference) > 40
    assert [f.to_json() for f in engine.scan_bytes(data, chunk_size=chunk)] == reference


def test_random_chunkings_give_the_same_findings(engine):
    data = SAMPLE * 3
    reference = spans(engine.scan_bytes(data))
    rng = random.Random(5)
    for _ in range(20):
        s = engine.stream(track_retractions=True)
        found, off = [], 0
        while off < len(data):
            n = rng.randint(1, 40)
            found += s.scan(data[off:off + n])
            off += n
        found += s.close()
        gone = {(f.rule_id, f.start, f.end) for f in s.retracted}
        assert sorted(x for x in spans(found) if x not in gone) == reference


def test_blocking_contract_value_reported_by_the_scan_that_completes_it(engine):
    """Every value is reported no later than the scan() call that delivers its last byte."""
    reference = spans(engine.scan_bytes(SAMPLE))
    rng = random.Random(7)
    for trial in range(30):
        s = engine.stream()
        reported: dict[tuple[str, int, int], int] = {}
        off = 0
        while off < len(SAMPLE):
            n = 1 if trial == 0 else rng.randint(1, 64)
            for f in s.scan(SAMPLE[off:off + n]):
                reported.setdefault((f.rule_id, f.start, f.end), off + n)
            off += n
            for key in reference:
                if key[2] <= off:
                    assert key in reported, f"{key[0]} complete at {key[2]} not reported by offset {off}"
        s.close()
        for key in reference:
            assert reported[key] >= key[2]


def test_value_at_chunk_end_is_reported_then_retracted_when_the_number_goes_on(engine):
    s = engine.stream(track_retractions=True)
    first = s.scan(b"number 4111111111111111")  # ends exactly at the chunk end: report now
    assert [(f.rule_id, f.start, f.end) for f in first] == [("card.visa", 7, 23)]
    assert s.scan(b"1 more") == []  # 17 digits: not a Visa number after all
    assert s.scan(b" text to settle the candidate") == []
    assert [(f.rule_id, f.start) for f in s.retracted] == [("card.visa", 7)]
    assert s.close() == []
    # And the offline view agrees: nothing in the whole buffer.
    assert engine.scan_bytes(b"number 41111111111111111 more", chunk_size=23) == []


def test_value_split_across_segments_and_absolute_offsets(engine):
    s = engine.stream()
    assert s.scan(b"x" * 5000 + b" pan=4111 1111 ") == []
    found = s.scan(b"1111 1111 and more")
    assert spans(found) == [("card.visa", 5005, 5024)]
    assert s.offset == 5000 + 15 + 18
    assert s.close() == []
    assert s.close() == []  # idempotent
    with pytest.raises(ValueError):
        s.scan(b"more")


def test_pem_private_key_is_reported_before_the_block_is_complete(engine):
    body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj" * 4
    pem = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    data = pem.encode()
    s = engine.stream()
    found = s.scan(data)
    assert [f.rule_id for f in found] == ["secret.private_key"]
    assert found[0].end < len(data)  # header + 64 characters, well before the END line
    assert found[0].masked.startswith("-----BEGIN PRIVATE KEY-----*")
    assert body[:20] not in repr(found)


def test_secrets_pack(engine):
    gh = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
    jwt = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
           "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
    data = f'token={gh}\nAuthorization: Bearer {jwt}\nclient_secret: "q8Zr2LwX9mT4vB7nK1pS6yD3"\n'.encode()
    found = engine.scan_bytes(data)
    assert [f.rule_id for f in found] == ["secret.github_token", "secret.jwt", "secret.generic_assignment"]
    assert found[0].masked == "ghp_" + "*" * 24
    generic = found[2]
    assert data[generic.start:generic.end] == b"q8Zr2LwX9mT4vB7nK1pS6yD3"
    assert generic.masked == "client_secret:" + "*" * 24
    _no_full_value(found, [gh.encode(), jwt.encode(), b"q8Zr2LwX9mT4vB7nK1pS6yD3"])


def test_contact_pack_is_off_by_default(engine, engine_all):
    data = b"mail jane.doe@example.com or call (415) 555-2671"
    assert engine.scan_bytes(data) == []
    assert "contact" not in engine.enabled and engine.packs["contact"]["enabled"] is False
    got = [(f.rule_id, data[f.start:f.end]) for f in engine_all.scan_bytes(data)]
    assert got == [("contact.email", b"jane.doe@example.com"), ("contact.phone", b"(415) 555-2671")]


def test_engine_metadata(engine):
    assert set(engine.packs) == {"payment_cards", "us_pii", "eu_pii", "contact", "secrets"}
    assert sorted(engine.enabled) == ["eu_pii", "payment_cards", "secrets", "us_pii"]
    assert {r.id for r in engine.rules} >= {"card.visa", "us.ssn", "eu.iban", "secret.jwt"}
    assert 30 < engine.holdback <= 8192
    assert len(engine.rules_hash) == 64


def test_enable_subset_and_unknown_pack(cache_dir):
    only_cards = DlpEngine.load(enable=["payment_cards"], cache_dir=cache_dir)
    assert [f.rule_id for f in only_cards.scan_bytes(SAMPLE)].count("us.ssn") == 0
    with pytest.raises(DlpRuleError, match="unknown pack 'nope'"):
        DlpEngine.load(enable=["nope"], cache_dir=cache_dir)


def test_database_cache_is_written_reused_and_corruption_ignored(tmp_path, caplog):
    cache = tmp_path / "cache"
    first = DlpEngine.load(enable=["us_pii"], cache_dir=str(cache))
    assert first.cache_path and Path(first.cache_path).exists()
    mtime = Path(first.cache_path).stat().st_mtime_ns
    second = DlpEngine.load(enable=["us_pii"], cache_dir=str(cache))
    assert Path(second.cache_path).stat().st_mtime_ns == mtime  # read, not rewritten
    assert spans(second.scan_bytes(b"ssn 536-22-1234")) == [("us.ssn", 4, 15)]
    Path(first.cache_path).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="palisade.dlp"):
        third = DlpEngine.load(enable=["us_pii"], cache_dir=str(cache))
    assert "corrupt" in caplog.text
    assert spans(third.scan_bytes(b"ssn 536-22-1234")) == [("us.ssn", 4, 15)]


def test_unwritable_cache_dir_is_only_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="palisade.dlp"):
        eng = DlpEngine.load(enable=["us_pii"], cache_dir=str(blocker / "sub"))
    assert "cannot write database cache" in caplog.text
    assert spans(eng.scan_bytes(b"ssn 536-22-1234")) == [("us.ssn", 4, 15)]


def test_reload_builds_a_new_engine_and_old_streams_keep_working(tmp_path, cache_dir):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "us_pii.yaml").write_bytes((REPO / "dlp_rules" / "us_pii.yaml").read_bytes())
    old = DlpEngine.load(str(rules), cache_dir=cache_dir)
    s = old.stream()
    s.scan(b"ssn 536-22-")
    (rules / "extra.yaml").write_text(EMPLOYEE_PACK)
    new = old.reload()
    assert new is not old and new.rules_hash != old.rules_hash
    assert spans(s.scan(b"1234 ok")) == [("us.ssn", 4, 15)]
    assert [f.rule_id for f in new.scan_bytes(b"badge EMP-123456")] == ["acme.employee_id"]


EMPLOYEE_PACK = """
pack: acme
description: a user's own pack dropped into the rules directory
rules:
  - id: acme.employee_id
    name: ACME employee ID
    type: employee_id
    patterns: ['EMP-[0-9]{6}']
    boundary: alnum
    severity: low
    action: alert
"""


@pytest.mark.parametrize(("text", "message"), [
    ("pack: x\nrules: [", "YAML error"),
    ("pack: x\nrules:\n  - {id: a.b, name: n, type: t, patterns: ['x'], colour: red}\n", "unknown field(s) colour"),
    ("pack: x\nrules:\n  - {id: a.b, name: n, type: t, patterns: ['x'], validator: lunh}\n", "unknown validator 'lunh'"),
    ("pack: x\nrules:\n  - {id: a.b, name: n, type: t, patterns: ['a(b']}\n", "bad pattern 'a(b'"),
    ("pack: x\nrules:\n  - {id: a.b, name: n, type: t, patterns: ['[0-9]+']}\n", "unbounded"),
    ("pack: x\nrules:\n  - {id: a.b, name: n, type: t, patterns: ['x']}\n  - {id: a.b, name: n, type: t, patterns: ['y']}\n",
     "duplicate rule id a.b"),
    ("pack: x\nrules:\n  - {id: a.b, name: n, type: t, patterns: ['x'], action: drop}\n", "'action' must be one of"),
    ("pack: x\nrules:\n  - {id: a.b, name: n, type: t, patterns: ['(?<=a)b']}\n", "hyperscan"),
    ("pack: Bad Name\nrules: []\n", "'pack' must be"),
])
def test_bad_packs_give_one_line_with_the_path(tmp_path, cache_dir, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(DlpRuleError) as err:
        DlpEngine.load(str(tmp_path), enable=["x"] if "Bad Name" not in text else None, cache_dir=cache_dir)
    assert str(err.value).startswith(str(tmp_path / "bad.yaml")), str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_streams_in_two_threads(engine):
    data = SAMPLE * 200
    expected = spans(engine.scan_bytes(data))
    results: list[list] = [[], []]

    def work(i: int) -> None:
        results[i] = spans(engine.scan_bytes(data, chunk_size=1000 + i * 333))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected, expected]


def test_random_binary_has_no_findings_and_empty_input(engine):
    assert engine.scan_bytes(random.Random(1).randbytes(1 << 20)) == []
    s = engine.stream()
    assert s.scan(b"") == [] and s.close() == []


def test_alert_event_shape(engine):
    f = next(x for x in engine.scan_bytes(SAMPLE) if x.rule_id == "card.visa")
    ev = f.alert(blocked=True, direction="toserver")
    assert ev["event_type"] == "alert"
    assert ev["alert"]["category"] == "dlp" and ev["alert"]["action"] == "blocked"
    # one signature_id formula for every alert (issue 18): derived from the signature string
    assert ev["alert"]["severity"] == 1 and ev["alert"]["signature_id"] == signature_id(ev["alert"]["signature"])
    assert ev["dlp"]["masked"] == "411111******1111" and ev["dlp"]["direction"] == "toserver"
    assert ev["dlp"]["offset"] == f.start and ev["dlp"]["rule"] == "card.visa"
    assert "4111111111111111" not in json.dumps(ev)


def test_streams_dropped_without_close_are_freed(engine):
    import gc

    for _ in range(200):
        s = engine.stream()
        s.scan(b"pan 4111 1111 1111 11")  # leaves a pending candidate and an open Hyperscan stream
        del s
    gc.collect()
    assert spans(engine.scan_bytes(b"pan 4111111111111111")) == [("card.visa", 4, 20)]


def test_values_at_the_very_start_of_a_stream(engine):
    """Start-of-match at stream offset 0: '^' and a consumed boundary byte both start there."""
    assert spans(engine.scan_bytes(b"4111111111111111 ok")) == [("card.visa", 0, 16)]
    assert spans(engine.scan_bytes(b" 4111111111111111")) == [("card.visa", 1, 17)]
    assert spans(engine.scan_bytes(b"-536-22-1234")) == [("us.ssn", 1, 12)]
    assert spans(engine.scan_bytes(b"536-22-1234")) == [("us.ssn", 0, 11)]
    assert spans(engine.scan_bytes(b"x4111111111111111")) == []  # glued to a word: not a PAN
    for n in range(1, 18):  # the same value split at every offset
        s = engine.stream()
        data = b" 3782 822463 10005."
        got = s.scan(data[:n]) + s.scan(data[n:]) + s.close()
        assert spans(got) == [("card.amex", 1, 18)], n


def test_card_and_ssn_rules_share_one_trigger(engine):
    """payment_cards and us_pii must spell the digit trigger identically: it is then compiled
    once, which is what keeps the Hyperscan scan fast on digit-rich text."""
    owners = {}
    for tid, rules in enumerate(engine._trigger_rules):
        for ri in rules:
            owners.setdefault(engine.rules[ri].id, set()).add(tid)
    shared = owners["card.visa"]
    assert len(shared) == 1
    for rid in ("card.mastercard", "card.amex", "card.maestro", "us.ssn", "us.itin"):
        assert owners[rid] == shared, rid
