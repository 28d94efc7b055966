"""Per-message consumption: one message's failure never costs the others of its batch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from esper.contracts import KernelReady, Topic
from esper.oona import BusUnavailableError, Delivery, InProcessBus
from esper.oona.consuming import Acknowledger, handle_each


def test_each_delivery_is_handled_on_its_own(kernel_ready: Callable[[int], KernelReady]) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, "g", "c")
    for index in range(4):
        bus.publish(Topic.KERNEL_READY, kernel_ready(index))
    bus.publish(Topic.KERNEL_READY, kernel_ready(9))
    deliveries = subscription.poll(10)
    taken: list[str] = []

    def take(delivery: Delivery) -> None:
        message = delivery.decode(KernelReady)
        if message.kernel_id.endswith("2"):
            raise ValueError("kernel 2 refers to nothing this consumer knows")
        taken.append(message.kernel_id[-1])

    counters: Counter[str] = Counter()
    handled = handle_each(deliveries, take, consumer="test", counters=counters)
    Acknowledger(subscription).ack(deliveries)

    assert handled == 4 and taken == ["0", "1", "3", "9"]
    assert counters == Counter({"rejected": 1})
    assert subscription.pending_count() == 0


def test_an_undecodable_delivery_is_counted_apart(
    kernel_ready: Callable[[int], KernelReady], health_signal: Callable[..., object]
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, "g", "c")
    bus.publish(Topic.KERNEL_READY, health_signal())  # the wrong contract on the topic
    bus.publish(Topic.KERNEL_READY, kernel_ready(1))
    counters: Counter[str] = Counter()

    handled = handle_each(
        subscription.poll(10), lambda d: d.decode(KernelReady), consumer="t", counters=counters
    )

    assert handled == 1 and counters == Counter({"undecodable": 1})


def test_acknowledgements_the_bus_did_not_take_are_kept(
    kernel_ready: Callable[[int], KernelReady],
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, "g", "c")
    bus.publish(Topic.KERNEL_READY, kernel_ready(1))
    deliveries = subscription.poll(10)
    acks = Acknowledger(subscription)
    bus.close()

    with pytest.raises(BusUnavailableError):
        acks.ack(deliveries)

    assert acks.backlog == 1  # sent with the next call, once the bus is back
