"""Property: whatever /mutate makes of a random pod, /validate lets a CDE pod through only with the exact sidecar.

Random pods mix app and init containers (some under the reserved names, some with
Palisade's own image), dangerous security contexts, capture-volume mounts, the
status annotation, exclusions, modes and opt-outs, and near-misses: a real
injected pod with one field of the init container or sidecar changed. For each,
the API server's view is replayed: the JSON Patch /mutate returns is applied (and
the unpatched pod is tried too, as if the mutating webhook had failed open), then
/validate judges the CDE-labelled result. Whenever it allows, an oracle written
independently of ``protection.py`` must find the sidecar exactly as ``inject.py``
renders it, and nothing the guard refuses.
"""

from __future__ import annotations

import base64
import copy
import json

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector.config import InjectorConfig
from injector.inject import init_container, sidecar_container, volumes
from injector.probes import probe_ports
from injector.review import ReviewError, handle, mutate, validate
from tests.injector.guard_cases import all_cases, api_defaults, hardened, injected, pod, review
from tests.injector.test_units import _mutate_at

CONFIG = InjectorConfig()
SECURITY = [None, {}, {"privileged": True}, {"capabilities": {"add": ["NET_ADMIN"]}},
            {"capabilities": {"add": ["cap_sys_admin"]}, "allowPrivilegeEscalation": False},
            {"runAsUser": 1337}, {"runAsGroup": 1337}, {"procMount": "Unmasked"},
            {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
            {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
             "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
             "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}}]
NAMES = ["web", "worker", "palisade", "palisade-init", "setup"]
IMAGES = ["shop/web:1", "palisade:0.1.0", "busybox:1.36"]
COMMANDS = [None, ["python", "-m", "firewall", "run"], ["python", "-m", "firewall", "redirect", "apply"],
            ["sleep", "infinity"]]
MOUNTS = [None, [{"name": "data", "mountPath": "/data"}], [{"name": "palisade-pcap", "mountPath": "/p"}]]
ANNOTATIONS = {
    "palisade.dev/status": st.just("injected"),
    "palisade.dev/exclude-outbound-cidrs": st.sampled_from(["0.0.0.0/0", "192.0.2.1", "::/0,10.0.0.0/8"]),
    "palisade.dev/exclude-inbound-ports": st.sampled_from(["22", "8080,9090"]),
    "palisade.dev/mode": st.sampled_from(["learn", "monitor", "protect"]),
    "palisade.dev/inject": st.sampled_from(["true", "false"]),
}
TAMPER_FIELDS = {
    "image": st.sampled_from(IMAGES + ["palisade:0.0.9"]),
    "command": st.sampled_from(COMMANDS[1:] + [["sh", "-c", "true"]]),
    "args": st.sampled_from([[], ["--inbound-port", "15006"], ["--config", "/etc/palisade/config.yaml"]]),
    "securityContext": st.sampled_from(SECURITY),
    "volumeMounts": st.sampled_from(MOUNTS),
    "envFrom": st.just([{"configMapRef": {"name": "x"}}]),
    "restartPolicy": st.sampled_from([None, "Always"]),
    "env": st.sampled_from([None, [{"name": "PALISADE_MODE", "value": "learn"}]]),
    "startupProbe": st.sampled_from([None, {"exec": {"command": ["nft", "flush", "ruleset"]}}]),
    "ports": st.sampled_from([None, [{"containerPort": 15020, "hostPort": 15020}]]),
    "terminationMessagePath": st.just("/etc/palisade/config.yaml"),
    "workingDir": st.just("/tmp"),
}


def _sometimes(draw, rate: int, pool: list):
    """A value from ``pool`` in ``rate`` % of the draws, else None: most pods are clean in most fields,
    so the pods validate may allow (the interesting ones for this property) are common."""
    return copy.deepcopy(draw(st.sampled_from(pool))) if draw(st.integers(0, 99)) < rate else None


@st.composite
def containers(draw, names, rate):
    out = []
    for name in names:
        c = {"name": name, "image": draw(st.sampled_from(IMAGES))}
        for key, pool in (("command", COMMANDS), ("securityContext", SECURITY), ("volumeMounts", MOUNTS)):
            value = _sometimes(draw, rate, pool)
            if value is not None:
                c[key] = value
        if draw(st.booleans()):
            c["readinessProbe"] = {"httpGet": {"port": draw(st.integers(1, 65535))}}
        if draw(st.integers(0, 99)) >= rate // 2:
            c = hardened(c)
        out.append(c)
    return out


@st.composite
def random_pods(draw):
    # How dirty this pod is: 5 % of fields set from the pools (mostly clean) up to 60 %.
    rate = draw(st.sampled_from([5, 20, 60]))
    pool = NAMES if draw(st.integers(0, 99)) < rate else [n for n in NAMES if not n.startswith("palisade")]
    names = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True))
    split = draw(st.integers(0, len(names) - 1))
    app = draw(containers(names[split:], rate))
    init = draw(containers(names[:split], rate))
    for c in init:
        if draw(st.booleans()):
            c["restartPolicy"] = "Always"
    keys = [k for k in sorted(ANNOTATIONS) if draw(st.integers(0, 99)) < rate // 2]
    annotations = {k: draw(ANNOTATIONS[k]) for k in keys}
    extra = {}
    if draw(st.integers(0, 99)) < rate // 3:
        extra["hostNetwork"] = True
    psc = _sometimes(draw, rate // 2, [{"runAsUser": 1337}, {"supplementalGroups": [1337]}, {"fsGroup": 1337},
                                       {"runAsGroup": 1337}, {"fsGroup": 1000}])
    if psc is not None:
        extra["securityContext"] = psc
    return pod(containers=app, init=init or None, annotations=annotations or None, harden=False, **extra)


@st.composite
def near_misses(draw):
    """A real injected pod with one field of one Palisade container changed (or none)."""
    base = injected(pod(containers=[{"name": "web", "image": "shop/web:1"}]))
    if draw(st.booleans()):
        return base
    target = draw(st.sampled_from(["palisade-init", "palisade"]))
    key = draw(st.sampled_from(sorted(TAMPER_FIELDS)))
    value = draw(TAMPER_FIELDS[key])
    for c in base["spec"]["initContainers"]:
        if c["name"] == target:
            if value is None:
                c.pop(key, None)
            else:
                c[key] = copy.deepcopy(value)
    return base


def _mutated(p: dict) -> dict | None:
    response = mutate(review(copy.deepcopy(p)), CONFIG).review["response"]
    if not response["allowed"]:
        return None
    if "patch" not in response:
        return copy.deepcopy(p)
    return jsonpatch.apply_patch(p, json.loads(base64.b64decode(response["patch"])))


def oracle(p: dict) -> list[str]:
    """Independent check: the exact rendered sidecar and nothing the guard forbids (empty = fine)."""
    spec = p["spec"]
    meta = p["metadata"]
    annotations = meta.get("annotations") or {}
    bad = []
    inits = spec.get("initContainers") or []
    if [c["name"] for c in inits[:2]] != ["palisade-init", "palisade"]:
        return ["palisade-init, palisade are not the first two init containers"]
    apps = spec.get("containers") or []
    probes = probe_ports(apps + [c for c in inits[2:] if c.get("restartPolicy") == "Always"])
    want = {"palisade-init": init_container(CONFIG, annotations),
            "palisade": sidecar_container(CONFIG, annotations, probes.env_value())}
    for c in inits[:2]:
        w = want[c["name"]]
        # No API-server defaults here: everything but resources must be exactly the rendered value.
        strip = ("resources",)
        if {k: v for k, v in c.items() if k not in strip} != {k: v for k, v in w.items() if k not in strip}:
            bad.append(f"{c['name']} differs from the render")
    others = inits[2:] + apps
    if any(c["name"].startswith("palisade") for c in others):
        bad.append("another container under a reserved name")
    have = {v["name"]: v for v in spec.get("volumes") or []}
    for v in volumes(CONFIG):
        if have.get(v["name"]) != v:
            bad.append(f"volume {v['name']}")
    if spec.get("hostNetwork"):
        bad.append("hostNetwork")
    psc = spec.get("securityContext") or {}
    if 1337 in (psc.get("runAsUser"), psc.get("runAsGroup"), psc.get("fsGroup")) or 1337 in (
            psc.get("supplementalGroups") or []):
        bad.append("pod identity 1337")
    for c in others:
        sc = c.get("securityContext") or {}
        if sc.get("privileged") or sc.get("procMount") == "Unmasked" or 1337 in (sc.get("runAsUser"),
                                                                                  sc.get("runAsGroup")):
            bad.append(f"{c['name']} dangerous securityContext")
        if {x.upper().removeprefix("CAP_") for x in (sc.get("capabilities") or {}).get("add") or []} & {
                "NET_ADMIN", "SYS_ADMIN", "NET_RAW", "SYS_PTRACE", "BPF", "ALL"}:
            bad.append(f"{c['name']} dangerous capability")
        if not {x.upper().removeprefix("CAP_") for x in (sc.get("capabilities") or {}).get("drop") or []} & {
                "NET_RAW", "ALL"}:
            bad.append(f"{c['name']} keeps NET_RAW")
        if any(m["name"] == "palisade-pcap" for m in c.get("volumeMounts") or []):
            bad.append(f"{c['name']} mounts the capture volume")
    if any(k.startswith("palisade.dev/exclude-") and v.strip() for k, v in annotations.items()):
        bad.append("exclusion without allow-list")
    if annotations.get("palisade.dev/mode", "protect") != "protect":
        bad.append("mode")
    if "false" in (annotations.get("palisade.dev/inject"), meta.get("labels", {}).get("palisade.dev/inject")):
        bad.append("opt-out")
    return bad


def _check(p: dict) -> None:
    for candidate in (_mutated(p), p):
        if candidate is None:
            continue
        response = validate(review(candidate), CONFIG).review["response"]
        if response["allowed"]:
            assert oracle(candidate) == [], (oracle(candidate), candidate)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_pods())
def test_validate_allows_a_cde_pod_only_with_the_exact_sidecar(p):
    _check(p)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_misses())
def test_near_miss_sidecars_are_never_allowed(p):
    _check(p)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["web", "worker", "setup"]), min_size=1, max_size=3, unique=True),
       st.integers(1, 65535))
def test_clean_pods_injected_by_mutate_pass_validate(names, port):
    """The other direction: the webhooks agree on pods that ask for nothing forbidden."""
    p = pod(containers=[{"name": n, "image": "shop/x:1", "readinessProbe": {"httpGet": {"port": port}}}
                        for n in names])  # pod() hardens: drop ALL
    patched = _mutated(p)
    assert patched is not None
    assert validate(review(patched), CONFIG).review["response"]["allowed"] is True
    assert oracle(patched) == []
    # As stored by the API server (defaults filled in), it is still protected.
    assert validate(review(api_defaults(patched)), CONFIG).review["response"]["allowed"] is True


# --- fuzz: every guard path answers odd shapes with a response or a ReviewError ------------------

_FUZZ_CASES = [c for c in all_cases()
               if c.name.startswith(("ephemeral", "update", "lookalike", "exclusion", "dangerous-pod", "netraw"))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(_FUZZ_CASES))), st.lists(st.integers(0, 50), min_size=1, max_size=8),
       st.recursive(st.none() | st.booleans() | st.integers(-2, 2000) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                               max_size=3), max_leaves=6),
       st.sampled_from([(), ("debug",), ("mode", "debug")]))
def test_malformed_guard_reviews_only_raise_review_error(index, choices, value, grants):
    case = _FUZZ_CASES[index]
    doc = _mutate_at(copy.deepcopy(case.review), choices, value)
    try:
        result = handle(case.endpoint, json.dumps(doc), CONFIG, frozenset(grants))
    except ReviewError:
        return
    assert isinstance(result.review["response"]["allowed"], bool)
