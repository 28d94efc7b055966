"""Multi-metric reward: each component's value on hand-computed outcomes, weights, the contract,
and the correlation analysis against scipy's reference implementations."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from esper.contracts import AdaptationAction, RewardReport
from esper.errors import ConfigurationError
from esper.tamiyo.reward import (
    REWARD_COMPONENTS,
    AdaptationOutcome,
    RewardWeights,
    compute_reward,
    correlate_components,
    reward_components,
)


def outcome(**overrides: object) -> AdaptationOutcome:
    values: dict[str, object] = {
        "val_loss_before": 0.5,
        "val_loss_after": 0.4,
        "base_parameters": 1000,
        "added_parameters": 100,
        "accuracy_before": 0.80,
        "accuracy_after": 0.85,
        "step_time_before": 0.010,
        "step_time_after": 0.011,
        "base_memory_bytes": 12_000,
        "added_memory_bytes": 1_200,
        "train_losses_before": (0.6, 0.5, 0.55),
        "train_losses_after": (0.9, 0.45),
        "faults": 0,
        "rolled_back": False,
    }
    values.update(overrides)
    return AdaptationOutcome(**values)  # type: ignore[arg-type]


def test_seven_components_on_a_hand_computed_outcome() -> None:
    c = reward_components(outcome())
    assert list(c) == list(REWARD_COMPONENTS) and len(c) == 7
    assert c["loss_improvement"] == pytest.approx(math.log(0.5 / 0.4))
    assert c["accuracy_improvement"] == pytest.approx(0.05)
    assert c["parameter_efficiency"] == pytest.approx(-0.1)
    assert c["compute_cost"] == pytest.approx(-0.1)  # 1 - 0.011 / 0.010
    assert c["memory_cost"] == pytest.approx(-0.1)
    assert c["stability"] == pytest.approx(-0.5)  # peak 0.9 vs peak 0.6
    assert c["safety"] == 0.0


def test_defaults_when_things_were_not_measured() -> None:
    c = reward_components(
        AdaptationOutcome(
            val_loss_before=2.0, val_loss_after=2.5, base_parameters=400, added_parameters=40
        )
    )
    assert c["loss_improvement"] == pytest.approx(math.log(2.0 / 2.5))
    shifted = reward_components(
        AdaptationOutcome(
            val_loss_before=-1.0, val_loss_after=-1.5, base_parameters=1, added_parameters=0
        )
    )
    assert shifted["loss_improvement"] == pytest.approx(0.5)  # non-positive losses: relative
    assert c["accuracy_improvement"] == 0.0
    assert c["compute_cost"] == 0.0
    assert c["memory_cost"] == pytest.approx(-0.1)  # 4 bytes per parameter on both sides
    assert c["stability"] == 0.0


def test_safety_counts_rollbacks_and_faults_and_a_diverged_loss_is_bounded() -> None:
    c = reward_components(outcome(rolled_back=True, faults=2, val_loss_after=math.nan))
    assert c["safety"] == pytest.approx(-2.0)
    assert c["loss_improvement"] == -10.0
    no_spike = reward_components(outcome(train_losses_after=(0.3, 0.2)))
    assert no_spike["stability"] == 0.0


def test_total_is_the_weighted_sum_and_the_report_carries_everything() -> None:
    weights = RewardWeights(
        loss_improvement=2.0,
        accuracy_improvement=0.0,
        parameter_efficiency=1.0,
        compute_cost=0.0,
        memory_cost=0.0,
        stability=0.5,
        safety=3.0,
    )
    reward = compute_reward(outcome(rolled_back=True), weights)
    expected = 2.0 * math.log(0.5 / 0.4) + 1.0 * -0.1 + 0.5 * -0.5 + 3.0 * -1.0
    assert reward.total == pytest.approx(expected)
    report = reward.to_report(
        run_id="r", decision_id="a" * 32, layer_name="fc1", step=40, outcome=AdaptationAction.CULL
    )
    assert isinstance(report, RewardReport)
    assert report.components == reward.components
    assert report.weights == weights.as_dict()
    assert report.total == reward.total
    assert RewardReport.model_validate_json(report.model_dump_json()) == report
    default = compute_reward(outcome())
    assert default.weights == RewardWeights().as_dict()


def test_invalid_inputs_are_refused_with_a_reason() -> None:
    with pytest.raises(ConfigurationError, match="base parameter"):
        reward_components(outcome(base_parameters=0))
    with pytest.raises(ConfigurationError, match="finite validation loss"):
        reward_components(outcome(val_loss_before=math.inf))
    with pytest.raises(ValueError):
        RewardWeights(loss_improvment=1.0)  # type: ignore[call-arg]


def test_correlation_analysis_matches_scipy() -> None:
    rng = random.Random(0)
    episodes = []
    final = []
    for _ in range(40):
        improvement = rng.uniform(-0.2, 0.8)
        final_loss = 1.0 - improvement + rng.gauss(0, 0.1)
        episodes.append(
            reward_components(
                outcome(
                    val_loss_after=0.5 * (1 - improvement),
                    added_parameters=rng.randint(10, 300),
                    added_memory_bytes=0,
                    train_losses_after=(rng.uniform(0.1, 1.2),),
                )
            )
        )
        final.append(final_loss)
    result = correlate_components(episodes, final)
    assert set(result) == set(REWARD_COMPONENTS)
    for name in ("loss_improvement", "parameter_efficiency", "stability", "memory_cost"):
        series = [e[name] for e in episodes]
        assert result[name].pearson == pytest.approx(stats.pearsonr(series, final)[0], abs=1e-9)
        assert result[name].spearman == pytest.approx(stats.spearmanr(series, final)[0], abs=1e-9)
        assert result[name].samples == 40
    assert result["loss_improvement"].pearson is not None
    assert result["loss_improvement"].pearson < -0.8  # improvement tracks a lower final loss
    # constant components (no faults, no rollback, same accuracy) have no defined correlation
    assert result["safety"].pearson is None and result["safety"].spearman is None


def test_spearman_handles_ties_and_total_is_included_when_present() -> None:
    episodes = [{"loss_improvement": v, "total": 2 * v} for v in (1.0, 1.0, 2.0, 3.0, 3.0)]
    final = [5.0, 4.0, 3.0, 2.0, 2.0]
    result = correlate_components(episodes, final)
    expected = stats.spearmanr([1, 1, 2, 3, 3], final)[0]
    assert result["loss_improvement"].spearman == pytest.approx(expected)
    assert result["total"].spearman == pytest.approx(expected)
    with pytest.raises(ConfigurationError, match="one outcome per episode"):
        correlate_components(episodes, final[:2])
