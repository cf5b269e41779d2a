"""What parsers keep for logs never holds a full card number or a query secret."""

from __future__ import annotations

import json

from firewall.protocols import TOSERVER
from firewall.protocols.redact import redact_path, redact_sql
from tests.protocols.replay import load, run

PAN = "4111111111111111"


def test_digit_runs_keep_first_six_last_four():
    assert redact_sql(f"pan {PAN} end") == "pan 411111******1111 end"
    assert redact_sql("4111-1111-1111-1111") == "4111-11**-****-1111"
    assert redact_sql("order 12345 of 2026") == "order 12345 of 2026"  # short numbers stay


def test_redact_path_and_sql():
    assert redact_path(f"/v1/cards/{PAN}?token=s3cr3t&debug") == "/v1/cards/411111******1111?token=…&debug"
    assert redact_path(None) is None
    assert redact_sql("UPDATE u SET pw = 'hunter2' WHERE id = 1") == "UPDATE u SET pw = '…' WHERE id = 1"


def test_recorded_sql_statements_are_logged_without_the_card_number():
    for name in ("pgsql_psql", "mysql_mariadb"):
        doc = load(name)
        events, summary = run(doc["app_proto"], doc["connections"][0])
        text = json.dumps([e.fields for e in events]) + json.dumps(summary)
        assert PAN not in text
        assert any(e.fields.get("verb") == "INSERT" for e in events)


def test_http_summary_paths_are_redacted_but_events_keep_the_path_for_policy():
    data = f"GET /cards/{PAN}?key=abc HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    (ev,), summary = run("http", [(TOSERVER, data)])
    assert ev.fields["path"] == f"/cards/{PAN}?key=abc"  # policy matches the real path
    assert PAN not in json.dumps(summary) and "abc" not in json.dumps(summary)
    assert summary["path"] == "/cards/411111******1111?key=…"
