"""Growth events: what the metrics log records of each decision, refusal and reward of a run.

:class:`~esper.tolaria.growth.GrowthDriver` turns what the controller and the growth executor did
at a step boundary into these plain dicts; the run loop writes each to ``metrics.jsonl`` and the
report reads them back.
"""

from __future__ import annotations

from typing import Any

from esper.contracts import AdaptationDecision, BlueprintSpec, DecisionRefusal, RewardReport
from esper.tamiyo.observation import BLUEPRINT_CATALOG

Event = dict[str, Any]
"""A growth event for the metrics log: ``{"type": "decision" | "graft" | …, "step": …, …}``."""


def blueprint_name(spec: BlueprintSpec | None) -> str | None:
    """The catalog name of a blueprint (its family if it is not in the catalog)."""
    if spec is None:
        return None
    for option in BLUEPRINT_CATALOG:
        if option.spec == spec:
            return option.name
    return spec.family


def decision_event(decision: AdaptationDecision, *, received_step: int | None = None) -> Event:
    """A decision the run applies; ``received_step``: where it was taken in, when that is not its
    own ``step`` (a decision from Tamiyo as a service is based on earlier telemetry)."""
    event: Event = {
        "type": "decision",
        "step": decision.step,
        "action": str(decision.action),
        "layer": decision.layer_name,
        "seed": decision.seed_idx,
        "blueprint": blueprint_name(decision.blueprint),
        "policy": decision.policy,
        "confidence": decision.confidence,
        "uncertainty": decision.uncertainty,
        "decision_id": decision.decision_id,
    }
    if received_step is not None:
        event["received_step"] = received_step
    return event


def refusal_event(refusal: DecisionRefusal) -> Event:
    """A decision (or proposal) a gate refused, naming the gate."""
    return {
        "type": "refusal",
        "step": refusal.step,
        "action": str(refusal.action),
        "layer": refusal.layer_name,
        "gate": refusal.gate,
        "reason": refusal.reason,
        "policy": refusal.policy,
    }


def reward_event(report: RewardReport, step: int, seed: int | None) -> Event:
    """A graft's reward at the end of its evaluation window, and what it led to."""
    return {
        "type": "reward",
        "step": step,
        "layer": report.layer_name,
        "seed": seed,
        "decision_id": report.decision_id,
        "total": report.total,
        "components": report.components,
        "outcome": str(report.outcome) if report.outcome is not None else None,
    }
