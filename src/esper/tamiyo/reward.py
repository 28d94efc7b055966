"""Multi-metric reward: seven named components of one adaptation's outcome, weighted into a total.

Every component is oriented so that higher is better, and is unweighted (the weights live in
:class:`RewardWeights`):

=======================  ========================================================================
component                value
=======================  ========================================================================
``loss_improvement``     log-ratio of validation losses, ``ln(before / after)`` (0.69: halved)
``accuracy_improvement`` change of validation accuracy, ``after - before`` (0 when not measured)
``parameter_efficiency`` minus the parameters added, as a fraction of the base model's
``compute_cost``         minus the relative increase of step (or forward) time, ``1 - after/before``
``memory_cost``          minus the memory added (kernel weights and optimizer state) / base memory
``stability``            minus the training-loss spike after the graft, ``-max(0, peak_after /
                         peak_before - 1)`` (0 when either window is empty)
``safety``               minus one when the graft was rolled back, minus one half per kernel fault
=======================  ========================================================================

:func:`correlate_components` reports how each component tracked the final outcome over a set of
episodes (Pearson and Spearman correlation with, e.g., the final validation loss), which is how
the weights are checked against what actually matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import model_validator

from esper.contracts import AdaptationAction, RewardReport
from esper.contracts.config_model import ConfigModel
from esper.errors import ConfigurationError

REWARD_COMPONENTS: tuple[str, ...] = (
    "loss_improvement",
    "accuracy_improvement",
    "parameter_efficiency",
    "compute_cost",
    "memory_cost",
    "stability",
    "safety",
)
"""Names of the reward components, in report order."""

_EPS = 1e-12
COMPONENT_LIMIT = 1e6
"""Largest magnitude of a reward component and of a weight: every reward stays a finite number
(what :class:`~esper.contracts.RewardReport` requires) whatever was measured."""


class RewardWeights(ConfigModel):
    """Weight of each reward component in the total (a config object; YAML-friendly).

    Raises:
        ConfigurationError: an unknown component, or a weight that is not a finite number.
    """

    loss_improvement: float = 1.0
    accuracy_improvement: float = 1.0
    parameter_efficiency: float = 0.1
    compute_cost: float = 0.05
    memory_cost: float = 0.05
    stability: float = 0.2
    safety: float = 1.0

    @model_validator(mode="after")
    def _finite_weights(self) -> RewardWeights:
        bad = {n: w for n, w in self.as_dict().items() if not abs(w) <= COMPONENT_LIMIT}
        if bad:
            raise ValueError(
                f"reward weights must be finite numbers within +-{COMPONENT_LIMIT:g}, got {bad}"
            )
        return self

    def as_dict(self) -> dict[str, float]:
        """Weights by component name, in :data:`REWARD_COMPONENTS` order."""
        return {name: float(getattr(self, name)) for name in REWARD_COMPONENTS}


@dataclass(frozen=True)
class AdaptationOutcome:
    """What was measured around one adaptation (before the graft, and after its window).

    Attributes:
        val_loss_before: validation loss just before the graft.
        val_loss_after: validation loss at the end of the evaluation window.
        base_parameters: parameters of the model without kernels.
        added_parameters: parameters the adaptation added (0 for a culled or refused one).
        accuracy_before: validation accuracy before, if the task has one.
        accuracy_after: validation accuracy after, if the task has one.
        step_time_before: mean step (or forward) time before the graft; 0 if not measured.
        step_time_after: the same after the graft; 0 if not measured.
        base_memory_bytes: bytes of the base model's weights and optimizer state (0: use
            ``4 * base_parameters``).
        added_memory_bytes: bytes the adaptation added (0: use ``4 * added_parameters``).
        train_losses_before: training losses over the window before the graft.
        train_losses_after: training losses over the window after the graft.
        faults: kernel faults (exceptions, non-finite output) during the window.
        rolled_back: the graft was culled by a safety gate (e.g. a loss spike).
    """

    val_loss_before: float
    val_loss_after: float
    base_parameters: int
    added_parameters: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    step_time_before: float = 0.0
    step_time_after: float = 0.0
    base_memory_bytes: int = 0
    added_memory_bytes: int = 0
    train_losses_before: Sequence[float] = field(default_factory=tuple)
    train_losses_after: Sequence[float] = field(default_factory=tuple)
    faults: int = 0
    rolled_back: bool = False


@dataclass(frozen=True)
class Reward:
    """The components of one reward (unweighted, by name), the weights used, and the total."""

    components: dict[str, float]
    weights: dict[str, float]
    total: float

    def to_report(
        self,
        *,
        run_id: str,
        decision_id: str,
        layer_name: str,
        step: int,
        outcome: AdaptationAction | None = None,
    ) -> RewardReport:
        """The :class:`~esper.contracts.RewardReport` contract for this reward."""
        return RewardReport(
            run_id=run_id,
            decision_id=decision_id,
            layer_name=layer_name,
            step=step,
            components=dict(self.components),
            weights=dict(self.weights),
            total=self.total,
            outcome=outcome,
        )


def reward_components(outcome: AdaptationOutcome) -> dict[str, float]:
    """The seven unweighted components of ``outcome`` (see the module docstring).

    Every component is finite: a non-finite measurement (an accuracy of NaN) counts as not
    measured (0), and magnitudes are clipped to :data:`COMPONENT_LIMIT`.

    Raises:
        ConfigurationError: a loss is not finite or the base model has no parameters.
    """
    if not (math.isfinite(outcome.val_loss_before) and outcome.base_parameters > 0):
        raise ConfigurationError(
            f"reward needs a finite validation loss before the graft and a positive base parameter "
            f"count; got val_loss_before={outcome.val_loss_before}, "
            f"base_parameters={outcome.base_parameters}"
        )
    before, after = outcome.val_loss_before, outcome.val_loss_after
    if not math.isfinite(after):
        loss_improvement = -math.inf
    elif before > 0 and after > 0:
        loss_improvement = math.log(before / after)
    else:  # a loss that can reach zero or below: fall back to the relative change
        loss_improvement = (before - after) / max(abs(before), _EPS)
    if outcome.accuracy_before is not None and outcome.accuracy_after is not None:
        accuracy_improvement = outcome.accuracy_after - outcome.accuracy_before
    else:
        accuracy_improvement = 0.0
    compute = 0.0
    if outcome.step_time_before > 0 and outcome.step_time_after > 0:
        compute = 1.0 - outcome.step_time_after / outcome.step_time_before
    base_memory = outcome.base_memory_bytes or 4 * outcome.base_parameters
    added_memory = outcome.added_memory_bytes or 4 * outcome.added_parameters
    stability = 0.0
    if outcome.train_losses_before and outcome.train_losses_after:
        peak_before = max(outcome.train_losses_before)
        peak_after = max(outcome.train_losses_after)
        stability = -max(0.0, peak_after / max(peak_before, _EPS) - 1.0)
    safety = -(1.0 if outcome.rolled_back else 0.0) - 0.5 * outcome.faults
    components = {
        "loss_improvement": max(loss_improvement, -10.0),  # a diverged loss: large, finite penalty
        "accuracy_improvement": accuracy_improvement,
        "parameter_efficiency": -outcome.added_parameters / outcome.base_parameters,
        "compute_cost": compute,
        "memory_cost": -added_memory / base_memory,
        "stability": max(stability, -10.0),
        "safety": safety,
    }
    return {name: _bounded(value) for name, value in components.items()}


def _bounded(value: float) -> float:
    """``value`` clipped to ``±COMPONENT_LIMIT``; NaN (not measured) becomes 0."""
    return 0.0 if math.isnan(value) else min(COMPONENT_LIMIT, max(-COMPONENT_LIMIT, value))


def compute_reward(outcome: AdaptationOutcome, weights: RewardWeights | None = None) -> Reward:
    """Components of ``outcome`` and their weighted total."""
    weight_map = (weights or RewardWeights()).as_dict()
    components = reward_components(outcome)
    total = sum(weight_map[name] * components[name] for name in REWARD_COMPONENTS)
    return Reward(components=components, weights=weight_map, total=total)


@dataclass(frozen=True)
class ComponentCorrelation:
    """How one reward component tracked the final outcome over a set of episodes.

    ``None`` where the correlation is undefined (fewer than 3 episodes, or a constant series).
    """

    component: str
    pearson: float | None
    spearman: float | None
    samples: int


def correlate_components(
    components: Sequence[Mapping[str, float]], final_outcome: Sequence[float]
) -> dict[str, ComponentCorrelation]:
    """Pearson and Spearman correlation of each component with a final outcome per episode.

    Args:
        components: per episode, the reward components (``Reward.components``).
        final_outcome: per episode, the outcome that matters (e.g. final validation loss: then a
            useful component correlates *negatively*).

    Returns:
        One :class:`ComponentCorrelation` per name of :data:`REWARD_COMPONENTS`, plus ``total``
        if the episodes' component maps contain it.
    """
    if len(components) != len(final_outcome):
        raise ConfigurationError(
            f"need one outcome per episode: {len(components)} component sets, "
            f"{len(final_outcome)} outcomes"
        )
    names = list(REWARD_COMPONENTS)
    if components and all("total" in c for c in components):
        names.append("total")
    outcome = [float(v) for v in final_outcome]
    result = {}
    for name in names:
        series = [float(c.get(name, 0.0)) for c in components]
        result[name] = ComponentCorrelation(
            component=name,
            pearson=pearson(series, outcome),
            spearman=pearson(_ranks(series), _ranks(outcome)),
            samples=len(series),
        )
    return result


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equal-length series; ``None`` if undefined."""
    n = len(x)
    if n < 3 or len(y) != n:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= _EPS * n or syy <= _EPS * n:
        return None
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks starting at 1, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
