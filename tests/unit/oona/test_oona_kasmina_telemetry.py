"""End to end on one process: a wrapped model's telemetry flush arrives on telemetry.health."""

from __future__ import annotations

import torch
from torch import nn

from esper.contracts import HealthSignalBatch, Topic
from esper.core import TelemetrySink, wrap
from esper.oona import InProcessBus, OonaTelemetrySink


def test_collect_telemetry_publishes_one_batch_per_flush_through_the_sink() -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.TELEMETRY_HEALTH, group="tamiyo", consumer="c")
    sink: TelemetrySink = OonaTelemetrySink(bus, run_id="run-1")
    model = wrap(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
        seeds_per_layer=2,
        telemetry_sink=sink,
        health_every=1,
    )
    model(torch.randn(5, 8))

    signals = model.collect_telemetry()
    assert isinstance(sink, OonaTelemetrySink)
    assert sink.close(timeout=10)

    [delivery] = subscription.poll(block_ms=1000)
    batch = delivery.decode(HealthSignalBatch)
    assert batch.run_id == "run-1"
    assert batch.signals == tuple(signals)
    assert len(batch.signals) == 2
    assert sink.counters.published == 1
