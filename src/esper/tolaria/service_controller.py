"""Tamiyo as a service: the run's end of a growth controller that runs in another process.

With ``growth.controller: service`` a run does not decide its own growth: ``esper tamiyo serve
--bus redis://… --run-id <run id>`` does, from what the run publishes on Oona (Redis Streams), and
:class:`ServiceController` is the run's side of that conversation (a
:class:`~esper.tolaria.controller_link.ControllerLink`)::

    the run                                          topic                      esper tamiyo serve
    observe_telemetry ─► HealthSignalBatch ───────►  telemetry.health     ─►  health (50 ms poll)
    executor (once), here (every 2 s) ─► topology ►  telemetry.topology   ─►  learns the model
    executor ─► TrainingProgress, rewards, refusals  telemetry.progress,
                                                     control.tamiyo.*     ─►  globals, gates
    poll(step) ◄─ AdaptationDecision ◄─────────────  control.kasmina.commands ◄─ decides (100 ms)

What it promises the training loop:

* **It never blocks a step** (design invariant 10): telemetry is queued on a bounded background
  publisher (dropped and counted while the bus is down) and decisions are read by a background
  subscriber; :meth:`~ServiceController.poll` only drains memory.
* **Each decision id once.** A decision delivered again (a redelivery, a duplicate publish) is
  dropped here, and the executor drops duplicates again.
* **Resumable.** A taken decision is acknowledged on the bus one checkpoint later: each
  :meth:`~ServiceController.state_dict` acknowledges what the previous one recorded (that
  checkpoint was written, or the run would have stopped), so the decisions taken after the latest
  checkpoint stay pending in the run's consumer group (``tolaria-<run id>``). A run resumed from
  that checkpoint reclaims them and applies them again, while the ids its checkpoint holds filter
  out the rest: nothing lost, nothing applied twice. (A new run that reclaims pending decisions
  did not resume: they belong to an earlier run under the same id, and are dropped.)
* **The run's growth window.** A decision arriving before ``growth.start_step`` waits until then;
  one arriving after ``growth.stop_fraction`` of the run is refused (gate ``growth_window``) and
  the refusal is published, so the controller releases what it reserved for it.
* **A controller may come and go.** Absent, it decides nothing and the run trains on, publishing
  into the streams (bounded at their ``max_len``); a controller started later reads them through
  its consumer groups. The topology is published again every ``topology_every_s`` so a controller
  that restarts after the run's first one learns the model within that time.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter, OrderedDict, deque
from typing import Any

import torch.distributed as dist

from esper.contracts import (
    AdaptationDecision,
    DecisionRefusal,
    HealthSignal,
    ModelTopology,
    RewardReport,
    Topic,
)
from esper.core import MorphableModel
from esper.errors import ConfigurationError
from esper.oona import BackgroundSubscriber, Delivery, MessageBus, OonaTelemetrySink, open_bus
from esper.tamiyo import model_topology
from esper.tolaria.config import GrowthSection
from esper.tolaria.controller_link import LinkResult
from esper.tolaria.decision_limits import training_refusal

logger = logging.getLogger(__name__)

GATE_GROWTH_WINDOW = "growth_window"
"""Refusal gate of a decision that arrived after the run's growth window had closed."""

_REMEMBERED_DECISIONS = 100_000
"""Decision ids kept to drop duplicates (the executor keeps as many)."""
_REMEMBERED_FLUSHES = 1024
"""Telemetry flushes whose publish time is kept, to measure decision latency."""
_PROCESS_COUNTERS = ("published", "dropped", "bus_errors", "latency_ms_p50", "latency_ms_p99")
"""Counters of this process only: reported, but not restored from a checkpoint."""


class ServiceController:
    """The run's link to a Tamiyo controller running as its own process, over ``bus``.

    Args:
        bus: the bus both sides use (any backend; a run uses ``redis://``). Not closed here.
        run_id: the run; decisions for other runs are dropped.
        topology: the model's structure, published every ``topology_every_s``.
        start_step: decisions are handed over from this step on (earlier ones wait).
        stop_step: decisions arriving after this step are refused (``None``: never).
        topology_every_s: period of the topology heartbeat.
        consumer: this run's consumer name in its group ``tolaria-<run_id>``.
    """

    def __init__(
        self,
        bus: MessageBus,
        *,
        run_id: str,
        topology: ModelTopology,
        start_step: int = 0,
        stop_step: int | None = None,
        topology_every_s: float = 2.0,
        consumer: str = "tolaria",
    ) -> None:
        if start_step < 0 or topology_every_s <= 0:
            raise ConfigurationError(
                f"start_step={start_step} (expected >= 0) and topology_every_s="
                f"{topology_every_s} (expected > 0)"
            )
        self.run_id = run_id
        self.topology = topology
        self.start_step = start_step
        self.stop_step = stop_step
        self.topology_every_s = topology_every_s
        self._counts: Counter[str] = Counter()
        # The subscriber first: it may raise (the bus is unreachable) before any thread starts.
        # It reclaims every decision its group left pending (idle 0): a resumed run's own.
        self._inbox = BackgroundSubscriber(
            bus,
            Topic.CONTROL_KASMINA_COMMANDS,
            group=f"tolaria-{run_id}",
            consumer=consumer,
            contract=AdaptationDecision,
            reclaim_idle_ms=0,
        )
        self.sink = OonaTelemetrySink(bus, run_id=run_id)
        self._taken: OrderedDict[str, int] = OrderedDict()
        self._held: list[AdaptationDecision] = []
        self._unacknowledged: list[Delivery] = []
        self._acknowledge_next: list[Delivery] = []
        self._flushed_at: OrderedDict[int, float] = OrderedDict()
        self.latencies_s: deque[float] = deque(maxlen=4096)
        """Seconds from publishing a telemetry flush to taking in a decision based on it."""
        self._topology_at: float | None = None
        self._restored = False
        self._publish_topology(time.monotonic())

    @classmethod
    def for_run(
        cls,
        settings: GrowthSection,
        model: MorphableModel,
        *,
        run_id: str,
        bus: MessageBus,
        total_steps: int,
    ) -> ServiceController:
        """The link of a run whose ``growth`` section says ``controller: service``: its growth
        window is ``start_step`` to ``stop_fraction`` of ``total_steps``."""
        return cls(
            bus,
            run_id=run_id,
            topology=model_topology(model, run_id=run_id),
            start_step=settings.start_step,
            stop_step=int(settings.stop_fraction * total_steps),
        )

    # -- what the run reports ------------------------------------------------------------------

    def observe_telemetry(self, step: int, signals: list[HealthSignal]) -> None:
        """Queue one flush as a :class:`~esper.contracts.HealthSignalBatch` (never blocks)."""
        self._flushed_at[step] = time.monotonic()
        while len(self._flushed_at) > _REMEMBERED_FLUSHES:
            self._flushed_at.popitem(last=False)
        self.sink.publish(signals, step=step)

    def observe_progress(self, step: int, loss: float | None) -> None:
        """Publish the topology again when ``topology_every_s`` passed (the executor publishes
        the run's :class:`~esper.contracts.TrainingProgress` itself)."""
        now = time.monotonic()
        if self._topology_at is None or now - self._topology_at >= self.topology_every_s:
            self._publish_topology(now)

    def observe_outcome(self, outcome: RewardReport | DecisionRefusal) -> None:
        """Nothing to do: the executor publishes rewards and refusals on the bus itself."""

    # -- decisions -----------------------------------------------------------------------------

    def poll(self, step: int) -> LinkResult:
        """The decisions that arrived since the last poll, for the run to apply at ``step``.

        Never waits on the bus. Decisions are handed over in arrival order once the growth
        window is open; after it closed they come back as refusals (also published).
        """
        now = time.monotonic()
        settled: list[Delivery] = []  # acknowledged at once: never to be applied
        for delivery, decision in self._inbox.drain():
            if decision is None:
                self._counts["undecodable"] += 1
            elif decision.run_id != self.run_id:
                self._counts["other_run"] += 1
            elif decision.decision_id in self._taken:
                self._counts["duplicates"] += 1
            elif delivery.delivery_count > 1 and not self._restored:
                self._counts["stale"] += 1  # left pending by an earlier run under this run id
            else:
                self._take(decision, step, now)
                self._unacknowledged.append(delivery)
                continue
            settled.append(delivery)
        if settled:
            self._inbox.ack(settled)
        if not self._held or step < self.start_step:
            return LinkResult()
        due, self._held = tuple(self._held), []
        if self.stop_step is None or step <= self.stop_step:
            self._counts["decisions"] += len(due)
            return LinkResult(decisions=due)
        return LinkResult(refusals=tuple(self._refuse_late(decision, step) for decision in due))

    def _take(self, decision: AdaptationDecision, step: int, now: float) -> None:
        self._taken[decision.decision_id] = step
        while len(self._taken) > _REMEMBERED_DECISIONS:
            self._taken.popitem(last=False)
        self._counts["received"] += 1
        if step < self.start_step:
            self._counts["held"] += 1
        flushed = self._flushed_at.get(decision.step)
        if flushed is not None:
            self.latencies_s.append(now - flushed)
        self._held.append(decision)
        logger.info(
            "decision %s from %s: %s %r seed %d (based on step %d) taken at step %d",
            decision.decision_id[:8],
            decision.policy,
            decision.action,
            decision.layer_name,
            decision.seed_idx,
            decision.step,
            step,
        )

    def _refuse_late(self, decision: AdaptationDecision, step: int) -> DecisionRefusal:
        self._counts["refused_late"] += 1
        refusal = training_refusal(
            decision,
            GATE_GROWTH_WINDOW,
            f"arrived at step {step}, after the run's growth window closed at step "
            f"{self.stop_step} (growth.stop_fraction)",
        )
        self.sink.publisher.publish(Topic.CONTROL_TAMIYO_REFUSALS, refusal)
        return refusal

    def _publish_topology(self, now: float) -> None:
        self._topology_at = now
        self._counts["topology_published"] += 1
        self.sink.publisher.publish(Topic.TELEMETRY_TOPOLOGY, self.topology)

    # -- counters, checkpoints, shutdown -------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """``received``, ``decisions`` (handed over), ``held`` (arrived before the window),
        ``refused_late``, ``duplicates``, ``other_run``, ``undecodable``, ``stale`` (left pending
        by an earlier run under this run id, dropped by a run that did not resume),
        ``topology_published``;
        in this process: ``published`` / ``dropped`` (health batches, topologies and refusals
        the bus took, or that were dropped while it was down), ``bus_errors`` (reads that failed
        and were retried) and ``latency_ms_p50`` / ``latency_ms_p99`` (telemetry published to
        decision taken in)."""
        counts = dict(self._counts)
        published = self.sink.counters
        counts["published"] = published.published
        counts["dropped"] = published.dropped
        counts["bus_errors"] = self._inbox.errors
        latencies = sorted(self.latencies_s)
        if latencies:
            counts["latency_ms_p50"] = round(statistics.median(latencies) * 1e3)
            counts["latency_ms_p99"] = round(latencies[round(0.99 * (len(latencies) - 1))] * 1e3)
        return counts

    def state_dict(self) -> dict[str, Any]:
        """The decisions taken (ids and the step each was taken at), those waiting for the growth
        window, and the counters, as plain JSON.

        Taking it acknowledges on the bus the decisions the previous call recorded (see the
        module docstring): call it for checkpoints.
        """
        if self._acknowledge_next:
            self._inbox.ack(self._acknowledge_next)
        self._acknowledge_next, self._unacknowledged = self._unacknowledged, []
        return {
            "run_id": self.run_id,
            "taken": [[decision_id, step] for decision_id, step in self._taken.items()],
            "held": [decision.model_dump(mode="json") for decision in self._held],
            "counters": self.counters,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before the first :meth:`poll`): decisions
        the checkpoint holds are dropped when the bus delivers them again."""
        self._taken = OrderedDict((str(k), int(v)) for k, v in state["taken"])
        self._held = [AdaptationDecision.model_validate(d) for d in state["held"]]
        self._counts = Counter(
            {str(k): int(v) for k, v in state["counters"].items() if k not in _PROCESS_COUNTERS}
        )
        self._restored = True

    def close(self) -> None:
        """Send the queued telemetry and stop the background threads (the bus stays open).

        Decisions taken since the last checkpoint stay pending in the run's consumer group: a
        resumed run applies them again.
        """
        self._inbox.close()
        self.sink.close()


def speaks_on_bus() -> bool:
    """Whether this process talks to the controller on ``growth.bus``: always, except on the
    ranks other than 0 of a distributed run (rank 0 consumes the decisions and the lockstep
    broadcasts them; the other ranks' messages would repeat rank 0's)."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def check_controller_bus(url: str) -> None:
    """Check, before a run creates anything, that the bus of ``growth.controller: service``
    answers.

    Raises:
        ConfigurationError: ``url`` is not a Redis URL, the ``redis`` package is missing, or the
            server does not answer.
    """
    try:
        from redis.exceptions import RedisError

        from esper.oona.redis_streams import RedisStreamsBus
    except ImportError:
        raise ConfigurationError(
            "growth.controller=service talks to its controller over Redis: install the redis "
            "extra (pip install 'esper-morphogenetic[redis]')"
        ) from None
    bus = open_bus(url)
    if not isinstance(bus, RedisStreamsBus):
        bus.close()
        raise ConfigurationError(
            f"growth.controller=service needs growth.bus to be a redis:// URL, got {url!r}"
        )
    try:
        bus.client.ping()
    except RedisError as exc:
        raise ConfigurationError(
            f"growth.controller=service: Redis at {bus.location} (growth.bus) does not answer "
            f"({exc}); start it (redis-server) or point growth.bus at a running server"
        ) from None
    finally:
        bus.close()
