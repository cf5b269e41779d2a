"""Memory and API load of one sidecar's Kubernetes identity resolver with 5,000 pods.

Against a real kube-apiserver + etcd (scripts/cluster.sh, no kubelet): pods are created
through the API, shaped like injected pods (the sidecar's containers and volumes make a pod
object ~3x larger), and given IPs by a status patch as the kubelet would. The resolver runs in
its own process (so its RSS is its own), configured like in a pod (InClusterConfigLoader, a
TokenRequest token of a service account under the shipped ClusterRole/Binding), through a
loopback relay that counts connections and bytes (tests/k8s/tcpproxy.py).

Phases (each resolver is a fresh process):
  grow   resolver watches while the pods are created and get IPs (2 events per pod)
  list   resolver started with all pods present: time to the first map, RSS, bytes listed
  churn  --churn pods relabelled as fast as the API server takes it: resolver CPU per event,
         lag of the last change, bytes per event on the watch

    sudo python benchmarks/bench_identity_watch.py --pods 5000 --out bench-out/identity_watch.json

Needs root (like scripts/cluster.sh), etcd, and scripts/build-k8s.sh's binaries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.k8s.tcpproxy import TcpProxy  # noqa: E402

NS_COUNT = 10


# --- the resolver process ------------------------------------------------------------------------

def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(port: int, token: str, ca: str, page_size: int) -> None:
    """Run the resolver; answer commands on stdin with one JSON line each."""
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    from firewall.identity.identity import KubernetesIdentitySource

    rss0 = _rss_kib()
    cfg = client.Configuration()
    InClusterConfigLoader(token_filename=token, cert_filename=ca,
                          environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                   "KUBERNETES_SERVICE_PORT": str(port)}).load_and_set(cfg)
    src = KubernetesIdentitySource(client.ApiClient(cfg), min_backoff=0.1, max_backoff=1.0)
    src.list_page_size = page_size
    t0 = time.monotonic()
    src.start()
    src.wait_ready(300)
    ready = time.monotonic() - t0

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    print(json.dumps({"ready_s": ready, "rss_kib": _rss_kib(), "rss_before_kib": rss0}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "stats":
            print(json.dumps({"rss_kib": _rss_kib(), "cpu_s": cpu(), "size": len(src.current()),
                              "relists": src.relists, "errors": src.errors}), flush=True)
        elif cmd[0] == "wait":  # wait IP LABEL=VALUE [TIMEOUT]: when the map shows it
            ip, (key, value) = cmd[1], cmd[2].split("=", 1)
            deadline = time.monotonic() + float(cmd[3] if len(cmd) > 3 else 120)
            while src.resolve(ip).label_map.get(key) != value and time.monotonic() < deadline:
                time.sleep(0.01)
            print(json.dumps({"seen": src.resolve(ip).label_map.get(key) == value, "at": time.monotonic()}),
                  flush=True)
        elif cmd[0] == "stop":
            src.stop()
            return


class Resolver:
    def __init__(self, proxy: TcpProxy, token: Path, ca: Path, page_size: int = 100) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(proxy.port), str(token), str(ca),
                                      str(page_size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("resolver process died")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


# --- the cluster side ------------------------------------------------------------------------------

def injected_pod(i: int) -> dict:
    """A Deployment pod as the injector stores it (rendered in process: no webhook needed here)."""
    from injector.config import InjectorConfig
    from injector.inject import render

    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"web-{i:05d}", "namespace": f"bench-{i % NS_COUNT}",
                        "labels": {"app": f"web-{i % 50}", "pod-template-hash": "6b8f9c7d5", "tier": "frontend"}},
           "spec": {"serviceAccountName": "default",
                    "containers": [{"name": "web", "image": "example/web:1.4",
                                    "ports": [{"name": "http", "containerPort": 8080}],
                                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}}
    return render(pod, InjectorConfig()).pod


def ip_of(i: int) -> str:
    return f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def run(args: argparse.Namespace) -> dict:
    from kubernetes import client, config

    from injector.manifests import ManifestOptions, sidecar_rbac

    state = Path(f"/tmp/palisade-k8s-bench-{os.getpid()}")
    env = {**os.environ, "PALISADE_K8S_DIR": str(state), "PALISADE_K8S_PORT": "16743",
           "PALISADE_K8S_ETCD_PORT": "24090", "PALISADE_K8S_SERVICE_CIDR": "127.0.99.0/24",
           "PALISADE_K8S_INSTALL": "none"}
    sh = REPO / "scripts" / "cluster.sh"
    kubeconfig = subprocess.run(["bash", str(sh), "up"], env=env, check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1]
    out: dict = {"pods": args.pods, "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(),
                                                "python": platform.python_version()}}
    resolvers: list[Resolver] = []
    proxy = TcpProxy(16743)
    try:
        config.load_kube_config(config_file=kubeconfig)
        api = client.ApiClient()
        core = client.CoreV1Api(api)
        rbac = client.RbacAuthorizationV1Api(api)
        role, binding = sidecar_rbac(ManifestOptions())
        rbac.create_cluster_role(role)
        rbac.create_cluster_role_binding(binding)
        core.create_namespaced_service_account("default", {"metadata": {"name": "bench-app"}})
        for n in range(NS_COUNT):
            core.create_namespace({"metadata": {"name": f"bench-{n}"}})
            core.create_namespaced_service_account(f"bench-{n}", {"metadata": {"name": "default"}})
        token = core.create_namespaced_service_account_token(
            "bench-app", "default", {"spec": {"expirationSeconds": 7200}}).status.token
        token_file = state / "bench-token"
        token_file.write_text(token)
        ca = state / "pki" / "ca.crt"

        # grow: a resolver watches the cluster fill up
        grow = Resolver(proxy, token_file, ca)
        resolvers.append(grow)
        cpu0 = grow.ask("stats")["cpu_s"]
        bytes0 = proxy.counters.bytes_down
        pods = [injected_pod(i) for i in range(args.pods)]
        out["pod_json_bytes"] = len(json.dumps(pods[0]))

        def make(i: int) -> None:
            p = pods[i]
            core.create_namespaced_pod(p["metadata"]["namespace"], p)
            core.patch_namespaced_pod_status(p["metadata"]["name"], p["metadata"]["namespace"],
                                             {"status": {"phase": "Running", "podIP": ip_of(i),
                                                         "podIPs": [{"ip": ip_of(i)}]}})

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(make, range(args.pods)))
        created = time.monotonic()
        last = grow.ask(f"wait {ip_of(args.pods - 1)} tier=frontend 300")
        st = grow.ask("stats")
        out["grow"] = {"create_s": round(created - t0, 1), "events": 2 * args.pods,
                       "lag_after_last_write_s": round(last["at"] - created, 3) if last["seen"] else None,
                       "resolver_cpu_s": round(st["cpu_s"] - cpu0, 2),
                       "resolver_cpu_ms_per_event": round(1000 * (st["cpu_s"] - cpu0) / (2 * args.pods), 3),
                       "watch_bytes": proxy.counters.bytes_down - bytes0, "map_size": st["size"],
                       "rss_mib": round(st["rss_kib"] / 1024, 1)}
        print("grow:", out["grow"], flush=True)

        # list: a sidecar starting in a full cluster (one per page size; the last one stays for churn)
        out["list"] = {}
        for size in args.page_sizes:
            conns0, bytes0 = proxy.counters.connections, proxy.counters.bytes_down
            fresh = Resolver(proxy, token_file, ca, size)
            resolvers.append(fresh)
            st = fresh.ask("stats")
            out["list"][size] = {
                "ready_s": round(fresh.ready["ready_s"], 2), "map_size": st["size"],
                "rss_before_mib": round(fresh.ready["rss_before_kib"] / 1024, 1),
                "rss_mib": round(st["rss_kib"] / 1024, 1),
                "rss_per_pod_kib": round((st["rss_kib"] - fresh.ready["rss_before_kib"]) / args.pods, 2),
                "list_bytes": proxy.counters.bytes_down - bytes0,
                "connections": proxy.counters.connections - conns0}
            print(f"list (pages of {size}):", out["list"][size], flush=True)

        # churn: relabel pods; both resolvers follow
        cpu0 = {r: r.ask("stats")["cpu_s"] for r in (grow, fresh)}
        bytes0 = proxy.counters.bytes_down
        t0 = time.monotonic()

        def relabel(i: int) -> None:
            p = pods[i]
            core.patch_namespaced_pod(p["metadata"]["name"], p["metadata"]["namespace"],
                                      {"metadata": {"labels": {"tier": "churned"}}})

        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(relabel, range(args.churn)))
        done = time.monotonic()
        lags = [r.ask(f"wait {ip_of(args.churn - 1)} tier=churned 300") for r in (grow, fresh)]
        stats = {r: r.ask("stats") for r in (grow, fresh)}
        out["churn"] = {"events": args.churn, "write_s": round(done - t0, 2),
                        "events_per_s": round(args.churn / (done - t0), 1),
                        "lag_after_last_write_s": [round(lg["at"] - done, 3) for lg in lags],
                        "resolver_cpu_ms_per_event": [round(1000 * (stats[r]["cpu_s"] - cpu0[r]) / args.churn, 3)
                                                      for r in (grow, fresh)],
                        # every resolver started so far watches: bytes per event per resolver
                        "watch_bytes_per_event": round((proxy.counters.bytes_down - bytes0)
                                                       / (len(resolvers) * args.churn)),
                        "rss_mib": [round(stats[r]["rss_kib"] / 1024, 1) for r in (grow, fresh)],
                        "relists": [stats[r]["relists"] for r in (grow, fresh)],
                        "errors": [stats[r]["errors"] for r in (grow, fresh)]}
        print("churn:", out["churn"], flush=True)
    finally:
        for r in resolvers:
            r.close()
        proxy.close()
        subprocess.run(["bash", str(sh), "down"], env=env, capture_output=True)
    return out


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--churn", type=int, default=1000, help="pods relabelled in the churn phase")
    ap.add_argument("--threads", type=int, default=8, help="concurrent API writers")
    ap.add_argument("--page-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[100],
                    help="list page sizes to compare in the list phase (comma list, 0 = unpaged; default 100, "
                         "the resolver's)")
    ap.add_argument("--out", default="bench-out/identity_watch.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_identity_watch: needs root (scripts/cluster.sh)", file=sys.stderr)
        return 2
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
