"""In-process bus: the zero-setup default, with the consumer-group semantics of Redis Streams.

Topics live in memory in this process, so it connects components running in one process (the
embedded deployment shape). It is thread-safe; ``poll`` can block waiting for messages. Pending
lists, ``claim_stale`` after an idle time and delivery counts behave as on Redis, so code tested
against this bus runs unchanged against :class:`~esper.oona.redis_streams.RedisStreamsBus`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


@dataclass
class _PendingEntry:
    """A message delivered to ``consumer`` and not yet acknowledged."""

    consumer: str
    delivered_at: float
    delivery_count: int


@dataclass
class _GroupState:
    """Read position and pending list of one consumer group."""

    last_delivered_seq: int
    pending: dict[int, _PendingEntry] = field(default_factory=dict)


@dataclass
class _TopicLog:
    """The retained messages of one topic: ``entries[i]`` has sequence number ``first_seq + i``."""

    entries: deque[Envelope] = field(default_factory=deque)
    first_seq: int = 1
    groups: dict[str, _GroupState] = field(default_factory=dict)

    @property
    def next_seq(self) -> int:
        return self.first_seq + len(self.entries)


class InProcessBus:
    """A thread-safe message bus held in this process's memory.

    Args:
        sender: the ``sender`` written into envelopes published through this bus
            (default: ``host:pid``).
        max_len: messages retained per topic; the oldest are trimmed beyond it.
        clock: monotonic clock in seconds used for idle times (injectable for tests).

    Example::

        bus = InProcessBus()
        subscription = bus.subscribe(Topic.KERNEL_READY, group="tamiyo", consumer="tamiyo-0")
        bus.publish(Topic.KERNEL_READY, kernel_ready)
        for delivery in subscription.poll(block_ms=100):
            handle(delivery.decode(KernelReady))
            subscription.ack(delivery)
    """

    def __init__(
        self,
        *,
        sender: str | None = None,
        max_len: int = DEFAULT_MAX_LEN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_len <= 0:
            raise ConfigurationError(f"max_len must be a positive message count, got {max_len}.")
        self.sender = sender or default_sender()
        self.max_len = max_len
        self._clock = clock
        self._changed = threading.Condition()
        self._topics: dict[str, _TopicLog] = {}
        self._closed = False

    def publish(self, topic: Topic | str, message: Contract, *, trace_id: str | None = None) -> str:
        """Wrap ``message`` into an envelope and append it to ``topic``; return its message id."""
        envelope = make_envelope(topic, message, sender=self.sender, trace_id=trace_id)
        return self.publish_envelopes([envelope])[0]

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        """Append envelopes, each to its own ``envelope.topic``; return their message ids."""
        message_ids: list[str] = []
        with self._changed:
            self._raise_if_closed()
            for envelope in envelopes:
                log = self._topics.setdefault(envelope.topic, _TopicLog())
                message_ids.append(str(log.next_seq))
                log.entries.append(envelope)
                while len(log.entries) > self.max_len:
                    log.entries.popleft()
                    log.first_seq += 1
            self._changed.notify_all()
        return message_ids

    def subscribe(
        self, topic: Topic | str, group: str, consumer: str, *, start: GroupStart = "earliest"
    ) -> InProcessSubscription:
        """Join ``group`` of ``topic`` as ``consumer``, creating the group if it does not exist."""
        if not group or not consumer:
            raise ConfigurationError(
                f"group and consumer must be non-empty names, got {group!r}, {consumer!r}."
            )
        if start not in ("earliest", "latest"):
            raise ConfigurationError(f"start must be 'earliest' or 'latest', got {start!r}.")
        topic = str(topic)
        with self._changed:
            self._raise_if_closed()
            log = self._topics.setdefault(topic, _TopicLog())
            if group not in log.groups:
                position = log.first_seq - 1 if start == "earliest" else log.next_seq - 1
                log.groups[group] = _GroupState(last_delivered_seq=position)
        return InProcessSubscription(self, topic, group, consumer)

    def close(self) -> None:
        """Close the bus: blocked polls raise :class:`BusUnavailableError`, as do later calls."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise BusUnavailableError("the in-process bus was closed; open a new one.")

    def _poll(
        self, subscription: InProcessSubscription, max_messages: int, block_ms: int
    ) -> list[Delivery]:
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        with self._changed:
            while True:
                self._raise_if_closed()
                log = self._topics[subscription.topic]
                state = log.groups[subscription.group]
                first_new = max(state.last_delivered_seq + 1, log.first_seq)
                available = log.next_seq - first_new
                remaining = deadline - time.monotonic()
                if available > 0 or remaining <= 0:
                    break
                self._changed.wait(remaining)
            now = self._clock()
            deliveries: list[Delivery] = []
            for seq in range(first_new, first_new + min(available, max_messages)):
                state.pending[seq] = _PendingEntry(subscription.consumer, now, delivery_count=1)
                state.last_delivered_seq = seq
                deliveries.append(self._delivery(subscription, log, seq, delivery_count=1))
            return deliveries

    def _ack(self, subscription: InProcessSubscription, deliveries: Sequence[Delivery]) -> int:
        with self._changed:
            self._raise_if_closed()
            state = self._topics[subscription.topic].groups[subscription.group]
            return sum(
                state.pending.pop(int(delivery.message_id), None) is not None
                for delivery in deliveries
            )

    def _claim_stale(
        self, subscription: InProcessSubscription, min_idle_ms: int, max_messages: int
    ) -> list[Delivery]:
        with self._changed:
            self._raise_if_closed()
            log = self._topics[subscription.topic]
            state = log.groups[subscription.group]
            now = self._clock()
            claimed: list[Delivery] = []
            for seq in sorted(state.pending):
                if len(claimed) >= max_messages:
                    break
                entry = state.pending[seq]
                if (now - entry.delivered_at) * 1000 < min_idle_ms:
                    continue
                if seq < log.first_seq:  # trimmed while pending: nothing left to deliver
                    del state.pending[seq]
                    continue
                entry.consumer = subscription.consumer
                entry.delivered_at = now
                entry.delivery_count += 1
                claimed.append(self._delivery(subscription, log, seq, entry.delivery_count))
            return claimed

    def _pending_count(self, subscription: InProcessSubscription) -> int:
        with self._changed:
            self._raise_if_closed()
            return len(self._topics[subscription.topic].groups[subscription.group].pending)

    @staticmethod
    def _delivery(
        subscription: InProcessSubscription, log: _TopicLog, seq: int, delivery_count: int
    ) -> Delivery:
        return Delivery(
            message_id=str(seq),
            topic=subscription.topic,
            group=subscription.group,
            consumer=subscription.consumer,
            envelope=log.entries[seq - log.first_seq],
            delivery_count=delivery_count,
        )


class InProcessSubscription:
    """A consumer's membership in a consumer group of an :class:`InProcessBus` topic."""

    def __init__(self, bus: InProcessBus, topic: str, group: str, consumer: str) -> None:
        self._bus = bus
        self.topic = topic
        self.group = group
        self.consumer = consumer

    def poll(self, max_messages: int = 100, block_ms: int = 0) -> list[Delivery]:
        """Receive up to ``max_messages`` new messages, waiting up to ``block_ms`` for the first."""
        check_max_messages(max_messages)
        return self._bus._poll(self, max_messages, block_ms)

    def ack(self, *deliveries: Delivery) -> int:
        """Acknowledge deliveries; return how many were still pending in the group."""
        check_deliveries_belong(self.topic, self.group, deliveries)
        return self._bus._ack(self, deliveries)

    def claim_stale(self, min_idle_ms: int, max_messages: int = 100) -> list[Delivery]:
        """Take over this group's messages left unacknowledged for at least ``min_idle_ms``."""
        check_max_messages(max_messages)
        return self._bus._claim_stale(self, min_idle_ms, max_messages)

    def pending_count(self) -> int:
        """How many of this group's messages are delivered but not yet acknowledged."""
        return self._bus._pending_count(self)
