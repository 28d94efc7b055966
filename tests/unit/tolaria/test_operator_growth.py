"""Widen/deepen decisions on the training side: the contract carries them, the run's limits
budget them, the executor applies them through the SDK, judges them like a graft (keep ->
plain wider/deeper modules, cull -> the host exactly), and a failing operator leaves the host
exact and training going."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import esper
from esper.contracts import AdaptationAction, AdaptationDecision, GrowthOperator
from esper.core import MorphableModel
from esper.operators.operator_plan import plan_operator
from esper.tamiyo.safety import SafetyConfig, SafetyGates
from esper.tolaria.decision_limits import (
    GATE_INVALID_OPERATOR,
    GATE_OPERATOR_DISABLED,
    GATE_PARAMETER_BUDGET,
)
from esper.tolaria.growth_executor import GrowthExecutor
from esper.tolaria.operator_config import OperatorsSection
from esper.tolaria.operator_growth import GATE_OPERATOR_FAILED

ALL_OPERATORS = OperatorsSection(widen=[0.5, 1.0], deepen=["fresh", "copy"], blend_steps=2)


def _host() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _decision(operator: GrowthOperator, layer: str = "0", **fields: object) -> AdaptationDecision:
    return AdaptationDecision(
        run_id="r", step=0, action=AdaptationAction.GERMINATE, layer_name=layer, seed_idx=0,
        policy="test", confidence=1.0, uncertainty=0.0, operator=operator, **fields,
    )  # fmt: skip


def _setup(
    options: OperatorsSection = ALL_OPERATORS, safety: SafetyConfig | None = None
) -> tuple[MorphableModel, torch.optim.Optimizer, GrowthExecutor]:
    model = esper.wrap(_host(), seeds_per_layer=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    executor = GrowthExecutor(
        model, run_id="r", listen=False, evaluation_steps=3,
        safety=SafetyGates(safety or SafetyConfig(max_parameter_fraction=1.0)),
    )  # fmt: skip
    executor.operators.allow(options, executor.decision_limits)
    return model, optimizer, executor


def _train(
    model: MorphableModel,
    optimizer: torch.optim.Optimizer,
    executor: GrowthExecutor,
    steps: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[object]:
    torch.manual_seed(1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    outcomes = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(x)
        loss = loss_of(out) if loss_of else nn.functional.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        outcomes.append(executor.on_step(model.step(), float(loss.detach())))
    return outcomes


def test_old_decisions_parse_as_residual_and_operator_fields_are_checked() -> None:
    old = {
        "run_id": "r", "step": 3, "action": "cull", "layer_name": "0", "seed_idx": 0,
        "policy": "p", "confidence": 0.5, "uncertainty": 0.0,
    }  # fmt: skip
    assert AdaptationDecision.model_validate(old).operator is GrowthOperator.RESIDUAL
    widen = _decision(GrowthOperator.WIDEN, size=0.5, init="gradmax")
    assert AdaptationDecision.model_validate_json(widen.model_dump_json()) == widen
    with pytest.raises(ValidationError, match="needs a size"):
        _decision(GrowthOperator.WIDEN)
    with pytest.raises(ValidationError, match="not one of"):
        _decision(GrowthOperator.DEEPEN, init="random")
    with pytest.raises(ValidationError, match="not residual"):
        _decision(GrowthOperator.RESIDUAL, size=0.5)


def test_widen_cost_counts_the_new_rows_columns_and_flops() -> None:
    model = esper.wrap(_host(), seeds_per_layer=1)
    plan = plan_operator(model.model, _decision(GrowthOperator.WIDEN, size=0.5))
    assert plan.units == 4  # half of 8 units
    assert plan.parameters == 4 * (6 + 1) + 4 * 8  # fan-in rows + biases, consumer columns
    assert plan.flops == 2 * plan.parameters
    deepen = plan_operator(model.model, _decision(GrowthOperator.DEEPEN, layer="2"))
    assert deepen.parameters == 2 * (8 * 8 + 8)


def test_operator_disabled_by_default_is_refused_naming_the_gate() -> None:
    model, optimizer, executor = _setup(OperatorsSection())
    executor.submit(_decision(GrowthOperator.WIDEN, size=0.5))
    (outcome,) = _train(model, optimizer, executor, 1)
    assert [r.gate for r in outcome.refusals] == [GATE_OPERATOR_DISABLED]  # type: ignore[attr-defined]


def test_widen_over_the_parameter_budget_is_refused() -> None:
    model, optimizer, executor = _setup(safety=SafetyConfig(max_parameter_fraction=0.05))
    executor.submit(_decision(GrowthOperator.WIDEN, size=1.0))
    (outcome,) = _train(model, optimizer, executor, 1)
    assert [r.gate for r in outcome.refusals] == [GATE_PARAMETER_BUDGET]  # type: ignore[attr-defined]
    assert model.model[0].out_features == 8 if isinstance(model.model[0], nn.Linear) else True


def test_an_operator_that_cannot_apply_is_refused_and_the_host_is_unchanged() -> None:
    model, optimizer, executor = _setup()
    before = copy.deepcopy(model.state_dict())
    executor.submit(_decision(GrowthOperator.WIDEN, layer="4", size=0.5))  # the output layer
    (outcome,) = _train(model, optimizer, executor, 1)
    assert [r.gate for r in outcome.refusals] == [GATE_INVALID_OPERATOR]  # type: ignore[attr-defined]
    assert "cannot widen" in outcome.refusals[0].reason  # type: ignore[attr-defined]
    assert before.keys() == model.state_dict().keys()


def test_kept_widen_becomes_a_plain_wider_model() -> None:
    model, optimizer, executor = _setup()
    executor.submit(_decision(GrowthOperator.WIDEN, size=0.5))
    outcomes = _train(model, optimizer, executor, 12)
    assert executor.counters["widened"] == 1 and executor.counters["fossilized"] == 1
    assert sum(len(o.rewards) for o in outcomes) == 1  # type: ignore[attr-defined]
    plain = esper.unwrap(model)
    assert isinstance(plain[0], nn.Linear) and plain[0].out_features == 12
    assert isinstance(plain[2], nn.Linear) and plain[2].in_features == 12
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in model.parameters())  # the SDK moved the groups
    _train(model, optimizer, executor, 2)  # training goes on with the grown optimizer


def test_culled_widen_restores_the_host_exactly() -> None:
    model, optimizer, executor = _setup()
    executor.submit(_decision(GrowthOperator.WIDEN, size=0.5))
    steps = iter(range(1000))
    # the loss explodes after the graft: the loss-spike gate culls it
    outcomes = _train(model, optimizer, executor, 12, lambda out: out.sum() * 0 + next(steps) ** 2)
    assert executor.counters["culled"] == 1
    assert any(r.gate == "loss_spike" for o in outcomes for r in o.refusals)  # type: ignore[attr-defined]
    plain = esper.unwrap(model)
    assert isinstance(plain[0], nn.Linear) and plain[0].out_features == 8


def test_fresh_deepen_is_kept_as_an_ordinary_block() -> None:
    model, optimizer, executor = _setup()
    executor.submit(_decision(GrowthOperator.DEEPEN, layer="2", init="fresh"))
    _train(model, optimizer, executor, 12)
    assert executor.counters["deepened"] == 1 and executor.counters["fossilized"] == 1
    plain = esper.unwrap(model)
    assert sum(isinstance(m, nn.Linear) for m in plain.modules()) == 5


def test_a_failing_operator_leaves_the_host_exact_and_training_going(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, optimizer, executor = _setup()
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # no updates: the output must stay exactly the host's
    x = torch.randn(4, 6)
    expected = model(x).detach()

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("surgery failed")

    monkeypatch.setattr(model.widenings, "widen", broken)
    executor.submit(_decision(GrowthOperator.WIDEN, size=0.5))
    outcomes = _train(model, optimizer, executor, 3)
    assert [r.gate for r in outcomes[0].refusals] == [GATE_OPERATOR_FAILED]  # type: ignore[attr-defined]
    assert "surgery failed" in outcomes[0].refusals[0].reason  # type: ignore[attr-defined]
    assert torch.equal(model(x), expected)
    assert executor.operators.live == {}


def test_a_live_widen_survives_a_checkpoint_and_is_judged_after_resume() -> None:
    model, optimizer, executor = _setup()
    executor.submit(_decision(GrowthOperator.WIDEN, size=0.5))
    _train(model, optimizer, executor, 4)  # widened, blended in, evaluating
    assert len(executor.operators.live) == 1
    saved_model, saved_executor = model.state_dict(), executor.state_dict()
    resumed, resumed_optimizer, resumed_executor = _setup()
    resumed.load_state_dict(saved_model)
    resumed_executor.load_state_dict(saved_executor)
    assert resumed_executor.operators.live.keys() == executor.operators.live.keys()
    _train(resumed, resumed_optimizer, resumed_executor, 8)
    assert resumed_executor.operators.live == {}
    assert resumed_executor.counters["fossilized"] == 1
    plain = esper.unwrap(resumed)
    assert isinstance(plain[0], nn.Linear) and plain[0].out_features == 12
