"""Safety gates: the checks a growth decision must pass, and the rollback of a graft that hurt.

A proposal (germinate layer L at step s, with the policy's confidence and uncertainty) passes
through the gates in a fixed order; the first gate that refuses names itself in the refusal:

======================  ==================================================================
gate                    refuses when
======================  ==================================================================
``confidence``          the policy's confidence is below ``min_confidence`` (or not a finite number)
``uncertainty``         the policy's uncertainty is above ``max_uncertainty`` (or not finite)
``cooldown``            layer L was adapted less than ``cooldown_steps`` ago (longer after a
                        rollback: ``cooldown_steps * rollback_cooldown_factor``)
``rate_limit``          ``max_adaptations`` adaptations already happened in the last
                        ``window_steps`` steps (the window is ``(s - window_steps, s]``)
``parameter_budget``    (grafted + new kernel parameters) / base parameters would exceed
                        ``max_parameter_fraction``
======================  ==================================================================

The thresholds are a :class:`~esper.contracts.safety.SafetyConfig` (re-exported here), whose
fields carry their ranges.

A sixth gate, ``loss_spike``, judges a graft after its evaluation window: if the mean training
loss over the window rose more than ``loss_spike_tolerance`` (relative) above the mean loss before
the graft, or any loss was not finite, the graft is rolled back (culled) and its layer penalised
with the long cooldown. :meth:`SafetyGates.blocked_layers` tells the graph builder which layers a
gate closes right now, so policies rarely propose what would be refused; a layer whose proposal
was refused also stays masked for ``refusal_backoff_steps`` (named by the gate that refused it), so
a policy does not propose the same refused action on every cycle. All state is plain JSON
(:meth:`SafetyGates.state_dict`) for checkpoints.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from esper.contracts import AdaptationAction, DecisionRefusal
from esper.contracts.safety import SafetyConfig
from esper.errors import ConfigurationError

GATE_CONFIDENCE = "confidence"
GATE_UNCERTAINTY = "uncertainty"
GATE_COOLDOWN = "cooldown"
GATE_RATE_LIMIT = "rate_limit"
GATE_PARAMETER_BUDGET = "parameter_budget"
GATE_LOSS_SPIKE = "loss_spike"

GATES: tuple[str, ...] = (
    GATE_CONFIDENCE,
    GATE_UNCERTAINTY,
    GATE_COOLDOWN,
    GATE_RATE_LIMIT,
    GATE_PARAMETER_BUDGET,
    GATE_LOSS_SPIKE,
)
"""Every gate's name; proposal gates are checked in this order (``loss_spike`` judges grafts)."""


@dataclass(frozen=True)
class Proposal:
    """A decision a policy wants to make, as the gates see it.

    Attributes:
        step: training step of the observation the proposal is based on.
        layer_name: the layer to adapt.
        action: what to do (the gates only restrict ``GERMINATE``).
        confidence: the policy's probability of the chosen action, in [0, 1].
        uncertainty: the policy's epistemic uncertainty (0 if it has none).
        added_parameters: parameters the new kernel would add.
    """

    step: int
    layer_name: str
    action: AdaptationAction
    confidence: float = 1.0
    uncertainty: float = 0.0
    added_parameters: int = 0


@dataclass(frozen=True)
class GateVerdict:
    """The outcome of a gate check: ``gate`` is ``None`` when everything passed."""

    gate: str | None = None
    reason: str = ""

    @property
    def allowed(self) -> bool:
        """Whether no gate refused."""
        return self.gate is None


ALLOWED = GateVerdict()
"""The verdict when every gate passed."""


class SafetyGates:
    """Validates proposals, remembers adaptations and rollbacks, and reports blocked layers.

    Args:
        config: the thresholds (defaults: :class:`SafetyConfig`).

    Example::

        gates = SafetyGates(SafetyConfig(cooldown_steps=50))
        verdict = gates.check(proposal, base_parameters=10_000, kernel_parameters=0)
        if verdict.allowed:
            gates.record_adaptation(proposal.step, proposal.layer_name)
        else:
            publish(gates.refusal(proposal, verdict, run_id="run-1", policy="bottleneck"))
    """

    def __init__(self, config: SafetyConfig | None = None) -> None:
        self.config = config or SafetyConfig()
        self._adaptation_steps: list[int] = []
        self._last_adaptation: dict[str, int] = {}
        self._blocked_until: dict[str, int] = {}
        self._backoff: dict[str, tuple[int, str]] = {}
        self.refusals: Counter[str] = Counter()
        """Refusals so far, by gate name."""
        self.rollbacks = 0
        """Grafts rolled back by the ``loss_spike`` gate so far."""

    # -- proposal gates ------------------------------------------------------------------------

    def check(
        self, proposal: Proposal, *, base_parameters: int, kernel_parameters: int
    ) -> GateVerdict:
        """Run the proposal gates in order; the first refusal is returned (and counted).

        Args:
            proposal: what the policy wants to do.
            base_parameters: parameters of the host model (without kernels).
            kernel_parameters: parameters of the kernels grafted now.

        Returns:
            :data:`ALLOWED`, or the verdict of the first gate that refused. ``FOSSILIZE`` and
            ``CULL`` always pass: keeping or removing a kernel never adds risk.
        """
        verdict = self._first_refusal(proposal, base_parameters, kernel_parameters)
        if verdict.gate is not None:
            self.refusals[verdict.gate] += 1
            until = proposal.step + self.config.refusal_backoff_steps
            self._backoff[proposal.layer_name] = (until, verdict.gate)
        return verdict

    def _first_refusal(
        self, proposal: Proposal, base_parameters: int, kernel_parameters: int
    ) -> GateVerdict:
        config = self.config
        if proposal.action is not AdaptationAction.GERMINATE:
            return ALLOWED
        if not math.isfinite(proposal.confidence):
            return GateVerdict(GATE_CONFIDENCE, f"confidence {proposal.confidence} is not finite")
        if not math.isfinite(proposal.uncertainty):
            return GateVerdict(
                GATE_UNCERTAINTY, f"uncertainty {proposal.uncertainty} is not finite"
            )
        if proposal.confidence < config.min_confidence:
            return GateVerdict(
                GATE_CONFIDENCE,
                f"confidence {proposal.confidence:.3f} is below the minimum "
                f"{config.min_confidence:.3f}",
            )
        if config.max_uncertainty is not None and proposal.uncertainty > config.max_uncertainty:
            return GateVerdict(
                GATE_UNCERTAINTY,
                f"uncertainty {proposal.uncertainty:.3f} is above the maximum "
                f"{config.max_uncertainty:.3f}",
            )
        until = self.cooldown_until(proposal.layer_name)
        if proposal.step < until:
            last = self._last_adaptation.get(proposal.layer_name)
            return GateVerdict(
                GATE_COOLDOWN,
                f"layer {proposal.layer_name!r} was adapted at step {last} and cools down until "
                f"step {until} (now {proposal.step})",
            )
        recent = self.adaptations_in_window(proposal.step)
        if recent >= config.max_adaptations:
            return GateVerdict(
                GATE_RATE_LIMIT,
                f"{recent} adaptations in the last {config.window_steps} steps "
                f"(limit {config.max_adaptations})",
            )
        fraction = _fraction(kernel_parameters + proposal.added_parameters, base_parameters)
        if fraction > config.max_parameter_fraction:
            return GateVerdict(
                GATE_PARAMETER_BUDGET,
                f"grafted parameters would reach {kernel_parameters + proposal.added_parameters} "
                f"= {fraction:.3f} of the {base_parameters} base parameters "
                f"(budget {config.max_parameter_fraction:.3f})",
            )
        return ALLOWED

    def cooldown_until(self, layer_name: str) -> int:
        """First step at which ``layer_name`` may be adapted again (0 if never adapted)."""
        return self._blocked_until.get(layer_name, 0)

    def adaptations_in_window(self, step: int) -> int:
        """Adaptations recorded at steps in ``(step - window_steps, step]``."""
        start = step - self.config.window_steps
        return sum(1 for s in self._adaptation_steps if start < s <= step)

    def blocked_layers(
        self,
        step: int,
        layer_names: Iterable[str],
        *,
        base_parameters: int | None = None,
        kernel_parameters: int = 0,
    ) -> dict[str, str]:
        """Layers a gate closes at ``step``, mapped to the gate's name (for ``germinate_mask``).

        The cooldown closes single layers, and so does a recent refusal (for
        ``refusal_backoff_steps``, named by the gate that refused); the rate limit and an exhausted
        parameter budget (``kernel_parameters / base_parameters`` already at the budget, when
        ``base_parameters`` is given) close every layer. Confidence and uncertainty depend on the
        proposal and are only checked by :meth:`check`.
        """
        names = list(layer_names)
        if self.adaptations_in_window(step) >= self.config.max_adaptations:
            return dict.fromkeys(names, GATE_RATE_LIMIT)
        if (
            base_parameters is not None
            and _fraction(kernel_parameters, base_parameters) >= self.config.max_parameter_fraction
        ):
            return dict.fromkeys(names, GATE_PARAMETER_BUDGET)
        blocked = {}
        for name in names:
            backoff_until, gate = self._backoff.get(name, (0, ""))
            if step < self.cooldown_until(name):
                blocked[name] = GATE_COOLDOWN
            elif step < backoff_until:
                blocked[name] = gate
        return blocked

    def record_adaptation(self, step: int, layer_name: str) -> None:
        """Remember an accepted adaptation: starts the layer's cooldown, counts in the window."""
        self._adaptation_steps.append(step)
        self._last_adaptation[layer_name] = step
        until = step + self.config.cooldown_steps
        self._blocked_until[layer_name] = max(self._blocked_until.get(layer_name, 0), until)
        horizon = step - self.config.window_steps
        self._adaptation_steps = [s for s in self._adaptation_steps if s > horizon]

    # -- rollback ------------------------------------------------------------------------------

    def check_loss_spike(self, before: Sequence[float], after: Sequence[float]) -> GateVerdict:
        """Judge a graft by the training losses before it and over its evaluation window.

        Args:
            before: losses of the steps before the graft (the baseline).
            after: losses of the evaluation window.

        Returns:
            A ``loss_spike`` verdict when a loss in ``after`` is not finite or
            ``mean(after) > mean(before) * (1 + loss_spike_tolerance)``; :data:`ALLOWED` otherwise
            (also when either sequence is empty: no evidence, no rollback).
        """
        if any(not math.isfinite(loss) for loss in after):
            return GateVerdict(GATE_LOSS_SPIKE, "a loss in the evaluation window was not finite")
        finite_before = [loss for loss in before if math.isfinite(loss)]
        if not finite_before or not after:
            return ALLOWED
        mean_before = sum(finite_before) / len(finite_before)
        mean_after = sum(after) / len(after)
        limit = mean_before * (1.0 + self.config.loss_spike_tolerance)
        if mean_after > limit:
            return GateVerdict(
                GATE_LOSS_SPIKE,
                f"mean loss rose from {mean_before:.4f} to {mean_after:.4f} over the evaluation "
                f"window (limit {limit:.4f}, tolerance {self.config.loss_spike_tolerance:.0%})",
            )
        return ALLOWED

    def record_rollback(self, step: int, layer_name: str) -> None:
        """Penalise a layer whose graft was rolled back: the long cooldown starts at ``step``."""
        self.rollbacks += 1
        until = step + math.ceil(self.config.cooldown_steps * self.config.rollback_cooldown_factor)
        self._blocked_until[layer_name] = max(self._blocked_until.get(layer_name, 0), until)

    # -- messages and checkpoints --------------------------------------------------------------

    @staticmethod
    def refusal(
        proposal: Proposal, verdict: GateVerdict, *, run_id: str, policy: str
    ) -> DecisionRefusal:
        """The :class:`DecisionRefusal` message for a refused proposal."""
        if verdict.gate is None:
            raise ConfigurationError(
                "refusal() needs the verdict of a gate that refused; this proposal was allowed."
            )
        return DecisionRefusal(
            run_id=run_id,
            step=proposal.step,
            layer_name=proposal.layer_name,
            action=proposal.action,
            gate=verdict.gate,
            reason=verdict.reason,
            policy=policy,
        )

    def state_dict(self) -> dict[str, Any]:
        """The gates' state as plain JSON-able data (config included, for inspection)."""
        return {
            "config": self.config.model_dump(),
            "adaptation_steps": list(self._adaptation_steps),
            "last_adaptation": dict(self._last_adaptation),
            "blocked_until": dict(self._blocked_until),
            "backoff": {name: [until, gate] for name, (until, gate) in self._backoff.items()},
            "refusals": dict(self.refusals),
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the current config is kept)."""
        self._adaptation_steps = [int(s) for s in state["adaptation_steps"]]
        self._last_adaptation = {str(k): int(v) for k, v in state["last_adaptation"].items()}
        self._blocked_until = {str(k): int(v) for k, v in state["blocked_until"].items()}
        self._backoff = {str(k): (int(v[0]), str(v[1])) for k, v in state["backoff"].items()}
        self.refusals = Counter({str(k): int(v) for k, v in state["refusals"].items()})
        self.rollbacks = int(state["rollbacks"])


def _fraction(part: int, whole: int) -> float:
    if whole <= 0:
        return math.inf if part > 0 else 0.0
    return part / whole
