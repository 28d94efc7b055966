"""Tamiyo controller: one cycle publishes decisions/refusals on the in-process bus; scheduling,
alerts, topology without a model, rollbacks from rewards, the autonomous thread, state."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

import esper
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    DecisionRefusal,
    HealthSignal,
    HealthSignalBatch,
    LayerKind,
    RewardReport,
    SeedHealth,
    SeedState,
    Topic,
    TrainingProgress,
)
from esper.core import MorphableModel
from esper.errors import ConfigurationError
from esper.oona import InProcessBus, open_bus
from esper.tamiyo.baselines import BottleneckPolicy, RandomPolicy
from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tamiyo.policy_loading import load_policy
from esper.tamiyo.safety import GATE_CONFIDENCE, GATE_PARAMETER_BUDGET, SafetyConfig, SafetyGates
from esper.tamiyo.topology import model_topology

LAYERS = ("0", "2", "4")
MLP_H32 = next(option for option in BLUEPRINT_CATALOG if option.name == "mlp_h32")


def _model() -> MorphableModel:
    torch.manual_seed(0)
    host = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    return esper.wrap(host, seeds_per_layer=2)


def _signals(
    step: int, grads: dict[str, float], states: dict[str, tuple[SeedState, ...]] | None = None
) -> list[HealthSignal]:
    states = states or {}
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
                    state=s,
                    alpha=0.0,
                    contribution_rms=0.0,
                    nonfinite_output=False,
                    error_count=0,
                )
                for i, s in enumerate(states.get(name, (SeedState.DORMANT, SeedState.DORMANT)))
            ),
        )
        for name in LAYERS
    ]


def _drain(subscription, contract):  # type: ignore[no-untyped-def]
    deliveries = subscription.poll(100)
    subscription.ack(*deliveries)
    return [delivery.decode(contract) for delivery in deliveries]


def test_decide_publishes_the_bottleneck_decision_on_the_commands_topic() -> None:
    bus = open_bus("memory://")
    commands = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "test", "t")
    model = _model()
    controller = TamiyoController(
        bus,
        BottleneckPolicy(),
        run_id="run-1",
        model=model,
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=10.0)),
    )
    controller.observe_telemetry(_signals(10, {"2": math.exp(6.0)}))

    result = controller.decide(10)

    expected_pressure = BottleneckPolicy().pressure(result.graph)
    assert int(torch.argmax(expected_pressure)) == LAYERS.index("2")
    assert result.refusal is None and result.decision is not None
    decision = result.decision
    assert (decision.layer_name, decision.seed_idx, decision.step) == ("2", 0, 10)
    assert decision.action is AdaptationAction.GERMINATE and decision.blueprint == MLP_H32.spec
    assert decision.policy == "bottleneck" and decision.run_id == "run-1"
    kernel_params = sum(
        p.numel()
        for p in esper.blueprints.build_kernel(MLP_H32.spec, model.layer("2").target()).parameters()
    )
    assert decision.reason == f"mlp_h32: +{kernel_params} parameters"  # 16*32+32+32*16+16 = 1072
    assert _drain(commands, AdaptationDecision) == [decision]
    assert controller.counters["decisions"] == 1 and controller.adaptations == 1


def test_the_gates_mask_a_cooling_layer_and_the_rate_limit_makes_the_policy_wait() -> None:
    bus = open_bus("memory://")
    commands = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "test", "t")
    safety = SafetyGates(
        SafetyConfig(
            cooldown_steps=100, max_adaptations=2, window_steps=1000, max_parameter_fraction=10.0
        )
    )
    controller = TamiyoController(
        bus, BottleneckPolicy(), run_id="r", model=_model(), safety=safety
    )
    controller.observe_telemetry(_signals(10, {"2": math.exp(6.0), "4": math.exp(5.0)}))

    first = controller.decide(10)
    second = controller.decide(20)
    third = controller.decide(30)

    assert first.decision is not None and first.decision.layer_name == "2"
    assert second.graph.germinate_mask[LAYERS.index("2")].any().item() is False  # cooling down
    assert second.decision is not None and second.decision.layer_name == "4"  # next pressure
    assert not third.graph.germinate_mask.any() and third.output.action.is_wait
    assert third.decision is None and third.refusal is None
    assert [d.layer_name for d in _drain(commands, AdaptationDecision)] == ["2", "4"]
    assert controller.counters["waits"] == 1


def test_a_refusal_names_its_gate_on_the_refusals_topic_and_masks_the_layer() -> None:
    bus = open_bus("memory://")
    refusals = bus.subscribe(Topic.CONTROL_TAMIYO_REFUSALS, "test", "t")
    commands = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "test", "t")
    model = _model()
    base = sum(p.numel() for p in model.base_parameters())  # 144 + 272 + 68 = 484
    # mlp_h32 on "2" adds 1072 parameters; on "0" (8 -> 16) 8*32+32+32*16+16 = 816
    safety = SafetyGates(SafetyConfig(max_parameter_fraction=900 / base, refusal_backoff_steps=50))
    controller = TamiyoController(bus, BottleneckPolicy(), run_id="r", model=model, safety=safety)
    controller.observe_telemetry(_signals(10, {"2": math.exp(6.0), "0": math.exp(5.0)}))

    refused = controller.decide(10)
    accepted = controller.decide(11)

    assert refused.refusal is not None and refused.decision is None
    assert (refused.refusal.gate, refused.refusal.layer_name) == (GATE_PARAMETER_BUDGET, "2")
    assert "1072" in refused.refusal.reason
    assert _drain(refusals, DecisionRefusal) == [refused.refusal]
    assert accepted.decision is not None and accepted.decision.layer_name == "0"  # "2" backs off
    assert _drain(commands, AdaptationDecision) == [accepted.decision]


def test_confidence_gate_refuses_a_random_policy() -> None:
    bus = open_bus("memory://")
    refusals = bus.subscribe(Topic.CONTROL_TAMIYO_REFUSALS, "test", "t")
    safety = SafetyGates(SafetyConfig(min_confidence=0.5, max_parameter_fraction=10.0))
    controller = TamiyoController(
        bus, RandomPolicy(seed=3), run_id="r", model=_model(), safety=safety
    )
    controller.observe_telemetry(_signals(10, {}))

    result = controller.decide(10)

    assert result.refusal is not None and result.refusal.gate == GATE_CONFIDENCE
    assert result.output.confidence == pytest.approx(1 / int(result.graph.germinate_mask.sum()))
    assert _drain(refusals, DecisionRefusal)[0].policy == "random"


def _publish_run(
    bus: InProcessBus, model: MorphableModel, run_id: str, step: int, grads: dict[str, float]
) -> None:
    bus.publish(Topic.TELEMETRY_TOPOLOGY, model_topology(model, run_id=run_id))
    bus.publish(
        Topic.TELEMETRY_HEALTH,
        HealthSignalBatch(run_id=run_id, step=step, signals=tuple(_signals(step, grads))),
    )


def test_without_a_model_the_controller_waits_for_topology_then_decides_once_per_new_telemetry() -> (
    None
):
    bus = InProcessBus()
    commands = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "test", "t")
    controller = TamiyoController(
        bus,
        BottleneckPolicy(),
        run_id="r",
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=10.0, cooldown_steps=5)),
        decide_every_steps=10,
    )

    assert controller.run_cycle() is None and not controller.ready
    model = _model()
    _publish_run(bus, model, "r", 10, {"4": math.exp(6.0)})
    bus.publish(Topic.TELEMETRY_TOPOLOGY, model_topology(_model(), run_id="other-run"))
    bus.publish(
        Topic.TELEMETRY_PROGRESS,
        TrainingProgress(
            run_id="r", step=10, total_steps=100, loss=2.0, base_parameters=484, kernel_parameters=0
        ),
    )

    first = controller.run_cycle()
    again = controller.run_cycle()  # no new telemetry
    bus.publish(
        Topic.TELEMETRY_HEALTH,
        HealthSignalBatch(run_id="r", step=15, signals=tuple(_signals(15, {"4": math.exp(6.0)}))),
    )
    early = controller.run_cycle()  # 5 steps later: not due
    bus.publish(
        Topic.TELEMETRY_HEALTH,
        HealthSignalBatch(
            run_id="r",
            step=20,
            signals=tuple(
                _signals(20, {"4": math.exp(6.0)}, {"4": (SeedState.BLENDING, SeedState.DORMANT)})
            ),
        ),
    )
    due = controller.run_cycle()

    assert first is not None and first.decision is not None and first.decision.layer_name == "4"
    assert first.graph.global_features[0].item() == pytest.approx(0.1)  # progress 10 / 100
    assert first.graph.edge_index.tolist() == [[0, 1], [1, 2]]  # traced on the training side
    assert again is None and early is None
    assert due is not None and due.decision is not None
    assert (due.decision.layer_name, due.decision.seed_idx) == ("4", 1)  # seed 0 is in use
    assert [d.step for d in _drain(commands, AdaptationDecision)] == [10, 20]
    assert controller.counters["other_run"] == 1


def test_an_anomaly_alert_decides_ahead_of_schedule() -> None:
    bus = InProcessBus()
    controller = TamiyoController(
        bus,
        BottleneckPolicy(),
        run_id="r",
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=10.0)),
        decide_every_steps=1000,
    )
    model = _model()
    _publish_run(bus, model, "r", 1, {})
    assert controller.run_cycle() is not None  # the first telemetry is always due
    for step in range(2, 8):  # calm
        bus.publish(
            Topic.TELEMETRY_HEALTH,
            HealthSignalBatch(run_id="r", step=step, signals=tuple(_signals(step, {}))),
        )
        assert controller.run_cycle() is None
    bus.publish(
        Topic.TELEMETRY_HEALTH,
        HealthSignalBatch(run_id="r", step=8, signals=tuple(_signals(8, {"0": math.exp(4.0)}))),
    )

    result = controller.run_cycle()

    assert result is not None and result.step == 8
    assert controller.counters["alert_decisions"] == 1


def test_a_culled_reward_penalises_the_layer_and_releases_its_parameters() -> None:
    bus = InProcessBus()
    safety = SafetyGates(
        SafetyConfig(cooldown_steps=10, rollback_cooldown_factor=5.0, max_parameter_fraction=10.0)
    )
    controller = TamiyoController(
        bus, BottleneckPolicy(), run_id="r", model=_model(), safety=safety
    )
    controller.observe_telemetry(_signals(10, {"2": math.exp(6.0)}))
    decision = controller.decide(10).decision
    assert decision is not None
    assert controller.state_dict()["committed"][decision.decision_id][2] == 1072

    bus.publish(
        Topic.CONTROL_TAMIYO_REWARDS,
        RewardReport(
            run_id="r",
            decision_id=decision.decision_id,
            layer_name="2",
            step=60,
            components={"loss": -1.0},
            weights={"loss": 1.0},
            total=-1.0,
            outcome=AdaptationAction.CULL,
        ),
    )
    controller.poll_bus()

    assert safety.cooldown_until("2") == 110  # 60 + 10 * 5
    assert safety.rollbacks == 1 and controller.counters["rewards"] == 1
    assert controller.state_dict()["committed"] == {}


def _refusal(gate: str, decision_id: str | None) -> DecisionRefusal:
    return DecisionRefusal(
        run_id="r",
        decision_id=decision_id,
        step=10,
        layer_name="2",
        action=AdaptationAction.GERMINATE,
        gate=gate,
        reason="x",
        policy="bottleneck",
    )


def _controller_with_one_decision() -> tuple[TamiyoController, str]:
    controller = TamiyoController(
        None,
        BottleneckPolicy(),
        run_id="r",
        model=_model(),
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=10.0)),
    )
    controller.observe_telemetry(_signals(10, {"2": math.exp(6.0)}))
    decision = controller.decide(10).decision
    assert decision is not None
    return controller, decision.decision_id


@pytest.mark.parametrize(
    "gate",
    [
        "compile_failed",  # the training side could not get the kernel
        GATE_PARAMETER_BUDGET,  # the training side's own limits (a gate Tamiyo also has)
    ],
)
def test_an_executor_refusal_releases_the_committed_parameters(gate: str) -> None:
    controller, decision_id = _controller_with_one_decision()

    controller.observe(_refusal(gate, decision_id))

    assert controller.state_dict()["committed"] == {}
    assert controller.state_dict()["reserved"] == {}
    assert controller.counters["failed_on_training_side"] == 1


def test_a_refusal_naming_no_decision_releases_nothing() -> None:
    """Every training-side refusal names its decision; one without an id (a controller gate's
    refusal, whatever its gate) never releases a commitment by matching layer and step."""
    controller, decision_id = _controller_with_one_decision()
    committed = controller.state_dict()["committed"]

    controller.observe(_refusal("compile_failed", None))

    assert controller.state_dict()["committed"] == committed != {}
    assert decision_id in controller.state_dict()["reserved"]
    assert controller.counters["failed_on_training_side"] == 0


def test_autonomous_loop_publishes_decisions_from_its_thread() -> None:
    bus = InProcessBus()
    commands = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "test", "t")
    controller = TamiyoController(
        bus,
        BottleneckPolicy(),
        run_id="r",
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=10.0)),
        cycle_s=0.02,
    )
    controller.start()
    try:
        _publish_run(bus, _model(), "r", 10, {"0": math.exp(6.0)})
        received: list[AdaptationDecision] = []
        deadline = time.monotonic() + 10.0
        while not received and time.monotonic() < deadline:
            received += [d.decode(AdaptationDecision) for d in commands.poll(10, block_ms=50)]
    finally:
        controller.stop()

    assert [(d.layer_name, d.step) for d in received] == [("0", 10)]
    assert controller.counters["cycles"] >= 1 and controller.counters["cycle_errors"] == 0


def test_state_dict_round_trips_and_the_restored_controller_decides_the_same() -> None:
    def make() -> TamiyoController:
        return TamiyoController(
            None,
            RandomPolicy(seed=7),
            run_id="r",
            model=_model(),
            safety=SafetyGates(SafetyConfig(cooldown_steps=30, max_parameter_fraction=10.0)),
        )

    original = make()
    for step in (10, 20, 30):
        original.observe_telemetry(_signals(step, {"2": math.exp(step / 10)}))
        original.observe_progress(step, loss=3.0 - step / 100)
        original.decide(step)
    state = json.loads(json.dumps(original.state_dict()))
    restored = make()
    restored.load_state_dict(state)

    assert restored.state_dict() == original.state_dict()
    for step in (40, 50):
        for controller in (original, restored):
            controller.observe_telemetry(_signals(step, {"0": 2.0}))
        a, b = original.decide(step), restored.decide(step)
        assert torch.equal(a.graph.node_features, b.graph.node_features)
        assert torch.equal(a.graph.global_features, b.graph.global_features)
        assert a.output.action == b.output.action
        assert (a.refusal is None) == (b.refusal is None)


def test_deciding_without_the_model_structure_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="structure"):
        TamiyoController(None, BottleneckPolicy(), run_id="r").decide(0)


def test_a_saved_gnn_policy_loads_by_path_and_decides_within_the_mask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from esper.tamiyo.policy import GNNPolicy

    path = GNNPolicy().save(tmp_path / "policy.safetensors")
    policy = load_policy(str(path))
    bus = open_bus("memory://")
    safety = SafetyGates(SafetyConfig(max_parameter_fraction=10.0, cooldown_steps=1000))
    controller = TamiyoController(bus, policy, run_id="r", model=_model(), safety=safety)
    controller.observe_telemetry(_signals(10, {"2": math.exp(3.0)}))

    results = [controller.decide(step) for step in (10, 20, 30, 40)]

    assert policy.name == "gnn"
    for result in results:
        assert bool(result.graph.action_mask()[result.output.action.index()])
        assert result.refusal is None
    decided = [r.decision.layer_name for r in results if r.decision is not None]
    assert len(decided) == len(set(decided))  # the cooldown masks a layer once it grew


def test_decided_seeds_stay_reserved_until_the_training_side_uses_them() -> None:
    model = _model()
    safety = SafetyGates(
        SafetyConfig(cooldown_steps=0, max_adaptations=10, max_parameter_fraction=10.0)
    )
    controller = TamiyoController(None, BottleneckPolicy(), run_id="r", model=model, safety=safety)
    controller.observe_telemetry(_signals(10, {"2": math.exp(6.0)}))

    first, second, third = (controller.decide(step) for step in (10, 11, 12))

    assert first.decision is not None and second.decision is not None
    assert [(d.layer_name, d.seed_idx) for d in (first.decision, second.decision)] == [
        ("2", 0),
        ("2", 1),  # seed 0 is still DORMANT in the model, but reserved
    ]
    assert third.decision is not None and third.decision.layer_name != "2"  # "2" has none left
    assert not third.graph.germinate_mask[LAYERS.index("2")].any()
    # the training side culls the first graft: its seed is free again
    controller.observe(
        RewardReport(
            run_id="r",
            decision_id=first.decision.decision_id,
            layer_name="2",
            step=50,
            components={},
            weights={},
            total=0.0,
            outcome=AdaptationAction.CULL,
        )
    )
    assert controller.state_dict()["reserved"].keys() == {
        second.decision.decision_id,
        third.decision.decision_id,
    }


def test_a_decision_the_bus_did_not_take_is_not_counted() -> None:
    bus = InProcessBus()
    safety = SafetyGates(SafetyConfig(max_parameter_fraction=10.0))
    controller = TamiyoController(
        bus, BottleneckPolicy(), run_id="r", model=_model(), safety=safety
    )
    controller.observe_telemetry(_signals(10, {"2": math.exp(6.0)}))
    bus.close()

    result = controller.decide(10)

    assert result.decision is None and not result.output.action.is_wait
    assert controller.counters["publish_errors"] == 1 and controller.adaptations == 0
    assert safety.cooldown_until("2") == 0 and controller.state_dict()["committed"] == {}
