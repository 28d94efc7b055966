"""Autonomous growth over real Redis: a training run and ``esper tamiyo serve`` in another process.

The training side (this process) trains a small MLP on digits with an embedded Urza (SQLite +
folder) and a Tezzeret worker thread, publishes its topology, progress and health on Redis Streams
(a unique stream prefix), and applies decisions through a :class:`GrowthExecutor`. The controller
runs as a separate process (``esper tamiyo serve --policy bottleneck``) that knows the model only
from the bus. A third party subscribes to the control topics and must see the decisions, the
refusals (each naming its gate) and the rewards; the model must have grafted a kernel.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
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
from esper.oona import MessageBus, OonaTelemetrySink, open_bus
from esper.oona.redis_streams import RedisStreamsBus
from esper.tamiyo.baselines import BottleneckPolicy
from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.controller_loop import CONTROLLER_TOPICS
from esper.tamiyo.safety import GATE_PARAMETER_BUDGET, GATES, SafetyConfig, SafetyGates
from esper.tamiyo.topology import model_topology
from esper.tasks.datasets import load_digits_split
from esper.tolaria.compile_worker import CompileWorker
from esper.tolaria.growth_executor import GrowthExecutor
from esper.urza import UrzaArtifactSource, open_library

pytestmark = pytest.mark.services

RUN_ID = "tamiyo-redis-e2e"


@pytest.fixture
def bus_url(redis_url: str) -> Iterator[str]:
    prefix = f"esper-tamiyo-{uuid.uuid4().hex[:8]}"
    yield f"{redis_url}?stream_prefix={prefix}"
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def _collect(subscriptions: dict[str, object], seen: dict[str, list[object]]) -> None:
    contracts = {
        Topic.CONTROL_KASMINA_COMMANDS: AdaptationDecision,
        Topic.CONTROL_TAMIYO_REFUSALS: DecisionRefusal,
        Topic.CONTROL_TAMIYO_REWARDS: RewardReport,
    }
    for topic, subscription in subscriptions.items():
        deliveries = subscription.poll(100)  # type: ignore[attr-defined]
        if deliveries:
            subscription.ack(*deliveries)  # type: ignore[attr-defined]
        seen[topic] += [d.decode(contracts[topic]) for d in deliveries]  # type: ignore[index]


def test_controller_process_grows_a_training_run_over_redis(bus_url: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = load_digits_split(seed=0)
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    base = sum(p.numel() for p in host.parameters())  # 1210
    library = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    observer_bus = open_bus(bus_url)
    observed = {
        topic: observer_bus.subscribe(topic, "observer", "o", start="earliest")
        for topic in (
            Topic.CONTROL_KASMINA_COMMANDS,
            Topic.CONTROL_TAMIYO_REFUSALS,
            Topic.CONTROL_TAMIYO_REWARDS,
        )
    }
    seen: dict[str, list[object]] = {topic: [] for topic in observed}
    training_bus: MessageBus = open_bus(bus_url)
    sink = OonaTelemetrySink(training_bus, run_id=RUN_ID)
    model = esper.wrap(
        host,
        seeds_per_layer=2,
        kernel_source=UrzaArtifactSource(library),
        telemetry_sink=sink,
        blend_steps=10,
        health_every=5,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            logits = model(data.x_test)
        return {
            "loss": float(nn.functional.cross_entropy(logits, data.y_test)),
            "accuracy": float((logits.argmax(1) == data.y_test).float().mean()),
        }

    model.attach_optimizer(optimizer)
    worker = CompileWorker.start("thread", library, bus=training_bus)
    executor = GrowthExecutor(
        model,
        run_id=RUN_ID,
        library=library,
        bus=training_bus,
        safety=SafetyGates(SafetyConfig(loss_spike_tolerance=0.5, max_parameter_fraction=2.5)),
        evaluation_steps=30,
        evaluate=evaluate,
        progress_every_steps=10,
    )
    # mlp_h32 adds 2608 parameters on layer "0" (64 -> 16) and 874 on layer "2" (16 -> 10):
    # a budget of 2.5 x 1210 = 3025 fits either kernel, not both, so the second is refused.
    command = [sys.executable, "-m", "esper.cli", "--log-level", "INFO", "tamiyo", "serve"]
    command += ["--bus", bus_url, "--policy", "bottleneck", "--run-id", RUN_ID]
    command += ["--cooldown-steps", "40", "--max-parameter-fraction", "2.5", "--cycle-ms", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    controller = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    grafted: list[tuple[str, int]] = []
    rewards: list[RewardReport] = []
    try:
        generator = torch.Generator().manual_seed(0)
        deadline = time.monotonic() + 120.0
        step = 0
        while time.monotonic() < deadline:
            order = torch.randperm(len(data.x_train), generator=generator)
            for start in range(0, len(order), 64):
                batch = order[start : start + 64]
                loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step = model.step()
                outcome = executor.on_step(step, loss)
                grafted += outcome.grafted
                rewards += outcome.rewards
                if step % 10 == 0:
                    model.collect_telemetry()  # -> the sink -> telemetry.health on Redis
                time.sleep(0.004)  # a step of a real model takes a few milliseconds
            _collect(observed, seen)
            refused_by_gate = [r for r in seen[Topic.CONTROL_TAMIYO_REFUSALS] if r.gate in GATES]  # type: ignore[attr-defined]
            if seen[Topic.CONTROL_TAMIYO_REWARDS] and refused_by_gate:
                break
        assert controller.poll() is None, controller.communicate()[0]
    finally:
        if controller.poll() is None:
            controller.send_signal(signal.SIGTERM)
        output = controller.communicate(timeout=30)[0]
        executor.close()
        worker.stop()
        sink.close()
        training_bus.close()
        library.close()
    _collect(observed, seen)
    observer_bus.close()

    decisions: list[AdaptationDecision] = seen[Topic.CONTROL_KASMINA_COMMANDS]  # type: ignore[assignment]
    refusals: list[DecisionRefusal] = seen[Topic.CONTROL_TAMIYO_REFUSALS]  # type: ignore[assignment]
    published_rewards: list[RewardReport] = seen[Topic.CONTROL_TAMIYO_REWARDS]  # type: ignore[assignment]
    assert controller.returncode == 0, output
    assert "decided" in output and "germinations" in output, output
    # decisions: from the controller process, bottleneck policy, for this run, applied here
    assert decisions and all(d.policy == "bottleneck" and d.run_id == RUN_ID for d in decisions)
    assert all(d.action is AdaptationAction.GERMINATE for d in decisions)
    assert 1 <= executor.counters["received"] <= len(decisions)  # the last may be in transit
    assert executor.counters["duplicates"] == 0
    # the model grew: a kernel was grafted where a decision asked
    assert grafted and grafted[0] in {(d.layer_name, d.seed_idx) for d in decisions}
    assert executor.counters["germinated"] >= 1
    # refusals name their gate; the budget gate refused the kernel that did not fit
    assert refusals and all(r.gate for r in refusals)
    budget = [r for r in refusals if r.gate == GATE_PARAMETER_BUDGET]
    assert budget and all(r.policy == "bottleneck" for r in budget), refusals
    # rewards: the executor's evaluation reached the bus with its outcome
    assert published_rewards and published_rewards[0] == rewards[0]
    first = published_rewards[0]
    assert first.decision_id in {d.decision_id for d in decisions}
    assert first.outcome in (AdaptationAction.FOSSILIZE, AdaptationAction.CULL)
    assert len(first.components) == 7
    states = model.layer(first.layer_name).seed_states
    if first.outcome is AdaptationAction.FOSSILIZE:
        assert SeedState.FOSSILIZED in states
    else:
        assert executor.counters["culled"] >= 1
    assert base == 1210


def _health(step: int, layers: tuple[str, ...], **poison: float) -> HealthSignalBatch:
    seed = SeedHealth(
        seed_idx=0,
        state=SeedState.DORMANT,
        alpha=0.0,
        contribution_rms=0.0,
        nonfinite_output=False,
        error_count=0,
    )
    signals = tuple(
        HealthSignal(
            layer_name=name,
            layer_kind=LayerKind.LINEAR,
            step=step,
            timestamp=0.0,
            samples=4,
            output_mean=0.0,
            output_std=1.0,
            dead_fraction=0.0,
            grad_norm=2.0 if name == layers[-1] else 1.0,
            seeds=(seed, seed.model_copy(update={"seed_idx": 1})),
        ).model_copy(update=poison if name == layers[0] else {})
        for name in layers
    )
    return HealthSignalBatch(run_id="bad-messages", step=step, signals=signals)


def test_bad_messages_on_redis_are_dropped_alone_and_nothing_stays_pending(
    bus_url: str, redis_url: str
) -> None:
    """Issue 9 items 10 and 11 over real Redis Streams: a NaN statistic crosses the stream and is
    skipped; a topology that fails observe(), a malformed entry, a foreign payload and an
    impossible gradient norm are each dropped alone; the valid messages read with them are
    observed; XPENDING is empty for every group afterwards."""
    bus = open_bus(bus_url)
    assert isinstance(bus, RedisStreamsBus)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    run = "bad-messages"
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    topology = model_topology(esper.wrap(host, seeds_per_layer=2), run_id=run)
    layers = tuple(layer.layer_name for layer in topology.layers)
    controller = TamiyoController(
        bus,
        BottleneckPolicy(),
        run_id=run,
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=10.0)),
    )
    try:
        bus.publish(Topic.TELEMETRY_TOPOLOGY, topology.model_copy(update={"edges": ((0, 9),)}))
        bus.publish(Topic.TELEMETRY_TOPOLOGY, topology)
        raw.xadd(bus.stream_key(Topic.TELEMETRY_PROGRESS), {"envelope": "{not json"})
        progress = TrainingProgress(
            run_id=run, step=30, loss=1.0, base_parameters=212, kernel_parameters=0
        )
        bus.publish(Topic.TELEMETRY_PROGRESS, progress)
        bus.publish(Topic.TELEMETRY_HEALTH, _health(10, layers))
        bus.publish(Topic.TELEMETRY_HEALTH, _health(15, layers, output_mean=math.nan))
        bus.publish(Topic.TELEMETRY_HEALTH, progress)  # not a HealthSignalBatch
        bus.publish(Topic.TELEMETRY_HEALTH, _health(20, layers, grad_norm=-3.0))
        bus.publish(Topic.TELEMETRY_HEALTH, _health(30, layers))
        entries = raw.xrange(bus.stream_key(Topic.TELEMETRY_HEALTH))
        assert '"output_mean":"NaN"' in entries[1][1]["envelope"]  # valid JSON, not null

        controller.poll_bus()
        result = controller.decide()

        assert controller.ready and controller.latest_step == 30
        assert controller.counters["rejected"] == 1  # the topology whose edge leaves 0..1
        assert controller.collector.counters["undecodable"] == 1  # the progress on health
        assert controller.collector.counters["nonfinite_values"] == 2  # NaN mean, grad -3
        assert controller.collector.counters["batches"] == 4
        assert all(math.isfinite(v) for v in controller.collector.summaries()["0"].as_tuple())
        assert result.decision is not None and result.decision.layer_name == layers[-1]
        groups = {topic: f"tamiyo-{topic}" for topic in CONTROLLER_TOPICS}
        groups[Topic.TELEMETRY_HEALTH] = "tamiyo-health"
        for topic, group in groups.items():
            assert raw.xpending(bus.stream_key(topic), group)["pending"] == 0, topic
    finally:
        bus.close()
        raw.close()
