"""The controller's bus and thread shell: what it reads from the training side, and its loop.

:class:`ControllerInbox` consumes the topics the training side publishes for a controller
(:data:`CONTROLLER_TOPICS`: topology, progress, rewards, refusals) as a member of one consumer
group per topic. Each message is decoded and handed to the controller on its own: a message that
does not decode, or that the controller cannot take in (a topology whose edges leave the node
range), is logged, counted and acknowledged alone, while the valid messages of the same read are
observed and acknowledged as usual. Nothing stays pending for good: acknowledgements the bus
could not take are sent by the next poll, and the first poll takes over the group's messages a
crashed consumer left unacknowledged.

:class:`ControllerThread` runs :meth:`TamiyoController.run_cycle` every ``cycle_s`` on a daemon
thread (with the health collector's own polling thread) until stopped; a failing cycle is logged
and counted, never fatal. The deciding itself stays in :mod:`esper.tamiyo.controller`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from esper.contracts import (
    Contract,
    DecisionRefusal,
    ModelTopology,
    RewardReport,
    Topic,
    TrainingProgress,
)
from esper.oona import BusUnavailableError, Delivery, MessageBus
from esper.oona.consuming import Acknowledger, handle_each

if TYPE_CHECKING:
    from esper.tamiyo.controller import TamiyoController

logger = logging.getLogger(__name__)

CONTROLLER_TOPICS: dict[str, type[Contract]] = {
    str(Topic.TELEMETRY_TOPOLOGY): ModelTopology,
    str(Topic.TELEMETRY_PROGRESS): TrainingProgress,
    str(Topic.CONTROL_TAMIYO_REWARDS): RewardReport,
    str(Topic.CONTROL_TAMIYO_REFUSALS): DecisionRefusal,
}
"""Topics a controller consumes (besides ``telemetry.health``), with their payload contracts."""


class ControllerInbox:
    """The controller's subscriptions to :data:`CONTROLLER_TOPICS`.

    Args:
        bus: the bus to consume from.
        observe: takes in one decoded message (may raise: that message alone is dropped).
        group: consumer-group prefix; topic ``t`` is consumed in group ``{group}-{t}``.
        consumer: this consumer's name in each group.
        counters: incremented ``undecodable`` / ``rejected`` per bad message.
        claim_idle_ms: on its first poll the inbox takes over messages of its groups left
            unacknowledged this long (e.g. by this controller's previous process).
    """

    def __init__(
        self,
        bus: MessageBus,
        observe: Callable[[Contract], None],
        *,
        group: str,
        consumer: str,
        counters: Counter[str],
        claim_idle_ms: int = 10_000,
    ) -> None:
        self._observe = observe
        self._counters = counters
        self._claim_idle_ms = claim_idle_ms
        self._claimed = False
        self._acks = [
            Acknowledger(bus.subscribe(topic, f"{group}-{topic}", consumer, start="earliest"))
            for topic in CONTROLLER_TOPICS
        ]

    def poll(self, max_messages: int = 256) -> int:
        """Receive, observe and acknowledge what is waiting; return how many messages arrived.

        Raises:
            BusUnavailableError: the bus cannot be reached (acknowledgements not sent are kept).
        """
        received = 0
        for acks in self._acks:
            subscription = acks.subscription
            deliveries: list[Delivery] = []
            if not self._claimed:
                deliveries += subscription.claim_stale(self._claim_idle_ms, max_messages)
            deliveries += subscription.poll(max_messages)
            handle_each(
                deliveries,
                partial(self._take, CONTROLLER_TOPICS[subscription.topic]),
                consumer=f"controller {subscription.group}",
                counters=self._counters,
            )
            acks.ack(deliveries)
            received += len(deliveries)
        self._claimed = True
        return received

    def _take(self, contract: type[Contract], delivery: Delivery) -> None:
        self._observe(delivery.decode(contract))


class ControllerThread:
    """Runs a controller's decision cycles on a daemon thread.

    Args:
        controller: the controller whose :meth:`~TamiyoController.run_cycle` is run.
    """

    def __init__(self, controller: TamiyoController) -> None:
        self.controller = controller
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._collector_thread = False

    def start(self) -> None:
        """Start the loop (and the collector's polling thread when there is a bus)."""
        if self._thread is None:
            self._stop.clear()
            self._collector_thread = self.controller.bus is not None
            if self._collector_thread:
                self.controller.collector.start()
            self._thread = threading.Thread(target=self._run, name="tamiyo-controller", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        controller = self.controller
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                controller.run_cycle(poll_health=not self._collector_thread)
            except BusUnavailableError as exc:
                controller.counters["cycle_errors"] += 1
                logger.warning("controller: bus unavailable (%s); retrying", exc)
            except Exception:  # the loop must outlive any single bad cycle
                controller.counters["cycle_errors"] += 1
                logger.exception("controller: cycle failed; continuing")
            self._stop.wait(max(0.0, controller.cycle_s - (time.monotonic() - started)))

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the loop and the collector's thread (the bus is not closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.controller.collector.stop(timeout)

    def serve(self, *, duration_s: float | None = None) -> None:
        """Run the loop in the foreground until ``duration_s`` passed or Ctrl-C."""
        self.start()
        try:
            if duration_s is None:
                while self._thread is not None and self._thread.is_alive():
                    self._thread.join(0.5)
            else:
                self._stop.wait(duration_s)
        except KeyboardInterrupt:
            logger.info("controller: interrupted")
        finally:
            self.stop()
