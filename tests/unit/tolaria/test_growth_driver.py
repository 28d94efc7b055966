"""The growth driver: built whole in one step on a model and the run's services, it applies its
controller link's decisions at the schedule's steps, saves and restores its state, and its
``close`` stops everything the services started (the compile worker among them)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from esper.tolaria.builders import build_data, build_model, build_optimizer
from esper.tolaria.config import RunConfig, load_config
from esper.tolaria.distributed import TrainingReplica
from esper.tolaria.growth import GrowthDriver, load_run_policy
from esper.tolaria.growth_services import GrowthServices


def _config(tmp_path: Path) -> RunConfig:
    return load_config(
        overrides=[
            f"run.dir={tmp_path}",
            "host.hidden=[16]",
            "host.activation=identity",
            "growth.start_step=4",
            "growth.decide_every=4",
            "growth.graft_delay=2",
            "growth.max_parameter_ratio=5",
            "growth.precompile=false",
            "urza.worker=thread",
        ]
    )


def _driver(config: RunConfig) -> tuple[GrowthDriver, TrainingReplica, torch.optim.Optimizer]:
    data, _, _ = build_data(config)
    services = GrowthServices.open(config)
    model = build_model(config, data, **services.wrap_options())
    optimizer = build_optimizer(config.train, model)
    driver = GrowthDriver.build(
        config, services, model, run_id="driver", policy=load_run_policy(config), total_steps=40
    )
    return driver, TrainingReplica(model), optimizer


def _train(
    driver: GrowthDriver, replica: TrainingReplica, optimizer: torch.optim.Optimizer, steps: int
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    torch.manual_seed(1)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(replica(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step = replica.step(graftable=driver.graftable(replica.model.global_step + 1))
        events += driver.after_step(step, replica.mean(loss), replica)
    return events


def test_decisions_come_at_the_schedules_steps_and_graft_graft_delay_later(
    tmp_path: Path,
) -> None:
    driver, replica, optimizer = _driver(_config(tmp_path))
    try:
        events = _train(driver, replica, optimizer, 12)
    finally:
        driver.close()

    decisions = [e for e in events if e["type"] == "decision"]
    grafts = [e for e in events if e["type"] == "graft"]
    assert decisions and {e["step"] for e in decisions} <= {4, 8, 12}
    due = {(d["layer"], d["step"] + 2) for d in decisions}
    assert {(g["layer"], g["step"]) for g in grafts} == {(layer, s) for layer, s in due if s <= 12}
    counters = driver.counters()
    assert counters["controller.decisions"] == len(decisions)
    assert counters["executor.received"] == len(decisions)


def test_a_driver_built_anew_and_restored_holds_the_saved_state(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first, first_replica, first_optimizer = _driver(config)
    try:
        _train(first, first_replica, first_optimizer, 5)  # a decision at 4, its graft due at 6
        state = json.loads(json.dumps(first.state_dict(), default=str))
        model_state = first.model.state_dict()
    finally:
        first.close()

    second, _, _ = _driver(config)
    try:
        second.model.load_state_dict(model_state)
        second.load_state_dict(state)
        restored = json.loads(json.dumps(second.state_dict(), default=str))
    finally:
        second.close()

    assert restored["executor"]["records"] == state["executor"]["records"]
    assert restored["decision_seeds"] == state["decision_seeds"] != {}
    assert restored["losses"] == state["losses"]


def test_closing_the_driver_stops_every_thread_it_and_its_services_started(
    tmp_path: Path,
) -> None:
    before = set(threading.enumerate())
    driver, _, _ = _driver(_config(tmp_path))
    worker = driver.services.worker.thread
    started = {t.name for t in set(threading.enumerate()) - before}
    assert worker is not None and {worker.worker_id, "compile-monitor"} <= started

    driver.close()
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)  # a thread pool's threads leave once they see the shutdown

    assert {t.name for t in set(threading.enumerate()) - before} == set()
