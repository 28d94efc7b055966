"""The growth executor: applies Tamiyo's decisions to a training run at step boundaries.

The training loop calls :meth:`GrowthExecutor.on_step` after ``model.step()``. Decisions arrive on
``control.kasmina.commands`` (a background thread consumes them; the training thread only drains
an in-memory queue) or directly through :meth:`GrowthExecutor.submit`. Each ``decision_id`` is
applied at most once; duplicates are ignored, and a bus delivery is acknowledged once its decision
was taken into the executor's records.

A GERMINATE decision goes through the compile pipeline without ever blocking a step::

    find_or_enqueue(Urza, blueprint, layer target)     (background thread)
      kernel in Urza? ─no─► Tezzeret compiles (embedded worker thread, or external workers);
                            the background thread waits for the compile job to finish
    future done (checked at a step boundary) ─► model.request_kernel(...)  seed LOADING
    load done ─► grafted at model.step() ─► BLENDING ─► ACTIVE (kernel params join the optimizer)
    evaluation_steps after ACTIVE ─► loss-spike gate ─► reward ─► RewardReport on
      control.tamiyo.rewards ─► fossilize (kept) or cull (rolled back; DecisionRefusal, gate
      ``loss_spike``, on control.tamiyo.refusals)

A decision the executor cannot apply is reported as a :class:`~esper.contracts.DecisionRefusal`
whose ``gate`` says why: one of the run's limits, checked first (:mod:`~esper.tolaria.
decision_limits`), or ``seed_unavailable``, ``no_library``, ``compile_failed``, ``load_failed``,
``kernel_fault``, ``illegal_transition``.

**Deterministic mode** (``graft_delay_steps``): a germination is grafted exactly
``graft_delay_steps`` after its decision's step. The training loop passes
:meth:`GrowthExecutor.graftable` to ``model.step(graftable=...)``. Before the due boundary nothing
visible happens (the kernel is compiled and prefetched into the kernel cache in the background; the
seed stays DORMANT, and a failed compile is reported at the due boundary); at the due boundary the
seed is loaded from the cache and grafted, the call waiting for the compile and the load if they
have not finished (counted in ``counters["stall_ms"]``). Growth events are then a function of
the step alone, so resumed runs repeat uninterrupted ones.

The executor also publishes, through a :class:`~esper.oona.BackgroundPublisher` (never blocking),
the model's :class:`~esper.contracts.ModelTopology` once and
:class:`~esper.contracts.TrainingProgress` every ``progress_every_steps``, so a controller
in another process can build its graphs.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    CompileJobStatus,
    Contract,
    DecisionRefusal,
    KernelMetadata,
    RewardReport,
    SeedState,
    Topic,
    TrainingProgress,
)
from esper.core import MorphableModel
from esper.errors import ConfigurationError, EsperError
from esper.oona import (
    BackgroundPublisher,
    BackgroundSubscriber,
    MessageBus,
)
from esper.tamiyo.reward import AdaptationOutcome, RewardWeights, compute_reward
from esper.tamiyo.safety import GATE_LOSS_SPIKE, SafetyGates
from esper.tamiyo.topology import model_topology
from esper.tezzeret import TezzeretProcess, TezzeretWorker, find_or_enqueue, library_location
from esper.tolaria.decision_limits import DecisionGuard, training_refusal
from esper.urza import ArtifactLibrary

logger = logging.getLogger(__name__)

Loss = float | torch.Tensor
"""A step's training loss: a Python float, or a scalar tensor (read only at evaluation time)."""


_GRAFTED = "grafted"


class _Stage:
    RESOLVING = "resolving"  # looking up / compiling the kernel (background)
    RESOLVED = "resolved"  # deterministic mode: kernel known and prefetched, waiting to be due
    LOADING = "loading"  # model.request_kernel issued; grafted at a step boundary
    BLENDING = "blending"
    EVALUATING = "evaluating"  # ACTIVE; counting evaluation_steps


@dataclass
class _Germination:
    """One GERMINATE decision on its way through the pipeline."""

    decision: AdaptationDecision
    seed_idx: int
    stage: str
    received_step: int
    due_step: int | None = None
    kernel: KernelMetadata | None = None
    resolving: Future[KernelMetadata] | None = None
    loading: Future[Any] | None = None
    prefetch: Future[Any] | None = None
    grafted_step: int | None = None
    active_step: int | None = None
    losses_before: list[Loss] = field(default_factory=list)
    losses_after: list[Loss] = field(default_factory=list)
    metrics_before: dict[str, float] = field(default_factory=dict)
    step_times_before: list[float] = field(default_factory=list)
    step_times_after: list[float] = field(default_factory=list)
    rollback: DecisionRefusal | None = None


@dataclass(frozen=True)
class StepOutcome:
    """What happened at one step boundary.

    Attributes:
        step: the boundary's step.
        received: decisions taken into the records at this boundary (duplicates excluded).
        grafted: ``(layer, seed)`` of kernels that were grafted at this boundary.
        rewards: rewards of grafts whose evaluation window ended here.
        refusals: decisions that could not be applied, and rolled-back grafts.
    """

    step: int
    received: tuple[AdaptationDecision, ...] = ()
    grafted: tuple[tuple[str, int], ...] = ()
    rewards: tuple[RewardReport, ...] = ()
    refusals: tuple[DecisionRefusal, ...] = ()


class GrowthExecutor:
    """Applies :class:`~esper.contracts.AdaptationDecision`\\ s to one model at step boundaries.

    Args:
        model: the morphable model being trained (its kernel source must read from ``library``,
            e.g. ``UrzaArtifactSource(library)``).
        run_id: the run; decisions for other runs are ignored.
        library: the Urza library kernels are found in or compiled into (``None``: GERMINATE is
            refused with gate ``no_library``).
        bus: where decisions are consumed and rewards, refusals, topology and progress are
            published (``None``: :meth:`submit` only, nothing published).
        listen: consume ``control.kasmina.commands`` from ``bus`` (a background thread).
        optimizer: when given, :meth:`MorphableModel.attach_optimizer` is called with it and
            ``optimizer_options`` (leave it out if the training loop attached it already).
        optimizer_options: parameter-group options for grafted kernels, e.g. ``{"lr": 1e-3}``.
        compile_worker: compile in this run: ``True`` or ``"thread"`` runs a
            :class:`~esper.tezzeret.TezzeretWorker` thread on ``library``; ``"process"`` runs
            ``esper tezzeret worker`` as a child process on the same library (no GIL contention
            with the training thread; needs a library opened from URLs without a password, or
            an Urza service); ``False`` when external workers compile.
        safety: provides the ``loss_spike`` gate and the limits every decision is checked against
            (:class:`~esper.tolaria.decision_limits.DecisionGuard`; default thresholds if omitted).
        evaluation_steps: steps after a seed becomes ACTIVE before it is judged; also the number
            of steps before the graft whose losses form the baseline.
        evaluate: optional validation hook run on the training thread at graft time and at the
            end of the window, returning ``{"loss": ..., "accuracy": ...}`` (accuracy optional).
        reward_weights: weights of the reward components (:class:`RewardWeights` defaults).
        measure_step_time: time the intervals between ``on_step`` calls for the reward's
            ``compute_cost`` (wall time: turn it off where rewards must repeat exactly).
        graft_delay_steps: deterministic mode (see the module docstring); ``None``: graft as soon
            as the kernel is loaded.
        kernel_timeout_s: longest wait for a compile (and, in deterministic mode, a load).
        total_steps: the run's length in steps (published with the progress).
        progress_every_steps: publish :class:`TrainingProgress` every this many steps.
        group: consumer group on the commands topic.
        consumer: this executor's consumer name.
    """

    def __init__(
        self,
        model: MorphableModel,
        *,
        run_id: str,
        library: ArtifactLibrary | None = None,
        bus: MessageBus | None = None,
        listen: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        optimizer_options: Mapping[str, Any] | None = None,
        compile_worker: bool | Literal["thread", "process"] = False,
        safety: SafetyGates | None = None,
        evaluation_steps: int = 100,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
        reward_weights: RewardWeights | None = None,
        measure_step_time: bool = True,
        graft_delay_steps: int | None = None,
        kernel_timeout_s: float = 300.0,
        total_steps: int | None = None,
        progress_every_steps: int = 10,
        group: str = "tolaria-executor",
        consumer: str = "executor-0",
    ) -> None:
        if evaluation_steps < 1 or progress_every_steps < 1 or kernel_timeout_s <= 0:
            raise ConfigurationError(
                f"evaluation_steps={evaluation_steps} and progress_every_steps="
                f"{progress_every_steps} (expected >= 1), kernel_timeout_s={kernel_timeout_s} "
                "(expected > 0)"
            )
        if graft_delay_steps is not None and graft_delay_steps < 1:
            raise ConfigurationError(
                f"graft_delay_steps must be >= 1 (or None for as-soon-as-loaded), got "
                f"{graft_delay_steps}"
            )
        if compile_worker and library is None:
            raise ConfigurationError(f"compile_worker={compile_worker!r} needs a library")
        if compile_worker not in (True, False, "thread", "process"):
            raise ConfigurationError(
                f"compile_worker must be True/'thread', 'process' or False, got {compile_worker!r}"
            )
        self.model = model
        self.run_id = run_id
        self.library = library
        self.safety = safety or SafetyGates()
        self.decision_limits = DecisionGuard.for_run(model, self.safety.config)
        self.evaluation_steps = evaluation_steps
        self.evaluate = evaluate
        self.reward_weights = reward_weights or RewardWeights()
        self.measure_step_time = measure_step_time
        self.graft_delay_steps = graft_delay_steps
        self.kernel_timeout_s = kernel_timeout_s
        self.total_steps = total_steps
        self.progress_every_steps = progress_every_steps
        self.counters: Counter[str] = Counter()
        """``received``, ``duplicates``, ``other_run``, ``germinated`` (grafted), ``fossilized``,
        ``culled``, ``rolled_back``, ``refused``, ``stall_ms`` (deterministic waits)."""
        self._records: dict[str, _Germination] = {}
        self._applied: OrderedDict[str, int] = OrderedDict()
        self._max_remembered = 100_000
        self._recent_losses: deque[Loss] = deque(maxlen=evaluation_steps)
        self._progress_losses: list[Loss] = []
        self._step_times: deque[float] = deque(maxlen=evaluation_steps)
        self._last_step_at: float | None = None
        self._submitted: deque[AdaptationDecision] = deque()
        self._deferred: list[DecisionRefusal] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._resolver = ThreadPoolExecutor(max_workers=2, thread_name_prefix="esper-kernels")
        self._base_parameters = sum(p.numel() for p in model.base_parameters())
        self._kernel_parameters = sum(p.numel() for p in model.kernel_parameters())
        model.on_kernel_grafted(self._count_kernel(+1))  # kept current without a model walk
        model.on_kernel_removed(self._count_kernel(-1))
        if optimizer is not None:
            model.attach_optimizer(optimizer, **dict(optimizer_options or {}))
        self.worker: TezzeretWorker | None = None
        self._worker_process: TezzeretProcess | None = None
        if library is not None and compile_worker in (True, "thread"):
            self.worker = TezzeretWorker(library, bus).start()
        elif library is not None and compile_worker == "process":
            self._worker_process = TezzeretProcess(library_location(library), poll_interval_s=0.1)
        self.publisher = BackgroundPublisher(bus, name=f"executor-{run_id}") if bus else None
        self._inbox: BackgroundSubscriber[AdaptationDecision] | None = None
        if bus is not None and listen:
            self._inbox = BackgroundSubscriber(
                bus,
                Topic.CONTROL_KASMINA_COMMANDS,
                group=group,
                consumer=consumer,
                contract=AdaptationDecision,
            )
        self._publish(Topic.TELEMETRY_TOPOLOGY, model_topology(model, run_id=run_id))

    def _count_kernel(self, sign: int) -> Callable[[str, int, nn.Module], None]:
        def count(layer_name: str, seed_idx: int, module: nn.Module) -> None:
            self._kernel_parameters += sign * sum(p.numel() for p in module.parameters())

        return count

    # -- receiving decisions -------------------------------------------------------------------

    def submit(self, *decisions: AdaptationDecision) -> None:
        """Hand decisions over directly (in-process use); they are applied at the next boundary.

        Never blocks. A decision also received from the bus is still applied once.
        """
        with self._lock:
            self._submitted.extend(decisions)

    def _take_new(self, step: int) -> list[AdaptationDecision]:
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
        while len(self._applied) > self._max_remembered:
            self._applied.popitem(last=False)

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
        refusals: list[DecisionRefusal] = []
        interval = self._time_step()
        if loss is not None:
            loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
            self._recent_losses.append(loss)
            self._progress_losses.append(loss)
        refusals += self._deferred
        self._deferred = []
        received = self._take_new(step)
        for decision in received:
            refusal = self._receive(decision, step)
            if refusal is not None:
                refusals.append(refusal)
        for decision_id, record in list(self._records.items()):
            outcome = self._advance(record, step, loss, interval)
            if isinstance(outcome, DecisionRefusal):
                refusals.append(outcome)
                del self._records[decision_id]
            elif isinstance(outcome, RewardReport):
                rewards.append(outcome)
                if record.rollback is not None:
                    refusals.append(record.rollback)
                del self._records[decision_id]
            elif outcome == _GRAFTED:
                grafted.append((record.decision.layer_name, record.seed_idx))
        if step % self.progress_every_steps == 0:
            self._publish_progress(step)
        return StepOutcome(step, tuple(received), tuple(grafted), tuple(rewards), tuple(refusals))

    def graftable(self, step: int) -> dict[str, set[int]] | None:
        """Seeds whose finished loads may be grafted at the boundary that will return ``step``
        (pass it to ``model.step(graftable=...)``); ``None`` outside deterministic mode.

        In deterministic mode this waits, at the due boundary only, for the compile and the load
        of germinations due at ``step`` (bounded by ``kernel_timeout_s``).
        """
        if self.graft_delay_steps is None:
            return None
        for decision in self._take_new(step - 1):
            refusal = self._receive(decision, step - 1)
            if refusal is not None:
                self._deferred.append(refusal)  # reported by the next on_step
        allowed: dict[str, set[int]] = {}
        managed = {(r.decision.layer_name, r.seed_idx) for r in self._records.values()}
        for decision_id, record in list(self._records.items()):
            if record.due_step is None or record.due_step > step:
                continue
            if record.stage in (_Stage.RESOLVING, _Stage.RESOLVED):
                self._wait(record.resolving)
                self._prefetch(record)
                self._wait(record.prefetch)
                refusal = self._start_load(record, step - 1)
                if refusal is not None:
                    self._deferred.append(refusal)
                    del self._records[decision_id]
                    continue
            if record.stage == _Stage.LOADING and record.loading is not None:
                self._wait(record.loading)
                allowed.setdefault(record.decision.layer_name, set()).add(record.seed_idx)
        for layer, seed_idx, _ in self.model.pending_loads():
            if (layer, seed_idx) not in managed:  # e.g. a fault retry: not ours to hold back
                allowed.setdefault(layer, set()).add(seed_idx)
        return allowed

    def _wait(self, future: Future[Any] | None) -> None:
        if future is None or future.done():
            return
        started = time.perf_counter()
        futures_wait([future], timeout=self.kernel_timeout_s)
        self.counters["stall_ms"] += round((time.perf_counter() - started) * 1e3)

    def _receive(self, decision: AdaptationDecision, step: int) -> DecisionRefusal | None:
        limit = self.decision_limits.check(decision, step, self._records.values())
        if limit is not None:  # the run's own limits, whatever the controller checked
            return self._refuse(decision, limit.gate, limit.reason)
        if decision.action is AdaptationAction.GERMINATE:
            return self._receive_germination(decision, step)
        return self._apply_direct(decision)

    def _receive_germination(
        self, decision: AdaptationDecision, step: int
    ) -> DecisionRefusal | None:
        layer_name = decision.layer_name
        if self.library is None or decision.blueprint is None:  # a blueprint: limits checked it
            return self._refuse(decision, "no_library", "cannot germinate: no Urza library")
        seed_idx = self._free_seed(layer_name, decision.seed_idx)
        if seed_idx is None:
            return self._refuse(
                decision, "seed_unavailable", f"layer {layer_name!r} has no DORMANT seed left"
            )
        record = _Germination(decision, seed_idx, _Stage.RESOLVING, received_step=step)
        if self.graft_delay_steps is not None:
            record.due_step = max(decision.step + self.graft_delay_steps, step + 1)
        target = self.model.layer(layer_name).target()
        record.resolving = self._resolver.submit(self._resolve, decision.blueprint, target)
        self.decision_limits.record_germination(decision, step)
        self._records[decision.decision_id] = record
        logger.info(
            "germination %s: %s for %r seed %d",
            decision.decision_id[:8],
            decision.blueprint.family,
            layer_name,
            seed_idx,
        )
        return None

    def _free_seed(self, layer_name: str, wanted: int) -> int | None:
        states = self.model.layer(layer_name).seed_states
        reserved = {
            r.seed_idx for r in self._records.values() if r.decision.layer_name == layer_name
        }
        free = [i for i, s in enumerate(states) if s is SeedState.DORMANT and i not in reserved]
        if not free:
            return None
        return wanted if wanted in free else free[0]

    def _resolve(self, blueprint: Any, target: Any) -> KernelMetadata:
        """(background thread) The kernel for ``blueprint`` on ``target``, compiling if needed."""
        assert self.library is not None
        request = find_or_enqueue(self.library, blueprint, target)
        if request.kernel is not None:
            return request.kernel
        assert request.job is not None
        deadline = time.monotonic() + self.kernel_timeout_s
        while not self._closing.is_set():
            job = self.library.get_job(request.job.job_id)
            if job.status is CompileJobStatus.SUCCEEDED and job.kernel_id is not None:
                return self.library.get_kernel_metadata(job.kernel_id)
            if job.status is CompileJobStatus.FAILED:
                raise EsperError(f"compile job {job.job_id} failed: {job.error}")
            if time.monotonic() > deadline:
                raise EsperError(
                    f"compile job {job.job_id} did not finish within {self.kernel_timeout_s}s; "
                    "is a Tezzeret worker running (compile_worker=True, or esper tezzeret worker)?"
                )
            self._closing.wait(0.05)
        raise EsperError("the executor was closed while waiting for a compile")

    def _prefetch(self, record: _Germination) -> None:
        """Deterministic mode: load the resolved kernel into the cache without touching the seed
        (its state changes only at the due boundary), so the graft then finds it ready."""
        if record.stage != _Stage.RESOLVING or record.resolving is None:
            return
        if not record.resolving.done() or record.resolving.exception() is not None:
            return  # a failure is reported at the due boundary, by _start_load
        record.kernel = record.resolving.result()
        record.prefetch = self.model.kernel_cache.get(record.kernel.kernel_id)
        record.stage = _Stage.RESOLVED

    def _start_load(self, record: _Germination, step: int) -> DecisionRefusal | None:
        assert record.resolving is not None
        try:
            record.kernel = record.resolving.result(timeout=0)
        except Exception as exc:
            return self._refuse(record.decision, "compile_failed", str(exc))
        layer = self.model.layer(record.decision.layer_name)
        if layer.seed_states[record.seed_idx] is not SeedState.DORMANT:
            seed_idx = self._free_seed(record.decision.layer_name, record.seed_idx)
            if seed_idx is None:
                return self._refuse(record.decision, "seed_unavailable", "no DORMANT seed left")
            record.seed_idx = seed_idx
        record.loading = self.model.request_kernel(
            record.decision.layer_name,
            seed_idx=record.seed_idx,
            kernel_artifact_id=record.kernel.kernel_id,
        )
        record.stage = _Stage.LOADING
        return None

    def _time_step(self) -> float | None:
        """Wall time since the previous ``on_step`` (``None`` when not measured)."""
        if not self.measure_step_time:
            return None
        now = time.perf_counter()
        interval = None if self._last_step_at is None else now - self._last_step_at
        self._last_step_at = now
        if interval is not None:
            self._step_times.append(interval)
        return interval

    def _advance(
        self, record: _Germination, step: int, loss: Loss | None, interval: float | None = None
    ) -> DecisionRefusal | RewardReport | str | None:
        """Move one germination along as far as the current state allows (never waits)."""
        if record.stage in (_Stage.RESOLVING, _Stage.RESOLVED):
            if record.resolving is None or not record.resolving.done():
                return None
            if self.graft_delay_steps is not None:  # nothing visible happens before it is due
                if record.stage == _Stage.RESOLVING:
                    self._prefetch(record)
                if record.due_step is None or step < record.due_step:
                    return None
            refusal = self._start_load(record, step)
            if refusal is not None:
                return refusal
        state = self.model.seed_state(record.decision.layer_name, record.seed_idx)
        if record.stage == _Stage.LOADING:
            if state is SeedState.LOADING:
                return None
            if not state.runs_kernel:
                error = self.model.layer(record.decision.layer_name).last_errors.get(
                    record.seed_idx
                )
                return self._refuse(record.decision, "load_failed", f"kernel load failed: {error}")
            record.stage = _Stage.BLENDING
            record.grafted_step = step
            # every loss so far, this step's included, was computed before the graft
            record.losses_before = list(self._recent_losses)
            record.step_times_before = list(self._step_times)
            record.metrics_before = dict(self.evaluate()) if self.evaluate else {}
            self.counters["germinated"] += 1
            return _GRAFTED
        if state is SeedState.DORMANT:  # a fault gave up, or someone culled it
            return self._refuse(
                record.decision, "kernel_fault", "the seed went back to DORMANT before evaluation"
            )
        if record.stage == _Stage.BLENDING and state is SeedState.ACTIVE:
            record.stage = _Stage.EVALUATING
            record.active_step = step
            return None
        if record.stage == _Stage.EVALUATING:
            if loss is not None:
                record.losses_after.append(loss)
            if interval is not None:
                record.step_times_after.append(interval)
            assert record.active_step is not None
            if step - record.active_step >= self.evaluation_steps:
                return self._finish(record, step)
        return None

    # -- evaluation ----------------------------------------------------------------------------

    def _finish(self, record: _Germination, step: int) -> RewardReport:
        before = _materialize(record.losses_before)
        after = _materialize(record.losses_after)
        verdict = self.safety.check_loss_spike(before, after)
        metrics_after = dict(self.evaluate()) if self.evaluate else {}
        layer, seed_idx = record.decision.layer_name, record.seed_idx
        keep = verdict.allowed and self.model.seed_state(layer, seed_idx) is SeedState.ACTIVE
        if keep:
            self.model.fossilize(layer, seed_idx=seed_idx)
            self.counters["fossilized"] += 1
        else:
            self.model.unload_kernel(layer, seed_idx=seed_idx)
            self.counters["culled"] += 1
        report = self._reward(record, step, before, after, metrics_after, rolled_back=not keep)
        self._publish(Topic.CONTROL_TAMIYO_REWARDS, report)
        if not verdict.allowed:
            self.counters["rolled_back"] += 1
            record.rollback = DecisionRefusal(
                run_id=self.run_id,
                decision_id=record.decision.decision_id,
                step=step,
                layer_name=layer,
                action=AdaptationAction.FOSSILIZE,
                gate=GATE_LOSS_SPIKE,
                reason=f"graft of decision {record.decision.decision_id} rolled back: "
                f"{verdict.reason}",
                policy=record.decision.policy,
            )
            self._publish(Topic.CONTROL_TAMIYO_REFUSALS, record.rollback)
        logger.info(
            "graft %s on %r: %s, reward %.4f",
            record.decision.decision_id[:8],
            layer,
            "kept" if keep else "culled",
            report.total,
        )
        return report

    def _reward(
        self,
        record: _Germination,
        step: int,
        before: list[float],
        after: list[float],
        metrics_after: Mapping[str, float],
        *,
        rolled_back: bool,
    ) -> RewardReport:
        """The graft's multi-metric reward (:mod:`esper.tamiyo.reward`) as a report.

        Validation loss and accuracy come from the ``evaluate`` hook (keys ``loss`` and
        ``accuracy``); without one, the mean training losses of the two windows stand in for
        the validation losses and accuracy is not measured. Step times are the median wall time
        between ``on_step`` calls in each window (when ``measure_step_time``).
        """
        loss_before = record.metrics_before.get("loss", _mean_finite(before))
        loss_after = metrics_after.get("loss", _mean_finite(after))
        if loss_before is None or not math.isfinite(loss_before):
            loss_before = loss_after if loss_after is not None else 0.0  # nothing measured
        slot = self.model.layer(record.decision.layer_name).seed_layout.slots[record.seed_idx]
        outcome = AdaptationOutcome(
            val_loss_before=loss_before,
            val_loss_after=loss_after if loss_after is not None else math.inf,
            base_parameters=max(1, self._base_parameters),
            added_parameters=0
            if rolled_back or record.kernel is None
            else record.kernel.parameter_count,
            accuracy_before=record.metrics_before.get("accuracy"),
            accuracy_after=metrics_after.get("accuracy"),
            step_time_before=_median(record.step_times_before),
            step_time_after=_median(record.step_times_after),
            train_losses_before=before,
            train_losses_after=after,
            faults=slot.error_count,
            rolled_back=rolled_back,
        )
        reward = compute_reward(outcome, self.reward_weights)
        return reward.to_report(
            run_id=self.run_id,
            decision_id=record.decision.decision_id,
            layer_name=record.decision.layer_name,
            step=step,
            outcome=AdaptationAction.CULL if rolled_back else AdaptationAction.FOSSILIZE,
        )

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
            if (record.decision.layer_name, record.seed_idx) == (layer_name, seed_idx):
                del self._records[decision_id]
        return None

    # -- messages ------------------------------------------------------------------------------

    def _refuse(self, decision: AdaptationDecision, gate: str, reason: str) -> DecisionRefusal:
        self.counters["refused"] += 1
        logger.warning("cannot apply decision %s: %s (%s)", decision.decision_id[:8], reason, gate)
        refusal = training_refusal(decision, gate, reason)
        self._publish(Topic.CONTROL_TAMIYO_REFUSALS, refusal)
        return refusal

    def _publish(self, topic: str, message: Contract) -> None:
        if self.publisher is not None:
            self.publisher.publish(topic, message)

    def _publish_progress(self, step: int) -> None:
        losses = _materialize(self._progress_losses)
        self._progress_losses = []
        finite = [x for x in losses if math.isfinite(x)]
        self._publish(
            Topic.TELEMETRY_PROGRESS,
            TrainingProgress(
                run_id=self.run_id,
                step=step,
                total_steps=self.total_steps,
                loss=sum(finite) / len(finite) if finite else None,
                base_parameters=self._base_parameters,
                kernel_parameters=self._kernel_parameters,
            ),
        )

    # -- lifecycle and checkpoints -------------------------------------------------------------

    def compiling(self) -> int:
        """Germinations still waiting for their kernel (compile or lookup)."""
        return sum(1 for r in self._records.values() if r.stage == _Stage.RESOLVING)

    def in_flight(self) -> dict[str, str]:
        """Germinations not yet judged, by decision id -> stage."""
        return {decision_id: r.stage for decision_id, r in self._records.items()}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background threads (the bus and the library stay open)."""
        self._closing.set()
        if self._inbox is not None:
            self._inbox.close(timeout)
        if self.worker is not None:
            self.worker.stop(timeout)
        if self._worker_process is not None:
            self._worker_process.stop(timeout)
        self._resolver.shutdown(wait=False, cancel_futures=True)
        if self.publisher is not None:
            self.publisher.close(timeout)

    def state_dict(self) -> dict[str, Any]:
        """The executor's state as plain JSON (pending loss tensors are read here, once).

        Germinations still compiling or loading are saved with their decision and due step; on
        :meth:`load_state_dict` they start again from the kernel lookup (the model's checkpoint
        brings a LOADING seed back DORMANT).
        """
        with self._lock:
            submitted = [d.model_dump(mode="json") for d in self._submitted]
        return {
            "run_id": self.run_id,
            "counters": dict(self.counters),
            "applied": [[decision_id, step] for decision_id, step in self._applied.items()],
            "recent_losses": _materialize(list(self._recent_losses)),
            "progress_losses": _materialize(self._progress_losses),
            "submitted": submitted,
            "deferred": [r.model_dump(mode="json") for r in self._deferred],
            "records": [_record_state(r) for r in self._records.values()],
            "limits": self.decision_limits.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, after the model's own state was loaded."""
        self.counters = Counter(state["counters"])
        self._applied = OrderedDict((str(k), int(v)) for k, v in state["applied"])
        self._recent_losses = deque(
            (float(x) for x in state["recent_losses"]), maxlen=self.evaluation_steps
        )
        self._progress_losses = [float(x) for x in state["progress_losses"]]
        with self._lock:
            self._submitted = deque(
                AdaptationDecision.model_validate(d) for d in state["submitted"]
            )
        self._deferred = [DecisionRefusal.model_validate(r) for r in state["deferred"]]
        self.decision_limits.load_state_dict(state.get("limits", {}))
        self._records = {}
        for saved in state["records"]:
            record = _Germination(
                decision=AdaptationDecision.model_validate(saved["decision"]),
                seed_idx=int(saved["seed_idx"]),
                stage=saved["stage"],
                received_step=int(saved["received_step"]),
                due_step=saved["due_step"],
                grafted_step=saved["grafted_step"],
                active_step=saved["active_step"],
                losses_before=[float(x) for x in saved["losses_before"]],
                losses_after=[float(x) for x in saved["losses_after"]],
                metrics_before={str(k): float(v) for k, v in saved["metrics_before"].items()},
                step_times_before=[float(x) for x in saved["step_times_before"]],
                step_times_after=[float(x) for x in saved["step_times_after"]],
            )
            if record.stage in (_Stage.RESOLVING, _Stage.RESOLVED, _Stage.LOADING):
                assert record.decision.blueprint is not None
                record.stage = _Stage.RESOLVING
                target = self.model.layer(record.decision.layer_name).target()
                record.resolving = self._resolver.submit(
                    self._resolve, record.decision.blueprint, target
                )
            elif saved["kernel"] is not None:
                record.kernel = KernelMetadata.model_validate(saved["kernel"])
            self._records[record.decision.decision_id] = record


def _record_state(record: _Germination) -> dict[str, Any]:
    return {
        "decision": record.decision.model_dump(mode="json"),
        "seed_idx": record.seed_idx,
        "stage": record.stage,
        "received_step": record.received_step,
        "due_step": record.due_step,
        "kernel": record.kernel.model_dump(mode="json") if record.kernel else None,
        "grafted_step": record.grafted_step,
        "active_step": record.active_step,
        "losses_before": _materialize(record.losses_before),
        "losses_after": _materialize(record.losses_after),
        "metrics_before": dict(record.metrics_before),
        "step_times_before": list(record.step_times_before),
        "step_times_after": list(record.step_times_after),
    }


def _mean_finite(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _median(values: list[float]) -> float:
    """Median of ``values`` (0 when empty: not measured)."""
    return float(statistics.median(values)) if values else 0.0


def _materialize(losses: list[Loss]) -> list[float]:
    """Losses as floats, reading any tensors in one transfer."""
    tensors = [x for x in losses if isinstance(x, torch.Tensor)]
    if not tensors:
        return [float(x) for x in losses]
    values = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist())
    return [next(values) if isinstance(x, torch.Tensor) else float(x) for x in losses]
