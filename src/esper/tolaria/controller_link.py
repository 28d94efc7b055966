"""Controller links: where a run's growth decisions come from.

The run loop talks to its controller through one small interface, :class:`ControllerLink`: it
reports what happened (telemetry, progress, the outcome of each decision) and asks, once per
step, which decisions to apply now. :class:`~esper.tolaria.growth.GrowthDriver` holds one link;
under DDP only rank 0 polls it and the lockstep broadcasts its decisions to every rank.

:class:`InlineController` is the default link: the run's own
:class:`~esper.tamiyo.controller.TamiyoController`, in process, deciding synchronously at fixed
steps (:class:`DecisionSchedule`), which is what makes growth a function of the step (see
:mod:`esper.tolaria.growth`). A service link (a controller in another process, over the bus)
implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from esper.contracts import AdaptationDecision, DecisionRefusal, HealthSignal, RewardReport
from esper.core import MorphableModel
from esper.oona import MessageBus
from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.health import HealthCollector
from esper.tamiyo.observation import GrowthPolicy
from esper.tamiyo.operator_actions import OperatorActions, operator_names
from esper.tamiyo.safety import SafetyGates
from esper.tolaria.config import GrowthSection


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
    ``state_dict()`` goes into every checkpoint; :attr:`counters` are reported in ``run.json``
    as ``controller.<name>`` (reading them has no side effect, unlike a link's ``state_dict``,
    which may acknowledge what the previous checkpoint holds).
    """

    @property
    def counters(self) -> dict[str, int]:
        """What the link counted so far, by name."""
        ...

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


@dataclass(frozen=True)
class DecisionSchedule:
    """The steps an inline controller decides at: every ``every`` steps from ``start_step``, up
    to ``until`` (``growth.stop_fraction`` of the run's steps)."""

    start_step: int
    every: int
    until: float

    @classmethod
    def for_run(cls, settings: GrowthSection, total_steps: int) -> DecisionSchedule:
        """The schedule of a run's ``growth`` section over ``total_steps`` steps."""
        return cls(
            start_step=settings.start_step,
            every=settings.decide_every,
            until=settings.stop_fraction * total_steps,
        )

    def is_decision_step(self, step: int) -> bool:
        """Whether the controller decides at ``step``."""
        return step >= self.start_step and step % self.every == 0 and step <= self.until


class InlineController:
    """The run's own Tamiyo controller, deciding synchronously at the steps of a schedule.

    Args:
        controller: the controller (fed directly; nothing runs in the background).
        schedule: the steps it decides at.
    """

    def __init__(self, controller: TamiyoController, schedule: DecisionSchedule) -> None:
        self.controller = controller
        self.schedule = schedule

    @classmethod
    def for_run(
        cls,
        settings: GrowthSection,
        *,
        model: MorphableModel,
        policy: GrowthPolicy,
        safety: SafetyGates,
        run_id: str,
        bus: MessageBus,
        total_steps: int,
    ) -> InlineController:
        """The inline controller of a run: ``policy`` behind ``safety``, deciding on ``model``
        (its decisions and refusals are also published on ``bus`` for observers)."""
        controller = TamiyoController(
            bus,
            policy,
            run_id=run_id,
            safety=safety,
            model=model,
            collector=HealthCollector(None, run_id=run_id),
            total_steps=total_steps,
        )
        operators = settings.operators
        if operators.grows_structure:  # widen/deepen actions for the policy
            allowed = operator_names(widen=operators.widen, deepen=operators.deepen)
            controller.operator_actions = OperatorActions(
                model.model, allowed, residual=operators.residual
            )
        return cls(controller, DecisionSchedule.for_run(settings, total_steps))

    def observe_telemetry(self, step: int, signals: list[HealthSignal]) -> None:
        """Feed a telemetry flush to the controller's health collector."""
        self.controller.observe_telemetry(signals)

    def observe_progress(self, step: int, loss: float | None) -> None:
        """Tell the controller the run's step and recent loss."""
        self.controller.observe_progress(step, loss=loss)

    def observe_outcome(self, outcome: RewardReport | DecisionRefusal) -> None:
        """A reward or refusal (a culled graft starts its layer's long cooldown)."""
        self.controller.observe(outcome)

    def poll(self, step: int) -> LinkResult:
        """At a decision step, one synchronous decision; otherwise nothing."""
        if not self.schedule.is_decision_step(step):
            return LinkResult()
        result = self.controller.decide(step)
        if result.decision is not None:
            return LinkResult(decisions=(result.decision,))
        return LinkResult(refusals=(result.refusal,) if result.refusal is not None else ())

    @property
    def counters(self) -> dict[str, int]:
        """The controller's counters (decisions, refusals by gate, ...)."""
        return {name: int(count) for name, count in self.controller.counters.items()}

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (safety gates, health, policy, counters)."""
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.controller.load_state_dict(state)

    def close(self) -> None:
        """Nothing to stop: the inline controller runs only when called."""
