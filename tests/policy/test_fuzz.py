"""Whatever the bytes, loading a policy either works or raises PolicyError - never another exception."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firewall.policy.engine import PolicyError, PolicySet
from tests.policy.common import EXAMPLE

BASE = EXAMPLE.read_text()


@st.composite
def mutated(draw) -> str:
    text = BASE
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        chunk = draw(st.text(alphabet=st.sampled_from(list(" :-[]{}\n\t'\"*&!|>#%@`0123456789abcxyz")),
                             min_size=1, max_size=6))
        if op == "delete":
            text = text[:pos] + text[pos + len(chunk):]
        elif op == "insert":
            text = text[:pos] + chunk + text[pos:]
        else:
            text = text[:pos] + chunk + text[pos + len(chunk):]
    return text


@settings(max_examples=int(os.environ.get("PALISADE_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_policy_never_crashes(text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(text)
    try:
        PolicySet.load([fh.name])
    except PolicyError as exc:
        for line in exc.problems:
            assert line.startswith(fh.name + ":"), line
            assert int(line[len(fh.name) + 1:].split(":", 1)[0]) >= 0
    finally:
        os.unlink(fh.name)
