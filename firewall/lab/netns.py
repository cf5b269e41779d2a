"""The one network-namespace lab: pods as namespaces on a bridge, the real sidecar started in them.

The integration tests (``tests/harness.py``), the demo (``python -m firewall demo``) and the
benchmarks (``benchmarks/run.py``) all build their pods here, so the namespace, veth, redirect and
sidecar life cycle - and above all its clean-up - is written once.

A ``Cluster`` is a switch namespace ``<prefix>-sw`` holding a Linux bridge; each ``Pod`` is a
namespace ``<prefix>-<key>`` with an ``eth0`` veth joined to that bridge and an address in
10.<octet>.0.0/24 (plus fd00:<octet>::/64 unless ``ipv6=False``). ``Pod.start_sidecar`` runs
``redirect apply`` and ``python -m firewall run`` inside the pod exactly as the init container and
the sidecar container would. ``Cluster.close()`` (also run by the context manager and, as a last
resort, at interpreter exit) kills every process left in the cluster's namespaces, deletes the
namespaces (which deletes their veths) and any veth a crash left in the root namespace.

Traffic stays inside these namespaces: the addresses are private ranges that exist only here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from firewall import ADMIN_PORT, LABEL_SCOPE

PY = sys.executable
PKG_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the firewall package


class LabError(RuntimeError):
    """The lab could not do what was asked (a process died, a wait timed out); the message says which."""


class LabTimeout(LabError, TimeoutError):
    """A readiness wait ran out of time (a ``TimeoutError`` too, for callers that catch that)."""


def sh(cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
    """Run a command in the root namespace, output captured as text."""
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout, **kw)


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``pred`` until it returns something truthy and return that (readiness, never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise LabTimeout(f"timed out after {timeout:g}s waiting for {what or pred}")
        time.sleep(interval)


def read_jsonl(path: Path | str) -> list[dict]:
    """The JSON objects of an events file; a line still being written (or garbage) is skipped."""
    out: list[dict] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the checkout's package first on PYTHONPATH (``-m firewall`` from any cwd)."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PKG_ROOT) + (os.pathsep + old if old else "")
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- clean-up


def lab_namespaces(prefix: str) -> list[str]:
    """Names of the network namespaces that belong to clusters with this prefix."""
    r = sh(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def remove_namespaces(prefix: str) -> list[str]:
    """Kill every process left in the prefix's namespaces, delete them and stray veths; return what went.

    Deleting a namespace that still holds a process would leave it alive (and the namespace with
    it), so the processes die first; a veth pair is created in the root namespace before it is
    moved, so a crash between the two leaves one there."""
    removed = []
    for ns in lab_namespaces(prefix):
        pids = sh(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
        if pids:
            with contextlib.suppress(LabTimeout):
                wait_until(lambda ns=ns: not sh(["ip", "netns", "pids", ns], check=False).stdout.split(), 5,
                           what=f"processes in {ns} to exit")
        sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    links = sh(["ip", "-o", "link", "show"], check=False).stdout
    for m in re.finditer(rf"^\d+:\s+({re.escape(prefix)}\d+[hp])[@:]", links, re.M):
        sh(["ip", "link", "del", m.group(1)], check=False)
        removed.append(m.group(1))
    return removed


_LIVE: set[Cluster] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_live_clusters() -> None:
    """A cluster its owner forgot to close (or an exception skipped) is still removed at exit."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for c in live:
        with contextlib.suppress(Exception):
            c.close()


# --------------------------------------------------------------------------- the sidecar


class Sidecar:
    """``python -m firewall run`` in a pod: its process, events file, log and admin endpoint."""

    def __init__(self, pod: Pod, proc: subprocess.Popen, events_path: Path, log_path: Path,
                 admin_port: int = ADMIN_PORT) -> None:
        self.pod, self.proc, self.events_path, self.admin_port = pod, proc, Path(events_path), admin_port
        self.log_path = Path(log_path)
        pod.sidecar = self

    @property
    def stderr_path(self) -> Path:
        return self.log_path

    def events(self, event_type: str | None = None) -> list[dict]:
        return [e for e in read_jsonl(self.events_path) if event_type is None or e.get("event_type") == event_type]

    def flows(self, **match: Any) -> list[dict]:
        return [e for e in self.events("flow") if all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, pred: Callable[[dict], bool], timeout: float = 10.0, what: str = "event") -> dict:
        return wait_until(lambda: next((e for e in self.events() if pred(e)), None), timeout, what=what)

    def wait_flows(self, n: int, timeout: float = 30.0, *, where: Callable[[dict], bool] | None = None,
                   what: str = "", **match: Any) -> list[dict]:
        """At least ``n`` flow records with these field values (and ``where``); all of them."""
        def enough() -> list[dict] | None:
            found = [f for f in self.flows(**match) if where is None or where(f)]
            return found if len(found) >= n else None

        return wait_until(enough, timeout, what=what or f"{n} flow records {match}")

    def admin_get(self, path: str) -> tuple[int, str]:
        """GET the admin endpoint from inside the pod: (status, body); status 0 when nothing answered."""
        r = self.pod.run(["curl", "-s", "-m", "3", "-o", "-", "-w", "\n%{http_code}",
                          f"http://127.0.0.1:{self.admin_port}{path}"], check=False, timeout=20)
        body, _, code = r.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    http = admin_get

    def ready(self) -> bool:
        return self.admin_get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /readyz answers 200; a sidecar that exits first is an error carrying its log's tail."""
        def ok() -> bool:
            if self.proc.poll() is not None:
                raise LabError(f"the sidecar in {self.pod.netns} exited with {self.proc.returncode}: "
                               f"{self.stderr()[-3000:]}")
            return self.ready()

        wait_until(ok, timeout, interval=0.1, what=f"the sidecar in {self.pod.netns} to be ready")

    def stderr(self) -> str:
        """Everything the sidecar wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send ``sig`` (a drain on SIGTERM) and wait; past ``timeout`` the process group is killed."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


# --------------------------------------------------------------------------- pods


class Pod:
    """One pod: network namespace ``netns`` with ``eth0`` on the cluster bridge, and its identity."""

    def __init__(self, cluster: Cluster, key: str, idx: int, name: str, namespace: str,
                 labels: dict[str, str], host: int | None = None) -> None:
        self.cluster, self.key, self.idx = cluster, key, idx
        self.name, self.namespace, self.labels = name, namespace, dict(labels)
        self.netns = f"{cluster.prefix}-{key}"
        host = idx + 1 if host is None else host
        self.ip = f"{cluster.subnet}.{host}"
        self.ip6 = f"fd00:{cluster.octet:x}::{host:x}"
        self.sidecar: Sidecar | None = None

    @property
    def ns(self) -> str:
        """The network namespace's name (the tests' spelling)."""
        return self.netns

    @property
    def scope(self) -> str:
        return self.labels.get(LABEL_SCOPE, "out-of-scope")

    def cmd(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
        """Run to completion inside the pod, output captured (text unless ``text=False``)."""
        return subprocess.run(self.cmd(cmd), check=check, capture_output=True, text=kw.pop("text", True),
                              timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], log: Path | str | None = None, **kw: Any) -> subprocess.Popen:
        """A long-running process in the pod, in its own process group, killed with the cluster.

        Output goes to the file ``log`` (appended) when given, else to pipes the caller reads."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        fh = None
        if log is not None:
            fh = open(log, "ab")  # noqa: SIM115 - the child holds its own copy; ours closes below
            kw.setdefault("stdout", fh)
            kw.setdefault("stderr", subprocess.STDOUT)
        else:
            kw.setdefault("stdout", subprocess.PIPE)
            kw.setdefault("stderr", subprocess.PIPE)
        try:
            proc = subprocess.Popen(self.cmd(cmd), start_new_session=True, **kw)
        finally:
            if fh is not None:
                fh.close()
        self.cluster.procs.append(proc)
        return proc

    def listening(self, port: int, udp: bool = False) -> bool:
        r = self.run(["ss", "-Hlnu" if udp else "-Hltn", f"sport = :{port}"], check=False)
        return bool(r.stdout.strip())

    def wait_listening(self, port: int, timeout: float = 15, udp: bool = False,
                       proc: subprocess.Popen | None = None) -> None:
        """Until something listens on ``port``; ``proc`` (the server) exiting first is an error."""
        def ok() -> bool:
            if proc is not None and proc.poll() is not None:
                raise LabError(f"{self.name}: server for port {port} exited with {proc.returncode}")
            return self.listening(port, udp)

        wait_until(ok, timeout, what=f"{self.netns} listening on {port}")

    def redirect(self, action: str = "apply", *extra: str, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        """``python -m firewall redirect ACTION`` in the pod: what the palisade-init container runs."""
        return self.run([PY, "-m", "firewall", "redirect", action, *extra], check=check, timeout=timeout,
                        cwd=str(PKG_ROOT), env=python_env())

    def start_sidecar(self, *args: str, redirect_args: Sequence[str] = (), apply_redirect: bool = True,
                      env: dict | None = None, wait: bool = True, labels: dict | None = None,
                      events: Path | None = None, log: Path | None = None, dlp_cache: Path | None = None,
                      cwd: Path | str | None = None, ready_timeout: float = 60) -> Sidecar:
        """Redirect rules (unless ``apply_redirect=False``), then the sidecar with ``args``.

        Events and log go to the cluster's work directory unless named; ``wait`` blocks until
        /readyz answers (or raises with the sidecar's log when it exits first)."""
        if apply_redirect:
            self.redirect("apply", *redirect_args)
        d = self.cluster.workdir
        self.cluster.starts += 1
        n = self.cluster.starts
        events = events or d / f"{self.key}-{n}-eve.json"
        log = log or d / f"{self.key}-{n}-sidecar.log"
        e = python_env({"POD_NAMESPACE": self.namespace, "POD_NAME": self.name, "POD_IP": self.ip})
        if env:
            e.update(env)
        cmd = [PY, "-m", "firewall", "run", "--events", str(events), "--pod-ip", self.ip,
               "--dlp-cache", str(dlp_cache or d / "dlp-cache"), *args]
        if labels is not None:
            cmd += ["--labels", json.dumps(labels)]
        proc = self.popen(cmd, log=log, env=e, cwd=str(cwd or PKG_ROOT))
        sc = Sidecar(self, proc, events, log)
        if wait:
            sc.wait_ready(ready_timeout)
        return sc


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """A switch namespace with a bridge and one namespace + veth per pod; ``close()`` removes all of it.

    ``unique`` appends a random suffix to ``prefix`` so that parallel users (tests, a benchmark)
    never share names; ``octet`` picks 10.<octet>.0.0/24 so their addresses do not clash either.
    ``workdir`` (default: a new temporary directory) holds event files and logs; it is left in
    place on close, for the caller to read or remove."""

    pod_class: type[Pod] = Pod

    def __init__(self, prefix: str = "pl", octet: int = 231, *, workdir: Path | str | None = None,
                 unique: bool = True, ipv6: bool = True) -> None:
        self.prefix = f"{prefix}{secrets.token_hex(2)}" if unique else prefix
        self.octet, self.ipv6 = octet, ipv6
        self.subnet = f"10.{octet}.0"
        self.sw = f"{self.prefix}-sw"
        self.pods: dict[str, Pod] = {}
        self.procs: list[subprocess.Popen] = []
        self.starts = 0
        self.closed = False
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"palisade-{self.prefix}-")
            os.chmod(workdir, 0o755)  # the sidecar drops to UID 1337 and still reads what is here
        self.workdir = Path(workdir)
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            sh(["ip", "netns", "add", self.sw])
            ex = ["ip", "netns", "exec", self.sw]
            sh([*ex, "ip", "link", "add", "br0", "type", "bridge"])
            sh([*ex, "ip", "link", "set", "br0", "up"])
            sh([*ex, "ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise

    @property
    def tmp(self) -> str:
        """The work directory as a string (the tests' spelling)."""
        return str(self.workdir)

    @property
    def namespace_of(self) -> dict[str, str]:
        return {k: p.namespace for k, p in self.pods.items()}

    def pod(self, key: str, namespace: str = "default", *, name: str | None = None,
            labels: dict[str, str] | None = None, host: int | None = None) -> Pod:
        """A new pod ``key`` (also its Kubernetes name unless ``name``) in Kubernetes ``namespace``.

        Its address is 10.<octet>.0.<host>, by default the next one (.2, .3, ...)."""
        idx = len(self.pods) + 1
        pod = self.pod_class(self, key, idx, name or key, namespace, labels or {}, host)
        h, p = f"{self.prefix}{idx}h", f"{self.prefix}{idx}p"
        self.pods[key] = pod  # before the namespace exists: close() must find it whatever fails next
        sh(["ip", "netns", "add", pod.netns])
        sh(["ip", "link", "add", h, "type", "veth", "peer", "name", p])
        sh(["ip", "link", "set", h, "netns", self.sw])
        sh(["ip", "link", "set", p, "netns", pod.netns])
        sh(["ip", "netns", "exec", self.sw, "ip", "link", "set", h, "master", "br0", "up"])
        ex = ["ip", "netns", "exec", pod.netns]
        sh([*ex, "ip", "link", "set", p, "name", "eth0"])
        sh([*ex, "ip", "link", "set", "lo", "up"])
        sh([*ex, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0"])
        if self.ipv6:
            sh([*ex, "ip", "-6", "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad"], check=False)
        sh([*ex, "ip", "link", "set", "eth0", "up"])
        return pod

    def disable_ipv6(self) -> None:
        """No IPv6 at all in any namespace of the cluster, the switch included: no router
        solicitations or MLD reports on the wire (tests that count every captured packet)."""
        for ns in (self.sw, *(p.netns for p in self.pods.values())):
            for scope in ("all", "default"):
                sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{scope}.disable_ipv6=1"])

    def close(self) -> list[str]:
        """Kill every process started here (by process group) and in the namespaces, delete them."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        removed = remove_namespaces(self.prefix)
        self.closed = True
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return removed

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def have_root() -> bool:
    return os.geteuid() == 0
