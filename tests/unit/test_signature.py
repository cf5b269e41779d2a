"""One ``signature_id`` formula for every alert (issue 18: two formulas gave one rule two numbers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import firewall.datapath.nflog as nflog
import firewall.datapath.session as session
import firewall.dlp.engine as dlp
import firewall.observe.events as events
from firewall.observe.signature import signature_id

ROOT = Path(__file__).resolve().parents[2]


def test_every_emitter_uses_the_one_function():
    assert session.signature_id is signature_id
    assert dlp.signature_id is signature_id
    assert nflog.signature_id is signature_id
    assert events.signature_id is signature_id


def test_stable_positive_int32_and_distinct():
    names = ["default-deny", "no-clear-pan-out-of-cde", "DLP Visa card number", "cde-segmentation", "ü-名前"]
    ids = [signature_id(n) for n in names]
    assert all(0 <= i < 2**31 for i in ids)
    assert len(set(ids)) == len(ids)
    assert signature_id("default-deny") == signature_id("default-deny")


def test_docs_example_number_is_what_the_sidecar_emits():
    text = (ROOT / "docs" / "events.md").read_text()
    for m in re.finditer(r'"signature":"([^"]+)","signature_id":(\d+)', text):
        assert int(m.group(2)) == signature_id(m.group(1)), m.group(0)
    assert '"signature_id":' in text


def test_dlp_alert_and_session_alert_agree_for_the_same_signature():
    f = dlp.Finding(rule_id="card.visa", rule_name="Visa card number", pack="payment_cards",
                    type="credit_card", severity="critical", start=0, end=16, masked="411111******1111",
                    confidence=1.0, context="", default_action="block")
    ev = f.alert(True, "toserver")
    assert ev["alert"]["signature_id"] == signature_id(ev["alert"]["signature"])
    json.dumps(ev)
