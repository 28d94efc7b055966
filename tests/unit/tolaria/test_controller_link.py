"""Controller links: the inline controller decides at the steps of its schedule, reports its own
refusals, and saves and restores its state (what a checkpoint needs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import esper
from esper.contracts import AdaptationAction, HealthSignal, LayerKind, SeedHealth, SeedState
from esper.core import MorphableModel
from esper.oona import InProcessBus
from esper.tamiyo import BottleneckPolicy
from esper.tamiyo.safety import GATE_PARAMETER_BUDGET, SafetyConfig, SafetyGates
from esper.tolaria.config import GrowthSection
from esper.tolaria.controller_link import (
    ControllerLink,
    DecisionSchedule,
    InlineController,
    LinkResult,
)


def _model() -> MorphableModel:
    torch.manual_seed(0)
    host = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    return esper.wrap(host, seeds_per_layer=2)


def _signals(model: MorphableModel, step: int, grads: dict[str, float]) -> list[HealthSignal]:
    return [
        HealthSignal(
            layer_name=name,
            layer_kind=LayerKind.LINEAR,
            step=step,
            timestamp=0.0,
            samples=1,
            output_mean=0.0,
            output_std=1.0,
            dead_fraction=0.0,
            grad_norm=grads.get(name, 1.0),
            seeds=tuple(
                SeedHealth(
                    seed_idx=i,
                    state=SeedState.DORMANT,
                    alpha=0.0,
                    contribution_rms=0.0,
                    nonfinite_output=False,
                    error_count=0,
                )
                for i in range(2)
            ),
        )
        for name in model.layer_names
    ]


def _inline(model: MorphableModel, *, budget: float = 10.0) -> InlineController:
    settings = GrowthSection.model_validate(
        {"start_step": 10, "decide_every": 10, "stop_fraction": 0.5}
    )
    return InlineController.for_run(
        settings,
        model=model,
        policy=BottleneckPolicy(),
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=budget)),
        run_id="run-1",
        bus=InProcessBus(),
        total_steps=100,
    )


def test_the_schedule_is_every_decide_every_steps_inside_the_growth_window() -> None:
    settings = GrowthSection.model_validate(
        {"start_step": 10, "decide_every": 10, "stop_fraction": 0.5}
    )
    schedule = DecisionSchedule.for_run(settings, total_steps=100)

    assert [s for s in range(0, 101) if schedule.is_decision_step(s)] == [10, 20, 30, 40, 50]


def test_the_inline_controller_decides_only_at_its_steps() -> None:
    model = _model()
    link: ControllerLink = _inline(model)  # it is a ControllerLink
    link.observe_telemetry(5, _signals(model, 5, {"2": math.exp(6.0)}))
    link.observe_progress(5, 2.0)

    early = link.poll(5)
    off_schedule = link.poll(11)
    link.observe_telemetry(10, _signals(model, 10, {"2": math.exp(6.0)}))
    due = link.poll(10)

    assert early == off_schedule == LinkResult()
    assert due.refusals == () and len(due.decisions) == 1
    (decision,) = due.decisions
    assert (decision.action, decision.layer_name, decision.step) == (
        AdaptationAction.GERMINATE,
        "2",
        10,
    )
    assert link.state_dict()["counters"]["decisions"] == 1


def test_a_refusal_by_the_controllers_own_gates_comes_back_to_be_logged() -> None:
    model = _model()
    base = sum(p.numel() for p in model.base_parameters())  # 484
    link = _inline(model, budget=900 / base)  # a kernel on "2" (1072 parameters) is over it
    link.observe_telemetry(10, _signals(model, 10, {"2": math.exp(6.0)}))

    result = link.poll(10)

    assert result.decisions == ()
    assert [(r.gate, r.layer_name) for r in result.refusals] == [(GATE_PARAMETER_BUDGET, "2")]
    assert result.refusals[0].decision_id is None  # never became a decision


def test_the_inline_controllers_state_restores_into_a_fresh_one() -> None:
    model = _model()
    first = _inline(model)
    first.observe_telemetry(10, _signals(model, 10, {"2": math.exp(6.0)}))
    (decision,) = first.poll(10).decisions
    state = first.state_dict()

    restored = _inline(model)
    restored.load_state_dict(state)

    assert restored.state_dict() == state
    assert decision.decision_id in state["committed"]  # it remembers what it decided
    restored.close()  # nothing runs in the background: closing is harmless
    assert restored.poll(11) == LinkResult()


@pytest.mark.parametrize("field", ["decisions", "refusals"])
def test_a_link_result_is_empty_by_default_and_frozen(field: str) -> None:
    result = LinkResult()

    assert getattr(result, field) == ()
    with pytest.raises(AttributeError):
        setattr(result, field, ())
