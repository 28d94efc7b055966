"""The growth executor: applies Tamiyo's decisions to a training run at step boundaries.

The training loop calls :meth:`GrowthExecutor.on_step` after ``model.step()``. Decisions are
handed over with :meth:`GrowthExecutor.submit` or consumed from ``control.kasmina.commands``
(each ``decision_id`` taken in at most once). A GERMINATE goes through the compile pipeline::

    KernelLookup.resolve (background): kernel in Urza? ─no─► a Tezzeret worker compiles it
      (the run's own :mod:`~esper.tolaria.compile_worker`, or external workers)
    future done (checked at a step boundary) ─► model.request_kernel(...)  seed LOADING
    load done ─► grafted at model.step() ─► BLENDING ─► ACTIVE (kernel params join the optimizer)
    evaluation_steps after ACTIVE ─► judge_graft (loss-spike gate, reward) ─► RewardReport on
      control.tamiyo.rewards ─► fossilize (kept) or cull (rolled back: a ``loss_spike`` refusal)

Records: :mod:`~esper.tolaria.germination`; verdict: :func:`~esper.tolaria.graft_judgement.
judge_graft`; WIDEN/DEEPEN decisions: :mod:`~esper.tolaria.operator_growth`. A decision that
cannot be applied is a :class:`~esper.contracts.DecisionRefusal` whose ``gate`` says why: a run
limit (:mod:`~esper.tolaria.decision_limits`), ``seed_unavailable``, ``no_library``,
``compile_failed``, ``load_failed``, ``kernel_fault``, ``illegal_transition``.

**Graft delay** (``graft_delay_steps``): a germination is grafted exactly ``graft_delay_steps``
after its decision's step (why: :mod:`esper.tolaria.growth`). The training loop passes
:meth:`GrowthExecutor.graftable` to ``model.step(graftable=...)``. Before the due boundary nothing
visible happens (the kernel is compiled and prefetched into the kernel cache in the background; the
seed stays DORMANT, and a failed compile is reported at the due boundary); at the due boundary the
seed is loaded from the cache and grafted, the call waiting for the compile and the load if they
have not finished (counted in ``counters["stall_ms"]``).

It publishes what a remote controller needs too (:mod:`~esper.tolaria.controller_feed`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

import torch

from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    DecisionRefusal,
    GrowthOperator,
    RewardReport,
    SeedState,
    Topic,
)
from esper.core import MorphableModel
from esper.errors import ConfigurationError, EsperError, IllegalTransitionError
from esper.oona import BackgroundPublisher, MessageBus
from esper.tamiyo.safety import SafetyGates
from esper.tezzeret import KernelLookup
from esper.tolaria.controller_feed import ControllerFeed
from esper.tolaria.decision_intake import DecisionIntake
from esper.tolaria.decision_limits import DecisionGuard, training_refusal
from esper.tolaria.germination import (
    Germination,
    GerminationStage,
    Loss,
    RecentSteps,
    materialize,
    seed_slot,
    window_evidence,
)
from esper.tolaria.graft_judgement import GraftVerdict, judge_graft
from esper.tolaria.operator_growth import OperatorGrowth
from esper.urza import ArtifactLibrary

logger = logging.getLogger(__name__)

KERNEL_TIMEOUT_S = 300.0
"""Longest wait for a compile (and, with a graft delay, for a load)."""


@dataclass(frozen=True)
class StepOutcome:
    """What happened at one step boundary: its ``step``, the decisions ``received`` (duplicates
    excluded), ``(layer, seed)`` of kernels ``grafted``, ``rewards`` of grafts judged here (widen
    and deepen too), and ``refusals`` (decisions not applied, rolled-back grafts)."""

    step: int
    received: tuple[AdaptationDecision, ...] = ()
    grafted: tuple[tuple[str, int], ...] = ()
    rewards: tuple[RewardReport, ...] = ()
    refusals: tuple[DecisionRefusal, ...] = ()


@dataclass(frozen=True)
class Grafted:
    """A germination's kernel joined the model at this boundary."""

    layer_name: str
    seed_idx: int


Advance = DecisionRefusal | GraftVerdict | Grafted | None
"""What moving one germination along produced (``None``: nothing yet)."""


class GrowthExecutor:
    """Applies :class:`~esper.contracts.AdaptationDecision`\\ s to one model at step boundaries.

    Args:
        model: the morphable model being trained, its optimizer attached (its kernel source must
            read from ``library``, e.g. ``UrzaArtifactSource(library)``).
        run_id: the run; decisions for other runs are ignored.
        library: the Urza library kernels are found in or compiled into (``None``: GERMINATE is
            refused with gate ``no_library``). Someone must compile into it: the run's
            :class:`~esper.tolaria.compile_worker.CompileWorker` or external workers.
        bus: where decisions are consumed and rewards, refusals, topology and progress are
            published (``None``: :meth:`submit` only, nothing published).
        listen: consume ``control.kasmina.commands`` from ``bus`` (a background thread).
        safety: provides the ``loss_spike`` threshold and the limits every decision is checked
            against (:class:`~esper.tolaria.decision_limits.DecisionGuard`; default thresholds
            if omitted).
        evaluation_steps: steps after a seed becomes ACTIVE before it is judged; also the number
            of steps before the graft whose losses form the baseline.
        evaluate: optional validation hook run on the training thread at graft time and at the
            end of the window, returning ``{"loss": ..., "accuracy": ...}`` (accuracy optional).
        graft_delay_steps: graft each kernel this many steps after its decision (see the module
            docstring); ``None``: graft as soon as the kernel is loaded.
        total_steps: the run's length in steps (published with the progress).
        progress_every_steps: publish :class:`TrainingProgress` every this many steps.
    """

    def __init__(
        self,
        model: MorphableModel,
        *,
        run_id: str,
        library: ArtifactLibrary | None = None,
        bus: MessageBus | None = None,
        listen: bool = True,
        safety: SafetyGates | None = None,
        evaluation_steps: int = 100,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
        graft_delay_steps: int | None = None,
        total_steps: int | None = None,
        progress_every_steps: int = 10,
    ) -> None:
        delay = graft_delay_steps if graft_delay_steps is not None else 1
        if min(evaluation_steps, progress_every_steps, delay) < 1:
            raise ConfigurationError(
                f"evaluation_steps={evaluation_steps}, progress_every_steps="
                f"{progress_every_steps} and graft_delay_steps={graft_delay_steps} must be >= 1 "
                "(graft_delay_steps may be None: graft as soon as loaded)"
            )
        self.model = model
        self.run_id = run_id
        self.library = library
        self.safety = safety or SafetyGates()
        self.decision_limits = DecisionGuard.for_run(model, self.safety.config)
        self.evaluation_steps = evaluation_steps
        self.evaluate = evaluate
        self.graft_delay_steps = graft_delay_steps
        self.counters: Counter[str] = Counter()
        """``received``, ``duplicates``, ``other_run``, ``germinated``, ``widened``, ``deepened``,
        ``fossilized``, ``culled``, ``rolled_back``, ``refused``, ``stall_ms`` (waits when due)."""
        self._records: dict[str, Germination] = {}
        self._recent = RecentSteps(evaluation_steps)
        self._deferred: list[DecisionRefusal] = []
        self._lookup = (
            KernelLookup(library, timeout_s=KERNEL_TIMEOUT_S) if library is not None else None
        )
        self._base_parameters = sum(p.numel() for p in model.base_parameters())
        self.intake = DecisionIntake(run_id, counters=self.counters, bus=bus if listen else None)
        self.feed = ControllerFeed(
            model,
            run_id=run_id,
            publisher=BackgroundPublisher(bus, name=f"executor-{run_id}") if bus else None,
            total_steps=total_steps,
            every_steps=progress_every_steps,
        )
        self.operators = OperatorGrowth(  # WIDEN/DEEPEN decisions
            model, safety=self.safety.config, evaluation_steps=evaluation_steps,
            recent=self._recent, counters=self.counters, feed=self.feed, evaluate=evaluate,
        )  # fmt: skip

    def submit(self, *decisions: AdaptationDecision) -> None:
        """Hand decisions over (never blocks); they are applied at the next boundary, once."""
        self.intake.submit(*decisions)

    # -- the step boundary ---------------------------------------------------------------------

    def on_step(self, step: int, loss: Loss | None = None) -> StepOutcome:
        """Advance growth after ``model.step()`` returned ``step``; never blocks.

        Args:
            step: the step ``model.step()`` just returned.
            loss: this step's training loss (a float, or a tensor that is only read when an
                evaluation window ends, together with the window's other losses).
        """
        grafted: list[tuple[str, int]] = []
        rewards: list[RewardReport] = []
        refusals: list[DecisionRefusal] = self._deferred
        self._deferred = []
        if loss is not None:
            loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
        interval = self._recent.record(loss)
        received = self.intake.take(step)
        refusals += [r for r in (self._receive(d, step) for d in received) if r is not None]
        for decision_id, record in list(self._records.items()):
            advanced = self._advance(record, step, loss, interval)
            if isinstance(advanced, Grafted):
                grafted.append((advanced.layer_name, advanced.seed_idx))
            elif isinstance(advanced, GraftVerdict):
                rewards.append(advanced.report)
                refusals += [advanced.rollback] if advanced.rollback is not None else []
                del self._records[decision_id]
            elif isinstance(advanced, DecisionRefusal):
                refusals.append(advanced)
                del self._records[decision_id]
        operated = self.operators.advance(step, loss, interval)
        rewards, refusals = rewards + operated.rewards, refusals + operated.refusals
        self.feed.on_step(step, loss)
        return StepOutcome(step, tuple(received), tuple(grafted), tuple(rewards), tuple(refusals))

    def graftable(self, step: int) -> dict[str, set[int]] | None:
        """Seeds whose finished loads may be grafted at the boundary that will return ``step``
        (pass it to ``model.step(graftable=...)``); ``None`` without a graft delay.

        With a graft delay this waits, at the due boundary only, for the compile and the load
        of germinations due at ``step`` (bounded by :data:`KERNEL_TIMEOUT_S`).
        """
        if self.graft_delay_steps is None:
            return None
        for decision in self.intake.take(step - 1):
            refusal = self._receive(decision, step - 1)
            if refusal is not None:
                self._deferred.append(refusal)  # reported by the next on_step
        allowed: dict[str, set[int]] = {}
        managed = {(r.layer_name, r.seed_idx) for r in self._records.values()}
        for decision_id, record in list(self._records.items()):
            if record.due_step is None or record.due_step > step:
                continue
            if record.stage in (GerminationStage.RESOLVING, GerminationStage.RESOLVED):
                self._wait(record.resolving)
                self._prefetch(record)
                self._wait(record.prefetch)
                refusal = self._start_load(record, step - 1)
                if refusal is not None:
                    self._deferred.append(refusal)
                    del self._records[decision_id]
                    continue
            if record.stage is GerminationStage.LOADING and record.loading is not None:
                self._wait(record.loading)
                allowed.setdefault(record.layer_name, set()).add(record.seed_idx)
        for layer, seed_idx, _ in self.model.pending_loads():
            if (layer, seed_idx) not in managed:  # e.g. a fault retry: not ours to hold back
                allowed.setdefault(layer, set()).add(seed_idx)
        return allowed

    def _wait(self, future: Future[Any] | None) -> None:
        if future is None or future.done():
            return
        started = time.perf_counter()
        futures_wait([future], timeout=KERNEL_TIMEOUT_S)
        self.counters["stall_ms"] += round((time.perf_counter() - started) * 1e3)

    # -- GERMINATE: from decision to graft -----------------------------------------------------

    def _receive(self, decision: AdaptationDecision, step: int) -> DecisionRefusal | None:
        limit = self.decision_limits.check(decision, step, self._records.values(), self.operators)
        if limit is not None:  # the run's own limits, whatever the controller checked
            return self._refuse(decision, limit.gate, limit.reason)
        if decision.action is not AdaptationAction.GERMINATE:
            return self._apply_direct(decision)
        if decision.operator is not GrowthOperator.RESIDUAL:
            self.decision_limits.record_germination(decision, step)
            return self.operators.start(decision)
        layer_name = decision.layer_name
        if self.library is None or decision.blueprint is None:  # a blueprint: limits checked it
            return self._refuse(decision, "no_library", "cannot germinate: no Urza library")
        seed_idx = self._free_seed(layer_name, decision.seed_idx)
        if seed_idx is None:
            return self._refuse(
                decision, "seed_unavailable", f"layer {layer_name!r} has no DORMANT seed left"
            )
        record = Germination(decision, seed_idx, GerminationStage.RESOLVING, received_step=step)
        if self.graft_delay_steps is not None:
            record.due_step = max(decision.step + self.graft_delay_steps, step + 1)
        self._resolve(record)
        self.decision_limits.record_germination(decision, step)
        self._records[decision.decision_id] = record
        logger.info(
            "germination %s: %s for %r seed %d",
            decision.decision_id[:8], decision.blueprint.family, layer_name, seed_idx,
        )  # fmt: skip
        return None

    def _free_seed(self, layer_name: str, wanted: int) -> int | None:
        states = self.model.layer(layer_name).seed_states
        reserved = {r.seed_idx for r in self._records.values() if r.layer_name == layer_name}
        free = [i for i, s in enumerate(states) if s is SeedState.DORMANT and i not in reserved]
        if not free:
            return None
        return wanted if wanted in free else free[0]

    def _resolve(self, record: Germination) -> None:
        """Start looking up (or compiling) the record's kernel on a background thread."""
        assert self._lookup is not None and record.decision.blueprint is not None  # checked
        target = self.model.layer(record.layer_name).target()
        record.resolving = self._lookup.resolve(record.decision.blueprint, target)

    def _prefetch(self, record: Germination) -> None:
        """With a graft delay: load the resolved kernel into the cache without touching the seed
        (its state changes only at the due boundary), so the graft then finds it ready."""
        if record.stage is not GerminationStage.RESOLVING or record.resolving is None:
            return
        if not record.resolving.done() or record.resolving.exception() is not None:
            return  # a failure is reported at the due boundary, by _start_load
        record.kernel = record.resolving.result()
        record.prefetch = self.model.kernel_cache.get(record.kernel.kernel_id)
        record.stage = GerminationStage.RESOLVED

    def _start_load(self, record: Germination, step: int) -> DecisionRefusal | None:
        assert record.resolving is not None  # every RESOLVING/RESOLVED record has its lookup
        try:
            record.kernel = record.resolving.result(timeout=0)
        except Exception as exc:
            return self._refuse(record.decision, "compile_failed", str(exc))
        layer = self.model.layer(record.layer_name)
        if layer.seed_states[record.seed_idx] is not SeedState.DORMANT:
            seed_idx = self._free_seed(record.layer_name, record.seed_idx)
            if seed_idx is None:
                return self._refuse(record.decision, "seed_unavailable", "no DORMANT seed left")
            record.seed_idx = seed_idx
        try:  # refused while a widen in progress touches the layer
            record.loading = self.model.request_kernel(
                record.layer_name,
                seed_idx=record.seed_idx,
                kernel_artifact_id=record.kernel.kernel_id,
            )
        except IllegalTransitionError as exc:
            return self._refuse(record.decision, "illegal_transition", str(exc))
        record.stage = GerminationStage.LOADING
        return None

    def _advance(
        self, record: Germination, step: int, loss: Loss | None, interval: float | None
    ) -> Advance:
        """Move one germination along as far as the current state allows (never waits)."""
        if record.stage in (GerminationStage.RESOLVING, GerminationStage.RESOLVED):
            if record.resolving is None or not record.resolving.done():
                return None
            if self.graft_delay_steps is not None:  # nothing visible happens before it is due
                if record.stage is GerminationStage.RESOLVING:
                    self._prefetch(record)
                if record.due_step is None or step < record.due_step:
                    return None
            refusal = self._start_load(record, step)
            if refusal is not None:
                return refusal
        state = self.model.seed_state(record.layer_name, record.seed_idx)
        if record.stage is GerminationStage.LOADING:
            if state is SeedState.LOADING:
                return None
            if not state.runs_kernel:
                error = self.model.layer(record.layer_name).last_errors.get(record.seed_idx)
                return self._refuse(record.decision, "load_failed", f"kernel load failed: {error}")
            record.stage = GerminationStage.BLENDING
            record.grafted_step = step
            # every loss so far, this step's included, was computed before the graft
            record.losses_before = list(self._recent.losses)
            record.step_times_before = list(self._recent.step_times)
            record.metrics_before = dict(self.evaluate()) if self.evaluate else {}
            self.counters["germinated"] += 1
            return Grafted(record.layer_name, record.seed_idx)
        if state is SeedState.DORMANT:  # a fault gave up, or someone culled it
            return self._refuse(
                record.decision, "kernel_fault", "the seed went back to DORMANT before evaluation"
            )
        if record.stage is GerminationStage.BLENDING and state is SeedState.ACTIVE:
            record.stage = GerminationStage.EVALUATING
            record.active_step = step
            return None
        if record.stage is GerminationStage.EVALUATING:
            if loss is not None:
                record.losses_after.append(loss)
            if interval is not None:
                record.step_times_after.append(interval)
            assert record.active_step is not None  # set when the stage became EVALUATING
            if step - record.active_step >= self.evaluation_steps:
                return self._finish(record, step)
        return None

    def _finish(self, record: Germination, step: int) -> GraftVerdict:
        """Gather the evidence, judge the graft (:func:`judge_graft`) and apply the verdict."""
        layer, seed_idx = record.layer_name, record.seed_idx
        evidence = window_evidence(
            record,
            step,
            metrics_after=dict(self.evaluate()) if self.evaluate else {},
            kernel_parameters=record.kernel.parameter_count if record.kernel else 0,
            base_parameters=self._base_parameters,
            faults=seed_slot(self.model, layer, seed_idx).error_count,
            still_active=self.model.seed_state(layer, seed_idx) is SeedState.ACTIVE,
        )
        verdict = judge_graft(evidence, safety=self.safety.config)
        if verdict.keep:
            self.model.fossilize(layer, seed_idx=seed_idx)
            self.counters["fossilized"] += 1
        else:
            self.model.unload_kernel(layer, seed_idx=seed_idx)
            self.counters["culled"] += 1
        self.feed.publish(Topic.CONTROL_TAMIYO_REWARDS, verdict.report)
        if verdict.rollback is not None:
            self.counters["rolled_back"] += 1
            self.feed.publish(Topic.CONTROL_TAMIYO_REFUSALS, verdict.rollback)
        logger.info(
            "graft %s on %r: %s, reward %.4f", record.decision.decision_id[:8], layer,
            "kept" if verdict.keep else "culled", verdict.report.total,
        )  # fmt: skip
        return verdict

    # -- FOSSILIZE / CULL ----------------------------------------------------------------------

    def _apply_direct(self, decision: AdaptationDecision) -> DecisionRefusal | None:
        layer_name, seed_idx = decision.layer_name, decision.seed_idx
        try:
            if decision.action is AdaptationAction.FOSSILIZE:
                self.model.fossilize(layer_name, seed_idx=seed_idx)
                self.counters["fossilized"] += 1
            else:
                self.model.unload_kernel(layer_name, seed_idx=seed_idx)
                self.counters["culled"] += 1
        except EsperError as exc:
            return self._refuse(decision, "illegal_transition", str(exc))
        for decision_id, record in list(self._records.items()):  # no longer ours to evaluate
            if (record.layer_name, record.seed_idx) == (layer_name, seed_idx):
                del self._records[decision_id]
        return None

    def _refuse(self, decision: AdaptationDecision, gate: str, reason: str) -> DecisionRefusal:
        self.counters["refused"] += 1
        logger.warning("cannot apply decision %s: %s (%s)", decision.decision_id[:8], reason, gate)
        refusal = training_refusal(decision, gate, reason)
        self.feed.publish(Topic.CONTROL_TAMIYO_REFUSALS, refusal)
        return refusal

    # -- lifecycle and checkpoints -------------------------------------------------------------

    def compiling(self) -> int:
        """Germinations still waiting for their kernel (compile or lookup)."""
        return sum(1 for r in self._records.values() if r.stage.waiting_for_kernel)

    def in_flight(self) -> dict[str, str]:
        """Germinations not yet judged, by decision id -> stage."""
        return {decision_id: str(r.stage) for decision_id, r in self._records.items()}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background threads (the bus and the library stay open)."""
        self.intake.close(timeout)
        if self._lookup is not None:
            self._lookup.close()
        self.feed.close(timeout)

    def state_dict(self) -> dict[str, Any]:
        """The executor's state as plain JSON (pending loss tensors are read here, once).

        Germinations still compiling or loading are saved with their decision and due step; on
        :meth:`load_state_dict` they start again from the kernel lookup.
        """
        return {
            "run_id": self.run_id,
            "counters": dict(self.counters),
            **self.intake.state_dict(),
            "recent_losses": materialize(list(self._recent.losses)),
            **self.feed.state_dict(),
            "deferred": [r.model_dump(mode="json") for r in self._deferred],
            "records": [r.state_dict() for r in self._records.values()],
            "limits": self.decision_limits.state_dict(),
            "operators": self.operators.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, after the model's own state was loaded."""
        self.counters.clear()
        self.counters.update(state["counters"])
        self.intake.load_state_dict(state)
        self._recent.restore_losses(float(x) for x in state["recent_losses"])
        self.feed.load_state_dict(state)
        self._deferred = [DecisionRefusal.model_validate(r) for r in state["deferred"]]
        self.decision_limits.load_state_dict(state.get("limits", {}))
        self.operators.load_state_dict(state.get("operators", {}))
        self._records = {}
        for saved in state["records"]:
            record = Germination.from_state(saved)
            if record.stage.waiting_for_kernel:  # not grafted yet: look the kernel up again
                self._resolve(record)
            self._records[record.decision.decision_id] = record
