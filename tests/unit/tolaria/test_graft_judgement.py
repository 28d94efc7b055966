"""Graft judgement: the pure keep/cull verdict and reward, called directly (no thread, no model)."""

from __future__ import annotations

import math

import pytest

from esper.contracts import AdaptationAction, AdaptationDecision
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tamiyo.reward import AdaptationOutcome, RewardWeights, reward_components
from esper.tamiyo.safety import GATE_LOSS_SPIKE, SafetyConfig
from esper.tolaria.graft_judgement import GraftEvidence, judge_graft

MLP_H32 = next(option.spec for option in BLUEPRINT_CATALOG if option.name == "mlp_h32")
TOLERANT = SafetyConfig(loss_spike_tolerance=0.25)

DECISION = AdaptationDecision(
    run_id="run-1",
    step=40,
    action=AdaptationAction.GERMINATE,
    layer_name="fc1",
    seed_idx=1,
    blueprint=MLP_H32,
    policy="bottleneck",
    confidence=0.9,
    uncertainty=0.1,
)


def _evidence(**changes: object) -> GraftEvidence:
    fields: dict[str, object] = {
        "decision": DECISION,
        "step": 70,
        "losses_before": [1.0, 1.2, 0.8],
        "losses_after": [0.9, 0.7, 0.8],
        "kernel_parameters": 500,
        "base_parameters": 2000,
        "metrics_before": {"loss": 1.0, "accuracy": 0.6},
        "metrics_after": {"loss": 0.5, "accuracy": 0.7},
        "step_times_before": [0.010, 0.012, 0.011],
        "step_times_after": [0.013, 0.011, 0.012],
    }
    fields.update(changes)
    return GraftEvidence(**fields)  # type: ignore[arg-type]


def test_a_graft_that_helped_is_kept_and_rewarded_from_what_was_measured() -> None:
    verdict = judge_graft(_evidence(), safety=TOLERANT)

    assert verdict.keep and verdict.rollback is None
    report = verdict.report
    assert (report.run_id, report.decision_id, report.layer_name, report.step) == (
        "run-1",
        DECISION.decision_id,
        "fc1",
        70,
    )
    assert report.outcome is AdaptationAction.FOSSILIZE
    expected = reward_components(
        AdaptationOutcome(
            val_loss_before=1.0,
            val_loss_after=0.5,
            base_parameters=2000,
            added_parameters=500,
            accuracy_before=0.6,
            accuracy_after=0.7,
            step_time_before=0.011,  # medians of the windows
            step_time_after=0.012,
            train_losses_before=[1.0, 1.2, 0.8],
            train_losses_after=[0.9, 0.7, 0.8],
        )
    )
    assert report.components == pytest.approx(expected)
    assert report.components["loss_improvement"] == pytest.approx(math.log(2.0))
    assert report.components["parameter_efficiency"] == pytest.approx(-0.25)
    assert report.total == pytest.approx(
        sum(RewardWeights().as_dict()[k] * v for k, v in report.components.items())
    )


def test_a_loss_spike_culls_the_graft_and_says_why() -> None:
    verdict = judge_graft(_evidence(losses_after=[2.0, 2.0, 2.0]), safety=TOLERANT)

    assert not verdict.keep
    assert verdict.report.outcome is AdaptationAction.CULL
    assert verdict.report.components["parameter_efficiency"] == 0.0  # nothing added
    assert verdict.report.components["safety"] == -1.0  # rolled back
    rollback = verdict.rollback
    assert rollback is not None
    assert (rollback.gate, rollback.action, rollback.decision_id) == (
        GATE_LOSS_SPIKE,
        AdaptationAction.FOSSILIZE,
        DECISION.decision_id,
    )
    assert "1.0000 to 2.0000" in rollback.reason and rollback.policy == "bottleneck"


def test_a_seed_no_longer_active_is_culled_without_a_rollback_refusal() -> None:
    verdict = judge_graft(_evidence(still_active=False, faults=2), safety=TOLERANT)

    assert not verdict.keep and verdict.rollback is None
    assert verdict.report.outcome is AdaptationAction.CULL
    assert verdict.report.components["safety"] == -2.0  # culled, and two faults


def test_without_validation_the_training_windows_stand_in_and_no_step_time_is_claimed() -> None:
    evidence = _evidence(
        metrics_before={},
        metrics_after={},
        step_times_before=[],
        step_times_after=[],
        losses_before=[1.0, math.nan, 1.0],  # a non-finite loss is left out of the mean
    )

    report = judge_graft(evidence, safety=TOLERANT).report

    assert report.components["loss_improvement"] == pytest.approx(math.log(1.0 / 0.8))
    assert report.components["accuracy_improvement"] == 0.0
    assert report.components["compute_cost"] == 0.0


@pytest.mark.parametrize(
    "validation",
    [
        ({"loss": math.nan}, {"loss": math.nan}),  # the model diverged before the graft
        ({"loss": math.inf}, {"loss": math.inf}),
        ({}, {"loss": math.nan}),
    ],
)
def test_non_finite_validation_losses_give_a_finite_reward_never_an_error(
    validation: tuple[dict[str, float], dict[str, float]],
) -> None:
    before, after = validation
    evidence = _evidence(metrics_before=before, metrics_after=after, losses_before=[math.nan])

    verdict = judge_graft(evidence, safety=TOLERANT)

    assert math.isfinite(verdict.report.total)
    assert verdict.report.components["loss_improvement"] == -10.0  # the diverged-loss penalty


def test_the_verdict_is_a_function_of_the_evidence() -> None:
    evidence = _evidence()

    assert judge_graft(evidence, safety=TOLERANT) == judge_graft(evidence, safety=TOLERANT)
