"""Safety limits: the thresholds of Tamiyo's safety gates, each range written once.

:class:`SafetyConfig` is what :class:`~esper.tamiyo.safety.SafetyGates` applies. A run's
``growth`` section (``esper train``) and the flags of ``esper tamiyo serve`` set the same fields;
they use the field types below, so a threshold has one name and one range wherever it is set.
This module imports no torch: the command line and the config loader check values before
anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field

from esper.contracts.config_model import ConfigModel

CooldownSteps = Annotated[int, Field(ge=0)]
"""Steps a layer waits (after an adaptation, or after a refused proposal); 0: none."""

WindowSteps = Annotated[int, Field(ge=1)]
"""Length of the rate limit's sliding window, in steps."""

AdaptationCount = Annotated[int, Field(ge=0)]
"""Adaptations allowed (within a window, or in a run)."""

Confidence = Annotated[float, Field(ge=0, le=1)]
"""A policy's probability of its chosen action, in [0, 1]."""

Uncertainty = Annotated[float, Field(ge=0)]
"""A policy's epistemic uncertainty (0 or more)."""

ParameterFraction = Annotated[float, Field(ge=0)]
"""Grafted kernel parameters as a fraction of the base model's parameters."""

LossSpikeTolerance = Annotated[float, Field(ge=0)]
"""Relative rise of the mean training loss over a graft's evaluation window that rolls it back
(0.25: a rise of more than 25%)."""


class SafetyConfig(ConfigModel):
    """Thresholds of the safety gates (see :mod:`esper.tamiyo.safety`).

    Attributes:
        cooldown_steps: steps a layer waits after an adaptation before the next one.
        window_steps: length of the sliding window of the rate limit, in steps.
        max_adaptations: adaptations allowed within any window of ``window_steps`` steps.
        min_confidence: proposals whose confidence is below this are refused.
        max_uncertainty: proposals whose uncertainty is above this are refused (``None``: no limit).
        max_parameter_fraction: grafted kernel parameters may reach at most this fraction of the
            base model's parameters.
        loss_spike_tolerance: a graft is rolled back when the mean loss of its evaluation window
            exceeds the mean loss before it by more than this fraction.
        rollback_cooldown_factor: after a rollback the layer's cooldown is this many times longer.
        rollback_penalty: penalty (a positive number) reported in the reward of a rolled-back graft.
        refusal_backoff_steps: steps a layer stays masked after one of its proposals was refused.

    Raises:
        ConfigurationError: a field out of its range (every such field is named).
    """

    cooldown_steps: CooldownSteps = 100
    window_steps: WindowSteps = 500
    max_adaptations: AdaptationCount = 4
    min_confidence: Confidence = 0.0
    max_uncertainty: Uncertainty | None = None
    max_parameter_fraction: ParameterFraction = 0.5
    loss_spike_tolerance: LossSpikeTolerance = 0.25
    rollback_cooldown_factor: float = Field(default=4.0, ge=1)
    rollback_penalty: float = Field(default=1.0, ge=0)
    refusal_backoff_steps: CooldownSteps = 50

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SafetyConfig:
        """The config of the ``options`` named like its fields; other names and ``None`` values
        are ignored (``None``: the field's default), e.g. ``SafetyConfig.from_options(vars(args))``.

        Raises:
            ConfigurationError: a given value is out of its range.
        """
        given = {name: options[name] for name in cls.model_fields if options.get(name) is not None}
        return cls(**given)
