"""Paired ratio timing: how much slower is a variant than its baseline, in the same process.

Each trial times one block of ``iters`` calls of the baseline and one of the variant back to back,
alternating which goes first; the reported ratio is the median over trials of variant/baseline.
An A/A control (the baseline against itself, in the same pattern) shows the noise floor.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RatioResult:
    """Median variant/baseline time ratio, the A/A control ratio, and the baseline's median time."""

    ratio: float
    control: float
    baseline_us: float
    trials: int

    def row(self) -> str:
        """``ratio  (A/A control)  baseline time`` as a table cell."""
        return f"{self.ratio:6.3f}  (A/A {self.control:5.3f})  base {self.baseline_us:9.1f} us"


Clock = Callable[[], float]
"""``time.perf_counter`` (wall, the default) or ``time.thread_time`` (this thread's CPU time: on a
machine shared with other jobs it leaves out time spent descheduled; use it with one torch thread,
so all of the work runs on the timing thread)."""


def _block(fn: Callable[[], object], iters: int, clock: Clock = time.perf_counter) -> float:
    start = clock()
    for _ in range(iters):
        fn()
    return (clock() - start) / iters


def calibrate(
    fn: Callable[[], object], target_s: float = 0.02, clock: Clock = time.perf_counter
) -> int:
    """Iterations per block so that one block of ``fn`` takes about ``target_s`` seconds."""
    fn()
    one = _block(fn, 3, clock)
    return max(1, int(target_s / max(one, 1e-7)))


def compare(
    baseline: Callable[[], object],
    variant: Callable[[], object],
    *,
    trials: int = 31,
    iters: int | None = None,
    warmup: int = 3,
    clock: Clock = time.perf_counter,
) -> RatioResult:
    """Median ratio variant/baseline over ``trials`` interleaved pairs, with an A/A control."""
    iters = iters or calibrate(baseline, clock=clock)
    for _ in range(warmup):
        _block(baseline, iters, clock)
        _block(variant, iters, clock)
    ratios, controls, base_times = [], [], []
    for trial in range(trials):
        if trial % 2 == 0:
            b = _block(baseline, iters, clock)
            v = _block(variant, iters, clock)
            c = _block(baseline, iters, clock)
        else:
            v = _block(variant, iters, clock)
            b = _block(baseline, iters, clock)
            c = _block(baseline, iters, clock)
        ratios.append(v / b)
        controls.append(c / b)
        base_times.append(b)
    return RatioResult(
        ratio=statistics.median(ratios),
        control=statistics.median(controls),
        baseline_us=statistics.median(base_times) * 1e6,
        trials=trials,
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
