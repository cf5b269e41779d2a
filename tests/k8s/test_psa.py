"""Pod Security Admission against the real API server: which level the injected pod needs, what
PSA says at each level, and the injector refusing (with the fix) where PSA would reject anyway."""

from __future__ import annotations

import json

import pytest

from tests.k8s.test_admission import CDE, OPT_IN, _in, _pod, _submittable, pod_message

pytestmark = pytest.mark.k8s
ENFORCE = "pod-security.kubernetes.io/enforce"


@pytest.fixture(scope="module")
def injected(kube) -> dict:
    """A pod as the injector stores it, in an opted-in namespace that enforces privileged."""
    ns = kube.namespace("psa-priv", {**OPT_IN, ENFORCE: "privileged"})
    pod = json.loads(kube.create(_in(ns, _pod("web"))).stdout)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["palisade-init", "palisade"]
    return pod


def test_injected_pod_needs_the_privileged_level(kube, injected):
    """The stored injected pod submitted where no webhook touches it: PSA's own verdict per level."""
    said = {}
    for level in ("privileged", "baseline", "restricted"):
        ns = kube.namespace(f"psa-{level}", {ENFORCE: level})
        said[level] = pod_message(kube, _submittable(injected, ns, "web"))
    assert said["privileged"] == ""
    assert 'violates PodSecurity "baseline:latest": non-default capabilities (containers "palisade-init", ' \
           '"palisade" must not include "NET_ADMIN", "NET_RAW" in securityContext.capabilities.add)' \
           in said["baseline"], said["baseline"]
    restricted = said["restricted"]
    assert 'violates PodSecurity "restricted:latest"' in restricted
    for needle in ('containers "palisade-init", "palisade" must not include "NET_ADMIN", "NET_RAW"',
                   'container "palisade-init" must not set runAsUser=0',
                   'allowPrivilegeEscalation != false (container "palisade" must set'):
        assert needle in restricted, restricted


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_injector_refuses_with_the_fix_where_psa_would_reject(kube, level):
    ns = kube.namespace(f"psa-{level}-in", {**OPT_IN, ENFORCE: level})
    err = pod_message(kube, _in(ns, _pod("web")))
    assert f'admission webhook "psa-{level}.palisade.dev" denied the request' in err, err
    assert f"namespace {ns} enforces Pod Security level '{level}'" in err
    assert "pod-security.kubernetes.io/enforce=privileged" in err
    # CDE pods too: refused in the mutating phase, before PSA or the guard
    err = pod_message(kube, _in(ns, _pod("ledger", CDE)))
    assert f'"psa-{level}.palisade.dev" denied' in err, err
    # A pod that opts out is not Palisade's business and passes (a plain pod meets baseline;
    # restricted also wants runAsNonRoot and a seccomp profile).
    out = _pod("batch", {"palisade.dev/inject": "false"})
    out["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod_message(kube, _in(ns, out)) == ""


def test_fix_then_injected_and_warn_labels_only_warn(kube):
    ns = kube.namespace("psa-fix", {**OPT_IN, ENFORCE: "baseline"})
    assert "enforces Pod Security level 'baseline'" in pod_message(kube, _in(ns, _pod("web")))
    kube.kubectl("label", "namespace", ns, f"{ENFORCE}=privileged", "pod-security.kubernetes.io/warn=baseline",
                 "--overwrite")
    proc = kube.create(_in(ns, _pod("web")))
    assert [c["name"] for c in json.loads(proc.stdout)["spec"]["initContainers"]] == ["palisade-init", "palisade"]
    assert 'would violate PodSecurity "baseline:latest"' in proc.stderr, proc.stderr
