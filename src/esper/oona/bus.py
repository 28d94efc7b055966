"""The message-bus interface: publish contracts on topics, consume them in groups with explicit ack.

Every backend (:class:`~esper.oona.in_process.InProcessBus`,
:class:`~esper.oona.redis_streams.RedisStreamsBus`) follows the semantics of Redis Streams
consumer groups:

- A topic is an append-only log, trimmed to roughly its most recent ``max_len`` messages.
- Each consumer *group* sees every message of the topic; within a group, each message goes to
  exactly one consumer (so consumers of one group share the work).
- A delivered message stays *pending* for its consumer until acknowledged. If that consumer
  crashes, another consumer of the group takes the message over with ``claim_stale`` once it has
  been idle long enough. Delivery is therefore at-least-once: handlers should be idempotent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, overload

from esper.contracts import Contract, Envelope, Topic
from esper.errors import ConfigurationError
from esper.oona.payloads import decode_payload

DEFAULT_MAX_LEN = 10_000
"""Messages a topic retains by default (older ones are trimmed, approximately on Redis)."""

GroupStart = Literal["earliest", "latest"]
"""Where a newly created consumer group starts reading: the oldest retained message, or only
messages published after the group was created."""

ContractT = TypeVar("ContractT", bound=Contract)


def default_sender() -> str:
    """A sender name for this process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to one consumer of a group; acknowledge it with ``Subscription.ack``.

    Attributes:
        message_id: the backend's id of the message within its topic (a Redis stream id).
        topic: the topic the message was published on.
        group: the consumer group it was delivered to.
        consumer: the consumer that now owns it.
        envelope: the message itself. Treat ``envelope.payload`` as read-only: the in-process bus
            hands the same envelope object to every group.
        delivery_count: how many times the message has been delivered within the group (1 on
            first delivery; more after ``claim_stale`` took it over from another consumer).
    """

    message_id: str
    topic: str
    group: str
    consumer: str
    envelope: Envelope
    delivery_count: int

    @overload
    def decode(self) -> Contract: ...

    @overload
    def decode(self, expected: type[ContractT]) -> ContractT: ...

    def decode(self, expected: type[Contract] | None = None) -> Contract:
        """The payload as its contract; see :func:`esper.oona.payloads.decode_payload`."""
        if expected is None:
            return decode_payload(self.envelope)
        return decode_payload(self.envelope, expected)


def check_max_messages(max_messages: int) -> None:
    """Raise :class:`ConfigurationError` unless ``max_messages`` is a positive count."""
    if max_messages <= 0:
        raise ConfigurationError(f"max_messages must be at least 1, got {max_messages}.")


def check_deliveries_belong(topic: str, group: str, deliveries: Sequence[Delivery]) -> None:
    """Raise :class:`ConfigurationError` unless every delivery came from ``group`` of ``topic``."""
    for delivery in deliveries:
        if (delivery.topic, delivery.group) != (topic, group):
            raise ConfigurationError(
                f"delivery {delivery.message_id} came from group {delivery.group!r} of topic "
                f"{delivery.topic!r}, not group {group!r} of topic {topic!r}; acknowledge it "
                "through the subscription that received it."
            )


class Subscription(Protocol):
    """One consumer's membership in one consumer group of one topic."""

    topic: str
    group: str
    consumer: str

    def poll(self, max_messages: int = 100, block_ms: int = 0) -> list[Delivery]:
        """Receive up to ``max_messages`` messages no consumer of the group has received yet.

        Args:
            max_messages: at most this many deliveries are returned.
            block_ms: wait up to this long for a first message when none is available;
                0 returns at once.

        Returns:
            The deliveries, oldest first; each stays pending for this consumer until acked.

        Raises:
            BusUnavailableError: the bus cannot be reached or was closed.
        """
        ...

    def ack(self, *deliveries: Delivery) -> int:
        """Acknowledge processed deliveries; return how many were still pending in the group."""
        ...

    def claim_stale(self, min_idle_ms: int, max_messages: int = 100) -> list[Delivery]:
        """Take over messages of this group left unacknowledged for at least ``min_idle_ms``.

        This is how a crashed consumer's messages get processed: any consumer of the group
        (including one restarted under the same name) claims them; each claim increments the
        message's ``delivery_count``. Messages trimmed from the topic while pending are dropped
        from the pending list instead of being returned.
        """
        ...

    def pending_count(self) -> int:
        """How many messages of the group are delivered but not yet acknowledged (any consumer)."""
        ...


class MessageBus(Protocol):
    """Publish contracts on topics; subscribe to topics as a member of a consumer group."""

    sender: str

    def publish(self, topic: Topic | str, message: Contract, *, trace_id: str | None = None) -> str:
        """Wrap ``message`` into an envelope from ``sender`` and append it to ``topic``.

        Returns:
            The message id within the topic.

        Raises:
            BusUnavailableError: the bus cannot be reached or was closed.
        """
        ...

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        """Append ready-made envelopes, each to its own ``envelope.topic``, in one round trip.

        Returns:
            The message ids, in the order of ``envelopes``.

        Raises:
            BusUnavailableError: the bus cannot be reached or was closed.
        """
        ...

    def subscribe(
        self, topic: Topic | str, group: str, consumer: str, *, start: GroupStart = "earliest"
    ) -> Subscription:
        """Join consumer group ``group`` of ``topic`` as ``consumer``, creating the group if needed.

        Args:
            topic: the topic to consume.
            group: the consumer group; every group receives every message.
            consumer: this consumer's name, unique within the group. A consumer restarted under
                the same name can reclaim its own pending messages with ``claim_stale``.
            start: where a *new* group starts reading; an existing group keeps its position.
        """
        ...

    def close(self) -> None:
        """Release the bus's connections; blocked polls return and later calls raise."""
        ...
