"""Background subscriber: consumes one topic on a daemon thread, so its owner never waits on the bus.

The owner (for instance the training loop, at a step boundary) :meth:`~BackgroundSubscriber.drain`\\ s
what arrived and :meth:`~BackgroundSubscriber.ack`\\ s what it has taken in; polling, decoding and
acknowledging happen on the subscriber's thread. Messages a previous consumer of the group read
but never acknowledged (it crashed) are reclaimed once at start. While the bus is down (or a read
fails with a server error) the thread logs and retries; acknowledgements that failed are kept and
sent when it is back. Each message is decoded on its own: one that does not decode is logged and
handed out as ``None``, so the owner acknowledges it with the others.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Generic, TypeVar

from esper.contracts import Contract, Topic
from esper.oona.bus import Delivery, MessageBus
from esper.oona.errors import BusUnavailableError

logger = logging.getLogger(__name__)

ContractT = TypeVar("ContractT", bound=Contract)


class BackgroundSubscriber(Generic[ContractT]):
    """Consumes ``topic`` as ``consumer`` of ``group`` and decodes each message as ``contract``.

    Args:
        bus: the bus to consume from.
        topic: the topic.
        group: the consumer group (each group gets every message).
        consumer: this consumer's name within the group.
        contract: what payloads decode to; an undecodable message is kept as ``None`` (so the
            owner can still acknowledge it) and logged.
        reclaim_idle_ms: reclaim messages other consumers of the group left unacknowledged for
            this long.
    """

    def __init__(
        self,
        bus: MessageBus,
        topic: Topic | str,
        *,
        group: str,
        consumer: str,
        contract: type[ContractT],
        reclaim_idle_ms: int = 10_000,
    ) -> None:
        self._subscription = bus.subscribe(topic, group, consumer)
        self._contract = contract
        self._reclaim_idle_ms = reclaim_idle_ms
        self._received: deque[tuple[Delivery, ContractT | None]] = deque()
        self._to_ack: deque[Delivery] = deque()
        self._stop = threading.Event()
        self.errors = 0
        """Times reading or acknowledging failed (the bus was unavailable, or the server
        answered an error); each was logged and retried."""
        self.undecodable = 0
        """Messages that were not a valid ``contract``; handed out as ``None`` to be acked."""
        self._thread = threading.Thread(target=self._run, name=f"oona-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        reclaimed = False
        while not self._stop.is_set():
            try:
                self._ack_pending()
                deliveries = (
                    [] if reclaimed else self._subscription.claim_stale(self._reclaim_idle_ms)
                )
                reclaimed = True
                deliveries += self._subscription.poll(64, block_ms=100)
            except BusUnavailableError as exc:
                self.errors += 1
                logger.warning(
                    "subscriber %s: bus unavailable (%s); retrying", self._thread.name, exc
                )
                self._stop.wait(0.5)
                continue
            except Exception:  # e.g. a server error on one read: the thread must not die of it
                self.errors += 1
                logger.exception("subscriber %s: reading failed; retrying", self._thread.name)
                self._stop.wait(0.5)
                continue
            for delivery in deliveries:
                self._received.append((delivery, self._decode(delivery)))
        try:
            self._ack_pending()
        except Exception as exc:  # closing: the group re-delivers what was not acknowledged
            logger.warning(
                "subscriber %s: %d acknowledgement(s) not sent at close: %s",
                self._thread.name,
                len(self._to_ack),
                exc,
            )

    def _decode(self, delivery: Delivery) -> ContractT | None:
        """The delivery's payload, or ``None`` (logged) when it is not a valid ``contract``."""
        try:
            return delivery.decode(self._contract)
        except Exception as exc:  # a foreign or malformed message: kept so the owner acks it
            self.undecodable += 1
            logger.warning(
                "subscriber %s: dropping %s: %s", self._thread.name, delivery.message_id, exc
            )
            return None

    def _ack_pending(self) -> None:
        batch = []
        while self._to_ack:
            batch.append(self._to_ack.popleft())
        if batch:
            try:
                self._subscription.ack(*batch)
            except BusUnavailableError:
                self._to_ack.extendleft(reversed(batch))  # acknowledged once the bus is back
                raise

    def drain(self) -> list[tuple[Delivery, ContractT | None]]:
        """Everything received since the last drain (each delivery once); never blocks."""
        items = []
        while self._received:
            items.append(self._received.popleft())
        return items

    def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge ``deliveries`` (sent from the subscriber's thread); never blocks."""
        self._to_ack.extend(deliveries)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after sending pending acknowledgements."""
        self._stop.set()
        self._thread.join(timeout)
