"""Who is at the other end of a flow: IP -> workload identity.

Identity is plain data; resolvers (static YAML file, Kubernetes pod watch) keep
an IP -> Identity map that is swapped atomically, so the hot path does one dict
lookup and never I/O.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from firewall import LABEL_SCOPE


@dataclass(frozen=True, slots=True)
class Identity:
    """A peer. ``namespace is None`` means ``world``: an address no source knows."""

    ip: str
    namespace: str | None = None
    pod: str | None = None
    labels: tuple[tuple[str, str], ...] = field(default=())
    service_account: str | None = None

    @property
    def is_world(self) -> bool:
        return self.namespace is None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def scope(self) -> str:
        """PCI scope from the label; unlabelled workloads and the world are out of scope."""
        return self.label_map.get(LABEL_SCOPE, "out-of-scope")

    def to_json(self) -> dict:
        if self.is_world:
            return {"world": True, "ip": self.ip, "scope": "out-of-scope"}
        return {
            "namespace": self.namespace,
            "pod": self.pod,
            "labels": self.label_map,
            "scope": self.scope,
            "service_account": self.service_account,
        }

    @staticmethod
    def make(ip: str, namespace: str | None = None, pod: str | None = None,
             labels: dict[str, str] | None = None, service_account: str | None = None) -> Identity:
        return Identity(ip, namespace, pod, tuple(sorted((labels or {}).items())), service_account)


# --- resolvers --------------------------------------------------------------------------------

log = logging.getLogger(__name__)


class IdentityError(Exception):
    """Bad identity input; ``str()`` is ``file:line: message`` lines."""


class IdentityMap:
    """Immutable ip -> Identity map; unknown addresses resolve to ``world``.

    Built once and replaced whole (a reference swap is atomic), so readers on the
    hot path never see a half-updated map and never take a lock.
    """

    __slots__ = ("_by_ip", "_by_pod")

    def __init__(self, identities: Iterable[Identity] = ()) -> None:
        by_ip: dict[str, Identity] = {}
        by_pod: dict[tuple[str, str], Identity] = {}
        for ident in identities:
            by_ip[_canonical_ip(ident.ip)] = ident
            if ident.namespace is not None and ident.pod is not None:
                by_pod.setdefault((ident.namespace, ident.pod), ident)
        self._by_ip: Mapping[str, Identity] = MappingProxyType(by_ip)
        self._by_pod: Mapping[tuple[str, str], Identity] = MappingProxyType(by_pod)

    @classmethod
    def from_index(cls, by_ip: Mapping[str, Identity], by_pod: Mapping[tuple[str, str], Identity]) -> IdentityMap:
        """A snapshot of indexes kept by a resolver (keys already canonical): two dict copies at
        C speed instead of re-deriving every identity on each change."""
        m = cls.__new__(cls)
        m._by_ip = MappingProxyType(dict(by_ip))
        m._by_pod = MappingProxyType(dict(by_pod))
        return m

    def resolve(self, ip: str) -> Identity:
        ident = self._by_ip.get(ip)
        if ident is None:
            ident = self._by_ip.get(_canonical_ip(ip))
        return ident if ident is not None else Identity(ip)

    def by_pod(self, namespace: str, pod: str) -> Identity | None:
        return self._by_pod.get((namespace, pod))

    def __len__(self) -> int:
        return len(self._by_ip)

    def __iter__(self):
        return iter(self._by_ip.values())


def _canonical_ip(ip: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1``; invalid strings are returned unchanged."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


_ENTRY_KEYS = {"ip", "ips", "namespace", "pod", "labels", "serviceAccount"}


def load_identity_file(path: str) -> IdentityMap:
    """YAML list of ``{ip, namespace, pod, labels, serviceAccount}`` (``ips: [...]`` for dual stack).

    The PCI scope comes from the ``pci.palisade.dev/scope`` label like on a real pod.
    """
    from firewall.policy.yaml import YamlSourceError, load_file

    try:
        docs = load_file(path)
    except YamlSourceError as exc:
        raise IdentityError(str(exc)) from None
    problems: list[str] = []
    out: list[Identity] = []
    for doc in docs:
        items = doc.value
        if isinstance(items, dict) and isinstance(items.get("identities"), list):
            items, base = items["identities"], ("identities",)
        else:
            base = ()
        if not isinstance(items, list):
            problems.append(f"{path}:{doc.line}: expected a list of {{ip, namespace, pod, labels}}")
            continue
        for i, item in enumerate(items):
            here = (*base, i)
            line = doc.line_of(here)
            if not isinstance(item, dict):
                problems.append(f"{path}:{line}: [{i}]: expected a mapping")
                continue
            for key in item:
                if key not in _ENTRY_KEYS:
                    problems.append(f"{path}:{doc.line_of((*here, str(key)))}: [{i}].{key}: unknown field")
            ips = item.get("ips") or ([item["ip"]] if "ip" in item else [])
            if not ips or not isinstance(ips, list):
                problems.append(f"{path}:{line}: [{i}]: ip is required")
                continue
            labels = item.get("labels") or {}
            if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
                problems.append(f"{path}:{doc.line_of((*here, 'labels'))}: [{i}].labels: "
                                "expected a mapping of strings (quote numbers)")
                continue
            ns, pod, sa = item.get("namespace"), item.get("pod"), item.get("serviceAccount")
            if ns is not None and not isinstance(ns, str) or pod is not None and not isinstance(pod, str):
                problems.append(f"{path}:{line}: [{i}]: namespace and pod must be strings")
                continue
            for ip in ips:
                try:
                    ipaddress.ip_address(str(ip))
                except ValueError:
                    problems.append(f"{path}:{doc.line_of((*here, 'ip'))}: [{i}].ip: invalid address {ip!r}")
                    continue
                if ns is None:
                    problems.append(f"{path}:{line}: [{i}]: namespace is required (unknown IPs are world)")
                    break
                out.append(Identity.make(_canonical_ip(str(ip)), ns, pod, {str(k): v for k, v in labels.items()},
                                         sa if isinstance(sa, str) else None))
    if problems:
        raise IdentityError("\n".join(problems))
    return IdentityMap(out)


def identities_from_pod(pod: Mapping) -> list[Identity]:
    """Pod JSON (as the API server sends it) -> one Identity per pod IP; none for host-network
    or finished pods, whose addresses belong to the node or may already be reused."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return []
    ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount")
    return [Identity.make(_canonical_ip(ip), meta.get("namespace"), meta.get("name"), labels, sa) for ip in ips]


class KubernetesIdentitySource:
    """Pod IP -> Identity from the Kubernetes API: list, then watch from that resourceVersion.

    Runs in a daemon thread.  On a disconnect it resumes the watch from the last
    resourceVersion seen; on ``410 Gone`` (history compacted) it relists.  Errors back
    off exponentially (with jitter) up to ``max_backoff``.  Every change builds a new
    IdentityMap and swaps the reference, so ``current()`` is always a consistent snapshot.
    """

    def __init__(self, api_client=None, *, namespace: str | None = None,
                 on_change: Callable[[IdentityMap], None] | None = None,
                 watch_timeout: int = 300, min_backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        self._api_client = api_client
        self.namespace = namespace
        self.on_change = on_change
        self.watch_timeout = watch_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # uid -> the pod's identities (not the pod JSON: ~10 KB of it per pod, ~150 KB in Python
        # objects, measured with 5,000 pods in benchmarks/bench_identity_watch.py)
        self._pods: dict[str, tuple[Identity, ...]] = {}
        self._owners: dict[str, dict[str, Identity]] = {}  # ip -> {uid: identity}, for IP reuse
        self._by_ip: dict[str, Identity] = {}
        self._by_pod: dict[tuple[str, str], Identity] = {}
        self._map = IdentityMap()
        # pages of 100: 88 MiB RSS after listing 5,000 injected-size pods, against 131 MiB with
        # pages of 500 and 362 MiB unpaged, for 1.3 s more (benchmarks/bench_identity_watch.py)
        self.list_page_size = 100
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp = None
        self.resource_version: str | None = None
        self.relists = 0
        self.errors = 0

    # public
    def current(self) -> IdentityMap:
        return self._map

    def resolve(self, ip: str) -> Identity:
        return self._map.resolve(ip)

    def start(self) -> KubernetesIdentitySource:
        self._thread = threading.Thread(target=self._run, name="identity-k8s", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the first list has been applied."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            # Unblock the reader now instead of waiting for the watch timeout.
            sock = getattr(getattr(resp, "_connection", None), "sock", None)
            if sock is None:  # http.client detaches the socket into the response's file object
                raw = getattr(getattr(getattr(resp, "_fp", None), "fp", None), "raw", None)
                sock = getattr(raw, "_sock", None)
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    # internals
    def _api(self):
        from kubernetes import client, config

        if self._api_client is None:
            config.load_incluster_config()
            self._api_client = client.ApiClient()
        return client.CoreV1Api(self._api_client)

    def _list_call(self, api):
        if self.namespace:
            return api.list_namespaced_pod, (self.namespace,)
        return api.list_pod_for_all_namespaces, ()

    def _publish(self) -> None:
        self._map = IdentityMap.from_index(self._by_ip, self._by_pod)
        if self.on_change is not None:
            try:
                self.on_change(self._map)
            except Exception:  # noqa: BLE001 - a consumer bug must not stop the watch
                log.exception("identity on_change callback failed")

    def _set(self, uid: str, idents: tuple[Identity, ...]) -> bool:
        """Replace one pod's identities in the indexes; False when nothing a peer lookup sees
        changed (most pod updates are status or annotation changes: no new map, no on_change)."""
        old = self._pods.get(uid, ())
        if old == idents:
            return False
        for ident in old:
            owners = self._owners.get(ident.ip, {})
            owners.pop(uid, None)
            if owners:
                self._by_ip[ident.ip] = next(reversed(owners.values()))  # the IP's other pod
            else:
                self._owners.pop(ident.ip, None)
                self._by_ip.pop(ident.ip, None)
            key = (ident.namespace or "", ident.pod or "")
            if self._by_pod.get(key) is ident:
                del self._by_pod[key]
        if idents:
            self._pods[uid] = idents
        else:
            self._pods.pop(uid, None)
        for ident in idents:
            self._owners.setdefault(ident.ip, {})[uid] = ident
            self._by_ip[ident.ip] = ident
        if idents and idents[0].namespace is not None and idents[0].pod is not None:
            self._by_pod[(idents[0].namespace, idents[0].pod)] = idents[0]
        return True

    def _relist(self, api) -> None:
        """List in pages (bounded memory in large clusters; one consistent snapshot, since every
        page is served at the first page's resourceVersion), then rebuild the indexes."""
        import json

        fn, args = self._list_call(api)
        pods: dict[str, tuple[Identity, ...]] = {}
        cont = None
        while True:
            kwargs = {"limit": self.list_page_size, "_preload_content": False, "_request_timeout": 30}
            if cont:
                kwargs["_continue"] = cont
            body = json.loads(fn(*args, **kwargs).data)
            for i, p in enumerate(body.get("items") or []):
                idents = tuple(identities_from_pod(p))
                if idents:
                    pods[(p.get("metadata") or {}).get("uid") or f"{len(pods)}-{i}"] = idents
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                break
        self._pods, self._owners, self._by_ip, self._by_pod = {}, {}, {}, {}
        for uid, idents in pods.items():
            self._set(uid, idents)
        self.resource_version = meta.get("resourceVersion")
        self.relists += 1
        self._publish()
        self._ready.set()

    def _apply(self, event: dict) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or event.get("object") or {}
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        uid = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
        if kind == "DELETED":
            changed = self._set(uid, ())
        elif kind in ("ADDED", "MODIFIED"):
            changed = self._set(uid, tuple(identities_from_pod(obj)))
        else:
            return
        if changed:
            self._publish()

    def _watch_once(self, api) -> bool:
        """One watch request from ``resource_version``; returns True when a relist is needed."""
        import json

        from kubernetes.watch.watch import iter_resp_lines

        fn, args = self._list_call(api)
        resp = fn(*args, watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
                  timeout_seconds=self.watch_timeout, _preload_content=False,
                  _request_timeout=self.watch_timeout + 10)
        self._resp = resp
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return False
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    if status.get("code") == 410:
                        return True  # our resourceVersion is too old: relist
                    raise RuntimeError(f"watch error {status.get('code')}: {status.get('message')}")
                self._apply(event)
            return False
        finally:
            self._resp = None
            resp.release_conn()

    def _run(self) -> None:
        from kubernetes.client.rest import ApiException

        backoff = self.min_backoff
        need_list = True
        api = None
        while not self._stop.is_set():
            try:
                if api is None:
                    api = self._api()
                if need_list:
                    self._relist(api)
                    need_list = False
                need_list = self._watch_once(api)
                if need_list:
                    self.errors += 1
                backoff = self.min_backoff
                # a clean end of the watch (server timeout) resumes from resource_version
            except ApiException as exc:
                self.errors += 1
                need_list = need_list or exc.status in (401, 403, 410)
                if exc.status != 410:
                    log.warning("kubernetes pod watch failed: %s %s", exc.status, exc.reason)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
            except Exception as exc:  # noqa: BLE001 - network errors of every flavour: retry
                if self._stop.is_set():
                    break
                self.errors += 1
                log.warning("kubernetes pod watch error: %s", exc)
                self._sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds * (0.5 + random.random() / 2))
