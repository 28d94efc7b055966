"""Decisions over Redis survive a Redis restart: none lost after it was acknowledged, duplicates
ignored by the idempotent training side.

The training side's growth executor consumes ``control.kasmina.commands`` from a private,
persistent ``redis-server`` (AOF, fsync always) that is killed and restarted mid-run while the
model keeps training.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch
from torch import nn

import esper
from esper.contracts import (
    AdaptationDecision,
    BlueprintSpec,
    DecisionRefusal,
    SeedState,
    Topic,
)
from esper.oona import open_bus
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tamiyo.safety import SafetyConfig, SafetyGates
from esper.tolaria.compile_worker import CompileWorker
from esper.tolaria.growth_executor import GrowthExecutor
from esper.urza import UrzaArtifactSource, open_library
from factories import germinate
from servers import free_port, start_redis_server

pytestmark = pytest.mark.services

MLP_H32 = next(option.spec for option in BLUEPRINT_CATALOG if option.name == "mlp_h32")


def _germinate(layer: str) -> AdaptationDecision:
    return germinate(layer, run_id="delivery", blueprint=MLP_H32)


def test_decisions_survive_a_redis_restart_and_duplicates_are_ignored(tmp_path: Path) -> None:
    port = free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = start_redis_server(port, redis_dir, persistent=True)
    url = f"redis://127.0.0.1:{port}/0?stream_prefix=esper-{uuid.uuid4().hex[:6]}"
    library = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    training_bus, controller_bus = open_bus(url), open_bus(url)
    torch.manual_seed(0)
    model = esper.wrap(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
        seeds_per_layer=2,
        kernel_source=UrzaArtifactSource(library),
        blend_steps=3,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.attach_optimizer(optimizer)
    worker = CompileWorker.start("thread", library)
    executor = GrowthExecutor(
        model,
        run_id="delivery",
        library=library,
        bus=training_bus,
        safety=SafetyGates(SafetyConfig(max_parameter_fraction=10.0)),  # 816 + 676 on 212
        evaluation_steps=5,
    )
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def train_until(done: object, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:  # type: ignore[operator]
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step = model.step(graftable=executor.graftable(model.global_step + 1))
            executor.on_step(step, float(loss.detach()))
            time.sleep(0.002)
        assert done(), "condition not reached"  # type: ignore[operator]

    first, second = _germinate("0"), _germinate("2")
    try:
        controller_bus.publish(Topic.CONTROL_KASMINA_COMMANDS, first)
        train_until(lambda: model.seed_state("0", 0) is not SeedState.DORMANT)
        assert executor.counters["received"] == 1  # applied, and acknowledged

        controller_bus.publish(Topic.CONTROL_KASMINA_COMMANDS, second)
        server.send_signal(signal.SIGKILL)  # Redis dies with the second decision in its log
        server.wait(timeout=10)
        for _ in range(20):  # training goes on while the bus is down
            train_until(lambda: True)
        server = start_redis_server(port, redis_dir, persistent=True)
        controller_bus.publish(Topic.CONTROL_KASMINA_COMMANDS, first)  # a duplicate, post-restart

        train_until(lambda: model.seed_state("2", 0) is not SeedState.DORMANT)
        train_until(lambda: executor.counters["duplicates"] >= 1)
    finally:
        executor.close()
        worker.stop()
        training_bus.close()
        controller_bus.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        library.close()

    assert executor.counters["received"] == 2  # both decisions, each applied once
    assert executor.counters["germinated"] == 2
    assert model.layer("0").seed_states[1] is SeedState.DORMANT  # the duplicate grew nothing
    assert sum(1 for g in optimizer.param_groups if g.get("esper_seed")) == 2


def test_forged_decisions_over_redis_are_refused_by_the_training_side_and_acknowledged(
    redis_url: str, tmp_path: Path
) -> None:
    """Issue 9 item 12 over real Redis: the executor applies the run's limits to decisions from
    the bus, publishes each refusal with its gate, compiles nothing, and leaves nothing pending."""
    prefix = f"esper-forged-{uuid.uuid4().hex[:6]}"
    url = f"{redis_url}?stream_prefix={prefix}"
    library = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    training_bus, controller_bus = open_bus(url), open_bus(url)
    refusals_seen = controller_bus.subscribe(Topic.CONTROL_TAMIYO_REFUSALS, "observer", "o")
    torch.manual_seed(0)
    model = esper.wrap(
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)),  # 289 parameters
        seeds_per_layer=2,
        kernel_source=UrzaArtifactSource(library),
    )
    executor = GrowthExecutor(model, run_id="delivery", library=library, bus=training_bus)
    huge = BlueprintSpec(family="residual_mlp", params={"hidden": 35_757})  # 1.18M parameters
    forged = {
        "parameter_budget": _germinate("0").model_copy(update={"blueprint": huge}),
        "unknown_layer": _germinate("fc9"),
        "unknown_seed": _germinate("2").model_copy(update={"seed_idx": 3}),
        "unknown_blueprint": _germinate("2").model_copy(
            update={"blueprint": BlueprintSpec(family="mystery_family")}
        ),
    }
    refused: dict[str, str] = {}
    try:
        for decision in forged.values():
            controller_bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)
        deadline = time.monotonic() + 30
        step = 0
        while len(refused) < len(forged) and time.monotonic() < deadline:
            step += 1
            refused |= {r.decision_id or "": r.gate for r in executor.on_step(step).refusals}
            time.sleep(0.01)
        executor.close()  # sends the pending acknowledgements
        jobs = library.list_jobs()
        deliveries = refusals_seen.poll(100, block_ms=2000)
        refusals_seen.ack(*deliveries)
        published = {r.decision_id: r.gate for r in (d.decode(DecisionRefusal) for d in deliveries)}
        client = redis.Redis.from_url(redis_url)
        pending = client.xpending(f"{prefix}:{Topic.CONTROL_KASMINA_COMMANDS}", "tolaria-executor")
        client.close()
    finally:
        executor.close()
        training_bus.close()
        controller_bus.close()
        library.close()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()

    expected = {decision.decision_id: gate for gate, decision in forged.items()}
    assert refused == expected
    assert published == expected  # on the refusals topic, over Redis
    assert pending["pending"] == 0
    assert jobs == []  # costed from the spec: nothing compiled
    assert sum(p.numel() for p in model.kernel_parameters()) == 0
