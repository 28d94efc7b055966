"""Growth executor: decisions applied once, the compile pipeline without blocking steps, grafts
joining the optimizer, evaluation -> reward -> fossilize, loss-spike rollback, direct
FOSSILIZE/CULL, refusals naming their gate, deterministic graft steps, checkpoints.

The executor only uses the library: a compile worker (the run's :class:`CompileWorker` here, a
thread) compiles into it."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import esper
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    DecisionRefusal,
    ModelTopology,
    RewardReport,
    SeedState,
    Topic,
    TrainingProgress,
)
from esper.core import MorphableModel
from esper.oona import InProcessBus
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tamiyo.reward import REWARD_COMPONENTS, AdaptationOutcome, reward_components
from esper.tamiyo.safety import GATE_LOSS_SPIKE, SafetyConfig, SafetyGates
from esper.tamiyo.topology import model_topology
from esper.tezzeret import TezzeretWorker
from esper.tolaria.compile_worker import CompileWorker
from esper.tolaria.growth_executor import GrowthExecutor, StepOutcome
from esper.urza import ArtifactLibrary, UrzaArtifactSource, open_library

MLP_H32 = next(option.spec for option in BLUEPRINT_CATALOG if option.name == "mlp_h32")
ROOMY = SafetyConfig(max_parameter_fraction=10.0)
"""Limits that let an mlp_h32 kernel (816 / 676 parameters) onto the 212-parameter test host."""


@pytest.fixture
def library(tmp_path: Path) -> Iterator[ArtifactLibrary]:
    lib = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    yield lib
    lib.close()


@dataclass
class Run:
    """A tiny training run driving an executor."""

    model: MorphableModel
    optimizer: torch.optim.Optimizer
    executor: GrowthExecutor
    worker: CompileWorker
    x: torch.Tensor
    y: torch.Tensor

    def close(self) -> None:
        self.executor.close()
        self.worker.stop()

    def step(self, loss_override: float | None = None) -> StepOutcome:
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        graftable = self.executor.graftable(self.model.global_step + 1)
        step = self.model.step(graftable=graftable)
        return self.executor.on_step(step, loss if loss_override is None else loss_override)

    def until(
        self, done: Callable[[StepOutcome], bool], *, max_steps: int = 5000, **kw: float
    ) -> list[StepOutcome]:
        """Train until ``done`` (the compile runs on its own thread; steps never wait)."""
        outcomes = []
        for _ in range(max_steps):
            outcomes.append(self.step(**kw))
            if done(outcomes[-1]):
                return outcomes
            time.sleep(0.001)
        raise AssertionError(f"condition not reached in {max_steps} steps: {outcomes[-1]}")


def _run(
    library: ArtifactLibrary | None,
    bus: InProcessBus | None = None,
    *,
    compile: bool = True,
    **executor_options: Any,
) -> Run:
    """A tiny run; ``compile``: a worker thread compiles into ``library`` (else nobody does)."""
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    source = UrzaArtifactSource(library) if library is not None else None
    model = esper.wrap(host, seeds_per_layer=2, kernel_source=source, blend_steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.attach_optimizer(optimizer)
    options: dict[str, Any] = {"evaluation_steps": 5, "safety": SafetyGates(ROOMY)}
    options.update(executor_options)
    executor = GrowthExecutor(model, run_id="run-1", library=library, bus=bus, **options)
    worker = CompileWorker("none")
    if library is not None and compile:
        worker = CompileWorker.start("thread", library)
    return Run(model, optimizer, executor, worker, torch.randn(64, 8), torch.randint(0, 4, (64,)))


def _germinate(layer: str = "0", *, step: int = 0, seed_idx: int = 0) -> AdaptationDecision:
    return AdaptationDecision(
        run_id="run-1",
        step=step,
        action=AdaptationAction.GERMINATE,
        layer_name=layer,
        seed_idx=seed_idx,
        blueprint=MLP_H32,
        policy="test",
        confidence=1.0,
        uncertainty=0.0,
    )


def _drain(bus: InProcessBus, topic: str, contract: type) -> list:  # type: ignore[type-arg]
    subscription = bus.subscribe(topic, "test", "t")
    messages = []
    while deliveries := subscription.poll(1000):
        subscription.ack(*deliveries)
        messages += [d.decode(contract) for d in deliveries]
    return messages


def test_germinate_compiles_grafts_trains_evaluates_and_fossilizes(
    library: ArtifactLibrary,
) -> None:
    bus = InProcessBus()
    rewards = bus.subscribe(Topic.CONTROL_TAMIYO_REWARDS, "test", "t")
    validation: list[dict[str, float]] = []
    x_val, y_val = torch.randn(32, 8), torch.randint(0, 4, (32,))

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            logits = run.model(x_val)
        validation.append(
            {
                "loss": float(nn.functional.cross_entropy(logits, y_val)),
                "accuracy": float((logits.argmax(1) == y_val).float().mean()),
            }
        )
        return validation[-1]

    run = _run(library, bus, evaluate=evaluate, progress_every_steps=1)
    decision = _germinate()
    run.executor.submit(decision)

    outcomes = run.until(lambda o: bool(o.grafted))
    grafted_at = outcomes[-1].step
    kernel = run.model.layer("0").kernel(0)
    assert kernel is not None
    before = [p.detach().clone() for p in kernel.parameters()]
    outcomes += run.until(lambda o: bool(o.rewards))
    run.close()

    assert outcomes[0].received == (decision,)
    assert outcomes[-1].step == grafted_at + 3 + 5  # blend 3 steps, then 5 evaluation steps
    assert run.model.seed_state("0", 0) is SeedState.FOSSILIZED
    assert [g.get("esper_seed") for g in run.optimizer.param_groups] == [None, "0:0"]
    after = list(kernel.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # it trained
    report = outcomes[-1].rewards[0]
    assert (report.decision_id, report.layer_name, report.outcome) == (
        decision.decision_id,
        "0",
        AdaptationAction.FOSSILIZE,
    )
    published = [d.decode(RewardReport) for d in rewards.poll(10)]
    assert published == [report]
    assert len(validation) == 2  # at the graft and at the end of the window
    before, after = validation
    kernel_params = sum(p.numel() for p in kernel.parameters())
    base_params = sum(p.numel() for p in run.model.base_parameters())
    assert set(report.components) == set(REWARD_COMPONENTS)
    fed = reward_components(  # what the executor must have measured and passed on
        AdaptationOutcome(
            val_loss_before=before["loss"],
            val_loss_after=after["loss"],
            base_parameters=base_params,
            added_parameters=kernel_params,
            accuracy_before=before["accuracy"],
            accuracy_after=after["accuracy"],
        )
    )
    for name in ("loss_improvement", "accuracy_improvement", "parameter_efficiency", "memory_cost"):
        assert report.components[name] == pytest.approx(fed[name]), name
    assert report.components["safety"] == 0.0
    assert report.total == pytest.approx(
        sum(report.weights[k] * v for k, v in report.components.items())
    )
    assert run.executor.counters["germinated"] == 1 and run.executor.counters["fossilized"] == 1
    progress = _drain(bus, Topic.TELEMETRY_PROGRESS, TrainingProgress)
    assert progress[-1].step == outcomes[-1].step
    assert progress[-1].kernel_parameters == kernel_params  # counted on graft, not by a walk
    assert progress[0].kernel_parameters == 0


def test_a_graft_judged_on_non_finite_validation_losses_is_rewarded_and_training_goes_on(
    library: ArtifactLibrary,
) -> None:
    """A model whose validation loss is NaN at the graft and after it (it diverged): the reward
    says so with a finite penalty; judging the graft used to raise and stop the run."""
    run = _run(library, evaluate=lambda: {"loss": math.nan, "accuracy": 0.5})
    run.executor.submit(_germinate())

    outcomes = run.until(lambda o: bool(o.rewards))
    outcomes += [run.step() for _ in range(3)]  # and training goes on
    run.close()

    (report,) = [r for o in outcomes for r in o.rewards]
    assert math.isfinite(report.total)
    assert report.components["loss_improvement"] == -10.0  # the diverged-loss penalty
    assert report.components["accuracy_improvement"] == 0.0


def test_a_decision_is_applied_once_however_often_it_arrives(library: ArtifactLibrary) -> None:
    bus = InProcessBus()
    run = _run(library, bus)
    decision = _germinate()
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)  # redelivered
    run.executor.submit(decision, decision)

    run.until(
        lambda o: run.executor.counters["received"] + run.executor.counters["duplicates"] == 4
    )
    run.until(lambda o: bool(o.grafted))
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)  # late duplicate after the graft
    run.until(lambda o: run.executor.counters["duplicates"] == 4)
    run.close()

    assert run.executor.counters["received"] == 1 and run.executor.counters["germinated"] == 1
    assert run.model.layer("0").seed_states[1] is SeedState.DORMANT  # not a second graft
    assert sum(1 for g in run.optimizer.param_groups if g.get("esper_seed")) == 1
    commands = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "tolaria-executor", "other")
    assert commands.pending_count() == 0  # every delivery acknowledged


def test_steps_never_wait_for_the_compile(library: ArtifactLibrary) -> None:
    run = _run(library, compile=False)  # no worker yet: the compile cannot finish
    run.executor.submit(_germinate())

    for _ in range(30):
        outcome = run.step()
        assert not outcome.grafted
    assert run.executor.compiling() == 1
    assert run.model.seed_state("0", 0) is SeedState.DORMANT  # nothing requested yet
    worker = TezzeretWorker(library).start()
    try:
        run.until(lambda o: bool(o.grafted))
    finally:
        worker.stop()
        run.close()
    assert run.model.seed_state("0", 0) is SeedState.BLENDING


def test_a_loss_spike_rolls_the_graft_back(library: ArtifactLibrary) -> None:
    bus = InProcessBus()
    safety = SafetyGates(SafetyConfig(loss_spike_tolerance=0.25, max_parameter_fraction=10.0))
    run = _run(library, bus, safety=safety)
    run.executor.submit(_germinate())

    run.until(lambda o: bool(o.grafted), loss_override=1.0)
    outcomes = run.until(lambda o: bool(o.rewards), loss_override=2.0)  # mean 2.0 > 1.25
    run.close()

    report, refusal = outcomes[-1].rewards[0], outcomes[-1].refusals[0]
    assert report.outcome is AdaptationAction.CULL
    assert refusal.gate == GATE_LOSS_SPIKE and refusal.action is AdaptationAction.FOSSILIZE
    assert "1.0000 to 2.0000" in refusal.reason
    assert run.model.seed_state("0", 0) is SeedState.DORMANT
    assert [g.get("esper_seed") for g in run.optimizer.param_groups] == [None]  # group removed
    assert _drain(bus, Topic.CONTROL_TAMIYO_REFUSALS, DecisionRefusal) == [refusal]
    assert run.executor.counters["rolled_back"] == 1 and run.executor.counters["culled"] == 1
    # no evaluate hook: the training-loss windows stand in for validation (1.0 -> 2.0); culled:
    # nothing added
    expected = reward_components(
        AdaptationOutcome(
            val_loss_before=1.0,
            val_loss_after=2.0,
            base_parameters=sum(p.numel() for p in run.model.base_parameters()),
            added_parameters=0,
            train_losses_before=[1.0] * 5,
            train_losses_after=[2.0] * 5,
            rolled_back=True,
        )
    )
    measured = {k: v for k, v in report.components.items() if k != "compute_cost"}  # wall time
    assert measured == pytest.approx({k: v for k, v in expected.items() if k != "compute_cost"})
    assert report.components["safety"] == -1.0 and report.components["stability"] < 0


def test_refusals_name_why_a_decision_could_not_be_applied(library: ArtifactLibrary) -> None:
    bus = InProcessBus()
    run = _run(library, bus)
    run.model.layer("2").seed_layout.transition(0, SeedState.LOADING, where="test")  # occupy "2"
    run.model.layer("2").seed_layout.transition(1, SeedState.LOADING, where="test")
    decisions = [
        _germinate("nope"),
        _germinate("2"),
        _germinate("0").model_copy(update={"action": AdaptationAction.FOSSILIZE}),
    ]
    run.executor.submit(*decisions)

    outcome = run.step()
    no_library = _run(None)
    no_library.executor.submit(_germinate())
    other = no_library.step()
    run.close()
    no_library.close()

    assert [(r.layer_name, r.gate) for r in outcome.refusals] == [
        ("nope", "unknown_layer"),
        ("2", "seed_unavailable"),
        ("0", "illegal_transition"),  # seed 0 of "0" is DORMANT: nothing to fossilize
    ]
    assert "DORMANT" in outcome.refusals[2].reason
    assert [r.gate for r in other.refusals] == ["no_library"]
    assert _drain(bus, Topic.CONTROL_TAMIYO_REFUSALS, DecisionRefusal) == list(outcome.refusals)


def test_a_taken_seed_is_replaced_by_a_free_one(library: ArtifactLibrary) -> None:
    run = _run(library, evaluation_steps=10_000)
    run.executor.submit(_germinate(seed_idx=0), _germinate(seed_idx=0))  # two decisions, seed 0

    run.until(lambda o: run.executor.counters["germinated"] == 2)
    run.close()

    layer = run.model.layer("0")
    assert all(state.runs_kernel for state in layer.seed_states)
    assert layer.stats().kernel_ids[0] == layer.stats().kernel_ids[1] is not None


def test_fossilize_and_cull_decisions_are_applied_directly(library: ArtifactLibrary) -> None:
    run = _run(library, evaluation_steps=10_000)
    run.executor.submit(_germinate("0"))
    run.until(lambda o: bool(o.grafted))
    run.executor.submit(_germinate("2"))  # its optimizer group comes after the one of "0"
    run.until(
        lambda o: (
            run.model.layer("2").seed_states[0] is SeedState.ACTIVE
            and run.model.layer("0").seed_states[0] is SeedState.ACTIVE
        )
    )
    fossilize = _germinate("0").model_copy(
        update={"action": AdaptationAction.FOSSILIZE, "blueprint": None}
    )
    cull = _germinate("2").model_copy(update={"action": AdaptationAction.CULL, "blueprint": None})
    run.executor.submit(fossilize, cull)

    outcome = run.step()
    run.close()

    assert outcome.refusals == ()
    assert run.model.seed_state("0", 0) is SeedState.FOSSILIZED
    assert run.model.seed_state("2", 0) is SeedState.DORMANT
    assert run.executor.in_flight() == {}  # neither graft is evaluated any more


def test_deterministic_mode_grafts_exactly_graft_delay_steps_after_the_decision(
    library: ArtifactLibrary,
) -> None:
    run = _run(library, graft_delay_steps=4)
    for _ in range(5):
        run.step()
    run.executor.submit(_germinate(step=5))

    states = {}
    for _ in range(6):
        outcome = run.step()
        states[outcome.step] = run.model.seed_state("0", 0)
    run.close()

    # the seed stays DORMANT while the kernel compiles and is prefetched, however long that
    # takes, and is grafted exactly at the boundary of step 5 + 4
    assert [states[step] for step in (6, 7, 8)] == [SeedState.DORMANT] * 3
    assert states[9] is SeedState.BLENDING and states[10] is SeedState.BLENDING
    assert run.executor.counters["germinated"] == 1


def test_deterministic_mode_reports_a_failed_compile_at_the_due_step(
    library: ArtifactLibrary,
) -> None:
    run = _run(library, graft_delay_steps=3, compile=False)
    run.executor.submit(_germinate(step=0))
    outcomes = [run.step()]  # received: the compile is queued from a background thread
    deadline = time.monotonic() + 30
    while (job := library.claim_job("test-worker")) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job is not None
    library.fail_job(job.job_id, "test-worker", "the compiler ran out of memory")

    outcomes += [run.step() for _ in range(4)]
    run.close()

    refused_at = [(o.step, r.gate) for o in outcomes for r in o.refusals]
    assert refused_at == [(3, "compile_failed")]  # reported at the due step, not before
    assert "out of memory" in outcomes[2].refusals[0].reason
    assert run.model.layer("0").seed_states == (SeedState.DORMANT, SeedState.DORMANT)


def test_state_dict_round_trips_and_a_resumed_run_grafts_at_the_same_step(
    library: ArtifactLibrary,
) -> None:
    first = _run(library, graft_delay_steps=5)
    for _ in range(3):
        first.step()
    first.executor.submit(_germinate(step=3))
    first.step()  # step 4: the decision is taken in, the compile started
    state = json.loads(json.dumps(first.executor.state_dict()))
    model_state = first.model.state_dict()
    first.close()

    resumed = _run(library, graft_delay_steps=5)
    resumed.model.load_state_dict(model_state)
    resumed.executor.load_state_dict(state)
    grafted_at = resumed.until(lambda o: bool(o.grafted))[-1].step
    resumed.close()

    assert state["records"][0]["stage"] in ("resolving", "loading")
    assert grafted_at == 8  # 3 + 5, as in the uninterrupted run
    assert resumed.executor.counters["received"] == 1


def test_topology_and_progress_are_published_for_a_remote_controller(
    library: ArtifactLibrary,
) -> None:
    bus = InProcessBus()
    run = _run(library, bus, progress_every_steps=5, total_steps=100)
    for _ in range(10):
        run.step(loss_override=2.0)
    run.close()

    topology = _drain(bus, Topic.TELEMETRY_TOPOLOGY, ModelTopology)
    progress = _drain(bus, Topic.TELEMETRY_PROGRESS, TrainingProgress)
    assert topology == [model_topology(run.model, run_id="run-1")]
    assert [(p.step, p.loss, p.total_steps) for p in progress] == [(5, 2.0, 100), (10, 2.0, 100)]
    assert progress[0].base_parameters == sum(p.numel() for p in run.model.base_parameters())


def test_in_process_autonomous_loop_grows_the_model(library: ArtifactLibrary) -> None:
    from esper.oona import OonaTelemetrySink
    from esper.tamiyo import BottleneckPolicy, TamiyoController

    bus = InProcessBus()
    run = _run(library, bus)
    run.model.telemetry_sink = OonaTelemetrySink(bus, run_id="run-1")
    safety = SafetyGates(SafetyConfig(cooldown_steps=10_000, max_parameter_fraction=10.0))
    controller = TamiyoController(
        bus, BottleneckPolicy(), run_id="run-1", model=run.model, safety=safety, cycle_s=0.02
    ).start()
    try:
        for _ in range(5):
            run.step()
            run.model.collect_telemetry()
        outcomes = run.until(lambda o: bool(o.rewards))
        outcomes += run.until(lambda o: controller.counters["rewards"] > 0)  # back over the bus
    finally:
        controller.stop()
        run.close()

    decided = {
        (d.layer_name, d.seed_idx)
        for d in _drain(bus, Topic.CONTROL_KASMINA_COMMANDS, AdaptationDecision)
    }
    grafted = {g for o in outcomes for g in o.grafted}
    assert grafted and grafted <= decided
    assert controller.counters["decisions"] == len(decided)
    assert 1 <= run.executor.counters["received"] <= len(decided)  # the last may be in transit
    assert controller.counters["cycle_errors"] == 0
