"""RedisStreamsBus against a real Redis: consumer groups, XAUTOCLAIM, MAXLEN, a server that dies.

Every test writes under its own random stream prefix and deletes its keys afterwards, so it can
share a Redis server with other test runs. The outage test starts a private ``redis-server`` on a
free port, kills it mid-run and restarts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from esper.contracts import Envelope, KernelReady, Topic
from esper.oona import (
    BackgroundPublisher,
    BackgroundSubscriber,
    BusUnavailableError,
    make_envelope,
    open_bus,
)
from esper.oona.redis_streams import RedisStreamsBus
from factories import kernel_ready
from servers import free_port, start_redis_server

pytestmark = pytest.mark.services


def _envelope(bus: RedisStreamsBus, index: int) -> Envelope:
    return make_envelope(Topic.KERNEL_READY, kernel_ready(index), sender=bus.sender)


def delete_streams(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def stream_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"esper-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_streams(redis_url, prefix)


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client, to look at (or tamper with) the streams directly."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def bus(redis_url: str, stream_prefix: str) -> Iterator[RedisStreamsBus]:
    opened = RedisStreamsBus(redis_url, sender="test-sender", stream_prefix=stream_prefix)
    yield opened
    opened.close()


def test_round_trip_through_open_bus_keeps_every_envelope_field(
    redis_url: str, stream_prefix: str, raw_redis: redis.Redis
) -> None:
    bus = open_bus(f"{redis_url}?stream_prefix={stream_prefix}", sender="tezzeret-1")
    try:
        subscription = bus.subscribe(Topic.KERNEL_READY, group="tamiyo", consumer="c1")
        before = time.time()
        message_id = bus.publish(Topic.KERNEL_READY, kernel_ready(1), trace_id="trace-9")

        [delivery] = subscription.poll(block_ms=1000)
    finally:
        bus.close()

    envelope = delivery.envelope
    assert delivery.message_id == message_id
    assert (delivery.topic, delivery.group, delivery.consumer) == ("kernel.ready", "tamiyo", "c1")
    assert delivery.delivery_count == 1
    assert (envelope.topic, envelope.sender, envelope.trace_id) == (
        "kernel.ready",
        "tezzeret-1",
        "trace-9",
    )
    assert envelope.payload_type == "KernelReady"
    assert before <= envelope.timestamp <= time.time()
    assert delivery.decode(KernelReady) == kernel_ready(1)
    assert raw_redis.exists(f"{stream_prefix}:kernel.ready") == 1


def test_groups_each_get_every_message_and_consumers_of_a_group_split_them(
    bus: RedisStreamsBus,
) -> None:
    worker_1 = bus.subscribe(Topic.KERNEL_READY, group="workers", consumer="w1")
    worker_2 = bus.subscribe(Topic.KERNEL_READY, group="workers", consumer="w2")
    audit = bus.subscribe(Topic.KERNEL_READY, group="audit", consumer="a1")
    sent = bus.publish_envelopes([_envelope(bus, index) for index in range(10)])

    first = worker_1.poll(max_messages=4)
    second = worker_2.poll(max_messages=100)

    assert [d.message_id for d in first + second] == sent
    assert (len(first), len(second)) == (4, 6)
    assert [d.message_id for d in audit.poll()] == sent
    assert worker_1.pending_count() == 10
    assert worker_1.ack(*first) == 4
    assert worker_2.ack(*second) == 6
    assert worker_2.ack(*second) == 0
    assert worker_1.pending_count() == 0


def test_xautoclaim_hands_a_killed_consumers_messages_to_a_survivor(
    bus: RedisStreamsBus, redis_url: str, stream_prefix: str
) -> None:
    survivor = bus.subscribe(Topic.KERNEL_READY, group="workers", consumer="survivor")
    for index in range(3):
        bus.publish(Topic.KERNEL_READY, kernel_ready(index))
    # Another process, a consumer of the same group, reads the three messages (a plain
    # XREADGROUP: it imports only redis, so it starts fast) and is SIGKILLed before acking them.
    doomed_script = textwrap.dedent(
        f"""
        import time, redis
        client = redis.Redis.from_url({redis_url!r}, decode_responses=True)
        [[_, entries]] = client.xreadgroup(
            "workers", "doomed", {{{bus.stream_key(Topic.KERNEL_READY)!r}: ">"}}, count=10
        )
        print(" ".join(message_id for message_id, _ in entries), flush=True)
        time.sleep(60)
        """
    )
    doomed = subprocess.Popen(
        [sys.executable, "-c", doomed_script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert doomed.stdout is not None
        read_by_doomed = doomed.stdout.readline().split()
    finally:
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=10)
    assert len(read_by_doomed) == 3

    assert survivor.poll() == []  # already delivered to "doomed": no second normal delivery
    assert survivor.claim_stale(min_idle_ms=60_000) == []  # not idle for a minute yet
    time.sleep(0.2)
    reclaimed = survivor.claim_stale(min_idle_ms=150)

    assert [d.message_id for d in reclaimed] == read_by_doomed
    assert [d.delivery_count for d in reclaimed] == [2, 2, 2]
    assert {d.consumer for d in reclaimed} == {"survivor"}
    assert [d.decode() for d in reclaimed] == [kernel_ready(i) for i in range(3)]
    assert survivor.ack(*reclaimed) == 3
    assert survivor.pending_count() == 0
    assert survivor.claim_stale(min_idle_ms=0) == []


def test_maxlen_trimming_keeps_the_stream_bounded(
    redis_url: str, stream_prefix: str, raw_redis: redis.Redis
) -> None:
    bus = RedisStreamsBus(redis_url, stream_prefix=stream_prefix, max_len=100)
    try:
        for start in range(0, 2000, 250):
            bus.publish_envelopes([_envelope(bus, index) for index in range(start, start + 250)])
        late = bus.subscribe(Topic.KERNEL_READY, group="late", consumer="c")
        retained = late.poll(max_messages=10_000)
    finally:
        bus.close()

    length = raw_redis.xlen(f"{stream_prefix}:kernel.ready")
    # "MAXLEN ~ 100" trims whole radix-tree nodes (100 entries each by default).
    assert 100 <= length <= 200
    assert len(retained) == length
    assert retained[-1].decode() == kernel_ready(1999)


def test_a_long_blocking_poll_is_split_below_the_socket_timeout(
    redis_url: str, stream_prefix: str
) -> None:
    bus = RedisStreamsBus(redis_url, stream_prefix=stream_prefix, socket_timeout_s=0.2)
    try:
        subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
        publisher = threading.Timer(0.35, bus.publish, args=(Topic.KERNEL_READY, kernel_ready(5)))
        publisher.start()
        deliveries = subscription.poll(block_ms=3000)
        publisher.join()
    finally:
        bus.close()
    assert bus.max_block_ms == 100
    assert [d.decode() for d in deliveries] == [kernel_ready(5)]


def test_a_malformed_entry_is_skipped_and_acknowledged(
    bus: RedisStreamsBus, stream_prefix: str, raw_redis: redis.Redis
) -> None:
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    raw_redis.xadd(f"{stream_prefix}:kernel.ready", {"envelope": "{not json"})
    raw_redis.xadd(f"{stream_prefix}:kernel.ready", {"something": "else"})
    bus.publish(Topic.KERNEL_READY, kernel_ready(1))

    deliveries = subscription.poll()

    assert [d.decode() for d in deliveries] == [kernel_ready(1)]
    assert subscription.malformed_dropped == 2
    assert subscription.pending_count() == 1


def test_a_deleted_stream_gets_its_group_back_on_the_next_poll(
    bus: RedisStreamsBus, stream_prefix: str, raw_redis: redis.Redis
) -> None:
    subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
    raw_redis.delete(f"{stream_prefix}:kernel.ready")
    assert subscription.poll() == []
    bus.publish(Topic.KERNEL_READY, kernel_ready(3))
    assert [d.decode() for d in subscription.poll()] == [kernel_ready(3)]


def test_a_background_subscriber_outlives_a_server_error_and_keeps_consuming(
    bus: RedisStreamsBus, stream_prefix: str, raw_redis: redis.Redis
) -> None:
    """Issue 9 item 11: a read that fails with a server error (not an outage) is logged and
    retried; the subscriber's thread must not die of it and leave everything unconsumed."""
    key = f"{stream_prefix}:kernel.ready"
    subscriber = BackgroundSubscriber(
        bus, Topic.KERNEL_READY, group="g", consumer="c", contract=KernelReady
    )
    try:
        raw_redis.delete(key)
        raw_redis.set(key, "not a stream")  # XREADGROUP now answers WRONGTYPE
        deadline = time.monotonic() + 10
        while subscriber.errors == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        raw_redis.delete(key)  # the next read recreates the group (NOGROUP) and goes on
        bus.publish(Topic.KERNEL_READY, kernel_ready(7))
        received: list[tuple[object, KernelReady | None]] = []
        while not received and time.monotonic() < deadline + 10:
            received += subscriber.drain()
            time.sleep(0.02)
        subscriber.ack([delivery for delivery, _ in received])  # type: ignore[misc]
    finally:
        subscriber.close()

    assert subscriber.errors >= 1
    assert [message for _, message in received] == [kernel_ready(7)]
    assert raw_redis.xpending(key, "g")["pending"] == 0


def test_publishing_survives_redis_stopping_mid_run_and_resumes_after_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    server = start_redis_server(port, tmp_path)
    bus = RedisStreamsBus(f"redis://127.0.0.1:{port}/0", stream_prefix="outage")
    publisher = BackgroundPublisher(bus, retry_initial_s=0.05, retry_max_s=0.2)
    try:
        subscription = bus.subscribe(Topic.KERNEL_READY, group="g", consumer="c")
        for index in range(20):
            publisher.publish(Topic.KERNEL_READY, kernel_ready(index))
        assert publisher.flush(timeout=10)
        assert publisher.counters.published == 20
        assert len(subscription.poll()) == 20

        server.kill()
        server.wait(timeout=10)
        slowest_call_s = 0.0
        for index in range(20, 70):
            started = time.perf_counter()
            publisher.publish(Topic.KERNEL_READY, kernel_ready(index))
            slowest_call_s = max(slowest_call_s, time.perf_counter() - started)
            time.sleep(0.005)
        assert publisher.flush(timeout=10)
        # The training thread never waits on the dead server (a connect attempt alone would
        # take up to the 1 s connect timeout); every message sent meanwhile is counted.
        assert slowest_call_s < 0.1
        assert publisher.counters.dropped_bus_down == 50
        assert publisher.counters.published == 20
        assert publisher.bus_down
        with pytest.raises(BusUnavailableError, match=f"127.0.0.1:{port}"):
            subscription.poll()

        server = start_redis_server(port, tmp_path)  # restarted empty: no stream, no group
        sent = 70
        deadline = time.monotonic() + 10
        while publisher.counters.published == 20 and time.monotonic() < deadline:
            publisher.publish(Topic.KERNEL_READY, kernel_ready(sent))
            sent += 1
            time.sleep(0.02)
        publisher.publish(Topic.KERNEL_READY, kernel_ready(10_000))
        assert publisher.flush(timeout=10)

        counters = publisher.counters
        assert not publisher.bus_down
        assert counters.published >= 22
        assert counters.published + counters.dropped_bus_down == sent + 1
        assert counters.errors == counters.dropped_queue_full == 0
        after_restart = [d.decode() for d in subscription.poll(max_messages=1000)]
        assert len(after_restart) == counters.published - 20
        assert after_restart[-1] == kernel_ready(10_000)
    finally:
        publisher.close(timeout=5)
        bus.close()
        server.kill()
        server.wait(timeout=10)
