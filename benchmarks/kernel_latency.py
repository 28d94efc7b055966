"""Kernel execution latency: the absolute time of one active seed's contribution, in microseconds.

Run: ``python benchmarks/kernel_latency.py [--trials 41]`` (CPU; the GPU figures come from
``benchmarks/gpu_check.py``, issue 13). The design promises "microsecond-scale" kernel execution
and "<0.5 ms". For each representative shape a host layer is wrapped with one seed carrying a
``lowrank_adapter`` kernel (rank 8), eval mode, no grad, and three things are timed per call:

* ``host``: the plain host layer's own forward;
* ``seeded``: the wrapped layer with its seed ACTIVE (alpha 1): host + kernel + blend;
* ``kernel``: ``seeded - host`` from the same trial (the seed's contribution).

A trial times a block of calls of each, alternating which goes first; median and p99 are over
trials (per-call times). Absolute times depend on the machine and its load: the A/A line (host
against itself) shows how far two identical blocks drift apart here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource
from ratio_timer import calibrate, percentile

SHAPES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("Linear 512->512, batch 32", lambda: nn.Linear(512, 512), (32, 512)),
    ("Linear 1024->1024, batch 128", lambda: nn.Linear(1024, 1024), (128, 1024)),
    ("Linear 128->128, batch 16x32 tokens", lambda: nn.Linear(128, 128), (16, 32, 128)),
    (
        "Conv2d 32->32 3x3, batch 8 at 28x28",
        lambda: nn.Conv2d(32, 32, 3, padding=1),
        (8, 32, 28, 28),
    ),
]


def seeded(host: nn.Module) -> nn.Module:
    """``host`` wrapped with one ACTIVE rank-8 seed whose kernel really contributes."""
    source = InMemoryArtifactSource()
    model = esper.wrap(nn.Sequential(host), seeds_per_layer=1, kernel_source=source)
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})
    data, _ = create_artifact(spec, model.layer("0").target(), init_seed=0)
    kernel = asyncio.run(model.load_kernel("0", seed_idx=0, kernel_artifact_id=source.add(data)))
    assert model.seed_state("0", 0) is SeedState.ACTIVE
    with torch.no_grad():
        for param in kernel.parameters():
            param.normal_(0, 0.02)
    return model.eval()


def _per_call_us(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def measure(host: nn.Module, x: torch.Tensor, trials: int) -> dict[str, list[float]]:
    """Per-call microseconds of host, seeded layer and their difference, one value per trial."""
    model = seeded(host)
    with torch.no_grad():
        plain = lambda: host(x)  # noqa: E731
        morphed = lambda: model(x)  # noqa: E731
        iters = calibrate(morphed, target_s=0.01)
        times: dict[str, list[float]] = {"host": [], "seeded": [], "kernel": [], "aa": []}
        for trial in range(trials):
            pair = [plain, morphed] if trial % 2 == 0 else [morphed, plain]
            first, second = (_per_call_us(fn, iters) for fn in pair)
            host_us, seeded_us = (first, second) if trial % 2 == 0 else (second, first)
            again = _per_call_us(plain, iters)
            times["host"].append(host_us)
            times["seeded"].append(seeded_us)
            times["kernel"].append(seeded_us - host_us)
            times["aa"].append(again - host_us)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; us per call, eval, CPU")
    print(
        f"{'shape':38s} {'host p50':>9s} {'seeded p50':>10s} {'kernel p50':>10s} "
        f"{'kernel p99':>10s} {'A/A p50':>8s}"
    )
    for name, build, shape in SHAPES:
        times = measure(build(), torch.randn(*shape), args.trials)
        print(
            f"{name:38s} {statistics.median(times['host']):9.1f} "
            f"{statistics.median(times['seeded']):10.1f} "
            f"{statistics.median(times['kernel']):10.1f} {percentile(times['kernel'], 0.99):10.1f} "
            f"{statistics.median(times['aa']):8.1f}"
        )


if __name__ == "__main__":
    main()
