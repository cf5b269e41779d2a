"""Flow bookkeeping around DLP scans on the worker thread, with stand-in transports.

A direction whose FIN arrives while its last bytes are still being scanned must deliver those
bytes before the flow closes, even when the other direction finishes meanwhile.
"""

from __future__ import annotations

import asyncio

from firewall.datapath.proxy import Flow, Proxy, _Side
from firewall.datapath.session import Session
from firewall.protocols.base import TOCLIENT, TOSERVER
from firewall.sidecar.config import Config
from tests.unit.test_session import engine, insp  # noqa: F401 - fixtures


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.closed = False

    def write(self, b: bytes) -> None:
        assert not self.closed, "write after close"
        self.data += b

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return default


def test_fin_behind_a_running_scan_does_not_cut_the_last_bytes(insp):  # noqa: F811
    async def run() -> tuple[FakeTransport, Flow]:
        proxy = Proxy(Config(), insp, lambda e: None)
        proxy.loop = asyncio.get_running_loop()
        session = Session(insp, "outbound", ("10.0.0.2", 5000), ("10.0.0.4", 9100))
        assert session.open()
        client = _Side(None, TOSERVER)  # type: ignore[arg-type]
        client.transport = FakeTransport()  # type: ignore[assignment]
        flow = Flow(proxy, session, client)
        client.flow = flow
        server = _Side(flow, TOCLIENT)
        server.transport = FakeTransport()  # type: ignore[assignment]
        flow.attach_server(server)
        answer = b"ok " * 60000  # 180,000 bytes: scanned on the worker thread
        flow.on_data(TOCLIENT, answer)
        assert flow.scanning[TOCLIENT]
        flow.on_eof(TOCLIENT)  # the server's FIN, while its last bytes are in the scan
        flow.on_eof(TOSERVER)  # then the client's: both sides have finished
        for _ in range(500):
            if not flow.scanning[TOCLIENT] and client.transport.closed:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        proxy.executor.shutdown()
        return client.transport, flow  # type: ignore[return-value]

    to_client, flow = asyncio.run(run())
    assert bytes(to_client.data) == b"ok " * 60000  # every byte reached the client ...
    assert to_client.eof  # ... then the FIN
    assert flow.closed


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
