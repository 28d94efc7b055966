"""Growth wiring: the Tamiyo controller, the growth executor, Urza, Tezzeret and Oona of one run.

:func:`build_growth` turns a run config's ``growth`` and ``urza`` sections into a
:class:`GrowthDriver`, which the run loop (:mod:`esper.tolaria.trainer`) calls at fixed places:

* ``graftable(step)`` before ``model.step``: which finished kernel loads may join now;
* ``after_step(step, loss)`` after it: the executor applies decisions (compile in the background,
  load, graft, evaluate, reward, fossilize or cull);
* ``observe_telemetry(step, signals)`` every ``growth.telemetry_every`` steps;
* ``decide(step)`` every ``growth.decide_every`` steps: the controller decides synchronously.

Everything runs in process and deterministically by default: the controller is called
synchronously at fixed step intervals (no thread), its decisions are handed to the executor
directly (and also published on the bus for observers), and the executor grafts each kernel
exactly ``growth.graft_delay`` steps after its decision, waiting at that boundary only if the
background compile has not finished by then (counted as ``executor.stall_ms``). The run's growth
events are then a function of the step alone, which is what makes ``--resume`` exact. With
``growth.controller: service`` the decisions come instead from ``esper tamiyo serve`` over the
bus and are taken in at the step boundary after they arrive (:mod:`esper.tolaria.
service_controller`); growth then depends on timing.

Compiles run in a Tezzeret worker process started before the data and the model are built
(``urza.worker: process``, the default: no contention with training for the interpreter lock) or
in a worker thread (``thread``). Every compatible catalog blueprint is
queued for every seeded layer before training starts (``growth.precompile``) and, with
``growth.warm_start``, the run waits for them before step 1, so a germination never waits for a
cold compiler at its due boundary. A monitor thread counts the compile jobs in flight, which
marks the steps that ran during compiles in the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import esper.tamiyo
from esper.blueprints import is_compatible
from esper.contracts import (
    AdaptationDecision,
    CompileJobStatus,
    HealthSignal,
)
from esper.core import MorphableModel
from esper.core.lockstep import LockstepGrowth
from esper.errors import ConfigurationError
from esper.execution.grafted_kernel import GraftedKernel
from esper.oona import MessageBus, open_bus
from esper.tamiyo.baselines import BASELINE_NAMES
from esper.tamiyo.controller import TamiyoController, load_policy
from esper.tamiyo.health import HealthCollector
from esper.tamiyo.observation import BLUEPRINT_CATALOG, GrowthPolicy
from esper.tamiyo.safety import SafetyConfig, SafetyGates
from esper.tezzeret import TezzeretProcess, find_or_enqueue
from esper.tolaria.bounded_input import excerpt
from esper.tolaria.compile_worker import CompileMonitor
from esper.tolaria.config import GrowthSection, RunConfig
from esper.tolaria.growth_events import (
    Event,
    blueprint_name,
    decision_event,
    refusal_event,
    reward_event,
)
from esper.tolaria.growth_executor import GrowthExecutor, StepOutcome
from esper.tolaria.service_controller import ServiceController, speaks_on_bus
from esper.urza import ArtifactLibrary, UrzaArtifactSource, open_library

logger = logging.getLogger(__name__)

PRETRAINED_POLICY = Path(esper.tamiyo.__file__).parent / "pretrained" / "bottleneck_gnn.safetensors"
"""The GNN policy shipped with Esper (``growth.policy: pretrained``)."""


def policy_path(policy: str) -> str:
    """``growth.policy`` as :func:`~esper.tamiyo.controller.load_policy` takes it: ``pretrained``
    names the shipped GNN policy; baseline names and file paths pass through."""
    return str(PRETRAINED_POLICY) if policy == "pretrained" else policy


def load_run_policy(config: RunConfig) -> GrowthPolicy:
    """The policy ``growth.policy`` names, loaded (a run checks it before creating anything).

    Raises:
        ConfigurationError: it is neither a policy name nor a loadable policy file.
    """
    policy = config.growth.policy
    names = [*BASELINE_NAMES, "pretrained"]
    if policy not in names and not Path(policy).is_file():
        raise ConfigurationError(
            f"unknown growth.policy {excerpt(policy)}: use one of {', '.join(names)}, or the "
            "path of a trained policy file (written by GNNPolicy.save)"
        )
    return load_policy(policy_path(policy), seed=config.run.seed)


class GrowthDriver:
    """Owns the growth components of one run and translates their results into metric events.

    A worker process (``urza.worker: process``) is started as soon as the driver is built, before
    the data and the model, so that its start-up overlaps the run's own.

    Args:
        config: the run config (``growth`` and ``urza`` sections are used).
        run_id: the run's id (tags every message).
        library: the Urza library kernels are found in and compiled into.
        bus: where decisions, refusals and rewards are published for observers.
        urza_dir: the embedded library's folder (for a worker process).
        log_dir: where a worker process writes ``tezzeret.log``.
        policy: the controller's policy (default: loaded from ``growth.policy``).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        run_id: str,
        library: ArtifactLibrary,
        bus: MessageBus,
        urza_dir: Path | None = None,
        log_dir: Path | None = None,
        policy: GrowthPolicy | None = None,
    ) -> None:
        self.settings: GrowthSection = config.growth
        self.run_id = run_id
        self.library = library
        self.bus = bus
        self.worker_mode = config.urza.worker
        self.policy = policy if policy is not None else load_run_policy(config)
        self.total_steps = 0
        self.safety: SafetyGates | None = None
        self.controller: TamiyoController | None = None
        self.executor: GrowthExecutor | None = None
        self.link: ServiceController | None = None  # growth.controller: service (rank 0)
        self._losses: list[float] = []
        self._decision_seeds: dict[str, int] = {}
        self._queued_jobs: list[str] = []
        self.worker_process: TezzeretProcess | None = None
        if self.worker_mode == "process":
            location = (
                ["--urza", config.urza.url] if config.urza.url else ["--run-dir", str(urza_dir)]
            )
            self.worker_process = TezzeretProcess(
                location, log_path=(log_dir or Path(".")) / "tezzeret.log"
            )
        self.monitor = CompileMonitor(library)

    # -- setup -----------------------------------------------------------------------------------

    def wrap_options(self) -> dict[str, Any]:
        """Arguments for :func:`esper.wrap`: kernels are fetched from Urza."""
        return {"kernel_source": UrzaArtifactSource(self.library)}

    def attach(
        self,
        model: MorphableModel,
        *,
        total_steps: int,
        validate: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        """Create the safety gates, the controller and the executor for ``model`` (its optimizer
        already attached), and queue the precompiles.

        Args:
            model: the wrapped model.
            total_steps: the run's length in steps.
            validate: validation loss (and accuracy) of the model now, for rewards.
        """
        settings = self.settings
        self.total_steps = total_steps
        self.safety = SafetyGates(
            SafetyConfig(
                cooldown_steps=settings.cooldown_steps,
                window_steps=total_steps + 1,  # the rate limit caps the whole run
                max_adaptations=settings.max_seeds,
                min_confidence=settings.min_confidence,
                max_parameter_fraction=settings.max_parameter_ratio,
                loss_spike_tolerance=settings.loss_spike_ratio - 1.0,
            )
        )
        self.controller = TamiyoController(
            self.bus,
            self.policy,
            run_id=self.run_id,
            safety=self.safety,
            model=model,
            collector=HealthCollector(None, run_id=self.run_id),
            total_steps=total_steps,
        )
        self.executor = GrowthExecutor(
            model,
            run_id=self.run_id,
            library=self.library,
            bus=self.bus,
            listen=False,  # decisions are handed over directly: no timing dependence
            compile_worker=self.worker_mode == "thread",
            safety=self.safety,
            evaluation_steps=settings.evaluation_steps,
            evaluate=validate,
            graft_delay_steps=settings.graft_delay,
            total_steps=total_steps,
            progress_every_steps=settings.telemetry_every,
        )
        if settings.controller == "service" and speaks_on_bus():
            self.link = ServiceController.for_run(
                settings, model, run_id=self.run_id, bus=self.bus, total_steps=total_steps
            )
        if settings.precompile:
            self._precompile(model)

    def _precompile(self, model: MorphableModel) -> None:
        """Queue every compatible catalog blueprint for every seeded layer (before step 1)."""
        for name in model.layer_names:
            target = model.layer(name).target()
            for option in BLUEPRINT_CATALOG:
                if is_compatible(option.spec, target):
                    request = find_or_enqueue(self.library, option.spec, target)
                    if request.job is not None:
                        self._queued_jobs.append(request.job.job_id)
        logger.info("queued %d background compiles for %s", len(self._queued_jobs), self.run_id)

    def warm_up(
        self,
        model: MorphableModel,
        *,
        timeout_s: float = 300.0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> float:
        """Wait, before step 1, until the compiles queued so far have finished (with
        ``growth.precompile: false``, one warm-up compile is queued for it); return the seconds.

        The first compile of a process pays for ``torch.export``'s start-up (and a worker process
        for its own); waiting for it here keeps that out of the training steps: no germination
        then waits at its due boundary for a cold compiler.

        Args:
            model: the wrapped model.
            timeout_s: start training anyway after this long.
            on_progress: called with ``(finished, total)`` compiles whenever the count changes
                (first with 0 finished).
        """
        if not self._queued_jobs:
            name = model.layer_names[0]
            target = model.layer(name).target()
            option = next(o for o in BLUEPRINT_CATALOG if is_compatible(o.spec, target))
            request = find_or_enqueue(self.library, option.spec, target)
            if request.job is not None:
                self._queued_jobs.append(request.job.job_id)
        started = time.perf_counter()
        pending = list(self._queued_jobs)
        total, reported = len(pending), -1
        while pending and time.perf_counter() - started < timeout_s:
            if on_progress is not None and total - len(pending) != reported:
                reported = total - len(pending)
                on_progress(reported, total)
            done = {CompileJobStatus.SUCCEEDED, CompileJobStatus.FAILED}
            pending = [j for j in pending if self.library.get_job(j).status not in done]
            if pending:
                time.sleep(0.05)
        if on_progress is not None:
            on_progress(total - len(pending), total)
        waited = time.perf_counter() - started
        if pending:
            logger.warning(
                "%d compile jobs still pending after %.0f s; training starts anyway (is a "
                "Tezzeret worker running?)",
                len(pending),
                waited,
            )
        self._queued_jobs = []
        self.monitor.refresh()  # step 1 must not see a count from before the compiles finished
        return waited

    # -- the step boundary -------------------------------------------------------------------------

    def graftable(self, step: int) -> dict[str, set[int]] | None:
        """Which finished loads may be grafted at the boundary returning ``step``."""
        assert self.executor is not None
        return self.executor.graftable(step)

    def after_step(self, step: int, loss: float) -> list[Event]:
        """Let the executor advance every germination; return what happened as events."""
        assert self.executor is not None and self.controller is not None
        self._losses.append(loss)
        outcome = self.executor.on_step(step, loss)
        for report in outcome.rewards:
            self.controller.observe(report)  # a culled graft starts the layer's long cooldown
        for refusal in outcome.refusals:
            self.controller.observe(refusal)
        return self._events(outcome)

    def observe_telemetry(self, step: int, signals: list[HealthSignal]) -> None:
        """Feed a telemetry flush and the recent mean loss to the controller."""
        assert self.controller is not None and self.executor is not None
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        self._losses = []
        if self.link is not None:  # to Tamiyo as a service, over the bus
            self.link.observe_telemetry(step, signals)
            self.link.observe_progress(step, loss)
            return
        self.controller.observe_telemetry(signals)
        self.controller.observe_progress(step, loss=loss)

    def is_decision_step(self, step: int) -> bool:
        """Whether Tamiyo decides at ``step`` (fixed intervals inside the growth window)."""
        settings = self.settings
        if settings.controller == "service":
            return True  # decisions are taken in whenever they arrive (the link keeps the window)
        return (
            step >= settings.start_step
            and step % settings.decide_every == 0
            and step <= settings.stop_fraction * self.total_steps
        )

    def decide(self, step: int, *, lockstep: LockstepGrowth | None = None) -> list[Event]:
        """One synchronous controller decision; an accepted one goes to the executor.

        Under ``lockstep`` (a distributed run) the source rank decides and every rank receives
        its decision, so all replicas apply the same growth.
        """
        assert self.controller is not None and self.executor is not None
        events: list[Event] = []
        decisions: list[AdaptationDecision] = []
        if lockstep is None or lockstep.rank == lockstep.src:
            if self.link is not None:  # what Tamiyo as a service sent since the last step
                polled = self.link.poll(step)
                decisions = list(polled.decisions)
                events += [refusal_event(refusal) for refusal in polled.refusals]
            else:
                result = self.controller.decide(step)
                decisions = [result.decision] if result.decision is not None else []
                if result.decision is None and result.refusal is not None:
                    events.append(refusal_event(result.refusal))
        if lockstep is not None:
            decisions = lockstep.broadcast(decisions)
        for decision in decisions:
            self.executor.submit(decision)
            self._decision_seeds[decision.decision_id] = decision.seed_idx
            received = step if self.settings.controller == "service" else None
            events.append(decision_event(decision, received_step=received))
        return events

    def counters(self) -> dict[str, int]:
        """The controller's and the executor's counters (``executor.stall_ms``: time the loop
        waited at due boundaries for compiles that had not finished)."""
        counts: dict[str, int] = {}
        if self.link is not None:
            counts.update({f"controller.{k}": v for k, v in self.link.counters.items()})
        elif self.controller is not None:
            counts.update({f"controller.{k}": int(v) for k, v in self.controller.counters.items()})
        if self.executor is not None:
            counts.update({f"executor.{k}": int(v) for k, v in self.executor.counters.items()})
        return counts

    def compiling(self) -> int:
        """Compiles in flight (as last counted by the monitor thread), or germinations whose
        kernel is still being looked up, compiled or prefetched, whichever is larger."""
        waiting = self.executor.compiling() if self.executor is not None else 0
        return max(waiting, self.monitor.in_flight)

    # -- events ------------------------------------------------------------------------------------

    def _events(self, outcome: StepOutcome) -> list[Event]:
        assert self.executor is not None
        model = self.executor.model
        events: list[Event] = []
        for layer, seed in outcome.grafted:
            kernel = model.layer(layer).kernel(seed)
            events.append(
                {
                    "type": "graft",
                    "step": outcome.step,
                    "layer": layer,
                    "seed": seed,
                    "kernel_id": model.layer(layer).seed_state.slots[seed].kernel_id,
                    "blueprint": self._blueprint_of(layer, seed),
                    "kernel_parameters": sum(p.numel() for p in kernel.parameters())
                    if kernel is not None
                    else 0,
                }
            )
        for report in outcome.rewards:
            events.append(reward_event(report, outcome.step, self._seed_of(report.decision_id)))
            outcome_name = str(report.outcome) if report.outcome is not None else "cull"
            events.append(
                {
                    "type": outcome_name,
                    "step": outcome.step,
                    "layer": report.layer_name,
                    "seed": self._seed_of(report.decision_id),
                    "decision_id": report.decision_id,
                }
            )
        events += [refusal_event(refusal) for refusal in outcome.refusals]
        return events

    def _blueprint_of(self, layer: str, seed: int) -> str | None:
        assert self.executor is not None
        grafted = self.executor.model.layer(layer).seeds[str(seed)]
        return (
            blueprint_name(grafted.blueprint()[0]) if isinstance(grafted, GraftedKernel) else None
        )

    def _seed_of(self, decision_id: str) -> int | None:
        return self._decision_seeds.get(decision_id)

    # -- checkpoints and shutdown ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Controller (with safety gates and policy) and executor state, plain JSON."""
        assert self.controller is not None and self.executor is not None
        link = {"link": self.link.state_dict()} if self.link is not None else {}
        return {
            "controller": self.controller.state_dict(),
            "executor": self.executor.state_dict(),
            "losses": list(self._losses),
            "decision_seeds": dict(self._decision_seeds),
            **link,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after the model's state was loaded)."""
        assert self.controller is not None and self.executor is not None
        self.controller.load_state_dict(state["controller"])
        self.executor.load_state_dict(state["executor"])
        self._losses = [float(x) for x in state["losses"]]
        self._decision_seeds = {str(k): int(v) for k, v in state["decision_seeds"].items()}
        if self.link is not None and "link" in state:
            self.link.load_state_dict(state["link"])

    def close(self) -> None:
        """Stop the executor's threads (and the Tezzeret worker), close the bus and the library."""
        if self.executor is not None:
            self.executor.close()
        if self.link is not None:
            self.link.close()
        if self.worker_process is not None:
            self.worker_process.stop()
        self.monitor.stop()
        self.bus.close()
        self.library.close()


def build_growth(
    config: RunConfig,
    *,
    run_id: str,
    log_dir: Path | None = None,
    policy: GrowthPolicy | None = None,
) -> GrowthDriver:
    """The growth components a run config asks for: embedded Urza (``<run.dir>/urza`` unless
    ``urza.dir``/``urza.url`` say otherwise) and the bus at ``growth.bus``."""
    folder: Path | None = None
    if config.urza.url is not None:
        library = open_library(config.urza.url)
    else:
        folder = config.urza.dir or Path(config.run.dir) / "urza"
        library = open_library(run_dir=folder)
    bus = open_bus(config.growth.bus if speaks_on_bus() else "memory://")
    return GrowthDriver(
        config,
        run_id=run_id,
        library=library,
        bus=bus,
        urza_dir=folder,
        log_dir=log_dir,
        policy=policy,
    )
