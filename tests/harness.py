"""Test conveniences over the one network-namespace lab (``firewall/lab/netns.py``).

Pods, veths, redirect rules, the sidecar's life cycle and the clean-up live in the lab, shared
with the demo and the benchmarks. What is here only tests use: the blast tool's server and
client, an nginx config template, and the names the tests import (``Cluster``, ``Pod``,
``Sidecar``, ``wait_until``, ``PY``, ``REPO``). A test ``Cluster`` gets a random suffix on its
prefix, so parallel tests never share namespace names.

Traffic stays inside these namespaces: addresses are private ranges that exist only here.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from firewall.lab import netns as lab
from firewall.lab.netns import PY, Sidecar, have_root, wait_until

REPO = Path(__file__).resolve().parent.parent

__all__ = ["PY", "REPO", "BlastServer", "Cluster", "Pod", "Sidecar", "have_root", "nginx_template", "wait_until"]


def nginx_template(ports: Sequence[int] = (9000,), reply: str = "payments ok", conns: int = 1024) -> str:
    """An nginx.conf template (``{tmp}`` = its work dir) answering 200 + ``reply`` on ``ports``:
    a real HTTP server whose access log shows what reached it."""
    listens = "".join(f"    listen {p};\n" for p in ports)
    return ("worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log;\n"
            f"events {{{{ worker_connections {conns}; }}}}\n"
            "http {{\n  access_log {tmp}/access.log;\n  client_body_temp_path {tmp}/body;\n"
            "  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fcgi;\n"
            "  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n  server {{\n"
            + listens.replace("{", "{{").replace("}", "}}")
            + "    location / {{ return 200 \"" + reply.replace("{", "{{").replace("}", "}}") + "\\n\"; }}\n"
            "  }}\n}}\n")


class BlastServer:
    """The blast server process plus its per-connection result lines (read in a thread)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.results: list[dict] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if "recv" in d or "error" in d:
                self.results.append(d)

    def wait_results(self, n: int, timeout: float = 30.0) -> list[dict]:
        wait_until(lambda: len(self.results) >= n, timeout, what=f"{n} blast server results")
        return self.results

    def terminate(self) -> None:
        self.proc.terminate()


class Pod(lab.Pod):
    """A lab pod that can also run the blast tool (tests/tools/blast.py)."""

    def serve_blast(self, port: int = 9000, host: str = "0.0.0.0") -> BlastServer:
        p = self.popen([PY, str(REPO / "tests/tools/blast.py"), "server", "--host", host, "--port", str(port)])
        self.wait_listening(port)
        return BlastServer(p)

    def blast(self, host: str, port: int = 9000, **opts) -> dict:
        args = [PY, str(REPO / "tests/tools/blast.py"), "client", "--host", host, "--port", str(port)]
        for k, v in opts.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                args.append(flag)
            else:
                args += [flag, str(v)]
        r = self.run(args, check=False, timeout=600)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"blast client produced no result: rc={r.returncode} {r.stderr[-2000:]}")
        return json.loads(lines[-1])


class Cluster(lab.Cluster):
    """A lab cluster whose pods are test ``Pod``s; ``octet`` picks 10.<octet>.0.0/24."""

    pod_class = Pod

    def __init__(self, prefix: str = "pl", octet: int = 231) -> None:
        super().__init__(prefix, octet)

    def pod(self, name: str, namespace: str = "default", **kw: object) -> Pod:  # type: ignore[override]
        return super().pod(name, namespace, **kw)  # type: ignore[return-value,arg-type]

    def __enter__(self) -> Cluster:
        return self
