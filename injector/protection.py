"""Is this pod protected? Decided by re-rendering the sidecar and comparing, never by asking the pod.

A pod can say anything about itself: ``palisade.dev/status: injected`` and two
containers *named* ``palisade-init`` and ``palisade`` running ``busybox`` cost an
attacker one YAML file. So "protected" means exactly one thing, checked the same
way by ``/mutate`` and ``/validate``: the pod's spec holds the init container and
the sidecar as ``inject.py`` renders them *for this pod under the current
configuration* - image from the allow-list, command, args (with the redirect
arguments and the exclusions its annotations ask for), securityContext, env,
volume mounts, placement - plus Palisade's volumes as rendered, and no
``hostNetwork``. The answer lists every difference, so a refusal can say which
field to fix.

Tolerated differences, because the API server or the cluster adds them and they
cannot weaken the firewall: resources, ``imagePullPolicy``,
``terminationMessagePolicy``, ``resizePolicy``, the default
``terminationMessagePath``, ``successThreshold: 1`` on probes, the
service-account token mount, ``defaultMode: 420`` on ConfigMap/downward-API
volumes, and equal quantities spelled differently. Probes and ports are compared:
an exec probe runs inside the sidecar with its capabilities.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from injector import INIT_NAME, PROBE_PORTS_ENV, SIDECAR_NAME
from injector.annotations import AnnotationError
from injector.config import InjectorConfig
from injector.inject import init_container, sidecar_container, volumes
from injector.probes import probe_ports

RESERVED = (INIT_NAME, SIDECAR_NAME)
# Fields of our containers whose value does not change what the firewall enforces.
# Probes are compared (an exec probe runs inside the sidecar, with its capabilities), and so are
# ports (a hostPort would publish the admin port on the node).
TOLERATED = frozenset({"image", "imagePullPolicy", "resources", "terminationMessagePolicy", "resizePolicy"})
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# The kubelet bind-mounts a file at terminationMessagePath: anything but the default could shadow
# a file the sidecar reads (its config).
TERMINATION_LOG = "/dev/termination-log"
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True, slots=True)
class Protection:
    """The verdict: ``protected`` only when ``problems`` is empty and the containers are present."""

    protected: bool
    present: bool                 # at least one container under a reserved name
    problems: tuple[str, ...]     # one human-readable difference each, naming the field

    def summary(self, limit: int = 6) -> str:
        """The first ``limit`` problems (a refusal must stay readable in ``kubectl``'s output)."""
        more = len(self.problems) - limit
        return "; ".join(self.problems[:limit]) + (f"; and {more} more" if more > 0 else "")


def _list(spec: dict, key: str) -> list[dict]:
    items = spec.get(key)
    return [c for c in items if isinstance(c, dict)] if isinstance(items, list) else []


def reserved_present(spec: dict) -> bool:
    return any(c.get("name") in RESERVED for key in ("initContainers", "containers", "ephemeralContainers")
               for c in _list(spec, key))


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(want: Any, got: Any) -> str:
    """The difference between two values, as short as it can be said: which items or keys."""
    if isinstance(want, list) and isinstance(got, list) and not all(isinstance(x, str) for x in want + got):
        extra = [x for x in got if x not in want]
        missing = [x for x in want if x not in got]
        parts = ([f"has {_short(extra)} which the injector does not render"] if extra else []) + (
            [f"lacks {_short(missing)}"] if missing else [])
        return "; ".join(parts) if parts else f"order differs: got {_short(got)}"
    if isinstance(want, dict) and isinstance(got, dict):
        keys = [k for k in sorted(set(want) | set(got), key=str) if want.get(k) != got.get(k)]
        return ", ".join(f"{k}: got {_short(got.get(k), 80)}, the injector renders {_short(want.get(k), 80)}"
                         for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
    return f"got {_short(got)}, the injector renders {_short(want)}"


def _norm_sc(sc: Any) -> Any:
    if isinstance(sc, dict) and sc.get("procMount") == "Default":
        sc = {k: v for k, v in sc.items() if k != "procMount"}
    return sc


def _norm_probe(probe: Any) -> Any:
    """API-server defaults on a probe: ``successThreshold: 1`` (the rest the injector sets itself)."""
    if isinstance(probe, dict) and probe.get("successThreshold") == 1:
        probe = {k: v for k, v in probe.items() if k != "successThreshold"}
    return probe


def _norm_env(env: Any) -> Any:
    """``{name: X, value: ""}`` is stored as ``{name: X}``: the API server omits an empty value
    (seen against kube-apiserver: PALISADE_PROBE_PORTS of a pod without probes)."""
    if not isinstance(env, list):
        return env
    return [{k: v for k, v in e.items() if not (k == "value" and v == "")} if isinstance(e, dict) else e
            for e in env]


def _norm_mounts(mounts: Any) -> Any:
    if not isinstance(mounts, list):
        return mounts
    return [m for m in mounts if not (isinstance(m, dict) and m.get("mountPath") == SA_TOKEN_PATH
                                      and m.get("readOnly") is True and "subPath" not in m)]


_SUFFIX = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def _quantity(value: Any) -> Any:
    """``"0.5Gi"`` and ``"512Mi"`` are one quantity (the API server may canonicalise either way)."""
    match = re.fullmatch(r"\+?(\d+(?:\.\d*)?|\.\d+)([a-zA-Z]{0,2})", str(value).strip())
    if not match or match.group(2) not in _SUFFIX:
        return value
    return Decimal(match.group(1)) * _SUFFIX[match.group(2)]


def _norm_volume(vol: Any) -> Any:
    if not isinstance(vol, dict):
        return vol
    out = {}
    for key, value in vol.items():
        if isinstance(value, dict) and value.get("defaultMode") == 420:
            value = {k: v for k, v in value.items() if k != "defaultMode"}
        if key == "emptyDir" and isinstance(value, dict) and "sizeLimit" in value:
            value = {**value, "sizeLimit": _quantity(value["sizeLimit"])}
        out[key] = value
    return out


def container_problems(expected: dict, actual: dict, config: InjectorConfig) -> list[str]:
    """Every field where ``actual`` differs from the rendered ``expected`` (tolerated ones aside)."""
    name = expected["name"]
    problems: list[str] = []
    image = actual.get("image")
    if image not in config.images:
        problems.append(f"container {name}: image {_short(image)} is not an allowed Palisade image "
                        f"(allowed: {', '.join(config.images)})")
    for key in sorted(set(expected) | set(actual)):
        if key in TOLERATED or key == "name":
            continue
        want, got = expected.get(key), actual.get(key)
        if key == "terminationMessagePath" and got == TERMINATION_LOG:
            continue
        if key == "securityContext":
            want, got = _norm_sc(want), _norm_sc(got)
        elif key in PROBES:
            want, got = _norm_probe(want), _norm_probe(got)
        elif key == "volumeMounts":
            got = _norm_mounts(got)
        elif key == "env":
            want, got = _norm_env(want), _norm_env(got)
        if want == got or (want in (None, [], {}) and got in (None, [], {})):
            continue  # an empty list or map is what "unset" looks like after defaulting
        if key not in expected:
            problems.append(f"container {name}: field {key} is set ({_short(got)}) but the injector "
                            "never sets it")
        elif key not in actual:
            problems.append(f"container {name}: field {key} is missing (the injector sets {_short(want)})")
        else:
            problems.append(f"container {name}: field {key} differs: {describe(want, got)}")
    return problems


def expected_containers(pod: dict, config: InjectorConfig) -> tuple[dict, dict]:
    """What ``inject.render`` would add to this pod now (raises ``AnnotationError``)."""
    spec = pod.get("spec") or {}
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    apps = [c for c in _list(spec, "containers") if c.get("name") not in RESERVED]
    user_sidecars = [c for c in _list(spec, "initContainers")
                     if c.get("restartPolicy") == "Always" and c.get("name") not in RESERVED]
    probes = probe_ports(apps + user_sidecars)
    return init_container(config, annotations), sidecar_container(config, annotations, probes.env_value())


def _placement_problems(spec: dict, config: InjectorConfig) -> list[str]:
    inits = [c.get("name") for c in _list(spec, "initContainers")]
    apps = [c.get("name") for c in _list(spec, "containers")]
    problems = []
    for c in _list(spec, "ephemeralContainers"):
        if c.get("name") in RESERVED:
            problems.append(f"ephemeral container {c.get('name')}: the name is reserved for Palisade")
    if inits[:1] != [INIT_NAME]:
        problems.append(f"container {INIT_NAME}: must be the first init container "
                        f"(init containers are {inits or 'none'})")
    if config.native_sidecar:
        if inits[1:2] != [SIDECAR_NAME]:
            problems.append(f"container {SIDECAR_NAME}: must be the second init container (native sidecar)")
        if SIDECAR_NAME in apps:
            problems.append(f"container {SIDECAR_NAME}: is a regular container, the injector makes it a "
                            "native sidecar (init container with restartPolicy: Always)")
    elif apps[:1] != [SIDECAR_NAME]:
        problems.append(f"container {SIDECAR_NAME}: must be the first container (nativeSidecar: false)")
    for name in RESERVED:
        count = inits.count(name) + apps.count(name)
        if count > 1:
            problems.append(f"container {name}: appears {count} times")
    return problems


def inspect(pod: dict, config: InjectorConfig) -> Protection:
    """Compare the pod with what the injector renders for it; list every difference."""
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    present = reserved_present(spec)
    by_name = {c.get("name"): c for key in ("initContainers", "containers") for c in _list(spec, key)}
    if INIT_NAME not in by_name and SIDECAR_NAME not in by_name:
        return Protection(False, present, (f"the {INIT_NAME} and {SIDECAR_NAME} containers are missing",))
    problems = _placement_problems(spec, config)
    if spec.get("hostNetwork") is True:
        problems.append("hostNetwork: true (the redirect rules would apply to the node, not the pod)")
    try:
        want_init, want_sidecar = expected_containers(pod, config)
    except AnnotationError as exc:
        return Protection(False, present, (*problems, str(exc)))
    for want in (want_init, want_sidecar):
        got = by_name.get(want["name"])
        if got is None:
            problems.append(f"container {want['name']}: missing")
        else:
            problems += container_problems(want, got, config)
    have_vols = {v.get("name"): v for v in _list(spec, "volumes")}
    for vol in volumes(config):
        got = have_vols.get(vol["name"])
        if got is None:
            problems.append(f"volume {vol['name']}: missing")
        elif _norm_volume(got) != _norm_volume(vol):
            problems.append(f"volume {vol['name']}: differs: {describe(vol, got)}")
    return Protection(not problems, present, tuple(problems))


def repair(pod: dict, config: InjectorConfig) -> dict | None:
    """Fix what later mutating webhooks may have changed behind our back; None when nothing to fix.

    With ``reinvocationPolicy: IfNeeded`` we see the pod again after other webhooks ran. One may
    have put an init container before ours (it would run before the redirect rules exist) or
    added a container with probes (our ``PALISADE_PROBE_PORTS`` is then stale). Only these two
    are repaired: order and that one env value, both derived from the pod itself. Everything
    else is for ``inspect`` to judge.
    """
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    inits = _list(spec, "initContainers")
    names = [c.get("name") for c in inits]
    ours = [n for n in RESERVED if n in names]
    out = copy.deepcopy(pod)
    changed = False
    if ours and names[: len(ours)] != ours and all(names.count(n) == 1 for n in ours):
        by_name = {c.get("name"): c for c in out["spec"]["initContainers"]}
        rest = [c for c in out["spec"]["initContainers"] if c.get("name") not in ours]
        out["spec"]["initContainers"] = [by_name[n] for n in ours] + rest
        changed = True
    try:
        _init, want = expected_containers(out, config)
    except AnnotationError:
        return out if changed else None
    value = next(e["value"] for e in want["env"] if e["name"] == PROBE_PORTS_ENV)
    for key in ("initContainers", "containers"):
        for c in _list(out["spec"], key):
            if c.get("name") != SIDECAR_NAME or not isinstance(c.get("env"), list):
                continue
            for e in c["env"]:
                # the API server stores an empty value as no value at all (_norm_env)
                if isinstance(e, dict) and e.get("name") == PROBE_PORTS_ENV and set(e) <= {"name", "value"} \
                        and e.get("value", "") != value:
                    e["value"] = value
                    changed = True
    return out if changed else None
