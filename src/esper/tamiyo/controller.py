"""The Tamiyo controller: health -> layer graph -> policy -> safety gates -> decisions on Oona.

One decision cycle reads the smoothed per-layer health (:class:`~esper.tamiyo.health.
HealthCollector`), builds the layer graph (:mod:`esper.tamiyo.graph`) with the layers the safety
gates close masked out, asks the policy for an action, validates it with the gates, and publishes
an :class:`~esper.contracts.AdaptationDecision` on ``control.kasmina.commands`` or a
:class:`~esper.contracts.DecisionRefusal` on ``control.tamiyo.refusals``.

Two ways to run it:

- **synchronously** (Tolaria's deterministic, resumable default): the training loop feeds it
  (:meth:`TamiyoController.observe_telemetry`, :meth:`~TamiyoController.observe_progress`) and
  calls :meth:`~TamiyoController.decide` at fixed steps; no thread, no timing dependence.
- **autonomously**: :meth:`~TamiyoController.start` runs a 100 ms cycle on a thread (and the
  collector's 50 ms polling thread), deciding whenever new telemetry arrived, or at once when a
  layer raises an anomaly alert. ``esper tamiyo serve`` runs it as its own process.

In process the controller may hold the :class:`~esper.core.MorphableModel` (read only). As its own
process it needs the model's structure: the training side publishes a :class:`ModelTopology`
once on ``telemetry.topology`` and :class:`TrainingProgress` (step, loss, parameter counts) every
few steps on ``telemetry.progress`` (the :class:`~esper.tolaria.growth_executor.GrowthExecutor`
does both; see :mod:`esper.tamiyo.topology`); seed states come with the health signals. The
run's progress is kept by :class:`~esper.tamiyo.run_progress.RunProgress`, the decisions
published but not settled yet by :class:`~esper.tamiyo.pending_decisions.PendingDecisions`; a
policy is chosen by :func:`~esper.tamiyo.policy_loading.load_policy`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from esper.blueprints.registry import build_empty_kernel
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    BlueprintSpec,
    Contract,
    DecisionRefusal,
    HealthSignal,
    HealthSignalBatch,
    KernelTarget,
    ModelTopology,
    RewardReport,
    SeedState,
    Topic,
    TrainingProgress,
)
from esper.errors import ConfigurationError
from esper.oona import BusUnavailableError, MessageBus
from esper.tamiyo.controller_loop import ControllerInbox, ControllerThread
from esper.tamiyo.graph import GraphStructure, graph_structure
from esper.tamiyo.health import HealthCollector
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    OPERATOR_CATALOG,
    GrowthPolicy,
    LayerGraph,
    OperatorOption,
    PolicyOutput,
)
from esper.tamiyo.operator_actions import OperatorActions, decision_for, operator_choice
from esper.tamiyo.pending_decisions import PendingDecisions
from esper.tamiyo.run_progress import RunProgress
from esper.tamiyo.safety import GATE_LOSS_SPIKE, GateVerdict, Proposal, SafetyGates
from esper.tamiyo.topology import model_targets, topology_structure, topology_targets

if TYPE_CHECKING:
    from esper.core import MorphableModel

logger = logging.getLogger(__name__)

GATE_MASK = "mask"
"""Refusal gate of an action the graph's ``germinate_mask`` did not allow (a policy bug)."""


@dataclass(frozen=True)
class CycleResult:
    """What one decision did.

    Attributes:
        step: the training step the decision is based on.
        output: the policy's choice.
        graph: the observation the policy saw.
        decision: the published decision, if the policy germinated and the gates allowed it.
        refusal: the published refusal, if a gate refused.
    """

    step: int
    output: PolicyOutput
    graph: LayerGraph
    decision: AdaptationDecision | None = None
    refusal: DecisionRefusal | None = None


class TamiyoController:
    """Decides where and when a training run grows.

    Args:
        bus: where telemetry is read and decisions are published (``None``: fed and read
            directly, nothing published).
        policy: the growth policy (learned or baseline).
        run_id: the training run this controller serves.
        safety: the safety gates (default thresholds if omitted).
        model: the morphable model, when running in the training process (read only).
        topology: the model's structure, when running without the model; otherwise it is read
            from ``telemetry.topology``.
        collector: the health collector (default: one consuming ``telemetry.health`` of
            ``run_id`` from ``bus``).
        total_steps: the run's training budget in steps (for the ``progress`` feature).
        decide_every_steps: in :meth:`run_cycle`, decide when telemetry advanced this many steps
            since the last decision (anomaly alerts decide at once on new telemetry).
        cycle_s: period of the autonomous loop.
        explore: let the policy sample instead of taking its best action.
        group: consumer-group prefix on the bus.
        consumer: this controller's consumer name.
    """

    def __init__(
        self,
        bus: MessageBus | None,
        policy: GrowthPolicy,
        *,
        run_id: str,
        safety: SafetyGates | None = None,
        model: MorphableModel | None = None,
        topology: ModelTopology | None = None,
        collector: HealthCollector | None = None,
        total_steps: int | None = None,
        decide_every_steps: int = 1,
        cycle_s: float = 0.1,
        explore: bool = False,
        group: str = "tamiyo",
        consumer: str = "tamiyo-0",
    ) -> None:
        if decide_every_steps < 1 or cycle_s <= 0:
            raise ConfigurationError(
                f"decide_every_steps={decide_every_steps} (expected >= 1) and cycle_s={cycle_s} "
                "(expected > 0)"
            )
        self.bus = bus
        self.policy = policy
        self.run_id = run_id
        self.safety = safety or SafetyGates()
        self.model = model
        self.operator_actions: OperatorActions | None = None
        """Widen/deepen actions offered to the policy (``None``: residual kernels only)."""
        self.decide_every_steps = decide_every_steps
        self.cycle_s = cycle_s
        self.explore = explore
        self.collector = collector or HealthCollector(
            bus, run_id=run_id, group=f"{group}-health", consumer=consumer
        )
        self.counters: Counter[str] = Counter()
        """``decisions``, ``refusals``, ``waits``, ``cycles``, ``rewards``, ``publish_errors``,
        ``cycle_errors``, ``undecodable`` / ``rejected`` (bad messages, each dropped alone)."""
        self.adaptations = 0
        """Germinations decided so far."""
        self.last_result: CycleResult | None = None
        self._topology: ModelTopology | None = None
        self._structure: GraphStructure | None = None
        self._targets: dict[str, KernelTarget] = {}
        self._run = RunProgress(run_id, total_steps)
        self._last_decision_step: int | None = None
        self._pending = PendingDecisions()
        self._kernel_sizes: dict[tuple[str, str], int] = {}
        self._lock = threading.RLock()
        self._loop = ControllerThread(self)
        self._inbox: ControllerInbox | None = None
        if model is not None:
            self._use_structure(graph_structure(model), model_targets(model))
            self._run.base_parameters = sum(p.numel() for p in model.base_parameters())
        elif topology is not None:
            self.observe(topology)
        if bus is not None:
            self._inbox = ControllerInbox(
                bus, self.observe, group=group, consumer=consumer, counters=self.counters
            )

    # -- inputs --------------------------------------------------------------------------------

    def observe_telemetry(self, signals: HealthSignalBatch | Sequence[HealthSignal]) -> None:
        """Feed one telemetry flush to the health collector (synchronous use)."""
        self.collector.ingest(signals)

    def observe_progress(
        self,
        step: int,
        *,
        loss: float | None = None,
        total_steps: int | None = None,
        kernel_parameters: int | None = None,
    ) -> None:
        """Record the run's step and recent loss (synchronous use; see :class:`TrainingProgress`)."""
        with self._lock:
            if kernel_parameters is None:
                kernel_parameters = self._observed_kernel_parameters()
            self._run.record(
                step, loss=loss, total_steps=total_steps, kernel_parameters=kernel_parameters
            )

    def observe(self, message: Contract) -> None:
        """Take in a message from the training side (what :meth:`poll_bus` receives):
        :class:`ModelTopology`, :class:`TrainingProgress`, :class:`RewardReport`,
        :class:`DecisionRefusal` or :class:`HealthSignalBatch`. Other runs' messages are ignored.
        """
        if getattr(message, "run_id", self.run_id) != self.run_id:
            self.counters["other_run"] += 1
            return
        with self._lock:
            if isinstance(message, ModelTopology):
                if self.model is None and message != self._topology:
                    structure = topology_structure(message)  # raises first: nothing half-changed
                    self._topology = message
                    self._run.base_parameters = message.base_parameters
                    self._use_structure(structure, topology_targets(message))
            elif isinstance(message, TrainingProgress):
                self._run.observe(message)
            elif isinstance(message, RewardReport):
                self._observe_reward(message)
            elif isinstance(message, DecisionRefusal):
                self._observe_refusal(message)
            elif isinstance(message, HealthSignalBatch):
                self.collector.ingest(message)

    def _observe_reward(self, report: RewardReport) -> None:
        self.counters["rewards"] += 1
        culled = report.outcome is AdaptationAction.CULL
        self._pending.rewarded(report.decision_id, culled=culled)
        if culled:
            self.safety.record_rollback(report.step, report.layer_name)

    def _observe_refusal(self, refusal: DecisionRefusal) -> None:
        if refusal.gate == GATE_LOSS_SPIKE:
            return  # a rolled-back graft: its RewardReport releases the commitment
        if refusal.decision_id is None:
            return  # a gate's refusal (ours): it never became a decision, nothing was committed
        # The training side could not apply one of our decisions: its parameters never arrive.
        if self._pending.refused(refusal.decision_id):
            self.counters["failed_on_training_side"] += 1

    def poll_bus(self, *, poll_health: bool = True) -> int:
        """Receive, handle and acknowledge what the training side published; return the count.

        Each message is handled on its own (see :class:`~esper.tamiyo.controller_loop.
        ControllerInbox`): a bad one is logged, counted and acknowledged alone.
        """
        handled = self.collector.poll_once() if poll_health else 0
        return handled + (self._inbox.poll() if self._inbox is not None else 0)

    # -- deciding ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the controller knows the model's structure (it cannot decide before)."""
        return self._structure is not None

    @property
    def latest_step(self) -> int | None:
        """The newest training step seen in telemetry or progress."""
        steps = [s for s in (self.collector.latest_step, self._run.step) if s is not None]
        return max(steps) if steps else None

    @property
    def total_steps(self) -> int | None:
        """The run's training budget in steps, if known."""
        return self._run.total_steps

    def run_cycle(self, *, poll_health: bool = True) -> CycleResult | None:
        """One autonomous cycle: poll the bus, then decide if new telemetry is due.

        A decision is due when telemetry advanced ``decide_every_steps`` since the last
        decision, or when a layer raised an anomaly alert on telemetry newer than the last
        decision. Returns the decision's result, or ``None`` when nothing was due.
        """
        with self._lock:
            self.counters["cycles"] += 1
            if self.bus is not None:
                self.poll_bus(poll_health=poll_health)
            step = self.collector.latest_step
            if step is None or not self.ready:
                return None
            last = self._last_decision_step
            alerts = self.collector.take_alerts()
            if last is not None and step < last + self.decide_every_steps:
                if not alerts or step <= last:
                    return None
                self.counters["alert_decisions"] += 1  # ahead of schedule: a layer is in trouble
            return self.decide(step)

    def decide(self, step: int | None = None) -> CycleResult:
        """Decide once on the current observations (synchronous and deterministic).

        Args:
            step: the training step to attribute the decision to (default: the newest seen).

        Raises:
            ConfigurationError: the model's structure is not known yet (no model, no topology).
        """
        with self._lock:
            if self._structure is None:
                raise ConfigurationError(
                    "the controller does not know the model's structure yet: pass model= or "
                    "topology=, or wait until the training side publishes its ModelTopology"
                )
            step = step if step is not None else (self.latest_step or 0)
            structure = self._structure
            seed_states = self._seed_states()
            base = self._run.base_parameters
            kernel = max(self._observed_kernel_parameters(), self._pending.committed_parameters())
            blocked = self.safety.blocked_layers(
                step, structure.layer_names, base_parameters=base, kernel_parameters=kernel
            )
            graph = structure.build(
                self.collector.summaries(),
                seed_states=seed_states,
                globals=self._run.global_state(
                    step, kernel_parameters=kernel, adaptations=self.adaptations
                ),
                step=step,
                blocked=blocked,
            )
            if self.operator_actions is not None:
                graph = self.operator_actions.annotate(graph, blocked)
            output = self.policy.act(graph, explore=self.explore)
            self._last_decision_step = step
            result = self._validate(graph, output, seed_states, base, kernel)
            self.last_result = result
            return result

    def _validate(
        self,
        graph: LayerGraph,
        output: PolicyOutput,
        seed_states: Mapping[str, Sequence[SeedState]],
        base: int,
        kernel: int,
    ) -> CycleResult:
        action, step = output.action, graph.step
        if action.node is None or (action.option is None and action.operator is None):
            self.counters["waits"] += 1
            return CycleResult(step, output, graph)
        layer = graph.layer_names[action.node]
        operator: OperatorOption | None = None
        if action.operator is not None:  # widen/deepen (esper.tamiyo.operator_actions)
            operator, spec = OPERATOR_CATALOG[action.operator], None
            allowed, added = operator_choice(graph, action.node, action.operator)
            name = operator.name
        else:
            assert action.option is not None
            option = BLUEPRINT_CATALOG[action.option]
            name, spec = option.name, option.spec
            allowed = bool(graph.action_mask()[action.index()])
            added = self._kernel_size(spec, self._targets[layer])
        proposal = Proposal(
            step=step,
            layer_name=layer,
            action=AdaptationAction.GERMINATE,
            confidence=output.confidence,
            uncertainty=output.uncertainty,
            added_parameters=added,
        )
        if not allowed:
            logger.error("policy %s chose a masked action %s", self.policy.name, action)
            verdict = GateVerdict(GATE_MASK, f"option {name} is not allowed for {layer!r}")
        else:
            verdict = self.safety.check(proposal, base_parameters=base, kernel_parameters=kernel)
        if verdict.gate is not None:
            refusal = SafetyGates.refusal(
                proposal, verdict, run_id=self.run_id, policy=self.policy.name
            )
            self.counters["refusals"] += 1
            logger.info("refused %s on %r at step %d: %s", name, layer, step, verdict.reason)
            self._publish(Topic.CONTROL_TAMIYO_REFUSALS, refusal)
            return CycleResult(step, output, graph, refusal=refusal)
        seed_idx = next((i for i, s in enumerate(seed_states[layer]) if s is SeedState.DORMANT), 0)
        confidence, uncertainty = (
            min(1.0, max(0.0, output.confidence)),
            max(0.0, output.uncertainty),
        )
        reason = f"{name}: +{proposal.added_parameters} parameters"
        if operator is not None:
            decision = decision_for(
                operator, layer, step, run_id=self.run_id, policy=self.policy.name,
                confidence=confidence, uncertainty=uncertainty, reason=reason,
            )  # fmt: skip
        else:
            decision = AdaptationDecision(
                run_id=self.run_id, step=step, action=AdaptationAction.GERMINATE,
                layer_name=layer, seed_idx=seed_idx, blueprint=spec, policy=self.policy.name,
                confidence=confidence, uncertainty=uncertainty, reason=reason,
            )  # fmt: skip
        if not self._publish(Topic.CONTROL_KASMINA_COMMANDS, decision):
            return CycleResult(step, output, graph)  # never sent: as if the policy had waited
        self.safety.record_adaptation(step, layer)
        self._pending.add(decision, added_parameters=proposal.added_parameters)
        self.adaptations += 1
        self.counters["decisions"] += 1
        logger.info("decided %s on %r seed %d at step %d", name, layer, seed_idx, step)
        return CycleResult(step, output, graph, decision=decision)

    def _publish(self, topic: Topic, message: Contract) -> bool:
        """Publish on the bus (if any); ``False`` when the bus could not be reached."""
        if self.bus is None:
            return True
        try:
            self.bus.publish(topic, message)
        except BusUnavailableError as exc:
            self.counters["publish_errors"] += 1
            logger.warning("controller: could not publish on %s: %s", topic, exc)
            return False
        return True

    # -- observations --------------------------------------------------------------------------

    def _use_structure(self, structure: GraphStructure, targets: dict[str, KernelTarget]) -> None:
        self._structure = structure
        self._targets = targets

    def _seed_states(self) -> dict[str, tuple[SeedState, ...]]:
        """Seed states, with the seeds of decisions not yet applied counted as taken (see
        :meth:`PendingDecisions.with_reserved_seeds`)."""
        if self.model is not None:
            states = {n: self.model.layer(n).seed_states for n in self.model.layer_names}
            return self._pending.with_reserved_seeds(states, None)
        return self._pending.with_reserved_seeds(
            self.collector.seed_states(), self.collector.layer_steps()
        )

    def _observed_kernel_parameters(self) -> int:
        if self.model is None:
            return self._run.kernel_parameters
        for _ in range(3):  # on a controller thread, a graft may change the modules meanwhile
            try:
                return sum(p.numel() for p in self.model.kernel_parameters())
            except RuntimeError:
                continue
        return self._pending.committed_parameters()

    def _kernel_size(self, spec: BlueprintSpec, target: KernelTarget) -> int:
        key = (spec.canonical_json(), target.model_dump_json())
        if key not in self._kernel_sizes:
            module = build_empty_kernel(spec, target)  # meta device: shapes only
            self._kernel_sizes[key] = sum(p.numel() for p in module.parameters())
        return self._kernel_sizes[key]

    # -- autonomous loop -----------------------------------------------------------------------

    def start(self) -> TamiyoController:
        """Run :meth:`run_cycle` every ``cycle_s`` on a daemon thread (and the collector's own
        polling thread when it has a bus) until :meth:`stop`."""
        self._loop.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the autonomous loop and the collector's thread (the bus is not closed)."""
        self._loop.stop(timeout)

    def serve(self, *, duration_s: float | None = None) -> None:
        """Run the autonomous loop in the foreground until ``duration_s`` passed or Ctrl-C."""
        self._loop.serve(duration_s=duration_s)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (safety, health, policy when it has one, counters) as JSON."""
        with self._lock:
            policy_state = getattr(self.policy, "state_dict", None)
            return {
                "run_id": self.run_id,
                "safety": self.safety.state_dict(),
                "collector": self.collector.state_dict(),
                "policy": policy_state() if callable(policy_state) else None,
                "adaptations": self.adaptations,
                "counters": dict(self.counters),
                "last_decision_step": self._last_decision_step,
                **self._pending.state_dict(),
                **self._run.state_dict(),
                "topology": self._topology.model_dump(mode="json") if self._topology else None,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a policy without state is left as is)."""
        with self._lock:
            self.safety.load_state_dict(state["safety"])
            self.collector.load_state_dict(state["collector"])
            load_policy_state = getattr(self.policy, "load_state_dict", None)
            if state["policy"] is not None and callable(load_policy_state):
                load_policy_state(state["policy"])
            self.adaptations = int(state["adaptations"])
            self.counters = Counter(state["counters"])
            self._last_decision_step = state["last_decision_step"]
            self._pending.load_state_dict(state)
            self._run.load_state_dict(state)
            if state["topology"] is not None and self.model is None:
                self.observe(ModelTopology.model_validate(state["topology"]))
