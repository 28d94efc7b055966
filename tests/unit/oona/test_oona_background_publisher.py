"""BackgroundPublisher: never blocks or raises; counts every drop; resumes when the bus is back.

The buses below are test doubles of Oona's own ``MessageBus`` interface around a real
``InProcessBus``: one that can be switched "down", one that gets stuck inside ``publish``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from esper.contracts import Contract, Envelope, KernelReady, Topic
from esper.errors import ConfigurationError
from esper.oona import BackgroundPublisher, BusUnavailableError, InProcessBus, Subscription

KernelReadyFactory = Callable[[int], KernelReady]


class SwitchableBus(InProcessBus):
    """An in-process bus whose publishing fails as if its server were down while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__(sender="switchable")
        self.down = False
        self.unexpected_failure: Exception | None = None
        self.attempts = 0

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        self.attempts += 1
        if self.unexpected_failure is not None:
            raise self.unexpected_failure
        if self.down:
            raise BusUnavailableError("simulated: connection refused")
        return super().publish_envelopes(envelopes)


class StuckBus(InProcessBus):
    """An in-process bus whose ``publish_envelopes`` waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(sender="stuck")
        self.entered = threading.Event()
        self.release = threading.Event()

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        self.entered.set()
        self.release.wait()
        return super().publish_envelopes(envelopes)


def _drain(subscription: Subscription) -> list[Contract]:
    return [delivery.decode() for delivery in subscription.poll(max_messages=10_000)]


def test_messages_arrive_in_order_stamped_with_the_time_of_the_publish_call(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus(sender="trainer")
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    with BackgroundPublisher(bus) as publisher:
        before = time.time()
        results = [publisher.publish(Topic.KERNEL_READY, kernel_ready(i)) for i in range(50)]
        after = time.time()
        assert publisher.flush(timeout=10)
        counters = publisher.counters

    deliveries = subscription.poll(max_messages=100)
    assert results == [True] * 50
    assert counters.published == 50
    assert counters.dropped == 0
    assert [d.decode() for d in deliveries] == [kernel_ready(i) for i in range(50)]
    assert all(before <= d.envelope.timestamp <= after for d in deliveries)
    assert {d.envelope.sender for d in deliveries} == {"trainer"}


def test_a_full_queue_drops_and_counts_without_blocking(kernel_ready: KernelReadyFactory) -> None:
    bus = StuckBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    publisher = BackgroundPublisher(bus, max_queue=4, max_batch=1)
    assert publisher.publish(Topic.KERNEL_READY, kernel_ready(0))
    assert bus.entered.wait(timeout=10)  # the worker is now stuck inside the bus

    # None of these calls may wait for the stuck bus (a block here would hang the test).
    results = [publisher.publish(Topic.KERNEL_READY, kernel_ready(i)) for i in range(1, 8)]

    assert results == [True] * 4 + [False] * 3
    assert publisher.queue_depth == 4
    assert publisher.counters.dropped_queue_full == 3
    bus.release.set()
    assert publisher.close(timeout=10)
    assert publisher.counters.published == 5
    assert _drain(subscription) == [kernel_ready(i) for i in range(5)]


def test_bus_down_drops_are_counted_and_publishing_resumes_when_it_is_back(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = SwitchableBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    publisher = BackgroundPublisher(bus, retry_initial_s=0.01, retry_max_s=0.05)
    bus.down = True
    for index in range(20):
        assert publisher.publish(Topic.KERNEL_READY, kernel_ready(index))  # never raises
    assert publisher.flush(timeout=10)
    assert publisher.counters.dropped_bus_down == 20
    assert publisher.counters.published == 0
    assert publisher.bus_down

    bus.down = False
    deadline = time.monotonic() + 10
    sent = 20
    while publisher.counters.published == 0 and time.monotonic() < deadline:
        publisher.publish(Topic.KERNEL_READY, kernel_ready(sent))
        sent += 1
        publisher.flush(timeout=10)
        time.sleep(0.01)
    publisher.publish(Topic.KERNEL_READY, kernel_ready(9999))
    assert publisher.close(timeout=10)

    counters = publisher.counters
    assert not publisher.bus_down
    assert counters.published >= 2
    assert counters.published + counters.dropped_bus_down == sent + 1
    assert counters.errors == counters.dropped_queue_full == 0
    assert _drain(subscription)[-1] == kernel_ready(9999)


def test_while_the_bus_is_down_it_is_retried_with_backoff_not_per_message(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = SwitchableBus()
    bus.down = True
    publisher = BackgroundPublisher(bus, max_batch=1, retry_initial_s=5.0, retry_max_s=5.0)
    for index in range(30):
        publisher.publish(Topic.KERNEL_READY, kernel_ready(index))
    assert publisher.close(timeout=10)
    assert publisher.counters.dropped_bus_down == 30
    assert bus.attempts == 1  # one failed attempt; the rest were dropped until the next retry


def test_unexpected_bus_failures_are_counted_as_errors_and_the_worker_survives(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = SwitchableBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    publisher = BackgroundPublisher(bus)
    bus.unexpected_failure = RuntimeError("simulated bug in a backend")
    publisher.publish(Topic.KERNEL_READY, kernel_ready(0))
    assert publisher.flush(timeout=10)
    bus.unexpected_failure = None
    publisher.publish(Topic.KERNEL_READY, kernel_ready(1))
    assert publisher.close(timeout=10)

    assert publisher.counters.errors == 1
    assert publisher.counters.published == 1
    assert _drain(subscription) == [kernel_ready(1)]


def test_a_message_that_cannot_be_encoded_is_an_error_not_an_exception(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    publisher = BackgroundPublisher(bus)
    assert publisher.publish("Not A Valid Topic!", kernel_ready(0))
    assert publisher.publish(Topic.KERNEL_READY, kernel_ready(1))
    assert publisher.close(timeout=10)
    assert publisher.counters.errors == 1
    assert publisher.counters.published == 1
    assert _drain(subscription) == [kernel_ready(1)]


def test_close_sends_everything_queued_then_refuses_new_messages(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    publisher = BackgroundPublisher(bus)
    for index in range(200):
        publisher.publish(Topic.KERNEL_READY, kernel_ready(index))
    assert publisher.close(timeout=10)
    assert not publisher.publish(Topic.KERNEL_READY, kernel_ready(200))
    assert publisher.counters.published == 200
    assert publisher.counters.dropped_closed == 1
    assert len(_drain(subscription)) == 200


def test_close_gives_up_after_its_timeout_on_a_stuck_bus(kernel_ready: KernelReadyFactory) -> None:
    bus = StuckBus()
    publisher = BackgroundPublisher(bus)
    publisher.publish(Topic.KERNEL_READY, kernel_ready(0))
    assert bus.entered.wait(timeout=10)
    assert not publisher.close(timeout=0.05)
    assert not publisher.flush(timeout=0.01)
    bus.release.set()
    assert publisher.close(timeout=10)
    assert publisher.counters.published == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_queue": 0}, "max_queue"),
        ({"max_batch": 0}, "max_batch"),
        ({"retry_initial_s": 0.0}, "retry_initial_s"),
        ({"retry_initial_s": 3.0, "retry_max_s": 1.0}, "retry_max_s"),
    ],
)
def test_invalid_options_are_configuration_errors(options: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        BackgroundPublisher(InProcessBus(), **options)  # type: ignore[arg-type]
