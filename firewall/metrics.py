"""Prometheus metrics and the admin HTTP endpoint (/healthz, /readyz, /metrics).

The admin server is a deliberately tiny asyncio HTTP/1.0 responder on the admin
port (15020, never redirected): it must keep answering when the data path is
saturated, and it must not pull a web framework into the sidecar.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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


class AdminServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self.host, self.port, self._ready = host, port, ready
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self._server:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while True:  # drain headers, bounded by the timeout
                h = await asyncio.wait_for(reader.readline(), 5)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest()
            elif path.startswith("/healthz"):
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path.startswith("/readyz"):
                ok = self._ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
