"""Scale: how Esper's one-off and per-call costs grow with the size of what they work on.

Run: ``python benchmarks/scale.py [--rows wrap,urza,telemetry] [--quick]``.

Each row is measured at 3-4 sizes, single-threaded, and printed with the exponent of a
least-squares fit of log(time) on log(size) (1.0: linear; 2.0: quadratic):

- ``wrap``: ``esper.wrap()`` of a width-64 MLP (Linear + ReLU blocks) vs ``copy.deepcopy`` of the
  same model, interleaved, median of pairs (the goal is a ratio of at most 2 at every size).
- ``urza``: ``find_or_enqueue`` hits and kernel searches in a library holding n kernels, on
  SQLite and (if reachable at ``ESPER_TEST_POSTGRES``) PostgreSQL; p50/p99 and the statements a
  hit sends.
- ``telemetry``: ``collect_telemetry()`` per layer at n seeded layers, and the share of step time
  that default telemetry (``health_every=10``, collect every 10 steps) adds at 256 layers.
The Tamiyo decision-latency row is ``benchmarks/decision_latency.py`` (not yet run here at
5,000-10,000 layers).

``--quick`` uses smaller sizes (for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec, KernelMetadata, KernelTarget, LayerKind
from esper.tezzeret import find_or_enqueue
from esper.urza import open_storage_library
from esper.urza.sql_schema import kernels_table
from esper.urza.storage_library import StorageLibrary
from ratio_timer import compare


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


URZA_BLUEPRINTS = 10
URZA_GEOMETRIES = 100
"""Kernels stored: every blueprint x geometry, then more init seeds of each (n / 1,000 seeds)."""


def _kernel_rows(spec: BlueprintSpec, geometry: int, seed: int) -> dict[str, object]:
    """The row ``insert_kernel`` writes for one kernel (metadata only: lookups read no bytes)."""
    target = KernelTarget(
        layer_kind=LayerKind.LINEAR,
        in_features=8 + geometry,
        out_features=16,
        channel_dim=-1,
        spatial_dims=0,
    )
    kernel_id = hashlib.sha256(f"{spec.blueprint_id}/{geometry}/{seed}".encode()).hexdigest()
    metadata = KernelMetadata(
        kernel_id=kernel_id,
        blueprint=spec,
        target=target,
        dtype="float32",
        parameter_count=1000,
        size_bytes=4096,
        checksum=kernel_id,
        init_seed=seed,
    )
    return {
        "kernel_id": kernel_id,
        "blueprint_id": spec.blueprint_id,
        "in_features": target.in_features,
        "out_features": target.out_features,
        "channel_dim": target.channel_dim,
        "spatial_dims": target.spatial_dims,
        "device": target.device,
        "dtype": "float32",
        "size_bytes": 4096,
        "metadata_json": metadata.model_dump_json(),
        "created_at": time.time(),
        "init_seed": seed,
    }


@contextmanager
def _postgres_database() -> Iterator[str | None]:
    """A fresh database on the PostgreSQL at ``ESPER_TEST_POSTGRES_URL`` (default: the local
    one), dropped afterwards; ``None`` when none is reachable."""
    try:
        import psycopg
    except ImportError:
        yield None
        return
    server = os.environ.get("ESPER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"esper_scale_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=2) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error:
        yield None
        return
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _urza_backend(label: str, library: StorageLibrary, sizes: Sequence[int], lookups: int) -> None:
    specs = [BlueprintSpec(family="residual_mlp", params={"hidden": 8 + b}) for b in range(10)]
    for spec in specs:
        library.submit_blueprint(spec)
    engine = library.metadata.engine
    stored_seeds = 0
    rng = random.Random(0)
    p50s = []
    for size in sizes:
        seeds = size // (URZA_BLUEPRINTS * URZA_GEOMETRIES)
        rows = [
            _kernel_rows(spec, geometry, seed)
            for seed in range(stored_seeds, seeds)
            for spec in specs
            for geometry in range(URZA_GEOMETRIES)
        ]
        for start in range(0, len(rows), 5000):
            with engine.begin() as conn:
                conn.execute(kernels_table.insert(), rows[start : start + 5000])
        stored_seeds = seeds
        latencies = []
        for _ in range(lookups):
            spec = rng.choice(specs)
            geometry, seed = rng.randrange(URZA_GEOMETRIES), rng.randrange(seeds)
            target = KernelTarget(
                layer_kind=LayerKind.LINEAR,
                in_features=8 + geometry,
                out_features=16,
                channel_dim=-1,
                spatial_dims=0,
            )
            started = time.perf_counter()
            request = find_or_enqueue(library, spec, target, init_seed=seed)
            latencies.append((time.perf_counter() - started) * 1e3)
            assert request.kernel is not None and request.kernel.init_seed == seed
        p50s.append(percentile(latencies, 0.5))
        print(f"{label:>10} {size:>9,} {p50s[-1]:>9.2f} {percentile(latencies, 0.99):>9.2f}")
    print(f"{label:>10} fitted exponent of the p50: {fitted_exponent(sizes, p50s):.2f}")


def urza_row(sizes: Sequence[int], lookups: int) -> None:
    """``find_or_enqueue`` hits (blueprint + geometry + dtype + seed) vs kernels stored."""
    print(f"\n## Urza find_or_enqueue hit vs kernels stored, {lookups} random lookups per size")
    print(f"{'backend':>10} {'kernels':>9} {'p50 ms':>9} {'p99 ms':>9}")
    with tempfile.TemporaryDirectory() as folder:
        library = open_storage_library(run_dir=Path(folder))
        assert isinstance(library, StorageLibrary)
        try:
            _urza_backend("sqlite", library, sizes, lookups)
        finally:
            library.close()
        with _postgres_database() as url:
            if url is None:
                print("  postgresql: not reachable, skipped")
                return
            library = open_storage_library(metadata_url=url, blob_url=str(Path(folder) / "pg"))
            assert isinstance(library, StorageLibrary)
            try:
                _urza_backend("postgresql", library, sizes, lookups)
            finally:
                library.close()


def _seeded_model(layers: int) -> tuple[esper.MorphableModel, torch.Tensor]:
    model = esper.wrap(mlp(layers), seeds_per_layer=4, health_every=1)
    x = torch.randn(32, 64)
    model.step()
    model(x).square().mean().backward()
    return model, x


def telemetry_row(sizes: Sequence[int], repeats: int) -> None:
    """``collect_telemetry()`` per layer after a recorded forward and backward."""
    print(f"\n## collect_telemetry() per layer (4 seeds per layer, grads present), {repeats} reads")
    print(f"{'layers':>7} {'collect ms':>11} {'us/layer':>9}")
    times = []
    for layers in sizes:
        model, x = _seeded_model(layers)
        samples = []
        for _ in range(repeats):
            model(x)  # record again (sampling stays armed at health_every=1 after step())
            samples.append(once(model.collect_telemetry))
        times.append(statistics.median(samples))
        print(f"{layers:>7} {times[-1] * 1e3:>11.2f} {times[-1] / layers * 1e6:>9.1f}")
    print(f"fitted exponent of collect time: {fitted_exponent(sizes, times):.2f}")


def telemetry_share(layers: int, pairs: int) -> None:
    """Default telemetry's share of step time: ``health_every=10`` and a collect every 10 steps
    vs the same wrapped model with ``health_every=0`` and no collect (10-step blocks, paired)."""
    torch.manual_seed(0)
    plain = esper.wrap(mlp(layers), seeds_per_layer=4, health_every=0)
    telemetry = esper.wrap(mlp(layers), seeds_per_layer=4, health_every=10)
    x = torch.randn(64, 64)

    def block(model: esper.MorphableModel, collect: bool) -> None:
        for _ in range(10):
            model.step()
            model(x).square().mean().backward()
        if collect:
            model.collect_telemetry()

    result = compare(lambda: block(plain, False), lambda: block(telemetry, True), trials=pairs)
    print(
        f"default telemetry at {layers} seeded layers: step time x{result.ratio:.3f} "
        f"(A/A {result.control:.3f}; 10-step block {result.baseline_us / 1e3:.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="wrap,urza,telemetry")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = set(args.rows.split(","))
    if "wrap" in rows:
        wrap_row([64, 256, 1024] if args.quick else [256, 1024, 2048, 4096], 3 if args.quick else 7)
    if "telemetry" in rows:
        telemetry_row([64, 256, 1024] if args.quick else [64, 256, 1024, 4096], 15)
        telemetry_share(256, 11 if args.quick else 31)
    if "urza" in rows:
        urza_row([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000], 300)


if __name__ == "__main__":
    main()
