"""Safety gates: each gate refuses by name, cooldown/window/budget arithmetic, rollback, state."""

from __future__ import annotations

import json

import pytest

from esper.contracts import AdaptationAction, DecisionRefusal
from esper.errors import ConfigurationError
from esper.tamiyo.safety import (
    GATE_CONFIDENCE,
    GATE_COOLDOWN,
    GATE_LOSS_SPIKE,
    GATE_PARAMETER_BUDGET,
    GATE_RATE_LIMIT,
    GATE_UNCERTAINTY,
    Proposal,
    SafetyConfig,
    SafetyGates,
)

BASE = 1000


def _germinate(
    step: int,
    layer: str = "fc1",
    *,
    confidence: float = 1.0,
    uncertainty: float = 0.0,
    added_parameters: int = 0,
) -> Proposal:
    return Proposal(
        step=step,
        layer_name=layer,
        action=AdaptationAction.GERMINATE,
        confidence=confidence,
        uncertainty=uncertainty,
        added_parameters=added_parameters,
    )


def test_confidence_gate_refuses_below_minimum_and_names_itself() -> None:
    gates = SafetyGates(SafetyConfig(min_confidence=0.5))

    low = gates.check(_germinate(0, confidence=0.49), base_parameters=BASE, kernel_parameters=0)
    ok = gates.check(_germinate(0, confidence=0.5), base_parameters=BASE, kernel_parameters=0)

    assert low.gate == GATE_CONFIDENCE and "0.490" in low.reason and "0.500" in low.reason
    assert ok.allowed


def test_uncertainty_gate_refuses_above_maximum() -> None:
    gates = SafetyGates(SafetyConfig(max_uncertainty=0.2))

    high = gates.check(_germinate(0, uncertainty=0.21), base_parameters=BASE, kernel_parameters=0)
    ok = gates.check(_germinate(0, uncertainty=0.2), base_parameters=BASE, kernel_parameters=0)

    assert high.gate == GATE_UNCERTAINTY and "0.210" in high.reason
    assert ok.allowed


def test_cooldown_blocks_the_layer_for_exactly_cooldown_steps() -> None:
    gates = SafetyGates(SafetyConfig(cooldown_steps=100, max_adaptations=10))
    gates.record_adaptation(50, "fc1")

    verdicts = {
        step: gates.check(_germinate(step), base_parameters=BASE, kernel_parameters=0)
        for step in (50, 149, 150)
    }
    other_layer = gates.check(_germinate(60, "fc2"), base_parameters=BASE, kernel_parameters=0)

    assert verdicts[50].gate == GATE_COOLDOWN and verdicts[149].gate == GATE_COOLDOWN
    assert "step 50" in verdicts[149].reason and "until step 150" in verdicts[149].reason
    assert verdicts[150].allowed
    assert other_layer.allowed
    assert gates.cooldown_until("fc1") == 150 and gates.cooldown_until("fc2") == 0


def test_rate_limit_counts_adaptations_in_a_sliding_window() -> None:
    gates = SafetyGates(SafetyConfig(cooldown_steps=0, window_steps=100, max_adaptations=2))
    gates.record_adaptation(10, "a")
    gates.record_adaptation(60, "b")

    at_109 = gates.check(_germinate(109, "c"), base_parameters=BASE, kernel_parameters=0)
    at_110 = gates.check(_germinate(110, "c"), base_parameters=BASE, kernel_parameters=0)

    assert gates.adaptations_in_window(109) == 2  # steps 10 and 60 are in (9, 109]
    assert at_109.gate == GATE_RATE_LIMIT and "2 adaptations in the last 100 steps" in at_109.reason
    assert gates.adaptations_in_window(110) == 1  # step 10 left the window (10, 110]
    assert at_110.allowed


def test_parameter_budget_counts_grafted_plus_new_parameters() -> None:
    gates = SafetyGates(SafetyConfig(max_parameter_fraction=0.25))

    at_budget = gates.check(
        _germinate(0, added_parameters=100), base_parameters=BASE, kernel_parameters=150
    )
    over = gates.check(
        _germinate(0, added_parameters=101), base_parameters=BASE, kernel_parameters=150
    )

    assert at_budget.allowed  # 250 / 1000 == 0.25 is within the budget
    assert over.gate == GATE_PARAMETER_BUDGET
    assert "251" in over.reason and "0.251" in over.reason and "0.250" in over.reason


def test_gates_run_in_order_and_count_refusals() -> None:
    gates = SafetyGates(SafetyConfig(min_confidence=0.5, cooldown_steps=10))
    gates.record_adaptation(0, "fc1")

    first = gates.check(_germinate(5, confidence=0.1), base_parameters=BASE, kernel_parameters=0)
    second = gates.check(_germinate(5, confidence=0.9), base_parameters=BASE, kernel_parameters=0)

    assert first.gate == GATE_CONFIDENCE  # confidence is checked before the cooldown
    assert second.gate == GATE_COOLDOWN
    assert gates.refusals == {GATE_CONFIDENCE: 1, GATE_COOLDOWN: 1}


def test_fossilize_and_cull_always_pass() -> None:
    gates = SafetyGates(SafetyConfig(min_confidence=1.0, max_parameter_fraction=0.0))
    gates.record_adaptation(0, "fc1")
    for action in (AdaptationAction.FOSSILIZE, AdaptationAction.CULL):
        proposal = Proposal(step=0, layer_name="fc1", action=action, confidence=0.0)
        assert gates.check(proposal, base_parameters=BASE, kernel_parameters=BASE).allowed


def test_blocked_layers_feed_the_mask() -> None:
    gates = SafetyGates(
        SafetyConfig(
            cooldown_steps=20, window_steps=100, max_adaptations=2, max_parameter_fraction=0.5
        )
    )
    layers = ["fc1", "fc2", "fc3"]
    gates.record_adaptation(0, "fc1")

    assert gates.blocked_layers(10, layers) == {"fc1": GATE_COOLDOWN}
    assert gates.blocked_layers(20, layers) == {}
    assert gates.blocked_layers(20, layers, base_parameters=BASE, kernel_parameters=500) == {
        name: GATE_PARAMETER_BUDGET for name in layers
    }
    gates.record_adaptation(30, "fc2")
    assert gates.blocked_layers(40, layers) == {name: GATE_RATE_LIMIT for name in layers}
    assert gates.blocked_layers(100, layers) == {}  # step 0 left the window (0, 100]


def test_loss_spike_rolls_back_above_tolerance_only() -> None:
    gates = SafetyGates(SafetyConfig(loss_spike_tolerance=0.25))
    before = [1.0, 1.2, 0.8]  # mean 1.0 -> limit 1.25

    assert gates.check_loss_spike(before, [1.25, 1.25]).allowed
    spike = gates.check_loss_spike(before, [1.2, 1.4])  # mean 1.3
    assert spike.gate == GATE_LOSS_SPIKE
    assert "1.0000 to 1.3000" in spike.reason and "1.2500" in spike.reason
    assert gates.check_loss_spike(before, [0.5, float("nan")]).gate == GATE_LOSS_SPIKE
    assert gates.check_loss_spike([], [5.0]).allowed  # no baseline, no evidence


def test_rollback_penalises_the_layer_with_the_long_cooldown() -> None:
    gates = SafetyGates(SafetyConfig(cooldown_steps=10, rollback_cooldown_factor=3.0))
    gates.record_adaptation(0, "fc1")
    gates.record_rollback(40, "fc1")

    assert gates.cooldown_until("fc1") == 70
    refused = gates.check(_germinate(69), base_parameters=BASE, kernel_parameters=0)
    assert refused.gate == GATE_COOLDOWN
    assert gates.check(_germinate(70), base_parameters=BASE, kernel_parameters=0).allowed
    assert gates.rollbacks == 1


def test_refusal_message_names_the_gate() -> None:
    gates = SafetyGates(SafetyConfig(min_confidence=0.9))
    proposal = _germinate(7, confidence=0.3)
    verdict = gates.check(proposal, base_parameters=BASE, kernel_parameters=0)

    refusal = gates.refusal(proposal, verdict, run_id="r1", policy="random")

    assert isinstance(refusal, DecisionRefusal)
    assert (refusal.gate, refusal.layer_name, refusal.step, refusal.policy) == (
        GATE_CONFIDENCE,
        "fc1",
        7,
        "random",
    )
    assert refusal.reason == verdict.reason
    with pytest.raises(ConfigurationError, match="allowed"):
        gates.refusal(
            proposal,
            gates.check(_germinate(7), base_parameters=1, kernel_parameters=0),
            run_id="r",
            policy="p",
        )


def test_state_dict_is_json_and_round_trips() -> None:
    config = SafetyConfig(cooldown_steps=10, window_steps=50, max_adaptations=2, min_confidence=0.4)
    gates = SafetyGates(config)
    gates.record_adaptation(5, "fc1")
    gates.record_adaptation(20, "fc2")
    gates.record_rollback(30, "fc2")
    gates.check(_germinate(21, confidence=0.1), base_parameters=BASE, kernel_parameters=0)

    state = json.loads(json.dumps(gates.state_dict()))
    restored = SafetyGates(config)
    restored.load_state_dict(state)

    assert restored.state_dict() == gates.state_dict()
    for step in (21, 25, 60, 71):
        for layer in ("fc1", "fc2", "fc3"):
            proposal = _germinate(step, layer, confidence=0.9)
            assert restored.check(
                proposal, base_parameters=BASE, kernel_parameters=0
            ) == gates.check(proposal, base_parameters=BASE, kernel_parameters=0)


def test_invalid_config_says_which_fields() -> None:
    with pytest.raises(ConfigurationError, match=r"min_confidence=1\.5"):
        SafetyConfig(min_confidence=1.5)
    with pytest.raises(ConfigurationError, match="cooldown_steps=-1"):
        SafetyConfig(cooldown_steps=-1)


def test_a_refused_layer_stays_masked_for_the_backoff_named_by_its_gate() -> None:
    gates = SafetyGates(SafetyConfig(max_parameter_fraction=0.1, refusal_backoff_steps=30))
    layers = ["fc1", "fc2"]

    refused = gates.check(
        _germinate(100, added_parameters=200), base_parameters=BASE, kernel_parameters=0
    )

    assert refused.gate == GATE_PARAMETER_BUDGET
    assert gates.blocked_layers(100, layers) == {"fc1": GATE_PARAMETER_BUDGET}
    assert gates.blocked_layers(129, layers) == {"fc1": GATE_PARAMETER_BUDGET}
    assert gates.blocked_layers(130, layers) == {}
    small = _germinate(110, added_parameters=50)  # the backoff masks; it does not refuse
    assert gates.check(small, base_parameters=BASE, kernel_parameters=0).allowed
