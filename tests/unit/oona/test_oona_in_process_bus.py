"""InProcessBus: envelopes, consumer groups, pending lists, reclaiming after idle time, trimming."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from esper.contracts import SCHEMA_VERSION, KernelReady, Topic
from esper.errors import ConfigurationError
from esper.oona import BusUnavailableError, InProcessBus
from factories import FakeClock

KernelReadyFactory = Callable[[int], KernelReady]


def test_round_trip_fills_every_envelope_field(kernel_ready: KernelReadyFactory) -> None:
    bus = InProcessBus(sender="tezzeret-7")
    subscription = bus.subscribe(Topic.KERNEL_READY, group="tamiyo", consumer="c1")
    message = kernel_ready(1)
    before = time.time()

    message_id = bus.publish(Topic.KERNEL_READY, message, trace_id="trace-123")

    [delivery] = subscription.poll()
    envelope = delivery.envelope
    assert delivery.message_id == message_id
    assert (delivery.topic, delivery.group, delivery.consumer) == ("kernel.ready", "tamiyo", "c1")
    assert delivery.delivery_count == 1
    assert envelope.topic == "kernel.ready"
    assert envelope.sender == "tezzeret-7"
    assert envelope.trace_id == "trace-123"
    assert envelope.payload_type == "KernelReady"
    assert envelope.payload == message.model_dump(mode="json")
    assert envelope.schema_version == SCHEMA_VERSION
    assert len(envelope.event_id) == 32
    assert before <= envelope.timestamp <= time.time()
    assert delivery.decode() == message
    assert delivery.decode(KernelReady) == message


def test_every_message_gets_a_fresh_event_id_and_trace_id(kernel_ready: KernelReadyFactory) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    for index in range(3):
        bus.publish(Topic.KERNEL_READY, kernel_ready(index))
    envelopes = [delivery.envelope for delivery in subscription.poll()]
    assert len({envelope.event_id for envelope in envelopes}) == 3
    assert len({envelope.trace_id for envelope in envelopes}) == 3


def test_each_group_receives_every_message(kernel_ready: KernelReadyFactory) -> None:
    bus = InProcessBus()
    tamiyo = bus.subscribe(Topic.KERNEL_READY, group="tamiyo", consumer="c1")
    dashboard = bus.subscribe(Topic.KERNEL_READY, group="dashboard", consumer="c1")
    sent = [bus.publish(Topic.KERNEL_READY, kernel_ready(index)) for index in range(5)]

    assert [delivery.message_id for delivery in tamiyo.poll()] == sent
    assert [delivery.message_id for delivery in dashboard.poll()] == sent
    assert tamiyo.poll() == []


def test_consumers_of_one_group_split_the_messages(kernel_ready: KernelReadyFactory) -> None:
    bus = InProcessBus()
    first = bus.subscribe(Topic.KERNEL_READY, group="workers", consumer="w1")
    second = bus.subscribe(Topic.KERNEL_READY, group="workers", consumer="w2")
    sent = [bus.publish(Topic.KERNEL_READY, kernel_ready(index)) for index in range(10)]

    got_first = first.poll(max_messages=4)
    got_second = second.poll(max_messages=100)

    assert len(got_first) == 4
    assert len(got_second) == 6
    assert [d.message_id for d in got_first + got_second] == sent
    assert {d.consumer for d in got_first} == {"w1"}
    assert {d.consumer for d in got_second} == {"w2"}
    assert first.pending_count() == 10


def test_killed_consumer_messages_are_reclaimed_after_idle_time(
    kernel_ready: KernelReadyFactory,
) -> None:
    clock = FakeClock()
    bus = InProcessBus(clock=clock)
    doomed = bus.subscribe(Topic.KERNEL_READY, group="workers", consumer="doomed")
    survivor = bus.subscribe(Topic.KERNEL_READY, group="workers", consumer="survivor")
    for index in range(3):
        bus.publish(Topic.KERNEL_READY, kernel_ready(index))

    read = doomed.poll()
    assert doomed.ack(read[0]) == 1
    # ... and "doomed" dies before acknowledging read[1] and read[2].

    clock.advance(0.5)
    assert survivor.poll() == []  # poll hands out only never-delivered messages
    assert survivor.claim_stale(min_idle_ms=1000) == []  # not idle long enough yet
    clock.advance(0.6)
    reclaimed = survivor.claim_stale(min_idle_ms=1000)

    assert [d.message_id for d in reclaimed] == [read[1].message_id, read[2].message_id]
    assert [d.delivery_count for d in reclaimed] == [2, 2]
    assert {d.consumer for d in reclaimed} == {"survivor"}
    assert [d.decode() for d in reclaimed] == [kernel_ready(1), kernel_ready(2)]
    # The claim restarted their idle time, so nobody can take them straight back.
    assert doomed.claim_stale(min_idle_ms=1000) == []
    assert survivor.ack(*reclaimed) == 2
    assert survivor.pending_count() == 0
    clock.advance(10)
    assert survivor.claim_stale(min_idle_ms=0) == []


def test_claim_stale_respects_max_messages(kernel_ready: KernelReadyFactory) -> None:
    clock = FakeClock()
    bus = InProcessBus(clock=clock)
    reader = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="reader")
    for index in range(5):
        bus.publish(Topic.KERNEL_READY, kernel_ready(index))
    reader.poll()
    clock.advance(1)
    taker = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="taker")
    assert len(taker.claim_stale(min_idle_ms=100, max_messages=2)) == 2
    assert len(taker.claim_stale(min_idle_ms=100, max_messages=10)) == 3


def test_ack_counts_only_pending_messages(kernel_ready: KernelReadyFactory) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    bus.publish(Topic.KERNEL_READY, kernel_ready(0))
    bus.publish(Topic.KERNEL_READY, kernel_ready(1))
    deliveries = subscription.poll()
    assert subscription.ack(*deliveries) == 2
    assert subscription.ack(*deliveries) == 0
    assert subscription.ack() == 0


def test_ack_through_another_groups_subscription_is_refused(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus()
    mine = bus.subscribe(Topic.KERNEL_READY, group="mine", consumer="c")
    theirs = bus.subscribe(Topic.KERNEL_READY, group="theirs", consumer="c")
    bus.publish(Topic.KERNEL_READY, kernel_ready(0))
    [delivery] = mine.poll()
    theirs.poll()
    with pytest.raises(ConfigurationError, match="group 'mine'"):
        theirs.ack(delivery)
    assert theirs.pending_count() == 1
    assert mine.pending_count() == 1


def test_latest_start_skips_history_and_an_existing_group_keeps_its_position(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus()
    bus.publish(Topic.KERNEL_READY, kernel_ready(0))
    live = bus.subscribe(Topic.KERNEL_READY, group="live", consumer="c", start="latest")
    replay = bus.subscribe(Topic.KERNEL_READY, group="replay", consumer="c", start="earliest")
    bus.publish(Topic.KERNEL_READY, kernel_ready(1))

    assert [d.decode() for d in live.poll()] == [kernel_ready(1)]
    assert [d.decode() for d in replay.poll(max_messages=1)] == [kernel_ready(0)]
    rejoined = bus.subscribe(Topic.KERNEL_READY, group="replay", consumer="c2", start="earliest")
    assert [d.decode() for d in rejoined.poll()] == [kernel_ready(1)]


def test_topics_keep_only_the_newest_max_len_messages(kernel_ready: KernelReadyFactory) -> None:
    bus = InProcessBus(max_len=10)
    for index in range(25):
        bus.publish(Topic.KERNEL_READY, kernel_ready(index))
    late = bus.subscribe(Topic.KERNEL_READY, group="late", consumer="c")
    assert [d.decode() for d in late.poll()] == [kernel_ready(i) for i in range(15, 25)]


def test_a_message_trimmed_while_pending_is_dropped_from_the_pending_list(
    kernel_ready: KernelReadyFactory,
) -> None:
    clock = FakeClock()
    bus = InProcessBus(max_len=2, clock=clock)
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    bus.publish(Topic.KERNEL_READY, kernel_ready(0))
    subscription.poll()
    for index in range(1, 4):
        bus.publish(Topic.KERNEL_READY, kernel_ready(index))
    clock.advance(1)
    assert subscription.claim_stale(min_idle_ms=0) == []
    assert subscription.pending_count() == 0


def test_poll_waits_for_a_message_published_by_another_thread(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    assert subscription.poll(block_ms=0) == []
    publisher = threading.Timer(0.05, bus.publish, args=(Topic.KERNEL_READY, kernel_ready(7)))
    publisher.start()
    deliveries = subscription.poll(block_ms=10_000)
    publisher.join()
    assert [d.decode() for d in deliveries] == [kernel_ready(7)]


def test_close_wakes_a_blocked_poll_and_refuses_later_calls(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus()
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    closer = threading.Timer(0.05, bus.close)
    closer.start()
    with pytest.raises(BusUnavailableError, match="closed"):
        subscription.poll(block_ms=10_000)
    closer.join()
    with pytest.raises(BusUnavailableError):
        bus.publish(Topic.KERNEL_READY, kernel_ready(0))


def test_concurrent_publishers_and_consumers_deliver_each_message_once(
    kernel_ready: KernelReadyFactory,
) -> None:
    bus = InProcessBus()
    consumers = [
        bus.subscribe(Topic.KERNEL_READY, group="g", consumer=f"c{index}") for index in range(2)
    ]
    received: list[list[str]] = [[], []]
    done = threading.Event()

    def consume(index: int) -> None:
        while True:
            finished = done.is_set()
            deliveries = consumers[index].poll(max_messages=16, block_ms=20)
            received[index].extend(d.envelope.event_id for d in deliveries)
            if finished and not deliveries:
                return

    def produce(offset: int) -> None:
        for index in range(100):
            bus.publish(Topic.KERNEL_READY, kernel_ready(offset + index))

    threads = [threading.Thread(target=consume, args=(index,)) for index in range(2)]
    threads += [threading.Thread(target=produce, args=(offset,)) for offset in (0, 100, 200, 300)]
    for thread in threads:
        thread.start()
    for thread in threads[2:]:
        thread.join()
    done.set()
    for thread in threads[:2]:
        thread.join()

    all_received = received[0] + received[1]
    assert len(all_received) == 400
    assert len(set(all_received)) == 400


@pytest.mark.parametrize("max_len", [0, -5])
def test_max_len_must_be_positive(max_len: int) -> None:
    with pytest.raises(ConfigurationError, match="max_len"):
        InProcessBus(max_len=max_len)


def test_max_messages_must_be_at_least_one() -> None:
    subscription = InProcessBus().subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    with pytest.raises(ConfigurationError, match="max_messages"):
        subscription.poll(max_messages=0)
    with pytest.raises(ConfigurationError, match="max_messages"):
        subscription.claim_stale(min_idle_ms=0, max_messages=0)
