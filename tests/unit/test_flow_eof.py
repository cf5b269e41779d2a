"""Flow records after a flow ends: batched writes stay redacted one by one, timestamps exact.

(The FIN-behind-a-scan test that lived here on stand-in transports is now a playbook of the
flow's sans-IO session: tests/unit/test_session_playbook.py.)
"""

from __future__ import annotations


def test_batched_records_are_redacted_one_by_one_and_drops_counted(tmp_path):
    """``EventSink.emit_many`` (the proxy's batched flow records) keeps both guarantees of the
    sink: every record redacted on its own, and a failed write counted per lost record."""
    from firewall.observe.events import EventSink, read_events

    path = tmp_path / "eve.json"
    sink = EventSink(path=str(path))
    card = "4111 1111 1111 1111"
    recs = [{"event_type": "flow", "n": i, "l7": {"url": f"/pay?card={card}"}} for i in range(3)]
    sink.emit_many(recs)
    text = path.read_text()
    assert card not in text and "4111111111111111" not in text
    got = read_events(str(path))
    assert [e["n"] for e in got] == [0, 1, 2] and all("timestamp" in e for e in got)
    sink.close()
    before = sink.errors
    sink._fd = 10**6  # a closed descriptor: the write fails (EBADF)
    sink.emit_many([{"event_type": "flow", "n": 9}, {"event_type": "flow", "n": 10}])
    assert sink.errors - before == 2 and sink.dropped.get("closed") == 2


def test_cached_timestamp_prefix_matches_strftime():
    from datetime import UTC, datetime

    from firewall.observe.events import ts_iso

    for epoch in (0.0, 1.25, 1700000000.123456, 1700000059.5, 1700000060.000001, 1767225599.999):
        want = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")
        got = ts_iso(epoch)
        assert got[:20] == want[:20] and abs(int(got[20:26]) - int(want[20:26])) <= 1, (got, want)
