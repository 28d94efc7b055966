"""End-to-end decision latency of Tamiyo as a service, through Redis, under a real ``esper train``.

Run: ``python benchmarks/service_decision_latency.py [--redis redis://127.0.0.1:6379/0]
[--epochs 150] [--telemetry-every 10]`` (about a minute on 2 CPU cores; needs a Redis server).

A digits run with ``growth.controller=service`` trains in this process while ``esper tamiyo serve``
decides in another one (bottleneck policy; its gates opened up, no cooldown, so it decides on
every 100 ms cycle that has new telemetry). The run's own limits let a few germinations through and
refuse the rest (their refusals reach the controller, which then decides again), so one run gives
hundreds of decisions. For each decision the run took in:

* **latency** = the wall time the run took it in at a step boundary (the run's observer sees the
  decision event there) − the wall time the run published the telemetry flush the decision is
  based on (its envelope's timestamp, set when ``publish`` was called on the training thread);
  split into *telemetry → decision published* (the controller's 50 ms health poll, its 100 ms
  cycle, the policy) and *published → taken in* (Redis, the run's background subscriber, the
  next step boundary);
* **cadences**: intervals between the health batches the run published, and between the decisions
  the controller published.

Reported as p50/p99 in milliseconds (absolute times: the controller's budget is its 100 ms cycle),
with the run's median step time for scale.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from esper.contracts import AdaptationDecision, HealthSignalBatch, Topic
from esper.oona import open_bus
from esper.tolaria import load_config, train
from esper.tolaria.metrics import read_metrics
from esper.tolaria.progress import SilentObserver

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(name: str, values_s: list[float]) -> str:
    """``name: p50 … ms, p99 … ms (n …)`` of values in seconds."""
    if not values_s:
        return f"{name}: no values"
    p50, p99 = percentile(values_s, 0.5) * 1e3, percentile(values_s, 0.99) * 1e3
    return f"{name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms (n {len(values_s)})"


class DecisionClock(SilentObserver):
    """Notes the wall time at which the run took in each decision (at a step boundary)."""

    def __init__(self) -> None:
        self.taken_at: dict[str, float] = {}

    def on_event(self, record: Mapping[str, Any]) -> None:
        if record["type"] == "decision":
            self.taken_at[str(record["decision_id"])] = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--epochs", type=int, default=150, help="digits epochs of 81 steps")
    parser.add_argument("--telemetry-every", type=int, default=10, help="steps between flushes")
    args = parser.parse_args()
    logging.getLogger("esper").setLevel(logging.ERROR)  # the run refuses most decisions: quietly

    prefix = f"esper-bench-{uuid.uuid4().hex[:8]}"
    bus_url = f"{args.redis}?stream_prefix={prefix}"
    run_id = "service-latency"
    observer_bus = open_bus(bus_url)
    health = observer_bus.subscribe(Topic.TELEMETRY_HEALTH, "bench", "b", start="earliest")
    commands = observer_bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "bench", "b")
    serve = subprocess.Popen(
        [
            *(sys.executable, "-m", "esper.cli", "tamiyo", "serve", "--bus", bus_url),
            *("--run-id", run_id, "--policy", "bottleneck", "--cooldown-steps", "0"),
            *("--window-steps", "1000000", "--max-adaptations", "1000000"),
            *("--max-parameter-fraction", "1000", "--cycle-ms", "100"),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert serve.stdout is not None
    serve.stdout.readline()  # "Tamiyo controller for run …": its consumer groups exist
    clock = DecisionClock()
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(
            ROOT / "configs" / "digits.yaml",
            overrides=[
                "growth.controller=service",
                f"growth.bus={bus_url}",
                f"run.id={run_id}",
                f"run.dir={folder}",
                f"train.epochs={args.epochs}",
                "train.checkpoint=false",
                "data.batch_size=16",
                f"growth.telemetry_every={args.telemetry_every}",
                "growth.start_step=0",
                "growth.stop_fraction=1.0",
            ],
        )
        try:
            result = train(config, observer=clock)
        finally:
            serve.send_signal(signal.SIGTERM)
            serve_output = serve.communicate(timeout=30)[0]
        records = list(read_metrics(result.folder.metrics_path))
    step_ms = statistics.median(r["step_time_ms"] for r in records if r["type"] == "step")
    grafted = {r["decision_id"] for r in records if r["type"] == "reward"}

    flushed_at: dict[int, float] = {}
    while deliveries := health.poll(1000):
        for delivery in deliveries:
            flushed_at[delivery.decode(HealthSignalBatch).step] = delivery.envelope.timestamp
    published: dict[str, tuple[int, float]] = {}
    while deliveries := commands.poll(1000):
        for delivery in deliveries:
            decision = delivery.decode(AdaptationDecision)
            published[decision.decision_id] = (decision.step, delivery.envelope.timestamp)
    observer_bus.close()
    client = redis.Redis.from_url(args.redis)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()

    total, controller_side, transport, kept = [], [], [], []
    for decision_id, taken in clock.taken_at.items():
        step, sent = published[decision_id]
        if step not in flushed_at:
            continue
        total.append(taken - flushed_at[step])
        controller_side.append(sent - flushed_at[step])
        transport.append(taken - sent)
        if decision_id in grafted:
            kept.append(taken - flushed_at[step])
    flushes = sorted(flushed_at.values())
    sends = sorted(sent for _, sent in published.values())
    print(
        f"digits, {len(records)} records, median step {step_ms:.2f} ms, telemetry every "
        f"{args.telemetry_every} steps; {len(clock.taken_at)} decisions taken in, "
        f"{len(grafted)} of them grafted and judged"
    )
    print(summary("latency, telemetry published -> decision taken in at a step boundary", total))
    print(
        summary(
            "  of which telemetry published -> decision published (controller)", controller_side
        )
    )
    print(
        summary(
            "  of which decision published -> taken in (Redis, subscriber, boundary)", transport
        )
    )
    print(summary("latency of the grafted decisions", kept))
    print(
        summary(
            "cadence: interval between health batches",
            [b - a for a, b in itertools.pairwise(flushes)],
        )
    )
    print(
        summary(
            "cadence: interval between decisions", [b - a for a, b in itertools.pairwise(sends)]
        )
    )
    print("controller: " + serve_output.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
