"""Scale: how Esper's one-off and per-call costs grow with the size of what they work on.

Run: ``python benchmarks/scale.py [--rows wrap,urza,telemetry,tamiyo] [--quick]``.

Each row is measured at 3-4 sizes, single-threaded, and printed with the exponent of a
least-squares fit of log(time) on log(size) (1.0: linear; 2.0: quadratic):

- ``wrap``: ``esper.wrap()`` of a width-64 MLP (Linear + ReLU blocks) vs ``copy.deepcopy`` of the
  same model, interleaved, median of pairs (the goal is a ratio of at most 2 at every size).
- ``urza``: ``find_or_enqueue`` hits and kernel searches in a library holding n kernels, on
  SQLite and (if reachable at ``ESPER_TEST_POSTGRES``) PostgreSQL; p50/p99 and the statements a
  hit sends.
- ``telemetry``: ``collect_telemetry()`` per layer at n seeded layers, and the share of step time
  that default telemetry (``health_every=10``, collect every 10 steps) adds at 256 layers.
- ``tamiyo``: one GNN decision (graph build + policy) at n layers, p50/p99, and the one-time
  structure build.

``--quick`` uses smaller sizes (for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import esper


def fitted_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Slope of the least-squares line through ``(log size, log time)``."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(t, 1e-12)) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def once(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def mlp(layers: int, width: int = 64) -> nn.Sequential:
    """``layers`` Linear(width, width) layers with a ReLU after each."""
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])


def wrap_row(sizes: Sequence[int], pairs: int) -> None:
    """``esper.wrap()`` vs ``copy.deepcopy`` of the model, median of interleaved pairs."""
    print("\n## wrap() vs layers (width-64 MLP), median of", pairs, "interleaved pairs")
    print(f"{'layers':>7} {'deepcopy s':>11} {'wrap s':>9} {'wrap/deepcopy':>14} {'A/A':>6}")
    wraps = []
    for layers in sizes:
        model = mlp(layers)
        copies, wrapped, controls = [], [], []
        for pair in range(pairs):
            first, second = (copy.deepcopy, esper.wrap) if pair % 2 else (esper.wrap, copy.deepcopy)
            a = once(lambda: first(model))  # noqa: B023
            b = once(lambda: second(model))  # noqa: B023
            c = once(lambda: copy.deepcopy(model))  # noqa: B023
            w, d = (b, a) if pair % 2 else (a, b)
            copies.append(d)
            wrapped.append(w)
            controls.append(c / d)
        ratio = statistics.median(w / d for w, d in zip(wrapped, copies, strict=True))
        wraps.append(statistics.median(wrapped))
        print(
            f"{layers:>7} {statistics.median(copies):>11.3f} {wraps[-1]:>9.3f} {ratio:>14.2f} "
            f"{statistics.median(controls):>6.2f}"
        )
    print(f"fitted exponent of wrap time: {fitted_exponent(sizes, wraps):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="wrap,urza,telemetry,tamiyo")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = set(args.rows.split(","))
    if "wrap" in rows:
        wrap_row([64, 256, 1024] if args.quick else [256, 1024, 2048, 4096], 3 if args.quick else 7)


if __name__ == "__main__":
    main()
