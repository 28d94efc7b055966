"""Decision intake: the decisions a run receives, each taken in at most once.

Decisions reach the growth executor two ways: handed over directly (:meth:`DecisionIntake.submit`,
from the run's controller link) or consumed from ``control.kasmina.commands`` on the bus by a
background thread. :meth:`DecisionIntake.take` returns, at a step boundary, the new ones for
this run: other runs' decisions are dropped and a ``decision_id`` seen before (a redelivery, a
duplicate) is ignored. A bus delivery is acknowledged once its decision was taken in.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from typing import Any

from esper.contracts import AdaptationDecision, Topic
from esper.oona import BackgroundSubscriber, MessageBus

MAX_REMEMBERED = 100_000
"""Decision ids remembered for duplicate detection (the oldest are forgotten first)."""


class DecisionIntake:
    """Takes in the decisions for one run, once each.

    Args:
        run_id: the run; decisions for other runs are counted (``other_run``) and dropped.
        counters: where ``received``, ``duplicates`` and ``other_run`` are counted.
        bus: consume ``control.kasmina.commands`` from it (``None``: :meth:`submit` only).
        group: consumer group on the commands topic.
        consumer: this intake's consumer name.
    """

    def __init__(
        self,
        run_id: str,
        *,
        counters: Counter[str],
        bus: MessageBus | None = None,
        group: str = "tolaria-executor",
        consumer: str = "executor-0",
    ) -> None:
        self.run_id = run_id
        self.counters = counters
        self._applied: OrderedDict[str, int] = OrderedDict()
        self._submitted: deque[AdaptationDecision] = deque()
        self._lock = threading.Lock()
        self._inbox: BackgroundSubscriber[AdaptationDecision] | None = None
        if bus is not None:
            self._inbox = BackgroundSubscriber(
                bus,
                Topic.CONTROL_KASMINA_COMMANDS,
                group=group,
                consumer=consumer,
                contract=AdaptationDecision,
            )

    def submit(self, *decisions: AdaptationDecision) -> None:
        """Hand decisions over directly; :meth:`take` returns them. Never blocks."""
        with self._lock:
            self._submitted.extend(decisions)

    def take(self, step: int) -> list[AdaptationDecision]:
        """The decisions that arrived since the last call and were not seen before (taken in at
        ``step``); the bus deliveries among them are acknowledged."""
        with self._lock:
            incoming = list(self._submitted)
            self._submitted.clear()
        deliveries = self._inbox.drain() if self._inbox else []
        incoming += [decision for _, decision in deliveries if decision is not None]
        fresh = []
        for decision in incoming:
            if decision.run_id != self.run_id:
                self.counters["other_run"] += 1
            elif decision.decision_id in self._applied:
                self.counters["duplicates"] += 1
            else:
                self._remember(decision.decision_id, step)
                self.counters["received"] += 1
                fresh.append(decision)
        if self._inbox and deliveries:
            self._inbox.ack([delivery for delivery, _ in deliveries])
        return fresh

    def _remember(self, decision_id: str, step: int) -> None:
        self._applied[decision_id] = step
        while len(self._applied) > MAX_REMEMBERED:
            self._applied.popitem(last=False)

    def close(self, timeout: float = 5.0) -> None:
        """Stop consuming the bus (the pending acknowledgements are sent)."""
        if self._inbox is not None:
            self._inbox.close(timeout)

    def state_dict(self) -> dict[str, Any]:
        """The decision ids taken in (with their steps) and the decisions not taken yet."""
        with self._lock:
            submitted = [d.model_dump(mode="json") for d in self._submitted]
        return {
            "applied": [[decision_id, step] for decision_id, step in self._applied.items()],
            "submitted": submitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._applied = OrderedDict((str(k), int(v)) for k, v in state["applied"])
        with self._lock:
            self._submitted = deque(
                AdaptationDecision.model_validate(d) for d in state["submitted"]
            )
