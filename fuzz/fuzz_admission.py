"""Fuzz the webhook's AdmissionReview handler (``injector.review.handle``).

Input byte 0 picks the endpoint (mutate / validate) and the mode:

* raw: the rest is the HTTP body as the API server would POST it;
* structured: a real review (pods from ``tests/injector/testdata``) mutated by
  the input - values anywhere in the tree replaced by other JSON types or
  deleted - so the fuzzer gets past JSON syntax into the pod checks.

Checked: ``handle`` returns a ``Result`` or raises ``ReviewError`` (the server's
HTTP 400) - never anything else (the server's 500); the response is JSON with
the request's ``uid`` and a boolean ``allowed``; a JSON Patch applies to the
submitted pod, and admitting the patched pod again injects nothing more
(idempotency, as the API server's reinvocation would).

Run: python -m fuzz.fuzz_admission -max_total_time=600
"""

from __future__ import annotations

import base64
import copy
import json

import yaml

from fuzz.common import REPO, Bytes, check, instrumented, main

with instrumented(__name__ == "__main__"):
    import jsonpatch

    from injector.config import InjectorConfig
    from injector.review import ReviewError, handle, mutate

CONFIG = InjectorConfig()
PODS = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "tests/injector/testdata").glob("*/input.yaml"))]
PODS = [p for p in PODS if isinstance(p, dict)] or [{"apiVersion": "v1", "kind": "Pod", "metadata": {
    "name": "p", "namespace": "default"}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}]


def review(pod: dict, uid: str = "fuzz-uid-1", namespace: object = None) -> dict:
    if namespace is None:
        namespace = (pod.get("metadata") or {}).get("namespace", "default") if isinstance(pod, dict) else "default"
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace, "operation": "CREATE", "object": pod, "oldObject": None, "dryRun": False}}


def _value(b: Bytes):
    kind = b.byte() % 8
    if kind == 0:
        return None
    if kind == 1:
        return b.byte() % 2 == 0
    if kind == 2:
        return int.from_bytes(b.take(2), "big") - 1000
    if kind == 3:
        return b.take(b.byte() % 24).decode("utf-8", "replace")
    if kind == 4:
        return []
    if kind == 5:
        return {}
    if kind == 6:
        return [b.take(4).decode("latin-1")]
    return {"k": b.take(3).decode("latin-1")}


def _mutate_tree(doc: dict, b: Bytes) -> None:
    for _ in range(1 + b.byte() % 4):
        node = doc
        for _depth in range(b.byte() % 7 + 1):
            if isinstance(node, dict) and node:
                keys = list(node)
                key = keys[b.byte() % len(keys)]
                child = node[key]
                if not isinstance(child, dict | list) or b.byte() % 4 == 0:
                    if b.byte() % 5 == 0:
                        del node[key]
                    else:
                        node[key] = _value(b)
                    break
                node = child
            elif isinstance(node, list) and node:
                i = b.byte() % len(node)
                if not isinstance(node[i], dict | list) or b.byte() % 4 == 0:
                    node[i] = _value(b)
                    break
                node = node[i]
            else:
                break


def _check_result(result, body_review) -> None:
    out = json.loads(result.to_bytes())
    resp = out.get("response")
    check(isinstance(resp, dict), "response missing")
    check(resp.get("uid") == body_review["request"]["uid"], "response.uid != request.uid")
    check(isinstance(resp.get("allowed"), bool), "allowed must be a boolean")
    if "patch" in resp:
        patch = json.loads(base64.b64decode(resp["patch"]))
        check(isinstance(patch, list), "patch must be a JSON array")
        pod = body_review["request"]["object"]
        patched = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
        again_review = copy.deepcopy(body_review)
        again_review["request"]["object"] = patched
        again = mutate(again_review, CONFIG)
        check(again.outcome != "injected", f"re-admitting the patched pod injected again: {again.reason}")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    b = Bytes(data)
    mode = b.byte()
    endpoint = "mutate" if mode & 1 == 0 else "validate"
    if mode & 2:
        doc = review(copy.deepcopy(PODS[b.byte() % len(PODS)]))
        _mutate_tree(doc, b)
        body = json.dumps(doc).encode()
    else:
        body = b.rest()
    try:
        result = handle(endpoint, body, CONFIG)
    except ReviewError as exc:
        check("\n" not in str(exc), "ReviewError must be one line")
        return
    _check_result(result, json.loads(body))


SEEDS = [bytes([2 + (i % 2), i]) + bytes(range(i, i + 40)) for i in range(len(PODS))] + [
    b"\x00" + json.dumps(review(PODS[0])).encode(), b"\x01" + json.dumps(review(PODS[0])).encode()]

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "admission")
