"""Issue 9 item 10: one NaN must not silence the controller.

Every numeric field of every message Tamiyo consumes is sent NaN, +inf and -inf. Either the
contract refuses the value (it can never be legitimate: a timestamp, an integer, a bounded
fraction) and the message is dropped alone, or the value is a real measurement of a diverged
model (a layer's output mean, a gradient norm) that the collector skips and flags. Either way the
controller's state stays finite and the shipped, pretrained GNN policy keeps deciding.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

import esper
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    CacheStats,
    DecisionRefusal,
    Envelope,
    HealthSignal,
    HealthSignalBatch,
    LayerKind,
    ModelTopology,
    RewardReport,
    SeedHealth,
    SeedState,
    Topic,
    TrainingProgress,
)
from esper.oona import InProcessBus, OonaTelemetrySink
from esper.tamiyo.controller import CycleResult, TamiyoController
from esper.tamiyo.graph import FEATURE_LIMIT, GlobalState, LayerHealthSummary
from esper.tamiyo.health import HealthCollector
from esper.tamiyo.observation import GrowthPolicy
from esper.tamiyo.policy_loading import load_policy
from esper.tamiyo.reward import AdaptationOutcome, RewardWeights, compute_reward
from esper.tamiyo.safety import (
    GATE_CONFIDENCE,
    GATE_UNCERTAINTY,
    Proposal,
    SafetyConfig,
    SafetyGates,
)
from esper.tamiyo.topology import model_topology
from esper.tolaria.growth import PRETRAINED_POLICY

RUN = "run-nan"
LAYERS = ("0", "2", "4")
NONFINITE = [math.nan, math.inf, -math.inf]
NONFINITE_IDS = ["nan", "inf", "-inf"]

HEALTH_FIELDS = (
    "step",
    "timestamp",
    "samples",
    "output_mean",
    "output_std",
    "dead_fraction",
    "grad_norm",
    "seeds.seed_idx",
    "seeds.alpha",
    "seeds.contribution_rms",
    "seeds.error_count",
)
"""Every numeric field of a HealthSignal and of its SeedHealth entries."""


def _refused_by_the_contract(field: str, value: float) -> bool:
    """Where a non-finite value can never be legitimate, the contract refuses it."""
    if field in ("step", "samples", "seeds.seed_idx", "seeds.error_count"):
        return True  # integers
    if field in ("timestamp", "dead_fraction"):
        return True  # a clock reading; a fraction in [0, 1]
    if field in ("output_std", "seeds.contribution_rms"):
        return value != math.inf  # non-negative; +inf is what an overflowed sum measures
    return False  # output_mean, grad_norm, alpha: measurements of a model that diverged


@pytest.fixture(scope="module")
def gnn() -> GrowthPolicy:
    torch.set_num_threads(1)
    return load_policy(str(PRETRAINED_POLICY))


@pytest.fixture(scope="module")
def topology() -> ModelTopology:
    torch.manual_seed(0)
    host = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    return model_topology(esper.wrap(host, seeds_per_layer=2), run_id=RUN)


def _signal(name: str, step: int, grad: float = 1.0) -> dict[str, Any]:
    seeds = tuple(
        SeedHealth(
            seed_idx=i,
            state=SeedState.DORMANT,
            alpha=0.0,
            contribution_rms=0.0,
            nonfinite_output=False,
            error_count=0,
        )
        for i in range(2)
    )
    signal = HealthSignal(
        layer_name=name,
        layer_kind=LayerKind.LINEAR,
        step=step,
        timestamp=1_700_000_000.0,
        samples=4,
        output_mean=0.1,
        output_std=1.0,
        dead_fraction=0.1,
        grad_norm=grad,
        seeds=seeds,
    )
    return signal.model_dump(mode="json")


def _batch_payload(step: int, poison: tuple[str, float] | None = None) -> dict[str, Any]:
    signals = [_signal(name, step, grad={"0": 1.0, "2": 5.0, "4": 0.5}[name]) for name in LAYERS]
    if poison is not None:
        field, value = poison
        target = signals[1]  # layer "2"
        if field.startswith("seeds."):
            target["seeds"][0][field.removeprefix("seeds.")] = value
        else:
            target[field] = value
    return {"run_id": RUN, "step": step, "signals": signals}


def _publish(bus: InProcessBus, topic: str, payload_type: str, payload: dict[str, Any]) -> None:
    """Publish a payload as a producer on the wire would: a dict, validated only by consumers."""
    bus.publish_envelopes(
        [Envelope(topic=topic, sender="test", payload_type=payload_type, payload=payload)]
    )


def _controller(
    bus: InProcessBus, policy: GrowthPolicy, topology: ModelTopology
) -> TamiyoController:
    safety = SafetyGates(SafetyConfig(cooldown_steps=0, max_parameter_fraction=100.0))
    return TamiyoController(
        bus, policy, run_id=RUN, topology=topology, safety=safety, total_steps=1000
    )


def _decide_on_finite_state(controller: TamiyoController, step: int) -> CycleResult:
    """Decide, checking that the smoothed health and the policy's inputs are all finite."""
    for name, summary in controller.collector.summaries().items():
        assert all(math.isfinite(v) for v in summary.as_tuple()), (name, summary)
    result = controller.decide(step)
    assert bool(torch.isfinite(result.graph.node_features).all())
    assert bool(torch.isfinite(result.graph.global_features).all())
    return result


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("field", HEALTH_FIELDS)
def test_a_nonfinite_health_field_is_refused_or_skipped_and_the_gnn_keeps_deciding(
    field: str,
    value: float,
    gnn: GrowthPolicy,
    topology: ModelTopology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = InProcessBus()
    controller = _controller(bus, gnn, topology)
    _publish(bus, Topic.TELEMETRY_HEALTH, "HealthSignalBatch", _batch_payload(10))
    controller.poll_bus()
    assert controller.decide(10).decision is not None  # healthy: the GNN germinates

    caplog.set_level(logging.INFO)
    _publish(bus, Topic.TELEMETRY_HEALTH, "HealthSignalBatch", _batch_payload(20, (field, value)))
    controller.poll_bus()
    anomalous = controller.collector.anomalous_layers()
    after_poison = _decide_on_finite_state(controller, 20)
    _publish(bus, Topic.TELEMETRY_HEALTH, "HealthSignalBatch", _batch_payload(30))
    controller.poll_bus()
    after_recovery = _decide_on_finite_state(controller, 30)

    assert after_poison.decision is not None  # the policy still germinates, at once ...
    assert after_recovery.decision is not None  # ... and once healthy telemetry is back
    assert controller.counters["decisions"] == 3
    counters = controller.collector.counters
    if _refused_by_the_contract(field, value):
        assert counters["undecodable"] == 1  # the whole batch is invalid: dropped alone, logged
        assert "dropping message" in caplog.text and field.split(".")[-1] in caplog.text
    else:
        assert counters["undecodable"] == 0 and counters["nonfinite_values"] == 1
        assert "unusable statistics" in caplog.text  # logged once, when the layer starts
        assert anomalous == ["2"]  # flagged instead
    assert controller.collector.anomalous_layers() == []
    pending = bus.subscribe(Topic.TELEMETRY_HEALTH, "tamiyo-health", "another")
    assert pending.pending_count() == 0  # every message of the group acknowledged


def test_one_nan_output_mean_does_not_silence_the_gnn_controller(
    gnn: GrowthPolicy, topology: ModelTopology
) -> None:
    """The issue's case: a schema-valid HealthSignal with output_mean NaN, then healthy ones."""
    controller = _controller(InProcessBus(), gnn, topology)
    poisoned = HealthSignalBatch.model_validate(_batch_payload(10, ("output_mean", math.nan)))
    controller.observe_telemetry(poisoned)  # accepted: a diverged layer really measures NaN

    decided = []
    for step in (20, 30, 40):
        controller.observe_telemetry(HealthSignalBatch.model_validate(_batch_payload(step)))
        decided.append(controller.decide(step).decision is not None)

    assert decided == [True, True, True]


PROGRESS_FIELDS = ("step", "total_steps", "loss", "base_parameters", "kernel_parameters")


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("field", PROGRESS_FIELDS)
def test_a_nonfinite_progress_field_never_reaches_the_globals(
    field: str, value: float, gnn: GrowthPolicy, topology: ModelTopology
) -> None:
    bus = InProcessBus()
    controller = _controller(bus, gnn, topology)
    _publish(bus, Topic.TELEMETRY_HEALTH, "HealthSignalBatch", _batch_payload(10))
    good = TrainingProgress(
        run_id=RUN, step=10, total_steps=1000, loss=2.0, base_parameters=484, kernel_parameters=0
    )
    bus.publish(Topic.TELEMETRY_PROGRESS, good)
    poisoned = good.model_dump(mode="json") | {"step": 20, field: value}
    _publish(bus, Topic.TELEMETRY_PROGRESS, "TrainingProgress", poisoned)
    controller.poll_bus()

    if field == "loss":  # a diverged loss is a measurement: accepted, kept out of the average
        assert controller.counters["undecodable"] == 0 and controller.latest_step == 20
    else:  # integers
        assert controller.counters["undecodable"] == 1
    result = controller.decide(20)
    assert bool(torch.isfinite(result.graph.global_features).all())
    assert result.graph.global_features[3].item() == pytest.approx(2.0)  # loss: the finite one
    assert result.decision is not None


def _reward() -> dict[str, Any]:
    return RewardReport(
        run_id=RUN,
        decision_id="d" * 32,
        layer_name="2",
        step=5,
        components={"loss_improvement": 0.1},
        weights={"loss_improvement": 1.0},
        total=0.1,
        outcome=AdaptationAction.FOSSILIZE,
    ).model_dump(mode="json")


def _refusal() -> dict[str, Any]:
    return DecisionRefusal(
        run_id=RUN, step=5, layer_name="2", action="germinate", gate="x", reason="y", policy="p"
    ).model_dump(mode="json")


CONTROL_FIELDS = [
    ("RewardReport", "components.loss_improvement"),
    ("RewardReport", "weights.loss_improvement"),
    ("RewardReport", "total"),
    ("RewardReport", "step"),
    ("DecisionRefusal", "created_at"),
    ("DecisionRefusal", "step"),
]
"""Every numeric field of the control messages a controller consumes: computed by Esper itself,
so a non-finite value is always refused."""


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize(("payload_type", "field"), CONTROL_FIELDS)
def test_a_nonfinite_reward_or_refusal_field_is_refused_and_dropped_alone(
    payload_type: str, field: str, value: float, gnn: GrowthPolicy, topology: ModelTopology
) -> None:
    bus = InProcessBus()
    controller = _controller(bus, gnn, topology)
    topic = (
        Topic.CONTROL_TAMIYO_REWARDS
        if payload_type == "RewardReport"
        else Topic.CONTROL_TAMIYO_REFUSALS
    )
    payload = _reward() if payload_type == "RewardReport" else _refusal()
    poisoned = copy.deepcopy(payload)
    head, _, key = field.partition(".")
    if key:
        poisoned[head][key] = value
    else:
        poisoned[head] = value
    _publish(bus, topic, payload_type, poisoned)
    _publish(bus, topic, payload_type, payload)  # a valid one behind it, in the same read
    _publish(bus, Topic.TELEMETRY_HEALTH, "HealthSignalBatch", _batch_payload(10))

    controller.poll_bus()

    assert controller.counters["undecodable"] == 1
    assert controller.counters["rewards"] == (1 if payload_type == "RewardReport" else 0)
    assert controller.decide(10).decision is not None


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize(
    ("contract", "field"),
    [
        (AdaptationDecision, "confidence"),
        (AdaptationDecision, "uncertainty"),
        (AdaptationDecision, "created_at"),
        (Envelope, "timestamp"),
        (CacheStats, "load_latency_ms_mean"),
        (CacheStats, "load_latency_ms_p50"),
        (CacheStats, "load_latency_ms_p99"),
    ],
)
def test_values_esper_computes_itself_are_refused_when_not_finite(
    contract: type, field: str, value: float
) -> None:
    valid: dict[str, Any] = {
        AdaptationDecision: {
            "run_id": RUN,
            "step": 1,
            "action": "germinate",
            "layer_name": "2",
            "seed_idx": 0,
            "policy": "p",
            "confidence": 1.0,
            "uncertainty": 0.0,
        },
        Envelope: {"topic": "t", "sender": "s", "payload_type": "X", "payload": {}},
        CacheStats: dict.fromkeys(
            ("entries", "bytes", "max_entries", "max_bytes", "pinned", "hits", "misses"), 0
        )
        | dict.fromkeys(("coalesced", "evictions", "load_failures"), 0),
    }[contract]
    contract.model_validate(valid)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=field):
        contract.model_validate(valid | {field: value})  # type: ignore[attr-defined]


def test_nonfinite_measurements_cross_the_json_wire_instead_of_voiding_the_batch() -> None:
    signal = HealthSignal.model_validate(
        _signal("2", 5) | {"output_mean": math.nan, "grad_norm": math.inf}
    )
    batch = HealthSignalBatch(run_id=RUN, step=5, signals=(signal,))
    envelope = Envelope(
        topic="telemetry.health", sender="s", payload_type="HealthSignalBatch", payload={}
    ).model_copy(update={"payload": batch.model_dump(mode="json")})

    text = envelope.model_dump_json()  # what a Redis stream entry holds
    decoded = HealthSignalBatch.model_validate(Envelope.model_validate_json(text).payload)

    json.loads(text)  # still valid JSON: NaN and Infinity travel as strings
    assert '"output_mean":"NaN"' in text and '"grad_norm":"Infinity"' in text
    assert math.isnan(decoded.signals[0].output_mean)
    assert decoded.signals[0].grad_norm == math.inf


def test_zero_spread_windows_and_huge_values_keep_zscores_and_features_finite(
    gnn: GrowthPolicy, topology: ModelTopology
) -> None:
    collector = HealthCollector(min_window=2, window=4)
    for step in range(1, 6):  # a constant gradient norm: the window's std is exactly 0
        collector.ingest([HealthSignal.model_validate(_signal("2", step, grad=2.0))])
    collector.ingest([HealthSignal.model_validate(_signal("2", 6, grad=1e300))])
    huge = _signal("0", 6) | {"output_mean": 1e300, "output_std": 1e300}
    collector.ingest([HealthSignal.model_validate(huge)])

    summary = collector.summaries()["2"]
    assert math.isfinite(summary.grad_norm_zscore) and summary.grad_norm_zscore > 0
    safety = SafetyGates(SafetyConfig(max_parameter_fraction=100.0))
    controller = TamiyoController(
        None, gnn, run_id=RUN, topology=topology, collector=collector, safety=safety
    )
    graph = controller.decide(6).graph
    assert bool(torch.isfinite(graph.node_features).all())
    assert graph.node_features.abs().max().item() <= FEATURE_LIMIT
    assert controller.last_result is not None and controller.last_result.decision is not None


def test_the_graph_builder_bounds_nonfinite_summaries_and_globals(
    topology: ModelTopology,
) -> None:
    from esper.tamiyo.topology import topology_structure

    structure = topology_structure(topology)
    poisoned = LayerHealthSummary(
        output_mean=math.nan, output_std=math.inf, log_grad_norm=-math.inf
    )
    graph = structure.build(
        {"2": poisoned},
        seed_states={name: (SeedState.DORMANT,) for name in LAYERS},
        globals=GlobalState(loss=math.inf, loss_trend=math.nan),
        step=1,
    )
    limit = float(torch.tensor(FEATURE_LIMIT, dtype=torch.float32))  # as float32 holds it
    row = graph.node_features[1, :4].tolist()
    assert row == [0.0, limit, 0.0, -limit]
    assert graph.global_features.tolist()[3:] == [limit, 0.0]


def test_a_collector_checkpoint_holding_nan_is_cleaned_on_load() -> None:
    collector = HealthCollector()
    collector.ingest([HealthSignal.model_validate(_signal("2", 1))])
    state = collector.state_dict()
    state["layers"]["2"]["ema"]["output_mean"] = math.nan  # written by an older version
    state["layers"]["2"]["grad_window"].append(math.nan)
    state = json.loads(json.dumps(state))

    restored = HealthCollector()
    restored.load_state_dict(state)

    assert all(math.isfinite(v) for v in restored.summaries()["2"].as_tuple())
    assert restored.state_dict()["layers"]["2"]["grad_window"] == [pytest.approx(0.0, abs=1e-9)]


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("field", ["confidence", "uncertainty"])
def test_a_policy_output_that_is_not_finite_is_refused_by_its_gate(
    field: str, value: float
) -> None:
    proposal = Proposal(step=1, layer_name="2", action=AdaptationAction.GERMINATE, **{field: value})

    verdict = SafetyGates().check(proposal, base_parameters=100, kernel_parameters=0)

    assert verdict.gate == (GATE_CONFIDENCE if field == "confidence" else GATE_UNCERTAINTY)
    assert "not finite" in verdict.reason


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_rewards_stay_finite_and_weights_must_be(value: float) -> None:
    outcome = AdaptationOutcome(
        val_loss_before=1.0,
        val_loss_after=0.5,
        base_parameters=100,
        added_parameters=10,
        accuracy_before=0.5,
        accuracy_after=value,  # an evaluate hook that returned garbage
        train_losses_before=[1.0],
        train_losses_after=[value],
    )

    reward = compute_reward(outcome)
    report = reward.to_report(run_id=RUN, decision_id="d" * 32, layer_name="2", step=3)

    assert all(math.isfinite(v) for v in report.components.values())
    assert math.isfinite(report.total)
    with pytest.raises(ValueError, match="finite"):
        RewardWeights(loss_improvement=value)


def test_a_diverged_host_still_publishes_telemetry_and_the_gnn_keeps_deciding(
    gnn: GrowthPolicy,
) -> None:
    """The training side's own messages: a host fed an infinite input measures NaN output means,
    infinite spreads and gradient norms; the flush stays publishable and the controller copes."""
    bus = InProcessBus()
    sink = OonaTelemetrySink(bus, run_id=RUN)
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = esper.wrap(host, seeds_per_layer=2, health_every=1, telemetry_sink=sink)
    controller = _controller(bus, gnn, model_topology(model, run_id=RUN))
    decisions = []
    for step, poison in enumerate([None, math.inf, 1e30, None], start=1):
        model.step()
        x = torch.randn(16, 8)
        if poison is not None:
            x[0, 0] = poison
        model(x).sum().backward()
        signals = model.collect_telemetry()  # never raises: every value is a valid message
        assert sink.flush(5.0)
        controller.poll_bus()
        decisions.append(controller.decide(step).decision is not None)
        if poison is not None:
            assert not all(
                math.isfinite(s.output_mean) and s.output_std < math.inf for s in signals
            )
            assert controller.collector.anomalous_layers()  # flagged, not averaged in
    sink.close()

    assert decisions == [True, True, True, True]
    assert sink.counters.dropped == 0 and sink.encode_errors == 0
    assert controller.collector.counters["undecodable"] == 0
    assert controller.collector.counters["nonfinite_values"] >= 3
    assert all(
        math.isfinite(v) for s in controller.collector.summaries().values() for v in s.as_tuple()
    )
