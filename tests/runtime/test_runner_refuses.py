"""The pod runner refuses what it cannot honour, before anything starts (no podman needed)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from tests.runtime.podrunner import PodRunner, Unsupported

pytestmark = pytest.mark.netns

BASE = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [{"name": "app", "image": "img"}],
                 "volumes": [{"name": "cfg", "configMap": {"name": "c"}}]}}
NET = SimpleNamespace(cluster=SimpleNamespace(prefix="x", tmp="/tmp"), ip="10.0.0.2", ns="x")
NODE = SimpleNamespace(ip="10.0.0.1")


def _with(path: list, value) -> dict:
    pod = copy.deepcopy(BASE)
    obj = pod
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return pod


@pytest.mark.parametrize("path,value,needle", [
    (["spec", "hostNetwork"], True, "hostNetwork"),
    (["spec", "securityContext"], {"fsGroup": 2000}, "fsGroup"),
    (["spec", "containers", 0, "envFrom"], [{"configMapRef": {"name": "c"}}], "envFrom"),
    (["spec", "containers", 0, "volumeMounts"], [{"name": "cfg", "mountPath": "/c", "subPath": "k"}], "subPath"),
    (["spec", "containers", 0, "env"], [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
     "secretKeyRef"),
    (["spec", "containers", 0, "env"], [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}}],
     "status.podIPs"),
    (["spec", "containers", 0, "readinessProbe"], {"grpc": {"port": 9000}}, "grpc"),
    (["spec", "containers", 0, "securityContext"], {"privileged": True}, "privileged"),
    (["spec", "volumes"], [{"name": "h", "hostPath": {"path": "/"}}], "hostPath"),
    (["spec", "serviceAccountName"], "sa", "automountServiceAccountToken"),
])
def test_unsupported_fields_fail_loudly(path, value, needle):
    with pytest.raises(Unsupported) as err:
        PodRunner(_with(path, value), NET, NODE)
    assert needle in str(err.value), str(err.value)


def test_the_plain_pod_is_accepted():
    PodRunner(copy.deepcopy(BASE), NET, NODE)
