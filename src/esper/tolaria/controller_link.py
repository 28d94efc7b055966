"""Controller links: where a run's growth decisions come from.

The run loop talks to its controller through one small interface, :class:`ControllerLink`: it
reports what happened (telemetry, progress, the outcome of each decision) and asks, once per
step, which decisions to apply now. :class:`~esper.tolaria.growth.GrowthDriver` holds one link;
under DDP only rank 0 polls it and the lockstep broadcasts its decisions to every rank.

The default link is the run's own :class:`~esper.tamiyo.controller.TamiyoController`, in process,
deciding synchronously at fixed steps, which is what makes growth a function of the step (see
:mod:`esper.tolaria.growth`). :class:`~esper.tolaria.service_controller.ServiceController` is the
link to a controller in another process, over the bus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from esper.contracts import AdaptationDecision, DecisionRefusal, HealthSignal, RewardReport


@dataclass(frozen=True)
class LinkResult:
    """What a controller link has for the run at one step.

    Attributes:
        decisions: decisions to apply now, in order.
        refusals: the controller's own refusals (its gates said no), for the metrics log.
    """

    decisions: tuple[AdaptationDecision, ...] = ()
    refusals: tuple[DecisionRefusal, ...] = ()


class ControllerLink(Protocol):
    """Where a run's growth decisions come from.

    The run loop calls, at every step boundary: :meth:`observe_outcome` for each reward and
    refusal of the step, then (every ``growth.telemetry_every`` steps) :meth:`observe_telemetry`
    and :meth:`observe_progress`, then :meth:`poll`. A link never blocks the loop for long.
    ``state_dict()`` goes into every checkpoint; its ``"counters"`` entry, if any, is reported
    in ``run.json`` as ``controller.<name>``.
    """

    def observe_telemetry(self, step: int, signals: list[HealthSignal]) -> None:
        """One telemetry flush of the model's health signals, taken at ``step``."""
        ...

    def observe_progress(self, step: int, loss: float | None) -> None:
        """The run reached ``step``; ``loss``: mean training loss since the last report."""
        ...

    def observe_outcome(self, outcome: RewardReport | DecisionRefusal) -> None:
        """What became of a decision: a graft's reward, or the training side's refusal."""
        ...

    def poll(self, step: int) -> LinkResult:
        """The decisions to apply at ``step`` (and the controller-side refusals to log)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The link's state for a checkpoint (plain JSON, tensors allowed)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    def close(self) -> None:
        """Stop whatever the link runs in the background."""
        ...
