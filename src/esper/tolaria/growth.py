"""Growth driver: the growth path of one run, as the run loop calls it at each step boundary.

:meth:`GrowthDriver.build` puts together, for a wrapped model and the run's
:class:`~esper.tolaria.growth_services.GrowthServices` (library, bus, compile worker):

* the run's safety gates (``growth`` section limits),
* a :class:`~esper.tolaria.controller_link.ControllerLink`, where decisions come from (by
  default the inline Tamiyo controller),
* the :class:`~esper.tolaria.growth_executor.GrowthExecutor`, which applies them (compile in the
  background, load, graft, evaluate, reward, fossilize or cull),

and the run loop (:mod:`esper.tolaria.trainer`) calls it at fixed places: ``graftable(step)``
before ``model.step`` (which finished kernel loads may join now) and ``after_step(step, loss,
replica)`` after it, which advances the executor, reports outcomes and telemetry to the
controller link and applies the decisions it returns. Results come back as metric events
(:mod:`esper.tolaria.growth_events`).

**Why growth is a function of the step** (the one place this is explained; the executor, the
trainer and the checkpoints rely on it):

* decisions are synchronous and happen at fixed steps: the inline controller is called on the
  training thread every ``growth.decide_every`` steps inside the growth window (no thread, no
  timing), and its decisions are handed to the executor directly (they are also published on
  the bus for observers);
* a kernel is grafted exactly ``growth.graft_delay`` steps after its decision: the compile and
  the load run in the background meanwhile, and the loop waits at the due boundary only if they
  have not finished by then (counted as ``executor.stall_ms``);
* kernels are built from private random generators, so background compiles and loads never
  draw from torch's global RNG (which the checkpoint saves and restores with the data order).

A run resumed from a checkpoint therefore repeats the uninterrupted run bit for bit (weights,
optimizer state, decisions, metrics except timings). ``growth.graft_delay: null`` (graft as soon
as loaded) gives that up; so does ``growth.controller: service``, where decisions come from
``esper tamiyo serve`` over the bus and are taken in at the step boundary after they arrive
(:mod:`esper.tolaria.service_controller`).

Compiles run in the run's compile worker (:mod:`esper.tolaria.compile_worker`). Every compatible
catalog blueprint is queued for every seeded layer when the driver is built
(``growth.precompile``) and, with ``growth.warm_start``, :meth:`GrowthDriver.warm_up` waits for
them before step 1, so a germination never waits for a cold compiler at its due boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import esper.tamiyo
from esper.core import MorphableModel
from esper.errors import ConfigurationError
from esper.tamiyo.baselines import BASELINE_NAMES
from esper.tamiyo.observation import GrowthPolicy
from esper.tamiyo.policy_loading import load_policy
from esper.tamiyo.safety import SafetyConfig, SafetyGates
from esper.tolaria.bounded_input import excerpt
from esper.tolaria.config import GrowthSection, RunConfig
from esper.tolaria.controller_link import ControllerLink, InlineController, LinkResult
from esper.tolaria.distributed import TrainingReplica
from esper.tolaria.germination import Loss, materialize
from esper.tolaria.growth_events import (
    Event,
    decision_event,
    graft_event,
    refusal_event,
    verdict_events,
)
from esper.tolaria.growth_executor import GrowthExecutor, StepOutcome
from esper.tolaria.growth_services import GrowthServices
from esper.tolaria.service_controller import ServiceController, speaks_on_bus
from esper.tolaria.warm_up import queue_catalog_compiles, wait_for_compiles

PRETRAINED_POLICY = Path(esper.tamiyo.__file__).parent / "pretrained" / "bottleneck_gnn.safetensors"
"""The GNN policy shipped with Esper (``growth.policy: pretrained``)."""


def policy_path(policy: str) -> str:
    """``growth.policy`` as :func:`~esper.tamiyo.policy_loading.load_policy` takes it: ``pretrained``
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

    Build it with :meth:`build`. It owns ``services`` from then on.

    Args:
        model: the wrapped model (its optimizer attached).
        services: the run's library, bus and compile worker.
        controller: where decisions come from.
        executor: applies them to ``model``.
        settings: the run's ``growth`` section.
    """

    def __init__(
        self,
        model: MorphableModel,
        *,
        services: GrowthServices,
        controller: ControllerLink,
        executor: GrowthExecutor,
        settings: GrowthSection,
    ) -> None:
        self.model = model
        self.services = services
        self.controller = controller
        self.executor = executor
        self.settings = settings
        self._losses: list[Loss] = []  # device scalars, read at the next telemetry report
        self._decision_seeds: dict[str, int] = {}
        self._queued_jobs: list[str] = []

    @classmethod
    def build(
        cls,
        config: RunConfig,
        services: GrowthServices,
        model: MorphableModel,
        *,
        run_id: str,
        policy: GrowthPolicy,
        total_steps: int,
        validate: Callable[[], Mapping[str, float]] | None = None,
    ) -> GrowthDriver:
        """The growth path of a run: safety gates, the inline controller, the executor; the
        precompiles queued (``growth.precompile``).

        Args:
            config: the run config (its ``growth`` section).
            services: the run's library, bus and compile worker (the driver owns them).
            model: the wrapped model, its optimizer attached.
            run_id: the run's id (tags every message).
            policy: the controller's policy.
            total_steps: the run's length in steps.
            validate: validation loss (and accuracy) of the model now, for rewards.
        """
        settings = config.growth
        safety = SafetyGates(
            SafetyConfig(
                cooldown_steps=settings.cooldown_steps,
                window_steps=total_steps + 1,  # the rate limit caps the whole run
                max_adaptations=settings.max_adaptations,
                min_confidence=settings.min_confidence,
                max_parameter_fraction=settings.max_parameter_fraction,
                loss_spike_tolerance=settings.loss_spike_tolerance,
            )
        )
        controller: ControllerLink
        if settings.controller == "service" and speaks_on_bus():  # rank 0 of a service run
            controller = ServiceController.for_run(
                settings, model, run_id=run_id, bus=services.bus, total_steps=total_steps
            )
        else:  # inline; or a rank other than 0, fed but never polled
            controller = InlineController.for_run(
                settings,
                model=model,
                policy=policy,
                safety=safety,
                run_id=run_id,
                bus=services.bus,
                total_steps=total_steps,
            )
        executor = GrowthExecutor(
            model,
            run_id=run_id,
            library=services.library,
            bus=services.bus,
            listen=False,  # decisions come from the controller link: no timing dependence
            safety=safety,
            evaluation_steps=settings.evaluation_steps,
            evaluate=validate,
            graft_delay_steps=settings.graft_delay,
            total_steps=total_steps,
            progress_every_steps=settings.telemetry_every,
        )
        executor.operators.allow(settings.operators, executor.decision_limits)
        driver = cls(
            model, services=services, controller=controller, executor=executor, settings=settings
        )
        if settings.precompile:
            driver._queued_jobs = queue_catalog_compiles(services.library, model)
        return driver

    def warm_up(
        self, *, timeout_s: float = 300.0, on_progress: Callable[[int, int], None] | None = None
    ) -> float:
        """Wait, before step 1, for the queued compiles (see :mod:`esper.tolaria.warm_up`);
        return the seconds waited."""
        waited = wait_for_compiles(
            self.services.library,
            self.model,
            self._queued_jobs,
            timeout_s=timeout_s,
            on_progress=on_progress,
        )
        self._queued_jobs = []
        self.services.monitor.refresh()  # step 1 must not see a count from before the compiles
        return waited

    # -- the step boundary -------------------------------------------------------------------------

    def graftable(self, step: int) -> dict[str, set[int]] | None:
        """Which finished loads may be grafted at the boundary returning ``step``."""
        return self.executor.graftable(step)

    def after_step(self, step: int, loss: Loss, replica: TrainingReplica) -> list[Event]:
        """Everything growth does after the boundary that returned ``step``, as events.

        The executor advances every germination; its rewards and refusals go to the controller
        link; every ``growth.telemetry_every`` steps the model's health and the mean loss since
        the last report do too; then the decisions the link returns (polled on the deciding
        rank, shared with every rank) go to the executor.
        """
        self._losses.append(loss)
        outcome = self.executor.on_step(step, loss)
        for report in outcome.rewards:
            self.controller.observe_outcome(report)  # a culled graft starts a long cooldown
        for refusal in outcome.refusals:
            self.controller.observe_outcome(refusal)
        events = self._outcome_events(outcome)
        if step % self.settings.telemetry_every == 0:
            self.controller.observe_telemetry(step, replica.collect_telemetry())
            losses = materialize(self._losses)  # one transfer for the whole interval
            mean = sum(losses) / len(losses) if losses else None
            self._losses = []
            self.controller.observe_progress(step, mean)
        result = self.controller.poll(step) if replica.decides else LinkResult()
        events += [refusal_event(refusal) for refusal in result.refusals]
        for decision in replica.share_decisions(result.decisions):
            self.executor.submit(decision)
            self._decision_seeds[decision.decision_id] = decision.seed_idx
            events.append(decision_event(decision, received_step=self._received_step(step)))
        return events

    def _received_step(self, step: int) -> int | None:
        """Where a decision was taken in, recorded when it came from a controller elsewhere
        (its own ``step`` is that of the telemetry it was based on)."""
        return step if isinstance(self.controller, ServiceController) else None

    def _outcome_events(self, outcome: StepOutcome) -> list[Event]:
        events = [
            graft_event(self.model, layer, seed, outcome.step) for layer, seed in outcome.grafted
        ]
        for report in outcome.rewards:
            events += verdict_events(
                report, outcome.step, self._decision_seeds.get(report.decision_id)
            )
        return events + [refusal_event(refusal) for refusal in outcome.refusals]

    def counters(self) -> dict[str, int]:
        """The controller's and the executor's counters (``executor.stall_ms``: time the loop
        waited at due boundaries for compiles that had not finished)."""
        counts = {f"controller.{k}": int(v) for k, v in self.controller.counters.items()}
        counts.update({f"executor.{k}": int(v) for k, v in self.executor.counters.items()})
        return counts

    def compiling(self) -> int:
        """Compiles in flight (as last counted by the monitor thread), or germinations whose
        kernel is still being looked up, compiled or prefetched, whichever is larger."""
        return max(self.executor.compiling(), self.services.monitor.in_flight)

    # -- checkpoints and shutdown ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Controller (with safety gates and policy) and executor state, plain JSON."""
        return {
            "controller": self.controller.state_dict(),
            "executor": self.executor.state_dict(),
            "losses": materialize(self._losses),
            "decision_seeds": dict(self._decision_seeds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after the model's state was loaded)."""
        if self.settings.controller == "inline" or isinstance(self.controller, ServiceController):
            self.controller.load_state_dict(state["controller"])
        # else: a rank other than 0 of a service run, whose inline link is never polled; the
        # checkpoint holds rank 0's service link
        self.executor.load_state_dict(state["executor"])
        self._losses = [float(x) for x in state["losses"]]
        self._decision_seeds = {str(k): int(v) for k, v in state["decision_seeds"].items()}

    def close(self) -> None:
        """Stop the executor's threads and the controller link, then close the services."""
        self.executor.close()
        self.controller.close()
        self.services.close()
