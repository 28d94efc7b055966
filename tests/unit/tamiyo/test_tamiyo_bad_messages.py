"""Issue 9 item 11: a bad message is dropped alone (in-process bus; Redis in tests/integration).

In every Tamiyo consumer loop (the controller's inbox, the health collector), a message that does
not decode or that cannot be taken in is logged, counted and acknowledged on its own; the valid
messages read with it are observed and acknowledged, and nothing is left pending.
"""

from __future__ import annotations

import logging
import math

import pytest
from torch import nn

import esper
from esper.contracts import (
    Envelope,
    HealthSignal,
    HealthSignalBatch,
    LayerKind,
    ModelTopology,
    SeedHealth,
    SeedState,
    Topic,
    TrainingProgress,
)
from esper.errors import ConfigurationError
from esper.oona import InProcessBus
from esper.tamiyo.baselines import BottleneckPolicy
from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.controller_loop import CONTROLLER_TOPICS
from esper.tamiyo.health import HealthCollector
from esper.tamiyo.topology import model_topology

RUN = "r"


def _topology() -> ModelTopology:
    host = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model_topology(esper.wrap(host, seeds_per_layer=2), run_id=RUN)


def _progress(step: int) -> TrainingProgress:
    return TrainingProgress(
        run_id=RUN, step=step, total_steps=100, loss=1.0, base_parameters=212, kernel_parameters=0
    )


def _signal(step: int, grad: float | None = 1.0) -> HealthSignal:
    seed = SeedHealth(
        seed_idx=0,
        state=SeedState.DORMANT,
        alpha=0.0,
        contribution_rms=0.0,
        nonfinite_output=False,
        error_count=0,
    )
    return HealthSignal(
        layer_name="0",
        layer_kind=LayerKind.LINEAR,
        step=step,
        timestamp=0.0,
        samples=4,
        output_mean=0.0,
        output_std=1.0,
        dead_fraction=0.0,
        grad_norm=grad,
        seeds=(seed,),
    )


def _pending(bus: InProcessBus, topic: str, group: str) -> int:
    return bus.subscribe(topic, group, "someone-else").pending_count()


def test_a_topology_that_fails_observe_is_dropped_alone_and_its_batch_is_observed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = InProcessBus()
    controller = TamiyoController(bus, BottleneckPolicy(), run_id=RUN)
    good = _topology()
    bad = good.model_copy(update={"edges": ((0, 9),), "base_parameters": 1})  # node 9: none
    with pytest.raises(ConfigurationError, match="outside"):
        controller.observe(bad)  # what the inbox meets: observe() refuses it ...
    assert not controller.ready and controller.state_dict()["topology"] is None  # ... unchanged
    bus.publish(Topic.TELEMETRY_TOPOLOGY, bad)
    bus.publish(Topic.TELEMETRY_TOPOLOGY, good)  # same read as the bad one
    bus.publish(Topic.TELEMETRY_PROGRESS, _progress(7))

    caplog.set_level(logging.WARNING)
    controller.poll_bus()

    assert controller.ready and controller.state_dict()["topology"]["base_parameters"] == 212
    assert controller.latest_step == 7
    assert controller.counters["rejected"] == 1
    assert "could not be handled" in caplog.text and "outside 0..1" in caplog.text
    for topic in CONTROLLER_TOPICS:
        assert _pending(bus, topic, f"tamiyo-{topic}") == 0


def test_an_undecodable_control_message_is_dropped_alone() -> None:
    bus = InProcessBus()
    controller = TamiyoController(bus, BottleneckPolicy(), run_id=RUN, topology=_topology())
    bus.publish(Topic.TELEMETRY_PROGRESS, _topology())  # the wrong contract on the topic
    garbage = Envelope(
        topic=Topic.TELEMETRY_PROGRESS, sender="x", payload_type="TrainingProgress", payload={}
    )
    bus.publish_envelopes([garbage])
    bus.publish(Topic.TELEMETRY_PROGRESS, _progress(9))

    assert controller.poll_bus() == 3

    assert controller.counters["undecodable"] == 2 and controller.latest_step == 9
    assert _pending(bus, Topic.TELEMETRY_PROGRESS, f"tamiyo-{Topic.TELEMETRY_PROGRESS}") == 0


def test_a_health_batch_the_collector_cannot_use_costs_only_itself() -> None:
    bus = InProcessBus()
    collector = HealthCollector(bus, group="g", smoothing=1.0)
    bus.publish(
        Topic.TELEMETRY_HEALTH, HealthSignalBatch(run_id=RUN, step=1, signals=(_signal(1),))
    )
    impossible = HealthSignalBatch(run_id=RUN, step=2, signals=(_signal(2, grad=-4.0),))
    bus.publish(Topic.TELEMETRY_HEALTH, impossible)  # a negative gradient norm
    bus.publish(Topic.TELEMETRY_HEALTH, _signal(3))  # not a batch at all
    last = HealthSignalBatch(run_id=RUN, step=4, signals=(_signal(4, grad=math.e),))
    bus.publish(Topic.TELEMETRY_HEALTH, last)

    assert collector.poll_once() == 4

    assert collector.latest_step == 4 and collector.counters["batches"] == 3
    assert collector.counters["undecodable"] == 1 and collector.counters["nonfinite_values"] == 1
    assert collector.summaries()["0"].log_grad_norm == pytest.approx(1.0)  # the newest, ln e
    assert _pending(bus, Topic.TELEMETRY_HEALTH, "g") == 0
