"""Training-side decision limits as a pure function: decision + limits + model state -> verdict."""

from __future__ import annotations

import pytest

from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    BlueprintSpec,
    KernelTarget,
    LayerKind,
)
from esper.tamiyo.safety import SafetyConfig
from esper.tolaria.decision_limits import (
    DecisionLimits,
    GrowthState,
    KernelCost,
    check_decision,
    kernel_cost,
)

TARGET = KernelTarget(
    layer_kind=LayerKind.LINEAR, in_features=16, out_features=16, channel_dim=-1, spatial_dims=0
)
MLP = BlueprintSpec(family="residual_mlp", params={"hidden": 32})  # 16*32+32+32*16+16 = 1072
LIMITS = DecisionLimits(max_parameter_fraction=1.0, max_adaptations=2, window_steps=100)


def _decision(step: int = 50, **update: object) -> AdaptationDecision:
    decision = AdaptationDecision(
        run_id="r",
        step=step,
        action=AdaptationAction.GERMINATE,
        layer_name="fc",
        seed_idx=0,
        blueprint=MLP,
        policy="p",
        confidence=1.0,
        uncertainty=0.0,
    )
    return decision.model_copy(update=update)


def _state(**update: object) -> GrowthState:
    values: dict[str, object] = {
        "step": 60,
        "layers": {"fc": (TARGET, 2)},
        "base_parameters": 2000,
        "base_bytes": 8000,
        "grafted": KernelCost(),
        "in_flight": KernelCost(),
    }
    values.update(update)
    return GrowthState(**values)  # type: ignore[arg-type]


def test_a_kernel_is_costed_on_the_meta_device_without_allocating() -> None:
    wide = KernelTarget(
        layer_kind=LayerKind.LINEAR,
        in_features=16_384,
        out_features=16_384,
        channel_dim=-1,
        spatial_dims=0,
    )
    cost = kernel_cost(BlueprintSpec(family="residual_mlp", params={"hidden": 65_536}), wide)

    assert cost.parameters == 2 * 16_384 * 65_536 + 65_536 + 16_384  # 2.1e9: 8.6 GB if real
    assert cost.bytes == 4 * cost.parameters
    assert kernel_cost(MLP, TARGET) == KernelCost(1072, 4288)


def test_a_decision_within_the_limits_passes() -> None:
    assert check_decision(_decision(), LIMITS, _state()) is None
    cull = _decision(action=AdaptationAction.CULL, blueprint=None)
    assert check_decision(cull, LIMITS, _state(grafted=KernelCost(10**9, 10**9))) is None


def test_grafted_and_in_flight_kernels_share_the_budgets() -> None:
    near = _state(grafted=KernelCost(500, 2000), in_flight=KernelCost(429, 1716))

    assert check_decision(_decision(), LIMITS, near) is not None  # 500 + 429 + 1072 > 2000
    assert check_decision(_decision(), LIMITS, _state(grafted=KernelCost(928, 0))) is None
    verdict = check_decision(_decision(), LIMITS, _state(base_bytes=4000))
    assert verdict is not None and verdict.gate == "byte_budget"  # 4288 > 1.0 x 4000
    explicit = DecisionLimits(1.0, 2, 100, max_kernel_bytes=100_000)
    assert check_decision(_decision(), explicit, _state(base_bytes=4000)) is None


@pytest.mark.parametrize(
    ("decision_step", "received_at", "germinations", "refused"),
    [
        (50, 60, (0,), False),  # one in the window (-50, 50]
        (50, 60, (0, 10), True),  # two: the limit
        (250, 260, (0, 10), False),  # both out of the window
        (0, 60, (40, 55), True),  # a decision claiming an old step cannot escape the window
        (10_000, 60, (0, 10), True),  # nor one claiming a future step: it counts at step 60
    ],
)
def test_the_rate_limit_counts_germinations_at_trusted_steps(
    decision_step: int, received_at: int, germinations: tuple[int, ...], refused: bool
) -> None:
    state = _state(step=received_at, germinations=germinations)

    verdict = check_decision(_decision(decision_step), LIMITS, state)

    assert (verdict is not None and verdict.gate == "rate_limit") is refused


def test_the_families_a_run_allows_can_be_narrowed() -> None:
    only_lowrank = DecisionLimits(1.0, 2, 100, families=frozenset({"lowrank_adapter"}))

    verdict = check_decision(_decision(), only_lowrank, _state())

    assert verdict is not None and verdict.gate == "unknown_blueprint"
    assert "residual_mlp" in verdict.reason and "lowrank_adapter" in verdict.reason


def test_limits_come_from_the_runs_safety_config() -> None:
    limits = DecisionLimits.from_safety(
        SafetyConfig(max_parameter_fraction=0.3, max_adaptations=7, window_steps=40)
    )

    assert (limits.max_parameter_fraction, limits.max_adaptations, limits.window_steps) == (
        0.3,
        7,
        40,
    )
