"""Redis Streams bus: each topic is a stream, consumed through Redis consumer groups.

Publishing is ``XADD`` with approximate ``MAXLEN`` trimming, so a stream stays bounded at about
``max_len`` entries. Subscribing creates the group (``XGROUP CREATE ... MKSTREAM``); ``poll`` is
``XREADGROUP``, ``ack`` is ``XACK`` and ``claim_stale`` is ``XAUTOCLAIM``, which hands the
messages of a crashed consumer to a live one once they have been idle long enough. Every stream key
starts with ``stream_prefix`` so runs and tests sharing one Redis server stay isolated.

Each stream entry has one field, ``envelope``, holding the :class:`Envelope` as JSON.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from esper.contracts import Contract, Envelope, Topic
from esper.errors import ConfigurationError
from esper.oona.bus import (
    DEFAULT_MAX_LEN,
    Delivery,
    GroupStart,
    check_deliveries_belong,
    check_max_messages,
    default_sender,
)
from esper.oona.errors import BusUnavailableError
from esper.oona.payloads import make_envelope

logger = logging.getLogger(__name__)

ENVELOPE_FIELD = "envelope"
"""The stream-entry field that holds the envelope JSON."""

DEFAULT_STREAM_PREFIX = "esper"


class RedisStreamsBus:
    """A message bus on Redis Streams (Redis 6.2 or newer, for ``XAUTOCLAIM``).

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://`` for TLS).
        sender: the ``sender`` written into envelopes published through this bus
            (default: ``host:pid``).
        stream_prefix: prefix of every stream key: topic ``t`` lives at ``{stream_prefix}:t``.
        max_len: approximate number of messages each stream retains (``XADD MAXLEN ~``); Redis
            trims whole internal nodes, so a stream can hold up to ~100 entries more.
        socket_timeout_s: how long one Redis command may take before the bus counts as down.
        connect_timeout_s: how long connecting may take before the bus counts as down.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        sender: str | None = None,
        stream_prefix: str = DEFAULT_STREAM_PREFIX,
        max_len: int = DEFAULT_MAX_LEN,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 1.0,
    ) -> None:
        if max_len <= 0:
            raise ConfigurationError(f"max_len must be a positive message count, got {max_len}.")
        if not stream_prefix or any(char.isspace() for char in stream_prefix):
            raise ConfigurationError(
                f"stream_prefix must be a non-empty name without spaces, got {stream_prefix!r}."
            )
        if socket_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigurationError(
                "socket_timeout_s and connect_timeout_s must be positive, got "
                f"{socket_timeout_s} and {connect_timeout_s}."
            )
        parts = urlsplit(url)
        self.location = f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
        """Where the server is (``host:port/db``, no credentials), for messages and logs."""
        self.sender = sender or default_sender()
        self.stream_prefix = stream_prefix
        self.max_len = max_len
        self.max_block_ms = int(socket_timeout_s * 1000 / 2)
        """Longest single ``XREADGROUP BLOCK``; longer waits are split so reads never time out."""
        # One immediate retry on a fresh connection covers pooled connections broken by a server
        # restart; anything longer is the caller's business (BackgroundPublisher backs off).
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), retries=1),
        )
        self._closed = False

    def stream_key(self, topic: Topic | str) -> str:
        """The Redis key of the stream that holds ``topic``."""
        return f"{self.stream_prefix}:{topic}"

    def publish(self, topic: Topic | str, message: Contract, *, trace_id: str | None = None) -> str:
        """Wrap ``message`` into an envelope and ``XADD`` it to ``topic``; return its stream id."""
        envelope = make_envelope(topic, message, sender=self.sender, trace_id=trace_id)
        return self.publish_envelopes([envelope])[0]

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        """``XADD`` envelopes to their topics' streams in one pipelined round trip."""
        with self._unavailable_as_error(f"publishing {len(envelopes)} message(s)"):
            pipeline = self._client.pipeline(transaction=False)
            for envelope in envelopes:
                pipeline.xadd(
                    self.stream_key(envelope.topic),
                    {ENVELOPE_FIELD: envelope.model_dump_json()},
                    maxlen=self.max_len,
                    approximate=True,
                )
            return [str(message_id) for message_id in pipeline.execute()]

    def subscribe(
        self, topic: Topic | str, group: str, consumer: str, *, start: GroupStart = "earliest"
    ) -> RedisSubscription:
        """Join ``group`` of ``topic`` as ``consumer``; creates the group (and stream) if needed."""
        if not group or not consumer:
            raise ConfigurationError(
                f"group and consumer must be non-empty names, got {group!r}, {consumer!r}."
            )
        if start not in ("earliest", "latest"):
            raise ConfigurationError(f"start must be 'earliest' or 'latest', got {start!r}.")
        subscription = RedisSubscription(self, str(topic), group, consumer)
        subscription.create_group(start)
        return subscription

    def close(self) -> None:
        """Close the bus's connections; later calls raise :class:`BusUnavailableError`."""
        self._closed = True
        self._client.close()

    @property
    def client(self) -> redis.Redis:
        """The underlying redis-py client (for subscriptions of this bus)."""
        return self._client

    @contextlib.contextmanager
    def _unavailable_as_error(self, action: str) -> Iterator[None]:
        """Turn connection failures into :class:`BusUnavailableError` naming what was attempted."""
        if self._closed:
            raise BusUnavailableError(
                f"the Redis bus at {self.location} was closed; open a new one."
            )
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BusUnavailableError(
                f"Redis at {self.location} is unreachable while {action}: {exc}. "
                "Check that the server is running and the URL is right."
            ) from exc


class RedisSubscription:
    """A consumer's membership in a consumer group of a :class:`RedisStreamsBus` topic."""

    def __init__(self, bus: RedisStreamsBus, topic: str, group: str, consumer: str) -> None:
        self._bus = bus
        self._client = bus.client
        self.topic = topic
        self.group = group
        self.consumer = consumer
        self.stream_key = bus.stream_key(topic)
        self.malformed_dropped = 0
        """Stream entries that held no valid envelope; they were acknowledged and skipped."""

    def create_group(self, start: GroupStart = "earliest") -> None:
        """``XGROUP CREATE ... MKSTREAM``; a group that already exists keeps its position."""
        with self._bus._unavailable_as_error(f"creating group {self.group!r} on {self.topic!r}"):
            try:
                self._client.xgroup_create(
                    self.stream_key,
                    self.group,
                    id="0" if start == "earliest" else "$",
                    mkstream=True,
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def poll(self, max_messages: int = 100, block_ms: int = 0) -> list[Delivery]:
        """``XREADGROUP ... >``: up to ``max_messages`` new messages, waiting up to ``block_ms``."""
        check_max_messages(max_messages)
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        with self._bus._unavailable_as_error(f"reading {self.topic!r} for group {self.group!r}"):
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                block = min(remaining_ms, self._bus.max_block_ms) if remaining_ms > 0 else None
                entries = self._read_new(max_messages, block)
                if entries or block is None:
                    return self._deliveries(entries, delivery_count=1)

    def ack(self, *deliveries: Delivery) -> int:
        """``XACK`` deliveries; return how many were still pending in the group."""
        check_deliveries_belong(self.topic, self.group, deliveries)
        if not deliveries:
            return 0
        ids = [delivery.message_id for delivery in deliveries]
        with self._bus._unavailable_as_error(f"acknowledging {len(ids)} message(s)"):
            acknowledged: Any = self._client.xack(self.stream_key, self.group, *ids)
            return int(acknowledged)

    def claim_stale(self, min_idle_ms: int, max_messages: int = 100) -> list[Delivery]:
        """``XAUTOCLAIM``: take over this group's messages idle for at least ``min_idle_ms``."""
        check_max_messages(max_messages)
        entries: list[tuple[str, dict[str, str] | None]] = []
        cursor = "0-0"
        with self._bus._unavailable_as_error(f"claiming stale messages of {self.topic!r}"):
            try:
                while len(entries) < max_messages:
                    result: Any = self._client.xautoclaim(
                        self.stream_key,
                        self.group,
                        self.consumer,
                        min_idle_time=min_idle_ms,
                        start_id=cursor,
                        count=max_messages - len(entries),
                    )
                    cursor, claimed = result[0], result[1]
                    entries.extend((message_id, fields) for message_id, fields in claimed)
                    if len(result) > 2 and result[2]:
                        logger.info(
                            "%d pending message(s) of %s were trimmed before anyone acked them",
                            len(result[2]),
                            self.stream_key,
                        )
                    if cursor == "0-0":
                        break
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return []
            entries = [(message_id, fields) for message_id, fields in entries if fields]
            return self._deliveries(entries, delivery_count=self._delivery_counts(entries))

    def pending_count(self) -> int:
        """``XPENDING`` summary: messages of the group delivered but not yet acknowledged."""
        with self._bus._unavailable_as_error(f"counting pending messages of {self.topic!r}"):
            try:
                summary: Any = self._client.xpending(self.stream_key, self.group)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return 0
            return int(summary["pending"])

    def _read_new(self, max_messages: int, block_ms: int | None) -> list[Any]:
        """One ``XREADGROUP``, recreating the group if its stream vanished (e.g. Redis restarted)."""
        try:
            response: Any = self._xreadgroup(max_messages, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            logger.warning("group %s of %s vanished; recreating it", self.group, self.stream_key)
            self.create_group("earliest")
            response = self._xreadgroup(max_messages, block_ms)
        if not response:
            return []
        if isinstance(response, dict):  # RESP3: {stream: [entries]}
            return list(next(iter(response.values())))
        return list(response[0][1])  # RESP2: [[stream, [entries]]]

    def _xreadgroup(self, max_messages: int, block_ms: int | None) -> Any:
        return self._client.xreadgroup(
            self.group, self.consumer, {self.stream_key: ">"}, count=max_messages, block=block_ms
        )

    def _delivery_counts(self, entries: list[Any]) -> dict[str, int]:
        """Delivery count of each claimed message, from ``XPENDING`` (one pipelined round trip)."""
        pipeline = self._client.pipeline(transaction=False)
        for message_id, _ in entries:
            pipeline.xpending_range(
                self.stream_key, self.group, min=message_id, max=message_id, count=1
            )
        counts: dict[str, int] = {}
        for rows in pipeline.execute():
            for row in rows:
                counts[str(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _deliveries(
        self, entries: list[Any], delivery_count: int | dict[str, int]
    ) -> list[Delivery]:
        deliveries: list[Delivery] = []
        malformed: list[str] = []
        for message_id, fields in entries:
            try:
                envelope = Envelope.model_validate_json(fields[ENVELOPE_FIELD])
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning(
                    "dropping stream entry %s of %s: no valid envelope (%s)",
                    message_id,
                    self.stream_key,
                    exc,
                )
                malformed.append(message_id)
                continue
            count = (
                delivery_count
                if isinstance(delivery_count, int)
                else delivery_count.get(message_id, 1)
            )
            deliveries.append(
                Delivery(
                    message_id=str(message_id),
                    topic=self.topic,
                    group=self.group,
                    consumer=self.consumer,
                    envelope=envelope,
                    delivery_count=count,
                )
            )
        if malformed:
            self.malformed_dropped += len(malformed)
            try:
                self._client.xack(self.stream_key, self.group, *malformed)
            except (RedisConnectionError, RedisTimeoutError) as exc:  # the valid ones still go out
                logger.warning(
                    "could not acknowledge %d malformed entr(ies) of %s (%s); a later "
                    "claim_stale drops them",
                    len(malformed),
                    self.stream_key,
                    exc,
                )
        return deliveries
