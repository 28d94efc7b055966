"""Run progress: the newest report wins, non-finite losses are no feature, the loss features come
from the last 20 losses, and the state round-trips as JSON."""

from __future__ import annotations

import json
import math

import pytest

from esper.contracts import TrainingProgress
from esper.tamiyo.run_progress import LOSS_WINDOW, RunProgress


def _report(step: int, loss: float | None, **fields: object) -> TrainingProgress:
    return TrainingProgress(run_id="r", step=step, loss=loss, **fields)  # type: ignore[arg-type]


def test_the_loss_features_compare_the_newer_half_of_the_window_with_the_older() -> None:
    progress = RunProgress("r", total_steps=200)
    progress.base_parameters = 1000
    for step, loss in enumerate([4.0, 4.0, 2.0, 2.0], start=1):
        progress.record(step, loss=loss, total_steps=None, kernel_parameters=0)

    state = progress.global_state(50, kernel_parameters=250, adaptations=2)

    assert state.progress == 0.25
    assert state.kernel_parameter_fraction == 0.25
    assert state.adaptations == 2.0
    assert state.loss == 2.0
    assert state.loss_trend == pytest.approx(-0.5)  # (2 - 4) / 4


def test_only_the_last_losses_count_and_non_finite_ones_never() -> None:
    progress = RunProgress("r", total_steps=None)
    progress.record(1, loss=math.nan, total_steps=None, kernel_parameters=0)
    assert progress.latest is not None and progress.latest.loss is None
    for step in range(2, 2 + LOSS_WINDOW + 4):
        progress.record(step, loss=1.0 if step < 6 else 3.0, total_steps=None, kernel_parameters=0)

    state = progress.global_state(10, kernel_parameters=0, adaptations=0)

    assert state.loss == 3.0 and state.loss_trend == 0.0  # the 1.0 losses left the window
    assert state.progress == 0.0  # no budget known
    assert state.kernel_parameter_fraction == 0.0  # no base parameters known


def test_a_report_older_than_the_newest_is_ignored() -> None:
    progress = RunProgress("r", total_steps=None)
    progress.observe(_report(20, 1.5, total_steps=400, base_parameters=10, kernel_parameters=4))
    progress.observe(_report(10, 9.0, total_steps=100, base_parameters=99, kernel_parameters=1))

    assert (progress.step, progress.total_steps, progress.kernel_parameters) == (20, 400, 4)
    assert progress.base_parameters == 10
    assert progress.global_state(20, kernel_parameters=0, adaptations=0).loss == 1.5


def test_the_state_round_trips_through_json() -> None:
    progress = RunProgress("r", total_steps=100)
    progress.observe(_report(3, 2.0, base_parameters=50, kernel_parameters=5))
    progress.record(4, loss=1.0, total_steps=120, kernel_parameters=6)

    restored = RunProgress("r", total_steps=None)
    restored.load_state_dict(json.loads(json.dumps(progress.state_dict())))

    assert restored.state_dict() == progress.state_dict()
    assert restored.latest == progress.latest and restored.total_steps == 120
    assert restored.global_state(4, kernel_parameters=0, adaptations=0) == progress.global_state(
        4, kernel_parameters=0, adaptations=0
    )
