"""Kernel cache under churn: hit rate, evictions and bytes held when more kernels circulate
than fit.

Run: ``python benchmarks/kernel_cache_churn.py [--requests 2000]`` (seconds). The design promises a
">95% hit rate". A hit rate is a property of the workload as much as of the cache, so several are
shown: a cache of ``--capacity`` entries (and a byte bound) serves ``--requests`` ``get`` calls for
kernels drawn from a pool of N distinct real artifacts (rank-8 ``lowrank_adapter`` kernels for a
Linear 256->256):

* ``zipf`` (s=1.1) over N = 2x and 8x the capacity: a few kernels are hot, most are cold;
* ``uniform`` over N = 2x the capacity: every kernel equally likely (LRU's hard case);
* ``cyclic`` over N = capacity + 1: the sequential scan that defeats LRU entirely (0 hits).

Hit rate = hits / (hits + misses + coalesced); each request waits for its load, so nothing is
coalesced. Bytes held never exceed the byte bound (checked after every request).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.execution import InMemoryArtifactSource, KernelCache

TARGET = KernelTarget(
    layer_kind=LayerKind.LINEAR,
    in_features=256,
    out_features=256,
    channel_dim=-1,
    spatial_dims=0,
    device="cpu",
    dtype="float32",
)
SPEC = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})


def pool(size: int, source: InMemoryArtifactSource) -> list[str]:
    """``size`` distinct kernel ids stored in ``source``."""
    return [source.add(create_artifact(SPEC, TARGET, init_seed=i)[0]) for i in range(size)]


def zipf(ids: list[str], n: int, rng: random.Random, s: float = 1.1) -> Iterator[str]:
    weights = [1.0 / (rank + 1) ** s for rank in range(len(ids))]
    yield from rng.choices(ids, weights=weights, k=n)


def uniform(ids: list[str], n: int, rng: random.Random) -> Iterator[str]:
    yield from rng.choices(ids, k=n)


def cyclic(ids: list[str], n: int, rng: random.Random) -> Iterator[str]:
    for i in range(n):
        yield ids[i % len(ids)]


def run(name: str, pattern: str, pool_size: int, args: argparse.Namespace) -> None:
    source = InMemoryArtifactSource()
    ids = pool(pool_size, source)
    entry_bytes = 2 * 8 * 256 * 4  # down and up weights of a rank-8 adapter, float32
    cache = KernelCache(
        source, max_entries=args.capacity, max_bytes=int(args.capacity * entry_bytes * 1.5)
    )
    rng = random.Random(0)
    workload = {"zipf": zipf, "uniform": uniform, "cyclic": cyclic}[pattern]
    peak = 0
    for kernel_id in workload(ids, args.requests, rng):
        cache.get(kernel_id).result(timeout=30)
        stats = cache.stats()
        peak = max(peak, stats.bytes)
        assert stats.bytes <= stats.max_bytes and stats.entries <= stats.max_entries
    stats = cache.stats()
    cache.close()
    print(
        f"{name:28s} {pool_size:5d} {stats.hit_rate:8.1%} {stats.evictions:9d} "
        f"{peak:10d} {stats.max_bytes:10d}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--capacity", type=int, default=16, help="cache entries")
    args = parser.parse_args()
    c = args.capacity
    print(f"cache of {c} entries; {args.requests} requests per workload")
    print(
        f"{'workload':28s} {'pool':>5s} {'hit rate':>8s} {'evictions':>9s} "
        f"{'peak bytes':>10s} {'max bytes':>10s}"
    )
    run("zipf s=1.1, pool 2x", "zipf", 2 * c, args)
    run("zipf s=1.1, pool 8x", "zipf", 8 * c, args)
    run("uniform, pool 2x", "uniform", 2 * c, args)
    run("cyclic scan, pool c+1", "cyclic", c + 1, args)
    run("fits: uniform, pool c/2", "uniform", max(1, c // 2), args)


if __name__ == "__main__":
    main()
