"""Background publisher: publish from the training loop without ever blocking or raising.

``publish`` only appends to a bounded in-memory queue; a daemon thread drains the queue in batches
into the bus. Nothing here waits on the network from the caller's thread, so a slow or dead bus
degrades telemetry, never training (design invariant 10). What could not be delivered is dropped
and counted:

- ``dropped_queue_full``: the queue was full (the bus is slower than the producer);
- ``dropped_bus_down``: the bus was unreachable. The publisher then retries the connection with
  exponential backoff (each retry is an attempt to publish the next batch), and messages arriving
  before the next retry are dropped at once instead of piling up. The first successful retry
  resumes normal publishing;
- ``errors``: a message could not be encoded or the bus failed in an unexpected way (logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType

from esper.contracts import Contract, Envelope, Topic
from esper.errors import ConfigurationError
from esper.oona.bus import MessageBus
from esper.oona.errors import BusUnavailableError
from esper.oona.payloads import make_envelope

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublisherCounters:
    """What a :class:`BackgroundPublisher` did with the messages handed to it so far.

    Attributes:
        published: messages the bus accepted.
        dropped_queue_full: messages refused because the queue was full.
        dropped_bus_down: messages dropped because the bus was unreachable.
        dropped_closed: messages handed over after ``close``.
        errors: messages that failed to encode or to publish for another reason.
    """

    published: int = 0
    dropped_queue_full: int = 0
    dropped_bus_down: int = 0
    dropped_closed: int = 0
    errors: int = 0

    @property
    def dropped(self) -> int:
        """All messages that were not published, for any reason."""
        return self.dropped_queue_full + self.dropped_bus_down + self.dropped_closed + self.errors


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A message waiting in the queue; its timestamp is when ``publish`` was called."""

    topic: Topic | str
    message: Contract
    trace_id: str | None
    timestamp: float


class BackgroundPublisher:
    """Publishes messages to a bus from a daemon thread through a bounded queue.

    Args:
        bus: where messages go. The publisher does not close it.
        max_queue: messages waiting to be sent at most; more are dropped and counted.
        max_batch: messages sent to the bus in one call (one Redis round trip).
        retry_initial_s: wait before the first reconnection attempt after the bus went down.
        retry_max_s: the wait doubles after each failed attempt up to this bound.
        name: name of the worker thread.

    Example::

        publisher = BackgroundPublisher(open_bus("redis://127.0.0.1:6379/0"))
        publisher.publish(Topic.KERNEL_READY, kernel_ready)  # returns at once, never raises
        publisher.close(timeout=5.0)  # sends what is queued, then stops the thread
    """

    def __init__(
        self,
        bus: MessageBus,
        *,
        max_queue: int = 1024,
        max_batch: int = 256,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        name: str = "oona-publisher",
    ) -> None:
        if max_queue <= 0 or max_batch <= 0:
            raise ConfigurationError(
                f"max_queue and max_batch must be positive, got {max_queue} and {max_batch}."
            )
        if not 0 < retry_initial_s <= retry_max_s:
            raise ConfigurationError(
                "expected 0 < retry_initial_s <= retry_max_s, got "
                f"{retry_initial_s} and {retry_max_s}."
            )
        self._bus = bus
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)
        self._queue: deque[_Outgoing] = deque()
        self._in_flight = 0
        self._closing = False
        self._counters = PublisherCounters()
        # Set while the bus is down: no attempt to publish before this monotonic time.
        self._retry_at: float | None = None
        self._backoff_s = retry_initial_s
        self._thread = threading.Thread(target=self._drain_forever, name=name, daemon=True)
        self._thread.start()

    def publish(
        self, topic: Topic | str, message: Contract, *, trace_id: str | None = None
    ) -> bool:
        """Queue ``message`` for ``topic``; never blocks and never raises.

        Returns:
            Whether the message was queued (``False``: dropped and counted).
        """
        item = _Outgoing(topic, message, trace_id, time.time())
        with self._lock:
            if self._closing:
                self._count(dropped_closed=1)
                return False
            if len(self._queue) >= self._max_queue:
                self._count(dropped_queue_full=1)
                return False
            self._queue.append(item)
            self._has_work.notify()
            return True

    @property
    def counters(self) -> PublisherCounters:
        """A snapshot of the counters."""
        with self._lock:
            return self._counters

    @property
    def queue_depth(self) -> int:
        """Messages waiting to be sent (not counting the batch being sent)."""
        with self._lock:
            return len(self._queue)

    @property
    def bus_down(self) -> bool:
        """Whether the last attempt to reach the bus failed."""
        with self._lock:
            return self._retry_at is not None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued message was handled (published or dropped).

        Returns:
            Whether the queue drained within ``timeout`` seconds.
        """
        with self._lock:
            return self._drained.wait_for(
                lambda: not self._queue and self._in_flight == 0, timeout=timeout
            )

    def close(self, timeout: float | None = 5.0) -> bool:
        """Send what is queued, then stop the worker thread; later messages are dropped.

        Returns:
            Whether the worker finished within ``timeout`` seconds.
        """
        with self._lock:
            self._closing = True
            self._has_work.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "background publisher did not finish within %ss; %d message(s) still queued",
                timeout,
                self.queue_depth,
            )
            return False
        return True

    def __enter__(self) -> BackgroundPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _count(self, **increments: int) -> None:
        """Add to counters; the caller holds ``self._lock``."""
        counters = self._counters
        self._counters = PublisherCounters(
            **{
                name: getattr(counters, name) + increments.get(name, 0)
                for name in PublisherCounters.__dataclass_fields__
            }
        )

    def _drain_forever(self) -> None:
        while True:
            with self._lock:
                self._has_work.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:  # closing and drained
                    self._drained.notify_all()
                    return
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))
                ]
                self._in_flight = len(batch)
            try:
                self._send(batch)
            except Exception:  # never let the worker die: it is the only way out of the queue
                logger.exception("background publisher failed on a batch of %d", len(batch))
                with self._lock:
                    self._count(errors=len(batch))
            with self._lock:
                self._in_flight = 0
                self._drained.notify_all()

    def _send(self, batch: list[_Outgoing]) -> None:
        if self._retry_at is not None and time.monotonic() < self._retry_at:
            with self._lock:
                self._count(dropped_bus_down=len(batch))
            return
        envelopes = self._encode(batch)
        if not envelopes:
            return
        try:
            self._bus.publish_envelopes(envelopes)
        except BusUnavailableError as exc:
            self._on_bus_down(len(envelopes), exc)
            return
        except Exception:
            logger.exception("publishing %d message(s) failed unexpectedly", len(envelopes))
            with self._lock:
                self._count(errors=len(envelopes))
            return
        with self._lock:
            self._count(published=len(envelopes))
            recovered = self._retry_at is not None
            self._retry_at = None
            self._backoff_s = self._retry_initial_s
        if recovered:
            logger.info("message bus reachable again; publishing resumed")

    def _encode(self, batch: list[_Outgoing]) -> list[Envelope]:
        envelopes: list[Envelope] = []
        for item in batch:
            try:
                envelopes.append(
                    make_envelope(
                        item.topic,
                        item.message,
                        sender=self._bus.sender,
                        trace_id=item.trace_id,
                        timestamp=item.timestamp,
                    )
                )
            except Exception:
                with self._lock:
                    self._count(errors=1)
                    first = self._counters.errors == 1
                log = logger.exception if first else logger.debug
                log("cannot encode a %s for topic %r", type(item.message).__name__, item.topic)
        return envelopes

    def _on_bus_down(self, dropped: int, exc: BusUnavailableError) -> None:
        with self._lock:
            self._count(dropped_bus_down=dropped)
            first_failure = self._retry_at is None
            if not first_failure:
                self._backoff_s = min(self._backoff_s * 2, self._retry_max_s)
            self._retry_at = time.monotonic() + self._backoff_s
            backoff_s = self._backoff_s
        if first_failure:
            logger.warning(
                "message bus unreachable (%s); dropping messages, retrying with backoff", exc
            )
        else:
            logger.debug("message bus still unreachable; next retry in %.2fs", backoff_s)
