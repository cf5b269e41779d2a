"""``python -m firewall demo``: the guided tour, on this machine, in under two minutes.

Four "pods" are network namespaces on one bridge, built by the same lab as the integration
tests and the benchmarks (``firewall/lab/netns.py``):

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

This module is the plumbing, the driver and the command line; the steps are in
``demo_steps``, the narration and summary table in ``narrator``, the servers' scripts
and policies in ``demo_assets``.

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
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firewall import ANN_MODE, ANN_PCAP, ANN_QUARANTINE
from firewall.lab.demo_assets import API_PORT, NEEDED_TOOLS
from firewall.lab.demo_steps import DemoSteps
from firewall.lab.narrator import DemoError, Narrator, SetupError, mask_digits
from firewall.lab.netns import (
    PKG_ROOT,
    PY,
    Cluster,
    LabError,
    Pod,
    Sidecar,
    python_env,
    remove_namespaces,
    sh,
)

__all__ = ["PKG_ROOT", "Demo", "DemoError", "Pod", "SetupError", "Sidecar", "main", "register"]

LOCK_FILE = "/run/palisade-demo.lock"


def cleanup_leftovers(prefix: str) -> list[str]:
    """Namespaces, processes and veths of an earlier run (the lab), and its work directories.

    The caller holds the demo lock, so no work directory with this prefix is in use."""
    removed = remove_namespaces(prefix)
    for d in Path(tempfile.gettempdir()).glob(f"palisade-{prefix}-*"):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def log_tail(sc: Sidecar, n: int = 8) -> str:
    """The last lines of a sidecar's log on one line, digit runs masked."""
    return mask_digits(" | ".join(sc.stderr().splitlines()[-n:]))


class Demo(DemoSteps):
    """One run of the tour: a lab cluster, its pods' servers and sidecars, and the narrator."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.prefix = args.prefix
        self.workdir = Path(tempfile.mkdtemp(prefix=f"palisade-{self.prefix}-"))
        os.chmod(self.workdir, 0o755)  # the sidecars run as UID 1337 after start-up
        self.cluster: Cluster | None = None  # built by the first step, which narrates it
        self.n: Narrator | None = None
        self.annotations: dict[str, dict[str, str]] = {}
        self.today = _dt.datetime.now(_dt.UTC).date().isoformat()
        self.report_path: Path | None = None
        self.nginx = False
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------ plumbing
    def make_cluster(self) -> Cluster:
        self.cluster = Cluster(self.prefix, self.args.subnet_octet, workdir=self.workdir, unique=False, ipv6=False)
        return self.cluster

    @property
    def pods(self) -> dict[str, Pod]:
        return self.cluster.pods if self.cluster is not None else {}

    def run_in(self, pod: Pod, cmd: Sequence[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
        """A command in the pod whose exit status the step checks itself."""
        return pod.run(cmd, check=False, timeout=timeout, **kw)

    def serve(self, pod: Pod, cmd: Sequence[str], log_name: str) -> subprocess.Popen:
        """A server in the pod, its output in the work directory's ``log_name``."""
        return pod.popen(cmd, log=self.workdir / log_name)

    def cli(self, argv: Sequence[str], pod: Pod | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``python -m firewall ...`` (inside a pod when given), showing the command line."""
        assert self.n is not None
        self.n.command(["python", "-m", "firewall", *argv], f"[{pod.name}]" if pod else "")
        cmd = [PY, "-m", "firewall", *argv]
        env = python_env()
        if pod is not None:
            return self.run_in(pod, cmd, timeout=timeout, env=env, cwd=str(self.workdir))
        return sh(cmd, check=False, timeout=timeout, env=env, cwd=str(self.workdir))

    def curl(self, pod: Pod, *args: str, show: bool = True) -> subprocess.CompletedProcess:
        if show and self.n:
            self.n.command(["curl", *args], f"[{pod.name}]")
        return self.run_in(pod, ["curl", "-s", "-m", "8", *args])

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

    def sidecar_flags(self, key: str, policy: Path | None) -> list[str]:
        """What the injector gives the sidecar container beyond the lab's defaults."""
        pod = self.pods[key]
        flags = ["--podinfo", str(self.workdir / f"podinfo-{key}"), "--identity", str(self.workdir / "identity.yaml"),
                 "--pcap-dir", str(self.workdir / f"pcap-{key}"), "--pod-namespace", pod.namespace,
                 "--pod-name", pod.name, "--drain-timeout", "2", "--no-ipv6"]
        return flags + (["--policy", str(policy)] if policy is not None else [])

    def start_sidecars(self, phase: str, policy: Path | None) -> list[Sidecar]:
        """Both CDE sidecars started at once (the redirect is already in place), then each awaited."""
        scs = []
        for key in ("payments", "db"):
            pod = self.pods[key]
            scs.append(pod.start_sidecar(*self.sidecar_flags(key, policy), apply_redirect=False, wait=False,
                                         events=self.workdir / f"{phase}-{key}.eve.json",
                                         log=self.workdir / f"{pod.name}-{phase}-sidecar.log",
                                         dlp_cache=self.dlp_cache, cwd=self.workdir))
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
            sc.stop(timeout=15)

    # ------------------------------------------------------------ driver
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
                    msg = str(exc) if isinstance(exc, (DemoError, LabError)) else f"{type(exc).__name__}: {exc}"
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
                    print(f"demo: step failed: {r.title}: {mask_digits(r.error)}", file=sys.stderr)
        return 0 if ok else 1

    def show_logs(self) -> None:
        assert self.n is not None
        for pod in self.pods.values():
            if pod.sidecar is not None:
                tail = log_tail(pod.sidecar)
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
            (self.out / "logs" / p.name).write_text(mask_digits(p.read_text(errors="replace")))

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
        if self.cluster is not None:
            self.cluster.close()
        else:
            remove_namespaces(self.prefix)
        shutil.rmtree(self.workdir, ignore_errors=True)



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
        gone = cleanup_leftovers(args.prefix)
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
                if demo.cluster is not None:
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
