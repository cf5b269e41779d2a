"""Flow bookkeeping around DLP scans on the worker thread, with stand-in transports.

A direction whose FIN arrives while its last bytes are still being scanned must deliver those
bytes before the flow closes, even when the other direction finishes meanwhile.
"""

from __future__ import annotations

import asyncio

from firewall.config import Config
from firewall.protocols.base import TOCLIENT, TOSERVER
from firewall.proxy import Flow, Proxy, _Side
from firewall.session import Session
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
