"""Fixtures for the injector: a generated CA + serving cert, and real ``serve`` subprocesses.

The server is started on 127.0.0.1 with ``--port 0``; readiness is its one
``listening on https://127.0.0.1:PORT`` line on stderr, not a sleep.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    certs: Path
    log: list[str]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def start_server(certs: Path, *extra: str, timeout: float = 20.0) -> Server:
    """Start ``python -m injector serve`` and wait for its listening line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "injector", "serve", "--cert", str(certs / "tls.crt"), "--key",
         str(certs / "tls.key"), "--host", "127.0.0.1", "--port", "0", *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stderr.readline()
        if not line:
            break
        if b"listening on https://" in line:
            server = Server(proc, int(line.rsplit(b":", 1)[1]), certs, [])
            # Drain stderr so a chatty server never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc, server.log), daemon=True).start()
            return server
    proc.kill()
    rest = proc.stderr.read().decode(errors="replace")
    raise RuntimeError(f"injector serve did not start: {line.decode(errors='replace')}{rest}")


def _drain(proc: subprocess.Popen, sink: list[str]) -> None:
    for raw in proc.stderr:
        sink.append(raw.decode(errors="replace"))


def stop_server(server: Server) -> int:
    """SIGTERM, wait, return the exit code."""
    server.proc.terminate()
    try:
        return server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return server.proc.wait()


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory) -> Path:
    from injector.certs import write_certs

    d = tmp_path_factory.mktemp("injector-certs")
    write_certs(d, "palisade-injector", "palisade-system", ips=["127.0.0.1"])
    return d
