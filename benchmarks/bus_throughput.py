"""Bus throughput benchmark: publish rate and publish-to-delivery lag, in-process vs Redis Streams.

Run it with ``python benchmarks/bus_throughput.py`` (options: ``--messages``, ``--rate``,
``--redis-url``; the Redis URL defaults to ``$ESPER_TEST_REDIS_URL`` or redis://127.0.0.1:6379/0,
and the Redis row is skipped when no server answers there).

Every message is a real ``HealthSignalBatch``: the telemetry flush of a wrapped 8-layer MLP with
4 seeds per layer (its JSON size is printed).
Measured per backend:

- ``publish``: ``bus.publish`` called once per message (envelope + JSON + one round trip), msgs/s;
- ``batched``: ``bus.publish_envelopes`` with 256 envelopes per call (one pipelined round trip);
- ``caller``: ``BackgroundPublisher.publish`` calls/s, i.e. what the training thread pays;
- lag p50/p99: from the ``publish`` call on the training side (through a BackgroundPublisher) to
  the message coming out of ``poll`` in a consumer thread, at a paced ``--rate`` msgs/s.

The Redis/in-process ratio is printed too. Redis streams are written under a random key prefix
and deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass

from esper.contracts import HealthSignalBatch, Topic
from esper.oona import BackgroundPublisher, MessageBus, make_envelope, open_bus

BATCH_SIZE = 256


@dataclass(frozen=True)
class BusResult:
    """What was measured on one backend."""

    backend: str
    publish_per_s: float
    batched_per_s: float
    caller_per_s: float
    lag_p50_ms: float
    lag_p99_ms: float


def health_batch(step: int) -> HealthSignalBatch:
    """A real telemetry flush: a wrapped 8-layer MLP with 4 seeds per layer, after one step."""
    import torch
    from torch import nn

    from esper.core import wrap

    torch.manual_seed(0)
    layers = [module for _ in range(8) for module in (nn.Linear(32, 32), nn.ReLU())]
    model = wrap(nn.Sequential(*layers), seeds_per_layer=4, health_every=1)
    model(torch.randn(16, 32)).sum().backward()
    return HealthSignalBatch(run_id="bench", step=step, signals=tuple(model.collect_telemetry()))


def measure_publish(bus: MessageBus, message: HealthSignalBatch, messages: int) -> float:
    """Messages per second through ``bus.publish``, one call per message."""
    started = time.perf_counter()
    for _ in range(messages):
        bus.publish(Topic.TELEMETRY_HEALTH, message)
    return messages / (time.perf_counter() - started)


def measure_batched(bus: MessageBus, message: HealthSignalBatch, messages: int) -> float:
    """Messages per second through ``bus.publish_envelopes``, ``BATCH_SIZE`` per call."""
    started = time.perf_counter()
    for start in range(0, messages, BATCH_SIZE):
        count = min(BATCH_SIZE, messages - start)
        envelopes = [
            make_envelope(Topic.TELEMETRY_HEALTH, message, sender=bus.sender) for _ in range(count)
        ]
        bus.publish_envelopes(envelopes)
    return messages / (time.perf_counter() - started)


def measure_caller(bus: MessageBus, message: HealthSignalBatch, messages: int) -> float:
    """``BackgroundPublisher.publish`` calls per second (queue big enough to drop nothing)."""
    publisher = BackgroundPublisher(bus, max_queue=messages)
    started = time.perf_counter()
    for _ in range(messages):
        publisher.publish(Topic.TELEMETRY_HEALTH, message)
    elapsed = time.perf_counter() - started
    publisher.close(timeout=60)
    return messages / elapsed


def measure_lag(
    bus: MessageBus, message: HealthSignalBatch, messages: int, rate: float
) -> tuple[float, float]:
    """p50 and p99 of publish-call-to-poll latency in ms at ``rate`` messages per second."""
    subscription = bus.subscribe(
        Topic.TELEMETRY_HEALTH, group=f"lag-{uuid.uuid4().hex[:8]}", consumer="c", start="latest"
    )
    lags_ms: list[float] = []

    def consume() -> None:
        while len(lags_ms) < messages:
            deliveries = subscription.poll(max_messages=256, block_ms=200)
            received = time.time()
            lags_ms.extend((received - d.envelope.timestamp) * 1000 for d in deliveries)
            if deliveries:
                subscription.ack(*deliveries)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    publisher = BackgroundPublisher(bus, max_queue=messages)
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for _ in range(messages):
        publisher.publish(Topic.TELEMETRY_HEALTH, message)
        next_at += interval
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    publisher.close(timeout=60)
    consumer.join(timeout=60)
    quantiles = statistics.quantiles(lags_ms, n=100)
    return statistics.median(lags_ms), quantiles[98]


def benchmark(
    backend: str, bus: MessageBus, message: HealthSignalBatch, messages: int, rate: float
) -> BusResult:
    """Run every measurement on one bus (median of three runs for the rates)."""
    publish = statistics.median(measure_publish(bus, message, messages) for _ in range(3))
    batched = statistics.median(measure_batched(bus, message, messages) for _ in range(3))
    caller = statistics.median(measure_caller(bus, message, messages) for _ in range(3))
    lag_p50, lag_p99 = measure_lag(bus, message, messages, rate)
    return BusResult(backend, publish, batched, caller, lag_p50, lag_p99)


def print_table(results: list[BusResult]) -> None:
    header = (
        f"{'backend':<12} {'publish msg/s':>14} {'batched msg/s':>14} {'caller calls/s':>15} "
        f"{'lag p50 ms':>11} {'lag p99 ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        print(
            f"{result.backend:<12} {result.publish_per_s:>14,.0f} {result.batched_per_s:>14,.0f} "
            f"{result.caller_per_s:>15,.0f} {result.lag_p50_ms:>11.2f} {result.lag_p99_ms:>11.2f}"
        )
    if len(results) == 2:
        memory, redis_result = results
        print(
            f"{'redis/memory':<12} {redis_result.publish_per_s / memory.publish_per_s:>14.3f} "
            f"{redis_result.batched_per_s / memory.batched_per_s:>14.3f} "
            f"{redis_result.caller_per_s / memory.caller_per_s:>15.3f} "
            f"{redis_result.lag_p50_ms / memory.lag_p50_ms:>11.1f} "
            f"{redis_result.lag_p99_ms / memory.lag_p99_ms:>11.1f}"
        )


def delete_streams(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per measurement")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced rate for the lag test")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("ESPER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    args = parser.parse_args()
    message = health_batch(step=1)

    # Retain about one measurement's worth of messages, so the shared Redis stays small.
    memory_bus = open_bus("memory://", max_len=args.messages)
    results = [benchmark("memory", memory_bus, message, args.messages, args.rate)]
    prefix = f"esper-bench-{uuid.uuid4().hex[:12]}"
    redis_bus = open_bus(args.redis_url, stream_prefix=prefix, max_len=args.messages)
    try:
        redis_bus.subscribe(Topic.TELEMETRY_HEALTH, group="probe", consumer="probe")
    except Exception as exc:  # no server: report the in-process numbers alone
        print(f"Redis at {args.redis_url} unavailable ({exc}); skipping the Redis row.")
    else:
        try:
            results.append(benchmark("redis", redis_bus, message, args.messages, args.rate))
        finally:
            delete_streams(args.redis_url, prefix)
    redis_bus.close()
    size = len(message.model_dump_json())
    print(
        f"{args.messages} HealthSignalBatch messages ({size:,} bytes of JSON) per measurement, "
        f"lag at {args.rate:g}/s"
    )
    print_table(results)


if __name__ == "__main__":
    main()
