"""Config models: a bad field is one ConfigurationError naming the field, the value and the range;
the safety thresholds state each range once (the config loader and the CLI reuse them)."""

from __future__ import annotations

import pytest

from esper.contracts.safety import SafetyConfig
from esper.errors import ConfigurationError


def test_every_bad_field_is_named_with_its_value_and_range() -> None:
    with pytest.raises(ConfigurationError) as raised:
        SafetyConfig(min_confidence=1.5, cooldown_steps=-1)

    message = str(raised.value)
    assert message.startswith("invalid SafetyConfig: ")
    assert "min_confidence=1.5 (input should be less than or equal to 1)" in message
    assert "cooldown_steps=-1 (input should be greater than or equal to 0)" in message


def test_an_unknown_field_is_answered_with_the_closest_one() -> None:
    with pytest.raises(
        ConfigurationError, match=r"unknown field 'cooldown_step' .*'cooldown_steps'"
    ):
        SafetyConfig(cooldown_step=3)  # type: ignore[call-arg]


def test_nan_is_out_of_every_range() -> None:
    # the hand-written checks let NaN through (every comparison with NaN is false)
    for field in ("max_uncertainty", "max_parameter_fraction", "loss_spike_tolerance"):
        with pytest.raises(ConfigurationError, match=field):
            SafetyConfig(**{field: float("nan")})


def test_model_validate_raises_the_same_error() -> None:
    with pytest.raises(ConfigurationError, match="window_steps=0"):
        SafetyConfig.model_validate({"window_steps": 0})


def test_from_options_takes_the_fields_and_ignores_none_and_other_names() -> None:
    config = SafetyConfig.from_options({"cooldown_steps": 3, "max_uncertainty": None, "seed": 1})

    assert config == SafetyConfig(cooldown_steps=3)
