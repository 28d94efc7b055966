"""Pending decisions: committed parameters and reserved seeds of published germinations, released
by rewards, refusals and the training side's seed states; their state round-trips as JSON."""

from __future__ import annotations

import json

from esper.contracts import AdaptationAction, AdaptationDecision, BlueprintSpec, SeedState
from esper.tamiyo.pending_decisions import PendingDecisions

D, L, B = SeedState.DORMANT, SeedState.LOADING, SeedState.BLENDING


def _decision(layer: str, seed_idx: int, step: int) -> AdaptationDecision:
    return AdaptationDecision(
        run_id="r",
        step=step,
        action=AdaptationAction.GERMINATE,
        layer_name=layer,
        seed_idx=seed_idx,
        blueprint=BlueprintSpec(family="residual_mlp", params={"hidden": 8}),
        policy="bottleneck",
        confidence=1.0,
        uncertainty=0.0,
    )


def test_committed_parameters_add_up_until_a_cull_or_a_refusal_releases_them() -> None:
    pending = PendingDecisions()
    kept, culled, refused = _decision("a", 0, 5), _decision("b", 0, 6), _decision("c", 1, 7)
    pending.add(kept, added_parameters=100)
    pending.add(culled, added_parameters=20)
    pending.add(refused, added_parameters=3)
    assert pending.committed_parameters() == 123

    pending.rewarded(kept.decision_id, culled=False)  # kept: its parameters stay counted
    pending.rewarded(culled.decision_id, culled=True)
    assert pending.refused(refused.decision_id) is True
    assert pending.refused(refused.decision_id) is False  # released once
    assert pending.refused("0" * 32) is False  # not ours

    assert pending.committed_parameters() == 100
    assert pending.state_dict() == {"committed": {kept.decision_id: ["a", 5, 100]}, "reserved": {}}


def test_a_reserved_seed_counts_as_taken_until_it_is_seen_in_use_after_the_decision() -> None:
    pending = PendingDecisions()
    decision = _decision("a", 1, step=10)
    pending.add(decision, added_parameters=1)

    assert pending.with_reserved_seeds({"a": (D, D)}, {"a": 10}) == {"a": (D, L)}
    # in use, but in telemetry not newer than the decision: still reserved
    assert pending.with_reserved_seeds({"a": (D, B)}, {"a": 10}) == {"a": (D, B)}
    assert decision.decision_id in pending.state_dict()["reserved"]
    # in use in newer telemetry: released, and the states are what the training side says
    assert pending.with_reserved_seeds({"a": (D, B)}, {"a": 11}) == {"a": (D, B)}
    assert pending.state_dict()["reserved"] == {}
    assert pending.with_reserved_seeds({"a": (D, D)}, {"a": 12}) == {"a": (D, D)}


def test_states_read_from_the_model_release_a_reservation_at_once() -> None:
    pending = PendingDecisions()
    pending.add(_decision("a", 0, step=10), added_parameters=1)
    assert pending.with_reserved_seeds({"a": (B,), "b": (D,)}, None) == {"a": (B,), "b": (D,)}
    assert pending.state_dict()["reserved"] == {}


def test_a_reservation_for_a_seed_the_layer_lacks_is_kept_and_ignored() -> None:
    pending = PendingDecisions()
    pending.add(_decision("a", 3, step=10), added_parameters=1)
    assert pending.with_reserved_seeds({"a": (D,)}, {"a": 50}) == {"a": (D,)}
    assert len(pending.state_dict()["reserved"]) == 1


def test_the_state_round_trips_through_json() -> None:
    pending = PendingDecisions()
    pending.add(_decision("a", 0, 5), added_parameters=7)
    pending.add(_decision("b", 1, 6), added_parameters=9)

    restored = PendingDecisions()
    restored.load_state_dict(json.loads(json.dumps(pending.state_dict())))

    assert restored.state_dict() == pending.state_dict()
    assert restored.committed_parameters() == 16
    assert restored.with_reserved_seeds({"a": (D,), "b": (D, D)}, {}) == {"a": (L,), "b": (D, L)}
