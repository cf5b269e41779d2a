"""``python -m firewall segtest``: active segmentation test (PCI DSS 11.4.5).

Policy files say what *should* be isolated; this proves what *is*: from each
source (an out-of-scope namespace, in Kubernetes a short-lived pod there, see
deploy/segtest-job.yaml) it tries TCP connections (and UDP probes and ICMP echo where
asked: ``udp: [ports]``, ``icmp: true``) to every CDE workload in the plan and records
what happened, with a summary per protocol (``summary.by_proto``).

Result classes, per probe:

* ``reachable`` - the TCP handshake completed and the connection stayed up for
  the hold window (or the server sent data); for UDP, an answer came back.
* ``refused`` - actively rejected: RST, ICMP unreachable/prohibited, or the
  connection was closed right after the handshake without data.  The last
  case matters: a transparent proxy sidecar completes the handshake before it
  decides, then closes a denied flow, so "handshake succeeded" alone would
  report every firewalled port as open.
* ``timeout`` - nothing came back (dropped).  For UDP this is "open or
  filtered" and is not counted as reachable.  For ICMP, an echo reply is
  ``reachable``, an ICMP error or EPERM ``refused``, silence ``timeout``.
* ``error`` - the probe could not be made (name did not resolve, bad address).

The run fails (exit 1, ``passed: false``) when any source whose scope is
``out-of-scope`` reached a target whose scope is ``cde``; connected sources
reaching the CDE are reported but expected.  A bad plan exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from firewall import SCOPES

SCHEMA = "palisade.dev/segtest/v1"
DEFAULT_TIMEOUT = 2.0
DEFAULT_HOLD = 0.3
DEFAULT_CONCURRENCY = 64

# errnos that mean "something on the path actively said no"
_REFUSED_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM,
                   errno.ECONNRESET}


class PlanError(Exception):
    """Bad plan file; the message names the file and the field path."""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    address: str
    ports: tuple[int, ...]
    scope: str = "cde"
    udp: tuple[int, ...] = ()
    icmp: bool = False


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    scope: str
    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    path: str
    sha256: str
    sources: tuple[Source, ...]


# --------------------------------------------------------------------------- plan

_SOURCE_KEYS = {"source", "scope", "targets"}
_TARGET_KEYS = {"name", "address", "ports", "scope", "udp", "icmp"}


def _ports(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PlanError(f"{where}: must be a list of port numbers")
    out = []
    for i, p in enumerate(value):
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise PlanError(f"{where}[{i}]: port must be an integer 1-65535, got {p!r}")
        out.append(p)
    return tuple(out)


def _scope(value: Any, where: str, default: str) -> str:
    if value is None:
        return default
    if value not in SCOPES:
        raise PlanError(f"{where}: scope must be one of {', '.join(SCOPES)}, got {value!r}")
    return str(value)


def parse_plan(data: Any, path: str = "plan") -> tuple[Source, ...]:
    """Validate a plan document: a list of {source, scope?, targets: [{name, address, ports, scope?, udp?}]}."""
    if isinstance(data, dict) and set(data) == {"sources"}:
        data = data["sources"]
    if not isinstance(data, list) or not data:
        raise PlanError(f"{path}: a plan is a non-empty list of {{source, targets}} entries")
    sources = []
    seen = set()
    for i, entry in enumerate(data):
        where = f"{path}: [{i}]"
        if not isinstance(entry, dict):
            raise PlanError(f"{where}: expected a mapping with 'source' and 'targets'")
        unknown = set(entry) - _SOURCE_KEYS
        if unknown:
            raise PlanError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        name = entry.get("source")
        if not isinstance(name, str) or not name:
            raise PlanError(f"{where}.source: required, a name (e.g. the namespace)")
        if name in seen:
            raise PlanError(f"{where}.source: duplicate source {name!r}")
        seen.add(name)
        targets_raw = entry.get("targets")
        if not isinstance(targets_raw, list) or not targets_raw:
            raise PlanError(f"{where}.targets: required, a non-empty list")
        targets = []
        for j, t in enumerate(targets_raw):
            tw = f"{where}.targets[{j}]"
            if not isinstance(t, dict):
                raise PlanError(f"{tw}: expected a mapping with name, address, ports")
            unknown = set(t) - _TARGET_KEYS
            if unknown:
                raise PlanError(f"{tw}: unknown field {sorted(unknown)[0]!r}")
            for key in ("name", "address"):
                if not isinstance(t.get(key), str) or not t[key]:
                    raise PlanError(f"{tw}.{key}: required, a string")
            ports = _ports(t.get("ports"), f"{tw}.ports")
            udp = _ports(t.get("udp"), f"{tw}.udp")
            icmp = t.get("icmp", False)
            if not isinstance(icmp, bool):
                raise PlanError(f"{tw}.icmp: must be true or false")
            if not ports and not udp and not icmp:
                raise PlanError(f"{tw}: needs 'ports' (TCP), 'udp' or 'icmp: true'")
            targets.append(Target(t["name"], t["address"], ports, _scope(t.get("scope"), f"{tw}.scope", "cde"),
                                  udp, icmp))
        sources.append(Source(name, _scope(entry.get("scope"), f"{where}.scope", "out-of-scope"), tuple(targets)))
    return tuple(sources)


def load_plan(path: str) -> Plan:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read plan: {exc.strerror}") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PlanError(f"{path}: plan is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise PlanError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', None) or 'parse error'}") from None
    return Plan(path, hashlib.sha256(raw).hexdigest(), parse_plan(data, path))


# --------------------------------------------------------------------------- probes


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)


async def probe_tcp(address: str, port: int, timeout: float, hold: float) -> tuple[str, float | None, str]:
    """One TCP connection attempt -> (result, rtt_ms, detail); never raises."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except TimeoutError:
        return "timeout", None, f"no answer within {timeout:g}s"
    except socket.gaierror as exc:
        return "error", None, f"cannot resolve {address}: {exc.strerror}"
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in _REFUSED_ERRNOS or isinstance(exc, ConnectionRefusedError):
            return "refused", _ms(t0), why
        return "error", _ms(t0), why
    except ValueError as exc:
        return "error", None, str(exc)
    rtt = _ms(t0)
    try:
        data = await asyncio.wait_for(reader.read(1), hold)
    except TimeoutError:
        result, detail = "reachable", f"connected; held open {hold:g}s"
    except OSError as exc:
        result, detail = "refused", f"reset right after the handshake ({exc.strerror or exc})"
    else:
        if data:
            result, detail = "reachable", "connected; the server sent data"
        else:
            result, detail = "refused", "closed right after the handshake without data (firewall proxy)"
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, TimeoutError):
        pass
    return result, rtt, detail


def _udp_payload(port: int) -> bytes:
    if port == 53:  # a DNS query for the root NS: any resolver answers it
        return struct.pack("!HHHHHH", 0x5053, 0x0100, 1, 0, 0, 0) + b"\x00" + struct.pack("!HH", 2, 1)
    return b"palisade-segtest\n"


class _UdpProbe(asyncio.DatagramProtocol):
    def __init__(self, done: asyncio.Future[tuple[str, str]]) -> None:
        self.done = done

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.done.done():
            self.done.set_result(("reachable", f"answer of {len(data)} bytes"))

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            if isinstance(exc, OSError) and exc.errno in _REFUSED_ERRNOS:
                self.done.set_result(("refused", exc.strerror or "ICMP unreachable"))
            else:
                self.done.set_result(("error", str(exc)))


async def probe_udp(address: str, port: int, timeout: float) -> tuple[str, float | None, str]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[str, str]] = loop.create_future()
    t0 = time.monotonic()
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_datagram_endpoint(lambda: _UdpProbe(done), remote_addr=(address, port)), timeout)
    except socket.gaierror as exc:
        return "error", None, f"cannot resolve {address}: {exc.strerror}"
    except (OSError, TimeoutError) as exc:
        return "error", None, str(exc) or "cannot open a UDP socket"
    try:
        transport.sendto(_udp_payload(port))
        result, detail = await asyncio.wait_for(done, timeout)
        return result, _ms(t0), detail
    except TimeoutError:
        return "timeout", None, f"no answer within {timeout:g}s (open or filtered)"
    finally:
        transport.close()


def _icmp_echo(address: str, timeout: float) -> tuple[str, float | None, str]:
    """One ICMP/ICMPv6 echo: an unprivileged ping socket where the kernel allows it, else raw."""
    try:
        info = socket.getaddrinfo(address, None)[0]
    except socket.gaierror as exc:
        return "error", None, f"cannot resolve {address}: {exc.strerror}"
    family, addr = info[0], info[4]
    v6 = family == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    req, rep = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    payload = b"palisade-segtest"
    hdr = struct.pack("!BBHHH", req, 0, 0, ident, 1)
    if not v6:  # the kernel computes the ICMPv6 checksum, not the ICMPv4 one of a raw socket
        total = sum(struct.unpack(f"!{len(hdr + payload) // 2}H", hdr + payload))
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        hdr = struct.pack("!BBHHH", req, 0, ~total & 0xFFFF, ident, 1)
    sock = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            sock = socket.socket(family, kind, proto)
            break
        except OSError:
            continue
    if sock is None:
        return "error", None, "no ICMP socket (needs net.ipv4.ping_group_range or CAP_NET_RAW)"
    t0 = time.monotonic()
    try:
        sock.settimeout(timeout)
        sock.sendto(hdr + payload, addr)
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                return "timeout", None, f"no echo reply within {timeout:g}s"
            sock.settimeout(left)
            data, _ = sock.recvfrom(2048)
            if sock.type == socket.SOCK_RAW and not v6:
                data = data[(data[0] & 0x0F) * 4:]
            if data and data[0] == rep:
                return "reachable", _ms(t0), "echo reply"
            if data and data[0] in ((1, 3) if v6 else (3, 11)):
                return "refused", _ms(t0), f"ICMP error type {data[0]}"
    except TimeoutError:
        return "timeout", None, f"no echo reply within {timeout:g}s"
    except OSError as exc:
        if exc.errno in _REFUSED_ERRNOS:
            return "refused", _ms(t0), os.strerror(exc.errno or 0)
        return "error", None, str(exc)
    finally:
        sock.close()


async def probe_icmp(address: str, timeout: float) -> tuple[str, float | None, str]:
    return await asyncio.to_thread(_icmp_echo, address, timeout)


async def run_probes(sources: list[Source], timeout: float, concurrency: int,
                     hold: float = DEFAULT_HOLD) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(src: Source, tgt: Target, port: int, proto: str) -> dict[str, Any]:
        async with sem:
            stamp = _now()
            if proto == "TCP":
                result, rtt, detail = await probe_tcp(tgt.address, port, timeout, hold)
            elif proto == "ICMP":
                result, rtt, detail = await probe_icmp(tgt.address, timeout)
            else:
                result, rtt, detail = await probe_udp(tgt.address, port, timeout)
        return {"source": src.name, "source_scope": src.scope, "target": tgt.name, "target_scope": tgt.scope,
                "address": tgt.address, "port": port, "proto": proto, "result": result, "rtt_ms": rtt,
                "detail": detail, "timestamp": stamp,
                "violation": result == "reachable" and src.scope == "out-of-scope" and tgt.scope == "cde"}

    jobs = [one(s, t, p, "TCP") for s in sources for t in s.targets for p in t.ports]
    jobs += [one(s, t, p, "UDP") for s in sources for t in s.targets for p in t.udp]
    jobs += [one(s, t, 0, "ICMP") for s in sources for t in s.targets if t.icmp]
    return list(await asyncio.gather(*jobs))


def run_plan(plan: Plan, source: str | None = None, timeout: float = DEFAULT_TIMEOUT,
             concurrency: int = DEFAULT_CONCURRENCY, hold: float = DEFAULT_HOLD) -> dict[str, Any]:
    """Run the plan's probes (all sources, or the one named) and return the results document."""
    sources = list(plan.sources)
    if source is not None:
        sources = [s for s in sources if s.name == source]
        if not sources:
            known = ", ".join(s.name for s in plan.sources)
            raise PlanError(f"{plan.path}: no plan entry for source {source!r} (known: {known})")
    started = _now()
    probes = asyncio.run(run_probes(sources, timeout, concurrency, hold))
    finished = _now()
    summary: dict[str, int] = {"probes": len(probes), "reachable": 0, "refused": 0, "timeout": 0, "error": 0}
    for p in probes:
        summary[p["result"]] += 1
    summary["violations"] = sum(1 for p in probes if p["violation"])
    by_proto: dict[str, dict[str, int]] = {}
    for p in probes:
        b = by_proto.setdefault(p["proto"], {"probes": 0, "reachable": 0, "refused": 0, "timeout": 0,
                                             "error": 0, "violations": 0})
        b["probes"] += 1
        b[p["result"]] += 1
        b["violations"] += int(p["violation"])
    summary["by_proto"] = by_proto  # type: ignore[assignment]
    return {"schema": SCHEMA, "plan": plan.path, "plan_sha256": plan.sha256, "host": socket.gethostname(),
            "sources": [s.name for s in sources], "started": started, "finished": finished,
            "timeout_s": timeout, "hold_s": hold, "probes": probes, "summary": summary,
            "passed": summary["violations"] == 0}


# --------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segtest", help="active segmentation test: prove out-of-scope sources cannot reach the CDE",
        description="Try TCP connections (and UDP probes) from this host to every target in the plan and record "
                    "reachable/refused/timeout. Exit 0 when isolated, 1 when an out-of-scope source reached a CDE "
                    "target, 2 on a bad plan.")
    p.add_argument("--plan", required=True, metavar="FILE", help="plan YAML: [{source, targets: [...]}]")
    p.add_argument("-o", "--output", required=True, metavar="RESULTS.json", help="results file ('-' = stdout)")
    p.add_argument("--source", metavar="NAME", help="run only this plan entry (the source this host represents)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"per-probe connect/answer timeout (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--hold", type=float, default=DEFAULT_HOLD, metavar="S",
                   help="how long an accepted TCP connection must stay open to count as reachable "
                        f"(default {DEFAULT_HOLD:g})")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"probes in flight (default {DEFAULT_CONCURRENCY})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0 or args.hold < 0 or args.concurrency < 1:
        print("segtest: --timeout must be > 0, --hold >= 0 and --concurrency >= 1", file=sys.stderr)
        return 2
    try:
        plan = load_plan(args.plan)
        doc = run_plan(plan, args.source, args.timeout, args.concurrency, args.hold)
    except PlanError as exc:
        print(f"segtest: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(doc, indent=1) + "\n"
    if args.output == "-":
        sys.stdout.write(text)  # JSON only: in a Job, `kubectl logs` is the results file
        sys.stdout.flush()
    else:
        try:
            tmp = args.output + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, args.output)
        except OSError as exc:
            print(f"segtest: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 1
    if args.output == "-":
        return 0 if doc["passed"] else 1
    s = doc["summary"]
    out = sys.stdout
    print(f"segtest: {s['probes']} probes: {s['reachable']} reachable, {s['refused']} refused, "
          f"{s['timeout']} timed out, {s['error']} errors", file=out)
    for p in doc["probes"]:
        if p["violation"]:
            where = p["address"] if p["proto"] == "ICMP" else f"{p['address']}:{p['port']}"
            print(f"  FAIL {p['source']} -> {p['target']} {where}/{p['proto']} reachable", file=out)
    for proto, b in sorted(s["by_proto"].items()):
        print(f"  {proto}: {b['probes']} probes, {b['reachable']} reachable, {b['refused']} refused, "
              f"{b['timeout']} timed out", file=out)
    print("segtest: PASSED: no out-of-scope source reached the CDE" if doc["passed"]
          else f"segtest: FAILED: {s['violations']} out-of-scope probes reached the CDE", file=out)
    return 0 if doc["passed"] else 1
