"""Adversarial load through the real sidecar: slowloris, 10,000 concurrent connections, peers
that never read, random resets, an upstream that vanishes mid-stream.

After each: the sidecar is still ready, its open-connection gauge is back to 0, its file
descriptors and threads are back to the baseline taken after start-up (no leaked sockets or
tasks), its RSS is back near the baseline, and every flow has exactly one flow record.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time

import pytest

from tests.harness import PY, REPO, Cluster, wait_until

from .conftest import Env, assert_no_pan, fd_count, metric, rss_kib, sidecar_outputs, threads

pytestmark = pytest.mark.netns

ACTIVE_IN = ("palisade_connections_active", '{direction="inbound"}')

ECHO = r"""
import asyncio, sys
async def h(r, w):
    try:
        while True:
            b = await r.read(65536)
            if not b: break
            w.write(b); await w.drain()
    except (ConnectionError, OSError):
        pass
    w.close()
async def main():
    srv = await asyncio.start_server(h, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    async with srv: await srv.serve_forever()
asyncio.run(main())
"""

# opens N connections, echoes 64 bytes on each (all stay open), prints "ready", waits for a line
# on stdin, closes them all and prints a JSON summary
MANY = r"""
import asyncio, json, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    sem = asyncio.Semaphore(500)
    conns, errors = [], []
    async def one(i):
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 60)
                msg = (f"conn-{i:06d}-" * 8)[:64].encode()
                w.write(msg); await w.drain()
                got = await asyncio.wait_for(r.readexactly(64), 60)
                conns.append(w)
                return got == msg
            except Exception as exc:
                errors.append(repr(exc)); return False
    ok = await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps({"ready": len(conns), "ok": sum(ok), "errors": errors[:5]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in conns: w.close()
    await asyncio.sleep(0.5)
    print(json.dumps({"closed": len(conns)}), flush=True)
asyncio.run(main())
"""

# slowloris: N connections each send a partial request head, then one header byte per interval
SLOWLORIS = r"""
import json, socket, sys, time
host, port, n, interval, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
socks = []
t0 = time.monotonic(); closed_at = {}
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:  # a connection over the per-peer limit may already be reset here
        s.sendall(b"GET /v1/charge HTTP/1.1\r\nHost: payments\r\nX-Slow: ")
    except OSError:
        closed_at[i] = 0.0
    socks.append(s)
print(json.dumps({"opened": n}), flush=True)
alive = [i for i in range(n) if i not in closed_at]
while time.monotonic() - t0 < duration and alive:
    time.sleep(interval)
    for i in list(alive):
        try:
            socks[i].sendall(b"a")
        except OSError:
            alive.remove(i); closed_at[i] = round(time.monotonic() - t0, 2)
print(json.dumps({"alive": len(alive), "closed": len(closed_at),
                  "first_closed_at": min(closed_at.values(), default=None)}), flush=True)
for s in socks: s.close()
"""

NEVER_READS_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
held = []
while True:
    c, _ = s.accept(); held.append(c)   # never reads, never closes
"""

CONFIG = """
max_connections_per_peer: 40
header_timeout: 3
"""


@pytest.fixture(scope="module")
def env():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    c = Cluster("pr", 221)
    try:
        e = Env(c)
        e.rec = e.recorder(e.payments, 9000)
        e.payments.popen([PY, "-c", ECHO, "9500"])
        e.payments.wait_listening(9500)
        e.payments.serve_blast(9600)
        e.payments.popen([PY, "-c", NEVER_READS_SERVER, "9700"])
        e.payments.wait_listening(9700)
        (e.tmp / "sidecar.yaml").write_text(CONFIG)
        yield e
        for sc in e.sidecars:
            sc.stop()
        assert_no_pan(sidecar_outputs(e.tmp))
    finally:
        c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Baseline:
    """What the sidecar looks like at rest; ``check`` waits until it is back there."""

    def __init__(self, sc, env, policy: bool = False) -> None:
        self.sc = sc
        pid = sc.pid()
        # warm-up traffic through every lazy path (admin server, event file, the DLP scan threads)
        assert sc.ready()
        if policy:  # only checkout's HTTP to /v1/charge is allowed in
            for _ in range(4):
                r = env.checkout2.run(["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X",
                                       "POST", "-d", "a=1", f"http://{env.payments.ip}:9000/v1/charge"], check=False)
                assert r.stdout == "200", r
        else:
            assert env.checkout2.blast(env.payments.ip, port=9600, client_bytes=4 << 20, server_bytes=4 << 20,
                                       connections=4)["failed"] == 0
        wait_until(lambda: len(sc.events("flow")) >= 4 and metric(sc, *ACTIVE_IN) == 0, 10)
        self.fds, self.rss, self.threads = fd_count(pid), rss_kib(pid), threads(pid)
        self.flows = len(sc.events("flow"))

    def check(self, new_flows: int, rss_slack_mib: int = 48, timeout: float = 30) -> dict:
        sc, pid = self.sc, self.sc.pid()
        assert sc.proc.poll() is None, f"sidecar died: {sc.stderr()[-2000:]}"
        wait_until(lambda: metric(sc, *ACTIVE_IN) == 0, timeout, what="no open connections left")
        wait_until(lambda: fd_count(pid) <= self.fds, timeout,
                   what=f"fds back to {self.fds} (now {fd_count(pid)}: {sorted(os.listdir(f'/proc/{pid}/fd'))[:20]})")
        wait_until(lambda: threads(pid) <= self.threads, timeout, what="threads back to baseline")
        try:
            flows = wait_until(lambda: (lambda f: f if len(f) >= self.flows + new_flows else None)(
                sc.events("flow")), timeout, what=f"{new_flows} new flow records")
        except TimeoutError as exc:
            body = sc.http("/metrics")[1]
            counters = [ln for ln in body.splitlines() if ln.startswith(("palisade_relay_errors", "palisade_connections",
                                                                         "palisade_flows", "palisade_spliced"))]
            raise AssertionError(f"{exc}: {len(sc.events('flow')) - self.flows} new records; {counters}; "
                                 f"{sc.stderr()[-1500:]}") from exc
        new = flows[self.flows:]
        assert len(new) == new_flows, f"{len(new)} flow records for {new_flows} flows"
        ids = [f["flow_id"] for f in flows]
        assert len(ids) == len(set(ids)), "a flow was recorded twice"
        rss = rss_kib(pid)
        assert rss - self.rss < rss_slack_mib * 1024, f"RSS {self.rss} -> {rss} KiB"
        assert sc.ready()
        return {"fds": fd_count(pid), "rss_kib": rss, "rss_base_kib": self.rss, "flows": len(new)}


def _l4_sidecar(env, *extra):
    """No policy: learn mode, L7 identification and DLP (alert) still on - the default data path."""
    return env.sidecar(*extra, policy=False)


def test_slowloris_is_capped_per_peer_and_others_are_served(env):
    sc = env.sidecar("--config", str(env.tmp / "sidecar.yaml"))
    base = Baseline(sc, env, policy=True)
    n = 100
    base.flows = len(sc.events("flow"))
    slow = env.checkout.popen([PY, "-c", SLOWLORIS, env.payments.ip, "9000", str(n), "0.5", "4"])
    assert json.loads(slow.stdout.readline())["opened"] == n
    wait_until(lambda: metric(sc, "palisade_peer_limited_total") >= n - 40, 15, what="per-peer limit hit")
    assert metric(sc, *ACTIVE_IN) <= 40
    # another client is served while the slow ones hold their slots
    r = env.checkout2.run(["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                           "-d", "a=1", f"http://{env.payments.ip}:9000/v1/charge"], check=False)
    assert r.stdout == "200", r
    out, _ = slow.communicate(timeout=60)
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["closed"] >= n - 40, summary  # the refused ones saw a reset
    res = base.check(new_flows=n + 1)
    limited = sc.flows(src_ip=env.checkout.ip, rule="connection-limit")
    assert len(limited) == n - 40 and all(f["verdict"] == "deny" for f in limited)
    print("slowloris", summary, res)


def test_silent_partial_head_is_cut_at_the_header_deadline(env):
    sc = env.sidecar("--config", str(env.tmp / "sidecar.yaml"))
    base = Baseline(sc, env, policy=True)
    t0 = time.monotonic()
    res = env.client(env.checkout, env.payments.ip, 9000,
                     [{"send": "GET /v1/charge HTTP/1.1\r\nHost: payments\r\nX-Partial: "}], read=15)
    assert res["reset"] or res["closed"], res
    assert time.monotonic() - t0 < 12
    flow = sc.wait_event(lambda e: e.get("event_type") == "flow" and e.get("src_port") == res["port"])
    assert flow["close_reason"] == "header-timeout"
    base.check(new_flows=1)


def test_trickling_head_is_cut_at_the_header_deadline(env):
    sc = env.sidecar("--config", str(env.tmp / "sidecar.yaml"))
    slow = env.checkout.popen([PY, "-c", SLOWLORIS, env.payments.ip, "9000", "1", "0.5", "9"])
    out, _ = slow.communicate(timeout=60)
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["closed"] == 1 and summary["first_closed_at"] < 6, summary  # header_timeout is 3 s
    sc.wait_event(lambda e: e.get("event_type") == "flow" and e.get("close_reason") == "header-timeout")


def _procs(sc) -> list[int]:
    """The sidecar and its worker processes."""
    pids = [sc.pid()]
    for task in os.listdir(f"/proc/{sc.pid()}/task"):
        with open(f"/proc/{sc.pid()}/task/{task}/children") as fh:
            pids += [int(p) for p in fh.read().split()]
    return pids


def test_ten_thousand_concurrent_connections(env):
    # 10,000 relayed connections are 20,000 sockets; this machine's hard RLIMIT_NOFILE is 20,000 per
    # process, so two workers share the listeners (SO_REUSEPORT), as --workers does in a pod
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 10_500:
        pytest.skip("RLIMIT_NOFILE hard limit below 10,500")
    sc = _l4_sidecar(env, "--workers", "2")
    wait_until(lambda: len(_procs(sc)) == 2, 10, what="2 workers")
    pids = _procs(sc)
    fds0 = {p: fd_count(p) for p in pids}
    rss0 = sum(rss_kib(p) for p in pids)
    flows0 = len(sc.events("flow"))
    n = 10_000
    p = env.checkout.popen([PY, "-c", MANY, env.payments.ip, "9500", str(n)], stdin=subprocess.PIPE)
    line = json.loads(p.stdout.readline())
    assert line["ready"] == n and line["ok"] == n, line
    # all of them are open through the sidecar at once: 2 sockets per connection across the workers
    peak_fds = sum(fd_count(q) for q in pids)
    assert peak_fds - sum(fds0.values()) >= 2 * n
    peak_rss = sum(rss_kib(q) for q in pids)
    p.stdin.write(b"go\n")
    p.stdin.flush()
    assert json.loads(p.stdout.readline())["closed"] == n
    wait_until(lambda: all(fd_count(q) <= fds0[q] for q in pids), 60, what="fds back to baseline")
    flows = wait_until(lambda: (lambda f: f if len(f) >= flows0 + n else None)(sc.events("flow")), 60)
    assert len(flows) == flows0 + n
    # one record per flow, flow ids unique across the two workers
    assert len({f["flow_id"] for f in flows}) == len(flows)
    after = sum(rss_kib(q) for q in pids)
    assert after - rss0 < 200 * 1024, f"RSS {rss0} -> peak {peak_rss} -> {after} KiB"
    assert sc.ready()
    print(f"10k: fds {sum(fds0.values())} -> {peak_fds}; RSS {rss0} -> peak {peak_rss} -> {after} KiB")


def test_flow_ids_are_unique_across_workers(env):
    sc = _l4_sidecar(env, "--workers", "2")
    wait_until(lambda: len(_procs(sc)) == 2, 10, what="2 workers")
    r = env.checkout.blast(env.payments.ip, port=9600, client_bytes=1000, server_bytes=1000,
                           connections=200, concurrency=200)
    assert r["failed"] == 0
    flows = sc.wait_flows(200, dest_port=9600)
    assert len({f.get("worker") for f in flows}) == 2, "both workers took connections"
    ids = [f["flow_id"] for f in flows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate flow ids"


def test_client_that_never_reads(env):
    sc = _l4_sidecar(env)
    base = Baseline(sc, env)
    code = f"""
import socket, struct, time, json
s = socket.create_connection(("{env.payments.ip}", 9600))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.sendall(struct.pack("!QQQ", 0, 500 * 1024 * 1024, 5)); s.shutdown(socket.SHUT_WR)
print("connected", flush=True)
input()
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
"""
    p = env.checkout.popen([PY, "-c", code], stdin=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"connected"
    wait_until(lambda: metric(sc, *ACTIVE_IN) == 1, 10)
    peak = max(_sample_rss(sc, 3.0))
    assert peak - base.rss < 64 * 1024, f"RSS grew {peak - base.rss} KiB behind a client that never reads"
    p.stdin.write(b"\n")
    p.stdin.flush()
    p.wait(10)
    base.check(new_flows=1)
    flow = sc.flows(dest_port=9600)[-1]
    assert flow["close_reason"] == "reset" and flow["flow"]["bytes_toclient"] < 500 * 1024 * 1024


NEVER_READ_CLIENT = """
import socket, struct, time
s = socket.create_connection(("{ip}", 9700))
s.setblocking(False)
sent = 0; block = b"x" * 65536; t0 = time.monotonic()
while time.monotonic() - t0 < 3:
    try:
        sent += s.send(block)
    except BlockingIOError:
        time.sleep(0.01)
print(sent, flush=True)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
"""


def test_server_that_never_reads_stops_the_sender_and_memory_stays_flat(env):
    sc = _l4_sidecar(env)
    base = Baseline(sc, env)
    p = env.checkout.popen([PY, "-c", NEVER_READ_CLIENT.format(ip=env.payments.ip)])
    samples = _sample_rss(sc, 2.5)
    sent = int(p.stdout.readline())
    p.wait(10)
    assert sent < 64 * 1024 * 1024, "backpressure must stop the sender"
    assert max(samples) - base.rss < 64 * 1024
    assert sc.ready()


def test_client_giving_up_on_a_server_that_never_reads_frees_the_flow(env):
    sc = _l4_sidecar(env)
    base = Baseline(sc, env)
    p = env.checkout.popen([PY, "-c", NEVER_READ_CLIENT.format(ip=env.payments.ip)])
    sent = int(p.stdout.readline())
    p.wait(10)
    base.check(new_flows=1, timeout=15)
    flow = sc.flows(dest_port=9700)[-1]
    assert flow["close_reason"] == "reset" and flow["flow"]["bytes_toserver"] <= sent


RESETS = r"""
import asyncio, json, random, socket, struct, sys
host, port, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
async def one(i):
    r, w = await asyncio.open_connection(host, port)
    cut = rnd.random() < 0.5
    w.write(struct.pack("!QQQ", 200_000, 200_000, 1000 + i)); await w.drain()
    w.write(b"y" * rnd.randint(0, 150_000)); await w.drain()
    if cut:
        await r.read(rnd.randint(1, 100_000))
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
        return "reset"
    w.close()
    return "closed"
async def main():
    res = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    print(json.dumps({"reset": sum(r == "reset" for r in res), "n": len(res),
                      "errors": sorted({repr(r)[:120] for r in res if isinstance(r, BaseException)})}))
asyncio.run(main())
"""


def test_random_resets(env):
    sc = _l4_sidecar(env)
    base = Baseline(sc, env)
    r = env.checkout.run([PY, "-c", RESETS, env.payments.ip, "9600", "300", "11"], timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 300 and 100 < out["reset"] < 200, out
    try:
        base.check(new_flows=300)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the client saw {out}") from exc
    flows = sc.flows(dest_port=9600)[-300:]
    assert sum(f["close_reason"] == "reset" for f in flows) >= out["reset"]
    # and the data path is intact afterwards, byte for byte
    assert env.checkout.blast(env.payments.ip, port=9600, client_bytes=5_000_000, server_bytes=5_000_000,
                              connections=10)["failed"] == 0


def test_upstream_disappears_mid_stream(env):
    sc = _l4_sidecar(env)
    base = Baseline(sc, env)
    victim = env.payments.serve_blast(9601)
    p = env.checkout.popen([PY, str(REPO / "tests/tools/blast.py"), "client", "--host", env.payments.ip,
                            "--port", "9601", "--server-bytes", str(2 << 30), "--connections", "4",
                            "--concurrency", "4"], cwd=str(REPO))
    wait_until(lambda: metric(sc, *ACTIVE_IN) == 4, 10, what="4 transfers running")
    wait_until(lambda: metric(sc, "palisade_bytes_total", '{direction="toclient",flow_direction="inbound"}')
               > 0 or _relayed(sc) > 64 << 20, 10, what="bytes flowing")
    os.killpg(victim.proc.pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=60)
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert res["failed"] == 4, res  # every client learned its transfer broke (reset/EOF short)
    base.check(new_flows=4)
    flows = sc.flows(dest_port=9601)
    assert len(flows) == 4 and all(f["close_reason"] in ("reset", "eof") for f in flows), [
        (f["close_reason"], f["flow"]) for f in flows]
    assert all(f["flow"]["bytes_toclient"] < 2 << 30 for f in flows)
    assert sum(f["flow"]["bytes_toclient"] for f in flows) > 0


def _relayed(sc) -> int:
    """Bytes the sidecar has written (its /proc io counter; metrics count at flow end)."""
    with open(f"/proc/{sc.pid()}/io") as fh:
        return int(next(ln for ln in fh if ln.startswith("wchar:")).split()[1])


def _sample_rss(sc, seconds: float) -> list[int]:
    out, t0 = [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        out.append(rss_kib(sc.pid()))
        time.sleep(0.1)
    return out
