"""The one exception policy: what happens when inspection itself fails.

Every stage that can fail to read, normalise or decode what a peer sent asks
``decide`` what to do, so "fail closed" is a table in one place rather than a
habit scattered over parsers and scanners (Suricata's ``exception-policy`` and
Envoy's fail-closed defaults are the models).

The answer depends on three things only:

* the **stage** that failed (``Stage``),
* the flow's effective **mode** (learn / monitor / protect),
* whether the flow is **governed**: an L7 rule, an app-protocol rule or a DLP
  block rule needed what could not be inspected.  An ungoverned flow in protect
  mode has nothing that depended on the failed stage, so it is forwarded with an
  alert; a governed one is refused.

A policy may override the protect-mode answer with ``spec.onInspectionError:
allow|deny`` (default ``deny``).  Learn and monitor never refuse: they alert and
forward, because their job is to observe.  Event-sink failures never refuse
traffic (losing evidence is reported, not turned into an outage) -- see
``palisade_events_dropped_total``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prometheus_client import Counter


class Stage(enum.StrEnum):
    """Where inspection failed.  The values appear in alerts and metrics."""

    IDENTIFY = "identify"    # protocol undecided at max depth, or identification contradicted later
    PARSE = "parse"          # parser anomaly: malformed, ambiguous, invalid grammar
    NORMALISE = "normalise"  # a path / header / name that cannot be canonicalised safely
    DECODE = "decode"        # content/transfer decoding failed or hit a limit (layers, ratio, size)
    SCAN = "scan"            # the DLP scanner raised
    TUNNEL = "tunnel"        # a protocol switch whose inner stream cannot be inspected
    INTERNAL = "internal"    # an unexpected exception in the inspection code
    SINK = "sink"            # an event could not be written


class Action(enum.StrEnum):
    REFUSE = "refuse"    # answer 4xx / gRPC status where the protocol allows it, else reset
    FORWARD = "forward"  # alert and pass on (uninspected)


INSPECTION_EXCEPTIONS = Counter(
    "palisade_inspection_exceptions_total",
    "Inspection failures by stage and the action the exception policy chose",
    ["stage", "action"],
)


@dataclass(frozen=True, slots=True)
class Outcome:
    stage: Stage
    action: Action
    reason: str

    @property
    def refuse(self) -> bool:
        return self.action is Action.REFUSE


def decide(stage: Stage, reason: str, *, mode: str, governed: bool,
           override: str | None = None) -> Outcome:
    """The action for one inspection failure (and count it).

    ``override`` is the policy's ``onInspectionError`` (``"allow"`` or ``"deny"``);
    it only changes the protect-mode answer for governed flows.
    """
    if stage is Stage.SINK or mode != "protect" or not governed:
        action = Action.FORWARD
    elif override == "allow":
        action = Action.FORWARD
    else:
        action = Action.REFUSE
    INSPECTION_EXCEPTIONS.labels(stage.value, action.value).inc()
    return Outcome(stage, action, reason)


#: The documented table (docs/threat-model.md is generated from / checked against this).
TABLE: tuple[tuple[str, str, str, str], ...] = (
    # (stage, protect + governed, protect + not governed, learn / monitor)
    ("identify", "refuse", "forward + alert", "forward + alert"),
    ("parse", "refuse", "forward + alert", "forward + alert"),
    ("normalise", "refuse", "forward + alert", "forward + alert"),
    ("decode", "refuse", "forward + alert", "forward + alert"),
    ("scan", "refuse", "forward + alert", "forward + alert"),
    ("tunnel", "refuse", "forward + alert", "forward + alert"),
    ("internal", "refuse", "forward + alert", "forward + alert"),
    ("sink", "forward + count + log", "forward + count + log", "forward + count + log"),
)
