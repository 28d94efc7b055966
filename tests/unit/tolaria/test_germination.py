"""Germination records: typed stages (the values checkpoints store) and a plain-JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch

from esper.blueprints import create_artifact
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    BlueprintSpec,
    KernelTarget,
    LayerKind,
)
from esper.tolaria.germination import (
    Germination,
    GerminationStage,
    RecentSteps,
    materialize,
)

DECISION = AdaptationDecision(
    run_id="run-1",
    step=12,
    action=AdaptationAction.GERMINATE,
    layer_name="fc1",
    seed_idx=0,
    blueprint=BlueprintSpec(family="lowrank_adapter", params={"rank": 2}),
    policy="test",
    confidence=1.0,
    uncertainty=0.0,
)
KERNEL = create_artifact(
    DECISION.blueprint or BlueprintSpec(family="lowrank_adapter"),
    KernelTarget(
        layer_kind=LayerKind.LINEAR, in_features=8, out_features=8, channel_dim=-1, spatial_dims=0
    ),
)[1]


def test_stage_values_are_what_checkpoints_of_earlier_runs_hold() -> None:
    assert [str(stage) for stage in GerminationStage] == [
        "resolving",
        "resolved",
        "loading",
        "blending",
        "evaluating",
    ]
    assert [s for s in GerminationStage if s.grafted] == [
        GerminationStage.BLENDING,
        GerminationStage.EVALUATING,
    ]


def _record(stage: GerminationStage) -> Germination:
    return Germination(
        DECISION,
        seed_idx=1,
        stage=stage,
        received_step=13,
        due_step=22,
        kernel=KERNEL,
        grafted_step=22 if stage.grafted else None,
        active_step=30 if stage is GerminationStage.EVALUATING else None,
        losses_before=[torch.tensor(1.5), 1.25],
        losses_after=[torch.tensor(0.75)],
        metrics_before={"loss": 1.0},
        step_times_before=[0.01],
        step_times_after=[0.02],
    )


@pytest.mark.parametrize("stage", [GerminationStage.BLENDING, GerminationStage.EVALUATING])
def test_a_grafted_germination_round_trips_through_json(stage: GerminationStage) -> None:
    saved = json.loads(json.dumps(_record(stage).state_dict()))

    restored = Germination.from_state(saved)

    assert saved["stage"] == str(stage) and saved["losses_before"] == [1.5, 1.25]
    assert restored.stage is stage and restored.kernel == KERNEL
    assert restored.state_dict() == saved


@pytest.mark.parametrize(
    "stage", [GerminationStage.RESOLVING, GerminationStage.RESOLVED, GerminationStage.LOADING]
)
def test_a_germination_saved_before_its_graft_starts_again_from_the_kernel_lookup(
    stage: GerminationStage,
) -> None:
    restored = Germination.from_state(json.loads(json.dumps(_record(stage).state_dict())))

    assert restored.stage is GerminationStage.RESOLVING and restored.stage.waiting_for_kernel
    assert restored.kernel is None and restored.resolving is None  # its owner looks it up again
    assert (restored.decision, restored.seed_idx, restored.due_step) == (DECISION, 1, 22)


def test_losses_are_read_in_one_transfer_and_keep_their_order() -> None:
    assert materialize([1.0, torch.tensor(2.0), 3, torch.tensor([4.0])]) == [1.0, 2.0, 3.0, 4.0]
    assert materialize([]) == []


def test_recent_steps_keep_the_last_window_of_losses() -> None:
    recent = RecentSteps(2)

    first = recent.record(1.0)
    later = [recent.record(loss) for loss in (2.0, 3.0)]
    recent.restore_losses([7.0, 8.0, 9.0])

    assert first is None and all(interval is not None and interval >= 0 for interval in later)
    assert list(recent.step_times) == [later[0], later[1]]
    assert list(recent.losses) == [8.0, 9.0]
