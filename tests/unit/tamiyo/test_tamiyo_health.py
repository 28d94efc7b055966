"""Health collector: EMA smoothing, z-score anomalies, throttled alerts, priority, bus consumption."""

from __future__ import annotations

import json
import math
import statistics
import time

import pytest

from esper.contracts import HealthSignal, HealthSignalBatch, SeedState, Topic
from esper.errors import ConfigurationError
from esper.oona import open_bus
from esper.tamiyo.health import HealthCollector
from factories import health_signal, seed_health


def _signal(
    layer: str,
    step: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    dead: float = 0.0,
    grad: float | None = 1.0,
    samples: int = 4,
    nonfinite: bool = False,
    states: tuple[SeedState, ...] = (SeedState.DORMANT, SeedState.DORMANT),
) -> HealthSignal:
    seeds = tuple(
        seed_health(i, state, nonfinite_output=nonfinite and i == 0)
        for i, state in enumerate(states)
    )
    return health_signal(
        layer,
        step=step,
        samples=samples,
        output_mean=mean,
        output_std=std,
        dead_fraction=dead,
        grad_norm=grad,
        seeds=seeds,
    )


def test_ema_smooths_each_health_value() -> None:
    collector = HealthCollector(smoothing=0.5)
    for step, (mean, std, dead, grad) in enumerate(
        [(1.0, 2.0, 0.0, 1.0), (3.0, 4.0, 0.5, math.e), (5.0, 2.0, 1.0, math.e**3)], start=1
    ):
        collector.ingest([_signal("fc1", step, mean=mean, std=std, dead=dead, grad=grad)])

    summary = collector.summaries()["fc1"]

    assert summary.output_mean == pytest.approx(3.5)  # 1 -> 2 -> 3.5
    assert summary.output_std == pytest.approx(2.5)  # 2 -> 3 -> 2.5
    assert summary.dead_fraction == pytest.approx(0.625)  # 0 -> 0.25 -> 0.625
    assert summary.log_grad_norm == pytest.approx(1.75)  # ln: 0 -> 0.5 -> 1.75
    assert collector.latest_step == 3


def test_missing_values_keep_the_previous_average() -> None:
    collector = HealthCollector(smoothing=0.5)
    collector.ingest([_signal("fc1", 1, mean=2.0, grad=math.e)])
    collector.ingest([_signal("fc1", 2, mean=100.0, grad=None, samples=0)])

    summary = collector.summaries()["fc1"]

    assert summary.output_mean == pytest.approx(2.0)  # no forward recorded: not averaged in
    assert summary.log_grad_norm == pytest.approx(1.0)  # no gradient: not averaged in


def test_zscore_against_the_window_before_the_new_value_flags_an_anomaly() -> None:
    collector = HealthCollector(window=8, min_window=5, zscore_threshold=3.0, min_std=0.01)
    history = [0.0, 0.2, 0.0, 0.2, 0.0]
    for step, log_grad in enumerate(history, start=1):
        collector.ingest([_signal("fc1", step, grad=math.exp(log_grad))])
        assert collector.summaries()["fc1"].anomaly == 0.0
    collector.ingest([_signal("fc1", 6, grad=math.exp(1.0))])

    summary = collector.summaries()["fc1"]
    expected = (1.0 - statistics.fmean(history)) / statistics.pstdev(history)

    assert summary.grad_norm_zscore == pytest.approx(expected, rel=1e-6)  # about 9.39
    assert expected > 3.0 and summary.anomaly == 1.0
    assert collector.anomalous_layers() == ["fc1"]


def test_zscore_is_zero_until_the_window_fills_and_uses_the_std_floor() -> None:
    collector = HealthCollector(window=8, min_window=3, min_std=0.5)
    collector.ingest([_signal("fc1", 1, grad=1.0)])
    collector.ingest([_signal("fc1", 2, grad=1.0)])
    collector.ingest([_signal("fc1", 3, grad=math.exp(1.0))])
    assert collector.summaries()["fc1"].grad_norm_zscore == 0.0  # only 2 values before it

    collector.ingest([_signal("fc1", 4, grad=1.0)])  # window [0, 0, 1]: mean 1/3, std 0.471
    z = collector.summaries()["fc1"].grad_norm_zscore
    assert z == pytest.approx((0.0 - 1 / 3) / 0.5, rel=1e-6)  # floored at min_std


def test_window_is_bounded() -> None:
    collector = HealthCollector(window=4, min_window=2)
    for step in range(1, 20):
        collector.ingest([_signal("fc1", step, grad=float(step))])

    layer = collector.state_dict()["layers"]["fc1"]

    assert layer["grad_window"] == pytest.approx([math.log(s) for s in (16, 17, 18, 19)])
    assert len(layer["std_window"]) == 4


def test_nonfinite_kernel_output_is_an_anomaly_of_top_priority() -> None:
    collector = HealthCollector(window=4, min_window=2)
    for step in range(1, 5):
        collector.ingest([_signal("fc1", step), _signal("fc2", step), _signal("fc3", step)])
    collector.ingest(
        [
            _signal("fc1", 5),
            _signal("fc2", 5, grad=math.exp(2.0)),  # z = 2 / min_std = 40
            _signal("fc3", 5, nonfinite=True),
        ]
    )

    assert list(collector.summaries()) == ["fc3", "fc2", "fc1"]
    assert collector.anomalous_layers() == ["fc3", "fc2"]
    assert collector.take_alerts() == ["fc3", "fc2"]


def test_alerts_are_throttled_per_layer() -> None:
    collector = HealthCollector(window=4, min_window=2, alert_cooldown_steps=10)
    alerts_by_step: dict[int, list[str]] = {}
    anomalous_steps = []
    for step in range(1, 31):  # fc1 spikes every sixth flush (out of the previous window)
        grad = math.exp(3.0) if step % 6 == 0 else 1.0
        collector.ingest([_signal("fc1", step, grad=grad), _signal("fc2", step)])
        if collector.anomalous_layers() == ["fc1"]:
            anomalous_steps.append(step)
        alerts = collector.take_alerts()
        if alerts:
            alerts_by_step[step] = alerts

    assert anomalous_steps == [6, 12, 18, 24, 30]
    assert alerts_by_step == {6: ["fc1"], 18: ["fc1"], 30: ["fc1"]}  # 12 and 24: within 10 steps
    assert collector.counters["alerts"] == 3
    assert collector.take_alerts() == []


def test_redelivered_or_old_signals_are_ignored() -> None:
    collector = HealthCollector(smoothing=0.5)
    collector.ingest([_signal("fc1", 5, mean=1.0)])
    collector.ingest([_signal("fc1", 5, mean=9.0)])
    collector.ingest([_signal("fc1", 3, mean=9.0)])

    assert collector.summaries()["fc1"].output_mean == 1.0
    assert collector.counters["stale"] == 2


def test_seed_states_come_from_the_newest_signal() -> None:
    collector = HealthCollector()
    collector.ingest([_signal("fc1", 1)])
    collector.ingest([_signal("fc1", 2, states=(SeedState.ACTIVE, SeedState.DORMANT))])

    assert collector.seed_states() == {"fc1": (SeedState.ACTIVE, SeedState.DORMANT)}


def test_poll_once_consumes_acks_and_filters_by_run() -> None:
    bus = open_bus("memory://")
    collector = HealthCollector(bus, run_id="run-a", group="g", smoothing=1.0)
    bus.publish(
        Topic.TELEMETRY_HEALTH,
        HealthSignalBatch(run_id="run-a", step=1, signals=(_signal("fc1", 1, mean=2.0),)),
    )
    bus.publish(
        Topic.TELEMETRY_HEALTH,
        HealthSignalBatch(run_id="run-b", step=2, signals=(_signal("fc1", 2, mean=7.0),)),
    )
    bus.publish(
        Topic.TELEMETRY_HEALTH,
        HealthSignalBatch(run_id="run-a", step=3, signals=(_signal("fc1", 3, mean=4.0),)),
    )

    handled = collector.poll_once()

    assert handled == 3
    assert collector.summaries()["fc1"].output_mean == 4.0  # smoothing 1.0: the newest value
    assert collector.counters["other_run"] == 1 and collector.counters["batches"] == 2
    assert bus.subscribe(Topic.TELEMETRY_HEALTH, "g", "other").pending_count() == 0
    assert collector.poll_once() == 0
    bus.close()


def test_background_thread_polls_the_bus() -> None:
    bus = open_bus("memory://")
    collector = HealthCollector(bus, run_id="r", interval_s=0.01).start()
    try:
        for step in range(1, 4):
            bus.publish(
                Topic.TELEMETRY_HEALTH,
                HealthSignalBatch(run_id="r", step=step, signals=(_signal("fc1", step),)),
            )
        deadline = time.monotonic() + 5.0
        while collector.latest_step != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        collector.stop()
        bus.close()

    assert collector.latest_step == 3
    assert collector.counters["signals"] == 3


def test_undecodable_messages_are_dropped_and_acked() -> None:
    bus = open_bus("memory://")
    collector = HealthCollector(bus, group="g")
    bus.publish(Topic.TELEMETRY_HEALTH, _signal("fc1", 1))  # a bare signal, not a batch

    assert collector.poll_once() == 1
    assert collector.counters["undecodable"] == 1 and collector.summaries() == {}
    assert bus.subscribe(Topic.TELEMETRY_HEALTH, "g", "other").pending_count() == 0
    bus.close()


def test_state_dict_is_json_and_round_trips() -> None:
    collector = HealthCollector(window=4, min_window=2, alert_cooldown_steps=5)
    for step in range(1, 7):
        collector.ingest(
            [
                _signal("fc1", step, grad=math.exp(step % 3)),
                _signal("fc2", step, nonfinite=step == 6),
            ]
        )

    state = json.loads(json.dumps(collector.state_dict()))
    restored = HealthCollector(window=4, min_window=2, alert_cooldown_steps=5)
    restored.load_state_dict(state)

    assert restored.summaries() == collector.summaries()
    assert restored.state_dict() == collector.state_dict()
    for step in range(7, 12):  # both continue identically
        for c in (collector, restored):
            c.ingest([_signal("fc1", step, grad=math.exp(step % 5)), _signal("fc2", step)])
        assert restored.summaries() == collector.summaries()
        assert restored.take_alerts() == collector.take_alerts()


def test_invalid_settings_are_explained() -> None:
    with pytest.raises(ConfigurationError, match="smoothing"):
        HealthCollector(smoothing=0.0)
    with pytest.raises(ConfigurationError, match="no bus"):
        HealthCollector().start()
