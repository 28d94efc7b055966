"""Control contracts: what Tamiyo decides, what its safety gates refuse, and how growth is scored.

Every float here is computed by Esper itself (confidences, uncertainties, rewards, timestamps), so
none may be NaN or infinite: a non-finite value is refused at validation.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum

from pydantic import Field, FiniteFloat

from esper.contracts.base import Contract
from esper.contracts.kernels import BlueprintSpec


class AdaptationAction(StrEnum):
    """What a decision asks the training side to do to one seed."""

    GERMINATE = "germinate"
    """Load a kernel compiled from ``blueprint`` into a dormant seed and blend it in."""
    FOSSILIZE = "fossilize"
    """Keep an ACTIVE seed's kernel permanently."""
    CULL = "cull"
    """Remove a seed's kernel (back to DORMANT), e.g. after a failed evaluation window."""


def _new_id() -> str:
    return uuid.uuid4().hex


class AdaptationDecision(Contract):
    """One command from the controller, applied by the training side at a step boundary.

    Published on ``control.kasmina.commands``; consumers apply each ``decision_id`` at most once.
    """

    decision_id: str = Field(default_factory=_new_id, pattern=r"^[0-9a-f]{32}$")
    run_id: str
    step: int = Field(ge=0, description="training step of the telemetry the decision is based on")
    action: AdaptationAction
    layer_name: str
    seed_idx: int = Field(ge=0)
    blueprint: BlueprintSpec | None = None
    policy: str = Field(description="name of the policy that decided")
    confidence: float = Field(ge=0, le=1)
    uncertainty: FiniteFloat = Field(ge=0)
    reason: str = ""
    created_at: FiniteFloat = Field(default_factory=time.time)


class DecisionRefusal(Contract):
    """A proposed decision that a safety gate refused; ``gate`` names it, ``reason`` says why.

    ``decision_id`` is set when a published decision was refused later (by the training side);
    a proposal refused by the controller's own gates never became a decision and has none.
    """

    run_id: str
    decision_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    step: int = Field(ge=0)
    layer_name: str
    action: AdaptationAction
    gate: str
    reason: str
    policy: str
    created_at: FiniteFloat = Field(default_factory=time.time)


class RewardReport(Contract):
    """The multi-metric reward of one adaptation after its evaluation window."""

    run_id: str
    decision_id: str
    layer_name: str
    step: int = Field(ge=0)
    components: dict[str, FiniteFloat] = Field(description="named reward components, unweighted")
    weights: dict[str, FiniteFloat]
    total: FiniteFloat
    outcome: AdaptationAction | None = Field(
        default=None, description="what the evaluation led to: FOSSILIZE (kept) or CULL"
    )
