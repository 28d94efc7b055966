"""ServiceController (``growth.controller: service``): the run's end of Tamiyo as a service.

On the in-process bus (the same consumer-group semantics as Redis Streams; the Redis runs are in
``tests/integration/test_tamiyo_service_mode.py``): telemetry and the topology go out, decisions
come in once each, the growth window holds or refuses them, and a resumed link gets back exactly
the decisions its checkpoint does not hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
from torch import nn

import esper
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    DecisionRefusal,
    HealthSignal,
    HealthSignalBatch,
    LayerKind,
    ModelTopology,
    Topic,
)
from esper.errors import ConfigurationError
from esper.oona import InProcessBus, MessageBus
from esper.tamiyo import model_topology
from esper.tolaria.config import load_config
from esper.tolaria.controller_link import LinkResult
from esper.tolaria.service_controller import GATE_GROWTH_WINDOW, ServiceController, speaks_on_bus

RUN = "service-run"
GROUP = f"tolaria-{RUN}"


def _topology() -> ModelTopology:
    model = esper.wrap(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), seeds_per_layer=2
    )
    return model_topology(model, run_id=RUN)


def _decision(step: int = 5, *, run_id: str = RUN, layer: str = "0") -> AdaptationDecision:
    return AdaptationDecision(
        run_id=run_id,
        step=step,
        action=AdaptationAction.CULL,
        layer_name=layer,
        seed_idx=0,
        policy="service-policy",
        confidence=1.0,
        uncertainty=0.0,
    )


def _signal(step: int) -> HealthSignal:
    return HealthSignal(
        layer_name="0",
        layer_kind=LayerKind.LINEAR,
        step=step,
        timestamp=0.0,
        samples=4,
        output_mean=0.0,
        output_std=1.0,
        dead_fraction=0.0,
        grad_norm=1.0,
        seeds=(),
    )


def _link(bus: MessageBus, **options: object) -> ServiceController:
    return ServiceController(bus, run_id=RUN, topology=_topology(), **options)  # type: ignore[arg-type]


def _until(
    poll: Callable[[], LinkResult], done: Callable[[list[LinkResult]], bool]
) -> list[LinkResult]:
    """Poll (as the training loop does, once per step) until ``done`` says enough arrived."""
    results: list[LinkResult] = []
    deadline = time.monotonic() + 10
    while not done(results) and time.monotonic() < deadline:
        results.append(poll())
        time.sleep(0.005)
    return results


def _decisions(results: list[LinkResult]) -> list[AdaptationDecision]:
    return [decision for result in results for decision in result.decisions]


def _pending(bus: MessageBus) -> int:
    return bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, GROUP, "observer").pending_count()


def _wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


# -- the config key ------------------------------------------------------------------------------


def test_growth_controller_is_inline_by_default_and_service_needs_a_redis_bus() -> None:
    assert load_config().growth.controller == "inline"
    service = load_config(overrides=["growth.controller=service", "growth.bus=redis://h:1/0"])
    assert service.growth.controller == "service"
    with pytest.raises(ConfigurationError, match=r"growth.controller: .*redis:// URL, not 'mem"):
        load_config(overrides=["growth.controller=service"])  # the default bus is memory://
    with pytest.raises(ConfigurationError, match="'inline' or 'service'"):
        load_config(overrides=["growth.controller=remote"])


def test_a_process_outside_a_distributed_run_speaks_on_the_bus() -> None:
    assert speaks_on_bus()


# -- what goes out -------------------------------------------------------------------------------


def test_telemetry_and_the_topology_go_out_for_the_controller() -> None:
    bus = InProcessBus()
    health = bus.subscribe(Topic.TELEMETRY_HEALTH, "tamiyo", "t")
    topology = bus.subscribe(Topic.TELEMETRY_TOPOLOGY, "tamiyo", "t")
    link = _link(bus, topology_every_s=0.05)
    link.observe_telemetry(10, [_signal(10)])
    link.observe_progress(10, 0.5)  # the heartbeat is not due yet
    time.sleep(0.06)
    link.observe_progress(20, 0.4)  # now it is
    link.close()  # sends what is queued

    (batch,) = [d.decode(HealthSignalBatch) for d in health.poll()]
    assert batch.run_id == RUN and batch.step == 10 and batch.signals == (_signal(10),)
    sent = [d.decode(ModelTopology) for d in topology.poll()]
    assert sent == [_topology(), _topology()]  # at start, then once the heartbeat was due
    assert link.counters["published"] == 3 and link.counters["topology_published"] == 2


# -- what comes in -------------------------------------------------------------------------------


def test_each_decision_is_handed_over_once_and_foreign_or_broken_messages_are_dropped() -> None:
    bus = InProcessBus()
    link = _link(bus)
    mine = _decision()
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, mine)
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, mine)  # redelivered, or published twice
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, _decision(run_id="another-run"))
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, _topology())  # not a decision
    step = iter(range(1, 10_000))
    results = _until(
        lambda: link.poll(next(step)),
        lambda _: (
            link.counters.get("duplicates", 0) + link.counters.get("other_run", 0) >= 2
            and link.counters.get("undecodable", 0) == 1
        ),
    )
    assert _decisions(results) == [mine]
    counters = link.counters
    assert (counters["received"], counters["decisions"], counters["duplicates"]) == (1, 1, 1)
    assert (counters["other_run"], counters["undecodable"]) == (1, 1)
    # the three dropped deliveries are acknowledged; the taken one waits for two checkpoints
    assert _wait_for(lambda: _pending(bus) == 1)
    link.close()


def test_decisions_wait_for_the_growth_window_and_are_refused_after_it() -> None:
    bus = InProcessBus()
    refusals_seen = bus.subscribe(Topic.CONTROL_TAMIYO_REFUSALS, "tamiyo", "t")
    link = _link(bus, start_step=100, stop_step=200)
    early = _decision(step=20)
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, early)
    held = _until(lambda: link.poll(50), lambda _: link.counters.get("held", 0) == 1)
    assert _decisions(held) == []  # arrived at step 50: waits for step 100
    assert link.poll(99) == LinkResult()
    assert link.poll(100) == LinkResult(decisions=(early,))

    late = _decision(step=190, layer="2")
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, late)
    results = _until(lambda: link.poll(201), lambda r: any(x.refusals for x in r))
    (refusal,) = [refusal for result in results for refusal in result.refusals]
    assert _decisions(results) == []
    assert (refusal.decision_id, refusal.gate) == (late.decision_id, GATE_GROWTH_WINDOW)
    assert "after the run's growth window closed at step 200" in refusal.reason
    link.close()
    (published,) = [d.decode(DecisionRefusal) for d in refusals_seen.poll()]
    assert published == refusal  # the controller releases what it reserved for the decision
    assert link.counters["refused_late"] == 1 and link.counters["decisions"] == 1


def _three_decisions_two_checkpoints(
    bus: MessageBus,
) -> tuple[list[AdaptationDecision], list[dict[str, object]]]:
    """d1 is taken before checkpoint 1, d2 before checkpoint 2, d3 after it; then the run stops."""
    link = _link(bus)
    decisions = [_decision(1), _decision(2), _decision(3)]
    checkpoints = []
    for decision in decisions:
        bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)
        taken = _until(partial(link.poll, decision.step), lambda r: bool(_decisions(r)))
        assert _decisions(taken) == [decision]
        if decision.step < 3:
            checkpoints.append(link.state_dict())
    link.close()
    return decisions, checkpoints


@pytest.mark.parametrize(("checkpoint", "expected"), [(2, [3]), (1, [2, 3])])
def test_a_resumed_link_gets_back_the_decisions_its_checkpoint_does_not_hold(
    checkpoint: int, expected: list[int]
) -> None:
    bus = InProcessBus()
    decisions, checkpoints = _three_decisions_two_checkpoints(bus)
    assert _pending(bus) == 2  # d1 was acknowledged when checkpoint 2 was taken; d2, d3 wait

    resumed = _link(bus)
    resumed.load_state_dict(checkpoints[checkpoint - 1])  # type: ignore[arg-type]
    results = _until(
        lambda: resumed.poll(3),
        lambda r: len(_decisions(r)) + resumed.counters.get("duplicates", 0) == 2,
    )
    assert [d.step for d in _decisions(results)] == expected
    assert [d.decision_id for d in _decisions(results)] == [
        decisions[step - 1].decision_id for step in expected
    ]
    assert resumed.counters["received"] == 3  # the checkpoint's, and those taken again
    resumed.close()
    assert _pending(bus) == len(expected)  # the duplicates were acknowledged


def test_a_new_run_under_an_old_run_id_drops_the_decisions_that_run_left_pending() -> None:
    bus = InProcessBus()
    _three_decisions_two_checkpoints(bus)  # d2 and d3 pending
    fresh = _link(bus)  # not resumed: no load_state_dict
    late = _decision(9)
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, late)
    results = _until(lambda: fresh.poll(9), lambda r: bool(_decisions(r)))
    assert _decisions(results) == [late]
    assert fresh.counters["stale"] == 2 and fresh.counters["received"] == 1
    fresh.close()
    assert _pending(bus) == 1  # only the new run's own decision


def test_decisions_held_for_the_window_are_kept_by_the_checkpoint() -> None:
    bus = InProcessBus()
    link = _link(bus, start_step=100)
    early = _decision(step=10)
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, early)
    _until(lambda: link.poll(10), lambda _: link.counters.get("held", 0) == 1)
    state = link.state_dict()
    link.close()

    resumed = _link(bus, start_step=100)
    resumed.load_state_dict(state)
    assert resumed.poll(100) == LinkResult(decisions=(early,))
    resumed.close()
