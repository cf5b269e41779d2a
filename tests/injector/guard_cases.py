"""AdmissionReview cases for the admission guard (issue 17), built from a few pods and tampered with.

Each ``Case`` is one review sent to one endpoint (with the namespace grants the webhook
path would carry) under one of the named configs, plus what must hold of the answer:
allowed or not, fragments of the message / warnings. ``guard_golden.json`` holds the
full answers (message, warnings, code, patch) so any change in wording or outcome shows
up as a diff; regenerate with ``PALISADE_REGEN_GOLDEN=1`` and review it.

The cases are built, not hand-written, so that every variant (another image, another
command, every exclusion form, every dangerous field at pod/container/init/ephemeral
level, CREATE/UPDATE/ephemeral) is one line.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

from injector.config import InjectorConfig
from injector.review import mutate

NS = "payments"
CDE = {"pci.palisade.dev/scope": "cde"}

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "admin": {
        "clusterCidrs": ["10.244.0.0/16", "10.96.0.0/12", "fd00:10::/56"],
        "allowedImages": ["registry.example/palisade@sha256:" + "a" * 64],
        "cdeExclusions": [
            {"namespaces": [NS], "outboundCidrs": ["192.0.2.0/24", "2001:db8::/32"],
             "outboundPorts": ["5432", "6000-6010"], "inboundPorts": ["9443"]},
            {"namespaces": [NS], "podLabels": {"app": "ledger"}, "outboundCidrs": ["10.96.0.10/32"]},
        ],
    },
    "refuse": {"dangerousOutsideCde": "refuse"},
}


def config(name: str) -> InjectorConfig:
    return InjectorConfig.from_dict(CONFIGS[name])


@dataclass
class Case:
    name: str
    endpoint: str                  # "mutate" or "validate"
    review: dict
    allowed: bool
    fragments: tuple[str, ...] = ()        # each must appear in the refusal message
    warnings: tuple[str, ...] = ()         # each must appear in some warning
    grants: tuple[str, ...] = ()
    config: str = "default"
    extra: dict = field(default_factory=dict)


HARDENED = {"capabilities": {"drop": ["ALL"]}}


def hardened(c: dict) -> dict:
    """A container that drops every capability (what a CDE container must do with NET_RAW at least)."""
    sc = c.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    return {**c, "securityContext": {**sc, "capabilities": {**caps, "drop": caps.get("drop", ["ALL"])}}}


def pod(name: str = "web", *, cde: bool = True, labels: dict | None = None, annotations: dict | None = None,
        containers: list[dict] | None = None, init: list[dict] | None = None, harden: bool = True,
        **spec: Any) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": {"app": name, **(CDE if cde else {}),
                                                                      **(labels or {})}}
    if annotations:
        meta["annotations"] = dict(annotations)
    body: dict[str, Any] = {"containers": containers or [{"name": name, "image": "shop/web:1.4"}]}
    if init:
        body["initContainers"] = init
    if harden:
        for key in ("containers", "initContainers"):
            if key in body:
                body[key] = [hardened(c) for c in body[key]]
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def review(obj: dict, *, op: str = "CREATE", old: dict | None = None, sub: str | None = None,
           uid: str = "guard-case") -> dict:
    req: dict[str, Any] = {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "name": obj["metadata"].get("name", ""), "namespace": obj["metadata"].get("namespace", NS),
        "operation": op, "userInfo": {"username": "alice"}, "object": obj, "oldObject": old,
    }
    if sub:
        req["subResource"] = sub
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}


def injected(p: dict, cfg: str = "default") -> dict:
    """The pod as it runs after a real /mutate (the fixture every tamper starts from)."""
    result = mutate(review(copy.deepcopy(p)), config(cfg))
    assert result.outcome == "injected", result.reason
    ops = json.loads(base64.b64decode(result.review["response"]["patch"]))
    return jsonpatch.apply_patch(p, ops)


def maybe_injected(p: dict, cfg: str = "default") -> dict:
    """``injected`` when the injector accepts the pod, else the pod as written."""
    result = mutate(review(copy.deepcopy(p)), config(cfg))
    if result.outcome != "injected":
        return p
    return jsonpatch.apply_patch(p, json.loads(base64.b64decode(result.review["response"]["patch"])))


def api_defaults(p: dict) -> dict:
    """Roughly what the API server's defaulting adds to a stored pod (the parts the guard must tolerate)."""
    out = copy.deepcopy(p)
    spec = out["spec"]
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("imagePullPolicy", "IfNotPresent")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    c[probe].setdefault("successThreshold", 1)
            for port in c.get("ports") or []:
                port.setdefault("protocol", "TCP")
    for v in spec.get("volumes") or []:
        for kind in ("configMap", "downwardAPI", "secret"):
            if kind in v:
                v[kind].setdefault("defaultMode", 420)
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    return out


def _find(p: dict, name: str) -> dict:
    for key in ("initContainers", "containers"):
        for c in p["spec"].get(key) or []:
            if c["name"] == name:
                return c
    raise KeyError(name)


def tamper(p: dict, name: str, **changes: Any) -> dict:
    """A copy of ``p`` with container ``name`` changed (``None`` deletes the field)."""
    out = copy.deepcopy(p)
    c = _find(out, name)
    for key, value in changes.items():
        if value is None:
            c.pop(key, None)
        else:
            c[key] = value
    return out


def with_sc(c: dict, **sc: Any) -> dict:
    return {**c, "securityContext": {**c.get("securityContext", {}), **sc}}


# --- builders per class ---------------------------------------------------------------------------

def look_alike_cases() -> list[Case]:
    base = injected(pod())
    init, side = _find(base, "palisade-init"), _find(base, "palisade")
    variants: dict[str, tuple[dict, str]] = {
        "image-busybox": (tamper(base, "palisade", image="busybox:1.36"), "image 'busybox:1.36' is not an allowed"),
        "init-image-other-tag": (tamper(base, "palisade-init", image="palisade:0.0.1"), "container palisade-init: image"),
        "command-sleep": (tamper(base, "palisade", command=["sleep", "infinity"]), "field command differs"),
        "init-command-true": (tamper(base, "palisade-init", command=["/bin/true"]), "field command differs"),
        # Drop the last redirect argument pair (whatever the renderer's arguments are).
        "args-one-pair-dropped": (tamper(base, "palisade-init", args=init["args"][:-2]), "field args differs"),
        "args-extra-exclusion": (tamper(base, "palisade-init", args=[*init["args"], "--exclude-outbound-cidrs",
                                                                     "0.0.0.0/0"]), "field args differs"),
        "sidecar-args-no-policy": (tamper(base, "palisade", args=side["args"][:2]), "field args differs"),
        "sidecar-privileged": (tamper(base, "palisade", securityContext={**side["securityContext"],
                                                                         "privileged": True}),
                               "field securityContext differs"),
        "init-runasuser-1337": (tamper(base, "palisade-init", securityContext={**init["securityContext"],
                                                                               "runAsUser": 1337}),
                                "field securityContext differs"),
        "sidecar-mount-config": (tamper(base, "palisade", volumeMounts=[*side["volumeMounts"], {
            "name": "evil", "mountPath": "/etc/palisade/config.yaml", "subPath": "c"}]), "field volumeMounts differs"),
        "sidecar-envfrom": (tamper(base, "palisade", envFrom=[{"configMapRef": {"name": "evil"}}]),
                            "field envFrom is set"),
        "sidecar-no-restart-policy": (tamper(base, "palisade", restartPolicy=None), "field restartPolicy is missing"),
        "sidecar-lifecycle": (tamper(base, "palisade", lifecycle={"preStop": {"exec": {"command": ["nft", "flush",
                                                                                                  "ruleset"]}}}),
                              "field lifecycle is set"),
        "startup-probe-exec": (tamper(base, "palisade", startupProbe={"exec": {"command": [
            "python", "-c", "import os; os.system('nft flush ruleset')"]}}), "field startupProbe differs"),
        "liveness-probe-removed": (tamper(base, "palisade", livenessProbe=None), "field livenessProbe is missing"),
        "admin-host-port": (tamper(base, "palisade", ports=[{"name": "palisade-admin", "containerPort": 15020,
                                                              "hostPort": 15020, "protocol": "TCP"}]),
                            "field ports differs"),
        "termination-path-over-config": (tamper(base, "palisade",
                                                terminationMessagePath="/etc/palisade/config.yaml"),
                                         "field terminationMessagePath is set"),
    }
    # Structural look-alikes.
    only_init = copy.deepcopy(base)
    only_init["spec"]["initContainers"] = [c for c in only_init["spec"]["initContainers"] if c["name"] != "palisade"]
    variants["only-init"] = (only_init, "container palisade: missing")
    swapped = copy.deepcopy(base)
    swapped["spec"]["initContainers"].reverse()
    variants["swapped-order"] = (swapped, "must be the first init container")
    regular = copy.deepcopy(base)
    sc = regular["spec"]["initContainers"].pop(1)
    sc.pop("restartPolicy")
    regular["spec"]["containers"].insert(0, sc)
    variants["sidecar-as-regular-container"] = (regular, "is a regular container")
    policy_swap = copy.deepcopy(base)
    for v in policy_swap["spec"]["volumes"]:
        if v["name"] == "palisade-policy":
            v["configMap"]["name"] = "allow-everything"
    variants["policy-volume-swapped"] = (policy_swap, "volume palisade-policy: differs")
    pcap_host = copy.deepcopy(base)
    for v in pcap_host["spec"]["volumes"]:
        if v["name"] == "palisade-pcap":
            v.pop("emptyDir")
            v["hostPath"] = {"path": "/tmp/pcaps"}
    variants["pcap-volume-hostpath"] = (pcap_host, "volume palisade-pcap: differs")
    hostnet = copy.deepcopy(base)
    hostnet["spec"]["hostNetwork"] = True
    variants["injected-but-hostnetwork"] = (hostnet, "hostNetwork")
    # The issue's exact report: status annotation plus containers *named* right, anything inside.
    fake = pod(annotations={"palisade.dev/status": "injected"}, init=[
        {"name": "palisade-init", "image": "busybox", "command": ["true"]},
        {"name": "palisade", "image": "busybox", "command": ["sleep", "1d"], "restartPolicy": "Always"}])
    variants["issue-17-fake-status"] = (fake, "is not an allowed Palisade image")

    cases = []
    for name, (p, fragment) in variants.items():
        if name == "swapped-order":
            # Order is the one thing /mutate repairs (a later webhook may have reordered).
            cases.append(Case(f"lookalike-{name}-mutate-repairs", "mutate", review(p), True))
        else:
            cases.append(Case(f"lookalike-{name}-mutate", "mutate", review(p), False,
                              ("reserved for the Palisade sidecar", fragment)))
        cases.append(Case(f"lookalike-{name}-validate", "validate", review(p), False, (fragment,)))
    # Accepted: the exact render, an allow-listed image, API-server defaults on top.
    digest = tamper(base, "palisade", image=CONFIGS["admin"]["allowedImages"][0])
    cases.append(Case("protected-allowlisted-image", "validate", review(digest), True, config="admin"))
    cases.append(Case("allowlisted-image-not-in-default-config", "validate", review(digest), False,
                      ("image 'registry.example/palisade@sha256:",)))
    defaulted = copy.deepcopy(base)
    for c in defaulted["spec"]["initContainers"]:
        c.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                c[probe]["successThreshold"] = 1
        c.setdefault("volumeMounts", []).append({"name": "kube-api-access-x1", "readOnly": True,
                                                 "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
    for v in defaulted["spec"]["volumes"]:
        for kind in ("configMap", "downwardAPI"):
            if kind in v:
                v[kind]["defaultMode"] = 420
    cases.append(Case("protected-with-api-server-defaults", "validate", review(defaulted), True))
    cases.append(Case("protected-with-api-server-defaults-mutate", "mutate", review(defaulted), True))
    status_only = pod(annotations={"palisade.dev/status": "injected"})
    cases.append(Case("status-annotation-only-mutate-injects", "mutate", review(status_only), True,
                      extra={"injects": True}))
    cases.append(Case("status-annotation-only-validate", "validate", review(status_only), False,
                      ("are not both present",)))
    return cases


def exclusion_cases() -> list[Case]:
    cidr, oport, iport = ("palisade.dev/exclude-outbound-cidrs", "palisade.dev/exclude-outbound-ports",
                          "palisade.dev/exclude-inbound-ports")
    refused: dict[str, tuple[dict, str, str]] = {
        "all-v4-v6": ({cidr: "0.0.0.0/0,::/0"}, "0.0.0.0/0 covers 0.0.0.0/0", "default"),
        "all-v4-spaced": ({cidr: " 0.0.0.0/0 "}, "never allowed", "admin"),
        "halves": ({cidr: "0.0.0.0/1,128.0.0.0/1"}, "shorter than /8", "admin"),
        "all-v4-double-zero": ({cidr: "0.0.0.0/00"}, "0.0.0.0/0 covers 0.0.0.0/0", "admin"),
        "all-v4-netmask-form": ({cidr: "0.0.0.0/0.0.0.0"}, "0.0.0.0/0 covers 0.0.0.0/0", "admin"),
        "all-v6-spelled-out": ({cidr: "0::0/0"}, "::/0 covers ::/0", "admin"),
        "hidden-after-granted": ({cidr: "192.0.2.1,0.0.0.0/0"}, "0.0.0.0/0 covers", "admin"),
        "v4-mapped-dotted": ({cidr: "::ffff:0.0.0.0/96"}, "covers ::ffff:0:0/96", "admin"),
        "nat64": ({cidr: "64:ff9b::/96"}, "covers 64:ff9b::/96", "admin"),
        "all-global-v6": ({cidr: "2000::/3"}, "shorter than /16", "admin"),
        "v4-mapped-v6": ({cidr: "::ffff:0:0/96"}, "covers ::ffff:0:0/96", "admin"),
        "covers-pod-cidr": ({cidr: "10.0.0.0/8"}, "covers the cluster range 10.244.0.0/16", "admin"),
        "covers-service-cidr": ({cidr: "10.96.0.0/12"}, "covers the cluster range 10.96.0.0/12", "admin"),
        "covers-v6-cluster": ({cidr: "fd00::/16"}, "covers the cluster range fd00:10::/56", "admin"),
        "single-ip-not-listed": ({cidr: "198.51.100.7"}, "198.51.100.7/32 may not bypass", "admin"),
        "wider-than-grant": ({cidr: "192.0.0.0/16"}, "192.0.0.0/16 may not bypass", "admin"),
        "no-allowlist-at-all": ({cidr: "192.0.2.1"}, "add it to cdeExclusions", "default"),
        "outbound-port": ({oport: "443"}, "port 443 may not bypass", "admin"),
        "outbound-port-outside-range": ({oport: "6011"}, "port 6011 may not bypass", "admin"),
        "inbound-port": ({iport: "22"}, "port 22 may not bypass", "admin"),
        "inbound-port-default-config": ({iport: "8080"}, "add it to cdeExclusions", "default"),
        "label-narrowed-grant": ({cidr: "10.96.0.10/32"}, "10.96.0.10/32 may not bypass", "admin"),
    }
    cases = []
    for name, (ann, fragment, cfg) in refused.items():
        p = pod(annotations=ann)
        cases.append(Case(f"exclusion-{name}", "validate", review(injected(p, cfg)), False, (fragment,), config=cfg))
    other_ns = pod(annotations={cidr: "192.0.2.10"})
    other_ns["metadata"]["namespace"] = "shop"
    cases.append(Case("exclusion-granted-in-other-namespace", "validate", review(injected(other_ns, "admin")),
                      False, ("add it to cdeExclusions",), config="admin"))
    allowed = {
        "granted-cidr": {cidr: "192.0.2.10, 2001:db8:1::/48"},
        "granted-ports": {oport: "5432,6005", iport: "9443"},
        "granted-by-pod-label": {cidr: "10.96.0.10/32"},
    }
    for name, ann in allowed.items():
        p = pod(annotations=ann, labels={"app": "ledger"} if "label" in name else None)
        cases.append(Case(f"exclusion-{name}", "validate", review(injected(p, "admin")), True, config="admin"))
    # Outside the CDE exclusions stay the pod's own business.
    cases.append(Case("exclusion-non-cde-allowed", "validate",
                      review(injected(pod(cde=False, annotations={cidr: "0.0.0.0/0"}))), True))
    # Opt-outs and modes.
    for where in ("labels", "annotations"):
        p = pod(**{where: {"palisade.dev/inject": "false"}})
        cases.append(Case(f"opt-out-{where}", "validate", review(p), False, ("opts out of the sidecar",
                                                                               "CDE pods may not opt out")))
        p2 = injected(pod())
        p2["metadata"].setdefault(where, {})["palisade.dev/inject"] = "false"
        cases.append(Case(f"opt-out-{where}-on-injected", "validate", review(p2), False, ("may not opt out",)))
    for mode in ("learn", "monitor"):
        p = injected(pod(annotations={"palisade.dev/mode": mode}))
        cases.append(Case(f"mode-{mode}-refused", "validate", review(p), False,
                          (f'palisade.dev/mode="{mode}"', "palisade.dev/cde-allow-mode-override=true")))
        cases.append(Case(f"mode-{mode}-debug-grant-is-not-mode-grant", "validate", review(p), False,
                          ("cde-allow-mode-override",), grants=("debug",)))
        cases.append(Case(f"mode-{mode}-granted", "validate", review(p), True, grants=("mode",)))
    cases.append(Case("mode-protect", "validate", review(injected(pod(annotations={"palisade.dev/mode": "protect"}))),
                      True))
    return cases


DANGEROUS_CONTAINER = {
    "privileged": ({"privileged": True}, "privileged: true"),
    "cap-net-admin": ({"capabilities": {"add": ["NET_ADMIN"]}, "allowPrivilegeEscalation": False},
                      "adds capabilities NET_ADMIN"),
    "cap-sys-admin-prefixed": ({"capabilities": {"add": ["CAP_SYS_ADMIN"]}, "allowPrivilegeEscalation": False},
                               "adds capabilities SYS_ADMIN"),
    "cap-net-raw-lower": ({"capabilities": {"add": ["net_raw"]}, "allowPrivilegeEscalation": False},
                          "adds capabilities NET_RAW"),
    "cap-sys-ptrace": ({"capabilities": {"add": ["SYS_PTRACE"]}, "allowPrivilegeEscalation": False},
                       "adds capabilities SYS_PTRACE"),
    "cap-bpf": ({"capabilities": {"add": ["BPF"]}, "allowPrivilegeEscalation": False}, "adds capabilities BPF"),
    "cap-all": ({"capabilities": {"add": ["ALL"]}, "allowPrivilegeEscalation": False}, "adds capabilities ALL"),
    "proc-unmasked": ({"procMount": "Unmasked"}, "procMount: Unmasked"),
    "run-as-user-1337": ({"runAsUser": 1337}, "runAsUser: 1337"),
    "run-as-group-1337": ({"runAsGroup": 1337}, "runAsGroup: 1337"),
    "ape-with-caps": ({"capabilities": {"add": ["NET_BIND_SERVICE"]}, "allowPrivilegeEscalation": True},
                      "without allowPrivilegeEscalation: false"),
}
DANGEROUS_POD = {
    "host-network": ({"hostNetwork": True}, "hostNetwork: true"),
    "host-pid": ({"hostPID": True}, "hostPID: true"),
    "pod-run-as-user-1337": ({"securityContext": {"runAsUser": 1337}}, "securityContext.runAsUser: 1337"),
    "pod-run-as-group-1337": ({"securityContext": {"runAsGroup": 1337}}, "securityContext.runAsGroup: 1337"),
    "supplemental-groups-1337": ({"securityContext": {"supplementalGroups": [4000, 1337]}},
                                 "supplementalGroups contains 1337"),
    "fs-group-1337": ({"securityContext": {"fsGroup": 1337}}, "fsGroup contains 1337"),
}


def dangerous_cases() -> list[Case]:
    cases = []
    app = {"name": "web", "image": "shop/web:1.4"}
    for name, (sc, fragment) in DANGEROUS_CONTAINER.items():
        for level in ("container", "init"):
            kw = ({"containers": [with_sc(app, **sc)]} if level == "container"
                  else {"init": [with_sc({"name": "setup", "image": "shop/setup:1"}, **sc)]})
            where = "container web" if level == "container" else "init container setup"
            # The injector itself refuses UID/GID 1337 when it injects (InjectError), so those
            # CDE variants are judged on the uninjected pod.
            cde_pod = maybe_injected(pod(**kw))
            cases.append(Case(f"dangerous-{level}-{name}-cde", "validate", review(cde_pod), False, (where, fragment)))
            cases.append(Case(f"dangerous-{level}-{name}-elsewhere-warns", "validate", review(pod(cde=False, **kw)),
                              True, warnings=(fragment,)))
            cases.append(Case(f"dangerous-{level}-{name}-elsewhere-refused", "validate",
                              review(pod(cde=False, **kw)), False, (fragment,), config="refuse"))
    for name, (spec, fragment) in DANGEROUS_POD.items():
        cases.append(Case(f"dangerous-pod-{name}-cde", "validate", review(maybe_injected(pod(**spec))), False,
                          (fragment,)))
        cases.append(Case(f"dangerous-pod-{name}-elsewhere-warns", "validate", review(pod(cde=False, **spec)),
                          True, warnings=(fragment,)))
        cases.append(Case(f"dangerous-pod-{name}-elsewhere-refused", "validate", review(pod(cde=False, **spec)),
                          False, (fragment,), config="refuse"))
    return cases


def mount_cases() -> list[Case]:
    cases = []
    mount = {"name": "palisade-pcap", "mountPath": "/pcap", "readOnly": True}
    for level in ("container", "init"):
        for cde in (True, False):
            c = {"name": "reader", "image": "shop/reader:1", "volumeMounts": [mount]}
            kw = ({"containers": [{"name": "web", "image": "shop/web:1"}, c]} if level == "container"
                  else {"init": [c]})
            p = injected(pod(cde=cde))
            target = p["spec"]["containers"] if level == "container" else p["spec"]["initContainers"]
            target.append(c)
            tag = "cde" if cde else "elsewhere"
            cases.append(Case(f"pcap-mount-{level}-{tag}-validate", "validate", review(p), False,
                              ("mounts volume palisade-pcap", "full card numbers")))
            cases.append(Case(f"pcap-mount-{level}-{tag}-mutate", "mutate", review(pod(cde=cde, **kw)), False,
                              ("mounts volume palisade-pcap",)))
    p = injected(pod(cde=False))
    p["spec"]["containers"].append({"name": "tmp-reader", "image": "x", "volumeMounts": [
        {"name": "palisade-tmp", "mountPath": "/x"}]})
    cases.append(Case("tmp-mount-elsewhere", "validate", review(p), False, ("mounts volume palisade-tmp",)))
    return cases


def _ephemeral(base: dict, **c: Any) -> dict:
    new = copy.deepcopy(base)
    new["spec"].setdefault("ephemeralContainers", []).append(
        hardened({"name": "debugger", "image": "busybox", **c}))
    return new


def update_and_ephemeral_cases() -> list[Case]:
    cases = []
    plain = pod(cde=False)
    made_cde = copy.deepcopy(plain)
    made_cde["metadata"]["labels"].update(CDE)
    cases.append(Case("update-label-into-cde-without-sidecar", "validate",
                      review(made_cde, op="UPDATE", old=plain), False,
                      ("was not injected", "cannot be added to a running pod")))
    prot = injected(pod())
    unlabelled = copy.deepcopy(prot)
    del unlabelled["metadata"]["labels"]["pci.palisade.dev/scope"]
    cases.append(Case("update-label-out-of-cde", "validate", review(unlabelled, op="UPDATE", old=prot), False,
                      ("cannot be removed from a running pod",)))
    cases.append(Case("update-protected-finalizer", "validate",
                      review({**prot, "metadata": {**prot["metadata"], "finalizers": ["x/y"]}}, op="UPDATE",
                             old=prot), True))
    legacy = pod()
    cases.append(Case("update-unprotected-cde-unchanged-warns", "validate",
                      review({**legacy, "metadata": {**legacy["metadata"], "finalizers": ["x/y"]}}, op="UPDATE",
                             old=legacy), True, warnings=("runs without the Palisade sidecar",)))
    image_swap = tamper(prot, "palisade", image="busybox")
    cases.append(Case("update-sidecar-image-swap", "validate", review(image_swap, op="UPDATE", old=prot), False,
                      ("image 'busybox' is not an allowed",)))
    init_swap = tamper(prot, "palisade-init", image="evil/palisade:0.1.0")
    cases.append(Case("update-init-image-swap", "validate", review(init_swap, op="UPDATE", old=prot), False,
                      ("container palisade-init: image",)))
    learn = copy.deepcopy(prot)
    learn["metadata"]["annotations"]["palisade.dev/mode"] = "learn"
    cases.append(Case("update-mode-learn", "validate", review(learn, op="UPDATE", old=prot), False,
                      ('palisade.dev/mode="learn"',)))
    cases.append(Case("update-mode-learn-granted", "validate", review(learn, op="UPDATE", old=prot), True,
                      grants=("mode",)))
    excl = copy.deepcopy(prot)
    excl["metadata"]["annotations"]["palisade.dev/exclude-outbound-cidrs"] = "0.0.0.0/0"
    cases.append(Case("update-add-exclusion", "validate", review(excl, op="UPDATE", old=prot), False,
                      ("0.0.0.0/0 covers 0.0.0.0/0", "field args differs")))
    status_only = copy.deepcopy(plain)
    status_only["metadata"]["labels"].update(CDE)
    status_only["metadata"]["annotations"] = {"palisade.dev/status": "injected"}
    cases.append(Case("update-into-cde-with-fake-status", "validate", review(status_only, op="UPDATE", old=plain),
                      False, ("are not both present",)))
    # Ephemeral containers.
    eph = "ephemeralcontainers"
    benign = _ephemeral(prot)
    cases.append(Case("ephemeral-cde-refused", "validate", review(benign, op="UPDATE", old=prot, sub=eph), False,
                      ("palisade.dev/cde-allow-debug=true",)))
    cases.append(Case("ephemeral-cde-mode-grant-is-not-debug", "validate",
                      review(benign, op="UPDATE", old=prot, sub=eph), False, ("cde-allow-debug",), grants=("mode",)))
    cases.append(Case("ephemeral-cde-debug-granted", "validate", review(benign, op="UPDATE", old=prot, sub=eph),
                      True, grants=("debug",)))
    for name, (sc, fragment) in DANGEROUS_CONTAINER.items():
        bad = _ephemeral(prot, securityContext=sc)
        cases.append(Case(f"ephemeral-cde-debug-granted-{name}", "validate",
                          review(bad, op="UPDATE", old=prot, sub=eph), False, ("ephemeral container debugger",
                                                                               fragment), grants=("debug",)))
    target = _ephemeral(prot, targetContainerName="palisade")
    cases.append(Case("ephemeral-cde-target-sidecar", "validate", review(target, op="UPDATE", old=prot, sub=eph),
                      False, ("targetContainerName palisade",), grants=("debug",)))
    pcap = _ephemeral(prot, volumeMounts=[{"name": "palisade-pcap", "mountPath": "/p"}])
    cases.append(Case("ephemeral-cde-pcap-mount", "validate", review(pcap, op="UPDATE", old=prot, sub=eph), False,
                      ("mounts volume palisade-pcap",), grants=("debug",)))
    named = copy.deepcopy(prot)
    named["spec"]["ephemeralContainers"] = [{"name": "palisade-x", "image": "busybox"}]
    named_new = copy.deepcopy(named)
    named_new["spec"]["ephemeralContainers"].append({"name": "palisade", "image": "busybox"})
    cases.append(Case("ephemeral-reserved-name", "validate", review(named_new, op="UPDATE", old=named, sub=eph),
                      False, ("the name is reserved",), grants=("debug",)))
    nprot = injected(pod(cde=False))
    cases.append(Case("ephemeral-elsewhere-benign", "validate", review(_ephemeral(nprot), op="UPDATE", old=nprot,
                                                                        sub=eph), True))
    cases.append(Case("ephemeral-elsewhere-privileged-warns", "validate",
                      review(_ephemeral(nprot, securityContext={"privileged": True}), op="UPDATE", old=nprot, sub=eph),
                      True, warnings=("ephemeral container debugger: privileged: true",)))
    cases.append(Case("ephemeral-elsewhere-privileged-refused", "validate",
                      review(_ephemeral(nprot, securityContext={"privileged": True}), op="UPDATE", old=nprot, sub=eph),
                      False, ("privileged: true",), config="refuse"))
    cases.append(Case("ephemeral-elsewhere-pcap-mount", "validate",
                      review(_ephemeral(nprot, volumeMounts=[{"name": "palisade-pcap", "mountPath": "/p"}]),
                             op="UPDATE", old=nprot, sub=eph), False, ("mounts volume palisade-pcap",)))
    return cases


def net_raw_cases() -> list[Case]:
    """Runtimes grant NET_RAW by default: a CDE container must drop it (AF_PACKET bypasses nftables)."""
    cases = []
    variants = {
        "no-security-context": {"name": "web", "image": "x"},
        "drop-other": {"name": "web", "image": "x", "securityContext": {"capabilities": {"drop": ["SYS_CHROOT"]}}},
        "non-root-still-needs-drop": {"name": "web", "image": "x", "securityContext": {"runAsNonRoot": True,
                                                                                      "runAsUser": 1000}},
    }
    for name, c in variants.items():
        p = injected(pod(containers=[c], harden=False))
        cases.append(Case(f"netraw-{name}-cde", "validate", review(p), False, ("container web: does not drop NET_RAW",)))
        cases.append(Case(f"netraw-{name}-elsewhere", "validate", review(injected(pod(cde=False, containers=[c],
                                                                                        harden=False))), True))
    for spelling in (["NET_RAW"], ["cap_net_raw"], ["all"]):
        p = injected(pod(containers=[{"name": "web", "image": "x", "securityContext": {"capabilities": {
            "drop": spelling}}}], harden=False))
        cases.append(Case(f"netraw-dropped-{spelling[0].lower()}", "validate", review(p), True))
    init = injected(pod(init=[{"name": "setup", "image": "x"}], harden=False))
    init["spec"]["containers"] = [hardened(c) for c in init["spec"]["containers"]]
    cases.append(Case("netraw-init-container-cde", "validate", review(init), False,
                      ("init container setup: does not drop NET_RAW",)))
    prot = injected(pod())
    eph = copy.deepcopy(prot)
    eph["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox"}]
    cases.append(Case("netraw-ephemeral-cde", "validate", review(eph, op="UPDATE", old=prot,
                                                                 sub="ephemeralcontainers"), False,
                      ("ephemeral container debugger: does not drop NET_RAW",), grants=("debug",)))
    return cases


def connect_cases() -> list[Case]:
    """``kubectl exec``/``attach``: CONNECT with a PodExecOptions/PodAttachOptions object."""
    cases = []
    for sub, kind in (("exec", "PodExecOptions"), ("attach", "PodAttachOptions")):
        for container, allowed in (("palisade", False), ("palisade-init", False), ("web", True)):
            obj = {"kind": kind, "apiVersion": "v1", "container": container, "stdin": True, "tty": True}
            if sub == "exec":
                obj["command"] = ["sh"] if container != "palisade-init" else ["python", "-m", "firewall",
                                                                               "redirect", "show"]
            req = {"uid": "guard-case", "kind": {"group": "", "version": "v1", "kind": kind},
                   "resource": {"group": "", "version": "v1", "resource": "pods"}, "subResource": sub,
                   "name": "web", "namespace": NS, "operation": "CONNECT", "userInfo": {"username": "alice"},
                   "object": obj, "oldObject": None}
            cases.append(Case(f"connect-{sub}-{container}", "validate",
                              {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req},
                              allowed, () if allowed else (f"{sub} into the Palisade container {container}",)))
    # The runbook's read-only commands into the sidecar stay possible; near variants do not.
    commands = {
        "redirect-show": (["python", "-m", "firewall", "redirect", "show"], True),
        "cat-pcap": (["cat", "/var/run/palisade/pcap/flow-1.pcap"], True),
        "redirect-apply": (["python", "-m", "firewall", "redirect", "apply"], False),
        "redirect-show-extra-arg": (["python", "-m", "firewall", "redirect", "show", "--flush"], False),
        "shell": (["sh", "-c", "python -m firewall redirect show; nft flush ruleset"], False),
        "cat-traversal": (["cat", "/var/run/palisade/pcap/../../../etc/palisade/config.yaml"], False),
        "cat-two-files": (["cat", "/var/run/palisade/pcap/a", "/etc/shadow"], False),
        "cat-dir": (["cat", "/var/run/palisade/pcap/"], False),
        "nft": (["nft", "flush", "ruleset"], False),
    }
    for name, (argv, allowed) in commands.items():
        obj = {"kind": "PodExecOptions", "apiVersion": "v1", "container": "palisade", "command": argv}
        req = {"uid": "guard-case", "kind": {"group": "", "version": "v1", "kind": "PodExecOptions"},
               "resource": {"group": "", "version": "v1", "resource": "pods"}, "subResource": "exec",
               "name": "web", "namespace": NS, "operation": "CONNECT", "userInfo": {"username": "alice"},
               "object": obj, "oldObject": None}
        cases.append(Case(f"connect-exec-sidecar-{name}", "validate",
                          {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req},
                          allowed, () if allowed else ("exec into the Palisade container palisade",)))
    return cases


def all_cases() -> list[Case]:
    cases = (look_alike_cases() + exclusion_cases() + dangerous_cases() + mount_cases()
             + update_and_ephemeral_cases() + net_raw_cases() + connect_cases())
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases
