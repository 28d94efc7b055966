"""Step-time statistics: percentiles, compile steps against the control steps near them."""

from __future__ import annotations

import pytest

from esper.tolaria.step_time import WARMUP_STEPS, percentile, step_time_stats


def test_percentile_interpolates_linearly() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100

    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0


def test_step_time_stats_skip_warmup_and_separate_compile_steps() -> None:
    records = [
        {"step": s, "step_time_ms": 100.0, "compiling": 0} for s in range(1, WARMUP_STEPS + 1)
    ]
    records += [
        {"step": WARMUP_STEPS + s, "step_time_ms": 10.0, "compiling": 0} for s in range(1, 9)
    ]
    records += [
        {"step": 20, "step_time_ms": 12.0, "compiling": 1},
        {"step": 21, "step_time_ms": 14.0, "compiling": 1},
    ]

    stats = step_time_stats(records)

    assert stats.steps == 10 and stats.compiling_steps == 2
    assert stats.median_ms == 10.0
    assert stats.compiling_p99_ms == pytest.approx(12.0 + 2.0 * 0.99)
    assert (stats.control_steps, stats.control_median_ms) == (8, 10.0)
    assert stats.compiling_p99_over_median == pytest.approx(1.3980)
    assert stats.control_p99_over_median == pytest.approx(1.0)


def test_the_control_group_is_the_steps_near_a_compile() -> None:
    slow_then_fast = [
        {"step": s, "step_time_ms": 100.0 if s < 200 else 10.0, "compiling": int(s in (300, 301))}
        for s in range(1, 400)
    ]

    stats = step_time_stats(slow_then_fast)

    assert stats.control_steps == 100  # steps 250..351 but the two compiling ones
    assert stats.control_median_ms == 10.0  # the slow early steps are not the baseline
    assert stats.compiling_p99_over_median == pytest.approx(1.0)
