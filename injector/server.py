"""The HTTPS webhook server: aiohttp on uvloop, a thin shell around ``review.handle``.

Everything the API server can throw at it ends in an HTTP answer, never a dead
process: a body that is not an AdmissionReview gets 400 with one line, a wrong
Content-Type 415, an oversized body 413, a bug in our own code 500 (the API
server then applies the webhook's ``failurePolicy``, which is the documented
place for that trade-off).

Certificate rotation: the cert/key files are re-read every ``reload_interval``
seconds; when their bytes change, a fresh ``SSLContext`` is built and, only if
the pair loads, swapped in through the SNI callback for new handshakes (existing
keep-alive connections finish on the old one). A half-written rotation (new
cert, old key) fails to load and is retried on the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from injector import psa
from injector import review as reviews
from injector.certs import not_after
from injector.config import InjectorConfig
from injector.guard import parse_grants

log = logging.getLogger("palisade.injector")

MAX_BODY = 8 * 1024 * 1024  # object + oldObject of the largest pod the API server accepts, with margin


class ServeError(RuntimeError):
    """The server cannot start. ``exit_code`` 2: bad input (certificate files); 1: runtime (port in use)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _load_pair(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """``load_cert_chain`` only takes paths. Feed it anonymous memory files (memfd): the webhook
    runs with a read-only root filesystem, and the key never touches a disk."""
    fds = []
    try:
        for data in (cert, key):
            fd = os.memfd_create("palisade-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def build_context(cert: bytes, key: bytes, cert_path: str, key_path: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context from in-memory PEM (read once, so cert and key are one snapshot)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    try:
        _load_pair(ctx, cert, key)
    except ssl.SSLError as exc:
        raise ServeError(f"{cert_path} / {key_path}: cannot load the certificate pair: "
                         f"{exc.reason or exc}") from None
    return ctx


class CertReloader:
    """Holds the current context; ``context`` is the one handed to the listening socket."""

    def __init__(self, cert_path: str, key_path: str, metrics: Metrics) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self._metrics = metrics
        self._snapshot = self._read()
        self._current = build_context(*self._snapshot, cert_path, key_path)
        self._failed_snapshot: tuple[bytes, bytes] | None = None
        self._observe_expiry()
        self.context = build_context(*self._snapshot, cert_path, key_path)
        self.context.sni_callback = self._sni

    def _read(self) -> tuple[bytes, bytes]:
        try:
            return Path(self.cert_path).read_bytes(), Path(self.key_path).read_bytes()
        except OSError as exc:
            raise ServeError(f"{exc.filename}: cannot read: {exc.strerror}") from None

    def _sni(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self._current
        return None

    def _observe_expiry(self) -> None:
        with contextlib.suppress(ValueError):
            self._metrics.cert_expiry.set(not_after(self._snapshot[0]))

    @property
    def expired(self) -> bool:
        try:
            return not_after(self._snapshot[0]) < time.time()
        except ValueError:
            return False

    def check(self) -> bool:
        """Reload if the files changed; True when a new pair was swapped in."""
        try:
            snap = self._read()
        except ServeError as exc:
            log.warning("certificate reload skipped: %s", exc)
            self._metrics.cert_reloads.labels("failed").inc()
            return False
        if snap == self._snapshot or snap == self._failed_snapshot:
            return False
        try:
            ctx = build_context(*snap, self.cert_path, self.key_path)
        except ServeError as exc:
            # Mid-rotation (new cert, old key) or garbage: keep serving the old pair.
            self._failed_snapshot = snap
            self._metrics.cert_reloads.labels("failed").inc()
            log.warning("certificate reload failed, keeping the previous one: %s", exc)
            return False
        self._current, self._snapshot, self._failed_snapshot = ctx, snap, None
        self._observe_expiry()
        self._metrics.cert_reloads.labels("ok").inc()
        log.info("certificate reloaded from %s", self.cert_path)
        return True


@dataclass
class Metrics:
    registry: CollectorRegistry
    reviews: Counter
    latency: Histogram
    cert_expiry: Gauge
    cert_reloads: Counter

    @staticmethod
    def create() -> Metrics:
        reg = CollectorRegistry()
        return Metrics(
            registry=reg,
            reviews=Counter("palisade_injector_reviews", "Admission reviews answered, by endpoint and outcome",
                            ["endpoint", "outcome"], registry=reg),
            latency=Histogram("palisade_injector_review_duration_seconds",
                              "Time to answer one review (body read to response built)", ["endpoint"],
                              buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
                              registry=reg),
            cert_expiry=Gauge("palisade_injector_cert_expiry_timestamp_seconds",
                              "notAfter of the serving certificate in use", registry=reg),
            cert_reloads=Counter("palisade_injector_cert_reloads", "Certificate reload attempts by result",
                                 ["result"], registry=reg),
        )


class WebhookApp:
    """The aiohttp application plus its state (config, certs, metrics, readiness)."""

    def __init__(self, config: InjectorConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics.create()
        self.certs: CertReloader | None = None
        self.shutting_down = False
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.add_routes([
            web.post("/mutate", self._mutate),
            web.post("/mutate/{psa}", self._mutate),
            web.post("/validate", self._validate),
            web.post("/validate/{grants}", self._validate),
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics),
        ])

    async def _mutate(self, request: web.Request) -> web.Response:
        return await self._review(request, "mutate")

    async def _validate(self, request: web.Request) -> web.Response:
        return await self._review(request, "validate")

    def _error(self, endpoint: str, status: int, outcome: str, message: str) -> web.Response:
        self.metrics.reviews.labels(endpoint, outcome).inc()
        return web.Response(status=status, text=message.replace("\n", " ") + "\n")

    async def _review(self, request: web.Request, endpoint: str) -> web.Response:
        start = time.perf_counter()
        if request.content_type != "application/json":
            return self._error(endpoint, 415, "invalid",
                               f"Content-Type must be application/json, got {request.content_type!r}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(endpoint, 413, "invalid", f"body larger than {MAX_BODY} bytes")
        # Namespace grants arrive in the path the webhook configuration registered (one CDE webhook
        # per combination of admin namespace labels, selected by the API server): guard.py.
        grants = parse_grants(request.match_info.get("grants"))
        # Namespaces enforcing a Pod Security level that rejects the sidecar (psa.py).
        level = psa.parse_level(request.match_info.get("psa"))
        if "psa" in request.match_info and level is None:
            return self._error(endpoint, 404, "invalid", f"unknown path {request.path}")
        try:
            if level is not None:
                result = psa.mutate_under(reviews.decode(body), self.config, level)
            else:
                result = reviews.handle(endpoint, body, self.config, grants)
        except reviews.ReviewError as exc:
            return self._error(endpoint, 400, "invalid", f"bad AdmissionReview: {exc}")
        except Exception as exc:  # never let one review take the server down
            log.exception("internal error answering a %s review", endpoint)
            return self._error(endpoint, 500, "error", f"internal error: {type(exc).__name__}")
        self.metrics.reviews.labels(endpoint, result.outcome).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        if result.outcome in ("rejected", "denied"):
            log.info("%s: %s", endpoint, result.reason)
        return web.Response(body=result.to_bytes(), content_type="application/json")

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self.shutting_down:
            return web.Response(status=503, text="shutting down\n")
        if self.certs is not None and self.certs.expired:
            return web.Response(status=503, text="serving certificate expired\n")
        return web.Response(text="ok\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(config: InjectorConfig, cert: str, key: str, host: str = "0.0.0.0", port: int = 8443,
                reload_interval: float = 5.0, ready_file=sys.stderr) -> None:
    """Run until SIGTERM/SIGINT. Prints one ``listening on https://host:port`` line when bound."""
    webhook = WebhookApp(config)
    webhook.certs = CertReloader(cert, key, webhook.metrics)
    runner = web.AppRunner(webhook.app, access_log=None, handle_signals=False, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=webhook.certs.context, backlog=1024,
                       reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", exit_code=1) from None
    # Everything allocated so far (modules, app, TLS) lives for the whole run: move it out of
    # the collector's view so full collections stay short under load.
    gc.collect()
    gc.freeze()
    bound = [a for a in runner.addresses if isinstance(a, tuple)]
    actual = bound[0][1] if bound else port
    print(f"palisade-injector listening on https://{host}:{actual}", file=ready_file, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch() -> None:
        while True:
            await asyncio.sleep(reload_interval)
            webhook.certs.check()

    watcher = asyncio.create_task(watch())
    try:
        await stop.wait()
    finally:
        webhook.shutting_down = True
        watcher.cancel()
        await runner.cleanup()


def run(config: InjectorConfig, cert: str, key: str, host: str, port: int, reload_interval: float) -> None:
    """Blocking entry point: uvloop when available, stdlib asyncio otherwise."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable without it
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config, cert, key, host, port, reload_interval))
