"""Learning configs are pydantic models: each range is stated once on its field, a bad value is a
ConfigurationError naming the field (the hand-written checks let many through), and a training
record's config loads back as the config it was."""

from __future__ import annotations

from typing import Any

import pytest

from esper.errors import ConfigurationError
from esper.tamiyo.learning.a2c import A2CConfig
from esper.tamiyo.learning.episodes import EpisodeConfig
from esper.tamiyo.learning.policy_training import PolicyTrainingConfig
from esper.tamiyo.learning.ppo import PPOConfig
from esper.tamiyo.policy import GNNPolicyConfig
from esper.tamiyo.reward import RewardWeights

BAD_FIELDS: list[tuple[type[Any], str, Any]] = [
    (EpisodeConfig, "warmup_steps", 0),
    (EpisodeConfig, "batch_size", 0),
    (EpisodeConfig, "telemetry_every", 0),
    (EpisodeConfig, "max_germinations", -1),
    (PPOConfig, "clip_coef", 1.0),
    (PPOConfig, "gamma", 1.5),
    (PPOConfig, "minibatch_size", 0),
    (A2CConfig, "learning_rate", 0.0),
    (A2CConfig, "gae_lambda", -0.1),
    (GNNPolicyConfig, "ensemble", 0),
    (PolicyTrainingConfig, "episodes_per_iteration", 0),
]


@pytest.mark.parametrize(("config", "field", "value"), BAD_FIELDS, ids=lambda x: str(x))
def test_a_value_out_of_range_is_a_configuration_error_naming_the_field(
    config: type[Any], field: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError, match=rf"invalid {config.__name__}: {field}="):
        config(**{field: value})


def test_checks_of_several_fields_and_of_the_catalog_keep_their_messages() -> None:
    with pytest.raises(ConfigurationError, match="must be a positive multiple of attention_heads"):
        GNNPolicyConfig(hidden=30, attention_heads=4)
    with pytest.raises(ConfigurationError, match="unknown blueprint option"):
        EpisodeConfig(allowed_options=("no_such_option",))
    with pytest.raises(ConfigurationError, match="finite"):
        RewardWeights(stability=float("inf"))


def test_a_misspelt_field_is_refused_with_the_closest_name() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'learning_rate'"):
        PPOConfig(learning_rat=1e-3)  # type: ignore[call-arg]


def test_a_training_records_config_loads_back_as_the_same_config() -> None:
    config = PolicyTrainingConfig(
        algorithm="a2c",
        iterations=2,
        episode=EpisodeConfig(warmup_steps=20, allowed_options=("mlp_h32", "lowrank_r8")),
        ppo=PPOConfig(target_kl=0.05),
    )

    dumped = config.model_dump(mode="json")

    assert dumped["episode"]["allowed_options"] == ["mlp_h32", "lowrank_r8"]
    assert dumped["episode"]["reward_weights"] == RewardWeights().as_dict()
    assert PolicyTrainingConfig.model_validate(dumped) == config
