"""Issue 9 item 12: the training side applies the run's limits to every decision it receives.

First the pure verdict (decision + limits + model state in, refusal out), then forged decisions
delivered through the bus a real :class:`GrowthExecutor` listens to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    BlueprintSpec,
    DecisionRefusal,
    KernelTarget,
    LayerKind,
    SeedState,
    Topic,
)
from esper.oona import InProcessBus
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tamiyo.safety import SafetyConfig, SafetyGates
from esper.tolaria.decision_limits import (
    DecisionLimits,
    GrowthState,
    KernelCost,
    check_decision,
    kernel_cost,
)
from esper.tolaria.growth_executor import GrowthExecutor
from esper.urza import ArtifactLibrary, UrzaArtifactSource, open_library
from factories import germinate, linear_target

TARGET = linear_target(16, 16)
MLP = BlueprintSpec(family="residual_mlp", params={"hidden": 32})  # 16*32+32+32*16+16 = 1072
LIMITS = DecisionLimits(max_parameter_fraction=1.0, max_adaptations=2, window_steps=100)


def _decision(step: int = 50, **update: object) -> AdaptationDecision:
    decision = germinate("fc", run_id="r", step=step, blueprint=MLP, policy="p")
    return decision.model_copy(update=update)  # unvalidated: forged decisions too


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
    return GrowthState(**values)


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


# -- forged decisions through the bus a real executor listens to ---------------------------------


@pytest.fixture
def library(tmp_path: Path) -> Iterator[ArtifactLibrary]:
    lib = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    yield lib
    lib.close()


def _germinate(layer: str = "0", *, step: int = 0, seed_idx: int = 0) -> AdaptationDecision:
    return germinate(layer, step=step, seed_idx=seed_idx)  # the catalog's mlp_h32


def _drain(bus: InProcessBus, topic: str) -> list[DecisionRefusal]:
    subscription = bus.subscribe(topic, "test", "t")
    deliveries = subscription.poll(1000)
    subscription.ack(*deliveries)
    return [d.decode(DecisionRefusal) for d in deliveries]


def _listening_executor(
    host: nn.Module, library: ArtifactLibrary, bus: InProcessBus, safety: SafetyConfig
) -> GrowthExecutor:
    model = esper.wrap(host, seeds_per_layer=2, kernel_source=UrzaArtifactSource(library))
    return GrowthExecutor(
        model, run_id="run-1", library=library, bus=bus, safety=SafetyGates(safety)
    )  # listens on control.kasmina.commands; no compile worker: nothing can be built


def _refusals_of(executor: GrowthExecutor, count: int) -> list[DecisionRefusal]:
    """Step the executor until ``count`` decisions came off the bus and were refused."""
    refusals: list[DecisionRefusal] = []
    deadline = time.monotonic() + 10
    step = 0
    while len(refusals) < count and time.monotonic() < deadline:
        step += 1
        refusals += executor.on_step(step).refusals
        time.sleep(0.005)
    return refusals


def test_forged_decisions_from_the_bus_are_refused_by_the_runs_limits_before_any_compile(
    library: ArtifactLibrary,
) -> None:
    bus = InProcessBus()
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))  # 289 parameters
    executor = _listening_executor(host, library, bus, SafetyConfig())  # budget 0.5 x 289
    huge = BlueprintSpec(family="residual_mlp", params={"hidden": 35_757})  # 1_179_997 params
    depthwise = next(o.spec for o in BLUEPRINT_CATALOG if o.name == "conv_depthwise")
    forged = {
        "parameter_budget": _germinate("0").model_copy(update={"blueprint": huge}),
        "unknown_layer": _germinate("fc9"),
        "unknown_seed": _germinate("0", seed_idx=7),
        "unknown_blueprint": _germinate("0").model_copy(
            update={"blueprint": BlueprintSpec(family="mystery_family")}
        ),
        "invalid_blueprint": _germinate("0").model_copy(
            update={"blueprint": BlueprintSpec(family="residual_mlp", params={"hidden": 0})}
        ),
        "invalid_blueprint ": _germinate("2").model_copy(update={"blueprint": depthwise}),
        "unknown_blueprint ": _germinate("2").model_copy(update={"blueprint": None}),
        "unknown_seed ": _germinate("2", seed_idx=5).model_copy(
            update={"action": AdaptationAction.CULL, "blueprint": None}
        ),
    }
    for decision in forged.values():
        bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)

    refusals = _refusals_of(executor, len(forged))
    executor.close()

    by_decision = {r.decision_id: r for r in refusals}
    assert {gate.strip(): by_decision[d.decision_id].gate for gate, d in forged.items()} == {
        gate.strip(): gate.strip() for gate in forged
    }
    assert len(refusals) == len(forged)
    budget = by_decision[forged["parameter_budget"].decision_id]
    assert "1179997" in budget.reason and "0.5 x 289" in budget.reason
    assert "0..1" in by_decision[forged["unknown_seed"].decision_id].reason
    assert "mystery_family" in by_decision[forged["unknown_blueprint"].decision_id].reason
    assert _drain(bus, Topic.CONTROL_TAMIYO_REFUSALS) == refusals  # published
    assert library.list_jobs() == []  # costed from the spec on the meta device: nothing compiled
    assert sum(p.numel() for p in executor.model.kernel_parameters()) == 0
    assert all(
        s is SeedState.DORMANT for n in ("0", "2") for s in executor.model.layer(n).seed_states
    )
    commands = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "tolaria-executor", "other")
    assert commands.pending_count() == 0  # every forged delivery acknowledged


def test_germinations_in_flight_count_against_the_parameter_budget(
    library: ArtifactLibrary,
) -> None:
    bus = InProcessBus()
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # 212 parameters
    executor = _listening_executor(host, library, bus, SafetyConfig(max_parameter_fraction=5.0))
    first, second = _germinate("0"), _germinate("2")  # mlp_h32: 816 and 676 parameters
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, first)
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, second)

    refusals = _refusals_of(executor, 1)
    executor.close()

    assert [(r.decision_id, r.gate) for r in refusals] == [(second.decision_id, "parameter_budget")]
    assert "816 in flight + 676 new" in refusals[0].reason  # 1492 > 5 x 212, nothing grafted yet
    assert executor.in_flight() == {first.decision_id: "resolving"}


def test_the_adaptation_limit_holds_across_a_resume(library: ArtifactLibrary) -> None:
    bus = InProcessBus()
    limits = SafetyConfig(max_adaptations=1, window_steps=1000, max_parameter_fraction=10.0)
    torch.manual_seed(0)
    executor = _listening_executor(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), library, bus, limits
    )
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, _germinate("0"))
    deadline = time.monotonic() + 10
    while not executor.counters["received"] and time.monotonic() < deadline:
        executor.on_step(1)
        time.sleep(0.005)
    state = json.loads(json.dumps(executor.state_dict()))
    executor.close()
    resumed = _listening_executor(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
        library,
        InProcessBus(),
        limits,
    )
    resumed.load_state_dict(state)
    resumed.submit(_germinate("2", step=500))

    outcome = resumed.on_step(501)
    resumed.close()

    assert [r.gate for r in outcome.refusals] == ["rate_limit"]
    assert "1 germinations were accepted in the last 1000 steps" in outcome.refusals[0].reason


def test_the_byte_budget_counts_a_kernel_in_its_layers_dtype(library: ArtifactLibrary) -> None:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(8, 16).double(), nn.ReLU(), nn.Linear(16, 4))
    # parameters 144 (float64) + 68 (float32) = 212, 1424 bytes; mlp_h32 on "0": 816 float64
    # parameters = 6528 bytes. A budget of 4: 848 parameters fit, 5696 bytes do not.
    executor = _listening_executor(
        host, library, InProcessBus(), SafetyConfig(max_parameter_fraction=4.0)
    )
    executor.submit(_germinate("0"))

    outcome = executor.on_step(1)
    executor.close()

    assert [r.gate for r in outcome.refusals] == ["byte_budget"]
    assert "6528 new" in outcome.refusals[0].reason and "5696 bytes" in outcome.refusals[0].reason
