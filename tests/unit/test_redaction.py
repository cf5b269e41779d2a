"""The one redaction rule (firewall/observe/redaction.py) and the event sink that applies it.

Every variant an attacker could choose to spell a card number in a field the
sidecar logs: separators, percent-encoding (single and double), Unicode digits,
numbers in integer fields, huge fields.  The sink tests check that nothing
reaches the file or a consumer unredacted, and that a failing write is counted,
logged once per interval and reported to the consumers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse

import pytest
from prometheus_client import REGISTRY

from firewall.observe import events as events_mod
from firewall.observe.events import EventSink
from firewall.observe.redaction import MAX_FIELD, mask_text, redact_event

CARDS = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
         "4000056655665556", "2223003122003222"]
SEPS = ["", " ", "-", ".", "/", "+", "%20", "_", " - ", "%2D", "%2F"]


def leaks(text: str, card: str) -> bool:
    """A full number or any 15-digit prefix of it, in ``text`` after percent-decoding (twice)
    and with every non-digit removed."""
    decoded = urllib.parse.unquote(urllib.parse.unquote(text))
    digits = "".join(c for c in decoded if c.isdigit())
    import unicodedata
    digits = "".join(str(unicodedata.decimal(c)) for c in digits)
    return card in digits or card[:15] in digits


def groups(card: str) -> list[str]:
    return [card[i:i + 4] for i in range(0, len(card), 4)]


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("sep", SEPS)
def test_cards_masked_across_separators(card: str, sep: str) -> None:
    text = f"/v1/pay/{sep.join(groups(card))}?x=1"
    out = mask_text(text)
    assert not leaks(out, card), out
    assert card[:6] in out.replace(sep, "").replace("%20", "") or sep in ("%2D", "%2F")


@pytest.mark.parametrize("card", CARDS[:3])
def test_percent_encoded_digits_single_and_double(card: str) -> None:
    single = "".join(f"%{ord(c):02X}" for c in card)
    double = "".join(f"%25{ord(c):02X}" for c in card)
    mixed = "".join(f"%{ord(c):02x}" if i % 3 else c for i, c in enumerate(card))
    for text in (single, double, mixed, "/a/" + single + "/b"):
        assert not leaks(mask_text(text), card), text


def test_unicode_digits_and_15_digit_prefix() -> None:
    full = "".join(chr(0xFF10 + int(c)) for c in CARDS[0])
    assert not leaks(mask_text("id=" + full), CARDS[0])
    prefix = CARDS[0][:15]  # Luhn gives back the 16th digit: a prefix is as sensitive
    assert not leaks(mask_text(f"/c/{prefix}"), CARDS[0])
    # a card inside a longer digit run
    assert not leaks(mask_text("9" + CARDS[0] + "77"), CARDS[0])


def test_first_six_last_four_kept_and_small_numbers_untouched() -> None:
    assert mask_text("/cards/4111111111111111") == "/cards/411111******1111"
    for keep in ("/v1/charge", "10.231.0.12", "2026-12-05T15:14:36.123456+0000", "OpenSSH_9.2p1",
                 "/orders/12345678901", "HTTP/1.1", "fd00:e7::2"):
        assert mask_text(keep) == keep


def test_redact_event_walks_every_field_key_and_large_int() -> None:
    card = CARDS[1]
    ev = {"event_type": "flow", "flow_id": 123456789012, "l7": {
        "host": f"{card}.example", "queries": [f"{card[:8]}.{card[8:]}.attacker.example"],
        card: "as a key", "content_length": int(card), "nested": [[{"deep": f"x {card} y"}]]},
        "flow": {"bytes_toserver": 10**14}}
    out = redact_event(ev)
    text = json.dumps(out)
    assert not leaks(text, card), text
    assert out["flow_id"] == 123456789012 and out["flow"]["bytes_toserver"] == 10**14
    assert ev["l7"]["host"].startswith(card)  # the producer's dict is not changed


def test_fields_lists_and_depth_are_bounded() -> None:
    ev = {"l7": {"path": "/" + "a" * 1_000_000, "list": list(range(10_000))}}
    d: dict = ev
    for _ in range(50):
        d["x"] = {}
        d = d["x"]
    out = redact_event(ev)
    assert len(out["l7"]["path"]) <= MAX_FIELD + 20
    assert len(out["l7"]["list"]) <= 257
    assert len(json.dumps(out)) < 64 * 1024


def test_card_split_by_the_length_bound_is_not_left_whole() -> None:
    card = CARDS[0]
    text = "/" + "a" * (MAX_FIELD - 8) + card
    assert not leaks(redact_event({"p": text})["p"], card)


# ---------------------------------------------------------------------------- the sink
def _dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("palisade_events_dropped_total", {"reason": reason}) or 0.0


def test_sink_redacts_before_writing_and_before_consumers(tmp_path) -> None:
    path = tmp_path / "eve.json"
    sink = EventSink(path=str(path))
    seen: list[dict] = []
    sink.add_consumer(seen.append)
    card = CARDS[0]
    sink.emit({"event_type": "alert", "alert": {"signature": "x"}, "l7": {"path": f"/p/{card}"}})
    sink.close()
    text = path.read_text()
    assert not leaks(text, card) and "411111" in text
    assert not leaks(json.dumps(seen), card)


def test_full_disk_is_counted_logged_once_and_alerted(caplog, monkeypatch) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is missing")
    monkeypatch.setattr(events_mod, "LOG_INTERVAL", 3600.0)
    sink = EventSink(path="/dev/full")  # every write fails with ENOSPC
    alerts: list[dict] = []
    sink.add_consumer(lambda e: alerts.append(e) if e.get("alert", {}).get("signature")
                      == events_mod.DROP_SIGNATURE else None)
    before = _dropped("no_space")
    with caplog.at_level(logging.ERROR, logger="palisade.events"):
        for i in range(50):
            sink.emit({"event_type": "flow", "n": i})
    assert _dropped("no_space") - before == 50
    assert sink.dropped == {"no_space": 50}
    lines = [r for r in caplog.records if "events dropped" in r.getMessage()]
    assert len(lines) == 1  # rate-limited, not one line per event
    assert len(alerts) == 1 and alerts[0]["events_dropped"]["total"] == {"no_space": 1}
    assert alerts[0]["alert"]["category"] == "evidence"


def test_closed_descriptor_is_counted_and_the_sink_keeps_working(tmp_path) -> None:
    sink = EventSink(path=str(tmp_path / "eve.json"))
    os.close(sink._fd)  # the descriptor goes away under the sink (a closed fd)
    before = _dropped("closed")
    sink.emit({"event_type": "flow"})
    assert _dropped("closed") - before == 1
    sink._fd = None


def test_metric_is_exported_on_the_admin_format() -> None:
    from prometheus_client import generate_latest

    EventSink(stream=None)._drop("write_error")
    assert re.search(rb'^palisade_events_dropped_total\{reason="write_error"\} [1-9]', generate_latest(),
                     re.M)


def test_dlp_pack_values_masked_when_the_sink_has_the_engine(tmp_path) -> None:
    from firewall.dlp.engine import DlpEngine

    path = tmp_path / "eve.json"
    sink = EventSink(path=str(path))
    sink.set_scanner(DlpEngine.load())
    secret = "AKIAIOSFODNN7EXAMPLF"  # AWS key ID shape (not the documented EXAMPLE allowlist)
    iban = "GB82WEST12345698765432"
    ssn = "536-22-1234"
    sink.emit({"event_type": "flow", "l7": {"path": f"/k?key={secret}", "user": f"iban {iban}",
                                            "queries": [f"ssn {ssn}"], "host": "shop.example"}})
    sink.close()
    text = path.read_text()
    for value in (secret, iban, ssn, iban[4:]):
        assert value not in text, text
    assert "shop.example" in text and "AKIA" in text  # the rest and the type hint stay


def test_log_lines_are_masked_too() -> None:
    import io

    from firewall.observe.events import redact_logs

    logger = logging.getLogger("palisade.test-redaction")
    logger.propagate = False
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(h)
    redact_logs(logger)
    try:
        raise ValueError(f"bad path /p/{CARDS[0]}")
    except ValueError:
        logger.exception("request %s failed", f"/x/{groups(CARDS[1])[0]} {' '.join(groups(CARDS[1])[1:])}")
    text = buf.getvalue()
    assert "Traceback" in text and not leaks(text, CARDS[0]) and not leaks(text, CARDS[1]), text


@pytest.mark.parametrize("sep", ["\x00", "\n", "\r\n", "\\", "\u200b", "\u2013", "\u00a0", "%0A", "%00", "\t"])
def test_control_unicode_and_escaped_separators(sep: str) -> None:
    card = CARDS[0]
    text = "/p/" + sep.join(groups(card))
    out = mask_text(text)
    digits = "".join(c for c in urllib.parse.unquote(out) if c.isdigit())
    assert card[:15] not in digits and "*" in out, repr(out)


@pytest.mark.parametrize("at", [-8, -20, 0, 6, 300, 505, 511])
def test_card_straddling_either_cut_shows_at_most_six_digits(at: int) -> None:
    from firewall.observe.redaction import _CUT_SLACK

    card = "%25" + "%25".join(f"3{c}" for c in CARDS[0])  # double-encoded: the longest spelling
    for pos in (MAX_FIELD + at, MAX_FIELD + _CUT_SLACK + at):
        text = "/" + "a" * (pos - 1) + card + "/tail"
        assert not leaks(redact_event({"p": text})["p"], CARDS[0])


def test_hostile_megabyte_fields_cost_little() -> None:
    import time

    for s in ("1-" * 500_000, "%31%20" * 200_000, "\u0661-" * 500_000, ("1 " * 11 + "x") * 80_000):
        t = time.perf_counter()
        redact_event({"l7": {"path": s, "host": s}})
        assert time.perf_counter() - t < 0.25  # measured ~2 ms: the pre-cut bounds the work


def test_a_line_cut_short_never_swallows_the_next_record(tmp_path, monkeypatch) -> None:
    """A short write (disk full mid-line): the next record still starts on its own line."""
    path = tmp_path / "eve.json"
    sink = EventSink(path=str(path))
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd, data):
        calls["n"] += 1
        return real_write(fd, data[:10]) if calls["n"] == 2 else real_write(fd, data)

    monkeypatch.setattr(events_mod.os, "write", flaky)
    for i in range(3):
        sink.emit({"event_type": "flow", "n": i})
    sink.close()
    ok = [json.loads(ln) for ln in path.read_text().splitlines() if ln.startswith("{") and ln.endswith("}")]
    assert [e["n"] for e in ok] == [0, 2] and sink.dropped == {"no_space": 1}


def test_capture_digests_survive_but_nothing_else_hides_under_their_key() -> None:
    """A SHA-256 hex digest holds a run of 12+ digits about one time in fourteen; masked, it no
    longer matches its pcap file (an intermittent capture-test failure).  Only exactly 64
    lowercase hex characters under a ``sha256`` key are exempt."""
    digest = "ab" + "4111111111111111" + "0123456789" * 4 + "cdef00"
    assert len(digest) == 64
    ev = redact_event({"event_type": "capture", "capture": {"sha256": {"c-0001.pcap": digest}, "sha": digest}})
    assert ev["capture"]["sha256"]["c-0001.pcap"] == digest
    assert leaks(ev["capture"]["sha"], CARDS[0]) is False and ev["capture"]["sha"] != digest
    assert redact_event({"sha256": digest})["sha256"] == digest
    for not_a_digest in (digest.upper(), digest + "0", digest[:-1], "x" + digest[1:], "4111 1111 1111 1111"):
        out = redact_event({"sha256": {"f": not_a_digest}, "x": {"sha256": not_a_digest}})
        assert out["sha256"]["f"] != not_a_digest and out["x"]["sha256"] != not_a_digest, not_a_digest
