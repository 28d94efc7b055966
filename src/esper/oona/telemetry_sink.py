"""Telemetry sink: sends Kasmina's health signals to ``telemetry.health`` without blocking training.

Kasmina's ``collect_telemetry()`` hands each flush of health signals to a sink; this sink wraps
them into one :class:`HealthSignalBatch` and queues it on a :class:`BackgroundPublisher`, so the
training thread never waits on the bus and never sees a bus error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType

from esper.contracts import HealthSignal, HealthSignalBatch, Topic
from esper.oona.background_publisher import BackgroundPublisher, PublisherCounters
from esper.oona.bus import MessageBus

logger = logging.getLogger(__name__)


class OonaTelemetrySink:
    """Publishes health-signal flushes of one training run to ``Topic.TELEMETRY_HEALTH``.

    Args:
        bus: the bus to publish to. The sink does not close it.
        run_id: the run the signals belong to (overridable per call).
        max_queue: batches waiting to be sent at most; more are dropped and counted.
        retry_max_s: longest wait between reconnection attempts while the bus is down.

    Example::

        sink = OonaTelemetrySink(open_bus(settings.bus_url), run_id="run-42")
        sink.publish(model.collect_telemetry())  # returns at once; never raises
        sink.close()
    """

    def __init__(
        self,
        bus: MessageBus,
        *,
        run_id: str,
        max_queue: int = 256,
        retry_max_s: float = 2.0,
    ) -> None:
        self.run_id = run_id
        self.publisher = BackgroundPublisher(
            bus,
            max_queue=max_queue,
            retry_initial_s=min(0.05, retry_max_s),
            retry_max_s=retry_max_s,
            name=f"oona-telemetry-{run_id}",
        )
        self.encode_errors = 0
        """Flushes that could not even be wrapped into a batch (invalid signals); logged."""

    def publish(
        self,
        signals: Sequence[HealthSignal],
        *,
        step: int | None = None,
        run_id: str | None = None,
    ) -> None:
        """Queue one :class:`HealthSignalBatch` of ``signals``; never blocks, never raises.

        Args:
            signals: one telemetry flush, one signal per wrapped layer.
            step: the training step of the flush (default: the latest ``step`` among the
                signals, 0 when there are none).
            run_id: overrides the run id given at construction.
        """
        try:
            if step is None:
                step = max((signal.step for signal in signals), default=0)
            batch = HealthSignalBatch(
                run_id=run_id or self.run_id, step=step, signals=tuple(signals)
            )
        except Exception:
            self.encode_errors += 1
            log = logger.exception if self.encode_errors == 1 else logger.debug
            log("dropping a telemetry flush that is not a valid HealthSignalBatch")
            return
        self.publisher.publish(Topic.TELEMETRY_HEALTH, batch)

    @property
    def counters(self) -> PublisherCounters:
        """What happened to the batches so far (published, dropped, errors)."""
        return self.publisher.counters

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued batches were handled; see :meth:`BackgroundPublisher.flush`."""
        return self.publisher.flush(timeout)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Send queued batches and stop; see :meth:`BackgroundPublisher.close`."""
        return self.publisher.close(timeout)

    def __enter__(self) -> OonaTelemetrySink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
