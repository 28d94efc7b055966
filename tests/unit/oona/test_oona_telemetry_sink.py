"""OonaTelemetrySink: one HealthSignalBatch per telemetry flush; never blocks, never raises."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from esper.contracts import Envelope, HealthSignal, HealthSignalBatch, Topic
from esper.oona import BusUnavailableError, InProcessBus, OonaTelemetrySink

HealthSignalFactory = Callable[..., HealthSignal]


class DownBus(InProcessBus):
    """An in-process bus that behaves as if its server were unreachable."""

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        raise BusUnavailableError("simulated: connection refused")


def test_each_flush_becomes_one_batch_on_the_health_topic(
    health_signal: HealthSignalFactory,
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.TELEMETRY_HEALTH, group="tamiyo", consumer="c")
    first_flush = [health_signal("fc1", 10), health_signal("fc2", 12)]
    second_flush = [health_signal("fc1", 20)]

    with OonaTelemetrySink(bus, run_id="run-7") as sink:
        sink.publish(first_flush)
        sink.publish(second_flush, step=25, run_id="run-7b")
        assert sink.flush(timeout=10)
        assert sink.counters.published == 2

    batches = [d.decode(HealthSignalBatch) for d in subscription.poll()]
    assert batches == [
        HealthSignalBatch(run_id="run-7", step=12, signals=tuple(first_flush)),
        HealthSignalBatch(run_id="run-7b", step=25, signals=tuple(second_flush)),
    ]


def test_an_empty_flush_is_published_at_step_zero() -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.TELEMETRY_HEALTH, group="g", consumer="c")
    with OonaTelemetrySink(bus, run_id="r") as sink:
        sink.publish([])
    [delivery] = subscription.poll()
    assert delivery.decode(HealthSignalBatch) == HealthSignalBatch(run_id="r", step=0, signals=())


def test_invalid_signals_are_counted_and_logged_not_raised(
    health_signal: HealthSignalFactory,
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.TELEMETRY_HEALTH, group="g", consumer="c")
    with OonaTelemetrySink(bus, run_id="r") as sink:
        sink.publish(["not a health signal"])  # type: ignore[list-item]
        sink.publish([health_signal("fc1", 3)])
    assert sink.encode_errors == 1
    assert sink.counters.published == 1
    assert len(subscription.poll()) == 1


def test_a_dead_bus_costs_dropped_batches_not_exceptions(
    health_signal: HealthSignalFactory,
) -> None:
    sink = OonaTelemetrySink(DownBus(), run_id="r", retry_max_s=0.05)
    for step in range(10):
        sink.publish([health_signal("fc1", step)])
    assert sink.close(timeout=10)
    assert sink.counters.dropped_bus_down == 10
    assert sink.counters.published == 0
