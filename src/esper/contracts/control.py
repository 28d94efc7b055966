"""Control contracts: what Tamiyo decides, what its safety gates refuse, and how growth is scored.

Every float here is computed by Esper itself (confidences, uncertainties, rewards, timestamps), so
none may be NaN or infinite: a non-finite value is refused at validation.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum

from pydantic import Field, FiniteFloat, model_validator

from esper.contracts.base import Contract
from esper.contracts.bounds import (
    MAX_SEEDS_PER_LAYER,
    LayerName,
    Name,
    Step,
    Text,
    Timestamp,
)
from esper.contracts.kernels import BlueprintSpec


class AdaptationAction(StrEnum):
    """What a decision asks the training side to do to one seed."""

    GERMINATE = "germinate"
    """Load a kernel compiled from ``blueprint`` into a dormant seed and blend it in."""
    FOSSILIZE = "fossilize"
    """Keep an ACTIVE seed's kernel permanently."""
    CULL = "cull"
    """Remove a seed's kernel (back to DORMANT), e.g. after a failed evaluation window."""


class GrowthOperator(StrEnum):
    """How a GERMINATE decision grows the host (:mod:`esper.operators`)."""

    RESIDUAL = "residual"
    """A residual kernel compiled from ``blueprint``, beside one seed of the layer (default)."""
    WIDEN = "widen"
    """``model.widen``: ``size`` x the layer's width new units (at least one) in the layer and
    its consumer; ``init`` ``random`` or ``gradmax``."""
    DEEPEN = "deepen"
    """``model.deepen``: a new block right after the layer; ``init`` ``fresh`` or ``copy``."""


OPERATOR_INITS: dict[GrowthOperator, tuple[str, ...]] = {
    GrowthOperator.WIDEN: ("random", "gradmax"),
    GrowthOperator.DEEPEN: ("fresh", "copy"),
}
"""The ``init`` values each structural operator accepts (the first is its default)."""


def _new_id() -> str:
    return uuid.uuid4().hex


class AdaptationDecision(Contract):
    """One command from the controller, applied by the training side at a step boundary.

    Published on ``control.kasmina.commands``; consumers apply each ``decision_id`` at most once.
    """

    decision_id: str = Field(default_factory=_new_id, pattern=r"^[0-9a-f]{32}$")
    run_id: Name
    step: Step = Field(description="training step of the telemetry the decision is based on")
    action: AdaptationAction
    layer_name: LayerName
    seed_idx: int = Field(ge=0, lt=MAX_SEEDS_PER_LAYER)
    blueprint: BlueprintSpec | None = None
    policy: Name = Field(description="name of the policy that decided")
    confidence: float = Field(ge=0, le=1)
    uncertainty: FiniteFloat = Field(ge=0)
    reason: Text = ""
    created_at: Timestamp = Field(default_factory=time.time)
    operator: GrowthOperator = GrowthOperator.RESIDUAL
    size: float | None = Field(
        default=None, gt=0, le=4, description="WIDEN: new units as a fraction of the layer's width"
    )
    init: Name | None = Field(default=None, description="WIDEN/DEEPEN: how the new part starts")

    @model_validator(mode="after")
    def _operator_fields(self) -> AdaptationDecision:
        if self.operator is GrowthOperator.RESIDUAL:
            if self.size is not None or self.init is not None:
                raise ValueError("size and init belong to widen/deepen decisions, not residual")
            return self
        if self.action is not AdaptationAction.GERMINATE or self.blueprint is not None:
            raise ValueError(f"a {self.operator} decision is a GERMINATE without a blueprint")
        if (self.operator is GrowthOperator.WIDEN) != (self.size is not None):
            raise ValueError("a widen decision needs a size; a deepen decision has none")
        inits = OPERATOR_INITS[self.operator]
        if self.init is not None and self.init not in inits:
            raise ValueError(f"{self.operator} init {self.init!r} is not one of {list(inits)}")
        return self


class DecisionRefusal(Contract):
    """A proposed decision that a safety gate refused; ``gate`` names it, ``reason`` says why.

    ``decision_id`` is set when a published decision was refused later (by the training side);
    a proposal refused by the controller's own gates never became a decision and has none.
    """

    run_id: Name
    decision_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    step: Step
    layer_name: LayerName
    action: AdaptationAction
    gate: Name
    reason: Text
    policy: Name
    created_at: Timestamp = Field(default_factory=time.time)


class RewardReport(Contract):
    """The multi-metric reward of one adaptation after its evaluation window."""

    run_id: Name
    decision_id: Name
    layer_name: LayerName
    step: Step
    components: dict[Name, FiniteFloat] = Field(
        max_length=64, description="named reward components, unweighted"
    )
    weights: dict[Name, FiniteFloat] = Field(max_length=64)
    total: FiniteFloat
    outcome: AdaptationAction | None = Field(
        default=None, description="what the evaluation led to: FOSSILIZE (kept) or CULL"
    )
