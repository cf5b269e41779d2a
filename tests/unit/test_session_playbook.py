"""The flow's sans-IO session as conversations: events in, commands out, no sockets.

Modelled on mitmproxy's layer tests (``Playbook(layer) >> event << command``): every test
states the whole exchange - what the proxy tells the session and exactly which commands it
must execute in return - and a mismatch prints both sequences side by side.  The proxy
(firewall/datapath/proxy.py ``Flow``) only translates socket callbacks into these events and
executes these commands, so an ordering bug (a FIN overtaking bytes still in a DLP scan, a
queued chunk lost on reload) shows up here without a network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from firewall.datapath.flowsession import (
    CLIENT,
    HOLD,
    SERVER,
    SPLICE,
    SPLICE_MAX_TRIES,
    SPLICE_RETRY,
    Close,
    CloseRequested,
    Connected,
    ConnectionLost,
    DataReceived,
    EofReceived,
    FlowSession,
    HalfClose,
    Limits,
    PauseReading,
    Reloaded,
    ResumeReading,
    ScanDone,
    Send,
    SetTimer,
    Splice,
    Spliced,
    SpliceDeferred,
    StartScan,
    TimerFired,
    WriterPaused,
    WriterResumed,
)
from firewall.datapath.session import Inspection, Session
from firewall.policy.engine import PolicySet
from tests.unit.test_session import LOCAL, POLICY, Peers, engine, insp  # noqa: F401 - fixtures

CARD = b"4111 1111 1111 1111"
#: the first bytes of the flows below: a binary protocol nothing identifies
HELLO = b"\x00\x01\x02\x03binary-hello\x00"
#: small enough that every chunk of these tests is scanned off the loop (StartScan)
OFFLOAD = 64


class Clock:
    """A hand-moved monotonic clock for hold deadlines."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Playbook:
    """``Playbook(fs) >> event << command ...``; ``assert playbook`` runs it.

    An event may be given as a callable returning the event, evaluated when its turn comes
    (a ``ScanDone`` whose findings come from the real scan, run in order)."""

    def __init__(self, fs: FlowSession) -> None:
        self.fs = fs
        self.steps: list[tuple[str, Any]] = []
        self.transcript: list[str] = []

    def __rshift__(self, ev: Any) -> Playbook:
        self.steps.append((">>", ev))
        return self

    def __lshift__(self, cmd: Any) -> Playbook:
        self.steps.append(("<<", cmd))
        return self

    def __bool__(self) -> bool:
        i = 0
        while i < len(self.steps):
            kind, ev = self.steps[i]
            assert kind == ">>", f"step {i}: a command before any event: {ev!r}"
            if callable(ev) and not dataclasses.is_dataclass(ev):
                ev = ev()
            got = self.fs.handle(ev)
            i += 1
            want = []
            while i < len(self.steps) and self.steps[i][0] == "<<":
                want.append(self.steps[i][1])
                i += 1
            self.transcript.append(f">> {_short(ev)}")
            if got != want:
                lines = "\n".join(self.transcript)
                exp = "\n".join(f"   << {_short(c)}" for c in want) or "   (nothing)"
                act = "\n".join(f"   << {_short(c)}" for c in got) or "   (nothing)"
                raise AssertionError(f"playbook:\n{lines}\n expected:\n{exp}\n got:\n{act}")
            self.transcript.extend(f"<< {_short(c)}" for c in got)
        return True


def _short(x: Any) -> str:
    text = repr(x)
    data = getattr(x, "data", None)
    if isinstance(data, bytes) and len(data) > 48:
        text = text.replace(repr(data), f"<{len(data)} bytes {data[:20]!r}...>")
    return text


def flow(insp: Inspection, direction: str = "outbound", *, src: tuple = ("10.0.0.2", 5000),  # noqa: F811
         dst: tuple = ("10.0.0.4", 9100), clock: Callable[[], float] | None = None,
         **limits: Any) -> FlowSession:
    """An opened session (accept-time verdict: allowed) inside its flow state."""
    s = Session(insp, direction, src, dst)
    assert s.open(), s.rule
    lim = Limits(**{"offload_bytes": OFFLOAD, "identify_timeout": 1.0, "header_timeout": 10.0, **limits})
    return FlowSession(s, lim, clock or Clock())


def scanned(fs: FlowSession, side: int, data: bytes) -> Callable[[], ScanDone]:
    """The real DLP scan of ``data`` (as the worker thread runs it), evaluated in turn."""
    return lambda: ScanDone(side, fs.session.scan_findings(side, data))


def _tcp_analytics(insp: Inspection) -> FlowSession:  # noqa: F811
    """An outbound flow under the DLP block rule, past identification (a binary protocol)."""
    fs = flow(insp)
    assert Playbook(fs) >> Connected()
    assert Playbook(fs) >> DataReceived(CLIENT, HELLO) << Send(SERVER, HELLO)  # small: scanned inline
    assert fs.session.app_proto == "unknown" and not fs.session.passthrough  # the DLP still reads it
    return fs


# ------------------------------------------------------------------ FIN behind a scan
def test_fin_behind_a_running_scan_follows_every_accepted_byte(insp):  # noqa: F811
    """The server's FIN arrives while its last bytes are in the DLP scan and the client
    finishes meanwhile: the bytes, then the FIN, then the close - never the close first."""
    fs = _tcp_analytics(insp)
    answer = b"ok " * 60000
    assert (Playbook(fs)
            >> DataReceived(SERVER, answer) << StartScan(SERVER, answer) << PauseReading(SERVER)
            >> EofReceived(SERVER)  # waits behind the scan: nothing yet
            >> EofReceived(CLIENT) << HalfClose(SERVER)  # the other direction goes on
            >> scanned(fs, SERVER, answer) << Send(CLIENT, answer) << HalfClose(CLIENT) << Close(None, False))
    assert fs.closed and fs.session.bytes == [len(HELLO), 180000]


@pytest.mark.parametrize("tail", [b"!", b"x" * OFFLOAD], ids=["small-tail", "tail-scanned-too"])
def test_fin_behind_queued_chunks_waits_for_all_of_them(insp, tail):  # noqa: F811
    """Chunks read while a scan runs are queued in order; a FIN behind them waits for every
    one, also when a queued chunk needs a scan of its own."""
    fs = _tcp_analytics(insp)
    first, second = b"a" * 100, b"b" * 10
    pb = (Playbook(fs)
          >> DataReceived(CLIENT, first) << StartScan(CLIENT, first) << PauseReading(CLIENT)
          >> DataReceived(CLIENT, second)  # queued (reading already paused)
          >> DataReceived(CLIENT, tail)
          >> EofReceived(CLIENT))  # behind both
    if len(tail) < OFFLOAD:
        pb = (pb >> scanned(fs, CLIENT, first) << Send(SERVER, first) << Send(SERVER, second)
              << Send(SERVER, tail) << HalfClose(SERVER) << ResumeReading(CLIENT))
    else:
        pb = (pb >> scanned(fs, CLIENT, first) << Send(SERVER, first) << Send(SERVER, second)
              << StartScan(CLIENT, tail)  # the FIN still waits
              >> scanned(fs, CLIENT, tail) << Send(SERVER, tail) << HalfClose(SERVER) << ResumeReading(CLIENT))
    assert pb
    assert not fs.closed  # the server may still answer


def test_fin_read_before_the_upstream_connects_follows_the_early_bytes(insp):  # noqa: F811
    fs = flow(insp, offload_bytes=1 << 20)
    a, b = b"\x00\x01early-", b"bytes\x00"
    assert (Playbook(fs)
            >> DataReceived(CLIENT, a) >> DataReceived(CLIENT, b) >> EofReceived(CLIENT)
            >> Connected() << Send(SERVER, a) << Send(SERVER, b) << HalfClose(SERVER))
    assert fs.session.bytes[0] == len(a) + len(b)


def test_early_bytes_past_the_read_limit_pause_the_client_until_connected(insp):  # noqa: F811
    fs = flow(insp, read_buffer_limit=10, offload_bytes=1 << 20)
    assert (Playbook(fs)
            >> DataReceived(CLIENT, b"\x00" * 8)
            >> DataReceived(CLIENT, b"\x00" * 8) << PauseReading(CLIENT)
            >> DataReceived(CLIENT, b"\x00")
            >> Connected() << Send(SERVER, b"\x00" * 8) << Send(SERVER, b"\x00" * 8)
            << Send(SERVER, b"\x00") << ResumeReading(CLIENT))


# ------------------------------------------------------------------ holds
def _shop(insp: Inspection, clock: Clock | None = None) -> FlowSession:  # noqa: F811
    fs = flow(insp, "inbound", src=("10.0.0.3", 40000), dst=("10.0.0.2", 80), clock=clock,
              offload_bytes=1 << 20)
    assert Playbook(fs) >> Connected()
    return fs


def test_eof_while_a_request_head_is_held_refuses_and_forwards_nothing(insp):  # noqa: F811
    """An incomplete head is held; the client's FIN cannot release it (a server may act on
    ``GET /admin`` + FIN): 400 to the client, reset to the server, not one byte forwarded."""
    fs = _shop(insp)
    head = b"GET /admin HTTP/1.1\r\nHost: a\r\n"
    assert Playbook(fs) >> DataReceived(CLIENT, head) << SetTimer(HOLD, 1.0)
    cmds = fs.eof_received(CLIENT)
    assert [type(c) for c in cmds] == [Send, Close, Close]
    assert cmds[0].side == CLIENT and cmds[0].data.startswith(b"HTTP/1.1 400")
    assert cmds[1:] == [Close(SERVER, True), Close(CLIENT, False)]
    assert fs.closed and fs.session.close_reason == "inspection-error"


def test_held_head_completed_after_split_segments_then_fin(insp):  # noqa: F811
    """A head split over many segments is held whole, forwarded whole once complete, and the
    FIN follows it."""
    fs = _shop(insp)
    req = b"POST /v1/charge HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n"
    pb = Playbook(fs) >> DataReceived(CLIENT, req[:5]) << SetTimer(HOLD, 1.0)
    for i in range(5, len(req) - 1):
        pb = pb >> DataReceived(CLIENT, req[i:i + 1])  # still held: the one timer stays armed
    assert (pb >> DataReceived(CLIENT, req[-1:]) << Send(SERVER, req)
            >> EofReceived(CLIENT) << HalfClose(SERVER))


def test_held_head_of_a_silent_client_is_cut_at_the_header_deadline(insp):  # noqa: F811
    clock = Clock()
    fs = _shop(insp, clock)
    req = b"POST /v1/charge HTTP/1.1\r\nHost: api\r\n"
    assert Playbook(fs) >> DataReceived(CLIENT, b"POST /v1/charge HTTP/1.1\r\n") << SetTimer(HOLD, 1.0)
    clock.now += 5
    assert (Playbook(fs) >> DataReceived(CLIENT, req[26:])  # more bytes, still incomplete
            >> TimerFired(HOLD) << SetTimer(HOLD, 1.0))  # 5 s held: not yet
    clock.now += 5.5
    assert Playbook(fs) >> TimerFired(HOLD) << Close(None, True)
    assert fs.session.close_reason == "header-timeout"


# ------------------------------------------------------------------ DLP verdicts
def test_scan_verdict_block_mid_stream_drops_the_chunk_and_everything_queued(insp):  # noqa: F811
    fs = _tcp_analytics(insp)
    clean = b"x" * 100
    bad = b"name=a card=" + CARD + b" " * 80
    after = b"y" * 10
    assert (Playbook(fs)
            >> DataReceived(CLIENT, clean) << StartScan(CLIENT, clean) << PauseReading(CLIENT)
            >> scanned(fs, CLIENT, clean) << Send(SERVER, clean) << ResumeReading(CLIENT)
            >> DataReceived(CLIENT, bad) << StartScan(CLIENT, bad) << PauseReading(CLIENT)
            >> DataReceived(CLIENT, after)  # queued behind the scan
            >> EofReceived(CLIENT)
            >> scanned(fs, CLIENT, bad) << Close(None, True)  # not a byte of it, nor of what followed
            >> DataReceived(CLIENT, b"late") >> EofReceived(SERVER))  # a closed flow ignores the rest
    assert fs.session.verdict == "deny" and fs.session.close_reason == "dlp-block"
    assert fs.session.bytes[CLIENT] == len(HELLO) + len(clean) + len(bad) + len(after)


@pytest.mark.parametrize("at", [9, 14, 18])
def test_card_split_across_a_scanned_and_a_queued_chunk_is_blocked(insp, at):  # noqa: F811
    """The card's first digits end the scanned chunk, the rest is queued behind the scan:
    the card never reaches the server whole; a 12+ digit prefix (all but the check digit)
    is not even released (held back, then dropped with the flow)."""
    fs = _tcp_analytics(insp)
    lead = b"z" * 80 + b" card "
    a, b = lead + CARD[:at], CARD[at:] + b"\n"
    assert (Playbook(fs)
            >> DataReceived(CLIENT, a) << StartScan(CLIENT, a) << PauseReading(CLIENT)
            >> DataReceived(CLIENT, b))
    cmds = fs.handle(scanned(fs, CLIENT, a)())
    sent = b"".join(c.data for c in cmds if isinstance(c, Send) and c.side == SERVER)
    assert sent == (a if at < 14 else lead)  # 8 digits may pass; a card prefix may not
    assert cmds[-1] == Close(None, True) and fs.session.verdict == "deny"


def test_scanner_fault_fails_closed_where_dlp_blocks(insp):  # noqa: F811
    fs = _tcp_analytics(insp)
    chunk = b"q" * 100
    assert (Playbook(fs)
            >> DataReceived(CLIENT, chunk) << StartScan(CLIENT, chunk) << PauseReading(CLIENT)
            >> ScanDone(CLIENT, None, error=True) << Close(None, True))
    assert fs.session.close_reason == "dlp-error"


# ------------------------------------------------------------------ reloads
def _reload_insp(insp: Inspection, tmp_path, policy: str) -> Inspection:  # noqa: F811
    p = tmp_path / "p2.yaml"
    p.write_text(policy)
    return Inspection(policy=PolicySet.load([str(p)]), dlp=insp.dlp, identities=Peers(), local=LOCAL,
                      emit=insp.emit)


def test_reload_that_still_allows_keeps_the_scan_the_queue_and_the_pending_fin(insp, tmp_path):  # noqa: F811
    """A reload while a scan runs, a chunk waits behind it and the FIN waits behind both:
    the flow goes on with the new state and loses no byte, nor the FIN (the data-path
    symptom looked for: a long transfer arriving short across reloads)."""
    fs = _tcp_analytics(insp)
    new = _reload_insp(insp, tmp_path, POLICY.replace("to-analytics", "to-analytics-v2"))
    big, small = b"m" * 200, b"n" * 7
    assert (Playbook(fs)
            >> DataReceived(CLIENT, big) << StartScan(CLIENT, big) << PauseReading(CLIENT)
            >> DataReceived(CLIENT, small)
            >> EofReceived(CLIENT)
            >> Reloaded(new)  # allowed: nothing to do
            >> scanned(fs, CLIENT, big) << Send(SERVER, big) << Send(SERVER, small) << HalfClose(SERVER)
            << ResumeReading(CLIENT))
    assert fs.session.insp is new and fs.session.verdict == "allow"


def test_reload_under_backpressure_and_a_running_scan_resumes_only_when_both_clear(insp, tmp_path):  # noqa: F811
    """Reading stays paused while any reason holds (the server's full buffer, the scan); a
    reload in between changes neither."""
    fs = _tcp_analytics(insp)
    new = _reload_insp(insp, tmp_path, POLICY)
    big = b"p" * 200
    assert (Playbook(fs)
            >> WriterPaused(SERVER) << PauseReading(CLIENT)
            >> DataReceived(CLIENT, big) << StartScan(CLIENT, big)  # already paused
            >> Reloaded(new)
            >> scanned(fs, CLIENT, big) << Send(SERVER, big)  # the server's buffer still full
            >> WriterResumed(SERVER) << ResumeReading(CLIENT))


def test_backpressure_arriving_while_a_resume_is_on_its_way_wins(insp):  # noqa: F811
    """A scan's answer is [Send, ResumeReading]; executing the Send can make the server's
    buffer pass its high-water mark (``pause_writing``, a re-entrant WriterPaused) before the
    ResumeReading runs.  The session's state then says "do not read": the proxy executes a
    pause/resume only while ``wants_reading`` agrees (a stale resume once let a sender that
    the server never read from fill the sidecar's memory)."""
    fs = _tcp_analytics(insp)
    big = b"s" * 200
    assert (Playbook(fs)
            >> DataReceived(CLIENT, big) << StartScan(CLIENT, big) << PauseReading(CLIENT)
            >> scanned(fs, CLIENT, big) << Send(SERVER, big) << ResumeReading(CLIENT)
            >> WriterPaused(SERVER) << PauseReading(CLIENT))  # re-entrant, during that Send
    assert not fs.wants_reading(CLIENT)  # so the ResumeReading still queued is not executed
    assert Playbook(fs) >> WriterResumed(SERVER) << ResumeReading(CLIENT)
    assert fs.wants_reading(CLIENT)


def test_reload_that_denies_cuts_the_flow_and_forwards_nothing_more(insp, tmp_path):  # noqa: F811
    fs = _tcp_analytics(insp)
    new = _reload_insp(insp, tmp_path, POLICY.replace("app: analytics", "app: analytics-v2"))
    big = b"r" * 200
    assert (Playbook(fs)
            >> DataReceived(CLIENT, big) << StartScan(CLIENT, big) << PauseReading(CLIENT)
            >> Reloaded(new, "reload") << Close(None, True)
            >> scanned(fs, CLIENT, big))  # the late verdict sends nothing
    s = fs.session
    assert (s.verdict, s.close_reason, s.rule) == ("deny", "reload", "default-deny")


def test_quarantine_reload_cuts_every_open_flow(insp, tmp_path):  # noqa: F811
    fs = _tcp_analytics(insp)
    q = _reload_insp(insp, tmp_path, POLICY)
    q.quarantined = True
    assert Playbook(fs) >> Reloaded(q, "quarantine") << Close(None, True)
    assert fs.session.rule == "quarantine"


# ------------------------------------------------------------------ HTTP pipelining
def test_pipelined_requests_allowed_one_forwarded_denied_one_answered_403(insp):  # noqa: F811
    fs = _shop(insp)
    ok = b"POST /v1/charge HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\nhi"
    bad = b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n"
    cmds = fs.handle(DataReceived(CLIENT, ok + bad))
    assert cmds[0] == Send(SERVER, ok)  # exactly the allowed request, not a byte of the next
    assert isinstance(cmds[1], Send) and cmds[1].side == CLIENT and cmds[1].data.startswith(b"HTTP/1.1 403")
    assert cmds[2:] == [Close(SERVER, True), Close(CLIENT, False)]
    assert fs.closed and fs.handle(DataReceived(CLIENT, ok)) == []


@pytest.mark.parametrize("step", [1, 3, 17])
def test_pipelined_denied_request_split_across_segments_is_refused_the_same(insp, step):  # noqa: F811
    fs = _shop(insp)
    ok = b"POST /v1/charge HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\nhi"
    bad = b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n"
    stream = ok + bad
    cmds: list = []
    for i in range(0, len(stream), step):
        cmds += fs.handle(DataReceived(CLIENT, stream[i:i + step]))
    to_server = b"".join(c.data for c in cmds if isinstance(c, Send) and c.side == SERVER)
    replies = [c for c in cmds if isinstance(c, Send) and c.side == CLIENT]
    assert to_server == ok
    assert len(replies) == 1 and replies[0].data.startswith(b"HTTP/1.1 403")
    assert cmds[-2:] == [Close(SERVER, True), Close(CLIENT, False)]


def test_a_refusal_nobody_reads_can_still_be_reset_by_the_idle_sweep(insp):  # noqa: F811
    """While the 403 is being delivered the flow relays nothing, yet it is not finished: a
    client that never reads its answer is reset by the proxy's sweep (or drain)."""
    fs = _shop(insp)
    cmds = fs.handle(DataReceived(CLIENT, b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n"))
    assert cmds[-1] == Close(CLIENT, False) and fs.closed and not fs.finished
    assert (Playbook(fs) >> DataReceived(SERVER, b"late")  # relays nothing
            >> CloseRequested(True) << Close(None, True)
            >> CloseRequested(True))
    assert fs.finished


def test_refusal_after_the_client_is_gone_resets_instead_of_answering(insp):  # noqa: F811
    fs = _shop(insp)
    fs.gone[CLIENT] = True  # its connection was lost while the request was in the pipeline
    cmds = fs.handle(DataReceived(CLIENT, b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n"))
    assert cmds == [Close(None, True)]


# ------------------------------------------------------------------ splice hand-over
def _l4_only(insp: Inspection, *, l7: bool) -> Inspection:  # noqa: F811
    """The same policy, no DLP engine: nothing reads an allowed flow after identification."""
    return Inspection(policy=insp.policy, dlp=None, identities=Peers(), local=LOCAL, emit=insp.emit, l7=l7)


def test_splice_hand_over_when_nothing_inspects_waits_for_empty_buffers(insp):  # noqa: F811
    fs = flow(_l4_only(insp, l7=False), splice=True)
    assert fs.session.passthrough
    assert (Playbook(fs)
            >> Connected() << SetTimer(SPLICE, 0.0)
            >> DataReceived(CLIENT, b"hello") << Send(SERVER, b"hello")  # before the timer: relayed
            >> TimerFired(SPLICE) << PauseReading(CLIENT) << PauseReading(SERVER) << Splice()
            >> SpliceDeferred() << SetTimer(SPLICE, SPLICE_RETRY)  # a write buffer still had bytes
            >> WriterResumed(SERVER)  # no resume while the hand-over waits
            >> TimerFired(SPLICE) << Splice()
            >> Spliced())
    assert fs.spliced


def test_splice_after_identification_finds_nothing_to_read(insp):  # noqa: F811
    fs = flow(_l4_only(insp, l7=True), splice=True)
    assert not fs.session.passthrough
    bulk = b"\x00\x9f\x13binary bulk\x00" * 3
    assert (Playbook(fs)
            >> Connected()  # identification first: no hand-over yet
            >> DataReceived(CLIENT, bulk) << Send(SERVER, bulk) << PauseReading(CLIENT)
            << PauseReading(SERVER) << Splice())
    assert fs.session.app_proto == "unknown"


def test_no_splice_while_dlp_reads_the_flow(insp):  # noqa: F811
    fs = _tcp_analytics(Inspection(policy=insp.policy, dlp=insp.dlp, identities=Peers(), local=LOCAL,
                                   emit=insp.emit))
    fs.limits = dataclasses.replace(fs.limits, splice=True)
    assert Playbook(fs) >> TimerFired(SPLICE)  # asked anyway: still nothing
    assert not fs.want_splice


def test_no_splice_of_a_half_closed_flow(insp):  # noqa: F811
    fs = flow(_l4_only(insp, l7=False), splice=True)
    assert (Playbook(fs)
            >> Connected() << SetTimer(SPLICE, 0.0)
            >> EofReceived(SERVER) << HalfClose(CLIENT)
            >> TimerFired(SPLICE))  # half-closed: stays on the Protocol path
    assert not fs.want_splice


def test_splice_given_up_resumes_reading_and_never_asks_again(insp):  # noqa: F811
    fs = flow(_l4_only(insp, l7=False), splice=True)
    assert (Playbook(fs)
            >> Connected() << SetTimer(SPLICE, 0.0)
            >> TimerFired(SPLICE) << PauseReading(CLIENT) << PauseReading(SERVER) << Splice())
    fs.splice_tries = SPLICE_MAX_TRIES  # a receiver that never reads
    assert (Playbook(fs)
            >> SpliceDeferred() << ResumeReading(CLIENT) << ResumeReading(SERVER)
            >> TimerFired(SPLICE))
    assert not fs.want_splice


def test_splice_refused_by_the_kernel_keeps_relaying_in_python(insp):  # noqa: F811
    from firewall.datapath.flowsession import SpliceFailed

    fs = flow(_l4_only(insp, l7=False), splice=True)
    assert (Playbook(fs)
            >> Connected() << SetTimer(SPLICE, 0.0)
            >> TimerFired(SPLICE) << PauseReading(CLIENT) << PauseReading(SERVER) << Splice()
            >> SpliceFailed() << ResumeReading(CLIENT) << ResumeReading(SERVER)
            >> DataReceived(SERVER, b"more") << Send(CLIENT, b"more"))


# ------------------------------------------------------------------ lifecycle
def test_reset_on_one_side_resets_the_other(insp):  # noqa: F811
    fs = _tcp_analytics(insp)
    assert Playbook(fs) >> ConnectionLost(SERVER, error=True) << Close(CLIENT, True)
    assert fs.session.close_reason == "reset"


def test_plain_close_on_one_side_closes_the_other_gracefully(insp):  # noqa: F811
    fs = _tcp_analytics(insp)
    assert (Playbook(fs) >> ConnectionLost(CLIENT) << Close(SERVER, False)
            >> CloseRequested(True))  # already closed: nothing more
    assert fs.session.close_reason == "eof"


def test_handle_refuses_what_is_not_an_event(insp):  # noqa: F811
    fs = _tcp_analytics(insp)
    with pytest.raises(TypeError):
        fs.handle(Send(CLIENT, b"x"))  # type: ignore[arg-type]


# ------------------------------------------------------------------ random interleavings
def _interleave(insp: Inspection, seed: int, new: Inspection) -> None:  # noqa: F811
    """One random run: both directions split at random, scans completing at random moments,
    FINs, reloads and write-buffer pressure in between; every byte must arrive once, in
    order, before its FIN, and the flow closes gracefully only after both FINs."""
    import random

    rng = random.Random(seed)
    fs = _tcp_analytics(insp)
    fs.limits = dataclasses.replace(fs.limits, offload_bytes=rng.choice([1, 8, 64, 512, 1 << 20]))
    alphabet = b"abcdefghij \n"
    streams = {side: bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 2000))) for side in (CLIENT, SERVER)}
    chunks: dict[int, list[bytes]] = {}
    for side, data in streams.items():
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12)))) if len(data) > 1 else []
        chunks[side] = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
    got = {CLIENT: bytearray(), SERVER: bytearray(HELLO)}  # bytes sent TO the side
    fin = {CLIENT: False, SERVER: False}
    eof_sent = {CLIENT: False, SERVER: False}
    closes: list[Close] = []
    scans: dict[int, bytes] = {}
    paused = {CLIENT: False, SERVER: False}
    trace: list[str] = []

    def run(ev: Any) -> None:
        trace.append(_short(ev))
        for c in fs.handle(ev):
            trace.append("  " + _short(c))
            if isinstance(c, Send):
                assert not fin[c.side] and not closes, f"seed {seed}: bytes after FIN/close\n" + "\n".join(trace)
                got[c.side] += c.data
            elif isinstance(c, HalfClose):
                assert not fin[c.side], f"seed {seed}: two FINs"
                fin[c.side] = True
            elif isinstance(c, Close):
                closes.append(c)
            elif isinstance(c, StartScan):
                assert c.side not in scans, f"seed {seed}: two scans in flight on one side"
                scans[c.side] = c.data
            elif isinstance(c, PauseReading | ResumeReading):
                paused[c.side] = isinstance(c, PauseReading)

    for _step in range(20000):
        if not chunks[CLIENT] and not chunks[SERVER] and all(eof_sent.values()) and not scans:
            break
        choices: list[tuple] = []
        for side in (CLIENT, SERVER):
            if chunks[side]:
                if not paused[side] or rng.random() < 0.15:  # a read already on its way
                    choices.append(("data", side))
            elif not eof_sent[side]:
                choices.append(("eof", side))
            choices.append(("pressure", side))
        choices += [("scan", side) for side in scans]
        if rng.random() < 0.1:
            choices.append(("reload",))
        pick = rng.choice(choices)
        if pick[0] == "data":
            run(DataReceived(pick[1], chunks[pick[1]].pop(0)))
        elif pick[0] == "eof":
            eof_sent[pick[1]] = True
            run(EofReceived(pick[1]))
        elif pick[0] == "scan":
            side = pick[1]
            data = scans.pop(side)
            run(ScanDone(side, fs.session.scan_findings(side, data)))
        elif pick[0] == "pressure":
            run(rng.choice([WriterPaused, WriterResumed])(pick[1]))
        else:
            run(Reloaded(new))
    else:
        raise AssertionError(f"seed {seed}: the flow stalled (reading paused for good?)\n" + "\n".join(trace[-40:]))
    where = f"seed {seed}\n" + "\n".join(trace[-40:])
    assert bytes(got[SERVER]) == HELLO + streams[CLIENT], where
    assert bytes(got[CLIENT]) == streams[SERVER], where
    assert fin == {CLIENT: True, SERVER: True}, where
    assert closes == [Close(None, False)], where


def test_random_interleavings_deliver_every_byte_before_its_fin(insp, tmp_path):  # noqa: F811
    new = _reload_insp(insp, tmp_path, POLICY.replace("to-analytics", "to-analytics-v2"))
    for seed in range(300):
        _interleave(insp, seed, new)
