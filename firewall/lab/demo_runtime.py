"""``python -m firewall demo --runtime podman``: the same eight steps, the CDE pods' init container
and sidecar in real containers from the Palisade image.

The netns demo (the default) runs ``python -m firewall redirect apply`` and ``python -m firewall
run`` as host processes inside each pod's network namespace. Here both run from the image
(``localhost/palisade:dev``, built by ``scripts/image.sh``) with the securityContext the injector
renders: the init container as root with only NET_ADMIN + NET_RAW and no privilege escalation; the
sidecar as UID/GID 1337 with a read-only root filesystem, every capability dropped but those two,
which it gets from the image's file capabilities (podman's ambient capabilities for non-root users
are cleared by the OCI-runtime wrapper of ``tests/runtime`` when the checkout has it). Everything
else (pods, servers, clients, the checks of every step) is the netns demo's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

from firewall.lab import demo as base

DEFAULT_IMAGE = "localhost/palisade:dev"
RUNTIMES = ("netns", "podman")
OCI_WRAPPER = base.PKG_ROOT / "tests" / "runtime" / "oci_no_ambient.py"


def preflight(args: argparse.Namespace) -> None:
    """``SetupError`` unless the chosen runtime can run here (podman + the image)."""
    if getattr(args, "runtime", "netns") != "podman":
        return
    if not shutil.which("podman"):
        raise base.SetupError("--runtime podman: podman is not installed (scripts/install.sh installs it)")
    image = args.image or DEFAULT_IMAGE
    if subprocess.run(["podman", "image", "exists", image], capture_output=True).returncode != 0:
        raise base.SetupError(f"--runtime podman: image {image} not found; build it with: bash scripts/image.sh")


def demo_class(args: argparse.Namespace) -> type[base.Demo]:
    return PodmanDemo if getattr(args, "runtime", "netns") == "podman" else base.Demo


def _runtime_args() -> list[str]:
    return ["--runtime", str(OCI_WRAPPER)] if OCI_WRAPPER.is_file() and shutil.which("runc") else []


class ContainerSidecar(base.Sidecar):
    """The sidecar container: same flags as the netns demo's process, run from the image."""

    def __init__(self, demo: PodmanDemo, pod: base.Pod, phase: str, policy: Path | None) -> None:
        key = pod.key
        events = demo.workdir / f"{phase}-{key}.eve.json"
        log_path = demo.workdir / f"{pod.name}-{phase}-sidecar.log"
        self.name = f"{demo.prefix}-{pod.name}-{phase}"
        demo.containers.append(self.name)
        mounts = sorted({str(demo.workdir), str(demo.out)} | ({str(policy.parent)} if policy else set()))
        cmd = ["podman", "run", "--rm", "--name", self.name, "--network", f"ns:/run/netns/{pod.netns}",
               "--user", "1337:1337", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN,NET_RAW",
               "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp", "--pull", "never",
               "--init=false", *_runtime_args(),
               "--env", f"POD_NAMESPACE={pod.namespace}", "--env", f"POD_NAME={pod.name}",
               "--env", f"POD_IP={pod.ip}"]
        for m in mounts:
            cmd += ["-v", f"{m}:{m}"]
        cmd += ["--entrypoint", "python", demo.image, "-m", "firewall", "run",
                "--events", str(events), "--dlp-cache", str(demo.dlp_cache), "--pod-ip", pod.ip,
                *demo.sidecar_flags(key, policy)]
        # podman run proxies SIGTERM to the container: Sidecar.stop() drains it as before. Not via
        # `ip netns exec` (it remounts /sys, and podman then finds no cgroups): --network joins the pod.
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=str(demo.workdir))
        pod.cluster.procs.append(proc)
        super().__init__(pod, proc, events, log_path)


class PodmanDemo(base.Demo):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.image = args.image or DEFAULT_IMAGE
        self.containers: list[str] = []
        # the sidecar starts as UID 1337 (no root start-up): it creates its files itself
        os.chmod(self.workdir, 0o777)

    def start_sidecars(self, phase: str, policy: Path | None) -> list[base.Sidecar]:
        for path in (self.dlp_cache, *self.workdir.glob("events*"), *self.workdir.glob("podinfo-*")):
            if path.is_dir():
                os.chmod(path, 0o777)
        scs: list[base.Sidecar] = [ContainerSidecar(self, self.pods[key], phase, policy) for key in ("payments", "db")]
        for sc in scs:
            sc.wait_ready()
        return scs

    def _inject(self) -> None:
        """palisade-init: the init container the injector renders (root, NET_ADMIN + NET_RAW only)."""
        n = self.n
        assert n is not None
        for key in ("payments", "db"):
            pod = self.pods[key]
            cmd = ["podman", "run", "--rm", "--network", f"ns:/run/netns/{pod.netns}", "--user", "0:0",
                   "--cap-drop", "ALL", "--cap-add", "NET_ADMIN,NET_RAW", "--security-opt", "no-new-privileges",
                   "--read-only", "--read-only-tmpfs=false", "--pull", "never", "--init=false", *_runtime_args(),
                   "--entrypoint", "python", self.image, "-m", "firewall", "redirect", "apply"]
            n.command(["podman", "run", self.image, "python", "-m", "firewall", "redirect", "apply"],
                      f"[{pod.name}]")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            n.check(r.returncode == 0, f"{pod.name}: palisade-init container installed the redirect rules"
                    + ("" if r.returncode == 0 else f" (rc {r.returncode}: {r.stderr.strip()[-300:]})"))

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.containers and not self.args.keep:
                subprocess.run(["podman", "rm", "-f", "-t", "2", "--ignore", *self.containers],
                               capture_output=True, timeout=120)
