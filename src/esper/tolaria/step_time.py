"""Step-time statistics: how long training steps took, and whether background compiles slowed them.

A run's ``step`` records carry ``step_time_ms`` and ``compiling`` (a compile or kernel lookup in
flight). :func:`step_time_stats` compares the steps that ran during compiles with the *control*
steps near them that did not — the same model at the same time of the run — and reports the
control's own p99/median as the noise floor (on a shared machine it is well above 1).
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WARMUP_STEPS = 5
"""First steps left out of step-time statistics (allocator and cache warm-up)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


CONTROL_WINDOW = 50
"""Steps without a compile within this many steps of a compiling step form the control group."""


@dataclass(frozen=True)
class StepTimeStats:
    """Step-time statistics of a run, in milliseconds.

    ``compiling`` covers the steps that ran while a background compile was in flight (a wait at a
    due boundary included); ``control`` the steps without one within :data:`CONTROL_WINDOW` steps
    of them — the same model at the same time of the run, so slow drift (a grown model's steps
    get longer, a shared machine's load changes) cancels. The control's own p99/median is the
    noise floor a compile's effect must be read against.
    """

    steps: int
    median_ms: float
    p99_ms: float
    compiling_steps: int
    compiling_median_ms: float
    compiling_p99_ms: float
    control_steps: int = 0
    control_median_ms: float = float("nan")
    control_p99_ms: float = float("nan")

    @property
    def p99_over_median(self) -> float:
        """p99 / median over all steps."""
        return self.p99_ms / self.median_ms if self.median_ms else float("nan")

    @property
    def compiling_p99_over_median(self) -> float:
        """p99 of the steps run during compiles / median of the control steps (the disruption)."""
        if not self.compiling_steps or not self.control_steps:
            return float("nan")
        return self.compiling_p99_ms / self.control_median_ms

    @property
    def compiling_median_over_control_median(self) -> float:
        """Median of the steps run during compiles / median of the control steps."""
        if not self.compiling_steps or not self.control_steps:
            return float("nan")
        return self.compiling_median_ms / self.control_median_ms

    @property
    def control_p99_over_median(self) -> float:
        """p99 / median of the control steps: the noise floor of the disruption ratio."""
        if not self.control_steps:
            return float("nan")
        return self.control_p99_ms / self.control_median_ms


def step_time_stats(step_records: Iterable[Mapping[str, Any]]) -> StepTimeStats:
    """Step-time statistics of ``step`` records (the first :data:`WARMUP_STEPS` left out)."""
    timed = [
        (int(r["step"]), float(r["step_time_ms"]), bool(r.get("compiling")))
        for r in step_records
        if r["step"] > WARMUP_STEPS and r.get("step_time_ms") is not None
    ]
    times = [t for _, t, _ in timed]
    compiling = [t for _, t, busy in timed if busy]
    busy_steps = [step for step, _, busy in timed if busy]
    control = [t for step, t, busy in timed if not busy and _near(step, busy_steps, CONTROL_WINDOW)]
    return StepTimeStats(
        steps=len(times),
        median_ms=statistics.median(times) if times else float("nan"),
        p99_ms=percentile(times, 99),
        compiling_steps=len(compiling),
        compiling_median_ms=statistics.median(compiling) if compiling else float("nan"),
        compiling_p99_ms=percentile(compiling, 99),
        control_steps=len(control),
        control_median_ms=statistics.median(control) if control else float("nan"),
        control_p99_ms=percentile(control, 99),
    )


def _near(step: int, sorted_steps: Sequence[int], window: int) -> bool:
    """Whether some entry of ``sorted_steps`` is within ``window`` of ``step``."""
    index = bisect.bisect_left(sorted_steps, step)
    neighbours = sorted_steps[max(0, index - 1) : index + 1]
    return any(abs(step - other) <= window for other in neighbours)
