"""BackgroundSubscriber: consumes on its own thread; the owner drains and acks without waiting."""

from __future__ import annotations

import time

import factories
from esper.contracts import AdaptationAction, AdaptationDecision, KernelReady, Topic
from esper.oona import BackgroundSubscriber, InProcessBus


def _decision(step: int) -> AdaptationDecision:
    return factories.decision(run_id="r", action=AdaptationAction.CULL, step=step)


def _drain_until(subscriber: BackgroundSubscriber[AdaptationDecision], count: int) -> list:  # type: ignore[type-arg]
    items: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + 10
    while len(items) < count and time.monotonic() < deadline:
        items += subscriber.drain()
        time.sleep(0.01)
    return items


def test_messages_arrive_in_order_decoded_and_acks_clear_the_pending_list() -> None:
    bus = InProcessBus()
    subscriber = BackgroundSubscriber(
        bus, Topic.CONTROL_KASMINA_COMMANDS, group="g", consumer="c", contract=AdaptationDecision
    )
    sent = [_decision(step) for step in range(5)]
    for decision in sent:
        bus.publish(Topic.CONTROL_KASMINA_COMMANDS, decision)
    items = _drain_until(subscriber, 5)
    assert [message for _, message in items] == sent
    assert subscriber.drain() == []  # each delivery once
    subscriber.ack([delivery for delivery, _ in items])
    subscriber.close()
    pending = bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "g", "other")
    assert pending.pending_count() == 0


def test_a_message_of_another_contract_is_kept_as_none_so_it_can_be_acked() -> None:
    bus = InProcessBus()
    subscriber = BackgroundSubscriber(
        bus, Topic.CONTROL_KASMINA_COMMANDS, group="g", consumer="c", contract=AdaptationDecision
    )
    foreign = KernelReady.model_validate(
        {
            "kernel_id": "a" * 64,
            "blueprint_id": "b" * 64,
            "target": {
                "layer_kind": "linear",
                "in_features": 2,
                "out_features": 2,
                "channel_dim": -1,
                "spatial_dims": 0,
            },
        }
    )
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, foreign)
    bus.publish(Topic.CONTROL_KASMINA_COMMANDS, _decision(1))
    items = _drain_until(subscriber, 2)
    assert items[0][1] is None  # not an AdaptationDecision: logged, still acknowledgeable
    assert items[1][1] is not None and items[1][1].step == 1
    subscriber.ack([delivery for delivery, _ in items])
    subscriber.close()
    assert bus.subscribe(Topic.CONTROL_KASMINA_COMMANDS, "g", "x").pending_count() == 0
