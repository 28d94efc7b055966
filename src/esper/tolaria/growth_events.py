"""Growth events: what the growth path did at a step, as records of the run's metrics log.

Each event is a plain dict ``{"type": ..., "step": ..., ...}`` that the run loop writes to
``metrics.jsonl`` and shows its observer (see :mod:`esper.tolaria.metrics` for the types):
``decision``, ``refusal``, ``graft``, ``reward``, ``fossilize`` and ``cull``.
"""

from __future__ import annotations

from typing import Any

from esper.contracts import (
    AdaptationDecision,
    BlueprintSpec,
    DecisionRefusal,
    GrowthOperator,
    RewardReport,
)
from esper.core import MorphableModel
from esper.execution.grafted_kernel import GraftedKernel
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tolaria.germination import seed_slot

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
    if decision.operator is not GrowthOperator.RESIDUAL:  # widen/deepen: what and how much
        event.update(operator=str(decision.operator), size=decision.size, init=decision.init)
    if received_step is not None:
        event["received_step"] = received_step
    return event


def refusal_event(refusal: DecisionRefusal) -> Event:
    """A decision refused (by the controller's gates or the training side), or a rollback."""
    return {
        "type": "refusal",
        "step": refusal.step,
        "action": str(refusal.action),
        "layer": refusal.layer_name,
        "gate": refusal.gate,
        "reason": refusal.reason,
        "policy": refusal.policy,
    }


def graft_event(model: MorphableModel, layer: str, seed: int, step: int) -> Event:
    """A kernel that joined ``layer``'s seed ``seed`` at ``step``."""
    kernel = model.layer(layer).kernel(seed)
    grafted = model.layer(layer).seeds[str(seed)]
    return {
        "type": "graft",
        "step": step,
        "layer": layer,
        "seed": seed,
        "kernel_id": seed_slot(model, layer, seed).kernel_id,
        "blueprint": blueprint_name(grafted.blueprint()[0])
        if isinstance(grafted, GraftedKernel)
        else None,
        "kernel_parameters": sum(p.numel() for p in kernel.parameters())
        if kernel is not None
        else 0,
    }


def verdict_events(report: RewardReport, step: int, seed: int | None) -> list[Event]:
    """A judged graft: its reward, then what became of it (``fossilize`` or ``cull``)."""
    outcome = str(report.outcome) if report.outcome is not None else None
    reward = {
        "type": "reward",
        "step": step,
        "layer": report.layer_name,
        "seed": seed,
        "decision_id": report.decision_id,
        "total": report.total,
        "components": report.components,
        "outcome": outcome,
    }
    kept_or_culled = {
        "type": outcome or "cull",
        "step": step,
        "layer": report.layer_name,
        "seed": seed,
        "decision_id": report.decision_id,
    }
    return [reward, kept_or_culled]
