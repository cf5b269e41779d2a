"""The resolver's incremental indexes without an API server: watch events applied in order,
IP reuse between pods, no publish when nothing a lookup sees changed."""

from __future__ import annotations

from firewall.identity.identity import KubernetesIdentitySource


def pod(uid: str, name: str, ip: str | None, labels: dict | None = None, phase: str = "Running") -> dict:
    status = {"phase": phase}
    if ip:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    return {"metadata": {"uid": uid, "name": name, "namespace": "shop", "labels": labels or {},
                         "resourceVersion": "1"},
            "spec": {"serviceAccountName": "sa"}, "status": status}


def make() -> tuple[KubernetesIdentitySource, list]:
    published: list = []
    return KubernetesIdentitySource(on_change=published.append), published


def test_ip_reused_by_a_new_pod_before_the_old_one_is_gone():
    src, published = make()
    src._apply({"type": "ADDED", "object": pod("a", "old", "10.0.0.5", {"v": "1"})})
    src._apply({"type": "ADDED", "object": pod("b", "new", "10.0.0.5", {"v": "2"})})
    assert src.resolve("10.0.0.5").pod == "new"
    src._apply({"type": "DELETED", "object": pod("a", "old", "10.0.0.5")})
    assert src.resolve("10.0.0.5").pod == "new"          # the old pod's deletion leaves the new one
    assert src.current().by_pod("shop", "old") is None
    src._apply({"type": "DELETED", "object": pod("b", "new", "10.0.0.5")})
    assert src.resolve("10.0.0.5").is_world
    assert len(src.current()) == 0 and len(published) == 4


def test_old_pod_still_holding_the_ip_wins_back_when_the_new_one_goes():
    src, _ = make()
    src._apply({"type": "ADDED", "object": pod("a", "a", "10.0.0.6")})
    src._apply({"type": "ADDED", "object": pod("b", "b", "10.0.0.6")})
    src._apply({"type": "DELETED", "object": pod("b", "b", "10.0.0.6")})
    assert src.resolve("10.0.0.6").pod == "a"


def test_same_name_recreated_keeps_the_new_pod_by_name():
    src, _ = make()
    src._apply({"type": "ADDED", "object": pod("a", "db-0", "10.0.0.7")})
    src._apply({"type": "ADDED", "object": pod("b", "db-0", "10.0.0.8")})
    src._apply({"type": "DELETED", "object": pod("a", "db-0", "10.0.0.7")})
    assert src.current().by_pod("shop", "db-0").ip == "10.0.0.8"
    assert src.resolve("10.0.0.7").is_world


def test_only_identity_changes_publish():
    src, published = make()
    src._apply({"type": "ADDED", "object": pod("a", "web", None)})           # no IP yet: nothing
    assert published == []
    src._apply({"type": "MODIFIED", "object": pod("a", "web", "10.0.0.9")})  # IP assigned
    src._apply({"type": "MODIFIED", "object": pod("a", "web", "10.0.0.9")})  # status only
    assert len(published) == 1
    src._apply({"type": "MODIFIED", "object": pod("a", "web", "10.0.0.9", {"app": "x"})})
    assert len(published) == 2 and src.resolve("10.0.0.9").label_map == {"app": "x"}
    src._apply({"type": "MODIFIED", "object": pod("a", "web", "10.0.0.9", {"app": "x"}, phase="Succeeded")})
    assert src.resolve("10.0.0.9").is_world and len(published) == 3          # finished: IP may be reused
    src._apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "99"}}})
    assert src.resource_version == "99" and len(published) == 3


def test_published_maps_are_snapshots():
    src, published = make()
    src._apply({"type": "ADDED", "object": pod("a", "web", "10.0.0.10")})
    first = published[-1]
    src._apply({"type": "DELETED", "object": pod("a", "web", "10.0.0.10")})
    assert first.resolve("10.0.0.10").pod == "web"     # a reader holding the old map is unaffected
    assert published[-1].resolve("10.0.0.10").is_world
