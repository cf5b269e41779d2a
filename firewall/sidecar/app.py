"""``python -m firewall run``: the sidecar process.

Start-up order matters for a firewall: load and validate everything first (a bad
policy or DLP pack refuses to start with one clear line), bind the listeners as
root, drop to UID/GID 1337 keeping CAP_NET_ADMIN/CAP_NET_RAW, and only then report
ready.  Reloads (policy, identity, DLP, annotations) build new immutable state
off the hot path and swap one reference.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import signal
import sys
import threading
from typing import Any

from firewall import ANN_MODE, ANN_QUARANTINE
from firewall.identity.identity import Identity
from firewall.observe import metrics
from firewall.observe.events import EventSink
from firewall.sidecar.config import MODES, Config, ConfigError, from_environment, load_config

log = logging.getLogger("palisade")


class StartupError(Exception):
    pass


def _apply_flags(cfg: Config, args: argparse.Namespace) -> Config:
    for name in ("inbound_port", "outbound_port", "dns_port", "admin_port", "uid", "gid", "workers",
                 "idle_timeout", "drain_timeout", "connect_timeout", "identity", "podinfo", "mode",
                 "events", "alert_webhook", "pcap_dir", "pod_namespace", "pod_name", "pod_ip",
                 "dlp_cache", "admin_address", "header_timeout", "identify_timeout", "relay"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    if args.policy:
        cfg.policy = list(args.policy)
    if args.dlp_rules:
        cfg.dlp_rules = list(args.dlp_rules)
    if args.dlp_enable:
        cfg.dlp_enable = list(args.dlp_enable)
    for flag, attr, value in (("no_drop_privileges", "drop_privileges", False), ("no_dlp", "dlp", False),
                              ("no_l7", "l7", False), ("l7_events", "l7_events", True),
                              ("no_dns", "dns", False), ("no_outbound", "outbound", False),
                              ("no_inbound", "inbound", False), ("no_ipv6", "ipv6", False),
                              ("no_splice", "splice", False),
                              ("kubernetes_identity", "kubernetes_identity", True)):
        if getattr(args, flag, False):
            setattr(cfg, attr, value)
    from_environment(cfg)
    cfg.validate("flags")
    return cfg


def _with_yaml(paths: list[str]) -> list[str]:
    """The paths that hold something to load: files, and directories with policy/rule files.

    The injector mounts the ``palisade-policy`` and ``palisade-dlp-rules`` ConfigMaps as optional
    volumes; when a namespace has neither, the kubelet mounts an empty directory. That means
    "not configured" (learn mode, built-in DLP packs), not "an empty policy set" (docs/platform.md).
    A directory counts when the policy loader would read a file from it (same rule for DLP packs).
    """
    from firewall.policy.loader import expand_paths

    return [p for p in paths if not os.path.isdir(p) or expand_paths([p])]


def _files_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        files = []
        if os.path.isdir(p):
            for root, _dirs, names in os.walk(p, followlinks=True):
                files += [os.path.join(root, n) for n in sorted(names) if not n.startswith("..")]
        else:
            files.append(p)
        for f in sorted(files):
            try:
                with open(f, "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read())
            except OSError:
                h.update(f.encode() + b"\0missing")
    return h.hexdigest()


class Sidecar:
    """Owns the loaded state (policy, identity, DLP, pod info) and the proxy."""

    def __init__(self, cfg: Config, sink: EventSink, labels: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.sink = sink
        self.labels = dict(labels or {})
        self.annotations: dict[str, str] = {}
        self.policy: Any = None
        self.policy_digest = ""
        self.identities: Any = None
        self.identity_digest = ""
        self.dlp: Any = None
        self.fqdn: Any = None
        self.captures: Any = None
        self.proxy: Any = None
        self.watcher: Any = None
        self.kube: Any = None
        self.l3: Any = None  # l3rules.L3Sync: the kernel filter for what the proxy does not carry
        self.nflog: Any = None  # nflog.NflogReader: its denied packets as events
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- loading
    def load_policy(self) -> Any:
        """No policy files = PolicySet.empty(): learn mode, so installing never breaks a namespace."""
        from firewall.policy.engine import PolicySet

        probe = frozenset(self.cfg.probe_ports)
        paths = _with_yaml(self.cfg.policy)
        if not paths:
            return PolicySet.empty(node_ip=self.cfg.host_ip, probe_ports=probe, fqdn=self.fqdn)
        return PolicySet.load(paths, node_ip=self.cfg.host_ip, probe_ports=probe, fqdn=self.fqdn)

    def load_identities(self) -> Any:
        if not self.cfg.identity:
            return None
        from firewall.identity.identity import load_identity_file

        return load_identity_file(self.cfg.identity)

    def load_dlp(self) -> Any:
        if not self.cfg.dlp:
            return None
        from firewall.dlp.engine import DlpEngine

        return DlpEngine.load(_with_yaml(self.cfg.dlp_rules) or None, enable=self.cfg.dlp_enable,
                              cache_dir=self.cfg.dlp_cache)

    def local_identity(self) -> Identity:
        ip = self.cfg.pod_ip or "0.0.0.0"
        return Identity.make(ip, self.cfg.pod_namespace or "default", self.cfg.pod_name or os.uname().nodename,
                             self.labels)

    worker = 0

    def build_inspection(self) -> Any:
        from firewall.datapath.session import Inspection

        insp = Inspection(policy=self.policy, dlp=self.dlp, identities=self.identities, fqdn=self.fqdn,
                          emit=self.sink.emit, l7=self.cfg.l7, l7_events=self.cfg.l7_events,
                          local=self.local_identity(), captures=self.captures)
        self._apply_annotations(insp)
        insp.worker = self.worker
        return insp

    def _apply_annotations(self, insp: Any) -> None:
        mode = self.annotations.get(ANN_MODE) or self.cfg.mode
        insp.mode_override = mode if mode in MODES else None
        insp.quarantined = self.annotations.get(ANN_QUARANTINE, "").strip().lower() == "true"

    def startup(self) -> None:
        # import every module the hot path imports lazily now, before the privilege drop
        import firewall.datapath.dnsrelay  # noqa: F401
        import firewall.datapath.proxy  # noqa: F401
        import firewall.datapath.session  # noqa: F401

        # (after the drop, UID 1337 may not be able to read the interpreter's own files)
        for mod in ("firewall.protocols", "firewall.protocols.http", "firewall.protocols.http2",
                    "firewall.protocols.tls", "firewall.protocols.dns", "firewall.protocols.ssh",
                    "firewall.protocols.redis", "firewall.protocols.pgsql", "firewall.protocols.mysql",
                    "firewall.policy.engine", "firewall.dlp.engine", "firewall.identity.fqdn", "firewall.identity.identity",
                    "firewall.identity.podinfo", "firewall.capture.manager", "firewall.observe.alertsink", "h2", "hpack",
                    "http.client", "urllib.request", "ssl", "gzip", "uvloop"):
            try:
                __import__(mod)
            except ImportError as exc:
                log.warning("%s unavailable: %s", mod, exc)
        try:
            from firewall.identity.fqdn import FqdnCache

            c = self.cfg
            self.fqdn = FqdnCache(max_entries=c.fqdn_max_entries, min_ttl=c.fqdn_min_ttl,
                                  max_ttl=c.fqdn_max_ttl, max_per_name=c.fqdn_max_per_name)
            self.fqdn.set_resolvers(c.fqdn_resolvers)
        except ImportError:
            self.fqdn = None
        if self.cfg.podinfo:
            from firewall.identity.podinfo import read_podinfo

            try:
                info = read_podinfo(self.cfg.podinfo)
                self.labels.update(info.labels)
                self.annotations = dict(info.annotations)
            except Exception as exc:  # noqa: BLE001
                log.warning("podinfo: %s", exc)
        self.policy = self.load_policy()
        self.policy_digest = _files_digest(self.cfg.policy)
        self.identities = self.load_identities()
        if self.cfg.kubernetes_identity:
            # peers from the API server (list + watch pods); needs get/list/watch on pods for the
            # pod's service account (docs/platform.md); imported before the privilege drop
            import kubernetes.client  # noqa: F401
            import kubernetes.config  # noqa: F401

            from firewall.identity.identity import KubernetesIdentitySource

            self.kube = KubernetesIdentitySource(on_change=lambda _m: self._swap("identity")).start()
            if not self.kube.wait_ready(10):
                log.warning("kubernetes identity: no pod list yet; peers are 'world' until it arrives")
            self.identities = self.kube
        self.identity_digest = _files_digest([self.cfg.identity] if self.cfg.identity else [])
        self.dlp = self.load_dlp()
        self.sink.set_scanner(self.dlp)  # event redaction also masks what the DLP packs find
        self._dlp_digest = _files_digest(self.cfg.dlp_rules) if self.cfg.dlp_rules else ""
        self._start_l3()
        self.sink.emit({"event_type": "policy", "policy": {
            "action": "loaded", "files": self.cfg.policy,
            "mode": self.policy.mode_for(self.local_identity()) if self.policy else "learn",
            "dlp_rules_hash": getattr(self.dlp, "rules_hash", None)}})

    # ---------------------------------------------------------------- reload
    def reload(self) -> None:
        """Called from the reload thread: validate new files, then swap on the loop."""
        changed = False
        digest = _files_digest(self.cfg.policy)
        if digest != self.policy_digest:
            self.policy_digest = digest
            try:
                self.policy = self.load_policy()
                changed = True
                metrics.POLICY_RELOADS.labels("ok").inc()
                self.sink.emit({"event_type": "policy", "policy": {"action": "reloaded", "files": self.cfg.policy}})
            except Exception as exc:  # noqa: BLE001 - the old policy stays in force
                metrics.POLICY_RELOADS.labels("rejected").inc()
                self._reject("policy", exc)
        if self.cfg.identity and self.kube is None:
            digest = _files_digest([self.cfg.identity])
            if digest != self.identity_digest:
                self.identity_digest = digest
                try:
                    self.identities = self.load_identities()
                    changed = True
                except Exception as exc:  # noqa: BLE001
                    self._reject("identity", exc)
        if self.cfg.dlp and self.cfg.dlp_rules:
            digest = _files_digest(self.cfg.dlp_rules)
            if digest != self._dlp_digest:
                try:
                    self.dlp = self.load_dlp()
                    changed = True
                except Exception as exc:  # noqa: BLE001
                    self._reject("dlp", exc)
            self._dlp_digest = digest
        if changed:
            self._swap("reload")

    def _reject(self, what: str, exc: Exception) -> None:
        msg = str(exc).strip().splitlines()
        log.error("%s reload rejected: %s", what, msg[0] if msg else exc)
        self.sink.emit({"event_type": "alert", "alert": {
            "action": "allowed", "signature": f"{what}-reload-rejected", "signature_id": 1,
            "category": "config", "severity": 2}, "error": "\n".join(msg[:20]),
            "policy": {"action": "rejected", "what": what}})

    def on_podinfo(self, info: Any) -> None:
        self.labels.update(info.labels)
        old_q = self.annotations.get(ANN_QUARANTINE)
        self.annotations = dict(info.annotations)
        if self.captures is not None:
            try:
                self.captures.on_annotations(self.annotations)
            except Exception as exc:  # noqa: BLE001
                log.warning("capture: %s", exc)
        if old_q != self.annotations.get(ANN_QUARANTINE):
            q = self.annotations.get(ANN_QUARANTINE, "").strip().lower() == "true"
            metrics.QUARANTINED.set(1 if q else 0)
            self.sink.emit({"event_type": "quarantine", "quarantine": {"state": "on" if q else "off"}})
        self._swap("quarantine")

    # ---------------------------------------------------------------- L3/L4 kernel filter
    def _start_l3(self) -> None:
        """As root, before the privilege drop: load libnftables, rebuild the L3 rules from
        scratch (an address that changed owner while the sidecar was down keeps no stale
        allow) and bind the NFLOG group.  No ``inet palisade`` table (no redirect applied,
        e.g. a developer's run) = nothing to fill."""
        try:
            from firewall.datapath.l3rules import L3Sync

            l3 = L3Sync()
            if not l3.table_present():
                log.info("l3: no inet palisade table with L3 chains (redirect not applied): kernel filter off")
                return
            self.l3 = l3
            self.sync_l3("start", full=True)
        except Exception as exc:  # noqa: BLE001 - the base chains keep failing closed
            log.error("l3: cannot set up the kernel filter: %s", exc)
            return
        try:
            from firewall.datapath.nflog import L3Events, NflogReader

            events = L3Events(self.sink.emit, self._resolve, self.local_identity, self._mode)
            self.nflog = NflogReader(events)
        except Exception as exc:  # noqa: BLE001
            log.warning("l3: no NFLOG reader (denied non-TCP packets are not reported): %s", exc)

    def _identity_list(self) -> list[Identity]:
        src = self.identities
        if src is None:
            return []
        if hasattr(src, "current"):
            src = src.current()
        return list(src)

    def _resolve(self, ip: str) -> Identity:
        src = self.identities
        return src.resolve(ip) if src is not None else Identity(ip)

    def _mode(self) -> str:
        mode = self.annotations.get(ANN_MODE) or self.cfg.mode
        if mode in MODES:
            return mode
        return self.policy.mode_for(self.local_identity()) if self.policy is not None else "learn"

    def sync_l3(self, reason: str, full: bool = False) -> None:
        """Compile policy + identities into the kernel's L3 sets/rules: one transaction; only
        the sets when the rules are unchanged (an identity change).  Worker 0 only."""
        if self.l3 is None or self.worker != 0 or self.policy is None:
            return
        from firewall.datapath.l3rules import compile_plan

        mode = self.annotations.get(ANN_MODE) or self.cfg.mode
        quarantined = self.annotations.get(ANN_QUARANTINE, "").strip().lower() == "true"
        try:
            plan = compile_plan(self.policy, self._identity_list(), self.local_identity(),
                                mode_override=mode if mode in MODES else None, quarantined=quarantined)
            r = self.l3.sync(plan, full=full)
            metrics_l3_sync(r.kind, "ok")
            if r.kind != "unchanged":
                log.info("l3 %s: %s sync, %d rules, %d set elements, %.1f ms", reason, r.kind, r.rules,
                         r.elements, r.seconds * 1000)
        except Exception as exc:  # noqa: BLE001 - the previous rules stay in force
            metrics_l3_sync("error", "error")
            log.error("l3 %s: sync failed, previous rules stay: %s", reason, exc)

    def _swap(self, reason: str) -> None:
        self.sync_l3(reason)
        proxy = self.proxy
        if proxy is None:
            return

        def do() -> None:
            proxy.inspection = self.build_inspection()
            n = proxy.cut_all(reason)
            if n:
                log.info("%s: cut %d open flows", reason, n)

        proxy.loop.call_soon_threadsafe(do)


def metrics_l3_sync(kind: str, result: str) -> None:
    from firewall.datapath.l3rules import L3_SYNCS

    L3_SYNCS.labels(kind, result).inc()


def run(cfg: Config, sink: EventSink, labels: dict[str, str] | None = None) -> int:
    side = Sidecar(cfg, sink, labels)
    side.startup()
    from firewall.datapath.proxy import Proxy

    workers = cfg.workers
    reuseport = workers > 1
    pids: list[int] = []
    worker = 0
    # fork first: every worker binds its own SO_REUSEPORT listeners
    for i in range(1, workers):
        pid = os.fork()
        if pid == 0:
            worker = i
            pids = []
            break
        pids.append(pid)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # two descriptors per flow (plus pipes while spliced): use what we may
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proxy = Proxy(cfg, None, sink.emit)  # type: ignore[arg-type]
    proxy.bind(reuseport=reuseport)  # as root: transparent listeners need it before the drop
    if cfg.drop_privileges:
        from firewall.sidecar.privileges import drop

        try:
            log.info(drop(cfg.uid, cfg.gid))
        except OSError as exc:
            raise StartupError(f"cannot drop privileges: {exc}") from None
    side.worker = worker
    from firewall.datapath.session import seed_flow_ids

    seed_flow_ids(worker, workers)
    _start_side_threads(side, worker)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def main() -> int:
        proxy.inspection = side.build_inspection()
        _trim_heap()
        side.proxy = proxy
        return await _serve_with(side, proxy, worker, admin=worker == 0)

    rc = runner(main())
    if pids:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    if side.captures is not None:
        side.captures.stop_all()
    if side.watcher is not None:
        side.watcher.stop()
    if side.nflog is not None and worker == 0:
        side.nflog.stop()  # the rules themselves stay in the kernel: fail closed
    return rc


def _trim_heap() -> None:
    """Give the start-up garbage (YAML, model validation, rule compilation) back to the OS:
    every sidecar of every pod pays its idle RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _start_side_threads(side: Sidecar, worker: int) -> None:
    cfg = side.cfg
    if side.nflog is not None:
        if worker == 0:
            side.nflog.start()
        else:
            side.nflog.sock.sock.close()  # worker 0 reads the group
            side.nflog = None
    if cfg.pcap_dir and worker == 0:
        try:
            from firewall.capture.manager import CaptureManager

            side.captures = CaptureManager(cfg.pcap_dir, side.sink.emit, max_concurrent=cfg.pcap_max_concurrent,
                                           disk_budget_bytes=cfg.pcap_disk_budget)
        except Exception as exc:  # noqa: BLE001
            log.warning("captures disabled: %s", exc)
    if cfg.alert_webhook:
        from firewall.observe.alertsink import WebhookSink

        try:
            # webhook_flows: every event type, flow records included; else the default set
            wh = WebhookSink(cfg.alert_webhook, queue_size=cfg.webhook_queue_size,
                             queue_bytes=cfg.webhook_queue_bytes,
                             **({"event_types": None} if cfg.webhook_flows else {}))
            wh.start()
            side.sink.add_consumer(wh)
        except Exception as exc:  # noqa: BLE001
            log.warning("alert webhook disabled: %s", exc)
    if cfg.podinfo:
        from firewall.identity.podinfo import PodinfoWatcher

        side.watcher = PodinfoWatcher(cfg.podinfo, side.on_podinfo)
        side.watcher.start()


async def _serve_with(side: Sidecar, proxy: Any, worker: int, admin: bool) -> int:
    cfg = side.cfg
    proxy.loop = asyncio.get_running_loop()
    await proxy.start()
    admin_srv = None
    if admin and cfg.admin_port:
        limits = metrics.AdminLimits(
            max_connections=cfg.admin_max_connections, max_per_source=cfg.admin_max_per_source,
            request_timeout=cfg.admin_request_timeout, max_request_line=cfg.admin_max_request_line,
            max_headers=cfg.admin_max_headers, max_request_bytes=cfg.admin_max_request_bytes,
            allow=tuple(cfg.admin_allow))
        admin_srv = metrics.AdminServer(cfg.admin_address, cfg.admin_port, lambda: proxy.ready, limits,
                                        node_ip=cfg.host_ip)
        await admin_srv.start()
    log.info("worker %d ready (inbound :%d, outbound :%d)", worker, cfg.inbound_port, cfg.outbound_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stop_threads = threading.Event()

    def reload_loop() -> None:
        while not stop_threads.wait(cfg.reload_interval):
            try:
                side.reload()
            except Exception:  # noqa: BLE001
                log.exception("reload failed")

    threading.Thread(target=reload_loop, name="palisade-reload", daemon=True).start()
    await stop.wait()
    log.info("draining %d open flows (up to %.0fs)", len(proxy.flows), cfg.drain_timeout)
    await proxy.stop_listening()
    cut = await proxy.drain(cfg.drain_timeout)
    stop_threads.set()
    if admin_srv:
        await admin_srv.stop()
    side.sink.emit({"event_type": "shutdown", "shutdown": {"flows_cut": cut, "worker": worker}})
    return 0


def _cmd(args: argparse.Namespace) -> int:
    from firewall.sidecar.privileges import raise_file_caps

    raise_file_caps()  # before any thread: the image's file capabilities are permitted-only
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s palisade %(levelname)s %(message)s")
    from firewall.observe.events import redact_logs

    redact_logs()  # log lines get the events' card masking
    try:
        cfg = _apply_flags(load_config(args.config), args)
    except ConfigError as exc:
        print(f"palisade run: {exc}", file=sys.stderr)
        return 2
    try:
        sink = EventSink(path=cfg.events) if cfg.events else EventSink()
    except OSError as exc:
        print(f"palisade run: cannot open events file {cfg.events}: {exc.strerror}", file=sys.stderr)
        return 2
    labels = None
    if args.labels:
        import json

        try:
            labels = {str(k): str(v) for k, v in json.loads(args.labels).items()}
        except (ValueError, AttributeError):
            print("palisade run: --labels: expected a JSON object", file=sys.stderr)
            return 2
    try:
        return run(cfg, sink, labels)
    except StartupError as exc:
        print(f"palisade run: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"palisade run: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - policy/DLP load errors: one clear message, exit 1
        msg = str(exc).strip() or type(exc).__name__
        print(f"palisade run: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the sidecar proxy (inbound TPROXY, outbound REDIRECT, DNS)",
        description="Run the Palisade sidecar: accept redirected connections, enforce policy, scan for "
        "sensitive data, write EVE JSON events, serve /healthz /readyz /metrics on the admin port. "
        "Started as root it binds its listeners, then drops to UID/GID 1337 keeping only "
        "CAP_NET_ADMIN and CAP_NET_RAW.",
        epilog="examples:\n"
        "  python -m firewall run --policy /etc/palisade/policy --podinfo /etc/palisade/podinfo\n"
        "  python -m firewall run --config sidecar.yaml --events /var/log/palisade/eve.json --workers 2\n"
        "  python -m firewall run --mode monitor --identity identities.yaml --alert-webhook http://127.0.0.1:9000/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (CLI flags override it)")
    p.add_argument("--policy", action="append", metavar="PATH", help="policy file or directory (repeatable)")
    p.add_argument("--identity", help="static identity YAML: list of {ip, namespace, pod, labels}")
    p.add_argument("--kubernetes-identity", action="store_true",
                   help="resolve peers from the Kubernetes API (list+watch pods; needs RBAC)")
    p.add_argument("--podinfo", help="downward-API directory with 'annotations' and 'labels'")
    p.add_argument("--mode", choices=MODES, help="override the policy mode for this pod")
    p.add_argument("--dlp-rules", action="append", metavar="DIR", help="DLP rule pack directory (repeatable)")
    p.add_argument("--dlp-enable", action="append", metavar="PACK", help="enable only these packs (repeatable)")
    p.add_argument("--dlp-cache", help="directory for the compiled Hyperscan database cache")
    p.add_argument("--no-dlp", action="store_true", help="disable DLP scanning")
    p.add_argument("--no-l7", action="store_true", help="disable protocol identification and parsing")
    p.add_argument("--l7-events", action="store_true", help="emit an event per L7 message (http, dns, tls ...)")
    p.add_argument("--events", help="append events to this file instead of stdout")
    p.add_argument("--alert-webhook", metavar="URL", help="also POST alerts/pcap events to this URL")
    p.add_argument("--pcap-dir", help="directory for packet captures")
    p.add_argument("--inbound-port", type=int)
    p.add_argument("--outbound-port", type=int)
    p.add_argument("--dns-port", type=int)
    p.add_argument("--admin-port", type=int)
    p.add_argument("--admin-address")
    p.add_argument("--no-inbound", action="store_true")
    p.add_argument("--no-outbound", action="store_true")
    p.add_argument("--no-dns", action="store_true")
    p.add_argument("--no-ipv6", action="store_true")
    p.add_argument("--no-splice", action="store_true",
                   help="never hand uninspected flows to the kernel's zero-copy splice relay")
    p.add_argument("--relay", choices=("auto", "native", "python"),
                   help="what moves spliced flows' bytes: the native relay thread, the Python splice pump, "
                        "or auto (native when its extension is built; the default)")
    p.add_argument("--workers", type=int, help="processes sharing the listeners via SO_REUSEPORT")
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--no-drop-privileges", action="store_true")
    p.add_argument("--idle-timeout", type=float)
    p.add_argument("--drain-timeout", type=float)
    p.add_argument("--connect-timeout", type=float)
    p.add_argument("--header-timeout", type=float)
    p.add_argument("--identify-timeout", type=float)
    p.add_argument("--pod-namespace")
    p.add_argument("--pod-name")
    p.add_argument("--pod-ip")
    p.add_argument("--labels", metavar="JSON", help="this pod's labels as a JSON object (outside Kubernetes; "
                   "in a pod they come from --podinfo)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd)
