"""The alert webhook against a real HTTP server on 127.0.0.1 (up, down, slow, refusing)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import REGISTRY

from firewall.observe.alertsink import WebhookError, WebhookSink
from firewall.observe.events import EventSink


class Receiver:
    """A webhook endpoint: records every POST; answers ``statuses`` in order, then 200.

    With ``hold`` set, each handler waits on it before answering (a hung receiver).
    """

    def __init__(self, port: int = 0, statuses: list[int] | None = None,
                 hold: threading.Event | None = None) -> None:
        self.requests: list[tuple[dict[str, str], object]] = []
        self.statuses = list(statuses or [])
        self.hold = hold
        self._cv = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer._cv:
                    outer.requests.append((dict(self.headers), json.loads(body)))
                    status = outer.statuses.pop(0) if outer.statuses else 200
                    outer._cv.notify_all()
                if outer.hold is not None:
                    outer.hold.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def events(self, accepted_only: bool = False) -> list[dict]:
        with self._cv:
            out: list[dict] = []
            for _h, body in self.requests:
                out.extend(body if isinstance(body, list) else [body])
            return out

    def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.requests) >= n, timeout), \
                f"only {len(self.requests)} requests arrived"

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def wait_until(pred, timeout: float = 10.0, what: str = "") -> None:
    """Readiness polling on observable state (not a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def alert(n: int) -> dict:
    return {"event_type": "alert", "n": n, "alert": {"action": "blocked", "signature": "default-deny"}}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dropped_metric(reason: str) -> float:
    return REGISTRY.get_sample_value("palisade_alert_webhook_dropped_total", {"reason": reason}) or 0.0


# --------------------------------------------------------------------------- delivery


def test_delivers_json_batches_to_a_real_server(receiver):
    sink = WebhookSink(receiver.url, batch=100)
    for i in range(5):
        sink(alert(i))
    sink.start()
    assert sink.stop(flush_timeout=5) is True
    assert [e["n"] for e in receiver.events()] == [0, 1, 2, 3, 4]
    headers, body = receiver.requests[0]
    assert isinstance(body, list), "batch > 1 posts a JSON array"
    assert headers["Content-Type"] == "application/json"
    assert sink.sent == 5 and sink.dropped == 0


def test_batch_one_posts_single_objects(receiver):
    sink = WebhookSink(receiver.url, batch=1).start()
    sink(alert(1))
    sink(alert(2))
    receiver.wait_requests(2)
    sink.stop()
    assert [body for _h, body in receiver.requests] == [alert(1), alert(2)]


def test_event_type_filter(receiver):
    sink = WebhookSink(receiver.url).start()
    for etype in ("flow", "http", "alert", "pcap", "policy", "dlp", "quarantine"):
        sink({"event_type": etype})
    sink.stop()
    assert [e["event_type"] for e in receiver.events()] == ["alert", "pcap", "policy", "dlp", "quarantine"]

    every = WebhookSink(receiver.url, event_types=None).start()
    every({"event_type": "flow"})
    every.stop()
    assert receiver.events()[-1] == {"event_type": "flow"}


def test_through_the_event_sink_with_stdout(receiver):
    out = io.StringIO()
    events = EventSink(stream=out)
    hook = WebhookSink(receiver.url).start()
    events.add_consumer(hook)
    events.emit(alert(7))
    events.emit({"event_type": "flow", "flow": {}})
    hook.stop()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event_type"] for e in lines] == ["alert", "flow"], "stdout gets every event"
    got = receiver.events()
    assert len(got) == 1 and got[0]["n"] == 7 and "timestamp" in got[0]


def test_basic_auth_from_url_and_redacted_errors(receiver):
    url = receiver.url.replace("http://", "http://palisade:s3cr%40t@")
    sink = WebhookSink(url).start()
    sink(alert(1))
    sink.stop()
    headers, _ = receiver.requests[0]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"palisade:s3cr@t").decode()
    with pytest.raises(WebhookError) as exc:
        WebhookSink("http://user:topsecret@:80/")
    assert "topsecret" not in str(exc.value)


@pytest.mark.parametrize("url", ["ftp://example/x", "not a url", "http://", "http://127.0.0.1:99999/"])
def test_bad_urls(url):
    with pytest.raises(WebhookError):
        WebhookSink(url)


# --------------------------------------------------------------------------- failures


def test_server_down_then_back_delivers_after_retries():
    port = free_port()
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", backoff_s=0.05, max_backoff_s=0.2,
                       max_retries=100).start()
    for i in range(3):
        sink(alert(i))
    wait_until(lambda: sink.retries >= 3, what="retries while the server is down")
    assert sink.sent == 0
    back = Receiver(port=port)
    try:
        wait_until(lambda: sink.sent == 3, what="delivery after the server came back")
        assert [e["n"] for e in back.events()] == [0, 1, 2]
        assert sink.dropped == 0
    finally:
        sink.stop()
        back.close()


def test_5xx_is_retried_4xx_is_dropped():
    flaky = Receiver(statuses=[500, 503])
    try:
        sink = WebhookSink(flaky.url, backoff_s=0.01).start()
        sink(alert(1))
        wait_until(lambda: sink.sent == 1, what="delivery after two 5xx")
        assert len(flaky.requests) == 3 and sink.retries == 2
        sink.stop()
    finally:
        flaky.close()

    refusing = Receiver(statuses=[400])
    try:
        before = dropped_metric("rejected")
        sink = WebhookSink(refusing.url, backoff_s=0.01).start()
        sink(alert(1))
        wait_until(lambda: sink.dropped == 1, what="rejected batch dropped")
        sink.stop()
        assert len(refusing.requests) == 1, "a 4xx is not retried"
        assert dropped_metric("rejected") == before + 1
    finally:
        refusing.close()


def test_retries_exhausted_drops_and_counts():
    broken = Receiver(statuses=[503] * 10)
    try:
        before = dropped_metric("retries_exhausted")
        sink = WebhookSink(broken.url, max_retries=2, backoff_s=0.01).start()
        sink(alert(1))
        sink(alert(2))
        wait_until(lambda: sink.dropped == 2, what="batch dropped after retries")
        sink.stop()
        assert len(broken.requests) == 3, "1 attempt + max_retries"
        assert dropped_metric("retries_exhausted") == before + 2
    finally:
        broken.close()


def test_queue_overflow_drops_are_counted(receiver):
    before = dropped_metric("queue_full")
    sink = WebhookSink(receiver.url, queue_size=10)  # not started: nothing drains the queue
    for i in range(25):
        sink(alert(i))
    assert sink.queued == 10 and sink.dropped == 15
    assert dropped_metric("queue_full") == before + 15
    sink.start()
    assert sink.stop(5)
    assert [e["n"] for e in receiver.events()] == list(range(10)), "the oldest queued events are kept"


@pytest.mark.timeout(60)
def test_call_never_blocks_while_the_server_hangs():
    hold = threading.Event()
    hung = Receiver(hold=hold)
    sink = WebhookSink(hung.url, queue_size=1000, timeout_s=30, batch=100).start()
    try:
        sink(alert(-1))
        hung.wait_requests(1)  # the sender thread is now stuck waiting for the response
        for i in range(5000):  # if __call__ waited on the network, this would hang (test timeout)
            sink(alert(i))
        assert sink.queued == 1000 and sink.dropped == 4000
        assert sink.sent == 0
        hold.set()
        wait_until(lambda: sink.sent == 1001, what="backlog delivered once the receiver answers")
        assert len(hung.events()) == 1001
    finally:
        sink.stop(2)
        hung.close()


def test_stop_while_down_returns_and_counts_leftovers():
    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/", backoff_s=0.05, max_retries=1000).start()
    for i in range(3):
        sink(alert(i))
    wait_until(lambda: sink.retries >= 1, what="first retry")
    assert sink.stop(flush_timeout=0.3) is False
    assert sink.dropped == 3 and sink.sent == 0
    sink(alert(9))  # after stop: dropped, not queued forever
    assert sink.queued == 0 and sink.dropped == 4
