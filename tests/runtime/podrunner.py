"""Run a Kubernetes Pod spec with podman the way the kubelet would, for end-to-end tests.

The spec comes from the injector itself (:func:`injected_pod`: AdmissionReview -> ``mutate`` ->
JSON patch applied), never written by hand, so the tests run what a cluster would run.

What the runner does, in the kubelet's order:

* sandbox: a network namespace on the test's bridge (``tests.harness.Cluster``) with the pod IP,
  and a podman pod (no infra container) grouping the containers so ``podman pod stop`` works;
  pod-level ``sysctls`` are written into that namespace, as the runtime does for the sandbox;
* volumes: ``emptyDir`` (host directory, tmpfs for ``medium: Memory``), ``configMap``/``secret``
  from a host directory the test names (absent + ``optional`` -> empty directory, as the kubelet
  does), ``downwardAPI`` written with the kubelet's atomic ``..data`` symlink swap and rewritten
  by :meth:`PodRunner.set_annotations`;
* init containers in order, each to completion; native sidecars (``restartPolicy: Always``) are
  started and left running once their startupProbe passes, before the next init container;
* containers in order; a ``postStart`` hook blocks the next container, like the kubelet's;
* ``securityContext``: user/group, ``runAsNonRoot`` checked against the image's user,
  capabilities add/drop on top of containerd's default set, ``allowPrivilegeEscalation: false``
  -> no-new-privileges, ``readOnlyRootFilesystem`` (without podman's extra tmpfs mounts),
  seccomp (no profile = Unconfined, as in Kubernetes; ``RuntimeDefault`` = podman's). Through
  :mod:`tests.runtime.oci_no_ambient` no container gets ambient capabilities, as in Kubernetes;
* env ``value`` and ``fieldRef``; probes (httpGet/tcpSocket/exec) run from the node's address
  against the pod IP; ``restartPolicy`` restarts exited or liveness-failed containers.

Any field the runner does not know how to honour raises :class:`Unsupported` before anything
starts: a test never silently runs a different pod than the spec says.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firewall.identity.podinfo import format_downward, write_podinfo_files

HERE = Path(__file__).resolve().parent
OCI_WRAPPER = HERE / "oci_no_ambient.py"

# containerd's (and CRI-O's) default capability set for a container that adds/drops nothing.
RUNTIME_DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
                        "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
                        "AUDIT_WRITE")

# Fields the runner honours; anything else is an error. Scheduling-only fields are accepted
# because a kubelet receives the pod already bound to its node: nothing is left to honour.
POD_SPEC_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "restartPolicy",
                   "terminationGracePeriodSeconds", "nodeName"}
SCHEDULING_ONLY = {"affinity", "tolerations", "topologySpreadConstraints", "priorityClassName",
                   "nodeSelector", "schedulerName", "serviceAccountName"}
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports",
                    "securityContext", "volumeMounts", "startupProbe", "readinessProbe",
                    "livenessProbe", "restartPolicy", "lifecycle", "resources", "workingDir",
                    "terminationMessagePolicy", "terminationMessagePath"}
SC_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "privileged", "allowPrivilegeEscalation",
             "readOnlyRootFilesystem", "capabilities", "seccompProfile"}
POD_SC_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "sysctls", "seccompProfile"}
PROBE_FIELDS = {"httpGet", "tcpSocket", "exec", "periodSeconds", "timeoutSeconds", "failureThreshold",
                "successThreshold", "initialDelaySeconds"}


class Unsupported(AssertionError):
    """The spec asks for something this runner cannot do faithfully: the test must fail."""


class PodFailed(AssertionError):
    """A container or probe failed the way a kubelet would report it (CrashLoop, Unready...)."""


def _sh(cmd: list[str], check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}...: rc={proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def injected_pod(pod: dict, namespace: str, config: Any) -> dict:
    """The pod the API server would store: the injector's ``mutate`` on a CREATE review, patched."""
    import jsonpatch

    from injector.review import mutate

    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "runtime-test", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE", "namespace": namespace, "object": copy.deepcopy(pod)}}
    result = mutate(review, config)
    response = result.review["response"]
    if not response["allowed"]:
        raise AssertionError(f"injector rejected the pod: {response['status']['message']}")
    assert result.patch, f"injector did not inject: {result.reason}"
    out = jsonpatch.apply_patch(copy.deepcopy(pod), result.patch)
    out.setdefault("metadata", {})["namespace"] = namespace
    return out


def _only(obj: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise Unsupported(f"{where}: the runtime test runner cannot honour {extra}")


@dataclass
class Probe:
    """One kubelet probe; ``check`` returns True on success."""

    kind: str
    spec: dict
    period: float
    timeout: float
    failures: int
    initial_delay: float


@dataclass
class Container:
    spec: dict
    init: bool
    cid: str = ""
    restarts: int = 0
    probes: dict[str, Probe] = field(default_factory=dict)
    live_failures: int = 0
    ready: bool = False


class PodRunner:
    """One pod. ``node`` is a harness Pod acting as the node (probe source, HOST_IP).

    ``volumes_from`` maps a ConfigMap/Secret name to a host directory with its keys as files.
    """

    def __init__(self, pod: dict, netns_pod: Any, node: Any, volumes_from: dict[str, Path] | None = None,
                 workdir: Path | None = None, backoff: float = 1.0) -> None:
        self.pod = copy.deepcopy(pod)
        self.meta = self.pod.get("metadata") or {}
        self.spec = self.pod.get("spec") or {}
        self.net = netns_pod
        self.node = node
        self.name = f"{netns_pod.cluster.prefix}-{self.meta.get('name', 'pod')}"
        self.volumes_from = volumes_from or {}
        self.workdir = Path(workdir or netns_pod.cluster.tmp) / self.name
        self.backoff = backoff
        self.mounts: dict[str, tuple[Path, dict]] = {}
        self.containers: list[Container] = []
        self.hold_restarts = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log: list[str] = []
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        _only(self.spec, POD_SPEC_FIELDS | SCHEDULING_ONLY | {"automountServiceAccountToken"}, "spec")
        if "serviceAccountName" in self.spec and self.spec.get("automountServiceAccountToken", True) is not False:
            raise Unsupported("spec: a service account token mount (set automountServiceAccountToken: false)")
        _only(self.spec.get("securityContext") or {}, POD_SC_FIELDS, "spec.securityContext")
        if self.spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
            raise Unsupported(f"spec.restartPolicy {self.spec['restartPolicy']!r}")
        for key in ("initContainers", "containers"):
            for c in self.spec.get(key) or []:
                where = f"spec.{key}[{c.get('name')}]"
                _only(c, CONTAINER_FIELDS, where)
                _only(c.get("securityContext") or {}, SC_FIELDS, f"{where}.securityContext")
                if (c.get("securityContext") or {}).get("privileged"):
                    raise Unsupported(f"{where}: privileged containers")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if probe in c:
                        _only(c[probe], PROBE_FIELDS, f"{where}.{probe}")
                        if "httpGet" in c[probe]:
                            _only(c[probe]["httpGet"], {"path", "port", "scheme"}, f"{where}.{probe}.httpGet")
                for m in c.get("volumeMounts") or []:
                    _only(m, {"name", "mountPath", "readOnly"}, f"{where}.volumeMounts[{m.get('name')}]")
                for e in c.get("env") or []:
                    _only(e, {"name", "value", "valueFrom"}, f"{where}.env[{e.get('name')}]")
                    if "valueFrom" in e:
                        _only(e["valueFrom"], {"fieldRef"}, f"{where}.env[{e.get('name')}].valueFrom")
                        self._field(e["valueFrom"]["fieldRef"]["fieldPath"])  # raises if unknown
                lc = c.get("lifecycle") or {}
                _only(lc, {"postStart", "preStop"}, f"{where}.lifecycle")
                for hook in lc.values():
                    _only(hook, {"exec"}, f"{where}.lifecycle")
                res = c.get("resources") or {}
                _only(res, {"requests", "limits"}, f"{where}.resources")
                _only(res.get("limits") or {}, {"cpu", "memory"}, f"{where}.resources.limits")
                _only(res.get("requests") or {}, {"cpu", "memory"}, f"{where}.resources.requests")
                if key == "containers" and "restartPolicy" in c:
                    raise Unsupported(f"{where}: restartPolicy on a regular container")
                if c.get("restartPolicy", "Always") != "Always":
                    raise Unsupported(f"{where}: restartPolicy {c['restartPolicy']!r}")
        for v in self.spec.get("volumes") or []:
            kinds = set(v) - {"name"}
            if len(kinds) != 1 or not kinds <= {"emptyDir", "configMap", "secret", "downwardAPI"}:
                raise Unsupported(f"spec.volumes[{v.get('name')}]: {sorted(kinds)}")
            src = v[next(iter(kinds))] or {}
            if "items" in src and "downwardAPI" not in v:
                raise Unsupported(f"spec.volumes[{v['name']}]: items on a configMap/secret")
            if "downwardAPI" in v:
                for item in src.get("items") or []:
                    _only(item, {"path", "fieldRef"}, f"spec.volumes[{v['name']}].items")
                    if item["fieldRef"]["fieldPath"] not in ("metadata.annotations", "metadata.labels"):
                        self._field(item["fieldRef"]["fieldPath"])

    # ------------------------------------------------------------------ field refs
    def _field(self, path: str) -> str:
        values = {
            "metadata.name": self.meta.get("name", ""),
            "metadata.namespace": self.meta.get("namespace", "default"),
            "metadata.uid": self.meta.get("uid", "00000000-0000-0000-0000-000000000000"),
            "status.podIP": self.net.ip,
            "status.hostIP": self.node.ip,
            "spec.nodeName": self.spec.get("nodeName", "runtime-test-node"),
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
        }
        if path in values:
            return values[path]
        for key in ("labels", "annotations"):
            prefix = f"metadata.{key}['"
            if path.startswith(prefix) and path.endswith("']"):
                return (self.meta.get(key) or {}).get(path[len(prefix):-2], "")
        raise Unsupported(f"fieldRef {path!r}")

    # ------------------------------------------------------------------ volumes
    def _downward_files(self, src: dict) -> dict[str, str]:
        files = {}
        for item in src.get("items") or []:
            path = item["fieldRef"]["fieldPath"]
            if path in ("metadata.annotations", "metadata.labels"):
                files[item["path"]] = format_downward(self.meta.get(path.split(".")[1]) or {})
            else:
                files[item["path"]] = self._field(path)
        return files

    def _make_volumes(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for v in self.spec.get("volumes") or []:
            host = self.workdir / "volumes" / v["name"]
            host.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in v:
                if (v["emptyDir"] or {}).get("medium") == "Memory":
                    size = (v["emptyDir"] or {}).get("sizeLimit", "64Mi").replace("i", "")
                    _sh(["mount", "-t", "tmpfs", "-o", f"size={size.lower()},mode=0777", "tmpfs", str(host)])
                os.chmod(host, 0o777)  # the kubelet's emptyDir mode
            elif "downwardAPI" in v:
                write_podinfo_files(str(host), self._downward_files(v["downwardAPI"]))
            else:
                src = v.get("configMap") or v.get("secret") or {}
                name = src.get("name") or src.get("secretName")
                origin = self.volumes_from.get(name)
                if origin is None:
                    if not src.get("optional", False):
                        raise PodFailed(f"volume {v['name']}: {name} not found and not optional "
                                        "(the kubelet would keep the pod in ContainerCreating)")
                else:
                    files = {p.name: p.read_text() for p in sorted(Path(origin).iterdir()) if p.is_file()}
                    write_podinfo_files(str(host), files)
            self.mounts[v["name"]] = (host, v)

    def set_annotations(self, annotations: dict[str, str]) -> None:
        """Like ``kubectl annotate``: the kubelet rewrites every downwardAPI volume atomically."""
        self.meta["annotations"] = dict(annotations)
        for host, v in self.mounts.values():
            if "downwardAPI" in v:
                write_podinfo_files(str(host), self._downward_files(v["downwardAPI"]))

    def set_config_map(self, name: str, origin: Path) -> None:
        """Like creating or updating the ConfigMap ``name``: the kubelet rewrites its volumes."""
        self.volumes_from[name] = Path(origin)
        files = {p.name: p.read_text() for p in sorted(Path(origin).iterdir()) if p.is_file()}
        for host, v in self.mounts.values():
            src = v.get("configMap") or {}
            if src.get("name") == name:
                write_podinfo_files(str(host), files)

    def volume_path(self, name: str) -> Path:
        return self.mounts[name][0]

    # ------------------------------------------------------------------ containers
    def _image_user(self, image: str) -> str:
        return _sh(["podman", "image", "inspect", "-f", "{{.Config.User}}", image]).stdout.strip()

    def _podman_args(self, c: dict, init: bool) -> list[str]:
        pod_sc = self.spec.get("securityContext") or {}
        sc = {**{k: v for k, v in pod_sc.items() if k != "sysctls"}, **(c.get("securityContext") or {})}
        image = c["image"]
        args = ["--pod", self.name, "--name", f"{self.name}-{c['name']}",
                "--network", f"ns:/run/netns/{self.net.ns}", "--hostname", self.meta.get("name", "pod"),
                "--runtime", str(OCI_WRAPPER), "--pull", "never", "--init=false", "--log-driver", "k8s-file",
                "--label", f"io.kubernetes.container.name={c['name']}"]
        user = self._image_user(image) or "0"
        uid = sc.get("runAsUser", user.split(":")[0])
        gid = sc.get("runAsGroup", user.split(":")[1] if ":" in user else uid)
        if "runAsUser" in sc or "runAsGroup" in sc:
            args += ["--user", f"{uid}:{gid}"]
        if sc.get("runAsNonRoot") and str(uid) in ("0", "root"):
            raise PodFailed(f"container {c['name']}: runAsNonRoot and image will run as root "
                            "(CreateContainerConfigError)")
        caps = set(RUNTIME_DEFAULT_CAPS)
        capspec = sc.get("capabilities") or {}
        _only(capspec, {"add", "drop"}, f"container {c['name']}: capabilities")
        drop = {d.upper() for d in capspec.get("drop") or []}
        caps = set() if "ALL" in drop else caps - drop
        caps |= {a.upper() for a in capspec.get("add") or []}
        args += ["--cap-drop", "ALL"] + (["--cap-add", ",".join(sorted(caps))] if caps else [])
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = (sc.get("seccompProfile") or {}).get("type", "Unconfined")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise Unsupported(f"container {c['name']}: seccompProfile {seccomp}")
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        limits = (c.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            args += ["--memory", _quantity_bytes(limits["memory"])]
        if "cpu" in limits:
            args += ["--cpus", str(_quantity_cpu(limits["cpu"]))]
        for m in c.get("volumeMounts") or []:
            host, _v = self.mounts[m["name"]]
            args += ["-v", f"{host}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        for e in c.get("env") or []:
            value = e["value"] if "value" in e else self._field(e["valueFrom"]["fieldRef"]["fieldPath"])
            args += ["--env", f"{e['name']}={value}"]
        if c.get("workingDir"):
            args += ["--workdir", c["workingDir"]]
        if c.get("command"):
            args += ["--entrypoint", json.dumps(c["command"])]
        args.append(image)
        if c.get("args") is not None:
            args += list(c["args"])
        elif c.get("command"):
            pass  # command without args: the image's CMD is not used (Kubernetes semantics)
        return args

    def _create(self, ct: Container) -> None:
        args = self._podman_args(ct.spec, ct.init)
        if ct.spec.get("command") and ct.spec.get("args") is None:
            # Kubernetes: command set, args unset -> the image's CMD is ignored. podman would
            # append it; an empty argument list after the image does not clear it, so refuse.
            cmd = json.loads(_sh(["podman", "image", "inspect", "-f", "{{json .Config.Cmd}}",
                                  ct.spec["image"]]).stdout or "null")
            if cmd:
                raise Unsupported(f"container {ct.spec['name']}: command without args on an image with CMD")
        ct.cid = _sh(["podman", "create", *args]).stdout.strip()

    def _start(self, ct: Container) -> None:
        _sh(["podman", "start", ct.cid])
        hook = ((ct.spec.get("lifecycle") or {}).get("postStart") or {}).get("exec")
        if hook:
            r = _sh(["podman", "exec", ct.cid, *hook["command"]], check=False, timeout=300)
            if r.returncode != 0:
                raise PodFailed(f"container {ct.spec['name']}: postStart hook failed: {r.stderr[-1000:]}")

    def state(self, ct: Container) -> dict:
        out = _sh(["podman", "inspect", "-f", "{{json .State}}", ct.cid]).stdout
        return json.loads(out)

    def container(self, name: str) -> Container:
        for ct in self.containers:
            if ct.spec["name"] == name:
                return ct
        raise KeyError(name)

    def logs(self, name: str) -> str:
        r = _sh(["podman", "logs", self.container(name).cid], check=False)
        return r.stdout + r.stderr

    def pid(self, name: str) -> int:
        return int(_sh(["podman", "inspect", "-f", "{{.State.Pid}}", self.container(name).cid]).stdout)

    def exec(self, name: str, cmd: list[str], check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
        return _sh(["podman", "exec", self.container(name).cid, *cmd], check=check, **kw)

    # ------------------------------------------------------------------ probes
    def _probe(self, ct: Container, p: dict) -> bool:
        timeout = float(p.get("timeoutSeconds", 1))
        if "exec" in p:
            r = _sh(["podman", "exec", ct.cid, *p["exec"]["command"]], check=False, timeout=timeout + 5)
            return r.returncode == 0
        if "tcpSocket" in p:
            port = self._port(ct, p["tcpSocket"]["port"])
            r = self.node.run(["timeout", str(timeout), "bash", "-c", f"exec 3<>/dev/tcp/{self.net.ip}/{port}"],
                              check=False)
            return r.returncode == 0
        http = p["httpGet"]
        port = self._port(ct, http["port"])
        scheme = http.get("scheme", "HTTP").lower()
        # The kubelet does not verify the serving certificate of an HTTPS probe.
        r = self.node.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(timeout),
                           f"{scheme}://{self.net.ip}:{port}{http.get('path', '/')}"], check=False)
        return r.stdout.strip().isdigit() and 200 <= int(r.stdout.strip()) < 400

    def _port(self, ct: Container, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for decl in ct.spec.get("ports") or []:
            if decl.get("name") == port:
                return int(decl["containerPort"])
        raise Unsupported(f"container {ct.spec['name']}: probe port {port!r} not declared")

    def _wait_probe(self, ct: Container, kind: str) -> None:
        """Until the probe passes. A startupProbe fails the pod after failureThreshold x period, as
        the kubelet would restart it; readiness is waited for at least 30 s (an unready pod is
        not failed by the kubelet, but a test cannot use it). Polled faster than periodSeconds
        so a test does not wait a kubelet period for a container that is already up."""
        p = ct.spec[kind]
        period = float(p.get("periodSeconds", 10))
        time.sleep(float(p.get("initialDelaySeconds", 0)))
        budget = int(p.get("failureThreshold", 3)) * period
        deadline = time.monotonic() + (budget if kind == "startupProbe" else max(budget, 30.0))
        while True:
            if self.state(ct).get("Status") != "running":
                raise PodFailed(f"container {ct.spec['name']} exited before its {kind} passed:\n"
                                f"{self.logs(ct.spec['name'])[-3000:]}")
            if self._probe(ct, p):
                return
            if time.monotonic() > deadline:
                raise PodFailed(f"container {ct.spec['name']}: {kind} still failing after "
                                f"{budget:.0f}s:\n{self.logs(ct.spec['name'])[-3000:]}")
            time.sleep(min(period, 0.5))

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 120) -> PodRunner:
        """Sandbox, volumes, init containers, containers, readiness: a Running, Ready pod."""
        for s in (self.spec.get("securityContext") or {}).get("sysctls") or []:
            self.net.run(["sysctl", "-qw", f"{s['name']}={s['value']}"])
        self._make_volumes()
        _sh(["podman", "pod", "create", "--infra=false", "--name", self.name])
        for c in self.spec.get("initContainers") or []:
            ct = Container(c, init=True)
            self.containers.append(ct)
            self._create(ct)
            if c.get("restartPolicy") == "Always":
                self._start(ct)
                if "startupProbe" in c:
                    self._wait_probe(ct, "startupProbe")
            else:
                _sh(["podman", "start", ct.cid])
                rc = int(_sh(["podman", "wait", ct.cid], timeout=timeout).stdout.strip() or 1)
                if rc != 0:
                    raise PodFailed(f"init container {c['name']} exited {rc} (Init:CrashLoopBackOff):\n"
                                    f"{self.logs(c['name'])[-3000:]}")
        for c in self.spec.get("containers") or []:
            ct = Container(c, init=False)
            self.containers.append(ct)
            self._create(ct)
            self._start(ct)
        for ct in self.running():
            for kind in ("startupProbe", "readinessProbe"):
                if kind in ct.spec and not (ct.init and kind == "startupProbe"):
                    self._wait_probe(ct, kind)
        self._thread = threading.Thread(target=self._supervise, name=f"kubelet-{self.name}", daemon=True)
        self._thread.start()
        return self

    def running(self) -> list[Container]:
        """The long-running containers: native sidecars and regular containers."""
        return [ct for ct in self.containers if not ct.init or ct.spec.get("restartPolicy") == "Always"]

    def _supervise(self) -> None:
        """restartPolicy and liveness, as the kubelet's sync loop (with a short fixed backoff)."""
        policy = self.spec.get("restartPolicy", "Always")
        next_live: dict[str, float] = {}
        while not self._stop.wait(0.2):
            if self.hold_restarts.is_set():
                continue
            for ct in self.running():
                with contextlib.suppress(Exception):
                    st = self.state(ct)
                    if st.get("Status") != "running":
                        always = ct.init or policy == "Always"
                        if always or (policy == "OnFailure" and st.get("ExitCode", 0) != 0):
                            time.sleep(self.backoff)
                            if self._stop.is_set() or self.hold_restarts.is_set():
                                continue
                            self.log.append(f"restart {ct.spec['name']} (exit {st.get('ExitCode')})")
                            ct.restarts += 1
                            ct.live_failures = 0
                            self._start(ct)
                        continue
                    live = ct.spec.get("livenessProbe")
                    if live and time.monotonic() >= next_live.get(ct.cid, 0):
                        next_live[ct.cid] = time.monotonic() + float(live.get("periodSeconds", 10))
                        if self._probe(ct, live):
                            ct.live_failures = 0
                        else:
                            ct.live_failures += 1
                            if ct.live_failures >= int(live.get("failureThreshold", 3)):
                                self.log.append(f"liveness failed: restart {ct.spec['name']}")
                                _sh(["podman", "stop", "-t", str(self._grace()), ct.cid], check=False)

    def _grace(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))

    def wait_restarted(self, name: str, restarts: int, timeout: float = 60) -> None:
        from tests.harness import wait_until

        ct = self.container(name)
        wait_until(lambda: ct.restarts >= restarts and self.state(ct).get("Status") == "running",
                   timeout, what=f"{name} restarted")

    def stop_pod(self, timeout: float = 60) -> subprocess.CompletedProcess:
        """``podman pod stop`` with the pod's grace period (preStop hooks first, as the kubelet)."""
        self._stop.set()
        for ct in reversed(self.running()):
            hook = ((ct.spec.get("lifecycle") or {}).get("preStop") or {}).get("exec")
            if hook:
                _sh(["podman", "exec", ct.cid, *hook["command"]], check=False)
        return _sh(["podman", "pod", "stop", "-t", str(self._grace()), self.name], timeout=timeout, check=False)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        _sh(["podman", "pod", "rm", "-f", "-t", "0", self.name], check=False)
        for host, v in self.mounts.values():
            if "emptyDir" in v and (v["emptyDir"] or {}).get("medium") == "Memory":
                _sh(["umount", "-l", str(host)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _quantity_bytes(q: str) -> str:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, mult in units.items():
        if q.endswith(suffix):
            return str(int(float(q[: -len(suffix)]) * mult))
    return str(int(q))


def _quantity_cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if str(q).endswith("m") else float(q)


def build_test_image(tag: str, containerfile: str, timeout: float = 900) -> None:
    """Build a small image for the test's own workloads (cached by podman's layers)."""
    import tempfile

    with tempfile.TemporaryDirectory() as ctx:
        Path(ctx, "Containerfile").write_text(containerfile)
        _sh(["podman", "build", "--isolation", "chroot", "--layers", "-t", tag, ctx], timeout=timeout)


__all__ = ["PodFailed", "PodRunner", "Unsupported", "build_test_image", "injected_pod"]


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> object:
    from tests.harness import wait_until

    return wait_until(pred, timeout, what=what)
