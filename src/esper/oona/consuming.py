"""Per-message consumption: every delivery is decoded and handled on its own, then acknowledged.

A consumer loop reads deliveries in batches, but one bad message must never cost the others: a
payload that does not decode, or a handler that raises on it, is logged, counted and acknowledged
(so it cannot stay pending for good), while the valid messages of the same batch are handled and
acknowledged as usual. :func:`handle_each` does the first part, :class:`Acknowledger` the second:
acknowledgements the bus could not take (it was down) are kept and sent with the next ones.

Example::

    acks = Acknowledger(subscription)
    deliveries = subscription.poll(64)
    handle_each(deliveries, lambda d: ingest(d.decode(HealthSignalBatch)),
                consumer="tamiyo-health", counters=counters)
    acks.ack(deliveries)  # the bad ones too: retrying them would fail the same way
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

from esper.oona.bus import Delivery, Subscription
from esper.oona.errors import BusUnavailableError, PayloadDecodeError

logger = logging.getLogger(__name__)


def handle_each(
    deliveries: Sequence[Delivery],
    handle: Callable[[Delivery], object],
    *,
    consumer: str,
    counters: Counter[str],
) -> int:
    """Call ``handle`` on every delivery, isolating each one's failure from the others.

    Args:
        deliveries: one batch read from a subscription.
        handle: decodes one delivery and takes it in; may raise.
        consumer: who consumes (for log lines).
        counters: incremented ``undecodable`` (the payload is not the expected contract) or
            ``rejected`` (the handler raised on a decoded message) per bad message.

    Returns:
        How many deliveries were handled without an error.
    """
    handled = 0
    for delivery in deliveries:
        try:
            handle(delivery)
        except PayloadDecodeError as exc:
            counters["undecodable"] += 1
            logger.warning(
                "%s: dropping message %s on %s: %s",
                consumer,
                delivery.message_id,
                delivery.topic,
                exc,
            )
        except Exception as exc:  # the handler refused this message: it alone is dropped
            counters["rejected"] += 1
            logger.warning(
                "%s: dropping message %s on %s (%s) that could not be handled: %s: %s",
                consumer,
                delivery.message_id,
                delivery.topic,
                delivery.envelope.payload_type,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, ValueError | LookupError),  # a bug: show where
            )
        else:
            handled += 1
    return handled


class Acknowledger:
    """Acknowledges deliveries of one subscription; what the bus could not take is sent later.

    Args:
        subscription: the subscription the deliveries came from.
    """

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self._backlog: list[Delivery] = []

    @property
    def backlog(self) -> int:
        """Deliveries whose acknowledgement is still to be sent."""
        return len(self._backlog)

    def ack(self, deliveries: Sequence[Delivery] = ()) -> None:
        """Acknowledge ``deliveries`` together with any left over from a failed call.

        Raises:
            BusUnavailableError: the bus cannot be reached; the acknowledgements are kept and sent
                by the next call.
        """
        batch = [*self._backlog, *deliveries]
        if not batch:
            return
        try:
            self.subscription.ack(*batch)
        except BusUnavailableError:
            self._backlog = batch
            raise
        self._backlog = []
