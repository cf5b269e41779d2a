"""injector/psa.py without an API server: what /mutate/psa-LEVEL answers for each kind of pod."""

from __future__ import annotations

import copy

import pytest

from injector.config import InjectorConfig
from injector.psa import mutate_under, parse_level
from injector.review import mutate
from tests.injector.test_golden import apply_response, make_review

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
       "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}


def _answer(pod: dict, level: str = "baseline") -> dict:
    return mutate_under(make_review(pod), InjectorConfig(), level).review["response"]


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_a_pod_that_would_be_injected_is_refused_with_the_fix(level):
    response = _answer(POD, level)
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert f"namespace shop enforces Pod Security level '{level}'" in message
    assert "pod-security.kubernetes.io/enforce=privileged" in message


def test_an_already_injected_pod_is_refused_too():
    injected = apply_response(POD, mutate(make_review(POD), InjectorConfig()).review["response"])
    assert [c["name"] for c in injected["spec"]["initContainers"]] == ["palisade-init", "palisade"]
    assert _answer(injected)["allowed"] is False


@pytest.mark.parametrize("change,allowed", [
    ({"metadata": {"annotations": {"palisade.dev/inject": "false"}}}, True),   # opted out
    ({"spec": {"hostNetwork": True}}, True),                                    # never injected
    ({"metadata": {"annotations": {"palisade.dev/mode": "loud"}}}, False),       # /mutate's own rejection
])
def test_pods_the_injector_leaves_alone_answer_as_mutate(change, allowed):
    pod = copy.deepcopy(POD)
    for key, value in change.items():
        pod[key] = {**pod[key], **value}
    response = _answer(pod)
    plain = mutate(make_review(pod), InjectorConfig()).review["response"]
    assert response == plain
    assert response["allowed"] is allowed and "patch" not in response


@pytest.mark.parametrize("segment,level", [("psa-baseline", "baseline"), ("psa-restricted", "restricted"),
                                           ("psa-privileged", None), ("baseline", None), ("psa-", None),
                                           (None, None), ("psa-baseline/x", None)])
def test_path_segment(segment, level):
    assert parse_level(segment) == level


def test_server_routes_the_level_and_refuses_unknown_ones():
    import asyncio
    import json

    from aiohttp.test_utils import TestClient, TestServer

    from injector.server import WebhookApp

    async def run() -> tuple[int, dict, int, int]:
        async with TestClient(TestServer(WebhookApp(InjectorConfig()).app)) as client:
            body = json.dumps(make_review(POD))
            headers = {"Content-Type": "application/json"}
            ok = await client.post("/mutate/psa-restricted", data=body, headers=headers)
            bogus = await client.post("/mutate/psa-privileged", data=body, headers=headers)
            plain = await client.post("/mutate", data=body, headers=headers)
            return ok.status, await ok.json(), bogus.status, (await plain.json())["response"]["allowed"]

    status, answer, bogus, plain_allowed = asyncio.run(run())
    assert status == 200 and answer["response"]["allowed"] is False
    assert "level 'restricted'" in answer["response"]["status"]["message"]
    assert bogus == 404 and plain_allowed is True
