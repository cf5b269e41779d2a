"""One digit-run rule: the event sink, the parsers' log fields and DLP context snippets mask a card
(and any card-shaped run of 12+ digits) to the same text (issue 18: one of each concept).

The sink's rule (``observe.redaction.mask_text``) is the authority; ``protocols/redact.py``
(paths, SQL) and ``dlp/mask.py`` (context around a finding) call it, and may only mask *more*
elsewhere (query values, SQL literals, shorter numbers, mixed tokens, numbers cut by a snippet
edge).  So for every input below the three outputs must be equal - and must differ from the input,
so the test cannot pass with masking switched off.
"""

from __future__ import annotations

import pytest

from firewall.dlp.mask import context_snippet, sanitize
from firewall.observe.redaction import redact_event, redact_str
from firewall.protocols.redact import redact_path, redact_sql

PAN = "4111111111111111"
# separators the rule allows between digits (up to three), and encodings it sees through
RUNS = [
    PAN,
    "4111-1111-1111-1111",
    "4111 1111 1111 1111",
    "4111.1111.1111.1111",
    "4111/1111/1111/1111",
    "4111+1111+1111+1111",
    "4111_1111_1111_1111",
    "4111 - 1111 - 1111 - 1111",
    "4111\u00a01111\u20131111\u200b1111",    # no-break space, en dash, zero-width space
    "\u0664\u0661\u0661\u0661" * 4,             # Arabic-Indic digits
    "%34%31%31%31111111111111",                 # percent-encoded digits
    "%2534111111111111111",                     # double percent-encoded
    "378282246310005",                          # 15-digit Amex
    "123456789012",                             # 12 digits: the shortest run masked
    "12345678901234567890123",                  # longer than any card
    "6011 0009 9013 9424 and 5555555555554444",  # two runs in one text
]


@pytest.mark.parametrize("run", RUNS)
def test_sink_parsers_and_dlp_context_mask_a_run_alike(run: str) -> None:
    text = f"pay {run} now"
    sink = redact_str(text)
    assert sink != text, "the sink masked nothing"
    assert sink == redact_event({"msg": text})["msg"]
    assert redact_path("/v1/" + text) == "/v1/" + sink          # an HTTP path in a flow summary
    assert redact_sql(f"SELECT {text}") == f"SELECT {sink}"      # SQL text in an event
    assert sanitize(text.encode()) == sink                       # DLP context
    assert context_snippet(f"{text} [".encode(), "MASKED", f"] {text}".encode()) == f"{sink} [MASKED] {sink}"


def test_first_six_last_four_is_what_all_three_keep() -> None:
    for out in (redact_str(f"x {PAN} y"), redact_path(f"/{PAN}"), sanitize(PAN.encode())):
        assert "411111******1111" in out and PAN not in out


@pytest.mark.parametrize("short", ["12345678901", "1234-5678-901", "order 2026"])
def test_under_twelve_digits_the_sink_and_parsers_keep_dlp_context_masks_from_six(short: str) -> None:
    """Producers may mask more: the DLP context stars 6-11 digit numbers (an SSN, half a card)."""
    assert redact_str(short) == redact_path(short) == short
    digits = sum(c.isdigit() for c in short)
    assert sanitize(short.encode()) == (short if digits < 6 else "".join("*" if c.isdigit() else c for c in short))


def test_a_card_cut_by_the_snippet_edge_shows_no_digit() -> None:
    """Context is cut from the stream at a fixed width: the visible tail of a card there is not
    its first six / last four, so none of it is shown."""
    ctx = context_snippet(b"1111 1111 1111 card ", "M", b" then 4111 1111 1111 11")
    assert ctx == "**** **** **** card M then **** **** **** **"
    assert sanitize(b"1111 1111 1111 card ") == "1111 11** 1111 card "  # not cut: the sink's rule
