"""Pods as network namespaces: the integration-test (and demo) harness.

A ``Cluster`` is a switch namespace holding a Linux bridge; each ``Pod`` is a
namespace with an ``eth0`` veth joined to that bridge, an IPv4 and an IPv6
address.  ``Pod.start_sidecar`` runs ``redirect apply`` and the real sidecar
inside the pod exactly as the init container and the sidecar container would.
Everything is torn down in ``close()`` (also when a test fails): processes are
killed by process group, namespaces deleted (which deletes their veths).

Traffic stays inside these namespaces: addresses are private ranges that exist
only here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _sh(cmd: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


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


def wait_until(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> object:
    """Readiness polling (not a sleep): returns the first truthy value of pred()."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


class Sidecar:
    def __init__(self, pod: Pod, proc: subprocess.Popen, events_path: Path, admin_port: int,
                 stderr_path: Path) -> None:
        self.pod, self.proc, self.events_path, self.admin_port = pod, proc, events_path, admin_port
        self.stderr_path = stderr_path

    def events(self, event_type: str | None = None) -> list[dict]:
        out = []
        try:
            with open(self.events_path) as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        e = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if event_type is None or e.get("event_type") == event_type:
                        out.append(e)
        except FileNotFoundError:
            pass
        return out

    def flows(self, **match) -> list[dict]:
        return [e for e in self.events("flow") if all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, pred: Callable[[dict], bool], timeout: float = 10.0, what: str = "event") -> dict:
        def find():
            for e in self.events():
                if pred(e):
                    return e
            return None

        return wait_until(find, timeout, what=what)  # type: ignore[return-value]

    def wait_flows(self, n: int, timeout: float = 30.0, **match) -> list[dict]:
        return wait_until(lambda: (lambda f: f if len(f) >= n else None)(self.flows(**match)),
                          timeout, what=f"{n} flow records {match}")  # type: ignore[return-value]

    def http(self, path: str) -> tuple[int, str]:
        """GET the admin endpoint from inside the pod's namespace."""
        r = self.pod.run([PY, "-c", (
            "import sys,urllib.request,urllib.error\n"
            f"try:\n r=urllib.request.urlopen('http://127.0.0.1:{self.admin_port}{path}',timeout=2)\n"
            " print(r.status); sys.stdout.write(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code)\n"
            "except Exception as e:\n print(0)\n")], check=False)
        first, _, rest = r.stdout.partition("\n")
        return int(first or 0), rest

    def ready(self) -> bool:
        return self.http("/readyz")[0] == 200

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


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


class Pod:
    def __init__(self, cluster: Cluster, name: str, idx: int) -> None:
        self.cluster, self.name, self.idx = cluster, name, idx
        self.ns = f"{cluster.prefix}-{name}"
        self.ip = f"{cluster.subnet}.{idx + 1}"
        self.ip6 = f"fd00:{cluster.octet:x}::{idx + 1:x}"
        self.sidecar: Sidecar | None = None

    def cmd(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(cmd), check=check, capture_output=True, text=kw.pop("text", True),
                              timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(self.cmd(cmd), start_new_session=True, **kw)
        self.cluster.procs.append(p)
        return p

    def listening(self, port: int, udp: bool = False) -> bool:
        r = self.run(["ss", "-Hlnu" if udp else "-Hltn", f"sport = :{port}"], check=False)
        return bool(r.stdout.strip())

    def wait_listening(self, port: int, timeout: float = 15, udp: bool = False) -> None:
        wait_until(lambda: self.listening(port, udp), timeout, what=f"{self.ns} listening on {port}")

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

    def redirect(self, action: str = "apply", *extra: str) -> subprocess.CompletedProcess:
        return self.run([PY, "-m", "firewall", "redirect", action, *extra], cwd=str(REPO))

    def start_sidecar(self, *args: str, redirect_args: Sequence[str] = (), apply_redirect: bool = True,
                      env: dict | None = None, wait: bool = True, labels: dict | None = None) -> Sidecar:
        if apply_redirect:
            self.redirect("apply", *redirect_args)
        d = Path(self.cluster.tmp)
        self.cluster.starts += 1
        n = self.cluster.starts
        events = d / f"{self.name}-{n}-eve.json"
        errf = d / f"{self.name}-{n}-sidecar.log"
        admin = 15020
        e = dict(os.environ)
        e.update({"POD_NAMESPACE": self.cluster.namespace_of.get(self.name, "default"),
                  "POD_NAME": self.name, "POD_IP": self.ip, "PYTHONPATH": str(REPO)})
        if env:
            e.update(env)
        cmd = [PY, "-m", "firewall", "run", "--events", str(events), "--pod-ip", self.ip,
               "--dlp-cache", str(d / "dlp-cache"), *args]
        if labels is not None:
            cmd += ["--labels", json.dumps(labels)]
        errfh = open(errf, "ab")
        proc = subprocess.Popen(self.cmd(cmd), cwd=str(REPO), env=e, stdout=errfh, stderr=errfh,
                                start_new_session=True)
        self.cluster.procs.append(proc)
        sc = Sidecar(self, proc, events, admin, errf)
        self.sidecar = sc
        if wait:
            def ok():
                if proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited rc={proc.returncode}: {sc.stderr()[-3000:]}")
                return sc.ready()

            wait_until(ok, 60, interval=0.1, what=f"sidecar in {self.ns} ready")
        return sc


class Cluster:
    """Namespaces for one test; ``octet`` picks 10.<octet>.0.0/24 so parallel users don't clash."""

    def __init__(self, prefix: str = "pl", octet: int = 231) -> None:
        self.prefix = f"{prefix}{secrets.token_hex(2)}"
        self.octet = octet
        self.subnet = f"10.{octet}.0"
        self.sw = f"{self.prefix}-sw"
        self.pods: dict[str, Pod] = {}
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix=f"palisade-{self.prefix}-")
        os.chmod(self.tmp, 0o755)
        self.namespace_of: dict[str, str] = {}
        self.starts = 0
        _sh(["ip", "netns", "add", self.sw])
        _sh(["ip", "netns", "exec", self.sw, "ip", "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "netns", "exec", self.sw, "ip", "link", "set", "br0", "up"])
        _sh(["ip", "netns", "exec", self.sw, "ip", "link", "set", "lo", "up"])

    def pod(self, name: str, namespace: str = "default") -> Pod:
        idx = len(self.pods) + 1
        pod = Pod(self, name, idx)
        self.namespace_of[name] = namespace
        h, p = f"{self.prefix}{idx}h", f"{self.prefix}{idx}p"
        _sh(["ip", "netns", "add", pod.ns])
        _sh(["ip", "link", "add", h, "type", "veth", "peer", "name", p])
        _sh(["ip", "link", "set", h, "netns", self.sw])
        _sh(["ip", "link", "set", p, "netns", pod.ns])
        _sh(["ip", "netns", "exec", self.sw, "ip", "link", "set", h, "master", "br0", "up"])
        ex = ["ip", "netns", "exec", pod.ns]
        _sh([*ex, "ip", "link", "set", p, "name", "eth0"])
        _sh([*ex, "ip", "link", "set", "lo", "up"])
        _sh([*ex, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0"])
        _sh([*ex, "ip", "-6", "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad"], check=False)
        _sh([*ex, "ip", "link", "set", "eth0", "up"])
        self.pods[name] = pod
        return pod

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for pod in self.pods.values():
            _sh(["ip", "netns", "del", pod.ns], check=False)
        _sh(["ip", "netns", "del", self.sw], check=False)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def have_root() -> bool:
    return os.geteuid() == 0
