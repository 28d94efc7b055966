"""Tamiyo as a service from the main job, on the real Redis: ``esper train`` with
``growth.controller=service`` and ``esper tamiyo serve`` in its own process.

* A digits run grows through the bus: every decision in its ``metrics.jsonl`` (and its report)
  is one the controller process published, and kernels were grafted where they asked.
* Without a controller the run trains on and decides nothing, its telemetry waiting in the streams.
* ``esper tamiyo serve`` serves one run per consumer group (two runs on one stream prefix) and a
  restarted one learns the model again from the run's topology heartbeat.
* A resumed run's link gets back, from its consumer group, exactly the decisions its checkpoint
  does not hold.
* (slow) The controller dies mid-run and another one starts: training goes on, decisions resume,
  none is applied twice. (slow) ``--nproc 2``: rank 0 consumes, the lockstep broadcasts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from torch import nn

import esper
from esper.cli import build_parser
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    HealthSignal,
    LayerKind,
    SeedHealth,
    SeedState,
    Topic,
)
from esper.oona import Delivery, MessageBus, open_bus
from esper.tamiyo import model_topology
from esper.tolaria.metrics import read_metrics
from esper.tolaria.service_controller import ServiceController

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
SERVE_LIMITS = ("--cooldown-steps", "150", "--window-steps", "100000")
SERVE_LIMITS += ("--max-adaptations", "3", "--max-parameter-fraction", "3.0")


@pytest.fixture
def bus_url(redis_url: str) -> Iterator[str]:
    """A stream prefix of its own on the real Redis, deleted afterwards."""
    prefix = f"esper-service-{uuid.uuid4().hex[:8]}"
    yield f"{redis_url}?stream_prefix={prefix}"
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


class Process:
    """A subprocess whose output lines are collected by a thread (so nothing blocks on a pipe)."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.popen.poll() is None, self.output
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{self.output}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300.0) -> int:
        code = self.popen.wait(timeout=timeout)
        self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.finish(timeout=30)


def _serve(bus_url: str, run_id: str, cwd: Path, *options: str) -> Process:
    """``esper tamiyo serve`` for ``run_id``, once it has joined its consumer groups."""
    command = [sys.executable, "-m", "esper.cli", "--log-level", "INFO", "tamiyo", "serve"]
    command += ["--bus", bus_url, "--run-id", run_id, *SERVE_LIMITS, *options]
    process = Process(command, cwd)
    process.wait_for_line("Tamiyo controller for run")
    return process


def _train(bus_url: str, run_id: str, root: Path, *overrides: str) -> Process:
    """``esper train`` of the digits preset in service mode (small steps: batch 16)."""
    command = [sys.executable, "-m", "esper.cli", "train", "--config", str(DIGITS)]
    command += ["growth.controller=service", f"growth.bus={bus_url}", f"run.id={run_id}"]
    command += [f"run.dir={root / 'runs'}", "data.batch_size=16", "growth.start_step=20"]
    command += ["growth.graft_delay=5", "growth.evaluation_steps=30", "growth.stop_fraction=0.9"]
    command += ["urza.worker=thread", "growth.precompile=false"]  # a faster start for tests
    return Process([*command, *overrides], root)


class CommandsObserver:
    """Everything published on ``control.kasmina.commands``, with the sender of each."""

    def __init__(self, bus_url: str) -> None:
        self.bus = open_bus(bus_url)
        self.subscription = self.bus.subscribe(
            Topic.CONTROL_KASMINA_COMMANDS, "test-observer", "o", start="earliest"
        )
        self.deliveries: list[Delivery] = []

    def poll(self) -> list[Delivery]:
        deliveries = self.subscription.poll(100)
        if deliveries:
            self.subscription.ack(*deliveries)
        self.deliveries += deliveries
        return self.deliveries

    def senders(self) -> dict[str, str]:
        """Decision id -> the ``host:pid`` that published it."""
        self.poll()
        return {
            d.decode(AdaptationDecision).decision_id: d.envelope.sender for d in self.deliveries
        }

    def wait_for(self, found: Callable[[list[Delivery]], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not found(self.poll()):
            assert time.monotonic() < deadline, f"not published within {timeout}s"
            time.sleep(0.05)

    def close(self) -> None:
        self.bus.close()


def _records(root: Path, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_metrics(root / "runs" / run_id / "metrics.jsonl") if r["type"] == kind]


def _info(root: Path, run_id: str) -> dict[str, Any]:
    return json.loads((root / "runs" / run_id / "run.json").read_text())


def _pid(sender: str) -> int:
    return int(sender.rsplit(":", 1)[1])


# -- the main job, through the bus ----------------------------------------------------------------


def test_a_digits_run_grows_through_a_tamiyo_service_over_redis(
    bus_url: str, tmp_path: Path
) -> None:
    observer = CommandsObserver(bus_url)
    # The run's own policy would be bottleneck: round_robin decisions can only come from the service.
    controller = _serve(bus_url, "service-e2e", tmp_path, "--policy", "round_robin")
    try:
        run = _train(bus_url, "service-e2e", tmp_path, "train.epochs=12")
        assert run.finish() == 0, run.output
    finally:
        stopped = controller.stop()
    assert stopped == 0, controller.output
    senders = observer.senders()
    observer.close()

    assert "run service-e2e completed at epoch 12" in run.output
    decisions = _records(tmp_path, "service-e2e", "decision")
    ids = [d["decision_id"] for d in decisions]
    assert decisions and len(set(ids)) == len(ids)  # none applied twice
    assert all(d["policy"] == "round_robin" for d in decisions)
    assert all(_pid(senders[i]) == controller.popen.pid for i in ids)  # published by the service
    assert all(d["received_step"] >= max(d["step"], 20) for d in decisions)  # at a step boundary
    grafts = _records(tmp_path, "service-e2e", "graft")
    assert grafts and {(g["layer"], g["seed"]) for g in grafts} <= {
        (d["layer"], d["seed"]) for d in decisions
    }
    rewards = _records(tmp_path, "service-e2e", "reward")
    assert rewards and {r["decision_id"] for r in rewards} <= set(ids)

    info = _info(tmp_path, "service-e2e")
    counters = info["growth_counters"]
    assert counters["controller.received"] == counters["controller.decisions"] == len(ids)
    assert counters["executor.received"] == len(ids) and "executor.duplicates" not in counters
    assert counters["executor.germinated"] == len(grafts) and counters["controller.published"] > 0
    assert info["summary"]["final_parameters"] > info["initial_parameters"]
    report = (tmp_path / "runs" / "service-e2e" / "report.md").read_text()
    assert report.count("| round_robin |") == len(decisions)  # the decision table
    assert f"decided {len(ids)} germinations" in controller.output


def test_a_run_without_its_controller_trains_on_and_decides_nothing(
    bus_url: str, redis_url: str, tmp_path: Path
) -> None:
    run = _train(bus_url, "service-absent", tmp_path, "train.epochs=3")
    assert run.finish() == 0, run.output

    assert "run service-absent completed at epoch 3" in run.output
    assert _records(tmp_path, "service-absent", "decision") == []
    steps = len(_records(tmp_path, "service-absent", "step"))
    counters = _info(tmp_path, "service-absent")["growth_counters"]
    assert (
        counters.get("controller.received", 0) == 0 and counters.get("executor.germinated", 0) == 0
    )
    assert counters["controller.published"] > steps // 10 and counters["controller.dropped"] == 0
    # what a controller started later reads: the topology and every health flush
    prefix = bus_url.split("stream_prefix=")[1]
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(f"{prefix}:{Topic.TELEMETRY_TOPOLOGY}") >= 1
    assert client.xlen(f"{prefix}:{Topic.TELEMETRY_HEALTH}") == steps // 10  # telemetry_every
    client.close()


# -- esper tamiyo serve: one run per consumer group, and a restart --------------------------------


def _training_side(bus: MessageBus, run_id: str, *, heartbeat_s: float) -> ServiceController:
    host = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = esper.wrap(host, seeds_per_layer=2)
    return ServiceController(
        bus,
        run_id=run_id,
        topology=model_topology(model, run_id=run_id),
        topology_every_s=heartbeat_s,
    )


def _health(step: int) -> list[HealthSignal]:
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
    return [
        HealthSignal(
            layer_name=name,
            layer_kind=LayerKind.LINEAR,
            step=step,
            timestamp=0.0,
            samples=16,
            output_mean=0.0,
            output_std=1.0,
            dead_fraction=0.0,
            grad_norm=2.0 if name == "2" else 1.0,
            seeds=seeds,
        )
        for name in ("0", "2")
    ]


def _serve_in_process(bus_url: str, run_id: str, seconds: float) -> None:
    """``esper tamiyo serve`` for ``seconds``, in this process (its handler, without logging set-up)."""
    command = ["tamiyo", "serve", "--bus", bus_url, "--run-id", run_id, "--duration", str(seconds)]
    args = build_parser().parse_args([*command, "--max-parameter-fraction", "10"])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert args.handler(args) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)


def _decided_for(bus: MessageBus, group: str) -> list[AdaptationDecision]:
    subscription = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, group, "o", start="earliest")
    return [d.decode(AdaptationDecision) for d in subscription.poll(100)]


def test_two_runs_on_one_stream_prefix_are_served_by_their_own_controllers(bus_url: str) -> None:
    """Consumer groups are per run: a controller never takes (and acknowledges) another run's
    topology or health, so the second run's controller still learns its model."""
    bus = open_bus(bus_url)
    runs = {name: _training_side(bus, name, heartbeat_s=3600) for name in ("run-a", "run-b")}
    for link in runs.values():
        for step in (10, 20, 30):
            link.observe_telemetry(step, _health(step))
        link.sink.flush(5)
    _serve_in_process(bus_url, "run-a", 1.5)
    _serve_in_process(bus_url, "run-b", 1.5)
    decided = {d.run_id for d in _decided_for(bus, "check")}
    for link in runs.values():
        link.close()
    bus.close()
    assert decided == {"run-a", "run-b"}


def test_a_restarted_controller_learns_the_model_again_from_the_topology_heartbeat(
    bus_url: str,
) -> None:
    """The first controller consumed the run's topology; the second one, in the same consumer
    groups, has only the heartbeat to learn the model from, and decides again."""
    bus = open_bus(bus_url)
    link = _training_side(bus, "restarted", heartbeat_s=0.3)
    stop = threading.Event()

    def train() -> None:  # the training side: a flush every 50 ms, progress with it
        step = 0
        while not stop.is_set():
            step += 10
            link.observe_telemetry(step, _health(step))
            link.observe_progress(step, 1.0)
            stop.wait(0.05)

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        _serve_in_process(bus_url, "restarted", 1.5)
        first = _decided_for(bus, "check")
        _serve_in_process(bus_url, "restarted", 2.0)  # same groups: the topology was taken
        second = _decided_for(bus, "check")
    finally:
        stop.set()
        trainer.join(5)
        link.close()
        bus.close()
    assert first and all(d.run_id == "restarted" for d in first)
    assert second, "the restarted controller never learnt the model"


# -- resuming: the consumer group keeps what the checkpoint does not hold -------------------------


def test_a_resumed_link_reclaims_the_decisions_taken_after_its_checkpoint_over_redis(
    bus_url: str, redis_url: str
) -> None:
    bus = open_bus(bus_url)
    link = _training_side(bus, "resumed", heartbeat_s=3600)
    decisions = [
        AdaptationDecision(
            run_id="resumed",
            step=step,
            action=AdaptationAction.CULL,
            layer_name="0",
            seed_idx=0,
            policy="test",
            confidence=1.0,
            uncertainty=0.0,
        )
        for step in (1, 2, 3)
    ]
    checkpoint: dict[str, Any] = {}
    for decision in decisions:
        bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)
        deadline = time.monotonic() + 10
        while not link.poll(decision.step).decisions:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if decision.step < 3:
            checkpoint = link.state_dict()  # checkpoints after d1 and d2; the run dies after d3
    link.close()
    prefix = bus_url.split("stream_prefix=")[1]
    raw = redis.Redis.from_url(redis_url)
    key = f"{prefix}:{Topic.CONTROL_KASMINA_COMMANDS}"
    assert raw.xpending(key, "tolaria-resumed")["pending"] == 2  # d2, d3

    resumed = _training_side(bus, "resumed", heartbeat_s=3600)
    resumed.load_state_dict(checkpoint)  # the checkpoint after d2
    taken: list[AdaptationDecision] = []
    deadline = time.monotonic() + 10
    while resumed.counters.get("duplicates", 0) < 1 or not taken:
        assert time.monotonic() < deadline, resumed.counters
        taken += resumed.poll(3).decisions
        time.sleep(0.01)
    resumed.close()
    assert [d.decision_id for d in taken] == [decisions[2].decision_id]  # d3 again, d2 not
    assert raw.xpending(key, "tolaria-resumed")["pending"] == 1  # d3, until two checkpoints
    raw.close()
    bus.close()


# -- the controller dies and another one starts (slow) ---------------------------------------------


@pytest.mark.slow
def test_training_goes_on_when_the_controller_dies_and_decisions_resume_with_a_new_one(
    bus_url: str, tmp_path: Path
) -> None:
    observer = CommandsObserver(bus_url)
    first = _serve(bus_url, "service-restart", tmp_path, "--policy", "round_robin")
    run = _train(bus_url, "service-restart", tmp_path, "train.epochs=60")
    second: Process | None = None
    try:
        observer.wait_for(lambda seen: len(seen) >= 1)
        first.stop(signal.SIGKILL)  # dies mid-run, without a word
        time.sleep(1.0)
        assert run.popen.poll() is None, run.output  # training goes on
        second = _serve(bus_url, "service-restart", tmp_path, "--policy", "round_robin")
        observer.wait_for(
            lambda seen: any(_pid(d.envelope.sender) == second.popen.pid for d in seen)  # type: ignore[union-attr]
        )
        assert run.finish() == 0, run.output
    finally:
        run.stop(signal.SIGINT)
        first.stop()
        if second is not None:
            second.stop()
    senders = observer.senders()
    observer.close()

    decisions = _records(tmp_path, "service-restart", "decision")
    ids = [d["decision_id"] for d in decisions]
    assert len(set(ids)) == len(ids)  # none applied twice
    by = {_pid(senders[i]) for i in ids}
    assert by == {first.popen.pid, second.popen.pid}  # decisions from both controllers
    counters = _info(tmp_path, "service-restart")["growth_counters"]
    assert counters["controller.received"] == len(ids) and "executor.duplicates" not in counters
    assert _info(tmp_path, "service-restart")["status"] == "completed"


@pytest.mark.slow
def test_a_service_run_on_two_ranks_consumes_on_rank_0_and_grows_in_lockstep(
    bus_url: str, tmp_path: Path
) -> None:
    observer = CommandsObserver(bus_url)
    controller = _serve(bus_url, "service-ddp", tmp_path, "--policy", "round_robin")
    try:
        run = _train(
            bus_url,
            "service-ddp",
            tmp_path,
            *("train.epochs=12", "urza.worker=process", "growth.precompile=true"),
            *("--nproc", "2"),
        )
        assert run.finish(timeout=600) == 0, run.output
    finally:
        controller.stop()
    senders = observer.senders()
    observer.close()

    info = _info(tmp_path, "service-ddp")
    assert info["world_size"] == 2 and info["replicas_identical"] is True
    decisions = _records(tmp_path, "service-ddp", "decision")
    ids = [d["decision_id"] for d in decisions]
    assert decisions and len(set(ids)) == len(ids)
    assert all(_pid(senders[i]) == controller.popen.pid for i in ids)
    counters = info["growth_counters"]
    assert counters["executor.germinated"] >= 1 and counters["controller.received"] == len(ids)
