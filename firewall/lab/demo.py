"""``python -m firewall demo``: the guided tour, on this machine, in under two minutes.

Four "pods" are network namespaces on one bridge, exactly like the integration
tests build them, but without importing the tests (the installed package has
none):

=============  =========  ==================  ===================================
pod            namespace  scope               runs
=============  =========  ==================  ===================================
payment-api-0  payments   cde                 nginx :9000 (sshd :22), **sidecar**
payments-db-0  payments   cde                 redis :6379, **sidecar**
checkout-0     shop       connected           curl, ssh (the client)
analytics-0    analytics  out-of-scope        an HTTP collector :9100
=============  =========  ==================  ===================================

The two CDE pods get what the injector would give them: ``redirect apply`` (the
``palisade-init`` container) and then ``python -m firewall run`` with a
downward-API directory written in the kubelet's format (annotations drive the
mode, captures and quarantine), an identity file, an events file and a pcap
directory. Every step checks what it narrates; any mismatch makes the demo exit 1.

The namespaces use the prefix ``pdemo`` (``--prefix``) and 10.180.0.0/24
(``--subnet-octet``). Everything is removed at the end, on Ctrl-C and on SIGTERM,
and leftovers of a crashed run are removed before starting. A lock file keeps two
demos from tearing each other's namespaces down.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from firewall import ANN_MODE, ANN_PCAP, ANN_QUARANTINE, LABEL_SCOPE
from firewall.observe.redaction import mask_text

PY = sys.executable
PKG_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the firewall package
LOCK_FILE = "/run/palisade-demo.lock"

# A well-known test card number (Luhn-valid, issued to no one). It is never printed in full.
TEST_PAN = "4111111111111111"
TEST_PAN_MASKED = "411111******1111"

API_PORT, SSH_PORT, REDIS_PORT, COLLECT_PORT, ADMIN_PORT = 9000, 22, 6379, 9100, 15020
CAPTURE_SPEC = "duration=30s,filter=tcp port 9000,max-packets=20"

NEEDED_TOOLS = ("ip", "nft", "curl", "redis-server", "redis-cli", "tcpdump", "ssh", "ssh-keygen")


class DemoError(Exception):
    """A step did not behave as narrated (the message says what was expected and what happened)."""


class SetupError(Exception):
    """The machine cannot run the demo (not root, a tool missing, another demo running)."""


# --------------------------------------------------------------------------- small helpers


def _sh(cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout, **kw)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (readiness, never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict]:
    out: list[dict] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return out


# --------------------------------------------------------------------------- servers run in the pods

# The analytics collector: answers every HTTP request with 200 and appends what it
# received to a file - with digit runs that look like card numbers masked, so the
# file proves whether a card number arrived without ever storing one.
COLLECTOR = r"""
import re, socket, sys, threading
out = sys.argv[2]
lock = threading.Lock()
def mask(b):
    return re.sub(rb"\d{13,19}", lambda m: b"[PAN-RECEIVED " + m.group()[:6] + b"..." + m.group()[-4:] + b"]", b)
def handle(c):
    data = b""
    try:
        c.settimeout(10)
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                n = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        n = int(v.strip() or 0)
                if len(body) >= n:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\ncollected")
                    break
            b = c.recv(65536)
            if not b:
                break
            data += b
    except OSError:
        pass
    with lock, open(out, "ab") as fh:
        fh.write(mask(data) + b"\n--END--\n")
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# Fallback payment API when nginx is not installed: the same answers as the nginx config below.
PY_API = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
log = open(sys.argv[2], "a", buffering=1)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = b'{"status":"charged"}\n' if self.path.startswith("/v1/charge") else b"payments ok\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
        log.write(f"{self.client_address[0]} {self.command} {self.path}\n")
    do_GET = do_POST = _answer
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {port};
    location /v1/charge {{ default_type application/json; return 200 '{{"status":"charged"}}\\n'; }}
    location / {{ return 200 "payments ok\\n"; }}
  }}
}}
"""

# A client that holds one keep-alive connection open and reports how it ended.
HOLDER = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    s.sendall(b"POST /v1/charge HTTP/1.1\\r\\nHost: payments\\r\\nContent-Length: 0\\r\\n\\r\\n")
    print(s.recv(4096).split(b"\\r\\n")[0].decode(), flush=True)
    try:
        b = s.recv(100)
        print("closed" if not b else "data", flush=True)
    except (ConnectionResetError, TimeoutError, OSError) as exc:
        print("reset" if isinstance(exc, ConnectionResetError) else f"error {exc}", flush=True)
""")


# --------------------------------------------------------------------------- pods as namespaces


@dataclass
class Pod:
    name: str           # Kubernetes pod name
    namespace: str      # Kubernetes namespace
    labels: dict[str, str]
    netns: str
    ip: str
    sidecar: Sidecar | None = None

    @property
    def scope(self) -> str:
        return self.labels.get(LABEL_SCOPE, "out-of-scope")

    def cmd(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]


class Cluster:
    """A switch namespace with a bridge, one namespace + veth per pod; ``close()`` removes all of it."""

    def __init__(self, prefix: str, octet: int, workdir: Path) -> None:
        self.prefix, self.octet, self.workdir = prefix, octet, workdir
        self.sw = f"{prefix}-sw"
        self.pods: dict[str, Pod] = {}
        self.procs: list[subprocess.Popen] = []
        self._logs: list[Any] = []

    def create(self) -> None:
        _sh(["ip", "netns", "add", self.sw])
        ex = ["ip", "netns", "exec", self.sw]
        _sh([*ex, "ip", "link", "add", "br0", "type", "bridge"])
        _sh([*ex, "ip", "link", "set", "br0", "up"])
        _sh([*ex, "ip", "link", "set", "lo", "up"])

    def add_pod(self, key: str, name: str, namespace: str, labels: dict[str, str]) -> Pod:
        idx = len(self.pods) + 1
        pod = Pod(name, namespace, labels, f"{self.prefix}-{key}", f"10.{self.octet}.0.{idx + 1}")
        h, p = f"{self.prefix}{idx}h", f"{self.prefix}{idx}p"
        _sh(["ip", "netns", "add", pod.netns])
        _sh(["ip", "link", "add", h, "type", "veth", "peer", "name", p])
        _sh(["ip", "link", "set", h, "netns", self.sw])
        _sh(["ip", "link", "set", p, "netns", pod.netns])
        _sh(["ip", "netns", "exec", self.sw, "ip", "link", "set", h, "master", "br0", "up"])
        ex = ["ip", "netns", "exec", pod.netns]
        _sh([*ex, "ip", "link", "set", p, "name", "eth0"])
        _sh([*ex, "ip", "link", "set", "lo", "up"])
        _sh([*ex, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0"])
        _sh([*ex, "ip", "link", "set", "eth0", "up"])
        self.pods[key] = pod
        return pod

    def run(self, pod: Pod, cmd: Sequence[str], check: bool = False, timeout: float = 30,
            **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(pod.cmd(cmd), check=check, capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, pod: Pod, cmd: Sequence[str], log_name: str | None = None, **kw: Any) -> subprocess.Popen:
        """A long-running process in the pod, in its own process group (killed as a group on close)."""
        if log_name is not None:
            fh = open(self.workdir / log_name, "ab")  # noqa: SIM115 - closed in close()
            self._logs.append(fh)
            kw.setdefault("stdout", fh)
            kw.setdefault("stderr", subprocess.STDOUT)
        else:
            kw.setdefault("stdout", subprocess.DEVNULL)
            kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(pod.cmd(cmd), start_new_session=True, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def listening(self, pod: Pod, port: int) -> bool:
        r = self.run(pod, ["ss", "-Hltn", f"sport = :{port}"])
        return bool(r.stdout.strip())

    def wait_listening(self, pod: Pod, port: int, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
        def ok() -> bool:
            if proc is not None and proc.poll() is not None:
                raise DemoError(f"{pod.name}: server for port {port} exited with {proc.returncode}")
            return self.listening(pod, port)

        wait_until(ok, timeout, f"{pod.name} listening on :{port}")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for fh in self._logs:
            with contextlib.suppress(OSError):
                fh.close()
        remove_namespaces(self.prefix)


def _demo_namespaces(prefix: str) -> list[str]:
    r = _sh(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def remove_namespaces(prefix: str) -> list[str]:
    """Kill every process left in the prefix's namespaces, delete them and stray veths; return what was removed."""
    removed = []
    for ns in _demo_namespaces(prefix):
        pids = _sh(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
        if pids:
            with contextlib.suppress(DemoError):
                wait_until(lambda ns=ns: not _sh(["ip", "netns", "pids", ns], check=False).stdout.split(), 5,
                           f"processes in {ns} to exit")
        _sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    # work directories of earlier runs (the caller holds the demo lock, so none is in use)
    for d in Path(tempfile.gettempdir()).glob(f"palisade-{prefix}-*"):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    # a veth pair is created in the root namespace before it is moved: remove strays of a crash
    links = _sh(["ip", "-o", "link", "show"], check=False).stdout
    for m in re.finditer(rf"^\d+:\s+({re.escape(prefix)}\d+[hp])[@:]", links, re.M):
        _sh(["ip", "link", "del", m.group(1)], check=False)
        removed.append(m.group(1))
    return removed


# --------------------------------------------------------------------------- the sidecar


class Sidecar:
    """``python -m firewall run`` inside a pod, started as the sidecar container would start it."""

    def __init__(self, cluster: Cluster, pod: Pod, phase: str, events: Path, podinfo: Path, identity: Path,
                 pcap_dir: Path, dlp_cache: Path, policy: Path | None) -> None:
        self.cluster, self.pod, self.events_path = cluster, pod, events
        self.log_path = cluster.workdir / f"{pod.name}-{phase}-sidecar.log"
        cmd = [PY, "-m", "firewall", "run", "--events", str(events), "--podinfo", str(podinfo),
               "--identity", str(identity), "--pcap-dir", str(pcap_dir), "--dlp-cache", str(dlp_cache),
               "--pod-ip", pod.ip, "--pod-namespace", pod.namespace, "--pod-name", pod.name,
               "--drain-timeout", "2", "--no-ipv6"]
        if policy is not None:
            cmd += ["--policy", str(policy)]
        env = dict(os.environ)
        env.update({"POD_NAMESPACE": pod.namespace, "POD_NAME": pod.name, "POD_IP": pod.ip,
                    "PYTHONPATH": str(PKG_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")})
        self.proc = cluster.popen(pod, cmd, log_name=self.log_path.name, env=env, cwd=str(cluster.workdir))
        pod.sidecar = self

    def admin_get(self, path: str) -> tuple[int, str]:
        r = self.cluster.run(self.pod, ["curl", "-s", "-m", "3", "-o", "-", "-w", "\n%{http_code}",
                                        f"http://127.0.0.1:{ADMIN_PORT}{path}"])
        body, _, code = r.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def wait_ready(self, timeout: float = 60) -> None:
        def ok() -> bool:
            if self.proc.poll() is not None:
                raise DemoError(f"the sidecar of {self.pod.name} exited with {self.proc.returncode}: "
                                f"{self.log_tail()}")
            return self.admin_get("/readyz")[0] == 200

        wait_until(ok, timeout, f"the sidecar of {self.pod.name} to be ready", interval=0.1)

    def log_tail(self, n: int = 8) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return mask_text(" | ".join(lines[-n:]))

    def events(self, event_type: str | None = None) -> list[dict]:
        ev = read_jsonl(self.events_path)
        return [e for e in ev if event_type is None or e.get("event_type") == event_type]

    def wait_event(self, pred: Callable[[dict], bool], what: str, timeout: float = 15) -> dict:
        return wait_until(lambda: next((e for e in self.events() if pred(e)), None), timeout, what)

    def wait_flows(self, pred: Callable[[dict], bool], n: int, what: str, timeout: float = 15) -> list[dict]:
        def enough() -> list[dict] | None:
            found = [e for e in self.events("flow") if pred(e)]
            return found if len(found) >= n else None

        return wait_until(enough, timeout, what)

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


# --------------------------------------------------------------------------- narration


@dataclass
class StepResult:
    title: str
    ok: bool = False
    seconds: float = 0.0
    checks: list[str] = field(default_factory=list)
    error: str = ""


class Narrator:
    """Rich output: a progress bar over the steps, one line per check, a table at the end."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(highlight=False, quiet=quiet)
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self.task = self.progress.add_task("starting", total=total)
        self.results: list[StepResult] = []
        self.current: StepResult | None = None

    def __enter__(self) -> Narrator:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, title: str, story: str) -> StepResult:
        self.current = StepResult(title)
        self.results.append(self.current)
        self.progress.update(self.task, description=title)
        self.console.rule(f"[bold cyan]{len(self.results)}. {title}")
        for para in story.strip().split("\n\n"):
            self.console.print(" ".join(para.split()), style="dim")
        return self.current

    def say(self, text: str) -> None:
        self.console.print(f"  {text}")

    def command(self, argv: Sequence[str], where: str = "") -> None:
        from rich.markup import escape

        shown = " ".join(a if re.fullmatch(r"[\w./:=@,+-]+", a) else repr(a) for a in argv)
        self.console.print(f"  [dim]{escape(where + ' ' if where else '')}$[/dim] [green]{escape(mask_text(shown))}[/green]")

    def check(self, ok: bool, text: str) -> None:
        """Record one expectation; a false one ends the step as failed."""
        assert self.current is not None
        if not ok:
            raise DemoError(text)
        self.current.checks.append(text)
        self.console.print(f"  [green]✔[/green] {text}")

    def done(self, res: StepResult, t0: float, error: str = "") -> None:
        res.seconds = time.monotonic() - t0
        res.ok = not error
        res.error = error
        if error:
            self.console.print(f"  [bold red]✘ {mask_text(error)}[/bold red]")
        self.progress.advance(self.task)

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title="Palisade demo", show_lines=False)
        t.add_column("#", justify="right")
        t.add_column("step")
        t.add_column("result")
        t.add_column("checks", justify="right")
        t.add_column("time", justify="right")
        for i, r in enumerate(self.results, 1):
            res = "[green]as narrated[/green]" if r.ok else f"[red]FAILED: {mask_text(r.error)[:90]}[/red]"
            t.add_row(str(i), r.title, res, str(len(r.checks)), f"{r.seconds:.1f}s")
        return t


# --------------------------------------------------------------------------- policies written by the demo

GUARDRAILS = """\
# Hand-written guard rails that no learned policy replaces (the platform team owns these).
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata:
  name: baseline
  annotations:
    palisade.dev/last-reviewed: "{today}"
spec:
  rules:
    - name: no-ssh-into-containers
      description: Nobody logs into a container; debugging goes through kubectl debug
      direction: ingress
      appProto: ssh
      action: deny
---
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: payment-api-dlp
  namespace: payments
  annotations:
    palisade.dev/last-reviewed: "{today}"
spec:
  selector:
    matchLabels: {{app: payment-api}}
  mode: protect
  default: deny
  dlp:
    - name: no-clear-pan-out-of-cde
      description: Card numbers never leave the CDE in clear text (PCI DSS 4.2.1)
      packs: [payment_cards]
      direction: egress
      to: [{{scope: out-of-scope}}, {{scope: connected}}]
      action: block
"""

# What a reviewer writes over "learned from traffic: replace with the business justification".
JUSTIFICATIONS = {
    ("ingress", "checkout"): "Checkout submits charges (business justification, shown to auditors)",
    ("ingress", "payment-api"): "The payment API stores orders in its database",
    ("egress", "payments-db"): "Orders are stored in the CDE database",
    ("egress", "analytics"): "Usage statistics, never card data (the DLP guard rail enforces it)",
    ("ingress", "ssh"): "Left in by the reviewer on purpose: the cluster baseline denies SSH anyway",
}


def review_learned(text: str, today: str) -> tuple[str, int]:
    """What the application team does with the learned file: justify every rule, date the review."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    n = 0
    for doc in docs:
        doc.setdefault("metadata", {}).setdefault("annotations", {})["palisade.dev/last-reviewed"] = today
        spec = doc.get("spec", {})
        for direction in ("ingress", "egress"):
            for rule in spec.get(direction, []) or []:
                peers = rule.get("from") or rule.get("to") or []
                app = next((p.get("labels", {}).get("app") for p in peers if p.get("labels")), None)
                key = (direction, "ssh") if rule.get("appProto") == "ssh" else (direction, app)
                if key in JUSTIFICATIONS:
                    rule["description"] = JUSTIFICATIONS[key]
                    n += 1
    head = (f"# Learned by `python -m firewall policy learn`, reviewed {today}: every rule carries its\n"
            "# business justification (PCI DSS 1.2.5) and the review date (1.2.7).\n")
    return head + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=None, width=100), n


# --------------------------------------------------------------------------- the demo


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.prefix = args.prefix
        self.workdir = Path(tempfile.mkdtemp(prefix=f"palisade-{self.prefix}-"))
        os.chmod(self.workdir, 0o755)  # the sidecars run as UID 1337 after start-up
        self.cluster = Cluster(self.prefix, args.subnet_octet, self.workdir)
        self.n: Narrator | None = None
        self.annotations: dict[str, dict[str, str]] = {}
        self.today = _dt.datetime.now(_dt.UTC).date().isoformat()
        self.report_path: Path | None = None
        self.nginx = False
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------ plumbing
    @property
    def pods(self) -> dict[str, Pod]:
        return self.cluster.pods

    def cli(self, argv: Sequence[str], pod: Pod | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``python -m firewall ...`` (inside a pod when given), showing the command line."""
        assert self.n is not None
        self.n.command(["python", "-m", "firewall", *argv], f"[{pod.name}]" if pod else "")
        cmd = [PY, "-m", "firewall", *argv]
        env = dict(os.environ, PYTHONPATH=str(PKG_ROOT))
        if pod is not None:
            return self.cluster.run(pod, cmd, timeout=timeout, env=env, cwd=str(self.workdir))
        return _sh(cmd, check=False, timeout=timeout, env=env, cwd=str(self.workdir))

    def curl(self, pod: Pod, *args: str, show: bool = True) -> subprocess.CompletedProcess:
        if show and self.n:
            self.n.command(["curl", *args], f"[{pod.name}]")
        return self.cluster.run(pod, ["curl", "-s", "-m", "8", *args])

    def set_annotations(self, key: str, **changes: str | None) -> None:
        from firewall.identity.podinfo import write_podinfo

        ann = self.annotations.setdefault(key, {})
        for k, v in changes.items():
            real = {"mode": ANN_MODE, "pcap": ANN_PCAP, "quarantine": ANN_QUARANTINE}[k]
            if v is None:
                ann.pop(real, None)
            else:
                ann[real] = v
        pod = self.pods[key]
        write_podinfo(str(self.workdir / f"podinfo-{key}"), ann, pod.labels)

    def start_sidecars(self, phase: str, policy: Path | None) -> list[Sidecar]:
        scs = []
        for key in ("payments", "db"):
            pod = self.pods[key]
            scs.append(Sidecar(self.cluster, pod, phase, self.workdir / f"{phase}-{key}.eve.json",
                               self.workdir / f"podinfo-{key}", self.workdir / "identity.yaml",
                               self.workdir / f"pcap-{key}", self.dlp_cache, policy))
        for sc in scs:
            sc.wait_ready()
        return scs

    def stop_sidecars(self) -> None:
        """SIGTERM to all sidecars at once (each drains its open flows), then wait for each."""
        running = [p.sidecar for p in self.pods.values() if p.sidecar is not None and p.sidecar.proc.poll() is None]
        for sc in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sc.proc.pid, signal.SIGTERM)
        for sc in running:
            sc.stop()

    # ------------------------------------------------------------ steps
    def step_cluster(self) -> None:
        n = self.n
        assert n is not None
        self.cluster.create()
        pods = {
            "payments": ("payment-api-0", "payments", {"app": "payment-api", LABEL_SCOPE: "cde"}),
            "db": ("payments-db-0", "payments", {"app": "payments-db", LABEL_SCOPE: "cde"}),
            "checkout": ("checkout-0", "shop", {"app": "checkout", LABEL_SCOPE: "connected"}),
            "analytics": ("analytics-0", "analytics", {"app": "analytics", LABEL_SCOPE: "out-of-scope"}),
        }
        for key, (name, ns, labels) in pods.items():
            pod = self.cluster.add_pod(key, name, ns, labels)
            n.say(f"pod [bold]{ns}/{name}[/bold] {pod.ip:<12} scope [magenta]{pod.scope}[/magenta]"
                  f"  (network namespace {pod.netns})")
        ident = [{"ip": p.ip, "namespace": p.namespace, "pod": p.name, "labels": p.labels} for p in self.pods.values()]
        (self.workdir / "identity.yaml").write_text(yaml.safe_dump(ident, sort_keys=False))
        for key in ("payments", "db"):
            pcap = self.workdir / f"pcap-{key}"
            pcap.mkdir()
            os.chown(pcap, 1337, 1337)  # the sidecar drops to UID/GID 1337 and writes captures there
        self.dlp_cache = self.out / ".dlp-cache"
        self.dlp_cache.mkdir(parents=True, exist_ok=True)

        pay, db, ana = self.pods["payments"], self.pods["db"], self.pods["analytics"]
        ng = self.workdir / "nginx"
        ng.mkdir()
        self.access_log = ng / "access.log"
        if shutil.which("nginx"):
            (ng / "nginx.conf").write_text(NGINX_CONF.format(d=ng, port=API_PORT))
            proc = self.cluster.popen(pay, ["nginx", "-c", str(ng / "nginx.conf")], log_name="nginx.log")
            self.nginx = True
        else:
            proc = self.cluster.popen(pay, [PY, "-c", PY_API, str(API_PORT), str(self.access_log)],
                                      log_name="api.log")
        self.cluster.wait_listening(pay, API_PORT, proc)
        n.check(True, f"payment API ({'nginx' if self.nginx else 'python http.server'}) listening on "
                      f"{pay.ip}:{API_PORT}")
        ssh = self.workdir / "ssh"
        ssh.mkdir()
        _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "hostkey")])
        (ssh / "sshd_config").write_text(f"Port {SSH_PORT}\nHostKey {ssh}/hostkey\nPidFile {ssh}/sshd.pid\n"
                                         "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n")
        os.makedirs("/run/sshd", exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        proc = self.cluster.popen(pay, [sshd, "-D", "-e", "-f", str(ssh / "sshd_config")], log_name="sshd.log")
        self.cluster.wait_listening(pay, SSH_PORT, proc)
        n.check(True, f"sshd listening on {pay.ip}:{SSH_PORT} (left there by someone debugging)")
        rd = self.workdir / "redis"
        rd.mkdir()
        proc = self.cluster.popen(db, ["redis-server", "--port", str(REDIS_PORT), "--bind", "0.0.0.0",
                                       "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                       "--dir", str(rd)], log_name="redis.log")
        self.cluster.wait_listening(db, REDIS_PORT, proc)
        n.check(True, f"Redis listening on {db.ip}:{REDIS_PORT}")
        self.collected = self.workdir / "analytics-received.txt"
        proc = self.cluster.popen(ana, [PY, "-c", COLLECTOR, str(COLLECT_PORT), str(self.collected)],
                                  log_name="collector.log")
        self.cluster.wait_listening(ana, COLLECT_PORT, proc)
        n.check(True, f"analytics collector listening on {ana.ip}:{COLLECT_PORT}")

    def _inject(self) -> None:
        n = self.n
        assert n is not None
        for key in ("payments", "db"):
            pod = self.pods[key]
            n.command(["python", "-m", "firewall", "redirect", "apply"], f"[{pod.name}]")
            r = self.cluster.run(pod, [PY, "-m", "firewall", "redirect", "apply"], timeout=30,
                                 env=dict(os.environ, PYTHONPATH=str(PKG_ROOT)))
            n.check(r.returncode == 0, f"{pod.name}: nftables table inet palisade and policy routing installed"
                    + ("" if r.returncode == 0 else f" (rc {r.returncode}: {r.stderr.strip()[-300:]})"))

    def _traffic_learn(self) -> None:
        pay, db, chk, ana = (self.pods[k] for k in ("payments", "db", "checkout", "analytics"))
        for i in range(3):
            r = self.curl(chk, "-X", "POST", "-d", f"order={1000 + i}&amount=4{i}.00", "-o", "/dev/null",
                          "-w", "%{http_code}", f"http://{pay.ip}:{API_PORT}/v1/charge", show=i == 0)
            self.n.check(r.stdout == "200", f"checkout -> payment-api POST /v1/charge: HTTP {r.stdout or r.returncode}")
        for i, args in enumerate((["SET", "order:1000", "charged"], ["GET", "order:1000"])):
            cmd = ["redis-cli", "-h", db.ip, "-p", str(REDIS_PORT), *args]
            if i == 0:
                self.n.command(cmd, f"[{pay.name}]")
            r = self.cluster.run(pay, cmd)
            self.n.check(r.returncode == 0 and r.stdout.strip() in ("OK", "charged"),
                         f"payment-api -> payments-db redis {args[0]}: {r.stdout.strip() or r.stderr.strip()}")
        for i in range(2):
            r = self.curl(pay, "-X", "POST", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"event": "charge", "count": i + 1}), "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://{ana.ip}:{COLLECT_PORT}/collect", show=i == 0)
            self.n.check(r.stdout == "200", f"payment-api -> analytics POST /collect: HTTP {r.stdout or r.returncode}")
        r = self.ssh(chk, pay)
        self.n.check(r.returncode != 0, "checkout -> payment-api ssh: someone tried to log in (auth failed, "
                                        "but the session was recorded)")

    def ssh(self, src: Pod, dst: Pod) -> subprocess.CompletedProcess:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "ConnectTimeout=5", "-p", str(SSH_PORT), f"nobody@{dst.ip}", "true"]
        self.n.command(cmd, f"[{src.name}]")
        return self.cluster.run(src, cmd, timeout=20)

    def step_learn(self) -> None:
        n = self.n
        assert n is not None
        self._inject()
        for key in ("payments", "db"):
            self.set_annotations(key, mode="learn")
        n.say(f"annotation [yellow]{ANN_MODE}: learn[/yellow] on both CDE pods; no policy loaded yet")
        scs = self.start_sidecars("learn", None)
        n.check(True, "sidecars ready (listeners bound as root, then dropped to UID 1337)")
        self._traffic_learn()
        pay_sc, db_sc = scs
        flows = pay_sc.wait_flows(lambda f: True, 8, "8 flow records from the payment-api sidecar")
        db_sc.wait_flows(lambda f: f.get("dest_port") == REDIS_PORT, 2, "2 flow records from the payments-db sidecar")
        n.check(all(f.get("mode") == "learn" and f.get("verdict") == "allow" for f in flows),
                f"{len(flows)} flows recorded in learn mode, all allowed, with app_proto "
                f"{sorted({f.get('app_proto') for f in flows})}")
        self.stop_sidecars()
        ev_dir = self.out / "events"
        ev_dir.mkdir(exist_ok=True)
        learn_events = []
        for sc in scs:
            learn_events.append(str(ev_dir / sc.events_path.name))
            shutil.copyfile(sc.events_path, learn_events[-1])
        learned = self.out / "learned-policy.yaml"
        r = self.cli(["policy", "learn", "--events", *learn_events, "-o", str(learned)])
        n.check(r.returncode == 0 and learned.exists(), f"policy learn wrote {learned}"
                + ("" if r.returncode == 0 else f": {r.stderr.strip()}"))
        text = learned.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        by_app = {d["spec"]["selector"]["matchLabels"].get("app"): d for d in docs}
        n.check(set(by_app) == {"payment-api", "payments-db"},
                f"one FirewallPolicy per workload: {', '.join(d['metadata']['name'] for d in docs)}")
        ing = by_app["payment-api"]["spec"].get("ingress", [])
        http = [r for r in ing if r.get("appProto") == "http"]
        n.check(bool(http) and http[0].get("http") == [{"methods": ["POST"], "pathPrefix": "/v1/charge"}],
                "checkout -> payment-api learned as: HTTP POST /v1/charge on 9000 only")
        eg = {r.get("appProto") for r in by_app["payment-api"]["spec"].get("egress", [])}
        n.check({"redis", "http"} <= eg, "egress learned: redis to payments-db, http to analytics")
        reviewed, nj = review_learned(text, self.today)
        poldir = self.out / "policies"
        poldir.mkdir(exist_ok=True)
        (poldir / "payments-learned-reviewed.yaml").write_text(reviewed)
        (poldir / "baseline.yaml").write_text(GUARDRAILS.format(today=self.today))
        n.say(f"reviewed: {nj} rules got a business justification, last-reviewed {self.today}; plus the guard "
              "rails (no SSH into containers, no clear card numbers out of the CDE)")
        r = self.cli(["policy", "validate", str(poldir)])
        n.check(r.returncode == 0, f"policy validate: {r.stdout.strip() or r.stderr.strip()}")
        self.policy_dir = poldir
        # what the sidecar reads is a copy in the world-readable work dir: it re-reads the files after
        # dropping to UID 1337 (a mounted ConfigMap in Kubernetes), and --out may be under /root
        self.runtime_policy = self.workdir / "policies"
        shutil.copytree(poldir, self.runtime_policy)

    def step_protect(self) -> None:
        n = self.n
        assert n is not None
        for key in ("payments", "db"):
            self.set_annotations(key, mode=None)
        n.say(f"annotation {ANN_MODE} removed; sidecars restarted with the policies of {self.policy_dir}")
        self.sidecars = self.start_sidecars("protect", self.runtime_policy)
        pay, chk, ana = self.pods["payments"], self.pods["checkout"], self.pods["analytics"]
        sc = self.sidecars[0]
        url = f"http://{pay.ip}:{API_PORT}/v1/charge"
        r = self.curl(chk, "-X", "POST", "-d", "order=2000&amount=12.00", "-o", "/dev/null", "-w", "%{http_code}", url)
        n.check(r.stdout == "200", f"checkout -> payment-api POST /v1/charge: HTTP {r.stdout or 'no answer'} (allowed)")
        f = sc.wait_flows(lambda f: f.get("src_ip") == chk.ip and f.get("dest_port") == API_PORT, 1,
                          "the checkout flow record")[-1]
        n.check(f["verdict"] == "allow" and f["rule"] not in ("learn", "default-allow"),
                f"flow record: verdict {f['verdict']}, rule {f['rule']}, {f['src_workload'].get('scope')} -> "
                f"{f['dest_workload'].get('scope')}")
        r = self.curl(chk, "-o", "/dev/null", "-w", "%{http_code}", f"http://{pay.ip}:{API_PORT}/admin/users")
        n.check(r.stdout == "403", f"checkout -> payment-api GET /admin/users: HTTP {r.stdout or 'no answer'} "
                                   "(never learned: the sidecar answers 403, nginx never sees it)")
        r = self.curl(ana, "-X", "POST", "-d", "amount=1", "-w", "%{http_code}", url)
        n.check(r.returncode in (7, 52, 56) and "200" not in r.stdout,
                f"analytics -> payment-api: connection {'reset' if r.returncode != 7 else 'refused'} "
                f"(curl exit {r.returncode})")
        f = sc.wait_flows(lambda f: f.get("src_ip") == ana.ip, 1, "the analytics flow record")[-1]
        n.check(f["verdict"] == "deny" and f["rule"] == "cde-segmentation",
                f"flow record: verdict {f['verdict']}, rule {f['rule']} (out-of-scope may never reach the CDE)")
        a = sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_ip") == ana.ip, "the deny alert")
        n.check(a["alert"]["action"] == "blocked", f"alert: {a['alert']['signature']} {a['alert']['action']}")
        log = self.access_log.read_text() if self.access_log.exists() else ""
        n.check(ana.ip not in log, "the payment API's access log has no line from analytics: not one byte arrived")
        r = self.ssh(chk, pay)
        n.check(r.returncode != 0, "checkout -> payment-api ssh: refused")
        f = sc.wait_flows(lambda f: f.get("dest_port") == SSH_PORT, 1, "the ssh flow record")[-1]
        n.check(f["verdict"] == "deny" and f["app_proto"] == "ssh" and f["rule"] == "no-ssh-into-containers",
                f"flow record: app_proto {f['app_proto']}, verdict {f['verdict']}, rule {f['rule']} "
                "(the cluster baseline beats the learned allow)")

    def step_dlp(self) -> None:
        n = self.n
        assert n is not None
        pay, ana = self.pods["payments"], self.pods["analytics"]
        sc = self.sidecars[0]
        before = self.collected.read_text() if self.collected.exists() else ""
        body = json.dumps({"event": "charge", "order": 2000, "card": TEST_PAN, "exp": "12/29"})
        r = self.curl(pay, "-X", "POST", "-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}",
                      f"http://{ana.ip}:{COLLECT_PORT}/collect")
        code = r.stdout.strip().rsplit("\n", 1)[-1]
        n.check(code == "403", f"payment-api -> analytics POST /collect with a card number: HTTP {code or 'none'} "
                               "(the egress rule allows the flow; DLP blocks the request)")
        a = sc.wait_event(lambda e: e.get("event_type") == "alert" and e["alert"].get("category") == "dlp",
                          "the DLP alert")
        d = a.get("dlp", {})
        n.check(a["alert"]["action"] == "blocked" and d.get("masked") == TEST_PAN_MASKED,
                f"alert: {a['alert']['signature']} {a['alert']['action']}, {d.get('rule_id')} "
                f"value {d.get('masked')} (first 6 / last 4, PCI DSS 3.4.1)")
        wait_until(lambda: self.collected.exists() and len(self.collected.read_text()) > len(before), 10,
                   "the collector to log the connection")
        got = self.collected.read_text()[len(before):]
        n.check("[PAN-RECEIVED" not in got, "the analytics collector received the request head but no card number")
        leaked = [p.name for p in self.workdir.glob("*.eve.json") if TEST_PAN in p.read_text(errors="replace")]
        leaked += [p.name for p in self.workdir.glob("*.log") if TEST_PAN in p.read_text(errors="replace")]
        n.check(not leaked, "no event file and no log holds the full number")
        f = sc.wait_flows(lambda f: f.get("dest_port") == COLLECT_PORT and f.get("close_reason") == "dlp-block", 1,
                          "the blocked flow record")[-1]
        n.check(f["verdict"] == "deny", f"flow record: verdict {f['verdict']}, close_reason {f['close_reason']}")

    def step_capture(self) -> None:
        n = self.n
        assert n is not None
        pay, chk = self.pods["payments"], self.pods["checkout"]
        sc = self.sidecars[0]
        self.set_annotations("payments", pcap=CAPTURE_SPEC)
        n.say(f'annotation [yellow]{ANN_PCAP}: "{CAPTURE_SPEC}"[/yellow] on payment-api-0 (the kubelet swaps '
              "the downward-API files; the sidecar watches the directory)")
        st = sc.wait_event(lambda e: e.get("event_type") == "pcap" and e["pcap"]["state"] == "started",
                           "the capture to start")["pcap"]
        n.check(st["trigger"] == {"annotation": CAPTURE_SPEC}, f"capture {st['id']} started")
        url = f"http://{pay.ip}:{API_PORT}/v1/charge"

        def finished() -> dict | None:
            ev = [e["pcap"] for e in sc.events("pcap") if e["pcap"]["id"] == st["id"]
                  and e["pcap"]["state"] in ("finished", "failed")]
            if ev:
                return ev[0]
            self.curl(chk, "-X", "POST", "-d", "amount=3", "-o", "/dev/null", url, show=False)
            return None

        fin = wait_until(finished, 20, "the capture to finish", interval=0.2)
        n.check(fin["state"] == "finished" and fin.get("reason") == "max-packets",
                f"capture {fin['state']}: {fin['packets']} packets, {fin['bytes']} bytes, reason {fin.get('reason')}")
        src = Path(fin["dir"]) / fin["files"][0]
        dst = self.out / "captures" / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
        n.command(["tcpdump", "-nn", "-r", str(dst)])
        r = _sh(["tcpdump", "-nn", "-r", str(dst)], check=False)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        n.check(r.returncode == 0 and len(lines) == fin["packets"] and all(".9000" in ln for ln in lines),
                f"tcpdump read {len(lines)} packets, all port 9000")
        for ln in lines[:3]:
            n.say(f"[dim]{ln[:110]}[/dim]")

    def step_quarantine(self) -> None:
        n = self.n
        assert n is not None
        pay, db, chk = self.pods["payments"], self.pods["db"], self.pods["checkout"]
        sc = self.sidecars[0]
        holder = self.cluster.popen(chk, [PY, "-c", HOLDER, pay.ip, str(API_PORT)], stdout=subprocess.PIPE)
        first = holder.stdout.readline().decode().strip() if holder.stdout else ""
        n.check(first == "HTTP/1.1 200 OK", "checkout holds an open keep-alive connection to payment-api")
        self.set_annotations("payments", quarantine="true")
        n.say(f'annotation [yellow]{ANN_QUARANTINE}: "true"[/yellow] on payment-api-0')
        t0 = time.monotonic()
        ended = holder.stdout.readline().decode().strip() if holder.stdout else ""
        n.check(ended in ("reset", "closed"), f"the open connection was cut ({ended}) after "
                                              f"{time.monotonic() - t0:.1f}s")
        sc.wait_event(lambda e: e.get("event_type") == "quarantine" and e["quarantine"]["state"] == "on",
                      "the quarantine event")
        url = f"http://{pay.ip}:{API_PORT}/v1/charge"
        r = self.curl(chk, "-X", "POST", "-d", "amount=4", url)
        n.check(r.returncode in (7, 52, 56), f"new connection checkout -> payment-api refused (curl exit {r.returncode})")
        cmd = ["redis-cli", "-h", db.ip, "-p", str(REDIS_PORT), "GET", "order:1000"]
        self.n.command(cmd, f"[{pay.name}]")
        r = self.cluster.run(pay, cmd)
        said = (r.stdout.strip() or r.stderr.strip()).splitlines()
        n.check("charged" not in r.stdout and (r.returncode != 0 or "error" in r.stdout.lower()),
                f"payment-api -> payments-db cut too ({said[0][:70] if said else 'no answer'}): "
                "the pod is cut off both ways")
        self.set_annotations("payments", quarantine=None)
        n.say(f"annotation {ANN_QUARANTINE} removed")
        sc.wait_event(lambda e: e.get("event_type") == "quarantine" and e["quarantine"]["state"] == "off",
                      "the quarantine-off event")
        wait_until(lambda: self.curl(chk, "-X", "POST", "-d", "amount=5", "-o", "/dev/null", "-w", "%{http_code}",
                                     url, show=False).stdout == "200", 10, "traffic to come back")
        n.check(True, "quarantine lifted: checkout -> payment-api answers 200 again")

    def step_segtest(self) -> None:
        n = self.n
        assert n is not None
        pay, db, ana = self.pods["payments"], self.pods["db"], self.pods["analytics"]
        plan = [{"source": "analytics", "scope": "out-of-scope", "targets": [
            {"name": "payments/payment-api", "address": pay.ip, "ports": [API_PORT, SSH_PORT], "scope": "cde"},
            {"name": "payments/payments-db", "address": db.ip, "ports": [REDIS_PORT], "scope": "cde"}]}]
        plan_path = self.out / "segtest-plan.yaml"
        plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        self.segtest_path = self.out / "segtest-analytics.json"
        r = self.cli(["segtest", "--plan", str(plan_path), "--source", "analytics", "-o", str(self.segtest_path),
                      "--timeout", "2"], pod=ana)
        for line in r.stdout.strip().splitlines():
            n.say(f"[dim]{line}[/dim]")
        doc = json.loads(self.segtest_path.read_text()) if self.segtest_path.exists() else {}
        n.check(r.returncode == 0 and doc.get("passed") is True,
                f"segmentation test passed: {doc.get('summary', {}).get('probes')} probes from analytics, "
                f"{doc.get('summary', {}).get('refused')} refused, 0 reachable")

    def step_report(self) -> None:
        n = self.n
        assert n is not None
        self.save_artifacts()
        events = [str(p) for p in sorted((self.out / "events").glob("protect-*.eve.json"))]
        rep = self.out / "report"
        argv = ["report", "--policy", *sorted(str(p) for p in self.policy_dir.glob("*.yaml")),
                "--events", *events, "--identity", str(self.out / "identity.yaml"),
                "--segtest", str(self.segtest_path), "-o", str(rep), "--jobs", "1"]
        if not self.args.pdf:
            argv.append("--no-pdf")
        r = self.cli(argv, timeout=90)
        for line in r.stdout.strip().splitlines():
            n.say(f"[dim]{line}[/dim]")
        html = rep / "report.html"
        n.check(r.returncode == 0 and html.exists() and (rep / "report.json").exists(),
                "report.html and report.json written" + ("" if r.returncode == 0 else f": {r.stderr.strip()}"))
        text = html.read_text(errors="replace") + (rep / "report.json").read_text(errors="replace")
        n.check(TEST_PAN not in text and TEST_PAN_MASKED in text,
                f"the DLP finding is in the report, masked ({TEST_PAN_MASKED})")
        self.report_path = html
        code, body = self.sidecars[0].admin_get("/metrics")
        for m in re.finditer(r"^(palisade_(?:connections_total|dlp_findings_total|alerts_total)\{[^}]*\}) (\S+)$",
                             body, re.M):
            self.metrics[m.group(1)] = float(m.group(2))
        n.check(code == 200 and any("verdict=\"deny\"" in k for k in self.metrics),
                f"/metrics on :{ADMIN_PORT} counts the denies and DLP findings ({len(self.metrics)} series)")

    # ------------------------------------------------------------ driver
    STEPS: list[tuple[str, str, str]] = [
        ("step_cluster", "A small cluster of network namespaces",
         "Four pods on one bridge: the payment API and its Redis database are in the cardholder-data "
         "environment (CDE), checkout is connected to it, analytics is out of scope. Real servers: nginx "
         "(or Python's http.server when nginx is missing), sshd, redis-server and an HTTP collector."),
        ("step_learn", "Learn mode: record the traffic, export a policy",
         "The init container installs the nftables steering rules, the sidecar starts in learn mode and every "
         "connection becomes a flow record. `policy learn` turns the records into one FirewallPolicy per "
         "workload; the application team reviews it and adds the platform's guard rails."),
        ("step_protect", "Protect mode: segmentation and least privilege",
         "The same pods restart with the reviewed policy. Checkout may charge; anything that was never seen is "
         "refused; an out-of-scope pod never reaches the CDE; SSH is denied by the cluster baseline."),
        ("step_dlp", "DLP: a card number in clear text leaving the CDE",
         "The payment API posts an order with a card number to the analytics collector. The flow itself is "
         "allowed, the content is not: Hyperscan finds the number in the stream before it is forwarded."),
        ("step_capture", "An annotation starts a packet capture",
         "An SRE annotates the pod; the sidecar captures exactly the bounded slice asked for into a pcap "
         "file that tcpdump, tshark and Wireshark read."),
        ("step_quarantine", "Quarantine cuts a pod off",
         "One annotation denies every new flow in and out of the pod and cuts the open ones; removing it "
         "restores service."),
        ("step_segtest", "Segmentation test (PCI DSS 11.4.5)",
         "From the out-of-scope namespace, try every CDE port and record what happens: the proof that "
         "segmentation works, not just that it is configured."),
        ("step_report", "The auditor's evidence pack",
         "Policies, flow records, DLP findings (masked) and the segmentation test, in one self-contained "
         "HTML page and its JSON."),
    ]

    def run(self) -> int:
        from rich.panel import Panel

        with Narrator(len(self.STEPS), quiet=self.args.quiet) as n:
            self.n = n
            n.console.print(Panel.fit(
                "[bold]Palisade demo[/bold]: an inline firewall + DLP sidecar, in network namespaces on this "
                f"machine.\nArtifacts go to [bold]{self.out}[/bold]; everything else is removed at the end.",
                border_style="cyan"))
            for method, title, story in self.STEPS:
                res = n.step(title, story)
                t0 = time.monotonic()
                try:
                    getattr(self, method)()
                except Exception as exc:  # noqa: BLE001 - a step that breaks is a failed step, not a traceback
                    msg = str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"
                    n.done(res, t0, msg)
                    self.show_logs()
                    if method in ("step_cluster", "step_learn", "step_protect"):
                        break  # later steps need these
                    continue
                n.done(res, t0)
        n.console.print(n.table())
        for k, v in sorted(self.metrics.items()):
            n.console.print(f"  [dim]{k} {v:g}[/dim]")
        ok = len(n.results) == len(self.STEPS) and all(r.ok for r in n.results)
        if self.report_path:
            n.console.print(f"\nAuditor report: [bold]{self.report_path}[/bold]")
        n.console.print(f"Artifacts (policies, events, capture, segmentation test, report): [bold]{self.out}[/bold]")
        n.console.print("[bold green]Every step behaved as narrated.[/bold green]" if ok
                        else "[bold red]Some steps did not behave as narrated (see above).[/bold red]")
        if not ok and self.args.quiet:
            for r in n.results:
                if not r.ok:
                    print(f"demo: step failed: {r.title}: {mask_text(r.error)}", file=sys.stderr)
        return 0 if ok else 1

    def show_logs(self) -> None:
        assert self.n is not None
        for pod in self.pods.values():
            if pod.sidecar is not None:
                tail = pod.sidecar.log_tail()
                if tail:
                    self.n.console.print(f"  [dim]{pod.name} sidecar log: {tail}[/dim]")

    def save_artifacts(self) -> None:
        """Copy the identity file, event files and logs (digit runs masked) from the work dir to --out."""
        for sub in ("events", "logs"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        if (self.workdir / "identity.yaml").exists():
            shutil.copyfile(self.workdir / "identity.yaml", self.out / "identity.yaml")
        for p in self.workdir.glob("*.eve.json"):
            shutil.copyfile(p, self.out / "events" / p.name)
        for p in self.workdir.glob("*.log"):
            (self.out / "logs" / p.name).write_text(mask_text(p.read_text(errors="replace")))

    def finish(self) -> None:
        """Stop the sidecars gently (their captures and flows finish), keep the artifacts, remove the rest.

        With --keep everything stays up (the sidecars too: without them the pods fail closed)."""
        if self.args.keep:
            with contextlib.suppress(OSError):
                self.save_artifacts()
            return
        with contextlib.suppress(Exception):
            self.stop_sidecars()
        with contextlib.suppress(OSError):
            self.save_artifacts()
        self.cluster.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def _preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SetupError("run as root: the demo creates network namespaces and nftables rules "
                         "(on a fresh machine: sudo bash scripts/demo.sh)")
    missing = [t for t in NEEDED_TOOLS if not shutil.which(t) and not os.path.exists(f"/usr/sbin/{t}")]
    if not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
        missing.append("sshd")
    if missing:
        raise SetupError(f"missing tools: {', '.join(missing)} (bash scripts/install.sh installs them)")
    if not re.fullmatch(r"[a-z][a-z0-9]{1,7}", args.prefix):
        raise SetupError("--prefix: 2-8 lowercase letters/digits, starting with a letter")
    if not 1 <= args.subnet_octet <= 254:
        raise SetupError("--subnet-octet: 1-254")


def _lock() -> Any:
    fh = open(LOCK_FILE, "w")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise SetupError(f"another demo is running (lock {LOCK_FILE} is held)") from None
    return fh


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    from firewall.lab import demo_runtime
    try:
        _preflight(args)
        demo_runtime.preflight(args)
        lock = _lock()
    except SetupError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    try:
        gone = remove_namespaces(args.prefix)
        if args.cleanup:
            print(f"demo: removed {len(gone)} leftovers: {' '.join(gone) or '(none)'}")
            return 0
        if gone:
            print(f"demo: removed leftovers of a previous run: {' '.join(gone)}")
        out = Path(args.out)
        for sub in ("policies", "events", "captures", "report", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
        demo = demo_runtime.demo_class(args)(args)
        t0 = time.monotonic()
        try:
            rc = demo.run()
        except KeyboardInterrupt:
            print("\ndemo: interrupted, cleaning up", file=sys.stderr)
            rc = 130
        finally:
            try:
                demo.finish()
            except KeyboardInterrupt:  # a second Ctrl-C during cleanup: finish the cleanup anyway
                demo.cluster.close()
            for s, h in old.items():
                signal.signal(s, h)
        if args.keep and rc != 130:
            print(f"demo: --keep: the pods and sidecars are still up, e.g.\n"
                  f"  ip netns exec {args.prefix}-checkout curl -X POST http://10.{args.subnet_octet}.0.2:{API_PORT}"
                  f"/v1/charge\n  ip netns exec {args.prefix}-analytics curl http://10.{args.subnet_octet}.0.2:{API_PORT}/"
                  f"   (reset: out of scope)\nremove them with: python -m firewall demo --cleanup")
        print(f"demo: finished in {time.monotonic() - t0:.0f}s")
        return rc
    finally:
        lock.close()


EPILOG = """\
what it shows, each step checked (exit 1 if any step does not behave as narrated):
  1. pods as network namespaces: payment API (nginx) + Redis in the CDE, checkout (connected),
     analytics (out of scope)
  2. learn mode records flows; `policy learn` exports a policy; it is reviewed and validated
  3. protect mode: checkout -> payments allowed, analytics -> payments denied, SSH denied
  4. a card number posted in clear to an out-of-scope service is blocked; the alert shows it masked
  5. the palisade.dev/pcap annotation starts a capture that `tcpdump -r` reads
  6. the palisade.dev/quarantine annotation cuts the pod off (and lifting it restores service)
  7. `segtest` proves the out-of-scope namespace cannot reach the CDE
  8. `report` writes the auditor evidence pack; its path is printed

needs root (network namespaces, nftables) and: ip, nft, curl, redis-server, redis-cli, tcpdump,
sshd, ssh, ssh-keygen (nginx if present, else a Python HTTP server). scripts/demo.sh installs them.

examples:
  sudo python -m firewall demo                      run it; artifacts in ./demo-out
  sudo python -m firewall demo --out /tmp/tour      artifacts elsewhere
  sudo python -m firewall demo --keep               leave the pods running to explore
  sudo ip netns exec pdemo-checkout curl -X POST http://10.180.0.2:9000/v1/charge
  sudo python -m firewall demo --cleanup            remove what --keep (or a crash) left behind

exit codes: 0 every step as narrated; 1 a step misbehaved; 2 cannot run here; 130 interrupted.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="guided tour: pods as network namespaces, the real sidecar, every capability checked",
        description="Build a small cluster of network namespaces on this machine (a CDE payment API with the "
                    "sidecar, a connected checkout, an out-of-scope analytics pod, Redis in the CDE) and walk "
                    "through learn mode, protect mode, DLP, captures, quarantine, the segmentation test and the "
                    "auditor report, checking each step. Takes under two minutes; removes everything it "
                    "created on exit, on Ctrl-C and on SIGTERM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="where the policies, events, capture, segmentation results and report go "
                        "(default ./demo-out)")
    p.add_argument("--keep", action="store_true", help="leave the namespaces, servers and sidecars running")
    p.add_argument("--cleanup", action="store_true",
                   help="only remove the namespaces and processes of a previous run, then exit")
    p.add_argument("--pdf", action="store_true", help="also print report.pdf with headless Chromium (slower)")
    p.add_argument("--quiet", action="store_true", help="print only failed steps (the exit status says the rest)")
    p.add_argument("--prefix", default="pdemo", help="namespace name prefix (default pdemo)")
    p.add_argument("--subnet-octet", type=int, default=180, metavar="N",
                   help="pods get 10.N.0.0/24 addresses (default 180)")
    p.add_argument("--runtime", choices=("netns", "podman"), default="netns",
                   help="where the CDE pods' init container and sidecar run: host processes in the pods' "
                        "namespaces (default) or containers from the image (podman; see docs/platform.md)")
    p.add_argument("--image", help="image for --runtime podman (default localhost/palisade:dev, "
                                   "built by scripts/image.sh)")
    p.set_defaults(func=main)
