"""The injector's own pod spec, run in real containers from the built image (podman + runc).

Each test renders the pod through ``injector.review.mutate`` (the webhook's code path), applies
the returned JSON patch, and runs the result with :class:`tests.runtime.podrunner.PodRunner`,
which models the kubelet (init order, native sidecar, securityContext without ambient
capabilities, downward-API volume, probes from the node). Clients are namespaces on the same
bridge; no traffic leaves the machine.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import wait_until
from tests.runtime.podrunner import PodRunner, injected_pod

pytestmark = pytest.mark.netns  # root + namespaces; conftest also skips without podman

NAMESPACE = "rt"
TEST_PAN = "4111111111111111"


def web_pod(scope: str = "cde", **annotations: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": NAMESPACE, "annotations": dict(annotations),
                     "labels": {"app": "web", "pci.palisade.dev/scope": scope}},
        "spec": {"containers": [{
            "name": "web", "image": "localhost/palisade-test-web:dev", "imagePullPolicy": "Never",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 2},
            "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}, "periodSeconds": 2},
        }]},
    }


def injector_config(image: str, **extra):
    from injector.config import InjectorConfig

    return InjectorConfig.from_dict({"image": image, "imagePullPolicy": "Never", **extra})


POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {{name: web, namespace: rt}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  mode: protect
  default: deny
  ingress:
    - name: client-to-web
      description: the one client allowed in
      from: [{{cidr: "{client}/32"}}]
      ports: [{{port: 8080}}]
      action: allow
  dlp:
    - name: no-pan-into-web
      packs: [payment_cards]
      direction: ingress
      action: block
"""


def sidecar_events(runner: PodRunner) -> list[dict]:
    out = []
    for line in runner.logs("palisade").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wait_event(runner: PodRunner, pred, what: str, timeout: float = 15) -> dict:
    def find():
        return next((e for e in sidecar_events(runner) if pred(e)), None)

    return wait_until(find, timeout, interval=0.2, what=what)


def curl(pod, url: str, *extra: str, timeout: int = 5) -> subprocess.CompletedProcess:
    return pod.run(["curl", "-sS", "--max-time", str(timeout), "-w", "\n%{http_code}", *extra, url], check=False)


def start(cluster, image: str, pod: dict, volumes_from: dict | None = None, **config) -> PodRunner:
    spec = injected_pod(pod, NAMESPACE, injector_config(image, **config))
    runner = PodRunner(spec, cluster.pod("web", NAMESPACE), cluster.node, volumes_from=volumes_from)
    cluster.runners = [*getattr(cluster, "runners", []), runner]
    try:
        runner.start()
    except BaseException:
        runner.close()
        raise
    return runner


@pytest.fixture
def runners(rt_cluster):
    yield rt_cluster
    for r in getattr(rt_cluster, "runners", []):
        r.close()


def test_injected_pod_starts_without_configmaps_in_learn_mode_probes_through_sidecar(runners, image, web_image):
    """The documented default: no palisade-policy, no palisade-dlp-rules ConfigMap in the namespace.
    The pod must start (built-in DLP packs), run in learn mode (nothing reset), and the kubelet's
    probes must reach the app through the sidecar."""
    runner = start(runners, image, web_pod())
    names = [c.spec["name"] for c in runner.containers]
    assert names == ["palisade-init", "palisade", "web"], names
    loaded = wait_event(runner, lambda e: e.get("event_type") == "policy", "policy loaded event")
    assert loaded["policy"]["mode"] == "learn", loaded
    # the readiness/liveness probes came from the node's address through the proxy to nginx
    probe = wait_event(runner, lambda e: e.get("event_type") == "flow" and e.get("src_ip") == runners.node.ip
                       and e.get("dest_port") == 8080, "a probe's flow record")
    assert probe["verdict"] == "allow", probe
    # any client reaches the app in learn mode, and that flow is recorded too
    client = runners.pod("other", NAMESPACE)
    r = curl(client, f"http://{runner.net.ip}:8080/x")
    assert r.stdout.splitlines()[-1] == "200" and "web ok" in r.stdout, r
    flow = wait_event(runner, lambda e: e.get("event_type") == "flow" and e.get("src_ip") == client.ip,
                      "the client's flow record")
    assert flow["mode"] == "learn" and flow["verdict"] == "allow", flow


def _policy_dir(tmp_path: Path, client_ip: str) -> Path:
    d = tmp_path / "palisade-policy"
    d.mkdir()
    (d / "web.yaml").write_text(POLICY.format(client=client_ip))
    return d


def test_policy_from_configmap_allows_client_denies_other_and_blocks_card(runners, image, web_image, tmp_path):
    client = runners.pod("client", NAMESPACE)
    other = runners.pod("other", NAMESPACE)
    # not in the CDE: the built-in cde-segmentation rule would deny a world client before the policy
    runner = start(runners, image, web_pod("out-of-scope"), {"palisade-policy": _policy_dir(tmp_path, client.ip)})
    loaded = wait_event(runner, lambda e: e.get("event_type") == "policy", "policy loaded event")
    assert loaded["policy"]["mode"] == "protect", loaded
    # the probes still pass (the pod became Ready in start()), through the sidecar, under protect,
    # allowed by the built-in rule for the node's address (HOST_IP from the fieldRef env)
    probe = wait_event(runner, lambda e: e.get("event_type") == "flow" and e.get("src_ip") == runners.node.ip,
                       "a probe's flow record")
    assert probe["verdict"] == "allow" and probe["rule"] == "kubelet-probes", probe
    r = curl(client, f"http://{runner.net.ip}:8080/ok")
    assert r.stdout.splitlines()[-1] == "200" and "web ok" in r.stdout, (r, runner.logs("palisade")[-3000:])
    r = curl(other, f"http://{runner.net.ip}:8080/ok")
    assert "web ok" not in r.stdout and r.stdout.splitlines()[-1] != "200", r
    denied = wait_event(runner, lambda e: e.get("event_type") == "flow" and e.get("src_ip") == other.ip,
                        "the denied flow")
    assert denied["verdict"] == "deny", denied
    # a card number in the allowed client's request body never reaches nginx
    r = curl(client, f"http://{runner.net.ip}:8080/pay", "-X", "POST", "-d", f"card={TEST_PAN}&exp=12/29")
    assert "web ok" not in r.stdout, r
    alert = wait_event(runner, lambda e: e.get("event_type") == "alert"
                       and (e.get("alert") or {}).get("category") == "dlp", "the DLP alert")
    assert alert["alert"]["action"] == "blocked" and alert["alert"]["signature"] == "no-pan-into-web", alert
    assert TEST_PAN not in runner.logs("palisade")


def _status(runner: PodRunner, name: str) -> dict[str, int]:
    text = runner.exec(name, ["cat", "/proc/1/status"], check=True).stdout
    return {k: int(v.strip(), 16) for k, _, v in (ln.partition(":") for ln in text.splitlines())
            if k.startswith("Cap")}


def test_sidecar_has_exactly_net_admin_net_raw_and_a_read_only_rootfs(runners, image, web_image):
    runner = start(runners, image, web_pod())
    caps = _status(runner, "palisade")
    want = (1 << 12) | (1 << 13)  # CAP_NET_ADMIN, CAP_NET_RAW
    assert caps["CapEff"] == want and caps["CapPrm"] == want, {k: hex(v) for k, v in caps.items()}
    assert caps["CapAmb"] == 0 and caps["CapBnd"] == want, {k: hex(v) for k, v in caps.items()}
    ids = runner.exec("palisade", ["id", "-u"], check=True).stdout.strip()
    assert ids == "1337"
    # /var/run/palisade is owned by 1337 in the image: only the read-only rootfs stops this write
    r = runner.exec("palisade", ["touch", "/var/run/palisade/written"])
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r
    # while the emptyDir mounts are writable (pcaps, /tmp)
    assert runner.exec("palisade", ["touch", "/var/run/palisade/pcap/ok", "/tmp/ok"]).returncode == 0


def test_sidecar_killed_fails_closed_and_restart_restores(runners, image, web_image):
    runner = start(runners, image, web_pod())
    client = runners.pod("client", NAMESPACE)
    url = f"http://{runner.net.ip}:8080/x"
    assert curl(client, url).stdout.splitlines()[-1] == "200"
    runner.hold_restarts.set()  # the kubelet's back-off: a window with no sidecar at all
    side = runner.container("palisade")
    subprocess.run(["podman", "kill", "-s", "KILL", side.cid], check=True, capture_output=True)
    wait_until(lambda: runner.state(side).get("Status") != "running", 10, what="sidecar dead")
    r = curl(client, url, timeout=3)
    assert "web ok" not in r.stdout and r.stdout.splitlines()[-1] != "200", r
    # closed by the redirect rules, not because the app went away: nginx is still up and the
    # app's own loopback still answers
    assert runner.state(runner.container("web")).get("Status") == "running"
    assert "web ok" in runner.net.run(["curl", "-s", "--max-time", "3", "http://127.0.0.1:8080/"], check=False).stdout
    runner.hold_restarts.clear()
    runner.wait_restarted("palisade", 1)
    wait_until(lambda: curl(client, url, timeout=2).stdout.splitlines()[-1] == "200", 30,
               interval=0.3, what="traffic restored after the restart")


SLOW_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=30)
s.sendall(b"POST /slow HTTP/1.1\\r\\nHost: web\\r\\nContent-Length: 4\\r\\nConnection: close\\r\\n\\r\\nab")
print("sent", flush=True)
sys.stdin.readline()
s.sendall(b"cd")
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
print(data.decode(errors="replace"), flush=True)
"""


def test_pod_stop_sends_sigterm_and_the_sidecar_drains(runners, image, web_image):
    """A request in flight when the pod is stopped completes: the sidecar gets SIGTERM, stops
    accepting, and relays the open flow to its end (nginx stops gracefully too), then exits 0."""
    import sys
    import threading

    runner = start(runners, image, web_pod())
    client = runners.pod("client", NAMESPACE)
    side = runner.container("palisade")
    slow = client.popen([sys.executable, "-c", SLOW_CLIENT, runner.net.ip], stdin=subprocess.PIPE, text=True)
    assert slow.stdout.readline().strip() == "sent"
    wait_event(runner, lambda e: e.get("event_type") == "flow" and e.get("src_ip") == runners.node.ip,
               "probes flowing")  # the flow table is live
    stopped: list = []
    stopper = threading.Thread(target=lambda: stopped.append(runner.stop_pod()))
    stopper.start()
    wait_until(lambda: "draining" in runner.logs("palisade"), 15, interval=0.1, what="SIGTERM reached the sidecar")
    slow.stdin.write("go\n")
    slow.stdin.flush()
    out, _ = slow.communicate(timeout=30)
    stopper.join(60)
    assert "200 OK" in out and "web ok" in out, out
    assert stopped and stopped[0].returncode == 0, stopped
    state = runner.state(side)
    assert state["ExitCode"] == 0, state  # exited on its own after SIGTERM (SIGKILL would be 137)
    shutdown = [e for e in sidecar_events(runner) if e.get("event_type") == "shutdown"]
    assert shutdown and shutdown[0]["shutdown"]["flows_cut"] == 0, shutdown
    assert re.search(r"draining [1-9]\d* open flows", runner.logs("palisade")), runner.logs("palisade")[-2000:]


def test_pcap_started_by_annotation_change_is_readable_with_tcpdump(runners, image, web_image):
    runner = start(runners, image, web_pod())
    client = runners.pod("client", NAMESPACE)
    ann = dict(runner.meta.get("annotations") or {})
    ann["palisade.dev/pcap"] = "duration=4s,filter=tcp port 8080,max-bytes=1MiB"
    runner.set_annotations(ann)
    wait_event(runner, lambda e: e.get("event_type") == "pcap" and e["pcap"]["state"] == "started",
               "capture started")
    for _ in range(3):
        assert curl(client, f"http://{runner.net.ip}:8080/captured").stdout.splitlines()[-1] == "200"
    done = wait_event(runner, lambda e: e.get("event_type") == "pcap" and e["pcap"]["state"] == "finished",
                      "capture finished", timeout=20)
    assert done["pcap"]["packets"] > 0 and done["pcap"]["files"], done
    pcap_dir = runner.volume_path("palisade-pcap")
    files = [pcap_dir / Path(f).name for f in done["pcap"]["files"]]
    assert all(f.is_file() for f in files), (files, list(pcap_dir.iterdir()))
    out = subprocess.run(["tcpdump", "-nn", "-r", str(files[0])], capture_output=True, text=True, check=True)
    assert f"{client.ip}." in out.stdout and ".8080" in out.stdout, out.stdout[:2000]


def test_image_without_file_capabilities_fails_like_in_kubernetes(runners, image, web_image):
    """Proves the runner does not hand the sidecar ambient capabilities (podman would): with the
    image's setcap removed, the sidecar cannot open its transparent listener, as in a cluster."""
    from tests.runtime.podrunner import PodFailed, build_test_image

    nocap = "localhost/palisade-test-nocap:dev"
    build_test_image(nocap, f"FROM {image}\nUSER 0\nRUN setcap -r /opt/palisade/venv/bin/python3.11\n"
                            "USER 1337:1337\n")
    with pytest.raises(PodFailed) as failed:
        start(runners, nocap, web_pod())
    assert "Operation not permitted" in str(failed.value), str(failed.value)[-2000:]


def test_non_native_sidecar_post_start_hook_holds_the_app_until_ready(runners, image, web_image):
    """nativeSidecar: false (clusters before 1.29): the sidecar is the first regular container and
    its postStart hook (python in the image) blocks until /readyz answers."""
    runner = start(runners, image, web_pod(), nativeSidecar=False)
    assert [c.spec["name"] for c in runner.containers] == ["palisade-init", "palisade", "web"]
    assert not runner.container("palisade").init and "postStart" in runner.container("palisade").spec["lifecycle"]
    client = runners.pod("client", NAMESPACE)
    r = curl(client, f"http://{runner.net.ip}:8080/x")
    assert r.stdout.splitlines()[-1] == "200", r
    wait_event(runner, lambda e: e.get("event_type") == "flow" and e.get("src_ip") == client.ip,
               "the client's flow through the sidecar")


def test_run_as_non_root_is_checked_against_the_image_user(runners, image, web_image):
    """The kubelet refuses runAsNonRoot for an image that runs as root; so does the runner (the
    sidecar's own runAsNonRoot passes because the image's user is 1337 and the spec says so)."""
    from tests.runtime.podrunner import PodFailed

    pod = web_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"runAsNonRoot": True}
    with pytest.raises(PodFailed, match="runAsNonRoot"):
        start(runners, image, pod)


def test_policy_configmap_created_later_takes_effect_without_a_restart(runners, image, web_image, tmp_path):
    """Learn mode while the namespace has no policy; the kubelet fills the optional volume when
    the ConfigMap is created, and the sidecar switches to the policy (protect) on its own."""
    client = runners.pod("client", NAMESPACE)
    other = runners.pod("other", NAMESPACE)
    runner = start(runners, image, web_pod("out-of-scope"))
    url = f"http://{runner.net.ip}:8080/x"
    assert curl(other, url).stdout.splitlines()[-1] == "200"  # learn: everything flows
    runner.set_config_map("palisade-policy", _policy_dir(tmp_path, client.ip))
    wait_event(runner, lambda e: e.get("event_type") == "policy"
               and e["policy"].get("action") == "reloaded", "the policy reload", timeout=20)
    wait_until(lambda: curl(other, url, timeout=2).stdout.splitlines()[-1] != "200", 10, interval=0.3,
               what="the other pod denied after the reload")
    assert curl(client, url).stdout.splitlines()[-1] == "200"
    assert runner.container("palisade").restarts == 0


def test_quarantine_annotation_cuts_the_pod_off_and_lifting_it_restores(runners, image, web_image):
    runner = start(runners, image, web_pod())
    client = runners.pod("client", NAMESPACE)
    url = f"http://{runner.net.ip}:8080/x"
    assert curl(client, url).stdout.splitlines()[-1] == "200"
    plain = dict(runner.meta.get("annotations") or {})
    runner.set_annotations({**plain, "palisade.dev/quarantine": "true"})
    wait_until(lambda: curl(client, url, timeout=2).stdout.splitlines()[-1] != "200", 15, interval=0.3,
               what="the quarantined pod refusing the client")
    runner.set_annotations(plain)
    wait_until(lambda: curl(client, url, timeout=2).stdout.splitlines()[-1] == "200", 15, interval=0.3,
               what="service restored after the quarantine is lifted")
