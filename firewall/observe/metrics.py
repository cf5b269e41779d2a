"""Prometheus metrics and the admin HTTP endpoint (/healthz, /readyz, /metrics).

The admin server is a deliberately tiny asyncio HTTP/1.0 responder on the admin
port (15020, never redirected): it must keep answering when the data path is
saturated, and it must not pull a web framework into the sidecar.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

CONNECTIONS_ACTIVE = Gauge("palisade_connections_active", "Open relayed connections", ["direction"])
CONNECTIONS_TOTAL = Counter("palisade_connections_total", "Connections by direction and verdict",
                            ["direction", "verdict"])
BYTES_TOTAL = Counter("palisade_bytes_total", "Relayed bytes", ["direction", "flow_direction"])
RELAY_ERRORS = Counter("palisade_relay_errors_total", "Relay errors by kind", ["kind"])
FLOW_DURATION = Histogram("palisade_flow_duration_seconds", "Flow duration",
                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600))
ALERTS_TOTAL = Counter("palisade_alerts_total", "Alerts by category and action", ["category", "action"])
DLP_FINDINGS = Counter("palisade_dlp_findings_total", "DLP findings", ["rule", "action"])
POLICY_RELOADS = Counter("palisade_policy_reloads_total", "Policy reloads", ["result"])
DNS_QUERIES = Counter("palisade_dns_queries_total", "DNS queries relayed", ["verdict"])
PEER_LIMITED = Counter("palisade_peer_limited_total", "Connections refused by the per-peer limit")
EVENT_LOOP_LAG = Gauge("palisade_event_loop_lag_seconds", "Event loop scheduling lag")
DLP_OFFLOADED = Counter("palisade_dlp_offloaded_chunks_total", "Chunks scanned on the DLP worker thread")
SPLICED = Counter("palisade_spliced_flows_total", "Flows handed to the zero-copy splice relay")
QUARANTINED = Gauge("palisade_quarantined", "1 while the pod is quarantined")


@dataclass(frozen=True)
class AdminLimits:
    """Bounds of the admin port: it is reachable by anything that can route to the pod.

    The port is deliberately outside the policy (the kubelet's probes and Prometheus must reach it
    in protect mode and under quarantine), so these limits are what protects the sidecar's event
    loop - which is also the data path's - from a peer that opens connections and never finishes a
    request (slowloris) or sends huge ones.
    """

    max_connections: int = 64          # open connections; loopback+node have their own budget
    max_per_source: int = 8            # of which from one address
    request_timeout: float = 5.0       # whole request (line + headers), not per line
    max_request_line: int = 2048
    max_headers: int = 32
    max_request_bytes: int = 8192      # request line + headers together
    allow: tuple[str, ...] = ()        # CIDRs (or "node") allowed besides loopback; empty: everyone


ADMIN_REJECTED = Counter("palisade_admin_rejected", "Admin port connections refused or cut",
                         ["reason"])


class _BadRequest(Exception):
    """A request the admin port answers 400 (one line, never a traceback)."""


def _networks(allow: tuple[str, ...], node_ip: str | None) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    for item in allow:
        if item == "node":
            try:
                if node_ip:
                    nets.append(ipaddress.ip_network(node_ip))
            except ValueError:  # a bad HOST_IP must not stop the sidecar: the node is just not trusted
                pass
            continue
        nets.append(ipaddress.ip_network(item, strict=False))
    return nets


def _peer_ip(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    return ip[7:] if ip.startswith("::ffff:") else ip


class AdminServer:
    """/healthz, /readyz, /metrics under :class:`AdminLimits`.

    Loopback and the node address (the kubelet) are "trusted": they have their own connection
    budget, so a flood from another pod cannot make the liveness probe fail and the pod restart.
    With ``limits.allow`` set, any other source is closed at accept without reading a byte.
    """

    def __init__(self, host: str, port: int, ready: Callable[[], bool], limits: AdminLimits | None = None,
                 node_ip: str | None = None) -> None:
        self.host, self.port, self._ready = host, port, ready
        self.limits = limits or AdminLimits()
        self._nets = _networks(self.limits.allow, node_ip)
        self._trusted_nets = _networks(("node",), node_ip)
        self._server: asyncio.base_events.Server | None = None
        self._per_source: dict[str, int] = {}
        self._open = {True: 0, False: 0}  # trusted?, count

    async def start(self) -> None:
        # The stream limit bounds what readline() buffers; a longer line raises instead of growing.
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True,
                                                  limit=self.limits.max_request_line + 2)

    async def stop(self) -> None:
        if self._server:
            self._server.close()

    def _admit(self, ip: str) -> tuple[bool, str | None]:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False, "bad-peer"
        trusted = any(addr in n for n in self._trusted_nets)
        if self.limits.allow and not any(addr in n for n in self._nets):
            return trusted, "not-allowed"
        if self._open[trusted] >= self.limits.max_connections:
            return trusted, "connection-cap"
        if not trusted and self._per_source.get(ip, 0) >= self.limits.max_per_source:
            return trusted, "per-source-cap"
        return trusted, None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = _peer_ip(writer)
        trusted, refused = self._admit(ip)
        if refused:
            ADMIN_REJECTED.labels(refused).inc()
            writer.transport.abort()  # no reply: costs the attacker a round trip, us nothing
            return
        self._open[trusted] += 1
        if not trusted:
            self._per_source[ip] = self._per_source.get(ip, 0) + 1
        try:
            try:
                async with asyncio.timeout(self.limits.request_timeout):
                    path = await self._read_request(reader)
                    status, ctype, body = self._route(path)
                    await self._reply(writer, status, ctype, body)
            except _BadRequest as exc:
                ADMIN_REJECTED.labels("bad-request").inc()
                await asyncio.wait_for(self._reply(writer, "400 Bad Request", "text/plain",
                                                   f"bad request: {exc}\n".encode()), 1.0)
        except TimeoutError:
            ADMIN_REJECTED.labels("deadline").inc()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._open[trusted] -= 1
            if not trusted:
                left = self._per_source.get(ip, 1) - 1
                if left > 0:
                    self._per_source[ip] = left
                else:
                    self._per_source.pop(ip, None)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> str:
        lim = self.limits
        line = await self._line(reader)
        total = len(line)
        headers = 0
        while True:
            h = await self._line(reader)
            if h in (b"\r\n", b"\n", b""):
                break
            headers += 1
            total += len(h)
            if headers > lim.max_headers:
                raise _BadRequest(f"more than {lim.max_headers} header lines")
            if total > lim.max_request_bytes:
                raise _BadRequest(f"request larger than {lim.max_request_bytes} bytes")
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD") or not parts[2].startswith("HTTP/"):
            raise _BadRequest("expected 'GET <path> HTTP/1.x'")
        return parts[1]

    async def _line(self, reader: asyncio.StreamReader) -> bytes:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(f"line longer than {self.limits.max_request_line} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) > self.limits.max_request_line:
                raise _BadRequest(f"line longer than {self.limits.max_request_line} bytes") from None
            return exc.partial  # EOF: end of the request
        if len(line) > self.limits.max_request_line + 2:
            raise _BadRequest(f"line longer than {self.limits.max_request_line} bytes")
        return line

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path.startswith("/metrics"):
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        if path.startswith("/healthz"):
            return "200 OK", "text/plain", b"ok\n"
        if path.startswith("/readyz"):
            ok = self._ready()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", \
                b"ready\n" if ok else b"not ready\n"
        return "404 Not Found", "text/plain", b"not found\n"

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes) -> None:
        writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
